//! The admin CLI (`tollgate tenants …`, `tollgate keys …`) against a running gateway: every
//! subcommand, the token from `TOLLGATE_ADMIN_TOKEN`, and errors as exit code 1 with the
//! problem's detail.

mod common;
use common::*;
use std::process::Command;

const TOKEN: &str = "tg_admin_cliTOKENxxxxxxxxxxxxxxxxxxxxxxxxxx";

fn cli(gw: &Gateway, args: &[&str]) -> (bool, serde_json::Value, String) {
    let out = Command::new(bin())
        .args(&args[..1])
        .arg("--admin-url")
        .arg(format!("http://{}", gw.admin))
        .args(&args[1..])
        .env("TOLLGATE_ADMIN_TOKEN", TOKEN)
        .output()
        .expect("run the CLI");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let v = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
    (out.status.success(), v, String::from_utf8_lossy(&out.stderr).to_string())
}

#[test]
fn every_admin_subcommand_works_end_to_end() {
    let echo = Echo::start();
    let tail = format!(
        "[admin]\ntoken_hash = \"{}\"\n\n[tiers.gold]\nupstream = \"default\"\nfeatures = [\"streaming\"]\n",
        hash_of(TOKEN)
    );
    let gw = Gateway::start(&standard_config(echo.addr, Extra { tail: &tail, ..Extra::default() }));

    let (ok, t, err) = cli(&gw, &["tenants", "create", "initech", "--tier", "free", "--name", "Initech"]);
    assert!(ok, "{err}");
    assert_eq!(
        (t["id"].as_str(), t["tier"].as_str(), t["source"].as_str()),
        (Some("initech"), Some("free"), Some("api"))
    );
    let (ok, list, _) = cli(&gw, &["tenants", "list", "--tier", "free"]);
    assert!(ok && list["items"].as_array().is_some_and(|i| i.iter().any(|t| t["id"] == "initech")));
    let (ok, t, _) = cli(&gw, &["tenants", "get", "initech"]);
    assert!(ok && t["name"] == "Initech");

    let (ok, created, err) = cli(&gw, &["keys", "create", "initech", "--scopes", "read,generate", "--name", "ci"]);
    assert!(ok, "{err}");
    let secret = created["secret"].as_str().expect("secret").to_string();
    let key_id = created["key"]["id"].as_str().expect("key id").to_string();
    let auth = bearer(&secret);
    let r = gw.get("/v1/x", &[("authorization", &auth)]);
    assert_eq!(r.status, 200);
    assert_eq!(r.upstream_headers()["x-tenant-id"], "initech");
    let (ok, keys, _) = cli(&gw, &["keys", "list", "initech"]);
    assert!(ok);
    assert!(!keys.to_string().contains(&secret) && !keys.to_string().contains("sha256:"));

    let (ok, t, _) = cli(&gw, &["tenants", "set-tier", "initech", "gold"]);
    assert!(ok && t["tier"] == "gold");
    assert_eq!(gw.get("/v1/x", &[("authorization", &auth)]).upstream_headers()["x-tenant-tier"], "gold");
    let (ok, _, _) = cli(&gw, &["tenants", "suspend", "initech"]);
    assert!(ok);
    assert_eq!(gw.get("/v1/x", &[("authorization", &auth)]).problem_code(), "tenant_suspended");
    let (ok, _, _) = cli(&gw, &["tenants", "reactivate", "initech"]);
    assert!(ok);
    assert_eq!(gw.get("/v1/x", &[("authorization", &auth)]).status, 200);

    let (ok, rotated, _) = cli(&gw, &["keys", "rotate", &key_id, "--grace-period-hours", "1"]);
    assert!(ok);
    let new_secret = rotated["secret"].as_str().expect("new secret").to_string();
    assert_eq!(rotated["key"]["scopes"], serde_json::json!(["read", "generate"]));
    assert_eq!(gw.get("/v1/x", &[("authorization", &bearer(&new_secret))]).status, 200);
    assert_eq!(gw.get("/v1/x", &[("authorization", &auth)]).status, 200, "the old key works during the grace period");
    let (ok, _, _) = cli(&gw, &["keys", "revoke", &key_id]);
    assert!(ok);
    assert_eq!(gw.get("/v1/x", &[("authorization", &auth)]).problem_code(), "key_revoked");

    // Errors: exit 1 with the problem's detail.
    let (ok, _, err) = cli(&gw, &["tenants", "get", "nobody"]);
    assert!(!ok);
    assert!(err.contains("404") && err.contains("nobody"), "{err}");
    let out = Command::new(bin())
        .args(["tenants", "--admin-url", &format!("http://{}", gw.admin), "list"])
        .env("TOLLGATE_ADMIN_TOKEN", "wrong")
        .output()
        .expect("cli");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
}
