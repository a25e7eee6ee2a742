//! Reading the limit parts of the config: tier rates, quotas, concurrency and queue, prices and
//! warning thresholds, and tenant overrides. The result is merged into one [`Policy`] per
//! tenant, so the hot path never merges anything.

use super::diag::{Diagnostics, SourceFile};
use super::file::{SStr, TierFile};
use super::units;
use crate::policy::{ConcurrencySpec, Period, Policy, QueueSpec, QuotaSpec, RateSpec, StorePolicy};
use crate::schema::limits::positive;
pub use crate::schema::limits::{quota_spec, rate_spec};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use toml::Spanned;

/// A tier's limits.
#[derive(Debug, Clone, Default)]
pub struct TierLimits {
    pub rate: Option<RateSpec>,
    pub quotas: BTreeMap<Arc<str>, QuotaSpec>,
    pub concurrency: Option<ConcurrencySpec>,
    pub priority: i64,
    pub on_store_error: StorePolicy,
    /// Price per unit, per metric (for a metric priced per model: its `default`).
    pub prices: BTreeMap<Arc<str>, f64>,
    /// Price per unit, per metric and model.
    pub model_prices: BTreeMap<Arc<str>, BTreeMap<Arc<str>, f64>>,
    pub warn_at: Vec<u32>,
}

impl TierLimits {
    /// The price of one unit of `metric` used by `model`: the model's price, else the metric's.
    pub fn price(&self, metric: &str, model: Option<&str>) -> f64 {
        model
            .and_then(|m| self.model_prices.get(metric).and_then(|per| per.get(m)))
            .or_else(|| self.prices.get(metric))
            .copied()
            .unwrap_or(0.0)
    }

    /// Whether `model` has a price of its own on some metric (it is then always its own row).
    pub fn prices_model(&self, model: &str) -> bool {
        self.model_prices.values().any(|per| per.contains_key(model))
    }
}

/// What a tenant changes about its tier.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    /// `(limit, period)` from `rate.requests_per_{second,minute,hour}`.
    pub rate_limit: Option<(u32, Duration)>,
    pub rate_burst: Option<u32>,
    pub concurrency: Option<u32>,
    pub quotas: BTreeMap<String, QuotaOverride>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct QuotaOverride {
    pub limit: Option<u64>,
    pub period: Option<Period>,
    pub hard: Option<bool>,
    pub overage_percent: Option<u32>,
}

fn duration(s: &SStr, src: &SourceFile, diags: &mut Diagnostics) -> Option<Duration> {
    match units::parse_duration(s.get_ref()) {
        Ok(d) => Some(d),
        Err(e) => {
            diags.error_at(src, s.span(), e);
            None
        }
    }
}

/// Reads a tier's limit fields.
pub fn tier_limits(tf: &TierFile, src: &SourceFile, diags: &mut Diagnostics) -> TierLimits {
    let mut out = TierLimits::default();
    if let Some(r) = &tf.rate {
        out.rate = rate_spec(r.get_ref(), r.span(), src, diags);
    }
    for (metric, q) in tf.quotas.iter().flatten() {
        out.quotas.insert(metric.as_str().into(), quota_spec(q, src, diags));
    }
    if let Some(c) = &tf.concurrency {
        if let Some(limit) = positive(c, "concurrency", src, diags) {
            let queue = tf.queue.as_ref().map(|q| {
                let qf = q.get_ref();
                let max = qf.max.as_ref().and_then(|m| positive(m, "queue.max", src, diags)).unwrap_or(100);
                let timeout =
                    qf.timeout.as_ref().and_then(|t| duration(t, src, diags)).unwrap_or(Duration::from_secs(5));
                QueueSpec { max: max.min(u32::MAX as u64) as u32, timeout }
            });
            out.concurrency = Some(ConcurrencySpec { limit: limit.min(u32::MAX as u64) as u32, queue });
        }
    } else if let Some(q) = &tf.queue {
        diags.error_at(src, q.span(), "`queue` needs `concurrency` on the same tier");
    }
    out.priority = tf.priority.as_ref().map(|p| *p.get_ref()).unwrap_or(0);
    if let Some(p) = &tf.on_store_error {
        match StorePolicy::parse(p.get_ref()) {
            Some(v) => out.on_store_error = v,
            None => diags.error_at(
                src,
                p.span(),
                format!("unknown on_store_error `{}`; use local, open or closed", p.get_ref()),
            ),
        }
    }
    for (metric, price) in tf.price.iter().flatten() {
        let bad = |p: f64| !p.is_finite() || p < 0.0;
        match price.get_ref() {
            crate::config::file::PriceFile::Flat(p) if bad(*p) => {
                diags.error_at(src, price.span(), "a price is a non-negative number per unit");
            }
            crate::config::file::PriceFile::Flat(p) => {
                out.prices.insert(metric.as_str().into(), *p);
            }
            crate::config::file::PriceFile::PerModel(models) => {
                let mut per = BTreeMap::new();
                for (model, p) in models {
                    if bad(*p) {
                        diags.error_at(
                            src,
                            price.span(),
                            format!("the price of model `{model}` is not a non-negative number per unit"),
                        );
                    } else if model == "default" {
                        out.prices.insert(metric.as_str().into(), *p);
                    } else {
                        per.insert(Arc::from(model.as_str()), *p);
                    }
                }
                out.model_prices.insert(metric.as_str().into(), per);
            }
        }
    }
    out.warn_at = match &tf.warn_at {
        None => vec![80, 90],
        Some(list) => {
            let mut v = Vec::new();
            for w in list {
                if (1..=100).contains(w.get_ref()) {
                    v.push(*w.get_ref() as u32);
                } else {
                    diags.error_at(src, w.span(), "a warning threshold is a percentage between 1 and 100");
                }
            }
            v.sort_unstable();
            v.dedup();
            v
        }
    };
    out
}

/// Flattens `overrides` (dotted keys, or nested tables) into `path → value`.
fn flatten(prefix: &str, table: &toml::Table, out: &mut Vec<(String, toml::Value)>) {
    for (k, v) in table {
        let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match v {
            toml::Value::Table(t) => flatten(&path, t, out),
            other => out.push((path, other.clone())),
        }
    }
}

/// Reads a tenant's `overrides`. Every key is checked; the value is validated like the tier's.
pub fn overrides(o: &Spanned<toml::Table>, src: &SourceFile, diags: &mut Diagnostics) -> Overrides {
    let mut out = Overrides::default();
    let mut flat = Vec::new();
    flatten("", o.get_ref(), &mut flat);
    let span = o.span();
    for (path, value) in flat {
        let int = |diags: &mut Diagnostics| -> Option<u64> {
            match value.as_integer() {
                Some(n) if n > 0 => Some(n as u64),
                _ => {
                    diags.error_at(src, span.clone(), format!("override `{path}` must be a positive integer"));
                    None
                }
            }
        };
        let parts: Vec<&str> = path.split('.').collect();
        match parts.as_slice() {
            ["rate", unit @ ("requests_per_second" | "requests_per_minute" | "requests_per_hour")] => {
                let period = match *unit {
                    "requests_per_second" => Duration::from_secs(1),
                    "requests_per_minute" => Duration::from_secs(60),
                    _ => Duration::from_secs(3600),
                };
                if let Some(n) = int(diags) {
                    out.rate_limit = Some((n.min(u32::MAX as u64) as u32, period));
                }
            }
            ["rate", "burst"] => out.rate_burst = int(diags).map(|n| n.min(u32::MAX as u64) as u32),
            ["concurrency"] => out.concurrency = int(diags).map(|n| n.min(u32::MAX as u64) as u32),
            ["quotas", metric, field] => {
                let q = out.quotas.entry(metric.to_string()).or_default();
                match *field {
                    "limit" => match value.as_integer() {
                        Some(n) if n >= 0 => q.limit = Some(n as u64),
                        _ => diags.error_at(src, span.clone(), format!("override `{path}` must be a non-negative integer")),
                    },
                    "period" => match value.as_str().and_then(Period::parse) {
                        Some(p) => q.period = Some(p),
                        None => diags.error_at(src, span.clone(), format!("override `{path}` must be minute, hour, day, month or never")),
                    },
                    "enforcement" => match value.as_str() {
                        Some("hard") => q.hard = Some(true),
                        Some("soft") => q.hard = Some(false),
                        _ => diags.error_at(src, span.clone(), format!("override `{path}` must be `hard` or `soft`")),
                    },
                    "overage" => match value.as_integer() {
                        Some(n) if (0..=1000).contains(&n) => q.overage_percent = Some(n as u32),
                        _ => diags.error_at(src, span.clone(), format!("override `{path}` must be a percentage between 0 and 1000")),
                    },
                    other => diags.error_at(src, span.clone(), format!("unknown quota field `{other}` in override `{path}`; use limit, period, enforcement or overage")),
                }
            }
            _ => diags.error_at(
                src,
                span.clone(),
                format!("unknown override `{path}`; overridable: rate.requests_per_second|minute|hour, rate.burst, concurrency, quotas.METRIC.limit|period|enforcement|overage"),
            ),
        }
    }
    out
}

/// Merges a tier's limits with a tenant's overrides and calendar settings.
pub fn merge(tier: &TierLimits, o: &Overrides, anchor_day: u32, timezone: chrono_tz::Tz) -> Policy {
    let rate = match (&tier.rate, o.rate_limit, o.rate_burst) {
        (base, None, None) => base.clone(),
        (base, limit, burst) => {
            let (l, period) =
                limit.or(base.as_ref().map(|b| (b.limit, b.period))).unwrap_or((u32::MAX, Duration::from_secs(1)));
            // Without its own burst, an overridden limit keeps the tier's burst only up to the new
            // limit: a tier burst that defaulted to a larger limit must not outgrow it.
            let burst =
                burst.or(base.as_ref().map(|b| if limit.is_some() { b.burst.min(l) } else { b.burst })).unwrap_or(l);
            Some(RateSpec { limit: l, period, burst, global: base.as_ref().is_some_and(|b| b.global) })
        }
    };
    let mut quotas = tier.quotas.clone();
    for (metric, q) in &o.quotas {
        let entry = quotas.entry(metric.as_str().into()).or_insert(QuotaSpec {
            limit: 0,
            period: Period::Month,
            hard: true,
            overage_percent: 0,
        });
        if let Some(l) = q.limit {
            entry.limit = l;
        }
        if let Some(p) = q.period {
            entry.period = p;
        }
        if let Some(h) = q.hard {
            entry.hard = h;
        }
        if let Some(ov) = q.overage_percent {
            entry.overage_percent = ov;
        }
    }
    let concurrency = match (&tier.concurrency, o.concurrency) {
        (c, None) => c.clone(),
        (Some(c), Some(n)) => Some(ConcurrencySpec { limit: n, queue: c.queue.clone() }),
        (None, Some(n)) => Some(ConcurrencySpec { limit: n, queue: None }),
    };
    Policy {
        rate,
        quotas,
        concurrency,
        priority: tier.priority,
        on_store_error: tier.on_store_error,
        billing_anchor_day: anchor_day,
        timezone,
        warn_at: tier.warn_at.clone(),
    }
}
