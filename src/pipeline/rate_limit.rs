//! Stage 4, rate limit: the tenant's bucket for this rule.
//!
//! A rule's `rate.<tier>` (or `rate.default`) gives the rule its own bucket per tenant;
//! otherwise the tenant's tier rate (with overrides) applies, one bucket per tenant. With
//! `mode = "global"` and a shared store, a sliding-window counter in the store decides instead
//! (one round trip per request: the price of exactness across instances).

use super::authorize::Permit;
use crate::error::Reject;
use crate::limits::headers::{LimitHeaders, RateInfo};
use crate::limits::rate::{RateDecision, TIER_SLOT};
use crate::limits::Limits;
use crate::policy::{RateSpec, StorePolicy};
use std::sync::Arc;

/// Runs the stage. Anonymous requests without a tenant have no bucket.
pub async fn check(limits: &Limits, permit: &Permit<'_>, headers: &mut LimitHeaders) -> Result<(), Reject> {
    let Some(tenant) = permit.tenant else { return Ok(()) };
    let actions = &permit.rule.actions;
    // A rule's own rate is a policy of its own, advertised under the rule's name.
    let (spec, slot, rule): (&RateSpec, u32, Option<Arc<str>>) = match actions.rate_for(&tenant.tier.name) {
        Some(s) => (s, permit.rule.index.min(u32::MAX as usize - 1) as u32, Some(permit.rule.name.clone())),
        None => match &tenant.policy.rate {
            Some(s) => (s, TIER_SLOT, None),
            None => return Ok(()),
        },
    };
    if spec.global && limits.shared {
        let on_error = actions.on_store_error.unwrap_or(tenant.policy.on_store_error);
        return global(limits, &tenant.id, slot, spec, on_error, rule, headers).await;
    }
    local(limits, &tenant.id, slot, spec, rule, headers)
}

/// This instance's bucket.
fn local(
    limits: &Limits,
    tenant: &Arc<str>,
    slot: u32,
    spec: &RateSpec,
    rule: Option<Arc<str>>,
    headers: &mut LimitHeaders,
) -> Result<(), Reject> {
    match limits.rates.check(tenant, slot, spec) {
        RateDecision::Allowed { limit, remaining, reset_secs, window_secs } => {
            headers.rate = Some(RateInfo { limit, remaining, reset_secs, window_secs, retry_after: None, rule });
            Ok(())
        }
        RateDecision::Limited { limit, retry_after_secs, reset_secs, window_secs } => {
            headers.rate = Some(RateInfo {
                limit,
                remaining: 0,
                reset_secs,
                window_secs,
                retry_after: Some(retry_after_secs),
                rule,
            });
            Err(Reject::RateLimited { limit, retry_after: retry_after_secs, reset: reset_secs })
        }
    }
}

/// Sliding window over the shared store: the previous window's count, weighted by how much
/// of it still overlaps, plus the current window's.
async fn global(
    limits: &Limits,
    tenant: &Arc<str>,
    slot: u32,
    spec: &RateSpec,
    on_error: StorePolicy,
    rule: Option<Arc<str>>,
    headers: &mut LimitHeaders,
) -> Result<(), Reject> {
    let window_ms = spec.period.as_millis().max(1) as u64;
    let now = limits.clock.now_millis();
    let name = if slot == TIER_SLOT { "tier".to_string() } else { format!("rule{slot}") };
    match limits.store.window_add(tenant, &name, window_ms, now, 1).await {
        Ok((cur, prev)) => {
            let elapsed = now.rem_euclid(window_ms as i64) as f64 / window_ms as f64;
            let estimate = prev as f64 * (1.0 - elapsed) + cur as f64;
            let limit = spec.limit as f64;
            let reset_secs = ((window_ms as i64 - now.rem_euclid(window_ms as i64)) as u64).div_ceil(1000);
            let window_secs = spec.window_secs();
            if estimate > limit {
                // Take back this request's increment: a refused request is not counted.
                let _ = limits.store.window_add(tenant, &name, window_ms, now, -1).await;
                let retry_after = reset_secs.max(1);
                headers.rate = Some(RateInfo {
                    limit: spec.limit,
                    remaining: 0,
                    reset_secs,
                    window_secs,
                    retry_after: Some(retry_after),
                    rule,
                });
                return Err(Reject::RateLimited { limit: spec.limit, retry_after, reset: reset_secs });
            }
            let remaining = (limit - estimate).max(0.0) as u32;
            headers.rate =
                Some(RateInfo { limit: spec.limit, remaining, reset_secs, window_secs, retry_after: None, rule });
            Ok(())
        }
        Err(_) => match on_error {
            StorePolicy::Closed => Err(Reject::StoreUnavailable { retry_after: 1 }),
            StorePolicy::Open => Ok(()),
            // Fall back to this instance's own bucket.
            StorePolicy::Local => local(limits, tenant, slot, spec, rule, headers),
        },
    }
}
