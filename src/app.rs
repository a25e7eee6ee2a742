//! The one place that wires config, stores, metrics, limits, the proxy and the admin listener
//! into a Pingora server. Nothing here is global: each piece is built once and passed down.

use crate::admin::AdminApp;
use crate::clock::{SharedClock, SystemClock};
use crate::config::{self, Config, StoreConfig, StoreKind};
use crate::edge::{Edge, EdgeLimits};
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::pipeline::Gateway;
use crate::runtime::{self, Runtime};
use crate::store::embedded::Embedded;
use crate::store::redis::RedisStore;
use crate::store::{Breaker, Counters, DirectoryStore, Ledger};
use crate::upstream::Upstreams;
use async_trait::async_trait;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Options of `tollgate run` that are not in the config file.
#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    /// Take the listening sockets over from a running instance (zero-downtime upgrade).
    pub upgrade: bool,
    pub daemon: bool,
}

/// Installs logging for the config's settings (see [`crate::logging`]).
pub fn init_logging(config: &Config) {
    crate::logging::init(config);
}

/// Loads the config or returns every problem as text.
pub fn load_or_report(path: &Path) -> Result<Config, String> {
    match config::load(path) {
        Ok(loaded) => {
            for w in loaded.warnings.warnings() {
                eprintln!("{w}");
            }
            Ok(loaded.config)
        }
        Err(diags) => Err(diags.to_string()),
    }
}

/// The store, seen through each of its traits.
pub struct Stores {
    pub counters: Arc<dyn Counters>,
    pub ledger: Arc<dyn Ledger>,
    pub directory: Arc<dyn DirectoryStore>,
}

/// Opens the configured store. Redis connects lazily, so a Redis that is down at startup is
/// handled by the failure policy, not by refusing to start.
pub fn open_store(
    cfg: &StoreConfig,
    clock: SharedClock,
    metrics: Arc<Metrics>,
    bg: &tokio::runtime::Runtime,
) -> Result<Stores, String> {
    match cfg.kind {
        StoreKind::Embedded => {
            let store = Arc::new(
                Embedded::open(&cfg.path, clock.now_millis())
                    .map_err(|e| format!("cannot open the embedded store at {}: {e}", cfg.path.display()))?,
            );
            Ok(Stores { counters: store.clone(), ledger: store.clone(), directory: store })
        }
        StoreKind::Redis => {
            let _guard = bg.enter();
            let breaker = Breaker::new(cfg.timeout, cfg.breaker_failures, cfg.breaker_cooldown, clock);
            let store = Arc::new(
                RedisStore::connect(&cfg.urls, breaker, metrics, cfg.timeout)
                    .map_err(|e| format!("cannot set up the Redis store ({}): {e}", cfg.urls.join(",")))?,
            );
            Ok(Stores { counters: store.clone(), ledger: store.clone(), directory: store })
        }
    }
}

/// Keeps the limits in step with the store: flushes usage, renews and returns concurrency
/// slots, evicts idle state, and at shutdown returns leases and flushes one last time.
struct Maintenance {
    limits: Arc<Limits>,
    admin: Arc<crate::admin::core::AdminCore>,
    meter: Arc<crate::metering::Meter>,
    flush_interval: Duration,
    meter_interval: Duration,
    slot_ttl: Duration,
}

#[async_trait]
impl BackgroundService for Maintenance {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut flush = tokio::time::interval(self.flush_interval);
        let mut slots = tokio::time::interval((self.slot_ttl / 3).max(Duration::from_millis(100)));
        let mut evict = tokio::time::interval(Duration::from_secs(60));
        let mut meter = tokio::time::interval(self.meter_interval);
        let mut directory = tokio::time::interval(Duration::from_millis(500));
        for t in [&mut flush, &mut slots, &mut evict, &mut meter, &mut directory] {
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        loop {
            tokio::select! {
                _ = flush.tick() => self.limits.quotas.flush().await,
                _ = meter.tick() => self.meter.flush().await,
                _ = directory.tick() => self.admin.poll().await,
                _ = slots.tick() => self.limits.concurrency.maintain().await,
                _ = evict.tick() => {
                    self.limits.rates.evict_idle(Duration::from_secs(600));
                    self.limits.quotas.evict_idle();
                }
                _ = shutdown.changed() => {
                    self.limits.quotas.shutdown().await;
                    self.limits.concurrency.shutdown().await;
                    self.meter.flush().await;
                    tracing::info!(buffered = self.meter.buffered(), "limits and usage flushed, leases returned");
                    return;
                }
            }
        }
    }
}

/// A built server and what must live as long as it.
pub struct Built {
    pub server: Server,
    /// Runs store connections set up before Pingora's runtimes exist.
    pub background: tokio::runtime::Runtime,
    pub metrics: Arc<Metrics>,
}

/// Builds the Pingora server for `config` (loaded from `config_path`, which reloads re-read).
pub fn build_server(
    config: Config,
    config_path: &Path,
    opts: &RunOptions,
    clock: SharedClock,
) -> Result<Built, String> {
    let mut conf = ServerConf {
        threads: config.server.threads,
        grace_period_seconds: Some(config.server.shutdown_grace.as_secs()),
        graceful_shutdown_timeout_seconds: Some(config.server.shutdown_timeout.as_secs().max(1)),
        upgrade_sock: config.server.upgrade_sock.display().to_string(),
        pid_file: config.server.pid_file.display().to_string(),
        ..ServerConf::default()
    };
    conf.daemon = opts.daemon;
    let opt = Opt { upgrade: opts.upgrade, daemon: opts.daemon, ..Opt::default() };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let background = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("tollgate-store")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the store runtime: {e}"))?;
    let metrics = Arc::new(Metrics::new());
    let stores = open_store(&config.store, clock.clone(), metrics.clone(), &background)?;
    let shared = config.store.kind == StoreKind::Redis;
    let meter = crate::metering::Meter::new(
        stores.ledger.clone(),
        metrics.clone(),
        config.metering.max_buffered_batches,
        config.store.instance_id.clone(),
        config.metrics.tenant_allow.clone(),
        config.metrics.tenant_top,
    );
    let webhook = config.metering.webhook.clone().map(|w| {
        let _guard = background.enter();
        crate::metering::webhook::start(w)
    });
    let meter_interval = config.metering.flush_interval;
    let limits = Limits::new(
        stores.counters,
        shared,
        clock.clone(),
        config.store.max_lease_block,
        config.store.instance_id.clone(),
        config.store.slot_ttl,
    );

    let (upstreams, health_checks) = Upstreams::build(&config.upstreams)?;
    let upstreams = Arc::new(upstreams);
    let listen = config.server.listen.clone();
    let edge_cfg = config.server.clone();
    let trusted_proxies = config.tenancy.trusted_proxies.clone();
    let admin_listen = config.server.admin_listen;
    let tls = config.server.tls.clone();
    let flush_interval = config.store.flush_interval;
    let slot_ttl = config.store.slot_ttl;
    let managed = match background
        .block_on(async { tokio::time::timeout(Duration::from_secs(2), stores.directory.load()).await })
    {
        Ok(Ok(data)) => data,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot load managed tenants yet; serving config tenants and retrying");
            Default::default()
        }
        Err(_) => {
            tracing::warn!("the store did not answer in time; serving config tenants and retrying");
            Default::default()
        }
    };
    let audit_path = config.admin.audit_log.clone().unwrap_or_else(|| {
        config_path.parent().map(|d| d.join("tollgate-audit.log")).unwrap_or_else(|| "tollgate-audit.log".into())
    });
    let rt = Runtime::build(Arc::new(config), Arc::new(managed));
    metrics.tenants.set(rt.directory.tenant_count() as i64);
    metrics.keys.set(rt.directory.key_count() as i64);
    let runtime = runtime::shared(rt);

    let admin_core = crate::admin::core::AdminCore::new(
        runtime.clone(),
        stores.directory.clone(),
        stores.ledger.clone(),
        limits.clone(),
        metrics.clone(),
        clock.clone(),
        config_path.to_path_buf(),
        audit_path,
    );
    // SIGHUP reloads the config (validated first; an invalid file changes nothing).
    {
        let core = admin_core.clone();
        background.spawn(async move {
            let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
                tracing::error!("cannot listen for SIGHUP; reload through POST /v1/reload");
                return;
            };
            while hup.recv().await.is_some() {
                let outcome = core.reload();
                let actor = crate::admin::core::Actor { id: "signal:SIGHUP".into(), request_id: "-".into() };
                core.audit_reload(&actor, outcome.is_ok());
                match outcome {
                    Ok(o) => tracing::info!(summary = %o.summary, warnings = ?o.warnings, "SIGHUP: config reloaded"),
                    Err(errors) => tracing::error!(?errors, "SIGHUP: config not reloaded"),
                }
            }
        });
    }
    let gateway = Gateway {
        admin: admin_core.clone(),
        runtime: runtime.clone(),
        upstreams: upstreams.clone(),
        clock,
        limits: limits.clone(),
        meter: meter.clone(),
        webhook,
    };
    let fd_limit = crate::edge::raise_fd_limit();
    let proxy_limits = EdgeLimits {
        listener: "proxy",
        header_timeout: edge_cfg.header_timeout,
        idle_timeout: edge_cfg.idle_timeout,
        max_connections: match edge_cfg.max_connections {
            0 => crate::edge::default_max_connections(fd_limit),
            n => n,
        },
        max_connections_per_ip: edge_cfg.max_connections_per_ip,
        exempt: trusted_proxies,
    };
    let proxy_app = pingora::proxy::http_proxy(&server.configuration, gateway);
    let mut proxy = Service::new("tollgate proxy".to_string(), Edge::new(proxy_app, proxy_limits, &metrics));
    for addr in &listen {
        proxy.add_tcp(&addr.to_string());
    }
    if let Some(tls) = tls {
        proxy
            .add_tls(&tls.listen.to_string(), &tls.cert.display().to_string(), &tls.key.display().to_string())
            .map_err(|e| format!("TLS listener {}: {e}", tls.listen))?;
    }
    // The admin listener has caps of its own, so a flood on the data plane cannot starve it.
    let admin_limits = EdgeLimits {
        listener: "admin",
        header_timeout: edge_cfg.header_timeout,
        idle_timeout: edge_cfg.idle_timeout,
        max_connections: 256,
        max_connections_per_ip: 64,
        exempt: Vec::new(),
    };
    let mut admin = Service::new(
        "tollgate admin".to_string(),
        Edge::new(
            AdminApp { runtime, upstreams, metrics: metrics.clone(), core: admin_core.clone() },
            admin_limits,
            &metrics,
        ),
    );
    admin.add_tcp(&admin_listen.to_string());

    server.add_service(proxy);
    server.add_service(admin);
    for hc in health_checks {
        server.add_service(hc);
    }
    server.add_service(background_service(
        "limits maintenance",
        Maintenance { limits, admin: admin_core, meter, flush_interval, meter_interval, slot_ttl },
    ));
    Ok(Built { server, background, metrics })
}

/// `tollgate run`: load, build, serve until a signal.
pub fn run(path: &Path, opts: RunOptions) -> Result<(), String> {
    let config = load_or_report(path)?;
    init_logging(&config);
    tracing::info!(
        config = %path.display(),
        listen = ?config.server.listen,
        admin = %config.server.admin_listen,
        summary = %config.summary(),
        "tollgate starting"
    );
    let built = build_server(config, path, &opts, Arc::new(SystemClock))?;
    let Built { server, background, .. } = built;
    // The store runtime must outlive the server; run_forever never returns.
    let _keep = background;
    server.run_forever()
}
