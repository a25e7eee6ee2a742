//! The rate and quota blocks that tiers and rules both write, and their parsing into the
//! policy types the limit engines run on.

use super::diag::{Diagnostics, SourceFile};
use super::value::SStr;
use crate::policy::{Period, QuotaSpec, RateSpec};
use serde::Deserialize;
use std::ops::Range;
use std::time::Duration;
use toml::Spanned;

#[derive(Debug, Clone, Deserialize)]
pub struct RateFile {
    pub requests_per_second: Option<Spanned<i64>>,
    pub requests_per_minute: Option<Spanned<i64>>,
    pub requests_per_hour: Option<Spanned<i64>>,
    pub burst: Option<Spanned<i64>>,
    pub mode: Option<SStr>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct QuotaFile {
    pub limit: Option<Spanned<i64>>,
    pub period: Option<SStr>,
    pub enforcement: Option<SStr>,
    pub overage: Option<Spanned<i64>>,
}

/// A positive integer, or an error at its place.
pub fn positive(v: &Spanned<i64>, what: &str, src: &SourceFile, diags: &mut Diagnostics) -> Option<u64> {
    if *v.get_ref() > 0 {
        Some(*v.get_ref() as u64)
    } else {
        diags.error_at(src, v.span(), format!("`{what}` must be a positive number"));
        None
    }
}

/// Parses a `{ requests_per_second | _minute | _hour = N, burst = B, mode = "local"|"global" }`.
pub fn rate_spec(rf: &RateFile, span: Range<usize>, src: &SourceFile, diags: &mut Diagnostics) -> Option<RateSpec> {
    let given: Vec<(&Spanned<i64>, Duration)> = [
        (&rf.requests_per_second, Duration::from_secs(1)),
        (&rf.requests_per_minute, Duration::from_secs(60)),
        (&rf.requests_per_hour, Duration::from_secs(3600)),
    ]
    .into_iter()
    .filter_map(|(v, d)| v.as_ref().map(|v| (v, d)))
    .collect();
    const UNITS: [&str; 3] = ["requests_per_second", "requests_per_minute", "requests_per_hour"];
    // A limit written with the wrong type was reported where it stands and left out.
    if given.is_empty() && UNITS.iter().any(|k| diags.was_invalid(src, span.clone(), k)) {
        return None;
    }
    if given.len() != 1 {
        diags.error_at(
            src,
            span,
            "a rate needs exactly one of requests_per_second, requests_per_minute or requests_per_hour",
        );
        return None;
    }
    let (v, period) = given[0];
    let limit = positive(v, "rate", src, diags)?;
    let burst = match &rf.burst {
        Some(b) => positive(b, "burst", src, diags).unwrap_or(1),
        None => limit,
    };
    let global = match rf.mode.as_ref().map(|m| m.get_ref().as_str()) {
        None | Some("local") => false,
        Some("global") => true,
        Some(other) => {
            if let Some(m) = &rf.mode {
                diags.error_at(src, m.span(), format!("unknown rate mode `{other}`; use `local` or `global`"));
            }
            false
        }
    };
    Some(RateSpec {
        limit: limit.min(u32::MAX as u64) as u32,
        period,
        burst: burst.min(u32::MAX as u64) as u32,
        global,
    })
}

/// Parses `{ limit, period, enforcement, overage }`.
pub fn quota_spec(q: &Spanned<QuotaFile>, src: &SourceFile, diags: &mut Diagnostics) -> QuotaSpec {
    let qf = q.get_ref();
    let limit = match &qf.limit {
        Some(l) if *l.get_ref() >= 0 => *l.get_ref() as u64,
        Some(l) => {
            diags.error_at(src, l.span(), "a quota limit cannot be negative");
            0
        }
        None => {
            diags.missing_at(src, q.span(), "limit", q.span(), "a quota needs a `limit`, like `limit = 10000`");
            0
        }
    };
    let period = match &qf.period {
        Some(p) => Period::parse(p.get_ref()).unwrap_or_else(|| {
            diags.error_at(
                src,
                p.span(),
                format!("unknown period `{}`; use minute, hour, day, month or never", p.get_ref()),
            );
            Period::Month
        }),
        None => Period::Month,
    };
    let hard = match qf.enforcement.as_ref().map(|e| e.get_ref().as_str()) {
        None | Some("hard") => true,
        Some("soft") => false,
        Some(other) => {
            if let Some(e) = &qf.enforcement {
                diags.error_at(src, e.span(), format!("unknown enforcement `{other}`; use `hard` or `soft`"));
            }
            true
        }
    };
    let overage_percent = match &qf.overage {
        Some(o) if (0..=1000).contains(o.get_ref()) => *o.get_ref() as u32,
        Some(o) => {
            diags.error_at(src, o.span(), "`overage` is a percentage between 0 and 1000");
            0
        }
        None => 0,
    };
    QuotaSpec { limit, period, hard, overage_percent }
}
