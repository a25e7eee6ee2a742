//! Stores: the small traits shared state goes through, and their two implementations.
//!
//! - [`embedded`]: SQLite in one file, for a single node. Counters live in memory (they are
//!   the authority on one node) and are written to the file every `flush_interval` and at
//!   shutdown.
//! - [`redis`]: Redis or Redis Cluster, shared by a fleet. Every key carries the tenant as a
//!   hash tag (`tg:{acme}:…`), so one pipeline covers all of a tenant's keys.
//!
//! Every call goes through a [`Breaker`]: a timeout of tens of milliseconds, and after
//! repeated failures no calls at all for a cooldown, so a dead store costs requests nothing
//! but the configured failure policy. One conformance suite (`tests/store_conformance.rs`)
//! runs against both implementations.

pub mod embedded;
pub mod jobs;
pub mod jobs_embedded;
pub mod records;
pub mod redis;

pub use records::{
    Change, DirectoryData, DirectoryStore, Feed, KeyRecord, Page, RecordKind, TenantRecord, Versioned, FEED_RETAINED,
    LOAD_PAGE,
};

use async_trait::async_trait;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Why a store call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The call did not finish within the store timeout.
    Timeout,
    /// The circuit breaker is open: the store failed recently and is not being called.
    BreakerOpen,
    /// The store answered with an error, or the connection failed.
    Backend(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Timeout => write!(f, "store call timed out"),
            StoreError::BreakerOpen => write!(f, "store circuit breaker is open"),
            StoreError::Backend(e) => write!(f, "store error: {e}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// A quota counter: one tenant, one metric (or rule-scoped metric), one period.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterKey {
    pub tenant: Arc<str>,
    pub metric: Arc<str>,
    /// Period start, Unix ms (0 for `never`).
    pub period_start: i64,
}

/// The answer to a lease request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Units granted: `0` or `need..=want`.
    pub granted: u64,
    /// The shared counter as this call left it: units granted to every instance this period
    /// (spent, or held in leases) plus usage added after the fact. Never a transient value:
    /// a grant that does not fit is never added.
    pub total: u64,
}

/// One holder's call on a quota counter: it reports its state and may ask for more units.
///
/// Holders report cumulative figures, so a call whose answer was lost is harmless to repeat:
/// units granted by a call the holder never heard back from (`granted` below what the store
/// recorded) and units handed back (`returned` above what the store recorded) are both
/// settled by the next call. A holder's record expires `ttl_ms` after its last call; the
/// next call on the counter by anyone then reclaims what it held, so a crashed instance's
/// lease comes back within the TTL.
#[derive(Debug, Clone, Copy)]
pub struct LeaseRequest<'a> {
    pub key: &'a CounterKey,
    /// The holder: one per process start (`<instance_id>-<start id>`).
    pub holder: &'a str,
    /// Units this holder knows it was granted on this counter, cumulative.
    pub granted: u64,
    /// Units this holder has handed back on this counter, cumulative.
    pub returned: u64,
    /// Units it holds unspent right now (what a crash would leave behind).
    pub held: u64,
    /// Units spent without a grant (during a store outage, or settled above what was
    /// reserved), added to the counter before anything is granted. Not deduplicated: a call
    /// repeated after a lost answer counts them twice, which only ever under-admits.
    pub add: u64,
    /// Grant nothing unless at least this many units fit under `limit` (a refused request
    /// must hold nothing).
    pub need: u64,
    /// Grant up to this many.
    pub want: u64,
    pub limit: u64,
    /// When the counter may be forgotten (`i64::MAX`: never).
    pub expire_at_ms: i64,
    /// How long the holder's record lives without another call.
    pub ttl_ms: i64,
    /// The caller's clock (stores without a clock of their own use it; Redis uses its own).
    pub now_ms: i64,
}

/// What a store keeps per holder of a quota counter (see [`LeaseRequest`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HolderRecord {
    pub granted: u64,
    pub returned: u64,
    pub held: u64,
    pub expires_ms: i64,
}

/// The lease protocol on one counter, for stores that keep counters in memory. The Redis
/// store runs the same steps in a server-side script (`LEASE_SCRIPT` in `redis.rs`); the
/// conformance suite holds both to the same answers.
pub fn apply_lease(
    total: &mut u64,
    holders: &mut std::collections::HashMap<String, HolderRecord>,
    req: &LeaseRequest<'_>,
) -> Grant {
    let now = req.now_ms;
    // Holders that stopped calling: what they held goes back.
    holders.retain(|_, h| {
        if h.expires_ms <= now {
            *total = total.saturating_sub(h.held);
            false
        } else {
            true
        }
    });
    if let Some(h) = holders.get(req.holder) {
        // Grants whose answer never reached the holder, and units it handed back.
        *total = total.saturating_sub(h.granted.saturating_sub(req.granted));
        *total = total.saturating_sub(req.returned.saturating_sub(h.returned));
    }
    // Then what was spent without a grant (each step floors at 0, as the script does).
    *total = total.saturating_add(req.add);
    let room = req.limit.saturating_sub(*total);
    let granted = if req.want > 0 && room >= req.need { req.want.min(room) } else { 0 };
    *total += granted;
    holders.insert(
        req.holder.to_string(),
        HolderRecord {
            granted: req.granted + granted,
            returned: req.returned,
            held: req.held + granted,
            expires_ms: now.saturating_add(req.ttl_ms),
        },
    );
    Grant { granted, total: *total }
}

/// Shared counters: quota leases, sliding windows and concurrency slots.
#[async_trait]
pub trait Counters: Send + Sync + 'static {
    /// A short name for metrics and logs (`embedded`, `redis`).
    fn name(&self) -> &'static str;

    /// Settles what `req.holder` reports (returns, lost grants, expired holders) and grants
    /// `0` or `need..=want` units without letting the counter pass `limit`. The sum of all
    /// outstanding grants and usage never exceeds the limit, however many instances ask at
    /// once. `want = 0` only reports (renewal, hand-back).
    async fn lease(&self, req: &LeaseRequest<'_>) -> Result<Grant, StoreError>;

    /// Announces that `holder` is alive for `ttl_ms`; returns how many holders are (at least 1).
    async fn heartbeat(&self, _holder: &str, _now_ms: i64, _ttl_ms: i64) -> Result<u32, StoreError> {
        Ok(1)
    }

    /// Adds units with no ceiling (usage found after the fact: settlement, reconciliation).
    async fn add(&self, key: &CounterKey, units: u64, expire_at_ms: i64) -> Result<u64, StoreError>;

    /// Reads a counter (0 when absent).
    async fn get(&self, key: &CounterKey) -> Result<u64, StoreError>;

    /// Committed usage of a counter: the counter less what its holders reported holding
    /// unspent at their last call. Lags real spending by at most one report per holder.
    async fn committed(&self, key: &CounterKey) -> Result<u64, StoreError> {
        self.get(key).await
    }

    /// Sliding window: adds `n` to the window of `window_ms` containing `now_ms`; returns the
    /// current and previous windows' counts.
    async fn window_add(
        &self,
        tenant: &str,
        name: &str,
        window_ms: u64,
        now_ms: i64,
        n: i64,
    ) -> Result<(u64, u64), StoreError>;

    /// Takes a concurrency slot for `tenant` if fewer than `limit` live slots exist. A slot
    /// lives `ttl_ms` unless its holder renews it.
    async fn slot_acquire(
        &self,
        tenant: &str,
        slot: &str,
        limit: u32,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<bool, StoreError>;

    /// Frees a slot.
    async fn slot_release(&self, tenant: &str, slot: &str) -> Result<(), StoreError>;

    /// Renews held slots.
    async fn slot_heartbeat(&self, tenant: &str, slots: &[String], now_ms: i64, ttl_ms: i64) -> Result<(), StoreError>;

    /// Records what this instance has spent per counter, for stores that persist usage
    /// separately from grants (embedded). The default does nothing.
    async fn persist_usage(&self, _rows: &[(CounterKey, u64)]) -> Result<(), StoreError> {
        Ok(())
    }

    /// Spent units recorded for `key` by an earlier process (embedded restarts). Answered
    /// from memory: it is called on the request path when a quota period starts.
    fn persisted_usage(&self, _key: &CounterKey) -> u64 {
        0
    }
}

/// One row of the usage ledger: a tenant's total of one metric on one UTC day.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerRow {
    pub tenant: Arc<str>,
    pub metric: Arc<str>,
    /// UTC day, `YYYY-MM-DD`.
    pub day: String,
    pub value: u64,
    /// Cost in millionths of the price unit (integers add up exactly).
    pub cost_micros: u64,
}

/// One tenant's ledger rows from one flush of one writer.
///
/// Exactly-once rests on a high-water mark per writer and tenant: a store applies a batch
/// only when its `seq` is above the highest `seq` it has applied for that writer and tenant,
/// and records the new mark in the same atomic step. A retry of a batch whose first attempt
/// landed (a timeout after the write) is therefore skipped, and the store keeps one mark per
/// writer and tenant instead of one per batch.
#[derive(Debug, Clone)]
pub struct LedgerBatch {
    /// Who wrote it: the instance id plus a random id per process start, so a restarted
    /// process (which starts `seq` again) is a new writer.
    pub writer: Arc<str>,
    /// Increases with every flush of `writer`; starts at 1.
    pub seq: u64,
    pub tenant: Arc<str>,
    /// Rows of `tenant` only.
    pub rows: Vec<LedgerRow>,
}

/// The usage ledger: written in batches, read for reports.
#[async_trait]
pub trait Ledger: Send + Sync + 'static {
    /// Applies each batch exactly once, and answers one result per batch, in order.
    ///
    /// A batch whose `seq` is not above its writer's mark for its tenant is skipped and
    /// answered `Ok` (it was applied before). Batches of one writer and tenant must come in
    /// `seq` order; they are applied in that order, and when one fails, the later ones of the
    /// same writer and tenant in this call fail too (applying them would raise the mark past
    /// the failed one, which a retry would then skip). Batches of other tenants do not wait
    /// for a failed one.
    async fn apply(&self, batches: &[LedgerBatch]) -> Vec<Result<(), StoreError>>;

    /// Rows of `tenant` with `from <= day <= to` (inclusive, `YYYY-MM-DD`), ordered by day
    /// then metric.
    async fn rows(&self, tenant: &str, from: &str, to: &str) -> Result<Vec<LedgerRow>, StoreError>;
}

/// Counts store calls for `tollgate_store_round_trips_total` / `tollgate_store_errors_total`.
pub trait StoreObserver: Send + Sync + 'static {
    fn round_trip(&self, store: &'static str, op: &'static str);
    fn error(&self, store: &'static str, op: &'static str);
}

/// An observer that records nothing (tests, tools).
pub struct NoObserver;

impl StoreObserver for NoObserver {
    fn round_trip(&self, _: &'static str, _: &'static str) {}
    fn error(&self, _: &'static str, _: &'static str) {}
}

/// Timeout plus circuit breaker around store calls.
pub struct Breaker {
    timeout: Duration,
    threshold: u32,
    cooldown_ms: i64,
    failures: AtomicU32,
    open_until_ms: AtomicI64,
    clock: crate::clock::SharedClock,
}

impl Breaker {
    pub fn new(timeout: Duration, threshold: u32, cooldown: Duration, clock: crate::clock::SharedClock) -> Breaker {
        Breaker {
            timeout,
            threshold: threshold.max(1),
            cooldown_ms: cooldown.as_millis() as i64,
            failures: AtomicU32::new(0),
            open_until_ms: AtomicI64::new(0),
            clock,
        }
    }

    /// The timeout of one call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A closed breaker with the same settings (one per node of a cluster).
    pub fn fresh(&self) -> Breaker {
        Breaker::new(
            self.timeout,
            self.threshold,
            Duration::from_millis(self.cooldown_ms.max(0) as u64),
            self.clock.clone(),
        )
    }

    /// `true` while calls are being refused.
    pub fn is_open(&self) -> bool {
        self.clock.now_millis() < self.open_until_ms.load(Ordering::Relaxed)
    }

    /// How long until the breaker lets a call through again.
    pub fn retry_after(&self) -> Duration {
        let left = self.open_until_ms.load(Ordering::Relaxed) - self.clock.now_millis();
        Duration::from_millis(left.max(1000) as u64)
    }

    /// Runs `fut` under the timeout, unless the breaker is open.
    pub async fn call<T, F>(&self, fut: F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, StoreError>>,
    {
        self.call_within(self.timeout, fut).await
    }

    /// Like [`Breaker::call`] with another timeout: bulk background work (ledger batches,
    /// directory loads) may take longer than a hot-path call ever should.
    pub async fn call_within<T, F>(&self, timeout: Duration, fut: F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, StoreError>>,
    {
        if self.is_open() {
            return Err(StoreError::BreakerOpen);
        }
        let result = match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout),
        };
        match &result {
            Ok(_) => self.failures.store(0, Ordering::Relaxed),
            Err(_) => {
                let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= self.threshold {
                    self.open_until_ms.store(self.clock.now_millis() + self.cooldown_ms, Ordering::Relaxed);
                    self.failures.store(0, Ordering::Relaxed);
                }
            }
        }
        result
    }
}

/// The redis key prefix of a tenant. The braces make the tenant a Redis Cluster hash tag.
pub fn tenant_prefix(tenant: &str) -> String {
    format!("tg:{{{tenant}}}")
}

/// Runs CPU-heavy work (a page of records to decode, a directory to sort: milliseconds to a few
/// hundred) so that the runtime's other tasks go on: on a multi-threaded runtime the worker hands
/// its tasks over while `f` runs; elsewhere (tests on a current-thread runtime) `f` simply runs.
pub fn off_the_runtime<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}
