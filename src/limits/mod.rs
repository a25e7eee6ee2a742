//! Limits: rate buckets, quotas and concurrency, held in process and kept in step with the
//! shared store by background tasks. See `docs/limits.md` for the exact semantics.

pub mod concurrency;
pub mod headers;
pub mod period;
pub mod quota;
pub mod rate;

use crate::clock::SharedClock;
use crate::store::Counters;
use std::sync::Arc;
use std::time::Duration;

/// Everything the limit stages need, built once in `app.rs`.
pub struct Limits {
    pub rates: rate::RateLimiters,
    pub quotas: Arc<quota::QuotaEngine>,
    pub concurrency: Arc<concurrency::Concurrency>,
    pub store: Arc<dyn Counters>,
    /// `true` when the store is shared by several instances (Redis).
    pub shared: bool,
    pub clock: SharedClock,
}

/// How the limits talk to the store, from `[store]`.
#[derive(Debug, Clone)]
pub struct LimitSettings {
    pub lease: quota::LeaseSettings,
    /// Lifetime of a concurrency slot lease without a heartbeat.
    pub slot_ttl: Duration,
}

impl LimitSettings {
    /// Defaults for one process (tools, tests, benches).
    pub fn local(max_block: u64) -> LimitSettings {
        LimitSettings { lease: quota::LeaseSettings::local(max_block), slot_ttl: Duration::from_secs(10) }
    }
}

impl Limits {
    /// `settings.lease.holder` names this process in shared state (quota leases, concurrency
    /// slots, the fleet registry): unique per process start.
    pub fn new(store: Arc<dyn Counters>, shared: bool, clock: SharedClock, settings: LimitSettings) -> Arc<Limits> {
        Arc::new(Limits {
            rates: rate::RateLimiters::new(),
            quotas: quota::QuotaEngine::new(store.clone(), clock.clone(), settings.lease.clone()),
            concurrency: concurrency::Concurrency::new(
                shared.then(|| store.clone()),
                settings.lease.holder.to_string(),
                settings.slot_ttl,
                clock.clone(),
            ),
            store,
            shared,
            clock,
        })
    }
}
