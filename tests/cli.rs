//! The command line outside the admin API: `keygen --toml`, `usage report` on tenants that do
//! not exist, and what `make run` and `make test` install (`scripts/ensure-deps.sh`).

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const TOKEN: &str = "tg_admin_cliTOKENxxxxxxxxxxxxxxxxxxxxxxxxxx";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(bin()).args(args).env("TOLLGATE_ADMIN_TOKEN", TOKEN).output().expect("run tollgate");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn keygen_toml_prints_only_the_block_on_stdout_and_the_secret_on_stderr() {
    let (code, stdout, stderr) = run(&["keygen", "--toml", "--id", "acme-key", "--scopes", "read,generate"]);
    assert_eq!(code, Some(0), "{stderr}");
    let secret = stderr
        .trim()
        .strip_prefix("secret (shown once, give it to the tenant): ")
        .unwrap_or_else(|| panic!("no secret on stderr: {stderr}"));
    assert!(secret.starts_with("tg_live_"), "{secret}");
    assert!(!stdout.contains(secret), "the secret is on stdout: {stdout}");

    // What `>> tollgate.toml` appends is a whole [[tenants.keys]] block and nothing else.
    let block: toml::Table = toml::from_str(&stdout).expect("stdout is TOML");
    let key = &block["tenants"]["keys"][0];
    assert_eq!(key["id"].as_str(), Some("acme-key"));
    assert_eq!(key["hash"].as_str(), Some(hash_of(secret).as_str()));
    assert_eq!(key["scopes"], toml::Value::Array(vec!["read".into(), "generate".into()]));
    assert_eq!(stdout.lines().count(), 4, "{stdout}");

    // No scopes unless asked, as for a key in the config file; any id stays valid TOML.
    let (code, stdout, _) = run(&["keygen", "--toml", "--id", "odd \"id\""]);
    assert_eq!(code, Some(0));
    let block: toml::Table = toml::from_str(&stdout).expect("stdout is TOML");
    assert_eq!(block["tenants"]["keys"][0]["id"].as_str(), Some("odd \"id\""));
    assert_eq!(block["tenants"]["keys"][0]["scopes"], toml::Value::Array(vec![]));
}

fn today() -> String {
    chrono::Utc::now().format("%Y-%m-%d").to_string()
}

fn report(gw: &Gateway, tenant: &str, from: &str, to: &str) -> (Option<i32>, String, String) {
    let config = gw.config_path.display().to_string();
    run(&["usage", "report", "-c", &config, "--tenant", tenant, "--from", from, "--to", to])
}

fn admin(gw: &Gateway, args: &[&str]) -> (Option<i32>, String, String) {
    let url = format!("http://{}", gw.admin);
    let mut all = vec![args[0], "--admin-url", &url];
    all.extend_from_slice(&args[1..]);
    run(&all)
}

#[test]
fn usage_report_refuses_a_tenant_that_does_not_exist() {
    let echo = Echo::start();
    let tail = format!("[admin]\ntoken_hash = \"{}\"\n", hash_of(TOKEN));
    let gw = Gateway::start(&standard_config(echo.addr, Extra { tail: &tail, ..Extra::default() }));
    let day = today();

    let (code, stdout, stderr) = report(&gw, "nobody", &day, &day);
    assert_eq!((code, stdout.as_str()), (Some(1), ""), "{stderr}");
    assert!(stderr.contains("`nobody`") && stderr.contains("tollgate tenants list"), "{stderr}");

    // A config tenant without traffic has an empty report.
    let (code, stdout, stderr) = report(&gw, "globex", &day, &day);
    assert_eq!(code, Some(0), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("JSON report");
    assert_eq!((v["tenant"].as_str(), v["totals"].as_array().map(Vec::len)), (Some("globex"), Some(0)));

    // So does a tenant of the store.
    let (code, _, stderr) = admin(&gw, &["tenants", "create", "hooli", "--tier", "free"]);
    assert_eq!(code, Some(0), "{stderr}");
    let (code, _, stderr) = report(&gw, "hooli", &day, &day);
    assert_eq!(code, Some(0), "{stderr}");

    // A deleted tenant keeps its usage, and its report can still be read.
    let (code, stdout, stderr) = admin(&gw, &["keys", "create", "hooli", "--scopes", "read"]);
    assert_eq!(code, Some(0), "{stderr}");
    let created: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    let auth = bearer(created["secret"].as_str().expect("secret"));
    assert_eq!(gw.get("/v1/x", &[("authorization", &auth)]).status, 200);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, stdout, _) = report(&gw, "hooli", &day, &day);
        if stdout.contains("\"requests\"") {
            break;
        }
        assert!(Instant::now() < deadline, "the usage never reached the ledger: {stdout}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, _, stderr) = admin(&gw, &["tenants", "delete", "hooli"]);
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stdout, stderr) = report(&gw, "hooli", &day, &day);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("\"requests\""), "{stdout}");
    assert!(stderr.contains("no longer a tenant"), "{stderr}");
    // Outside the days it has usage, it is as unknown as any other id.
    let (code, _, stderr) = report(&gw, "hooli", "2020-01-01", "2020-01-31");
    assert_eq!(code, Some(1));
    assert!(stderr.contains("`hooli`"), "{stderr}");
}

/// A directory of stand-in commands, so that the script sees exactly the tools a test wants.
/// `apt-get` records its arguments in `apt-get.log`; `id -u` answers `uid`.
fn fake_path(tag: &str, present: &[&str], uid: u32) -> PathBuf {
    let dir = temp_dir(tag);
    let write = |name: &str, body: &str| {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write stub");
        let _ = Command::new("chmod").arg("+x").arg(&p).status();
    };
    for tool in present {
        write(tool, "exit 0");
    }
    write("id", &format!("echo {uid}"));
    write("apt-get", &format!("echo \"$@\" >> {}/apt-get.log", dir.display()));
    dir
}

fn ensure_deps(path: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new("/bin/bash")
        .arg(repo().join("scripts/ensure-deps.sh"))
        .args(args)
        .env_clear()
        .env("PATH", path)
        .output()
        .expect("run ensure-deps.sh");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

const BUILD_TOOLS: [&str; 4] = ["cargo", "cmake", "cc", "curl"];

#[test]
fn the_demo_needs_only_the_build_tools() {
    let path = fake_path("deps-run", &BUILD_TOOLS, 1000);
    let (code, stdout, stderr) = ensure_deps(&path, &["--run"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!((stdout.as_str(), stderr.as_str()), ("", ""), "quiet when everything is there");

    // The tests need more, and say what and how to install it.
    for args in [&["--test"][..], &[]] {
        let (code, _, stderr) = ensure_deps(&path, args);
        assert_eq!(code, Some(1), "{args:?}");
        assert!(stderr.contains("missing for `make test`: redis-server openssl prometheus"), "{stderr}");
        assert!(stderr.contains("sudo apt-get update && sudo apt-get install -y redis-server openssl prometheus"));
    }
    let (code, _, stderr) = ensure_deps(&path, &["--bogus"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("--run | --test"), "{stderr}");
}

#[test]
fn as_root_it_installs_only_what_the_target_needs() {
    let path = fake_path("deps-root", &["cargo", "cc"], 0);
    let (code, stdout, stderr) = ensure_deps(&path, &["--run"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("installing cmake curl"), "{stdout}");
    let log = std::fs::read_to_string(path.join("apt-get.log")).expect("apt-get ran");
    assert!(log.lines().any(|l| l.contains("install") && l.ends_with("cmake curl")), "{log}");

    let (code, _, stderr) = ensure_deps(&path, &["--test"]);
    assert_eq!(code, Some(0), "{stderr}");
    let log = std::fs::read_to_string(path.join("apt-get.log")).expect("apt-get ran");
    assert!(log.lines().any(|l| l.ends_with("cmake curl redis-server openssl prometheus")), "{log}");

    // Without cargo nothing can be built: it says where to get it.
    let path = fake_path("deps-nocargo", &["cmake", "cc", "curl"], 0);
    let (code, _, stderr) = ensure_deps(&path, &["--run"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("https://rustup.rs"), "{stderr}");
}

#[test]
fn make_run_installs_the_demo_dependencies_and_make_test_the_suite_ones() {
    let dry_run = |target: &str| {
        let out = Command::new("make").args(["-n", target]).current_dir(repo()).output().expect("make -n");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let run = dry_run("run");
    assert!(run.contains("scripts/ensure-deps.sh --run") && !run.contains("--test"), "{run}");
    let test = dry_run("test");
    assert!(test.contains("scripts/ensure-deps.sh --test"), "{test}");
    assert!(!test.contains("fuzz") && !test.contains("nightly"), "{test}");
}
