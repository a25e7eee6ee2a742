//! The one place that wires config, stores, metrics, limits, the proxy and the admin listener
//! into a Pingora server, and runs the process around it. Nothing here is global: each piece is
//! built once and passed down.
//!
//! What `tollgate run` guarantees:
//!
//! - **Paths do not depend on the working directory.** The config path is made absolute before
//!   anything else, so a reload (SIGHUP or `POST /v1/reload`) reads the same file in the
//!   foreground and under `run -d`, whose working directory is `/`.
//! - **Every listener, or an exit.** Before serving, each configured address (`listen`,
//!   `tls.listen`, `admin_listen`) is bound once as a probe and released. An address another
//!   process holds is tried again for `server.bind_retry`; then the process exits 1 with one
//!   line, `cannot listen on ADDR (KEY): ...`. An upgrade (`-u`) takes its sockets from the
//!   running process and skips the probe. Once Pingora runs, a watcher checks that every address
//!   has a bound listener within `bind_retry` plus a few seconds and ends the process the same
//!   way if one has not, instead of leaving a process without a listener behind.
//! - **Ready means listening.** `/readyz` answers 503 until every listener is bound. The
//!   `tollgate started` line (with the version) is written at that moment, and `run -d` returns
//!   only then: 0 when the daemon serves, 1 when it stopped before it could.
//! - **Usage is written after the last request.** A shutdown signal is logged when it arrives.
//!   Requests in flight keep running through `shutdown_grace`; the pending usage, quota debts
//!   and leases go to the store only once Pingora's runtimes have stopped, when no request can
//!   still be running, and `tollgate stopped` is the process's last line.
//! - **`run -d` forks before any thread exists**, so the store runtime and the SIGHUP listener
//!   live in the daemon, not in the parent that returns.

use crate::admin::AdminApp;
use crate::clock::{SharedClock, SystemClock};
use crate::config::{self, Config, ServerConfig, StoreConfig, StoreKind};
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
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{ListenFds, RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use pingora::services::{ServiceReadyNotifier, ServiceWithDependents};
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long after Pingora starts its services the listeners may take to be bound, beyond
/// `bind_retry`: time for the service runtimes to start.
const STARTUP_MARGIN: Duration = Duration::from_secs(5);

/// After SIGQUIT, how long Pingora keeps both processes accepting before the old one starts its
/// graceful shutdown (Pingora's `CLOSE_TIMEOUT`).
const UPGRADE_HANDOVER: Duration = Duration::from_secs(5);

/// Options of `tollgate run` that are not in the config file.
#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    /// Take the listening sockets over from a running instance (zero-downtime upgrade).
    pub upgrade: bool,
    /// Detach into the background (`-d`); the starting process returns once the daemon listens.
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
    /// The Redis store itself, when the store is Redis (for [`Stores::wait_connected`]).
    pub redis: Option<Arc<RedisStore>>,
    /// Asynchronous jobs: in the SQLite file, or in Redis.
    pub jobs: Arc<dyn crate::store::jobs::JobStore>,
}

impl Stores {
    /// Waits up to `within` until the store can take calls: a Redis Cluster is discovered in
    /// the background after [`open_store`], and a command that reads the store once would
    /// otherwise fail before it is there. The gateway does not wait (its failure policy covers
    /// the moment); commands that read the store and exit do.
    pub fn wait_connected(&self, within: Duration, rt: &tokio::runtime::Runtime) -> Result<(), String> {
        match &self.redis {
            Some(r) => rt.block_on(r.wait_connected(tokio::time::Instant::now() + within)),
            None => Ok(()),
        }
    }
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
            let jobs = Arc::new(
                crate::store::jobs_embedded::EmbeddedJobs::open(store.connection())
                    .map_err(|e| format!("cannot open the job table in {}: {e}", cfg.path.display()))?,
            );
            Ok(Stores { counters: store.clone(), ledger: store.clone(), directory: store, redis: None, jobs })
        }
        StoreKind::Redis => {
            let _guard = bg.enter();
            let breaker = Breaker::new(cfg.timeout, cfg.breaker_failures, cfg.breaker_cooldown, clock);
            let store = if cfg.cluster {
                RedisStore::connect_cluster(&cfg.urls, breaker, metrics, cfg.timeout)
            } else {
                RedisStore::connect(&cfg.urls, breaker, metrics, cfg.timeout)
            };
            let store = Arc::new(
                store
                    .map_err(|e| format!("cannot set up the Redis store ({}): {e}", cfg.urls.join(",")))?
                    .with_lease_timeout(cfg.lease_timeout),
            );
            Ok(Stores {
                counters: store.clone(),
                ledger: store.clone(),
                directory: store.clone(),
                jobs: store.clone(),
                redis: Some(store),
            })
        }
    }
}

/// The limits' store settings. The holder name carries a random start id next to
/// `instance_id`: a process restarted at once with the same id (or a container that keeps its
/// host name and pid) never takes over its predecessor's slots or leases.
pub fn limit_settings(store: &StoreConfig) -> crate::limits::LimitSettings {
    crate::limits::LimitSettings {
        lease: crate::limits::quota::LeaseSettings {
            max_block: store.max_lease_block,
            holder: format!("{}-{:08x}", store.instance_id, rand::random::<u32>()).into(),
            ttl: store.lease_ttl,
            idle: store.lease_idle,
            // A little longer than the call's own deadline, so that a late call ends as a
            // store timeout (counted by the breaker) before the request gives up on it.
            wait: store.lease_timeout + Duration::from_millis(50),
        },
        slot_ttl: store.slot_ttl,
    }
}

/// Keeps the limits in step with the store while the process serves: flushes usage, renews and
/// returns concurrency slots, evicts idle state. From the shutdown signal on it only renews slots
/// ([`Finish`] writes the rest once the last request is over).
struct Maintenance {
    limits: Arc<Limits>,
    admin: Arc<crate::admin::core::AdminCore>,
    meter: Arc<crate::metering::Meter>,
    flush_interval: Duration,
    meter_interval: Duration,
    slot_ttl: Duration,
}

/// How often an instance announces itself in the fleet registry; it counts as alive for
/// three of these.
const FLEET_HEARTBEAT: Duration = Duration::from_secs(1);

impl Maintenance {
    /// Announces this instance and records the fleet's size (quota lease blocks and the
    /// `local` allowance are shares of it). On failure the last size stays.
    async fn heartbeat(&self) {
        let ttl = (FLEET_HEARTBEAT * 3).as_millis() as i64;
        let q = &self.limits.quotas;
        match self.limits.store.heartbeat(q.holder(), self.limits.clock.now_millis(), ttl).await {
            Ok(n) => {
                q.set_live_instances(n);
                self.meter.metrics().fleet_instances.set(n as i64);
            }
            Err(e) => tracing::debug!(error = %e, "fleet heartbeat failed"),
        }
    }
}

#[async_trait]
impl BackgroundService for Maintenance {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut flush = tokio::time::interval(self.flush_interval);
        let mut slots = tokio::time::interval((self.slot_ttl / 3).max(Duration::from_millis(100)));
        let mut evict = tokio::time::interval(Duration::from_secs(60));
        let mut meter = tokio::time::interval(self.meter_interval);
        let mut directory = tokio::time::interval(Duration::from_millis(500));
        let mut fleet = tokio::time::interval(FLEET_HEARTBEAT);
        for t in [&mut flush, &mut slots, &mut evict, &mut meter, &mut directory, &mut fleet] {
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        loop {
            tokio::select! {
                _ = flush.tick() => self.limits.quotas.flush().await,
                _ = self.limits.quotas.wait_urgent() => self.limits.quotas.flush().await,
                _ = meter.tick() => self.meter.flush().await,
                // On a task of its own: a load of every record (at start, or after falling
                // behind the feed) must not hold up flushes, slot heartbeats or leases.
                _ = directory.tick() => {
                    let admin = self.admin.clone();
                    tokio::spawn(async move { admin.poll().await });
                }
                _ = fleet.tick(), if self.limits.shared => self.heartbeat().await,
                _ = slots.tick() => self.limits.concurrency.maintain().await,
                _ = evict.tick() => {
                    self.limits.rates.evict_idle(Duration::from_secs(600));
                    self.limits.quotas.evict_idle();
                }
                _ = shutdown.changed() => break,
            }
        }
        // Draining: requests in flight still hold concurrency slots, so those stay renewed, and
        // usage buffered during a store outage keeps being replayed, so the write after the last
        // request (by [`Finish`]) has little left to take. A usage write cut off when the runtime
        // stops is retried by that final write: batches are applied exactly once.
        loop {
            tokio::select! {
                _ = slots.tick() => self.limits.concurrency.maintain().await,
                _ = meter.tick() => self.meter.flush().await,
            }
        }
    }
}

/// Runs the job workers and their upkeep until shutdown.
struct JobWorkers {
    jobs: Arc<crate::jobs::Jobs>,
}

#[async_trait]
impl BackgroundService for JobWorkers {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.jobs.clone().serve(shutdown).await;
    }
}

/// A built server and what must live as long as it.
pub struct Built {
    pub server: Server,
    /// Runs store connections set up before Pingora's runtimes exist, the SIGHUP listener, and
    /// the final flush after Pingora's runtimes have stopped.
    pub background: tokio::runtime::Runtime,
    pub metrics: Arc<Metrics>,
    finish: Finish,
    /// The non-blocking log writer, flushed when the server is done (see [`serve`]).
    log: crate::logging::LogWriter,
}

/// Builds the Pingora server for `config` (loaded from `config_path`, which reloads re-read).
pub fn build_server(
    config: Config,
    config_path: &Path,
    opts: &RunOptions,
    clock: SharedClock,
) -> Result<Built, String> {
    build(config, config_path, opts, clock, None)
}

fn build(
    config: Config,
    config_path: &Path,
    opts: &RunOptions,
    clock: SharedClock,
    daemon: Option<Daemon>,
) -> Result<Built, String> {
    // Pingora's own daemon mode forks inside `Server::run`, after the store runtime's threads
    // exist, and those threads do not survive a fork; `run` detaches before building instead.
    let conf = ServerConf {
        threads: config.server.threads,
        grace_period_seconds: Some(config.server.shutdown_grace.as_secs()),
        graceful_shutdown_timeout_seconds: Some(config.server.shutdown_timeout.as_secs().max(1)),
        upgrade_sock: config.server.upgrade_sock.display().to_string(),
        pid_file: config.server.pid_file.display().to_string(),
        daemon: false,
        work_stealing: config.server.work_stealing,
        upstream_keepalive_pool_size: config.server.upstream_keepalive_pool_size,
        ..ServerConf::default()
    };
    let opt = Opt { upgrade: opts.upgrade, daemon: false, ..Opt::default() };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let background = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("tollgate-store")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the store runtime: {e}"))?;
    // From here on log lines go through the writer thread: this runs after `run -d` has forked,
    // so the thread belongs to the process that serves.
    let log = crate::logging::start_writer(config.log.buffer_lines);
    let metrics = Arc::new(Metrics::with_buckets(
        config.metrics.latency_buckets.as_deref().unwrap_or(crate::metrics::LATENCY_BUCKETS),
    ));
    if let Ok(dropped) = crate::logging::DroppedLines::new() {
        let _ = metrics.registry.register(Box::new(dropped));
    }
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
    let limits = Limits::new(stores.counters, shared, clock.clone(), limit_settings(&config.store));

    let (upstreams, health_checks) = Upstreams::build(&config.upstreams)?;
    let upstreams = Arc::new(upstreams);
    let listen = config.server.listen.clone();
    let edge_cfg = config.server.clone();
    let trusted_proxies = config.tenancy.trusted_proxies.clone();
    let admin_listen = config.server.admin_listen;
    let tls = config.server.tls.clone();
    let h2c = config.server.h2c;
    let flush_interval = config.store.flush_interval;
    let slot_ttl = config.store.slot_ttl;
    let listening = Arc::new(AtomicBool::new(false));
    let pid_file = daemon.as_ref().map(|d| d.pid_file.clone());
    let startup = Startup {
        addrs: listeners(&config.server),
        listening: listening.clone(),
        patience: config.server.bind_retry + STARTUP_MARGIN,
        line: StartupLine {
            config: config_path.display().to_string(),
            listen: listen.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            tls: tls.as_ref().map(|t| t.listen.to_string()).unwrap_or_else(|| "-".into()),
            admin: admin_listen.to_string(),
            summary: config.summary(),
        },
        daemon_ready: daemon.map(|d| d.ready),
        pid_file: pid_file.clone(),
    };
    let audit_path = config.admin.audit_log.clone().unwrap_or_else(|| default_audit_log(&config.store.path));
    check_audit_log(&audit_path);
    let finish = Finish {
        limits: limits.clone(),
        meter: meter.clone(),
        timeout: config.server.shutdown_timeout.max(Duration::from_secs(1)),
        received: Arc::new(Mutex::new(None)),
        grace: Duration::from_secs(config.server.shutdown_grace.as_secs()),
        pid_file,
    };
    let rt = Runtime::new(config);
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
    // The store's tenants and keys load in the background, page by page, with no time limit:
    // `/readyz` answers not ready until every one is in. Startup waits up to two seconds for
    // the load, so a small directory is complete before the first request; a large one keeps
    // loading while config tenants are served.
    {
        let core = admin_core.clone();
        let (done, loaded) = tokio::sync::oneshot::channel::<()>();
        background.spawn(async move {
            if let Err(e) = core.refresh().await {
                tracing::warn!(error = %e, "cannot load the store's tenants and keys yet; retrying every 500 ms (not ready until then)");
            }
            let _ = done.send(());
        });
        let _ = background.block_on(async { tokio::time::timeout(Duration::from_secs(2), loaded).await });
    }
    // SIGHUP reloads the config (validated first; an invalid file changes nothing). The reload
    // writes its own log line; the audit log records who asked.
    {
        let core = admin_core.clone();
        background.spawn(async move {
            let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
                tracing::error!("cannot listen for SIGHUP; reload through POST /v1/reload");
                return;
            };
            while hup.recv().await.is_some() {
                // A large config takes seconds to parse: off the store runtime's only thread.
                let c = core.clone();
                let Ok(outcome) = tokio::task::spawn_blocking(move || c.reload()).await else { continue };
                let actor = crate::admin::core::Actor { id: "signal:SIGHUP".into(), request_id: "-".into() };
                core.audit_reload(&actor, outcome.is_ok());
            }
        });
    }
    // Token issuers' keys are fetched on the background runtime from the start, and the
    // verifier follows reloads (see `jwt`).
    let jwt = crate::jwt::Jwt::new(clock.clone(), Some(background.handle().clone()));
    jwt.sync(&runtime.load().config.jwt);
    jwt.watch(runtime.clone());
    let jobs = crate::jobs::Jobs::new(
        crate::jobs::Parts {
            store: stores.jobs.clone(),
            runtime: runtime.clone(),
            upstreams: upstreams.clone(),
            limits: limits.clone(),
            meter: meter.clone(),
            clock: clock.clone(),
            worker: format!("{}-{:08x}", runtime.load().config.store.instance_id, rand::random::<u32>()),
        },
        &metrics.registry,
    );
    let gateway = Gateway {
        admin: admin_core.clone(),
        runtime: runtime.clone(),
        upstreams: upstreams.clone(),
        clock,
        limits: limits.clone(),
        meter: meter.clone(),
        webhook,
        jwt,
        jobs: jobs.clone(),
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
    let mut proxy_app = pingora::proxy::http_proxy(&server.configuration, gateway);
    // HTTP/2 connections (ALPN `h2` on the TLS listener, the preface on plaintext ones when
    // `h2c` is on) go to Pingora's HTTP/2 server; an idle one is closed after `idle_timeout`.
    let mut server_options = pingora::apps::HttpServerOptions::default();
    server_options.h2c = h2c;
    server_options.h2_idle_timeout = Some(edge_cfg.idle_timeout);
    proxy_app.server_options = Some(server_options);
    let refusals = Arc::new(crate::guard::Refusals { runtime: runtime.clone(), meter: meter.clone() });
    let mut edge = Edge::new(proxy_app, proxy_limits, &metrics).with_h2c(h2c).with_refusals(refusals);
    if let Some(tls) = &tls {
        // The TLS listener is a plain TCP listener whose handshake the edge performs, under the
        // same caps and head deadline as every other connection.
        edge = edge.with_tls(tls.listen, tls_acceptor(tls)?);
    }
    let mut proxy = Service::new("tollgate proxy".to_string(), edge);
    for addr in &listen {
        proxy.add_tcp(&addr.to_string());
    }
    if let Some(tls) = &tls {
        proxy.add_tcp(&tls.listen.to_string());
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
    let admin_app =
        AdminApp { runtime, upstreams, metrics: metrics.clone(), core: admin_core.clone(), jobs: jobs.clone() };
    let mut admin = Service::new(
        "tollgate admin".to_string(),
        Edge::new(ReadyGate { app: admin_app, listening }, admin_limits, &metrics),
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
    server.add_service(background_service("job workers", JobWorkers { jobs }));
    server.add_service(startup);
    Ok(Built { server, background, metrics, finish, log })
}

/// The default audit log: beside the store file and named after it (`tollgate.db` gives
/// `tollgate-audit.log`), since the store's directory is the one the gateway must be able to
/// write (`/var/lib/tollgate` in the Docker image and under systemd's `StateDirectory`), while
/// the config's directory is often read-only.
pub fn default_audit_log(store_path: &Path) -> PathBuf {
    let stem = store_path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "tollgate".into());
    store_path.with_file_name(format!("{stem}-audit.log"))
}

/// Warns at start, rather than at the first admin change, when the audit log cannot be written.
fn check_audit_log(path: &Path) {
    let opened = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|_| std::fs::OpenOptions::new().create(true).append(true).open(path));
    if let Err(e) = opened {
        tracing::warn!(
            path = %path.display(),
            error = %e,
            "the audit log cannot be written; admin changes and reloads will be recorded in this log instead. \
             Make the file writable for the gateway's user or set [admin] audit_log"
        );
    }
}

/// Every address the process listens on, with the config key that names it.
fn listeners(server: &ServerConfig) -> Vec<(SocketAddr, &'static str)> {
    let mut out: Vec<(SocketAddr, &'static str)> = server.listen.iter().map(|a| (*a, "server.listen")).collect();
    if let Some(tls) = &server.tls {
        out.push((tls.listen, "server.tls.listen"));
    }
    out.push((server.admin_listen, "server.admin_listen"));
    out
}

/// The one line that says why an address cannot be listened on, and what to do about it.
fn cannot_listen(addr: SocketAddr, key: &str, e: &std::io::Error) -> String {
    let why = match e.kind() {
        ErrorKind::AddrInUse => {
            "address in use (another process holds it: stop it, or choose another port)".to_string()
        }
        ErrorKind::AddrNotAvailable => {
            "address not available (no network interface of this host has that IP: use one it has, or 0.0.0.0)"
                .to_string()
        }
        ErrorKind::PermissionDenied => {
            "permission denied (ports below 1024 need root or the CAP_NET_BIND_SERVICE capability)".to_string()
        }
        _ => e.to_string(),
    };
    format!("cannot listen on {addr} ({key}): {why}")
}

/// Binds every address the config listens on, all at once, and releases them, so that a
/// taken port stops the start with one clear line instead of a Pingora panic. An address in use
/// is tried again until `server.bind_retry` has passed. Pingora binds with `SO_REUSEADDR`, so
/// releasing a probe leaves nothing in its way.
pub fn check_listeners(server: &ServerConfig) -> Result<(), String> {
    let addrs = listeners(server);
    let deadline = Instant::now() + server.bind_retry;
    loop {
        let mut held = Vec::with_capacity(addrs.len());
        let mut busy = None;
        for (i, (addr, key)) in addrs.iter().enumerate() {
            match TcpListener::bind(addr) {
                Ok(l) => held.push(l),
                Err(e) if e.kind() == ErrorKind::AddrInUse => {
                    busy = Some((i, e));
                    break;
                }
                Err(e) => return Err(cannot_listen(*addr, key, &e)),
            }
        }
        let Some((i, e)) = busy else { return Ok(()) };
        drop(held);
        if let Some(j) = overlap(&addrs, i) {
            let ((a, ka), (b, kb)) = (addrs[i], addrs[j]);
            return Err(format!(
                "cannot listen on {a} ({ka}): it overlaps {b} ({kb}) of the same config; give each listener its own port"
            ));
        }
        if Instant::now() >= deadline {
            let (addr, key) = addrs[i];
            return Err(cannot_listen(addr, key, &e));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The earlier configured address that `addrs[i]` cannot be bound beside, when that, and not
/// another process, is why it is in use.
fn overlap(addrs: &[(SocketAddr, &'static str)], i: usize) -> Option<usize> {
    let alone = TcpListener::bind(addrs[i].0).ok()?;
    drop(alone);
    (0..i).find(|&j| match TcpListener::bind(addrs[j].0) {
        Ok(_first) => TcpListener::bind(addrs[i].0).is_err(),
        Err(_) => false,
    })
}

/// The fields of the `tollgate started` line.
struct StartupLine {
    config: String,
    listen: String,
    tls: String,
    admin: String,
    summary: String,
}

/// Watches Pingora bind the listeners: marks the process ready and writes `tollgate started`
/// once every address has one, or ends the process when one is still missing after
/// `patience`. Pingora records each listening socket in the table it hands over during an
/// upgrade, keyed by the address string the service was given; that table is what is watched.
struct Startup {
    addrs: Vec<(SocketAddr, &'static str)>,
    listening: Arc<AtomicBool>,
    patience: Duration,
    line: StartupLine,
    /// `run -d`: the pipe the waiting parent reads.
    daemon_ready: Option<File>,
    pid_file: Option<PathBuf>,
}

#[async_trait]
impl ServiceWithDependents for Startup {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
        ready: ServiceReadyNotifier,
    ) {
        ready.notify_ready();
        let started = Instant::now();
        loop {
            let missing: Vec<(SocketAddr, &'static str)> = match &fds {
                Some(fds) => {
                    let table = fds.lock();
                    self.addrs.iter().filter(|(a, _)| table.get(&a.to_string()).is_none()).copied().collect()
                }
                None => Vec::new(),
            };
            if missing.is_empty() {
                break;
            }
            if *shutdown.borrow() {
                return;
            }
            if started.elapsed() >= self.patience {
                for (addr, key) in missing {
                    let line = match TcpListener::bind(addr) {
                        Err(e) => cannot_listen(addr, key, &e),
                        Ok(_) => format!(
                            "cannot listen on {addr} ({key}): the listener did not start (see the errors above)"
                        ),
                    };
                    tracing::error!("{line}");
                }
                if let Some(p) = &self.pid_file {
                    remove_pid_file(p);
                }
                // `exit` runs no destructors: write out the queued lines (these errors) first.
                crate::logging::flush();
                std::process::exit(1);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.listening.store(true, Ordering::Release);
        let l = &self.line;
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            pid = std::process::id(),
            config = %l.config,
            listen = %l.listen,
            tls = %l.tls,
            admin = %l.admin,
            summary = %l.summary,
            "tollgate started"
        );
        if let Some(mut pipe) = self.daemon_ready.take() {
            let _ = pipe.write_all(b"1");
        }
    }

    fn name(&self) -> &str {
        "tollgate startup"
    }

    fn threads(&self) -> Option<usize> {
        Some(1)
    }

    // It takes no socket from an upgrade's table, so it must not stop Pingora from closing the
    // sockets nobody claims.
    fn listen_addresses(&self) -> Option<Vec<String>> {
        Some(Vec::new())
    }
}

/// The admin app, with `/readyz` held at 503 until every listener is bound: an instance that
/// cannot take traffic on its data plane is not ready, whatever its upstreams say.
struct ReadyGate {
    app: AdminApp,
    listening: Arc<AtomicBool>,
}

#[async_trait]
impl ServeHttp for ReadyGate {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let resp = self.app.response(session).await;
        if self.listening.load(Ordering::Acquire)
            || session.req_header().uri.path() != "/readyz"
            || resp.status() != http::StatusCode::OK
        {
            return resp;
        }
        not_ready(resp)
    }
}

/// Turns a `/readyz` answer into its not-ready form: 503, `"status":"not_ready"`.
fn not_ready(resp: http::Response<Vec<u8>>) -> http::Response<Vec<u8>> {
    let (mut parts, body) = resp.into_parts();
    parts.status = http::StatusCode::SERVICE_UNAVAILABLE;
    let body = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(serde_json::Value::Object(mut map)) => {
            map.insert("status".into(), "not_ready".into());
            serde_json::to_vec(&map).unwrap_or(body)
        }
        _ => body,
    };
    parts.headers.insert(http::header::CONTENT_LENGTH, body.len().into());
    http::Response::from_parts(parts, body)
}

/// The shutdown signal that arrived, and how long Pingora lets requests in flight run after it.
struct Received {
    name: &'static str,
    at: Instant,
    drain: Duration,
}

/// Pingora's shutdown signals (SIGTERM, SIGINT, SIGQUIT), each logged as it arrives.
struct Signals {
    received: Arc<Mutex<Option<Received>>>,
    grace: Duration,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int), Ok(mut quit)) =
            (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::quit()))
        else {
            tracing::error!(
                "cannot listen for SIGTERM, SIGINT and SIGQUIT; the process can only be stopped with SIGKILL"
            );
            return std::future::pending().await;
        };
        let grace = self.grace.as_secs();
        let (name, drain, what) = tokio::select! {
            _ = term.recv() => ("SIGTERM", self.grace, ShutdownSignal::GracefulTerminate),
            _ = int.recv() => ("SIGINT", Duration::ZERO, ShutdownSignal::FastShutdown),
            _ = quit.recv() => ("SIGQUIT", UPGRADE_HANDOVER + self.grace, ShutdownSignal::GracefulUpgrade),
        };
        match name {
            "SIGTERM" => tracing::info!(
                signal = name,
                "SIGTERM received: shutting down; new connections are refused and requests in flight get up to {grace}s"
            ),
            "SIGINT" => {
                tracing::info!(signal = name, "SIGINT received: shutting down now; requests in flight are cut off")
            }
            _ => tracing::info!(
                signal = name,
                "SIGQUIT received: handing the listening sockets to the new process, then shutting down; \
                 requests in flight get up to {grace}s after the 5s hand-over"
            ),
        }
        *lock(&self.received) = Some(Received { name, at: Instant::now(), drain });
        what
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the process does after Pingora's runtimes have stopped: write the last usage, quota
/// debts and leases, remove its pid file, and say it stopped.
struct Finish {
    limits: Arc<Limits>,
    meter: Arc<crate::metering::Meter>,
    /// `shutdown_grace`, in the whole seconds Pingora uses.
    grace: Duration,
    timeout: Duration,
    received: Arc<Mutex<Option<Received>>>,
    pid_file: Option<PathBuf>,
}

impl Finish {
    fn run(self, background: &tokio::runtime::Runtime) {
        let received = lock(&self.received).take();
        let signal = received.as_ref().map_or("-", |r| r.name);
        // Pingora gives its runtimes `timeout` once the drain is over; the last write shares that
        // budget, keeping at least a second when the runtimes used it all.
        let budget = received
            .map(|r| (r.at + r.drain + self.timeout).saturating_duration_since(Instant::now()))
            .unwrap_or(self.timeout)
            .max(Duration::from_secs(1));
        let written = background.block_on(async {
            tokio::time::timeout(budget, async {
                // Usage first: it is what the tenant is billed for.
                self.meter.flush().await;
                self.limits.quotas.shutdown().await;
                self.limits.concurrency.shutdown().await;
                self.meter.flush().await;
                // A store just back from an outage may refuse writes while its breaker cools
                // down: keep offering the buffered batches until they are taken or time is up.
                while self.meter.buffered() > 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    self.meter.flush().await;
                }
            })
            .await
        });
        let buffered = self.meter.buffered();
        match written {
            Ok(()) if buffered == 0 => tracing::info!(buffered, "limits and usage flushed, leases returned"),
            Ok(()) => tracing::warn!(
                buffered,
                "limits and usage flushed, leases returned; the store did not take the last usage batches, which are lost"
            ),
            Err(_) => tracing::warn!(
                buffered,
                within_ms = budget.as_millis() as u64,
                "the store did not take the last usage in time; the usage still buffered is lost"
            ),
        }
        if let Some(p) = &self.pid_file {
            remove_pid_file(p);
        }
        tracing::info!(signal, "tollgate stopped");
    }
}

/// Serves until a shutdown signal, lets requests in flight finish for `shutdown_grace`, then
/// writes what is pending to the store. Returns when the process may exit.
pub fn serve(built: Built) {
    let Built { server, background, finish, log, .. } = built;
    let signals = Signals { received: finish.received.clone(), grace: finish.grace };
    server.run(RunArgs { shutdown_signal: Box::new(signals) });
    finish.run(&background);
    // `tollgate stopped` is queued; write it and everything before it out.
    drop(log);
}

/// The daemon's side of `run -d`: the pipe its parent waits on, and its pid file.
struct Daemon {
    ready: File,
    pid_file: PathBuf,
}

/// Detaches into the background (`run -d`). The calling process waits until the daemon says
/// it listens (exit 0) or goes away without saying so (exit 1); only the daemon returns. Must run
/// before any thread exists: a fork copies only the calling thread.
fn daemonize(pid_file: &Path) -> Result<Daemon, String> {
    use std::os::fd::FromRawFd;
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two new descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("cannot detach into the background: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors were just created and nothing else owns them.
    let (read, write) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    // SAFETY: the process has one thread (the caller's), so the child is a consistent copy.
    match unsafe { libc::fork() } {
        -1 => return Err(format!("cannot detach into the background: {}", std::io::Error::last_os_error())),
        0 => {}
        child => {
            drop(write);
            // SAFETY: reaps the intermediate child, which exits right after its own fork.
            unsafe { libc::waitpid(child, std::ptr::null_mut(), 0) };
            let mut byte = [0u8; 1];
            let mut read = read;
            let ready = loop {
                match read.read(&mut byte) {
                    Ok(n) => break n == 1,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => break false,
                }
            };
            // The daemon logged why it stopped on the same stderr.
            std::process::exit(if ready { 0 } else { 1 });
        }
    }
    drop(read);
    // SAFETY: setsid leaves the terminal's session; the second fork makes the daemon a process
    // that is not a session leader, so it can never acquire a controlling terminal again.
    // `_exit` ends the intermediate child without running the parent's exit handlers twice.
    unsafe {
        if libc::setsid() < 0 {
            libc::_exit(1);
        }
        match libc::fork() {
            -1 => libc::_exit(1),
            0 => {}
            _ => libc::_exit(0),
        }
    }
    // The working directory would otherwise keep its file system busy; every path is absolute.
    std::env::set_current_dir("/").map_err(|e| format!("cannot change to /: {e}"))?;
    let null = File::open("/dev/null").map_err(|e| format!("cannot open /dev/null: {e}"))?;
    // SAFETY: dup2 onto standard input, which stays open for the life of the process.
    unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 0) };
    write_pid_file(pid_file)?;
    Ok(Daemon { ready: write, pid_file: pid_file.to_path_buf() })
}

/// Writes the daemon's pid, keeping a previous file (an instance being upgraded) as `.old`.
fn write_pid_file(path: &Path) -> Result<(), String> {
    if path.exists() {
        let mut old = path.as_os_str().to_owned();
        old.push(".old");
        let _ = std::fs::rename(path, old);
    }
    std::fs::write(path, format!("{}\n", std::process::id())).map_err(|e| {
        format!(
            "cannot write the pid file {}: {e}; set server.pid_file to a path the gateway can write",
            path.display()
        )
    })
}

/// Removes the pid file if it still names this process (an upgrade's new process replaces it).
fn remove_pid_file(path: &Path) {
    let ours = std::fs::read_to_string(path).is_ok_and(|s| s.trim() == std::process::id().to_string());
    if ours {
        let _ = std::fs::remove_file(path);
    }
}

/// The TLS acceptor for `[server.tls]`. Pingora's builder panics on a certificate or key it
/// cannot load; that becomes an error naming the files.
fn tls_acceptor(tls: &crate::config::TlsConfig) -> Result<pingora::listeners::tls::Acceptor, String> {
    let (cert, key) = (tls.cert.display().to_string(), tls.key.display().to_string());
    let mut settings = pingora::listeners::tls::TlsSettings::intermediate(&cert, &key)
        .map_err(|e| format!("TLS listener {}: {e}", tls.listen))?;
    // ALPN offers `h2` first, then `http/1.1`; a client that offers neither gets HTTP/1.1.
    settings.enable_h2();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| settings.build())).map_err(|_| {
        format!(
            "TLS listener {}: cannot load the certificate {cert} or the key {key}; check they are PEM files that belong together",
            tls.listen
        )
    })
}

/// `tollgate run`: load, check the listen addresses, detach when asked, build, serve until a
/// signal. Every failure is reported here (on stderr while the config is not loaded, in the log
/// after), and the result is the process's exit status.
pub fn run(path: &Path, opts: RunOptions) -> ExitCode {
    // No transparent huge pages for this process: the allocator's regions would otherwise be
    // backed by 2 MiB pages as they fill, and an idle gateway's resident memory would creep up
    // by tens of megabytes with a large directory (docs/performance.md, "Scale"). Databases
    // that hold large heaps advise the same.
    // SAFETY: `prctl(PR_SET_THP_DISABLE)` only sets a flag of the calling process.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
    // Absolute, not canonical: a config reached through a symlink (a Kubernetes ConfigMap, a
    // release directory) must be read through the link again on every reload.
    let path = match std::path::absolute(path) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("cannot resolve the config path {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let config = match load_or_report(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    init_logging(&config);
    match start(config, &path, &opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn start(config: Config, path: &Path, opts: &RunOptions) -> Result<(), String> {
    // With `-u` the sockets come from the running process, which still holds the addresses.
    if !opts.upgrade {
        check_listeners(&config.server)?;
    }
    let daemon = if opts.daemon { Some(daemonize(&config.server.pid_file)?) } else { None };
    let built = build(config, path, opts, Arc::new(SystemClock), daemon)?;
    serve(built);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readyz_is_not_ready_before_the_listeners_are_bound() {
        let body = br#"{"status":"ready","config":"loaded","store":"ok","tenants":1,"keys":1,"upstreams":{}}"#.to_vec();
        let resp = http::Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .header("content-length", body.len())
            .body(body)
            .expect("response");
        let out = not_ready(resp);
        assert_eq!(out.status(), 503);
        let v: serde_json::Value = serde_json::from_slice(out.body()).expect("json");
        assert_eq!(v["status"], "not_ready");
        assert_eq!(v["tenants"], 1);
        let len = out.headers().get("content-length").and_then(|v| v.to_str().ok()).map(str::to_string);
        assert_eq!(len, Some(out.body().len().to_string()));
    }

    #[test]
    fn the_audit_log_lives_beside_the_store() {
        assert_eq!(
            default_audit_log(Path::new("/var/lib/tollgate/tollgate.db")),
            Path::new("/var/lib/tollgate/tollgate-audit.log")
        );
        assert_eq!(default_audit_log(Path::new("/tmp/tollgate-demo.db")), Path::new("/tmp/tollgate-demo-audit.log"));
    }

    /// A `[server]` config listening on `listen`, with its admin listener on `admin`.
    fn server(listen: SocketAddr, admin: SocketAddr, bind_retry: &str) -> ServerConfig {
        let text = format!(
            "[server]\nlisten = [\"{listen}\"]\nadmin_listen = \"{admin}\"\nbind_retry = \"{bind_retry}\"\n\n\
             [upstreams.api]\nservers = [\"127.0.0.1:9\"]\n\n[tiers.free]\nupstream = \"api\"\n\n\
             [[tenants]]\nid = \"acme\"\ntier = \"free\"\n"
        );
        let mut diags = crate::config::Diagnostics::default();
        let config = crate::config::load_str(Path::new("/nonexistent/tollgate.toml"), text, &mut diags);
        config.map(|c| c.server).unwrap_or_else(|| panic!("{diags}"))
    }

    fn free() -> SocketAddr {
        TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port")
    }

    #[test]
    fn a_taken_port_is_named_after_the_retry() {
        let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr");
        let started = Instant::now();
        let err = check_listeners(&server(addr, free(), "300ms")).expect_err("the port is taken");
        assert!(started.elapsed() >= Duration::from_millis(300), "gave up after {:?}", started.elapsed());
        assert_eq!(
            err,
            format!(
                "cannot listen on {addr} (server.listen): address in use (another process holds it: stop it, or \
                 choose another port)"
            )
        );
        // Free addresses pass, and are released again.
        let (listen, admin) = (free(), free());
        check_listeners(&server(listen, admin, "0s")).expect("free");
        TcpListener::bind(listen).expect("released");
    }

    #[test]
    fn listeners_of_one_config_that_overlap_are_named() {
        let addr = free();
        let err = check_listeners(&server(addr, addr, "5s")).expect_err("overlap");
        assert!(
            err.starts_with(&format!(
                "cannot listen on {addr} (server.admin_listen): it overlaps {addr} (server.listen)"
            )),
            "{err}"
        );
    }
}
