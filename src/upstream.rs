//! Upstream pools: round-robin load balancers with health checks, one per `[upstreams.NAME]`.
//!
//! Pools are built once at startup. Health checks run as Pingora background services, so the
//! hot path only asks the balancer for the next healthy backend.

use crate::config::UpstreamConfig;
use pingora::lb::health_check::{HttpHealthCheck, TcpHealthCheck};
use pingora::lb::selection::RoundRobin;
use pingora::lb::LoadBalancer;
use pingora::services::background::{background_service, GenBackgroundService};
use std::collections::HashMap;
use std::sync::Arc;

/// A pool's health-check task, run by the server as a background service.
pub type HealthCheckService = GenBackgroundService<LoadBalancer<RoundRobin>>;

/// One pool and its settings.
pub struct Pool {
    pub config: UpstreamConfig,
    pub lb: Arc<LoadBalancer<RoundRobin>>,
}

impl Pool {
    /// Seconds until a pool without a healthy server may have one again: the next health
    /// check, at least a second.
    pub fn retry_after_secs(&self) -> u64 {
        self.config.health_check.as_ref().map_or(1, |hc| hc.interval.as_secs_f64().ceil() as u64).max(1)
    }
}

/// All pools, by name.
#[derive(Default)]
pub struct Upstreams {
    pub pools: HashMap<Arc<str>, Pool>,
}

impl Upstreams {
    /// Builds the pools. Returns the health-check services the server must run.
    pub fn build(
        configs: &std::collections::BTreeMap<String, UpstreamConfig>,
    ) -> Result<(Upstreams, Vec<HealthCheckService>), String> {
        let mut pools = HashMap::new();
        let mut services = Vec::new();
        for (name, cfg) in configs {
            let mut lb = LoadBalancer::<RoundRobin>::try_from_iter(cfg.servers.iter().map(|a| a.to_string()))
                .map_err(|e| format!("upstream `{name}`: {e}"))?;
            let lb = match &cfg.health_check {
                Some(hc) => {
                    match &hc.path {
                        Some(path) => {
                            let host = cfg.host.clone().unwrap_or_else(|| "localhost".into());
                            let mut check = HttpHealthCheck::new(&host, false);
                            check.req.set_uri(
                                path.parse().map_err(|_| format!("upstream `{name}`: bad health check path"))?,
                            );
                            check.peer_template.options.connection_timeout = Some(cfg.connect_timeout);
                            check.peer_template.options.read_timeout = Some(cfg.connect_timeout * 2);
                            lb.set_health_check(Box::new(check));
                        }
                        None => {
                            let mut check = TcpHealthCheck::new();
                            check.peer_template.options.connection_timeout = Some(cfg.connect_timeout);
                            lb.set_health_check(check);
                        }
                    }
                    lb.health_check_frequency = Some(hc.interval);
                    lb.parallel_health_check = true;
                    let svc = background_service(&format!("health check {name}"), lb);
                    let task = svc.task();
                    services.push(svc);
                    task
                }
                None => Arc::new(lb),
            };
            let key: Arc<str> = name.as_str().into();
            pools.insert(key, Pool { config: cfg.clone(), lb });
        }
        Ok((Upstreams { pools }, services))
    }

    pub fn get(&self, name: &str) -> Option<&Pool> {
        self.pools.get(name)
    }

    /// Sets `tollgate_upstream_server_healthy{upstream, server}` from the health checks' last
    /// results. Called when `/metrics` is scraped, so the hot path never touches it. Pools are
    /// built once at start-up, so the series set is the config's servers.
    pub fn export_health(&self, gauge: &prometheus::IntGaugeVec) {
        for (name, pool) in &self.pools {
            let backends = pool.lb.backends();
            for b in backends.get_backend().iter() {
                let server = b.addr.to_string();
                gauge.with_label_values(&[&**name, &server]).set(i64::from(backends.ready(b)));
            }
        }
    }
}
