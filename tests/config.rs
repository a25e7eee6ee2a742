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
    one_error(&format!("{BASE}\n[server]\nthreads = \"two\"\n"), "must be a whole number", 9);
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

/// Runs `tollgate check -c FILE` on `text` written as `tollgate.toml` in `dir`; returns the exit
/// code, the path and stderr.
fn check_text(dir: &Path, text: &str) -> (Option<i32>, std::path::PathBuf, String) {
    let path = dir.join("tollgate.toml");
    std::fs::write(&path, text).expect("write");
    let out = Command::new(bin()).args(["check", "-c"]).arg(&path).output().expect("run check");
    (out.status.code(), path, String::from_utf8_lossy(&out.stderr).to_string())
}

/// The error lines of a `check` output.
fn error_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.contains(": error: ")).collect()
}

/// serde's own words, which an operator should never have to read.
fn assert_no_rust_words(text: &str) {
    for word in ["invalid type", "expected i64", "expected f64", "a sequence", "a map", "struct ", "untagged", "i128"] {
        assert!(!text.contains(word), "`{word}` in:\n{text}");
    }
}

#[test]
fn check_reports_every_error_of_a_table_in_the_users_words() {
    let dir = temp_dir("check-all");
    // A type error used to hide every other error of its table.
    let (code, path, stderr) = check_text(
        &dir,
        &format!("{BASE}\n[server]\nlisten = [\"localhost:80\"]\nshutdown_grace = 10\nthreads = \"2\"\nmax_header_bytes = \"1B\"\n"),
    );
    assert_eq!(code, Some(1), "{stderr}");
    let p = path.display();
    let expected = [
        format!("{p}:9:11: error: `localhost:80` is not a valid listen address"),
        format!("{p}:10:18: error: `shutdown_grace` must be a duration such as \"10s\", not the number 10; write it in quotes with a unit, like \"10s\""),
        format!("{p}:11:11: error: `threads` must be a whole number, not the string \"2\"; remove the quotes"),
        format!("{p}:12:20: error: `max_header_bytes` below 1KiB"),
    ];
    let errors = error_lines(&stderr);
    assert_eq!(errors.len(), expected.len(), "{stderr}");
    for (line, want) in errors.iter().zip(&expected) {
        assert!(line.starts_with(want.as_str()), "`{line}` does not start with `{want}`");
    }
    assert!(stderr.ends_with("4 error(s); the config was not loaded\n"), "{stderr}");
    assert_no_rust_words(&stderr);
}

#[test]
fn every_type_error_of_every_kind_of_table_is_reported_once() {
    let dir = temp_dir("check-kinds");
    std::fs::write(
        dir.join("api.toml"),
        "usage_metrics = [\"records\"]\n\n[[rule]]\nname = \"jobs\"\nmatch = { path_prefix = \"/api/\", methods = \"GET\" }\ntimeout = 30\n\n[[rule]]\nname = 7\npublic = \"yes\"\nrate.default = { requests_per_second = \"5\" }\n",
    )
    .expect("write rules");
    let text = r#"include = ["api.toml"]

[store]
timeout = 50
breaker_failures = "5"

[log]
access_log = "true"

[upstreams.api]
servers = "127.0.0.1:9000"
connect_timeout = 2

[tiers.free]
upstream = "api"
concurrency = "10"
warn_at = 80

[[tenants]]
id = 42
tier = "free"
subdomains = "acme"

[[tenants.keys]]
id = "k1"
hash = 123
revoked = "no"

[[rule]]
name = "health"
public = 1
"#;
    let (code, path, stderr) = check_text(&dir, text);
    assert_eq!(code, Some(1), "{stderr}");
    let main = path.display().to_string();
    let rules = dir.join("api.toml").display().to_string();
    let expected: Vec<(String, usize, &str)> = vec![
        (main.clone(), 4, "`timeout` must be a duration such as \"10s\", not the number 50"),
        (main.clone(), 5, "`breaker_failures` must be a whole number, not the string \"5\""),
        (main.clone(), 8, "`access_log` must be true or false, not the string \"true\"; remove the quotes"),
        (main.clone(), 11, "`servers` must be a list of strings, not the string \"127.0.0.1:9000\""),
        (main.clone(), 12, "`connect_timeout` must be a duration such as \"10s\", not the number 2"),
        (main.clone(), 16, "`concurrency` must be a whole number, not the string \"10\""),
        (main.clone(), 17, "`warn_at` must be a list of whole numbers, not the number 80"),
        (main.clone(), 20, "`id` must be a string, not the number 42"),
        (main.clone(), 22, "`subdomains` must be a list of strings, not the string \"acme\""),
        (main.clone(), 26, "`hash` must be a string, not the number 123"),
        (main.clone(), 27, "`revoked` must be true or false, not the string \"no\""),
        (main.clone(), 31, "`public` must be true or false, not the number 1"),
        (rules.clone(), 5, "`match.methods` must be a list of strings, not the string \"GET\""),
        (rules.clone(), 6, "`timeout` must be a duration such as \"10s\", not the number 30"),
        (rules.clone(), 9, "`name` must be a string, not the number 7"),
        (rules.clone(), 10, "`public` must be true or false, not the string \"yes\""),
        (rules.clone(), 11, "`rate.default.requests_per_second` must be a whole number, not the string \"5\""),
    ];
    // One error per mistake: a field left out for its type is not also reported as missing
    // (`servers`, `id`, `hash`, `name`, the rate's limit).
    let errors = error_lines(&stderr);
    assert_eq!(errors.len(), expected.len(), "{stderr}");
    for (file, line, message) in &expected {
        let prefix = format!("{file}:{line}:");
        assert!(
            errors.iter().any(|e| e.starts_with(&prefix) && e.contains(message)),
            "no `{prefix} ... {message}` in:\n{stderr}"
        );
    }
    assert_no_rust_words(&stderr);
}

#[test]
fn a_syntax_error_is_one_error_at_its_place() {
    // A missing `]` used to turn every later line into an error of its own.
    let d = errors_of(
        "[upstreams.main]\nservers = [\"127.0.0.1:9000\"\n\n[tiers.free]\nupstream = \"main\"\n\n[server]\nthreads = 2\n\n[[tenants]]\nid = \"a\"\ntier = \"free\"\n",
    );
    let errors: Vec<_> = d.errors().collect();
    assert_eq!(errors.len(), 1, "{d}");
    assert_eq!((errors[0].line, errors[0].col), (2, 11), "{}", errors[0]);
    assert!(errors[0].message.contains("TOML syntax") && errors[0].message.contains("no closing `]`"), "{}", errors[0]);
    assert!(errors[0].message.contains("before line 4 (`[tiers.free]`)"), "{}", errors[0]);

    let d = errors_of(&format!(
        "{BASE}\n[tiers.pro]\nrate = {{ requests_per_second = 5\nconcurrency = 3\n[server]\nthreads = 2\n"
    ));
    let errors: Vec<_> = d.errors().collect();
    assert_eq!(errors.len(), 1, "{d}");
    assert_eq!(errors[0].line, 9, "{}", errors[0]);
    assert!(errors[0].message.contains("no closing `}`"), "{}", errors[0]);

    let d = errors_of(&format!("{BASE}\n[server]\npid_file = \"/run/tollgate.pid\nthreads = 2\n[store]\nkind\n"));
    let errors: Vec<_> = d.errors().collect();
    assert_eq!(errors.len(), 1, "{d}");
    assert_eq!((errors[0].line, errors[0].col), (9, 12), "{}", errors[0]);
    assert!(errors[0].message.contains("no closing `\"`"), "{}", errors[0]);
}

#[test]
fn a_duplicate_table_or_key_names_it_and_where_it_was_first_defined() {
    let dir = temp_dir("dup");
    let (code, path, stderr) = check_text(
        &dir,
        &format!("{BASE}\n[admin]\naudit_log = \"audit.log\"\n\n[server]\nthreads = 2\n\n[admin]\ntoken_hash = \"{GOOD_HASH}\"\n"),
    );
    assert_eq!(code, Some(1), "{stderr}");
    let p = path.display();
    let errors = error_lines(&stderr);
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].starts_with(&format!("{p}:14:2: error: table `[admin]` is already defined at {p}:8;")),
        "{stderr}"
    );

    let (_, path, stderr) = check_text(
        &dir,
        "[upstreams.main]\nservers = [\"127.0.0.1:9000\"]\nhost = \"api.internal\"\nservers = [\"127.0.0.1:9001\"]\n",
    );
    let p = path.display();
    let errors = error_lines(&stderr);
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].starts_with(&format!("{p}:4:1: error: `servers` is already set in this table, at {p}:2;")),
        "{stderr}"
    );

    // The same key in the second of two `[[tenants.keys]]` of a tenant.
    let d = errors_of(&format!(
        "{BASE}\n[[tenants]]\nid = \"a\"\ntier = \"free\"\n[[tenants.keys]]\nid = \"k1\"\n[[tenants.keys]]\nid = \"k2\"\nid = \"k3\"\n"
    ));
    let errors: Vec<_> = d.errors().collect();
    assert_eq!(errors.len(), 1, "{d}");
    assert_eq!(errors[0].line, 15, "{}", errors[0]);
    assert!(
        errors[0].message.contains("`id` is already set in this table, at ")
            && errors[0].message.ends_with(":14; keep only one of the two"),
        "{}",
        errors[0]
    );
}

#[test]
fn log_level_must_be_a_level_or_target_level_directives() {
    // `verbose` is a valid `EnvFilter` (a target name), and it silences every message.
    let dir = temp_dir("log-level");
    let (code, path, stderr) = check_text(&dir, &format!("{BASE}\n[log]\nlevel = \"verbose\"\n"));
    assert_eq!(code, Some(1), "{stderr}");
    let line = format!(
        "{}:9:9: error: `verbose` is not a log level; use error, warn, info, debug, trace or off",
        path.display()
    );
    assert!(stderr.contains(&line), "{stderr}");

    one_error(&format!("{BASE}\n[log]\nlevel = \"info,tollgate=loud\"\n"), "`loud` is not a log level", 9);
    one_error(&format!("{BASE}\n[log]\nlevel = \"=debug\"\n"), "names no target", 9);
    one_error(&format!("{BASE}\n[log]\nlevel = \"\"\n"), "`log.level` is empty", 9);
    for level in
        ["debug", "WARN", "off", "info,tollgate::access=off", "warn, tollgate=debug", "info,tollgate[request]=trace"]
    {
        let dir = temp_dir("log-level-ok");
        let path = dir.join("tollgate.toml");
        std::fs::write(&path, format!("{BASE}\n[log]\nlevel = \"{level}\"\n")).expect("write");
        match config::load(&path) {
            Ok(loaded) => assert!(!loaded.config.log.level.contains(' '), "{}", loaded.config.log.level),
            Err(d) => panic!("`{level}` was refused:\n{d}"),
        }
    }
}

/// `[store] url` takes one URL, a comma-separated string or a list; `cluster` defaults to
/// true with several URLs and may name a cluster by one seed.
#[test]
fn store_url_forms_and_cluster() {
    let load = |store: &str| {
        let dir = temp_dir("cfg");
        let path = dir.join("tollgate.toml");
        std::fs::write(&path, format!("{BASE}\n[store]\nkind = \"redis\"\n{store}\n")).expect("write");
        let c = config::load(&path).unwrap_or_else(|d| panic!("`{store}` rejected:\n{d}")).config.store;
        (c.urls, c.cluster)
    };
    let one = || vec!["redis://a:1".to_string()];
    let two = || vec!["redis://a:1".to_string(), "redis://b:2".to_string()];
    assert_eq!(load("url = \"redis://a:1\""), (one(), false));
    assert_eq!(load("url = \"redis://a:1\"\ncluster = true"), (one(), true));
    assert_eq!(load("url = \"redis://a:1, redis://b:2\""), (two(), true));
    assert_eq!(load("url = [\"redis://a:1\", \"redis://b:2\"]"), (two(), true));
    assert_eq!(load("url = [\"redis://a:1\"]\ncluster = true"), (one(), true));
}

#[test]
fn store_url_and_cluster_errors_all_at_once() {
    let d = errors_of(&format!(
        "{BASE}\n[store]\nkind = \"redis\"\nurl = [\"redis://a:1\", \"b:2\"]\ncluster = false\ntimeout = \"0s\"\n"
    ));
    let errors: Vec<_> = d.errors().collect();
    assert_eq!(errors.len(), 3, "{d}");
    assert!(errors.iter().any(|e| e.line == 10 && e.message.contains("`b:2` is not a Redis URL")), "{d}");
    assert!(
        errors
            .iter()
            .any(|e| e.line == 11 && e.message.contains("`cluster = false`") && e.message.contains("cluster = true")),
        "{d}"
    );
    one_error(&format!("{BASE}\n[store]\nkind = \"redis\"\nurl = []\n"), "`url` names no Redis", 10);
    one_error(&format!("{BASE}\n[store]\ncluster = true\n"), "`cluster` applies to a Redis store", 9);
    let d = errors_of(&format!("{BASE}\n[store]\nkind = \"redis\"\nurl = 6379\n"));
    assert!(d.errors().any(|e| e.line == 10 && e.message.contains("a string or a list of strings")), "{d}");
}

#[test]
fn lease_settings_are_checked() {
    // `[store]` is line 8 of these configs, the setting line 9.
    one_error(&format!("{BASE}\n[store]\nlease_ttl = \"100ms\"\n"), "`lease_ttl` must be at least 500ms", 9);
    one_error(&format!("{BASE}\n[store]\nlease_timeout = \"0s\"\n"), "`lease_timeout` of zero", 9);
    let dir = temp_dir("cfg");
    let path = dir.join("tollgate.toml");
    let text = format!(
        "{BASE}\n[store]\nlease_ttl = \"3s\"\nlease_idle = \"2s\"\ntimeout = \"80ms\"\nlease_timeout = \"20ms\"\n"
    );
    std::fs::write(&path, text).expect("write");
    let store = config::load(&path).expect("valid").config.store;
    assert_eq!(
        (store.lease_ttl, store.lease_idle, store.lease_timeout),
        (std::time::Duration::from_secs(3), std::time::Duration::from_secs(2), std::time::Duration::from_millis(80)),
        "a lease timeout shorter than the store timeout is raised to it"
    );
}

/// A file whose tenants follow every other table is read a tenant at a time; one that cannot be
/// (here, `'''` in a comment forces the whole-document reading) is read as one document. Both
/// readings report the same problems at the same lines, and load the same tenants.
#[test]
fn tenants_read_one_at_a_time_report_what_the_whole_file_reports() {
    let tenants = format!(
        "[[tenants]]\nid = \"a\"\ntier = \"free\"\n\n[[tenants.keys]]\nid = \"k1\"\nhash = \"{GOOD_HASH}\"\n\n\
         [[tenants]]\nid = \"b\"\ntier = \"gold\"\nbogus = true\n[tenants.overrides]\n\"quotas.nope.limit\" = 5\n\
         [[tenants.keys]]\nid = \"k2\"\nhash = \"nope\"\nscopes = [\"a b\"]\n\n\
         [[tenants]]\nid = \"a\"\ntier = \"free\"\nsubdomains = [\"Bad_Label\"]\n[[tenants.keys]]\nid = \"k1\"\nhash = \"{GOOD_HASH}\"\n\n\
         [[tenants]]\ntier = 7\n"
    );
    let split = format!("{BASE}\n{tenants}");
    let whole = format!("{split}# a comment with ''' in it\n");
    assert!(config::file::split_tenants(&split).is_some());
    assert!(config::file::split_tenants(&whole).is_none());
    let lines = |d: &Diagnostics| -> Vec<String> {
        let mut v: Vec<String> = d.errors().map(|e| format!("{}: {}", e.line, e.message)).collect();
        v.sort();
        v
    };
    let (a, b) = (errors_of(&split), errors_of(&whole));
    assert!(a.errors().count() >= 8, "{a}");
    assert_eq!(lines(&a), lines(&b), "split:\n{a}\nwhole:\n{b}");

    // And a valid file loads the same tenants and keys both ways.
    let good = format!(
        "{BASE}\n[[tenants]]\nid = \"a\"\ntier = \"free\"\n[tenants.overrides]\n\"rate.requests_per_minute\" = 5\n\
         [[tenants.keys]]\nid = \"k1\"\nhash = \"{GOOD_HASH}\"\nscopes = [\"read\"]\n\n[[ tenants ]] # second\nid = \"b\"\ntier = \"free\"\n"
    );
    let load = |text: &str| {
        let mut diags = Diagnostics::default();
        let c =
            config::load_str(Path::new("t.toml"), text.to_string(), &mut diags).unwrap_or_else(|| panic!("{diags}"));
        format!("{:?}", c.tenants)
    };
    assert!(config::file::split_tenants(&good).is_some_and(|(_, chunks)| chunks.len() == 2));
    assert_eq!(load(&good), load(&format!("{good}# '''\n")));
}
