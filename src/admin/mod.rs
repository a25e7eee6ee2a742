//! The admin listener (`[server] admin_listen`, 127.0.0.1:9090 by default).
//!
//! - `/healthz`: the process is up.
//! - `/readyz`: 200 once the config is loaded, the store answers and every upstream pool has a
//!   healthy server; 503 otherwise, with what is missing.
//! - `/metrics`: Prometheus text format.
//! - `/v1/...`: the JSON admin API (see `docs/admin-api.md` and `/v1/openapi.json`), behind
//!   `Authorization: Bearer <admin token>`; the config holds only the token's SHA-256 and the
//!   comparison takes constant time. Errors are `application/problem+json`.

pub mod client;
pub mod core;

use crate::keys::KeyHash;
use crate::runtime::SharedRuntime;
use crate::upstream::Upstreams;
use async_trait::async_trait;
use core::{Actor, AdminCore, AdminError, CreateKey, CreateTenant, PatchTenant};
use http::{Method, Response};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// Largest request body the admin API reads.
pub const MAX_BODY: usize = 1 << 20;

const OPENAPI: &str = include_str!("openapi.json");

pub struct AdminApp {
    pub runtime: SharedRuntime,
    pub upstreams: Arc<Upstreams>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub core: Arc<AdminCore>,
}

type Resp = Response<Vec<u8>>;

/// An early answer (a refusal) from a helper; boxed because responses are large.
type Early = Box<Resp>;

fn respond(status: u16, content_type: &str, body: Vec<u8>, extra: &[(&str, String)]) -> Resp {
    let mut b = Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("content-length", body.len())
        .header("cache-control", "no-store");
    for (k, v) in extra {
        b = b.header(*k, v);
    }
    b.body(body).unwrap_or_else(|_| Response::new(Vec::new()))
}

fn json_response(status: u16, body: Value) -> Resp {
    respond(status, "application/json", serde_json::to_vec(&body).unwrap_or_default(), &[])
}

/// A problem+json answer from the admin listener.
pub fn problem(status: u16, code: &str, detail: &str) -> Resp {
    problem_with(status, code, detail, &[])
}

fn problem_with(status: u16, code: &str, detail: &str, extra: &[(&str, String)]) -> Resp {
    let title = http::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("Error");
    let body = json!({
        "type": format!("urn:tollgate:error:{code}"),
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    });
    respond(status, "application/problem+json", serde_json::to_vec(&body).unwrap_or_default(), extra)
}

fn admin_error(e: &AdminError) -> Resp {
    problem(e.status(), e.code(), e.detail())
}

/// Compares two digests in constant time.
pub fn digest_eq(a: &KeyHash, b: &KeyHash) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.0.iter().zip(b.0.iter()) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

/// Parses a JSON body into `T`, with the admin API's error answers.
fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Early> {
    if body.is_empty() {
        return Err(Box::new(problem(400, "bad_request", "This endpoint needs a JSON body.")));
    }
    serde_json::from_slice(body).map_err(|e| {
        let detail = format!("The JSON body is not valid here: {e}. See /v1/openapi.json for the schema.");
        Box::new(problem(400, "bad_request", &detail))
    })
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    crate::rules::matcher::query_param(query, name)
}

fn method_not_allowed(allowed: &str) -> Resp {
    problem_with(405, "method_not_allowed", &format!("Use {allowed} on this path."), &[("allow", allowed.to_string())])
}

impl AdminApp {
    async fn ready(&self) -> (bool, Value) {
        let rt = self.runtime.load();
        let mut pools = serde_json::Map::new();
        let mut upstreams_ok = true;
        for (name, pool) in &self.upstreams.pools {
            let backends = pool.lb.backends().get_backend();
            let healthy = backends.iter().filter(|b| pool.lb.backends().ready(b)).count();
            if healthy == 0 {
                upstreams_ok = false;
            }
            pools.insert(name.to_string(), json!({"healthy": healthy, "total": backends.len()}));
        }
        let store_ok = self.core.dir_store.version().await.is_ok();
        let ok = upstreams_ok && store_ok;
        (
            ok,
            json!({
                "status": if ok { "ready" } else { "not_ready" },
                "config": "loaded",
                "store": if store_ok { "ok" } else { "unreachable" },
                "tenants": rt.directory.tenant_count(),
                "keys": rt.directory.key_count(),
                "upstreams": pools,
            }),
        )
    }

    /// Checks the admin bearer token. Returns the actor id.
    fn authorize(&self, session: &ServerSession) -> Result<String, Early> {
        let rt = self.runtime.load();
        let Some(expected) = rt.config.admin.token_hash else {
            return Err(Box::new(problem(
                401,
                "admin_disabled",
                "The admin API is off: set `[admin] token_hash` in the config (`tollgate keygen --prefix tg_admin` makes a token and its hash).",
            )));
        };
        let presented = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        let challenge = [("www-authenticate", "Bearer".to_string())];
        let Some(token) = presented.filter(|t| !t.is_empty()) else {
            return Err(Box::new(problem_with(
                401,
                "missing_token",
                "Send the admin token as `Authorization: Bearer <token>`.",
                &challenge,
            )));
        };
        let hash = KeyHash::of(token.as_bytes());
        if !digest_eq(&hash, &expected) {
            return Err(Box::new(problem_with(401, "invalid_token", "The admin token is not valid.", &challenge)));
        }
        Ok(format!("admin:{}", &hex::encode(expected.0)[..8]))
    }

    async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, Resp> {
        let mut body = Vec::new();
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_BODY {
                        return Err(problem(413, "body_too_large", "Admin request bodies are limited to 1 MiB."));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(body),
                Err(_) => return Err(problem(400, "bad_request", "The request body could not be read.")),
            }
        }
    }

    async fn v1(&self, session: &mut ServerSession, method: Method, path: &str, query: Option<&str>) -> Resp {
        if path == "/v1/openapi.json" {
            return respond(200, "application/json", OPENAPI.as_bytes().to_vec(), &[]);
        }
        let actor_id = match self.authorize(session) {
            Ok(a) => a,
            Err(r) => return *r,
        };
        // A request body is read for every method, so a too-large body answers 413 first.
        let declared = session
            .req_header()
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > MAX_BODY) {
            return problem(413, "body_too_large", "Admin request bodies are limited to 1 MiB.");
        }
        let body = match Self::read_body(session).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let request_id = session
            .req_header()
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
        let actor = Actor { id: actor_id, request_id };
        let segs: Vec<&str> = path.trim_start_matches("/v1/").split('/').filter(|s| !s.is_empty()).collect();
        let core = &self.core;
        let m = &method;
        match segs.as_slice() {
            ["tenants"] => match *m {
                Method::GET => {
                    let limit =
                        query_param(query, "limit").and_then(|l| l.parse::<usize>().ok()).unwrap_or(100).clamp(1, 1000);
                    let cursor = query_param(query, "cursor");
                    let all = core.tenants(query_param(query, "tier"), query_param(query, "status"));
                    let start =
                        cursor.map(|c| all.iter().position(|t| t.id.as_str() > c).unwrap_or(all.len())).unwrap_or(0);
                    let page: Vec<_> = all.iter().skip(start).take(limit).cloned().collect();
                    let next = (start + page.len() < all.len()).then(|| page.last().map(|t| t.id.clone())).flatten();
                    json_response(200, json!({"items": page, "next_cursor": next}))
                }
                Method::POST => match parse::<CreateTenant>(&body) {
                    Err(r) => *r,
                    Ok(req) => match core.create_tenant(&actor, req).await {
                        Ok(t) => json_response(201, json!(t)),
                        Err(e) => admin_error(&e),
                    },
                },
                _ => method_not_allowed("GET, POST"),
            },
            ["tenants", id] => match *m {
                Method::GET => result(core.tenant(id).map(|t| json!(t)), 200),
                Method::PATCH => match parse::<PatchTenant>(&body) {
                    Err(r) => *r,
                    Ok(p) => result(core.update_tenant(&actor, id, p).await.map(|t| json!(t)), 200),
                },
                Method::DELETE => match core.delete_tenant(&actor, id).await {
                    Ok(()) => respond(204, "application/json", Vec::new(), &[]),
                    Err(e) => admin_error(&e),
                },
                _ => method_not_allowed("GET, PATCH, DELETE"),
            },
            ["tenants", id, action @ ("suspend" | "reactivate")] => match *m {
                Method::POST => {
                    let status = if *action == "suspend" { "suspended" } else { "active" };
                    result(core.set_status(&actor, id, status).await.map(|t| json!(t)), 200)
                }
                _ => method_not_allowed("POST"),
            },
            ["tenants", id, "tier"] => match *m {
                Method::PUT => {
                    #[derive(Deserialize)]
                    #[serde(deny_unknown_fields)]
                    struct SetTier {
                        tier: String,
                    }
                    match parse::<SetTier>(&body) {
                        Err(r) => *r,
                        Ok(t) => result(core.set_tier(&actor, id, &t.tier).await.map(|t| json!(t)), 200),
                    }
                }
                _ => method_not_allowed("PUT"),
            },
            ["tenants", id, "keys"] => match *m {
                Method::GET => result(core.keys(id).map(|k| json!({"items": k})), 200),
                Method::POST => match parse::<CreateKey>(&body) {
                    Err(r) => *r,
                    Ok(req) => match core.create_key(&actor, id, req).await {
                        Ok((k, secret)) => json_response(201, json!({"key": k, "secret": secret})),
                        Err(e) => admin_error(&e),
                    },
                },
                _ => method_not_allowed("GET, POST"),
            },
            ["tenants", id, "usage"] => match *m {
                Method::GET => result(core.usage(id).await.map(|u| json!({"tenant": id, "quotas": u})), 200),
                _ => method_not_allowed("GET"),
            },
            ["tenants", id, "usage", "report"] => match *m {
                Method::GET => {
                    let (Some(from), Some(to)) = (query_param(query, "from"), query_param(query, "to")) else {
                        return problem(400, "bad_request", "Give the range as `?from=YYYY-MM-DD&to=YYYY-MM-DD`.");
                    };
                    let format = query_param(query, "format").unwrap_or("json");
                    if format != "json" && format != "csv" {
                        return problem(400, "bad_request", "`format` is `json` or `csv`.");
                    }
                    match core.report(id, from, to).await {
                        Ok(r) if format == "csv" => respond(
                            200,
                            "text/csv; charset=utf-8",
                            r.to_csv().into_bytes(),
                            &[("content-disposition", format!("attachment; filename=\"usage-{id}-{from}-{to}.csv\""))],
                        ),
                        Ok(r) => json_response(200, json!(r)),
                        Err(e) => admin_error(&e),
                    }
                }
                _ => method_not_allowed("GET"),
            },
            ["keys", key_id] => match *m {
                Method::DELETE => result(core.revoke_key(&actor, key_id, None).await.map(|k| json!(k)), 200),
                _ => method_not_allowed("DELETE"),
            },
            ["keys", key_id, "rotate"] => match *m {
                Method::POST => {
                    #[derive(Deserialize, Default)]
                    #[serde(deny_unknown_fields)]
                    struct Rotate {
                        grace_period_hours: Option<u32>,
                    }
                    let req = if body.is_empty() {
                        Rotate::default()
                    } else {
                        match parse::<Rotate>(&body) {
                            Ok(r) => r,
                            Err(r) => return *r,
                        }
                    };
                    match core.rotate_key(&actor, key_id, req.grace_period_hours.unwrap_or(24), None).await {
                        Ok((k, secret)) => json_response(201, json!({"key": k, "secret": secret})),
                        Err(e) => admin_error(&e),
                    }
                }
                _ => method_not_allowed("POST"),
            },
            ["tiers"] => match *m {
                Method::GET => json_response(200, json!({"items": tiers_view(&self.runtime.load().config)})),
                _ => method_not_allowed("GET"),
            },
            ["reload"] => match *m {
                Method::POST => {
                    let r = core.reload();
                    let ok = r.is_ok();
                    core.audit_reload(&actor, ok);
                    match r {
                        Ok(outcome) => json_response(
                            200,
                            json!({"status": "reloaded", "summary": outcome.summary, "warnings": outcome.warnings}),
                        ),
                        Err(errors) => {
                            let body = json!({
                                "type": "urn:tollgate:error:invalid_config",
                                "title": "Invalid config",
                                "status": 422,
                                "detail": "The config has errors; the running config stays in place. Fix them and reload again.",
                                "code": "invalid_config",
                                "errors": errors,
                            });
                            respond(422, "application/problem+json", serde_json::to_vec(&body).unwrap_or_default(), &[])
                        }
                    }
                }
                _ => method_not_allowed("POST"),
            },
            ["audit"] => match *m {
                Method::GET => {
                    let limit =
                        query_param(query, "limit").and_then(|l| l.parse().ok()).unwrap_or(1000usize).clamp(1, 100_000);
                    json_response(200, json!({"items": core.audit.read(query_param(query, "tenant"), limit)}))
                }
                _ => method_not_allowed("GET"),
            },
            _ => problem(404, "not_found", "No such admin endpoint. See /v1/openapi.json."),
        }
    }
}

fn result(r: Result<Value, AdminError>, status: u16) -> Resp {
    match r {
        Ok(v) => json_response(status, v),
        Err(e) => admin_error(&e),
    }
}

fn tiers_view(config: &crate::config::Config) -> Vec<Value> {
    config
        .tiers
        .values()
        .map(|t| {
            let l = &t.limits;
            json!({
                "name": &*t.name,
                "upstream": &*t.upstream,
                "features": t.features.iter().map(|f| f.to_string()).collect::<Vec<_>>(),
                "rate": l.rate.as_ref().map(|r| json!({"limit": r.limit, "period_seconds": r.period.as_secs(), "burst": r.burst, "mode": if r.global { "global" } else { "local" }})),
                "quotas": l.quotas.iter().map(|(m, q)| (m.to_string(), json!({"limit": q.limit, "period": q.period.as_str(), "enforcement": if q.hard { "hard" } else { "soft" }, "overage": q.overage_percent}))).collect::<serde_json::Map<_, _>>(),
                "concurrency": l.concurrency.as_ref().map(|c| c.limit),
                "prices": l.prices.iter().map(|(m, p)| (m.to_string(), json!(p))).collect::<serde_json::Map<_, _>>(),
            })
        })
        .collect()
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let query = session.req_header().uri.query().map(str::to_string);
        match path.as_str() {
            "/healthz" => json_response(200, json!({"status": "ok"})),
            "/readyz" => {
                let (ok, body) = self.ready().await;
                json_response(if ok { 200 } else { 503 }, body)
            }
            "/metrics" => {
                let body = self.metrics.render();
                respond(200, "text/plain; version=0.0.4; charset=utf-8", body, &[])
            }
            p if p.starts_with("/v1/") => self.v1(session, method, p, query.as_deref()).await,
            _ => problem(
                404,
                "not_found",
                "No such admin endpoint. Try /healthz, /readyz, /metrics or /v1/openapi.json.",
            ),
        }
    }
}
