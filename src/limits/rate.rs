//! Rate limits: one GCRA bucket (`governor`) per tenant and rule.
//!
//! The tier's rate is one bucket per tenant shared by every rule that does not set its own; a
//! rule with `rate.<tier>` or `rate.default` gets its own bucket per tenant. A bucket whose
//! spec changed (tier change, override, reload) is replaced on its next use, so new limits
//! apply at once. Buckets idle for longer than `idle` are evicted by a background sweep, so
//! memory follows active tenants, not all tenants.

use crate::policy::RateSpec;
use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The bucket slot of the tier's own rate (not a rule's).
pub const TIER_SLOT: u32 = u32::MAX;

type Bucket<C> = RateLimiter<NotKeyed, InMemoryState, C, StateInformationMiddleware>;

struct Entry<C: Clock> {
    spec: RateSpec,
    bucket: Bucket<C>,
    /// Seconds since the table's epoch, for idle eviction.
    last_used: AtomicU64,
}

/// A rate decision, with the numbers the response headers need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateDecision {
    Allowed {
        limit: u32,
        remaining: u32,
        /// Seconds until the bucket is full again.
        reset_secs: u64,
        window_secs: u64,
    },
    Limited {
        limit: u32,
        /// Seconds until one more request would be allowed (rounded up, at least 1).
        retry_after_secs: u64,
        reset_secs: u64,
        window_secs: u64,
    },
}

/// All buckets.
pub struct RateLimiters<C: Clock = DefaultClock> {
    map: DashMap<(Arc<str>, u32), Entry<C>, crate::fasthash::Fast>,
    clock: C,
    epoch: Instant,
}

fn quota(spec: &RateSpec) -> Quota {
    let per = spec.period / spec.limit.max(1);
    let burst = NonZeroU32::new(spec.burst.max(1)).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(per.max(Duration::from_nanos(1)))
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst)
}

fn ceil_secs(d: Duration) -> u64 {
    let s = d.as_secs();
    if d.subsec_nanos() > 0 {
        s + 1
    } else {
        s
    }
}

impl RateLimiters<DefaultClock> {
    pub fn new() -> Self {
        Self::with_clock(DefaultClock::default())
    }
}

impl Default for RateLimiters<DefaultClock> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C: Clock + Clone> RateLimiters<C> {
    /// A table on an injected clock (tests use governor's `FakeRelativeClock`).
    pub fn with_clock(clock: C) -> Self {
        RateLimiters { map: DashMap::default(), clock, epoch: Instant::now() }
    }

    fn now_secs(&self) -> u64 {
        self.epoch.elapsed().as_secs()
    }

    /// Takes one request from the bucket of `(tenant, slot)` under `spec`.
    pub fn check(&self, tenant: &Arc<str>, slot: u32, spec: &RateSpec) -> RateDecision {
        let key = (tenant.clone(), slot);
        let now = self.now_secs();
        if let Some(e) = self.map.get(&key) {
            if e.spec == *spec {
                e.last_used.store(now, Ordering::Relaxed);
                return self.decide(&e.bucket, spec);
            }
        }
        // New bucket, or the spec changed: (re)build it. Racing builders just replace each
        // other; the loser's single request is counted in a bucket that is dropped.
        let entry = Entry {
            spec: spec.clone(),
            bucket: RateLimiter::direct_with_clock(quota(spec), self.clock.clone()).with_middleware(),
            last_used: AtomicU64::new(now),
        };
        let decision = self.decide(&entry.bucket, spec);
        self.map.insert(key, entry);
        decision
    }

    fn decide(&self, bucket: &Bucket<C>, spec: &RateSpec) -> RateDecision {
        let per = spec.period / spec.limit.max(1);
        let window_secs = spec.window_secs();
        match bucket.check() {
            Ok(snapshot) => {
                // Advertised against `limit`: a burst larger than the limit is not a promise of
                // more than `limit` per window.
                let remaining = snapshot.remaining_burst_capacity().min(spec.limit);
                let missing = spec.burst.saturating_sub(snapshot.remaining_burst_capacity());
                RateDecision::Allowed {
                    limit: spec.limit,
                    remaining,
                    reset_secs: ceil_secs(per * missing),
                    window_secs,
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                RateDecision::Limited {
                    limit: spec.limit,
                    retry_after_secs: ceil_secs(wait).max(1),
                    reset_secs: ceil_secs(per * spec.burst).max(1),
                    window_secs,
                }
            }
        }
    }

    /// Drops buckets unused for `idle`. A dropped bucket is full when it comes back, which is
    /// exactly its state after that much idleness whenever `idle` ≥ the time to refill.
    pub fn evict_idle(&self, idle: Duration) -> usize {
        let now = self.now_secs();
        let before = self.map.len();
        // A bucket goes once it has been idle for `idle` and long enough to be full again, so
        // dropping it (a new one starts full) changes nothing.
        self.map.retain(|_, e| {
            let needed = idle.max(refill_time(&e.spec)).as_secs();
            now.saturating_sub(e.last_used.load(Ordering::Relaxed)) < needed
        });
        before - self.map.len()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// How long an empty bucket of `spec` takes to fill.
fn refill_time(spec: &RateSpec) -> Duration {
    (spec.period / spec.limit.max(1)) * spec.burst
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn spec(limit: u32, secs: u64, burst: u32) -> RateSpec {
        RateSpec { limit, period: Duration::from_secs(secs), burst, global: false }
    }

    #[test]
    fn burst_then_limited_with_retry_after_then_refill() {
        let clock = FakeRelativeClock::default();
        let rl = RateLimiters::with_clock(clock.clone());
        let t: Arc<str> = "acme".into();
        let s = spec(60, 60, 3);
        for want in [2, 1, 0] {
            match rl.check(&t, TIER_SLOT, &s) {
                RateDecision::Allowed { remaining, .. } => assert_eq!(remaining, want),
                other => panic!("{other:?}"),
            }
        }
        match rl.check(&t, TIER_SLOT, &s) {
            RateDecision::Limited { retry_after_secs, .. } => assert_eq!(retry_after_secs, 1),
            other => panic!("{other:?}"),
        }
        clock.advance(Duration::from_secs(1));
        assert!(matches!(rl.check(&t, TIER_SLOT, &s), RateDecision::Allowed { .. }));
    }

    #[test]
    fn buckets_are_per_tenant_and_rule_and_follow_spec_changes() {
        let rl = RateLimiters::with_clock(FakeRelativeClock::default());
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let one = spec(1, 60, 1);
        assert!(matches!(rl.check(&a, 1, &one), RateDecision::Allowed { .. }));
        assert!(matches!(rl.check(&a, 1, &one), RateDecision::Limited { .. }));
        assert!(matches!(rl.check(&a, 2, &one), RateDecision::Allowed { .. }));
        assert!(matches!(rl.check(&b, 1, &one), RateDecision::Allowed { .. }));
        // A raised limit applies at once.
        assert!(matches!(rl.check(&a, 1, &spec(10, 60, 10)), RateDecision::Allowed { .. }));
        assert_eq!(rl.len(), 3);
    }
}
