//! Metering end to end: usage in the ledger equals what was admitted (counted at the
//! upstream), on the embedded store and across three instances on Redis, across restarts and a
//! Redis crash; settlement; reports over a month boundary; `/metrics` validity and bounded
//! cardinality; quota warning webhooks with signatures and retries.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn config(echo: &Echo, store: &str, tier_extra: &str, tail: &str) -> String {
    format!(
        r#"usage_metrics = ["records"]

[server]
listen = ["{{LISTEN}}"]
admin_listen = "{{ADMIN}}"
threads = 2
upgrade_sock = "{{DIR}}/upgrade.sock"
pid_file = "{{DIR}}/tollgate.pid"
shutdown_grace = "1s"
shutdown_timeout = "2s"

[store]
{store}

[metering]
flush_interval = "100ms"

[upstreams.default]
servers = ["{echo}"]

[tiers.basic]
upstream = "default"
price.records = 0.002
{tier_extra}

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

{tail}
"#,
        echo = echo.addr,
        hash = hash_of(ACME_KEY),
    )
}

/// Runs `tollgate usage report` on a config and returns the JSON report.
fn report(config_path: &std::path::Path, from: &str, to: &str) -> serde_json::Value {
    let out = Command::new(bin())
        .args(["usage", "report", "-c"])
        .arg(config_path)
        .args(["--tenant", "acme", "--from", from, "--to", to, "--format", "json"])
        .output()
        .expect("usage report");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("json report")
}

fn total(report: &serde_json::Value, metric: &str) -> u64 {
    report["totals"]
        .as_array()
        .and_then(|t| t.iter().find(|x| x["metric"] == metric))
        .and_then(|x| x["value"].as_u64())
        .unwrap_or(0)
}

fn today() -> String {
    chrono::Utc::now().format("%Y-%m-%d").to_string()
}

/// Sends `n` requests alternating over `gateways`; returns how many were admitted.
fn traffic(gateways: &[&Gateway], n: usize, path: &str) -> u64 {
    let auth = bearer(ACME_KEY);
    let mut ok = 0;
    for i in 0..n {
        let gw = gateways[i % gateways.len()];
        if let Ok(r) = request(gw.addr, "GET", path, &[("authorization", &auth)], b"") {
            if r.status == 200 {
                ok += 1;
            }
        }
    }
    ok
}

fn stop(gw: &mut Gateway) {
    gw.signal("TERM");
    assert!(gw.wait_exit(Duration::from_secs(15)).is_some(), "did not stop:\n{}", gw.log());
}

#[test]
fn embedded_usage_equals_admitted_requests_across_a_restart() {
    let echo = Echo::start();
    let dir = temp_dir("meter-embedded");
    let template = config(
        &echo,
        "kind = \"embedded\"\npath = \"{DIR}/tollgate.db\"",
        "quotas.requests = { limit = 30, period = \"month\" }",
        "",
    );
    let mut gw = Gateway::start_in(dir.clone(), &template, &[]);
    let first = traffic(&[&gw], 20, "/a");
    stop(&mut gw);
    let mut gw = Gateway::start_in(dir.clone(), &template, &[]);
    let second = traffic(&[&gw], 20, "/a");
    stop(&mut gw);
    assert_eq!(first + second, 30, "the quota admits 30 in all");
    assert_eq!(echo.hits(), 30);
    let r = report(&dir.join("tollgate.toml"), &today(), &today());
    assert_eq!(total(&r, "requests"), echo.hits(), "usage = upstream hits: {r}");
    assert_eq!(total(&r, "rejected.quota_exceeded"), 10, "rejections are metered apart: {r}");
    assert!(total(&r, "bytes_out") > 0);
    assert_eq!(total(&r, "status_2xx"), 30);
}

#[test]
fn redis_usage_is_exact_across_three_instances_and_a_redis_crash() {
    let mut redis = Redis::start_persistent();
    let echo = Echo::start();
    let store =
        format!("kind = \"redis\"\nurl = \"{}\"\ntimeout = \"200ms\"\nbreaker_cooldown = \"200ms\"", redis.url());
    let template = config(&echo, &store, "", "");
    let mut gws: Vec<Gateway> = (0..3).map(|_| Gateway::start(&template)).collect();
    let refs: Vec<&Gateway> = gws.iter().collect();
    let mut admitted = traffic(&refs, 150, "/a");
    // Redis dies mid-load: usage keeps being recorded and is replayed when it returns.
    redis.kill();
    admitted += traffic(&refs, 90, "/a");
    std::thread::sleep(Duration::from_millis(300));
    redis.restart();
    admitted += traffic(&refs, 60, "/a");
    for gw in gws.iter_mut() {
        stop(gw);
    }
    assert_eq!(admitted, 300);
    assert_eq!(echo.hits(), 300);
    let r = report(&gws[0].config_path, &today(), &today());
    assert_eq!(total(&r, "requests"), 300, "no loss and no double count: {r}");
}

#[test]
fn settlement_replaces_the_estimate_in_usage_and_cost() {
    let echo = Echo::start();
    let dir = temp_dir("meter-settle");
    let template = config(&echo, "kind = \"embedded\"\npath = \"{DIR}/tollgate.db\"", "", "");
    let mut gw = Gateway::start_in(dir.clone(), &template, &[]);
    let auth = bearer(ACME_KEY);
    assert_eq!(gw.get("/gen?n=100&header=x-records-generated:7", &[("authorization", &auth)]).status, 200);
    assert_eq!(gw.get("/gen?n=5", &[("authorization", &auth)]).status, 200);
    stop(&mut gw);
    let r = report(&dir.join("tollgate.toml"), &today(), &today());
    assert_eq!(total(&r, "records"), 12, "7 settled + 5 estimated: {r}");
    let cost =
        r["totals"].as_array().and_then(|t| t.iter().find(|x| x["metric"] == "records")).map(|x| x["cost"].as_f64());
    assert_eq!(cost, Some(Some(0.024)), "12 × 0.002");
}

#[test]
fn a_report_over_a_month_boundary_has_daily_rows_and_totals() {
    use tollgate::store::{embedded::Embedded, Ledger, LedgerBatch, LedgerRow};
    let dir = temp_dir("meter-report");
    let db = dir.join("tollgate.db");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let store = Embedded::open(&db, 0).expect("open");
        let row = |day: &str, metric: &str, value: u64, cost: u64| LedgerRow {
            tenant: "acme".into(),
            metric: metric.into(),
            day: day.into(),
            value,
            cost_micros: cost,
        };
        let rows = vec![
            row("2027-01-30", "requests", 4, 0),
            row("2027-01-31", "requests", 6, 0),
            row("2027-01-31", "records", 100, 200_000),
            row("2027-02-01", "records", 50, 100_000),
            row("2027-02-02", "requests", 9, 0),
        ];
        let batch = [LedgerBatch { writer: "w1".into(), seq: 1, tenant: "acme".into(), rows }];
        assert!(store.apply(&batch).await.iter().all(Result::is_ok), "apply");
        // The same batch again (a retry) is not counted twice.
        assert!(store.apply(&batch).await.iter().all(Result::is_ok), "apply again");
    });
    let cfg = dir.join("tollgate.toml");
    std::fs::write(
        &cfg,
        format!("usage_metrics = [\"records\"]\n[store]\npath = \"{}\"\n[upstreams.u]\nservers = [\"127.0.0.1:9\"]\n[tiers.t]\nupstream = \"u\"\n", db.display()),
    )
    .expect("write");
    let out = Command::new(bin())
        .args(["usage", "report", "-c"])
        .arg(&cfg)
        .args(["--tenant", "acme", "--from", "2027-01-31", "--to", "2027-02-01", "--format", "csv"])
        .output()
        .expect("report");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let csv = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        csv,
        "date,metric,value,cost\r\n2027-01-31,records,100,0.200000\r\n2027-01-31,requests,6,0.000000\r\n2027-02-01,records,50,0.100000\r\ntotal,records,150,0.300000\r\ntotal,requests,6,0.000000\r\n"
    );
    let json = report(&cfg, "2027-01-01", "2027-02-28");
    assert_eq!((total(&json, "requests"), total(&json, "records")), (19, 150));
    assert_eq!(json["daily"].as_array().map(|d| d.len()), Some(5));
    assert_eq!(json["total_cost"].as_f64(), Some(0.3));
}

#[test]
fn metrics_pass_promtool_and_stay_bounded_with_ten_thousand_tenants() {
    let echo = Echo::start();
    let mut tenants = String::new();
    let n = 10_000;
    for i in 0..n {
        tenants.push_str(&format!(
            "[[tenants]]\nid = \"t{i}\"\ntier = \"basic\"\n[[tenants.keys]]\nid = \"k{i}\"\nhash = \"{}\"\nscopes = [\"read\"]\n",
            hash_of(&format!("tg_live_tenant{i}_cardinalityXXXXXXXXXXXXX"))
        ));
    }
    let tail = format!("[metrics]\ntenant_labels = {{ allow = [\"t7\"], top = 3 }}\n\n{tenants}");
    let template = config(&echo, "kind = \"embedded\"\npath = \"{DIR}/tollgate.db\"", "", &tail);
    let gw = Gateway::start(&template);
    let addr = gw.addr;
    let handles: Vec<_> = (0..8)
        .map(|w| {
            std::thread::spawn(move || {
                let mut conn = Conn::open(addr).expect("connect");
                for i in (w..n).step_by(8) {
                    let auth = bearer(&format!("tg_live_tenant{i}_cardinalityXXXXXXXXXXXXX"));
                    let r = conn.request("GET", "/a", &[("authorization", &auth)], b"").expect("request");
                    assert_eq!(r.status, 200);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("worker");
    }
    // A few tenants get more traffic, so the top 3 are known.
    for i in [1, 2, 3] {
        traffic_for(&gw, i, 5);
    }
    std::thread::sleep(Duration::from_millis(400));
    traffic_for(&gw, 1, 1);
    let text = get(gw.admin, "/metrics", &[]).expect("metrics").text();
    let series: Vec<&str> = text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).collect();
    assert!(series.len() < 400, "{} series with {n} tenants", series.len());
    let tenant_series: Vec<&&str> =
        series.iter().filter(|l| l.starts_with("tollgate_tenant_requests_total{")).collect();
    assert!(!tenant_series.is_empty() && tenant_series.len() <= 4 * 5, "{tenant_series:?}");
    assert!(
        tenant_series.iter().all(|l| ["t1\"", "t2\"", "t3\"", "t7\""].iter().any(|t| l.contains(t))),
        "{tenant_series:?}"
    );
    for name in [
        "tollgate_requests_total{",
        "tollgate_request_duration_seconds_bucket{",
        "tollgate_upstream_duration_seconds_bucket{",
        "tollgate_bytes_total{direction=\"out\"}",
        "tollgate_usage_units_total{",
        "tollgate_tenants 10001",
        "tollgate_build_info{",
    ] {
        assert!(text.contains(name), "missing {name}");
    }
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

fn traffic_for(gw: &Gateway, i: usize, times: usize) {
    let auth = bearer(&format!("tg_live_tenant{i}_cardinalityXXXXXXXXXXXXX"));
    for _ in 0..times {
        assert_eq!(gw.get("/a", &[("authorization", &auth)]).status, 200);
    }
}

/// Deliveries a receiver saw: headers and body of each.
type Deliveries = Arc<Mutex<Vec<(Vec<(String, String)>, Vec<u8>)>>>;

/// A webhook receiver that refuses the first `fail_first` deliveries with 500.
fn receiver(fail_first: usize) -> (std::net::SocketAddr, Deliveries) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let got = Arc::new(Mutex::new(Vec::new()));
    let store = got.clone();
    std::thread::spawn(move || {
        let mut seen = 0;
        for stream in listener.incoming().flatten() {
            let mut r = BufReader::new(stream);
            let mut headers = Vec::new();
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = h.trim().split_once(':') {
                    headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                }
            }
            let len: usize =
                headers.iter().find(|(k, _)| k == "content-length").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
            let mut body = vec![0u8; len];
            let _ = r.read_exact(&mut body);
            seen += 1;
            let status = if seen <= fail_first { "500 Nope" } else { "200 OK" };
            let _ = r.get_mut().write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes());
            store.lock().unwrap_or_else(|p| p.into_inner()).push((headers, body));
        }
    });
    (addr, got)
}

#[test]
fn quota_warnings_fire_once_per_crossing_with_a_signed_retried_webhook() {
    let echo = Echo::start();
    let (addr, got) = receiver(1);
    let secret = "webhook-secret-0123456789";
    let tail =
        format!("[metering.webhook]\nurl = \"http://{addr}/hooks/quota\"\nsecret = \"{secret}\"\nmax_attempts = 3\n");
    let tier = "quotas.requests = { limit = 10, period = \"month\" }\nwarn_at = [50, 80]";
    let gw = Gateway::start(&config(&echo, "kind = \"embedded\"\npath = \"{DIR}/tollgate.db\"", tier, &tail));
    let auth = bearer(ACME_KEY);
    let mut warnings = Vec::new();
    for _ in 0..9 {
        let r = gw.get("/a", &[("authorization", &auth)]);
        assert_eq!(r.status, 200);
        warnings.push(r.header("x-quota-warning").map(str::to_string));
    }
    assert_eq!(warnings[3], None);
    assert_eq!(warnings[4].as_deref(), Some("requests=50%"));
    assert_eq!(warnings[8].as_deref(), Some("requests=90%"));
    // Two crossings (50%, 80%): two deliveries, the first after one refused attempt.
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.lock().unwrap_or_else(|p| p.into_inner()).len() < 3 {
        assert!(Instant::now() < deadline, "webhooks not delivered");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let got = got.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(got.len(), 3, "one retry, then one delivery per crossing");
    let mut thresholds = Vec::new();
    for (headers, body) in &got {
        let h = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone()).unwrap_or_default();
        let ts: i64 = h("x-tollgate-timestamp").parse().expect("timestamp");
        assert_eq!(h("x-tollgate-signature"), tollgate::metering::webhook::sign(secret, ts, body), "signature");
        let v: serde_json::Value = serde_json::from_slice(body).expect("json");
        assert_eq!(
            (v["tenant"].as_str(), v["metric"].as_str(), v["limit"].as_u64()),
            (Some("acme"), Some("requests"), Some(10))
        );
        assert!(v["reset_at"].as_str().is_some());
        thresholds.push(v["threshold"].as_u64().unwrap_or(0));
    }
    assert_eq!(thresholds, vec![50, 50, 80]);
    let metrics = get(gw.admin, "/metrics", &[]).expect("metrics").text();
    assert!(
        metrics.contains("tollgate_quota_warnings_total{metric=\"requests\",threshold=\"50\",tier=\"basic\"} 1"),
        "{metrics}"
    );
}

#[test]
fn a_request_that_never_reached_its_upstream_costs_the_tenant_nothing() {
    let echo = Echo::start();
    let dir = temp_dir("meter-dead");
    // A pool nobody listens on, and a charged route to it.
    let tail = format!(
        r#"[upstreams.dead]
servers = ["127.0.0.1:{}"]
connect_timeout = "500ms"

[[rule]]
name = "to-dead"
match = {{ path_prefix = "/dead/" }}
upstream = "dead"
charge = {{ metric = "records", cost_from_query = "n" }}
"#,
        free_port()
    );
    let tier =
        "quotas.requests = { limit = 3, period = \"month\" }\nquotas.records = { limit = 100, period = \"month\" }";
    let template = config(&echo, "kind = \"embedded\"\npath = \"{DIR}/tollgate.db\"", tier, &tail);
    let mut gw = Gateway::start_in(dir.clone(), &template, &[]);
    let auth = bearer(ACME_KEY);
    // More dead requests than the `requests` quota holds: each one's units are given back, so
    // none is refused by the quota.
    for i in 0..5 {
        let r = gw.get("/dead/x?n=40", &[("authorization", &auth)]);
        assert_eq!(
            (r.status, r.problem_code()),
            (502, "upstream_unavailable".to_string()),
            "request {i}: {}",
            r.text()
        );
    }
    let r = gw.get("/a", &[("authorization", &auth)]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-quota-remaining"), Some("2"), "only the request that reached its upstream spent quota");
    let r = gw.get("/gen?n=100", &[("authorization", &auth)]);
    assert_eq!(r.status, 200, "the records quota is whole: {}", r.text());
    stop(&mut gw);
    assert_eq!(echo.hits(), 2);
    let r = report(&dir.join("tollgate.toml"), &today(), &today());
    assert_eq!(total(&r, "requests"), 2, "the dead requests are not usage: {r}");
    assert_eq!(total(&r, "records"), 100, "nor are their charges: {r}");
    assert_eq!(total(&r, "status_5xx"), 0, "{r}");
    assert_eq!(total(&r, "rejected.upstream_unavailable"), 5, "they are metered apart: {r}");
}

/// A ledger that fails every batch of the tenants in `failing` (as a stalled Redis Cluster
/// master would) and records what it applied.
#[derive(Default)]
struct FlakyLedger {
    failing: Mutex<std::collections::HashSet<String>>,
    /// (tenant, seq, requests), in the order applied.
    applied: Mutex<Vec<(String, u64, u64)>>,
}

#[async_trait::async_trait]
impl tollgate::store::Ledger for FlakyLedger {
    async fn apply(&self, batches: &[tollgate::store::LedgerBatch]) -> Vec<Result<(), tollgate::store::StoreError>> {
        let failing = self.failing.lock().expect("failing").clone();
        batches
            .iter()
            .map(|b| {
                if failing.contains(&*b.tenant) {
                    return Err(tollgate::store::StoreError::Timeout);
                }
                let requests = b.rows.iter().find(|r| &*r.metric == "requests").map_or(0, |r| r.value);
                self.applied.lock().expect("applied").push((b.tenant.to_string(), b.seq, requests));
                Ok(())
            })
            .collect()
    }

    async fn rows(
        &self,
        _: &str,
        _: &str,
        _: &str,
    ) -> Result<Vec<tollgate::store::LedgerRow>, tollgate::store::StoreError> {
        Ok(Vec::new())
    }
}

/// A tenant whose ledger writes fail keeps its batches, in order, while the other tenants'
/// are written at every flush; once it recovers, its batches are applied oldest first, each
/// once. Past `max_buffered_batches` flushes, the oldest are dropped and counted.
#[test]
fn a_failing_tenant_does_not_hold_up_the_others() {
    use tollgate::metering::{Meter, Record};
    let mut diags = tollgate::config::Diagnostics::default();
    let cfg = tollgate::config::load_str(
        std::path::Path::new("meter.toml"),
        "[upstreams.u]\nservers = [\"127.0.0.1:9\"]\n[tiers.t]\nupstream = \"u\"\n[[tenants]]\nid = \"sick\"\ntier = \"t\"\n[[tenants]]\nid = \"well\"\ntier = \"t\"\n".into(),
        &mut diags,
    )
    .unwrap_or_else(|| panic!("{diags:?}"));
    let mut cfg = cfg;
    let dir = tollgate::directory::Directory::from_config(&mut cfg);
    let tenant = |id: &str| dir.tenant(id).expect("tenant").clone();
    let (sick, well) = (tenant("sick"), tenant("well"));
    let ledger = Arc::new(FlakyLedger::default());
    let metrics = Arc::new(tollgate::metrics::Metrics::new());
    let meter = Meter::new(ledger.clone(), metrics.clone(), 3, "gw".into(), Vec::new(), 0);
    let record = |t: &tollgate::directory::Tenant, n: usize| {
        for _ in 0..n {
            let r = Record {
                tenant: Some(t),
                rule: "-",
                decision: "forwarded",
                reason: None,
                status: 200,
                bytes_in: 0,
                bytes_out: 0,
                upstream: None,
                upstream_secs: None,
                total_secs: 0.0,
                charges: &[],
                model: None,
                admitted: true,
            };
            meter.record(&r, chrono::Utc::now().timestamp_millis());
        }
    };
    let applied = |tenant: &str| -> Vec<(u64, u64)> {
        ledger.applied.lock().expect("applied").iter().filter(|a| a.0 == tenant).map(|a| (a.1, a.2)).collect()
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");

    ledger.failing.lock().expect("failing").insert("sick".into());
    for round in 1..=2u64 {
        record(&sick, round as usize);
        record(&well, 10 * round as usize);
        rt.block_on(meter.flush());
        assert_eq!(applied("well").last(), Some(&(round, 10 * round)), "the healthy tenant is written every flush");
    }
    assert!(applied("sick").is_empty());
    assert_eq!(meter.buffered(), 2, "the failing tenant's two flushes wait");

    ledger.failing.lock().expect("failing").clear();
    rt.block_on(meter.flush());
    assert_eq!(applied("sick"), vec![(1, 1), (2, 2)], "oldest first, each once");
    assert_eq!(meter.buffered(), 0);
    rt.block_on(meter.flush());
    assert_eq!(applied("sick").len(), 2, "nothing is replayed once written");

    // Four flushes wait with room for three: the oldest is dropped and counted.
    ledger.failing.lock().expect("failing").insert("sick".into());
    for n in 1..=4 {
        record(&sick, n);
        rt.block_on(meter.flush());
    }
    assert_eq!(meter.buffered(), 3);
    assert_eq!(metrics.ledger_dropped.get(), 1);
    ledger.failing.lock().expect("failing").clear();
    rt.block_on(meter.flush());
    assert_eq!(applied("sick")[2..], [(4, 2), (5, 3), (6, 4)], "the three newest flushes, in order");
}
