//! The integration test harness: a real gateway binary on ephemeral ports, a real echo
//! upstream, and a small HTTP/1.1 client that can send exactly the bytes a test wants
//! (duplicate headers, huge headers, malformed credentials).
#![allow(dead_code)]

pub mod llm;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate::echo::{EchoState, Gate};
use tollgate::keys::KeyHash;

/// A port nobody is listening on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// A fresh directory under the system temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tollgate-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// `sha256:<hex>` of a test secret.
pub fn hash_of(secret: &str) -> String {
    KeyHash::of(secret.as_bytes()).to_string()
}

/// The echo upstream, on its own runtime thread.
pub struct Echo {
    pub addr: SocketAddr,
    pub state: Arc<EchoState>,
    _shutdown: std::sync::mpsc::Sender<()>,
}

impl Echo {
    pub fn start() -> Echo {
        Self::start_with(EchoState::default())
    }

    /// An echo whose SSE streams wait on the returned gate between events.
    pub fn gated() -> (Echo, Arc<Gate>) {
        let gate = Arc::new(Gate::default());
        let echo = Self::start_with(EchoState { gate: Some(gate.clone()), ..EchoState::default() });
        (echo, gate)
    }

    fn start_with(state: EchoState) -> Echo {
        let state = Arc::new(state);
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let st = state.clone();
        std::thread::spawn(move || {
            let rt =
                tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
            rt.block_on(async move {
                let addr = tollgate::echo::spawn("127.0.0.1:0".parse().expect("addr"), st).await.expect("echo bind");
                addr_tx.send(addr).expect("send addr");
                // Stay up until the Echo is dropped.
                tokio::task::spawn_blocking(move || {
                    let _ = stop_rx.recv();
                })
                .await
                .ok();
            });
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(10)).expect("echo started");
        Echo { addr, state, _shutdown: stop_tx }
    }

    pub fn hits(&self) -> u64 {
        tollgate::echo::hits(&self.state)
    }
}

/// A running gateway process.
pub struct Gateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    child: Child,
}

/// Fills `{LISTEN}`, `{ADMIN}` and `{DIR}` in a config template.
pub fn render(template: &str, listen: SocketAddr, admin: SocketAddr, dir: &std::path::Path) -> String {
    template
        .replace("{LISTEN}", &listen.to_string())
        .replace("{ADMIN}", &admin.to_string())
        .replace("{DIR}", &dir.display().to_string())
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tollgate")
}

impl Gateway {
    /// Writes the config (with `{LISTEN}`, `{ADMIN}`, `{DIR}` filled in) and starts the gateway.
    pub fn start(template: &str) -> Gateway {
        Self::start_in(temp_dir("gw"), template, &[])
    }

    /// Like `start`, writing `extra_files` (relative to the config's directory) first.
    pub fn start_in(dir: PathBuf, template: &str, extra_files: &[(&str, &str)]) -> Gateway {
        for (name, body) in extra_files {
            let p = dir.join(name);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).expect("mkdir");
            }
            std::fs::write(p, body).expect("write extra file");
        }
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let config_path = dir.join("tollgate.toml");
        std::fs::write(&config_path, render(template, listen, admin, &dir)).expect("write config");
        let child = spawn_run(&config_path, &dir, &[]);
        let mut gw = Gateway { addr: listen, admin, dir, config_path, child };
        gw.wait_ready();
        gw
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("gateway exited early ({status}):\n{}", self.log());
            }
            let up = TcpStream::connect(self.addr).is_ok()
                && get(self.admin, "/healthz", &[]).map(|r| r.status == 200).unwrap_or(false);
            if up {
                return;
            }
            if Instant::now() > deadline {
                panic!("gateway did not become ready:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
        get(self.addr, path, headers).expect("request")
    }

    pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        request(self.addr, method, path, headers, body).expect("request")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal to the gateway process.
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill").args([format!("-{sig}"), self.child.id().to_string()]).status();
    }

    /// Waits for the process to exit, up to `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Replaces the child process handle (after a zero-downtime upgrade).
    pub fn replace_child(&mut self, child: Child) -> Child {
        std::mem::replace(&mut self.child, child)
    }
}

/// Starts `tollgate run -c CONFIG [args]`, stderr appended to DIR/stderr.log.
pub fn spawn_run(config_path: &std::path::Path, dir: &std::path::Path, args: &[&str]) -> Child {
    let stderr = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("stderr.log")).expect("log file");
    Command::new(bin())
        .args(["run", "-c"])
        .arg(config_path)
        .args(args)
        .env("RUST_LOG", "info,pingora=error")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn gateway")
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A parsed response.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `code` of a problem+json body, after checking that it is one.
    pub fn problem_code(&self) -> String {
        assert_eq!(self.header("content-type"), Some("application/problem+json"), "not a problem: {self:?}");
        let len: usize = self.header("content-length").and_then(|v| v.parse().ok()).expect("content-length");
        assert_eq!(len, self.body.len());
        let v = self.json();
        assert_eq!(v["status"].as_u64(), Some(self.status as u64));
        assert!(v["type"].as_str().is_some_and(|t| t.starts_with("urn:tollgate:error:")));
        v["code"].as_str().unwrap_or_default().to_string()
    }

    /// The headers the echo upstream received.
    pub fn upstream_headers(&self) -> serde_json::Value {
        self.json()["headers"].clone()
    }
}

/// A keep-alive HTTP/1.1 connection.
pub struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> std::io::Result<Conn> {
        let s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.set_nodelay(true)?;
        Ok(Conn { reader: BufReader::new(s) })
    }

    pub fn send_raw(&mut self, raw: &[u8]) -> std::io::Result<()> {
        self.reader.get_mut().write_all(raw)
    }

    /// Reads the status line and headers.
    pub fn read_head(&mut self) -> std::io::Result<(u16, Vec<(String, String)>)> {
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        if line.is_empty() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            self.reader.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        Ok((status, headers))
    }

    /// Reads one chunk of a chunked body; `None` at the last chunk.
    pub fn read_chunk(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        let mut size_line = String::new();
        self.reader.read_line(&mut size_line)?;
        let size = usize::from_str_radix(size_line.trim().split(';').next().unwrap_or("0"), 16)
            .map_err(|_| std::io::Error::other(format!("bad chunk size {size_line:?}")))?;
        if size == 0 {
            let mut end = String::new();
            self.reader.read_line(&mut end)?;
            return Ok(None);
        }
        let mut data = vec![0u8; size + 2];
        self.reader.read_exact(&mut data)?;
        data.truncate(size);
        Ok(Some(data))
    }

    pub fn read_response(&mut self, head_request: bool) -> std::io::Result<Resp> {
        let (status, headers) = self.read_head()?;
        let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let mut body = Vec::new();
        if head_request || status == 204 || status == 304 {
            // no body
        } else if get("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
            while let Some(c) = self.read_chunk()? {
                body.extend_from_slice(&c);
            }
        } else if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
            body.resize(len, 0);
            self.reader.read_exact(&mut body)?;
        } else {
            self.reader.read_to_end(&mut body)?;
        }
        Ok(Resp { status, headers, body })
    }

    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Resp> {
        self.send_raw(&build_request(method, path, headers, body))?;
        self.read_response(method == "HEAD")
    }
}

pub fn build_request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut raw = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        raw.push_str("host: localhost\r\n");
    }
    for (k, v) in headers {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    let chunked = headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if !body.is_empty() && !chunked && !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-length")) {
        raw.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    raw.push_str("\r\n");
    let mut out = raw.into_bytes();
    out.extend_from_slice(body);
    out
}

pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Resp> {
    Conn::open(addr)?.request(method, path, headers, body)
}

pub fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> std::io::Result<Resp> {
    request(addr, "GET", path, headers, b"")
}

pub const ACME_KEY: &str = "tg_live_acmeAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
pub const ACME_READONLY_KEY: &str = "tg_live_acmeReadOnlyBBBBBBBBBBBBBBBBBBBBBB";
pub const GLOBEX_KEY: &str = "tg_live_globexCCCCCCCCCCCCCCCCCCCCCCCCCCCC";
pub const EXPIRED_KEY: &str = "tg_live_expiredDDDDDDDDDDDDDDDDDDDDDDDDDDD";
pub const REVOKED_KEY: &str = "tg_live_revokedEEEEEEEEEEEEEEEEEEEEEEEEEEE";
pub const DORMANT_KEY: &str = "tg_live_dormantFFFFFFFFFFFFFFFFFFFFFFFFFFF";
pub const FORTRESS_KEY: &str = "tg_live_fortressGGGGGGGGGGGGGGGGGGGGGGGGGG";

/// The pieces a test adds to [`standard_config`].
#[derive(Default)]
pub struct Extra<'a> {
    /// Top-level keys, placed before any table (`include`, `unmatched`, `metrics`).
    pub top: &'a str,
    /// Extra lines inside `[tenancy]`.
    pub tenancy: &'a str,
    /// Extra lines inside `[server]`.
    pub server: &'a str,
    /// Tables appended at the end (`[[rule]]`, more tenants).
    pub tail: &'a str,
}

/// A config with tiers, tenants and keys for every authentication outcome, in front of `echo`.
/// The echo pool is named `default`, so public routes without a tenant go there too. The
/// `dead` upstream points at a port nobody listens on.
pub fn standard_config(echo: SocketAddr, extra: Extra<'_>) -> String {
    format!(
        r#"{top}

[server]
listen = ["{{LISTEN}}"]
admin_listen = "{{ADMIN}}"
threads = 1
upgrade_sock = "{{DIR}}/upgrade.sock"
pid_file = "{{DIR}}/tollgate.pid"
max_header_bytes = "16KiB"
{server}

[store]
kind = "embedded"
path = "{{DIR}}/tollgate.db"

[tenancy]
base_domain = "example.test"
{tenancy}

[upstreams.default]
servers = ["{echo}"]
connect_timeout = "500ms"
read_timeout = "2s"

[upstreams.dead]
servers = ["127.0.0.1:{dead}"]
connect_timeout = "500ms"

[tiers.free]
upstream = "default"
features = []

[tiers.pro]
upstream = "default"
features = ["streaming"]

[[tenants]]
id = "acme"
name = "Acme"
tier = "pro"
subdomains = ["acme", "acme-eu"]

[[tenants.keys]]
id = "acme-main"
hash = "{acme}"
scopes = ["read", "generate", "admin"]

[[tenants.keys]]
id = "acme-ro"
hash = "{acme_ro}"
scopes = ["read"]

[[tenants.keys]]
id = "acme-expired"
hash = "{expired}"
scopes = ["read"]
expires = 2020-01-01T00:00:00Z

[[tenants.keys]]
id = "acme-revoked"
hash = "{revoked}"
scopes = ["read"]
revoked = true

[[tenants]]
id = "globex"
tier = "free"

[[tenants.keys]]
id = "globex-main"
hash = "{globex}"
scopes = ["read"]

[[tenants]]
id = "dormant"
tier = "free"
status = "suspended"

[[tenants.keys]]
id = "dormant-main"
hash = "{dormant}"
scopes = ["read"]

[[tenants]]
id = "fortress"
tier = "free"
ip_allow = ["10.1.2.3/32"]

[[tenants.keys]]
id = "fortress-main"
hash = "{fortress}"
scopes = ["read"]

{tail}
"#,
        top = extra.top,
        server = extra.server,
        tenancy = extra.tenancy,
        tail = extra.tail,
        dead = free_port(),
        acme = hash_of(ACME_KEY),
        acme_ro = hash_of(ACME_READONLY_KEY),
        expired = hash_of(EXPIRED_KEY),
        revoked = hash_of(REVOKED_KEY),
        globex = hash_of(GLOBEX_KEY),
        dormant = hash_of(DORMANT_KEY),
        fortress = hash_of(FORTRESS_KEY),
    )
}

/// The `[server]` table of a test gateway: ephemeral listeners (filled in by
/// [`Gateway::start`]), two threads, files in the gateway's directory, a quick shutdown.
pub const SERVER_TABLE: &str = r#"[server]
listen = ["{LISTEN}"]
admin_listen = "{ADMIN}"
threads = 2
upgrade_sock = "{DIR}/upgrade.sock"
pid_file = "{DIR}/tollgate.pid"
shutdown_timeout = "2s"
shutdown_grace = "1s"
"#;

/// `[[tenants]]` entries for `ids` on `tier`, each with one key (`key_of(id)`, scope `read`).
pub fn keyed_tenants(ids: &[String], tier: &str, key_of: impl Fn(&str) -> String) -> String {
    let mut out = String::new();
    for id in ids {
        out.push_str(&format!(
            "[[tenants]]\nid = \"{id}\"\ntier = \"{tier}\"\n[[tenants.keys]]\nid = \"{id}-key\"\nhash = \"{}\"\nscopes = [\"read\"]\n\n",
            hash_of(&key_of(id))
        ));
    }
    out
}

pub fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// A real `redis-server` on a free port, owned by the test. `scripts/ensure-deps.sh` installs
/// it; the harness never uses a system Redis service.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
    persistent: bool,
}

impl Redis {
    pub fn start() -> Redis {
        let port = free_port();
        let dir = temp_dir("redis");
        let mut r = Redis { port, child: None, dir, persistent: false };
        r.spawn();
        r
    }

    /// A Redis that keeps its data across `kill` + `restart` (append-only file, fsync always).
    pub fn start_persistent() -> Redis {
        let port = free_port();
        let dir = temp_dir("redis");
        let mut r = Redis { port, child: None, dir, persistent: true };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let aof: &[&str] =
            if self.persistent { &["--appendonly", "yes", "--appendfsync", "always"] } else { &["--appendonly", "no"] };
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(aof)
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (scripts/ensure-deps.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Sends a signal to the server (`STOP` freezes it, `CONT` resumes it).
    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").args([format!("-{sig}"), c.id().to_string()]).status();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Runs a command with redis-cli-like raw RESP and returns the raw reply line.
    pub fn command(&self, args: &[&str]) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect redis");
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).expect("write");
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).expect("read");
        if line.starts_with('$') && !line.starts_with("$-1") {
            let mut v = String::new();
            r.read_line(&mut v).expect("read");
            return v.trim_end().to_string();
        }
        line.trim_end().to_string()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The Redis Cluster hash slot of a key (CRC16-XMODEM of its hash tag, modulo 16384), as
/// Redis computes it.
pub fn cluster_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let close = bytes[open + 1..].iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &bytes[open + 1..open + 1 + close])
    });
    let mut crc: u16 = 0;
    for &b in tagged.unwrap_or(bytes) {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc % 16384
}

/// A Redis Cluster of real `redis-server` processes on free ports, owned by the test: `masters`
/// masters, each with `replicas` replicas, created with `redis-cli --cluster create`. Every
/// process is killed (by PID) when it is dropped.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    children: Vec<Child>,
    dir: PathBuf,
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    pub id: String,
    pub port: u16,
    pub master: bool,
    pub failed: bool,
    /// The master's id, for a replica.
    pub master_id: Option<String>,
    /// Slot ranges served, for a master.
    pub slots: Vec<(u16, u16)>,
}

impl RedisCluster {
    /// Starts the nodes and creates the cluster; returns once every node reports
    /// `cluster_state:ok` with all 16384 slots served. `node_timeout_ms` is how long a master
    /// may be unreachable before it counts as failed (and a replica takes over).
    pub fn start(masters: usize, replicas: usize, node_timeout_ms: u64) -> RedisCluster {
        let dir = temp_dir("redis-cluster");
        let n = masters * (1 + replicas);
        let mut ports: Vec<u16> = Vec::new();
        while ports.len() < n {
            // The cluster bus listens on port + 10000.
            let p = free_port();
            if p <= 55_000 && !ports.contains(&p) && TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
                ports.push(p);
            }
        }
        let mut cluster = RedisCluster { ports: ports.clone(), children: Vec::new(), dir: dir.clone() };
        for (i, p) in ports.iter().enumerate() {
            let node_dir = dir.join(format!("node-{i}"));
            std::fs::create_dir_all(&node_dir).expect("node dir");
            let child = Command::new("redis-server")
                .args(["--port", &p.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", &node_timeout_ms.to_string()])
                // Masters whose slots are served keep serving when another master is down.
                .args(["--cluster-require-full-coverage", "no"])
                // A replica may take over however recently it synced: a test kills a master
                // seconds after the cluster formed.
                .args(["--cluster-replica-validity-factor", "0"])
                .arg("--cluster-config-file")
                .arg(node_dir.join("nodes.conf"))
                .arg("--dir")
                .arg(&node_dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server on PATH (scripts/ensure-deps.sh installs it)");
            cluster.children.push(child);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for p in &ports {
            while TcpStream::connect(("127.0.0.1", *p)).is_err() {
                assert!(Instant::now() < deadline, "redis-server on port {p} did not start");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli on PATH");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_ok(&(0..n).collect::<Vec<_>>(), Duration::from_secs(20));
        cluster
    }

    /// `redis://127.0.0.1:PORT` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.ports.iter().map(|p| format!("redis://127.0.0.1:{p}")).collect()
    }

    /// The URL of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!("redis://127.0.0.1:{}", self.ports[i])
    }

    /// A connection to node `i` that gives up after `timeout`.
    pub fn conn(&self, i: usize, timeout: Duration) -> redis::RedisResult<redis::Connection> {
        let c = redis::Client::open(self.url(i))?.get_connection_with_timeout(timeout)?;
        c.set_read_timeout(Some(timeout))?;
        c.set_write_timeout(Some(timeout))?;
        Ok(c)
    }

    /// Runs one command on node `i` (no redirection).
    pub fn query<T: redis::FromRedisValue>(&self, i: usize, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        cmd.query(&mut self.conn(i, Duration::from_secs(2))?)
    }

    /// `CLUSTER NODES` as node `i` sees it.
    pub fn nodes(&self, i: usize) -> redis::RedisResult<Vec<ClusterNode>> {
        let text: String = self.query(i, redis::cmd("CLUSTER").arg("NODES"))?;
        Ok(text
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                if f.len() < 8 {
                    return None;
                }
                let port = f[1].split('@').next()?.rsplit(':').next()?.parse().ok()?;
                let slots = f[8..]
                    .iter()
                    .filter(|s| !s.starts_with('['))
                    .filter_map(|s| match s.split_once('-') {
                        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                        None => s.parse().ok().map(|x| (x, x)),
                    })
                    .collect();
                Some(ClusterNode {
                    id: f[0].to_string(),
                    port,
                    master: f[2].contains("master"),
                    failed: f[2].contains("fail"),
                    master_id: (f[3] != "-").then(|| f[3].to_string()),
                    slots,
                })
            })
            .collect())
    }

    fn index_of_port(&self, port: u16) -> Option<usize> {
        self.ports.iter().position(|p| *p == port)
    }

    /// Waits until every node in `alive` reports `cluster_state:ok`, all slots served by
    /// masters it does not consider failed, and the same master for every slot.
    pub fn wait_ok(&self, alive: &[usize], within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let mut why = String::new();
            let mut owners: Option<Vec<(u16, u16, u16)>> = None;
            for &i in alive {
                let info: String = match self.query(i, redis::cmd("CLUSTER").arg("INFO")) {
                    Ok(s) => s,
                    Err(e) => {
                        why = format!("node {i}: {e}");
                        break;
                    }
                };
                if !info.contains("cluster_state:ok") || !info.contains("cluster_slots_ok:16384") {
                    why = format!("node {i}: {}", info.lines().take(4).collect::<Vec<_>>().join(" "));
                    break;
                }
                let mut o: Vec<(u16, u16, u16)> = match self.nodes(i) {
                    Ok(nodes) => nodes
                        .iter()
                        .filter(|n| n.master && !n.failed)
                        .flat_map(|n| n.slots.iter().map(move |(a, b)| (*a, *b, n.port)))
                        .collect(),
                    Err(e) => {
                        why = format!("node {i}: {e}");
                        break;
                    }
                };
                o.sort();
                let served: u32 = o.iter().map(|(a, b, _)| (*b - *a) as u32 + 1).sum();
                if served != 16384 {
                    why = format!("node {i} sees {served} slots on live masters");
                    break;
                }
                if owners.as_ref().is_some_and(|prev| *prev != o) {
                    why = format!("node {i} disagrees on slot owners");
                    break;
                }
                owners = Some(o);
            }
            if why.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "the Redis Cluster did not settle: {why}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The node index of the master serving `slot`, as node `asking` sees it.
    pub fn master_of_slot(&self, slot: u16, asking: usize) -> usize {
        let nodes = self.nodes(asking).expect("CLUSTER NODES");
        nodes
            .iter()
            .filter(|n| n.master && !n.failed && n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
            .find_map(|n| self.index_of_port(n.port))
            .unwrap_or_else(|| panic!("no master serves slot {slot}: {nodes:?}"))
    }

    /// The node index of the master holding `tenant`'s keys (`tg:{tenant}:…`).
    pub fn master_for_tenant(&self, tenant: &str) -> usize {
        let asking = (0..self.ports.len()).find(|i| self.nodes(*i).is_ok()).expect("a node that answers");
        self.master_of_slot(cluster_slot(&format!("tg:{{{tenant}}}:x")), asking)
    }

    /// `n` tenant ids whose keys live on `n` different masters, named `<prefix>-<k>`.
    pub fn tenants_on_distinct_masters(&self, prefix: &str, n: usize) -> Vec<String> {
        let mut by_master: Vec<(usize, String)> = Vec::new();
        for k in 0..10_000 {
            let t = format!("{prefix}-{k}");
            let m = self.master_for_tenant(&t);
            if !by_master.iter().any(|(x, _)| *x == m) {
                by_master.push((m, t));
                if by_master.len() == n {
                    break;
                }
            }
        }
        assert_eq!(by_master.len(), n, "fewer than {n} masters");
        by_master.into_iter().map(|(_, t)| t).collect()
    }

    fn signal(&self, i: usize, sig: &str) {
        let status = Command::new("kill").args([format!("-{sig}"), self.children[i].id().to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{sig} node {i}");
    }

    /// Freezes node `i` (SIGSTOP): it keeps its connections open and answers nothing.
    pub fn stop(&self, i: usize) {
        self.signal(i, "STOP");
    }

    /// Lets a frozen node run again (SIGCONT).
    pub fn cont(&self, i: usize) {
        self.signal(i, "CONT");
    }

    /// Kills node `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        let _ = self.children[i].kill();
        let _ = self.children[i].wait();
    }

    /// After [`RedisCluster::kill`] of master `i`: waits until a replica has taken over its
    /// slots and the other nodes agree. Returns the new master's index.
    pub fn wait_failover(&self, i: usize, within: Duration) -> usize {
        let alive: Vec<usize> = (0..self.ports.len()).filter(|x| *x != i).collect();
        let asking = alive[0];
        let old_id =
            self.nodes(asking).expect("CLUSTER NODES").into_iter().find(|n| n.port == self.ports[i]).map(|n| n.id);
        let replica = self
            .nodes(asking)
            .expect("CLUSTER NODES")
            .into_iter()
            .find(|n| n.master_id.is_some() && n.master_id == old_id)
            .and_then(|n| self.index_of_port(n.port))
            .expect("the killed master has a replica");
        let deadline = Instant::now() + within;
        loop {
            let role: String = self
                .query(replica, &redis::cmd("ROLE"))
                .map(|v: Vec<redis::Value>| match v.first() {
                    Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                    _ => String::new(),
                })
                .unwrap_or_default();
            if role == "master" {
                break;
            }
            assert!(Instant::now() < deadline, "no failover of node {i} within {within:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
        self.wait_ok(&alive, deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1)));
        replica
    }

    /// Keys matching `pattern` on every master (reachable or not: a frozen node fails the test).
    pub fn keys_on_masters(&self, pattern: &str) -> Vec<String> {
        let mut out = Vec::new();
        for i in 0..self.ports.len() {
            let role: Vec<redis::Value> = match self.query(i, &redis::cmd("ROLE")) {
                Ok(r) => r,
                Err(_) => continue,
            };
            if matches!(role.first(), Some(redis::Value::BulkString(b)) if b == b"master") {
                let keys: Vec<String> = self.query(i, redis::cmd("KEYS").arg(pattern)).expect("KEYS");
                out.extend(keys);
            }
        }
        out
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP proxy to `target` that holds every chunk it forwards for an adjustable delay: a slow
/// network or a slow store, on demand. Stops accepting when dropped.
pub struct DelayProxy {
    pub addr: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl DelayProxy {
    pub fn start(target: SocketAddr) -> DelayProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let delay_ms = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (d, s) = (delay_ms.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(target) else { continue };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                for (from, to) in [(client.try_clone(), server.try_clone()), (server.try_clone(), client.try_clone())] {
                    let (Ok(mut from), Ok(mut to)) = (from, to) else { continue };
                    let d = d.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            let ms = d.load(Ordering::SeqCst);
                            if ms > 0 {
                                std::thread::sleep(Duration::from_millis(ms));
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        DelayProxy { addr, delay_ms, stop }
    }

    /// Sets the delay of every chunk forwarded from now on.
    pub fn set_delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}
