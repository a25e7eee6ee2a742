//! Limits across instances on a real Redis: exact quotas under concurrent load, store
//! failure policies while Redis dies and comes back, global rate limits, shared concurrency
//! slots that free themselves when an instance dies, and round trips per request.

mod common;
use common::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TENANTS: &[&str] = &["t1", "t2", "t3", "t4", "t5"];

fn key_of(t: &str) -> String {
    format!("tg_live_{t}_exactquotakeyXXXXXXXXXXXXXXXX")
}

/// `store_extra` must set `timeout`.
fn config(redis: &Redis, echo: &Echo, store_extra: &str, tiers: &str) -> String {
    let mut tenants = String::new();
    for t in TENANTS {
        let tier = if t.ends_with('5') { "closed" } else { "basic" };
        tenants.push_str(&format!(
            "[[tenants]]\nid = \"{t}\"\ntier = \"{tier}\"\n[[tenants.keys]]\nid = \"{t}-key\"\nhash = \"{}\"\nscopes = [\"read\"]\n\n",
            hash_of(&key_of(t))
        ));
    }
    format!(
        r#"[server]
listen = ["{{LISTEN}}"]
admin_listen = "{{ADMIN}}"
threads = 2
upgrade_sock = "{{DIR}}/upgrade.sock"
pid_file = "{{DIR}}/tollgate.pid"
shutdown_timeout = "2s"
shutdown_grace = "1s"

[store]
kind = "redis"
url = "{url}"
breaker_failures = 3
breaker_cooldown = "300ms"
slot_ttl = "1s"
{store_extra}

[upstreams.default]
servers = ["{echo}"]

{tiers}

{tenants}
"#,
        url = redis.url(),
        echo = echo.addr,
    )
}

fn fleet(n: usize, template: &str) -> Vec<Gateway> {
    (0..n).map(|_| Gateway::start(template)).collect()
}

/// Sends `total` requests for `tenant`, spread over `gateways`, from `workers` threads.
fn blast(gateways: &[&Gateway], tenant: &str, path: &str, total: u64, workers: usize) -> (u64, u64, u64, Duration) {
    let ok = Arc::new(AtomicU64::new(0));
    let limited = Arc::new(AtomicU64::new(0));
    let other = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let slowest = Arc::new(std::sync::Mutex::new(Duration::ZERO));
    let addrs: Vec<_> = gateways.iter().map(|g| g.addr).collect();
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let (ok, limited, other, next, slowest, addrs) =
                (ok.clone(), limited.clone(), other.clone(), next.clone(), slowest.clone(), addrs.clone());
            let auth = bearer(&key_of(tenant));
            let path = path.to_string();
            std::thread::spawn(move || {
                let addr = addrs[w % addrs.len()];
                let mut conn = Conn::open(addr).expect("connect");
                while next.fetch_add(1, Ordering::SeqCst) < total {
                    let started = Instant::now();
                    let r = match conn.request("GET", &path, &[("authorization", &auth)], b"") {
                        Ok(r) => r,
                        Err(_) => {
                            conn = Conn::open(addr).expect("reconnect");
                            conn.request("GET", &path, &[("authorization", &auth)], b"").expect("request")
                        }
                    };
                    let took = started.elapsed();
                    let mut s = slowest.lock().unwrap_or_else(|p| p.into_inner());
                    *s = (*s).max(took);
                    drop(s);
                    match r.status {
                        200 => ok.fetch_add(1, Ordering::SeqCst),
                        429 => limited.fetch_add(1, Ordering::SeqCst),
                        _ => other.fetch_add(1, Ordering::SeqCst),
                    };
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("worker");
    }
    let slow = *slowest.lock().unwrap_or_else(|p| p.into_inner());
    (ok.load(Ordering::SeqCst), limited.load(Ordering::SeqCst), other.load(Ordering::SeqCst), slow)
}

const BASIC_300: &str = r#"[tiers.basic]
upstream = "default"
quotas.requests = { limit = 300, period = "month" }

[tiers.closed]
upstream = "default"
on_store_error = "closed"
quotas.requests = { limit = 40, period = "month" }
"#;

#[test]
fn exact_quota_across_three_instances_every_time() {
    let redis = Redis::start();
    let echo = Echo::start();
    let template = config(&redis, &echo, "timeout = \"2s\"", BASIC_300);
    let gws = fleet(3, &template);
    let refs: Vec<&Gateway> = gws.iter().collect();
    for (rep, tenant) in TENANTS[..4].iter().chain(std::iter::once(&"t1")).enumerate() {
        let tenant = if rep == 4 {
            // Fifth repetition: a fresh period for t1 is not available, so reuse a clean tenant
            // by clearing its counter in Redis.
            for k in redis_keys(&redis, "t1") {
                redis.command(&["DEL", &k]);
            }
            "t1"
        } else {
            tenant
        };
        let before = echo.hits();
        let (ok, limited, other, _) = blast(&refs, tenant, "/work", 900, 24);
        assert_eq!((ok, limited, other), (300, 600, 0), "repetition {rep} ({tenant})");
        assert_eq!(echo.hits() - before, 300, "the upstream saw exactly the admitted requests");
    }
}

fn redis_keys(redis: &Redis, tenant: &str) -> Vec<String> {
    // KEYS is fine on a test server; the pattern is the tenant's hash tag.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", redis.port)).expect("connect");
    use std::io::{BufRead, BufReader, Read, Write};
    let pat = format!("tg:{{{tenant}}}:*");
    s.write_all(format!("*2\r\n$4\r\nKEYS\r\n${}\r\n{pat}\r\n", pat.len()).as_bytes()).expect("write");
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).expect("read");
    let n: usize = line.trim_start_matches('*').trim().parse().unwrap_or(0);
    let mut out = Vec::new();
    for _ in 0..n {
        let mut len = String::new();
        r.read_line(&mut len).expect("read");
        let l: usize = len.trim_start_matches('$').trim().parse().unwrap_or(0);
        let mut buf = vec![0u8; l + 2];
        r.read_exact(&mut buf).expect("read");
        out.push(String::from_utf8_lossy(&buf[..l]).to_string());
    }
    out
}

#[test]
fn redis_dying_mid_load_degrades_by_policy_and_recovers() {
    let mut redis = Redis::start();
    let echo = Echo::start();
    let tiers = r#"[tiers.basic]
upstream = "default"
quotas.requests = { limit = 1000000, period = "month" }

[tiers.closed]
upstream = "default"
on_store_error = "closed"
quotas.requests = { limit = 40, period = "month" }
"#;
    let gw = Gateway::start(&config(&redis, &echo, "timeout = \"50ms\"\nmax_lease_block = 10", tiers));
    let refs = [&gw];
    // Warm up both tenants while Redis is up.
    let (ok, _, other, _) = blast(&refs, "t2", "/a", 50, 4);
    assert_eq!((ok, other), (50, 0));
    assert_eq!(blast(&refs, "t5", "/a", 5, 1).0, 5);

    redis.kill();
    // `local`: no 5xx, and nobody waits on the dead store.
    let (ok, limited, other, slowest) = blast(&refs, "t2", "/a", 300, 6);
    assert_eq!((ok, limited, other), (300, 0, 0));
    assert!(slowest < Duration::from_millis(1500), "a request waited {slowest:?}");
    // `closed`: 503 store_unavailable with Retry-After.
    let r = gw.get("/a", &[("authorization", &bearer(&key_of("t5")))]);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.problem_code(), "store_unavailable");
    assert!(r.header("retry-after").is_some());

    redis.restart();
    // Both recover once Redis is back (after the breaker's cooldown).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = gw.get("/a", &[("authorization", &bearer(&key_of("t5")))]);
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "closed tenant never recovered: {}", r.status);
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, _, other, _) = blast(&refs, "t2", "/a", 100, 4);
    assert_eq!((ok, other), (100, 0));
    // The usage spent during the outage was reconciled into the new Redis.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let keys = redis_keys(&redis, "t2");
        let total: u64 = keys.iter().map(|k| redis.command(&["GET", k]).parse::<u64>().unwrap_or(0)).sum();
        if total >= 250 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "outage usage not reconciled: {total} {keys:?} {:?}\n{}",
            keys.iter().map(|k| redis.command(&["GET", k])).collect::<Vec<_>>(),
            gw.log().lines().rev().take(30).collect::<Vec<_>>().join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn global_rate_limit_is_shared_by_the_fleet() {
    let redis = Redis::start();
    let echo = Echo::start();
    let tiers = r#"[tiers.basic]
upstream = "default"
rate = { requests_per_minute = 10, mode = "global" }

[tiers.closed]
upstream = "default"
"#;
    let gws = fleet(2, &config(&redis, &echo, "timeout = \"500ms\"", tiers));
    let refs: Vec<&Gateway> = gws.iter().collect();
    let (ok, limited, other, _) = blast(&refs, "t1", "/g", 40, 4);
    // A window boundary in the middle of the run can let a few more through; never fewer.
    assert!((10..=14).contains(&ok), "admitted {ok}");
    assert_eq!(ok + limited, 40);
    assert_eq!(other, 0);
}

#[test]
fn shared_concurrency_slots_free_themselves_when_an_instance_dies() {
    let redis = Redis::start();
    let (echo, _gate) = Echo::gated();
    let tiers = "[tiers.basic]\nupstream = \"default\"\nconcurrency = 1\n\n[tiers.closed]\nupstream = \"default\"\n";
    let template = config(&redis, &echo, "timeout = \"500ms\"", tiers);
    let a = Gateway::start(&template);
    let b = Gateway::start(&template);
    let auth = bearer(&key_of("t1"));
    let mut held = Conn::open(a.addr).expect("connect");
    held.send_raw(&build_request("GET", "/stream?sse=2", &[("authorization", &auth)], b"")).expect("send");
    assert_eq!(held.read_head().expect("head").0, 200);
    let r = b.get("/x", &[("authorization", &auth)]);
    assert_eq!(r.status, 429, "the slot held on A counts on B");
    assert_eq!(r.problem_code(), "concurrency_limit");
    // A dies without releasing: the lease expires after slot_ttl (1s).
    a.signal("KILL");
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if b.get("/x", &[("authorization", &auth)]).status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the dead instance's slot never expired");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn steady_state_needs_few_store_round_trips() {
    let redis = Redis::start();
    let echo = Echo::start();
    let tiers = "[tiers.basic]\nupstream = \"default\"\nquotas.requests = { limit = 1000000, period = \"month\" }\n\n[tiers.closed]\nupstream = \"default\"\n";
    let gw = Gateway::start(&config(&redis, &echo, "timeout = \"500ms\"", tiers));
    let refs = [&gw];
    // Warm up, then measure.
    blast(&refs, "t1", "/r", 200, 4);
    let before = round_trips(&gw);
    let n = 3000;
    let (ok, _, _, _) = blast(&refs, "t1", "/r", n, 4);
    assert_eq!(ok, n);
    let per_request = (round_trips(&gw) - before) as f64 / n as f64;
    println!("store round trips per request (1M quota, steady state): {per_request:.4}");
    assert!(per_request <= 0.01, "{per_request}");
}

fn round_trips(gw: &Gateway) -> u64 {
    let text = get(gw.admin, "/metrics", &[]).expect("metrics").text();
    text.lines()
        .filter(|l| l.starts_with("tollgate_store_round_trips_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}
