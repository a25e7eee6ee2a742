//! The error model and the observability surface through the real binary: one title per
//! problem code wherever it is answered, `Allow` on every 405, the limit headers (stable policy
//! names, every quota, concurrency, `Retry-After` against `t`), who the access log names on a
//! refusal, and the Prometheus metrics (upstream errors apart from rejections, status codes,
//! requests in flight, server health, time to first byte, per-tenant series that count every
//! request).

mod common;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

/// The value of one series in a `/metrics` text, `None` when absent.
fn series(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' ')?.trim().parse().ok())
}

fn metrics(gw: &Gateway) -> String {
    get(gw.admin, "/metrics", &[]).expect("metrics").text()
}

/// Waits until `f` holds over the metrics text, or panics with the text.
fn metrics_until(gw: &Gateway, what: &str, f: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = metrics(gw);
        if f(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{what}:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The access log line of the request with id `rid`, as JSON.
fn access_line(gw: &Gateway, rid: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = gw.log();
        if let Some(line) = log.lines().find(|l| l.contains("tollgate::access") && l.contains(rid)) {
            return serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        }
        assert!(Instant::now() < deadline, "no access log line for {rid}:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The raw text of a number field in a JSON log line (to see how it was printed).
fn raw_field<'a>(line: &'a str, field: &str) -> Option<&'a str> {
    let start = line.find(&format!("\"{field}\":"))? + field.len() + 3;
    let rest = &line[start..];
    Some(&rest[..rest.find([',', '}'])?])
}

const RULES: &str = r#"
[[rule]]
name = "admin-only"
match = { path_prefix = "/admin/" }
require_scopes = ["admin"]

[[rule]]
name = "hidden"
match = { path_prefix = "/hidden/" }
deny = { status = 404, message = "Nothing here." }

[[rule]]
name = "to-dead"
match = { path_prefix = "/dead/" }
upstream = "dead"

[[rule]]
name = "slow"
match = { path_prefix = "/slow/" }
timeout = "300ms"
"#;

#[test]
fn one_code_has_one_title_and_every_405_says_what_is_allowed() {
    let echo = Echo::start();
    let gw = Gateway::start(&standard_config(echo.addr, Extra { tail: RULES, ..Extra::default() }));
    let ro = bearer(ACME_READONLY_KEY);
    let routed = gw.get("/admin/users", &[("authorization", &ro)]);
    let self_service = gw.get("/_tollgate/keys", &[("authorization", &ro)]);
    for r in [&routed, &self_service] {
        assert_eq!((r.status, r.problem_code()), (403, "insufficient_scope".to_string()), "{}", r.text());
    }
    assert_eq!(routed.json()["title"], self_service.json()["title"], "insufficient_scope has two titles");
    assert_eq!(self_service.json()["title"], "Insufficient scope");

    let auth = bearer(ACME_KEY);
    for (method, path, allow) in [
        ("POST", "/_tollgate/usage", "GET"),
        ("PUT", "/_tollgate/keys", "GET, POST"),
        ("GET", "/_tollgate/keys/k", "DELETE"),
    ] {
        let r = gw.request(method, path, &[("authorization", &auth)], b"");
        assert_eq!((r.status, r.problem_code()), (405, "method_not_allowed".to_string()), "{method} {path}");
        assert_eq!(r.header("allow"), Some(allow), "{method} {path}");
        assert_eq!(r.json()["title"], "Method not allowed");
    }
    // The proxy's own 405 and the self-service 405 read the same.
    let r = gw.request("delete", "/v1/x", &[("authorization", &auth)], b"");
    assert_eq!((r.status, r.json()["title"].as_str()), (405, Some("Method not allowed")));

    let r = gw.get("/_tollgate/nothing", &[("authorization", &auth)]);
    assert_eq!((r.status, r.problem_code()), (404, "not_found".to_string()));
    assert_eq!(r.json()["title"], "Not found");
    // A tenant declared in the config file cannot create keys through self-service.
    let r = gw.request("POST", "/_tollgate/keys", &[("authorization", &auth)], b"{}");
    assert_eq!((r.status, r.problem_code()), (409, "conflict".to_string()), "{}", r.text());
    assert_eq!(r.json()["title"], "Conflict");
}

#[test]
fn errors_md_documents_every_code_the_gateway_answers() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/errors.md")).expect("errors.md");
    for code in tollgate::error::CODES.iter().chain(&["not_found", "conflict"]) {
        assert!(doc.contains(&format!("### `{code}`")), "docs/errors.md has no section for `{code}`");
        let title = tollgate::error::title_of(code);
        assert!(
            doc.contains(&format!("| `{code}` | {title} |")),
            "docs/errors.md does not give `{code}` its title {title:?}"
        );
    }
}

/// A one-tier config with a rate, two quotas, a charged rule with a rule rate and a rule quota,
/// and a concurrency limit.
fn limits_config(echo: &Echo, tier: &str) -> String {
    format!(
        r#"usage_metrics = ["records"]

[server]
listen = ["{{LISTEN}}"]
admin_listen = "{{ADMIN}}"
threads = 2
upgrade_sock = "{{DIR}}/upgrade.sock"
pid_file = "{{DIR}}/tollgate.pid"

[store]
path = "{{DIR}}/tollgate.db"

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

[[rule]]
name = "gen"
match = {{ path = "/gen" }}
charge = {{ metric = "records", cost_from_query = "n", settle_from_header = "x-records-generated" }}
rate.default = {{ requests_per_minute = 30 }}
quota.default.requests = {{ limit = 5, period = "day" }}
"#,
        echo = echo.addr,
        hash = hash_of(ACME_KEY),
    )
}

#[test]
fn retry_after_never_points_earlier_than_the_refusing_items_t() {
    let echo = Echo::start();
    let gw = Gateway::start(&limits_config(&echo, "rate = { requests_per_minute = 3, burst = 3 }"));
    let auth = bearer(ACME_KEY);
    for _ in 0..3 {
        assert_eq!(gw.get("/x", &[("authorization", &auth)]).status, 200);
    }
    let r = gw.get("/x", &[("authorization", &auth)]);
    assert_eq!(r.problem_code(), "rate_limited");
    let retry: u64 = r.header("retry-after").and_then(|v| v.parse().ok()).expect("retry-after");
    let state = r.header("ratelimit").unwrap_or_default().to_string();
    let t: u64 = state
        .strip_prefix("\"rate\";r=0;t=")
        .and_then(|t| t.split(',').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no rate item: {state}"));
    assert!(retry >= t, "Retry-After {retry} points earlier than t={t}");
    assert_eq!(retry, t, "with nothing left, the rate resets for the client when one request is let through");
    assert_eq!(r.json()["retry_after"].as_u64(), Some(retry));
}

#[test]
fn every_quota_is_advertised_under_a_stable_name_with_concurrency_and_settled_use() {
    let echo = Echo::start();
    let tier = "rate = { requests_per_minute = 100 }\nquotas.requests = { limit = 100, period = \"month\" }\nquotas.records = { limit = 50, period = \"day\" }\nconcurrency = 4";
    let gw = Gateway::start(&limits_config(&echo, tier));
    let auth = bearer(ACME_KEY);

    let plain = gw.get("/x", &[("authorization", &auth)]);
    assert_eq!(plain.status, 200);
    let policy = plain.header("ratelimit-policy").unwrap_or_default().to_string();
    assert!(policy.starts_with("\"rate\";q=100;w=60, \"quota-requests-month\";q=100;w="), "{policy}");
    assert!(policy.ends_with(";qu=\"requests\", \"concurrency\";q=4;qu=\"concurrent-requests\""), "{policy}");
    assert!(!policy.contains("records"), "a route without a charge meets no records quota: {policy}");
    let state = plain.header("ratelimit").unwrap_or_default().to_string();
    assert!(state.contains("\"quota-requests-month\";r=99;t="), "{state}");
    assert!(state.ends_with("\"concurrency\";r=3"), "this request holds one of the 4 slots: {state}");

    // The charged route meets every quota: each is listed under its own name, with its own
    // numbers, and the rule's rate is a policy of its own.
    let r = gw.get("/gen?n=30&header=x-records-generated:5", &[("authorization", &auth)]);
    assert_eq!(r.status, 200, "{}", r.text());
    let policy = r.header("ratelimit-policy").unwrap_or_default().to_string();
    for item in [
        "\"rate-gen\";q=30;w=60",
        "\"quota-requests-month\";q=100;w=",
        "\"quota-records-day\";q=50;w=86400;qu=\"records\"",
        "\"quota-requests@gen-day\";q=5;w=86400;qu=\"requests\"",
        "\"concurrency\";q=4;qu=\"concurrent-requests\"",
    ] {
        assert!(policy.contains(item), "missing {item} in {policy}");
    }
    assert!(!policy.contains("\"quota\";"), "{policy}");
    // Settled to 5 of the 30 estimated: the headers show what is left after settlement.
    let state = r.header("ratelimit").unwrap_or_default().to_string();
    assert!(state.contains("\"quota-records-day\";r=45;"), "{state}");
    assert!(state.contains("\"quota-requests@gen-day\";r=4;"), "{state}");
    // The closest to exhaustion: records (20 of 50) on the estimate, requests@gen (4 of 5)
    // once records are settled (45 of 50).
    assert_eq!(r.header("x-quota-remaining"), Some("4"), "{state}");
    let r = gw.get("/gen?n=1", &[("authorization", &auth)]);
    assert!(r.header("ratelimit").unwrap_or_default().contains("\"quota-records-day\";r=44;"), "{:?}", r.headers);
}

#[test]
fn refusals_are_logged_with_who_was_identified_and_the_rule_that_refused() {
    let echo = Echo::start();
    let tail = format!("{RULES}\n[log]\nformat = \"json\"\n");
    let gw = Gateway::start(&standard_config(echo.addr, Extra { tail: &tail, ..Extra::default() }));
    let revoked = bearer(REVOKED_KEY);
    let acme = bearer(ACME_KEY);
    assert_eq!(gw.get("/v1/x", &[("authorization", &revoked), ("x-request-id", "rid-revoked")]).status, 401);
    assert_eq!(gw.get("/t/globex/v1/x", &[("authorization", &acme), ("x-request-id", "rid-mismatch")]).status, 403);
    assert_eq!(
        gw.get("/v1/x", &[("authorization", &bearer(DORMANT_KEY)), ("x-request-id", "rid-dormant")]).status,
        403
    );
    let denied = gw.get("/hidden/x", &[("authorization", &acme), ("x-request-id", "rid-denied")]);
    assert_eq!((denied.status, denied.json()["rule"].as_str()), (404, Some("hidden")));
    assert_eq!(gw.get("/v1/x", &[("authorization", &acme), ("x-request-id", "rid-ok")]).status, 200);

    let v = access_line(&gw, "rid-revoked");
    assert_eq!(
        (v["reason"].as_str(), v["tenant"].as_str(), v["key_id"].as_str()),
        (Some("key_revoked"), Some("acme"), Some("acme-revoked"))
    );
    let v = access_line(&gw, "rid-mismatch");
    assert_eq!(
        (v["reason"].as_str(), v["tenant"].as_str(), v["key_id"].as_str()),
        (Some("tenant_mismatch"), Some("acme"), Some("acme-main"))
    );
    let v = access_line(&gw, "rid-dormant");
    assert_eq!(
        (v["reason"].as_str(), v["tenant"].as_str(), v["key_id"].as_str()),
        (Some("tenant_suspended"), Some("dormant"), Some("dormant-main"))
    );
    let v = access_line(&gw, "rid-denied");
    assert_eq!((v["reason"].as_str(), v["rule"].as_str()), (Some("denied"), Some("hidden")));

    access_line(&gw, "rid-ok");
    let log = gw.log();
    for key in [REVOKED_KEY, ACME_KEY, DORMANT_KEY] {
        assert!(!log.contains(key), "a key reached the log");
    }
    // Durations are written to the microsecond, not as the float's full expansion.
    let line = log.lines().find(|l| l.contains("rid-ok")).expect("line");
    for field in ["total_ms", "upstream_ms"] {
        let raw = raw_field(line, field).unwrap_or_else(|| panic!("no {field}: {line}"));
        let decimals = raw.split('.').nth(1).map_or(0, str::len);
        assert!(decimals <= 3, "{field}={raw}");
        assert!(raw.parse::<f64>().is_ok_and(|v| v > 0.0), "{field}={raw}");
    }
    // The refusing rule is the `rule` label of the refusal.
    let text = metrics_until(&gw, "the denied request's metrics", |t| t.contains("rule=\"hidden\""));
    assert!(
        text.lines().any(|l| l.starts_with("tollgate_requests_total{")
            && l.contains("decision=\"rejected\"")
            && l.contains("rule=\"hidden\"")),
        "{text}"
    );
    // An authentication refusal stays out of the tenant's metrics (tier `-`).
    assert_eq!(series(&text, "tollgate_rejections_total{reason=\"key_revoked\",tier=\"-\"}"), Some(1.0), "{text}");
}

#[test]
fn metrics_count_upstream_errors_apart_with_status_codes_flight_health_and_first_byte() {
    let (echo, gate) = Echo::gated();
    let gw = Gateway::start(&standard_config(echo.addr, Extra { tail: RULES, ..Extra::default() }));
    let auth = bearer(ACME_KEY);
    assert_eq!(gw.get("/dead/x", &[("authorization", &auth)]).status, 502);
    let r = gw.get("/slow/x?delay_ms=1500", &[("authorization", &auth)]);
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(gw.get("/v1/x?status=418", &[("authorization", &auth)]).status, 418);
    assert_eq!(gw.get("/v1/x", &[("authorization", &auth)]).status, 200);
    assert_eq!(gw.get("/v1/x", &[]).status, 401);

    // A streamed response in progress is a request in flight.
    let mut held = Conn::open(gw.addr).expect("connect");
    held.send_raw(&build_request("GET", "/events?sse=2", &[("authorization", &auth)], b"")).expect("send");
    assert_eq!(held.read_head().expect("head").0, 200);
    let text = metrics_until(&gw, "the stream in flight", |t| series(t, "tollgate_requests_in_flight") == Some(1.0));

    let errors = |reason: &str, upstream: &str| {
        series(&text, &format!("tollgate_upstream_errors_total{{reason=\"{reason}\",upstream=\"{upstream}\"}}"))
    };
    assert_eq!(errors("connect_error", "dead"), Some(1.0), "{text}");
    assert_eq!(errors("timeout", "default"), Some(1.0), "{text}");
    assert!(
        !text.contains("tollgate_rejections_total{reason=\"upstream_"),
        "upstream failures counted as refusals:\n{text}"
    );
    assert_eq!(series(&text, "tollgate_rejections_total{reason=\"missing_key\",tier=\"-\"}"), Some(1.0));
    let request = |decision: &str, status: &str| {
        text.lines().any(|l| {
            l.starts_with("tollgate_requests_total{")
                && l.contains(&format!("decision=\"{decision}\""))
                && l.contains(&format!(",status=\"{status}\""))
        })
    };
    assert!(request("forwarded", "200"), "{text}");
    assert!(request("upstream_error", "502") && request("upstream_error", "504"), "{text}");
    assert!(request("rejected", "401"), "{text}");
    assert!(request("forwarded", "other"), "418 is not a known status: {text}");
    let healthy = format!("tollgate_upstream_server_healthy{{server=\"{}\",upstream=\"default\"}}", echo.addr);
    assert_eq!(series(&text, &healthy), Some(1.0), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("tollgate_upstream_server_healthy{")
            && l.contains("upstream=\"dead\"")
            && l.ends_with(" 1")),
        "a pool without health checks counts its servers healthy: {text}"
    );
    assert!(text.contains("tollgate_upstream_first_byte_seconds_count{upstream=\"default\"}"), "{text}");
    assert!(
        text.contains("tollgate_request_duration_seconds_bucket{rule=\"default\",tier=\"pro\",le=\"600\"}"),
        "buckets stop short of streaming lengths: {text}"
    );

    gate.open();
    while held.read_chunk().expect("chunk").is_some() {}
    drop(held);
    let text = metrics_until(&gw, "the stream finished", |t| series(t, "tollgate_requests_in_flight") == Some(0.0));
    let file = gw.dir.join("metrics.txt");
    std::fs::write(&file, &text).expect("write");
    let out = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).expect("open"))
        .output()
        .expect("promtool (scripts/ensure-deps.sh installs the prometheus package)");
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_busy_tenants_series_counts_the_requests_that_made_it_busy() {
    let echo = Echo::start();
    let tail = "[metering]\nflush_interval = \"100ms\"\n\n[metrics]\ntenant_labels = { top = 1 }\n";
    let gw = Gateway::start(&standard_config(echo.addr, Extra { tail, ..Extra::default() }));
    let auth = bearer(ACME_KEY);
    for _ in 0..3 {
        assert_eq!(gw.get("/v1/x", &[("authorization", &auth)]).status, 200);
    }
    assert_eq!(gw.get("/v1/x?status=418", &[("authorization", &auth)]).status, 418);
    let want = "tollgate_tenant_requests_total{decision=\"forwarded\",tenant=\"acme\"}";
    metrics_until(&gw, "acme's series should count all 4 forwards", |t| series(t, want) == Some(4.0));
    assert_eq!(gw.get("/v1/x", &[("authorization", &auth)]).status, 200);
    let text = metrics_until(&gw, "and the next one", |t| series(t, want) == Some(5.0));
    assert!(!text.contains("tenant=\"globex\""), "{text}");
}

#[test]
fn latency_buckets_come_from_the_config() {
    let echo = Echo::start();
    let gw = Gateway::start(&standard_config(
        echo.addr,
        Extra { tail: "[metrics]\nlatency_buckets = [0.123, 700.0]\n", ..Extra::default() },
    ));
    assert_eq!(gw.get("/v1/x", &[("authorization", &bearer(ACME_KEY))]).status, 200);
    // Request durations reach the registry with the meter's next flush (every second).
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = get(gw.admin, "/metrics", &[]).expect("metrics").text();
        if text.contains("tollgate_request_duration_seconds_bucket") || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let buckets: Vec<&str> =
        text.lines().filter(|l| l.starts_with("tollgate_request_duration_seconds_bucket")).collect();
    assert!(buckets.iter().any(|l| l.contains("le=\"0.123\"")), "{buckets:?}");
    assert!(buckets.iter().any(|l| l.contains("le=\"700\"")), "{buckets:?}");
    assert!(!buckets.iter().any(|l| l.contains("le=\"0.001\"")), "the defaults are still there: {buckets:?}");

    // Buckets that are not increasing positive seconds are a config error, at their line.
    let dir = temp_dir("buckets");
    let path = dir.join("tollgate.toml");
    std::fs::write(
        &path,
        "[upstreams.main]\nservers = [\"127.0.0.1:9000\"]\n\n[metrics]\nlatency_buckets = [1.0, 0.5]\n",
    )
    .expect("write");
    let out = std::process::Command::new(bin()).args(["check", "-c"]).arg(&path).output().expect("check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(":5:") && err.contains("latency_buckets"), "{err}");
}
