//! Upstream pools: round robin across servers, health checks (TCP and HTTP) that take dead
//! servers out of rotation, and `/readyz` reporting pool health.

mod common;
use common::*;
use std::time::{Duration, Instant};

fn config(servers: &str, health: &str) -> String {
    format!(
        r#"[server]
listen = ["{{LISTEN}}"]
admin_listen = "{{ADMIN}}"
threads = 1
upgrade_sock = "{{DIR}}/upgrade.sock"
pid_file = "{{DIR}}/tollgate.pid"

[store]
path = "{{DIR}}/tollgate.db"

[upstreams.pool]
servers = [{servers}]
connect_timeout = "300ms"
{health}

[tiers.basic]
upstream = "pool"

[[tenants]]
id = "acme"
tier = "basic"

[[tenants.keys]]
id = "k"
hash = "{hash}"
scopes = ["read"]
"#,
        hash = hash_of(ACME_KEY)
    )
}

#[test]
fn requests_are_balanced_round_robin() {
    let (a, b) = (Echo::start(), Echo::start());
    let gw = Gateway::start(&config(&format!("\"{}\", \"{}\"", a.addr, b.addr), ""));
    let auth = bearer(ACME_KEY);
    for _ in 0..10 {
        assert_eq!(gw.get("/x", &[("authorization", &auth)]).status, 200);
    }
    assert_eq!((a.hits(), b.hits()), (5, 5));
}

fn until_all_ok(gw: &Gateway, n: usize) {
    let auth = bearer(ACME_KEY);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if (0..n).all(|_| gw.get("/x", &[("authorization", &auth)]).status == 200) {
            return;
        }
        assert!(Instant::now() < deadline, "the dead server was never taken out of rotation");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn tcp_health_check_takes_a_dead_server_out_of_rotation() {
    let alive = Echo::start();
    let dead = format!("127.0.0.1:{}", free_port());
    let gw =
        Gateway::start(&config(&format!("\"{}\", \"{dead}\"", alive.addr), "health_check = { interval = \"200ms\" }"));
    until_all_ok(&gw, 10);
    let ready = get(gw.admin, "/readyz", &[]).expect("readyz");
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["upstreams"]["pool"]["healthy"], 1);
    assert_eq!(ready.json()["upstreams"]["pool"]["total"], 2);
}

#[test]
fn http_health_check_uses_the_path_and_readyz_fails_without_a_healthy_server() {
    let alive = Echo::start();
    let gw = Gateway::start(&config(
        &format!("\"{}\", \"127.0.0.1:{}\"", alive.addr, free_port()),
        "health_check = { path = \"/healthz\", interval = \"200ms\" }",
    ));
    until_all_ok(&gw, 10);
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive.hits() == 0 || get(gw.admin, "/readyz", &[]).map(|r| r.status).unwrap_or(0) != 200 {
        assert!(Instant::now() < deadline, "no HTTP health check reached the server");
        std::thread::sleep(Duration::from_millis(100));
    }

    let dead = format!("127.0.0.1:{}", free_port());
    let down = Gateway::start(&config(&format!("\"{dead}\""), "health_check = { interval = \"200ms\" }"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = get(down.admin, "/readyz", &[]).expect("readyz");
        if r.status == 503 {
            assert_eq!(r.json()["status"], "not_ready");
            break;
        }
        assert!(Instant::now() < deadline, "readyz stayed ready with every server dead");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Each server's health is a gauge, 1 or 0.
    let text = get(down.admin, "/metrics", &[]).expect("metrics").text();
    let gauge = format!("tollgate_upstream_server_healthy{{server=\"{dead}\",upstream=\"pool\"}} 0");
    assert!(text.lines().any(|l| l == gauge), "{text}");
    let text = get(gw.admin, "/metrics", &[]).expect("metrics").text();
    let gauge = format!("tollgate_upstream_server_healthy{{server=\"{}\",upstream=\"pool\"}} 1", alive.addr);
    assert!(text.lines().any(|l| l == gauge), "{text}");
    // Nothing was tried: 503 with the time until the next health check, not a 502.
    let r = down.get("/x", &[("authorization", &bearer(ACME_KEY))]);
    assert_eq!((r.status, r.problem_code()), (503, "upstream_unavailable".to_string()));
    assert_eq!(r.header("retry-after"), Some("1"), "the health check interval, rounded up");
    assert_eq!(r.json()["upstream"], "pool");
}
