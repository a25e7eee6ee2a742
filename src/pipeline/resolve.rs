//! Stage 1, resolve: read what the request says about itself, before trusting any of it.
//!
//! It works on the [`Canonical`] view, never on the raw target or `Host`, so every spelling of
//! a host or a `/t/{tenant}/` prefix resolves to the same tenant. It finds the credential (if
//! any), the tenant each configured source names, the routing path and the client address. It
//! rejects only malformed input: oversized or duplicated security-relevant headers, and two
//! non-key sources that name different tenants. It does not look anything up;
//! the authenticate stage decides what to believe.

use super::canonical::Canonical;
use crate::config::{Source, Tenancy};
use crate::directory::canonical_ip;
use crate::error::Reject;
use http::header::AUTHORIZATION;
use http::HeaderMap;
use pingora::http::RequestHeader;
use std::borrow::Cow;
use std::net::IpAddr;

/// A tenant named by a source other than the API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim<'r> {
    pub source: Source,
    pub tenant: Cow<'r, str>,
}

/// What the request says, unverified.
#[derive(Debug)]
pub struct Hints<'r> {
    /// The presented key secret, if any. Never logged.
    pub credential: Option<&'r [u8]>,
    /// The first tenant named by a non-key source, in configured order.
    pub claim: Option<Claim<'r>>,
    /// The canonical host: lower case, no port, no trailing dot.
    pub host: &'r str,
    /// The path rules match and the upstream receives (canonical, tenant prefix stripped).
    pub path: &'r str,
    /// The canonical query.
    pub query: Option<&'r str>,
    /// `true` when the upstream must be sent `path?query` instead of the client's target.
    pub path_rewritten: bool,
    pub client_ip: Option<IpAddr>,
}

/// Size of the request head as the client sent it (approximately: names, values, separators).
fn head_size(req: &RequestHeader) -> usize {
    let uri = req.uri.path_and_query().map(|p| p.as_str().len()).unwrap_or(0);
    req.headers.iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum::<usize>() + uri + 16
}

fn single<'r>(headers: &'r HeaderMap, name: &http::HeaderName) -> Result<Option<&'r http::HeaderValue>, Reject> {
    let mut it = headers.get_all(name).iter();
    let first = it.next();
    if it.next().is_some() {
        return Err(Reject::DuplicateHeader { header: name.as_str().to_string() });
    }
    Ok(first)
}

/// Extracts the credential from the configured key headers. `Authorization` must use the
/// Bearer scheme; any other header carries the key as its whole value.
fn credential<'r>(tenancy: &Tenancy, headers: &'r HeaderMap) -> Result<Option<&'r [u8]>, Reject> {
    let mut found: Option<&'r [u8]> = None;
    for name in &tenancy.key_headers {
        let Some(value) = single(headers, name)? else { continue };
        let raw = value.as_bytes();
        let secret = if *name == AUTHORIZATION {
            let (scheme, rest) = match raw.iter().position(|b| *b == b' ') {
                Some(i) => (&raw[..i], &raw[i + 1..]),
                None => (raw, &raw[raw.len()..]),
            };
            if !scheme.eq_ignore_ascii_case(b"bearer") {
                return Err(Reject::InvalidKey);
            }
            trim(rest)
        } else {
            trim(raw)
        };
        if !crate::keys::well_formed(secret) {
            return Err(Reject::InvalidKey);
        }
        match found {
            Some(prev) if prev != secret => {
                return Err(Reject::BadRequest {
                    detail: "The request carries two different API keys; send exactly one.".into(),
                })
            }
            _ => found = Some(secret),
        }
    }
    Ok(found)
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| *c != b' ' && *c != b'\t').unwrap_or(b.len());
    let end = b.iter().rposition(|c| *c != b' ' && *c != b'\t').map(|i| i + 1).unwrap_or(start);
    &b[start..end.max(start)]
}

fn lower(s: &str) -> Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(s.to_ascii_lowercase())
    } else {
        Cow::Borrowed(s)
    }
}

/// The client's address: the peer, or, when the peer is a trusted proxy, the right-most
/// `X-Forwarded-For` entry that is not itself a trusted proxy.
pub fn client_ip(tenancy: &Tenancy, peer: Option<IpAddr>, headers: &HeaderMap) -> Option<IpAddr> {
    let peer = canonical_ip(peer?);
    let trusted = |ip: &IpAddr| tenancy.trusted_proxies.iter().any(|n| n.contains(ip));
    if !trusted(&peer) {
        return Some(peer);
    }
    let mut candidate = peer;
    for value in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(s) = value.to_str() else { break };
        for part in s.rsplit(',') {
            match part.trim().parse::<IpAddr>() {
                Ok(ip) => {
                    let ip = canonical_ip(ip);
                    candidate = ip;
                    if !trusted(&ip) {
                        return Some(ip);
                    }
                }
                Err(_) => return Some(candidate),
            }
        }
    }
    Some(candidate)
}

/// Checks the head's size before anything else reads it.
pub fn check_size(req: &RequestHeader, max_header_bytes: usize) -> Result<(), Reject> {
    if head_size(req) > max_header_bytes {
        return Err(Reject::HeadersTooLarge { limit: max_header_bytes });
    }
    Ok(())
}

/// Runs the stage.
pub fn resolve<'r>(
    tenancy: &Tenancy,
    canon: &'r Canonical<'_>,
    req: &'r RequestHeader,
    peer: Option<IpAddr>,
) -> Result<Hints<'r>, Reject> {
    let headers = &req.headers;
    let credential = if tenancy.uses(Source::ApiKey) { credential(tenancy, headers)? } else { None };
    let host = canon.host();
    let client_ip = client_ip(tenancy, peer, headers);

    let raw_path = canon.path();
    let query = canon.query();
    let mut path: &'r str = raw_path;
    let mut claims: [Option<Claim<'r>>; 3] = [None, None, None];
    let mut n = 0;
    for source in &tenancy.resolve {
        let claim = match source {
            Source::ApiKey => None,
            Source::Subdomain => tenancy.base_domain.as_deref().and_then(|base| {
                let label = host.strip_suffix(base)?.strip_suffix('.')?;
                (!label.is_empty() && !label.contains('.'))
                    .then_some(Claim { source: Source::Subdomain, tenant: Cow::Borrowed(label) })
            }),
            Source::Header => {
                // Anyone can send a header: it names a tenant only when a trusted proxy set it.
                let peer_trusted =
                    peer.is_some_and(|p| tenancy.trusted_proxies.iter().any(|n| n.contains(&canonical_ip(p))));
                match single(headers, &tenancy.tenant_header)? {
                    Some(v) if peer_trusted => {
                        let s = v.to_str().map_err(|_| Reject::BadRequest {
                            detail: format!("The `{}` header is not valid ASCII.", tenancy.tenant_header),
                        })?;
                        let s = s.trim();
                        (!s.is_empty()).then(|| Claim { source: Source::Header, tenant: lower(s) })
                    }
                    _ => None,
                }
            }
            Source::Path => raw_path.strip_prefix("/t/").and_then(|rest| {
                let (tenant, tail) = match rest.find('/') {
                    Some(i) => (&rest[..i], &rest[i..]),
                    None => (rest, "/"),
                };
                if tenant.is_empty() {
                    return None;
                }
                path = tail;
                Some(Claim { source: Source::Path, tenant: lower(tenant) })
            }),
        };
        if let Some(c) = claim {
            claims[n] = Some(c);
            n += 1;
        }
    }
    // Two sources naming different tenants is a conflict whether or not a key is present.
    let mut first: Option<Claim<'r>> = None;
    for c in claims.into_iter().flatten() {
        match &first {
            None => first = Some(c),
            Some(f) if f.tenant != c.tenant => {
                return Err(Reject::TenantMismatch { key_tenant: f.tenant.to_string(), claimed: c.tenant.to_string() })
            }
            Some(_) => {}
        }
    }
    let path_rewritten = canon.rewritten() || path.len() != raw_path.len();
    Ok(Hints { credential, claim: first, host, path, query, path_rewritten, client_ip })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_credentials() {
        assert_eq!(trim(b"  abc \t"), b"abc");
        assert_eq!(trim(b"   "), b"");
    }
}
