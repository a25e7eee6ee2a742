//! Stage: forward. Picks the upstream peer and rewrites the request and response headers.
//!
//! Header hygiene, in order: every client-sent `X-Tenant-*` header, the configured tenant
//! header and the credential headers are removed (the credential stays only with a rule's
//! `pass_credentials`); then the gateway's own identity headers are set; then the rule's
//! `set_request_headers`/`remove_request_headers` apply. The upstream therefore only ever sees
//! tenant identity that the gateway proved.

use super::ctx::RequestCtx;
use crate::error::Reject;
use crate::upstream::Upstreams;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::upstreams::peer::HttpPeer;

/// Picks the next healthy server of `pool` and builds its peer with the pool's timeouts (a
/// rule's `timeout` replaces the read timeout).
pub fn peer(upstreams: &Upstreams, ctx: &RequestCtx) -> Result<Box<HttpPeer>, Reject> {
    let name = ctx.upstream.as_deref().unwrap_or("");
    let pool = upstreams.get(name).ok_or(Reject::UpstreamUnavailable { upstream: name.to_string() })?;
    // Nothing was tried, so this is a 503 that says when the next health check runs, not the
    // 502 of a server that failed the request.
    let backend = pool.lb.select(b"", 256).ok_or_else(|| Reject::NoHealthyUpstream {
        upstream: name.to_string(),
        retry_after: pool.retry_after_secs(),
    })?;
    let mut peer = Box::new(HttpPeer::new(backend.addr, false, String::new()));
    let cfg = &pool.config;
    let read_timeout = ctx.rule.as_ref().and_then(|r| r.actions.timeout).unwrap_or(cfg.read_timeout);
    peer.options.connection_timeout = Some(cfg.connect_timeout);
    peer.options.total_connection_timeout = Some(cfg.connect_timeout);
    peer.options.read_timeout = Some(read_timeout);
    peer.options.write_timeout = Some(cfg.write_timeout);
    peer.options.idle_timeout = Some(std::time::Duration::from_secs(60));
    Ok(peer)
}

/// Rewrites the request that goes upstream.
pub fn upstream_request(req: &mut RequestHeader, ctx: &RequestCtx, pool_host: Option<&str>) -> pingora::Result<()> {
    let Some(rt) = ctx.runtime.as_ref() else { return Ok(()) };
    let tenancy = &rt.config.tenancy;
    let pass_credentials = ctx.rule.as_ref().is_some_and(|r| r.actions.pass_credentials);

    // Client-supplied identity never reaches the upstream.
    let spoofable: Vec<http::HeaderName> = req
        .headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-tenant-") || *k == tenancy.tenant_header || *k == "x-key-id")
        .cloned()
        .collect();
    for h in spoofable {
        req.remove_header(&h);
    }
    if !pass_credentials {
        for h in &tenancy.key_headers {
            req.remove_header(h);
        }
    }

    if let Some(uri) = &ctx.upstream_uri {
        // The canonical target only holds visible ASCII, so it always parses; refusing here
        // rather than forwarding the client's spelling keeps "forward what was checked" true.
        let u = uri.parse::<http::Uri>().map_err(|_| {
            pingora::Error::explain(pingora::ErrorType::InternalError, "canonical target does not parse")
        })?;
        req.set_uri(u);
    }
    if let Some(host) = &ctx.upstream_host {
        req.insert_header(http::header::HOST, host.as_str())?;
    }
    if let Some(t) = &ctx.tenant {
        req.insert_header("x-tenant-id", &*t.id)?;
        req.insert_header("x-tenant-tier", &*t.tier.name)?;
    }
    if let Some(k) = &ctx.key_id {
        req.insert_header("x-key-id", &**k)?;
    }
    req.insert_header("x-request-id", ctx.request_id.as_str())?;
    if let Some(peer) = ctx.peer_ip {
        // A trusted proxy's chain is kept and extended with the proxy's own address; anyone
        // else's is replaced by the address the gateway actually saw.
        let prev = req.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
        let value = match (ctx.peer_trusted, prev) {
            (true, Some(prev)) => format!("{prev}, {peer}"),
            _ => peer.to_string(),
        };
        req.insert_header("x-forwarded-for", value)?;
    }
    req.insert_header("x-forwarded-proto", if ctx.https { "https" } else { "http" })?;
    if let Some(host) = pool_host {
        req.insert_header(http::header::HOST, host)?;
    }
    if let Some(rule) = &ctx.rule {
        for h in &rule.actions.remove_request_headers {
            req.remove_header(h);
        }
        for (k, v) in &rule.actions.set_request_headers {
            req.insert_header(k.clone(), v.clone())?;
        }
    }
    Ok(())
}

/// Rewrites the response that goes to the client.
pub fn downstream_response(resp: &mut ResponseHeader, ctx: &RequestCtx) -> pingora::Result<()> {
    if let Some(rule) = &ctx.rule {
        for h in &rule.actions.remove_response_headers {
            resp.remove_header(h);
        }
        for (k, v) in &rule.actions.set_response_headers {
            resp.insert_header(k.clone(), v.clone())?;
        }
    }
    resp.insert_header("x-request-id", ctx.request_id.as_str())?;
    Ok(())
}
