//! Stage: meter. Runs in `logging` for every request, forwarded or rejected.
//!
//! Today it writes the access log: one structured `tracing` event per request, target
//! `tollgate::access`, with the request id, tenant, key id (never the key), rule, decision,
//! status, bytes and timings.

use super::ctx::RequestCtx;
use pingora::proxy::Session;

/// Records the finished request.
pub fn record(session: &Session, ctx: &RequestCtx, access_log: bool) {
    if !access_log {
        return;
    }
    let req = session.req_header();
    let total_ms = ctx.started.elapsed().as_secs_f64() * 1000.0;
    let upstream_ms = ctx.upstream_time.map(|d| d.as_secs_f64() * 1000.0);
    let status = session.response_written().map(|r| r.status.as_u16()).unwrap_or(ctx.status);
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
        "request"
    );
}
