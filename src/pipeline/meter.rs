//! Stage: meter. Runs in `logging` for every request, forwarded or rejected.
//!
//! It adds the request to the usage aggregates and metrics ([`crate::metering::Meter`]) and
//! writes the access log ([`crate::logging::access`]): one line per request, target
//! `tollgate::access`, with the request id, tenant, key id (never the key), rule, decision,
//! status, bytes, timings (milliseconds, to the microsecond), charged units and the binding
//! quota's state. A refused key's id and tenant are logged too.

use super::ctx::{Decision, RequestCtx};
use super::quota;
use crate::limits::Limits;
use crate::metering::{Detail, Meter, Record};
use crate::metrics::Metrics;
use bytes::Bytes;
use pingora::proxy::Session;
use std::time::Duration;

/// Scans a piece of the answer for the rule's settlements; at the end of the answer, settles
/// every charge the answer carries and counts the ones it does not.
pub fn settle_from_answer(
    limits: &Limits,
    metrics: &Metrics,
    ctx: &mut RequestCtx,
    body: &mut Option<Bytes>,
    end_of_stream: bool,
) {
    let Some(plan) = ctx.rule.as_ref().and_then(|r| r.actions.body.as_deref()) else { return };
    let Some(scan) = ctx.body.response.as_mut() else { return };
    scan.feed(plan, body, end_of_stream);
    if !end_of_stream || ctx.body.response_done {
        return;
    }
    ctx.body.response_done = true;
    for i in 0..ctx.reserved.charges.len() {
        if ctx.reserved.charges[i].actual.is_some() {
            continue;
        }
        match scan.settlement(plan, i) {
            None => {}
            Some(Ok(units)) => quota::settle(limits, &mut ctx.reserved, i, units, &mut ctx.limit_headers),
            Some(Err(reason)) => {
                let tier = ctx.tenant.as_ref().map(|t| &*t.tier.name).unwrap_or("-");
                metrics.charges_unsettled.with_label_values(&[tier, &*ctx.reserved.charges[i].metric, reason]).inc();
            }
        }
    }
}

/// Counts a charge that keeps its estimate.
fn unsettled(metrics: &Metrics, ctx: &RequestCtx, i: usize, reason: &'static str) {
    let tier = ctx.tenant.as_ref().map(|t| &*t.tier.name).unwrap_or("-");
    if let Some(c) = ctx.reserved.charges.get(i) {
        metrics.charges_unsettled.with_label_values(&[tier, &*c.metric, reason]).inc();
    }
}

/// An answer whose scan started and never ended (the stream broke, the client left): every
/// charge it was to settle keeps its estimate.
fn count_broken(metrics: &Metrics, ctx: &RequestCtx) {
    let (Some(plan), Some(scan)) = (ctx.rule.as_ref().and_then(|r| r.actions.body.as_deref()), &ctx.body.response)
    else {
        return;
    };
    if ctx.body.response_done {
        return;
    }
    for (i, c) in ctx.reserved.charges.iter().enumerate() {
        if c.actual.is_none() && scan.settlement(plan, i).is_some() {
            unsettled(metrics, ctx, i, "broken");
        }
    }
}

/// Microseconds, rounded: the access log writes durations in milliseconds to the microsecond,
/// since a float of the raw duration prints as `0.060566999999999996`, noise no reader needs.
fn micros(d: Duration) -> u64 {
    ((d.as_nanos() + 500) / 1000).min(u64::MAX as u128) as u64
}

/// Records the finished request.
pub fn record(session: &Session, ctx: &RequestCtx, access_log: bool, meter: &Meter, now_ms: i64) {
    let status = session
        .response_written()
        .filter(|r| !r.status.is_informational())
        .map(|r| r.status.as_u16())
        .unwrap_or(ctx.status);
    let elapsed = ctx.started.elapsed();
    let total = elapsed.as_secs_f64();
    // A request whose upstream was never reached is not usage (its quota units were given back).
    let admitted = matches!(ctx.decision, Decision::Forwarded | Decision::UpstreamError) && ctx.upstream_reached;
    if admitted {
        count_broken(meter.metrics(), ctx);
    }
    let charges: &[quota::ChargeInfo] = if admitted { &ctx.reserved.charges } else { &[] };
    let charge = charges.first().map(|c| (&c.metric, c.units()));
    let rule = ctx.rule.as_ref().map(|r| &*r.name).unwrap_or("-");
    let reason = ctx.reject.as_ref().map(|r| r.code());
    let (bytes_in, bytes_out) = (session.body_bytes_read() as u64, session.body_bytes_sent() as u64);
    meter.record_with(
        &Record {
            tenant: ctx.tenant.as_deref(),
            rule,
            decision: ctx.decision.as_str(),
            reason,
            status,
            bytes_in,
            bytes_out,
            upstream: ctx.upstream.as_deref(),
            upstream_secs: ctx.upstream_time.map(|d| d.as_secs_f64()),
            total_secs: total,
            charges,
            model: ctx.body.model.as_ref(),
            admitted,
        },
        &Detail {
            upstream_failure: ctx.upstream_failure,
            first_byte_secs: ctx.upstream_first_byte.map(|d| d.as_secs_f64()),
        },
        now_ms,
    );
    if !access_log {
        return;
    }
    let req = session.req_header();
    let quota = ctx.limit_headers.quota.as_ref();
    // The tenant of a refused key is logged too: who was turned away matters as much as who
    // got through.
    let tenant = ctx.tenant.as_ref().or(ctx.identified_tenant.as_ref());
    crate::logging::access(&crate::logging::Access {
        request_id: ctx.request_id.as_str(),
        method: req.method.as_str(),
        path: req.uri.path(),
        tenant: tenant.map(|t| &*t.id).unwrap_or("-"),
        tier: tenant.map(|t| &*t.tier.name).unwrap_or("-"),
        key_id: ctx.key_id.as_deref().unwrap_or("-"),
        rule,
        decision: ctx.decision.as_str(),
        reason: reason.unwrap_or("-"),
        status,
        bytes_in,
        bytes_out,
        upstream: ctx.upstream.as_deref().unwrap_or("-"),
        upstream_us: ctx.upstream_time.map(micros),
        total_us: micros(elapsed),
        client_ip: ctx.client_ip,
        charge_metric: charge.map(|c| &**c.0).unwrap_or("-"),
        charge_units: charge.map(|c| c.1),
        quota_metric: quota.map(|q| &*q.metric).unwrap_or("-"),
        quota_remaining: quota.map(|q| q.remaining),
    });
}
