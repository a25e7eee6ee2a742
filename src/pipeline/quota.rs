//! Stage 5, quota: reserve what the request costs from every quota that applies.
//!
//! The quotas that apply: the tenant's `requests` quota (cost 1), its quota on the rule's
//! `charge` metric (cost from the charge: a constant, a header or a query parameter), and the
//! rule's own `quota.<tier>` blocks (separate counters per rule). Either every reservation
//! succeeds, or the ones already made are given back: a refused request consumes nothing.

use super::authorize::Permit;
use super::resolve::Hints;
use crate::error::Reject;
use crate::limits::headers::{LimitHeaders, QuotaInfo};
use crate::limits::quota::{QuotaError, QuotaState, Reservation};
use crate::limits::Limits;
use crate::policy::QuotaSpec;
use crate::rules::CostSource;
use pingora::http::RequestHeader;
use std::sync::Arc;

pub use crate::metering::ChargeInfo;

/// What the stage took; kept in the request context until the request ends.
#[derive(Default)]
pub struct Reserved {
    pub items: Vec<Reservation>,
    /// One per charge of the rule, in the rule's order.
    pub charges: Vec<ChargeInfo>,
}

/// Reads the cost of the rule's charge from the request. A cost named twice is refused: the
/// gateway would charge one value while an upstream framework may act on the other.
fn cost_of(source: &CostSource, max: Option<u64>, req: &RequestHeader, hints: &Hints<'_>) -> Result<u64, Reject> {
    let what = || match source {
        CostSource::Header(h) => format!("header `{h}`"),
        CostSource::Query(q) => format!("query parameter `{q}`"),
        CostSource::Constant(_) => "constant".to_string(),
        CostSource::Body { paths, .. } => format!("body field `{}`", paths.join("` or `")),
    };
    let twice = || Reject::InvalidCost { detail: format!("The {} appears more than once; send it once.", what()) };
    let raw = match source {
        CostSource::Constant(n) => return Ok(*n),
        // Read from the body once it is in (`costs_from_body`); the default until then.
        CostSource::Body { default, .. } => return Ok(*default),
        CostSource::Header(h) => {
            let mut all = req.headers.get_all(h).iter();
            let first = all.next();
            if all.next().is_some() {
                return Err(twice());
            }
            first.and_then(|v| v.to_str().ok())
        }
        CostSource::Query(q) => {
            let mut all = hints.query.into_iter().flat_map(|qs| qs.split('&')).filter_map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (k == q.as_str()).then_some(v)
            });
            let first = all.next();
            if all.next().is_some() {
                return Err(twice());
            }
            first
        }
    };
    let raw = raw.ok_or_else(|| Reject::InvalidCost {
        detail: format!("This route is charged by the {}; send it as a whole number.", what()),
    })?;
    let n: u64 = raw
        .trim()
        .parse()
        .map_err(|_| Reject::InvalidCost { detail: format!("The {} must be a whole number, not `{raw}`.", what()) })?;
    if let Some(max) = max {
        if n > max {
            return Err(Reject::InvalidCost {
                detail: format!("The {} is {n}; this route allows at most {max} per request.", what()),
            });
        }
    }
    Ok(n)
}

/// Where quota warnings go: a metric, the log, and the webhook if one is configured.
pub struct WarnSink<'a> {
    pub metrics: &'a crate::metrics::Metrics,
    pub webhook: Option<&'a crate::metering::webhook::WebhookSender>,
}

/// Announces a crossed warning threshold once per crossing, and marks the response.
fn warn(
    limits: &Limits,
    sink: &WarnSink<'_>,
    tenant: &crate::directory::Tenant,
    r: &Reservation,
    state: &QuotaState,
    headers: &mut LimitHeaders,
) {
    if state.limit == 0 || tenant.policy.warn_at.is_empty() {
        return;
    }
    let pct = (state.used.saturating_mul(100) / state.limit).min(u32::MAX as u64) as u32;
    let Some(&threshold) = tenant.policy.warn_at.iter().rev().find(|t| pct >= **t) else { return };
    headers.warning = Some(format!("{}={pct}%", r.metric));
    if limits.quotas.mark_warned(r, threshold) >= threshold {
        return;
    }
    let reset_at = (state.reset_ms != i64::MAX).then(|| crate::limits::headers::rfc3339(state.reset_ms));
    tracing::warn!(
        target: "tollgate::quota",
        tenant = %tenant.id,
        metric = %r.metric,
        used = state.used,
        limit = state.limit,
        threshold,
        "quota warning threshold crossed"
    );
    sink.metrics.quota_warnings.with_label_values(&[&*tenant.tier.name, &*r.metric, &threshold.to_string()]).inc();
    if let Some(w) = sink.webhook {
        w.send(crate::metering::webhook::Warning {
            tenant: tenant.id.to_string(),
            metric: r.metric.to_string(),
            used: state.used,
            limit: state.limit,
            threshold,
            reset_at,
        });
    }
}

/// The rule's charges with their estimates from the request head (a constant, a header, a query
/// parameter); a cost from the body holds its default until [`costs_from_body`].
pub fn charges_of(permit: &Permit<'_>, req: &RequestHeader, hints: &Hints<'_>) -> Result<Vec<ChargeInfo>, Reject> {
    let charges = &permit.rule.actions.charges;
    let mut out = Vec::with_capacity(charges.len());
    for c in charges {
        out.push(ChargeInfo {
            metric: c.metric.clone(),
            estimate: cost_of(&c.cost, c.max_cost, req, hints)?,
            actual: None,
            settle_header: c.settle_from_header.clone(),
            from_body: matches!(c.cost, CostSource::Body { .. }),
        });
    }
    Ok(out)
}

/// Takes the estimates of `cost_from_body` charges from the scanned request body: the largest
/// of the charge's fields present (or its `default_cost` when none is), times its largest
/// `cost_multiplier_from_body` field present (at least 1). A field that is not a whole number,
/// or an estimate over `max_cost`, is refused.
pub fn costs_from_body(
    charges: &mut [ChargeInfo],
    rule: &crate::rules::Rule,
    plan: &crate::rules::BodyPlan,
    scan: &crate::scan::JsonScan,
) -> Result<(), Reject> {
    use crate::scan::Found;
    let count = |i: usize, path: &str| match scan.get(i) {
        None | Some(Found::Null) => Ok(None),
        Some(Found::Num(n)) => Ok(Some(*n)),
        Some(_) => Err(Reject::InvalidCost {
            detail: format!("The body field `{path}` must be a whole number of at least 0."),
        }),
    };
    let over = |what: String, n: u64, max: u64| Reject::InvalidCost {
        detail: format!("The {what} is {n}; this route allows at most {max} per request."),
    };
    let items = charges.iter_mut().zip(&rule.actions.charges).zip(plan.cost_at.iter().zip(&plan.multiplier_at));
    for ((info, c), (at, times_at)) in items {
        let CostSource::Body { paths, multiplier, .. } = &c.cost else { continue };
        if !info.from_body {
            continue;
        }
        let mut largest: Option<u64> = None;
        for (i, path) in at.iter().zip(paths) {
            let Some(n) = count(*i, path)? else { continue };
            if let Some(max) = c.max_cost.filter(|m| n > *m) {
                return Err(over(format!("body field `{path}`"), n, max));
            }
            largest = Some(largest.map_or(n, |l| l.max(n)));
        }
        let base = largest.unwrap_or(info.estimate);
        let mut times: Option<(u64, &str)> = None;
        for (i, m) in times_at.iter().zip(multiplier) {
            if let Some(t) = count(*i, m)? {
                if times.is_none_or(|(was, _)| t > was) {
                    times = Some((t, m));
                }
            }
        }
        info.estimate = base;
        if let Some((t, m)) = times {
            let t = t.max(1);
            let product = base.saturating_mul(t);
            if let Some(max) = c.max_cost.filter(|max| product > *max) {
                return Err(over(format!("estimate ({base} × `{m}` {t})"), product, max));
            }
            info.estimate = product;
        }
    }
    Ok(())
}

/// Runs the stage: reserves the request (`requests`) and every charge's estimate from every
/// quota that applies.
pub async fn reserve(
    limits: &Limits,
    permit: &Permit<'_>,
    charges: Vec<ChargeInfo>,
    headers: &mut LimitHeaders,
    sink: &WarnSink<'_>,
) -> Result<Reserved, Reject> {
    let actions = &permit.rule.actions;
    let mut out = Reserved { items: Vec::new(), charges };
    let Some(tenant) = permit.tenant else { return Ok(out) };
    let policy = &tenant.policy;
    let on_error = actions.on_store_error.unwrap_or(policy.on_store_error);

    // A charge settled from the answer may come to more than its estimate, so an estimate of 0
    // does not pass a used-up quota.
    let settles = |metric: &str| {
        actions.charges.iter().any(|c| {
            *c.metric == *metric
                && (c.settle_from_header.is_some() || c.settle_from_body.is_some() || c.settle_from_sse.is_some())
        })
    };
    // (counter metric, spec, cost, settled from the answer)
    let mut wanted: Vec<(Arc<str>, &QuotaSpec, u64, bool)> = Vec::new();
    if let Some((m, spec)) = policy.quotas.get_key_value("requests") {
        wanted.push((m.clone(), spec, 1, false));
    }
    for c in &out.charges {
        if let Some(spec) = policy.quotas.get(&*c.metric) {
            wanted.push((c.metric.clone(), spec, c.estimate, settles(&c.metric)));
        }
    }
    let rule_quotas = actions.quota.get(&*tenant.tier.name).or_else(|| actions.quota.get("default"));
    for (metric, spec) in rule_quotas.into_iter().flatten() {
        let cost = match out.charges.iter().find(|c| *c.metric == **metric) {
            Some(c) => c.estimate,
            None if metric == "requests" => 1,
            None => continue,
        };
        wanted.push((format!("{metric}@{}", permit.rule.name).into(), spec, cost, settles(metric)));
    }
    if wanted.is_empty() {
        return Ok(out);
    }
    for (metric, spec, cost, settles) in wanted {
        let used_up =
            if cost == 0 && settles { limits.quotas.used_up(&tenant.id, &metric, spec, policy) } else { None };
        let reserved = match used_up {
            Some(state) => Err(QuotaError::Exceeded(state)),
            None => limits.quotas.reserve(&tenant.id, &metric, spec, policy, cost, on_error).await,
        };
        match reserved {
            Ok((r, state)) => {
                offer(headers, &metric, spec, &state);
                if state.over {
                    headers.soft_over = Some(metric.clone());
                }
                warn(limits, sink, tenant, &r, &state, headers);
                out.items.push(r);
            }
            Err(e) => {
                refund_all(limits, &out);
                return Err(match e {
                    QuotaError::Exceeded(state) => {
                        offer(headers, &metric, spec, &state);
                        Reject::QuotaExceeded {
                            metric: metric.to_string(),
                            used: state.used,
                            limit: state.limit,
                            reset_ms: state.reset_ms,
                        }
                    }
                    QuotaError::StoreUnavailable { retry_after } => {
                        Reject::StoreUnavailable { retry_after: retry_after.as_secs().max(1) }
                    }
                });
            }
        }
    }
    Ok(out)
}

fn offer(headers: &mut LimitHeaders, metric: &Arc<str>, spec: &QuotaSpec, s: &QuotaState) {
    headers.offer_quota(QuotaInfo {
        metric: metric.clone(),
        period: spec.period.as_str(),
        limit: s.limit,
        remaining: s.remaining,
        reset_ms: s.reset_ms,
        period_start_ms: s.period_start_ms,
    });
}

/// Gives back everything reserved (the request was refused after this stage).
pub fn refund_all(limits: &Limits, reserved: &Reserved) {
    for r in &reserved.items {
        limits.quotas.refund(r, r.units);
    }
}

/// Settles charge `i` to the upstream's figure, and brings the limit headers up to date: when
/// they are still to be written they show what is left once the charge is final, not what was
/// left after the estimate. A larger figure is taken from the lease at once (what the lease
/// cannot cover goes to the shared counter as debt right away), so a hard quota refuses the
/// next request; a smaller one gives the difference back.
pub fn settle(limits: &Limits, reserved: &mut Reserved, i: usize, actual: u64, headers: &mut LimitHeaders) {
    let Some(charge) = reserved.charges.get_mut(i) else { return };
    if charge.actual.is_some() {
        // Settled once: a later figure (a second header, a body after a header) is ignored.
        return;
    }
    charge.actual = Some(actual);
    for r in &reserved.items {
        let rule_scoped = r.metric.strip_prefix(&*charge.metric).is_some_and(|rest| rest.starts_with('@'));
        if *r.metric == *charge.metric || rule_scoped {
            if let Some(used) = limits.quotas.settle(r, actual) {
                headers.settled(&r.metric, used);
            }
        }
    }
}
