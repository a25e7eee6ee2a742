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
use core::{bounds, Actor, AdminCore, AdminError, CreateKey, CreateTenant, Int, PatchTenant, ReloadError};
use http::{Method, Response};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::sync::Arc;

/// Largest request body the admin API reads.
pub const MAX_BODY: usize = 1 << 20;

const OPENAPI: &str = include_str!("openapi.json");

pub struct AdminApp {
    pub runtime: SharedRuntime,
    pub upstreams: Arc<Upstreams>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub core: Arc<AdminCore>,
    /// The tenants' asynchronous jobs (`GET /v1/tenants/{id}/jobs`).
    pub jobs: Arc<crate::jobs::Jobs>,
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
    // One title per code, the same as on the data plane; a code only the admin listener uses
    // falls back to the status's reason phrase.
    let title = match crate::error::title_of(code) {
        "Error" => http::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("Error"),
        t => t,
    };
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

fn method_not_allowed(allowed: &str) -> Resp {
    problem_with(405, "method_not_allowed", &format!("Use {allowed} on this path."), &[("allow", allowed.to_string())])
}

fn bad_request(detail: &str) -> Early {
    Box::new(problem(400, "bad_request", detail))
}

/// Decodes `%XX` escapes; `None` for a malformed escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The query parameters of a request, decoded. A name the endpoint does not take, or one given
/// twice, is refused: like an unknown body field, a misspelled filter must not silently list
/// everything.
struct Query(BTreeMap<String, String>);

impl Query {
    fn parse(query: Option<&str>, takes: &[&str]) -> Result<Query, Early> {
        let mut out = BTreeMap::new();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let (Some(k), Some(v)) = (percent_decode(k), percent_decode(v)) else {
                return Err(bad_request("The query string has a malformed `%` escape or is not UTF-8."));
            };
            if !takes.contains(&k.as_str()) {
                let expected = if takes.is_empty() {
                    "This endpoint takes no query parameters.".to_string()
                } else {
                    format!("This endpoint takes only {}.", takes.join(", "))
                };
                return Err(bad_request(&format!("Unknown query parameter `{}`. {expected}", core::shown(&k))));
            }
            if out.contains_key(&k) {
                return Err(bad_request(&format!("The query parameter `{k}` is given twice; give it once.")));
            }
            out.insert(k, v);
        }
        Ok(Query(out))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// A string parameter of at most `max` characters.
    fn text(&self, name: &str, max: usize) -> Result<Option<&str>, Early> {
        match self.get(name) {
            Some(v) => match core::max_len(name, v, max) {
                Ok(()) => Ok(Some(v)),
                Err(e) => Err(Box::new(admin_error(&e))),
            },
            None => Ok(None),
        }
    }

    /// An integer parameter within `range`, `default` when absent.
    fn int(&self, name: &str, range: &RangeInclusive<i64>, default: i64) -> Result<i64, Early> {
        let Some(v) = self.get(name) else { return Ok(default) };
        match v.parse::<i64>() {
            Ok(n) if range.contains(&n) => Ok(n),
            _ => Err(bad_request(&format!(
                "`{name}` must be a whole number from {} to {}, not `{}`.",
                range.start(),
                range.end(),
                core::shown(v)
            ))),
        }
    }

    /// A parameter that is one of `values`, `None` when absent.
    fn one_of(&self, name: &str, values: &[&'static str]) -> Result<Option<&'static str>, Early> {
        let Some(v) = self.get(name) else { return Ok(None) };
        match values.iter().find(|x| **x == v) {
            Some(x) => Ok(Some(x)),
            None => {
                Err(bad_request(&format!("`{name}` must be one of {}, not `{}`.", values.join(", "), core::shown(v))))
            }
        }
    }
}

/// Refuses a `{id}` path parameter that cannot be a tenant id.
fn tenant_path(id: &str) -> Result<(), Early> {
    core::check_tenant_id(id).map_err(|e| Box::new(admin_error(&e)))
}

/// Refuses a `{key_id}` path parameter longer than any key id.
fn key_path(key_id: &str) -> Result<(), Early> {
    core::max_len("key_id", key_id, bounds::KEY_ID_MAX).map_err(|e| Box::new(admin_error(&e)))
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
        // From the last directory poll (every 500 ms), not a store call of its own: probes must
        // not add calls to a store busy with a load.
        let store_ok = self.core.store_reachable();
        // Until the store's tenants and keys are all loaded, their keys would answer 401.
        let directory_ok = self.core.loaded();
        let ok = upstreams_ok && store_ok && directory_ok;
        (
            ok,
            json!({
                "status": if ok { "ready" } else { "not_ready" },
                "config": "loaded",
                "directory": if directory_ok { "loaded" } else { "loading" },
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
            if method != Method::GET {
                return method_not_allowed("GET");
            }
            // Like the probes, the document ignores any query string.
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
        match self.route(&method, &segs, query, &body, &actor).await {
            Ok(r) => r,
            Err(r) => *r,
        }
    }

    /// Answers an authorized `/v1` request. The checks run in the documented order: the path
    /// and method (404, 405), the path and query parameters (400), the body (400), then the
    /// operation itself.
    async fn route(
        &self,
        m: &Method,
        segs: &[&str],
        query: Option<&str>,
        body: &[u8],
        actor: &Actor,
    ) -> Result<Resp, Early> {
        let core = &self.core;
        let no_query = || Query::parse(query, &[]).map(|_| ());
        Ok(match segs {
            ["tenants"] => match *m {
                Method::GET => {
                    let q = Query::parse(query, &["limit", "cursor", "tier", "status"])?;
                    // Within TENANT_PAGE, so positive and small.
                    let limit = q.int("limit", &bounds::TENANT_PAGE, bounds::DEFAULT_TENANT_PAGE)? as usize;
                    let cursor = q.text("cursor", bounds::TENANT_ID_MAX)?;
                    let tier = q.text("tier", bounds::TIER_MAX)?;
                    let status = q.one_of("status", &["active", "suspended"])?;
                    let (page, next) = core.tenant_page(cursor, limit, tier, status);
                    json_response(200, json!({"items": page, "next_cursor": next}))
                }
                Method::POST => {
                    no_query()?;
                    let req = parse::<CreateTenant>(body)?;
                    match core.create_tenant(actor, req).await {
                        Ok(t) => json_response(201, json!(t)),
                        Err(e) => admin_error(&e),
                    }
                }
                _ => method_not_allowed("GET, POST"),
            },
            ["tenants", id] => match *m {
                Method::GET => {
                    tenant_path(id)?;
                    no_query()?;
                    result(core.tenant(id).map(|t| json!(t)), 200)
                }
                Method::PATCH => {
                    tenant_path(id)?;
                    no_query()?;
                    let p = parse::<PatchTenant>(body)?;
                    result(core.update_tenant(actor, id, p).await.map(|t| json!(t)), 200)
                }
                Method::DELETE => {
                    tenant_path(id)?;
                    no_query()?;
                    match core.delete_tenant(actor, id).await {
                        Ok(()) => respond(204, "application/json", Vec::new(), &[]),
                        Err(e) => admin_error(&e),
                    }
                }
                _ => method_not_allowed("GET, PATCH, DELETE"),
            },
            ["tenants", id, action @ ("suspend" | "reactivate")] => match *m {
                Method::POST => {
                    tenant_path(id)?;
                    no_query()?;
                    let status = if *action == "suspend" { "suspended" } else { "active" };
                    result(core.set_status(actor, id, status).await.map(|t| json!(t)), 200)
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
                    tenant_path(id)?;
                    no_query()?;
                    let t = parse::<SetTier>(body)?;
                    if let Err(e) = core::max_len("tier", &t.tier, bounds::TIER_MAX) {
                        return Ok(admin_error(&e));
                    }
                    result(core.set_tier(actor, id, &t.tier).await.map(|t| json!(t)), 200)
                }
                _ => method_not_allowed("PUT"),
            },
            ["tenants", id, "keys"] => match *m {
                Method::GET => {
                    tenant_path(id)?;
                    no_query()?;
                    result(core.keys(id).await.map(|k| json!({"items": k})), 200)
                }
                Method::POST => {
                    tenant_path(id)?;
                    no_query()?;
                    let req = parse::<CreateKey>(body)?;
                    match core.create_key(actor, id, req).await {
                        Ok((k, secret)) => json_response(201, json!({"key": k, "secret": secret})),
                        Err(e) => admin_error(&e),
                    }
                }
                _ => method_not_allowed("GET, POST"),
            },
            ["tenants", id, "jobs"] => match *m {
                Method::GET => {
                    tenant_path(id)?;
                    Query::parse(query, &["status", "limit", "cursor"])?;
                    if let Err(e) = core.tenant(id) {
                        return Ok(admin_error(&e));
                    }
                    let r = self.jobs.list(id, query, &actor.request_id).await;
                    respond(r.status, &r.content_type, r.body, &[])
                }
                _ => method_not_allowed("GET"),
            },
            ["tenants", id, "usage"] => match *m {
                Method::GET => {
                    tenant_path(id)?;
                    no_query()?;
                    result(core.usage(id).await.map(|u| json!({"tenant": id, "quotas": u})), 200)
                }
                _ => method_not_allowed("GET"),
            },
            ["tenants", id, "usage", "report"] => match *m {
                Method::GET => {
                    tenant_path(id)?;
                    let q = Query::parse(query, &["from", "to", "format"])?;
                    let (Some(from), Some(to)) = (q.get("from"), q.get("to")) else {
                        return Err(bad_request("Give the range as `?from=YYYY-MM-DD&to=YYYY-MM-DD`."));
                    };
                    let format = q.one_of("format", &["json", "csv"])?.unwrap_or("json");
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
                Method::DELETE => {
                    key_path(key_id)?;
                    no_query()?;
                    result(core.revoke_key(actor, key_id, None).await.map(|k| json!(k)), 200)
                }
                _ => method_not_allowed("DELETE"),
            },
            ["keys", key_id, "rotate"] => match *m {
                Method::POST => {
                    #[derive(Deserialize, Default)]
                    #[serde(deny_unknown_fields)]
                    struct Rotate {
                        grace_period_hours: Option<Int>,
                    }
                    key_path(key_id)?;
                    no_query()?;
                    let req = if body.is_empty() { Rotate::default() } else { parse::<Rotate>(body)? };
                    let grace = match req
                        .grace_period_hours
                        .map(|g| g.within("grace_period_hours", &bounds::GRACE_PERIOD_HOURS))
                    {
                        // Within GRACE_PERIOD_HOURS, so it fits a u32.
                        Some(Ok(g)) => g as u32,
                        Some(Err(e)) => return Ok(admin_error(&e)),
                        None => bounds::DEFAULT_GRACE_PERIOD_HOURS,
                    };
                    match core.rotate_key(actor, key_id, grace, None).await {
                        Ok((k, secret)) => json_response(201, json!({"key": k, "secret": secret})),
                        Err(e) => admin_error(&e),
                    }
                }
                _ => method_not_allowed("POST"),
            },
            ["tiers"] => match *m {
                Method::GET => {
                    no_query()?;
                    json_response(200, json!({"items": tiers_view(&self.runtime.load().config)}))
                }
                _ => method_not_allowed("GET"),
            },
            ["reload"] => match *m {
                Method::POST => {
                    let q = Query::parse(query, &["force"])?;
                    let force = q.one_of("force", &["true", "false"])? == Some("true");
                    // Parsing a large config takes seconds: not on a proxy or admin thread.
                    let c = core.clone();
                    let r = match tokio::task::spawn_blocking(move || c.reload_with(force)).await {
                        Ok(r) => r,
                        Err(e) => Err(ReloadError::Invalid(vec![format!("the reload did not finish: {e}")])),
                    };
                    core.audit_reload_result(actor, force, &r);
                    match r {
                        Ok(outcome) => json_response(
                            200,
                            json!({"status": "reloaded", "summary": outcome.summary, "warnings": outcome.warnings}),
                        ),
                        Err(ReloadError::Refused(detail)) => problem(409, "reload_refused", &detail),
                        Err(ReloadError::Invalid(errors)) => {
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
                    let q = Query::parse(query, &["tenant", "limit"])?;
                    let tenant = q.text("tenant", bounds::TENANT_ID_MAX)?;
                    // Within AUDIT_PAGE, so positive.
                    let limit = q.int("limit", &bounds::AUDIT_PAGE, bounds::DEFAULT_AUDIT_PAGE)? as usize;
                    json_response(200, json!({"items": core.audit.read(tenant, limit)}))
                }
                _ => method_not_allowed("GET"),
            },
            _ => problem(404, "not_found", "No such admin endpoint. See /v1/openapi.json."),
        })
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
        // The head is read: the connection edge's head deadline no longer applies.
        crate::edge::mark_head_read(session.take_connection_user_context());
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let query = session.req_header().uri.query().map(str::to_string);
        // The probes take GET and no query parameters. A query string is ignored, so a
        // monitoring system that adds one (a cache buster) cannot fail a health check.
        if matches!(path.as_str(), "/healthz" | "/readyz" | "/metrics") && method != Method::GET {
            return method_not_allowed("GET");
        }
        match path.as_str() {
            "/healthz" => json_response(200, json!({"status": "ok"})),
            "/readyz" => {
                let (ok, body) = self.ready().await;
                json_response(if ok { 200 } else { 503 }, body)
            }
            "/metrics" => {
                // Server health is read from the health checks at scrape time, not per request.
                self.upstreams.export_health(&self.metrics.upstream_healthy);
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
