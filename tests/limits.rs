//! Limits on one instance (embedded store): rate buckets, quotas with settlement and
//! rollback, soft quotas and overage, concurrency with a queue, limit headers, and usage that
//! survives a restart.

mod common;
use common::*;
use std::time::Duration;

/// A one-tier config in front of `echo`; `tier` is the body of `[tiers.basic]`.
fn config(echo: &Echo, store: &str, tier: &str, rules: &str) -> String {
    format!(
        r#"usage_metrics = ["records"]

[server]
listen = ["{{LISTEN}}"]
admin_listen = "{{ADMIN}}"
threads = 2
upgrade_sock = "{{DIR}}/upgrade.sock"
pid_file = "{{DIR}}/tollgate.pid"
shutdown_timeout = "2s"
shutdown_grace = "1s"

[store]
{store}

[upstreams.default]
servers = ["{echo}"]

[tiers.basic]
upstream = "default"
{tier}

[[tenants]]
id = "acme"
tier = "basic"

[[tenants.keys]]
id = "acme-main"
hash = "{hash}"
scopes = ["read"]

[[tenants]]
id = "globex"
tier = "basic"
overrides = {{ "rate.requests_per_minute" = 20, "rate.burst" = 20, "quotas.requests.limit" = 2 }}

[[tenants.keys]]
id = "globex-main"
hash = "{ghash}"
scopes = ["read"]

{rules}
"#,
        echo = echo.addr,
        hash = hash_of(ACME_KEY),
        ghash = hash_of(GLOBEX_KEY),
    )
}

const EMBEDDED: &str = "kind = \"embedded\"\npath = \"{DIR}/tollgate.db\"";

fn acme() -> String {
    bearer(ACME_KEY)
}

#[test]
fn rate_limit_answers_429_with_retry_after_and_headers() {
    let echo = Echo::start();
    let gw = Gateway::start(&config(&echo, EMBEDDED, "rate = { requests_per_minute = 3, burst = 3 }", ""));
    let auth = acme();
    for remaining in [2, 1, 0] {
        let r = gw.get("/x", &[("authorization", &auth)]);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-ratelimit-limit"), Some("3"));
        assert_eq!(r.header("x-ratelimit-remaining"), Some(remaining.to_string().as_str()));
        assert_eq!(r.header("ratelimit-policy"), Some("\"rate\";q=3;w=60"));
        assert!(r.header("ratelimit").is_some_and(|v| v.starts_with(&format!("\"rate\";r={remaining};t="))));
    }
    let r = gw.get("/x", &[("authorization", &auth)]);
    assert_eq!(r.status, 429);
    assert_eq!(r.problem_code(), "rate_limited");
    let retry: u64 = r.header("retry-after").and_then(|v| v.parse().ok()).expect("retry-after");
    assert!((1..=20).contains(&retry), "{retry}");
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    assert_eq!(r.json()["limit"], 3);
    assert_eq!(r.json()["remaining"], 0);
    assert_eq!(echo.hits(), 3);
    // Tenant override: globex gets 20.
    let g = bearer(GLOBEX_KEY);
    assert_eq!(gw.get("/x", &[("authorization", &g)]).header("x-ratelimit-limit"), Some("20"));
}

#[test]
fn a_rule_rate_replaces_the_tier_rate_with_its_own_bucket() {
    let echo = Echo::start();
    let rules = r#"
[[rule]]
name = "bulk"
match = { path_prefix = "/bulk/" }
rate.basic = { requests_per_minute = 1, burst = 1 }
"#;
    let gw = Gateway::start(&config(&echo, EMBEDDED, "rate = { requests_per_minute = 100 }", rules));
    let auth = acme();
    assert_eq!(gw.get("/bulk/a", &[("authorization", &auth)]).status, 200);
    assert_eq!(gw.get("/bulk/a", &[("authorization", &auth)]).status, 429);
    let r = gw.get("/other", &[("authorization", &auth)]);
    assert_eq!(r.status, 200, "the tier bucket is separate");
    assert_eq!(r.header("x-ratelimit-limit"), Some("100"));
}

#[test]
fn hard_quota_rejects_past_the_limit_and_names_it() {
    let echo = Echo::start();
    let gw = Gateway::start(&config(&echo, EMBEDDED, "quotas.requests = { limit = 3, period = \"month\" }", ""));
    let auth = acme();
    for remaining in [2, 1, 0] {
        let r = gw.get("/x", &[("authorization", &auth)]);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-quota-remaining"), Some(remaining.to_string().as_str()));
        assert!(r.header("x-quota-reset").is_some_and(|v| v.ends_with('Z')));
        assert!(r
            .header("ratelimit-policy")
            .is_some_and(|v| v.contains("\"quota-requests-month\";q=3;") && v.contains("qu=\"requests\"")));
    }
    let r = gw.get("/x", &[("authorization", &auth)]);
    assert_eq!(r.status, 429);
    assert_eq!(r.problem_code(), "quota_exceeded");
    let v = r.json();
    assert_eq!((v["metric"].as_str(), v["used"].as_u64(), v["limit"].as_u64()), (Some("requests"), Some(3), Some(3)));
    assert!(v["reset"].as_str().is_some_and(|s| s.ends_with('Z')));
    assert!(r.header("retry-after").is_some());
    assert_eq!(r.header("x-quota-remaining"), Some("0"));
    assert_eq!(echo.hits(), 3);
    // The override gives globex its own, smaller limit.
    let g = bearer(GLOBEX_KEY);
    for _ in 0..2 {
        assert_eq!(gw.get("/x", &[("authorization", &g)]).status, 200);
    }
    assert_eq!(gw.get("/x", &[("authorization", &g)]).status, 429);
}

#[test]
fn soft_quota_and_overage_allowance() {
    let echo = Echo::start();
    let tier = "quotas.requests = { limit = 2, period = \"day\", enforcement = \"soft\" }\nquotas.records = { limit = 10, period = \"day\", overage = 50 }";
    let rules = r#"
[[rule]]
name = "gen"
match = { path = "/gen" }
charge = { metric = "records", cost_from_query = "n" }
"#;
    let gw = Gateway::start(&config(&echo, EMBEDDED, tier, rules));
    let auth = acme();
    for _ in 0..2 {
        let r = gw.get("/x", &[("authorization", &auth)]);
        assert_eq!(r.header("x-quota-overage"), None);
    }
    let r = gw.get("/x", &[("authorization", &auth)]);
    assert_eq!(r.status, 200, "soft quotas let the request through");
    assert_eq!(r.header("x-quota-overage"), Some("requests"));
    // records: limit 10 + 50% overage = 15 admitted, in total.
    assert_eq!(gw.get("/gen?n=12", &[("authorization", &auth)]).status, 200);
    let r = gw.get("/gen?n=3", &[("authorization", &auth)]);
    assert_eq!(r.status, 200, "inside the overage allowance");
    let r = gw.get("/gen?n=1", &[("authorization", &auth)]);
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["metric"], "records");
    assert_eq!(r.json()["used"], 15);
}

#[test]
fn charges_are_checked_before_and_settled_after() {
    let echo = Echo::start();
    let tier = "quotas.records = { limit = 100, period = \"month\" }";
    let rules = r#"
[[rule]]
name = "gen"
match = { path = "/gen" }
charge = { metric = "records", cost_from_query = "num_rows", max_cost = 500, settle_from_header = "x-records-generated" }
"#;
    let gw = Gateway::start(&config(&echo, EMBEDDED, tier, rules));
    let auth = acme();
    // Asked for 80, produced 10: settled to 10, and the headers say so.
    let r = gw.get("/gen?num_rows=80&header=x-records-generated:10", &[("authorization", &auth)]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-quota-remaining"), Some("90"), "the remaining after settlement, not after the estimate");
    assert!(r.header("ratelimit").is_some_and(|v| v.contains("\"quota-records-month\";r=90;")), "{:?}", r.headers);
    let r = gw.get("/gen?num_rows=90", &[("authorization", &auth)]);
    assert_eq!(r.status, 200, "only the settled 10 were spent: {}", r.text());
    assert_eq!(r.header("x-quota-remaining"), Some("0"));
    // More than remains: refused before forwarding.
    let r = gw.get("/gen?num_rows=1", &[("authorization", &auth)]);
    assert_eq!(r.problem_code(), "quota_exceeded");
    // Bad costs are a clear 400.
    for q in ["/gen", "/gen?num_rows=many", "/gen?num_rows=501"] {
        let r = gw.get(q, &[("authorization", &auth)]);
        assert_eq!((r.status, r.problem_code()), (400, "invalid_cost".to_string()), "{q}");
    }
    assert_eq!(echo.hits(), 2);
}

#[test]
fn a_request_refused_by_one_quota_gives_back_the_others() {
    let echo = Echo::start();
    let tier =
        "quotas.requests = { limit = 100, period = \"month\" }\nquotas.records = { limit = 5, period = \"month\" }";
    let rules = r#"
[[rule]]
name = "gen"
match = { path = "/gen" }
charge = { metric = "records", cost_from_query = "n" }
"#;
    let gw = Gateway::start(&config(&echo, EMBEDDED, tier, rules));
    let auth = acme();
    for _ in 0..10 {
        assert_eq!(gw.get("/gen?n=6", &[("authorization", &auth)]).status, 429);
    }
    let r = gw.get("/other", &[("authorization", &auth)]);
    assert_eq!(r.status, 200);
    // Only this request counted against `requests`: 100 - 1.
    let policy = r.header("ratelimit").unwrap_or_default().to_string();
    assert!(policy.contains("\"quota-requests-month\";r=99"), "{policy}");
}

#[test]
fn rejections_cost_nothing() {
    let echo = Echo::start();
    let tier = "rate = { requests_per_minute = 5, burst = 5 }\nquotas.requests = { limit = 1000, period = \"month\" }";
    let rules = r#"
[[rule]]
name = "probe"
match = { path = "/probe" }
rate.default = { requests_per_second = 1000 }
"#;
    let gw = Gateway::start(&config(&echo, EMBEDDED, tier, rules));
    let auth = acme();
    let mut admitted = 0;
    for _ in 0..50 {
        match gw.get("/x", &[("authorization", &auth)]).status {
            200 => admitted += 1,
            429 => {}
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!(admitted, 5);
    let r = gw.get("/probe", &[("authorization", &auth)]);
    assert_eq!(r.status, 200);
    // 1000 - 5 admitted - this probe.
    assert_eq!(r.header("x-quota-remaining"), Some("994"));
    assert_eq!(echo.hits(), 6);
}

#[test]
fn concurrency_limit_frees_slots_on_every_path() {
    let (echo, gate) = Echo::gated();
    let gw = Gateway::start(&config(&echo, EMBEDDED, "concurrency = 1", ""));
    let auth = acme();
    let mut held = Conn::open(gw.addr).expect("connect");
    held.send_raw(&build_request("GET", "/stream?sse=2", &[("authorization", &auth)], b"")).expect("send");
    assert_eq!(held.read_head().expect("head").0, 200);
    let r = gw.get("/x", &[("authorization", &auth)]);
    assert_eq!(r.status, 429);
    assert_eq!(r.problem_code(), "concurrency_limit");
    assert_eq!(r.header("retry-after"), Some("1"));
    // A client that goes away mid-response frees its slot too.
    drop(held);
    gate.open();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = gw.get("/x", &[("authorization", &auth)]);
        if r.status == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the slot was never freed");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Upstream failures free the slot as well.
    let r = gw.get("/x?status=500", &[("authorization", &auth)]);
    assert_eq!(r.status, 500);
    assert_eq!(gw.get("/x", &[("authorization", &auth)]).status, 200);
}

#[test]
fn concurrency_queue_waits_for_a_slot_instead_of_refusing() {
    let echo = Echo::start();
    let gw = Gateway::start(&config(&echo, EMBEDDED, "concurrency = 1\nqueue = { max = 10, timeout = \"10s\" }", ""));
    let addr = gw.addr;
    let handles: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let auth = bearer(ACME_KEY);
                get(addr, "/slow?delay_ms=200", &[("authorization", &auth)]).expect("request").status
            })
        })
        .collect();
    let statuses: Vec<u16> = handles.into_iter().map(|h| h.join().expect("thread")).collect();
    assert_eq!(statuses, vec![200; 4], "queued requests are served, not refused");
    assert_eq!(echo.hits(), 4);
}

#[test]
fn monthly_usage_survives_a_restart() {
    let echo = Echo::start();
    let dir = temp_dir("restart");
    // A long flush interval: only the flush at shutdown can save the usage.
    let store = "kind = \"embedded\"\npath = \"{DIR}/tollgate.db\"\nflush_interval = \"60s\"";
    // The final flush runs in the shutdown grace period.
    let template = config(&echo, store, "quotas.requests = { limit = 10, period = \"month\" }", "");
    let auth = acme();
    {
        let mut gw = Gateway::start_in(dir.clone(), &template, &[]);
        for _ in 0..4 {
            assert_eq!(gw.get("/x", &[("authorization", &auth)]).status, 200);
        }
        gw.signal("TERM");
        assert!(gw.wait_exit(Duration::from_secs(15)).is_some(), "did not stop:\n{}", gw.log());
    }
    let gw = Gateway::start_in(dir, &template, &[]);
    let r = gw.get("/x", &[("authorization", &auth)]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-quota-remaining"), Some("5"), "4 before the restart + 1 now");
}

#[test]
fn a_rule_quota_counts_only_that_rules_requests_in_its_own_counter() {
    let echo = Echo::start();
    let rules = r#"
[[rule]]
name = "bulk"
match = { path_prefix = "/bulk/" }
quota.default.requests = { limit = 2, period = "day" }
"#;
    let gw = Gateway::start(&config(&echo, EMBEDDED, "quotas.requests = { limit = 100, period = \"month\" }", rules));
    let auth = acme();
    for _ in 0..2 {
        assert_eq!(gw.get("/bulk/x", &[("authorization", &auth)]).status, 200);
    }
    let r = gw.get("/bulk/x", &[("authorization", &auth)]);
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["metric"], "requests@bulk");
    // Other routes are not held back by the rule's counter; the tier quota saw the 2 + this one.
    let r = gw.get("/other", &[("authorization", &auth)]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-quota-remaining"), Some("97"));
}
