//! The gateway spine end to end: tenant resolution, authentication, header hygiene,
//! forwarding, streaming, upstream failures and the error model, through the real binary.

mod common;
use common::*;
use std::time::Duration;

const SPINE_RULES: &str = r#"
[[rule]]
name = "public-health"
match = { path = "/health" }
public = true

[[rule]]
name = "to-dead"
match = { path_prefix = "/dead/" }
upstream = "dead"

[[rule]]
name = "slow"
match = { path_prefix = "/slow/" }
timeout = "300ms"
"#;

fn gateway(echo: &Echo, tenancy: &str) -> Gateway {
    Gateway::start(&standard_config(echo.addr, Extra { tenancy, tail: SPINE_RULES, ..Extra::default() }))
}

#[test]
fn valid_key_forwards_with_identity_headers_and_without_the_key() {
    let echo = Echo::start();
    let gw = gateway(&echo, "");
    let auth = bearer(ACME_KEY);
    let r = gw.get(
        "/v1/things?x=1",
        &[
            ("authorization", &auth),
            ("x-tenant-id", "globex"),
            ("x-tenant-tier", "enterprise"),
            ("x-tenant-anything", "spoof"),
            ("x-key-id", "forged"),
            ("x-forwarded-for", "6.6.6.6"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let h = r.upstream_headers();
    assert_eq!(h["x-tenant-id"], "acme");
    assert_eq!(h["x-tenant-tier"], "pro");
    assert_eq!(h["x-key-id"], "acme-main");
    assert!(h.get("authorization").is_none(), "credential forwarded: {h}");
    assert!(h.get("x-tenant-anything").is_none(), "client X-Tenant-* forwarded: {h}");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "untrusted client XFF must be replaced");
    assert_eq!(h["x-forwarded-proto"], "http");
    let rid = h["x-request-id"].as_str().expect("request id");
    assert_eq!(rid.len(), 32);
    assert_eq!(r.header("x-request-id"), Some(rid));
    assert_eq!(r.json()["path"], "/v1/things");
    assert_eq!(r.json()["query"], "x=1");
    assert_eq!(echo.hits(), 1);
}

#[test]
fn x_api_key_header_works_and_is_stripped() {
    let echo = Echo::start();
    let gw = gateway(&echo, "");
    let r = gw.get("/v1/x", &[("x-api-key", ACME_KEY)]);
    assert_eq!(r.status, 200);
    let h = r.upstream_headers();
    assert_eq!(h["x-tenant-id"], "acme");
    assert!(h.get("x-api-key").is_none());
}

#[test]
fn authentication_outcomes_each_have_their_code() {
    let echo = Echo::start();
    let gw = gateway(&echo, "");
    let cases: &[(&str, u16, &str)] = &[
        (EXPIRED_KEY, 401, "key_expired"),
        (REVOKED_KEY, 401, "key_revoked"),
        (DORMANT_KEY, 403, "tenant_suspended"),
        (FORTRESS_KEY, 403, "ip_not_allowed"),
        ("tg_live_unknownZZZZZZZZZZZZZZZZZZZZZZZZZZZ", 401, "invalid_key"),
    ];
    for (key, status, code) in cases {
        let auth = bearer(key);
        let r = gw.get("/v1/x", &[("authorization", &auth)]);
        assert_eq!(r.status, *status, "{key}: {}", r.text());
        assert_eq!(r.problem_code(), *code);
        assert!(r.header("x-request-id").is_some());
    }
    let r = gw.get("/v1/x", &[]);
    assert_eq!(r.status, 401);
    assert_eq!(r.problem_code(), "missing_key");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    assert_eq!(echo.hits(), 0, "no rejected request may reach the upstream");
}

#[test]
fn malformed_credentials_are_401_never_500() {
    let echo = Echo::start();
    let gw = gateway(&echo, "");
    let cases: &[&[u8]] = &[
        b"Basic dXNlcjpwYXNz",
        b"Bearer",
        b"Bearer ",
        b"Bearer two words",
        b"Bearer caf\xc3\xa9",
        b"tg_live_no_scheme",
    ];
    for raw in cases {
        let mut req = b"GET /v1/x HTTP/1.1\r\nhost: localhost\r\nauthorization: ".to_vec();
        req.extend_from_slice(raw);
        req.extend_from_slice(b"\r\n\r\n");
        let mut c = Conn::open(gw.addr).expect("connect");
        c.send_raw(&req).expect("send");
        let r = c.read_response(false).expect("response");
        assert_eq!(r.status, 401, "{:?}: {}", String::from_utf8_lossy(raw), r.text());
        assert_eq!(r.problem_code(), "invalid_key");
    }
    let r = gw.get("/v1/x", &[("x-api-key", "")]);
    assert_eq!(r.status, 401);
}

#[test]
fn rejections_keep_the_connection_alive() {
    let echo = Echo::start();
    let gw = gateway(&echo, "");
    let mut c = Conn::open(gw.addr).expect("connect");
    let r = c.request("GET", "/v1/x", &[], b"").expect("first");
    assert_eq!(r.status, 401);
    let auth = bearer(ACME_KEY);
    let r = c.request("GET", "/v1/x", &[("authorization", &auth)], b"").expect("second on same connection");
    assert_eq!(r.status, 200);
}

#[test]
fn subdomain_resolution_ignores_case_and_port() {
    let echo = Echo::start();
    let gw = gateway(&echo, r#"resolve = ["api_key", "subdomain", "path"]"#);
    let auth = bearer(ACME_KEY);
    for host in ["acme.example.test", "ACME.Example.Test:8443", "acme-eu.example.test"] {
        let r = gw.get("/v1/x", &[("host", host), ("authorization", &auth)]);
        assert_eq!(r.status, 200, "{host}: {}", r.text());
        assert_eq!(r.upstream_headers()["x-tenant-id"], "acme");
    }
    let r = gw.get("/v1/x", &[("host", "globex.example.test"), ("authorization", &auth)]);
    assert_eq!(r.status, 403);
    assert_eq!(r.problem_code(), "tenant_mismatch");
    // A public route identifies the tenant from the subdomain alone.
    let r = gw.get("/health", &[("host", "globex.example.test")]);
    assert_eq!(r.status, 200);
    assert_eq!(r.upstream_headers()["x-tenant-id"], "globex");
    let r = gw.get("/health", &[("host", "nobody.example.test")]);
    assert_eq!(r.status, 404);
    assert_eq!(r.problem_code(), "unknown_tenant");
}

#[test]
fn path_prefix_names_the_tenant_and_is_stripped() {
    let echo = Echo::start();
    let gw = gateway(&echo, r#"resolve = ["api_key", "subdomain", "path"]"#);
    let auth = bearer(ACME_KEY);
    let r = gw.get("/t/acme/v1/items?page=2", &[("authorization", &auth)]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["path"], "/v1/items");
    assert_eq!(r.json()["query"], "page=2");
    let r = gw.get("/t/globex/v1/items", &[("authorization", &auth)]);
    assert_eq!(r.status, 403);
    assert_eq!(r.problem_code(), "tenant_mismatch");
    // Subdomain and path disagreeing is a mismatch even without a key.
    let r = gw.get("/t/globex/health", &[("host", "acme.example.test")]);
    assert_eq!(r.problem_code(), "tenant_mismatch");
}

#[test]
fn trusted_header_names_a_tenant_only_from_trusted_proxies() {
    let echo = Echo::start();
    let gw = gateway(
        &echo,
        r#"resolve = ["api_key", "header"]
tenant_header = "X-Customer"
trusted_proxies = ["10.0.0.0/8"]"#,
    );
    // 127.0.0.1 is not a trusted proxy: the header is ignored and stripped.
    let auth = bearer(ACME_KEY);
    let r = gw.get("/v1/x", &[("authorization", &auth), ("x-customer", "globex")]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.upstream_headers().get("x-customer").is_none());

    let gw2 = gateway(
        &echo,
        r#"resolve = ["api_key", "header"]
tenant_header = "X-Customer"
trusted_proxies = ["127.0.0.0/8"]"#,
    );
    let r = gw2.get("/v1/x", &[("authorization", &auth), ("x-customer", "globex")]);
    assert_eq!(r.status, 403);
    assert_eq!(r.problem_code(), "tenant_mismatch");
    let r = gw2.get("/health", &[("x-customer", "globex")]);
    assert_eq!(r.status, 200);
    assert_eq!(r.upstream_headers()["x-tenant-id"], "globex");
}

#[test]
fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let echo = Echo::start();
    let auth = bearer(FORTRESS_KEY);
    let untrusted = gateway(&echo, "");
    let r = untrusted.get("/v1/x", &[("authorization", &auth), ("x-forwarded-for", "10.1.2.3")]);
    assert_eq!(r.status, 403);
    assert_eq!(r.problem_code(), "ip_not_allowed");

    let trusted = gateway(&echo, r#"trusted_proxies = ["127.0.0.1/32"]"#);
    let r = trusted.get("/v1/x", &[("authorization", &auth), ("x-forwarded-for", "10.1.2.3")]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.upstream_headers()["x-forwarded-for"], "10.1.2.3, 127.0.0.1");
    let r = trusted.get("/v1/x", &[("authorization", &auth), ("x-forwarded-for", "192.0.2.9")]);
    assert_eq!(r.problem_code(), "ip_not_allowed");
}

#[test]
fn request_id_is_kept_when_valid_and_replaced_when_not() {
    let echo = Echo::start();
    let gw = gateway(&echo, "");
    let auth = bearer(ACME_KEY);
    let r = gw.get("/v1/x", &[("authorization", &auth), ("x-request-id", "abc-123.def")]);
    assert_eq!(r.upstream_headers()["x-request-id"], "abc-123.def");
    assert_eq!(r.header("x-request-id"), Some("abc-123.def"));
    let r = gw.get("/v1/x", &[("authorization", &auth), ("x-request-id", "bad id with spaces")]);
    let id = r.upstream_headers()["x-request-id"].as_str().unwrap_or_default().to_string();
    assert_ne!(id, "bad id with spaces");
    assert_eq!(id.len(), 32);
    // Rejections carry the request id in the problem body too.
    let r = gw.get("/v1/x", &[("x-request-id", "rid-77")]);
    assert_eq!(r.json()["request_id"], "rid-77");
}

#[test]
fn huge_and_duplicate_headers_are_refused() {
    let echo = Echo::start();
    let gw = gateway(&echo, "");
    let big = "a".repeat(20 * 1024);
    let auth = bearer(ACME_KEY);
    let r = gw.get("/v1/x", &[("authorization", &auth), ("x-big", &big)]);
    assert_eq!(r.status, 431);
    assert_eq!(r.problem_code(), "headers_too_large");
    let r = gw.get("/v1/x", &[("authorization", &auth), ("authorization", &auth)]);
    assert_eq!(r.status, 400);
    assert_eq!(r.problem_code(), "duplicate_header");
    let r = gw.get("/v1/x", &[("authorization", &auth), ("x-api-key", GLOBEX_KEY)]);
    assert_eq!(r.status, 400);
    assert_eq!(echo.hits(), 0);
}

#[test]
fn sse_streams_through_unbuffered() {
    let (echo, gate) = Echo::gated();
    let gw = gateway(&echo, "");
    let mut c = Conn::open(gw.addr).expect("connect");
    let auth = bearer(ACME_KEY);
    c.send_raw(&build_request("GET", "/events?sse=3", &[("authorization", &auth)], b"")).expect("send");
    let (status, headers) = c.read_head().expect("head");
    assert_eq!(status, 200);
    assert!(headers.iter().any(|(k, v)| k == "content-type" && v == "text/event-stream"));
    // The upstream holds events 2 and 3 until the gate opens: the first must arrive before.
    let first = c.read_chunk().expect("first chunk").expect("not the end");
    assert!(String::from_utf8_lossy(&first).contains("data: event 0"));
    let mut rest = String::new();
    gate.open();
    gate.open();
    while let Some(chunk) = c.read_chunk().expect("chunk") {
        rest.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(rest.contains("event 1") && rest.contains("event 2"), "{rest}");
}

#[test]
fn dead_upstream_is_502_and_slow_upstream_is_504() {
    let echo = Echo::start();
    let gw = gateway(&echo, "");
    let auth = bearer(ACME_KEY);
    let r = gw.get("/dead/x", &[("authorization", &auth)]);
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.problem_code(), "upstream_unavailable");
    let r = gw.get("/slow/x?delay_ms=1500", &[("authorization", &auth)]);
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.problem_code(), "upstream_timeout");
    let r = gw.get("/slow/x?delay_ms=10", &[("authorization", &auth)]);
    assert_eq!(r.status, 200);
}

#[test]
fn request_bodies_and_chunked_uploads_are_forwarded() {
    let echo = Echo::start();
    let gw = gateway(&echo, "");
    let auth = bearer(ACME_KEY);
    let r = gw.request("POST", "/v1/upload", &[("authorization", &auth)], &[b'x'; 5000]);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_bytes"], 5000);
    let r = gw.request(
        "POST",
        "/v1/upload",
        &[("authorization", &auth), ("transfer-encoding", "chunked")],
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["body_bytes"], 11);
}

#[test]
fn access_log_has_the_fields_and_never_the_key() {
    let echo = Echo::start();
    let gw = Gateway::start(&standard_config(
        echo.addr,
        Extra { tail: &format!("{SPINE_RULES}\n[log]\nformat = \"json\"\n"), ..Extra::default() },
    ));
    let auth = bearer(ACME_KEY);
    assert_eq!(gw.get("/v1/x", &[("authorization", &auth), ("x-request-id", "log-me-1")]).status, 200);
    assert_eq!(gw.get("/v1/x", &[("authorization", "Bearer tg_live_wrongwrongwrongwrongwrong00")]).status, 401);
    std::thread::sleep(Duration::from_millis(300));
    let log = gw.log();
    assert!(!log.contains(ACME_KEY), "the key leaked into the log");
    assert!(!log.contains("tg_live_wrongwrong"), "a presented key leaked into the log");
    let line = log.lines().find(|l| l.contains("log-me-1")).expect("access log line");
    let v: serde_json::Value = serde_json::from_str(line).expect("json log line");
    assert_eq!(v["tenant"], "acme");
    assert_eq!(v["key_id"], "acme-main");
    assert_eq!(v["decision"], "forwarded");
    assert_eq!(v["status"], 200);
    assert!(v["bytes_out"].as_u64().unwrap_or(0) > 0);
    assert!(v["total_ms"].as_f64().is_some());
    assert!(v["upstream_ms"].as_f64().is_some());
    assert!(log.lines().any(|l| l.contains("\"reason\":\"invalid_key\"")));
}

/// Key expiry pinned to the millisecond, in process on a manual clock (a running gateway's
/// clock cannot be moved).
mod expiry {
    use super::common::{hash_of, temp_dir};
    use pingora::http::RequestHeader;
    use std::sync::Arc;
    use tollgate::admin::core::{Actor, AdminCore, CreateKey, CreateTenant};
    use tollgate::clock::{Clock, ManualClock, SharedClock};
    use tollgate::directory::Directory;
    use tollgate::error::Reject;
    use tollgate::limits::Limits;
    use tollgate::metrics::Metrics;
    use tollgate::pipeline::authenticate::{authenticate, Principal};
    use tollgate::pipeline::canonical::{of_request, RequestPolicy};
    use tollgate::pipeline::resolve::resolve;
    use tollgate::runtime::{shared, Runtime};
    use tollgate::store::embedded::Embedded;
    use tollgate::store::{Counters, DirectoryStore, Ledger};

    const CONFIG_KEY: &str = "tg_live_expiresAt2030HHHHHHHHHHHHHHHHHHHHH";
    /// 2030-01-01T00:00:00Z, the config key's `expires`.
    const EXPIRES: i64 = 1_893_456_000_000;
    const DAY: i64 = 86_400_000;

    /// Authenticates a request carrying `secret` at `now`: the key id.
    fn key_at(rt: &Runtime, directory: &Directory, secret: &str, now: i64) -> Result<String, Reject> {
        let mut req = RequestHeader::build("GET", b"/x", None).expect("request header");
        req.insert_header("host", "localhost").expect("host");
        req.insert_header("authorization", format!("Bearer {secret}")).expect("authorization");
        let canon = of_request(&req, &RequestPolicy::of(&rt.config))?;
        let hints = resolve(&rt.config.tenancy, &canon, &req, Some([127, 0, 0, 1].into()))?;
        match authenticate(directory, &hints, now)? {
            Principal::Keyed { key } => Ok(key.id.to_string()),
            Principal::Anonymous { .. } | Principal::Token { .. } => panic!("a request with a key came out without it"),
        }
    }

    #[tokio::test]
    async fn a_key_works_until_it_expires_and_not_a_millisecond_longer() {
        let dir = temp_dir("key-expiry");
        let config_path = dir.join("tollgate.toml");
        let text = format!(
            r#"
[server]
listen = ["127.0.0.1:1"]

[store]
kind = "embedded"
path = "{}/tollgate.db"

[upstreams.default]
servers = ["127.0.0.1:9"]

[tiers.free]
upstream = "default"

[[tenants]]
id = "acme"
tier = "free"

[[tenants.keys]]
id = "acme-2029"
hash = "{}"
scopes = ["read"]
expires = 2030-01-01T00:00:00Z
"#,
            dir.display(),
            hash_of(CONFIG_KEY)
        );
        std::fs::write(&config_path, &text).expect("write config");
        let mut diags = tollgate::config::Diagnostics::default();
        let config =
            tollgate::config::load_str(&config_path, text, &mut diags).unwrap_or_else(|| panic!("config: {diags}"));

        let start = 1_750_000_000_000; // 2025-06-15T15:06:40Z
        let manual = ManualClock::new(start);
        let clock: SharedClock = manual.clone();
        let store = Arc::new(Embedded::open(&config.store.path, clock.now_millis()).expect("embedded store"));
        let limits = Limits::new(
            store.clone() as Arc<dyn Counters>,
            false,
            clock.clone(),
            tollgate::app::limit_settings(&config.store),
        );
        let core = AdminCore::new(
            shared(Runtime::new(config)),
            store.clone() as Arc<dyn DirectoryStore>,
            store.clone() as Arc<dyn Ledger>,
            limits,
            Arc::new(Metrics::new()),
            clock,
            config_path,
            dir.join("audit.log"),
        );

        // A key from the config file: `expires` is the first instant it is refused.
        {
            let rt = core.runtime.load();
            assert_eq!(key_at(&rt, &rt.directory, CONFIG_KEY, EXPIRES - DAY), Ok("acme-2029".into()));
            assert_eq!(key_at(&rt, &rt.directory, CONFIG_KEY, EXPIRES - 1), Ok("acme-2029".into()));
            assert_eq!(key_at(&rt, &rt.directory, CONFIG_KEY, EXPIRES), Err(Reject::KeyExpired));
            assert_eq!(key_at(&rt, &rt.directory, CONFIG_KEY, EXPIRES + 1), Err(Reject::KeyExpired));
        }

        // A key created through the API with `expires_in_days`: it expires that many days after
        // its creation, to the millisecond, on the gateway's clock.
        let actor = Actor { id: "admin:test".into(), request_id: "expiry-test".into() };
        let tenant: CreateTenant =
            serde_json::from_value(serde_json::json!({"id": "brief", "tier": "free"})).expect("tenant");
        core.create_tenant(&actor, tenant).await.expect("create tenant");
        let req: CreateKey =
            serde_json::from_value(serde_json::json!({"scopes": ["read"], "expires_in_days": 3})).expect("key");
        let (key, secret) = core.create_key(&actor, "brief", req).await.expect("create key");
        let at = |now: i64| {
            manual.set_millis(now);
            let rt = core.runtime.load();
            key_at(&rt, &rt.directory, &secret, manual.now_millis())
        };
        let status =
            || async { core.keys("brief").await.expect("keys").into_iter().find(|k| k.id == key.id).map(|k| k.status) };
        assert_eq!(at(start + 3 * DAY - 1), Ok(key.id.clone()), "the key failed before its expiry");
        assert_eq!(status().await, Some("active"));
        assert_eq!(at(start + 3 * DAY), Err(Reject::KeyExpired), "the key outlived its expiry");
        assert_eq!(status().await, Some("expired"));
        assert_eq!(at(start + 30 * DAY), Err(Reject::KeyExpired));
    }
}
