//! Metering generation APIs as they answer: the `openai-compatible` pack in front of an
//! OpenAI-compatible upstream (tests/common/llm.rs). Charges settle from JSON bodies and from
//! stream usage events, estimates come from `max_tokens`, stream usage is asked for and taken
//! out again, several metrics and per-model prices come from one answer, a hard token quota
//! holds across three instances on Redis, and refusals take OpenAI's error shape.

mod common;
use common::llm::Llm;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

const PACK: &str = include_str!("../lua-free-rules/openai-compatible.toml");

/// A gateway on the pack. `tier` is the body of `[tiers.pro]` after its upstream.
fn config(llm: &Llm, store: &str, tier: &str, tail: &str) -> String {
    format!(
        r#"include = ["lua-free-rules/openai-compatible.toml"]

{SERVER_TABLE}
[store]
{store}

[metering]
flush_interval = "100ms"

[upstreams.default]
servers = ["{llm}"]
read_timeout = "5s"

[tiers.pro]
upstream = "default"
{tier}

[[tenants]]
id = "acme"
tier = "pro"

[[tenants.keys]]
id = "acme-main"
hash = "{hash}"
scopes = ["read", "generate"]

{tail}
"#,
        llm = llm.addr,
        hash = hash_of(ACME_KEY),
    )
}

fn start(llm: &Llm, tier: &str, tail: &str) -> Gateway {
    let cfg = config(llm, "kind = \"embedded\"\npath = \"{DIR}/tollgate.db\"", tier, tail);
    Gateway::start_in(temp_dir("llm"), &cfg, &[("lua-free-rules/openai-compatible.toml", PACK)])
}

fn post(gw: &Gateway, path: &str, extra: &[(&str, &str)], body: &serde_json::Value) -> Resp {
    let auth = bearer(ACME_KEY);
    let mut headers = vec![("authorization", auth.as_str()), ("content-type", "application/json")];
    headers.extend_from_slice(extra);
    gw.request("POST", path, &headers, body.to_string().as_bytes())
}

/// The tenant's current use of a quota, from the self-service API.
fn used(gw: &Gateway, metric: &str) -> u64 {
    let r = gw.get("/_tollgate/usage", &[("authorization", &bearer(ACME_KEY))]);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let list = v["quotas"].as_array().or_else(|| v.as_array()).cloned().unwrap_or_default();
    list.iter().find(|q| q["metric"] == metric).and_then(|q| q["used"].as_u64()).unwrap_or_else(|| panic!("{v}"))
}

/// The JSON usage report of today, once the ledger shows `metric` at `at_least`.
fn report_when(gw: &Gateway, metric: &str, at_least: u64) -> serde_json::Value {
    let day = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new(bin())
            .args(["usage", "report", "-c"])
            .arg(&gw.config_path)
            .args(["--tenant", "acme", "--from", &day, "--to", &day, "--format", "json"])
            .output()
            .expect("usage report");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        if total(&v, metric) >= at_least || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn total(report: &serde_json::Value, metric: &str) -> u64 {
    report["totals"]
        .as_array()
        .and_then(|t| t.iter().find(|x| x["metric"] == metric))
        .and_then(|x| x["value"].as_u64())
        .unwrap_or(0)
}

/// A streamed answer: status, headers, and each event with the time it arrived.
type Streamed = (u16, Vec<(String, String)>, Vec<(Duration, String)>);

/// Reads a streamed answer event by event.
fn stream(gw: &Gateway, path: &str, extra: &[(&str, &str)], body: &serde_json::Value) -> Streamed {
    let auth = bearer(ACME_KEY);
    let mut headers = vec![("authorization", auth.as_str()), ("content-type", "application/json")];
    headers.extend_from_slice(extra);
    let mut c = Conn::open(gw.addr).expect("connect");
    let t0 = Instant::now();
    c.send_raw(&build_request("POST", path, &headers, body.to_string().as_bytes())).expect("send");
    let (status, head) = c.read_head().expect("head");
    let mut events = Vec::new();
    let mut pending = String::new();
    while let Ok(Some(chunk)) = c.read_chunk() {
        pending.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(i) = pending.find("\n\n") {
            let event: String = pending.drain(..i + 2).collect();
            events.push((t0.elapsed(), event));
        }
    }
    (status, head, events)
}

fn metric_value(gw: &Gateway, name: &str, labels: &str) -> u64 {
    let r = request(gw.admin, "GET", "/metrics", &[], b"").expect("metrics");
    r.text()
        .lines()
        .find(|l| l.starts_with(name) && labels.split(',').all(|p| l.contains(p)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

#[test]
fn a_json_answer_settles_every_charge_from_its_usage_block() {
    let llm = Llm::start();
    let gw = start(&llm, "quotas.tokens = { limit = 100000, period = \"month\" }\nquotas.output_tokens = { limit = 100000, period = \"month\" }", "");
    let body =
        serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50});
    let r = post(&gw, "/v1/chat/completions", &[("x-test-usage", "30,70")], &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["total_tokens"], 100, "the body reaches the client unchanged");
    // The estimate (max_tokens = 50) was replaced by the answer's total (100).
    assert_eq!(used(&gw, "tokens"), 100);
    assert_eq!(used(&gw, "output_tokens"), 70);
    let rep = report_when(&gw, "output_tokens", 70);
    assert_eq!(
        (total(&rep, "tokens"), total(&rep, "input_tokens"), total(&rep, "output_tokens")),
        (100, 30, 70),
        "{rep}"
    );
    // The embeddings route settles from its own usage shape.
    let r = post(&gw, "/v1/embeddings", &[("x-test-usage", "17,0")], &serde_json::json!({"model": "e", "input": "x"}));
    assert_eq!(r.status, 200);
    assert_eq!(used(&gw, "tokens"), 117);
}

#[test]
fn an_estimate_from_max_tokens_is_reserved_and_the_settlement_replaces_it() {
    let llm = Llm::start();
    let gw = start(&llm, "quotas.tokens = { limit = 1000, period = \"month\" }", "");
    let body = |max: u64| serde_json::json!({"model": "m", "messages": [], "max_tokens": max});
    // The answer's headers are written before its body settles: they show the estimate.
    let r = post(&gw, "/v1/chat/completions", &[("x-test-usage", "5,5")], &body(400));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("1000"));
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("600"), "{:?}", r.headers);
    assert_eq!(used(&gw, "tokens"), 10, "the settlement replaced the estimate");
    // An estimate over what is left is refused before anything is forwarded.
    let before = llm.count();
    let r = post(&gw, "/v1/chat/completions", &[], &body(995));
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(llm.count(), before);
    // So is one whose `max_completion_tokens` (the newer spelling) is over what is left, even
    // beside a small `max_tokens`.
    let newer = serde_json::json!({"model": "m", "messages": [], "max_tokens": 1, "max_completion_tokens": 995});
    let r = post(&gw, "/v1/chat/completions", &[], &newer);
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(llm.count(), before);
    // A completion reserves `max_tokens` times the larger of `n` and `best_of` (the upstream
    // generates `best_of` completions to return `n`).
    let best_of = serde_json::json!({"model": "m", "prompt": "x", "max_tokens": 10, "n": 2, "best_of": 20});
    let r = post(&gw, "/v1/completions", &[("x-test-usage", "5,5")], &best_of);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("790"), "{:?}", r.headers);
    assert_eq!(used(&gw, "tokens"), 20);
    // A request without max_tokens reserves the pack's default (1024 > 980 left): refused.
    let r = post(&gw, "/v1/chat/completions", &[], &serde_json::json!({"model": "m", "messages": []}));
    assert_eq!(r.status, 429);
    // A cost that is not a count is a client error.
    let auth = bearer(ACME_KEY);
    for bad in ["\"12\"", "-3", "true", "{}"] {
        let raw = format!("{{\"model\":\"m\",\"max_tokens\":{bad}}}");
        let r = gw.request("POST", "/v1/chat/completions", &[("authorization", &auth)], raw.as_bytes());
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "invalid_cost");
    }
}

#[test]
fn a_stream_settles_from_its_usage_event_which_the_client_only_sees_when_it_asked() {
    let llm = Llm::start();
    let gw = start(&llm, "quotas.tokens = { limit = 100000, period = \"month\" }", "");
    let body = serde_json::json!({"model": "m", "messages": [], "stream": true, "max_tokens": 10});
    let (status, head, events) = stream(&gw, "/v1/chat/completions", &[("x-test-usage", "40,60")], &body);
    assert_eq!(status, 200);
    assert!(head.iter().any(|(k, v)| k == "content-type" && v.starts_with("text/event-stream")));
    // The upstream was asked for usage ...
    let sent = llm.bodies().pop().expect("forwarded");
    assert_eq!(sent["stream_options"]["include_usage"], true, "{sent}");
    assert_eq!(sent["messages"], serde_json::json!([]), "the rest of the body is the client's");
    // ... and the client, who did not ask, does not see the usage event.
    let texts: Vec<&str> = events.iter().map(|(_, e)| e.as_str()).collect();
    assert_eq!(texts.len(), 6, "{texts:?}");
    assert!(texts.iter().all(|e| !e.contains("total_tokens")), "{texts:?}");
    assert_eq!(texts[5], "data: [DONE]\n\n");
    assert_eq!(used(&gw, "tokens"), 100);

    // A client that asks for usage gets the event, unchanged.
    let body =
        serde_json::json!({"model": "m", "stream": true, "max_tokens": 10, "stream_options": {"include_usage": true}});
    let (_, _, events) = stream(&gw, "/v1/chat/completions", &[("x-test-usage", "1,2")], &body);
    assert_eq!(events.len(), 7);
    assert!(events[5].1.contains("\"total_tokens\":3"), "{:?}", events[5]);
    assert_eq!(used(&gw, "tokens"), 103);

    // `stream_options` without include_usage is completed, not duplicated.
    let body = serde_json::json!({"model": "m", "stream": true, "max_tokens": 10, "stream_options": {"x": 1}});
    let (_, _, events) = stream(&gw, "/v1/chat/completions", &[("x-test-usage", "2,2")], &body);
    let sent = llm.bodies().pop().expect("forwarded");
    assert_eq!(sent["stream_options"], serde_json::json!({"x": 1, "include_usage": true}));
    assert_eq!(events.len(), 6);
    assert_eq!(used(&gw, "tokens"), 107);

    // A non-streaming request is forwarded byte for byte.
    let raw = br#"{"model":"m","stream":false,"max_tokens":3}"#;
    let auth = bearer(ACME_KEY);
    let r = gw.request("POST", "/v1/chat/completions", &[("authorization", &auth)], raw);
    assert_eq!(r.status, 200);
    let reqs = llm.state.requests.lock().unwrap_or_else(|p| p.into_inner());
    assert_eq!(reqs.last().map(|r| r.2.as_slice()), Some(&raw[..]));
}

#[test]
fn the_responses_api_settles_from_its_completed_event() {
    let llm = Llm::start();
    let gw = start(&llm, "quotas.tokens = { limit = 100000, period = \"month\" }", "");
    let body = serde_json::json!({"model": "m", "input": "hi", "stream": true, "max_output_tokens": 5});
    let (status, _, events) = stream(&gw, "/v1/responses", &[("x-test-usage", "11,22")], &body);
    assert_eq!(status, 200);
    assert!(events.last().is_some_and(|(_, e)| e.contains("response.completed")), "the client asked nothing away");
    assert_eq!(used(&gw, "tokens"), 33);
    assert_eq!(used(&gw, "tokens"), 33);
    let r = post(&gw, "/v1/responses", &[("x-test-usage", "1,1")], &serde_json::json!({"model": "m", "input": "x"}));
    assert_eq!(r.status, 200);
    assert_eq!(used(&gw, "tokens"), 35);
}

#[test]
fn an_answer_that_never_settles_keeps_the_estimate_and_is_counted() {
    let llm = Llm::start();
    let gw = start(&llm, "quotas.tokens = { limit = 100000, period = \"month\" }", "");
    // A JSON answer without usage.
    let r = post(
        &gw,
        "/v1/chat/completions",
        &[("x-test-no-usage", "1")],
        &serde_json::json!({"model": "m", "max_tokens": 40}),
    );
    assert_eq!(r.status, 200);
    assert_eq!(used(&gw, "tokens"), 40);
    assert_eq!(metric_value(&gw, "tollgate_charges_unsettled_total", "metric=\"tokens\",reason=\"missing\""), 1);
    // A stream cut short before its usage event.
    let body = serde_json::json!({"model": "m", "stream": true, "max_tokens": 25});
    let _ = stream(&gw, "/v1/chat/completions", &[("x-test-break", "1")], &body);
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric_value(&gw, "tollgate_charges_unsettled_total", "metric=\"tokens\",reason=\"broken\"") == 0
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(metric_value(&gw, "tollgate_charges_unsettled_total", "metric=\"tokens\",reason=\"broken\""), 1);
    assert_eq!(used(&gw, "tokens"), 65);
}

#[test]
fn streams_reach_the_client_at_the_upstreams_pace_with_metering_on_or_off() {
    let llm = Llm::start();
    // The same upstream behind a rule that meters nothing.
    let tail = "[[rule]]\nname = \"plain\"\nmatch = { path = \"/plain/v1/chat/completions\" }\nrequire_scopes = [\"generate\"]\n";
    let gw = start(&llm, "", tail);
    let body = serde_json::json!({"model": "m", "stream": true, "max_tokens": 10});
    let pace = [("x-test-chunks", "5"), ("x-test-delay-ms", "150"), ("x-test-pad", "20000")];
    for path in ["/v1/chat/completions", "/plain/v1/chat/completions"] {
        let (status, _, events) = stream(&gw, path, &pace, &body);
        assert_eq!(status, 200);
        let content: Vec<Duration> = events.iter().filter(|(_, e)| e.contains("tok")).map(|(t, _)| *t).collect();
        assert_eq!(content.len(), 5, "{path}");
        // Each 20 KB event arrives as it is produced: well before the next one is.
        assert!(content[0] < Duration::from_millis(120), "{path}: first event after {:?}", content[0]);
        for w in content.windows(2) {
            assert!(w[1] - w[0] > Duration::from_millis(90), "{path}: events bunched: {content:?}");
        }
    }
}

#[test]
fn reports_break_usage_down_by_model_with_per_model_prices() {
    let llm = Llm::start();
    let tier = "price.output_tokens = { \"gpt-4o\" = 0.01, default = 0.001 }\nprice.tokens = 0.0001";
    let gw = start(&llm, tier, "");
    for (model, usage) in [("gpt-4o", "10,100"), ("mini", "10,200"), ("gpt-4o", "0,50")] {
        let r = post(
            &gw,
            "/v1/chat/completions",
            &[("x-test-usage", usage)],
            &serde_json::json!({"model": model, "max_tokens": 1}),
        );
        assert_eq!(r.status, 200);
    }
    // A model name a client made up to grow the ledger is not a dimension.
    let r = post(
        &gw,
        "/v1/chat/completions",
        &[("x-test-usage", "0,7")],
        &serde_json::json!({"model": "a b<script>", "max_tokens": 1}),
    );
    assert_eq!(r.status, 200);
    let rep = report_when(&gw, "output_tokens", 357);
    let out = rep["totals"]
        .as_array()
        .and_then(|t| t.iter().find(|x| x["metric"] == "output_tokens"))
        .cloned()
        .expect("output_tokens");
    assert_eq!(out["value"], 357, "{rep}");
    // 150 × 0.01 + 200 × 0.001 + 7 × 0.001
    assert!((out["cost"].as_f64().unwrap_or(0.0) - 1.707).abs() < 1e-9, "{out}");
    let by: Vec<(String, u64, f64)> = out["by_model"]
        .as_array()
        .expect("by_model")
        .iter()
        .map(|m| {
            (
                m["model"].as_str().unwrap_or("").to_string(),
                m["value"].as_u64().unwrap_or(0),
                m["cost"].as_f64().unwrap_or(0.0),
            )
        })
        .collect();
    assert_eq!(by, vec![("mini".to_string(), 200, 0.2), ("gpt-4o".to_string(), 150, 1.5)], "{out}");
    // The grand total counts each unit once.
    let tokens_cost = total(&rep, "tokens") as f64 * 0.0001;
    assert!((rep["total_cost"].as_f64().unwrap_or(0.0) - (1.707 + tokens_cost)).abs() < 1e-9, "{rep}");
}

#[test]
fn refusals_on_the_pack_take_the_openai_error_shape_and_headers() {
    let llm = Llm::start();
    let tail = "[tiers.pro.rate]\nrequests_per_minute = 100\n";
    let gw = start(&llm, "quotas.tokens = { limit = 50, period = \"month\" }", tail);
    // No key: 401 before any rule is matched, still in OpenAI's shape on the pack's paths.
    let r = gw.request("POST", "/v1/chat/completions", &[], b"{}");
    assert_eq!(r.status, 401);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["error"]["code"], "missing_key");
    assert_eq!(v["error"]["type"], "authentication_error");
    assert!(v["error"]["message"].as_str().is_some_and(|m| m.len() > 10), "{v}");
    // Over the quota: 429 insufficient_quota with OpenAI's rate-limit headers.
    let r = post(&gw, "/v1/chat/completions", &[], &serde_json::json!({"model": "m", "max_tokens": 60}));
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["type"], "insufficient_quota");
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("50"));
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("100"));
    assert!(r.header("retry-after").is_some());
    // Elsewhere, problem+json stays the default.
    let r = gw.request("GET", "/elsewhere", &[], b"");
    assert_eq!(r.problem_code(), "missing_key");
}

#[test]
fn a_large_request_body_read_for_its_estimate_reaches_the_upstream_whole() {
    let llm = Llm::start();
    let gw = start(&llm, "quotas.tokens = { limit = 100000, period = \"month\" }", "");
    let long = "y".repeat(300 * 1024);
    for stream in [false, true] {
        let body = serde_json::json!({"messages": [{"role": "user", "content": long}], "model": "m", "max_tokens": 7, "stream": stream});
        let auth = bearer(ACME_KEY);
        let r = gw.request("POST", "/v1/chat/completions", &[("authorization", &auth)], body.to_string().as_bytes());
        assert_eq!(r.status, 200, "{}", r.text());
        let sent = llm.bodies().pop().expect("forwarded");
        assert_eq!(sent["messages"][0]["content"].as_str().map(str::len), Some(long.len()));
        assert_eq!(sent["stream_options"]["include_usage"].as_bool(), stream.then_some(true));
        let len: usize = llm.last_header("content-length").and_then(|v| v.parse().ok()).expect("content-length");
        let reqs = llm.state.requests.lock().unwrap_or_else(|p| p.into_inner());
        assert_eq!(reqs.last().map(|r| r.2.len()), Some(len));
    }
    // Over max_body (4 MiB): refused, nothing forwarded.
    let before = llm.count();
    // (The answer comes before the body is sent: only the head goes out.)
    let auth = bearer(ACME_KEY);
    let length = (5 * 1024 * 1024).to_string();
    let head = [("authorization", auth.as_str()), ("content-length", length.as_str())];
    let mut c = Conn::open(gw.addr).expect("connect");
    c.send_raw(&build_request("POST", "/v1/chat/completions", &head, b"")).expect("send");
    let r = c.read_response(false).expect("answer");
    assert_eq!(r.status, 413);
    assert_eq!(llm.count(), before);
}

#[test]
fn a_hard_token_quota_holds_across_three_instances_on_redis() {
    let llm = Llm::start();
    let redis = Redis::start();
    let store = format!("kind = \"redis\"\nurl = \"{}\"", redis.url());
    const LIMIT: u64 = 2_000;
    let tier = format!("quotas.tokens = {{ limit = {LIMIT}, period = \"month\" }}");
    let gws: Vec<Gateway> = (0..3)
        .map(|_| {
            Gateway::start_in(
                temp_dir("llm-fleet"),
                &config(&llm, &store, &tier, ""),
                &[("lua-free-rules/openai-compatible.toml", PACK)],
            )
        })
        .collect();
    // Each request reserves 10 (max_tokens) and settles 50: 40 more than reserved.
    const OVER: u64 = 40;
    let admitted = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for gw in &gws {
            let admitted = &admitted;
            s.spawn(move || {
                for _ in 0..40 {
                    let r = post(
                        gw,
                        "/v1/chat/completions",
                        &[("x-test-usage", "20,30")],
                        &serde_json::json!({"model": "m", "max_tokens": 10}),
                    );
                    match r.status {
                        200 => {
                            admitted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        429 => break,
                        s => panic!("status {s}: {}", r.text()),
                    }
                }
            });
        }
    });
    let admitted = admitted.into_inner();
    let charged = admitted * 50;
    // Three clients, one request in flight each: at most 3 settlements land after the counter
    // reached the limit, each at most OVER beyond its reservation.
    assert!(charged <= LIMIT + 3 * OVER + 50, "charged {charged} for a limit of {LIMIT}");
    assert!(charged >= LIMIT - 50, "the quota was used up: {charged}");
    // The request after exhaustion is refused on every instance.
    for gw in &gws {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let r = post(gw, "/v1/chat/completions", &[], &serde_json::json!({"model": "m", "max_tokens": 1}));
            if r.status == 429 {
                assert_eq!(r.json()["error"]["code"], "quota_exceeded");
                break;
            }
            assert!(Instant::now() < deadline, "instance still admits after exhaustion");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn an_async_rule_that_reads_its_estimate_from_the_body_stores_that_body_whole() {
    let llm = Llm::start();
    let tail = r#"[[rule]]
name = "batch"
match = { path = "/batch/v1/chat/completions", methods = ["POST"] }
require_scopes = ["generate"]
mode = "async"
max_body = "1MiB"
charge = { metric = "tokens", cost_from_body = "max_tokens", settle_from_header = "x-usage-total-tokens" }
"#;
    let gw = start(&llm, "quotas.tokens = { limit = 100000, period = \"month\" }", tail);
    let long = "z".repeat(200 * 1024);
    let body = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": long}], "max_tokens": 77});
    let r = post(&gw, "/batch/v1/chat/completions", &[], &body);
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(used(&gw, "tokens"), 77, "the estimate from the body is reserved at submission");
    let id = r.json()["id"].as_str().expect("id").to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = gw.get(&format!("/_tollgate/jobs/{id}"), &[("authorization", &bearer(ACME_KEY))]);
        if s.json()["status"] == "completed" {
            break;
        }
        assert!(Instant::now() < deadline, "job not completed: {}", s.text());
        std::thread::sleep(Duration::from_millis(100));
    }
    let sent = llm.bodies().pop().expect("the job ran");
    assert_eq!(sent["messages"][0]["content"].as_str().map(str::len), Some(long.len()));
    let len: usize = llm.last_header("content-length").and_then(|v| v.parse().ok()).expect("content-length");
    let reqs = llm.state.requests.lock().unwrap_or_else(|p| p.into_inner());
    assert_eq!(reqs.last().map(|r| r.2.len()), Some(len));
}

/// A body that names its model twice is metered under neither name: JSON parsers disagree on
/// which one counts (most, the upstream's included, take the last), so the first would let a
/// client name a cheap model for the gateway and an expensive one for the upstream. The
/// charge is priced at the metric's `default`.
#[test]
fn a_model_named_twice_in_a_streamed_body_is_not_a_price_the_client_picks() {
    let llm = Llm::start();
    let gw = start(&llm, "price.input_tokens = { \"cheap\" = 0.0001, default = 0.01 }", "");
    let auth = bearer(ACME_KEY);
    let headers = [("authorization", auth.as_str()), ("content-type", "application/json"), ("x-test-usage", "100,0")];
    let r = gw.request("POST", "/v1/embeddings", &headers, br#"{"model":"cheap","input":"x","model":"big"}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(llm.bodies().pop().unwrap_or_default()["model"], "big", "the upstream reads the last");
    let rep = report_when(&gw, "input_tokens", 100);
    let input = rep["totals"]
        .as_array()
        .and_then(|t| t.iter().find(|x| x["metric"] == "input_tokens"))
        .cloned()
        .expect("input_tokens");
    assert!((input["cost"].as_f64().unwrap_or(0.0) - 1.0).abs() < 1e-9, "{input}");
    let cheap = input["by_model"].as_array().into_iter().flatten().any(|m| m["model"] == "cheap");
    assert!(!cheap, "{input}");
}

/// A charge reserved at 0 and settled from the answer (`input_tokens` on the pack) still meets
/// its hard quota: once the settlements used it up, the next request is refused, though its
/// estimate is 0.
#[test]
fn a_hard_quota_on_a_charge_estimated_at_zero_refuses_once_settlements_use_it_up() {
    let llm = Llm::start();
    let gw = start(&llm, "quotas.input_tokens = { limit = 10, period = \"month\" }", "");
    let ask = || {
        post(
            &gw,
            "/v1/chat/completions",
            &[("x-test-usage", "9,1")],
            &serde_json::json!({"model": "m", "max_tokens": 1}),
        )
    };
    assert_eq!(ask().status, 200);
    assert_eq!(ask().status, 200, "9 of 10 used: admitted");
    let before = llm.count();
    let r = ask();
    assert_eq!(r.status, 429, "18 of 10 used: {}", r.text());
    assert_eq!(r.json()["error"]["code"], "quota_exceeded");
    assert_eq!(llm.count(), before, "not forwarded");
}

#[test]
fn answers_without_a_body_keep_the_estimate_as_missing_not_broken() {
    let llm = Llm::start();
    let tail = "[[rule]]\nname = \"plain\"\nmatch = { path = \"/v1/plain\" }\n\
                charge = { metric = \"tokens\", cost = 30, settle_from_body = \"usage.total_tokens\" }\n";
    let gw = start(&llm, "quotas.tokens = { limit = 100000, period = \"month\" }", tail);
    let auth = bearer(ACME_KEY);
    let a = [("authorization", auth.as_str())];
    // The control: a body with usage settles (9 + 12).
    assert_eq!(gw.request("GET", "/v1/plain", &a, b"").status, 200);
    assert_eq!(used(&gw, "tokens"), 21);
    for (method, status) in [("GET", "204"), ("GET", "304"), ("HEAD", "")] {
        let mut h = a.to_vec();
        if !status.is_empty() {
            h.push(("x-test-status", status));
        }
        let r = gw.request(method, "/v1/plain", &h, b"");
        assert!(r.body.is_empty(), "{method} {status}: {}", r.text());
    }
    assert_eq!(used(&gw, "tokens"), 21 + 3 * 30, "each keeps its estimate");
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric_value(&gw, "tollgate_charges_unsettled_total", "metric=\"tokens\",reason=\"missing\"") < 3 {
        assert!(Instant::now() < deadline, "{}", request(gw.admin, "GET", "/metrics", &[], b"").expect("m").text());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(metric_value(&gw, "tollgate_charges_unsettled_total", "metric=\"tokens\",reason=\"missing\""), 3);
    assert_eq!(metric_value(&gw, "tollgate_charges_unsettled_total", "metric=\"tokens\",reason=\"broken\""), 0);
}
