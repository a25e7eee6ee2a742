//! Usage reports and current usage: what an operator bills from and a tenant's dashboard shows.

use crate::directory::Tenant;
use crate::limits::Limits;
use crate::store::{CounterKey, LedgerRow};
use serde::Serialize;
use std::collections::BTreeMap;

/// One quota's current state.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct QuotaUsage {
    pub metric: String,
    pub used: u64,
    pub limit: u64,
    pub remaining: u64,
    pub period: &'static str,
    pub enforcement: &'static str,
    /// RFC 3339, or `null` for `never`.
    pub reset_at: Option<String>,
}

/// The current usage of every quota of `tenant`. With a shared store the committed usage is
/// read, so the answer covers every instance: units leased and not yet spent are not counted
/// (as of each instance's last report, at most `lease_ttl / 3` old while it holds units).
pub async fn current_usage(limits: &Limits, tenant: &Tenant) -> Vec<QuotaUsage> {
    let policy = &tenant.policy;
    let mut out = Vec::new();
    for (metric, spec) in &policy.quotas {
        let local = limits.quotas.state(&tenant.id, metric, spec, policy);
        let mut used = local.used;
        if limits.shared {
            let key =
                CounterKey { tenant: tenant.id.clone(), metric: metric.clone(), period_start: local.period_start_ms };
            if let Ok(committed) = limits.store.committed(&key).await {
                // This instance's own spending is known here even before its next report.
                used = committed.max(limits.quotas.spent(&tenant.id, metric));
            }
        }
        out.push(QuotaUsage {
            metric: metric.to_string(),
            used,
            limit: spec.limit,
            remaining: spec.limit.saturating_sub(used),
            period: spec.period.as_str(),
            enforcement: if spec.hard { "hard" } else { "soft" },
            reset_at: (local.reset_ms != i64::MAX).then(|| crate::limits::headers::rfc3339(local.reset_ms)),
        });
    }
    out
}

/// A metric's total over a report's range.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Total {
    pub metric: String,
    pub value: u64,
    pub cost: f64,
    /// The part of the total each model used (`model_from_body`), largest first; already
    /// counted in `value` and `cost`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub by_model: Vec<ModelTotal>,
}

/// One model's part of a metric's total.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelTotal {
    pub model: String,
    pub value: u64,
    pub cost: f64,
}

/// One day's value of one metric (of one model, for a model's part).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Daily {
    pub day: String,
    pub metric: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub value: u64,
    pub cost: f64,
}

/// `metric[model]`, the ledger name of a model's part of a metric.
fn split_model(metric: &str) -> Option<(&str, &str)> {
    let (base, rest) = metric.split_once('[')?;
    Some((base, rest.strip_suffix(']')?))
}

/// A usage report over an inclusive range of UTC days.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    pub tenant: String,
    pub from: String,
    pub to: String,
    pub totals: Vec<Total>,
    pub daily: Vec<Daily>,
    pub total_cost: f64,
}

fn money(micros: u64) -> f64 {
    (micros as f64) / 1_000_000.0
}

/// Builds a report from ledger rows.
pub fn build(tenant: &str, from: &str, to: &str, rows: &[LedgerRow]) -> Report {
    let mut totals: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut models: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    let mut daily = Vec::with_capacity(rows.len());
    for r in rows {
        let (metric, model) = match split_model(&r.metric) {
            Some((base, model)) => {
                let t = models.entry((base.to_string(), model.to_string())).or_insert((0, 0));
                t.0 += r.value;
                t.1 += r.cost_micros;
                (base.to_string(), Some(model.to_string()))
            }
            None => {
                let t = totals.entry(r.metric.to_string()).or_insert((0, 0));
                t.0 += r.value;
                t.1 += r.cost_micros;
                (r.metric.to_string(), None)
            }
        };
        daily.push(Daily { day: r.day.clone(), metric, model, value: r.value, cost: money(r.cost_micros) });
    }
    let total_micros: u64 = totals.values().map(|t| t.1).sum();
    let totals = totals
        .into_iter()
        .map(|(metric, (value, c))| {
            let mut by_model: Vec<ModelTotal> = models
                .range((metric.clone(), String::new())..)
                .take_while(|((m, _), _)| *m == metric)
                .map(|((_, model), (v, c))| ModelTotal { model: model.clone(), value: *v, cost: money(*c) })
                .collect();
            by_model.sort_by(|a, b| b.value.cmp(&a.value).then_with(|| a.model.cmp(&b.model)));
            Total { metric, value, cost: money(c), by_model }
        })
        .collect();
    Report {
        tenant: tenant.to_string(),
        from: from.to_string(),
        to: to.to_string(),
        totals,
        daily,
        total_cost: money(total_micros),
    }
}

/// Validates a `YYYY-MM-DD` report bound.
pub fn parse_day(s: &str) -> Result<String, String> {
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map(|d| d.format("%Y-%m-%d").to_string())
        .map_err(|_| format!("`{s}` is not a date; write it as YYYY-MM-DD"))
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

impl Report {
    /// RFC 4180 CSV (CRLF line ends): the daily rows, then one `total` row per metric.
    pub fn to_csv(&self) -> String {
        // A model's part of a metric is the row `metric[model]`, after the metric's own row: it
        // is a breakdown, already in the metric's row.
        let name = |metric: &str, model: Option<&str>| match model {
            Some(m) => csv_field(&format!("{metric}[{m}]")),
            None => csv_field(metric),
        };
        let mut out = String::from("date,metric,value,cost\r\n");
        for d in &self.daily {
            let metric = name(&d.metric, d.model.as_deref());
            out.push_str(&format!("{},{metric},{},{:.6}\r\n", d.day, d.value, d.cost));
        }
        for t in &self.totals {
            out.push_str(&format!("total,{},{},{:.6}\r\n", csv_field(&t.metric), t.value, t.cost));
            for m in &t.by_model {
                let metric = name(&t.metric, Some(&m.model));
                out.push_str(&format!("total,{metric},{},{:.6}\r\n", m.value, m.cost));
            }
        }
        out
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(day: &str, metric: &str, value: u64, cost: u64) -> LedgerRow {
        LedgerRow { tenant: "acme".into(), metric: metric.into(), day: day.into(), value, cost_micros: cost }
    }

    #[test]
    fn totals_daily_rows_and_csv() {
        let rows = vec![
            row("2027-01-31", "records", 10, 10_000),
            row("2027-01-31", "requests", 2, 0),
            row("2027-02-01", "records", 5, 5_000),
        ];
        let r = build("acme", "2027-01-31", "2027-02-01", &rows);
        assert_eq!(
            r.totals,
            vec![
                Total { metric: "records".into(), value: 15, cost: 0.015, by_model: vec![] },
                Total { metric: "requests".into(), value: 2, cost: 0.0, by_model: vec![] },
            ]
        );
        assert_eq!(r.daily.len(), 3);
        let csv = r.to_csv();
        assert!(csv.starts_with("date,metric,value,cost\r\n2027-01-31,records,10,0.010000\r\n"));
        assert!(csv.ends_with("total,requests,2,0.000000\r\n"));
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert!(parse_day("2027-02-30").is_err());
    }

    #[test]
    fn model_rows_are_a_breakdown_of_their_metric_not_an_addition() {
        let rows = vec![
            row("2027-01-31", "output_tokens", 300, 2_100),
            row("2027-01-31", "output_tokens[gpt-4o]", 100, 1_000),
            row("2027-01-31", "output_tokens[mini]", 200, 1_100),
            row("2027-02-01", "output_tokens", 50, 500),
            row("2027-02-01", "output_tokens[gpt-4o]", 50, 500),
        ];
        let r = build("acme", "2027-01-31", "2027-02-01", &rows);
        assert_eq!(r.totals.len(), 1);
        let t = &r.totals[0];
        assert_eq!((t.value, t.cost), (350, 0.0026));
        assert_eq!(r.total_cost, 0.0026);
        assert_eq!(
            t.by_model,
            vec![
                ModelTotal { model: "mini".into(), value: 200, cost: 0.0011 },
                ModelTotal { model: "gpt-4o".into(), value: 150, cost: 0.0015 },
            ]
        );
        assert_eq!(r.daily[1].model.as_deref(), Some("gpt-4o"));
        assert_eq!(r.daily[1].metric, "output_tokens");
        assert!(r.to_csv().contains("total,output_tokens[mini],200,0.001100\r\n"));
    }
}
