//! Stage 6, concurrency: a slot for the request's whole life.
//!
//! The returned guard lives in the request context, so the slot is freed whenever the request
//! ends, however it ends. Queue order is the tier's `priority` plus the rule's `priority`.

use super::authorize::Permit;
use crate::error::Reject;
use crate::limits::concurrency::{ConcurrencyError, SlotGuard};
use crate::limits::headers::{ConcurrencyInfo, LimitHeaders};
use crate::limits::Limits;

/// Runs the stage and advertises the limit in the response headers: the slots left on this
/// instance once the request took one, or none on a refusal.
pub async fn acquire_advertised(
    limits: &Limits,
    permit: &Permit<'_>,
    headers: &mut LimitHeaders,
) -> Result<Option<SlotGuard>, Reject> {
    let result = acquire(limits, permit).await;
    let limit = permit.tenant.and_then(|t| t.policy.concurrency.as_ref()).map(|c| c.limit);
    if let Some(limit) = limit {
        let remaining = match &result {
            Ok(Some(slot)) => limit.saturating_sub(slot.in_flight_when_admitted()),
            _ => 0,
        };
        headers.concurrency = Some(ConcurrencyInfo { limit, remaining });
    }
    result
}

/// Runs the stage. `None` when the tenant has no concurrency limit.
pub async fn acquire(limits: &Limits, permit: &Permit<'_>) -> Result<Option<SlotGuard>, Reject> {
    let Some(tenant) = permit.tenant else { return Ok(None) };
    let Some(spec) = &tenant.policy.concurrency else { return Ok(None) };
    let priority = tenant.policy.priority + permit.rule.actions.priority;
    let on_error = permit.rule.actions.on_store_error.unwrap_or(tenant.policy.on_store_error);
    match limits.concurrency.acquire(&tenant.id, spec, priority, on_error).await {
        Ok(g) => Ok(Some(g)),
        Err(ConcurrencyError::Full { limit }) => Err(Reject::ConcurrencyLimit { limit }),
        Err(ConcurrencyError::StoreUnavailable { retry_after }) => {
            Err(Reject::StoreUnavailable { retry_after: retry_after.as_secs().max(1) })
        }
    }
}
