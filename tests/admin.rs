//! The admin API end to end, against the real binary: the bearer token guards `/v1` and only
//! `/v1`; tenants and keys created, changed, suspended, re-tiered, revoked, rotated and deleted
//! at runtime take effect on the data plane at once; tenants declared in the config file stay
//! read-only; bad input is refused with problem+json and changes nothing; runtime-managed
//! tenants and keys survive a restart (embedded SQLite) and reach a second instance within 1 s
//! (Redis); tenant self-service under `/_tollgate/` is confined to the caller's tenant and
//! scopes; every change is audited with its request id and never with a secret; reloads (HTTP
//! and SIGHUP) swap the config in, refuse an invalid one, and drop no request in flight. The
//! rotation grace period is checked in-process against an injected clock, without sleeping.

mod common;
use common::*;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ADMIN_TOKEN: &str = "tg_admin_suiteTokenHHHHHHHHHHHHHHHHHHHHHHHHHHHH";

const EMBEDDED: &str = "kind = \"embedded\"\npath = \"{DIR}/tollgate.db\"";

/// A config with three tiers (`free`: no limits, `pro`: a monthly request quota of 100,
/// `slow`: one request a minute), `extra_tiers` appended, and one config tenant, `acme`, on
/// `acme_tier` with [`ACME_KEY`] (scopes `read`, `admin`).
fn config(echo: SocketAddr, store: &str, extra_tiers: &str, acme_tier: &str) -> String {
    format!(
        r#"
[server]
listen = ["{{LISTEN}}"]
admin_listen = "{{ADMIN}}"
threads = 2
upgrade_sock = "{{DIR}}/upgrade.sock"
pid_file = "{{DIR}}/tollgate.pid"
shutdown_grace = "0s"
shutdown_timeout = "1s"

[store]
{store}

[admin]
token_hash = "{token}"
audit_log = "{{DIR}}/audit.log"

[upstreams.default]
servers = ["{echo}"]

[tiers.free]
upstream = "default"

[tiers.pro]
upstream = "default"
quotas.requests = {{ limit = 100, period = "month" }}

[tiers.slow]
upstream = "default"
rate = {{ requests_per_minute = 1 }}

{extra_tiers}

[[tenants]]
id = "acme"
tier = "{acme_tier}"

[[tenants.keys]]
id = "acme-main"
hash = "{acme}"
scopes = ["read", "admin"]
"#,
        token = hash_of(ADMIN_TOKEN),
        acme = hash_of(ACME_KEY),
    )
}

/// An admin API call with the right token; `extra` headers added.
fn admin_with(addr: SocketAddr, method: &str, path: &str, body: &str, extra: &[(&str, &str)]) -> Resp {
    let auth = bearer(ADMIN_TOKEN);
    let mut headers = vec![("authorization", auth.as_str())];
    if !body.is_empty() {
        headers.push(("content-type", "application/json"));
    }
    headers.extend_from_slice(extra);
    request(addr, method, path, &headers, body.as_bytes()).expect("admin request")
}

fn admin(gw: &Gateway, method: &str, path: &str, body: &str) -> Resp {
    admin_with(gw.admin, method, path, body, &[])
}

/// A data-plane request with `secret` as the bearer key.
fn call(addr: SocketAddr, path: &str, secret: &str) -> Resp {
    get(addr, path, &[("authorization", &bearer(secret))]).expect("data-plane request")
}

fn expect(r: &Resp, status: u16) -> &Resp {
    assert_eq!(r.status, status, "{} {:?}", r.text(), r.headers);
    r
}

/// Asserts a problem+json answer with `status` and `code`; returns its body.
fn problem(r: &Resp, status: u16, code: &str) -> Value {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.problem_code(), code, "{}", r.text());
    assert!(r.json()["detail"].as_str().is_some_and(|d| !d.is_empty()), "{}", r.text());
    r.json()
}

/// Creates a tenant through the API.
fn create_tenant(admin: SocketAddr, id: &str, tier: &str) -> Value {
    let r = admin_with(admin, "POST", "/v1/tenants", &json!({"id": id, "tier": tier}).to_string(), &[]);
    expect(&r, 201).json()
}

/// Creates a key through the API: `(key id, secret)`.
fn create_key(admin: SocketAddr, tenant: &str, scopes: &[&str]) -> (String, String) {
    let r =
        admin_with(admin, "POST", &format!("/v1/tenants/{tenant}/keys"), &json!({"scopes": scopes}).to_string(), &[]);
    let v = expect(&r, 201).json();
    let secret = v["secret"].as_str().expect("secret").to_string();
    assert!(secret.starts_with("tg_live_"), "{secret}");
    (v["key"]["id"].as_str().expect("key id").to_string(), secret)
}

fn ids(v: &Value) -> Vec<String> {
    v["items"].as_array().expect("items").iter().map(|t| t["id"].as_str().expect("id").to_string()).collect()
}

/// True when any object in `v`, at any depth, has a field called `name`.
fn has_field(v: &Value, name: &str) -> bool {
    match v {
        Value::Object(m) => m.contains_key(name) || m.values().any(|x| has_field(x, name)),
        Value::Array(a) => a.iter().any(|x| has_field(x, name)),
        _ => false,
    }
}

/// Asserts a key listing shows neither secrets nor hashes.
fn assert_no_secrets(r: &Resp, secrets: &[&str]) {
    let v = r.json();
    assert!(!has_field(&v, "secret"), "a listing shows a secret: {v}");
    assert!(!has_field(&v, "hash"), "a listing shows a hash: {v}");
    let text = r.text();
    assert!(!text.contains("sha256:"), "a listing shows a hash: {text}");
    for s in secrets {
        assert!(!text.contains(s), "a listing shows the secret {s}: {text}");
        assert!(!text.contains(&hash_of(s)[7..]), "a listing shows the hash of {s}: {text}");
    }
}

/// The value of one sample in `/metrics`, 0 if absent.
fn metric(admin: SocketAddr, series: &str) -> u64 {
    let r = get(admin, "/metrics", &[]).expect("metrics");
    r.text()
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse::<f64>().ok()))
        .map(|v| v as u64)
        .unwrap_or(0)
}

/// Polls `check` until it holds or `bound` has passed since `start`; panics with the last state.
fn within(start: Instant, bound: Duration, what: &str, mut check: impl FnMut() -> Result<(), String>) {
    loop {
        let last = match check() {
            Ok(()) => return,
            Err(e) => e,
        };
        if start.elapsed() > bound {
            panic!("{what}: not within {bound:?} (last: {last})");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Writes the config file the way an operator's deploy tool would: whole, then renamed.
fn rewrite_config(gw: &Gateway, template: &str) {
    let tmp = gw.dir.join("tollgate.toml.next");
    std::fs::write(&tmp, render(template, gw.addr, gw.admin, &gw.dir)).expect("write config");
    std::fs::rename(&tmp, &gw.config_path).expect("rename config");
}

// ---------------------------------------------------------------------------------------------
// 1, 4, 5: authentication, config tenants, bad input
// ---------------------------------------------------------------------------------------------

#[test]
fn token_guards_v1_config_tenants_are_read_only_and_bad_input_changes_nothing() {
    let echo = Echo::start();
    let gw = Gateway::start(&config(echo.addr, EMBEDDED, "", "free"));

    // 1. The token.
    let r = get(gw.admin, "/v1/tenants", &[]).expect("request");
    problem(&r, 401, "missing_token");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = get(gw.admin, "/v1/tenants", &[("authorization", &bearer("tg_admin_wrongwrongwrongwrongwrongwrong"))])
        .expect("request");
    problem(&r, 401, "invalid_token");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = get(gw.admin, "/v1/tenants", &[("authorization", &format!("Basic {ADMIN_TOKEN}"))]).expect("request");
    problem(&r, 401, "missing_token");
    // The data-plane key of a tenant is not an admin token.
    problem(
        &get(gw.admin, "/v1/tenants", &[("authorization", &bearer(ACME_KEY))]).expect("request"),
        401,
        "invalid_token",
    );
    // Writes are guarded too, and a refused write changes nothing.
    let r =
        request(gw.admin, "POST", "/v1/tenants", &[], json!({"id": "sneaky", "tier": "free"}).to_string().as_bytes())
            .expect("request");
    problem(&r, 401, "missing_token");
    let r = admin(&gw, "GET", "/v1/tenants", "");
    expect(&r, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(ids(&r.json()), ["acme"], "the unauthenticated POST created a tenant");
    // The operational endpoints need no token.
    let r = get(gw.admin, "/healthz", &[]).expect("healthz");
    assert_eq!(expect(&r, 200).json()["status"], "ok");
    within(Instant::now(), Duration::from_secs(5), "/readyz answers 200 without a token", || {
        let r = get(gw.admin, "/readyz", &[]).expect("readyz");
        match (r.status, r.json()["status"].as_str()) {
            (200, Some("ready")) => Ok(()),
            _ => Err(format!("{} {}", r.status, r.text())),
        }
    });
    let r = get(gw.admin, "/metrics", &[]).expect("metrics");
    assert!(expect(&r, 200).text().contains("tollgate_tenants 1"), "{}", r.text());

    // 4. A config tenant is read-only through the API.
    let before = admin(&gw, "GET", "/v1/tenants/acme", "").json();
    assert_eq!(before["source"], "config");
    let attempts: [(&str, String, String); 7] = [
        ("PATCH", "/v1/tenants/acme".into(), json!({"name": "Hijacked"}).to_string()),
        ("DELETE", "/v1/tenants/acme".into(), String::new()),
        ("POST", "/v1/tenants/acme/suspend".into(), String::new()),
        ("PUT", "/v1/tenants/acme/tier".into(), json!({"tier": "slow"}).to_string()),
        ("POST", "/v1/tenants/acme/keys".into(), json!({"scopes": ["read"]}).to_string()),
        ("DELETE", "/v1/keys/acme-main".into(), String::new()),
        ("POST", "/v1/keys/acme-main/rotate".into(), String::new()),
    ];
    for (method, path, body) in &attempts {
        let v = problem(&admin(&gw, method, path, body), 409, "conflict");
        let detail = v["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("config file") && detail.contains("read-only"), "{method} {path}: {detail}");
    }
    let v =
        problem(&admin(&gw, "POST", "/v1/tenants", &json!({"id": "acme", "tier": "pro"}).to_string()), 409, "conflict");
    assert!(v["detail"].as_str().is_some_and(|d| d.contains("config file")), "{v}");
    assert_eq!(admin(&gw, "GET", "/v1/tenants/acme", "").json(), before, "a refused change altered the config tenant");
    let keys = admin(&gw, "GET", "/v1/tenants/acme/keys", "");
    let keys = expect(&keys, 200).json();
    assert_eq!(ids(&keys), ["acme-main"]);
    assert_eq!(keys["items"][0]["status"], "active");
    assert_eq!(keys["items"][0]["source"], "config");
    let r = call(gw.addr, "/x", ACME_KEY);
    assert_eq!(expect(&r, 200).upstream_headers()["x-tenant-tier"], "free");

    // 5. Bad input: each refused with problem+json, none changes anything.
    let snapshot = || admin(&gw, "GET", "/v1/tenants", "").json();
    let r = admin(&gw, "POST", "/v1/tenants", &json!({"id": "dup", "name": "Original", "tier": "free"}).to_string());
    expect(&r, 201);
    let state = snapshot();
    let post = |body: &str| admin(&gw, "POST", "/v1/tenants", body);
    problem(&post(r#"{"id": "bad-json", "tier": "#), 400, "bad_request");
    problem(&post(""), 400, "bad_request");
    problem(&post(r#"{"id": "bad-field", "tier": "free", "colour": "red"}"#), 400, "bad_request");
    problem(&post(r#"{"id": 42, "tier": "free"}"#), 400, "bad_request");
    problem(&post(r#"{"id": "bad-type", "tier": "free", "billing_anchor_day": "first"}"#), 400, "bad_request");
    problem(&post(r#"{"id": "bad-scopes", "tier": "free", "subdomains": "one"}"#), 400, "bad_request");
    for bad_id in ["Upper", "under_score", "", "-lead", "trail-", "dot.ted", "späť", &"a".repeat(64)] {
        let v = problem(&post(&json!({"id": bad_id, "tier": "free"}).to_string()), 400, "bad_request");
        assert!(v["detail"].as_str().is_some_and(|d| d.contains("a-z")), "{bad_id:?}: {v}");
    }
    // 63 characters is the longest id; checked at the end, since it changes state.
    let v = problem(&post(r#"{"id": "bad-tier", "tier": "platinum"}"#), 422, "unprocessable");
    assert!(v["detail"].as_str().is_some_and(|d| d.contains("platinum") && d.contains("free")), "{v}");
    let v = problem(&post(r#"{"id": "dup", "name": "Impostor", "tier": "pro"}"#), 409, "conflict");
    assert!(v["detail"].as_str().is_some_and(|d| d.contains("dup")), "{v}");
    problem(&admin(&gw, "GET", "/v1/tenants/nope", ""), 404, "not_found");
    problem(&admin(&gw, "PATCH", "/v1/tenants/nope", r#"{"name": "x"}"#), 404, "not_found");
    problem(&admin(&gw, "POST", "/v1/tenants/nope/suspend", ""), 404, "not_found");
    problem(&admin(&gw, "PUT", "/v1/tenants/nope/tier", r#"{"tier": "pro"}"#), 404, "not_found");
    problem(&admin(&gw, "DELETE", "/v1/tenants/nope", ""), 404, "not_found");
    problem(&admin(&gw, "GET", "/v1/tenants/nope/keys", ""), 404, "not_found");
    problem(&admin(&gw, "POST", "/v1/tenants/nope/keys", r#"{"scopes": ["read"]}"#), 404, "not_found");
    problem(&admin(&gw, "DELETE", "/v1/keys/key_0000000000000000", ""), 404, "not_found");
    problem(&admin(&gw, "POST", "/v1/keys/key_0000000000000000/rotate", ""), 404, "not_found");
    problem(&admin(&gw, "GET", "/v1/nothing-here", ""), 404, "not_found");
    // Bad changes to an existing tenant change nothing either.
    problem(&admin(&gw, "PATCH", "/v1/tenants/dup", r#"{"tier": "platinum"}"#), 422, "unprocessable");
    problem(&admin(&gw, "PATCH", "/v1/tenants/dup", r#"{"status": "paused"}"#), 400, "bad_request");
    problem(&admin(&gw, "PATCH", "/v1/tenants/dup", r#"{"name": "X", "owner": "me"}"#), 400, "bad_request");
    problem(&admin(&gw, "PUT", "/v1/tenants/dup/tier", r#"{"tier": "platinum"}"#), 422, "unprocessable");
    problem(&admin(&gw, "PUT", "/v1/tenants/dup/tier", r#"{"tier": 3}"#), 400, "bad_request");
    problem(&admin(&gw, "POST", "/v1/tenants/dup/keys", r#"{"scopes": "read"}"#), 400, "bad_request");
    problem(&admin(&gw, "POST", "/v1/tenants/dup/keys", r#"{"scopes": ["two words"]}"#), 400, "bad_request");
    // Over 1 MiB, declared up front: refused before the body is read.
    let mut c = Conn::open(gw.admin).expect("connect");
    let auth = bearer(ADMIN_TOKEN);
    c.send_raw(
        format!(
            "POST /v1/tenants HTTP/1.1\r\nhost: localhost\r\nauthorization: {auth}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            (1 << 20) + 1
        )
        .as_bytes(),
    )
    .expect("send head");
    let r = c.read_response(false).expect("413 answer");
    problem(&r, 413, "body_too_large");
    drop(c);
    // Over 1 MiB, chunked (no length given): refused once the limit is crossed.
    let big = json!({"id": "big", "tier": "free", "name": "n".repeat((1 << 20) + 10)}).to_string();
    let mut raw = format!(
        "POST /v1/tenants HTTP/1.1\r\nhost: localhost\r\nauthorization: {auth}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for chunk in big.as_bytes().chunks(64 * 1024) {
        raw.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        raw.extend_from_slice(chunk);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let mut c = Conn::open(gw.admin).expect("connect");
    c.send_raw(&raw).expect("send chunked body");
    problem(&c.read_response(false).expect("413 answer"), 413, "body_too_large");
    drop(c);
    // Wrong methods name the right ones.
    let r = admin(&gw, "PUT", "/v1/tenants", r#"{"id": "put", "tier": "free"}"#);
    problem(&r, 405, "method_not_allowed");
    assert_eq!(r.header("allow"), Some("GET, POST"));
    for (method, path, allow) in [
        ("POST", "/v1/tenants/dup", "GET, PATCH, DELETE"),
        ("GET", "/v1/tenants/dup/suspend", "POST"),
        ("GET", "/v1/tenants/dup/tier", "PUT"),
        ("DELETE", "/v1/tenants/dup/keys", "GET, POST"),
        ("GET", "/v1/keys/key_0000000000000000", "DELETE"),
        ("DELETE", "/v1/tiers", "GET"),
        ("GET", "/v1/reload", "POST"),
    ] {
        let r = admin(&gw, method, path, "");
        problem(&r, 405, "method_not_allowed");
        assert_eq!(r.header("allow"), Some(allow), "{method} {path}");
    }
    assert_eq!(snapshot(), state, "a refused request changed the tenant list");
    let dup = admin(&gw, "GET", "/v1/tenants/dup", "").json();
    assert_eq!(
        (dup["name"].as_str(), dup["tier"].as_str(), dup["status"].as_str()),
        (Some("Original"), Some("free"), Some("active"))
    );
    assert_eq!(
        admin(&gw, "GET", "/v1/tenants/dup/keys", "").json()["items"],
        json!([]),
        "a refused key creation left a key"
    );
    for id in ["bad-json", "bad-field", "bad-type", "bad-tier", "big", "put", "sneaky"] {
        problem(&admin(&gw, "GET", &format!("/v1/tenants/{id}"), ""), 404, "not_found");
    }
    // The bounds of the id pattern are accepted.
    expect(&post(&json!({"id": "a".repeat(63), "tier": "free"}).to_string()), 201);
    expect(&post(r#"{"id": "0-9", "tier": "free"}"#), 201);
}

// ---------------------------------------------------------------------------------------------
// 2, 3, 6: tenants, keys, persistence
// ---------------------------------------------------------------------------------------------

#[test]
fn tenants_and_keys_apply_at_once_and_survive_a_restart() {
    let echo = Echo::start();
    let template = config(echo.addr, EMBEDDED, "", "free");
    let dir = temp_dir("admin-persist");
    let mut gw = Gateway::start_in(dir.clone(), &template, &[]);

    // 2. Tenants.
    let body = json!({"id": "beta", "name": "Beta Corp", "email": "ops@beta.test", "tier": "free", "timezone": "Europe/Berlin", "billing_anchor_day": 15});
    let r = admin(&gw, "POST", "/v1/tenants", &body.to_string());
    let beta = expect(&r, 201).json();
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(beta["id"], "beta");
    assert_eq!(beta["name"], "Beta Corp");
    assert_eq!(beta["email"], "ops@beta.test");
    assert_eq!(beta["tier"], "free");
    assert_eq!(beta["status"], "active");
    assert_eq!(beta["timezone"], "Europe/Berlin");
    assert_eq!(beta["billing_anchor_day"], 15);
    assert_eq!(beta["source"], "api");
    assert!(beta["created_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{beta}");
    assert_eq!(beta["created_at"], beta["updated_at"]);
    assert_eq!(expect(&admin(&gw, "GET", "/v1/tenants/beta", ""), 200).json(), beta);
    let gamma = create_tenant(gw.admin, "gamma", "pro");
    assert_eq!(
        (gamma["name"].as_str(), gamma["timezone"].as_str(), gamma["billing_anchor_day"].as_u64()),
        (Some("gamma"), Some("UTC"), Some(1))
    );
    let r = admin(&gw, "POST", "/v1/tenants", r#"{"id": "delta", "tier": "free", "status": "suspended"}"#);
    assert_eq!(expect(&r, 201).json()["status"], "suspended");

    let list = |q: &str| {
        let r = admin(&gw, "GET", &format!("/v1/tenants{q}"), "");
        expect(&r, 200).json()
    };
    let all = list("");
    assert_eq!(ids(&all), ["acme", "beta", "delta", "gamma"]);
    assert_eq!(all["next_cursor"], Value::Null);
    assert_eq!(ids(&list("?tier=free")), ["acme", "beta", "delta"]);
    assert_eq!(ids(&list("?tier=pro")), ["gamma"]);
    assert_eq!(ids(&list("?status=suspended")), ["delta"]);
    assert_eq!(ids(&list("?tier=free&status=active")), ["acme", "beta"]);
    assert_eq!(ids(&list("?tier=none")), Vec::<String>::new());
    let page1 = list("?limit=2");
    assert_eq!(ids(&page1), ["acme", "beta"]);
    assert_eq!(page1["next_cursor"], "beta");
    let page2 = list("?limit=2&cursor=beta");
    assert_eq!(ids(&page2), ["delta", "gamma"]);
    assert_eq!(page2["next_cursor"], Value::Null);
    let page = list("?limit=1&cursor=acme&tier=free");
    assert_eq!((ids(&page), page["next_cursor"].as_str()), (vec!["beta".to_string()], Some("beta")));

    let r = admin(&gw, "PATCH", "/v1/tenants/beta", r#"{"name": "Beta Inc", "email": "billing@beta.test"}"#);
    let patched = expect(&r, 200).json();
    assert_eq!((patched["name"].as_str(), patched["email"].as_str()), (Some("Beta Inc"), Some("billing@beta.test")));
    assert_eq!(
        (patched["tier"].as_str(), patched["timezone"].as_str()),
        (Some("free"), Some("Europe/Berlin")),
        "PATCH touched other fields"
    );
    assert_eq!(patched["created_at"], beta["created_at"]);
    assert_eq!(admin(&gw, "GET", "/v1/tenants/beta", "").json(), patched);

    // 3. Keys: a new key works at once, with its tenant's identity.
    let r = admin(&gw, "POST", "/v1/tenants/beta/keys", r#"{"name": "main", "scopes": ["read", "generate"]}"#);
    let created = expect(&r, 201).json();
    let k1_secret = created["secret"].as_str().expect("secret").to_string();
    assert!(k1_secret.starts_with("tg_live_") && k1_secret.len() > 30, "{k1_secret}");
    let k1 = created["key"]["id"].as_str().expect("id").to_string();
    assert_eq!(created["key"]["tenant"], "beta");
    assert_eq!(created["key"]["name"], "main");
    assert_eq!(created["key"]["scopes"], json!(["read", "generate"]));
    assert_eq!(created["key"]["status"], "active");
    assert_eq!(created["key"]["source"], "api");
    assert!(!has_field(&created["key"], "hash") && !r.text().contains("sha256:"), "{created}");
    let r = call(gw.addr, "/v1/things", &k1_secret);
    let h = expect(&r, 200).upstream_headers();
    assert_eq!((h["x-tenant-id"].as_str(), h["x-tenant-tier"].as_str()), (Some("beta"), Some("free")));
    assert_eq!(h["x-key-id"].as_str(), Some(k1.as_str()));
    assert!(h.get("authorization").is_none(), "credential forwarded: {h}");

    // Suspension and reactivation apply on the next request.
    let r = admin(&gw, "POST", "/v1/tenants/beta/suspend", "");
    assert_eq!(expect(&r, 200).json()["status"], "suspended");
    problem(&call(gw.addr, "/x", &k1_secret), 403, "tenant_suspended");
    let r = admin(&gw, "POST", "/v1/tenants/beta/reactivate", "");
    assert_eq!(expect(&r, 200).json()["status"], "active");
    expect(&call(gw.addr, "/x", &k1_secret), 200);

    // A tier change applies its limits on the next request.
    let r = admin(&gw, "PUT", "/v1/tenants/beta/tier", r#"{"tier": "slow"}"#);
    assert_eq!(expect(&r, 200).json()["tier"], "slow");
    let r = call(gw.addr, "/x", &k1_secret);
    assert_eq!(expect(&r, 200).upstream_headers()["x-tenant-tier"], "slow");
    assert_eq!(r.header("x-ratelimit-limit"), Some("1"));
    problem(&call(gw.addr, "/x", &k1_secret), 429, "rate_limited");
    let r = admin(&gw, "PUT", "/v1/tenants/beta/tier", r#"{"tier": "free"}"#);
    assert_eq!(expect(&r, 200).json()["tier"], "free");
    let r = call(gw.addr, "/x", &k1_secret);
    assert_eq!(expect(&r, 200).upstream_headers()["x-tenant-tier"], "free");
    expect(&call(gw.addr, "/x", &k1_secret), 200);

    // Revocation applies at once.
    let (k2, k2_secret) = create_key(gw.admin, "beta", &["read"]);
    expect(&call(gw.addr, "/x", &k2_secret), 200);
    let r = admin(&gw, "DELETE", &format!("/v1/keys/{k2}"), "");
    let revoked = expect(&r, 200).json();
    assert_eq!((revoked["id"].as_str(), revoked["status"].as_str()), (Some(k2.as_str()), Some("revoked")));
    assert!(revoked["revoked_at"].as_str().is_some(), "{revoked}");
    problem(&call(gw.addr, "/x", &k2_secret), 401, "key_revoked");
    expect(&call(gw.addr, "/x", &k1_secret), 200);

    // Rotation: a new secret with the same scopes; the old one works through the grace period.
    let r = admin(&gw, "POST", &format!("/v1/keys/{k1}/rotate"), r#"{"grace_period_hours": 1}"#);
    let rotated = expect(&r, 201).json();
    let k3 = rotated["key"]["id"].as_str().expect("id").to_string();
    let k3_secret = rotated["secret"].as_str().expect("secret").to_string();
    assert!(k3_secret.starts_with("tg_live_") && k3_secret != k1_secret);
    assert_ne!(k3, k1);
    assert_eq!(rotated["key"]["scopes"], json!(["read", "generate"]));
    assert_eq!(rotated["key"]["tenant"], "beta");
    assert_eq!(rotated["key"]["status"], "active");
    let r = call(gw.addr, "/x", &k3_secret);
    assert_eq!(expect(&r, 200).upstream_headers()["x-key-id"].as_str(), Some(k3.as_str()));
    let r = call(gw.addr, "/x", &k1_secret);
    assert_eq!(expect(&r, 200).upstream_headers()["x-key-id"].as_str(), Some(k1.as_str()));
    problem(&admin(&gw, "POST", &format!("/v1/keys/{k2}/rotate"), ""), 409, "conflict");
    problem(&admin(&gw, "POST", &format!("/v1/keys/{k1}/rotate"), r#"{"grace_period_hours": -1}"#), 400, "bad_request");

    let r = admin(&gw, "GET", "/v1/tenants/beta/keys", "");
    expect(&r, 200);
    assert_no_secrets(&r, &[&k1_secret, &k2_secret, &k3_secret]);
    let listed = r.json();
    let find = |v: &Value, id: &str| {
        v["items"]
            .as_array()
            .and_then(|a| a.iter().find(|k| k["id"] == id).cloned())
            .unwrap_or_else(|| panic!("{id} not in {v}"))
    };
    assert_eq!(listed["items"].as_array().map(Vec::len), Some(3));
    let old = find(&listed, &k1);
    assert_eq!((old["status"].as_str(), old["rotated_to"].as_str()), (Some("rotating"), Some(k3.as_str())));
    assert!(old["revoked_at"].as_str().is_some(), "{old}");
    assert_eq!(find(&listed, &k2)["status"], "revoked");
    assert_eq!(find(&listed, &k3)["status"], "active");

    // Deleting a tenant removes it and its keys.
    create_tenant(gw.admin, "doomed", "free");
    let (_, doomed_secret) = create_key(gw.admin, "doomed", &["read"]);
    expect(&call(gw.addr, "/x", &doomed_secret), 200);
    let r = admin(&gw, "DELETE", "/v1/tenants/doomed", "");
    assert_eq!(expect(&r, 204).body.len(), 0);
    problem(&admin(&gw, "GET", "/v1/tenants/doomed", ""), 404, "not_found");
    problem(&admin(&gw, "GET", "/v1/tenants/doomed/keys", ""), 404, "not_found");
    problem(&call(gw.addr, "/x", &doomed_secret), 401, "invalid_key");
    problem(&admin(&gw, "DELETE", "/v1/tenants/doomed", ""), 404, "not_found");
    assert_eq!(ids(&list("")), ["acme", "beta", "delta", "gamma"]);

    // 6. A restart on the same SQLite file keeps everything.
    let before_tenants = list("");
    let before_keys = admin(&gw, "GET", "/v1/tenants/beta/keys", "").json();
    gw.signal("TERM");
    assert!(gw.wait_exit(Duration::from_secs(15)).is_some(), "the gateway did not stop:\n{}", gw.log());
    let gw = Gateway::start_in(dir, &template, &[]);
    let after = expect(&admin(&gw, "GET", "/v1/tenants", ""), 200).json();
    assert_eq!(after, before_tenants, "tenants changed across the restart");
    let after_keys = expect(&admin(&gw, "GET", "/v1/tenants/beta/keys", ""), 200).json();
    assert_eq!(after_keys, before_keys, "keys changed across the restart");
    let r = call(gw.addr, "/x", &k3_secret);
    let h = expect(&r, 200).upstream_headers();
    assert_eq!((h["x-tenant-id"].as_str(), h["x-key-id"].as_str()), (Some("beta"), Some(k3.as_str())));
    expect(&call(gw.addr, "/x", &k1_secret), 200);
    problem(&call(gw.addr, "/x", &k2_secret), 401, "key_revoked");
    problem(&call(gw.addr, "/x", &doomed_secret), 401, "invalid_key");
    let readyz = get(gw.admin, "/readyz", &[]).expect("readyz").json();
    assert_eq!((readyz["tenants"].as_u64(), readyz["keys"].as_u64()), (Some(4), Some(4)), "{readyz}");
}

// ---------------------------------------------------------------------------------------------
// 7: propagation between instances over Redis
// ---------------------------------------------------------------------------------------------

#[test]
fn changes_on_one_instance_reach_another_within_a_second_over_redis() {
    let redis = Redis::start();
    let echo = Echo::start();
    let store = format!("kind = \"redis\"\nurl = \"{}\"", redis.url());
    let template = config(echo.addr, &store, "", "free");
    let a = Gateway::start(&template);
    let b = Gateway::start(&template);
    let bound = Duration::from_secs(1);
    let on_b = |secret: &str| call(b.addr, "/x", secret);
    let state = |r: &Resp| format!("{} {}", r.status, r.text());

    create_tenant(a.admin, "roam", "free");
    let (key, secret) = create_key(a.admin, "roam", &["read"]);
    let t = Instant::now();
    expect(&call(a.addr, "/x", &secret), 200);
    within(t, bound, "a new tenant and key reach B", || {
        let r = on_b(&secret);
        if r.status == 200 && r.upstream_headers()["x-key-id"].as_str() == Some(key.as_str()) {
            Ok(())
        } else {
            Err(state(&r))
        }
    });
    // B's admin API sees it too.
    assert_eq!(expect(&admin(&b, "GET", "/v1/tenants/roam", ""), 200).json()["tier"], "free");

    expect(&admin(&a, "PUT", "/v1/tenants/roam/tier", r#"{"tier": "pro"}"#), 200);
    let t = Instant::now();
    within(t, bound, "a tier change reaches B", || {
        let r = on_b(&secret);
        match (r.status, r.header("x-quota-remaining")) {
            (200, Some(_)) if r.upstream_headers()["x-tenant-tier"] == "pro" => Ok(()),
            _ => Err(format!("{} {:?}", state(&r), r.headers)),
        }
    });

    expect(&admin(&a, "POST", "/v1/tenants/roam/suspend", ""), 200);
    let t = Instant::now();
    within(t, bound, "a suspension reaches B", || {
        let r = on_b(&secret);
        if r.status == 403 && r.problem_code() == "tenant_suspended" {
            Ok(())
        } else {
            Err(state(&r))
        }
    });

    expect(&admin(&a, "POST", "/v1/tenants/roam/reactivate", ""), 200);
    let t = Instant::now();
    within(t, bound, "a reactivation reaches B", || {
        let r = on_b(&secret);
        if r.status == 200 {
            Ok(())
        } else {
            Err(state(&r))
        }
    });

    expect(&admin(&a, "DELETE", &format!("/v1/keys/{key}"), ""), 200);
    let t = Instant::now();
    problem(&call(a.addr, "/x", &secret), 401, "key_revoked");
    within(t, bound, "a revocation reaches B", || {
        let r = on_b(&secret);
        if r.status == 401 && r.problem_code() == "key_revoked" {
            Ok(())
        } else {
            Err(state(&r))
        }
    });

    // And the other way round: a key made on B works on A.
    let (_, secret_b) = create_key(b.admin, "roam", &["read"]);
    let t = Instant::now();
    within(t, bound, "a key created on B reaches A", || {
        let r = call(a.addr, "/x", &secret_b);
        if r.status == 200 {
            Ok(())
        } else {
            Err(state(&r))
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 8, 9: self-service and audit
// ---------------------------------------------------------------------------------------------

#[test]
fn self_service_is_confined_to_its_tenant_and_every_change_is_audited_without_secrets() {
    let echo = Echo::start();
    let gw = Gateway::start(&config(echo.addr, EMBEDDED, "", "free"));
    let mut secrets: Vec<String> = vec![ADMIN_TOKEN.to_string()];

    let r = admin_with(
        gw.admin,
        "POST",
        "/v1/tenants",
        r#"{"id": "ss-one", "tier": "pro"}"#,
        &[("x-request-id", "audit-create-1")],
    );
    expect(&r, 201);
    create_tenant(gw.admin, "ss-two", "free");
    let r = admin_with(
        gw.admin,
        "POST",
        "/v1/tenants/ss-one/keys",
        r#"{"name": "ops", "scopes": ["admin"]}"#,
        &[("x-request-id", "audit-key-1")],
    );
    let v = expect(&r, 201).json();
    let (admin_key, admin_secret) =
        (v["key"]["id"].as_str().expect("id").to_string(), v["secret"].as_str().expect("s").to_string());
    let (read_key, read_secret) = create_key(gw.admin, "ss-one", &["read"]);
    let (other_key, other_secret) = create_key(gw.admin, "ss-two", &["read", "admin"]);
    secrets.extend([admin_secret.clone(), read_secret.clone(), other_secret.clone()]);
    let ss = |method: &str, path: &str, secret: &str, body: &str| {
        request(gw.addr, method, path, &[("authorization", &bearer(secret))], body.as_bytes()).expect("self-service")
    };

    // 8. Listing: the caller's tenant only, never a secret or hash.
    let r = ss("GET", "/_tollgate/keys", &admin_secret, "");
    expect(&r, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let mut listed = ids(&r.json());
    listed.sort();
    let mut want = vec![admin_key.clone(), read_key.clone()];
    want.sort();
    assert_eq!(listed, want, "{}", r.text());
    assert_no_secrets(&r, &[&admin_secret, &read_secret, &other_secret]);
    assert_eq!(echo.hits(), 0, "a self-service call was forwarded");

    // Creating: a working key of the caller's tenant.
    let r = ss("POST", "/_tollgate/keys", &admin_secret, r#"{"name": "ci", "scopes": ["read"]}"#);
    let made = expect(&r, 201).json();
    let new_key = made["key"]["id"].as_str().expect("id").to_string();
    let new_secret = made["secret"].as_str().expect("secret").to_string();
    secrets.push(new_secret.clone());
    assert!(new_secret.starts_with("tg_live_"));
    assert_eq!((made["key"]["tenant"].as_str(), made["key"]["scopes"].clone()), (Some("ss-one"), json!(["read"])));
    let r = call(gw.addr, "/x", &new_secret);
    assert_eq!(expect(&r, 200).upstream_headers()["x-tenant-id"], "ss-one");
    problem(&ss("POST", "/_tollgate/keys", &admin_secret, r#"{"scopes": "read"}"#), 400, "bad_request");
    // A config tenant's admin key cannot mint keys (its tenant is read-only).
    problem(&ss("POST", "/_tollgate/keys", ACME_KEY, r#"{"scopes": ["read"]}"#), 409, "conflict");

    // Revoking: own keys only; another tenant's key id is simply not found.
    let r = ss("DELETE", &format!("/_tollgate/keys/{new_key}"), &admin_secret, "");
    assert_eq!(expect(&r, 200).json()["status"], "revoked");
    problem(&call(gw.addr, "/x", &new_secret), 401, "key_revoked");
    problem(&ss("DELETE", &format!("/_tollgate/keys/{other_key}"), &admin_secret, ""), 404, "not_found");
    problem(&ss("DELETE", "/_tollgate/keys/acme-main", &admin_secret, ""), 404, "not_found");
    expect(&call(gw.addr, "/x", &other_secret), 200);
    expect(&call(gw.addr, "/x", ACME_KEY), 200);
    let theirs = admin(&gw, "GET", "/v1/tenants/ss-two/keys", "").json();
    assert_eq!(theirs["items"][0]["status"], "active", "{theirs}");

    // Without the `admin` scope: 403, nothing changes.
    for (method, path) in [
        ("GET", "/_tollgate/keys".to_string()),
        ("POST", "/_tollgate/keys".to_string()),
        ("DELETE", format!("/_tollgate/keys/{admin_key}")),
    ] {
        let v = problem(&ss(method, &path, &read_secret, ""), 403, "insufficient_scope");
        assert_eq!(v["missing_scopes"], json!(["admin"]), "{method} {path}: {v}");
    }
    expect(&ss("GET", "/_tollgate/keys", &admin_secret, ""), 200);
    assert_eq!(admin(&gw, "GET", "/v1/tenants/ss-one/keys", "").json()["items"].as_array().map(Vec::len), Some(3));
    problem(&ss("GET", "/_tollgate/keys", "tg_live_nobodyNNNNNNNNNNNNNNNNNNNNNNNNNNNN", ""), 401, "invalid_key");
    problem(&get(gw.addr, "/_tollgate/keys", &[]).expect("request"), 401, "missing_key");

    // Usage: `read` or `billing`; the tier's quota with what was used.
    expect(&call(gw.addr, "/x", &read_secret), 200);
    expect(&call(gw.addr, "/x", &read_secret), 200);
    let v = problem(&ss("GET", "/_tollgate/usage", &admin_secret, ""), 403, "insufficient_scope");
    assert_eq!(v["missing_scopes"], json!(["read", "billing"]));
    let r = ss("GET", "/_tollgate/usage", &read_secret, "");
    let usage = expect(&r, 200).json();
    assert_eq!(usage["tenant"], "ss-one");
    let quotas = usage["quotas"].as_array().expect("quotas");
    assert_eq!(quotas.len(), 1, "{usage}");
    let q = &quotas[0];
    assert_eq!(
        (q["metric"].as_str(), q["limit"].as_u64(), q["period"].as_str()),
        (Some("requests"), Some(100), Some("month"))
    );
    assert_eq!((q["used"].as_u64(), q["remaining"].as_u64()), (Some(3), Some(97)), "{usage}");
    assert!(q["reset_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{usage}");
    let (_, billing_secret) = create_key(gw.admin, "ss-one", &["billing"]);
    secrets.push(billing_secret.clone());
    expect(&ss("GET", "/_tollgate/usage", &billing_secret, ""), 200);
    let r = ss("GET", "/_tollgate/usage", &other_secret, "");
    assert_eq!(expect(&r, 200).json(), json!({"tenant": "ss-two", "quotas": []}));
    problem(&ss("POST", "/_tollgate/usage", &read_secret, ""), 405, "method_not_allowed");

    // More changes for the audit: a rotation, a refused duplicate, a suspension.
    let r = admin_with(
        gw.admin,
        "POST",
        &format!("/v1/keys/{read_key}/rotate"),
        r#"{"grace_period_hours": 1}"#,
        &[("x-request-id", "audit-rotate-1")],
    );
    secrets.push(expect(&r, 201).json()["secret"].as_str().expect("secret").to_string());
    let r = admin_with(
        gw.admin,
        "POST",
        "/v1/tenants",
        r#"{"id": "ss-one", "tier": "free"}"#,
        &[("x-request-id", "audit-dup-1")],
    );
    problem(&r, 409, "conflict");
    let r = admin_with(gw.admin, "POST", "/v1/tenants/ss-one/suspend", "", &[("x-request-id", "audit-suspend-1")]);
    expect(&r, 200);

    // 9. The audit log, filtered by tenant.
    let r = admin(&gw, "GET", "/v1/audit?tenant=ss-one", "");
    let entries = expect(&r, 200).json()["items"].as_array().expect("items").clone();
    for e in &entries {
        for field in ["time", "actor", "action", "target", "request_id", "result"] {
            assert!(e[field].as_str().is_some_and(|s| !s.is_empty()), "entry without {field}: {e}");
        }
        assert_eq!(e["tenant"], "ss-one", "the filter let another tenant's entry through: {e}");
        assert!(e["time"].as_str().is_some_and(|t| t.starts_with("20") && t.ends_with('Z')), "{e}");
    }
    let by_rid = |rid: &str| {
        entries
            .iter()
            .find(|e| e["request_id"] == rid)
            .cloned()
            .unwrap_or_else(|| panic!("no entry for {rid}: {entries:?}"))
    };
    let admin_actor = by_rid("audit-create-1")["actor"].as_str().expect("actor").to_string();
    assert!(admin_actor.starts_with("admin:"), "{admin_actor}");
    let e = by_rid("audit-create-1");
    assert_eq!(
        (e["action"].as_str(), e["target"].as_str(), e["result"].as_str()),
        (Some("tenant.create"), Some("tenant:ss-one"), Some("ok"))
    );
    let e = by_rid("audit-key-1");
    let target = format!("key:{admin_key}");
    assert_eq!(
        (e["action"].as_str(), e["target"].as_str(), e["result"].as_str()),
        (Some("key.create"), Some(target.as_str()), Some("ok"))
    );
    let e = by_rid("audit-rotate-1");
    assert_eq!((e["action"].as_str(), e["result"].as_str()), (Some("key.rotate"), Some("ok")));
    assert!(e["target"].as_str().is_some_and(|t| t.starts_with(&format!("key:{read_key}->key_"))), "{e}");
    let e = by_rid("audit-dup-1");
    assert_eq!((e["action"].as_str(), e["result"].as_str()), (Some("tenant.create"), Some("error: conflict")));
    let e = by_rid("audit-suspend-1");
    assert_eq!(
        (e["action"].as_str(), e["actor"].as_str(), e["result"].as_str()),
        (Some("tenant.suspend"), Some(admin_actor.as_str()), Some("ok"))
    );
    // Self-service changes name the key that made them.
    let self_actor = format!("key:{admin_key}");
    let actions: Vec<(&str, &str)> = entries
        .iter()
        .filter(|e| e["actor"] == self_actor.as_str())
        .map(|e| (e["action"].as_str().unwrap_or(""), e["result"].as_str().unwrap_or("")))
        .collect();
    assert!(actions.contains(&("key.create", "ok")) && actions.contains(&("key.revoke", "ok")), "{actions:?}");
    let others = admin(&gw, "GET", "/v1/audit?tenant=ss-two", "").json();
    assert!(
        others["items"].as_array().is_some_and(|a| !a.is_empty() && a.iter().all(|e| e["tenant"] == "ss-two")),
        "{others}"
    );

    // The file holds every entry and no secret.
    let text = std::fs::read_to_string(gw.dir.join("audit.log")).expect("audit.log");
    assert!(text.lines().count() >= entries.len());
    assert!(text.contains("audit-suspend-1"));
    for s in &secrets {
        assert!(!text.contains(s.as_str()), "the audit log holds the secret {s}");
        assert!(!text.contains(&s[8..]), "the audit log holds part of the secret {s}");
    }
    let all = admin(&gw, "GET", "/v1/audit", "").text();
    for s in &secrets {
        assert!(!all.contains(s.as_str()), "GET /v1/audit shows the secret {s}");
    }
}

// ---------------------------------------------------------------------------------------------
// 10: hot reload
// ---------------------------------------------------------------------------------------------

#[test]
fn reloads_swap_the_config_refuse_invalid_ones_and_drop_no_request() {
    let echo = Echo::start();
    let base = config(echo.addr, EMBEDDED, "", "free");
    let mut gw = Gateway::start(&base);
    let tiers = |gw: &Gateway| {
        let r = admin(gw, "GET", "/v1/tiers", "");
        let mut names: Vec<String> = expect(&r, 200).json()["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|t| t["name"].as_str().expect("name").to_string())
            .collect();
        names.sort();
        names
    };
    assert_eq!(tiers(&gw), ["free", "pro", "slow"]);
    let slow = admin(&gw, "GET", "/v1/tiers", "").json()["items"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["name"] == "slow").cloned())
        .expect("slow");
    assert_eq!(
        (slow["rate"]["limit"].as_u64(), slow["rate"]["period_seconds"].as_u64()),
        (Some(1), Some(60)),
        "{slow}"
    );
    create_tenant(gw.admin, "managed", "free");
    let (_, managed_secret) = create_key(gw.admin, "managed", &["read"]);

    // POST /v1/reload picks up a new tier.
    let gold = "[tiers.gold]\nupstream = \"default\"\nfeatures = [\"streaming\"]";
    rewrite_config(&gw, &config(echo.addr, EMBEDDED, gold, "free"));
    let r = admin(&gw, "POST", "/v1/reload", "");
    let v = expect(&r, 200).json();
    assert_eq!(v["status"], "reloaded");
    assert!(v["summary"].as_str().is_some_and(|s| !s.is_empty()), "{v}");
    assert_eq!(tiers(&gw), ["free", "gold", "pro", "slow"]);
    assert_eq!(metric(gw.admin, "tollgate_config_reloads_total{result=\"ok\"}"), 1);
    // A tenant may move onto it, and API tenants survive the reload.
    expect(&admin(&gw, "PUT", "/v1/tenants/managed/tier", r#"{"tier": "gold"}"#), 200);
    let r = call(gw.addr, "/x", &managed_secret);
    assert_eq!(expect(&r, 200).upstream_headers()["x-tenant-tier"], "gold");

    // An invalid file is refused with its errors; the running config stays.
    std::fs::write(
        &gw.config_path,
        render(&config(echo.addr, EMBEDDED, gold, "missing-tier"), gw.addr, gw.admin, &gw.dir),
    )
    .expect("write");
    let r = admin(&gw, "POST", "/v1/reload", "");
    let v = problem(&r, 422, "invalid_config");
    let errors = v["errors"].as_array().expect("errors");
    assert!(!errors.is_empty() && errors.iter().any(|e| e.as_str().is_some_and(|s| s.contains("missing-tier"))), "{v}");
    assert_eq!(tiers(&gw), ["free", "gold", "pro", "slow"]);
    let r = call(gw.addr, "/x", ACME_KEY);
    assert_eq!(expect(&r, 200).upstream_headers()["x-tenant-tier"], "free");
    expect(&call(gw.addr, "/x", &managed_secret), 200);
    std::fs::write(&gw.config_path, "[server\nthis is not toml").expect("write");
    problem(&admin(&gw, "POST", "/v1/reload", ""), 422, "invalid_config");
    assert_eq!(metric(gw.admin, "tollgate_config_reloads_total{result=\"error\"}"), 2);
    assert_eq!(metric(gw.admin, "tollgate_config_reloads_total{result=\"ok\"}"), 1);
    // SIGHUP with an invalid file: counted, refused, the process stays up.
    gw.signal("HUP");
    within(Instant::now(), Duration::from_secs(5), "SIGHUP reload counted as an error", || {
        match metric(gw.admin, "tollgate_config_reloads_total{result=\"error\"}") {
            3 => Ok(()),
            n => Err(n.to_string()),
        }
    });
    expect(&call(gw.addr, "/x", ACME_KEY), 200);

    // SIGHUP with a valid file applies it.
    let platinum = format!("{gold}\n\n[tiers.platinum]\nupstream = \"default\"");
    rewrite_config(&gw, &config(echo.addr, EMBEDDED, &platinum, "gold"));
    gw.signal("HUP");
    within(Instant::now(), Duration::from_secs(5), "SIGHUP applies the new config", || {
        let r = call(gw.addr, "/x", ACME_KEY);
        match r.status {
            200 if r.upstream_headers()["x-tenant-tier"] == "gold" => Ok(()),
            _ => Err(format!("{} {}", r.status, r.text())),
        }
    });
    assert_eq!(tiers(&gw), ["free", "gold", "platinum", "pro", "slow"]);
    assert_eq!(metric(gw.admin, "tollgate_config_reloads_total{result=\"ok\"}"), 2);
    assert!(gw.wait_exit(Duration::from_millis(200)).is_none(), "SIGHUP stopped the gateway");

    // 20 reloads, alternating HTTP and SIGHUP, under continuous keep-alive traffic.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let addr = gw.addr;
    let workers: Vec<_> = (0..4)
        .map(|i| {
            let (stop, sent) = (stop.clone(), sent.clone());
            let secret = if i % 2 == 0 { ACME_KEY.to_string() } else { managed_secret.clone() };
            std::thread::spawn(move || {
                let auth = bearer(&secret);
                let mut failures: Vec<String> = Vec::new();
                let mut conn = Conn::open(addr).expect("connect");
                while !stop.load(Ordering::Relaxed) {
                    match conn.request("GET", "/x", &[("authorization", &auth)], b"") {
                        Ok(r) if r.status == 200 => {}
                        Ok(r) => failures.push(format!("{} {}", r.status, r.text())),
                        Err(e) => {
                            failures.push(format!("io: {e}"));
                            conn = Conn::open(addr).expect("reconnect");
                        }
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                failures
            })
        })
        .collect();
    let ok_before = metric(gw.admin, "tollgate_config_reloads_total{result=\"ok\"}");
    std::thread::sleep(Duration::from_millis(100));
    for i in 0..20 {
        let extra = format!("{platinum}\n\n[tiers.extra-{i}]\nupstream = \"default\"");
        rewrite_config(&gw, &config(echo.addr, EMBEDDED, &extra, if i % 4 < 2 { "gold" } else { "free" }));
        if i % 2 == 0 {
            expect(&admin(&gw, "POST", "/v1/reload", ""), 200);
        } else {
            gw.signal("HUP");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    within(Instant::now(), Duration::from_secs(5), "all 20 reloads applied", || {
        match metric(gw.admin, "tollgate_config_reloads_total{result=\"ok\"}") - ok_before {
            20 => Ok(()),
            n => Err(format!("{n} reloads")),
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let failures: Vec<String> = workers.into_iter().flat_map(|w| w.join().expect("worker")).collect();
    let total = sent.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed during reloads: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(total >= 200, "only {total} requests were sent during the reloads");
    assert!(tiers(&gw).contains(&"extra-19".to_string()), "{:?}", tiers(&gw));
    assert_eq!(metric(gw.admin, "tollgate_config_reloads_total{result=\"error\"}"), 3);
    // The reloads are in the audit log as well (the HTTP ones carry an admin actor).
    let audit = admin(&gw, "GET", "/v1/audit", "").json();
    let reloads =
        audit["items"].as_array().map(|a| a.iter().filter(|e| e["action"] == "config.reload").count()).unwrap_or(0);
    assert!(reloads >= 13, "{reloads} reload entries in {audit}");
}

/// A change made on one instance must not be silently undone by a write on another that was
/// based on its older snapshot (here: a rename on B right after a suspension on A).
#[test]
fn a_write_on_one_instance_does_not_undo_a_suspension_made_on_another() {
    let redis = Redis::start();
    let echo = Echo::start();
    let store = format!("kind = \"redis\"\nurl = \"{}\"", redis.url());
    let template = config(echo.addr, &store, "", "free");
    let a = Gateway::start(&template);
    let b = Gateway::start(&template);
    create_tenant(a.admin, "race", "free");
    let (_, secret) = create_key(a.admin, "race", &["read"]);
    within(Instant::now(), Duration::from_secs(1), "the tenant reaches B", || {
        match call(b.addr, "/x", &secret).status {
            200 => Ok(()),
            s => Err(s.to_string()),
        }
    });

    expect(&admin(&a, "POST", "/v1/tenants/race/suspend", ""), 200);
    let renamed = admin(&b, "PATCH", "/v1/tenants/race", r#"{"name": "Race Ltd"}"#);
    assert!(renamed.status == 200 || renamed.status == 409, "{} {}", renamed.status, renamed.text());
    let t = Instant::now();
    for gw in [&a, &b] {
        within(t, Duration::from_secs(1), "the suspension holds on both instances", || {
            let v = admin(gw, "GET", "/v1/tenants/race", "").json();
            let r = call(gw.addr, "/x", &secret);
            match (v["status"].as_str(), r.status) {
                (Some("suspended"), 403) => Ok(()),
                _ => Err(format!("tenant {v}, data plane {} {}", r.status, r.text())),
            }
        });
    }
}

/// A reload that removes a tier an API tenant is on must not silently cut that tenant off:
/// either the reload is refused, or the tenant is still served.
#[test]
fn a_reload_does_not_silently_strand_an_api_tenant_on_a_removed_tier() {
    let echo = Echo::start();
    let gold = "[tiers.gold]\nupstream = \"default\"";
    let gw = Gateway::start(&config(echo.addr, EMBEDDED, gold, "free"));
    create_tenant(gw.admin, "goldie", "gold");
    let (_, secret) = create_key(gw.admin, "goldie", &["read"]);
    expect(&call(gw.addr, "/x", &secret), 200);
    rewrite_config(&gw, &config(echo.addr, EMBEDDED, "", "free"));
    let reload = admin(&gw, "POST", "/v1/reload", "");
    let served = call(gw.addr, "/x", &secret);
    let listed = admin(&gw, "GET", "/v1/tenants/goldie", "").json();
    assert!(
        (reload.status == 422 && reload.text().contains("gold")) || served.status == 200,
        "reload answered {} {}; tenant `goldie` (listed as {listed}) now answers {} {}",
        reload.status,
        reload.text(),
        served.status,
        served.text()
    );
}

// ---------------------------------------------------------------------------------------------
// 11: the rotation grace period, on an injected clock
// ---------------------------------------------------------------------------------------------

mod rotation {
    use super::common::temp_dir;
    use pingora::http::RequestHeader;
    use std::sync::Arc;
    use tollgate::admin::core::{Actor, AdminCore, CreateKey, CreateTenant};
    use tollgate::clock::{Clock, ManualClock, SharedClock};
    use tollgate::error::Reject;
    use tollgate::limits::Limits;
    use tollgate::metrics::Metrics;
    use tollgate::pipeline::authenticate::{authenticate, Principal};
    use tollgate::pipeline::canonical::{of_request, RequestPolicy};
    use tollgate::pipeline::resolve::resolve;
    use tollgate::runtime::{shared, Runtime};
    use tollgate::store::embedded::Embedded;
    use tollgate::store::{Counters, DirectoryStore, Ledger};

    const HOUR: i64 = 3_600_000;
    const MINUTE: i64 = 60_000;

    /// Authenticates a request carrying `secret` against the current snapshot: the key id.
    fn authenticate_now(core: &AdminCore, clock: &ManualClock, secret: &str) -> Result<String, Reject> {
        let rt = core.runtime.load();
        let mut req = RequestHeader::build("GET", b"/x", None).expect("request header");
        req.insert_header("host", "localhost").expect("host");
        req.insert_header("authorization", format!("Bearer {secret}")).expect("authorization");
        let canon = of_request(&req, &RequestPolicy::of(&rt.config))?;
        let hints = resolve(&rt.config.tenancy, &canon, &req, Some([127, 0, 0, 1].into()))?;
        match authenticate(&rt.directory, &hints, clock.now_millis())? {
            Principal::Keyed { key } => Ok(key.id.to_string()),
            Principal::Anonymous { .. } | Principal::Token { .. } => panic!("a request with a key came out without it"),
        }
    }

    #[tokio::test]
    async fn the_old_key_works_until_the_grace_period_ends_and_not_a_millisecond_longer() {
        let dir = temp_dir("admin-rotation");
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
"#,
            dir.display()
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
        let runtime = shared(Runtime::new(config));
        let core = AdminCore::new(
            runtime,
            store.clone() as Arc<dyn DirectoryStore>,
            store.clone() as Arc<dyn Ledger>,
            limits,
            Arc::new(Metrics::new()),
            clock,
            config_path,
            dir.join("audit.log"),
        );
        let actor = Actor { id: "admin:test".into(), request_id: "rotation-test".into() };
        let tenant: CreateTenant =
            serde_json::from_value(serde_json::json!({"id": "rot", "tier": "free"})).expect("tenant");
        core.create_tenant(&actor, tenant).await.expect("create tenant");
        let req = CreateKey {
            name: Some("main".into()),
            scopes: vec!["read".into(), "generate".into()],
            expires_in_days: None,
        };
        let (old, old_secret) = core.create_key(&actor, "rot", req).await.expect("create key");
        assert_eq!(authenticate_now(&core, &manual, &old_secret), Ok(old.id.clone()));

        let (new, new_secret) = core.rotate_key(&actor, &old.id, 2, None).await.expect("rotate");
        assert_ne!(new.id, old.id);
        assert_eq!(new.scopes, old.scopes);
        assert_eq!(authenticate_now(&core, &manual, &old_secret), Ok(old.id.clone()));
        assert_eq!(authenticate_now(&core, &manual, &new_secret), Ok(new.id.clone()));
        let status = |id: &str| {
            let id = id.to_string();
            let core = core.clone();
            async move { core.keys("rot").await.expect("keys").into_iter().find(|k| k.id == id).map(|k| k.status) }
        };
        assert_eq!(status(&old.id).await, Some("rotating"));

        manual.set_millis(start + HOUR + 59 * MINUTE);
        assert_eq!(
            authenticate_now(&core, &manual, &old_secret),
            Ok(old.id.clone()),
            "the old key failed inside the grace period"
        );
        assert_eq!(authenticate_now(&core, &manual, &new_secret), Ok(new.id.clone()));
        manual.set_millis(start + 2 * HOUR - 1);
        assert_eq!(authenticate_now(&core, &manual, &old_secret), Ok(old.id.clone()));

        manual.set_millis(start + 2 * HOUR);
        assert_eq!(
            authenticate_now(&core, &manual, &old_secret),
            Err(Reject::KeyRevoked),
            "the old key outlived its grace period"
        );
        assert_eq!(authenticate_now(&core, &manual, &new_secret), Ok(new.id.clone()));
        assert_eq!(status(&old.id).await, Some("revoked"));
        assert_eq!(status(&new.id).await, Some("active"));
        manual.advance_millis(30 * 86_400_000);
        assert_eq!(authenticate_now(&core, &manual, &old_secret), Err(Reject::KeyRevoked));
        assert_eq!(authenticate_now(&core, &manual, &new_secret), Ok(new.id.clone()));
        // A rotated-away key cannot be rotated again once its grace is over.
        let again = core.rotate_key(&actor, &old.id, 1, None).await;
        assert_eq!(again.map(|_| ()).map_err(|e| e.status()), Err(409));
    }
}
