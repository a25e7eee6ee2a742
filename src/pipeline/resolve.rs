//! Stage 1, resolve: read what the request says about itself, before trusting any of it.
//!
//! It finds the credential (if any), the tenant each configured source names, the host, the
//! routing path and the client address. It rejects only malformed input: oversized or
//! duplicated security-relevant headers, and two non-key sources that name different tenants.
//! It does not look anything up; [`super::authenticate`] decides what to believe.

use crate::config::{Source, Tenancy};
use crate::directory::canonical_ip;
use crate::error::Reject;
use http::header::{AUTHORIZATION, HOST};
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
    /// Host without port; compared case-insensitively.
    pub host: Cow<'r, str>,
    /// The path rules match and the upstream receives (tenant prefix stripped, normalized).
    pub path: Cow<'r, str>,
    pub query: Option<&'r str>,
    /// `true` when `path` differs from the client's path.
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

/// The host the client asked for: `:authority` for h2, else the `Host` header; port removed.
fn host(req: &RequestHeader) -> Result<&str, Reject> {
    if let Some(h) = req.uri.host() {
        return Ok(h);
    }
    let Some(v) = single(&req.headers, &HOST)? else { return Ok("") };
    let s = v.to_str().map_err(|_| Reject::BadRequest { detail: "The Host header is not valid ASCII.".into() })?;
    // Strip a port, keeping bracketed IPv6 literals whole.
    let without_port = if s.starts_with('[') {
        s.find(']').map(|i| &s[..=i]).unwrap_or(s)
    } else {
        s.rsplit_once(':').map(|(h, _)| h).unwrap_or(s)
    };
    Ok(without_port)
}

fn lower(s: &str) -> Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(s.to_ascii_lowercase())
    } else {
        Cow::Borrowed(s)
    }
}

/// Normalizes a path for matching and forwarding: decodes percent-encoded unreserved
/// characters, merges `//`, and resolves `.` and `..`, so `/%69nternal/../internal/x` cannot
/// slip past a rule on `/internal/**`. Returns `None` when the path is already normal.
pub fn normalize_path(path: &str) -> Option<String> {
    let needs = path.contains('%') || path.contains("//") || path.contains("/.");
    if !needs {
        return None;
    }
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(c) = hex {
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    decoded.push(c);
                    i += 3;
                    continue;
                }
            }
        }
        decoded.push(bytes[i]);
        i += 1;
    }
    let decoded = String::from_utf8(decoded).ok()?;
    let mut out: Vec<&str> = Vec::new();
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut norm = String::with_capacity(decoded.len());
    for s in &out {
        norm.push('/');
        norm.push_str(s);
    }
    if norm.is_empty() || (trailing && !norm.ends_with('/')) {
        norm.push('/');
    }
    (norm != path).then_some(norm)
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

/// Runs the stage.
pub fn resolve<'r>(
    tenancy: &Tenancy,
    max_header_bytes: usize,
    req: &'r RequestHeader,
    peer: Option<IpAddr>,
) -> Result<Hints<'r>, Reject> {
    if head_size(req) > max_header_bytes {
        return Err(Reject::HeadersTooLarge { limit: max_header_bytes });
    }
    let headers = &req.headers;
    let credential = if tenancy.uses(Source::ApiKey) { credential(tenancy, headers)? } else { None };
    let host = lower(host(req)?);
    let client_ip = client_ip(tenancy, peer, headers);

    let raw_path = req.uri.path();
    let query = req.uri.query();
    let mut path: Cow<'r, str> = Cow::Borrowed(raw_path);
    let mut claims: [Option<Claim<'r>>; 3] = [None, None, None];
    let mut n = 0;
    for source in &tenancy.resolve {
        let claim = match source {
            Source::ApiKey => None,
            Source::Subdomain => tenancy.base_domain.as_deref().and_then(|base| {
                let label = host.strip_suffix(base)?.strip_suffix('.')?;
                (!label.is_empty() && !label.contains('.'))
                    .then(|| Claim { source: Source::Subdomain, tenant: Cow::Owned(label.to_string()) })
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
                path = Cow::Borrowed(tail);
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
    let mut path_rewritten = matches!(path, Cow::Borrowed(p) if p.len() != raw_path.len());
    if let Some(norm) = normalize_path(&path) {
        path = Cow::Owned(norm);
        path_rewritten = true;
    }
    Ok(Hints { credential, claim: first, host, path, query, path_rewritten, client_ip })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_paths() {
        assert_eq!(normalize_path("/api/x"), None);
        assert_eq!(normalize_path("/%69nternal/x").as_deref(), Some("/internal/x"));
        assert_eq!(normalize_path("/a/../internal//x").as_deref(), Some("/internal/x"));
        assert_eq!(normalize_path("/a/./b/").as_deref(), Some("/a/b/"));
        assert_eq!(normalize_path("/%2F"), None);
        assert_eq!(normalize_path("/.."), Some("/".into()));
    }

    #[test]
    fn trims_credentials() {
        assert_eq!(trim(b"  abc \t"), b"abc");
        assert_eq!(trim(b"   "), b"");
    }
}
