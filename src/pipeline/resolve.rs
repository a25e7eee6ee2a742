//! Stage 1, resolve: read what the request says about itself, before trusting any of it.
//!
//! It works on the [`Canonical`] view, never on the raw target or `Host`, so every spelling of
//! a host or a `/t/{tenant}/` prefix resolves to the same tenant. It finds the credential (if
//! any), the tenant each configured source names, the routing path and the client address. It
//! rejects only malformed input: oversized or duplicated security-relevant headers, and two
//! non-key sources that name different tenants. It does not look anything up;
//! the authenticate stage decides what to believe.
//!
//! With `jwt` a source, a bearer token is found here too (not checked: the token stage does
//! that): an `Authorization: Bearer` value with a dot is a token, one without is an API key
//! (a token when API keys are not a source); the `[jwt]` header or cookie may carry one as
//! well. A request with both an API key and a token, or with two different tokens, is refused.

use super::canonical::Canonical;
use crate::config::{Source, Tenancy};
use crate::directory::canonical_ip;
use crate::error::Reject;
use http::header::{AUTHORIZATION, COOKIE};
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
    /// The presented bearer token (`jwt` resolution), if any, not yet checked. Never logged.
    pub token: Option<&'r [u8]>,
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
/// Bearer scheme; any other header carries the key as its whole value. `skip_authorization`:
/// its value was taken as a token.
fn credential<'r>(
    tenancy: &Tenancy,
    headers: &'r HeaderMap,
    skip_authorization: bool,
) -> Result<Option<&'r [u8]>, Reject> {
    let mut found: Option<&'r [u8]> = None;
    for name in &tenancy.key_headers {
        if skip_authorization && *name == AUTHORIZATION {
            continue;
        }
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

fn bad_token(detail: &str) -> Reject {
    Reject::InvalidToken { detail: detail.into() }
}

/// The bearer token of `Authorization`, when it holds one: a Bearer value with a dot, or any
/// Bearer value when API keys cannot take it (`keys` false). `None` leaves the header to the
/// API key.
fn bearer_token(raw: &[u8], keys: bool) -> Result<Option<&[u8]>, Reject> {
    let (scheme, rest) = match raw.iter().position(|b| *b == b' ') {
        Some(i) => (&raw[..i], &raw[i + 1..]),
        None => (raw, &raw[raw.len()..]),
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return if keys { Ok(None) } else { Err(bad_token("send it as `Authorization: Bearer <token>`")) };
    }
    let value = trim(rest);
    if keys && !value.contains(&b'.') {
        return Ok(None);
    }
    token_shape(value).map(Some)
}

/// A token value: not empty. Its shape is checked by the token stage when the token is not a
/// verified one already (its cache is keyed by the exact bytes), so a known token is not
/// scanned twice.
fn token_shape(value: &[u8]) -> Result<&[u8], Reject> {
    if value.is_empty() {
        return Err(bad_token("the token is empty"));
    }
    Ok(value)
}

/// The token in the `[jwt]` cookie: every `Cookie` header is read, and the cookie may appear
/// more than once only with the same value.
fn cookie_token<'r>(headers: &'r HeaderMap, name: &str) -> Result<Option<&'r [u8]>, Reject> {
    let mut found: Option<&'r [u8]> = None;
    for value in headers.get_all(COOKIE) {
        for pair in value.as_bytes().split(|b| *b == b';') {
            let pair = trim(pair);
            let Some(eq) = pair.iter().position(|b| *b == b'=') else { continue };
            if trim(&pair[..eq]) != name.as_bytes() {
                continue;
            }
            let mut v = trim(&pair[eq + 1..]);
            if v.len() >= 2 && v[0] == b'"' && v[v.len() - 1] == b'"' {
                v = &v[1..v.len() - 1];
            }
            match found {
                Some(prev) if prev != v => {
                    return Err(Reject::BadRequest {
                        detail: format!("The `{name}` cookie is sent twice with different values; send it once."),
                    })
                }
                _ => found = Some(v),
            }
        }
    }
    found.map(token_shape).transpose()
}

/// The token the request carries, from `Authorization`, the `[jwt]` header or the `[jwt]`
/// cookie (all of them must agree), and whether `Authorization` was taken for it.
fn token<'r>(tenancy: &Tenancy, headers: &'r HeaderMap) -> Result<(Option<&'r [u8]>, bool), Reject> {
    let keys = tenancy.uses(Source::ApiKey) && tenancy.key_headers.contains(&AUTHORIZATION);
    let mut found = match single(headers, &AUTHORIZATION)? {
        Some(v) => bearer_token(v.as_bytes(), keys)?,
        None => None,
    };
    let from_authorization = found.is_some();
    let header = match &tenancy.token_header {
        Some(name) => match single(headers, name)? {
            Some(v) => {
                let raw = trim(v.as_bytes());
                // The header holds the token, with or without a `Bearer ` prefix.
                let raw = match raw.get(..7) {
                    Some(p) if p.eq_ignore_ascii_case(b"bearer ") => trim(&raw[7..]),
                    _ => raw,
                };
                Some(token_shape(raw)?)
            }
            None => None,
        },
        None => None,
    };
    let cookie = match &tenancy.token_cookie {
        Some(name) => cookie_token(headers, name)?,
        None => None,
    };
    for t in [header, cookie].into_iter().flatten() {
        match found {
            Some(prev) if prev != t => {
                return Err(Reject::BadRequest {
                    detail: "The request carries two different tokens; send exactly one.".into(),
                })
            }
            _ => found = Some(t),
        }
    }
    Ok((found, from_authorization))
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
    let (token, token_in_authorization) =
        if tenancy.uses(Source::Jwt) { token(tenancy, headers)? } else { (None, false) };
    let credential =
        if tenancy.uses(Source::ApiKey) { credential(tenancy, headers, token_in_authorization)? } else { None };
    if credential.is_some() && token.is_some() {
        return Err(Reject::BadRequest {
            detail: "The request carries both an API key and a token; send exactly one.".into(),
        });
    }
    let host = canon.host();
    let client_ip = client_ip(tenancy, peer, headers);

    let raw_path = canon.path();
    let query = canon.query();
    let mut path: &'r str = raw_path;
    let mut claims: [Option<Claim<'r>>; 3] = [None, None, None];
    let mut n = 0;
    for source in &tenancy.resolve {
        let claim = match source {
            // Credentials, found above; what they name is decided when they are checked.
            Source::ApiKey | Source::Jwt => None,
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
    Ok(Hints { credential, token, claim: first, host, path, query, path_rewritten, client_ip })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_values_with_a_dot_are_tokens_when_keys_are_on() {
        let t = b"Bearer eyJh.eyJw.sig";
        assert_eq!(bearer_token(t, true), Ok(Some(&t[7..])));
        assert_eq!(bearer_token(b"bearer   eyJh.eyJw.sig  ", true), Ok(Some(&b"eyJh.eyJw.sig"[..])));
        assert_eq!(bearer_token(b"Bearer tg_live_abc", true), Ok(None), "an API key");
        assert_eq!(bearer_token(b"Basic dXNlcjpwYXNz", true), Ok(None), "left to the key check");
        assert_eq!(bearer_token(b"Bearer tg_live_abc", false), Ok(Some(&b"tg_live_abc"[..])), "no keys: a token");
        assert!(bearer_token(b"Bearer ", false).is_err(), "an empty token");
        assert!(bearer_token(b"Basic dXNlcjpwYXNz", false).is_err());
        // A value with a dot is a token, whatever its shape: the token stage judges it.
        assert_eq!(bearer_token(b"Bearer a.b", true), Ok(Some(&b"a.b"[..])));
    }

    #[test]
    fn tokens_come_from_a_cookie_among_others() {
        let mut h = HeaderMap::new();
        h.append(COOKIE, http::HeaderValue::from_static("theme=dark; session=a.b.c"));
        h.append(COOKIE, http::HeaderValue::from_static("lang=en; session=\"a.b.c\""));
        assert_eq!(cookie_token(&h, "session"), Ok(Some(&b"a.b.c"[..])));
        assert_eq!(cookie_token(&h, "other"), Ok(None));
        h.append(COOKIE, http::HeaderValue::from_static("session=x.y.z"));
        assert!(matches!(cookie_token(&h, "session"), Err(Reject::BadRequest { .. })));
    }

    #[test]
    fn trims_credentials() {
        assert_eq!(trim(b"  abc \t"), b"abc");
        assert_eq!(trim(b"   "), b"");
    }
}
