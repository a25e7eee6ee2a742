//! The bare Pingora hop: a `ProxyHttp` that only picks the peer, on the same Pingora version and
//! with the same build profile as Tollgate. It is the baseline of `make bench-e2e`
//! (`benches/e2e/run.sh`): what a request costs when the proxy does nothing but forward it, so
//! that the gateway's numbers can be read as a ratio to it.
//!
//! ```sh
//! cargo build --release --example bare_hop
//! target/release/examples/bare_hop 127.0.0.1:6188 127.0.0.1:9000   # listen, upstream
//! ```
//!
//! One worker thread, like the gateway in the benchmark. SIGTERM stops it within about two seconds
//! (a second of grace, a second for the runtime to wind down). Nothing is logged.

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::{Opt, ServerConf};
use std::net::SocketAddr;
use std::process::ExitCode;

/// Forwards every request to one upstream server, unchanged.
struct BareHop {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for BareHop {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut Self::CTX) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(upstream)) = (args.get(1), args.get(2).and_then(|a| a.parse::<SocketAddr>().ok())) else {
        eprintln!("usage: bare_hop LISTEN_ADDR UPSTREAM_ADDR   (for example 127.0.0.1:6188 127.0.0.1:9000)");
        return ExitCode::from(2);
    };
    let conf = ServerConf {
        threads: 1,
        grace_period_seconds: Some(1),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let mut proxy = pingora::proxy::http_proxy_service(&server.configuration, BareHop { upstream });
    proxy.add_tcp(listen);
    server.add_service(proxy);
    server.run_forever();
}
