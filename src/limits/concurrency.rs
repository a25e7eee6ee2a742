//! Concurrency: in-flight requests per tenant, with an optional priority queue.
//!
//! A [`SlotGuard`] holds a slot until it is dropped, which happens on every path (success,
//! upstream error, client abort) because it lives in the request context. A freed slot goes
//! straight to the best waiter: highest priority first, then earliest arrival.
//!
//! With a shared store, each slot is also leased in the store (`slot_acquire`) with a TTL that
//! a heartbeat renews, so a crashed instance's slots free themselves within the TTL. A freed
//! shared slot stays leased by its instance for a moment, so a steady stream of requests
//! reuses it without a store round trip; idle ones go back to the store.

use crate::clock::SharedClock;
use crate::policy::{ConcurrencySpec, StorePolicy};
use crate::store::Counters;
use dashmap::DashMap;
use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::oneshot;

/// A leased shared slot idle this long goes back to the store.
const IDLE_SHARED_SLOT_MS: i64 = 1_000;

struct Waiter {
    priority: i64,
    seq: u64,
    tx: oneshot::Sender<Option<String>>,
}

impl PartialEq for Waiter {
    fn eq(&self, o: &Self) -> bool {
        self.priority == o.priority && self.seq == o.seq
    }
}
impl Eq for Waiter {}
impl PartialOrd for Waiter {
    fn partial_cmp(&self, o: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(o))
    }
}
impl Ord for Waiter {
    fn cmp(&self, o: &Self) -> CmpOrdering {
        // BinaryHeap pops the greatest: higher priority, then the smaller (earlier) seq.
        self.priority.cmp(&o.priority).then_with(|| o.seq.cmp(&self.seq))
    }
}

#[derive(Default)]
struct SlotState {
    in_flight: u32,
    waiters: BinaryHeap<Waiter>,
    /// Shared slots this instance holds in the store.
    held: HashSet<String>,
    /// Held shared slots not serving a request, with when they became idle.
    idle: Vec<(String, i64)>,
}

/// One tenant's slots.
pub struct TenantSlots {
    tenant: Arc<str>,
    st: Mutex<SlotState>,
}

impl TenantSlots {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Holds a slot; dropping it frees the slot.
pub struct SlotGuard {
    slots: Arc<TenantSlots>,
    shared: Option<String>,
    clock: SharedClock,
    /// The tenant's requests in flight on this instance once this one was admitted, read
    /// under the lock that admitted it (for the `RateLimit` header; no second lock).
    in_flight: u32,
}

impl SlotGuard {
    /// The tenant's requests in flight on this instance when this one was admitted, itself
    /// included.
    pub fn in_flight_when_admitted(&self) -> u32 {
        self.in_flight
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut shared = self.shared.take();
        let mut st = self.slots.lock();
        while let Some(w) = st.waiters.pop() {
            match w.tx.send(shared.take()) {
                Ok(()) => return,
                Err(back) => shared = back,
            }
        }
        st.in_flight = st.in_flight.saturating_sub(1);
        if let Some(s) = shared {
            st.idle.push((s, self.clock.now_millis()));
        }
    }
}

/// Why a slot was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConcurrencyError {
    /// Every slot is busy (and the queue is full, or the wait timed out).
    Full {
        limit: u32,
    },
    StoreUnavailable {
        retry_after: Duration,
    },
}

/// All tenants' slots.
pub struct Concurrency {
    map: DashMap<Arc<str>, Arc<TenantSlots>, crate::fasthash::Fast>,
    shared: Option<Arc<dyn Counters>>,
    instance: String,
    seq: AtomicU64,
    ttl: Duration,
    clock: SharedClock,
}

impl Concurrency {
    /// `shared`: the store to lease slots in (Redis), or `None` for a single node.
    pub fn new(
        shared: Option<Arc<dyn Counters>>,
        instance: String,
        ttl: Duration,
        clock: SharedClock,
    ) -> Arc<Concurrency> {
        Arc::new(Concurrency { map: DashMap::default(), shared, instance, seq: AtomicU64::new(0), ttl, clock })
    }

    fn slots(&self, tenant: &Arc<str>) -> Arc<TenantSlots> {
        if let Some(s) = self.map.get(tenant) {
            return s.clone();
        }
        self.map
            .entry(tenant.clone())
            .or_insert_with(|| Arc::new(TenantSlots { tenant: tenant.clone(), st: Mutex::new(SlotState::default()) }))
            .clone()
    }

    fn guard(&self, slots: Arc<TenantSlots>, shared: Option<String>, in_flight: u32) -> SlotGuard {
        SlotGuard { slots, shared, clock: self.clock.clone(), in_flight }
    }

    /// Takes a slot for `tenant`, waiting in the queue if the spec has one.
    pub async fn acquire(
        &self,
        tenant: &Arc<str>,
        spec: &ConcurrencySpec,
        priority: i64,
        on_error: StorePolicy,
    ) -> Result<SlotGuard, ConcurrencyError> {
        enum Step {
            Admitted(Option<String>, u32),
            Wait(oneshot::Receiver<Option<String>>, Duration),
            Full,
        }
        let slots = self.slots(tenant);
        let step = {
            let mut st = slots.lock();
            if st.in_flight < spec.limit {
                st.in_flight += 1;
                Step::Admitted(st.idle.pop().map(|(s, _)| s), st.in_flight)
            } else {
                // Waiters that gave up (timed out, client gone) no longer hold a place.
                st.waiters.retain(|w| !w.tx.is_closed());
                match &spec.queue {
                    Some(q) if (st.waiters.len() as u32) < q.max => {
                        let (tx, rx) = oneshot::channel();
                        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
                        st.waiters.push(Waiter { priority, seq, tx });
                        Step::Wait(rx, q.timeout)
                    }
                    _ => Step::Full,
                }
            }
        };
        let (mut rx, timeout) = match step {
            Step::Admitted(reuse, in_flight) => {
                let guard = self.guard(slots, reuse, in_flight);
                return self.lease_shared(guard, spec.limit, on_error).await;
            }
            Step::Full => return Err(ConcurrencyError::Full { limit: spec.limit }),
            Step::Wait(rx, timeout) => (rx, timeout),
        };
        tokio::select! {
            got = &mut rx => match got {
                Ok(shared) => {
                    // Handed over from a finishing request: every slot is still busy.
                    let guard = self.guard(slots, shared, spec.limit);
                    self.lease_shared(guard, spec.limit, on_error).await
                }
                Err(_) => Err(ConcurrencyError::Full { limit: spec.limit }),
            },
            _ = tokio::time::sleep(timeout) => {
                // A slot may have been handed over just as the wait ended: take it if so.
                rx.close();
                match rx.try_recv() {
                    Ok(shared) => {
                        let guard = self.guard(slots, shared, spec.limit);
                        self.lease_shared(guard, spec.limit, on_error).await
                    }
                    Err(_) => Err(ConcurrencyError::Full { limit: spec.limit }),
                }
            }
        }
    }

    /// Makes sure a locally admitted request also holds a shared slot (when there is a store).
    async fn lease_shared(
        &self,
        mut guard: SlotGuard,
        limit: u32,
        on_error: StorePolicy,
    ) -> Result<SlotGuard, ConcurrencyError> {
        let Some(store) = &self.shared else { return Ok(guard) };
        if guard.shared.is_some() {
            return Ok(guard);
        }
        let id = format!("{}:{}", self.instance, self.seq.fetch_add(1, Ordering::Relaxed));
        let now = self.clock.now_millis();
        match store.slot_acquire(&guard.slots.tenant, &id, limit, now, self.ttl.as_millis() as i64).await {
            Ok(true) => {
                guard.slots.lock().held.insert(id.clone());
                guard.shared = Some(id);
                Ok(guard)
            }
            Ok(false) => Err(ConcurrencyError::Full { limit }),
            Err(_) => match on_error {
                StorePolicy::Closed => Err(ConcurrencyError::StoreUnavailable { retry_after: Duration::from_secs(1) }),
                // Local and open both fall back to this instance's own count.
                StorePolicy::Local | StorePolicy::Open => Ok(guard),
            },
        }
    }

    /// Renews held shared slots and returns idle ones. Run every `ttl / 3`.
    pub async fn maintain(&self) {
        let Some(store) = &self.shared else {
            self.map.retain(|_, s| {
                let st = s.lock();
                st.in_flight > 0 || !st.waiters.is_empty() || Arc::strong_count(s) > 1
            });
            return;
        };
        let now = self.clock.now_millis();
        let ttl = self.ttl.as_millis() as i64;
        let tenants: Vec<Arc<TenantSlots>> = self.map.iter().map(|e| e.value().clone()).collect();
        for slots in tenants {
            let (release, renew) = {
                let mut st = slots.lock();
                let (old, keep): (Vec<_>, Vec<_>) =
                    st.idle.drain(..).partition(|(_, t)| now - t >= IDLE_SHARED_SLOT_MS);
                st.idle = keep;
                for (s, _) in &old {
                    st.held.remove(s);
                }
                (old, st.held.iter().cloned().collect::<Vec<_>>())
            };
            for (s, _) in release {
                let _ = store.slot_release(&slots.tenant, &s).await;
            }
            if !renew.is_empty() {
                let _ = store.slot_heartbeat(&slots.tenant, &renew, now, ttl).await;
            }
        }
        self.map.retain(|_, s| {
            let st = s.lock();
            st.in_flight > 0 || !st.held.is_empty() || !st.waiters.is_empty() || Arc::strong_count(s) > 1
        });
    }

    /// Returns every held shared slot (shutdown).
    pub async fn shutdown(&self) {
        let Some(store) = &self.shared else { return };
        let tenants: Vec<Arc<TenantSlots>> = self.map.iter().map(|e| e.value().clone()).collect();
        for slots in tenants {
            let held: Vec<String> = slots.lock().held.drain().collect();
            for s in held {
                let _ = store.slot_release(&slots.tenant, &s).await;
            }
        }
    }

    /// In-flight requests of a tenant on this instance.
    pub fn in_flight(&self, tenant: &str) -> u32 {
        self.map.get(tenant).map(|s| s.lock().in_flight).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::policy::QueueSpec;

    fn spec(limit: u32, queue: Option<(u32, u64)>) -> ConcurrencySpec {
        ConcurrencySpec { limit, queue: queue.map(|(max, ms)| QueueSpec { max, timeout: Duration::from_millis(ms) }) }
    }

    #[tokio::test]
    async fn slots_are_released_on_drop() {
        let c = Concurrency::new(None, "i".into(), Duration::from_secs(10), Arc::new(SystemClock));
        let t: Arc<str> = "acme".into();
        let s = spec(2, None);
        let a = c.acquire(&t, &s, 0, StorePolicy::Local).await.expect("a");
        let _b = c.acquire(&t, &s, 0, StorePolicy::Local).await.expect("b");
        assert_eq!(c.acquire(&t, &s, 0, StorePolicy::Local).await.err(), Some(ConcurrencyError::Full { limit: 2 }));
        drop(a);
        assert!(c.acquire(&t, &s, 0, StorePolicy::Local).await.is_ok());
    }

    #[tokio::test]
    async fn queue_serves_priority_then_arrival() {
        let c = Concurrency::new(None, "i".into(), Duration::from_secs(10), Arc::new(SystemClock));
        let t: Arc<str> = "acme".into();
        let s = spec(1, Some((10, 5_000)));
        let first = c.acquire(&t, &s, 0, StorePolicy::Local).await.expect("first");
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (name, prio) in [("low-1", 0), ("high", 5), ("low-2", 0)] {
            let (c, t, s, order) = (c.clone(), t.clone(), s.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let g = c.acquire(&t, &s, prio, StorePolicy::Local).await.expect("queued");
                order.lock().unwrap_or_else(|p| p.into_inner()).push(name);
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(g);
            }));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(first);
        for t in tasks {
            t.await.expect("task");
        }
        assert_eq!(*order.lock().unwrap_or_else(|p| p.into_inner()), vec!["high", "low-1", "low-2"]);
        assert_eq!(c.in_flight("acme"), 0);
    }

    #[tokio::test]
    async fn a_waiter_that_gave_up_frees_its_place_in_the_queue() {
        let c = Concurrency::new(None, "i".into(), Duration::from_secs(10), Arc::new(SystemClock));
        let t: Arc<str> = "acme".into();
        let s = spec(1, Some((1, 50)));
        let held = c.acquire(&t, &s, 0, StorePolicy::Local).await.expect("held");
        assert!(c.acquire(&t, &s, 0, StorePolicy::Local).await.is_err(), "timed out");
        // The queue (max 1) has room again: this one waits and gets the slot.
        let (c2, t2, s2) = (c.clone(), t.clone(), spec(1, Some((1, 5_000))));
        let waiter = tokio::spawn(async move { c2.acquire(&t2, &s2, 0, StorePolicy::Local).await.is_ok() });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        assert!(waiter.await.expect("task"));
    }

    #[tokio::test]
    async fn queue_wait_times_out() {
        let c = Concurrency::new(None, "i".into(), Duration::from_secs(10), Arc::new(SystemClock));
        let t: Arc<str> = "acme".into();
        let s = spec(1, Some((1, 50)));
        let _held = c.acquire(&t, &s, 0, StorePolicy::Local).await.expect("held");
        assert_eq!(c.acquire(&t, &s, 0, StorePolicy::Local).await.err(), Some(ConcurrencyError::Full { limit: 1 }));
        assert_eq!(c.in_flight("acme"), 1);
    }
}
