//! Prometheus metrics, in a registry owned by the app (never the process-global one).
//!
//! Names start with `tollgate_`, use base units and `_total` for counters. Labels are bounded:
//! tier, rule, decision, status class, reason, metric, store op. Per-tenant series exist only
//! for tenants an operator opts in (`[metrics] tenant_labels`), so the series count does not
//! grow with the number of tenants.

use crate::store::StoreObserver;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric the gateway exports.
pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub rejections: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_duration: HistogramVec,
    pub bytes: IntCounterVec,
    pub usage_units: IntCounterVec,
    pub store_round_trips: IntCounterVec,
    pub store_errors: IntCounterVec,
    pub ledger_flush: Histogram,
    pub ledger_buffered: IntGauge,
    pub ledger_dropped: prometheus::IntCounter,
    pub config_reloads: IntCounterVec,
    pub tenants: IntGauge,
    pub keys: IntGauge,
    pub build_info: IntGaugeVec,
    pub quota_warnings: IntCounterVec,
    pub tenant_requests: IntCounterVec,
    pub connections_refused: IntCounterVec,
    pub connections_timed_out: IntCounterVec,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(c.clone())).unwrap_or_else(|e| panic!("register {name}: {e}"));
    c
}

impl Metrics {
    /// Builds and registers every metric. Panics only on a programming error (a bad name).
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let r = &registry;
        let latency = vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_request_duration_seconds",
                "Time from request start to the end of the response.",
            )
            .buckets(latency.clone()),
            &["tier", "rule"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(request_duration.clone())).unwrap_or_else(|e| panic!("{e}"));
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new("tollgate_upstream_duration_seconds", "Time spent waiting on the upstream.")
                .buckets(latency),
            &["upstream"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(upstream_duration.clone())).unwrap_or_else(|e| panic!("{e}"));
        let ledger_flush = Histogram::with_opts(
            HistogramOpts::new("tollgate_ledger_flush_seconds", "Time to write one usage batch to the ledger.")
                .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(ledger_flush.clone())).unwrap_or_else(|e| panic!("{e}"));
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).unwrap_or_else(|e| panic!("{e}"));
            r.register(Box::new(g.clone())).unwrap_or_else(|e| panic!("{e}"));
            g
        };
        let ledger_buffered = gauge("tollgate_ledger_buffered_batches", "Usage batches waiting for the store.");
        let tenants = gauge("tollgate_tenants", "Tenants in the directory.");
        let keys = gauge("tollgate_keys", "API keys in the directory.");
        let ledger_dropped = prometheus::IntCounter::new(
            "tollgate_ledger_dropped_batches_total",
            "Usage batches dropped because the buffer was full during a store outage.",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(ledger_dropped.clone())).unwrap_or_else(|e| panic!("{e}"));
        let build_info = IntGaugeVec::new(Opts::new("tollgate_build_info", "Build information."), &["version"])
            .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(build_info.clone())).unwrap_or_else(|e| panic!("{e}"));
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        Metrics {
            requests: counter(
                r,
                "tollgate_requests_total",
                "Requests, by outcome.",
                &["tier", "rule", "decision", "status_class"],
            ),
            rejections: counter(
                r,
                "tollgate_rejections_total",
                "Requests refused by the gateway, by reason.",
                &["tier", "reason"],
            ),
            request_duration,
            upstream_duration,
            bytes: counter(
                r,
                "tollgate_bytes_total",
                "Body bytes, by direction (in: from clients, out: to clients).",
                &["direction"],
            ),
            usage_units: counter(
                r,
                "tollgate_usage_units_total",
                "Metered usage units, by metric.",
                &["tier", "metric"],
            ),
            store_round_trips: counter(
                r,
                "tollgate_store_round_trips_total",
                "Calls to the shared store.",
                &["store", "op"],
            ),
            store_errors: counter(
                r,
                "tollgate_store_errors_total",
                "Failed or timed-out store calls.",
                &["store", "op"],
            ),
            ledger_flush,
            ledger_buffered,
            ledger_dropped,
            config_reloads: counter(r, "tollgate_config_reloads_total", "Config reloads, by result.", &["result"]),
            connections_refused: counter(
                r,
                "tollgate_connections_refused_total",
                "Connections closed at accept because a connection cap was reached.",
                &["listener", "reason"],
            ),
            connections_timed_out: counter(
                r,
                "tollgate_connections_timed_out_total",
                "Connections closed because a client did not send a whole request head in time.",
                &["listener", "reason"],
            ),
            tenants,
            keys,
            build_info,
            quota_warnings: counter(
                r,
                "tollgate_quota_warnings_total",
                "Quota warning thresholds crossed.",
                &["tier", "metric", "threshold"],
            ),
            tenant_requests: counter(
                r,
                "tollgate_tenant_requests_total",
                "Requests of opted-in tenants.",
                &["tenant", "decision"],
            ),
            registry,
        }
        .with_initial_series()
    }

    /// Series that should read 0 rather than be absent before their first event.
    fn with_initial_series(self) -> Self {
        for result in ["ok", "error"] {
            self.config_reloads.with_label_values(&[result]);
        }
        self
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl StoreObserver for Metrics {
    fn round_trip(&self, store: &'static str, op: &'static str) {
        self.store_round_trips.with_label_values(&[store, op]).inc();
    }

    fn error(&self, store: &'static str, op: &'static str) {
        self.store_errors.with_label_values(&[store, op]).inc();
    }
}
