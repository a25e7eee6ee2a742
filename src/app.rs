//! The one place that wires config, runtime snapshot, upstream pools, the proxy and the admin
//! listener into a Pingora server. Nothing here is global: each piece is built once and passed
//! down.

use crate::admin::AdminApp;
use crate::clock::{SharedClock, SystemClock};
use crate::config::{self, Config, LogFormat};
use crate::pipeline::Gateway;
use crate::runtime::{self, Runtime};
use crate::upstream::Upstreams;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::listening::Service;
use std::path::Path;
use std::sync::Arc;

/// Options of `tollgate run` that are not in the config file.
#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    /// Take the listening sockets over from a running instance (zero-downtime upgrade).
    pub upgrade: bool,
    pub daemon: bool,
}

/// Installs the `tracing` subscriber for the config's log settings. `RUST_LOG` wins when set.
pub fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{},pingora=warn", config.log.level)));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match config.log.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Plain => builder.try_init(),
    };
}

/// Loads the config or prints every problem and returns `Err`.
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

/// Builds the Pingora server for `config`. `run` serves it forever.
pub fn build_server(config: Config, opts: &RunOptions, clock: SharedClock) -> Result<Server, String> {
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

    let (upstreams, health_checks) = Upstreams::build(&config.upstreams)?;
    let upstreams = Arc::new(upstreams);
    let listen = config.server.listen.clone();
    let admin_listen = config.server.admin_listen;
    let tls = config.server.tls.clone();
    let runtime = runtime::shared(Runtime::new(config));

    let gateway = Gateway { runtime: runtime.clone(), upstreams: upstreams.clone(), clock };
    let mut proxy = pingora::proxy::http_proxy_service_with_name(&server.configuration, gateway, "tollgate proxy");
    for addr in &listen {
        proxy.add_tcp(&addr.to_string());
    }
    if let Some(tls) = tls {
        proxy
            .add_tls(&tls.listen.to_string(), &tls.cert.display().to_string(), &tls.key.display().to_string())
            .map_err(|e| format!("TLS listener {}: {e}", tls.listen))?;
    }
    let mut admin = Service::new("tollgate admin".to_string(), AdminApp { runtime, upstreams });
    admin.add_tcp(&admin_listen.to_string());

    server.add_service(proxy);
    server.add_service(admin);
    for hc in health_checks {
        server.add_service(hc);
    }
    Ok(server)
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
    let server = build_server(config, &opts, Arc::new(SystemClock))?;
    server.run_forever()
}
