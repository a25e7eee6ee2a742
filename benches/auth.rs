//! Resolution plus authentication with a large directory: 100,000 tenants, 1,000,000 keys.
//!
//! Bound: `resolve` + `authenticate` under 1 µs per request with 1M keys loaded.
//!
//! Run with `cargo bench --bench auth`. Building the directory hashes every key once, which
//! takes a few seconds; progress, build time and memory go to stderr.

use criterion::{criterion_group, criterion_main, Criterion};
use pingora::http::RequestHeader;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};
use tollgate::config::{self, Config, Diagnostics};
use tollgate::directory::{Builder, Directory};
use tollgate::keys::KeyHash;
use tollgate::pipeline::authenticate::{authenticate, Principal};
use tollgate::pipeline::canonical::{of_request, RequestPolicy};
use tollgate::pipeline::resolve::{check_size, resolve};
use tollgate::store::{Change, KeyRecord, TenantRecord};

const TENANTS: usize = 100_000;
const KEYS_PER_TENANT: usize = 10;
/// Distinct requests each benchmark cycles through, so lookups do not all hit one cache line.
const ROTATION: usize = 4_096;
/// A fixed "now" (2025-06-15), well before any key expiry set below.
const NOW_MS: i64 = 1_750_000_000_000;
/// Same length as a generated key: `tg_live_` plus 32 characters.
const SECRET_LEN: usize = 40;

const CONFIG: &str = r#"
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

# The template every generated tenant and key is cloned from (fields not set here keep the
# loader's defaults).
[[tenants]]
id = "template"
tier = "free"

[[tenants.keys]]
id = "template-k0"
hash = "sha256:0000000000000000000000000000000000000000000000000000000000000000"
scopes = ["read", "generate"]
"#;

fn tenant_id(t: usize) -> String {
    format!("t{t:06}")
}

/// `tg_live_<tenant>_<n>`, padded to the length of a real key.
fn secret(t: usize, n: usize) -> String {
    let mut s = format!("tg_live_{}_{n}_", tenant_id(t));
    while s.len() < SECRET_LEN {
        s.push('x');
    }
    s
}

/// Resident set size of this process in KiB, from /proc (Linux only).
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn load_config() -> Config {
    let mut diags = Diagnostics::default();
    match config::load_str(Path::new("benches/auth.toml"), CONFIG.to_string(), &mut diags) {
        Some(c) => c,
        None => panic!("bench config does not load: {diags:?}"),
    }
}

fn build_directory(config: &Config) -> Directory {
    let rss_before = rss_kib();
    let start = Instant::now();
    let template = config.tenants.first().expect("template tenant");
    let key_template = template.keys.first().expect("template key").clone();
    let mut template = template.clone();
    template.keys.clear();
    let mut dir = Builder::new(config);
    for t in 0..TENANTS {
        let id = tenant_id(t);
        let keys = (0..KEYS_PER_TENANT)
            .map(|n| {
                let mut k = key_template.clone();
                k.id = format!("{id}-k{n}");
                k.hash = KeyHash::of(secret(t, n).as_bytes());
                // Key 9 of each tenant expires far in the future, so the check runs on it.
                k.expires = (n == 9).then_some(NOW_MS + 365 * 24 * 3_600_000);
                k
            })
            .collect();
        let mut tc = template.clone();
        tc.name = format!("Tenant {t}");
        tc.email = format!("ops@{id}.example");
        tc.tier = if t % 4 == 0 { "pro" } else { "free" }.into();
        tc.subdomains = vec![format!("{id}-app")];
        tc.id = id;
        dir.config_tenant(&tc, keys);
        if (t + 1) % 20_000 == 0 {
            eprintln!(
                "  directory: {} tenants, {} keys ({:.1} s)",
                t + 1,
                dir.key_count(),
                start.elapsed().as_secs_f64()
            );
        }
    }
    let elapsed = start.elapsed();
    let dir = dir.finish();
    assert_eq!(dir.tenant_count(), TENANTS);
    assert_eq!(dir.key_count(), TENANTS * KEYS_PER_TENANT);
    eprintln!(
        "directory built: {} tenants, {} keys in {:.2} s",
        dir.tenant_count(),
        dir.key_count(),
        elapsed.as_secs_f64()
    );
    if let (Some(before), Some(after)) = (rss_before, rss_kib()) {
        eprintln!(
            "directory memory: VmRSS {:.1} MiB -> {:.1} MiB (+{:.1} MiB, {:.0} bytes per key)",
            before as f64 / 1024.0,
            after as f64 / 1024.0,
            after.saturating_sub(before) as f64 / 1024.0,
            after.saturating_sub(before) as f64 * 1024.0 / dir.key_count() as f64
        );
    }
    dir
}

/// The tenant and key number of the `i`-th request of a rotation: spread over the whole
/// directory with a stride coprime to the tenant count.
fn pick(i: usize) -> (usize, usize) {
    ((i * 7_919) % TENANTS, i % KEYS_PER_TENANT)
}

fn request(path: &str, host: &str, bearer: &str) -> RequestHeader {
    let mut req = RequestHeader::build("GET", path.as_bytes(), None).expect("request line");
    req.insert_header("host", host).expect("host");
    req.insert_header("authorization", format!("Bearer {bearer}")).expect("authorization");
    req.insert_header("user-agent", "bench/1.0").expect("user-agent");
    req.insert_header("accept", "application/json").expect("accept");
    req
}

fn bench_auth(c: &mut Criterion) {
    let config = load_config();
    eprintln!("building a directory of {TENANTS} tenants and {} keys...", TENANTS * KEYS_PER_TENANT);
    let dir = build_directory(&config);
    let tenancy = &config.tenancy;
    let max = config.server.max_header_bytes;
    let policy = RequestPolicy::of(&config);
    let peer = Some(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)));

    let bearer: Vec<RequestHeader> = (0..ROTATION)
        .map(|i| {
            let (t, n) = pick(i);
            request("/v1/chat/completions", "api.example.com", &secret(t, n))
        })
        .collect();
    let subdomain: Vec<RequestHeader> = (0..ROTATION)
        .map(|i| {
            let (t, n) = pick(i);
            let host = format!("{}.api.example.com", tenant_id(t));
            request("/v1/chat/completions", &host, &secret(t, n))
        })
        .collect();
    let unknown: Vec<RequestHeader> = (0..ROTATION)
        .map(|i| {
            let (t, _) = pick(i);
            // Right shape and prefix, but key number 99 was never issued.
            request("/v1/chat/completions", "api.example.com", &secret(t, 99))
        })
        .collect();

    // Every prepared request must give the expected answer before it is timed.
    for req in bearer.iter().chain(&subdomain) {
        let canon = of_request(req, &policy).expect("canonical");
        let hints = resolve(tenancy, &canon, req, peer).expect("resolves");
        let principal = authenticate(&dir, &hints, NOW_MS).expect("authenticates");
        assert!(matches!(principal, Principal::Keyed { .. }));
    }
    for req in &unknown {
        let canon = of_request(req, &policy).expect("canonical");
        let hints = resolve(tenancy, &canon, req, peer).expect("resolves");
        assert!(authenticate(&dir, &hints, NOW_MS).is_err());
    }

    let run = |req: &RequestHeader| -> bool {
        if check_size(black_box(req), max).is_err() {
            return false;
        }
        let Ok(canon) = of_request(req, &policy) else { return false };
        let hints = match resolve(tenancy, &canon, req, peer) {
            Ok(h) => h,
            Err(_) => return false,
        };
        authenticate(&dir, &hints, NOW_MS).is_ok()
    };

    let mut g = c.benchmark_group("resolve+authenticate");
    g.sample_size(50).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));

    g.bench_function("valid_key_bearer", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % ROTATION;
            black_box(run(&bearer[i]))
        })
    });
    g.bench_function("valid_key_subdomain_host", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % ROTATION;
            black_box(run(&subdomain[i]))
        })
    });
    g.bench_function("unknown_key", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % ROTATION;
            black_box(run(&unknown[i]))
        })
    });
    g.bench_function("valid_key_bearer_same_request", |b| {
        let req = &bearer[0];
        b.iter(|| black_box(run(req)))
    });
    g.finish();

    // Where the time goes: each step of the above on its own.
    let mut g = c.benchmark_group("auth_parts");
    g.sample_size(50).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    g.bench_function("resolve_only", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % ROTATION;
            let req = black_box(&bearer[i]);
            let Ok(canon) = of_request(req, &policy) else { return false };
            black_box(resolve(tenancy, &canon, req, peer).is_ok())
        })
    });
    let secrets: Vec<String> = (0..ROTATION)
        .map(|i| {
            let (t, n) = pick(i);
            secret(t, n)
        })
        .collect();
    g.bench_function("sha256_of_key", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % ROTATION;
            black_box(KeyHash::of(black_box(secrets[i].as_bytes())))
        })
    });
    let hashes: Vec<KeyHash> = secrets.iter().map(|s| KeyHash::of(s.as_bytes())).collect();
    g.bench_function("directory_lookup", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % ROTATION;
            black_box(dir.key(black_box(&hashes[i])).is_some())
        })
    });
    g.finish();
}

/// A directory of store tenants (as loaded from the store) with `keys` keys over `tenants`
/// tenants, on tier `free`.
fn store_directory(config: &Config, tenants: usize, keys_per_tenant: usize) -> Directory {
    let mut b = Builder::new(config);
    for t in 0..tenants {
        b.tenant_record(&tenant_record(t));
    }
    for t in 0..tenants {
        for n in 0..keys_per_tenant {
            b.key_record(&key_record(t, n, None));
        }
    }
    b.finish()
}

fn tenant_record(t: usize) -> TenantRecord {
    TenantRecord {
        id: tenant_id(t),
        name: format!("Tenant {t}"),
        email: String::new(),
        tier: "free".into(),
        status: "active".into(),
        subdomains: Vec::new(),
        ip_allow: Vec::new(),
        billing_anchor_day: 1,
        timezone: "UTC".into(),
        overrides: Default::default(),
        created_ms: NOW_MS,
        updated_ms: NOW_MS,
    }
}

fn key_record(t: usize, n: usize, revoked: Option<i64>) -> KeyRecord {
    KeyRecord {
        id: format!("key_{t:06}_{n:02}"),
        tenant: tenant_id(t),
        name: String::new(),
        hash: KeyHash::of(secret(t, n).as_bytes()).to_string(),
        scopes: vec!["read".into(), "generate".into()],
        created_ms: NOW_MS,
        expires_ms: None,
        revoked_at_ms: revoked,
        rotated_to: None,
    }
}

/// What one admin write or one change from the feed costs the directory: a clone of the running
/// snapshot, the change applied to it, and the old snapshot's share freed; for a small and a
/// large directory, to show the cost does not follow the size.
fn bench_changes(c: &mut Criterion) {
    let config = load_config();
    let mut g = c.benchmark_group("directory_change");
    g.sample_size(50).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    for (tenants, keys) in [(10_000, 1), (TENANTS, KEYS_PER_TENANT)] {
        let dir = store_directory(&config, tenants, keys);
        let label = format!("{}_keys", tenants * keys);
        let revoke = Change::Key { record: key_record(tenants / 2, 0, Some(NOW_MS)) };
        let mut suspended = tenant_record(tenants / 2);
        suspended.status = "suspended".into();
        let suspend = Change::Tenant { record: suspended };
        let new_key = Change::Key { record: key_record(tenants / 2, 50, None) };
        for (what, change) in [("revoke_key", &revoke), ("suspend_tenant", &suspend), ("add_key", &new_key)] {
            let mut check = dir.clone();
            check.apply(&config, change);
            let key0 = check.key(&KeyHash::of(secret(tenants / 2, 0).as_bytes())).expect("key 0");
            let applied = match what {
                "revoke_key" => key0.revoked_at().is_some(),
                "suspend_tenant" => key0.tenant.status != dir.tenant(&tenant_id(0)).expect("tenant").status,
                _ => check.key_count() == dir.key_count() + 1,
            };
            assert!(applied, "{what} did not apply");
            g.bench_function(format!("{what}/{label}"), |b| {
                b.iter(|| {
                    let mut next = dir.clone();
                    next.apply(&config, black_box(change));
                    black_box(next.key_count())
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench_auth, bench_changes);
criterion_main!(benches);
