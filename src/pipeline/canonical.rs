//! Stage 0, canonicalize: the one view of a request that every later stage uses.
//!
//! A gateway's checks are only as good as its agreement with the upstream about what was asked.
//! This module reads the method, the request-target and the host exactly once, refuses every
//! spelling it cannot make unambiguous, and produces a [`Canonical`] request: the method as HTTP
//! defines it, an origin-form path with dot segments, repeated slashes and encoded unreserved
//! characters resolved, the query with encoded unreserved characters decoded, and one lower-case
//! host without port or trailing dot. Tenant resolution, rule matching, limits, forwarding and
//! `tollgate rules explain` all read this value, and the upstream receives the canonical target,
//! so no stage can check one spelling while another stage (or the upstream) acts on a different one.
//!
//! Guarantees, for a request that passes:
//! - the method is one of `[server] allowed_methods`, compared byte for byte (methods are
//!   case-sensitive: `delete` is not `DELETE` and is refused, not matched or forwarded);
//! - the target was origin-form (`/path?query`) or absolute-form (`http://host/path`); the
//!   authority-form, the asterisk-form and relative targets are refused;
//! - the path starts with `/`, has no `.`/`..` segments, no empty segments, no encoded
//!   unreserved characters, and no `%2F`, `%5C`, `%00`, `\` or `;` (spellings that some upstream
//!   servers decode into a different path than the one checked), and percent-escapes use
//!   upper-case hex;
//! - exactly one host was named: one `Host` header, or the absolute-form authority, or both
//!   agreeing (case- and trailing-dot-insensitively, ports ignored);
//! - the framing is unambiguous: at most one `Content-Length` holding one number, a
//!   `Transfer-Encoding` of exactly `chunked`, no `Connection` token naming a header the gateway
//!   sets or checks, and no underscore spelling of such a header.
//!
//! Nothing here allocates for a request that is already canonical.

use crate::error::Reject;
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, Method};
use std::borrow::Cow;

/// What the canonical view needs from the configuration; borrowed, so building one per
/// request costs nothing.
#[derive(Debug, Clone, Copy)]
pub struct RequestPolicy<'c> {
    /// Methods a request may use (`[server] allowed_methods`).
    pub allowed_methods: &'c [Method],
    /// The `Allow` header value listing `allowed_methods`.
    pub allow_header: &'c str,
    /// Headers that carry credentials or name a tenant, on top of [`GATEWAY_HEADERS`].
    pub key_headers: &'c [HeaderName],
    pub tenant_header: Option<&'c HeaderName>,
    /// Headers the rules read or write (`RuleSet::named_headers`), protected like the gateway's.
    pub rule_headers: &'c [HeaderName],
    /// Headers the rules read (`RuleSet::read_headers`): sent twice, refused.
    pub read_headers: &'c [HeaderName],
    /// Query parameters the rules read (`RuleSet::named_query`): sent twice, refused.
    pub read_query: &'c [String],
}

/// Headers the gateway sets or checks itself. A client may neither name them in `Connection`
/// (which would make the next hop drop them) nor imitate them with underscores (which some
/// upstream frameworks read as dashes).
pub const GATEWAY_HEADERS: &[&str] = &[
    "authorization",
    "content-length",
    "forwarded",
    "host",
    "transfer-encoding",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-key-id",
    "x-real-ip",
    "x-request-id",
];

impl<'c> RequestPolicy<'c> {
    /// The policy of a loaded config.
    pub fn of(config: &'c crate::config::Config) -> RequestPolicy<'c> {
        RequestPolicy {
            allowed_methods: &config.server.allowed_methods,
            allow_header: &config.server.allow_header,
            key_headers: &config.tenancy.key_headers,
            tenant_header: Some(&config.tenancy.tenant_header),
            rule_headers: &config.rules.named_headers,
            read_headers: &config.rules.read_headers,
            read_query: &config.rules.named_query,
        }
    }

    fn is_protected(&self, name: &str) -> bool {
        let starts = |p: &str| name.as_bytes().get(..p.len()).is_some_and(|b| b.eq_ignore_ascii_case(p.as_bytes()));
        starts("x-tenant-")
            || GATEWAY_HEADERS.iter().any(|h| h.eq_ignore_ascii_case(name))
            || self.key_headers.iter().any(|h| h.as_str().eq_ignore_ascii_case(name))
            || self.tenant_header.is_some_and(|h| h.as_str().eq_ignore_ascii_case(name))
            || self.rule_headers.iter().any(|h| h.as_str().eq_ignore_ascii_case(name))
    }
}

/// The request as every stage sees it. Only [`canonicalize`] builds one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Canonical<'r> {
    method: &'r Method,
    host: Cow<'r, str>,
    authority: Option<&'r str>,
    path: Cow<'r, str>,
    query: Option<Cow<'r, str>>,
    rewritten: bool,
}

impl<'r> Canonical<'r> {
    pub fn method(&self) -> &'r Method {
        self.method
    }
    /// Lower case, no port, no trailing dot; never empty.
    pub fn host(&self) -> &str {
        &self.host
    }
    /// The absolute-form authority (`host[:port]`) when the client sent no `Host` header: the
    /// forward stage sends it as `Host`, so the upstream sees the host that was checked.
    pub fn missing_host_header(&self) -> Option<&'r str> {
        self.authority
    }
    /// The normalized path, starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }
    pub fn query(&self) -> Option<&str> {
        self.query.as_deref()
    }
    /// `true` when the target the client sent is not byte-for-byte `path?query`: the upstream
    /// must then be sent the canonical target.
    pub fn rewritten(&self) -> bool {
        self.rewritten
    }
    /// The origin-form target to forward: `path` and, if any, `?query`.
    pub fn target(&self) -> String {
        let mut t = String::with_capacity(self.path.len() + self.query.as_ref().map_or(0, |q| q.len() + 1));
        t.push_str(&self.path);
        if let Some(q) = &self.query {
            t.push('?');
            t.push_str(q);
        }
        t
    }
}

fn invalid_target(detail: impl Into<String>) -> Reject {
    Reject::InvalidTarget { detail: detail.into() }
}

fn invalid_host(detail: impl Into<String>) -> Reject {
    Reject::InvalidHost { detail: detail.into() }
}

/// Checks the method against the policy.
pub fn check_method<'m>(method: &'m Method, policy: &RequestPolicy<'_>) -> Result<&'m Method, Reject> {
    if policy.allowed_methods.iter().any(|m| m == method) {
        return Ok(method);
    }
    let upper = method.as_str().to_ascii_uppercase();
    let case_only = upper != method.as_str() && policy.allowed_methods.iter().any(|m| m.as_str() == upper);
    Err(Reject::MethodNotAllowed {
        method: method.as_str().chars().take(32).collect(),
        allow: policy.allow_header.to_string(),
        case_only,
    })
}

/// [`canonicalize`] for a parsed request head.
pub fn of_request<'r>(
    req: &'r pingora::http::RequestHeader,
    policy: &RequestPolicy<'_>,
) -> Result<Canonical<'r>, Reject> {
    // An HTTP/2 request names its host in `:authority`, which Pingora keeps in the URI, and its
    // target in `:path` (the raw path): together they are what an absolute-form target is to
    // HTTP/1.1, and are checked the same way against a `host` header.
    let authority = if req.version == http::Version::HTTP_2 { req.uri.authority().map(|a| a.as_str()) } else { None };
    canonicalize_with(&req.method, req.raw_path(), authority, &req.headers, policy)
}

/// Builds the canonical view of a request head, or refuses it.
///
/// `raw_target` is the request-target exactly as received (Pingora's `raw_path`), `utf8` says
/// whether it was valid UTF-8.
pub fn canonicalize<'r>(
    method: &'r Method,
    raw_target: &'r [u8],
    headers: &'r HeaderMap,
    policy: &RequestPolicy<'_>,
) -> Result<Canonical<'r>, Reject> {
    canonicalize_with(method, raw_target, None, headers, policy)
}

/// [`canonicalize`], with the `:authority` of an HTTP/2 request.
fn canonicalize_with<'r>(
    method: &'r Method,
    raw_target: &'r [u8],
    h2_authority: Option<&'r str>,
    headers: &'r HeaderMap,
    policy: &RequestPolicy<'_>,
) -> Result<Canonical<'r>, Reject> {
    let method = check_method(method, policy)?;
    check_framing(headers, policy)?;

    let target =
        std::str::from_utf8(raw_target).map_err(|_| invalid_target("The request target is not valid UTF-8."))?;
    if let Some(b) = target.bytes().find(|b| !(0x21..0x7f).contains(b)) {
        return Err(invalid_target(format!("The request target contains the byte 0x{b:02x}; percent-encode it.")));
    }
    if target.contains('#') {
        return Err(invalid_target("The request target contains a fragment (`#`); fragments are not sent to servers."));
    }

    // Target form (RFC 9112 section 3.2).
    let (authority, path_and_query) = if target.starts_with('/') {
        if h2_authority.is_some_and(|a| a.contains('@')) {
            return Err(invalid_target(
                "The `:authority` carries user information (`user@`); send credentials in headers.",
            ));
        }
        (h2_authority, target)
    } else if let Some(rest) = strip_scheme(target) {
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (auth, pq) = rest.split_at(end);
        if auth.contains('@') {
            return Err(invalid_target(
                "The request target carries user information (`user@`); send credentials in headers.",
            ));
        }
        (Some(auth), pq)
    } else if target == "*" {
        return Err(invalid_target("The asterisk-form target (`*`) is not served; ask for a path such as `/`."));
    } else {
        return Err(invalid_target(format!(
            "The request target must be a path starting with `/` (or an absolute `http://` URL); got `{}`.",
            target.chars().take(64).collect::<String>()
        )));
    };

    // Host: from exactly one place, or from both places agreeing.
    let mut hosts = headers.get_all(HOST).iter();
    let header = hosts.next();
    if hosts.next().is_some() {
        return Err(Reject::DuplicateHeader { header: "host".into() });
    }
    let header_host = match header {
        Some(v) => {
            let s = v.to_str().map_err(|_| invalid_host("The Host header is not valid ASCII."))?;
            Some(canonical_host(s)?)
        }
        None => None,
    };
    let (host, missing_host_header) = match (authority, header_host) {
        (Some(a), Some(h)) => {
            let from_target = canonical_host(a)?;
            if from_target != h {
                return Err(invalid_host(format!(
                    "The request target names host `{from_target}` but the Host header names `{h}`; they must agree."
                )));
            }
            (h, None)
        }
        (Some(a), None) => (canonical_host(a)?, Some(a)),
        (None, Some(h)) => (h, None),
        (None, None) => {
            return Err(invalid_host("The request has no Host header; send `Host: <the API's host name>`."))
        }
    };

    let (raw_path, raw_query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let raw_path = if raw_path.is_empty() { "/" } else { raw_path };
    let path = normalize_path(raw_path)?;
    let query = match raw_query {
        None => None,
        Some(q) => Some(normalize_query(q)?),
    };
    if let Some(q) = &query {
        for name in policy.read_query {
            let mut it = q.split('&').filter(|pair| pair.split_once('=').map_or(*pair, |(k, _)| k) == name.as_str());
            if it.next().is_some() && it.next().is_some() {
                return Err(Reject::BadRequest {
                    detail: format!("The query parameter `{name}` appears more than once; send it once."),
                });
            }
        }
    }
    let rewritten = authority.is_some()
        || matches!(path, Cow::Owned(_))
        || matches!(query, Some(Cow::Owned(_)))
        || path_and_query.len() != raw_path.len() + raw_query.map_or(0, |q| q.len() + 1);
    Ok(Canonical { method, host, authority: missing_host_header, path, query, rewritten })
}

fn strip_scheme(target: &str) -> Option<&str> {
    for scheme in ["http://", "https://"] {
        if target.len() >= scheme.len() && target[..scheme.len()].eq_ignore_ascii_case(scheme) {
            return Some(&target[scheme.len()..]);
        }
    }
    None
}

/// Refuses framing that two HTTP parsers could read differently.
fn check_framing(headers: &HeaderMap, policy: &RequestPolicy<'_>) -> Result<(), Reject> {
    let mut cl = headers.get_all(CONTENT_LENGTH).iter();
    if let Some(v) = cl.next() {
        if cl.next().is_some() || v.as_bytes().contains(&b',') {
            return Err(Reject::DuplicateHeader { header: "content-length".into() });
        }
        let b = v.as_bytes();
        if b.is_empty() || b.len() > 19 || !b.iter().all(u8::is_ascii_digit) {
            return Err(Reject::BadRequest { detail: "Content-Length must be one decimal number of bytes.".into() });
        }
    }
    let mut te = headers.get_all(TRANSFER_ENCODING).iter();
    if let Some(v) = te.next() {
        if te.next().is_some() || !v.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Err(Reject::BadRequest {
                detail: "Transfer-Encoding must be exactly `chunked`, sent once.".into(),
            });
        }
    }
    for v in headers.get_all(CONNECTION) {
        let s = v
            .to_str()
            .map_err(|_| Reject::BadRequest { detail: "The Connection header is not valid ASCII.".into() })?;
        // Any other token makes the next hop drop a header after the gateway has read it, so
        // only the connection-management tokens themselves are accepted.
        for token in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if !["close", "keep-alive", "upgrade", "te"].iter().any(|ok| ok.eq_ignore_ascii_case(token)) {
                return Err(Reject::BadRequest {
                    detail: format!(
                        "`Connection: {}` would make the next hop drop a header the gateway has read; send only `keep-alive`, `close` or `upgrade`.",
                        token.chars().take(64).collect::<String>()
                    ),
                });
            }
        }
    }
    for name in policy.read_headers {
        let mut all = headers.get_all(name).iter();
        if all.next().is_some() && all.next().is_some() {
            return Err(Reject::DuplicateHeader { header: name.as_str().to_string() });
        }
    }
    for name in headers.keys() {
        let n = name.as_str();
        if n.contains('_') && policy.is_protected(&n.replace('_', "-")) {
            return Err(Reject::BadRequest {
                detail: format!(
                    "The header `{n}` imitates `{}` with underscores; send only the gateway's spelling.",
                    n.replace('_', "-")
                ),
            });
        }
    }
    Ok(())
}

/// The host part of a `Host` value or an authority: lower case, port removed, one trailing dot
/// removed. Refuses anything that is not a registered name, an IPv4 address or a bracketed IPv6
/// literal, so two spellings of one host cannot compare unequal.
pub fn canonical_host(value: &str) -> Result<Cow<'_, str>, Reject> {
    let value = value.trim_matches([' ', '\t']);
    let (host, port) = if let Some(rest) = value.strip_prefix('[') {
        let close = rest.find(']').ok_or_else(|| invalid_host("The IPv6 host literal has no closing `]`."))?;
        let (lit, after) = (&value[..close + 2], &rest[close + 1..]);
        if !lit[1..lit.len() - 1].bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.') {
            return Err(invalid_host("The IPv6 host literal is malformed."));
        }
        match after {
            "" => (lit, None),
            p if p.starts_with(':') => (lit, Some(&p[1..])),
            _ => return Err(invalid_host("Unexpected characters after the IPv6 host literal.")),
        }
    } else {
        match value.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (value, None),
        }
    };
    if let Some(p) = port {
        if p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) || p.parse::<u32>().map_or(true, |n| n > 65_535) {
            return Err(invalid_host(format!(
                "The port `{}` is not a number from 0 to 65535.",
                p.chars().take(16).collect::<String>()
            )));
        }
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return Err(invalid_host("The Host header is empty; send the API's host name."));
    }
    if host.len() > 253 {
        return Err(invalid_host("The host name is longer than 253 characters."));
    }
    if !host.starts_with('[') && !host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')) {
        return Err(invalid_host(format!(
            "`{}` is not a host name; use letters, digits, `-` and `.` only.",
            host.chars().take(64).collect::<String>()
        )));
    }
    if host.contains("..") || host.starts_with('.') || host.ends_with('.') {
        return Err(invalid_host("The host name has an empty label (`..`)."));
    }
    Ok(if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    })
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

/// Percent-decodes unreserved characters and upper-cases the hex of the escapes that stay.
/// `in_path` refuses the escapes and characters that some servers read as a path separator or
/// a string end.
fn decode_unreserved(s: &str, in_path: bool) -> Result<Cow<'_, str>, Reject> {
    let b = s.as_bytes();
    if in_path {
        if let Some(c) = b.iter().find(|c| matches!(c, b'\\' | b';')) {
            return Err(invalid_target(format!(
                "The path contains `{}`, which some servers read as a separator; percent-encode it in a query instead.",
                *c as char
            )));
        }
    }
    if !b.contains(&b'%') {
        return Ok(Cow::Borrowed(s));
    }
    let mut out = Vec::with_capacity(b.len());
    let mut changed = false;
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let (Some(h), Some(l)) = (b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) else {
            return Err(invalid_target("The request target has a `%` that is not followed by two hex digits."));
        };
        let c = h * 16 + l;
        if in_path && matches!(c, b'/' | b'\\' | 0 | b';') {
            return Err(invalid_target(format!(
                "The path contains an encoded `{}` (%{c:02X}), which servers disagree about; send the path without it.",
                if c == 0 { "NUL".to_string() } else { (c as char).to_string() }
            )));
        }
        if unreserved(c) {
            out.push(c);
            changed = true;
        } else {
            let upper = [b'%', b[i + 1].to_ascii_uppercase(), b[i + 2].to_ascii_uppercase()];
            changed |= upper[1] != b[i + 1] || upper[2] != b[i + 2];
            out.extend_from_slice(&upper);
        }
        i += 3;
    }
    if !changed {
        return Ok(Cow::Borrowed(s));
    }
    // Only ASCII went in and only ASCII came out.
    String::from_utf8(out).map(Cow::Owned).map_err(|_| invalid_target("The request target is not valid UTF-8."))
}

/// Normalizes an origin-form path: encoded unreserved characters decoded, `//` merged, `.`
/// and `..` resolved (never above the root), a trailing `/` kept. Refuses spellings that
/// upstream servers decode differently (see the module doc).
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, Reject> {
    if !path.starts_with('/') {
        return Err(invalid_target("The path must start with `/`."));
    }
    let decoded = decode_unreserved(path, true)?;
    let d = decoded.as_ref();
    let needs = d.contains("//") || d.contains("/./") || d.contains("/../") || d.ends_with("/.") || d.ends_with("/..");
    if !needs {
        return Ok(decoded);
    }
    let mut out: Vec<&str> = Vec::new();
    let trailing = d.ends_with('/') || d.ends_with("/.") || d.ends_with("/..");
    for seg in d.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut norm = String::with_capacity(d.len());
    for s in &out {
        norm.push('/');
        norm.push_str(s);
    }
    if norm.is_empty() || (trailing && !norm.ends_with('/')) {
        norm.push('/');
    }
    Ok(Cow::Owned(norm))
}

/// Normalizes a query: encoded unreserved characters decoded (so `n%75m_rows` is `num_rows`
/// to the gateway as it is to the upstream), other escapes in upper-case hex.
pub fn normalize_query(query: &str) -> Result<Cow<'_, str>, Reject> {
    decode_unreserved(query, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    fn canon(
        method: &str,
        target: &str,
        hs: &[(&str, &str)],
    ) -> Result<(String, String, Option<String>, bool), String> {
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        let h = headers(hs);
        let methods: Vec<Method> =
            crate::config::DEFAULT_METHODS.iter().map(|m| Method::from_bytes(m.as_bytes()).unwrap()).collect();
        let keys = [HeaderName::from_static("x-api-key")];
        let p = RequestPolicy {
            allowed_methods: &methods,
            allow_header: "GET",
            key_headers: &keys,
            tenant_header: None,
            rule_headers: &[],
            read_headers: &[],
            read_query: &[],
        };
        canonicalize(&m, target.as_bytes(), &h, &p)
            .map(|c| (c.host().to_string(), c.path().to_string(), c.query().map(str::to_string), c.rewritten()))
            .map_err(|r| r.code().to_string())
    }

    #[test]
    fn origin_form_passes_untouched() {
        let r = canon("GET", "/api/x?a=1", &[("host", "api.example.com")]).unwrap();
        assert_eq!(r, ("api.example.com".into(), "/api/x".into(), Some("a=1".into()), false));
    }

    #[test]
    fn normalizes_paths() {
        assert_eq!(normalize_path("/api/x").unwrap(), "/api/x");
        assert_eq!(normalize_path("/%69nternal/x").unwrap(), "/internal/x");
        assert_eq!(normalize_path("/a/../internal//x").unwrap(), "/internal/x");
        assert_eq!(normalize_path("/a/./b/").unwrap(), "/a/b/");
        assert_eq!(normalize_path("/..").unwrap(), "/");
        assert_eq!(normalize_path("/%2e%2e/internal").unwrap(), "/internal");
        assert_eq!(normalize_path("/caf%c3%a9").unwrap(), "/caf%C3%A9");
        for bad in ["/%2F", "/a%2fb", "/a\\b", "/a;b/c", "/%00", "/%5c", "/%zz", "/a%", "/%3B"] {
            assert!(normalize_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn refuses_non_origin_targets() {
        let h = [("host", "a.example.com")];
        for t in [".env", "internal/secret.txt", "*", "127.0.0.1:19000", "ftp://x/y", "http://u@a.example.com/"] {
            assert_eq!(canon("GET", t, &h).unwrap_err(), "invalid_target", "{t}");
        }
    }

    #[test]
    fn absolute_form_takes_host_from_the_target() {
        let r = canon("GET", "http://B.example.com./x", &[]).unwrap();
        assert_eq!(r, ("b.example.com".into(), "/x".into(), None, true));
        assert_eq!(canon("GET", "http://b.example.com/x", &[("host", "a.example.com")]).unwrap_err(), "invalid_host");
        let r = canon("GET", "HTTP://a.example.com:8080", &[("host", "A.EXAMPLE.COM.")]).unwrap();
        assert_eq!(r.1, "/");
    }

    #[test]
    fn host_spellings_collapse() {
        for h in [
            "acme.example.com",
            "ACME.example.com",
            "acme.example.com.",
            "acme.example.com:8080",
            "acme.example.com.:80",
        ] {
            assert_eq!(canon("GET", "/", &[("host", h)]).unwrap().0, "acme.example.com", "{h}");
        }
        for h in ["", ".", "..", "a..", ".a", "a b", "a@b", "a/b", "a..b", "a:99999", "a:x", "[::1", "a%2eb"] {
            assert!(canon("GET", "/", &[("host", h)]).is_err(), "{h:?}");
        }
        assert_eq!(canon("GET", "/", &[]).unwrap_err(), "invalid_host");
        assert_eq!(canon("GET", "/", &[("host", "a"), ("host", "a")]).unwrap_err(), "duplicate_header");
    }

    #[test]
    fn methods_are_case_sensitive() {
        let h = [("host", "a")];
        assert!(canon("DELETE", "/", &h).is_ok());
        for m in ["delete", "Delete", "TRACE", "CONNECT", "FOO"] {
            assert_eq!(canon(m, "/", &h).unwrap_err(), "method_not_allowed", "{m}");
        }
    }

    #[test]
    fn framing() {
        let h = |extra: &[(&'static str, &'static str)]| {
            let mut v = vec![("host", "a")];
            v.extend_from_slice(extra);
            canon("POST", "/", &v)
        };
        assert!(h(&[("content-length", "5")]).is_ok());
        assert_eq!(h(&[("content-length", "5"), ("content-length", "5")]).unwrap_err(), "duplicate_header");
        assert_eq!(h(&[("content-length", "5, 5")]).unwrap_err(), "duplicate_header");
        assert_eq!(h(&[("content-length", "+5")]).unwrap_err(), "bad_request");
        assert_eq!(h(&[("transfer-encoding", "gzip, chunked")]).unwrap_err(), "bad_request");
        assert!(h(&[("transfer-encoding", "Chunked")]).is_ok());
        assert_eq!(h(&[("connection", "close, X-Forwarded-For")]).unwrap_err(), "bad_request");
        assert_eq!(h(&[("connection", "x-tenant-id")]).unwrap_err(), "bad_request");
        assert!(h(&[("connection", "keep-alive, Upgrade")]).is_ok());
        assert_eq!(h(&[("x_tenant_id", "b")]).unwrap_err(), "bad_request");
        assert_eq!(h(&[("x_forwarded_for", "1.2.3.4")]).unwrap_err(), "bad_request");
        assert!(h(&[("x_custom", "1")]).is_ok());
    }

    #[test]
    fn queries_decode_unreserved() {
        let r = canon("GET", "/g?n%75m_rows=5&x=%2f", &[("host", "a")]).unwrap();
        assert_eq!(r.2.as_deref(), Some("num_rows=5&x=%2F"));
        assert!(r.3);
    }
}
