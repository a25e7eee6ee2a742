//! Quota periods on the calendar of the tenant: its time zone and billing anchor day.
//!
//! - `minute` and `hour` start on the tenant's local clock boundaries.
//! - `day` is the tenant's local day, so it lasts 23 or 25 hours across a DST change.
//! - `month` runs from the anchor day to the same day next month, at local midnight; an anchor
//!   past a month's end is clamped to its last day (anchor 31 → 28 Feb, then 31 Mar).
//! - `never` is one period from the epoch to the end of time.
//!
//! Local midnights that do not exist (a DST gap) start at the first instant that does.

use crate::policy::Period;
use chrono::{
    DateTime, Datelike, Duration as ChronoDuration, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Timelike,
};
use chrono_tz::Tz;

/// A period as `[start, end)` in Unix milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    pub start_ms: i64,
    pub end_ms: i64,
}

/// The first instant at or after the local time `naive` in `tz`.
fn resolve_local(tz: Tz, naive: NaiveDateTime) -> i64 {
    match tz.from_local_datetime(&naive) {
        LocalResult::Single(t) => t.timestamp_millis(),
        LocalResult::Ambiguous(earliest, _) => earliest.timestamp_millis(),
        LocalResult::None => {
            // In a DST gap: step forward a minute at a time until the clock exists again.
            let mut probe = naive;
            for _ in 0..(24 * 60) {
                probe += ChronoDuration::minutes(1);
                if let Some(t) = tz.from_local_datetime(&probe).earliest() {
                    return t.timestamp_millis();
                }
            }
            naive.and_utc().timestamp_millis()
        }
    }
}

fn days_in_month(year: i32, month: u32) -> u32 {
    let (ny, nm) = if month == 12 { (year + 1, 1) } else { (year, month + 1) };
    NaiveDate::from_ymd_opt(ny, nm, 1).and_then(|d| d.pred_opt()).map(|d| d.day()).unwrap_or(28)
}

fn anchor_date(year: i32, month: u32, anchor: u32) -> NaiveDate {
    let day = anchor.clamp(1, days_in_month(year, month));
    NaiveDate::from_ymd_opt(year, month, day).unwrap_or_default()
}

fn add_months(year: i32, month: u32, delta: i32) -> (i32, u32) {
    let idx = year * 12 + (month as i32 - 1) + delta;
    (idx.div_euclid(12), (idx.rem_euclid(12) + 1) as u32)
}

/// The period containing `now_ms` for a tenant in `tz` with billing anchor `anchor_day`.
pub fn window(period: Period, now_ms: i64, tz: Tz, anchor_day: u32) -> Window {
    let utc = DateTime::from_timestamp_millis(now_ms).unwrap_or_default();
    let local = utc.with_timezone(&tz).naive_local();
    match period {
        Period::Never => Window { start_ms: 0, end_ms: i64::MAX },
        Period::Minute | Period::Hour => {
            let step = if period == Period::Minute { 60_000 } else { 3_600_000 };
            let trunc = if period == Period::Minute {
                local.with_second(0).and_then(|t| t.with_nanosecond(0))
            } else {
                local.with_minute(0).and_then(|t| t.with_second(0)).and_then(|t| t.with_nanosecond(0))
            }
            .unwrap_or(local);
            // Offsets are whole minutes (or hours for most zones), so local boundaries are
            // also fixed-length steps in UTC.
            let start = resolve_local(tz, trunc).min(now_ms);
            Window { start_ms: start, end_ms: start + step }
        }
        Period::Day => {
            let date = local.date();
            let start = resolve_local(tz, date.and_hms_opt(0, 0, 0).unwrap_or_default());
            let next = date.succ_opt().unwrap_or(date);
            let end = resolve_local(tz, next.and_hms_opt(0, 0, 0).unwrap_or_default());
            Window { start_ms: start, end_ms: end }
        }
        Period::Month => {
            let (y, m) = (local.year(), local.month());
            let this = anchor_date(y, m, anchor_day);
            let (sy, sm) = if local.date() >= this { (y, m) } else { add_months(y, m, -1) };
            let (ey, em) = add_months(sy, sm, 1);
            let start = resolve_local(tz, anchor_date(sy, sm, anchor_day).and_hms_opt(0, 0, 0).unwrap_or_default());
            let end = resolve_local(tz, anchor_date(ey, em, anchor_day).and_hms_opt(0, 0, 0).unwrap_or_default());
            Window { start_ms: start, end_ms: end }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn ms(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).map(|d| d.timestamp_millis()).expect("time")
    }

    fn iso(ms: i64) -> String {
        DateTime::<Utc>::from_timestamp_millis(ms).map(|d| d.to_rfc3339()).unwrap_or_default()
    }

    #[test]
    fn month_anchored_on_the_31st_clamps_to_short_months() {
        let w = window(Period::Month, ms("2027-02-15T12:00:00Z"), chrono_tz::UTC, 31);
        assert_eq!(iso(w.start_ms), "2027-01-31T00:00:00+00:00");
        assert_eq!(iso(w.end_ms), "2027-02-28T00:00:00+00:00");
        let w = window(Period::Month, ms("2027-03-01T00:00:00Z"), chrono_tz::UTC, 31);
        assert_eq!(iso(w.start_ms), "2027-02-28T00:00:00+00:00");
        assert_eq!(iso(w.end_ms), "2027-03-31T00:00:00+00:00");
    }

    #[test]
    fn february_in_a_leap_year() {
        let w = window(Period::Month, ms("2028-02-28T10:00:00Z"), chrono_tz::UTC, 30);
        assert_eq!(iso(w.start_ms), "2028-01-30T00:00:00+00:00");
        assert_eq!(iso(w.end_ms), "2028-02-29T00:00:00+00:00");
        let w = window(Period::Month, ms("2028-02-29T00:00:00Z"), chrono_tz::UTC, 30);
        assert_eq!(iso(w.start_ms), "2028-02-29T00:00:00+00:00");
        assert_eq!(iso(w.end_ms), "2028-03-30T00:00:00+00:00");
    }

    #[test]
    fn month_boundary_follows_the_tenant_time_zone() {
        // 1 Feb 2027 00:00 in New York is 05:00 UTC.
        let tz: Tz = "America/New_York".parse().expect("tz");
        let w = window(Period::Month, ms("2027-02-01T04:59:59Z"), tz, 1);
        assert_eq!(iso(w.end_ms), "2027-02-01T05:00:00+00:00");
        let w = window(Period::Month, ms("2027-02-01T05:00:00Z"), tz, 1);
        assert_eq!(iso(w.start_ms), "2027-02-01T05:00:00+00:00");
    }

    #[test]
    fn a_day_across_dst_lasts_23_or_25_hours() {
        let tz: Tz = "Europe/Berlin".parse().expect("tz");
        // Spring forward: 28 Mar 2027.
        let w = window(Period::Day, ms("2027-03-28T12:00:00Z"), tz, 1);
        assert_eq!(w.end_ms - w.start_ms, 23 * 3_600_000);
        assert_eq!(iso(w.start_ms), "2027-03-27T23:00:00+00:00");
        // Fall back: 31 Oct 2027.
        let w = window(Period::Day, ms("2027-10-31T12:00:00Z"), tz, 1);
        assert_eq!(w.end_ms - w.start_ms, 25 * 3_600_000);
    }

    #[test]
    fn month_across_dst_starts_at_local_midnight() {
        let tz: Tz = "Europe/Berlin".parse().expect("tz");
        let w = window(Period::Month, ms("2027-04-10T00:00:00Z"), tz, 1);
        assert_eq!(iso(w.start_ms), "2027-03-31T22:00:00+00:00"); // CEST
        let w = window(Period::Month, ms("2027-03-10T00:00:00Z"), tz, 1);
        assert_eq!(iso(w.start_ms), "2027-02-28T23:00:00+00:00"); // CET
        assert_eq!(iso(w.end_ms), "2027-03-31T22:00:00+00:00");
    }

    #[test]
    fn minute_hour_and_never() {
        let w = window(Period::Minute, ms("2027-01-01T10:20:30.500Z"), chrono_tz::UTC, 1);
        assert_eq!(iso(w.start_ms), "2027-01-01T10:20:00+00:00");
        assert_eq!(w.end_ms - w.start_ms, 60_000);
        let tz: Tz = "Asia/Kolkata".parse().expect("tz");
        let w = window(Period::Hour, ms("2027-01-01T10:20:30Z"), tz, 1);
        assert_eq!(iso(w.start_ms), "2027-01-01T09:30:00+00:00");
        let w = window(Period::Never, 5, chrono_tz::UTC, 1);
        assert_eq!((w.start_ms, w.end_ms), (0, i64::MAX));
    }
}
