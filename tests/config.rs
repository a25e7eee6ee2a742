//! Config validation: every kind of error is reported with file and line, and all of them at
//! once. Also the `check` and `keygen` commands.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;
use tollgate::config::{self, Diagnostics};

const GOOD_HASH: &str = "sha256:b9c83ea734ea923cfab284bc7b69334c92713fbd4d7396bbeab487ed9011dd88";

fn errors_of(text: &str) -> Diagnostics {
    let dir = temp_dir("cfg");
    let path = dir.join("tollgate.toml");
    std::fs::write(&path, text).expect("write");
    match config::load(&path) {
        Ok(_) => panic!("config was accepted:\n{text}"),
        Err(d) => d,
    }
}

/// Asserts exactly one error, containing `needle`, on `line`.
fn one_error(text: &str, needle: &str, line: usize) {
    let d = errors_of(text);
    let errors: Vec<_> = d.errors().collect();
    assert_eq!(errors.len(), 1, "expected one error, got:\n{d}");
    assert!(errors[0].message.contains(needle), "`{needle}` not in `{}`", errors[0].message);
    assert_eq!(errors[0].line, line, "{}", errors[0]);
}

const BASE: &str = r#"
[upstreams.main]
servers = ["127.0.0.1:9000"]

[tiers.free]
upstream = "main"
"#;

#[test]
fn a_minimal_config_loads() {
    let dir = temp_dir("cfg");
    let path = dir.join("tollgate.toml");
    std::fs::write(&path, BASE).expect("write");
    let loaded = config::load(&path).expect("valid");
    assert_eq!(loaded.config.summary(), "1 tiers, 0 tenants, 0 keys, 1 upstreams, 0 rules");
}

#[test]
fn syntax_error_has_line_and_column() {
    let d = errors_of("[server]\nlisten = [\"127.0.0.1:80\"\n");
    let e = d.errors().next().expect("an error");
    assert!(e.message.contains("TOML syntax"), "{e}");
    assert!(e.line >= 2, "{e}");
}

#[test]
fn unknown_key() {
    one_error(&format!("{BASE}\n[server]\nlisten = [\"127.0.0.1:8080\"]\nlsten = 1\n"), "unknown key `lsten`", 10);
}

#[test]
fn unknown_top_level_table() {
    one_error(&format!("{BASE}\n[sever]\nx = 1\n"), "unknown key `sever`", 8);
}

#[test]
fn unknown_tier_reference() {
    one_error(&format!("{BASE}\n[[tenants]]\nid = \"acme\"\ntier = \"gold\"\n"), "tier `gold`", 10);
}

#[test]
fn unknown_upstream_reference() {
    one_error(
        "[upstreams.main]\nservers = [\"127.0.0.1:9000\"]\n[tiers.free]\nupstream = \"mian\"\n",
        "upstream `mian`",
        4,
    );
}

#[test]
fn bad_hash() {
    one_error(
        &format!("{BASE}\n[[tenants]]\nid = \"acme\"\ntier = \"free\"\n[[tenants.keys]]\nid = \"k\"\nhash = \"sha256:1234\"\n"),
        "64 hex digits",
        13,
    );
}

#[test]
fn bad_values() {
    one_error(&format!("{BASE}\n[server]\nlisten = [\"localhost\"]\n"), "not a valid listen address", 9);
    one_error(&format!("{BASE}\n[server]\nthreads = 0\n"), "threads", 9);
    one_error(&format!("{BASE}\n[server]\nshutdown_grace = \"5 parsecs\"\n"), "duration unit", 9);
    one_error(&format!("{BASE}\n[server]\nmax_header_bytes = \"lots\"\n"), "not a size", 9);
    one_error(&format!("{BASE}\n[tenancy]\ntrusted_proxies = [\"10.0.0.0/33\"]\n"), "CIDR", 9);
    one_error(&format!("{BASE}\n[tenancy]\nresolve = [\"api_key\", \"cookie\"]\n"), "unknown tenant source", 9);
    one_error(&format!("{BASE}\n[[tenants]]\nid = \"Acme Corp\"\ntier = \"free\"\n"), "tenant id", 9);
    one_error(
        &format!("{BASE}\n[[tenants]]\nid = \"acme\"\ntier = \"free\"\nstatus = \"paused\"\n"),
        "tenant status",
        11,
    );
    one_error(
        &format!("{BASE}\n[[tenants]]\nid = \"acme\"\ntier = \"free\"\n[[tenants.keys]]\nid = \"k\"\nhash = \"{GOOD_HASH}\"\nexpires = \"next week\"\n"),
        "RFC 3339",
        14,
    );
    one_error("[upstreams.main]\nservers = []\n[tiers.free]\nupstream = \"main\"\n", "empty `servers`", 1);
    one_error(&format!("{BASE}\n[server]\nthreads = \"two\"\n"), "invalid type", 9);
}

#[test]
fn duplicates() {
    one_error(
        &format!("{BASE}\n[[tenants]]\nid = \"acme\"\ntier = \"free\"\n[[tenants]]\nid = \"acme\"\ntier = \"free\"\n"),
        "defined twice",
        12,
    );
    one_error(
        &format!("{BASE}\n[[tenants]]\nid = \"a\"\ntier = \"free\"\n[[tenants.keys]]\nid = \"k1\"\nhash = \"{GOOD_HASH}\"\n[[tenants.keys]]\nid = \"k2\"\nhash = \"{GOOD_HASH}\"\n"),
        "used by two keys",
        16,
    );
}

#[test]
fn every_error_is_reported_at_once_with_file_and_line() {
    let text = format!(
        "{BASE}\n[server]\nlsten = 1\nthreads = 0\n\n[[tenants]]\nid = \"acme\"\ntier = \"gold\"\n\n[[tenants]]\nid = \"b\"\ntier = \"free\"\nbogus = true\n[[tenants.keys]]\nid = \"k\"\nhash = \"nope\"\n"
    );
    let d = errors_of(&text);
    let rendered = d.to_string();
    let errors: Vec<_> = d.errors().collect();
    assert!(errors.len() >= 5, "{rendered}");
    for needle in ["unknown key `lsten`", "threads", "tier `gold`", "unknown key `bogus`", "sha256:<64 hex digits>"] {
        assert!(rendered.contains(needle), "missing `{needle}` in:\n{rendered}");
    }
    assert!(rendered.contains("tollgate.toml:9:1: error: unknown key `lsten`"), "{rendered}");
    assert!(rendered.contains("error(s); the config was not loaded"));
}

#[test]
fn missing_file_is_an_error_not_a_panic() {
    let d = config::load(Path::new("/nonexistent/tollgate.toml")).err().expect("error");
    assert!(d.to_string().contains("cannot read the config file"));
}

#[test]
fn check_command_summarises_or_lists_every_error() {
    let dir = temp_dir("check");
    let good = dir.join("good.toml");
    std::fs::write(&good, BASE).expect("write");
    let out = Command::new(bin()).args(["check", "-c"]).arg(&good).output().expect("run check");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.contains("1 tiers, 0 tenants, 0 keys, 1 upstreams, 0 rules"), "{stdout}");

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, format!("{BASE}\n[server]\nlsten = 1\nthreads = 0\n")).expect("write");
    let out = Command::new(bin()).args(["check", "-c"]).arg(&bad).output().expect("run check");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.toml:9:1") && stderr.contains("bad.toml:10:"), "{stderr}");
}

#[test]
fn run_refuses_a_bad_config_with_exit_1() {
    let dir = temp_dir("run-bad");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, format!("{BASE}\n[[tenants]]\nid = \"x\"\ntier = \"gold\"\n")).expect("write");
    let out = Command::new(bin()).args(["run", "-c"]).arg(&bad).output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tier `gold`"));
}

#[test]
fn keygen_prints_a_key_and_its_hash() {
    let out = Command::new(bin()).arg("keygen").output().expect("keygen");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    let key = lines[0].strip_prefix("key=").expect("key line");
    let hash = lines[1].strip_prefix("hash=").expect("hash line");
    assert!(key.starts_with("tg_live_") && key.len() >= "tg_live_".len() + 22);
    assert_eq!(hash, hash_of(key));

    let out = Command::new(bin()).args(["keygen", "--prefix", "tg_test"]).output().expect("keygen");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("key=tg_test_"));

    let out = Command::new(bin())
        .args(["keygen", "--toml", "--id", "ci", "--scopes", "read,generate"])
        .output()
        .expect("keygen");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("[[tenants.keys]]")
            && stdout.contains("id = \"ci\"")
            && stdout.contains("scopes = [\"read\", \"generate\"]")
    );
    // The block is valid config.
    let block: String = stdout.lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n");
    let dir = temp_dir("keygen");
    let path = dir.join("tollgate.toml");
    std::fs::write(&path, format!("{BASE}\n[[tenants]]\nid = \"a\"\ntier = \"free\"\n{block}\n")).expect("write");
    assert!(config::load(&path).is_ok());
}
