//! Reloads that cannot empty the gateway by accident, against the real binary: `tollgate check`
//! (and every load) refuses an empty file; a reload (SIGHUP, `POST /v1/reload`, `tollgate
//! reload`) that would remove every tenant, every key, the admin token, or more than
//! `[admin] reload_max_removed_fraction` of the tenants is refused and changes nothing, unless
//! it is forced through the admin API; refused and forced reloads are audited.

mod common;
use common::*;
use serde_json::Value;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

const TOKEN: &str = "tg_admin_reloadSafetyTOKENxxxxxxxxxxxxxxxxxx";

/// The data-plane secret of tenant `t{i}`.
fn secret(i: usize) -> String {
    format!("tg_live_tenant{i:02}{}", "k".repeat(24))
}

/// A config with the tenants `t{i}` for each `i` in `tenants`, each with one key (unless
/// `!keys`), the admin token (unless `!token`), and `admin_extra` lines in `[admin]`. The
/// tenants come last, so cutting the file before a `[[tenants]]` table loses only tenants.
fn config(echo: SocketAddr, tenants: &[usize], keys: bool, token: bool, admin_extra: &str) -> String {
    let token_line = if token { format!("token_hash = \"{}\"", hash_of(TOKEN)) } else { String::new() };
    let mut out = format!(
        r#"# Tollgate, reload safety test
[server]
listen = ["{{LISTEN}}"]
admin_listen = "{{ADMIN}}"
threads = 1
upgrade_sock = "{{DIR}}/upgrade.sock"
pid_file = "{{DIR}}/tollgate.pid"
shutdown_grace = "0s"
shutdown_timeout = "1s"

[store]
kind = "embedded"
path = "{{DIR}}/tollgate.db"

[admin]
{token_line}
audit_log = "{{DIR}}/audit.log"
{admin_extra}

[upstreams.default]
servers = ["{echo}"]

[tiers.free]
upstream = "default"
"#
    );
    for &i in tenants {
        out.push_str(&format!("\n[[tenants]]\nid = \"t{i}\"\ntier = \"free\"\n"));
        if keys {
            out.push_str(&format!(
                "\n[[tenants.keys]]\nid = \"t{i}-key\"\nhash = \"{}\"\nscopes = [\"read\"]\n",
                hash_of(&secret(i))
            ));
        }
    }
    out
}

/// `text` cut just before its `nth` (0-based) `[[tenants]]` table, as a deploy that stopped
/// writing at a table boundary leaves it.
fn cut_before_tenant(text: &str, nth: usize) -> String {
    let at = text.match_indices("\n[[tenants]]\n").nth(nth).map(|(i, _)| i + 1).expect("enough tenants");
    text[..at].to_string()
}

/// Writes the config the way a deploy tool would: whole, then renamed.
fn write_config(gw: &Gateway, text: &str) {
    let tmp = gw.dir.join("tollgate.toml.next");
    std::fs::write(&tmp, render(text, gw.addr, gw.admin, &gw.dir)).expect("write config");
    std::fs::rename(&tmp, &gw.config_path).expect("rename config");
}

fn reload(gw: &Gateway, query: &str) -> Resp {
    let auth = bearer(TOKEN);
    request(gw.admin, "POST", &format!("/v1/reload{query}"), &[("authorization", &auth)], b"").expect("reload")
}

fn data(gw: &Gateway, i: usize) -> u16 {
    gw.get("/x", &[("authorization", &bearer(&secret(i)))]).status
}

/// The value of one sample in `/metrics`, 0 if absent.
fn metric(gw: &Gateway, series: &str) -> u64 {
    let r = get(gw.admin, "/metrics", &[]).expect("metrics");
    r.text()
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse::<f64>().ok()))
        .map(|v| v as u64)
        .unwrap_or(0)
}

fn reload_errors(gw: &Gateway) -> u64 {
    metric(gw, "tollgate_config_reloads_total{result=\"error\"}")
}

/// Waits until the gateway has counted `n` failed reloads.
fn wait_reload_errors(gw: &Gateway, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while reload_errors(gw) < n {
        assert!(Instant::now() < deadline, "the reload was not counted as refused:\n{}", gw.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts a 409 `reload_refused` whose detail names `what` and how to force; returns it.
fn refused(r: &Resp, what: &[&str]) -> String {
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.problem_code(), "reload_refused");
    let detail = r.json()["detail"].as_str().unwrap_or_default().to_string();
    for w in what.iter().chain(&["--force", "?force=true", "stays in place"]) {
        assert!(detail.contains(w), "`{w}` is not in the detail: {detail}");
    }
    detail
}

/// The reload entries of the audit log, as `(action, result)`.
fn audited_reloads(gw: &Gateway) -> Vec<(String, String)> {
    std::fs::read_to_string(gw.dir.join("audit.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["action"].as_str().is_some_and(|a| a.starts_with("config.")))
        .map(|v| (v["action"].as_str().unwrap_or("").to_string(), v["result"].as_str().unwrap_or("").to_string()))
        .collect()
}

fn pair(a: &str, b: &str) -> (String, String) {
    (a.to_string(), b.to_string())
}

fn check(path: &std::path::Path) -> (bool, String, String) {
    let out = Command::new(bin()).arg("check").arg("-c").arg(path).output().expect("run check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn check_refuses_an_empty_file_and_a_bad_fraction() {
    let dir = temp_dir("reload-check");
    let path = dir.join("tollgate.toml");
    for text in ["", "  \n\t\n", "# a config\n   # with only comments\n\n"] {
        std::fs::write(&path, text).expect("write");
        let (ok, stdout, stderr) = check(&path);
        assert!(!ok, "{text:?} was accepted: {stdout}");
        assert!(stdout.is_empty(), "{stdout}");
        assert!(stderr.contains(&format!("{}: error: the config file is empty", path.display())), "{stderr}");
        assert!(stderr.contains("restore the file") && stderr.contains("tollgate check"), "{stderr}");
    }

    // The setting is checked like every other key, at its line.
    let base = "[upstreams.main]\nservers = [\"127.0.0.1:9000\"]\n\n[tiers.free]\nupstream = \"main\"\n\n[admin]\n";
    for (value, needle) in [
        ("1.5", "from 0.0 to 1.0"),
        ("-0.1", "from 0.0 to 1.0"),
        ("nan", "from 0.0 to 1.0"),
        ("\"half\"", "must be a number"),
    ] {
        std::fs::write(&path, format!("{base}reload_max_removed_fraction = {value}\n")).expect("write");
        let (ok, _, stderr) = check(&path);
        assert!(!ok, "{value} was accepted");
        assert!(stderr.contains(&format!("{}:8:", path.display())) && stderr.contains(needle), "{value}: {stderr}");
    }
    for value in ["0", "1", "0.25", "1.0"] {
        std::fs::write(&path, format!("{base}reload_max_removed_fraction = {value}\n")).expect("write");
        let (ok, stdout, stderr) = check(&path);
        assert!(ok && stdout.starts_with("ok: "), "{value}: {stderr}");
    }
}

#[test]
fn sighup_with_an_empty_file_or_a_truncated_one_keeps_every_key_working() {
    let echo = Echo::start();
    let all: Vec<usize> = (0..4).collect();
    let full = config(echo.addr, &all, true, true, "");
    let gw = Gateway::start(&full);
    assert_eq!(data(&gw, 3), 200);
    let ready = get(gw.admin, "/readyz", &[]).expect("readyz").json();
    assert_eq!((ready["tenants"].as_u64(), ready["keys"].as_u64()), (Some(4), Some(4)), "{ready}");

    // An empty file (a deploy that truncated it): invalid, nothing changes.
    write_config(&gw, "");
    gw.signal("HUP");
    wait_reload_errors(&gw, 1);
    for i in &all {
        assert_eq!(data(&gw, *i), 200, "tenant t{i} lost its key after an empty-file SIGHUP");
    }
    let r = get(gw.admin, "/readyz", &[]).expect("readyz");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["tenants"].as_u64(), Some(4), "{}", r.text());
    // The admin token is still in force.
    let r = get(gw.admin, "/v1/tenants", &[("authorization", &bearer(TOKEN))]).expect("admin");
    assert_eq!(r.status, 200, "{}", r.text());

    // A file cut before its first tenant table: valid TOML, but every tenant and key gone.
    write_config(&gw, &cut_before_tenant(&full, 0));
    gw.signal("HUP");
    wait_reload_errors(&gw, 2);
    for i in &all {
        assert_eq!(data(&gw, *i), 200, "tenant t{i} lost its key after a truncated-file SIGHUP");
    }
    assert_eq!(get(gw.admin, "/readyz", &[]).expect("readyz").status, 200);
    assert_eq!(metric(&gw, "tollgate_config_reloads_total{result=\"ok\"}"), 0);
    assert!(gw.log().contains("every tenant (4 → 0)"), "the refusal is not in the process log:\n{}", gw.log());
    assert_eq!(
        audited_reloads(&gw),
        [pair("config.reload", "error: invalid_config"), pair("config.reload", "error: reload_refused")]
    );

    // The same file through the API is refused with what it would remove.
    refused(&reload(&gw, ""), &["every tenant (4 → 0)", "every key (4 → 0)"]);
    assert_eq!(data(&gw, 0), 200);
}

#[test]
fn removing_most_tenants_is_refused_by_default_and_applied_when_forced() {
    let echo = Echo::start();
    let all: Vec<usize> = (0..10).collect();
    let full = config(echo.addr, &all, true, true, "");
    let gw = Gateway::start(&full);

    // The unchanged file reloads as usual.
    let r = reload(&gw, "");
    assert_eq!(r.status, 200, "{}", r.text());
    // Cut after 4 of 10 tenants: 60% removed, over the default 0.5.
    write_config(&gw, &cut_before_tenant(&full, 4));
    let detail = refused(&reload(&gw, ""), &["6 of 10 tenants (60%", "`t4`", "reload_max_removed_fraction` = 0.5"]);
    assert!(detail.contains("and 1 more"), "{detail}");
    assert_eq!(data(&gw, 9), 200, "a refused reload removed a tenant");
    // `force` is true or false; anything else is a mistake, not a quiet "no".
    for bad in ["yes", "1", "TRUE", ""] {
        let r = reload(&gw, &format!("?force={bad}"));
        assert_eq!((r.status, r.problem_code()), (400, "bad_request".to_string()), "force={bad}: {}", r.text());
        assert!(r.json()["detail"].as_str().is_some_and(|d| d.contains("force")), "{}", r.text());
    }
    refused(&reload(&gw, "?force=false"), &["6 of 10"]);
    assert_eq!(data(&gw, 9), 200);

    // Half is allowed.
    write_config(&gw, &config(echo.addr, &[0, 1, 2, 3, 4], true, true, ""));
    let r = reload(&gw, "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!((data(&gw, 4), data(&gw, 5)), (200, 401));

    // The running config's bound applies: the new file cannot loosen the check on itself.
    let loose = config(echo.addr, &[0, 1], true, true, "reload_max_removed_fraction = 1.0");
    write_config(&gw, &loose);
    refused(&reload(&gw, ""), &["3 of 5 tenants (60%"]);
    assert_eq!(data(&gw, 4), 200);

    // Forced, it applies, and says what it removed.
    let r = reload(&gw, "?force=true");
    assert_eq!(r.status, 200, "{}", r.text());
    let warnings = r.json()["warnings"].to_string();
    assert!(warnings.contains("forced: the reload removed: 3 of 5 tenants"), "{warnings}");
    assert_eq!((data(&gw, 0), data(&gw, 1), data(&gw, 2), data(&gw, 4)), (200, 200, 401, 401));
    // Now the bound is 1.0: removing 4 of 5 tenants needs no force.
    let five = config(echo.addr, &[0, 1, 2, 3, 5], true, true, "reload_max_removed_fraction = 1.0");
    write_config(&gw, &five);
    assert_eq!(reload(&gw, "").status, 200);
    write_config(&gw, &config(echo.addr, &[0], true, true, "reload_max_removed_fraction = 1.0"));
    let r = reload(&gw, "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!((data(&gw, 0), data(&gw, 5)), (200, 401));

    let refusal = pair("config.reload", "error: reload_refused");
    assert_eq!(
        audited_reloads(&gw),
        [
            pair("config.reload", "ok"),
            refusal.clone(),
            refusal.clone(),
            pair("config.reload", "ok"),
            refusal,
            pair("config.force_reload", "ok"),
            pair("config.reload", "ok"),
            pair("config.reload", "ok"),
        ]
    );
}

#[test]
fn removing_every_key_or_the_admin_token_is_refused() {
    let echo = Echo::start();
    let gw = Gateway::start(&config(echo.addr, &[0, 1], true, true, ""));

    write_config(&gw, &config(echo.addr, &[0, 1], false, true, ""));
    let detail = refused(&reload(&gw, ""), &["every key (2 → 0)"]);
    assert!(!detail.contains("tenant"), "{detail}");
    assert_eq!(data(&gw, 1), 200);

    write_config(&gw, &config(echo.addr, &[0, 1], true, false, ""));
    refused(&reload(&gw, ""), &["the admin token (`[admin] token_hash`)"]);
    let r = get(gw.admin, "/v1/tiers", &[("authorization", &bearer(TOKEN))]).expect("admin");
    assert_eq!(r.status, 200, "the admin token stopped working: {}", r.text());

    // A forced reload may turn the admin API off; then the API says so.
    assert_eq!(reload(&gw, "?force=true").status, 200);
    let r = get(gw.admin, "/v1/tiers", &[("authorization", &bearer(TOKEN))]).expect("admin");
    assert_eq!((r.status, r.problem_code()), (401, "admin_disabled".to_string()));
    assert_eq!(data(&gw, 0), 200);
}

#[test]
fn tollgate_reload_refuses_then_forces() {
    let echo = Echo::start();
    let full = config(echo.addr, &[0, 1, 2], true, true, "");
    let gw = Gateway::start(&full);
    let cli = |args: &[&str]| {
        let out = Command::new(bin())
            .arg("reload")
            .arg("--admin-url")
            .arg(format!("http://{}", gw.admin))
            .args(args)
            .env("TOLLGATE_ADMIN_TOKEN", TOKEN)
            .output()
            .expect("run tollgate reload");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };

    let (code, stdout, stderr) = cli(&[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(serde_json::from_str::<Value>(&stdout).expect("JSON")["status"], "reloaded");

    write_config(&gw, &cut_before_tenant(&full, 0));
    let (code, stdout, stderr) = cli(&[]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stderr.starts_with("409 (reload_refused): "), "{stderr}");
    assert!(stderr.contains("every tenant (3 → 0)") && stderr.contains("--force"), "{stderr}");
    assert_eq!(data(&gw, 2), 200);

    let (code, stdout, stderr) = cli(&["--force"]);
    assert_eq!(code, Some(0), "{stderr}");
    let v: Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(v["status"], "reloaded");
    assert!(v["warnings"].to_string().contains("forced: the reload removed: every tenant (3 → 0)"), "{v}");
    assert_eq!(data(&gw, 2), 401);

    // Without a token the CLI says what to set; an invalid file is refused even when forced.
    let out = Command::new(bin())
        .args(["reload", "--admin-url", &format!("http://{}", gw.admin)])
        .env_remove("TOLLGATE_ADMIN_TOKEN")
        .output()
        .expect("cli");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TOLLGATE_ADMIN_TOKEN"));
    write_config(&gw, "");
    let (code, _, stderr) = cli(&["--force"]);
    assert_eq!(code, Some(1));
    assert!(stderr.starts_with("422 (invalid_config)") && stderr.contains("the config file is empty"), "{stderr}");
    assert_eq!(
        audited_reloads(&gw),
        [
            pair("config.reload", "ok"),
            pair("config.reload", "error: reload_refused"),
            pair("config.force_reload", "ok"),
            pair("config.force_reload", "error: invalid_config"),
        ]
    );
}
