//! Process lifecycle: the TLS listener, Pingora's zero-downtime upgrade (`run -u`), and a
//! short, configurable shutdown.

mod common;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

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
    let server = format!("tls = {{ listen = \"127.0.0.1:{tls_port}\", cert = \"cert.pem\", key = \"key.pem\" }}");
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
    let mut old_child = gw.replace_child(new_child);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut served_during = 0;
    loop {
        if let Ok(r) = get(gw.addr, "/v1/during", &[("authorization", &auth)]) {
            assert_eq!(r.status, 200, "{}", r.text());
            served_during += 1;
        }
        if let Ok(Some(_)) = old_child.try_wait() {
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
