//! Limit response headers, on success and rejection alike:
//!
//! - `RateLimit-Policy` and `RateLimit` (IETF httpapi ratelimit-headers draft, structured
//!   fields): one item for the rate bucket (`"rate"`), one for the binding quota (`"quota"`)
//! - `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset` (seconds until full)
//! - `X-Quota-Remaining`, `X-Quota-Reset` (RFC 3339) for the quota closest to exhaustion
//! - `X-Quota-Warning` when a warning threshold has been crossed
//! - `Retry-After` on 429 and 503 (set by the problem rendering)

use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateInfo {
    pub limit: u32,
    pub remaining: u32,
    pub reset_secs: u64,
    pub window_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaInfo {
    pub metric: Arc<str>,
    pub limit: u64,
    pub remaining: u64,
    pub reset_ms: i64,
    pub period_start_ms: i64,
}

/// The limit state of one request, collected by the limit stages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitHeaders {
    pub rate: Option<RateInfo>,
    pub quota: Option<QuotaInfo>,
    /// `metric=NN%` of a crossed warning threshold.
    pub warning: Option<String>,
    /// A soft quota was exceeded: the request passed, flagged.
    pub soft_over: Option<Arc<str>>,
}

impl LimitHeaders {
    pub fn is_empty(&self) -> bool {
        self.rate.is_none() && self.quota.is_none()
    }

    /// Keeps the quota closest to exhaustion (smallest remaining fraction).
    pub fn offer_quota(&mut self, q: QuotaInfo) {
        let frac = |q: &QuotaInfo| if q.limit == 0 { 0.0 } else { q.remaining as f64 / q.limit as f64 };
        match &self.quota {
            Some(cur) if frac(cur) <= frac(&q) => {}
            _ => self.quota = Some(q),
        }
    }

    /// Appends the headers to `out`.
    pub fn render(&self, now_ms: i64, out: &mut Vec<(&'static str, String)>) {
        let mut policy = Vec::new();
        let mut state = Vec::new();
        if let Some(r) = &self.rate {
            policy.push(format!("\"rate\";q={};w={}", r.limit, r.window_secs));
            state.push(format!("\"rate\";r={};t={}", r.remaining, r.reset_secs));
            out.push(("x-ratelimit-limit", r.limit.to_string()));
            out.push(("x-ratelimit-remaining", r.remaining.to_string()));
            out.push(("x-ratelimit-reset", r.reset_secs.to_string()));
        }
        if let Some(q) = &self.quota {
            let reset_secs =
                if q.reset_ms == i64::MAX { 0 } else { ((q.reset_ms - now_ms).max(0) as u64).div_ceil(1000) };
            if q.reset_ms == i64::MAX {
                policy.push(format!("\"quota\";q={};qu=\"{}\"", q.limit, q.metric));
                state.push(format!("\"quota\";r={}", q.remaining));
            } else {
                let w = ((q.reset_ms - q.period_start_ms).max(0) as u64) / 1000;
                policy.push(format!("\"quota\";q={};w={};qu=\"{}\"", q.limit, w, q.metric));
                state.push(format!("\"quota\";r={};t={}", q.remaining, reset_secs));
            }
            out.push(("x-quota-remaining", q.remaining.to_string()));
            if q.reset_ms != i64::MAX {
                out.push(("x-quota-reset", rfc3339(q.reset_ms)));
            }
        }
        if !policy.is_empty() {
            out.push(("ratelimit-policy", policy.join(", ")));
            out.push(("ratelimit", state.join(", ")));
        }
        if let Some(w) = &self.warning {
            out.push(("x-quota-warning", w.clone()));
        }
        if let Some(m) = &self.soft_over {
            out.push(("x-quota-overage", m.to_string()));
        }
    }
}

/// A Unix-ms time as RFC 3339 UTC, second precision.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}
