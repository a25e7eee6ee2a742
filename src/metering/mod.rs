//! Metering: every request, on every path, into in-process aggregates that a background task
//! flushes to the usage ledger.
//!
//! The hot path adds to a shard picked by the current thread, so threads do not share a lock;
//! only the flush touches every shard, to swap it out. A flush becomes one [`LedgerBatch`]
//! with a unique id: the ledger applies a batch id once, so a retried batch is never counted
//! twice. Batches that cannot be written wait in a bounded buffer and are replayed in order
//! when the store is back; past the bound the oldest are dropped and counted in
//! `tollgate_ledger_dropped_batches_total`.
//!
//! Admitted requests are metered as usage (`requests`, `bytes_in`, `bytes_out`,
//! `upstream_ms`, `total_ms`, `status_<class>`, and every charged metric after settlement).
//! Refused requests are metered as `rejected.<reason>` rows, never as usage.

pub mod report;
pub mod webhook;

use crate::metrics::Metrics;
use crate::store::{Ledger, LedgerBatch, LedgerRow};
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// Number of aggregate shards; more than threads, so two threads rarely share one.
const SHARDS: usize = 16;

type AggKey = (Arc<str>, i64, Arc<str>);

#[derive(Default)]
struct Shard {
    /// (tenant, UTC day number, metric) → (value, cost in micros)
    usage: HashMap<AggKey, (u64, u64)>,
    /// Requests per tenant since the last flush, for the top-N per-tenant series.
    tenant_counts: HashMap<Arc<str>, u64>,
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
    /// The charged metric and its settled (or estimated) amount.
    pub charge: Option<(&'a Arc<str>, u64)>,
    /// Counted as usage: the request was admitted.
    pub admitted: bool,
}

/// The metering stage's state.
pub struct Meter {
    shards: Vec<Mutex<Shard>>,
    ledger: Arc<dyn Ledger>,
    metrics: Arc<Metrics>,
    buffer: Mutex<VecDeque<LedgerBatch>>,
    max_buffered: usize,
    instance: String,
    /// Random per process start: batch ids never repeat across restarts (a container keeps
    /// its host name and pid 1).
    run_id: u64,
    seq: AtomicU64,
    names: Names,
    /// Decayed request counts per tenant, for choosing the top N (touched by the flush only).
    top_scores: Mutex<HashMap<Arc<str>, f64>>,
    tenant_allow: HashSet<String>,
    tenant_top: usize,
    /// The current top-N tenants; read on the hot path, replaced by the flush.
    top_now: arc_swap::ArcSwap<HashSet<Arc<str>>>,
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
        Arc::new(Meter {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            ledger,
            metrics,
            buffer: Mutex::new(VecDeque::new()),
            max_buffered: max_buffered.max(1),
            instance,
            run_id: rand::random::<u64>(),
            seq: AtomicU64::new(0),
            top_scores: Mutex::new(HashMap::new()),
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
            top_now: arc_swap::ArcSwap::from_pointee(HashSet::new()),
        })
    }

    fn shard(&self) -> MutexGuard<'_, Shard> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::thread::current().id().hash(&mut h);
        lock(&self.shards[(h.finish() as usize) % SHARDS])
    }

    fn rejected_name(&self, reason: &'static str) -> Arc<str> {
        self.names.rejected.get(reason).cloned().unwrap_or_else(|| Arc::from(format!("rejected.{reason}")))
    }

    /// Records one finished request. Called from `logging` on every path.
    pub fn record(&self, r: &Record<'_>, now_ms: i64) {
        let tier = r.tenant.map(|t| &*t.tier.name).unwrap_or("-");
        let class = status_class(r.status);
        let m = &self.metrics;
        m.requests.with_label_values(&[tier, r.rule, r.decision, STATUS_LABELS[class]]).inc();
        if let Some(reason) = r.reason {
            m.rejections.with_label_values(&[tier, reason]).inc();
        }
        m.request_duration.with_label_values(&[tier, r.rule]).observe(r.total_secs);
        if let (Some(u), Some(s)) = (r.upstream, r.upstream_secs) {
            m.upstream_duration.with_label_values(&[u]).observe(s);
        }
        m.bytes.with_label_values(&["in"]).inc_by(r.bytes_in);
        m.bytes.with_label_values(&["out"]).inc_by(r.bytes_out);

        let Some(tenant) = r.tenant else { return };
        if (self.tenant_top > 0 || !self.tenant_allow.is_empty())
            && (self.tenant_allow.contains(&*tenant.id) || self.top_now.load().contains(&tenant.id))
        {
            m.tenant_requests.with_label_values(&[&tenant.id, r.decision]).inc();
        }
        let day = day_number(now_ms);
        let prices = &tenant.tier.limits.prices;
        let mut shard = self.shard();
        if self.tenant_top > 0 {
            *shard.tenant_counts.entry(tenant.id.clone()).or_insert(0) += 1;
        }
        let mut add = |metric: &Arc<str>, value: u64| {
            if value == 0 {
                return;
            }
            let price = prices.get(metric).copied().unwrap_or(0.0);
            let cost = (value as f64 * price * 1_000_000.0).round() as u64;
            let e = shard.usage.entry((tenant.id.clone(), day, metric.clone())).or_insert((0, 0));
            e.0 += value;
            e.1 += cost;
        };
        if !r.admitted {
            if let Some(reason) = r.reason {
                add(&self.rejected_name(reason), 1);
            }
            return;
        }
        add(&self.names.requests, 1);
        add(&self.names.bytes_in, r.bytes_in);
        add(&self.names.bytes_out, r.bytes_out);
        add(&self.names.status[class], 1);
        add(&self.names.total_ms, (r.total_secs * 1000.0).round() as u64);
        if let Some(s) = r.upstream_secs {
            add(&self.names.upstream_ms, (s * 1000.0).round() as u64);
        }
        if let Some((metric, units)) = r.charge {
            add(metric, units);
            m.usage_units.with_label_values(&[tier, metric]).inc_by(units);
        }
        m.usage_units.with_label_values(&[tier, "requests"]).inc();
    }

    /// Swaps out the aggregates as one batch and writes every buffered batch, oldest first.
    pub async fn flush(&self) {
        let mut rows = Vec::new();
        let mut counts: HashMap<Arc<str>, u64> = HashMap::new();
        for s in &self.shards {
            let (usage, tc) = {
                let mut g = lock(s);
                (std::mem::take(&mut g.usage), std::mem::take(&mut g.tenant_counts))
            };
            for ((tenant, day, metric), (value, cost_micros)) in usage {
                rows.push(LedgerRow { tenant, metric, day: day_string(day), value, cost_micros });
            }
            for (t, n) in tc {
                *counts.entry(t).or_insert(0) += n;
            }
        }
        self.refresh_top(counts);
        if !rows.is_empty() {
            let id = format!("{}-{}-{}", self.instance, self.run_id, self.seq.fetch_add(1, Ordering::Relaxed));
            let mut buf = lock(&self.buffer);
            buf.push_back(LedgerBatch { id, rows, uncertain: false });
            while buf.len() > self.max_buffered {
                buf.pop_front();
                self.metrics.ledger_dropped.inc();
            }
        }
        loop {
            let Some(batch) = lock(&self.buffer).front().cloned() else { break };
            let started = Instant::now();
            match self.ledger.apply(&batch).await {
                Ok(()) => {
                    self.metrics.ledger_flush.observe(started.elapsed().as_secs_f64());
                    lock(&self.buffer).pop_front();
                }
                Err(e) => {
                    // The write may or may not have landed: check next time before applying.
                    if let Some(front) = lock(&self.buffer).front_mut() {
                        front.uncertain = true;
                    }
                    tracing::warn!(error = %e, buffered = lock(&self.buffer).len(), "usage ledger write failed; will retry");
                    break;
                }
            }
        }
        self.metrics.ledger_buffered.set(lock(&self.buffer).len() as i64);
    }

    /// Recomputes the top-N tenants and drops series of tenants that left it.
    fn refresh_top(&self, counts: HashMap<Arc<str>, u64>) {
        if self.tenant_top == 0 {
            return;
        }
        // Scores decay by half a minute's worth per flush at 1 s intervals, so the top N follows
        // sustained traffic rather than the last second, and series do not churn.
        let mut scores = lock(&self.top_scores);
        for s in scores.values_mut() {
            *s *= 0.98;
        }
        for (t, n) in counts {
            *scores.entry(t).or_insert(0.0) += n as f64;
        }
        scores.retain(|_, s| *s >= 0.5);
        let mut v: Vec<(&Arc<str>, &f64)> = scores.iter().collect();
        v.sort_by(|a, b| b.1.total_cmp(a.1).then_with(|| a.0.cmp(b.0)));
        let new: HashSet<Arc<str>> = v.into_iter().take(self.tenant_top).map(|(t, _)| t.clone()).collect();
        drop(scores);
        let old = self.top_now.load_full();
        for gone in old.difference(&new) {
            if !self.tenant_allow.contains(&**gone) {
                for d in ["forwarded", "rejected", "upstream_error", "aborted", "served"] {
                    let _ = self.metrics.tenant_requests.remove_label_values(&[gone, d]);
                }
            }
        }
        self.top_now.store(Arc::new(new));
    }

    /// Batches waiting for the store.
    pub fn buffered(&self) -> usize {
        lock(&self.buffer).len()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
}
