//! Lua-free rules through the running gateway: every match kind, every action, defaults,
//! `unmatched`, the shipped rule packs, validation errors and `rules explain`.

mod common;
use common::*;
use std::process::Command;
use tollgate::config;

const RULES: &str = r#"
[[rule]]
name = "host-exact"
match = { host = "api.example.org", path_prefix = "/host/" }
set_request_headers = { "x-route" = "host-exact" }

[[rule]]
name = "host-wild"
match = { host = "*.example.org", path_prefix = "/host/" }
set_request_headers = { "x-route" = "host-wild" }

[[rule]]
name = "exact"
match = { path = "/exact" }
set_request_headers = { "x-route" = "exact" }

[[rule]]
name = "glob-one"
match = { path_glob = "/g/*/leaf" }
set_request_headers = { "x-route" = "glob-one" }

[[rule]]
name = "glob-many"
match = { path_glob = "/g/**/end" }
set_request_headers = { "x-route" = "glob-many" }

[[rule]]
name = "methods"
match = { path = "/m", methods = ["POST", "PUT"] }
set_request_headers = { "x-route" = "methods" }

[[rule]]
name = "header-equals"
match = { path = "/h", headers = { "x-env" = "prod" } }
set_request_headers = { "x-route" = "header-equals" }

[[rule]]
name = "header-present"
match = { path = "/h", headers = { "x-debug" = true } }
set_request_headers = { "x-route" = "header-present" }

[[rule]]
name = "query-equals"
match = { path = "/q", query = { "format" = "csv" } }
set_request_headers = { "x-route" = "query-equals" }

[[rule]]
name = "query-present"
match = { path = "/q", query = { "stream" = true } }
set_request_headers = { "x-route" = "query-present" }

[[rule]]
name = "tier-pro"
match = { path = "/tiered", tiers = ["pro"] }
set_request_headers = { "x-route" = "tier-pro" }

[[rule]]
name = "tenant-globex"
match = { path = "/tenanted", tenants = ["globex"] }
set_request_headers = { "x-route" = "tenant-globex" }

[[rule]]
name = "scoped"
match = { path_prefix = "/scoped/" }
require_scopes = ["generate", "admin"]

[[rule]]
name = "featured"
match = { path_prefix = "/featured/" }
require_feature = "streaming"

[[rule]]
name = "denied"
match = { path_prefix = "/denied/" }
deny = { status = 451, message = "Unavailable for legal reasons." }

[[rule]]
name = "other-upstream"
match = { path_prefix = "/other/" }
upstream = "second"

[[rule]]
name = "headers"
match = { path_prefix = "/headers/" }
set_request_headers = { "x-added" = "yes" }
remove_request_headers = ["x-remove-me"]
set_response_headers = { "x-frame-options" = "DENY" }
remove_response_headers = ["x-powered-by"]

[[rule]]
name = "small-body"
match = { path_prefix = "/small/" }
max_body = "1KiB"

[[rule]]
name = "quick"
match = { path_prefix = "/quick/" }
timeout = "200ms"

[[rule]]
name = "pass-key"
match = { path_prefix = "/pass/" }
pass_credentials = true

[[rule]]
name = "open"
match = { path_prefix = "/open/" }
public = true
"#;

fn second_upstream(second: &Echo) -> String {
    format!("[upstreams.second]\nservers = [\"{}\"]\n", second.addr)
}

fn gateway_with(echo: &Echo, top: &str, tail: &str) -> Gateway {
    Gateway::start(&standard_config(echo.addr, Extra { top, tail, ..Extra::default() }))
}

fn route(r: &Resp) -> String {
    r.upstream_headers()["x-route"].as_str().unwrap_or("-").to_string()
}

#[test]
fn every_match_kind_selects_its_rule() {
    let echo = Echo::start();
    let second = Echo::start();
    let gw = gateway_with(&echo, "", &format!("{}\n{RULES}", second_upstream(&second)));
    let acme = bearer(ACME_KEY);
    let globex = bearer(GLOBEX_KEY);
    let a = acme.as_str();
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        ("GET", "/host/x", vec![("host", "api.example.org"), ("authorization", a)], "host-exact"),
        ("GET", "/host/x", vec![("host", "API.example.org:443"), ("authorization", a)], "host-exact"),
        ("GET", "/host/x", vec![("host", "www.example.org"), ("authorization", a)], "host-wild"),
        ("GET", "/host/x", vec![("host", "example.net"), ("authorization", a)], "-"),
        ("GET", "/exact", vec![("authorization", a)], "exact"),
        ("GET", "/exact/more", vec![("authorization", a)], "-"),
        ("GET", "/g/a/leaf", vec![("authorization", a)], "glob-one"),
        ("GET", "/g/a/b/leaf", vec![("authorization", a)], "-"),
        ("GET", "/g/end", vec![("authorization", a)], "glob-many"),
        ("GET", "/g/a/b/c/end", vec![("authorization", a)], "glob-many"),
        ("POST", "/m", vec![("authorization", a)], "methods"),
        ("PUT", "/m", vec![("authorization", a)], "methods"),
        ("GET", "/m", vec![("authorization", a)], "-"),
        ("GET", "/h", vec![("authorization", a), ("x-env", "prod")], "header-equals"),
        ("GET", "/h", vec![("authorization", a), ("x-env", "dev"), ("x-debug", "1")], "header-present"),
        ("GET", "/h", vec![("authorization", a), ("x-env", "dev")], "-"),
        ("GET", "/q?format=csv", vec![("authorization", a)], "query-equals"),
        ("GET", "/q?format=json&stream", vec![("authorization", a)], "query-present"),
        ("GET", "/q?format=json", vec![("authorization", a)], "-"),
        ("GET", "/tiered", vec![("authorization", a)], "tier-pro"),
        ("GET", "/tiered", vec![("authorization", &globex)], "-"),
        ("GET", "/tenanted", vec![("authorization", &globex)], "tenant-globex"),
        ("GET", "/tenanted", vec![("authorization", a)], "-"),
    ];
    for (method, path, headers, want) in cases {
        let r = gw.request(method, path, &headers, b"");
        assert_eq!(r.status, 200, "{method} {path}: {}", r.text());
        assert_eq!(route(&r), want, "{method} {path} {headers:?}");
    }
}

#[test]
fn access_actions_answer_with_their_codes() {
    let echo = Echo::start();
    let second = Echo::start();
    let gw = gateway_with(&echo, "", &format!("{}\n{RULES}", second_upstream(&second)));
    let acme = bearer(ACME_KEY);
    let acme_ro = bearer(ACME_READONLY_KEY);
    let globex = bearer(GLOBEX_KEY);

    assert_eq!(gw.get("/scoped/x", &[("authorization", &acme)]).status, 200);
    let r = gw.get("/scoped/x", &[("authorization", &acme_ro)]);
    assert_eq!(r.status, 403);
    assert_eq!(r.problem_code(), "insufficient_scope");
    assert_eq!(r.json()["missing_scopes"], serde_json::json!(["generate", "admin"]));

    assert_eq!(gw.get("/featured/x", &[("authorization", &acme)]).status, 200);
    let r = gw.get("/featured/x", &[("authorization", &globex)]);
    assert_eq!(r.status, 403);
    assert_eq!(r.problem_code(), "feature_not_in_tier");
    assert_eq!(r.json()["tier"], "free");
    assert_eq!(r.json()["feature"], "streaming");

    let r = gw.get("/denied/x", &[("authorization", &acme)]);
    assert_eq!(r.status, 451);
    assert_eq!(r.problem_code(), "denied");
    assert_eq!(r.json()["detail"], "Unavailable for legal reasons.");

    let r = gw.get("/open/x", &[]);
    assert_eq!(r.status, 200, "public routes need no key");
    assert!(r.upstream_headers().get("x-tenant-id").is_none());
    let r = gw.get("/closed/x", &[]);
    assert_eq!(r.problem_code(), "missing_key");
    assert_eq!(echo.hits(), 3);
}

#[test]
fn forwarding_actions_rewrite_the_exchange() {
    let echo = Echo::start();
    let second = Echo::start();
    let gw = gateway_with(&echo, "", &format!("{}\n{RULES}", second_upstream(&second)));
    let acme = bearer(ACME_KEY);

    let r = gw.get("/other/x", &[("authorization", &acme)]);
    assert_eq!(r.status, 200);
    assert_eq!((echo.hits(), second.hits()), (0, 1), "upstream override");

    let r = gw.get("/headers/x?header=x-powered-by:php", &[("authorization", &acme), ("x-remove-me", "1")]);
    let h = r.upstream_headers();
    assert_eq!(h["x-added"], "yes");
    assert!(h.get("x-remove-me").is_none());
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
    assert_eq!(r.header("x-powered-by"), None);
    assert_eq!(r.header("server"), Some("tollgate-echo"), "only the named header is removed");

    let r = gw.get("/pass/x", &[("authorization", &acme)]);
    assert_eq!(r.upstream_headers()["authorization"], acme.as_str());
    let r = gw.get("/exact", &[("authorization", &acme)]);
    assert!(r.upstream_headers().get("authorization").is_none());

    let r = gw.get("/quick/x?delay_ms=1000", &[("authorization", &acme)]);
    assert_eq!(r.status, 504);
    assert_eq!(r.problem_code(), "upstream_timeout");
}

#[test]
fn max_body_counts_declared_and_chunked_bodies() {
    let echo = Echo::start();
    let gw = gateway_with(&echo, "", RULES.replace("upstream = \"second\"", "").as_str());
    let acme = bearer(ACME_KEY);
    let r = gw.request("POST", "/small/x", &[("authorization", &acme)], &[b'a'; 1024]);
    assert_eq!(r.status, 200);
    let r = gw.request("POST", "/small/x", &[("authorization", &acme)], &[b'a'; 1025]);
    assert_eq!(r.status, 413);
    assert_eq!(r.problem_code(), "body_too_large");
    assert_eq!(r.json()["limit"], 1024);
    let hits_before = echo.hits();
    let mut chunked = Vec::new();
    for _ in 0..3 {
        chunked.extend_from_slice(b"200\r\n");
        chunked.extend_from_slice(&[b'b'; 512]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let r = gw.request("POST", "/small/x", &[("authorization", &acme), ("transfer-encoding", "chunked")], &chunked);
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.problem_code(), "body_too_large");
    // A declared-too-large body never reaches the upstream; a chunked one is cut off.
    assert!(echo.hits() <= hits_before + 1);
}

#[test]
fn defaults_apply_to_every_rule_and_unmatched_deny_is_no_route() {
    let echo = Echo::start();
    let gw = gateway_with(
        &echo,
        "unmatched = \"deny\"",
        r#"
[defaults]
set_response_headers = { "x-served-by" = "tollgate" }
require_scopes = ["read"]

[[rule]]
name = "api"
match = { path_prefix = "/api/" }

[[rule]]
name = "gen"
match = { path_prefix = "/gen/" }
require_scopes = ["generate"]
"#,
    );
    let acme = bearer(ACME_KEY);
    let ro = bearer(ACME_READONLY_KEY);
    let r = gw.get("/api/x", &[("authorization", &ro)]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-served-by"), Some("tollgate"));
    // Lists union: /gen/ needs read (default) and generate (rule).
    let r = gw.get("/gen/x", &[("authorization", &ro)]);
    assert_eq!(r.json()["missing_scopes"], serde_json::json!(["generate"]));
    assert_eq!(gw.get("/gen/x", &[("authorization", &acme)]).status, 200);
    let r = gw.get("/elsewhere", &[("authorization", &acme)]);
    assert_eq!(r.status, 404);
    assert_eq!(r.problem_code(), "no_route");
}

#[test]
fn path_normalization_closes_encoding_bypasses() {
    let echo = Echo::start();
    let gw = Gateway::start_in(
        temp_dir("norm"),
        &standard_config(echo.addr, Extra { top: "include = [\"rules/hardening.toml\"]", ..Extra::default() }),
        &[("rules/hardening.toml", include_str!("../lua-free-rules/hardening.toml"))],
    );
    let acme = bearer(ACME_KEY);
    for path in ["/internal/x", "/%69nternal/x", "/api/../internal/x", "//internal/x", "/.env", "/a/b/.git"] {
        let r = gw.get(path, &[("authorization", &acme)]);
        assert_eq!(r.status, 404, "{path}: {}", r.text());
        assert_eq!(r.problem_code(), "denied", "{path}");
    }
    let r = gw.get("/api/./v1//items", &[("authorization", &acme)]);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["path"], "/api/v1/items", "the upstream gets the normalized path");
    assert_eq!(echo.hits(), 1);
}

fn pack_gateway(echo: &Echo, packs: &[&str]) -> Gateway {
    let files: Vec<(String, &str)> = packs
        .iter()
        .map(|p| {
            let body = match *p {
                "hardening" => include_str!("../lua-free-rules/hardening.toml"),
                "generation-api" => include_str!("../lua-free-rules/generation-api.toml"),
                _ => include_str!("../lua-free-rules/openai-compatible.toml"),
            };
            (format!("lua-free-rules/{p}.toml"), body)
        })
        .collect();
    let include: Vec<String> = packs.iter().map(|p| format!("\"lua-free-rules/{p}.toml\"")).collect();
    let top = format!("include = [{}]", include.join(", "));
    let extra: Vec<(&str, &str)> = files.iter().map(|(n, b)| (n.as_str(), *b)).collect();
    Gateway::start_in(temp_dir("pack"), &standard_config(echo.addr, Extra { top: &top, ..Extra::default() }), &extra)
}

#[test]
fn generation_api_pack() {
    let echo = Echo::start();
    let gw = pack_gateway(&echo, &["hardening", "generation-api"]);
    let acme = bearer(ACME_KEY);
    let ro = bearer(ACME_READONLY_KEY);
    let globex = bearer(GLOBEX_KEY);
    assert_eq!(gw.get("/health", &[]).status, 200);
    assert_eq!(gw.request("POST", "/api/generate?num_rows=10", &[("authorization", &acme)], b"{}").status, 200);
    let r = gw.request("POST", "/api/generate?num_rows=10", &[("authorization", &ro)], b"{}");
    assert_eq!((r.status, r.problem_code()), (403, "insufficient_scope".into()));
    assert_eq!(gw.get("/api/stream/a/b", &[("authorization", &acme)]).status, 200);
    let r = gw.get("/api/stream/a/b", &[("authorization", &globex)]);
    assert_eq!((r.status, r.problem_code()), (403, "feature_not_in_tier".into()));
    assert_eq!(gw.get("/api/jobs/42", &[("authorization", &ro)]).status, 200);
    assert_eq!(gw.get("/api/admin/users", &[("authorization", &acme)]).status, 200);
    let r = gw.get("/api/admin/users", &[("authorization", &ro)]);
    assert_eq!(r.problem_code(), "insufficient_scope");
    let r = gw.get("/api/jobs/.secret", &[("authorization", &acme)]);
    assert_eq!((r.status, r.problem_code()), (404, "denied".into()));
}

#[test]
fn openai_compatible_pack() {
    let echo = Echo::start();
    let gw = pack_gateway(&echo, &["openai-compatible"]);
    let acme = bearer(ACME_KEY);
    let ro = bearer(ACME_READONLY_KEY);
    // The echo answers the generation routes as an OpenAI-compatible API: charges settle.
    assert_eq!(gw.request("POST", "/v1/chat/completions", &[("authorization", &acme)], b"{}").status, 200);
    assert_eq!(gw.request("POST", "/v1/completions", &[("authorization", &acme)], b"{}").status, 200);
    // Refusals on the pack's routes take OpenAI's error shape.
    let openai_code = |r: &Resp| {
        assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
        r.json()["error"]["code"].as_str().unwrap_or_default().to_string()
    };
    let r = gw.request("POST", "/v1/chat/completions", &[("authorization", &ro)], b"{}");
    assert_eq!((r.status, openai_code(&r)), (403, "insufficient_scope".into()));
    assert_eq!(gw.get("/v1/models", &[("authorization", &ro)]).status, 200);
    let r = gw.request("DELETE", "/v1/models/gpt", &[("authorization", &acme)], b"");
    assert_eq!((r.status, openai_code(&r)), (405, "denied".into()));
}

#[test]
fn hardening_pack() {
    let echo = Echo::start();
    let gw = pack_gateway(&echo, &["hardening"]);
    let acme = bearer(ACME_KEY);
    let r = gw.get("/anything", &[("authorization", &acme)]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("server"), None);
    assert_eq!(r.header("x-powered-by"), None);
    assert_eq!(gw.get("/internal/metrics", &[("authorization", &acme)]).status, 404);
    assert_eq!(gw.get("/.git/config", &[("authorization", &acme)]).status, 404);
    let r = gw.request("POST", "/upload", &[("authorization", &acme), ("content-length", "10485761")], b"");
    assert_eq!(r.status, 413);
}

// ---- validation ----

const BASE: &str =
    "[upstreams.main]\nservers = [\"127.0.0.1:9000\"]\n[tiers.free]\nupstream = \"main\"\nfeatures = [\"streaming\"]\n";

fn rule_errors(rules: &str) -> Vec<config::Diagnostic> {
    let dir = temp_dir("rulecfg");
    std::fs::write(dir.join("pack.toml"), rules).expect("write");
    let path = dir.join("tollgate.toml");
    std::fs::write(&path, format!("include = [\"pack.toml\"]\n{BASE}")).expect("write");
    match config::load(&path) {
        Ok(l) => l.warnings.items,
        Err(d) => d.items,
    }
}

fn assert_rule_error(rules: &str, needle: &str, line: usize, col: usize) {
    let items = rule_errors(rules);
    let errors: Vec<_> = items.iter().filter(|d| d.severity == config::Severity::Error).collect();
    assert_eq!(errors.len(), 1, "{items:#?}");
    let e = errors[0];
    assert!(e.message.contains(needle), "`{needle}` not in {e}");
    assert!(e.file.ends_with("pack.toml"), "{e}");
    assert_eq!((e.line, e.col), (line, col), "{e}");
}

#[test]
fn rule_validation_errors_name_file_line_and_column() {
    assert_rule_error("[[rule]]\nname = \"a\"\nmatch = { path = \"/a\", pth = 1 }\n", "unknown key `match.pth`", 3, 24);
    assert_rule_error("[[rule]]\nname = \"a\"\nrequire_scope = [\"x\"]\n", "unknown key `require_scope`", 3, 1);
    assert_rule_error("[[rule]]\nname = \"a\"\nmatch = { tiers = [\"gold\"] }\n", "`gold` is not a tier", 3, 20);
    assert_rule_error("[[rule]]\nname = \"a\"\nupstream = \"nowhere\"\n", "upstream `nowhere`", 3, 12);
    assert_rule_error("[[rule]]\nname = \"a\"\nrequire_feature = \"teleport\"\n", "feature `teleport`", 3, 19);
    assert_rule_error("[[rule]]\nname = \"a\"\ncharge = { metric = \"tokenz\" }\n", "metric `tokenz`", 3, 21);
    assert_rule_error("[[rule]]\nname = \"a\"\nmax_body = \"10 MegaBytes\"\n", "size unit", 3, 12);
    assert_rule_error("[[rule]]\nname = \"a\"\ntimeout = \"soon\"\n", "not a duration", 3, 11);
    assert_rule_error(
        "[[rule]]\nname = \"a\"\nmatch = { path_glob = \"/a**\" }\n",
        "`**` must be a whole segment",
        3,
        23,
    );
    assert_rule_error("[[rule]]\nname = \"a\"\n[[rule]]\nname = \"a\"\n", "already used", 4, 8);
    assert_rule_error("[[rule]]\nname = \"a\"\nrate.free = { requests_per_minute = 0 }\n", "positive", 3, 37);
    assert_rule_error(
        "[[rule]]\nname = \"a\"\nrate.gold = { requests_per_minute = 5 }\n",
        "`gold` is not a tier",
        3,
        13,
    );
    assert_rule_error("[[rule]]\nname = \"a\"\ncharge = { metric = \"requests\" }\n", "already counts once", 3, 21);
    assert_rule_error(
        "usage_metrics = [\"tokens\"]\n[[rule]]\nname = \"a\"\nquota.default.tokens = { limit = 5 }\n",
        "only `requests` and the rule's charged metric",
        2,
        1,
    );
}

#[test]
fn body_charge_errors_name_their_place() {
    let rule = |charge: &str| {
        format!("usage_metrics = [\"tokens\"]\n[[rule]]\nname = \"a\"\nmax_body = \"1MiB\"\ncharge = {{ metric = \"tokens\", {charge} }}\n")
    };
    assert_rule_error(&rule("cost_from_body = []"), "a list of 1 to 4 paths", 5, 48);
    assert_rule_error(&rule("cost_from_body = [\"a\", \"b\", \"c\", \"d\", \"e\"]"), "a list of 1 to 4 paths", 5, 48);
    assert_rule_error(&rule("cost_from_body = [\"max_tokens\", \"max_tokens\"]"), "named twice", 5, 63);
    assert_rule_error(&rule("cost_from_body = \"usage..total\""), "not a usable body path", 5, 48);
    assert_rule_error(&rule("cost_from_body = \"n\", cost = 3"), "takes one of", 5, 10);
    assert_rule_error(&rule("default_cost = 5"), "set `cost_from_body` too", 5, 46);
    assert_rule_error(&rule("cost = 2, cost_multiplier_from_body = \"n\""), "set `cost_from_body` too", 5, 69);
    assert_rule_error(
        &rule("cost_from_body = \"m\", cost_multiplier_from_body = \"a.\""),
        "not a usable body path",
        5,
        81,
    );
    assert_rule_error(&rule("cost_from_body = \"n\", default_cost = 9, max_cost = 5"), "over `max_cost` (5)", 5, 10);
    assert_rule_error(
        "usage_metrics = [\"tokens\"]\n[[rule]]\nname = \"a\"\ncharge = { metric = \"tokens\", cost_from_body = \"n\" }\n",
        "needs a `max_body`",
        2,
        1,
    );
    // More distinct request-body paths than the scanner reads (16) is an error, not a rule
    // that silently reads nothing.
    let four = |p: &str| format!("[\"{p}1\", \"{p}2\", \"{p}3\", \"{p}4\"]");
    let many = format!(
        "usage_metrics = [\"a\", \"b\", \"c\"]\n[[rule]]\nname = \"a\"\nmax_body = \"1MiB\"\ncharge = [\n\
         {{ metric = \"a\", cost_from_body = {}, cost_multiplier_from_body = {} }},\n\
         {{ metric = \"b\", cost_from_body = {}, cost_multiplier_from_body = \"r\" }},\n\
         {{ metric = \"c\", cost_from_body = {} }},\n]\n",
        four("p"),
        four("m"),
        four("q"),
        four("s")
    );
    assert_rule_error(&many, "too many paths in the request body", 2, 1);
    assert!(rule_errors(&many.replace(", cost_multiplier_from_body = \"r\"", "")).is_empty(), "16 paths are fine");
}

#[test]
fn all_rule_errors_come_at_once() {
    let items = rule_errors(
        "[[rule]]\nname = \"a\"\nbogus = 1\nupstream = \"nowhere\"\n[[rule]]\nname = \"a\"\nmax_body = \"huge\"\n",
    );
    let n = items.iter().filter(|d| d.severity == config::Severity::Error).count();
    assert_eq!(n, 4, "{items:#?}");
}

#[test]
fn a_shadowed_rule_is_a_warning() {
    let items = rule_errors(
        "[[rule]]\nname = \"all-api\"\nmatch = { path_prefix = \"/api/\" }\n[[rule]]\nname = \"api-users\"\nmatch = { path = \"/api/users\", methods = [\"GET\"] }\n",
    );
    assert_eq!(items.len(), 1, "{items:#?}");
    assert_eq!(items[0].severity, config::Severity::Warning);
    assert!(items[0].message.contains("`api-users` can never match") && items[0].message.contains("`all-api`"));
    // Not shadowed: the earlier rule is narrower.
    let items = rule_errors(
        "[[rule]]\nname = \"get-users\"\nmatch = { path = \"/api/users\", methods = [\"GET\"] }\n[[rule]]\nname = \"all-api\"\nmatch = { path_prefix = \"/api/\" }\n",
    );
    assert!(items.is_empty(), "{items:#?}");
}

#[test]
fn rules_explain_shows_the_match_the_misses_and_the_policy() {
    let dir = temp_dir("explain");
    std::fs::create_dir_all(dir.join("lua-free-rules")).expect("mkdir");
    for (n, b) in [
        ("hardening", include_str!("../lua-free-rules/hardening.toml")),
        ("generation-api", include_str!("../lua-free-rules/generation-api.toml")),
    ] {
        std::fs::write(dir.join(format!("lua-free-rules/{n}.toml")), b).expect("write");
    }
    let path = dir.join("tollgate.toml");
    std::fs::write(
        &path,
        format!(
            "include = [\"lua-free-rules/hardening.toml\", \"lua-free-rules/generation-api.toml\"]\n{BASE}\n[tiers.pro]\nupstream = \"main\"\n[[tenants]]\nid = \"acme\"\ntier = \"pro\"\n"
        ),
    )
    .expect("write");
    let out = Command::new(bin())
        .args(["rules", "explain", "-c"])
        .arg(&path)
        .args([
            "--method",
            "POST",
            "--path",
            "/api/generate?num_rows=5",
            "--host",
            "acme.example.com",
            "--tenant",
            "acme",
        ])
        .output()
        .expect("explain");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("tier=pro tenant=acme"), "{text}");
    assert!(text.contains("deny-internal") && text.contains("does not match path_glob = /internal/**"), "{text}");
    assert!(text.contains("gen-health") && text.contains("does not match path = /health"), "{text}");
    assert!(text.contains("gen-generate") && text.contains("MATCH"), "{text}");
    assert!(text.contains("require_scopes: generate"), "{text}");
    assert!(text.contains("upstream: main (from tier `pro`)"), "{text}");
    assert!(text.contains("max_body: 10485760 bytes"), "{text}");
    assert!(text.contains("charge: records_generated cost from query `num_rows`"), "{text}");

    let out = Command::new(bin())
        .args(["rules", "explain", "-c"])
        .arg(&path)
        .args(["--method", "GET", "--path", "/api/stream/x", "--tier", "free"])
        .output()
        .expect("explain");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("require_feature: streaming (tier `free` has it)"), "{text}");

    // Explain reads the request through the gateway's canonical view: what the wire refuses,
    // explain refuses; what the wire normalizes, explain normalizes.
    let explain = |method: &str, target: &str| {
        let out = Command::new(bin())
            .args(["rules", "explain", "-c"])
            .arg(&path)
            .args(["--method", method, "--path", target])
            .output()
            .expect("explain");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, text) = explain("delete", "/api/admin/x");
    assert!(!ok && text.contains("405 method_not_allowed"), "{text}");
    let (ok, text) = explain("GET", "internal/secret.txt");
    assert!(!ok && text.contains("400 invalid_target"), "{text}");
    let (ok, text) = explain("GET", "/api/%2e%2e/%69nternal//x");
    assert!(ok && text.contains("#1 deny-internal") && text.contains("MATCH"), "{text}");
    let (ok, text) = explain("GET", "/t/acme/api/admin/x");
    assert!(ok && text.contains("tenant=acme") && text.contains("gen-admin") && text.contains("MATCH"), "{text}");
}

#[test]
fn a_405_deny_says_what_is_allowed() {
    let echo = Echo::start();
    let tail = r#"
[[rule]]
name = "items-read-only"
match = { path = "/items", methods = ["DELETE", "PUT"] }
deny = { status = 405, message = "Items are read-only." }

[[rule]]
name = "items-read"
match = { path = "/items", methods = ["GET", "HEAD"] }

[[rule]]
name = "items-create"
match = { path = "/items", methods = ["POST"] }

[[rule]]
name = "legacy"
match = { path_prefix = "/legacy/" }
deny = { status = 405, allow = ["GET"] }

[[rule]]
name = "frozen"
match = { path_prefix = "/frozen/", methods = ["POST", "PATCH"] }
deny = { status = 405 }
"#;
    let gw = gateway_with(&echo, "", tail);
    let acme = bearer(ACME_KEY);
    let r = gw.request("DELETE", "/items", &[("authorization", &acme)], b"");
    assert_eq!((r.status, r.problem_code().as_str()), (405, "denied"));
    assert_eq!(r.header("allow"), Some("GET, HEAD, POST"), "the methods of the other rules on /items");
    assert_eq!(gw.request("POST", "/legacy/x", &[("authorization", &acme)], b"").header("allow"), Some("GET"));
    assert_eq!(
        gw.request("POST", "/frozen/x", &[("authorization", &acme)], b"").header("allow"),
        Some("GET, HEAD, PUT, DELETE, OPTIONS"),
        "no other rule on the path: every default method the deny does not match"
    );
    // Other statuses carry no Allow.
    assert!(gw.get("/internal/x", &[("authorization", &acme)]).header("allow").is_none());
    assert_rule_error(
        "[[rule]]\nname = \"a\"\ndeny = { status = 403, allow = [\"GET\"] }\n",
        "only sent with `status = 405`",
        3,
        8,
    );
    assert_rule_error(
        "[[rule]]\nname = \"a\"\ndeny = { status = 405, allow = [\"get\"] }\n",
        "not an HTTP method in upper case",
        3,
        33,
    );
}
