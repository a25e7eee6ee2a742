//! Per-request state carried between Pingora's phases.

use crate::directory::Tenant;
use crate::error::Reject;
use crate::limits::concurrency::SlotGuard;
use crate::limits::headers::LimitHeaders;
use crate::metrics::InFlight;
use crate::pipeline::quota::Reserved;
use crate::rules::Rule;
use crate::runtime::Runtime;
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

/// Everything the later phases need from the earlier ones.
pub struct RequestCtx {
    pub started: Instant,
    pub request_id: String,
    /// The runtime snapshot this request runs on, from start to end.
    pub runtime: Option<Arc<Runtime>>,
    /// The tenant the request is attributed to: limited, metered and forwarded as.
    pub tenant: Option<Arc<Tenant>>,
    /// The tenant of a key that matched but was then refused (revoked, expired, tenant
    /// mismatch, …): written to the access log only, never trusted for limits or usage.
    pub identified_tenant: Option<Arc<Tenant>>,
    /// The id of the key the request presented, also when that key was refused.
    pub key_id: Option<Arc<str>>,
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
    /// Quota units taken, and the charge to settle.
    pub reserved: Reserved,
    /// The concurrency slot; freed when the context is dropped.
    pub slot: Option<SlotGuard>,
    /// Counts the request in `tollgate_requests_in_flight` until the context is dropped.
    pub in_flight: Option<InFlight>,
}

impl RequestCtx {
    pub fn new() -> Self {
        RequestCtx {
            started: Instant::now(),
            request_id: String::new(),
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
