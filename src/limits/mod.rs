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

impl Limits {
    pub fn new(
        store: Arc<dyn Counters>,
        shared: bool,
        clock: SharedClock,
        max_block: u64,
        instance: String,
        slot_ttl: Duration,
    ) -> Arc<Limits> {
        Arc::new(Limits {
            rates: rate::RateLimiters::new(),
            quotas: quota::QuotaEngine::new(store.clone(), clock.clone(), max_block),
            concurrency: concurrency::Concurrency::new(
                shared.then(|| store.clone()),
                instance,
                slot_ttl,
                clock.clone(),
            ),
            store,
            shared,
            clock,
        })
    }
}
