//! Two gateways on one Redis follow the directory's change feed: a key created, a tenant
//! suspended and reactivated, a key revoked on one instance reach the other; an instance that
//! was stopped while the feed moved past what it holds loads every record again and ends up
//! with the same answers. `/readyz` reports the directory once it is loaded.

mod common;
use common::*;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const TOKEN: &str = "tg_admin_fleetTOKENxxxxxxxxxxxxxxxxxxxxxxxxx";

fn config(redis: &Redis, echo: &Echo) -> String {
    format!(
        r#"{SERVER_TABLE}
[store]
kind = "redis"
url = "{url}"

[admin]
token_hash = "{token}"
audit_log = "{{DIR}}/audit.log"

[upstreams.default]
servers = ["{echo}"]

[tiers.free]
upstream = "default"
"#,
        url = redis.url(),
        token = hash_of(TOKEN),
        echo = echo.addr,
    )
}

fn admin(addr: SocketAddr, method: &str, path: &str, body: Value) -> Resp {
    let auth = bearer(TOKEN);
    let body = if body.is_null() { String::new() } else { body.to_string() };
    let mut headers = vec![("authorization", auth.as_str())];
    if !body.is_empty() {
        headers.push(("content-type", "application/json"));
    }
    request(addr, method, path, &headers, body.as_bytes()).expect("admin request")
}

fn status_with(gw: &Gateway, secret: &str) -> (u16, String) {
    let r = gw.get("/feed", &[("authorization", &bearer(secret))]);
    let code = if r.status == 200 { String::new() } else { r.problem_code() };
    (r.status, code)
}

/// Waits until `gw` answers `secret` with `status` (and problem `code`), up to `within`.
fn wait_answer(gw: &Gateway, secret: &str, status: u16, code: &str, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let got = status_with(gw, secret);
        if got == (status, code.to_string()) {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "still {got:?} after {within:?}, waiting for {status} {code}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_ready(gw: &Gateway) -> Value {
    let start = Instant::now();
    loop {
        let r = get(gw.admin, "/readyz", &[]).expect("readyz");
        if r.status == 200 {
            return r.json();
        }
        assert!(start.elapsed() < Duration::from_secs(10), "not ready: {}", r.text());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn changes_reach_the_other_instance_and_a_stopped_one_catches_up_by_loading_again() {
    let redis = Redis::start();
    let echo = Echo::start();
    let a = Gateway::start(&config(&redis, &echo));
    let b = Gateway::start(&config(&redis, &echo));
    let ready = wait_ready(&b);
    assert_eq!(ready["directory"], "loaded", "{ready}");
    wait_ready(&a);

    // A key created on A answers on B.
    let r = admin(a.admin, "POST", "/v1/tenants", json!({"id": "feedco", "tier": "free"}));
    assert_eq!(r.status, 201, "{}", r.text());
    let r = admin(a.admin, "POST", "/v1/tenants/feedco/keys", json!({"scopes": ["read"]}));
    assert_eq!(r.status, 201, "{}", r.text());
    let (key_id, secret) =
        (r.json()["key"]["id"].as_str().unwrap().to_string(), r.json()["secret"].as_str().unwrap().to_string());
    assert_eq!(status_with(&a, &secret).0, 200, "the writer applies its own change at once");
    let took = wait_answer(&b, &secret, 200, "", Duration::from_secs(5));
    eprintln!("a new key answered on the other instance after {took:?}");

    // A suspension and a reactivation, each one change.
    assert_eq!(admin(a.admin, "POST", "/v1/tenants/feedco/suspend", Value::Null).status, 200);
    wait_answer(&b, &secret, 403, "tenant_suspended", Duration::from_secs(5));
    assert_eq!(admin(a.admin, "POST", "/v1/tenants/feedco/reactivate", Value::Null).status, 200);
    wait_answer(&b, &secret, 200, "", Duration::from_secs(5));
    // The other instance lists what it applied, from memory.
    let listed = admin(b.admin, "GET", "/v1/tenants/feedco/keys", Value::Null);
    assert_eq!(listed.status, 200, "{}", listed.text());
    assert_eq!(listed.json()["items"][0]["id"], key_id.as_str());

    // B stops; meanwhile the key is revoked, a second tenant with a key is created, and the
    // feed is emptied, as if more changes than it keeps had gone by.
    b.signal("STOP");
    assert_eq!(admin(a.admin, "DELETE", &format!("/v1/keys/{key_id}"), Value::Null).status, 200);
    assert_eq!(admin(a.admin, "POST", "/v1/tenants", json!({"id": "later", "tier": "free"})).status, 201);
    let r = admin(a.admin, "POST", "/v1/tenants/later/keys", json!({"scopes": ["read"]}));
    let later = r.json()["secret"].as_str().unwrap().to_string();
    assert_eq!(status_with(&a, &secret), (401, "key_revoked".into()));
    assert_eq!(redis.command(&["DEL", "tg:{dir}:changes"]), ":1");
    b.signal("CONT");
    wait_answer(&b, &secret, 401, "key_revoked", Duration::from_secs(5));
    wait_answer(&b, &later, 200, "", Duration::from_secs(5));
    assert!(b.log().contains("behind the directory's change feed"), "{}", b.log());

    // Both instances hold the same directory.
    let count = |gw: &Gateway| {
        let r = wait_ready(gw);
        (r["tenants"].as_u64(), r["keys"].as_u64())
    };
    assert_eq!(count(&a), count(&b));
    assert_eq!(count(&a), (Some(2), Some(2)));
}

/// A store whose history changed under the instances (a failover that lost the last write, then
/// new writes under the same versions): both notice, and load every record again, instead of
/// applying the new changes on top of the lost one.
#[test]
fn an_instance_notices_a_store_history_that_changed_and_loads_again() {
    let redis = Redis::start();
    let echo = Echo::start();
    let a = Gateway::start(&config(&redis, &echo));
    let b = Gateway::start(&config(&redis, &echo));
    wait_ready(&a);
    wait_ready(&b);
    assert_eq!(admin(a.admin, "POST", "/v1/tenants", json!({"id": "lost", "tier": "free"})).status, 201);
    let r = admin(a.admin, "POST", "/v1/tenants/lost/keys", json!({"scopes": ["read"]}));
    assert_eq!(r.status, 201, "{}", r.text());
    let (key_id, secret) =
        (r.json()["key"]["id"].as_str().unwrap().to_string(), r.json()["secret"].as_str().unwrap().to_string());
    wait_answer(&b, &secret, 200, "", Duration::from_secs(5));

    // The key's write is lost, as in a failover to a replica that had not received it.
    b.signal("STOP");
    let v: u64 = redis.command(&["GET", "tg:{dir}:version"]).trim_start_matches(['$', ':']).parse().expect("version");
    assert!(redis.command(&["ZREMRANGEBYSCORE", "tg:{dir}:changes", &v.to_string(), &v.to_string()]).starts_with(":1"));
    redis.command(&["DECR", "tg:{dir}:version"]);
    redis.command(&["HDEL", "tg:{dir}:keys", &key_id]);
    redis.command(&["SREM", "tg:{dir}:tenant-keys:lost", &key_id]);
    // New writes take the lost version and the next one.
    assert_eq!(admin(a.admin, "POST", "/v1/tenants", json!({"id": "after-1", "tier": "free"})).status, 201);
    assert_eq!(admin(a.admin, "POST", "/v1/tenants", json!({"id": "after-2", "tier": "free"})).status, 201);
    b.signal("CONT");

    // Both end with the store's history: the lost key is gone, both new tenants are there.
    for gw in [&a, &b] {
        wait_answer(gw, &secret, 401, "invalid_key", Duration::from_secs(5));
        let start = Instant::now();
        while admin(gw.admin, "GET", "/v1/tenants/after-1", Value::Null).status != 200 {
            assert!(start.elapsed() < Duration::from_secs(5), "after-1 never reached {}", gw.admin);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert!(b.log().contains("history is not the one this instance followed"), "{}", b.log());
}
