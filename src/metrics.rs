//! Prometheus metrics, in a registry owned by the app (never the process-global one).
//!
//! Names start with `tollgate_`, use base units and `_total` for counters. Labels are bounded:
//! tier, rule, decision, status class, status (known codes, else `other`), reason, metric,
//! upstream pool and server, store op. Per-tenant series exist only for tenants an operator
//! opts in (`[metrics] tenant_labels`), so the series count does not grow with the number of
//! tenants.

use crate::store::StoreObserver;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Buckets of the request, upstream and first-byte histograms, in seconds: from 1 ms, where a
/// cached or refused answer lands, up to 10 minutes, where long streamed responses (server-sent
/// events, model output) end. Longer requests fall in `+Inf`.
pub const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// The status codes that get a `status` label value of their own; any other is `other`, so a
/// misbehaving upstream cannot create series at will. Sorted, for the binary search.
const KNOWN_STATUS: &[(u16, &str)] = &[
    (100, "100"),
    (101, "101"),
    (200, "200"),
    (201, "201"),
    (202, "202"),
    (203, "203"),
    (204, "204"),
    (206, "206"),
    (301, "301"),
    (302, "302"),
    (303, "303"),
    (304, "304"),
    (307, "307"),
    (308, "308"),
    (400, "400"),
    (401, "401"),
    (402, "402"),
    (403, "403"),
    (404, "404"),
    (405, "405"),
    (406, "406"),
    (408, "408"),
    (409, "409"),
    (410, "410"),
    (411, "411"),
    (412, "412"),
    (413, "413"),
    (414, "414"),
    (415, "415"),
    (416, "416"),
    (417, "417"),
    (421, "421"),
    (422, "422"),
    (425, "425"),
    (426, "426"),
    (428, "428"),
    (429, "429"),
    (431, "431"),
    (451, "451"),
    (500, "500"),
    (501, "501"),
    (502, "502"),
    (503, "503"),
    (504, "504"),
    (505, "505"),
];

/// The `status` label of a status code, and its index (for caching handles): a known code, or
/// `other` (index `KNOWN_STATUS.len()`).
pub fn status_label(status: u16) -> (usize, &'static str) {
    match KNOWN_STATUS.binary_search_by_key(&status, |(s, _)| *s) {
        Ok(i) => (i, KNOWN_STATUS[i].1),
        Err(_) => (KNOWN_STATUS.len(), "other"),
    }
}

/// Counts one request in flight until dropped. It lives in the request context, so the gauge
/// goes down however the request ends (answered, refused, or the client gone).
pub struct InFlight(IntGauge);

impl InFlight {
    pub fn new(gauge: &IntGauge) -> InFlight {
        gauge.inc();
        InFlight(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Every metric the gateway exports.
pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub rejections: IntCounterVec,
    /// 502, 503 and 504 answers caused by the upstream side, by pool and reason: not
    /// refusals of the gateway, so not in `rejections`.
    pub upstream_errors: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_duration: HistogramVec,
    pub upstream_first_byte: HistogramVec,
    pub in_flight: IntGauge,
    pub upstream_healthy: IntGaugeVec,
    pub bytes: IntCounterVec,
    pub usage_units: IntCounterVec,
    pub store_round_trips: IntCounterVec,
    pub store_errors: IntCounterVec,
    pub ledger_flush: Histogram,
    pub ledger_buffered: IntGauge,
    /// Live instances in the fleet registry, as this instance last read it.
    pub fleet_instances: IntGauge,
    pub ledger_dropped: prometheus::IntCounter,
    pub config_reloads: IntCounterVec,
    pub tenants: IntGauge,
    pub keys: IntGauge,
    pub build_info: IntGaugeVec,
    pub quota_warnings: IntCounterVec,
    /// Charges that kept their estimate because the answer did not settle them (a stream cut
    /// short, a body without the path, a value that is not a count), by tier, metric, reason.
    pub charges_unsettled: IntCounterVec,
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
    /// Builds and registers every metric with the default latency buckets. Panics only on a
    /// programming error (a bad name).
    pub fn new() -> Metrics {
        Metrics::with_buckets(LATENCY_BUCKETS)
    }

    /// Like [`Metrics::new`], with the latency histograms' bucket bounds (seconds, increasing;
    /// validated by the config).
    pub fn with_buckets(buckets: &[f64]) -> Metrics {
        let registry = Registry::new();
        let r = &registry;
        let latency = buckets.to_vec();
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
                .buckets(latency.clone()),
            &["upstream"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(upstream_duration.clone())).unwrap_or_else(|e| panic!("{e}"));
        let upstream_first_byte = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_upstream_first_byte_seconds",
                "Time from choosing an upstream server to the upstream's response head.",
            )
            .buckets(latency),
            &["upstream"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(upstream_first_byte.clone())).unwrap_or_else(|e| panic!("{e}"));
        let upstream_healthy = IntGaugeVec::new(
            Opts::new(
                "tollgate_upstream_server_healthy",
                "1 when the upstream server passes its health check (or the pool has none), else 0.",
            ),
            &["upstream", "server"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(upstream_healthy.clone())).unwrap_or_else(|e| panic!("{e}"));
        let ledger_flush = Histogram::with_opts(
            HistogramOpts::new(
                "tollgate_ledger_flush_seconds",
                "Time of one usage ledger write (a flush or a replay).",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(ledger_flush.clone())).unwrap_or_else(|e| panic!("{e}"));
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).unwrap_or_else(|e| panic!("{e}"));
            r.register(Box::new(g.clone())).unwrap_or_else(|e| panic!("{e}"));
            g
        };
        let ledger_buffered =
            gauge("tollgate_ledger_buffered_batches", "Flushes whose usage batches wait for the store.");
        let fleet_instances = gauge(
            "tollgate_fleet_instances",
            "Live instances in the fleet registry (quota lease blocks and the `local` allowance are shares of it).",
        );
        let tenants = gauge("tollgate_tenants", "Tenants in the directory.");
        let keys = gauge("tollgate_keys", "API keys in the directory.");
        let in_flight = gauge("tollgate_requests_in_flight", "Requests being handled right now.");
        let ledger_dropped = prometheus::IntCounter::new(
            "tollgate_ledger_dropped_batches_total",
            "Flushes of usage dropped because the buffer was full during a store outage.",
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
                &["tier", "rule", "decision", "status_class", "status"],
            ),
            rejections: counter(
                r,
                "tollgate_rejections_total",
                "Requests refused by the gateway, by reason.",
                &["tier", "reason"],
            ),
            upstream_errors: counter(
                r,
                "tollgate_upstream_errors_total",
                "Requests the upstream side failed (no healthy server, connect error, timeout), by reason.",
                &["upstream", "reason"],
            ),
            request_duration,
            upstream_duration,
            upstream_first_byte,
            in_flight,
            upstream_healthy,
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
            fleet_instances,
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
            charges_unsettled: counter(
                r,
                "tollgate_charges_unsettled_total",
                "Charges that kept their estimate: the answer ended without a settlement (reason broken, missing or invalid)",
                &["tier", "metric", "reason"],
            ),
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

/// The `reason` label values of `tollgate_upstream_errors_total`.
pub const UPSTREAM_ERROR_REASONS: &[&str] =
    &["no_healthy_server", "connect_error", "connect_timeout", "timeout", "error"];

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_labels_are_bounded() {
        assert_eq!(status_label(200).1, "200");
        assert_eq!(status_label(503).1, "503");
        assert_eq!(status_label(418), (KNOWN_STATUS.len(), "other"));
        assert_eq!(status_label(0).1, "other");
        assert!(KNOWN_STATUS.windows(2).all(|w| w[0].0 < w[1].0), "sorted for the binary search");
        assert!(KNOWN_STATUS.iter().all(|(n, s)| n.to_string() == *s));
    }

    #[test]
    fn in_flight_goes_down_when_dropped() {
        let m = Metrics::new();
        let a = InFlight::new(&m.in_flight);
        let b = InFlight::new(&m.in_flight);
        assert_eq!(m.in_flight.get(), 2);
        drop(a);
        drop(b);
        assert_eq!(m.in_flight.get(), 0);
    }

    #[test]
    fn latency_buckets_reach_streaming_lengths() {
        assert!(LATENCY_BUCKETS.windows(2).all(|w| w[0] < w[1]));
        assert!(LATENCY_BUCKETS.last().is_some_and(|b| *b >= 600.0));
    }
}
