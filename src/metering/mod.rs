//! Metering: every request, on every path, into in-process aggregates that a background task
//! flushes to the usage ledger.
//!
//! The hot path adds to a shard picked by the current thread, so threads do not share a lock;
//! only the flush touches every shard, to swap it out. A flush becomes one [`LedgerBatch`] per
//! tenant, all with the flush's `seq` and this process's writer id (instance id plus a random
//! id per process start). The ledger keeps, per writer and tenant, the highest `seq` it has
//! applied and skips a batch at or below it, so a retried batch is never counted twice.
//!
//! Batches that cannot be written wait in a buffer, kept in flush order, and are replayed
//! with every flush. A tenant's batches are applied in order: once one fails, that tenant's
//! later batches wait behind it for the next flush, while every other tenant's are written
//! (on Redis Cluster, tenants on a stalled master wait; the rest do not). The buffer holds
//! at most `max_buffered_batches` flushes; past that the oldest flush's unwritten batches are
//! dropped and counted in `tollgate_ledger_dropped_batches_total`.
//!
//! Admitted requests are metered as usage (`requests`, `bytes_in`, `bytes_out`,
//! `upstream_ms`, `total_ms`, `status_<class>`, and every charged metric after settlement).
//! Refused requests are metered as `rejected.<reason>` rows, never as usage.

pub mod report;
pub mod webhook;

use crate::fasthash::Fast;
use crate::metrics::Metrics;
use crate::store::{Ledger, LedgerBatch, LedgerRow, StoreError};
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};

/// The `decision` label values, in [`decision_index`] order.
const DECISIONS: [&str; 5] = ["forwarded", "rejected", "upstream_error", "served", "aborted"];

fn decision_index(d: &str) -> u8 {
    match d {
        "forwarded" => 0,
        "rejected" => 1,
        "upstream_error" => 2,
        "served" => 3,
        _ => 4,
    }
}

/// A cached `tollgate_usage_units_total` counter; allocates only on a label pair's first use.
fn counter_for<'a>(
    cache: &'a mut HashMap<String, HashMap<String, prometheus::IntCounter, Fast>, Fast>,
    m: &Metrics,
    tier: &str,
    metric: &str,
) -> Option<&'a prometheus::IntCounter> {
    if !cache.contains_key(tier) {
        cache.insert(tier.to_string(), HashMap::default());
    }
    // Looked up by `&str`: `entry` would need an owned key, an allocation on every request.
    let by_metric = cache.get_mut(tier)?;
    if !by_metric.contains_key(metric) {
        by_metric.insert(metric.to_string(), m.usage_units.with_label_values(&[tier, metric]));
    }
    by_metric.get(metric)
}

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// Buffered flushes written per ledger call: a replay after a long outage goes in calls of
/// bounded size.
const WRITE_CHUNK: usize = 64;

/// Number of aggregate shards; more than threads, so two threads rarely share one.
const SHARDS: usize = 16;

/// Fixed usage slots of a tenant-day: requests, bytes in/out, upstream and total ms, and one
/// per status class.
const FIXED: usize = 11;
const REQUESTS: usize = 0;
const BYTES_IN: usize = 1;
const BYTES_OUT: usize = 2;
const UPSTREAM_MS: usize = 3;
const TOTAL_MS: usize = 4;
const STATUS0: usize = 5;

/// One tenant's usage on one UTC day, as one map entry: a request touches one entry, not one
/// per metric.
struct TenantDay {
    id: Arc<str>,
    tier: Arc<crate::config::Tier>,
    fixed: [u64; FIXED],
    /// (metric, model, units): a charge with a model adds to its model's entry.
    charged: Vec<(Arc<str>, Option<Arc<str>>, u64)>,
    rejected: Vec<(&'static str, u64)>,
}

/// Metric handles for one label combination, cached per shard so the hot path skips the
/// registry's label lookup and its shared lock. The labels are kept to check a cache hit: the
/// key holds addresses, which a reload may reuse for other strings.
struct Handles {
    tier: String,
    rule: String,
    requests: prometheus::IntCounter,
    duration: prometheus::Histogram,
    /// Only for refusals of the gateway itself (decision `rejected`).
    rejections: Option<prometheus::IntCounter>,
}

/// (rule address, length, tier address, length, decision, status class, status label index,
/// reason address).
type HandleKey = (usize, usize, usize, usize, u8, u8, u8, usize);

/// One upstream pool's metric handles, cached per shard.
struct UpstreamHandles {
    duration: prometheus::Histogram,
    first_byte: prometheus::Histogram,
    /// `tollgate_upstream_errors_total` by reason; rare, so a short list.
    errors: Vec<(&'static str, prometheus::IntCounter)>,
}

/// A tenant's requests by decision ([`DECISIONS`] order), for the per-tenant series.
type DecisionCounts = [u64; 5];

/// A tenant tracked for the per-tenant series, by the flush only.
#[derive(Default)]
struct Tracked {
    /// Decayed request count: the top N are the highest.
    score: f64,
    /// Requests not yet added to the tenant's series. They are added once the tenant has
    /// series (it is in `allow`, or enters the top N), so a tenant's series count the requests
    /// that made it busy too, not only those after.
    pending: DecisionCounts,
}

/// Per-tenant series state, touched by the flush only.
#[derive(Default)]
struct TenantSeries {
    tracked: HashMap<Arc<str>, Tracked>,
    /// The top N of the last flush.
    top: HashSet<Arc<str>>,
}

#[derive(Default)]
struct Shard {
    /// (tenant id address, UTC day number) → usage. The entry holds the id, so the address is
    /// not reused while the key exists.
    usage: HashMap<(usize, i64), TenantDay, Fast>,
    /// Requests per tenant and decision since the last flush, for the per-tenant series.
    tenant_counts: HashMap<Arc<str>, DecisionCounts>,
    handles: HashMap<HandleKey, Handles, Fast>,
    upstreams: HashMap<String, UpstreamHandles>,
    units: HashMap<String, HashMap<String, prometheus::IntCounter, Fast>, Fast>,
}

/// One charged metric of a request, for settlement and metering.
#[derive(Debug, Clone)]
pub struct ChargeInfo {
    pub metric: Arc<str>,
    pub estimate: u64,
    /// Set when the answer settles the charge (a header, a body, a stream's usage event).
    pub actual: Option<u64>,
    pub settle_header: Option<http::HeaderName>,
    /// The estimate still waits for the request body (`cost_from_body`).
    pub(crate) from_body: bool,
}

impl ChargeInfo {
    /// A charge of a fixed number of units, settled or not.
    pub fn new(metric: Arc<str>, estimate: u64, actual: Option<u64>) -> ChargeInfo {
        ChargeInfo { metric, estimate, actual, settle_header: None, from_body: false }
    }

    /// What the request is charged: the settled amount, else the estimate.
    pub fn units(&self) -> u64 {
        self.actual.unwrap_or(self.estimate)
    }
}

/// What one finished request contributes.
pub struct Record<'a> {
    pub tenant: Option<&'a crate::directory::Tenant>,
    pub rule: &'a str,
    /// `forwarded`, `rejected`, `upstream_error`, `aborted`.
    pub decision: &'static str,
    /// The rejection code, for refused requests.
    pub reason: Option<&'static str>,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub upstream: Option<&'a str>,
    pub upstream_secs: Option<f64>,
    pub total_secs: f64,
    /// The charged metrics, each with its settled (or estimated) amount.
    pub charges: &'a [ChargeInfo],
    /// The model the request named (`model_from_body`), checked to be a short plain name.
    pub model: Option<&'a Arc<str>>,
    /// Counted as usage: the request was admitted.
    pub admitted: bool,
}

/// What a finished request adds to the metrics beyond a [`Record`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Detail {
    /// Why the upstream side failed it ([`crate::metrics::UPSTREAM_ERROR_REASONS`]), for
    /// decision `upstream_error`.
    pub upstream_failure: Option<&'static str>,
    /// Seconds from choosing an upstream server to its response head.
    pub first_byte_secs: Option<f64>,
}

/// The metering stage's state.
pub struct Meter {
    shards: Vec<Mutex<Shard>>,
    ledger: Arc<dyn Ledger>,
    metrics: Arc<Metrics>,
    /// Unwritten batches, one entry per flush, oldest first.
    buffer: Mutex<VecDeque<Vec<LedgerBatch>>>,
    max_buffered: usize,
    /// The instance id plus a random id per process start: a restarted process counts `seq`
    /// from 1 again, and must not be taken for the process before it (a container keeps its
    /// host name and pid 1).
    writer: Arc<str>,
    seq: AtomicU64,
    names: Names,
    bytes_in: prometheus::IntCounter,
    bytes_out: prometheus::IntCounter,
    /// Per-tenant series bookkeeping (touched by the flush only).
    tenant_series: Mutex<TenantSeries>,
    tenant_allow: HashSet<String>,
    tenant_top: usize,
    models: std::sync::RwLock<ModelSet>,
    other_model: Arc<str>,
}

/// Interned metric names, so the hot path clones an `Arc` instead of allocating.
struct Names {
    requests: Arc<str>,
    bytes_in: Arc<str>,
    bytes_out: Arc<str>,
    upstream_ms: Arc<str>,
    total_ms: Arc<str>,
    status: [Arc<str>; 6],
    /// `rejected.<code>` for every rejection code, built once.
    rejected: HashMap<&'static str, Arc<str>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Aggregates stay consistent under a panic (each update is one insert), so a poisoned
    // lock is safe to keep using.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A cost in millionths of the price unit.
fn micros_of(units: u64, price: f64) -> u64 {
    (units as f64 * price * 1_000_000.0).round() as u64
}

/// Distinct unpriced model names an instance keeps as their own report rows per UTC day;
/// later ones are metered as `other`. Models with a price of their own are always kept (the
/// config bounds them). A client names the model, so this bounds the ledger it can grow.
pub const MAX_MODELS_PER_DAY: usize = 32;

/// The model names kept today.
#[derive(Default)]
struct ModelSet {
    day: i64,
    names: HashSet<Arc<str>>,
}

/// Days since the Unix epoch (UTC) of a Unix-ms time.
pub fn day_number(ms: i64) -> i64 {
    ms.div_euclid(86_400_000)
}

/// `YYYY-MM-DD` of a day number.
pub fn day_string(day: i64) -> String {
    chrono::DateTime::from_timestamp(day * 86_400, 0).map(|d| d.format("%Y-%m-%d").to_string()).unwrap_or_default()
}

fn status_class(status: u16) -> usize {
    match status {
        100..=199 => 1,
        200..=299 => 2,
        300..=399 => 3,
        400..=499 => 4,
        500..=599 => 5,
        _ => 0,
    }
}

const STATUS_LABELS: [&str; 6] = ["other", "1xx", "2xx", "3xx", "4xx", "5xx"];

impl Meter {
    pub fn new(
        ledger: Arc<dyn Ledger>,
        metrics: Arc<Metrics>,
        max_buffered: usize,
        instance: String,
        tenant_allow: Vec<String>,
        tenant_top: usize,
    ) -> Arc<Meter> {
        let (bytes_in, bytes_out) =
            (metrics.bytes.with_label_values(&["in"]), metrics.bytes.with_label_values(&["out"]));
        Arc::new(Meter {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            ledger,
            metrics,
            buffer: Mutex::new(VecDeque::new()),
            max_buffered: max_buffered.max(1),
            writer: format!("{instance}-{:016x}", rand::random::<u64>()).into(),
            seq: AtomicU64::new(0),
            tenant_series: Mutex::new(TenantSeries::default()),
            bytes_in,
            bytes_out,
            names: Names {
                requests: "requests".into(),
                bytes_in: "bytes_in".into(),
                bytes_out: "bytes_out".into(),
                upstream_ms: "upstream_ms".into(),
                total_ms: "total_ms".into(),
                status: STATUS_LABELS.map(|s| Arc::from(format!("status_{s}"))),
                rejected: crate::error::CODES.iter().map(|c| (*c, Arc::from(format!("rejected.{c}")))).collect(),
            },
            tenant_allow: tenant_allow.into_iter().collect(),
            tenant_top,
            models: std::sync::RwLock::new(ModelSet::default()),
            other_model: "other".into(),
        })
    }

    fn shard(&self) -> MutexGuard<'_, Shard> {
        thread_local! {
            /// This thread's shard, picked once: hashing the thread id on every request would
            /// also clone and drop the thread's handle (two atomic operations).
            static SHARD: usize = {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                std::thread::current().id().hash(&mut h);
                (h.finish() as usize) % SHARDS
            };
        }
        lock(&self.shards[SHARD.with(|s| *s)])
    }

    /// The report name of `model`: itself while it is priced or among today's first
    /// [`MAX_MODELS_PER_DAY`] names, else `other`.
    fn model_dimension(&self, limits: &crate::config::policy::TierLimits, model: &Arc<str>, day: i64) -> Arc<str> {
        if limits.prices_model(model) {
            return model.clone();
        }
        {
            let set = self.models.read().unwrap_or_else(|p| p.into_inner());
            if set.day == day {
                if set.names.contains(model) {
                    return model.clone();
                }
                if set.names.len() >= MAX_MODELS_PER_DAY {
                    return self.other_model.clone();
                }
            }
        }
        let mut set = self.models.write().unwrap_or_else(|p| p.into_inner());
        if set.day != day {
            set.day = day;
            set.names.clear();
        }
        if set.names.contains(model) || set.names.len() < MAX_MODELS_PER_DAY {
            set.names.insert(model.clone());
            model.clone()
        } else {
            self.other_model.clone()
        }
    }

    fn rejected_name(&self, reason: &'static str) -> Arc<str> {
        self.names.rejected.get(reason).cloned().unwrap_or_else(|| Arc::from(format!("rejected.{reason}")))
    }

    /// Records one finished request. Called from `logging` on every path.
    pub fn record(&self, r: &Record<'_>, now_ms: i64) {
        self.record_with(r, &Detail::default(), now_ms);
    }

    /// [`Meter::record`], with what only the proxy knows about the upstream.
    pub fn record_with(&self, r: &Record<'_>, d: &Detail, now_ms: i64) {
        let tier = r.tenant.map(|t| &*t.tier.name).unwrap_or("-");
        let class = status_class(r.status);
        let (status_index, status_label) = crate::metrics::status_label(r.status);
        let m = &self.metrics;
        let mut shard = self.shard();
        let sh = &mut *shard;

        let reason = r.reason.unwrap_or("");
        let decision = decision_index(r.decision);
        let key: HandleKey = (
            r.rule.as_ptr() as usize,
            r.rule.len(),
            tier.as_ptr() as usize,
            tier.len(),
            decision,
            class as u8,
            status_index as u8,
            reason.as_ptr() as usize,
        );
        let fresh = sh.handles.get(&key).is_none_or(|h| h.rule != r.rule || h.tier != tier);
        if fresh {
            // `tollgate_rejections_total` counts what the gateway refused; an upstream that
            // failed (decision `upstream_error`) goes to `tollgate_upstream_errors_total`.
            let refused = r.decision == "rejected";
            sh.handles.insert(
                key,
                Handles {
                    tier: tier.to_string(),
                    rule: r.rule.to_string(),
                    requests: m.requests.with_label_values(&[
                        tier,
                        r.rule,
                        r.decision,
                        STATUS_LABELS[class],
                        status_label,
                    ]),
                    duration: m.request_duration.with_label_values(&[tier, r.rule]),
                    rejections: r
                        .reason
                        .filter(|_| refused)
                        .map(|reason| m.rejections.with_label_values(&[tier, reason])),
                },
            );
        }
        if let Some(h) = sh.handles.get(&key) {
            h.requests.inc();
            h.duration.observe(r.total_secs);
            if let Some(rej) = &h.rejections {
                rej.inc();
            }
        }
        if let Some(u) = r.upstream {
            let touched = r.upstream_secs.is_some() || d.first_byte_secs.is_some() || d.upstream_failure.is_some();
            if touched {
                if !sh.upstreams.contains_key(u) {
                    let handles = UpstreamHandles {
                        duration: m.upstream_duration.with_label_values(&[u]),
                        first_byte: m.upstream_first_byte.with_label_values(&[u]),
                        errors: Vec::new(),
                    };
                    sh.upstreams.insert(u.to_string(), handles);
                }
                if let Some(h) = sh.upstreams.get_mut(u) {
                    if let Some(s) = r.upstream_secs {
                        h.duration.observe(s);
                    }
                    if let Some(s) = d.first_byte_secs {
                        h.first_byte.observe(s);
                    }
                    if let Some(reason) = d.upstream_failure {
                        match h.errors.iter().find(|(r, _)| *r == reason) {
                            Some((_, c)) => c.inc(),
                            None => {
                                let c = m.upstream_errors.with_label_values(&[u, reason]);
                                c.inc();
                                h.errors.push((reason, c));
                            }
                        }
                    }
                }
            }
        }
        self.bytes_in.inc_by(r.bytes_in);
        self.bytes_out.inc_by(r.bytes_out);

        let Some(tenant) = r.tenant else { return };
        if self.tenant_top > 0 || !self.tenant_allow.is_empty() {
            // Counted here, added to the series at the next flush (see `Tracked`).
            match sh.tenant_counts.get_mut(&tenant.id) {
                Some(c) => c[decision as usize] += 1,
                None => {
                    let mut c = DecisionCounts::default();
                    c[decision as usize] = 1;
                    sh.tenant_counts.insert(tenant.id.clone(), c);
                }
            }
        }
        let day = day_number(now_ms);
        let agg = sh.usage.entry((tenant.id.as_ptr() as usize, day)).or_insert_with(|| TenantDay {
            id: tenant.id.clone(),
            tier: tenant.tier.clone(),
            fixed: [0; FIXED],
            charged: Vec::new(),
            rejected: Vec::new(),
        });
        if !r.admitted {
            if let Some(reason) = r.reason {
                match agg.rejected.iter_mut().find(|(c, _)| *c == reason) {
                    Some(e) => e.1 += 1,
                    None => agg.rejected.push((reason, 1)),
                }
            }
            return;
        }
        agg.fixed[REQUESTS] += 1;
        agg.fixed[BYTES_IN] += r.bytes_in;
        agg.fixed[BYTES_OUT] += r.bytes_out;
        agg.fixed[STATUS0 + class] += 1;
        agg.fixed[TOTAL_MS] += (r.total_secs * 1000.0).round() as u64;
        if let Some(s) = r.upstream_secs {
            agg.fixed[UPSTREAM_MS] += (s * 1000.0).round() as u64;
        }
        let model = match r.model {
            Some(model) if !r.charges.is_empty() => Some(self.model_dimension(&tenant.tier.limits, model, day)),
            _ => None,
        };
        for c in r.charges {
            let units = c.units();
            let metric = &c.metric;
            let same = |(m, md, _): &&mut (Arc<str>, Option<Arc<str>>, u64)| {
                (Arc::ptr_eq(m, metric) || **m == **metric) && *md == model
            };
            match agg.charged.iter_mut().find(same) {
                Some(e) => e.2 = e.2.saturating_add(units),
                None => agg.charged.push((metric.clone(), model.clone(), units)),
            }
            if let Some(c) = counter_for(&mut sh.units, m, tier, metric) {
                c.inc_by(units);
            }
        }
        if let Some(c) = counter_for(&mut sh.units, m, tier, "requests") {
            c.inc();
        }
    }

    /// Swaps out the aggregates as one batch and writes every buffered batch, oldest first.
    pub async fn flush(&self) {
        let mut rows = Vec::new();
        let mut counts: HashMap<Arc<str>, DecisionCounts> = HashMap::new();
        for s in &self.shards {
            let (usage, tc) = {
                let mut g = lock(s);
                (std::mem::take(&mut g.usage), std::mem::take(&mut g.tenant_counts))
            };
            for ((_, day), agg) in usage {
                self.rows_of(agg, day, &mut rows);
            }
            for (t, n) in tc {
                let sum = counts.entry(t).or_default();
                for (s, n) in sum.iter_mut().zip(n) {
                    *s += n;
                }
            }
        }
        self.refresh_tenant_series(counts);
        if !rows.is_empty() {
            let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
            let mut by_tenant: HashMap<Arc<str>, Vec<LedgerRow>> = HashMap::new();
            for r in rows {
                by_tenant.entry(r.tenant.clone()).or_default().push(r);
            }
            let parts = by_tenant
                .into_iter()
                .map(|(tenant, rows)| LedgerBatch { writer: self.writer.clone(), seq, tenant, rows })
                .collect();
            let mut buf = lock(&self.buffer);
            buf.push_back(parts);
            self.cap(&mut buf);
        }
        self.write_buffered().await;
        self.metrics.ledger_buffered.set(lock(&self.buffer).len() as i64);
    }

    /// Drops the oldest flushes past `max_buffered_batches`.
    fn cap(&self, buf: &mut VecDeque<Vec<LedgerBatch>>) {
        while buf.len() > self.max_buffered {
            buf.pop_front();
            self.metrics.ledger_dropped.inc();
        }
    }

    /// Writes the buffered batches, oldest flushes first, [`WRITE_CHUNK`] flushes per call.
    /// A tenant whose batch failed is left out of the later calls of this round, so its
    /// batches are applied in order at a later flush; everyone else's are written now.
    async fn write_buffered(&self) {
        // Taken out so the store is not called under the lock; a flush running meanwhile
        // (shutdown) finds it empty, and anything it buffers goes behind what is put back.
        let mut pending = std::mem::take(&mut *lock(&self.buffer));
        let mut kept: VecDeque<Vec<LedgerBatch>> = VecDeque::new();
        let mut blocked: HashSet<Arc<str>> = HashSet::new();
        let mut last_error = None;
        while !pending.is_empty() {
            let take = pending.len().min(WRITE_CHUNK);
            // What stays buffered of this chunk, one entry per flush, in order.
            let mut keep: Vec<Vec<LedgerBatch>> = (0..take).map(|_| Vec::new()).collect();
            let mut call = Vec::new();
            let mut from = Vec::new();
            for (i, flush) in pending.drain(..take).enumerate() {
                for b in flush {
                    if blocked.contains(&b.tenant) {
                        keep[i].push(b);
                    } else {
                        call.push(b);
                        from.push(i);
                    }
                }
            }
            if !call.is_empty() {
                let started = Instant::now();
                let mut results = self.ledger.apply(&call).await;
                // A ledger that answers fewer results than batches has not written the rest.
                results.resize(call.len(), Err(StoreError::Backend("the ledger did not answer for this batch".into())));
                let mut wrote = false;
                for ((b, i), r) in call.into_iter().zip(from).zip(results) {
                    match r {
                        Ok(()) => wrote = true,
                        Err(e) => {
                            blocked.insert(b.tenant.clone());
                            last_error = Some(e);
                            keep[i].push(b);
                        }
                    }
                }
                if wrote {
                    self.metrics.ledger_flush.observe(started.elapsed().as_secs_f64());
                }
            }
            kept.extend(keep);
        }
        let mut buf = lock(&self.buffer);
        let newer = std::mem::take(&mut *buf);
        kept.retain(|f| !f.is_empty());
        kept.extend(newer);
        *buf = kept;
        self.cap(&mut buf);
        if let Some(e) = last_error {
            tracing::warn!(
                error = %e,
                tenants = blocked.len(),
                buffered = buf.len(),
                "usage ledger write failed for some tenants; their usage is kept and retried"
            );
        }
    }

    /// Ledger rows of one tenant-day, with cost from the tier's prices.
    fn rows_of(&self, agg: TenantDay, day: i64, out: &mut Vec<LedgerRow>) {
        let day = day_string(day);
        let prices = &agg.tier.limits.prices;
        let mut push = |metric: &Arc<str>, value: u64| {
            if value == 0 {
                return;
            }
            let cost_micros = micros_of(value, prices.get(metric).copied().unwrap_or(0.0));
            out.push(LedgerRow {
                tenant: agg.id.clone(),
                metric: metric.clone(),
                day: day.clone(),
                value,
                cost_micros,
            });
        };
        let n = &self.names;
        push(&n.requests, agg.fixed[REQUESTS]);
        push(&n.bytes_in, agg.fixed[BYTES_IN]);
        push(&n.bytes_out, agg.fixed[BYTES_OUT]);
        push(&n.upstream_ms, agg.fixed[UPSTREAM_MS]);
        push(&n.total_ms, agg.fixed[TOTAL_MS]);
        for (i, name) in n.status.iter().enumerate() {
            push(name, agg.fixed[STATUS0 + i]);
        }
        // A charged metric's row carries its whole value and cost; with models, each model also
        // gets a `metric[model]` row (its share, priced at the model's price), which reports
        // show as a breakdown and never add to the total.
        let mut totals: Vec<(&Arc<str>, u64, u64)> = Vec::new();
        let mut model_rows: Vec<LedgerRow> = Vec::new();
        for (metric, model, units) in &agg.charged {
            let cost = micros_of(*units, agg.tier.limits.price(metric, model.as_deref()));
            match totals.iter_mut().find(|(m, _, _)| *m == metric) {
                Some(t) => {
                    t.1 = t.1.saturating_add(*units);
                    t.2 = t.2.saturating_add(cost);
                }
                None => totals.push((metric, *units, cost)),
            }
            if let Some(model) = model {
                if *units > 0 {
                    model_rows.push(LedgerRow {
                        tenant: agg.id.clone(),
                        metric: format!("{metric}[{model}]").into(),
                        day: day.clone(),
                        value: *units,
                        cost_micros: cost,
                    });
                }
            }
        }
        for (metric, units, cost) in totals {
            if units > 0 {
                model_rows.push(LedgerRow {
                    tenant: agg.id.clone(),
                    metric: metric.clone(),
                    day: day.clone(),
                    value: units,
                    cost_micros: cost,
                });
            }
        }
        for (reason, count) in &agg.rejected {
            push(&self.rejected_name(reason), *count);
        }
        out.append(&mut model_rows);
    }

    /// Adds the interval's requests to the per-tenant series, recomputes the top N, and drops
    /// the series of tenants that left it.
    fn refresh_tenant_series(&self, counts: HashMap<Arc<str>, DecisionCounts>) {
        if self.tenant_top == 0 && self.tenant_allow.is_empty() {
            return;
        }
        let mut state = lock(&self.tenant_series);
        let TenantSeries { tracked, top } = &mut *state;
        // Scores decay by half a minute's worth per flush at 1 s intervals, so the top N follows
        // sustained traffic rather than the last second, and series do not churn.
        for t in tracked.values_mut() {
            t.score *= 0.98;
        }
        for (id, n) in counts {
            let t = tracked.entry(id).or_default();
            t.score += n.iter().sum::<u64>() as f64;
            for (p, n) in t.pending.iter_mut().zip(n) {
                *p += n;
            }
        }
        // A tenant idle long enough to fall below half a request leaves the bookkeeping.
        tracked.retain(|_, t| t.score >= 0.5);
        let new: HashSet<Arc<str>> = if self.tenant_top == 0 {
            HashSet::new()
        } else {
            let mut v: Vec<(&Arc<str>, f64)> = tracked.iter().map(|(id, t)| (id, t.score)).collect();
            v.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
            v.into_iter().take(self.tenant_top).map(|(id, _)| id.clone()).collect()
        };
        for gone in top.difference(&new) {
            if !self.tenant_allow.contains(&**gone) {
                for d in DECISIONS {
                    let _ = self.metrics.tenant_requests.remove_label_values(&[gone, d]);
                }
            }
        }
        for (id, t) in tracked.iter_mut() {
            if !(new.contains(id) || self.tenant_allow.contains(&**id)) {
                continue;
            }
            for (i, n) in t.pending.iter_mut().enumerate() {
                if *n > 0 {
                    self.metrics.tenant_requests.with_label_values(&[id, DECISIONS[i]]).inc_by(*n);
                    *n = 0;
                }
            }
        }
        *top = new;
    }

    /// Batches waiting for the store.
    pub fn buffered(&self) -> usize {
        lock(&self.buffer).len()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
}
