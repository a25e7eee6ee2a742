//! The admin listener (`[server] admin_listen`, 127.0.0.1:9090 by default).
//!
//! `/healthz` answers while the process is up. `/readyz` answers 200 once the config is loaded
//! and at least one server of every upstream pool is healthy, 503 otherwise, so a load
//! balancer only sends traffic to an instance that can forward it.

use crate::runtime::SharedRuntime;
use crate::upstream::Upstreams;
pub mod core;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;
use std::sync::Arc;

pub struct AdminApp {
    pub runtime: SharedRuntime,
    pub upstreams: Arc<Upstreams>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

fn json_response(status: u16, body: serde_json::Value, content_type: &str) -> Response<Vec<u8>> {
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("content-length", bytes.len())
        .header("cache-control", "no-store")
        .body(bytes)
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

/// A problem+json answer from the admin listener.
pub fn problem(status: u16, code: &str, detail: &str) -> Response<Vec<u8>> {
    json_response(
        status,
        json!({"type": format!("urn:tollgate:error:{code}"), "title": code, "status": status, "detail": detail, "code": code}),
        "application/problem+json",
    )
}

impl AdminApp {
    fn ready(&self) -> (bool, serde_json::Value) {
        let rt = self.runtime.load();
        let mut pools = serde_json::Map::new();
        let mut all_ok = true;
        for (name, pool) in &self.upstreams.pools {
            let backends = pool.lb.backends().get_backend();
            let healthy = backends.iter().filter(|b| pool.lb.backends().ready(b)).count();
            if healthy == 0 {
                all_ok = false;
            }
            pools.insert(name.to_string(), json!({"healthy": healthy, "total": backends.len()}));
        }
        (
            all_ok,
            json!({
                "status": if all_ok { "ready" } else { "not_ready" },
                "tenants": rt.directory.tenant_count(),
                "keys": rt.directory.key_count(),
                "upstreams": pools,
            }),
        )
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        match path.as_str() {
            "/healthz" => json_response(200, json!({"status": "ok"}), "application/json"),
            "/readyz" => {
                let (ok, body) = self.ready();
                json_response(if ok { 200 } else { 503 }, body, "application/json")
            }
            "/metrics" => {
                let body = self.metrics.render();
                Response::builder()
                    .status(200)
                    .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                    .header("content-length", body.len())
                    .body(body)
                    .unwrap_or_else(|_| Response::new(Vec::new()))
            }
            _ => problem(404, "not_found", "No such admin endpoint. Try /healthz, /readyz or /metrics."),
        }
    }
}
