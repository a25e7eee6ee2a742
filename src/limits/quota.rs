//! Quotas: calendar-period counters per tenant and metric, spent from a local lease.
//!
//! An instance takes a block of units from the shared counter ([`Counters::lease`]) and spends
//! it in memory, so the hot path rarely touches the store. The block adapts to what is left:
//! `remaining / 32`, at most `max_lease_block`, and when that falls below 2 the instance stops
//! keeping a lease and asks for exactly what each request costs. Far from the limit that is
//! about one round trip per block; near it every grant is exact. The sum of grants never
//! exceeds the limit, so no number of instances can over-admit. The next block is fetched in
//! the background before the current one runs out.
//!
//! A request that is refused anywhere (a later quota, concurrency) gets its units back in the
//! lease: rejections consume nothing. Unspent leases are returned at period rollover and at
//! shutdown. When the store fails, the policy decides: `local` keeps admitting against the
//! last known usage and records the spend as debt, `open` admits and records debt, `closed`
//! refuses. Debt is added to the shared counter once the store answers again.

use super::period::{window, Window};
use crate::clock::SharedClock;
use crate::policy::{Policy, QuotaSpec, StorePolicy};
use crate::store::{CounterKey, Counters, StoreError};
use dashmap::DashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// How long a counter is kept in the shared store after its period ends (for reports).
const KEEP_AFTER_PERIOD_MS: i64 = 7 * 86_400_000;
/// A cell unused this long, with nothing outstanding, is dropped from memory.
const IDLE_CELL_MS: i64 = 10 * 60_000;

/// The state of one quota, for headers, problems and the usage API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaState {
    pub used: u64,
    pub limit: u64,
    pub remaining: u64,
    /// End of the period, Unix ms (`i64::MAX` for `never`).
    pub reset_ms: i64,
    pub period_start_ms: i64,
    /// Past the limit (soft quota, or a hard quota inside its overage allowance).
    pub over: bool,
}

/// Why units could not be reserved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuotaError {
    Exceeded(QuotaState),
    StoreUnavailable { retry_after: Duration },
}

struct CellState {
    key: CounterKey,
    window: Window,
    period: crate::policy::Period,
    /// Usage recorded by earlier processes (embedded restarts).
    base: u64,
    /// Spent by this process this period.
    spent: u64,
    /// Granted to this instance and not yet spent.
    lease: u64,
    /// The shared counter at last contact: units granted to all instances.
    known_total: u64,
    /// Spent while the store was failing; added to the shared counter later.
    debt: u64,
    prefetching: bool,
    dirty: bool,
    last_used_ms: i64,
    /// Highest warning threshold (percent) already announced this period.
    pub warned: u32,
}

impl CellState {
    fn used(&self) -> u64 {
        (self.known_total + self.debt).saturating_sub(self.lease).max(self.base + self.spent)
    }

    fn snapshot(&self, spec: &QuotaSpec) -> QuotaState {
        let used = self.used();
        QuotaState {
            used,
            limit: spec.limit,
            remaining: spec.limit.saturating_sub(used),
            reset_ms: self.window.end_ms,
            period_start_ms: self.window.start_ms,
            over: used > spec.limit,
        }
    }
}

/// One tenant's quota on one metric.
pub struct Cell {
    st: Mutex<CellState>,
}

impl Cell {
    fn lock(&self) -> MutexGuard<'_, CellState> {
        // Every update leaves the state consistent before it can panic, so a poisoned lock is
        // still safe to read and write.
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Units taken for one request from one quota.
pub struct Reservation {
    cell: Arc<Cell>,
    period_start: i64,
    pub units: u64,
    pub metric: Arc<str>,
}

#[derive(Default)]
struct Pending {
    give_back: Vec<(CounterKey, u64)>,
    /// Debt of periods that ended, to add to their counters.
    add: Vec<(CounterKey, u64, i64)>,
    persist: Vec<(CounterKey, u64)>,
    dirty: Vec<Arc<Cell>>,
}

/// The quota engine. One per process, shared by every request.
pub struct QuotaEngine {
    store: Arc<dyn Counters>,
    clock: SharedClock,
    cells: DashMap<(Arc<str>, Arc<str>), Arc<Cell>, crate::fasthash::Fast>,
    max_block: u64,
    pending: Mutex<Pending>,
}

/// The lease block for what is left: large far from the limit, 0 (exact grants) near it.
pub fn block_size(remaining: u64, max_block: u64) -> u64 {
    let b = remaining / 32;
    if b < 2 {
        0
    } else {
        b.min(max_block)
    }
}

fn expire_at(w: &Window) -> i64 {
    if w.end_ms == i64::MAX {
        i64::MAX
    } else {
        w.end_ms + KEEP_AFTER_PERIOD_MS
    }
}

impl QuotaEngine {
    pub fn new(store: Arc<dyn Counters>, clock: SharedClock, max_block: u64) -> Arc<QuotaEngine> {
        Arc::new(QuotaEngine {
            store,
            clock,
            cells: DashMap::default(),
            max_block: max_block.max(1),
            pending: Mutex::new(Pending::default()),
        })
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cell(&self, tenant: &Arc<str>, metric: &Arc<str>, spec: &QuotaSpec, policy: &Policy, now: i64) -> Arc<Cell> {
        let id = (tenant.clone(), metric.clone());
        if let Some(c) = self.cells.get(&id) {
            return c.clone();
        }
        let w = window(spec.period, now, policy.timezone, policy.billing_anchor_day);
        let cell = Arc::new(Cell { st: Mutex::new(self.fresh(tenant.clone(), metric.clone(), w, spec.period, now)) });
        self.cells.entry(id).or_insert(cell).clone()
    }

    /// The state of a period that just started, with what earlier processes recorded for it.
    fn fresh(
        &self,
        tenant: Arc<str>,
        metric: Arc<str>,
        w: Window,
        period: crate::policy::Period,
        now: i64,
    ) -> CellState {
        let key = CounterKey { tenant, metric, period_start: w.start_ms };
        let base = self.store.persisted_usage(&key);
        CellState {
            key,
            window: w,
            period,
            base,
            spent: 0,
            lease: 0,
            known_total: base,
            debt: 0,
            prefetching: false,
            dirty: false,
            last_used_ms: now,
            warned: 0,
        }
    }

    /// Moves the cell to the period containing `now`, settling the old one.
    fn roll(&self, st: &mut CellState, spec: &QuotaSpec, policy: &Policy, now: i64) {
        if st.period == spec.period && now >= st.window.start_ms && now < st.window.end_ms {
            return;
        }
        let w = window(spec.period, now, policy.timezone, policy.billing_anchor_day);
        if w.start_ms == st.window.start_ms && st.period == spec.period {
            st.window = w;
            return;
        }
        {
            let mut p = self.pending();
            if st.lease > 0 {
                p.give_back.push((st.key.clone(), st.lease));
            }
            if st.dirty {
                p.persist.push((st.key.clone(), st.base + st.spent));
            }
            // Debt belongs to the period it was spent in: it is added to that period's counter.
            if st.debt > 0 {
                p.add.push((st.key.clone(), st.debt, expire_at(&st.window)));
            }
        }
        *st = self.fresh(st.key.tenant.clone(), st.key.metric.clone(), w, spec.period, now);
    }

    fn take(&self, cell: &Arc<Cell>, st: &mut CellState, cost: u64, now: i64) {
        st.lease -= cost;
        st.spent += cost;
        st.last_used_ms = now;
        if !st.dirty {
            st.dirty = true;
            self.pending().dirty.push(cell.clone());
        }
    }

    /// Reserves `cost` units of `metric` for `tenant`. On success the units are spent; give
    /// them back with [`QuotaEngine::refund`] if the request is refused later.
    #[allow(clippy::too_many_arguments)]
    pub async fn reserve(
        self: &Arc<Self>,
        tenant: &Arc<str>,
        metric: &Arc<str>,
        spec: &QuotaSpec,
        policy: &Policy,
        cost: u64,
        on_error: StorePolicy,
    ) -> Result<(Reservation, QuotaState), QuotaError> {
        let now = self.clock.now_millis();
        let cell = self.cell(tenant, metric, spec, policy, now);
        let ceiling = if spec.hard { spec.ceiling() } else { u64::MAX };
        for _attempt in 0..2 {
            let (key, want, expire, period_start) = {
                let mut st = cell.lock();
                self.roll(&mut st, spec, policy, now);
                if st.lease >= cost {
                    self.take(&cell, &mut st, cost, now);
                    self.maybe_prefetch(&cell, &mut st, spec, ceiling, cost);
                    let state = st.snapshot(spec);
                    return Ok((
                        Reservation {
                            cell: cell.clone(),
                            period_start: st.window.start_ms,
                            units: cost,
                            metric: metric.clone(),
                        },
                        state,
                    ));
                }
                let remaining = spec.limit.saturating_sub(st.used());
                let want = cost - st.lease + block_size(remaining, self.block_cap(cost));
                (st.key.clone(), want, expire_at(&st.window), st.window.start_ms)
            };
            match self.store.lease(&key, want, ceiling, expire).await {
                Ok(grant) => {
                    let mut st = cell.lock();
                    if st.window.start_ms != period_start {
                        self.pending().give_back.push((key, grant.granted));
                        continue;
                    }
                    st.lease += grant.granted;
                    // A refused or partial grant's total can include other instances' excess
                    // that is being handed back: never show more than the ceiling from it.
                    st.known_total =
                        if grant.granted < want { grant.total.min(ceiling).max(st.known_total) } else { grant.total };
                    if st.lease >= cost {
                        self.take(&cell, &mut st, cost, now);
                        let state = st.snapshot(spec);
                        return Ok((
                            Reservation { cell: cell.clone(), period_start, units: cost, metric: metric.clone() },
                            state,
                        ));
                    }
                    // The shared counter is at its ceiling. Return what we hold so another
                    // instance can use it, and refuse.
                    if st.lease > 0 {
                        self.pending().give_back.push((st.key.clone(), st.lease));
                        st.known_total = st.known_total.saturating_sub(st.lease);
                        st.lease = 0;
                    }
                    return Err(QuotaError::Exceeded(st.snapshot(spec)));
                }
                Err(e) => return self.on_store_error(&cell, spec, policy, cost, ceiling, on_error, e, metric, now),
            }
        }
        let st = cell.lock();
        Err(QuotaError::Exceeded(st.snapshot(spec)))
    }

    #[allow(clippy::too_many_arguments)]
    fn on_store_error(
        &self,
        cell: &Arc<Cell>,
        spec: &QuotaSpec,
        policy: &Policy,
        cost: u64,
        ceiling: u64,
        on_error: StorePolicy,
        err: StoreError,
        metric: &Arc<str>,
        now: i64,
    ) -> Result<(Reservation, QuotaState), QuotaError> {
        let mut st = cell.lock();
        self.roll(&mut st, spec, policy, now);
        tracing::debug!(error = %err, tenant = %st.key.tenant, metric = %metric, "quota store call failed");
        let admit = match on_error {
            StorePolicy::Closed => {
                return Err(QuotaError::StoreUnavailable { retry_after: Duration::from_secs(1) });
            }
            StorePolicy::Open => true,
            StorePolicy::Local => st.used() + cost <= ceiling,
        };
        if !admit {
            return Err(QuotaError::Exceeded(st.snapshot(spec)));
        }
        st.debt += cost;
        st.lease += cost;
        self.take(cell, &mut st, cost, now);
        let state = st.snapshot(spec);
        Ok((
            Reservation { cell: cell.clone(), period_start: st.window.start_ms, units: cost, metric: metric.clone() },
            state,
        ))
    }

    /// The largest block for requests costing `cost`: `max_lease_block`, but at least 16
    /// requests' worth, so costly requests do not refill every few requests. Blocks stay at
    /// most `remaining / 32`, which keeps grants exact near the limit.
    fn block_cap(&self, cost: u64) -> u64 {
        self.max_block.max(cost.saturating_mul(16))
    }

    fn maybe_prefetch(
        self: &Arc<Self>,
        cell: &Arc<Cell>,
        st: &mut CellState,
        spec: &QuotaSpec,
        ceiling: u64,
        cost: u64,
    ) {
        let remaining = spec.limit.saturating_sub(st.used());
        let block = block_size(remaining, self.block_cap(cost));
        if st.prefetching || block == 0 || st.lease >= block / 2 {
            return;
        }
        st.prefetching = true;
        let (engine, cell, key, expire, period_start) =
            (self.clone(), cell.clone(), st.key.clone(), expire_at(&st.window), st.window.start_ms);
        tokio::spawn(async move {
            let result = engine.store.lease(&key, block, ceiling, expire).await;
            let mut st = cell.lock();
            st.prefetching = false;
            if let Ok(grant) = result {
                if st.window.start_ms == period_start {
                    st.lease += grant.granted;
                    st.known_total = grant.total;
                } else {
                    engine.pending().give_back.push((key, grant.granted));
                }
            }
        });
    }

    /// Gives back `units` of a reservation (the request was refused later, or settled lower).
    pub fn refund(&self, r: &Reservation, units: u64) {
        self.give_back_units(r, units);
    }

    /// [`QuotaEngine::refund`], returning the quota's use afterwards (`None` once the period
    /// has rolled over).
    fn give_back_units(&self, r: &Reservation, units: u64) -> Option<u64> {
        let units = units.min(r.units);
        let mut st = r.cell.lock();
        if st.window.start_ms != r.period_start {
            return None;
        }
        st.spent = st.spent.saturating_sub(units);
        st.lease += units;
        if !st.dirty {
            st.dirty = true;
            self.pending().dirty.push(r.cell.clone());
        }
        Some(st.used())
    }

    /// Corrects a reservation to the `actual` amount (settlement from a response header).
    /// More than reserved is spent without a ceiling: the work was done. Returns the quota's
    /// use after settlement, for the response headers (`None` once the period has rolled over:
    /// the settlement is then ignored).
    pub fn settle(&self, r: &Reservation, actual: u64) -> Option<u64> {
        if actual < r.units {
            return self.give_back_units(r, r.units - actual);
        }
        let extra = actual - r.units;
        let mut st = r.cell.lock();
        if st.window.start_ms != r.period_start {
            return None;
        }
        if extra == 0 {
            return Some(st.used());
        }
        let from_lease = extra.min(st.lease);
        st.lease -= from_lease;
        st.spent += extra;
        // What the lease could not cover is recorded as debt and added to the shared counter
        // at the next flush.
        st.debt += extra - from_lease;
        if !st.dirty {
            st.dirty = true;
            self.pending().dirty.push(r.cell.clone());
        }
        Some(st.used())
    }

    /// The current state of a quota, without spending (headers, usage API).
    pub fn state(&self, tenant: &Arc<str>, metric: &Arc<str>, spec: &QuotaSpec, policy: &Policy) -> QuotaState {
        let now = self.clock.now_millis();
        let cell = self.cell(tenant, metric, spec, policy, now);
        let mut st = cell.lock();
        self.roll(&mut st, spec, policy, now);
        st.snapshot(spec)
    }

    /// Records that warnings up to `level` percent were announced; returns the previous level.
    pub fn mark_warned(&self, r: &Reservation, level: u32) -> u32 {
        let mut st = r.cell.lock();
        let prev = st.warned;
        if level > prev {
            st.warned = level;
        }
        prev
    }

    /// Writes usage, returns old leases, and adds debt to the shared counters. Called every
    /// `flush_interval` by a background task, and at shutdown.
    pub async fn flush(&self) {
        let (give_back, mut persist, dirty, adds) = {
            let mut p = self.pending();
            (
                std::mem::take(&mut p.give_back),
                std::mem::take(&mut p.persist),
                std::mem::take(&mut p.dirty),
                std::mem::take(&mut p.add),
            )
        };
        for (key, units, expire) in adds {
            if self.store.add(&key, units, expire).await.is_err() {
                self.pending().add.push((key, units, expire));
            }
        }
        let mut debts = Vec::new();
        for cell in &dirty {
            let mut st = cell.lock();
            st.dirty = false;
            persist.push((st.key.clone(), st.base + st.spent));
            if st.debt > 0 {
                debts.push((cell.clone(), st.key.clone(), st.debt, expire_at(&st.window)));
            }
        }
        if let Err(e) = self.store.persist_usage(&persist).await {
            tracing::warn!(error = %e, rows = persist.len(), "could not persist quota usage; retrying next flush");
            let mut p = self.pending();
            p.persist.extend(persist);
        }
        for (key, units) in give_back {
            if units > 0 {
                if let Err(e) = self.store.give_back(&key, units).await {
                    // Not retried: the DECRBY may have landed. Units not returned are counted as
                    // used until the period ends — under-admission, never over-admission.
                    tracing::warn!(error = %e, tenant = %key.tenant, metric = %key.metric, units, "could not return unused quota units");
                }
            }
        }
        for (cell, key, debt, expire) in debts {
            match self.store.add(&key, debt, expire).await {
                Ok(total) => {
                    let mut st = cell.lock();
                    if st.key == key {
                        st.debt = st.debt.saturating_sub(debt);
                        st.known_total = total;
                    }
                }
                Err(_) => {
                    // Still failing: keep the debt and look again next flush.
                    let mut st = cell.lock();
                    if !st.dirty {
                        st.dirty = true;
                        self.pending().dirty.push(cell.clone());
                    }
                }
            }
        }
    }

    /// Drops cells idle for long with nothing outstanding; returns leases of idle cells.
    pub fn evict_idle(&self) {
        let now = self.clock.now_millis();
        let mut returns = Vec::new();
        self.cells.retain(|_, cell| {
            let mut st = cell.lock();
            // A cell that announced a warning this period keeps it, so the warning is not repeated.
            let announced = st.warned > 0 && now < st.window.end_ms;
            if now - st.last_used_ms < IDLE_CELL_MS || st.dirty || st.debt > 0 || st.prefetching || announced {
                return true;
            }
            if st.lease > 0 {
                returns.push((st.key.clone(), st.lease));
                st.lease = 0;
            }
            false
        });
        if !returns.is_empty() {
            self.pending().give_back.extend(returns);
        }
    }

    /// Returns every unspent lease and flushes. Called at shutdown.
    pub async fn shutdown(&self) {
        let mut returns = Vec::new();
        let mut dirty = Vec::new();
        for cell in self.cells.iter() {
            let mut st = cell.lock();
            if st.lease > 0 {
                returns.push((st.key.clone(), st.lease));
                st.lease = 0;
            }
            if st.debt > 0 && !st.dirty {
                st.dirty = true;
                dirty.push(cell.value().clone());
            }
        }
        {
            let mut p = self.pending();
            p.give_back.extend(returns);
            p.dirty.extend(dirty);
        }
        self.flush().await;
    }

    pub fn cell_count(&self) -> usize {
        self.cells.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::policy::Period;
    use crate::store::embedded::Embedded;

    fn ms(s: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(s).map(|d| d.timestamp_millis()).expect("time")
    }

    fn policy(anchor: u32, tz: &str) -> Policy {
        Policy { billing_anchor_day: anchor, timezone: tz.parse().expect("tz"), ..Policy::default() }
    }

    fn engine(clock: Arc<ManualClock>) -> (Arc<QuotaEngine>, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("tollgate-quota-{}-{}", std::process::id(), rand::random::<u64>()));
        let path = dir.join("q.db");
        let store = Arc::new(Embedded::open(&path, clock.now_millis()).expect("store"));
        (QuotaEngine::new(store, clock, 1000), path)
    }

    #[tokio::test]
    async fn a_monthly_quota_resets_on_the_anchor_day_in_the_tenant_zone() {
        let clock = ManualClock::new(ms("2027-01-30T12:00:00Z"));
        let (q, _) = engine(clock.clone());
        let (t, m): (Arc<str>, Arc<str>) = ("acme".into(), "requests".into());
        let spec = QuotaSpec { limit: 3, period: Period::Month, hard: true, overage_percent: 0 };
        let p = policy(31, "America/New_York");
        for _ in 0..3 {
            q.reserve(&t, &m, &spec, &p, 1, StorePolicy::Local).await.expect("within the quota");
        }
        let err = q.reserve(&t, &m, &spec, &p, 1, StorePolicy::Local).await.err();
        let Some(QuotaError::Exceeded(state)) = err else { panic!("expected exceeded") };
        // Anchor 31 in New York: the period ends at local midnight starting 31 Jan (05:00 UTC).
        assert_eq!(state.reset_ms, ms("2027-01-31T05:00:00Z"));
        clock.set_millis(ms("2027-01-31T04:59:59Z"));
        assert!(q.reserve(&t, &m, &spec, &p, 1, StorePolicy::Local).await.is_err(), "still January's period");
        clock.set_millis(ms("2027-01-31T05:00:00Z"));
        let (_, state) = q.reserve(&t, &m, &spec, &p, 1, StorePolicy::Local).await.expect("a new period");
        assert_eq!((state.used, state.remaining), (1, 2));
        // February has no 31st: the next period starts on the 28th.
        assert_eq!(state.reset_ms, ms("2027-02-28T05:00:00Z"));
    }

    #[tokio::test]
    async fn refunds_and_settlement_adjust_usage_and_survive_a_reopen() {
        let clock = ManualClock::new(ms("2027-03-10T10:00:00Z"));
        let (q, path) = engine(clock.clone());
        let (t, m): (Arc<str>, Arc<str>) = ("acme".into(), "records".into());
        let spec = QuotaSpec { limit: 100, period: Period::Day, hard: true, overage_percent: 0 };
        let p = policy(1, "UTC");
        let (r, _) = q.reserve(&t, &m, &spec, &p, 40, StorePolicy::Local).await.expect("reserve");
        q.settle(&r, 10);
        let (r2, _) = q.reserve(&t, &m, &spec, &p, 20, StorePolicy::Local).await.expect("reserve");
        q.refund(&r2, 20);
        assert_eq!(q.state(&t, &m, &spec, &p).used, 10);
        q.shutdown().await;
        let store = Arc::new(Embedded::open(&path, clock.now_millis()).expect("reopen"));
        let q2 = QuotaEngine::new(store, clock.clone(), 1000);
        assert_eq!(q2.state(&t, &m, &spec, &p).used, 10, "usage persisted at shutdown");
        let (_, s) = q2.reserve(&t, &m, &spec, &p, 90, StorePolicy::Local).await.expect("the rest");
        assert_eq!(s.remaining, 0);
        assert!(q2.reserve(&t, &m, &spec, &p, 1, StorePolicy::Local).await.is_err());
        // The next local day starts over.
        clock.advance_millis(86_400_000);
        assert!(q2.reserve(&t, &m, &spec, &p, 1, StorePolicy::Local).await.is_ok());
    }

    #[test]
    fn lease_blocks_shrink_to_exact_grants_near_the_limit() {
        assert_eq!(block_size(1_000_000, 1000), 1000);
        assert_eq!(block_size(320, 1000), 10);
        assert_eq!(block_size(63, 1000), 0);
        assert_eq!(block_size(0, 1000), 0);
    }
}
