//! Limit specifications: what a tier, a tenant override or a rule says about rates, quotas,
//! concurrency and store failures. Validated values only; parsing lives in `config`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// `limit` requests per `period`, with up to `burst` at once (GCRA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateSpec {
    pub limit: u32,
    pub period: Duration,
    pub burst: u32,
    /// `mode = "global"`: a sliding-window counter in the shared store instead of a local bucket.
    pub global: bool,
}

impl RateSpec {
    /// The `w` (window, seconds) advertised in `RateLimit-Policy`.
    pub fn window_secs(&self) -> u64 {
        self.period.as_secs().max(1)
    }
}

/// A quota period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Period {
    Minute,
    Hour,
    Day,
    Month,
    Never,
}

impl Period {
    pub fn parse(s: &str) -> Option<Period> {
        Some(match s {
            "minute" => Period::Minute,
            "hour" => Period::Hour,
            "day" => Period::Day,
            "month" => Period::Month,
            "never" => Period::Never,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Period::Minute => "minute",
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Month => "month",
            Period::Never => "never",
        }
    }
}

/// A quota on one metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaSpec {
    pub limit: u64,
    pub period: Period,
    /// `hard`: reject past the limit (plus overage). `soft`: allow, flag and count the overage.
    pub hard: bool,
    /// Allowance past `limit`, in percent, before a hard quota rejects.
    pub overage_percent: u32,
}

impl QuotaSpec {
    /// The most a hard quota admits: `limit` plus the overage allowance.
    pub fn ceiling(&self) -> u64 {
        self.limit.saturating_add(self.limit.saturating_mul(self.overage_percent as u64) / 100)
    }
}

/// In-flight request limit, with an optional wait queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConcurrencySpec {
    pub limit: u32,
    pub queue: Option<QueueSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    pub max: u32,
    pub timeout: Duration,
}

/// What to do when the shared store fails or is too slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StorePolicy {
    /// Keep going on local limiters and the current lease, then reconcile.
    #[default]
    Local,
    /// Allow.
    Open,
    /// Answer 503 `store_unavailable`.
    Closed,
}

impl StorePolicy {
    pub fn parse(s: &str) -> Option<StorePolicy> {
        Some(match s {
            "local" => StorePolicy::Local,
            "open" => StorePolicy::Open,
            "closed" => StorePolicy::Closed,
            _ => return None,
        })
    }
}

/// A tenant's effective limits: its tier's, with the tenant's overrides applied.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub rate: Option<RateSpec>,
    pub quotas: BTreeMap<Arc<str>, QuotaSpec>,
    pub concurrency: Option<ConcurrencySpec>,
    pub priority: i64,
    pub on_store_error: StorePolicy,
    /// Day of month (1-31) monthly quotas reset on, in `timezone`.
    pub billing_anchor_day: u32,
    pub timezone: chrono_tz::Tz,
    /// Quota warning thresholds, percent.
    pub warn_at: Vec<u32>,
}
