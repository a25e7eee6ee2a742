//! Metering: `Meter::record` on the request path, and the flush of a large aggregate to the
//! usage ledger on both stores.
//!
//! Bounds: `Meter::record` at most 1 µs per request; a flush of 10,000 tenants × 3 metrics
//! under 100 ms.
//!
//! Run with `cargo bench --bench metering`. The Redis cases start their own `redis-server` on
//! a free local port (no persistence) and stop it at the end; they are skipped when
//! `redis-server` is not on the `PATH`. The embedded cases use SQLite files in the temp dir.
//!
//! Groups:
//! - `meter_record`: `Meter::record` for an admitted, charged request (tenant, rule `gen`,
//!   decision `forwarded`, status 200, body bytes, upstream time, a `records` charge: 7 usage
//!   rows), cycling over 4,096 tenants of 10,000. `single_thread`: one thread, aggregates
//!   already holding every key. `two_threads`: the same, timed on the main thread while a
//!   second thread records into the same `Meter` for the whole benchmark (its own rate goes to
//!   stderr). `single_thread_tenant_top_100`: with `[metrics] tenant_labels = { top = 100 }`,
//!   which also counts requests per tenant. `first_of_interval`: the meter is flushed after
//!   every 4,096 records (untimed), so every timed record is its tenant's first since the last
//!   flush and inserts its keys into emptied aggregates.
//! - `ledger_flush_10k_tenants`: 10,000 tenants with 3 usage rows each (`requests`,
//!   `status_2xx`, `records`: one charged request per tenant with no bytes and no time, so the
//!   other usage metrics stay zero and are not written) = 30,000 rows.
//!   `meter_flush/<store>` times `Meter::flush` (swap the aggregates out, build the batch,
//!   write it; the recording before it is not timed); `meter_flush/no_store` is the same with a
//!   ledger that does nothing, i.e. the in-process part. `ledger_apply/<store>` times
//!   `Ledger::apply` on a batch the flush built (rows in the aggregate maps' order);
//!   `ledger_apply/embedded_30_days` is the same on a ledger that already holds the 30 previous
//!   days of these rows (900,000 rows), as after a month of running. Every iteration writes a
//!   batch with a fresh id. After the group, stderr gets the part of each store's
//!   `meter_flush` spent in `Ledger::apply` (from `tollgate_ledger_flush_seconds`).
//!
//! The Redis stores here have a 10 s timeout so that a slow flush is measured rather than cut
//! off. After the benchmarks, stderr gets how much of a Redis apply is Redis executing commands
//! (`INFO commandstats`), and the outcome of five applies through a store with the gateway's
//! default `[store] timeout = "50ms"`. It also gets the time of the first flush of three new
//! UTC days on the 30-day ledger, where every row is an insert.

use async_trait::async_trait;
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use std::hint::black_box;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;
use tollgate::clock::{SharedClock, SystemClock};
use tollgate::config::{self, Config, Diagnostics};
use tollgate::directory::{Builder, Tenant};
use tollgate::metering::ChargeInfo;
use tollgate::metering::{day_number, day_string, Meter, Record};
use tollgate::metrics::Metrics;
use tollgate::store::embedded::Embedded;
use tollgate::store::redis::RedisStore;
use tollgate::store::{Breaker, Ledger, LedgerBatch, LedgerRow, NoObserver, StoreError};

const TENANTS: usize = 10_000;
/// Rows per tenant in the flush benchmarks.
const METRICS_PER_TENANT: usize = 3;
/// Distinct tenants the record benchmarks cycle through.
const ROTATION: usize = 4_096;
/// A fixed "now" (2025-06-15): every record lands on the same UTC day.
const NOW_MS: i64 = 1_750_000_000_000;
/// The gateway's defaults for `[store] timeout`, `breaker_failures`, `breaker_cooldown`.
const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_millis(50);
const DEFAULT_BREAKER_FAILURES: u32 = 5;
const DEFAULT_BREAKER_COOLDOWN: Duration = Duration::from_secs(5);
/// Days of ledger history before today in `ledger_apply/embedded_30_days`.
const HISTORY_DAYS: i64 = 30;
/// The benchmark store's timeout: long enough that every flush finishes and is timed.
const BENCH_STORE_TIMEOUT: Duration = Duration::from_secs(10);

const CONFIG: &str = r#"
usage_metrics = ["records"]

[server]
listen = ["127.0.0.1:8080"]

[tenancy]
resolve = ["api_key"]

[upstreams.main]
servers = ["127.0.0.1:9000"]

[tiers.std]
upstream = "main"
price.records = 0.001

# The template every generated tenant is cloned from.
[[tenants]]
id = "template"
tier = "std"
"#;

fn tenant_id(t: usize) -> String {
    format!("t{t:05}")
}

fn load_config() -> Config {
    let mut diags = Diagnostics::default();
    match config::load_str(Path::new("benches/metering.toml"), CONFIG.to_string(), &mut diags) {
        Some(c) => c,
        None => panic!("bench config does not load: {diags:?}"),
    }
}

/// 10,000 tenants of tier `std`, in id order.
fn build_tenants(config: &Config) -> Vec<Arc<Tenant>> {
    let template = config.tenants.first().expect("template tenant");
    let mut dir = Builder::new(config);
    for t in 0..TENANTS {
        let mut tc = template.clone();
        tc.id = tenant_id(t);
        dir.config_tenant(&tc, Vec::new());
    }
    let dir = dir.finish();
    assert_eq!(dir.tenant_count(), TENANTS);
    (0..TENANTS).map(|t| dir.tenant(&tenant_id(t)).expect("tenant").clone()).collect()
}

/// The tenant of the `i`-th record: spread over all tenants with a stride coprime to their
/// count.
fn pick(i: usize) -> usize {
    ((i % ROTATION) * 7_919) % TENANTS
}

/// An admitted, charged request as `logging` reports it.
fn admitted<'a>(tenant: &'a Tenant, metric: &'a [ChargeInfo]) -> Record<'a> {
    Record {
        tenant: Some(tenant),
        rule: "gen",
        decision: "forwarded",
        reason: None,
        status: 200,
        bytes_in: 512,
        bytes_out: 2_048,
        upstream: Some("main"),
        upstream_secs: Some(0.120),
        total_secs: 0.123,
        charges: metric,
        model: None,
        admitted: true,
    }
}

/// An admitted request that contributes exactly 3 usage rows: `requests`, `status_2xx` and
/// the charged `records` (zero bytes and times are not written).
fn three_rows<'a>(tenant: &'a Tenant, metric: &'a [ChargeInfo]) -> Record<'a> {
    Record { bytes_in: 0, bytes_out: 0, upstream_secs: None, total_secs: 0.0, ..admitted(tenant, metric) }
}

fn runtime() -> Runtime {
    // As the gateway's store runtime: one worker.
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime")
}

fn temp_db(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tollgate-bench-metering-{tag}-{}.db", std::process::id()))
}

fn remove_db(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

fn embedded(path: &Path) -> Arc<Embedded> {
    remove_db(path);
    Arc::new(Embedded::open(path, NOW_MS).expect("embedded store"))
}

/// A ledger that keeps nothing: the flush without a store. On request it keeps a copy of the
/// next batch's rows, in the order the flush built them.
#[derive(Default)]
struct NoStore {
    rows: AtomicUsize,
    capture: AtomicBool,
    captured: Mutex<Vec<LedgerRow>>,
}

#[async_trait]
impl Ledger for NoStore {
    async fn apply(&self, batches: &[LedgerBatch]) -> Vec<Result<(), StoreError>> {
        self.rows.store(black_box(batches.iter().map(|b| b.rows.len()).sum()), Ordering::Relaxed);
        if self.capture.swap(false, Ordering::Relaxed) {
            *self.captured.lock().expect("captured rows") = batches.iter().flat_map(|b| b.rows.clone()).collect();
        }
        batches.iter().map(|_| Ok(())).collect()
    }

    async fn rows(&self, _: &str, _: &str, _: &str) -> Result<Vec<LedgerRow>, StoreError> {
        Ok(Vec::new())
    }
}

/// A `redis-server` started for this run, stopped when dropped.
struct RedisServer {
    child: Child,
    url: String,
}

impl RedisServer {
    fn start() -> Option<RedisServer> {
        let port = TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                eprintln!("redis-server not started ({e}): skipping the Redis cases");
                return None;
            }
        };
        let server = RedisServer { child, url: format!("redis://127.0.0.1:{port}") };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start on port {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("redis-server started on port {port} (pid {})", server.child.id());
        Some(server)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("redis-server stopped");
    }
}

fn redis_store(rt: &Runtime, url: &str, timeout: Duration) -> Arc<RedisStore> {
    let _guard = rt.enter();
    let clock: SharedClock = Arc::new(SystemClock);
    let breaker = Breaker::new(timeout, DEFAULT_BREAKER_FAILURES, DEFAULT_BREAKER_COOLDOWN, clock);
    Arc::new(RedisStore::connect(&[url.to_string()], breaker, Arc::new(NoObserver), timeout).expect("redis store"))
}

fn bench_record(c: &mut Criterion) {
    let config = load_config();
    let tenants = build_tenants(&config);
    let metric = [ChargeInfo::new("records".into(), 42, None)];
    let rt = runtime();
    let no_store = Arc::new(NoStore::default());

    let meter = Meter::new(no_store.clone(), Arc::new(Metrics::new()), 3600, "bench".into(), Vec::new(), 0);
    // The top-100 variant: one flush first, so the top set is filled as in a running gateway.
    let meter_top = Meter::new(no_store.clone(), Arc::new(Metrics::new()), 3600, "bench-top".into(), Vec::new(), 100);
    for i in 0..ROTATION {
        meter_top.record(&admitted(&tenants[pick(i)], &metric), NOW_MS);
    }
    rt.block_on(meter_top.flush());
    // A meter that is flushed after every rotation, so every timed record is the first of its
    // tenant since the last flush.
    let meter_fresh = Meter::new(no_store.clone(), Arc::new(Metrics::new()), 3600, "bench-fresh".into(), Vec::new(), 0);

    let mut g = c.benchmark_group("meter_record");
    g.sample_size(50).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));

    g.bench_function("single_thread", |b| {
        let mut i = 0;
        b.iter(|| {
            i += 1;
            meter.record(black_box(&admitted(&tenants[pick(i)], &metric)), NOW_MS)
        })
    });

    // A second thread records into the same meter for the whole benchmark; the main thread is
    // timed exactly as in `single_thread`.
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let other = s.spawn(|| {
            let start = Instant::now();
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..64 {
                    // Half a rotation apart from the main thread.
                    n += 1;
                    meter.record(black_box(&admitted(&tenants[pick(n + ROTATION / 2)], &metric)), NOW_MS);
                }
            }
            (n, start.elapsed())
        });
        g.bench_function("two_threads", |b| {
            let mut i = 0;
            b.iter(|| {
                i += 1;
                meter.record(black_box(&admitted(&tenants[pick(i)], &metric)), NOW_MS)
            })
        });
        stop.store(true, Ordering::Relaxed);
        let (n, took) = other.join().expect("second recording thread");
        eprintln!(
            "two_threads: the second thread recorded {n} requests in {:.1} s, {:.0} ns per record",
            took.as_secs_f64(),
            took.as_nanos() as f64 / n.max(1) as f64
        );
    });

    g.bench_function("single_thread_tenant_top_100", |b| {
        let mut i = 0;
        b.iter(|| {
            i += 1;
            meter_top.record(black_box(&admitted(&tenants[pick(i)], &metric)), NOW_MS)
        })
    });

    g.bench_function("first_of_interval", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut done = 0;
            while done < iters {
                let n = (iters - done).min(ROTATION as u64) as usize;
                let start = Instant::now();
                for i in 0..n {
                    meter_fresh.record(black_box(&admitted(&tenants[pick(i)], &metric)), NOW_MS);
                }
                total += start.elapsed();
                rt.block_on(meter_fresh.flush());
                done += n as u64;
            }
            total
        })
    });
    g.finish();
}

/// Records one `three_rows` request per tenant: the next flush writes 30,000 rows.
fn fill(meter: &Meter, tenants: &[Arc<Tenant>], metric: &[ChargeInfo]) {
    for t in tenants {
        meter.record(&three_rows(t, metric), NOW_MS);
    }
}

/// Times `Meter::flush` of 10,000 tenants × 3 metrics; the recording is not timed.
fn time_meter_flush(
    rt: &Runtime,
    meter: &Meter,
    tenants: &[Arc<Tenant>],
    metric: &[ChargeInfo],
    iters: u64,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        fill(meter, tenants, metric);
        let start = Instant::now();
        rt.block_on(meter.flush());
        total += start.elapsed();
        assert_eq!(meter.buffered(), 0, "the flush did not reach the ledger");
    }
    total
}

/// The time `Meter::flush` spent in `Ledger::apply`, from `tollgate_ledger_flush_seconds`.
fn report_apply_share(name: &str, meter: &Meter) {
    let h = &meter.metrics().ledger_flush;
    let n = h.get_sample_count();
    eprintln!(
        "{name}: Ledger::apply took {:.1} ms on average over {n} flushes",
        h.get_sample_sum() * 1000.0 / n.max(1) as f64
    );
}

/// Times `Ledger::apply` of a 30,000-row batch under a fresh id.
fn time_apply(
    rt: &Runtime,
    ledger: &dyn Ledger,
    rows: &[LedgerRow],
    tag: &str,
    seq: &AtomicU64,
    iters: u64,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let n = seq.fetch_add(1, Ordering::Relaxed) + 1;
        let batches = batches_of(rows, &format!("bench-{tag}-{}", std::process::id()), n);
        let start = Instant::now();
        apply_all(rt, ledger, &batches).expect("ledger apply");
        total += start.elapsed();
    }
    total
}

/// One flush's batches (one per tenant), as the meter builds them.
fn batches_of(rows: &[LedgerRow], writer: &str, seq: u64) -> Vec<LedgerBatch> {
    let mut by_tenant: std::collections::BTreeMap<&str, Vec<LedgerRow>> = std::collections::BTreeMap::new();
    for r in rows {
        by_tenant.entry(&r.tenant).or_default().push(r.clone());
    }
    by_tenant.into_iter().map(|(t, rows)| LedgerBatch { writer: writer.into(), seq, tenant: t.into(), rows }).collect()
}

/// Applies a flush's batches; the first error, if any.
fn apply_all(rt: &Runtime, ledger: &dyn Ledger, batches: &[LedgerBatch]) -> Result<(), StoreError> {
    rt.block_on(ledger.apply(batches)).into_iter().collect()
}

/// `rows` moved to another UTC day.
fn on_day(rows: &[LedgerRow], day: i64) -> Vec<LedgerRow> {
    let day = day_string(day);
    rows.iter().map(|r| LedgerRow { day: day.clone(), ..r.clone() }).collect()
}

/// Gives a ledger the 30 days before `NOW_MS` of history (900,000 rows), then today's rows.
fn fill_history(rt: &Runtime, ledger: &dyn Ledger, rows: &[LedgerRow], seq: &AtomicU64) {
    let start = Instant::now();
    let today = day_number(NOW_MS);
    for day in today - HISTORY_DAYS..today {
        time_apply(rt, ledger, &on_day(rows, day), "history", seq, 1);
    }
    time_apply(rt, ledger, rows, "history", seq, 1);
    eprintln!(
        "embedded ledger with {HISTORY_DAYS} days of history: {} rows written in {:.1} s",
        rows.len() as i64 * (HISTORY_DAYS + 1),
        start.elapsed().as_secs_f64()
    );
}

/// The first flush of a UTC day inserts every row instead of adding to it: three such days on
/// the ledger with history, printed to stderr.
fn day_rollover(rt: &Runtime, ledger: &dyn Ledger, rows: &[LedgerRow], seq: &AtomicU64) {
    let today = day_number(NOW_MS);
    let times: Vec<String> = (1..=3)
        .map(|d| {
            let t = time_apply(rt, ledger, &on_day(rows, today + d), "rollover", seq, 1);
            format!("{:.1} ms", t.as_secs_f64() * 1000.0)
        })
        .collect();
    eprintln!("ledger_apply/embedded_30_days, first flush of a new day (all inserts): {}", times.join(", "));
}

/// Sum of `usec` over `INFO commandstats`: the time Redis spent executing commands.
async fn redis_command_usec(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(conn).await.expect("INFO commandstats");
    info.lines().filter_map(|l| l.split("usec=").nth(1)).filter_map(|v| v.split(',').next()?.parse::<u64>().ok()).sum()
}

/// Where a Redis flush's time goes, and whether a flush fits the gateway's default 50 ms store
/// timeout. Printed to stderr.
fn redis_checks(rt: &Runtime, url: &str, rows: &[LedgerRow]) {
    let client = redis::Client::open(url).expect("redis url");
    let mut conn = rt.block_on(client.get_multiplexed_async_connection()).expect("redis connection");
    let store = redis_store(rt, url, BENCH_STORE_TIMEOUT);
    let (mut total, mut server, runs) = (0.0, 0.0, 5);
    for n in 0..runs {
        let batches = batches_of(rows, &format!("bench-split-{}", std::process::id()), n + 1);
        let before = rt.block_on(redis_command_usec(&mut conn));
        let start = Instant::now();
        apply_all(rt, &*store, &batches).expect("ledger apply");
        total += start.elapsed().as_secs_f64() * 1000.0;
        server += (rt.block_on(redis_command_usec(&mut conn)) - before) as f64 / 1000.0;
    }
    eprintln!(
        "redis ledger_apply of {} rows: {:.1} ms on average, of which Redis executing commands {:.1} ms",
        rows.len(),
        total / runs as f64,
        server / runs as f64
    );

    let store = redis_store(rt, url, DEFAULT_STORE_TIMEOUT);
    let mut line = String::new();
    for n in 0..runs {
        let batches = batches_of(rows, &format!("bench-default-timeout-{}", std::process::id()), n + 1);
        let start = Instant::now();
        let r = apply_all(rt, &*store, &batches);
        let took = start.elapsed().as_secs_f64() * 1000.0;
        line.push_str(&match r {
            Ok(()) => format!(" ok in {took:.1} ms;"),
            Err(e) => format!(" {e} after {took:.1} ms;"),
        });
        // Let a cut-off pipeline finish on the server before the next attempt.
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("redis ledger_apply of {} rows with the default 50 ms store timeout:{line}", rows.len());
}

fn bench_flush(c: &mut Criterion) {
    let config = load_config();
    let tenants = build_tenants(&config);
    let metric = [ChargeInfo::new("records".into(), 42, None)];
    let rt = runtime();
    let seq = AtomicU64::new(0);
    let day = day_string(day_number(NOW_MS));

    // The flush without a store; its first batch is kept for the `ledger_apply` cases, in the
    // order the flush built it (the aggregate maps' order).
    let no_store = Arc::new(NoStore::default());
    let meter_none = Meter::new(no_store.clone(), Arc::new(Metrics::new()), 3600, "bench-none".into(), Vec::new(), 0);
    fill(&meter_none, &tenants, &metric);
    no_store.capture.store(true, Ordering::Relaxed);
    rt.block_on(meter_none.flush());
    let rows = std::mem::take(&mut *no_store.captured.lock().expect("captured rows"));
    assert_eq!(rows.len(), TENANTS * METRICS_PER_TENANT);

    let db_flush = temp_db("flush");
    let db_apply = temp_db("apply");
    let db_history = temp_db("history");
    let emb_flush = embedded(&db_flush);
    let emb_apply = embedded(&db_apply);
    let emb_history = embedded(&db_history);
    fill_history(&rt, &*emb_history, &rows, &seq);
    let meter_emb = Meter::new(emb_flush.clone(), Arc::new(Metrics::new()), 3600, "bench-emb".into(), Vec::new(), 0);
    fill(&meter_emb, &tenants, &metric);
    rt.block_on(meter_emb.flush());
    let written = rt.block_on(emb_flush.rows(&tenants[0].id, &day, &day)).expect("ledger rows");
    assert_eq!(written.len(), METRICS_PER_TENANT, "rows of one tenant: {written:?}");

    let redis = RedisServer::start();
    let redis_stores = redis.as_ref().map(|server| {
        let flush = redis_store(&rt, &server.url, BENCH_STORE_TIMEOUT);
        let apply = redis_store(&rt, &server.url, BENCH_STORE_TIMEOUT);
        let meter = Meter::new(flush.clone(), Arc::new(Metrics::new()), 3600, "bench-redis".into(), Vec::new(), 0);
        fill(&meter, &tenants, &metric);
        rt.block_on(meter.flush());
        assert_eq!(meter.buffered(), 0, "the first Redis flush failed");
        let written = rt.block_on(flush.rows(&tenants[0].id, &day, &day)).expect("ledger rows");
        assert_eq!(written.len(), METRICS_PER_TENANT, "rows of one tenant: {written:?}");
        (meter, apply)
    });

    let mut g = c.benchmark_group("ledger_flush_10k_tenants");
    g.sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .sampling_mode(SamplingMode::Flat);

    g.bench_function("meter_flush/no_store", |b| {
        b.iter_custom(|iters| time_meter_flush(&rt, &meter_none, &tenants, &metric, iters))
    });
    g.bench_function("meter_flush/embedded", |b| {
        b.iter_custom(|iters| time_meter_flush(&rt, &meter_emb, &tenants, &metric, iters))
    });
    g.bench_function("ledger_apply/embedded", |b| {
        b.iter_custom(|iters| time_apply(&rt, &*emb_apply, &rows, "emb", &seq, iters))
    });
    g.bench_function("ledger_apply/embedded_30_days", |b| {
        b.iter_custom(|iters| time_apply(&rt, &*emb_history, &rows, "emb-history", &seq, iters))
    });
    if let Some((meter_redis, apply_redis)) = &redis_stores {
        g.bench_function("meter_flush/redis", |b| {
            b.iter_custom(|iters| time_meter_flush(&rt, meter_redis, &tenants, &metric, iters))
        });
        g.bench_function("ledger_apply/redis", |b| {
            b.iter_custom(|iters| time_apply(&rt, &**apply_redis, &rows, "redis", &seq, iters))
        });
    }
    g.finish();

    report_apply_share("meter_flush/embedded", &meter_emb);
    day_rollover(&rt, &*emb_history, &rows, &seq);
    if let Some((meter_redis, _)) = &redis_stores {
        report_apply_share("meter_flush/redis", meter_redis);
    }
    if let Some(server) = &redis {
        redis_checks(&rt, &server.url, &rows);
    }
    drop(redis_stores);
    drop(redis);
    drop(rt);
    for db in [&db_flush, &db_apply, &db_history] {
        remove_db(db);
    }
}

criterion_group!(benches, bench_record, bench_flush);
criterion_main!(benches);
