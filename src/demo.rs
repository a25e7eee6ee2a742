//! `tollgate demo`: the embedded echo upstream plus the gateway on `config/demo.toml`, with
//! curl commands that work as printed.

use crate::echo::{self, EchoState};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The demo tenants' keys. They are in `config/demo.toml` as hashes and are public on purpose.
pub const DEMO_KEY: &str = "tg_live_u1UuytE2YMsGVuRQhPp9UyIEywPUAUFP";

const EMBEDDED_DEMO: &str = include_str!("../config/demo.toml");
/// The rule pack the demo config includes, written next to it when the built-in config is used.
const EMBEDDED_PACK: &str = include_str!("../lua-free-rules/openai-compatible.toml");

fn wait_for(addr: SocketAddr, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The curl commands the demo prints.
pub fn curl_commands(listen: SocketAddr, admin: SocketAddr) -> String {
    let base = format!("http://{listen}");
    format!(
        "\nTollgate demo is up: gateway {base}, admin http://{admin}\n\n\
         # A valid key: the echo upstream shows what it received (X-Tenant-ID, X-Key-ID, no key)\n\
         curl -s {base}/v1/hello -H 'Authorization: Bearer {DEMO_KEY}'\n\n\
         # A bad key: 401 invalid_key, as application/problem+json\n\
         curl -si {base}/v1/hello -H 'Authorization: Bearer tg_live_not_a_real_key_000000'\n\n\
         # No key: 401 missing_key with WWW-Authenticate: Bearer\n\
         curl -si {base}/v1/hello\n\n\
         # A spoofed tenant header is stripped: the upstream still sees X-Tenant-ID: acme\n\
         curl -s {base}/v1/hello -H 'Authorization: Bearer {DEMO_KEY}' -H 'X-Tenant-ID: globex'\n\n\
         # The key is acme's but the path names globex: 403 tenant_mismatch\n\
         curl -si {base}/t/globex/v1/hello -H 'Authorization: Bearer {DEMO_KEY}'\n\n\
         # An OpenAI-compatible chat completion: tokens reserved from max_tokens, settled from usage\n\
         curl -s {base}/v1/chat/completions -H 'Authorization: Bearer {DEMO_KEY}' -d '{{\"model\":\"gpt-4o\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hi\"}}],\"max_tokens\":8}}'\n\
         curl -s {base}/_tollgate/usage -H 'Authorization: Bearer {DEMO_KEY}'\n\n\
         # Health of the gateway and its upstreams\n\
         curl -s http://{admin}/readyz\n\n\
         Press Ctrl-C to stop.\n"
    )
}

/// Runs the demo until interrupted.
pub fn run(config_path: &Path) -> Result<(), String> {
    let path: PathBuf = if config_path.is_file() {
        config_path.to_path_buf()
    } else {
        // The config includes `../lua-free-rules/…`: the same layout, under the temp dir.
        let root = std::env::temp_dir().join("tollgate-demo");
        let tmp = root.join("config").join("demo.toml");
        let pack = root.join("lua-free-rules").join("openai-compatible.toml");
        for (file, text) in [(&tmp, EMBEDDED_DEMO), (&pack, EMBEDDED_PACK)] {
            if let Some(dir) = file.parent() {
                std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            }
            std::fs::write(file, text).map_err(|e| format!("cannot write {}: {e}", file.display()))?;
        }
        eprintln!("{} not found; using the built-in demo config ({})", config_path.display(), tmp.display());
        tmp
    };
    let config = crate::app::load_or_report(&path)?;
    crate::app::init_logging(&config);
    let echo_addrs: Vec<SocketAddr> = config.upstreams.values().flat_map(|u| u.servers.iter().copied()).collect();
    let listen = *config.server.listen.first().ok_or("the demo config has no listen address")?;
    let admin = config.server.admin_listen;
    crate::app::check_listeners(&config.server)?;

    // The echo upstream gets its own runtime on its own thread: Pingora owns the main thread.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready_tx.send(Err(format!("cannot start the echo upstream: {e}")));
                return;
            }
        };
        rt.block_on(async move {
            for addr in echo_addrs {
                if let Err(e) = echo::spawn(addr, Arc::new(EchoState::default())).await {
                    let _ = ready_tx.send(Err(format!("cannot listen on {addr} for the echo upstream: {e}")));
                    return;
                }
            }
            let _ = ready_tx.send(Ok(()));
            std::future::pending::<()>().await;
        });
    });
    ready_rx.recv().map_err(|_| "the echo upstream did not start".to_string())??;

    std::thread::spawn(move || {
        if wait_for(listen, Duration::from_secs(30)) {
            println!("{}", curl_commands(listen, admin));
        } else {
            eprintln!("the gateway did not start listening on {listen}");
        }
    });
    let built = crate::app::build_server(
        config,
        &path,
        &crate::app::RunOptions::default(),
        Arc::new(crate::clock::SystemClock),
    )?;
    crate::app::serve(built);
    Ok(())
}
