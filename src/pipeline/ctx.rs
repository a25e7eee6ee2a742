//! Per-request state carried between Pingora's phases.

use crate::directory::Tenant;
use crate::error::Reject;
use crate::limits::concurrency::SlotGuard;
use crate::limits::headers::LimitHeaders;
use crate::metrics::InFlight;
use crate::pipeline::quota::Reserved;
use crate::rules::Rule;
use crate::runtime::Runtime;
use http::HeaderValue;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a request ended, for the access log and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Decision {
    /// Still in progress, or the client went away before a decision.
    #[default]
    Pending,
    /// Passed every stage and was sent upstream.
    Forwarded,
    /// Refused by the gateway with a problem response.
    Rejected,
    /// Sent upstream, which failed (502/504).
    UpstreamError,
    /// Answered by the gateway itself (self-service).
    Served,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Pending => "aborted",
            Decision::Forwarded => "forwarded",
            Decision::Rejected => "rejected",
            Decision::UpstreamError => "upstream_error",
            Decision::Served => "served",
        }
    }
}

/// The request's id: the client's `X-Request-ID` when it is sane, else 32 random hex digits.
///
/// Kept as a header value because it is sent twice (upstream and back to the client): each
/// send clones a reference-counted buffer instead of copying and re-validating the text, and a
/// client's id shares the buffer the request head was read into.
#[derive(Debug, Clone)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// The client's id if it is 1 to 128 characters of letters, digits, `-`, `_`, `.` and `:`.
    pub fn from_client(v: &HeaderValue) -> Option<RequestId> {
        let b = v.as_bytes();
        let sane = !b.is_empty()
            && b.len() <= 128
            && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'));
        sane.then(|| RequestId(v.clone()))
    }

    /// A new random id: 128 bits as 32 lower-case hex digits.
    pub fn random() -> RequestId {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let bits = rand::random::<u128>().to_be_bytes();
        let mut text = [0u8; 32];
        for (i, b) in bits.iter().enumerate() {
            text[2 * i] = HEX[usize::from(b >> 4)];
            text[2 * i + 1] = HEX[usize::from(b & 0xf)];
        }
        // Hex digits are always a valid header value.
        RequestId(HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static("-")))
    }

    pub fn as_str(&self) -> &str {
        // Both constructors admit only ASCII, so this never falls back.
        std::str::from_utf8(self.0.as_bytes()).unwrap_or("-")
    }

    /// The id as a header value (a cheap clone).
    pub fn header(&self) -> HeaderValue {
        self.0.clone()
    }
}

impl Default for RequestId {
    fn default() -> Self {
        RequestId(HeaderValue::from_static(""))
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything the later phases need from the earlier ones.
pub struct RequestCtx {
    pub started: Instant,
    pub request_id: RequestId,
    /// The runtime snapshot this request runs on, from start to end.
    pub runtime: Option<Arc<Runtime>>,
    /// The tenant the request is attributed to: limited, metered and forwarded as.
    pub tenant: Option<Arc<Tenant>>,
    /// The tenant of a key that matched but was then refused (revoked, expired, tenant
    /// mismatch, …): written to the access log only, never trusted for limits or usage.
    pub identified_tenant: Option<Arc<Tenant>>,
    /// The id of the key the request presented, also when that key was refused.
    pub key_id: Option<crate::directory::KeyId>,
    pub rule: Option<Arc<Rule>>,
    pub upstream: Option<Arc<str>>,
    /// The path (and query) to send upstream when it differs from the client's.
    pub upstream_uri: Option<String>,
    /// The `Host` to send upstream when the client named the host only in an absolute-form target.
    pub upstream_host: Option<String>,
    pub client_ip: Option<IpAddr>,
    /// The TCP peer, and whether it is a trusted proxy.
    pub peer_ip: Option<IpAddr>,
    pub peer_trusted: bool,
    pub https: bool,
    pub decision: Decision,
    pub reject: Option<Reject>,
    /// Rule `max_body`, enforced on streamed bodies.
    pub body_limit: Option<u64>,
    pub body_seen: u64,
    pub upstream_started: Option<Instant>,
    /// A connection to the upstream was made: from here on the request counts as usage.
    pub upstream_reached: bool,
    pub upstream_time: Option<Duration>,
    /// From choosing the upstream server to the upstream's response head.
    pub upstream_first_byte: Option<Duration>,
    /// Why the upstream side failed the request (`tollgate_upstream_errors_total` reason).
    pub upstream_failure: Option<&'static str>,
    pub status: u16,
    /// Limit state for the response headers.
    pub limit_headers: LimitHeaders,
    /// Quota units taken, and the charges to settle.
    pub reserved: Reserved,
    /// What the body stage read and scans (rules with a body plan only).
    pub body: crate::pipeline::body::BodyState,
    /// The concurrency slot; freed when the upstream's answer ends, or when the context is dropped.
    pub slot: Option<SlotGuard>,
    /// Counts the request in `tollgate_requests_in_flight` until the context is dropped.
    pub in_flight: Option<InFlight>,
}

impl RequestCtx {
    pub fn new() -> Self {
        RequestCtx {
            started: Instant::now(),
            request_id: RequestId::default(),
            runtime: None,
            tenant: None,
            identified_tenant: None,
            key_id: None,
            rule: None,
            upstream: None,
            upstream_uri: None,
            upstream_host: None,
            client_ip: None,
            peer_ip: None,
            peer_trusted: false,
            https: false,
            decision: Decision::Pending,
            reject: None,
            body_limit: None,
            body_seen: 0,
            upstream_started: None,
            upstream_reached: false,
            upstream_time: None,
            upstream_first_byte: None,
            upstream_failure: None,
            status: 0,
            limit_headers: LimitHeaders::default(),
            reserved: Reserved::default(),
            body: Default::default(),
            slot: None,
            in_flight: None,
        }
    }
}

impl Default for RequestCtx {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_the_clients_when_sane_else_random_hex() {
        let ok = HeaderValue::from_static("req-7f3a:1.b_c");
        assert_eq!(RequestId::from_client(&ok).map(|r| r.as_str().to_string()), Some("req-7f3a:1.b_c".into()));
        for bad in ["", "a b", "a/b", "x\u{e9}"] {
            let v = HeaderValue::from_bytes(bad.as_bytes()).unwrap_or_else(|_| HeaderValue::from_static(""));
            assert!(RequestId::from_client(&v).is_none(), "{bad:?}");
        }
        let long = HeaderValue::from_bytes(&[b'a'; 129]).unwrap_or_else(|_| HeaderValue::from_static(""));
        assert!(RequestId::from_client(&long).is_none());
        let (a, b) = (RequestId::random(), RequestId::random());
        assert_eq!(a.as_str().len(), 32);
        assert!(a.as_str().bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a.as_str(), b.as_str());
        assert_eq!(a.header(), a.as_str());
    }
}
