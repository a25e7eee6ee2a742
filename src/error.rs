//! The one error type for rejected requests, and its one mapping to HTTP.
//!
//! Every stage of the pipeline returns [`Reject`] when it refuses a request. [`Reject::problem`]
//! turns it into an RFC 9457 `application/problem+json` body plus the headers it needs. Nothing
//! else in the gateway writes an error response, so every rejection has the same shape, a stable
//! `code`, and a `Content-Length` (keep-alive connections survive a rejection).

use serde_json::{json, Map, Value};

/// Why a request was refused. Each variant carries the numbers its response needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    /// 400: the request is malformed in a way the gateway will not guess about.
    BadRequest { detail: String },
    /// 400: a header that must appear at most once appeared twice (credential, tenant, host,
    /// Content-Length).
    DuplicateHeader { header: String },
    /// 400: the request-target is not origin-form or absolute-form, or its path uses a spelling
    /// servers disagree about (see `pipeline::canonical`).
    InvalidTarget { detail: String },
    /// 400: the host is missing, malformed, or named twice in disagreeing ways.
    InvalidHost { detail: String },
    /// 405: the method is not in `[server] allowed_methods` (compared case-sensitively).
    MethodNotAllowed { method: String, allow: String, case_only: bool },
    /// 431: the request head is larger than `server.max_header_bytes`.
    HeadersTooLarge { limit: usize },
    /// 401: no credential on a route that needs one.
    MissingKey,
    /// 401: the credential is malformed or matches no key.
    InvalidKey,
    /// 401: the key's `expires` is in the past.
    KeyExpired,
    /// 401: the key was revoked (or its rotation grace period ended).
    KeyRevoked,
    /// 403: the tenant is suspended.
    TenantSuspended { tenant: String },
    /// 403: the client address is outside the tenant's `ip_allow`.
    IpNotAllowed { tenant: String },
    /// 403: the key belongs to one tenant and the host, header or path names another.
    TenantMismatch { key_tenant: String, claimed: String },
    /// 404: a subdomain, header or path names a tenant that does not exist.
    UnknownTenant { tenant: String },
    /// 404: no rule matched and the rule set says `unmatched = "deny"`.
    NoRoute,
    /// 403: the key lacks scopes the rule requires.
    InsufficientScope { missing: Vec<String> },
    /// 403: the tenant's tier lacks a feature the rule requires.
    FeatureNotInTier { feature: String, tier: String },
    /// A rule's `deny` action, with the operator's status and message.
    /// A 405 carries the `Allow` header RFC 9110 requires.
    Denied { status: u16, message: String, rule: String, allow: Option<String> },
    /// 413: the body is larger than the rule's `max_body`.
    BodyTooLarge { limit: u64 },
    /// 400: a charge's cost (from a header or query parameter) is missing, not a number, or
    /// above the rule's `max_cost`.
    InvalidCost { detail: String },
    /// 429: the rate limit bucket is empty.
    RateLimited { limit: u32, retry_after: u64, reset: u64 },
    /// 429: a hard quota is used up for this period.
    QuotaExceeded { metric: String, used: u64, limit: u64, reset_ms: i64 },
    /// 429: every concurrency slot is busy (and the queue, if any, is full or timed out).
    ConcurrencyLimit { limit: u32 },
    /// 503: the shared store is failing and the policy is `closed`.
    StoreUnavailable { retry_after: u64 },
    /// 502: the upstream failed the request: it refused the connection, or the connection
    /// broke while forwarding. Also when no pool can be chosen for the request at all.
    UpstreamUnavailable { upstream: String },
    /// 503: the pool has no server passing its health check. Same code as a 502
    /// `upstream_unavailable` (clients branch on the code), but nothing was attempted, so the
    /// answer says when the next health check may bring a server back.
    NoHealthyUpstream { upstream: String, retry_after: u64 },
    /// 504: the upstream did not connect or answer within its timeout.
    UpstreamTimeout { upstream: String },
    /// 500: a bug or an unexpected internal failure. The detail is logged, not sent.
    Internal,
    /// 401: a bearer token that is malformed, too long, signed with a key or an algorithm its
    /// issuer does not use, or whose issuer, audience, `nbf` or `iat` is not accepted. The
    /// detail says which, never echoing the token.
    InvalidToken { detail: String },
    /// 401: the token's `exp` (plus the issuer's leeway) is past.
    TokenExpired,
    /// 403: the token names one tenant and the host, header or path another. Same code as a
    /// key's `tenant_mismatch`.
    TokenTenantMismatch { token_tenant: String, claimed: String },
    /// 403: the token lacks scopes the rule requires. Same code as a key's
    /// `insufficient_scope`.
    TokenInsufficientScope { missing: Vec<String> },
    /// 503: the issuer's keys (`jwks_url`) could not be fetched, so no token of it can be
    /// checked right now.
    KeysUnavailable { issuer: String, retry_after: u64 },
    /// 400: an asynchronous request names a job setting the gateway cannot accept (an
    /// `X-Job-Priority` that is not a whole number, an `X-Callback-URL` to a host the tenant
    /// may not call back).
    InvalidJob { detail: String },
    /// 429: the tenant already has `jobs.max_open_per_tenant` jobs pending or running.
    JobQueueFull { limit: u32 },
}

/// Every stable error code, for documentation and metering.
pub const CODES: &[&str] = &[
    "bad_request",
    "duplicate_header",
    "invalid_target",
    "invalid_host",
    "method_not_allowed",
    "headers_too_large",
    "missing_key",
    "invalid_key",
    "key_expired",
    "key_revoked",
    "tenant_suspended",
    "ip_not_allowed",
    "tenant_mismatch",
    "unknown_tenant",
    "no_route",
    "insufficient_scope",
    "feature_not_in_tier",
    "denied",
    "body_too_large",
    "invalid_cost",
    "rate_limited",
    "quota_exceeded",
    "concurrency_limit",
    "store_unavailable",
    "upstream_unavailable",
    "upstream_timeout",
    "internal_error",
    "invalid_token",
    "token_expired",
    "jwks_unavailable",
    "invalid_job",
    "job_queue_full",
];

/// The codes answered only by `/_tollgate/` self-service and the admin listener, on top of
/// [`CODES`].
pub const SERVICE_CODES: &[&str] =
    &["not_found", "conflict", "unprocessable", "admin_disabled", "missing_token", "invalid_config", "reload_refused"];

/// The one `title` of each problem code, whoever answers it (the proxy, `/_tollgate/`
/// self-service, the admin listener): a client that shows titles sees one per code. Unknown
/// codes get a generic title rather than a status's reason phrase, which differs per status.
pub fn title_of(code: &str) -> &'static str {
    match code {
        "bad_request" => "Bad request",
        "duplicate_header" => "Duplicate header",
        "invalid_target" => "Invalid request target",
        "invalid_host" => "Invalid host",
        "method_not_allowed" => "Method not allowed",
        "headers_too_large" => "Request headers too large",
        "missing_key" => "API key required",
        "invalid_key" => "Invalid API key",
        "key_expired" => "API key expired",
        "key_revoked" => "API key revoked",
        "tenant_suspended" => "Tenant suspended",
        "ip_not_allowed" => "Client address not allowed",
        "tenant_mismatch" => "Tenant mismatch",
        "unknown_tenant" => "Unknown tenant",
        "no_route" => "No route",
        "insufficient_scope" => "Insufficient scope",
        "feature_not_in_tier" => "Feature not in tier",
        "denied" => "Denied",
        "body_too_large" => "Request body too large",
        "invalid_cost" => "Invalid cost",
        "rate_limited" => "Rate limited",
        "quota_exceeded" => "Quota exceeded",
        "concurrency_limit" => "Too many concurrent requests",
        // Also the admin API's and self-service's answer when the directory store fails.
        "store_unavailable" => "Store unavailable",
        "upstream_unavailable" => "Upstream unavailable",
        "upstream_timeout" => "Upstream timeout",
        "internal_error" => "Internal error",
        "not_found" => "Not found",
        "invalid_job" => "Invalid job",
        "job_queue_full" => "Too many open jobs",
        "conflict" => "Conflict",
        "unprocessable" => "Unprocessable request",
        "admin_disabled" => "Admin API disabled",
        "missing_token" => "Admin token required",
        // Also the admin listener's answer to a wrong admin token.
        "invalid_token" => "Invalid token",
        "token_expired" => "Token expired",
        "jwks_unavailable" => "Token keys unavailable",
        "invalid_config" => "Invalid config",
        "reload_refused" => "Reload refused",
        _ => "Error",
    }
}

/// A rendered problem: status, headers and body, ready to write.
#[derive(Debug)]
pub struct Problem {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Reject {
    /// The stable, machine-readable code. Also the suffix of the problem `type`.
    pub fn code(&self) -> &'static str {
        match self {
            Reject::BadRequest { .. } => "bad_request",
            Reject::DuplicateHeader { .. } => "duplicate_header",
            Reject::InvalidTarget { .. } => "invalid_target",
            Reject::InvalidHost { .. } => "invalid_host",
            Reject::MethodNotAllowed { .. } => "method_not_allowed",
            Reject::HeadersTooLarge { .. } => "headers_too_large",
            Reject::MissingKey => "missing_key",
            Reject::InvalidKey => "invalid_key",
            Reject::KeyExpired => "key_expired",
            Reject::KeyRevoked => "key_revoked",
            Reject::TenantSuspended { .. } => "tenant_suspended",
            Reject::IpNotAllowed { .. } => "ip_not_allowed",
            Reject::TenantMismatch { .. } | Reject::TokenTenantMismatch { .. } => "tenant_mismatch",
            Reject::UnknownTenant { .. } => "unknown_tenant",
            Reject::NoRoute => "no_route",
            Reject::InsufficientScope { .. } | Reject::TokenInsufficientScope { .. } => "insufficient_scope",
            Reject::FeatureNotInTier { .. } => "feature_not_in_tier",
            Reject::Denied { .. } => "denied",
            Reject::BodyTooLarge { .. } => "body_too_large",
            Reject::InvalidCost { .. } => "invalid_cost",
            Reject::RateLimited { .. } => "rate_limited",
            Reject::QuotaExceeded { .. } => "quota_exceeded",
            Reject::ConcurrencyLimit { .. } => "concurrency_limit",
            Reject::StoreUnavailable { .. } => "store_unavailable",
            Reject::UpstreamUnavailable { .. } | Reject::NoHealthyUpstream { .. } => "upstream_unavailable",
            Reject::UpstreamTimeout { .. } => "upstream_timeout",
            Reject::Internal => "internal_error",
            Reject::InvalidToken { .. } => "invalid_token",
            Reject::TokenExpired => "token_expired",
            Reject::KeysUnavailable { .. } => "jwks_unavailable",
            Reject::InvalidJob { .. } => "invalid_job",
            Reject::JobQueueFull { .. } => "job_queue_full",
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            Reject::BadRequest { .. }
            | Reject::DuplicateHeader { .. }
            | Reject::InvalidTarget { .. }
            | Reject::InvalidHost { .. }
            | Reject::InvalidCost { .. }
            | Reject::InvalidJob { .. } => 400,
            Reject::MethodNotAllowed { .. } => 405,
            Reject::RateLimited { .. }
            | Reject::QuotaExceeded { .. }
            | Reject::ConcurrencyLimit { .. }
            | Reject::JobQueueFull { .. } => 429,
            Reject::StoreUnavailable { .. } | Reject::NoHealthyUpstream { .. } | Reject::KeysUnavailable { .. } => 503,
            Reject::HeadersTooLarge { .. } => 431,
            Reject::MissingKey
            | Reject::InvalidKey
            | Reject::KeyExpired
            | Reject::KeyRevoked
            | Reject::InvalidToken { .. }
            | Reject::TokenExpired => 401,
            Reject::TenantSuspended { .. }
            | Reject::IpNotAllowed { .. }
            | Reject::TenantMismatch { .. }
            | Reject::TokenTenantMismatch { .. }
            | Reject::TokenInsufficientScope { .. }
            | Reject::InsufficientScope { .. }
            | Reject::FeatureNotInTier { .. } => 403,
            Reject::UnknownTenant { .. } | Reject::NoRoute => 404,
            Reject::Denied { status, .. } => *status,
            Reject::BodyTooLarge { .. } => 413,
            Reject::UpstreamUnavailable { .. } => 502,
            Reject::UpstreamTimeout { .. } => 504,
            Reject::Internal => 500,
        }
    }

    /// The problem `title`: one per code, from [`title_of`], so a code reads the same wherever
    /// it is answered.
    fn title(&self) -> &'static str {
        title_of(self.code())
    }

    /// A sentence for a person, saying what happened and what to do next.
    fn detail(&self) -> String {
        match self {
            Reject::BadRequest { detail } => detail.clone(),
            Reject::DuplicateHeader { header } => format!(
                "The `{header}` header appears more than once; send it exactly once."
            ),
            Reject::InvalidTarget { detail } | Reject::InvalidHost { detail } => detail.clone(),
            Reject::MethodNotAllowed { method, allow, case_only: true } => format!(
                "HTTP methods are case-sensitive: `{method}` is not `{}`. Send one of: {allow}.",
                method.to_ascii_uppercase()
            ),
            Reject::MethodNotAllowed { method, allow, case_only: false } => format!(
                "The method `{method}` is not served here. Send one of: {allow}."
            ),
            Reject::HeadersTooLarge { limit } => format!(
                "The request headers exceed {limit} bytes; send fewer or smaller headers."
            ),
            Reject::MissingKey => "This route needs an API key. Send it as `Authorization: Bearer <key>` or `X-API-Key: <key>`.".into(),
            Reject::InvalidKey => "The API key is not recognised. Check that it was copied whole, or ask your administrator for a new one.".into(),
            Reject::KeyExpired => "The API key has expired. Create or rotate a key to continue.".into(),
            Reject::KeyRevoked => "The API key has been revoked. Use its replacement or create a new key.".into(),
            Reject::TenantSuspended { tenant } => format!(
                "Tenant `{tenant}` is suspended. Contact the API provider to reactivate it."
            ),
            Reject::IpNotAllowed { tenant } => format!(
                "Your address is not in the allowlist of tenant `{tenant}`. Ask its administrator to add it."
            ),
            Reject::TenantMismatch { key_tenant, claimed } => format!(
                "The API key belongs to tenant `{key_tenant}`, but the request names tenant `{claimed}`. Use a key of `{claimed}` or drop the conflicting host, header or path."
            ),
            Reject::UnknownTenant { tenant } => format!("No tenant is called `{tenant}`."),
            Reject::NoRoute => "No route matches this method and path.".into(),
            Reject::InsufficientScope { missing } => format!(
                "The API key lacks the scope(s) this route needs: {}. Create a key with them.",
                missing.join(", ")
            ),
            Reject::FeatureNotInTier { feature, tier } => format!(
                "The `{tier}` tier does not include `{feature}`. Upgrade to a tier that has it."
            ),
            Reject::Denied { message, .. } => message.clone(),
            Reject::BodyTooLarge { limit } => format!(
                "The request body is larger than this route allows ({limit} bytes)."
            ),
            Reject::InvalidCost { detail } => detail.clone(),
            Reject::RateLimited { limit, retry_after, .. } => format!(
                "The rate limit ({limit} requests per window) is exhausted. Retry in {retry_after} s."
            ),
            Reject::QuotaExceeded { metric, used, limit, reset_ms } if used < limit => format!(
                "The `{metric}` quota has {} of {limit} left, less than this request costs. Ask for less (a smaller estimate such as `max_tokens`), or wait until it resets at {}.",
                limit - used,
                crate::limits::headers::rfc3339(*reset_ms)
            ),
            Reject::QuotaExceeded { metric, used, limit, reset_ms } => format!(
                "The `{metric}` quota is used up: {used} of {limit}. It resets at {}. Upgrade your plan for more.",
                crate::limits::headers::rfc3339(*reset_ms)
            ),
            Reject::ConcurrencyLimit { limit } => format!(
                "Your plan allows {limit} requests in flight at once. Retry when one finishes."
            ),
            Reject::StoreUnavailable { retry_after } => format!(
                "The gateway cannot check limits right now. Retry in {retry_after} s."
            ),
            Reject::UpstreamUnavailable { upstream } => format!(
                "The upstream `{upstream}` is unavailable. Retry later."
            ),
            Reject::NoHealthyUpstream { upstream, retry_after } => format!(
                "No server of the upstream `{upstream}` is healthy right now. Retry in {retry_after} s."
            ),
            Reject::UpstreamTimeout { upstream } => format!(
                "The upstream `{upstream}` did not answer in time. Retry later."
            ),
            Reject::Internal => "The gateway hit an internal error. Retry; if it persists, report the request id.".into(),
            Reject::InvalidJob { detail } => detail.clone(),
            Reject::JobQueueFull { limit } => format!(
                "You have {limit} jobs pending or running, the most allowed. Retry when one finishes, or cancel some with DELETE /_tollgate/jobs/{{id}}."
            ),
            Reject::InvalidToken { detail } => format!("The bearer token is not accepted: {detail}. Get a new token from your identity provider."),
            Reject::TokenExpired => "The bearer token has expired. Get a new token from your identity provider.".into(),
            Reject::TokenInsufficientScope { missing } => format!(
                "The token lacks the scope(s) this route needs: {}. Ask your identity provider for a token with them.",
                missing.join(", ")
            ),
            Reject::TokenTenantMismatch { token_tenant, claimed } => format!(
                "The token names tenant `{token_tenant}`, but the request names tenant `{claimed}`. Use a token of `{claimed}` or drop the conflicting host, header or path."
            ),
            Reject::KeysUnavailable { issuer, retry_after } => format!(
                "The gateway cannot check tokens of `{issuer}` right now: its signing keys could not be fetched. Retry in {retry_after} s."
            ),
        }
    }

    fn extensions(&self, ext: &mut Map<String, Value>) {
        match self {
            Reject::TenantSuspended { tenant } | Reject::IpNotAllowed { tenant } | Reject::UnknownTenant { tenant } => {
                ext.insert("tenant".into(), json!(tenant));
            }
            Reject::TenantMismatch { key_tenant, claimed }
            | Reject::TokenTenantMismatch { token_tenant: key_tenant, claimed } => {
                ext.insert("tenant".into(), json!(key_tenant));
                ext.insert("claimed_tenant".into(), json!(claimed));
            }
            Reject::InsufficientScope { missing } | Reject::TokenInsufficientScope { missing } => {
                ext.insert("missing_scopes".into(), json!(missing));
            }
            Reject::FeatureNotInTier { feature, tier } => {
                ext.insert("feature".into(), json!(feature));
                ext.insert("tier".into(), json!(tier));
            }
            Reject::Denied { rule, .. } => {
                ext.insert("rule".into(), json!(rule));
            }
            Reject::BodyTooLarge { limit } => {
                ext.insert("limit".into(), json!(limit));
            }
            Reject::HeadersTooLarge { limit } => {
                ext.insert("limit".into(), json!(limit));
            }
            Reject::UpstreamUnavailable { upstream }
            | Reject::UpstreamTimeout { upstream }
            | Reject::NoHealthyUpstream { upstream, .. } => {
                ext.insert("upstream".into(), json!(upstream));
            }
            Reject::RateLimited { limit, reset, retry_after } => {
                ext.insert("limit".into(), json!(limit));
                ext.insert("remaining".into(), json!(0));
                ext.insert("reset".into(), json!(reset));
                ext.insert("retry_after".into(), json!(retry_after));
            }
            Reject::QuotaExceeded { metric, used, limit, reset_ms } => {
                ext.insert("metric".into(), json!(metric));
                ext.insert("used".into(), json!(used));
                ext.insert("limit".into(), json!(limit));
                ext.insert("remaining".into(), json!(limit.saturating_sub(*used)));
                ext.insert("reset".into(), json!(crate::limits::headers::rfc3339(*reset_ms)));
            }
            Reject::ConcurrencyLimit { limit } => {
                ext.insert("limit".into(), json!(limit));
            }
            _ => {}
        }
    }

    /// Seconds a client should wait before retrying, for 429 and 503 answers.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Reject::RateLimited { retry_after, .. } => Some(*retry_after),
            Reject::QuotaExceeded { reset_ms, .. } => {
                let now = chrono::Utc::now().timestamp_millis();
                Some(if *reset_ms == i64::MAX {
                    86_400
                } else {
                    (reset_ms.saturating_sub(now).max(1000) as u64).div_ceil(1000)
                })
            }
            Reject::ConcurrencyLimit { .. } => Some(1),
            Reject::JobQueueFull { .. } => Some(5),
            Reject::StoreUnavailable { retry_after }
            | Reject::NoHealthyUpstream { retry_after, .. }
            | Reject::KeysUnavailable { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// Renders the refusal as OpenAI-compatible SDKs read errors:
    /// `{"error": {"message", "type", "code", "param"}}` as `application/json`, with the same
    /// status and headers as the problem document. `message` is the problem's title and
    /// detail, `code` its stable code, `type` OpenAI's class of the error.
    pub fn openai_error(&self, request_id: &str) -> Problem {
        let mut p = self.problem(request_id);
        let kind = match (self, p.status) {
            (Reject::QuotaExceeded { .. }, _) => "insufficient_quota",
            (_, 429) => "rate_limit_error",
            (_, 401) => "authentication_error",
            (_, 403) => "permission_error",
            (_, 404) => "not_found_error",
            (_, 500..) => "server_error",
            _ => "invalid_request_error",
        };
        let doc = json!({
            "error": {
                "message": format!("{}: {}", self.title(), self.detail()),
                "type": kind,
                "code": self.code(),
                "param": Value::Null,
            }
        });
        p.body = serde_json::to_vec(&doc).unwrap_or_default();
        for (k, v) in p.headers.iter_mut() {
            match *k {
                "content-type" => *v = "application/json".to_string(),
                "content-length" => *v = p.body.len().to_string(),
                _ => {}
            }
        }
        p
    }

    /// The gRPC status code of this refusal, for a request whose `content-type` is
    /// `application/grpc` (the table in docs/errors.md, "gRPC clients").
    pub fn grpc_status(&self) -> u8 {
        match self.code() {
            "unknown_tenant" => 5,                       // NOT_FOUND
            "no_route" | "method_not_allowed" => 12,     // UNIMPLEMENTED
            "body_too_large" | "headers_too_large" => 8, // RESOURCE_EXHAUSTED
            _ => match self.status() {
                400 => 3,             // INVALID_ARGUMENT
                401 => 16,            // UNAUTHENTICATED
                403 => 7,             // PERMISSION_DENIED
                404 => 5,             // NOT_FOUND
                405 | 501 => 12,      // UNIMPLEMENTED
                408 => 4,             // DEADLINE_EXCEEDED
                409 => 10,            // ABORTED
                413 | 429 | 431 => 8, // RESOURCE_EXHAUSTED
                500 => 13,            // INTERNAL
                502..=504 => 14,      // UNAVAILABLE
                _ => 2,               // UNKNOWN
            },
        }
    }

    /// Renders the refusal as a gRPC *trailers-only* answer: HTTP status 200 and a header block
    /// that ends the stream, carrying `grpc-status`, `grpc-message` (the problem's detail,
    /// percent-encoded as the gRPC spec asks), `tollgate-error-code` (the problem code), and
    /// the same `retry-after`, `www-authenticate`, `allow` and `x-request-id` a problem
    /// document would have. The body is empty.
    pub fn grpc(&self, request_id: &str) -> Problem {
        let mut headers = vec![
            ("content-type", "application/grpc".to_string()),
            ("grpc-status", self.grpc_status().to_string()),
            ("grpc-message", grpc_percent_encode(&self.detail())),
            ("tollgate-error-code", self.code().to_string()),
        ];
        // The headers a problem document carries, less those about its body.
        let problem = self.problem(request_id);
        headers.extend(
            problem
                .headers
                .into_iter()
                .filter(|(k, _)| !matches!(*k, "content-type" | "content-length" | "cache-control")),
        );
        Problem { status: 200, headers, body: Vec::new() }
    }

    /// Renders the RFC 9457 problem document and its headers.
    pub fn problem(&self, request_id: &str) -> Problem {
        let status = self.status();
        let mut doc = Map::new();
        doc.insert("type".into(), json!(format!("urn:tollgate:error:{}", self.code())));
        doc.insert("title".into(), json!(self.title()));
        doc.insert("status".into(), json!(status));
        doc.insert("detail".into(), json!(self.detail()));
        doc.insert("code".into(), json!(self.code()));
        doc.insert("request_id".into(), json!(request_id));
        self.extensions(&mut doc);
        let body = serde_json::to_vec(&Value::Object(doc)).unwrap_or_default();

        let mut headers = vec![
            ("content-type", "application/problem+json".to_string()),
            ("content-length", body.len().to_string()),
            ("cache-control", "no-store".to_string()),
        ];
        if matches!(
            self,
            Reject::MissingKey
                | Reject::InvalidKey
                | Reject::KeyExpired
                | Reject::KeyRevoked
                | Reject::InvalidToken { .. }
                | Reject::TokenExpired
        ) {
            let value = match self {
                Reject::MissingKey => "Bearer".to_string(),
                _ => format!("Bearer error=\"invalid_token\", error_description=\"{}\"", self.code()),
            };
            headers.push(("www-authenticate", value));
        }
        if let Some(secs) = self.retry_after() {
            headers.push(("retry-after", secs.to_string()));
        }
        if let Reject::MethodNotAllowed { allow, .. } | Reject::Denied { allow: Some(allow), .. } = self {
            headers.push(("allow", allow.clone()));
        }
        if !request_id.is_empty() {
            headers.push(("x-request-id", request_id.to_string()));
        }
        Problem { status, headers, body }
    }
}

/// Percent-encodes a `grpc-message`: bytes outside printable ASCII, and `%`, as `%XX`.
fn grpc_percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_errors_carry_message_type_and_code_with_the_problems_status_and_headers() {
        let reject =
            Reject::QuotaExceeded { metric: "tokens".into(), used: 10, limit: 10, reset_ms: 1_800_000_000_000 };
        let (p, o) = (reject.problem("r"), reject.openai_error("r"));
        assert_eq!(o.status, p.status);
        let v: Value = serde_json::from_slice(&o.body).unwrap();
        assert_eq!(v["error"]["type"], "insufficient_quota");
        assert_eq!(v["error"]["code"], "quota_exceeded");
        assert!(v["error"]["message"].as_str().unwrap().contains("tokens"), "{v}");
        assert!(v["error"]["param"].is_null());
        let header = |p: &Problem, k: &str| p.headers.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
        assert_eq!(header(&o, "content-type").as_deref(), Some("application/json"));
        assert_eq!(header(&o, "content-length"), Some(o.body.len().to_string()));
        assert_eq!(header(&o, "retry-after"), header(&p, "retry-after"));
        let v: Value = serde_json::from_slice(&Reject::MissingKey.openai_error("r").body).unwrap();
        assert_eq!(v["error"]["type"], "authentication_error");
    }

    #[test]
    fn grpc_answers_are_trailers_only_with_the_mapped_status() {
        for (r, want) in [
            (Reject::MissingKey, 16),
            (Reject::InvalidToken { detail: "x".into() }, 16),
            (Reject::InsufficientScope { missing: vec!["a".into()] }, 7),
            (Reject::RateLimited { limit: 1, retry_after: 3, reset: 3 }, 8),
            (Reject::ConcurrencyLimit { limit: 1 }, 8),
            (Reject::UpstreamUnavailable { upstream: "u".into() }, 14),
            (Reject::NoHealthyUpstream { upstream: "u".into(), retry_after: 1 }, 14),
            (Reject::UpstreamTimeout { upstream: "u".into() }, 14),
            (Reject::StoreUnavailable { retry_after: 1 }, 14),
            (Reject::NoRoute, 12),
            (Reject::UnknownTenant { tenant: "t".into() }, 5),
            (Reject::BadRequest { detail: "x".into() }, 3),
            (Reject::Internal, 13),
            (Reject::Denied { status: 418, message: "no".into(), rule: "r".into(), allow: None }, 2),
        ] {
            let g = r.grpc("rid");
            let h = |name: &str| g.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone());
            assert_eq!((g.status, h("grpc-status")), (200, Some(want.to_string())), "{r:?}");
            assert_eq!(h("content-type").as_deref(), Some("application/grpc"));
            assert_eq!(h("tollgate-error-code").as_deref(), Some(r.code()));
            assert!(g.body.is_empty() && h("content-length").is_none());
        }
        let g = Reject::RateLimited { limit: 1, retry_after: 3, reset: 3 }.grpc("rid");
        assert!(g.headers.iter().any(|(k, v)| *k == "retry-after" && v == "3"));
        assert_eq!(grpc_percent_encode("50% of `é`\n"), "50%25 of `%C3%A9`%0A");
    }

    #[test]
    fn a_405_deny_carries_allow() {
        let r = Reject::Denied { status: 405, message: "no".into(), rule: "r".into(), allow: Some("GET, HEAD".into()) };
        let p = r.problem("rid");
        assert!(p.headers.iter().any(|(k, v)| *k == "allow" && v == "GET, HEAD"));
    }

    #[test]
    fn problem_has_rfc9457_fields_and_length() {
        let p = Reject::InsufficientScope { missing: vec!["generate".into()] }.problem("req-1");
        assert_eq!(p.status, 403);
        let v: Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(v["type"], "urn:tollgate:error:insufficient_scope");
        assert_eq!(v["status"], 403);
        assert_eq!(v["request_id"], "req-1");
        assert_eq!(v["missing_scopes"][0], "generate");
        let len = p.headers.iter().find(|(k, _)| *k == "content-length").unwrap();
        assert_eq!(len.1, p.body.len().to_string());
    }

    #[test]
    fn every_code_has_its_own_title() {
        for code in CODES.iter().chain(SERVICE_CODES) {
            assert_ne!(title_of(code), "Error", "{code} has no title");
        }
        let p = Reject::InsufficientScope { missing: vec!["admin".into()] }.problem("r");
        let v: Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(v["title"], title_of("insufficient_scope"));
    }

    #[test]
    fn no_healthy_upstream_is_503_with_retry_after() {
        let p = Reject::NoHealthyUpstream { upstream: "api".into(), retry_after: 5 }.problem("r");
        assert_eq!(p.status, 503);
        assert!(p.headers.iter().any(|(k, v)| *k == "retry-after" && v == "5"));
        let v: Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!((v["code"].as_str(), v["upstream"].as_str()), (Some("upstream_unavailable"), Some("api")));
    }

    #[test]
    fn token_refusals_challenge_with_invalid_token() {
        for (r, code) in [
            (Reject::InvalidToken { detail: "its signature does not verify".into() }, "invalid_token"),
            (Reject::TokenExpired, "token_expired"),
        ] {
            let p = r.problem("r");
            assert_eq!(p.status, 401);
            let challenge = p.headers.iter().find(|(k, _)| *k == "www-authenticate").map(|(_, v)| v.as_str());
            assert_eq!(
                challenge,
                Some(format!("Bearer error=\"invalid_token\", error_description=\"{code}\"").as_str())
            );
        }
        let p = Reject::TokenTenantMismatch { token_tenant: "acme".into(), claimed: "globex".into() }.problem("r");
        let v: Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(
            (p.status, v["code"].as_str(), v["claimed_tenant"].as_str()),
            (403, Some("tenant_mismatch"), Some("globex"))
        );
        let p = Reject::KeysUnavailable { issuer: "https://idp/".into(), retry_after: 5 }.problem("r");
        assert_eq!(p.status, 503);
        assert!(p.headers.iter().any(|(k, v)| *k == "retry-after" && v == "5"));
    }

    #[test]
    fn missing_key_challenges_with_bearer() {
        let p = Reject::MissingKey.problem("r");
        assert!(p.headers.iter().any(|(k, v)| *k == "www-authenticate" && v == "Bearer"));
    }
}
