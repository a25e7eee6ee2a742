//! The admin CLI (`tollgate tenants …`, `tollgate keys …`, `tollgate audit`) against a running
//! gateway: every subcommand, the token from `TOLLGATE_ADMIN_TOKEN`, and errors as exit code 1
//! with the problem's detail (2 for a command line that cannot be sent).

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

/// Runs the CLI like [`cli`] and returns the exit code, stdout and stderr as they are.
fn cli_raw(gw: &Gateway, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(bin())
        .args(&args[..1])
        .arg("--admin-url")
        .arg(format!("http://{}", gw.admin))
        .args(&args[1..])
        .env("TOLLGATE_ADMIN_TOKEN", TOKEN)
        .output()
        .expect("run the CLI");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn admin_gateway(echo: &Echo) -> Gateway {
    let tail = format!("[admin]\ntoken_hash = \"{}\"\n", hash_of(TOKEN));
    Gateway::start(&standard_config(echo.addr, Extra { tail: &tail, ..Extra::default() }))
}

#[test]
fn tenants_update_changes_only_what_is_given() {
    let echo = Echo::start();
    let gw = admin_gateway(&echo);
    let (ok, t, err) = cli(
        &gw,
        &[
            "tenants",
            "create",
            "hooli",
            "--tier",
            "free",
            "--email",
            "it@hooli.example",
            "--subdomain",
            "hooli",
            "--ip-allow",
            "192.0.2.0/24",
            "--override",
            "rate.requests_per_minute=120",
            "--billing-anchor-day",
            "15",
            "--timezone",
            "Europe/Berlin",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(t["ip_allow"], serde_json::json!(["192.0.2.0/24"]));
    assert_eq!(t["overrides"], serde_json::json!({"rate.requests_per_minute": 120}));
    assert_eq!((t["billing_anchor_day"].as_u64(), t["timezone"].as_str()), (Some(15), Some("Europe/Berlin")));

    let (ok, t, err) =
        cli(&gw, &["tenants", "update", "hooli", "--name", "Hooli XYZ", "--tier", "pro", "--no-ip-allow"]);
    assert!(ok, "{err}");
    assert_eq!((t["name"].as_str(), t["tier"].as_str()), (Some("Hooli XYZ"), Some("pro")));
    assert_eq!(t["ip_allow"], serde_json::json!([]));
    // Everything not named stays.
    assert_eq!(t["email"], "it@hooli.example");
    assert_eq!(t["subdomains"], serde_json::json!(["hooli"]));
    assert_eq!(t["overrides"], serde_json::json!({"rate.requests_per_minute": 120}));
    assert_eq!(t["billing_anchor_day"], 15);

    let (ok, t, _) = cli(&gw, &["tenants", "update", "hooli", "--subdomain", "hooli-eu", "--subdomain", "hooli-us"]);
    assert!(ok && t["subdomains"] == serde_json::json!(["hooli-eu", "hooli-us"]), "{t}");
    let (ok, t, _) =
        cli(&gw, &["tenants", "update", "hooli", "--no-overrides", "--no-subdomains", "--status", "suspended"]);
    assert!(ok, "{t}");
    assert_eq!(
        (&t["overrides"], &t["subdomains"], &t["status"]),
        (&serde_json::json!({}), &serde_json::json!([]), &serde_json::json!("suspended"))
    );

    // Nothing to change is a usage error; the API is not called.
    let (code, out, err) = cli_raw(&gw, &["tenants", "update", "hooli"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(err.contains("nothing to change") && err.contains("--help"), "{err}");
    // A clear flag and a new value for the same field contradict each other.
    let (code, _, _) = cli_raw(&gw, &["tenants", "update", "hooli", "--subdomain", "x", "--no-subdomains"]);
    assert_eq!(code, Some(2));
    let (code, _, err) = cli_raw(&gw, &["tenants", "update", "hooli", "--override", "rate.requests_per_minute"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("PATH=VALUE"), "{err}");

    // The API's refusals: a config tenant, an unknown tenant, an unknown tier.
    let (code, _, err) = cli_raw(&gw, &["tenants", "update", "acme", "--name", "x"]);
    assert_eq!(code, Some(1));
    assert!(err.starts_with("409 (conflict)") && err.contains("edit the file and reload"), "{err}");
    let (code, _, err) = cli_raw(&gw, &["tenants", "update", "nobody", "--name", "x"]);
    assert_eq!(code, Some(1));
    assert!(err.starts_with("404 (not_found)") && err.contains("nobody"), "{err}");
    let (code, _, err) = cli_raw(&gw, &["tenants", "update", "hooli", "--tier", "gold"]);
    assert_eq!(code, Some(1));
    assert!(err.starts_with("422 (unprocessable)") && err.contains("gold"), "{err}");
}

#[test]
fn tenants_delete_removes_the_tenant_and_its_keys() {
    let echo = Echo::start();
    let gw = admin_gateway(&echo);
    assert!(cli(&gw, &["tenants", "create", "hooli", "--tier", "free"]).0);
    let (ok, created, err) = cli(&gw, &["keys", "create", "hooli", "--scopes", "read"]);
    assert!(ok, "{err}");
    let auth = bearer(created["secret"].as_str().expect("secret"));
    assert_eq!(gw.get("/v1/x", &[("authorization", &auth)]).status, 200);

    let (code, out, err) = cli_raw(&gw, &["tenants", "delete", "hooli"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "deleted tenant `hooli` and its keys\n");
    assert_eq!(gw.get("/v1/x", &[("authorization", &auth)]).problem_code(), "invalid_key");
    let (code, _, err) = cli_raw(&gw, &["tenants", "get", "hooli"]);
    assert_eq!(code, Some(1));
    assert!(err.starts_with("404 (not_found)"), "{err}");

    let (code, out, err) = cli_raw(&gw, &["tenants", "delete", "hooli"]);
    assert_eq!((code, out.as_str()), (Some(1), ""));
    assert!(err.starts_with("404 (not_found)"), "{err}");
    let (code, _, err) = cli_raw(&gw, &["tenants", "delete", "acme"]);
    assert_eq!(code, Some(1));
    assert!(err.starts_with("409 (conflict)"), "{err}");
    assert_eq!(gw.get("/v1/x", &[("authorization", &bearer(ACME_KEY))]).status, 200);
}

#[test]
fn keys_create_without_scopes_makes_a_key_without_scopes_as_the_api_does() {
    let echo = Echo::start();
    let gw = admin_gateway(&echo);
    assert!(cli(&gw, &["tenants", "create", "hooli", "--tier", "free"]).0);
    let (ok, created, err) = cli(&gw, &["keys", "create", "hooli", "--name", "bare"]);
    assert!(ok, "{err}");
    assert_eq!(created["key"]["scopes"], serde_json::json!([]));
    assert!(err.contains("no scopes") && err.contains("--scopes"), "{err}");
    let (ok, created, err) = cli(&gw, &["keys", "create", "hooli", "--scopes", "read, generate"]);
    assert!(ok && err.is_empty(), "{err}");
    assert_eq!(created["key"]["scopes"], serde_json::json!(["read", "generate"]));
}

#[test]
fn audit_prints_one_entry_per_line_and_filters() {
    let echo = Echo::start();
    let gw = admin_gateway(&echo);
    assert!(cli(&gw, &["tenants", "create", "hooli", "--tier", "free"]).0);
    assert!(cli(&gw, &["tenants", "create", "initech", "--tier", "free"]).0);
    assert!(cli(&gw, &["tenants", "update", "hooli", "--name", "Hooli"]).0);
    assert!(!cli(&gw, &["tenants", "suspend", "acme"]).0);
    let (code, _, _) = cli_raw(&gw, &["tenants", "delete", "hooli"]);
    assert_eq!(code, Some(0));

    let entries = |args: &[&str]| -> Vec<serde_json::Value> {
        let (code, out, err) = cli_raw(&gw, args);
        assert_eq!(code, Some(0), "{err}");
        out.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
    };
    let pair = |e: &serde_json::Value| {
        (
            e["action"].as_str().unwrap_or("").to_string(),
            e["tenant"].as_str().unwrap_or("").to_string(),
            e["result"].as_str().unwrap_or("").to_string(),
        )
    };
    let all: Vec<_> = entries(&["audit"]).iter().map(pair).collect();
    let s = |a: &str, t: &str, r: &str| (a.to_string(), t.to_string(), r.to_string());
    assert_eq!(
        all,
        [
            s("tenant.create", "hooli", "ok"),
            s("tenant.create", "initech", "ok"),
            s("tenant.update", "hooli", "ok"),
            s("tenant.suspend", "acme", "error: conflict"),
            s("tenant.delete", "hooli", "ok"),
        ]
    );
    let hooli: Vec<_> = entries(&["audit", "--tenant", "hooli", "--limit", "2"]).iter().map(pair).collect();
    assert_eq!(hooli, [s("tenant.update", "hooli", "ok"), s("tenant.delete", "hooli", "ok")]);
    assert!(entries(&["audit", "--tenant", "nobody"]).is_empty());

    let (code, _, err) = cli_raw(&gw, &["audit", "--limit", "0"]);
    assert_eq!(code, Some(2), "{err}");
}

#[test]
fn ids_cannot_reach_another_endpoint() {
    let echo = Echo::start();
    let gw = admin_gateway(&echo);
    // Sent as one path segment, `acme/keys` is a bad tenant id, not acme's key list.
    let (code, out, err) = cli_raw(&gw, &["tenants", "get", "acme/keys"]);
    assert_eq!((code, out.as_str()), (Some(1), ""), "{err}");
    assert!(err.starts_with("400 (bad_request)"), "{err}");
    let (code, _, err) = cli_raw(&gw, &["tenants", "get", "no body"]);
    assert_eq!(code, Some(1));
    assert!(err.starts_with("400 (bad_request)"), "{err}");
    let (code, out, err) = cli_raw(&gw, &["tenants", "list", "--tier", "free&status=suspended"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).expect("JSON")["items"], serde_json::json!([]));
}
