//! Asynchronous jobs end to end, on both stores: a real gateway binary, the echo upstream,
//! SQLite or a real Redis.

mod common;
use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

const ACME: &str = "tg_live_jobsACMExxxxxxxxxxxxxxxxxxxxxx";
const GLOBEX: &str = "tg_live_jobsGLOBEXxxxxxxxxxxxxxxxxxxxx";
const SECRET: &str = "jobs-callback-secret-0123";

fn config(echo: &Echo, store: &str) -> String {
    format!(
        r#"usage_metrics = ["rows"]

[server]
listen = ["{{LISTEN}}"]
admin_listen = "{{ADMIN}}"
threads = 1
upgrade_sock = "{{DIR}}/upgrade.sock"
pid_file = "{{DIR}}/tollgate.pid"

[store]
{store}

[jobs]
workers = 4
poll_interval = "100ms"
lease_ttl = "1s"
retry_lost = "always"
max_open_per_tenant = 20
callback_secret = "{secret}"
callback_hosts = {{ pro = ["127.0.0.1"] }}

[upstreams.default]
servers = ["{echo}"]
read_timeout = "10s"

[tiers.pro]
upstream = "default"
priority = 5
concurrency = 1
quotas.requests = {{ limit = 100, period = "day" }}
quotas.rows = {{ limit = 100000, period = "day" }}

[[tenants]]
id = "acme"
tier = "pro"

[[tenants.keys]]
id = "acme-main"
hash = "{acme}"
scopes = ["read"]

[[tenants]]
id = "globex"
tier = "pro"

[[tenants.keys]]
id = "globex-main"
hash = "{globex}"
scopes = ["read"]

[[rule]]
name = "generate"
match = {{ path_prefix = "/gen" }}
mode = "async"
retention = "1h"
remove_response_headers = ["x-internal"]
set_response_headers = {{ "x-served-by" = "tollgate" }}

[[rule]]
name = "charged"
match = {{ path_prefix = "/charged" }}
mode = "async"
charge = {{ metric = "rows", cost_from_header = "x-rows", settle_from_header = "x-rows-used" }}

[[rule]]
name = "hidden"
match = {{ path_prefix = "/hidden" }}
mode = "async"
charge = {{ metric = "rows", cost_from_header = "x-rows", settle_from_header = "x-rows-used" }}
remove_response_headers = ["x-rows-used"]

[[rule]]
name = "slow"
match = {{ path_prefix = "/slow" }}
mode = "async"
job_timeout = "300ms"

[[rule]]
name = "either"
match = {{ path_prefix = "/either" }}
mode = "either"
"#,
        echo = echo.addr,
        acme = hash_of(ACME),
        globex = hash_of(GLOBEX),
        secret = SECRET,
    )
}

const EMBEDDED: &str = "kind = \"embedded\"\npath = \"{DIR}/tollgate.db\"";

fn redis_store(redis: &Redis) -> String {
    format!("kind = \"redis\"\nurl = \"{}\"", redis.url())
}

fn wait_status(gw: &Gateway, auth: &str, id: &str, want: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = gw.get(&format!("/_tollgate/jobs/{id}"), &[("authorization", auth)]);
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        if v["status"] == want {
            return v;
        }
        assert!(Instant::now() < deadline, "job {id} is {} after 15 s, not {want}", v["status"]);
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn submit(gw: &Gateway, auth: &str, path: &str, extra: &[(&str, &str)]) -> String {
    let mut h = vec![("authorization", auth)];
    h.extend_from_slice(extra);
    let r = gw.request("POST", path, &h, b"{\"rows\":1000}");
    assert_eq!(r.status, 202, "{}", r.text());
    let v = r.json();
    let id = v["id"].as_str().expect("id").to_string();
    assert_eq!(v["status"], "pending");
    assert_eq!(r.header("location"), Some(format!("/_tollgate/jobs/{id}").as_str()));
    id
}

fn used(gw: &Gateway, auth: &str) -> u64 {
    used_of(gw, auth, "requests")
}

fn used_of(gw: &Gateway, auth: &str, metric: &str) -> u64 {
    let r = gw.get("/_tollgate/usage", &[("authorization", auth)]);
    let v = r.json();
    v["quotas"]
        .as_array()
        .and_then(|q| q.iter().find(|x| x["metric"] == metric))
        .and_then(|x| x["used"].as_u64())
        .unwrap_or(u64::MAX)
}

/// Usage on a shared store is reported as leases settle: wait a moment for it.
fn wait_used(gw: &Gateway, auth: &str, want: u64) {
    wait_used_of(gw, auth, "requests", want);
}

/// Waits (up to 10 s) until the tenant's `metric` quota shows `want` used: settlements and
/// refunds of jobs land after the job's status.
fn wait_used_of(gw: &Gateway, auth: &str, metric: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while used_of(gw, auth, metric) != want {
        assert!(Instant::now() < deadline, "{metric} used is {}, not {want}", used_of(gw, auth, metric));
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn lifecycle(store: &str) {
    let echo = Echo::start();
    let gw = Gateway::start(&config(&echo, store));
    let (a, g) = (bearer(ACME), bearer(GLOBEX));

    // 202, then the upstream's own answer as the result.
    let id = submit(
        &gw,
        &a,
        "/gen/rows?delay_ms=200&header=x-job-progress:40&header=x-internal:secret",
        &[("x-job-priority", "99")],
    );
    let v = wait_status(&gw, &a, &id, "completed");
    assert_eq!(v["priority"], 5, "X-Job-Priority is capped by the tier");
    assert!(v["started_at"].is_string() && v["finished_at"].is_string());
    assert_eq!(v["progress"], "40");
    let r = gw.get(&format!("/_tollgate/jobs/{id}/result"), &[("authorization", &a)]);
    assert_eq!(r.status, 200);
    let body = r.json();
    assert_eq!(
        (body["method"].as_str(), body["path"].as_str(), body["body_bytes"].as_u64()),
        (Some("POST"), Some("/gen/rows"), Some(13))
    );
    assert_eq!(body["headers"]["x-tenant-id"], "acme");
    assert!(body["headers"].get("authorization").is_none(), "the key is never stored or forwarded");
    assert!(body["headers"].get("x-job-priority").is_none());
    assert_eq!(r.header("x-tollgate-job-id"), Some(id.as_str()));
    // The rule's response header edits apply to the result as to a forwarded answer.
    assert_eq!(r.header("x-internal"), None, "a header the rule removes is not in the result");
    assert_eq!(r.header("x-served-by"), Some("tollgate"));

    // Another tenant sees nothing.
    for p in [format!("/_tollgate/jobs/{id}"), format!("/_tollgate/jobs/{id}/result")] {
        assert_eq!(gw.get(&p, &[("authorization", &g)]).status, 404);
    }
    assert_eq!(gw.request("DELETE", &format!("/_tollgate/jobs/{id}"), &[("authorization", &g)], b"").status, 404);
    let list = gw.get("/_tollgate/jobs?status=completed", &[("authorization", &g)]).json();
    assert_eq!(list["items"].as_array().map(Vec::len), Some(0));
    let list = gw.get("/_tollgate/jobs?status=completed", &[("authorization", &a)]).json();
    assert_eq!(list["items"][0]["id"], id.as_str());
    assert_eq!(gw.get("/_tollgate/jobs?status=done", &[("authorization", &a)]).status, 400);
    assert_eq!(gw.get("/_tollgate/jobs", &[]).status, 401);

    // `either`: synchronous unless the client prefers async.
    assert_eq!(gw.request("POST", "/either", &[("authorization", &a)], b"").status, 200);
    submit(&gw, &a, "/either", &[("prefer", "wait=5, respond-async")]);

    // The charge is reserved at submission and settled from the result's header; the run is
    // metered as usage (the 202 itself is not).
    let rows_before = used_of(&gw, &a, "rows");
    let id = submit(&gw, &a, "/charged?delay_ms=300&header=x-rows-used:7", &[("x-rows", "50")]);
    assert_eq!(used_of(&gw, &a, "rows"), rows_before + 50, "the estimate is reserved at submission");
    wait_status(&gw, &a, &id, "completed");
    wait_used_of(&gw, &a, "rows", rows_before + 7);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = get(gw.admin, "/metrics", &[]).expect("metrics").text();
        if m.contains("tollgate_usage_units_total{metric=\"rows\",tier=\"pro\"} 7") {
            break;
        }
        assert!(Instant::now() < deadline, "the run was not metered with the settled charge:\n{m}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A rule that hides its settlement header from clients still settles from it.
    let rows_before = used_of(&gw, &a, "rows");
    let id = submit(&gw, &a, "/hidden?header=x-rows-used:3", &[("x-rows", "50")]);
    wait_status(&gw, &a, &id, "completed");
    wait_used_of(&gw, &a, "rows", rows_before + 3);
    let r = gw.get(&format!("/_tollgate/jobs/{id}/result"), &[("authorization", &a)]);
    assert_eq!((r.status, r.header("x-rows-used")), (200, None));

    // job_timeout.
    let id = submit(&gw, &a, "/slow?delay_ms=3000", &[]);
    let v = wait_status(&gw, &a, &id, "timeout");
    assert!(v["error"].as_str().is_some_and(|e| e.contains("job_timeout")));
}

fn cancel_priority_quota(store: &str) {
    let echo = Echo::start();
    let gw = Gateway::start(&config(&echo, store));
    let a = bearer(ACME);
    let before = used(&gw, &a);
    // The tenant's one slot is taken by a long job; the next ones wait.
    let long = submit(&gw, &a, "/gen?delay_ms=1500", &[]);
    wait_status(&gw, &a, &long, "running");
    // Running, and holding the slot: the upstream has it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while echo.hits() < 1 {
        assert!(Instant::now() < deadline, "the long job never reached the upstream");
        std::thread::sleep(Duration::from_millis(20));
    }
    let low = submit(&gw, &a, "/gen?which=low&delay_ms=1100", &[("x-job-priority", "1")]);
    let high = submit(&gw, &a, "/gen?which=high&delay_ms=1100", &[]);
    let doomed = submit(&gw, &a, "/gen?which=doomed", &[]);
    wait_used(&gw, &a, before + 4);
    // Cancel a pending job: its reservation comes back.
    let r = gw.request("DELETE", &format!("/_tollgate/jobs/{doomed}"), &[("authorization", &a)], b"");
    assert_eq!((r.status, r.json()["status"].as_str()), (200, Some("cancelled")), "{}", r.text());
    wait_used(&gw, &a, before + 3);
    let r = gw.request("DELETE", &format!("/_tollgate/jobs/{doomed}"), &[("authorization", &a)], b"");
    assert_eq!(r.status, 409);
    // The higher priority job, submitted later, runs first.
    let h = wait_status(&gw, &a, &high, "completed");
    let l = wait_status(&gw, &a, &low, "completed");
    assert!(h["started_at"].as_str() < l["started_at"].as_str(), "high {h} low {l}");
    assert_eq!(wait_status(&gw, &a, &long, "completed")["status"], "completed");

    // Cancel a running job: the upstream had it, so its reservation stays and the run is
    // metered at the estimate, status 499. Then cancel everything.
    let rows_before = used_of(&gw, &a, "rows");
    let running = submit(&gw, &a, "/charged?delay_ms=5000&header=x-rows-used:7", &[("x-rows", "30")]);
    wait_status(&gw, &a, &running, "running");
    let r = gw.request("DELETE", &format!("/_tollgate/jobs/{running}"), &[("authorization", &a)], b"");
    assert_eq!(r.status, 200);
    assert_eq!(wait_status(&gw, &a, &running, "cancelled")["status"], "cancelled");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = get(gw.admin, "/metrics", &[]).expect("metrics").text();
        let metered = m.contains("tollgate_usage_units_total{metric=\"rows\",tier=\"pro\"} 30")
            && m.lines().any(|l| {
                l.starts_with("tollgate_requests_total{")
                    && l.contains("rule=\"charged\"")
                    && l.contains("status_class=\"4xx\"")
                    && l.ends_with(" 1")
            });
        if metered {
            break;
        }
        assert!(Instant::now() < deadline, "the cancelled run was not metered at its estimate:\n{m}");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(used_of(&gw, &a, "rows"), rows_before + 30, "a cancelled run keeps its reservation");
    let x = submit(&gw, &a, "/gen?delay_ms=5000", &[]);
    let y = submit(&gw, &a, "/gen?delay_ms=5000", &[]);
    let r = gw.request("DELETE", "/_tollgate/jobs", &[("authorization", &a)], b"");
    assert_eq!(r.status, 200);
    let ids: Vec<String> =
        r.json()["cancelled"].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(str::to_string)).collect();
    assert!(ids.contains(&x) && ids.contains(&y), "{ids:?}");
    wait_status(&gw, &a, &x, "cancelled");
    wait_status(&gw, &a, &y, "cancelled");
}

#[test]
fn jobs_on_sqlite() {
    lifecycle(EMBEDDED);
}

#[test]
fn cancel_priority_and_quota_on_sqlite() {
    cancel_priority_quota(EMBEDDED);
}

#[test]
fn jobs_on_redis() {
    let redis = Redis::start();
    lifecycle(&redis_store(&redis));
}

#[test]
fn cancel_priority_and_quota_on_redis() {
    let redis = Redis::start();
    cancel_priority_quota(&redis_store(&redis));
}

/// A gateway SIGKILLed while it runs a job: another instance on the same Redis finishes it once
/// the lease has expired (a second attempt).
#[test]
fn a_killed_instances_running_job_is_finished_by_another() {
    let redis = Redis::start();
    let echo = Echo::start();
    let store = redis_store(&redis);
    let a = bearer(ACME);
    let gw1 = Gateway::start(&config(&echo, &store));
    let id = submit(&gw1, &a, "/gen?delay_ms=2000", &[]);
    wait_status(&gw1, &a, &id, "running");
    let deadline = Instant::now() + Duration::from_secs(5);
    while echo.hits() < 1 {
        assert!(Instant::now() < deadline, "the job never reached the upstream");
        std::thread::sleep(Duration::from_millis(20));
    }
    gw1.signal("KILL");
    let gw2 = Gateway::start(&config(&echo, &store));
    let v = wait_status(&gw2, &a, &id, "completed");
    assert_eq!(v["attempts"], 2, "{v}");
    assert_eq!(echo.hits(), 2);
    let r = gw2.get(&format!("/_tollgate/jobs/{id}/result"), &[("authorization", &a)]);
    assert_eq!((r.status, r.json()["path"].as_str()), (200, Some("/gen")));
}

/// The callbacks a receiver got: headers (lower-case names) and body of each.
type Received = std::sync::Arc<std::sync::Mutex<Vec<(Vec<(String, String)>, Vec<u8>)>>>;

/// Records callback POSTs; answers 500 to the first `refuse` of them, 204 after.
fn receiver(refuse: usize) -> (u16, Received) {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let g = got.clone();
    std::thread::spawn(move || {
        for stream in l.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = Vec::new();
            let mut tmp = [0u8; 4096];
            let (head, body) = loop {
                let n = s.read(&mut tmp).unwrap_or(0);
                if n == 0 {
                    break (String::new(), Vec::new());
                }
                buf.extend_from_slice(&tmp[..n]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..i]).to_string();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    while buf.len() < i + 4 + len {
                        let n = s.read(&mut tmp).unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&tmp[..n]);
                    }
                    break (head, buf[i + 4..].to_vec());
                }
            };
            let headers = head
                .lines()
                .skip(1)
                .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())))
                .collect();
            let n = {
                let mut g = g.lock().unwrap_or_else(|p| p.into_inner());
                g.push((headers, body));
                g.len()
            };
            let status = if n <= refuse { "500 Nope" } else { "204 No Content" };
            let _ =
                s.write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").as_bytes());
        }
    });
    (port, got)
}

#[test]
fn callbacks_are_signed_and_retried() {
    use hmac::{Hmac, Mac};
    let echo = Echo::start();
    let gw = Gateway::start(&config(&echo, EMBEDDED));
    let a = bearer(ACME);
    let (port, got) = receiver(1);
    let url = format!("http://127.0.0.1:{port}/hooks/jobs");
    let id = submit(&gw, &a, "/gen", &[("x-callback-url", &url)]);
    wait_status(&gw, &a, &id, "completed");
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.lock().map(|g| g.len()).unwrap_or(0) < 2 {
        assert!(Instant::now() < deadline, "the refused callback was not retried");
        std::thread::sleep(Duration::from_millis(50));
    }
    let calls = got.lock().map(|g| g.clone()).unwrap_or_default();
    for (headers, body) in &calls {
        let h = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone()).unwrap_or_default();
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).expect("hmac");
        mac.update(format!("{}.", h("x-tollgate-timestamp")).as_bytes());
        mac.update(body);
        assert_eq!(h("x-tollgate-signature"), format!("sha256={}", hex::encode(mac.finalize().into_bytes())));
        let v: Value = serde_json::from_slice(body).expect("json");
        assert_eq!(
            (v["id"].as_str(), v["status"].as_str(), v["tenant"].as_str()),
            (Some(id.as_str()), Some("completed"), Some("acme"))
        );
    }
    assert_eq!(calls.len(), 2, "delivered once the receiver took it");
    // Hosts outside the tier's list, other schemes, credentials in the URL and duplicates are refused.
    for bad in
        ["http://10.1.2.3/x", "https://127.0.0.1/x", "http://user@127.0.0.1/x", "ftp://127.0.0.1/", "127.0.0.1/x"]
    {
        let r = gw.request("POST", "/gen", &[("authorization", &a), ("x-callback-url", bad)], b"");
        assert_eq!((r.status, r.problem_code()), (400, "invalid_job".to_string()), "{bad}");
    }
    let r =
        gw.request("POST", "/gen", &[("authorization", &a), ("x-callback-url", &url), ("x-callback-url", &url)], b"");
    assert_eq!((r.status, r.problem_code()), (400, "invalid_job".to_string()));
}

#[test]
fn job_input_is_checked() {
    let echo = Echo::start();
    let gw = Gateway::start(&config(&echo, EMBEDDED));
    let a = bearer(ACME);
    for bad in ["high", "1.5", "", "99999999999999999999", "-2000000"] {
        let r = gw.request("POST", "/gen", &[("authorization", &a), ("x-job-priority", bad)], b"");
        assert_eq!((r.status, r.problem_code()), (400, "invalid_job".to_string()), "{bad:?}");
    }
    let r = gw.request("POST", "/gen", &[("authorization", &a), ("x-job-priority", "1"), ("x-job-priority", "2")], b"");
    assert_eq!(r.status, 400);
    // Ids that are not ids, other methods, queries on single-job paths.
    for p in
        ["/_tollgate/jobs/nope", "/_tollgate/jobs/JOB_00000000000000000000000000000000", "/_tollgate/jobs/job_0/result"]
    {
        assert_eq!(gw.get(p, &[("authorization", &a)]).status, 404, "{p}");
    }
    let r = gw.request("POST", "/_tollgate/jobs", &[("authorization", &a)], b"");
    assert_eq!((r.status, r.header("allow")), (405, Some("GET, DELETE")));
    for q in ["limit=0", "limit=101", "cursor=x", "status=PENDING", "limit=1&limit=2", "page=2"] {
        assert_eq!(gw.get(&format!("/_tollgate/jobs?{q}"), &[("authorization", &a)]).status, 400, "{q}");
    }
    // The open-job bound (20 in this config): the 21st is refused and takes no quota.
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(submit(&gw, &a, "/gen?delay_ms=5000", &[]));
    }
    let before = used(&gw, &a);
    let r = gw.request("POST", "/gen", &[("authorization", &a)], b"");
    assert_eq!((r.status, r.problem_code()), (429, "job_queue_full".to_string()));
    assert!(r.header("retry-after").is_some());
    assert_eq!(used(&gw, &a), before, "a refused job consumes nothing");
    assert_eq!(gw.request("DELETE", "/_tollgate/jobs", &[("authorization", &a)], b"").status, 200);
    // The metrics saw the jobs.
    let m = get(gw.admin, "/metrics", &[]).expect("metrics").text();
    assert!(m.contains("tollgate_jobs_submitted_total{tier=\"pro\"} 20"), "{m}");
    assert!(m.contains("tollgate_jobs_finished_total{status=\"cancelled\",tier=\"pro\"}"), "{m}");
    assert!(m.contains("tollgate_job_wait_seconds_bucket"));
    assert!(gw.log().contains("job_id="), "job events are in the log");
}

/// A job accepted by one instance and cancelled or run by another: the accepting instance
/// gives the reservation back, or settles it from the result, on its own.
#[test]
fn the_accepting_instance_settles_jobs_other_instances_ended() {
    let redis = Redis::start();
    let echo = Echo::start();
    let store = redis_store(&redis);
    let idle = config(&echo, &store).replace("workers = 4", "workers = 0");
    let a = bearer(ACME);
    let accepting = Gateway::start(&idle);
    let other = Gateway::start(&idle);
    let rows_before = used_of(&accepting, &a, "rows");
    let pending = submit(&accepting, &a, "/charged", &[("x-rows", "30")]);
    assert_eq!(used_of(&accepting, &a, "rows"), rows_before + 30);
    let r = other.request("DELETE", &format!("/_tollgate/jobs/{pending}"), &[("authorization", &a)], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    wait_used_of(&accepting, &a, "rows", rows_before);
    // Run by a third instance: settled from the result's header where it was accepted.
    let id = submit(&accepting, &a, "/charged?header=x-rows-used:4", &[("x-rows", "40")]);
    let _worker = Gateway::start(&config(&echo, &store));
    wait_status(&accepting, &a, &id, "completed");
    wait_used_of(&accepting, &a, "rows", rows_before + 4);
}

/// A job cancelled through another instance while its answer is on the way: the store tells
/// the instance running it (and only it), which meters the run once, at its estimate.
#[test]
fn a_job_cancelled_elsewhere_as_it_ends_is_metered_once_where_it_ran() {
    let redis = Redis::start();
    let echo = Echo::start();
    let store = redis_store(&redis);
    // A lease of 60 s is renewed every 20 s: the run ends before it hears of the cancel.
    let long_lease = config(&echo, &store).replace("lease_ttl = \"1s\"", "lease_ttl = \"60s\"");
    let a = bearer(ACME);
    let runner = Gateway::start(&long_lease);
    let other = Gateway::start(&long_lease.replace("workers = 4", "workers = 0"));
    let id = submit(&runner, &a, "/charged?delay_ms=1500&header=x-rows-used:7", &[("x-rows", "30")]);
    wait_status(&other, &a, &id, "running");
    let r = other.request("DELETE", &format!("/_tollgate/jobs/{id}"), &[("authorization", &a)], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let metered = |gw: &Gateway| {
        let m = get(gw.admin, "/metrics", &[]).expect("metrics").text();
        m.lines()
            .find(|l| l.starts_with("tollgate_usage_units_total{metric=\"rows\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while metered(&runner) == 0 {
        assert!(Instant::now() < deadline, "the cancelled run was not metered where it ran");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!((metered(&runner), metered(&other)), (30, 0), "once, at the estimate");
    assert_eq!(wait_status(&other, &a, &id, "cancelled")["status"], "cancelled");
}

/// A gateway stopped with SIGTERM hands its running job back at once (not after its lease),
/// and the job runs again elsewhere.
#[test]
fn a_stopping_instance_hands_its_running_job_back() {
    let redis = Redis::start();
    let echo = Echo::start();
    let store = redis_store(&redis);
    let long_lease = config(&echo, &store).replace("lease_ttl = \"1s\"", "lease_ttl = \"60s\"");
    let a = bearer(ACME);
    let mut gw1 = Gateway::start(&long_lease);
    let observer = Gateway::start(&long_lease.replace("workers = 4", "workers = 0"));
    let id = submit(&gw1, &a, "/gen?delay_ms=3000", &[]);
    wait_status(&observer, &a, &id, "running");
    gw1.signal("TERM");
    let v = wait_status(&observer, &a, &id, "pending");
    assert_eq!(v["attempts"], 0, "given back, not reaped after the 60 s lease: {v}");
    assert!(gw1.wait_exit(Duration::from_secs(15)).is_some(), "the gateway did not stop");
    let _worker = Gateway::start(&long_lease);
    wait_status(&observer, &a, &id, "completed");
}
