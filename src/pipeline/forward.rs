//! Stage: forward. Picks the upstream peer and rewrites the request and response headers.
//!
//! Header hygiene, in order: every client-sent `X-Tenant-*` header, the configured tenant
//! header and the credential headers are removed (the credential stays only with a rule's
//! `pass_credentials`); then the gateway's own identity headers are set; then the rule's
//! `set_request_headers`/`remove_request_headers` apply. The upstream therefore only ever sees
//! tenant identity that the gateway proved.

use super::ctx::RequestCtx;
use crate::config::UpstreamProtocol;
use crate::error::Reject;
use crate::upstream::Upstreams;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::upstreams::peer::HttpPeer;

/// Picks the next healthy server of `pool` and builds its peer with the pool's timeouts (a
/// rule's `timeout` replaces the read timeout).
pub fn peer(upstreams: &Upstreams, ctx: &RequestCtx) -> Result<Box<HttpPeer>, Reject> {
    let name = ctx.upstream.as_deref().unwrap_or("");
    let pool = upstreams.get(name).ok_or_else(|| Reject::UpstreamUnavailable { upstream: name.to_string() })?;
    // Nothing was tried, so this is a 503 that says when the next health check runs, not the
    // 502 of a server that failed the request.
    let backend = pool.lb.select(b"", 256).ok_or_else(|| Reject::NoHealthyUpstream {
        upstream: name.to_string(),
        retry_after: pool.retry_after_secs(),
    })?;
    let cfg = &pool.config;
    let mut peer = match cfg.protocol {
        UpstreamProtocol::H1 => Box::new(HttpPeer::new(backend.addr, false, String::new())),
        UpstreamProtocol::H2c => {
            // HTTP/2 with prior knowledge: Pingora speaks h2 to a plaintext peer whose lowest
            // version is 2, without an upgrade round trip.
            let mut p = Box::new(HttpPeer::new(backend.addr, false, String::new()));
            p.options.set_http_version(2, 2);
            p
        }
        UpstreamProtocol::H2 => {
            // The certificate is checked against the pool's `host`, else the server's address.
            let sni =
                cfg.host.clone().or_else(|| backend.addr.as_inet().map(|a| a.ip().to_string())).unwrap_or_default();
            let mut p = Box::new(HttpPeer::new(backend.addr, true, sni));
            p.options.set_http_version(2, 2);
            p
        }
    };
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

    // Client-supplied identity never reaches the upstream; neither does a client-supplied origin
    // (address, host, scheme) unless a trusted proxy set it, since upstream frameworks build
    // client addresses and URLs from these headers. Most requests carry none of them, so the
    // names are only collected once one is seen.
    let peer_trusted = ctx.peer_trusted;
    let spoofable = |k: &http::HeaderName| {
        let n = k.as_str();
        n.starts_with("x-tenant-")
            || *k == tenancy.tenant_header
            || n == "x-key-id"
            || (!peer_trusted && is_origin_header(n))
    };
    if req.headers.keys().any(spoofable) {
        let names: Vec<http::HeaderName> = req.headers.keys().filter(|k| spoofable(k)).cloned().collect();
        for h in names {
            req.remove_header(&h);
        }
    }
    if !pass_credentials {
        for h in &tenancy.key_headers {
            req.remove_header(h);
        }
        if tenancy.uses(crate::config::Source::Jwt) {
            req.remove_header(&http::header::AUTHORIZATION);
            if let Some(h) = &tenancy.token_header {
                req.remove_header(h);
            }
            if let Some(name) = &tenancy.token_cookie {
                remove_cookie(req, name)?;
            }
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
    req.insert_header("x-request-id", ctx.request_id.header())?;
    if let Some(peer) = ctx.peer_ip {
        // A trusted proxy's chain is kept and extended with the proxy's own address; anyone
        // else's is replaced by the address the gateway actually saw.
        // A trusted proxy's chain is kept whole: every line, in order, as the gateway read it
        // to find the client.
        let mut lines = req.headers.get_all("x-forwarded-for").iter();
        let value = match (ctx.peer_trusted, lines.next(), lines.next()) {
            (true, Some(one), None) => forwarded_for(Some(one.as_bytes()), peer),
            (true, Some(first), Some(second)) => {
                let mut chain = first.as_bytes().to_vec();
                for v in std::iter::once(second).chain(lines) {
                    chain.extend_from_slice(b", ");
                    chain.extend_from_slice(v.as_bytes());
                }
                forwarded_for(Some(&chain), peer)
            }
            _ => forwarded_for(None, peer),
        };
        req.insert_header("x-forwarded-for", value)?;
    }
    if let Some(client) = ctx.client_ip {
        if !ctx.peer_trusted || !req.headers.contains_key("x-real-ip") {
            req.insert_header("x-real-ip", forwarded_for(None, client))?;
        }
    }
    req.insert_header("x-forwarded-proto", http::HeaderValue::from_static(if ctx.https { "https" } else { "http" }))?;
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

/// Takes the cookie `name` out of every `Cookie` header, keeping the other cookies.
fn remove_cookie(req: &mut RequestHeader, name: &str) -> pingora::Result<()> {
    let carries = |v: &http::HeaderValue| {
        v.as_bytes().split(|b| *b == b';').any(|p| p.trim_ascii().split(|b| *b == b'=').next() == Some(name.as_bytes()))
    };
    if !req.headers.get_all(http::header::COOKIE).iter().any(carries) {
        return Ok(());
    }
    let mut kept: Vec<&[u8]> = Vec::new();
    for v in req.headers.get_all(http::header::COOKIE) {
        for p in v.as_bytes().split(|b| *b == b';') {
            let p = p.trim_ascii();
            if !p.is_empty() && p.split(|b| *b == b'=').next().map(<[u8]>::trim_ascii) != Some(name.as_bytes()) {
                kept.push(p);
            }
        }
    }
    let joined = kept.join(&b"; "[..]);
    req.remove_header(&http::header::COOKIE);
    if !joined.is_empty() {
        let value = http::HeaderValue::from_bytes(&joined).map_err(|_| {
            pingora::Error::explain(pingora::ErrorType::InternalError, "cookie header does not rebuild")
        })?;
        req.insert_header(http::header::COOKIE, value)?;
    }
    Ok(())
}

/// `X-Forwarded-For`: `prev, peer` (a trusted proxy's chain, extended), or `peer` alone. Written
/// into one buffer on the stack, copied once into the header.
fn forwarded_for(prev: Option<&[u8]>, peer: std::net::IpAddr) -> http::HeaderValue {
    use std::io::Write;
    let mut small = [0u8; 64];
    let mut cursor = std::io::Cursor::new(&mut small[..]);
    let written = match peer {
        std::net::IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            write_octets(&mut cursor, [a, b, c, d])
        }
        // An IPv6 address is at most 45 characters; the formatter is fine for the rarer case.
        std::net::IpAddr::V6(v6) => write!(cursor, "{v6}").is_ok(),
    };
    let len = cursor.position() as usize;
    let peer_text = if written { &small[..len] } else { &b"-"[..] };
    let value = match prev {
        Some(prev) => {
            let mut v = Vec::with_capacity(prev.len() + 2 + peer_text.len());
            v.extend_from_slice(prev);
            v.extend_from_slice(b", ");
            v.extend_from_slice(peer_text);
            http::HeaderValue::from_bytes(&v)
        }
        None => http::HeaderValue::from_bytes(peer_text),
    };
    // Both parts are header-safe (a value the client sent, an address), so this only falls back
    // in theory.
    value.unwrap_or_else(|_| http::HeaderValue::from_static("-"))
}

/// An IPv4 address in dotted decimal, without the formatting machinery.
fn write_octets(out: &mut std::io::Cursor<&mut [u8]>, octets: [u8; 4]) -> bool {
    use std::io::Write;
    let mut buf = [0u8; 15];
    let mut n = 0;
    for (i, o) in octets.into_iter().enumerate() {
        if i > 0 {
            buf[n] = b'.';
            n += 1;
        }
        if o >= 100 {
            buf[n] = b'0' + o / 100;
            n += 1;
        }
        if o >= 10 {
            buf[n] = b'0' + o / 10 % 10;
            n += 1;
        }
        buf[n] = b'0' + o % 10;
        n += 1;
    }
    out.write_all(&buf[..n]).is_ok()
}

/// Headers that tell an upstream where a request came from. From an untrusted peer they are the
/// client's own claims, so they are removed; the gateway sets `X-Forwarded-For`,
/// `X-Forwarded-Proto` and `X-Real-IP` itself.
fn is_origin_header(name: &str) -> bool {
    matches!(
        name,
        "forwarded"
            | "x-real-ip"
            | "x-client-ip"
            | "x-cluster-client-ip"
            | "true-client-ip"
            | "cf-connecting-ip"
            | "fastly-client-ip"
    ) || name.starts_with("x-forwarded-")
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
    resp.insert_header("x-request-id", ctx.request_id.header())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn forwarded_for_is_the_address_or_the_extended_chain() {
        for ip in ["127.0.0.1", "0.0.0.0", "10.20.3.255", "192.168.100.9", "::1", "2001:db8::8a2e:370:7334"] {
            let addr: IpAddr = ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}"));
            assert_eq!(forwarded_for(None, addr), ip);
            assert_eq!(
                forwarded_for(Some(b"203.0.113.7, 10.0.0.1"), addr),
                format!("203.0.113.7, 10.0.0.1, {ip}").as_str()
            );
        }
    }
}
