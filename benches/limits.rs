//! The in-memory limit path: rate buckets, quota reservations from a warm lease on the embedded
//! store, concurrency slots, and the whole admission path short of the network (resolve,
//! authenticate, authorize, rate limit, quota, concurrency) with 100,000 tenants loaded.
//!
//! Bound: the limit stages (rate + quota + concurrency) add at most 2 µs per request.
//!
//! Run with `cargo bench --bench limits`. The setup first measures the memory of 1,000,000 rate
//! buckets (VmRSS before and after) and prints it to stderr, then builds the directory.
//!
//! Groups:
//! - `limit_parts`: `RateLimiters::check` on existing buckets, `QuotaEngine::reserve` from a warm
//!   lease on the embedded store, `Concurrency::acquire` plus dropping the guard.
//! - `admission_100k_tenants`: `full_path` runs resolve, authenticate, authorize, then the
//!   pipeline's rate-limit, quota and concurrency stages on 4,096 requests spread over 100,000
//!   tenants; `before_limits` runs only the first three, so `full_path - before_limits` is what
//!   the limits add; the `_same_request` variants repeat one request, all in cache;
//!   `limit_stages_only` runs just the three limit stages on the same requests,
//!   already authorized; `render_limit_headers` formats the limit headers of one response.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use pingora::http::RequestHeader;
use std::future::Future;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;
use tollgate::clock::{SharedClock, SystemClock};
use tollgate::config::{self, Config, Diagnostics};
use tollgate::directory::{Builder, Directory};
use tollgate::keys::KeyHash;
use tollgate::limits::concurrency::Concurrency;
use tollgate::limits::headers::LimitHeaders;
use tollgate::limits::quota::QuotaEngine;
use tollgate::limits::rate::{RateDecision, RateLimiters, TIER_SLOT};
use tollgate::limits::Limits;
use tollgate::metrics::Metrics;
use tollgate::pipeline::authenticate::authenticate;
use tollgate::pipeline::authorize::{authorize, Permit};
use tollgate::pipeline::canonical::{of_request, Canonical, RequestPolicy};
use tollgate::pipeline::quota::WarnSink;
use tollgate::pipeline::resolve::{check_size, resolve, Hints};
use tollgate::pipeline::{concurrency, quota, rate_limit};
use tollgate::policy::{ConcurrencySpec, Period, Policy, QuotaSpec, RateSpec, StorePolicy};
use tollgate::store::embedded::Embedded;
use tollgate::store::Counters;

const TENANTS: usize = 100_000;
/// Distinct requests (and tenants) each benchmark cycles through.
const ROTATION: usize = 4_096;
/// Rate buckets created for the memory measurement.
const MEMORY_BUCKETS: usize = 1_000_000;
/// A fixed "now" for key checks (no key below expires).
const NOW_MS: i64 = 1_750_000_000_000;
const SECRET_LEN: usize = 40;
/// Large enough never to run out during a run: the lease stays warm.
const BIG_QUOTA: u64 = 1_000_000_000_000;

const CONFIG: &str = r#"
usage_metrics = ["tokens"]

[server]
listen = ["127.0.0.1:8080"]

[tenancy]
resolve = ["api_key"]

[upstreams.main]
servers = ["127.0.0.1:9000"]

# Limits that never refuse during a run (even one tenant at millions of requests a second), so
# every iteration does the admitting work; the benchmarks assert it.
[tiers.free]
upstream = "main"
rate = { requests_per_second = 1000000000 }
quotas.requests = { limit = 1000000000000, period = "month" }
quotas.tokens = { limit = 1000000000000, period = "day" }
concurrency = 100

[tiers.pro]
upstream = "main"
rate = { requests_per_second = 1000000000, burst = 2000000000 }
quotas.requests = { limit = 1000000000000, period = "month" }
quotas.tokens = { limit = 1000000000000, period = "day" }
concurrency = 200
queue = { max = 100, timeout = "5s" }

[[rule]]
name = "deny-internal"
match = { path_glob = "/internal/**" }
deny = { status = 404, message = "Not found." }

[[rule]]
name = "chat"
match = { path = "/v1/chat/completions", methods = ["POST"] }
require_scopes = ["generate"]
charge = { metric = "tokens", cost_from_header = "x-max-tokens", max_cost = 100000, settle_from_header = "x-usage-tokens" }

[[rule]]
name = "read"
match = { path_prefix = "/v1/" }
require_scopes = ["read"]

[[tenants]]
id = "template"
tier = "free"

[[tenants.keys]]
id = "template-k0"
hash = "sha256:0000000000000000000000000000000000000000000000000000000000000000"
scopes = ["read", "generate"]
"#;

/// Drives a future the way the gateway's request task does: polled in place, inside the
/// runtime (background work it spawns, such as a lease prefetch, runs on the runtime's worker).
/// The limit futures finish on their first poll when no store round trip is needed; if one
/// does not, it is finished with `block_on`.
fn run<F: Future>(rt: &Runtime, fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let first = {
        let _enter = rt.enter();
        fut.as_mut().poll(&mut Context::from_waker(Waker::noop()))
    };
    match first {
        Poll::Ready(v) => v,
        Poll::Pending => {
            PENDING.fetch_add(1, Ordering::Relaxed);
            rt.block_on(fut)
        }
    }
}

/// Futures that did not finish on their first poll (expected: none).
static PENDING: AtomicU64 = AtomicU64::new(0);

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime")
}

fn tenant_id(t: usize) -> String {
    format!("t{t:06}")
}

fn secret(t: usize) -> String {
    let mut s = format!("tg_live_{}_0_", tenant_id(t));
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
    match config::load_str(Path::new("benches/limits.toml"), CONFIG.to_string(), &mut diags) {
        Some(c) => c,
        None => panic!("bench config does not load: {diags:?}"),
    }
}

fn build_directory(config: &Config) -> Directory {
    let start = Instant::now();
    let template = config.tenants.first().expect("template tenant");
    let key_template = template.keys.first().expect("template key").clone();
    let mut template = template.clone();
    template.keys.clear();
    let mut dir = Builder::new(config);
    for t in 0..TENANTS {
        let id = tenant_id(t);
        let mut k = key_template.clone();
        k.id = format!("{id}-k0");
        k.hash = KeyHash::of(secret(t).as_bytes());
        let mut tc = template.clone();
        tc.tier = if t % 4 == 0 { "pro" } else { "free" }.into();
        tc.id = id;
        dir.config_tenant(&tc, vec![k]);
    }
    let dir = dir.finish();
    assert_eq!(dir.tenant_count(), TENANTS);
    eprintln!(
        "directory built: {} tenants, {} keys in {:.2} s",
        dir.tenant_count(),
        dir.key_count(),
        start.elapsed().as_secs_f64()
    );
    dir
}

fn pick(i: usize) -> usize {
    (i * 7_919) % TENANTS
}

fn request(method: &str, path: &str, bearer: &str, cost: Option<u64>) -> RequestHeader {
    let mut req = RequestHeader::build(method, path.as_bytes(), None).expect("request line");
    req.insert_header("host", "api.example.com").expect("host");
    req.insert_header("authorization", format!("Bearer {bearer}")).expect("authorization");
    req.insert_header("user-agent", "bench/1.0").expect("user-agent");
    req.insert_header("accept", "application/json").expect("accept");
    if let Some(c) = cost {
        req.insert_header("x-max-tokens", c.to_string()).expect("cost");
    }
    req
}

fn rate_spec() -> RateSpec {
    RateSpec { limit: 1_000_000_000, period: Duration::from_secs(1), burst: 1_000_000_000, global: false }
}

fn policy() -> Policy {
    Policy { billing_anchor_day: 1, timezone: chrono_tz::UTC, ..Policy::default() }
}

fn temp_db(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tollgate-bench-{tag}-{}.db", std::process::id()))
}

fn remove_db(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

fn embedded(path: &Path) -> Arc<dyn Counters> {
    remove_db(path);
    Arc::new(Embedded::open(path, chrono::Utc::now().timestamp_millis()).expect("embedded store"))
}

/// Memory of one rate bucket: RSS growth over `MEMORY_BUCKETS` first checks for distinct
/// tenants. The tenant ids are allocated before the first reading, as in the gateway, where the
/// bucket table shares the directory's `Arc<str>`.
fn measure_bucket_memory() {
    let ids: Vec<Arc<str>> = (0..MEMORY_BUCKETS).map(|t| Arc::from(format!("m{t:07}").as_str())).collect();
    let spec = RateSpec { limit: 600, period: Duration::from_secs(60), burst: 600, global: false };
    let before = rss_kib();
    let start = Instant::now();
    let rl = RateLimiters::new();
    for id in &ids {
        black_box(rl.check(id, TIER_SLOT, &spec));
    }
    let took = start.elapsed();
    let after = rss_kib();
    assert_eq!(rl.len(), MEMORY_BUCKETS);
    if let (Some(before), Some(after)) = (before, after) {
        let grown = after.saturating_sub(before);
        eprintln!(
            "rate buckets: {} created in {:.2} s; VmRSS {:.1} MiB -> {:.1} MiB (+{:.1} MiB, {:.0} bytes per bucket)",
            rl.len(),
            took.as_secs_f64(),
            before as f64 / 1024.0,
            after as f64 / 1024.0,
            grown as f64 / 1024.0,
            grown as f64 * 1024.0 / MEMORY_BUCKETS as f64
        );
    }
}

/// The parts, each on its own.
fn bench_parts(c: &mut Criterion) {
    measure_bucket_memory();
    let rt = runtime();
    let clock: SharedClock = Arc::new(SystemClock);

    let mut g = c.benchmark_group("limit_parts");
    g.sample_size(50).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));

    // (1) Rate: an existing bucket, then 4,096 buckets of a 100,000-bucket table in turn.
    let spec = rate_spec();
    let rl = RateLimiters::new();
    let ids: Vec<Arc<str>> = (0..TENANTS).map(|t| Arc::from(tenant_id(t).as_str())).collect();
    for id in &ids {
        assert!(matches!(rl.check(id, TIER_SLOT, &spec), RateDecision::Allowed { .. }));
    }
    g.bench_function("rate_check_same_bucket", |b| {
        let t = &ids[0];
        b.iter(|| black_box(rl.check(black_box(t), TIER_SLOT, &spec)))
    });
    g.bench_function("rate_check_100k_buckets", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % ROTATION;
            black_box(rl.check(&ids[pick(i)], TIER_SLOT, &spec))
        })
    });
    drop(rl);

    // (2) Quota: a warm lease on the embedded store.
    let path = temp_db("parts");
    let store = embedded(&path);
    let engine = QuotaEngine::new(store, clock.clone(), tollgate::limits::quota::LeaseSettings::local(1000));
    let policy = policy();
    let qspec = QuotaSpec { limit: BIG_QUOTA, period: Period::Month, hard: true, overage_percent: 0 };
    let metric: Arc<str> = "requests".into();
    for id in ids.iter().take(ROTATION) {
        let (_, state) =
            run(&rt, engine.reserve(id, &metric, &qspec, &policy, 1, StorePolicy::Local)).expect("reserve");
        assert_eq!(state.used, 1);
    }
    g.bench_function("quota_reserve_warm_lease", |b| {
        let t = &ids[0];
        b.iter(|| black_box(run(&rt, engine.reserve(t, &metric, &qspec, &policy, 1, StorePolicy::Local)).is_ok()))
    });
    g.bench_function("quota_reserve_4096_tenants", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % ROTATION;
            black_box(run(&rt, engine.reserve(&ids[i], &metric, &qspec, &policy, 1, StorePolicy::Local)).is_ok())
        })
    });
    drop(engine);
    remove_db(&path);

    // (3) Concurrency: acquire and drop a slot, no queue, no shared store.
    let conc = Concurrency::new(None, "bench".into(), Duration::from_secs(10), clock.clone());
    let cspec = ConcurrencySpec { limit: 100, queue: None };
    g.bench_function("concurrency_acquire_release", |b| {
        let t = &ids[0];
        b.iter(|| {
            let guard = run(&rt, conc.acquire(t, &cspec, 0, StorePolicy::Local)).expect("slot");
            drop(black_box(guard));
        })
    });
    assert_eq!(conc.in_flight(&ids[0]), 0);
    g.finish();
    eprintln!("futures not ready on their first poll so far: {}", PENDING.load(Ordering::Relaxed));
}

struct Prepared<'a> {
    req: &'a RequestHeader,
    hints: Hints<'a>,
    permit: Permit<'a>,
}

/// Reads each request into its canonical view, as the gateway does first.
fn canonicals<'a>(config: &Config, reqs: &'a [RequestHeader]) -> Vec<Canonical<'a>> {
    reqs.iter().map(|req| of_request(req, &RequestPolicy::of(config)).expect("canonical")).collect()
}

/// Runs the stages before the limits once per request, keeping what the limit stages take.
fn prepare<'a>(
    config: &'a Config,
    dir: &'a Directory,
    reqs: &'a [RequestHeader],
    canons: &'a [Canonical<'a>],
) -> Vec<Prepared<'a>> {
    let peer = Some(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)));
    reqs.iter()
        .zip(canons)
        .map(|(req, canon)| {
            let hints = resolve(&config.tenancy, canon, req, peer).expect("resolve");
            let principal = authenticate(dir, &hints, NOW_MS).expect("authenticate");
            let permit = authorize(&config.rules, req, &hints, principal).expect("authorize");
            Prepared { req, hints, permit }
        })
        .collect()
}

/// The whole admission path, and the limit stages of it alone, over 100,000 tenants.
fn bench_admission(c: &mut Criterion) {
    let config = load_config();
    eprintln!("building a directory of {TENANTS} tenants...");
    let dir = build_directory(&config);
    let tenancy = &config.tenancy;
    let max = config.server.max_header_bytes;
    let policy = RequestPolicy::of(&config);
    let peer = Some(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)));
    let rt = runtime();
    let clock: SharedClock = Arc::new(SystemClock);
    let path = temp_db("admission");
    let store = embedded(&path);
    let limits = Limits::new(store, false, clock, tollgate::limits::LimitSettings::local(1000));
    // Quota warnings go to a metrics registry; no webhook.
    let metrics = Metrics::new();
    let sink = WarnSink { metrics: &metrics, webhook: None };

    // `GET /v1/models`: tier rate, `requests` quota, concurrency.
    let plain: Vec<RequestHeader> =
        (0..ROTATION).map(|i| request("GET", "/v1/models", &secret(pick(i)), None)).collect();
    // `POST /v1/chat/completions`: the same plus a charge on `tokens` read from a header, 10
    // tokens a request.
    let charged: Vec<RequestHeader> =
        (0..ROTATION).map(|i| request("POST", "/v1/chat/completions", &secret(pick(i)), Some(10))).collect();
    // The same at 250 tokens a request: a lease block of `max_lease_block` (1,000) units lasts
    // four requests, so the lease is refilled from the store every few requests.
    let costly: Vec<RequestHeader> =
        (0..ROTATION).map(|i| request("POST", "/v1/chat/completions", &secret(pick(i)), Some(250))).collect();

    let admit = |req: &RequestHeader| -> bool {
        run(&rt, async {
            check_size(req, max).ok()?;
            let canon = of_request(req, &policy).ok()?;
            let hints = resolve(tenancy, &canon, req, peer).ok()?;
            let principal = authenticate(&dir, &hints, NOW_MS).ok()?;
            let permit = authorize(&config.rules, req, &hints, principal).ok()?;
            let mut headers = LimitHeaders::default();
            rate_limit::check(&limits, &permit, &mut headers).await.ok()?;
            let reserved =
                quota::reserve(&limits, &permit, quota::charges_of(&permit, req, &hints).ok()?, &mut headers, &sink)
                    .await
                    .ok()?;
            let slot = concurrency::acquire(&limits, &permit).await.ok()?;
            black_box(&headers);
            drop(slot);
            Some(reserved.items.len())
        })
        .is_some()
    };
    // Warm every tenant's bucket, quota counters and lease, and check each request is admitted.
    for req in &plain {
        assert!(admit(req), "plain request refused");
    }
    for req in charged.iter().chain(&costly) {
        assert!(admit(req), "charged request refused");
    }

    // The same stages without the limits: what the limit stages add is the difference.
    let before_limits = |req: &RequestHeader| -> bool {
        if check_size(req, max).is_err() {
            return false;
        }
        let Ok(canon) = of_request(req, &policy) else { return false };
        let Ok(hints) = resolve(tenancy, &canon, req, peer) else { return false };
        let Ok(principal) = authenticate(&dir, &hints, NOW_MS) else { return false };
        black_box(authorize(&config.rules, req, &hints, principal).is_ok())
    };

    let mut g = c.benchmark_group("admission_100k_tenants");
    g.sample_size(50).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    let cases = [("requests_quota", &plain), ("requests_quota_and_charge", &charged), ("charge_cost_250", &costly)];
    for (case, reqs) in cases {
        g.bench_with_input(BenchmarkId::new("before_limits", case), reqs, |b, reqs| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % ROTATION;
                assert!(before_limits(black_box(&reqs[i])), "refused");
            })
        });
        g.bench_with_input(BenchmarkId::new("full_path", case), reqs, |b, reqs| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % ROTATION;
                assert!(admit(black_box(&reqs[i])), "refused");
            })
        });
    }

    // The same, with one request repeated: everything stays in the CPU cache, so this is the
    // CPU cost without memory latency.
    for (case, reqs) in [("requests_quota", &plain), ("requests_quota_and_charge", &charged)] {
        let req = &reqs[1];
        g.bench_function(BenchmarkId::new("before_limits_same_request", case), |b| {
            b.iter(|| assert!(before_limits(black_box(req)), "refused"))
        });
        g.bench_function(BenchmarkId::new("full_path_same_request", case), |b| {
            b.iter(|| assert!(admit(black_box(req)), "refused"))
        });
    }

    // The limit stages alone, on requests already resolved, authenticated and authorized. The
    // tenant records are no longer in the CPU cache here, as they would be after authentication,
    // so this reads higher than `full_path - before_limits`.
    let (plain_c, charged_c, costly_c) =
        (canonicals(&config, &plain), canonicals(&config, &charged), canonicals(&config, &costly));
    let plain_p = prepare(&config, &dir, &plain, &plain_c);
    let charged_p = prepare(&config, &dir, &charged, &charged_c);
    let costly_p = prepare(&config, &dir, &costly, &costly_c);
    assert_eq!(&*plain_p[0].permit.rule.name, "read");
    assert_eq!(&*charged_p[0].permit.rule.name, "chat");
    let limit_stages = |p: &Prepared<'_>| -> usize {
        run(&rt, async {
            let mut headers = LimitHeaders::default();
            rate_limit::check(&limits, &p.permit, &mut headers).await.expect("rate");
            let reserved = quota::reserve(
                &limits,
                &p.permit,
                quota::charges_of(&p.permit, p.req, &p.hints).expect("charges"),
                &mut headers,
                &sink,
            )
            .await
            .expect("quota");
            let slot = concurrency::acquire(&limits, &p.permit).await.expect("slot");
            black_box(&headers);
            drop(slot);
            reserved.items.len()
        })
    };
    assert_eq!(limit_stages(&plain_p[0]), 1, "one quota: requests");
    assert_eq!(limit_stages(&charged_p[0]), 2, "two quotas: requests and tokens");
    let cases =
        [("requests_quota", &plain_p), ("requests_quota_and_charge", &charged_p), ("charge_cost_250", &costly_p)];
    for (case, prepared) in cases {
        g.bench_with_input(BenchmarkId::new("limit_stages_only", case), prepared, |b, prepared| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % ROTATION;
                black_box(limit_stages(&prepared[i]))
            })
        });
    }

    // Rendering the limit headers of a response (done once per limited response).
    let mut headers = LimitHeaders::default();
    {
        let p = &charged_p[0];
        run(&rt, async {
            rate_limit::check(&limits, &p.permit, &mut headers).await.expect("rate");
            quota::reserve(
                &limits,
                &p.permit,
                quota::charges_of(&p.permit, p.req, &p.hints).expect("charges"),
                &mut headers,
                &sink,
            )
            .await
            .expect("quota");
        });
    }
    assert!(headers.rate.is_some() && headers.quota.is_some());
    g.bench_function("render_limit_headers", |b| {
        let now = chrono::Utc::now().timestamp_millis();
        b.iter(|| {
            let mut out = Vec::with_capacity(8);
            headers.render(black_box(now), &mut out);
            black_box(out.len())
        })
    });
    g.finish();
    eprintln!("futures not ready on their first poll so far: {}", PENDING.load(Ordering::Relaxed));
    drop(limits);
    remove_db(&path);
}

criterion_group!(benches, bench_parts, bench_admission);
criterion_main!(benches);
