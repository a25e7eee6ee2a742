//! Stage: meter. Runs in `logging` for every request, forwarded or rejected.
//!
//! It adds the request to the usage aggregates and metrics ([`crate::metering::Meter`]) and
//! writes the access log: one structured `tracing` event per request, target
//! `tollgate::access`, with the request id, tenant, key id (never the key), rule, decision,
//! status, bytes, timings, charged units and the binding quota's state.

use super::ctx::{Decision, RequestCtx};
use crate::metering::{Meter, Record};
use pingora::proxy::Session;

/// Records the finished request.
pub fn record(session: &Session, ctx: &RequestCtx, access_log: bool, meter: &Meter, now_ms: i64) {
    let status = session.response_written().map(|r| r.status.as_u16()).unwrap_or(ctx.status);
    let total = ctx.started.elapsed().as_secs_f64();
    let charge = ctx.reserved.charge.as_ref().map(|c| (&c.metric, c.actual.unwrap_or(c.estimate)));
    // A request whose upstream was never reached is not usage (its quota units were given back).
    let admitted = matches!(ctx.decision, Decision::Forwarded | Decision::UpstreamError) && ctx.upstream_reached;
    meter.record(
        &Record {
            tenant: ctx.tenant.as_deref(),
            rule: ctx.rule.as_ref().map(|r| &*r.name).unwrap_or("-"),
            decision: ctx.decision.as_str(),
            reason: ctx.reject.as_ref().map(|r| r.code()),
            status,
            bytes_in: session.body_bytes_read() as u64,
            bytes_out: session.body_bytes_sent() as u64,
            upstream: ctx.upstream.as_deref(),
            upstream_secs: ctx.upstream_time.map(|d| d.as_secs_f64()),
            total_secs: total,
            charge: if admitted { charge } else { None },
            admitted,
        },
        now_ms,
    );
    if !access_log {
        return;
    }
    let req = session.req_header();
    let total_ms = total * 1000.0;
    let upstream_ms = ctx.upstream_time.map(|d| d.as_secs_f64() * 1000.0);
    let quota = ctx.limit_headers.quota.as_ref();
    tracing::info!(
        target: "tollgate::access",
        request_id = %ctx.request_id,
        method = %req.method,
        path = %req.uri.path(),
        tenant = ctx.tenant.as_ref().map(|t| &*t.id).unwrap_or("-"),
        tier = ctx.tenant.as_ref().map(|t| &*t.tier.name).unwrap_or("-"),
        key_id = ctx.key_id.as_deref().unwrap_or("-"),
        rule = ctx.rule.as_ref().map(|r| &*r.name).unwrap_or("-"),
        decision = ctx.decision.as_str(),
        reason = ctx.reject.as_ref().map(|r| r.code()).unwrap_or("-"),
        status,
        bytes_in = session.body_bytes_read(),
        bytes_out = session.body_bytes_sent(),
        upstream = ctx.upstream.as_deref().unwrap_or("-"),
        upstream_ms,
        total_ms,
        client_ip = ctx.client_ip.map(|i| i.to_string()).unwrap_or_default(),
        charge_metric = charge.map(|c| &**c.0).unwrap_or("-"),
        charge_units = charge.map(|c| c.1),
        quota_metric = quota.map(|q| &*q.metric).unwrap_or("-"),
        quota_remaining = quota.map(|q| q.remaining),
        "request"
    );
}
