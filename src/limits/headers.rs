//! Limit response headers, on success and rejection alike:
//!
//! - `RateLimit-Policy` and `RateLimit` (IETF httpapi ratelimit-headers draft, structured
//!   fields): one item per limit the request met, each under a name that always means the same
//!   policy: `"rate"` for the tier's rate, `"rate-<rule>"` for a rule's own rate,
//!   `"quota-<metric>-<period>"` for every quota, `"concurrency"` for the in-flight limit
//! - `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset` (seconds until full)
//! - `X-Quota-Remaining`, `X-Quota-Reset` (RFC 3339) for the quota closest to exhaustion
//! - `X-Quota-Warning` when a warning threshold has been crossed
//! - `Retry-After` on 429 and 503 (set by the problem rendering)
//!
//! On a refusal the refusing item's `t` is the `Retry-After` value, so the two never disagree
//! about when to come back.

use std::fmt::Write;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateInfo {
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the bucket is full again (`X-RateLimit-Reset`).
    pub reset_secs: u64,
    pub window_secs: u64,
    /// On a refusal: the seconds until one more request is let through, the `Retry-After`.
    /// It is then the item's `t`: with nothing left, that is when the limit "resets" for the
    /// client.
    pub retry_after: Option<u64>,
    /// The rule whose own rate this is; `None` for the tier's rate.
    pub rule: Option<Arc<str>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaInfo {
    /// The quota's counter: the metric, or `<metric>@<rule>` for a rule's own quota.
    pub metric: Arc<str>,
    /// The period's name (`day`, `month`, …): part of the policy name.
    pub period: &'static str,
    pub limit: u64,
    pub remaining: u64,
    pub reset_ms: i64,
    pub period_start_ms: i64,
}

impl QuotaInfo {
    fn share_left(&self) -> f64 {
        if self.limit == 0 {
            0.0
        } else {
            self.remaining as f64 / self.limit as f64
        }
    }
}

/// The tenant's in-flight limit, as seen by this instance when the request was admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConcurrencyInfo {
    pub limit: u32,
    /// Slots left after this request took one (0 on a refusal).
    pub remaining: u32,
}

/// The limit state of one request, collected by the limit stages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitHeaders {
    pub rate: Option<RateInfo>,
    /// The quota closest to exhaustion (smallest remaining share of its limit): the one
    /// `X-Quota-Remaining` and `X-Quota-Reset` describe. Also in `quotas`.
    pub quota: Option<QuotaInfo>,
    /// Every quota the request reserved or was refused by, in the order they were checked.
    pub quotas: Vec<QuotaInfo>,
    pub concurrency: Option<ConcurrencyInfo>,
    /// `metric=NN%` of a crossed warning threshold.
    pub warning: Option<String>,
    /// A soft quota was exceeded: the request passed, flagged.
    pub soft_over: Option<Arc<str>>,
}

/// Appends `s` as the inside of a structured-field string: `"` and `\` escaped, anything
/// outside printable ASCII replaced, so a header value is always valid.
fn push_sf(out: &mut String, s: &str) {
    if s.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\') {
        out.push_str(s);
        return;
    }
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('_'),
        }
    }
}

impl LimitHeaders {
    pub fn is_empty(&self) -> bool {
        self.rate.is_none() && self.quotas.is_empty() && self.concurrency.is_none()
    }

    /// Records one quota the request met, and keeps the one closest to exhaustion.
    pub fn offer_quota(&mut self, q: QuotaInfo) {
        match &self.quota {
            Some(cur) if cur.share_left() <= q.share_left() => {}
            _ => self.quota = Some(q.clone()),
        }
        self.quotas.push(q);
    }

    /// Updates a quota after settlement changed its use, so the response shows what is left
    /// once the charge is final, and picks the quota closest to exhaustion again.
    pub fn settled(&mut self, metric: &str, used: u64) {
        let mut changed = false;
        for q in self.quotas.iter_mut().filter(|q| &*q.metric == metric) {
            q.remaining = q.limit.saturating_sub(used);
            changed = true;
            if used > q.limit {
                self.soft_over = Some(q.metric.clone());
            } else if self.soft_over.as_deref() == Some(metric) {
                self.soft_over = None;
            }
        }
        if changed {
            // The first of equals wins, as in `offer_quota`.
            let mut best: Option<&QuotaInfo> = None;
            for q in &self.quotas {
                if best.is_none_or(|b| q.share_left() < b.share_left()) {
                    best = Some(q);
                }
            }
            self.quota = best.cloned();
        }
    }

    /// OpenAI-style headers, for clients written against OpenAI's API: `x-ratelimit-*-requests`
    /// from the rate the request met, `x-ratelimit-*-tokens` from the quota on `tokens` (the
    /// rule's first charged metric). Resets are written as OpenAI writes them (`1s`, `6m0s`,
    /// `20h0m0s`).
    pub fn render_openai(&self, now_ms: i64, tokens: Option<&str>, mut f: impl FnMut(&'static str, String)) {
        if let Some(r) = &self.rate {
            f("x-ratelimit-limit-requests", r.limit.to_string());
            f("x-ratelimit-remaining-requests", r.remaining.to_string());
            f("x-ratelimit-reset-requests", duration_text(r.retry_after.unwrap_or(r.reset_secs)));
        }
        let Some(tokens) = tokens else { return };
        // A charged metric may have several quotas (the tenant's, the rule's): the closest to
        // exhaustion is the one that binds.
        let q = self
            .quotas
            .iter()
            .filter(|q| &*q.metric == tokens || q.metric.strip_prefix(tokens).is_some_and(|r| r.starts_with('@')))
            .min_by_key(|q| q.remaining);
        if let Some(q) = q {
            f("x-ratelimit-limit-tokens", q.limit.to_string());
            f("x-ratelimit-remaining-tokens", q.remaining.to_string());
            let secs = if q.reset_ms == i64::MAX { 0 } else { ((q.reset_ms - now_ms).max(0) as u64).div_ceil(1000) };
            f("x-ratelimit-reset-tokens", duration_text(secs));
        }
    }

    /// Appends the headers to `out` (for a problem response).
    pub fn render(&self, now_ms: i64, out: &mut Vec<(&'static str, String)>) {
        let (mut policy, mut state) = (String::new(), String::new());
        self.visit(now_ms, &mut policy, &mut state, |name, value| out.push((name, value.to_string())));
    }

    /// Calls `f` with each header as a ready header value, in the order of [`Self::render`].
    /// For the response path: the structured fields are built in per-thread buffers and each
    /// value is copied once, into the header.
    pub fn render_values(&self, now_ms: i64, mut f: impl FnMut(&'static str, http::HeaderValue)) {
        thread_local! {
            static SCRATCH: std::cell::RefCell<(String, String)> =
                std::cell::RefCell::new((String::with_capacity(256), String::with_capacity(256)));
        }
        SCRATCH.with(|cell| {
            let mut scratch = cell.borrow_mut();
            let (policy, state) = &mut *scratch;
            policy.clear();
            state.clear();
            self.visit(now_ms, policy, state, |name, value| {
                if let Some(v) = value.header_value() {
                    f(name, v);
                }
            });
        });
    }

    /// Produces every header: `policy` and `state` are the (empty) buffers the two structured
    /// fields are written into, items in place, with no string per item to join afterwards.
    fn visit(&self, now_ms: i64, policy: &mut String, state: &mut String, mut f: impl FnMut(&'static str, Value<'_>)) {
        let sep = |s: &mut String| {
            if !s.is_empty() {
                s.push_str(", ");
            }
        };
        if let Some(r) = &self.rate {
            let name_into = |s: &mut String| {
                s.push_str("\"rate");
                if let Some(rule) = &r.rule {
                    s.push('-');
                    push_sf(s, rule);
                }
                s.push('"');
            };
            name_into(policy);
            let _ = write!(policy, ";q={};w={}", r.limit, r.window_secs);
            name_into(state);
            let _ = write!(state, ";r={};t={}", r.remaining, r.retry_after.unwrap_or(r.reset_secs));
            f("x-ratelimit-limit", Value::Num(r.limit.into()));
            f("x-ratelimit-remaining", Value::Num(r.remaining.into()));
            f("x-ratelimit-reset", Value::Num(r.reset_secs));
        }
        for q in &self.quotas {
            sep(policy);
            sep(state);
            let name_into = |s: &mut String| {
                s.push_str("\"quota-");
                push_sf(s, &q.metric);
                s.push('-');
                s.push_str(q.period);
                s.push('"');
            };
            name_into(policy);
            let _ = write!(policy, ";q={}", q.limit);
            if q.reset_ms != i64::MAX {
                let w = ((q.reset_ms - q.period_start_ms).max(0) as u64) / 1000;
                let _ = write!(policy, ";w={w}");
            }
            // The unit is the metric; a rule's own quota counts the same unit as the tenant's.
            policy.push_str(";qu=\"");
            push_sf(policy, q.metric.split('@').next().unwrap_or(&q.metric));
            policy.push('"');
            name_into(state);
            let _ = write!(state, ";r={}", q.remaining);
            if q.reset_ms != i64::MAX {
                let _ = write!(state, ";t={}", ((q.reset_ms - now_ms).max(0) as u64).div_ceil(1000));
            }
        }
        if let Some(c) = &self.concurrency {
            sep(policy);
            sep(state);
            let _ = write!(policy, "\"concurrency\";q={};qu=\"concurrent-requests\"", c.limit);
            let _ = write!(state, "\"concurrency\";r={}", c.remaining);
            if c.remaining == 0 {
                // A refusal's `Retry-After: 1`: a slot usually frees within a second.
                state.push_str(";t=1");
            }
        }
        if let Some(q) = &self.quota {
            f("x-quota-remaining", Value::Num(q.remaining));
            if q.reset_ms != i64::MAX {
                match rfc3339_fast(q.reset_ms) {
                    Some(t) => f("x-quota-reset", Value::Text(std::str::from_utf8(&t).unwrap_or_default())),
                    None => f("x-quota-reset", Value::Text(&rfc3339(q.reset_ms))),
                }
            }
        }
        if !policy.is_empty() {
            f("ratelimit-policy", Value::Text(policy));
            f("ratelimit", Value::Text(state));
        }
        if let Some(w) = &self.warning {
            f("x-quota-warning", Value::Text(w));
        }
        if let Some(m) = &self.soft_over {
            f("x-quota-overage", Value::Text(m));
        }
    }
}

/// One header value as [`LimitHeaders::visit`] produces it.
enum Value<'a> {
    Num(u64),
    Text(&'a str),
}

impl Value<'_> {
    /// The value as a header: numbers are formatted on the stack, so either way the header's
    /// buffer is the only allocation. `None` for text a header cannot carry (it is left out).
    fn header_value(&self) -> Option<http::HeaderValue> {
        match self {
            Value::Num(n) => {
                let mut buf = [0u8; 20];
                let mut i = buf.len();
                let mut n = *n;
                loop {
                    i -= 1;
                    buf[i] = b'0' + (n % 10) as u8;
                    n /= 10;
                    if n == 0 {
                        break;
                    }
                }
                http::HeaderValue::from_bytes(&buf[i..]).ok()
            }
            Value::Text(s) => http::HeaderValue::from_str(s).ok(),
        }
    }
}

impl std::fmt::Display for Value<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Num(n) => write!(f, "{n}"),
            Value::Text(s) => f.write_str(s),
        }
    }
}

/// A Unix-ms time as RFC 3339 UTC, second precision.
/// Seconds as OpenAI writes durations: `45s`, `6m0s`, `20h0m0s`.
pub fn duration_text(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

pub fn rfc3339(ms: i64) -> String {
    if let Some(t) = rfc3339_fast(ms) {
        return String::from_utf8_lossy(&t).into_owned();
    }
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// [`rfc3339`] without a formatter, for 1970 to 9999 (what `chrono` writes there, byte for
/// byte): `2026-12-01T00:00:00Z`.
fn rfc3339_fast(ms: i64) -> Option<[u8; 20]> {
    const YEAR_10000_MS: i64 = 253_402_300_800_000;
    if !(0..YEAR_10000_MS).contains(&ms) {
        return None;
    }
    let secs = ms.div_euclid(1000);
    let (y, m, d) = crate::logging::civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    let mut t = *b"0000-00-00T00:00:00Z";
    let two = |t: &mut [u8; 20], at: usize, v: i64| {
        t[at] = b'0' + (v / 10 % 10) as u8;
        t[at + 1] = b'0' + (v % 10) as u8;
    };
    two(&mut t, 0, y / 100);
    two(&mut t, 2, y % 100);
    two(&mut t, 5, m.into());
    two(&mut t, 8, d.into());
    two(&mut t, 11, rem / 3600);
    two(&mut t, 14, rem / 60 % 60);
    two(&mut t, 17, rem % 60);
    Some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(metric: &str, period: &'static str, limit: u64, remaining: u64) -> QuotaInfo {
        QuotaInfo { metric: metric.into(), period, limit, remaining, reset_ms: 86_400_000, period_start_ms: 0 }
    }

    fn header<'a>(out: &'a [(&'static str, String)], name: &str) -> Option<&'a str> {
        out.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn every_quota_is_listed_under_a_stable_name() {
        let mut h = LimitHeaders {
            rate: Some(RateInfo {
                limit: 10,
                remaining: 0,
                reset_secs: 60,
                window_secs: 60,
                retry_after: Some(6),
                rule: Some("bulk".into()),
            }),
            ..LimitHeaders::default()
        };
        h.offer_quota(quota("requests", "month", 1000, 900));
        h.offer_quota(quota("records@gen", "day", 100, 5));
        h.concurrency = Some(ConcurrencyInfo { limit: 4, remaining: 3 });
        let mut out = Vec::new();
        h.render(0, &mut out);
        assert_eq!(
            header(&out, "ratelimit-policy"),
            Some(
                "\"rate-bulk\";q=10;w=60, \"quota-requests-month\";q=1000;w=86400;qu=\"requests\", \
                 \"quota-records@gen-day\";q=100;w=86400;qu=\"records\", \
                 \"concurrency\";q=4;qu=\"concurrent-requests\""
            )
        );
        assert_eq!(
            header(&out, "ratelimit"),
            Some(
                "\"rate-bulk\";r=0;t=6, \"quota-requests-month\";r=900;t=86400, \
                 \"quota-records@gen-day\";r=5;t=86400, \"concurrency\";r=3"
            )
        );
        assert_eq!(header(&out, "x-quota-remaining"), Some("5"), "the quota closest to exhaustion");
    }

    #[test]
    fn settlement_updates_what_is_left() {
        let mut h = LimitHeaders::default();
        h.offer_quota(quota("requests", "month", 100, 50));
        h.offer_quota(quota("records", "month", 100, 20));
        h.settled("records", 10);
        assert_eq!(h.quota.as_ref().map(|q| (&*q.metric, q.remaining)), Some(("requests", 50)));
        h.settled("records", 120);
        assert_eq!(h.quota.as_ref().map(|q| (&*q.metric, q.remaining)), Some(("records", 0)));
        assert_eq!(h.soft_over.as_deref(), Some("records"));
    }

    #[test]
    fn response_values_are_the_rendered_headers() {
        let mut h = LimitHeaders {
            rate: Some(RateInfo {
                limit: 600,
                remaining: 599,
                reset_secs: 1,
                window_secs: 60,
                retry_after: None,
                rule: None,
            }),
            concurrency: Some(ConcurrencyInfo { limit: 4, remaining: 0 }),
            warning: Some("requests=80%".into()),
            soft_over: Some("tokens".into()),
            ..LimitHeaders::default()
        };
        h.offer_quota(QuotaInfo { reset_ms: 1_798_761_600_000, ..quota("requests", "month", 1000, 900) });
        h.offer_quota(QuotaInfo { reset_ms: i64::MAX, ..quota("tokens", "day", 10, 9) });
        let mut rendered = Vec::new();
        h.render(1_798_700_000_000, &mut rendered);
        let mut values = Vec::new();
        h.render_values(1_798_700_000_000, |k, v| values.push((k, v.to_str().unwrap_or("?").to_string())));
        assert_eq!(values, rendered);
        assert_eq!(rendered.len(), 9, "{rendered:?}");
    }

    #[test]
    fn reset_times_are_what_chrono_writes() {
        let mut ms = 0i64;
        while ms < 253_402_300_800_000 {
            let want = chrono::DateTime::from_timestamp_millis(ms)
                .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_default();
            assert_eq!(rfc3339(ms), want, "{ms}");
            ms = ms * 2 + 86_399_999 + ms % 1000;
        }
        assert_eq!(rfc3339(253_402_300_800_000), "+10000-01-01T00:00:00Z");
        assert_eq!(rfc3339(-1000), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn names_stay_valid_structured_field_strings() {
        let mut s = String::new();
        push_sf(&mut s, "a\"b\\c\u{e9}");
        assert_eq!(s, "a\\\"b\\\\c_");
    }
}
