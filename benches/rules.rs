//! Rule lookup: `RuleSet::find` over 1,000 rules compiled from TOML, and the same lookups over
//! 10 rules to show the cost follows the path, not the rule count.
//!
//! Bound: p50 match time ≤ 1 µs with 1,000 rules.
//!
//! Also the canonical request view every request is read into before matching
//! (`pipeline::canonical`): a plain origin-form request, and one with encodings and dot segments
//! to resolve.
//!
//! Run with `cargo bench --bench rules`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::{HeaderMap, HeaderValue, Method};
use std::fmt::Write;
use std::hint::black_box;
use std::path::Path;
use std::time::Duration;
use tollgate::config::{self, Diagnostics};
use tollgate::rules::matcher::RequestView;
use tollgate::rules::RuleSet;

const HEADER: &str = r#"
unmatched = "deny"

[server]
listen = ["127.0.0.1:8080"]

[tenancy]
resolve = ["api_key", "subdomain", "path"]
base_domain = "api.example.com"

[upstreams.main]
servers = ["127.0.0.1:9000"]

[tiers.free]
upstream = "main"
features = []

[tiers.pro]
upstream = "main"
features = ["streaming"]

[defaults]
max_body = "10MiB"
remove_response_headers = ["server", "x-powered-by"]

# Hardening: these come first and every lookup walks them.
[[rule]]
name = "deny-internal"
match = { path_glob = "/internal/**" }
deny = { status = 404, message = "Not found." }

[[rule]]
name = "deny-dotfiles"
match = { path_glob = "/**/.*" }
deny = { status = 404, message = "Not found." }
"#;

const SERVICES: &[&str] = &["billing", "users", "orders", "catalog", "search", "inventory", "reports", "media"];
const RESOURCES: &[&str] = &["items", "summary", "export", "settings", "stats", "history"];

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Exact,
    Prefix,
    Glob,
}

/// A request the generated rule set is known to answer in a particular way.
struct Probe {
    method: Method,
    path: String,
    /// The name of the rule that must be found (`None`: no rule matches).
    expect: Option<String>,
}

/// The probes of one rule set, one per benchmarked case.
struct Probes {
    exact_near_end: Probe,
    prefix: Probe,
    glob: Probe,
    no_match: Probe,
}

/// Generates a rule file of `n` rules: two hardening globs, then exact paths (70%), prefixes
/// (20%) and globs (10%) interleaved evenly in file order. Some rules restrict methods, a few
/// match on a header or a host. Also returns requests with known answers.
fn generate(n: usize) -> (String, Probes) {
    let globs = n / 10;
    let prefixes = n / 5;
    let exacts = n - 2 - globs - prefixes;
    // Spread each kind evenly over the list: item j of a kind with c items sits at (j+0.5)/c.
    let mut order: Vec<(f64, Kind, usize)> = Vec::with_capacity(n);
    for (kind, count) in [(Kind::Exact, exacts), (Kind::Prefix, prefixes), (Kind::Glob, globs)] {
        for j in 0..count {
            order.push(((j as f64 + 0.5) / count as f64, kind, j));
        }
    }
    order.sort_by(|a, b| a.0.total_cmp(&b.0));

    let mut toml = String::from(HEADER);
    let mut last_exact = None;
    let mut last_prefix = None;
    let mut last_glob = None;
    for (_, kind, j) in order {
        let svc = SERVICES[j % SERVICES.len()];
        let res = RESOURCES[j % RESOURCES.len()];
        toml.push_str("\n[[rule]]\n");
        match kind {
            Kind::Exact => {
                let name = format!("{svc}-{res}-{j}");
                let path = format!("/v{}/{svc}/r{j}/{res}", 1 + j % 2);
                let mut m = format!("path = \"{path}\"");
                let method = match j % 3 {
                    0 => {
                        m.push_str(", methods = [\"GET\", \"HEAD\"]");
                        Method::GET
                    }
                    1 => {
                        m.push_str(", methods = [\"POST\"]");
                        Method::POST
                    }
                    _ => Method::GET,
                };
                let plain = match j % 50 {
                    13 => {
                        m.push_str(", host = \"admin.example.com\"");
                        false
                    }
                    29 => {
                        m.push_str(", headers = { \"x-api-version\" = \"2024-01\" }");
                        false
                    }
                    _ => true,
                };
                writeln!(toml, "name = \"{name}\"\nmatch = {{ {m} }}").unwrap();
                if method == Method::POST {
                    toml.push_str("require_scopes = [\"write\"]\nmax_body = \"1MiB\"\n");
                } else {
                    toml.push_str("require_scopes = [\"read\"]\n");
                }
                if plain {
                    last_exact = Some(Probe { method, path, expect: Some(name) });
                }
            }
            Kind::Prefix => {
                let name = format!("files-{svc}-{j}");
                let prefix = format!("/files/{svc}/b{j}/");
                let mut m = format!("path_prefix = \"{prefix}\"");
                let plain = if j % 40 == 7 {
                    m.push_str(", host = \"*.partner.example.com\"");
                    false
                } else {
                    true
                };
                if j % 4 == 0 {
                    m.push_str(", methods = [\"GET\"]");
                }
                writeln!(toml, "name = \"{name}\"\nmatch = {{ {m} }}\nrequire_scopes = [\"read\"]").unwrap();
                if plain {
                    let path = format!("{prefix}2024/06/report-{j}.csv");
                    last_prefix = Some(Probe { method: Method::GET, path, expect: Some(name) });
                }
            }
            Kind::Glob => {
                let name = format!("glob-{svc}-{j}");
                // Shapes rotate from the end, so the last glob (the probe) has the same shape
                // whatever the rule count.
                let (glob, path) = match (globs - 1 - j) % 4 {
                    0 => (format!("/jobs/{svc}/q{j}/*/logs"), format!("/jobs/{svc}/q{j}/job-8f3a2c/logs")),
                    1 => (format!("/jobs/{svc}/q{j}/*"), format!("/jobs/{svc}/q{j}/job-8f3a2c")),
                    2 => (format!("/stream/{svc}/s{j}/**"), format!("/stream/{svc}/s{j}/2024/06/15/events")),
                    _ => (format!("/assets/{svc}/a{j}/*.json"), format!("/assets/{svc}/a{j}/manifest.json")),
                };
                writeln!(toml, "name = \"{name}\"\nmatch = {{ path_glob = \"{glob}\" }}\npublic = true").unwrap();
                last_glob = Some(Probe { method: Method::GET, path, expect: Some(name) });
            }
        }
    }
    let probes = Probes {
        exact_near_end: last_exact.expect("an exact rule"),
        prefix: last_prefix.expect("a prefix rule"),
        glob: last_glob.expect("a glob rule"),
        no_match: Probe { method: Method::GET, path: "/v3/unknown/widgets/42/details".into(), expect: None },
    };
    (toml, probes)
}

fn compile(n: usize) -> (RuleSet, Probes) {
    let (toml, probes) = generate(n);
    let mut diags = Diagnostics::default();
    let config = match config::load_str(Path::new("benches/rules.toml"), toml, &mut diags) {
        Some(c) => c,
        None => panic!("generated rules do not compile: {diags:?}"),
    };
    assert_eq!(config.rules.len(), n, "rule count");
    assert!(!diags.has_errors(), "{diags:?}");
    (config.rules, probes)
}

fn headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static("api.example.com"));
    h.insert("authorization", HeaderValue::from_static("Bearer tg_live_0123456789abcdefghijklmnopqrstuv"));
    h.insert("user-agent", HeaderValue::from_static("bench/1.0"));
    h.insert("accept", HeaderValue::from_static("application/json"));
    h
}

fn view<'a>(p: &'a Probe, headers: &'a HeaderMap) -> RequestView<'a> {
    RequestView {
        method: &p.method,
        host: "api.example.com",
        path: &p.path,
        query: None,
        headers,
        tier: Some("pro"),
        tenant: Some("acme"),
    }
}

fn bench_rules(c: &mut Criterion) {
    let headers = headers();
    let mut g = c.benchmark_group("rules_find");
    g.sample_size(50).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    for n in [1000, 10] {
        let (rules, probes) = compile(n);
        let cases = [
            ("exact_near_end", &probes.exact_near_end),
            ("prefix", &probes.prefix),
            ("glob", &probes.glob),
            ("no_match", &probes.no_match),
        ];
        for (case, probe) in cases {
            let v = view(probe, &headers);
            let found = rules.find(&v).map(|r| r.name.to_string());
            assert_eq!(found, probe.expect, "{n} rules, {case}: {} {}", probe.method, probe.path);
            if let Some(r) = rules.find(&v) {
                eprintln!("{n} rules, {case}: {} {} -> rule #{} `{}`", probe.method, probe.path, r.index, r.name);
            }
            g.bench_with_input(BenchmarkId::new(case, n), &v, |b, v| {
                b.iter(|| black_box(rules.find(black_box(v)).is_some()))
            });
        }
    }
    g.finish();
}

fn bench_canonical(c: &mut Criterion) {
    use tollgate::pipeline::canonical::{canonicalize, RequestPolicy};
    let methods: Vec<Method> =
        config::DEFAULT_METHODS.iter().filter_map(|m| Method::from_bytes(m.as_bytes()).ok()).collect();
    let allow = methods.iter().map(Method::as_str).collect::<Vec<_>>().join(", ");
    let keys = [http::header::AUTHORIZATION, http::HeaderName::from_static("x-api-key")];
    let tenant_header = http::HeaderName::from_static("x-tenant-id");
    let policy = RequestPolicy {
        allowed_methods: &methods,
        allow_header: &allow,
        key_headers: &keys,
        tenant_header: Some(&tenant_header),
        rule_headers: &[],
        read_headers: &[],
        read_query: &[],
    };
    let mut h = headers();
    h.insert(http::header::HOST, HeaderValue::from_static("acme.api.example.com"));
    h.insert(http::header::AUTHORIZATION, HeaderValue::from_static("Bearer tg_live_0123456789abcdefghijklmnop"));
    h.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("42"));
    let mut g = c.benchmark_group("canonicalize");
    g.sample_size(50).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    for (case, target) in
        [("plain", "/v1/chat/completions?stream=true"), ("encoded", "/v1/./chat/%63ompletions//x/..?n%75m=1")]
    {
        assert!(canonicalize(&Method::POST, target.as_bytes(), &h, &policy).is_ok(), "{case}");
        g.bench_function(case, |b| {
            b.iter(|| black_box(canonicalize(&Method::POST, black_box(target.as_bytes()), &h, &policy).is_ok()))
        });
    }
    g.finish();
}

criterion_group!(benches, bench_rules, bench_canonical);
criterion_main!(benches);
