//! Process lifecycle through the real binary: the TLS listener, Pingora's zero-downtime upgrade
//! (`run -u`), listeners that cannot be bound, shutdown and the last usage flush, `run -d`, and
//! what the process log says about all of it.

mod common;
use common::*;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Waits for `child` to exit, up to `within`; kills it when it does not.
fn exit_of(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// A gateway process started by a test, killed when the test ends, however it ends.
struct Owned(Child);

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `f` until it returns `Some`, up to `within`.
fn eventually<T>(within: Duration, what: &str, log: impl Fn() -> String, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what} did not happen in {within:?}:\n{}", log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Lines of the log that contain `needle`.
fn lines_with<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(needle)).collect()
}

#[test]
fn tls_listener_serves_https_and_marks_the_protocol() {
    let echo = Echo::start();
    let dir = temp_dir("tls");
    let ok = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .output()
        .expect("openssl (scripts/ensure-deps.sh installs it)");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let tls_port = free_port();
    let server = format!(
        "tls = {{ listen = \"127.0.0.1:{tls_port}\", cert = \"cert.pem\", key = \"key.pem\" }}\nmax_connections_per_ip = 5\nheader_timeout = \"2s\""
    );
    let gw = Gateway::start_in(dir, &standard_config(echo.addr, Extra { server: &server, ..Extra::default() }), &[]);
    let out = Command::new("curl")
        .args(["-sk", "--max-time", "10"])
        .args(["-H", &format!("Authorization: Bearer {ACME_KEY}")])
        .arg(format!("https://127.0.0.1:{tls_port}/v1/secure"))
        .output()
        .expect("curl");
    assert!(out.status.success(), "curl failed: {}\n{}", String::from_utf8_lossy(&out.stderr), gw.log());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["headers"]["x-forwarded-proto"], "https");
    assert_eq!(v["headers"]["x-tenant-id"], "acme");
    // The plain listener keeps working beside it.
    assert_eq!(gw.get("/v1/x", &[("authorization", &bearer(ACME_KEY))]).status, 200);

    // The TLS handshake runs under the same caps and head deadline as everything else: a sixth
    // silent socket from one address is closed at once, and the five held ones once the
    // deadline passes without a handshake.
    use std::io::Read;
    let tls_addr = loopback(tls_port);
    let mut held: Vec<std::net::TcpStream> =
        (0..5).map(|_| std::net::TcpStream::connect(tls_addr).expect("connect")).collect();
    std::thread::sleep(Duration::from_millis(300));
    let closed = |s: &mut std::net::TcpStream, within: Duration| -> bool {
        s.set_read_timeout(Some(within)).expect("timeout");
        match s.read(&mut [0u8; 16]) {
            Ok(n) => n == 0,
            Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
        }
    };
    let mut sixth = std::net::TcpStream::connect(tls_addr).expect("connect");
    let start = Instant::now();
    assert!(closed(&mut sixth, Duration::from_secs(2)) && start.elapsed() < Duration::from_secs(1), "sixth kept");
    let start = Instant::now();
    for s in held.iter_mut() {
        assert!(closed(s, Duration::from_secs(6)), "a silent TLS socket outlived the head deadline");
    }
    let took = start.elapsed();
    assert!(took > Duration::from_millis(1000) && took < Duration::from_secs(5), "closed after {took:?}");
}

#[test]
fn zero_downtime_upgrade_hands_over_the_listeners() {
    let echo = Echo::start();
    let mut gw = Gateway::start(&standard_config(echo.addr, Extra::default()));
    let auth = bearer(ACME_KEY);
    assert_eq!(gw.get("/v1/before", &[("authorization", &auth)]).status, 200);
    let old_pid = gw.pid();

    // The new process waits on the upgrade socket; SIGQUIT makes the old one hand over.
    let new_child = spawn_run(&gw.config_path, &gw.dir, &["-u"]);
    std::thread::sleep(Duration::from_millis(500));
    gw.signal("QUIT");
    let mut old_child = Owned(gw.replace_child(new_child));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut served_during = 0;
    loop {
        if let Ok(r) = get(gw.addr, "/v1/during", &[("authorization", &auth)]) {
            assert_eq!(r.status, 200, "{}", r.text());
            served_during += 1;
        }
        if let Ok(Some(_)) = old_child.0.try_wait() {
            break;
        }
        assert!(Instant::now() < deadline, "the old process did not exit:\n{}", gw.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(served_during > 0);
    assert_ne!(gw.pid(), old_pid);
    for _ in 0..5 {
        let r = gw.get("/v1/after", &[("authorization", &auth)]);
        assert_eq!(r.status, 200, "the new process serves: {}", gw.log());
    }
    // Waiting for the sockets is a normal step of an upgrade, not an error; both processes say
    // when they listen.
    let log = gw.log();
    assert!(!log.lines().any(|l| l.contains("ERROR") && l.contains("No incoming socket transfer")), "{log}");
    assert_eq!(lines_with(&log, "tollgate started").len(), 2, "{log}");
}

#[test]
fn sigterm_shuts_down_within_the_configured_grace() {
    let echo = Echo::start();
    let mut gw = Gateway::start(&standard_config(
        echo.addr,
        Extra { server: "shutdown_grace = \"0s\"\nshutdown_timeout = \"1s\"", ..Extra::default() },
    ));
    let started = Instant::now();
    gw.signal("TERM");
    let status = gw.wait_exit(Duration::from_secs(15)).expect("exited");
    assert!(status.success() || status.code().is_some(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "shutdown took {:?}", started.elapsed());
}

#[test]
fn a_taken_port_ends_the_start_with_one_line_and_no_listener() {
    let echo = Echo::start();
    let dir = temp_dir("taken");
    let holder = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = holder.local_addr().expect("addr");
    let admin = loopback(free_port());
    let template = standard_config(echo.addr, Extra { server: "bind_retry = \"1s\"", ..Extra::default() });
    let config = dir.join("tollgate.toml");
    std::fs::write(&config, render(&template, taken, admin, &dir)).expect("write config");
    let log = || std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
    let started = Instant::now();
    let mut child = Owned(spawn_run(&config, &dir, &[]));
    // While it retries, nothing claims to be ready.
    while child.0.try_wait().ok().flatten().is_none() && started.elapsed() < Duration::from_secs(20) {
        if let Ok(r) = get(admin, "/readyz", &[]) {
            assert_ne!(r.status, 200, "ready without a data-plane listener:\n{}", log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = exit_of(&mut child.0, Duration::from_secs(1)).unwrap_or_else(|| panic!("still running:\n{}", log()));
    assert_eq!(status.code(), Some(1), "{}", log());
    assert!(started.elapsed() >= Duration::from_secs(1), "gave up before bind_retry: {:?}", started.elapsed());
    let log = log();
    let lines = lines_with(&log, "cannot listen on");
    assert_eq!(lines.len(), 1, "{log}");
    assert!(
        lines[0]
            .contains(&format!("cannot listen on {taken} (server.listen): address in use (another process holds it")),
        "{log}"
    );
    for noise in ["panicked", "will try again", "tollgate started"] {
        assert!(!log.contains(noise), "`{noise}` in:\n{log}");
    }
    drop(holder);
}

#[test]
fn an_upgrade_that_cannot_bind_a_new_address_is_not_ready_and_exits() {
    let echo = Echo::start();
    let mut gw = Gateway::start(&standard_config(echo.addr, Extra::default()));
    // The new config adds a listen address another process holds; -u skips the start-up probe
    // (its other sockets come from the running process), so the watcher must catch it.
    let holder = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = holder.local_addr().expect("addr");
    let text = std::fs::read_to_string(&gw.config_path).expect("config");
    let text = text
        .replace(&format!("listen = [\"{}\"]", gw.addr), &format!("listen = [\"{}\", \"{taken}\"]", gw.addr))
        .replace("[store]", "bind_retry = \"8s\"\n\n[store]");
    assert!(text.contains(&taken.to_string()) && text.contains("bind_retry"), "{text}");
    let next = gw.dir.join("next.toml");
    std::fs::write(&next, text).expect("write");
    let new_child = spawn_run(&next, &gw.dir, &["-u"]);
    std::thread::sleep(Duration::from_millis(500));
    gw.signal("QUIT");
    let mut old = Owned(gw.replace_child(new_child));
    let old_exit = exit_of(&mut old.0, Duration::from_secs(20));
    assert!(old_exit.is_some(), "the old process did not hand over:\n{}", gw.log());
    // Only the new process answers now: it has its admin listener, not all of its listeners.
    let r = get(gw.admin, "/readyz", &[]).unwrap_or_else(|e| panic!("readyz: {e}\n{}", gw.log()));
    assert_eq!(r.status, 503, "{}\n{}", r.text(), gw.log());
    assert_eq!(r.json()["status"], "not_ready");
    let status = gw.wait_exit(Duration::from_secs(20)).unwrap_or_else(|| panic!("still running:\n{}", gw.log()));
    assert_eq!(status.code(), Some(1), "{}", gw.log());
    let log = gw.log();
    let lines = lines_with(&log, "cannot listen on");
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains(&format!("cannot listen on {taken} (server.listen): address in use")), "{log}");
    drop(holder);
}

/// `tollgate usage report` of tenant acme, yesterday to today (a test may straddle midnight).
fn requests_counted(config: &Path) -> u64 {
    let today = chrono::Utc::now();
    let from = (today - chrono::Duration::days(1)).format("%Y-%m-%d").to_string();
    let out = Command::new(bin())
        .args(["usage", "report", "-c"])
        .arg(config)
        .args(["--tenant", "acme", "--from", &from, "--to", &today.format("%Y-%m-%d").to_string()])
        .args(["--format", "json"])
        .output()
        .expect("usage report");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json report");
    report["totals"]
        .as_array()
        .and_then(|t| t.iter().find(|x| x["metric"] == "requests"))
        .and_then(|x| x["value"].as_u64())
        .unwrap_or(0)
}

#[test]
fn usage_of_a_request_in_flight_at_sigterm_is_counted() {
    let echo = Echo::start();
    let mut gw = Gateway::start(&standard_config(
        echo.addr,
        Extra { server: "shutdown_grace = \"3s\"\nshutdown_timeout = \"2s\"", ..Extra::default() },
    ));
    let auth = bearer(ACME_KEY);
    assert_eq!(gw.get("/v1/quick", &[("authorization", &auth)]).status, 200);
    let addr = gw.addr;
    let slow = std::thread::spawn(move || {
        get(addr, "/v1/slow?delay_ms=1500", &[("authorization", &bearer(ACME_KEY))]).map(|r| r.status)
    });
    eventually(
        Duration::from_secs(5),
        "the slow request reaching the upstream",
        || gw.log(),
        || (echo.hits() == 2).then_some(()),
    );
    gw.signal("TERM");
    assert_eq!(slow.join().expect("thread").expect("slow request"), 200, "{}", gw.log());
    let status = gw.wait_exit(Duration::from_secs(20)).unwrap_or_else(|| panic!("did not stop:\n{}", gw.log()));
    assert!(status.success(), "{status:?}\n{}", gw.log());
    assert_eq!(requests_counted(&gw.config_path), 2, "{}", gw.log());
}

#[test]
fn the_log_says_when_the_process_starts_is_signalled_reloads_and_stops() {
    let echo = Echo::start();
    let mut gw =
        Gateway::start(&standard_config(echo.addr, Extra { tail: "[log]\nformat = \"json\"\n", ..Extra::default() }));
    let events = |gw: &Gateway| -> Vec<serde_json::Value> {
        gw.log().lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).collect()
    };
    let find = |evs: &[serde_json::Value], msg: &str| evs.iter().position(|e| e["message"] == msg);
    // The line follows the bind by up to a poll interval.
    let started =
        eventually(Duration::from_secs(5), "the start line", || gw.log(), || find(&events(&gw), "tollgate started"));
    let evs = events(&gw);
    let line = &evs[started];
    assert_eq!(line["version"], env!("CARGO_PKG_VERSION"), "{line}");
    assert_eq!(line["listen"], gw.addr.to_string(), "{line}");
    assert_eq!(line["admin"], gw.admin.to_string(), "{line}");
    assert_eq!(line["config"], gw.config_path.display().to_string(), "{line}");

    // A reload is one line.
    gw.signal("HUP");
    eventually(Duration::from_secs(10), "the reload line", || gw.log(), || find(&events(&gw), "config reloaded"));
    std::thread::sleep(Duration::from_millis(300));
    let reloads = events(&gw).iter().filter(|e| e["message"].as_str().is_some_and(|m| m.contains("reloaded"))).count();
    assert_eq!(reloads, 1, "{}", gw.log());

    gw.signal("TERM");
    assert!(gw.wait_exit(Duration::from_secs(20)).is_some_and(|s| s.success()), "{}", gw.log());
    let evs = events(&gw);
    let signal =
        find(&evs, "SIGTERM received: shutting down; new connections are refused and requests in flight get up to 2s");
    let flushed = find(&evs, "limits and usage flushed, leases returned");
    let stopped = find(&evs, "tollgate stopped");
    assert!(signal.is_some() && flushed.is_some() && stopped.is_some(), "{}", gw.log());
    assert!(started < signal.unwrap_or(0) && signal < flushed && flushed < stopped, "{}", gw.log());
    assert_eq!(stopped, Some(evs.len() - 1), "`tollgate stopped` is the last line:\n{}", gw.log());
    assert_eq!(evs[stopped.unwrap_or(0)]["signal"], "SIGTERM");
}

#[test]
fn pingora_messages_are_plain_words_and_a_502_is_one_line() {
    let echo = Echo::start();
    let flaky = free_port();
    let tail = format!(
        "[[rule]]\nname = \"to-dead\"\nmatch = {{ path_prefix = \"/dead/\" }}\nupstream = \"dead\"\n\n\
         [upstreams.flaky]\nservers = [\"127.0.0.1:{flaky}\"]\nconnect_timeout = \"200ms\"\n\
         health_check = {{ interval = \"200ms\" }}\n"
    );
    let gw = Gateway::start(&standard_config(echo.addr, Extra { tail: &tail, ..Extra::default() }));
    let down = format!("upstream server 127.0.0.1:{flaky} is unhealthy");
    eventually(Duration::from_secs(10), "the unhealthy line", || gw.log(), || gw.log().contains(&down).then_some(()));
    let _up = TcpListener::bind(loopback(flaky)).expect("bind the flaky server");
    let up = format!("upstream server 127.0.0.1:{flaky} is healthy again");
    eventually(Duration::from_secs(10), "the healthy line", || gw.log(), || gw.log().contains(&up).then_some(()));
    assert!(!gw.log().contains("Backend {"), "{}", gw.log());

    let r = gw.get("/dead/x", &[("authorization", &bearer(ACME_KEY))]);
    assert_eq!(r.status, 502);
    let request_id = r.header("x-request-id").expect("request id").to_string();
    eventually(Duration::from_secs(5), "the access line", || gw.log(), || gw.log().contains(&request_id).then_some(()));
    std::thread::sleep(Duration::from_millis(200));
    assert!(!gw.log().contains("Fail to proxy"), "{}", gw.log());
}

/// Kills a daemon by its pid when a test ends early.
struct Daemon(Option<u32>);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
    }
}

fn alive(pid: u32) -> bool {
    Command::new("kill").args(["-0", &pid.to_string()]).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

#[test]
fn run_d_with_a_relative_config_reloads_by_signal_and_by_api() {
    let echo = Echo::start();
    let dir = temp_dir("daemon");
    let token = "tg_admin_daemonTTTTTTTTTTTTTTTTTTTTTTTTTTTTT";
    let tail = format!("[admin]\ntoken_hash = \"{}\"\n", hash_of(token));
    let template = standard_config(echo.addr, Extra { tail: &tail, ..Extra::default() });
    let (listen, admin) = (loopback(free_port()), loopback(free_port()));
    std::fs::write(dir.join("tollgate.toml"), render(&template, listen, admin, &dir)).expect("write config");
    let log_path = dir.join("stderr.log");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let stderr = std::fs::File::create(&log_path).expect("log file");
    let mut parent = Command::new(bin())
        .current_dir(&dir)
        .args(["run", "-d", "-c", "tollgate.toml"])
        .env("RUST_LOG", "info,pingora=error")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn");
    let status =
        exit_of(&mut parent, Duration::from_secs(30)).unwrap_or_else(|| panic!("run -d did not return:\n{}", log()));
    assert!(status.success(), "{status:?}\n{}", log());
    let pid_text = std::fs::read_to_string(dir.join("tollgate.pid")).expect("pid file");
    let pid: u32 = pid_text.trim().parse().expect("pid");
    let mut guard = Daemon(Some(pid));
    // `run -d` returns once the daemon listens.
    let tenants = || get(admin, "/readyz", &[]).ok().and_then(|r| r.json()["tenants"].as_u64());
    assert_eq!(tenants(), Some(4), "{}", log());
    assert_eq!(get(listen, "/v1/x", &[("authorization", &bearer(ACME_KEY))]).expect("get").status, 200);

    let add_tenant = |id: &str| {
        let mut f = std::fs::OpenOptions::new().append(true).open(dir.join("tollgate.toml")).expect("open config");
        std::io::Write::write_all(&mut f, format!("\n[[tenants]]\nid = \"{id}\"\ntier = \"free\"\n").as_bytes())
            .expect("append");
    };
    add_tenant("initech");
    let r = request(admin, "POST", "/v1/reload", &[("authorization", &bearer(token))], b"").expect("reload");
    assert_eq!(r.status, 200, "{}\n{}", r.text(), log());
    assert_eq!(tenants(), Some(5));

    add_tenant("hooli");
    assert!(Command::new("kill").args(["-HUP", &pid.to_string()]).status().is_ok_and(|s| s.success()));
    eventually(Duration::from_secs(10), "the SIGHUP reload", log, || (tenants() == Some(6)).then_some(()));

    assert!(Command::new("kill").args(["-TERM", &pid.to_string()]).status().is_ok_and(|s| s.success()));
    eventually(Duration::from_secs(20), "the daemon's exit", log, || (!alive(pid)).then_some(()));
    guard.0 = None;
    assert!(!dir.join("tollgate.pid").exists(), "the pid file is removed at exit");
    assert!(log().contains("tollgate stopped"), "{}", log());
}

#[test]
fn the_audit_log_defaults_to_the_store_directory() {
    let echo = Echo::start();
    let template = standard_config(echo.addr, Extra::default()).replace("{DIR}/tollgate.db", "{DIR}/state/tollgate.db");
    let gw = Gateway::start(&template);
    gw.signal("HUP");
    let audit = gw.dir.join("state").join("tollgate-audit.log");
    eventually(
        Duration::from_secs(10),
        "the reload's audit entry",
        || gw.log(),
        || std::fs::read_to_string(&audit).ok().filter(|t| t.contains("config.reload")).map(|_| ()),
    );
    assert!(!gw.dir.join("tollgate-audit.log").exists(), "nothing is written beside the config");
}
