//! Resolution plus authentication with a large directory: 100,000 tenants, 1,000,000 keys.
//!
//! Bound: `resolve` + `authenticate` under 1 µs per request with 1M keys loaded.
//!
//! Run with `cargo bench --bench auth`. Building the directory hashes every key once, which
//! takes a few seconds; progress, build time and memory go to stderr.
//!
//! Also JWTs (`cargo bench --bench auth -- jwt`): resolution plus authentication with a cached
//! token, and the first verification of a token per algorithm (see `jwt_bench`).

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

// ---------------------------------------------------------------------------------------------
// Tenants from JWTs (`cargo bench --bench auth -- jwt`)
//
// Bound: resolution plus authentication with a cached JWT under 1 µs, with 100,000 tenants.
// The first verification of a token (signature and claims) is measured per algorithm.

mod jwt_bench {
    use super::*;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use std::sync::Arc;
    use tollgate::jwt::Jwt;
    use tollgate::pipeline::authenticate::identify_with;
    use tollgate::runtime::Runtime;

    const JWT_TENANTS: usize = 100_000;
    /// Distinct tokens the cached benchmark cycles through.
    const TOKENS: usize = 1_024;
    const NOW_S: i64 = NOW_MS / 1000;
    const SECRET: &str = "the bench's HMAC secret, at least 32 bytes long";

    struct Signer {
        alg: Algorithm,
        issuer: &'static str,
        enc: EncodingKey,
    }

    impl Signer {
        fn sign(&self, tenant: &str) -> String {
            let mut h = Header::new(self.alg);
            h.kid = Some("k1".into());
            let claims = serde_json::json!({
                "iss": self.issuer, "aud": "https://api.example.com", "sub": "auth0|user-1",
                "exp": NOW_S + 3600, "iat": NOW_S, "https://example.com/tenant": tenant, "scope": "read generate",
            });
            jsonwebtoken::encode(&h, &claims, &self.enc).expect("sign")
        }
    }

    /// Keys for every algorithm family, their key sets written to `dir`, and the `[jwt]` tables.
    fn setup(dir: &Path, cache_size: usize) -> (Vec<Signer>, String) {
        use base64::Engine;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let rsa = {
            use rsa::pkcs1::EncodeRsaPrivateKey;
            let k = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).expect("rsa");
            EncodingKey::from_rsa_der(k.to_pkcs1_der().expect("der").as_bytes())
        };
        let ec = {
            use p256::pkcs8::EncodePrivateKey;
            EncodingKey::from_ec_der(
                p256::SecretKey::random(&mut rand_core::OsRng).to_pkcs8_der().expect("der").as_bytes(),
            )
        };
        let ed_key = ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng);
        let ed = {
            use ed25519_dalek::pkcs8::EncodePrivateKey;
            EncodingKey::from_ed_der(ed_key.to_pkcs8_der().expect("der").as_bytes())
        };
        let jwk = |enc: &EncodingKey, alg| {
            let mut j = jsonwebtoken::jwk::Jwk::from_encoding_key(enc, alg).expect("jwk");
            j.common.key_id = Some("k1".into());
            serde_json::to_value(j).expect("json")
        };
        let sets = [
            ("rs.json", jwk(&rsa, Algorithm::RS256)),
            ("es.json", jwk(&ec, Algorithm::ES256)),
            (
                "ed.json",
                serde_json::json!({"kty": "OKP", "crv": "Ed25519", "kid": "k1", "x": b64(ed_key.verifying_key().as_bytes())}),
            ),
        ];
        for (name, key) in sets {
            std::fs::write(dir.join(name), serde_json::json!({ "keys": [key] }).to_string()).expect("write jwks");
        }
        std::fs::write(dir.join("hs.secret"), SECRET).expect("write secret");
        let mut tables = format!("\n[jwt]\ncache_size = {cache_size}\n");
        for (iss, alg, keys) in [
            ("https://rs.idp.test/", "RS256", format!("jwks_file = \"{}\"", dir.join("rs.json").display())),
            ("https://es.idp.test/", "ES256", format!("jwks_file = \"{}\"", dir.join("es.json").display())),
            ("https://ed.idp.test/", "EdDSA", format!("jwks_file = \"{}\"", dir.join("ed.json").display())),
            ("https://hs.idp.test/", "HS256", format!("hmac_secret_file = \"{}\"", dir.join("hs.secret").display())),
        ] {
            tables.push_str(&format!(
                "\n[[jwt.issuers]]\nissuer = \"{iss}\"\naudiences = [\"https://api.example.com\"]\nalgorithms = [\"{alg}\"]\n{keys}\ntenant_claim = \"https://example.com/tenant\"\n"
            ));
        }
        let signers = vec![
            Signer { alg: Algorithm::RS256, issuer: "https://rs.idp.test/", enc: rsa },
            Signer { alg: Algorithm::ES256, issuer: "https://es.idp.test/", enc: ec },
            Signer { alg: Algorithm::EdDSA, issuer: "https://ed.idp.test/", enc: ed },
            Signer {
                alg: Algorithm::HS256,
                issuer: "https://hs.idp.test/",
                enc: EncodingKey::from_secret(SECRET.as_bytes()),
            },
        ];
        (signers, tables)
    }

    /// A runtime of `JWT_TENANTS` tenants (no keys) on a config with the `[jwt]` tables.
    fn runtime(tables: &str) -> Arc<Runtime> {
        let text = CONFIG.replace(
            "resolve = [\"api_key\", \"subdomain\", \"path\"]",
            "resolve = [\"api_key\", \"jwt\", \"subdomain\", \"path\"]",
        ) + tables;
        let mut diags = Diagnostics::default();
        let mut config = match config::load_str(Path::new("benches/auth.toml"), text, &mut diags) {
            Some(c) => c,
            None => panic!("bench config does not load: {diags:?}"),
        };
        let mut template = config.tenants.first().expect("template tenant").clone();
        template.keys.clear();
        let mut dir = Builder::new(&config);
        for t in 0..JWT_TENANTS {
            let mut tc = template.clone();
            tc.id = tenant_id(t);
            tc.tier = if t % 4 == 0 { "pro" } else { "free" }.into();
            dir.config_tenant(&tc, Vec::new());
        }
        let directory = dir.finish();
        config.tenants = Vec::new();
        Arc::new(Runtime { config: Arc::new(config), directory })
    }

    /// Resolve, the token stage and authenticate, as `request_filter` runs them: `true` when
    /// the request is authenticated as a token's tenant.
    fn run(jwt: &Jwt, rt: &Arc<Runtime>, req: &RequestHeader, policy: &RequestPolicy, peer: Option<IpAddr>) -> bool {
        if check_size(req, rt.config.server.max_header_bytes).is_err() {
            return false;
        }
        let Ok(canon) = of_request(req, policy) else { return false };
        let Ok(hints) = resolve(&rt.config.tenancy, &canon, req, peer) else { return false };
        let Some(token) = hints.token else { return false };
        // The cached path and a file or secret key set never wait: the future is ready at once.
        let verified = match futures_util::FutureExt::now_or_never(tollgate::pipeline::token::verify(jwt, rt, token)) {
            Some(Ok(v)) => v,
            _ => return false,
        };
        matches!(identify_with(&rt.directory, &hints, Some(&verified), NOW_MS), Ok(Principal::Token { .. }))
    }

    pub fn bench_jwt(c: &mut Criterion) {
        let dir = std::env::temp_dir().join(format!("tollgate-bench-jwt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (signers, tables) = setup(&dir, 100_000);
        let clock: tollgate::clock::SharedClock = tollgate::clock::ManualClock::new(NOW_MS);
        let rt = runtime(&tables);
        let policy = RequestPolicy::of(&rt.config);
        let peer = Some(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)));
        let jwt = Jwt::new(clock.clone(), None);

        // Cached: RS256 tokens of distinct tenants, each verified once before timing.
        let reqs: Vec<RequestHeader> = (0..TOKENS)
            .map(|i| request("/v1/chat/completions", "api.example.com", &signers[0].sign(&tenant_id(pick(i).0))))
            .collect();
        for r in &reqs {
            assert!(run(&jwt, &rt, r, &policy, peer), "a bench token does not authenticate");
        }
        assert_eq!(jwt.cached(), TOKENS);
        let mut g = c.benchmark_group("jwt");
        g.sample_size(50).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
        g.bench_function("cached_token_resolve_authenticate", |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % TOKENS;
                black_box(run(&jwt, &rt, &reqs[i], &policy, peer))
            })
        });
        g.bench_function("cached_token_same_request", |b| {
            b.iter(|| black_box(run(&jwt, &rt, &reqs[0], &policy, peer)))
        });
        g.finish();

        // Where the time of the cached path goes.
        let tokens: Vec<Vec<u8>> = reqs
            .iter()
            .map(|r| {
                let v = r.headers.get("authorization").expect("authorization").as_bytes();
                v[7..].to_vec()
            })
            .collect();
        let mut g = c.benchmark_group("jwt_parts");
        g.sample_size(50).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
        g.bench_function("resolve_only", |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % TOKENS;
                let req = black_box(&reqs[i]);
                let Ok(canon) = of_request(req, &policy) else { return false };
                black_box(resolve(&rt.config.tenancy, &canon, req, peer).is_ok())
            })
        });
        g.bench_function("sha256_of_token", |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % TOKENS;
                black_box(tollgate::jwt::cache::Digest::of(black_box(&tokens[i])))
            })
        });
        g.bench_function("token_stage_cached", |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % TOKENS;
                let f = tollgate::pipeline::token::verify(&jwt, &rt, black_box(&tokens[i]));
                black_box(futures_util::FutureExt::now_or_never(f).is_some_and(|r| r.is_ok()))
            })
        });
        g.finish();

        // First verification: a cache of one entry and two tokens taken in turn, so every
        // request is checked in full (parse, issuer, key, signature, claims), per algorithm.
        let rt_one = runtime(&tables.replace("cache_size = 100000", "cache_size = 1"));
        let mut g = c.benchmark_group("jwt_first_verification");
        g.sample_size(30).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
        for s in &signers {
            let jwt = Jwt::new(clock.clone(), None);
            let pair = [
                request("/v1/chat/completions", "api.example.com", &s.sign(&tenant_id(1))),
                request("/v1/chat/completions", "api.example.com", &s.sign(&tenant_id(2))),
            ];
            assert!(pair.iter().all(|r| run(&jwt, &rt_one, r, &policy, peer)));
            g.bench_function(format!("{:?}", s.alg), |b| {
                let mut i = 0;
                b.iter(|| {
                    i ^= 1;
                    black_box(run(&jwt, &rt_one, &pair[i], &policy, peer))
                })
            });
            assert!(jwt.cached() <= 1);
        }
        g.finish();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn bench_auth(c: &mut Criterion) {
    // The JWT cases first: they need no 1M-key directory (see `jwt_bench`).
    jwt_bench::bench_jwt(c);
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

criterion_group!(benches, bench_auth, bench_changes);
criterion_main!(benches);
