//! Quotas: calendar-period counters per tenant and metric, spent from a local lease.
//!
//! An instance takes a block of units from the shared counter ([`Counters::lease`]) and spends
//! it in memory, so the hot path rarely touches the store. The block adapts to what is left and
//! to the fleet: `remaining / (32 × live instances)`, at most `max_lease_block`, and when that
//! falls below 2 the instance keeps no lease and asks for exactly what each request costs. A
//! grant is all or nothing for what the request needs, so the sum of grants never exceeds the
//! limit and a refused request holds nothing.
//!
//! Per counter, one store call runs at a time: requests that need units while a call is out
//! wait for it (bounded by `lease_timeout`) instead of each taking a block. The next block is
//! fetched in the background before the current one runs out. A lease unused for `lease_idle`
//! goes back to the store, and a lease whose renewal failed stops being spent before its record
//! in the store expires (`lease_ttl`), so the store can hand it to the others.
//!
//! A request refused anywhere (a later quota, concurrency) gets its units back in the lease:
//! rejections consume nothing. Once usage reaches a hard quota's ceiling (settlement can take it
//! there), the next request is refused without asking the store.
//!
//! When the store fails, the policy decides: `closed` refuses; `open` admits and records the
//! spend as debt; `local` admits from the lease it holds plus an allowance of
//! `(ceiling − counter at last contact) / live instances`, never more. Debt is added to the
//! shared counter once the store answers again. `docs/limits.md` states the bounds.

use super::period::{window, Window};
use crate::clock::SharedClock;
use crate::policy::{Policy, QuotaSpec, StorePolicy};
use crate::store::{CounterKey, Counters, LeaseRequest, StoreError};
use dashmap::DashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// How long a counter is kept in the shared store after its period ends (for reports).
const KEEP_AFTER_PERIOD_MS: i64 = 7 * 86_400_000;
/// A cell unused this long, with nothing outstanding, is dropped from memory.
const IDLE_CELL_MS: i64 = 10 * 60_000;
/// After a failed store call, requests follow the failure policy this long before the next
/// call is tried (one call per counter, not one per request, while the store is down).
const RETRY_AFTER_FAILURE_MS: i64 = 500;
/// A counter seen at its ceiling is not asked again for this long (a tenant hammering an
/// exhausted quota costs one store call a second per instance, not one per request).
const EXHAUSTED_RECHECK_MS: i64 = 1_000;

/// How quotas lease from the store.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// Largest block an instance takes at once.
    pub max_block: u64,
    /// This process in the store: `<instance_id>-<start id>`.
    pub holder: Arc<str>,
    /// How long a lease record lives in the store without a call from its holder.
    pub ttl: Duration,
    /// A lease unused this long goes back to the store.
    pub idle: Duration,
    /// How long requests wait for a lease call before the failure policy applies.
    pub wait: Duration,
}

impl LeaseSettings {
    /// Settings for one process with default timings (tools, tests, benches).
    pub fn local(max_block: u64) -> LeaseSettings {
        LeaseSettings {
            max_block,
            holder: "local".into(),
            ttl: Duration::from_secs(10),
            idle: Duration::from_secs(5),
            wait: Duration::from_secs(1),
        }
    }
}

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
    /// This cell's holder name in the store: the process's, plus a number of its own, so a
    /// cell recreated for the same counter (a new period on the same start, an evicted cell)
    /// is a new holder and never restarts another holder's cumulative figures.
    holder: Arc<str>,
    /// Which incarnation of the cell this is (part of `holder`); a call of an earlier one
    /// does not touch this one's flags.
    gen: u64,
    /// The earlier incarnation's final report, waiting for its call still out.
    retiring: Option<Retire>,
    /// Units the store granted this holder this period, cumulative.
    granted: u64,
    /// Units this holder handed back this period, cumulative.
    returned: u64,
    /// The shared counter at last contact: units granted to all instances, plus debt added.
    known_total: u64,
    /// Spent while the store was failing; added to the shared counter later.
    debt: u64,
    /// Part of `debt` a call is carrying right now (not to be refunded as debt).
    debt_in_flight: u64,
    /// What the store's record says this holder holds (its report at the last successful
    /// call): while above 0 the record must be renewed, or the store would reclaim units
    /// that were spent.
    reported_held: u64,
    /// A store call for this cell is out; other requests wait for it.
    busy: bool,
    /// Units the requests waiting for that call need: the next call asks for them too, so a
    /// burst costs a few round trips, not one per request.
    queued: u64,
    /// The lease may be spent until then (its record in the store lives a little longer).
    valid_until_ms: i64,
    /// Last successful store call.
    synced_ms: i64,
    /// After a failed call, no new call before this: requests follow the failure policy.
    retry_at_ms: i64,
    /// Under `local`, while the store fails: units this instance may still admit alone.
    allowance: Option<u64>,
    dirty: bool,
    last_used_ms: i64,
    /// Highest warning threshold (percent) already announced this period.
    pub warned: u32,
}

impl CellState {
    /// Units used as far as this instance can tell: everything granted fleet-wide (other
    /// instances' unspent leases included) and debt, less this instance's unspent lease.
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
    /// Woken when a store call for this cell finishes.
    done: tokio::sync::Notify,
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

/// The final report of a lease on a counter whose period ended (or whose cell was dropped):
/// everything still held goes back.
#[derive(Debug, Clone)]
struct Retire {
    key: CounterKey,
    holder: Arc<str>,
    granted: u64,
    returned: u64,
    expire: i64,
}

#[derive(Default)]
struct Pending {
    retire: Vec<Retire>,
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
    settings: LeaseSettings,
    /// Instances alive in the fleet (the store's heartbeat registry; 1 on a single node).
    live: AtomicU32,
    /// Numbers cell incarnations.
    generations: AtomicU64,
    /// Signalled when usage was settled above what a lease covered: the flush task sends it
    /// at once, so other instances see it at their next lease call.
    urgent: tokio::sync::Notify,
    pending: Mutex<Pending>,
}

/// The lease block for what is left: large far from the limit, 0 (exact grants) near it.
/// Each of `live` instances may hold one, so together they hold at most `remaining / 32`.
pub fn block_size(remaining: u64, max_block: u64, live: u32) -> u64 {
    let b = remaining / (32 * live.max(1) as u64);
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

/// Clears a cell's `busy` flag (if the cell is still the incarnation that set it) and wakes
/// its waiters when dropped.
struct Busy<'a>(&'a Arc<Cell>, u64);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        {
            let mut st = self.0.lock();
            if st.gen == self.1 {
                st.busy = false;
            }
        }
        self.0.done.notify_waiters();
    }
}

/// A request waiting for another's call: its units are in `queued` until it stops waiting,
/// however that happens (a dropped request included).
struct Queued<'a>(&'a Arc<Cell>, u64, u64);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        if st.gen == self.2 {
            st.queued = st.queued.saturating_sub(self.1);
        }
    }
}

/// What a store call for a cell carries, taken under the cell's lock.
struct Call {
    key: CounterKey,
    holder: Arc<str>,
    gen: u64,
    granted: u64,
    returned: u64,
    held: u64,
    add: u64,
    need: u64,
    want: u64,
    limit: u64,
    expire: i64,
}

impl QuotaEngine {
    pub fn new(store: Arc<dyn Counters>, clock: SharedClock, settings: LeaseSettings) -> Arc<QuotaEngine> {
        Arc::new(QuotaEngine {
            store,
            clock,
            cells: DashMap::default(),
            settings: LeaseSettings { max_block: settings.max_block.max(1), ..settings },
            live: AtomicU32::new(1),
            generations: AtomicU64::new(0),
            urgent: tokio::sync::Notify::new(),
            pending: Mutex::new(Pending::default()),
        })
    }

    /// Records how many instances the fleet registry counts.
    pub fn set_live_instances(&self, n: u32) {
        self.live.store(n.max(1), Ordering::Relaxed);
    }

    pub fn live_instances(&self) -> u32 {
        self.live.load(Ordering::Relaxed).max(1)
    }

    pub fn holder(&self) -> &Arc<str> {
        &self.settings.holder
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ttl_ms(&self) -> i64 {
        self.settings.ttl.as_millis() as i64
    }

    fn cell(&self, tenant: &Arc<str>, metric: &Arc<str>, spec: &QuotaSpec, policy: &Policy, now: i64) -> Arc<Cell> {
        let id = (tenant.clone(), metric.clone());
        if let Some(c) = self.cells.get(&id) {
            return c.clone();
        }
        let w = window(spec.period, now, policy.timezone, policy.billing_anchor_day);
        let cell = Arc::new(Cell {
            st: Mutex::new(self.fresh(tenant.clone(), metric.clone(), w, spec.period, now)),
            done: tokio::sync::Notify::new(),
        });
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
        let gen = self.generations.fetch_add(1, Ordering::Relaxed);
        CellState {
            key,
            holder: format!("{}:{gen}", self.settings.holder).into(),
            gen,
            retiring: None,
            window: w,
            period,
            base,
            spent: 0,
            lease: 0,
            granted: 0,
            returned: 0,
            known_total: base,
            debt: 0,
            debt_in_flight: 0,
            reported_held: 0,
            busy: false,
            queued: 0,
            valid_until_ms: 0,
            synced_ms: 0,
            retry_at_ms: 0,
            allowance: None,
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
        let retire = Retire {
            key: st.key.clone(),
            holder: st.holder.clone(),
            granted: st.granted,
            returned: st.returned + st.lease,
            expire: expire_at(&st.window),
        };
        // A call of this incarnation still out sends the final report itself once it knows
        // what it was granted; otherwise it is sent by the next flush.
        let (busy, retiring) = (st.busy, st.granted > 0 || st.busy);
        {
            let mut p = self.pending();
            if retiring && !busy {
                p.retire.push(retire.clone());
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
        if busy {
            st.retiring = Some(retire);
        }
    }

    /// A lease whose renewal has not come through in time is no longer spent: the store may
    /// already have handed it to another instance. It counts as handed back.
    fn expire_lease(&self, st: &mut CellState, now: i64) {
        if st.lease > 0 && now >= st.valid_until_ms {
            st.returned += st.lease;
            st.known_total = st.known_total.saturating_sub(st.lease);
            st.lease = 0;
        }
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

    fn call_for(&self, st: &mut CellState, need: u64, want: u64, limit: u64) -> Call {
        st.debt_in_flight = st.debt;
        Call {
            key: st.key.clone(),
            holder: st.holder.clone(),
            gen: st.gen,
            granted: st.granted,
            returned: st.returned,
            held: st.lease,
            // Debt travels with the next call, before anything is granted: after an outage
            // the counter learns what was admitted without it first.
            add: st.debt,
            need,
            want,
            limit,
            expire: expire_at(&st.window),
        }
    }

    /// Runs one store call for a cell whose `busy` flag the caller set, and records its answer.
    /// Answers the units granted, or `None` when the cell moved on to another incarnation
    /// (a new period) while the call was out.
    async fn call(&self, cell: &Arc<Cell>, call: Call) -> Result<Option<u64>, StoreError> {
        // Frees the cell however this ends, including when the future is dropped mid-call (a
        // request that timed out or went away): waiters then go on instead of waiting for an
        // answer nobody will record.
        let _busy = Busy(cell, call.gen);
        let started = self.clock.now_millis();
        let result = self
            .store
            .lease(&LeaseRequest {
                key: &call.key,
                holder: &call.holder,
                granted: call.granted,
                returned: call.returned,
                held: call.held,
                add: call.add,
                need: call.need,
                want: call.want,
                limit: call.limit,
                expire_at_ms: call.expire,
                ttl_ms: self.ttl_ms(),
                now_ms: started,
            })
            .await;
        let now = self.clock.now_millis();
        let mut st = cell.lock();
        if st.gen != call.gen {
            // The period ended while the call was out: the earlier incarnation's final report
            // hands back everything it held, this grant included.
            if let Some(mut r) = st.retiring.take().filter(|r| r.holder == call.holder) {
                if let Ok(grant) = &result {
                    r.granted += grant.granted;
                    r.returned += grant.granted;
                }
                self.pending().retire.push(r);
            }
            return result.map(|_| None);
        }
        st.debt_in_flight = 0;
        match result {
            Ok(grant) => {
                st.debt = st.debt.saturating_sub(call.add);
                st.granted += grant.granted;
                st.lease += grant.granted;
                st.reported_held = call.held + grant.granted;
                st.known_total = grant.total;
                st.synced_ms = now;
                // Spend the lease only while its record surely lives in the store: the record
                // expires `ttl` after the store saw the call, which was after `started`.
                st.valid_until_ms = started + self.ttl_ms() * 4 / 5;
                st.retry_at_ms = 0;
                st.allowance = None;
                Ok(Some(grant.granted))
            }
            Err(e) => {
                st.retry_at_ms = now + RETRY_AFTER_FAILURE_MS;
                Err(e)
            }
        }
    }

    /// The state of a hard quota that is used up, else `None`. A reservation of 0 units always
    /// succeeds; a request whose charge is estimated at 0 and settled from the answer asks this
    /// first, so a used-up quota refuses it as it would a request with a cost.
    pub fn used_up(
        &self,
        tenant: &Arc<str>,
        metric: &Arc<str>,
        spec: &QuotaSpec,
        policy: &Policy,
    ) -> Option<QuotaState> {
        if !spec.hard {
            return None;
        }
        let now = self.clock.now_millis();
        let cell = self.cell(tenant, metric, spec, policy, now);
        let mut st = cell.lock();
        self.roll(&mut st, spec, policy, now);
        self.expire_lease(&mut st, now);
        self.exhausted(&st, spec.ceiling(), now).then(|| st.snapshot(spec))
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
        let cell = self.cell(tenant, metric, spec, policy, self.clock.now_millis());
        let ceiling = if spec.hard { spec.ceiling() } else { u64::MAX };
        let deadline = tokio::time::Instant::now() + self.settings.wait;
        loop {
            let now = self.clock.now_millis();
            // Decided under the lock; anything that waits happens after it is released.
            let step = {
                let mut st = cell.lock();
                self.roll(&mut st, spec, policy, now);
                self.expire_lease(&mut st, now);
                if cost > 0 && self.exhausted(&st, ceiling, now) {
                    return Err(QuotaError::Exceeded(st.snapshot(spec)));
                }
                if st.lease >= cost {
                    self.take(&cell, &mut st, cost, now);
                    self.maybe_prefetch(&cell, &mut st, spec, ceiling, cost);
                    return Ok(self.reservation(&cell, &st, spec, cost, metric));
                }
                if now < st.retry_at_ms {
                    return self.fallback(&cell, &mut st, spec, cost, ceiling, on_error, metric, now);
                }
                if st.busy {
                    st.queued += cost;
                    None
                } else {
                    st.busy = true;
                    let remaining = ceiling.min(spec.limit).saturating_sub(st.used());
                    let need = cost - st.lease;
                    let want = need + st.queued + block_size(remaining, self.block_cap(cost), self.live_instances());
                    Some(self.call_for(&mut st, need, want, ceiling))
                }
            };
            let Some(call) = step else {
                // Another request's call is out: its answer is ours too. `enable` registers
                // before the flag is looked at again, so a wake-up in between is not missed.
                let gen = cell.lock().gen;
                let queued = Queued(&cell, cost, gen);
                let notified = cell.done.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let still_busy = cell.lock().busy;
                let timed_out = still_busy && tokio::time::timeout_at(deadline, notified).await.is_err();
                drop(queued);
                let mut st = cell.lock();
                if timed_out {
                    return self.fallback(&cell, &mut st, spec, cost, ceiling, on_error, metric, now);
                }
                continue;
            };
            let need = call.need;
            match tokio::time::timeout_at(deadline, self.call(&cell, call)).await {
                // A new period began meanwhile: look again.
                Ok(Ok(None)) => {}
                Ok(Ok(Some(granted))) => {
                    if granted == 0 && need > 0 {
                        let st = cell.lock();
                        if st.lease < cost {
                            return Err(QuotaError::Exceeded(st.snapshot(spec)));
                        }
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, tenant = %tenant, metric = %metric, "quota store call failed");
                    let mut st = cell.lock();
                    return self.fallback(&cell, &mut st, spec, cost, ceiling, on_error, metric, now);
                }
                Err(_) => {
                    // Too late for this request; the call was dropped with it (which freed the
                    // cell for the next one).
                    let mut st = cell.lock();
                    st.retry_at_ms = now + RETRY_AFTER_FAILURE_MS;
                    return self.fallback(&cell, &mut st, spec, cost, ceiling, on_error, metric, now);
                }
            }
        }
    }

    /// A hard quota at its ceiling: by this instance's own spending (settlement can take it
    /// there), or by the counter as the store showed it within the last second. Past that
    /// second the store is asked again, since other instances may have handed units back.
    fn exhausted(&self, st: &CellState, ceiling: u64, now: i64) -> bool {
        st.base + st.spent >= ceiling || (st.used() >= ceiling && now - st.synced_ms < EXHAUSTED_RECHECK_MS)
    }

    fn reservation(
        &self,
        cell: &Arc<Cell>,
        st: &CellState,
        spec: &QuotaSpec,
        cost: u64,
        metric: &Arc<str>,
    ) -> (Reservation, QuotaState) {
        (
            Reservation { cell: cell.clone(), period_start: st.window.start_ms, units: cost, metric: metric.clone() },
            st.snapshot(spec),
        )
    }

    /// The failure policy, for a request the store cannot serve now.
    #[allow(clippy::too_many_arguments)]
    fn fallback(
        &self,
        cell: &Arc<Cell>,
        st: &mut CellState,
        spec: &QuotaSpec,
        cost: u64,
        ceiling: u64,
        on_error: StorePolicy,
        metric: &Arc<str>,
        now: i64,
    ) -> Result<(Reservation, QuotaState), QuotaError> {
        match on_error {
            StorePolicy::Closed => return Err(QuotaError::StoreUnavailable { retry_after: Duration::from_secs(1) }),
            StorePolicy::Open => {}
            StorePolicy::Local => {
                if st.used() + cost > ceiling {
                    return Err(QuotaError::Exceeded(st.snapshot(spec)));
                }
                if spec.hard {
                    // This instance's share of what was left at its last contact.
                    let live = self.live_instances() as u64;
                    let allowance = st.allowance.get_or_insert_with(|| ceiling.saturating_sub(st.known_total) / live);
                    if *allowance < cost {
                        return Err(QuotaError::Exceeded(st.snapshot(spec)));
                    }
                    *allowance -= cost;
                }
            }
        }
        st.debt += cost;
        st.lease += cost;
        self.take(cell, st, cost, now);
        Ok(self.reservation(cell, st, spec, cost, metric))
    }

    /// The largest block for requests costing `cost`: `max_lease_block`, but at least 16
    /// requests' worth, so costly requests do not refill every few requests. Blocks stay at
    /// most `remaining / (32 × live)`, which keeps grants exact near the limit.
    fn block_cap(&self, cost: u64) -> u64 {
        self.settings.max_block.max(cost.saturating_mul(16))
    }

    fn maybe_prefetch(
        self: &Arc<Self>,
        cell: &Arc<Cell>,
        st: &mut CellState,
        spec: &QuotaSpec,
        ceiling: u64,
        cost: u64,
    ) {
        let remaining = ceiling.min(spec.limit).saturating_sub(st.used());
        let block = block_size(remaining, self.block_cap(cost), self.live_instances());
        if st.busy || block == 0 || st.lease >= block / 2 || st.last_used_ms < st.retry_at_ms {
            return;
        }
        st.busy = true;
        let call = self.call_for(st, 0, block, ceiling);
        let (engine, cell) = (self.clone(), cell.clone());
        tokio::spawn(async move {
            let _ = engine.call(&cell, call).await;
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
        let now = self.clock.now_millis();
        let mut st = r.cell.lock();
        if st.window.start_ms != r.period_start {
            return None;
        }
        self.expire_lease(&mut st, now);
        st.spent = st.spent.saturating_sub(units);
        // Units admitted as debt go back as debt (except what a call is carrying to the store
        // right now); the rest back into the lease, where the next request spends them.
        let from_debt = units.min(st.debt.saturating_sub(st.debt_in_flight));
        st.debt -= from_debt;
        st.lease += units - from_debt;
        if let Some(a) = st.allowance.as_mut() {
            *a += from_debt;
        }
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
        let now = self.clock.now_millis();
        let mut st = r.cell.lock();
        if st.window.start_ms != r.period_start {
            return None;
        }
        // An expired lease is the store's again: the extra cannot come out of it.
        self.expire_lease(&mut st, now);
        if extra == 0 {
            return Some(st.used());
        }
        let from_lease = extra.min(st.lease);
        st.lease -= from_lease;
        st.spent += extra;
        // What the lease could not cover is recorded as debt and sent to the shared counter by
        // a flush right away.
        st.debt += extra - from_lease;
        if extra > from_lease {
            self.urgent.notify_one();
        }
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

    /// Units this process spent on a quota this period (0 for a quota it has not seen).
    pub fn spent(&self, tenant: &Arc<str>, metric: &Arc<str>) -> u64 {
        self.cells
            .get(&(tenant.clone(), metric.clone()))
            .map(|c| {
                let st = c.lock();
                st.base + st.spent
            })
            .unwrap_or(0)
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

    /// Resolves when usage settled above a lease is waiting to be sent (the flush task then
    /// flushes at once instead of at its next tick).
    pub async fn wait_urgent(&self) {
        self.urgent.notified().await
    }

    /// Writes usage, reports leases (renewing those in use, handing back idle ones and those
    /// of ended periods), and adds debt to the shared counters. Called every `flush_interval`
    /// by a background task, and at shutdown.
    pub async fn flush(&self) {
        self.flush_at(false).await
    }

    async fn flush_at(&self, closing: bool) {
        let (retire, mut persist, dirty, adds) = {
            let mut p = self.pending();
            (
                std::mem::take(&mut p.retire),
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
        for cell in &dirty {
            let mut st = cell.lock();
            st.dirty = false;
            persist.push((st.key.clone(), st.base + st.spent));
        }
        if let Err(e) = self.store.persist_usage(&persist).await {
            tracing::warn!(error = %e, rows = persist.len(), "could not persist quota usage; retrying next flush");
            let mut p = self.pending();
            p.persist.extend(persist);
        }
        for r in retire {
            let req = LeaseRequest {
                key: &r.key,
                holder: &r.holder,
                granted: r.granted,
                returned: r.returned,
                held: 0,
                add: 0,
                need: 0,
                want: 0,
                limit: 0,
                expire_at_ms: r.expire,
                ttl_ms: self.ttl_ms(),
                now_ms: self.clock.now_millis(),
            };
            if let Err(e) = self.store.lease(&req).await {
                // Reports are cumulative, so repeating this one later is safe.
                tracing::debug!(error = %e, tenant = %r.key.tenant, metric = %r.key.metric, "could not return a lease; retrying next flush");
                self.pending().retire.push(r);
            }
        }
        self.report_leases(closing).await;
    }

    /// Adds debt to the counters, renews leases in use before their records expire, and
    /// hands back idle ones (all of them when `closing`).
    async fn report_leases(&self, closing: bool) {
        use futures_util::StreamExt;
        let now = self.clock.now_millis();
        let (idle_ms, renew_ms) = (self.settings.idle.as_millis() as i64, self.ttl_ms() / 3);
        let due = |st: &CellState| {
            // The store's record must be renewed while it says this holder holds units, even
            // after they were all spent: an expired record gives its units back.
            let holding = st.lease > 0 || st.reported_held > 0;
            !st.busy
                && (st.debt > 0
                    || (st.lease > 0 && (closing || now - st.last_used_ms >= idle_ms))
                    || (holding && (closing || now - st.synced_ms >= renew_ms)))
        };
        let cells: Vec<Arc<Cell>> =
            self.cells.iter().filter(|e| due(&e.value().lock())).map(|e| e.value().clone()).collect();
        // Each cell is marked busy only just before its own call, so requests are not held
        // up by calls queued behind it; a few run at once.
        futures_util::stream::iter(cells)
            .for_each_concurrent(32, |cell| async move {
                let call = {
                    let mut st = cell.lock();
                    if !due(&st) {
                        return;
                    }
                    if st.lease > 0 && (closing || now - st.last_used_ms >= idle_ms) {
                        // Idle: hand it all back so other instances can use it.
                        st.returned += st.lease;
                        st.known_total = st.known_total.saturating_sub(st.lease);
                        st.lease = 0;
                    }
                    st.busy = true;
                    self.call_for(&mut st, 0, 0, 0)
                };
                if let Err(e) = self.call(&cell, call).await {
                    tracing::debug!(error = %e, "could not report a quota lease; retrying next flush");
                }
            })
            .await;
    }

    /// Drops cells idle for long with nothing outstanding.
    pub fn evict_idle(&self) {
        let now = self.clock.now_millis();
        let mut retire = Vec::new();
        self.cells.retain(|_, cell| {
            let mut st = cell.lock();
            // A cell that announced a warning this period keeps it, so the warning is not repeated.
            let announced = st.warned > 0 && now < st.window.end_ms;
            // A cell a request still holds is kept: dropping it would let a new incarnation
            // and this one run calls for the same counter side by side.
            let referenced = Arc::strong_count(cell) > 1;
            if now - st.last_used_ms < IDLE_CELL_MS
                || st.dirty
                || st.debt > 0
                || st.busy
                || st.reported_held > 0
                || referenced
                || announced
            {
                return true;
            }
            if st.lease > 0 {
                retire.push(Retire {
                    key: st.key.clone(),
                    holder: st.holder.clone(),
                    granted: st.granted,
                    returned: st.returned + st.lease,
                    expire: expire_at(&st.window),
                });
                st.lease = 0;
            }
            false
        });
        if !retire.is_empty() {
            self.pending().retire.extend(retire);
        }
    }

    /// Returns every unspent lease and flushes. Called at shutdown.
    pub async fn shutdown(&self) {
        // Calls still out (a prefetch) finish first, so their cells' reports are not skipped.
        let deadline = tokio::time::Instant::now() + self.settings.wait;
        while self.cells.iter().any(|c| c.value().lock().busy) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut dirty = Vec::new();
        for cell in self.cells.iter() {
            let mut st = cell.lock();
            if st.debt > 0 && !st.dirty {
                st.dirty = true;
                dirty.push(cell.value().clone());
            }
        }
        self.pending().dirty.extend(dirty);
        self.flush_at(true).await;
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
    use crate::store::{CounterKey, LeaseRequest};

    fn ms(s: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(s).map(|d| d.timestamp_millis()).expect("time")
    }

    fn policy(anchor: u32, tz: &str) -> Policy {
        Policy { billing_anchor_day: anchor, timezone: tz.parse().expect("tz"), ..Policy::default() }
    }

    /// A fresh SQLite file for one test.
    fn db_path() -> std::path::PathBuf {
        std::env::temp_dir()
            .join(format!("tollgate-quota-{}-{}", std::process::id(), rand::random::<u64>()))
            .join("q.db")
    }

    fn embedded(clock: &Arc<ManualClock>) -> Embedded {
        Embedded::open(&db_path(), clock.now_millis()).expect("store")
    }

    fn engine(clock: Arc<ManualClock>) -> (Arc<QuotaEngine>, std::path::PathBuf) {
        let path = db_path();
        let store = Arc::new(Embedded::open(&path, clock.now_millis()).expect("store"));
        (QuotaEngine::new(store, clock, LeaseSettings::local(1000)), path)
    }

    /// Two instances, `a` and `b`, sharing one store.
    fn two_instances(clock: &Arc<ManualClock>) -> (Arc<QuotaEngine>, Arc<QuotaEngine>) {
        let store = Arc::new(embedded(clock));
        let engine = |name: &str| {
            QuotaEngine::new(
                store.clone(),
                clock.clone(),
                LeaseSettings { holder: name.into(), ..LeaseSettings::local(1000) },
            )
        };
        (engine("a"), engine("b"))
    }

    /// The real embedded store, failing (`down`) or hanging (`hang`) on demand.
    fn flaky(clock: &Arc<ManualClock>, hang: bool) -> (Arc<Flaky>, Arc<QuotaEngine>) {
        let store = Arc::new(Flaky { inner: embedded(clock), down: false.into(), hang: hang.into() });
        let q = QuotaEngine::new(store.clone(), clock.clone(), LeaseSettings::local(1000));
        (store, q)
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
        let q2 = QuotaEngine::new(store, clock.clone(), LeaseSettings::local(1000));
        assert_eq!(q2.state(&t, &m, &spec, &p).used, 10, "usage persisted at shutdown");
        let (_, s) = q2.reserve(&t, &m, &spec, &p, 90, StorePolicy::Local).await.expect("the rest");
        assert_eq!(s.remaining, 0);
        assert!(q2.reserve(&t, &m, &spec, &p, 1, StorePolicy::Local).await.is_err());
        // The next local day starts over.
        clock.advance_millis(86_400_000);
        assert!(q2.reserve(&t, &m, &spec, &p, 1, StorePolicy::Local).await.is_ok());
    }

    #[tokio::test]
    async fn a_hard_quota_settled_past_its_limit_refuses_the_next_request() {
        let clock = ManualClock::new(ms("2027-03-10T10:00:00Z"));
        let (q, _) = engine(clock.clone());
        let (t, m): (Arc<str>, Arc<str>) = ("acme".into(), "tokens".into());
        let spec = QuotaSpec { limit: 50, period: Period::Day, hard: true, overage_percent: 0 };
        let p = policy(1, "UTC");
        let (r, _) = q.reserve(&t, &m, &spec, &p, 1, StorePolicy::Local).await.expect("first request");
        // The response says it cost 60: the work was done, so it is charged.
        assert_eq!(q.settle(&r, 60), Some(60));
        clock.advance_millis(44);
        let err = q.reserve(&t, &m, &spec, &p, 1, StorePolicy::Local).await.err();
        let Some(QuotaError::Exceeded(state)) = err else { panic!("expected a refusal, got {err:?}") };
        assert_eq!((state.used, state.remaining), (60, 0));
        // Still refused a second later, after the debt reached the counter.
        q.flush().await;
        clock.advance_millis(1_000);
        assert!(q.reserve(&t, &m, &spec, &p, 1, StorePolicy::Local).await.is_err());
    }

    /// A settlement past a hard limit on one instance reaches the store at once (the flush
    /// task is woken), so the other instance's next request is refused.
    #[tokio::test]
    async fn a_settlement_past_the_limit_reaches_the_other_instances_at_once() {
        let clock = ManualClock::new(ms("2027-03-10T10:00:00Z"));
        let (a, b) = two_instances(&clock);
        let (t, m): (Arc<str>, Arc<str>) = ("acme".into(), "tokens".into());
        let spec = QuotaSpec { limit: 50, period: Period::Day, hard: true, overage_percent: 0 };
        let p = policy(1, "UTC");
        let (r, _) = a.reserve(&t, &m, &spec, &p, 1, StorePolicy::Closed).await.expect("first request");
        a.settle(&r, 60);
        tokio::time::timeout(Duration::from_millis(100), a.wait_urgent()).await.expect("the flush task is woken");
        a.flush().await;
        let err = b.reserve(&t, &m, &spec, &p, 1, StorePolicy::Closed).await.err();
        assert!(matches!(err, Some(QuotaError::Exceeded(_))), "the other instance refuses: {err:?}");
    }

    #[tokio::test]
    async fn a_refused_reservation_holds_nothing() {
        let clock = ManualClock::new(ms("2027-03-10T10:00:00Z"));
        let (q, _) = engine(clock.clone());
        let (t, m): (Arc<str>, Arc<str>) = ("acme".into(), "records".into());
        let spec = QuotaSpec { limit: 60, period: Period::Day, hard: true, overage_percent: 0 };
        let p = policy(1, "UTC");
        q.reserve(&t, &m, &spec, &p, 34, StorePolicy::Local).await.expect("34 of 60");
        assert!(q.reserve(&t, &m, &spec, &p, 40, StorePolicy::Local).await.is_err(), "40 does not fit");
        for cost in [5, 5, 1] {
            q.reserve(&t, &m, &spec, &p, cost, StorePolicy::Local).await.expect("what fits is admitted at once");
        }
        let state = q.state(&t, &m, &spec, &p);
        assert_eq!((state.used, state.remaining), (45, 15), "the refused 40 left no trace");
    }

    #[tokio::test]
    async fn an_idle_lease_goes_back_within_lease_idle() {
        let clock = ManualClock::new(ms("2027-03-10T10:00:00Z"));
        let store = Arc::new(embedded(&clock));
        let q = QuotaEngine::new(store.clone(), clock.clone(), LeaseSettings::local(1000));
        let (t, m): (Arc<str>, Arc<str>) = ("acme".into(), "requests".into());
        let spec = QuotaSpec { limit: 1_000_000, period: Period::Month, hard: true, overage_percent: 0 };
        let p = policy(1, "UTC");
        q.reserve(&t, &m, &spec, &p, 1, StorePolicy::Local).await.expect("reserve");
        let key = CounterKey {
            tenant: t.clone(),
            metric: m.clone(),
            period_start: q.state(&t, &m, &spec, &p).period_start_ms,
        };
        assert!(store.get(&key).await.expect("get") > 1, "a block is leased");
        clock.advance_millis(4_000);
        q.flush().await;
        assert!(store.get(&key).await.expect("get") > 1, "still in use after 4 s");
        clock.advance_millis(1_000);
        q.flush().await;
        assert_eq!(store.get(&key).await.expect("get"), 1, "idle for 5 s: only what was spent stays");
    }

    /// The real embedded store, made to fail on demand (a store outage in a unit test).
    struct Flaky {
        inner: Embedded,
        down: std::sync::atomic::AtomicBool,
        /// Calls never answer (a hung store).
        hang: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl Counters for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }
        async fn lease(&self, req: &LeaseRequest<'_>) -> Result<crate::store::Grant, StoreError> {
            if self.hang.load(std::sync::atomic::Ordering::Relaxed) {
                std::future::pending::<()>().await;
            }
            if self.down.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(StoreError::Timeout);
            }
            self.inner.lease(req).await
        }
        async fn add(&self, key: &CounterKey, units: u64, exp: i64) -> Result<u64, StoreError> {
            if self.down.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(StoreError::Timeout);
            }
            self.inner.add(key, units, exp).await
        }
        async fn get(&self, key: &CounterKey) -> Result<u64, StoreError> {
            self.inner.get(key).await
        }
        async fn window_add(&self, t: &str, n: &str, w: u64, now: i64, k: i64) -> Result<(u64, u64), StoreError> {
            self.inner.window_add(t, n, w, now, k).await
        }
        async fn slot_acquire(&self, t: &str, s: &str, l: u32, now: i64, ttl: i64) -> Result<bool, StoreError> {
            self.inner.slot_acquire(t, s, l, now, ttl).await
        }
        async fn slot_release(&self, t: &str, s: &str) -> Result<(), StoreError> {
            self.inner.slot_release(t, s).await
        }
        async fn slot_heartbeat(&self, t: &str, s: &[String], now: i64, ttl: i64) -> Result<(), StoreError> {
            self.inner.slot_heartbeat(t, s, now, ttl).await
        }
    }

    #[tokio::test]
    async fn local_admits_only_its_share_of_what_was_left_while_the_store_fails() {
        let clock = ManualClock::new(ms("2027-03-10T10:00:00Z"));
        let (store, q) = flaky(&clock, false);
        q.set_live_instances(3);
        let (t, m): (Arc<str>, Arc<str>) = ("acme".into(), "requests".into());
        let spec = QuotaSpec { limit: 300, period: Period::Month, hard: true, overage_percent: 0 };
        let p = policy(1, "UTC");
        for _ in 0..60 {
            q.reserve(&t, &m, &spec, &p, 1, StorePolicy::Local).await.expect("store up");
        }
        store.down.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut admitted = 0;
        for _ in 0..300 {
            if q.reserve(&t, &m, &spec, &p, 1, StorePolicy::Local).await.is_ok() {
                admitted += 1;
            }
        }
        // 240 were left at the last contact; three instances are alive: a share of 80.
        assert_eq!(admitted, 80, "the local allowance is (ceiling - counter) / live instances");
        // Back up: the debt reaches the counter and leases resume from there.
        store.down.store(false, std::sync::atomic::Ordering::Relaxed);
        clock.advance_millis(RETRY_AFTER_FAILURE_MS);
        q.flush().await;
        let state = q.state(&t, &m, &spec, &p);
        assert_eq!(state.used, 140);
    }

    #[tokio::test]
    async fn a_request_dropped_during_its_lease_call_frees_the_counter() {
        let clock = ManualClock::new(ms("2027-03-10T10:00:00Z"));
        let (store, q) = flaky(&clock, true);
        let (t, m): (Arc<str>, Arc<str>) = ("acme".into(), "requests".into());
        let spec = QuotaSpec { limit: 100, period: Period::Month, hard: true, overage_percent: 0 };
        let p = policy(1, "UTC");
        // The client goes away while the lease call hangs: the request future is dropped.
        let gone =
            tokio::time::timeout(Duration::from_millis(20), q.reserve(&t, &m, &spec, &p, 1, StorePolicy::Closed)).await;
        assert!(gone.is_err(), "the call hangs");
        store.hang.store(false, std::sync::atomic::Ordering::Relaxed);
        // The next request calls the store at once instead of waiting for the dropped call.
        let started = std::time::Instant::now();
        q.reserve(&t, &m, &spec, &p, 1, StorePolicy::Closed).await.expect("the counter is free again");
        assert!(started.elapsed() < Duration::from_millis(500), "it did not wait for the dropped call");
    }

    #[tokio::test]
    async fn a_waiter_that_goes_away_takes_its_units_out_of_the_next_call() {
        let clock = ManualClock::new(ms("2027-03-10T10:00:00Z"));
        let (store, q) = flaky(&clock, true);
        let (t, m): (Arc<str>, Arc<str>) = ("acme".into(), "records".into());
        let spec = QuotaSpec { limit: 50, period: Period::Month, hard: true, overage_percent: 0 };
        let p = policy(1, "UTC");
        let leader = {
            let (q, t, m, spec, p) = (q.clone(), t.clone(), m.clone(), spec.clone(), p.clone());
            tokio::spawn(async move { q.reserve(&t, &m, &spec, &p, 1, StorePolicy::Closed).await.is_ok() })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        // A request needing 30 waits for the leader's call, then goes away.
        let gone =
            tokio::time::timeout(Duration::from_millis(20), q.reserve(&t, &m, &spec, &p, 30, StorePolicy::Closed))
                .await;
        assert!(gone.is_err());
        leader.abort();
        let _ = leader.await;
        store.hang.store(false, std::sync::atomic::Ordering::Relaxed);
        q.reserve(&t, &m, &spec, &p, 1, StorePolicy::Closed).await.expect("one unit");
        let key = CounterKey {
            tenant: t.clone(),
            metric: m.clone(),
            period_start: q.state(&t, &m, &spec, &p).period_start_ms,
        };
        assert_eq!(store.get(&key).await.expect("get"), 1, "the call asked for its own unit only");
    }

    /// Two instances on one store near a hard limit (exact grants, so each lease is spent to 0
    /// at once), over many lease TTLs with the background flush running: the store's records
    /// are renewed while they claim units, so no spent unit is ever reclaimed.
    #[tokio::test]
    async fn spent_leases_are_renewed_not_reclaimed() {
        let clock = ManualClock::new(ms("2027-03-10T10:00:00Z"));
        let (a, b) = two_instances(&clock);
        let (t, m): (Arc<str>, Arc<str>) = ("acme".into(), "requests".into());
        let spec = QuotaSpec { limit: 10, period: Period::Month, hard: true, overage_percent: 0 };
        let p = policy(1, "UTC");
        let mut admitted = 0;
        for _ in 0..10 {
            for q in [&a, &b] {
                for _ in 0..10 {
                    if q.reserve(&t, &m, &spec, &p, 1, StorePolicy::Closed).await.is_ok() {
                        admitted += 1;
                    }
                }
            }
            // 11 s, longer than the 10 s lease TTL, with a flush every second.
            for _ in 0..11 {
                clock.advance_millis(1_000);
                a.flush().await;
                b.flush().await;
            }
        }
        assert_eq!(admitted, 10, "a hard limit of 10 across two instances and ten lease TTLs");
    }

    #[test]
    fn lease_blocks_shrink_to_exact_grants_near_the_limit() {
        assert_eq!(block_size(1_000_000, 1000, 1), 1000);
        assert_eq!(block_size(320, 1000, 1), 10);
        assert_eq!(block_size(63, 1000, 1), 0);
        assert_eq!(block_size(0, 1000, 1), 0);
        // Three instances share what is left.
        assert_eq!(block_size(960, 1000, 3), 10);
        assert_eq!(block_size(191, 1000, 3), 0);
    }
}
