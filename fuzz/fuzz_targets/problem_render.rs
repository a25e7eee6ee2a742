//! Every `Reject`, with arbitrary strings and numbers, renders to a well-formed problem
//! response: an RFC 9457 JSON object whose `status` and `code` match the response, a
//! `Content-Length` equal to the body length, and a 4xx or 5xx status.

#![no_main]

use arbitrary::Arbitrary;
use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use tollgate::error::Reject;

/// `Reject` mirrored for `arbitrary`, which the library does not depend on.
#[derive(Arbitrary, Debug)]
enum AnyReject {
    BadRequest(String),
    DuplicateHeader(String),
    InvalidTarget(String),
    InvalidHost(String),
    MethodNotAllowed(String, String, bool),
    HeadersTooLarge(usize),
    MissingKey,
    InvalidKey,
    KeyExpired,
    KeyRevoked,
    TenantSuspended(String),
    IpNotAllowed(String),
    TenantMismatch(String, String),
    UnknownTenant(String),
    NoRoute,
    InsufficientScope(Vec<String>),
    FeatureNotInTier(String, String),
    Denied(u16, String, String),
    BodyTooLarge(u64),
    InvalidCost(String),
    RateLimited(u32, u64, u64),
    QuotaExceeded(String, u64, u64, ResetMs),
    ConcurrencyLimit(u32),
    StoreUnavailable(u64),
    UpstreamUnavailable(String),
    UpstreamTimeout(String),
    Internal,
}

/// A quota period's end as the gateway computes it: a Unix-ms time from 1970 to 9999, or
/// `i64::MAX` for a lifetime quota. Times far before 1970 never occur (periods start at a
/// tenant's creation) and are left out: near `i64::MIN`, `Reject::retry_after` overflows.
#[derive(Arbitrary, Debug)]
enum ResetMs {
    At(u64),
    Lifetime,
}

impl ResetMs {
    fn ms(&self) -> i64 {
        const YEAR_9999_MS: u64 = 253_402_300_799_999;
        match self {
            ResetMs::At(v) => (v % (YEAR_9999_MS + 1)) as i64,
            ResetMs::Lifetime => i64::MAX,
        }
    }
}

impl AnyReject {
    fn into_reject(self) -> Reject {
        match self {
            AnyReject::BadRequest(detail) => Reject::BadRequest { detail },
            AnyReject::DuplicateHeader(header) => Reject::DuplicateHeader { header },
            AnyReject::InvalidTarget(detail) => Reject::InvalidTarget { detail },
            AnyReject::InvalidHost(detail) => Reject::InvalidHost { detail },
            AnyReject::MethodNotAllowed(method, allow, case_only) => {
                Reject::MethodNotAllowed { method, allow, case_only }
            }
            AnyReject::HeadersTooLarge(limit) => Reject::HeadersTooLarge { limit },
            AnyReject::MissingKey => Reject::MissingKey,
            AnyReject::InvalidKey => Reject::InvalidKey,
            AnyReject::KeyExpired => Reject::KeyExpired,
            AnyReject::KeyRevoked => Reject::KeyRevoked,
            AnyReject::TenantSuspended(tenant) => Reject::TenantSuspended { tenant },
            AnyReject::IpNotAllowed(tenant) => Reject::IpNotAllowed { tenant },
            AnyReject::TenantMismatch(key_tenant, claimed) => Reject::TenantMismatch { key_tenant, claimed },
            AnyReject::UnknownTenant(tenant) => Reject::UnknownTenant { tenant },
            AnyReject::NoRoute => Reject::NoRoute,
            AnyReject::InsufficientScope(missing) => Reject::InsufficientScope { missing },
            AnyReject::FeatureNotInTier(feature, tier) => Reject::FeatureNotInTier { feature, tier },
            // The config refuses a deny `status` outside 400..=599, so no other reaches here.
            AnyReject::Denied(status, message, rule) => {
                Reject::Denied { status: 400 + status % 200, message, rule, allow: None }
            }
            AnyReject::BodyTooLarge(limit) => Reject::BodyTooLarge { limit },
            AnyReject::InvalidCost(detail) => Reject::InvalidCost { detail },
            AnyReject::RateLimited(limit, retry_after, reset) => Reject::RateLimited { limit, retry_after, reset },
            AnyReject::QuotaExceeded(metric, used, limit, reset) => {
                Reject::QuotaExceeded { metric, used, limit, reset_ms: reset.ms() }
            }
            AnyReject::ConcurrencyLimit(limit) => Reject::ConcurrencyLimit { limit },
            AnyReject::StoreUnavailable(retry_after) => Reject::StoreUnavailable { retry_after },
            AnyReject::UpstreamUnavailable(upstream) => Reject::UpstreamUnavailable { upstream },
            AnyReject::UpstreamTimeout(upstream) => Reject::UpstreamTimeout { upstream },
            AnyReject::Internal => Reject::Internal,
        }
    }
}

fuzz_target!(|input: (AnyReject, String)| {
    let (any, request_id) = input;
    let reject = any.into_reject();
    let p = reject.problem(&request_id);

    assert!((400..600).contains(&p.status), "{reject:?} -> {}", p.status);
    let doc: serde_json::Value = serde_json::from_slice(&p.body).expect("the body is JSON");
    let obj = doc.as_object().expect("the body is a JSON object");
    assert_eq!(obj["status"], p.status);
    assert_eq!(obj["code"], reject.code());
    assert_eq!(obj["request_id"], request_id.as_str());
    assert_eq!(obj["type"], format!("urn:tollgate:error:{}", reject.code()));
    assert!(tollgate::error::CODES.contains(&reject.code()));

    let header = |name: &str| p.headers.iter().filter(|(k, _)| *k == name).map(|(_, v)| v.as_str()).collect::<Vec<_>>();
    assert_eq!(header("content-length"), [p.body.len().to_string()]);
    assert_eq!(header("content-type"), ["application/problem+json"]);
    // Headers built from the gateway's own values must be sendable as they are.
    for name in ["content-length", "content-type", "cache-control", "www-authenticate", "retry-after"] {
        for v in header(name) {
            assert!(HeaderValue::from_str(v).is_ok(), "{name}: {v:?}");
        }
    }
    // The gRPC rendering of the same refusal: trailers-only, a status, a sendable message.
    let g = reject.grpc(&request_id);
    assert_eq!(g.status, 200);
    assert!(g.body.is_empty());
    let grpc = |name: &str| g.headers.iter().filter(|(k, _)| *k == name).map(|(_, v)| v.as_str()).collect::<Vec<_>>();
    assert!(grpc("grpc-status")[0].parse::<u8>().is_ok_and(|c| c <= 16));
    assert!(HeaderValue::from_str(grpc("grpc-message")[0]).is_ok());
    // A 429 or 503 of the gateway's own limits says when to retry; an operator's `deny` rule
    // answering 429 or 503 has no such time to give.
    if matches!(p.status, 429 | 503) && !matches!(reject, Reject::Denied { .. }) {
        let retry = header("retry-after");
        assert_eq!(retry.len(), 1, "{reject:?}");
        assert!(retry[0].parse::<u64>().is_ok());
    }
});
