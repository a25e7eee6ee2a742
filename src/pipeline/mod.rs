//! The request pipeline, and the Pingora `ProxyHttp` impl that sequences it.
//!
//! ```text
//!  request_filter ─► canonicalize ─► resolve ─► (token) ─► authenticate ─► authorize ─► rate_limit ─► quota ─► concurrency
//!                    Canonical       Hints      Verified   Principal       Permit       (&Permit)     Reserved  SlotGuard
//!                    any refusal: one problem+json response, reservations given back, Ok(true)
//!  request_body_filter: counts streamed bodies against the rule's max_body
//!  upstream_peer ────────────────────────────────► forward::peer (round robin, timeouts)
//!  upstream_request_filter ──────────────────────► forward::upstream_request (header hygiene)
//!  upstream_response_filter ─────────────────────► quota::settle (charge settle header)
//!  response_filter ──────────────────────────────► forward::downstream_response + limit headers
//!  fail_to_proxy: upstream and body errors ──────► the same problem+json mapping (502/503/504/413)
//!  logging: every request, every path ───────────► meter::record
//! ```
//!
//! Each stage lives in its own module and takes what the previous one proved, so no request
//! reaches `upstream_peer` without a `Permit`. This impl holds no policy of its own.

pub mod authenticate;
pub mod authorize;
pub mod body;
pub mod canonical;
pub mod concurrency;
pub mod ctx;
pub mod forward;
pub mod job;
pub mod meter;
pub mod quota;
pub mod rate_limit;
pub mod resolve;
pub mod self_service;
pub mod token;

use crate::clock::SharedClock;
use crate::directory::canonical_ip;
use crate::error::Reject;
use crate::runtime::SharedRuntime;
use crate::upstream::Upstreams;
use async_trait::async_trait;
use bytes::Bytes;
use ctx::{Decision, RequestCtx};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{ErrorSource, ErrorType};
use std::sync::Arc;
use std::time::Instant;

/// The gateway service.
pub struct Gateway {
    pub admin: Arc<crate::admin::core::AdminCore>,
    pub runtime: SharedRuntime,
    pub upstreams: Arc<Upstreams>,
    pub clock: SharedClock,
    pub limits: Arc<crate::limits::Limits>,
    pub meter: Arc<crate::metering::Meter>,
    pub webhook: Option<crate::metering::webhook::WebhookSender>,
    /// Checks the bearer tokens of `jwt` resolution, and keeps the keys and the verified ones.
    pub jwt: Arc<crate::jwt::Jwt>,
    /// Asynchronous jobs (`mode = "async"` rules, `/_tollgate/jobs`).
    pub jobs: Arc<crate::jobs::Jobs>,
}

/// Keeps a client's `X-Request-ID` when it is sane, otherwise makes a new one.
fn request_id(req: &RequestHeader) -> ctx::RequestId {
    req.headers.get("x-request-id").and_then(ctx::RequestId::from_client).unwrap_or_else(ctx::RequestId::random)
}

/// What admission decided, short of a refusal.
enum Admission {
    /// Go upstream.
    Proxy,
    /// A `/_tollgate/` self-service call the gateway answers itself.
    SelfService(self_service::Call),
    /// An asynchronous request, to store as a job.
    Job(job::Ticket),
    /// A `/_tollgate/jobs` call of this tenant.
    Jobs { tenant: Arc<str>, path: String, query: Option<String> },
}

impl Gateway {
    /// Runs every admission stage in order and records what later phases need.
    async fn admit(
        &self,
        rt: &Arc<crate::runtime::Runtime>,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Admission, Reject> {
        let req = session.req_header();
        let cfg = &rt.config;
        let peer = session.client_addr().and_then(|a| a.as_inet()).map(|a| canonical_ip(a.ip()));
        ctx.peer_ip = peer;
        ctx.peer_trusted = peer.is_some_and(|p| cfg.tenancy.trusted_proxies.iter().any(|n| n.contains(&p)));
        ctx.https = session.digest().and_then(|d| d.ssl_digest.as_ref()).is_some();

        resolve::check_size(req, cfg.server.max_header_bytes)?;
        let canon = canonical::of_request(req, &canonical::RequestPolicy::of(cfg))?;
        ctx.upstream_host = canon.missing_host_header().map(str::to_string);
        let hints = resolve::resolve(&cfg.tenancy, &canon, req, peer)?;
        ctx.client_ip = hints.client_ip;
        let verified = match hints.token {
            None => None,
            Some(t) => match token::verify(&self.jwt, rt, t).await {
                Ok(v) => {
                    ctx.key_id = v.identity.key_id.clone();
                    Some(v)
                }
                Err((reject, identity)) => {
                    // Name what the token proved in the access log (never the token).
                    ctx.key_id = identity.and_then(|i| i.key_id.clone());
                    return Err(reject);
                }
            },
        };
        let principal =
            match authenticate::identify_with(&rt.directory, &hints, verified.as_ref(), self.clock.now_millis()) {
                Ok(p) => p,
                Err((reject, key)) => {
                    // Name the refused key and its tenant in the access log (never the secret).
                    if let Some(key) = key {
                        ctx.key_id = Some(key.id.clone());
                        ctx.identified_tenant = Some(key.tenant.clone());
                    }
                    if let Some(v) = &verified {
                        ctx.identified_tenant = Some(v.tenant.clone());
                    }
                    return Err(reject);
                }
            };
        ctx.tenant = principal.tenant().cloned();
        if let authenticate::Principal::Keyed { key } = &principal {
            ctx.key_id = Some(key.id.clone());
        }
        if hints.path.starts_with("/_tollgate/") {
            if hints.path == "/_tollgate/jobs" || hints.path.starts_with("/_tollgate/jobs/") {
                return match (&principal, principal.tenant()) {
                    (authenticate::Principal::Anonymous { .. }, _) | (_, None) => Err(Reject::MissingKey),
                    (_, Some(t)) => Ok(Admission::Jobs {
                        tenant: t.id.clone(),
                        path: hints.path.to_string(),
                        query: hints.query.map(str::to_string),
                    }),
                };
            }
            return match &principal {
                authenticate::Principal::Keyed { key } => Ok(Admission::SelfService(self_service::Call::new(
                    key,
                    &req.method,
                    hints.path,
                    ctx.request_id.as_str(),
                ))),
                // Self-service manages API keys: it takes an API key, not a token.
                authenticate::Principal::Anonymous { .. } | authenticate::Principal::Token { .. } => {
                    Err(Reject::MissingKey)
                }
            };
        }
        let permit = match authorize::authorize_rule(&cfg.rules, req, &hints, principal) {
            Ok(p) => p,
            Err((reject, rule)) => {
                // A refusal by the matched rule (deny, scope, body size) is logged under it.
                ctx.rule = rule.cloned();
                return Err(reject);
            }
        };
        ctx.rule = Some(permit.rule.clone());
        ctx.body_limit = permit.rule.actions.max_body;
        ctx.upstream = Some(forward_target(cfg, &self.upstreams, &permit)?);
        if hints.path_rewritten {
            // Forward what was checked: the canonical path and query, never the client's spelling.
            let mut uri = String::with_capacity(hints.path.len() + hints.query.map_or(0, |q| q.len() + 1));
            uri.push_str(hints.path);
            if let Some(q) = hints.query {
                uri.push('?');
                uri.push_str(q);
            }
            ctx.upstream_uri = Some(uri);
        }

        rate_limit::check(&self.limits, &permit, &mut ctx.limit_headers).await?;
        let mut charges = quota::charges_of(&permit, req, &hints)?;
        // Whether the request becomes a job, decided from its head before the body is read.
        let ticket = job::admit(&permit, req, &cfg.jobs)?;
        if let Some(plan) = permit.rule.actions.body.as_deref().filter(|p| p.pre_read) {
            // The estimate comes from the body, so the body is read before anything is reserved
            // or forwarded (the rule's `max_body` bounds it).
            let whole = body::read_whole(session, permit.rule.actions.max_body.unwrap_or(0)).await?;
            ctx.body_limit = None;
            if let Some(scan) = body::scan_whole(plan, &whole)? {
                quota::costs_from_body(&mut charges, permit.rule, plan, &scan)?;
                ctx.body.model = body::model_of(plan, &scan);
                if let Some(rewritten) = body::inject_usage(plan, &scan, &whole)? {
                    ctx.body.whole = Some(rewritten);
                    ctx.body.strip_usage_event = true;
                }
            }
            if ctx.body.whole.is_none() {
                ctx.body.whole = Some(whole);
            }
        }
        let sink = quota::WarnSink { metrics: self.meter.metrics(), webhook: self.webhook.as_ref() };
        ctx.reserved = quota::reserve(&self.limits, &permit, charges, &mut ctx.limit_headers, &sink).await?;
        if let Some(ticket) = ticket {
            return Ok(Admission::Job(ticket));
        }
        match concurrency::acquire_advertised(&self.limits, &permit, &mut ctx.limit_headers).await {
            Ok(slot) => ctx.slot = slot,
            Err(e) => {
                quota::refund_all(&self.limits, &ctx.reserved);
                ctx.reserved.items.clear();
                return Err(e);
            }
        }
        Ok(Admission::Proxy)
    }

    /// Reads the body (up to the admin limit) and answers a self-service call.
    async fn serve_self(&self, session: &mut Session, ctx: &mut RequestCtx, call: self_service::Call) {
        let mut body = Vec::new();
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) if body.len() + chunk.len() <= crate::admin::MAX_BODY => body.extend_from_slice(&chunk),
                Ok(Some(_)) => {
                    let now = self.clock.now_millis();
                    respond(session, ctx, Reject::BodyTooLarge { limit: crate::admin::MAX_BODY as u64 }, now).await;
                    return;
                }
                Ok(None) => break,
                Err(_) => {
                    let reject = Reject::BadRequest { detail: "The request body could not be read.".into() };
                    respond(session, ctx, reject, self.clock.now_millis()).await;
                    return;
                }
            }
        }
        let answer = self_service::handle(&self.admin, &call, &body).await;
        ctx.status = answer.status;
        ctx.decision = Decision::Served;
        let Ok(mut resp) = ResponseHeader::build(answer.status, Some(4)) else { return };
        let _ = resp.insert_header("content-type", answer.content_type);
        let _ = resp.insert_header("content-length", answer.body.len().to_string());
        let _ = resp.insert_header("cache-control", "no-store");
        let _ = resp.insert_header("x-request-id", ctx.request_id.header());
        if let Some(server) = ctx.runtime.as_ref().and_then(|rt| rt.config.server.server_header.clone()) {
            let _ = resp.insert_header("server", server);
        }
        for (k, v) in answer.headers {
            let _ = resp.insert_header(*k, *v);
        }
        if session.write_response_header(Box::new(resp), false).await.is_ok() {
            let _ = session.write_response_body(Some(Bytes::from(answer.body)), true).await;
        }
    }
}

impl Gateway {
    /// Writes an answer of the jobs API.
    async fn write_reply(&self, session: &mut Session, ctx: &mut RequestCtx, answer: crate::jobs::Reply) {
        ctx.status = answer.status;
        ctx.decision = Decision::Served;
        let Ok(mut resp) = ResponseHeader::build(answer.status, Some(answer.headers.len() + 4)) else { return };
        if !answer.content_type.is_empty() {
            let _ = resp.insert_header("content-type", answer.content_type);
        }
        for (k, v) in answer.headers {
            let _ = resp.append_header(k, v);
        }
        let _ = resp.insert_header("content-length", answer.body.len().to_string());
        let _ = resp.insert_header("cache-control", "no-store");
        let _ = resp.insert_header("x-request-id", ctx.request_id.header());
        if session.write_response_header(Box::new(resp), false).await.is_ok() {
            let _ = session.write_response_body(Some(Bytes::from(answer.body)), true).await;
        }
    }
}

/// The upstream a permitted request goes to: the rule's, else the tenant tier's, else the pool
/// named `default`, else the only pool there is.
fn forward_target(
    cfg: &crate::config::Config,
    upstreams: &Upstreams,
    permit: &authorize::Permit<'_>,
) -> Result<Arc<str>, Reject> {
    if let Some(u) = &permit.rule.actions.upstream {
        return Ok(u.clone());
    }
    if let Some(t) = permit.tenant {
        return Ok(t.tier.upstream.clone());
    }
    // The running pools hold the same names as shared strings: cloning one costs no allocation.
    let shared = |name: &str| -> Arc<str> {
        upstreams.pools.get_key_value(name).map(|(k, _)| k.clone()).unwrap_or_else(|| name.into())
    };
    if cfg.upstreams.contains_key("default") {
        return Ok(shared("default"));
    }
    if cfg.upstreams.len() == 1 {
        if let Some(name) = cfg.upstreams.keys().next() {
            return Ok(shared(name));
        }
    }
    Err(Reject::UpstreamUnavailable { upstream: "(none)".into() })
}

/// The error body format of the route a request is on: its rule's, or, for a refusal made
/// before the rule was known (a missing key), the first rule its method, host and path match.
fn error_format(session: &Session, ctx: &RequestCtx) -> crate::rules::ErrorFormat {
    if let Some(rule) = &ctx.rule {
        return rule.actions.error_format.unwrap_or_default();
    }
    let Some(rules) = ctx.runtime.as_ref().map(|rt| &rt.config.rules).filter(|r| r.error_formats) else {
        return Default::default();
    };
    let req = session.req_header();
    let host = req.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).or(req.uri.host()).unwrap_or("");
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h).to_ascii_lowercase();
    let view = crate::rules::matcher::RequestView {
        method: &req.method,
        host: &host,
        path: req.uri.path(),
        query: req.uri.query(),
        headers: &req.headers,
        tier: None,
        tenant: None,
    };
    rules.find(&view).and_then(|r| r.actions.error_format).unwrap_or_default()
}

/// Writes a rejection. The one place a refusal is sent.
///
/// A gRPC request (`content-type: application/grpc…`) gets a trailers-only gRPC answer with the
/// same headers as metadata; on a route with `error_format = "openai"`, OpenAI's error shape;
/// anyone else a problem document.
async fn respond(session: &mut Session, ctx: &mut RequestCtx, reject: Reject, now_ms: i64) {
    let grpc = is_grpc(session.req_header());
    let mut problem = if grpc {
        reject.grpc(ctx.request_id.as_str())
    } else {
        match error_format(session, ctx) {
            crate::rules::ErrorFormat::Problem => reject.problem(ctx.request_id.as_str()),
            crate::rules::ErrorFormat::OpenAi => reject.openai_error(ctx.request_id.as_str()),
        }
    };
    ctx.limit_headers.render(now_ms, &mut problem.headers);
    if let Some(rule) = ctx.rule.as_ref().filter(|r| r.actions.openai_ratelimit_headers == Some(true)) {
        let tokens = rule.actions.charges.first().map(|c| &*c.metric);
        ctx.limit_headers.render_openai(now_ms, tokens, |k, v| problem.headers.push((k, v)));
    }
    if grpc && !session.is_http2() {
        // HTTP/1 has no trailers-only answer: an empty body, delimited.
        problem.headers.push(("content-length", "0".into()));
    }
    if let Some(server) = ctx.runtime.as_ref().and_then(|rt| rt.config.server.server_header.as_ref()) {
        problem.headers.push(("server", server.to_str().unwrap_or_default().to_string()));
    }
    ctx.status = problem.status;
    ctx.reject = Some(reject);
    if session.response_written().is_some_and(|r| !r.status.is_informational()) {
        // Headers already went out (an error mid-stream): the connection just closes.
        return;
    }
    let Ok(mut resp) = ResponseHeader::build(problem.status, Some(problem.headers.len())) else { return };
    for (k, v) in problem.headers {
        let _ = resp.insert_header(k, v);
    }
    let end = problem.body.is_empty();
    if session.write_response_header(Box::new(resp), end).await.is_ok() && !end {
        let _ = session.write_response_body(Some(Bytes::from(problem.body)), true).await;
    }
}

/// Whether the client speaks gRPC: `application/grpc`, `application/grpc+proto` and the like.
fn is_grpc(req: &RequestHeader) -> bool {
    req.headers.get(http::header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.len() >= 16
            && v[..16].eq_ignore_ascii_case(b"application/grpc")
            && matches!(v.get(16), None | Some(b'+' | b';'))
    })
}

/// Maps a Pingora error to the gateway's error, `None` when the client is already gone.
fn classify(e: &pingora::Error, ctx: &RequestCtx) -> Option<Reject> {
    if let Some(r) = &ctx.reject {
        return Some(r.clone());
    }
    let upstream = ctx.upstream.as_deref().unwrap_or("-").to_string();
    match e.esource() {
        ErrorSource::Upstream => match e.etype() {
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                Some(Reject::UpstreamTimeout { upstream })
            }
            _ => Some(Reject::UpstreamUnavailable { upstream }),
        },
        ErrorSource::Downstream => match e.etype() {
            ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed => None,
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => None,
            _ => Some(Reject::BadRequest { detail: "The request could not be read.".into() }),
        },
        ErrorSource::Internal | ErrorSource::Unset => match e.etype() {
            ErrorType::ConnectTimedout => Some(Reject::UpstreamTimeout { upstream }),
            ErrorType::ConnectRefused | ErrorType::ConnectNoRoute | ErrorType::ConnectError => {
                Some(Reject::UpstreamUnavailable { upstream })
            }
            _ => Some(Reject::Internal),
        },
    }
}

/// The `reason` of `tollgate_upstream_errors_total` for an upstream-side failure (one of
/// [`crate::metrics::UPSTREAM_ERROR_REASONS`]).
fn upstream_failure(e: &pingora::Error, reject: &Reject, reached: bool) -> &'static str {
    match (reject, e.etype()) {
        (Reject::NoHealthyUpstream { .. }, _) => "no_healthy_server",
        (_, ErrorType::ConnectTimedout) => "connect_timeout",
        (Reject::UpstreamTimeout { .. }, _) => "timeout",
        _ if !reached => "connect_error",
        _ => "error",
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new()
    }

    /// Runs right after the request head is read (the connection edge always leaves a context):
    /// the head deadline no longer applies to this request.
    fn on_connection_reuse(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
        prev: Box<dyn std::any::Any + Send + Sync>,
    ) {
        crate::edge::mark_head_read(Some(prev));
    }

    /// What Pingora prints about a request in its own log lines: the method, the path without
    /// the query (which may carry secrets) and the request id.
    fn request_summary(&self, session: &Session, ctx: &RequestCtx) -> String {
        let req = session.req_header();
        format!("{} {} request_id={}", req.method, req.uri.path(), ctx.request_id)
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        ctx.in_flight = Some(crate::metrics::InFlight::new(&self.meter.metrics().in_flight));
        ctx.request_id = request_id(session.req_header());
        let rt = self.runtime.load_full();
        // A client that stops reading the answer, or stops sending its body, holds a client and
        // an upstream connection; each read and write waits at most the idle timeout.
        let idle = rt.config.server.idle_timeout;
        session.set_read_timeout(Some(idle));
        session.set_write_timeout(Some(idle));
        let outcome = self.admit(&rt, session, ctx).await;
        ctx.runtime = Some(rt);
        match outcome {
            Ok(Admission::Proxy) => Ok(false),
            Ok(Admission::SelfService(call)) => {
                self.serve_self(session, ctx, call).await;
                Ok(true)
            }
            Ok(Admission::Job(ticket)) => {
                let now = self.clock.now_millis();
                let pool = ctx.upstream.as_deref().and_then(|u| self.upstreams.get(u));
                let host = pool.and_then(|p| p.config.host.clone());
                if let Err(reject) = job::submit(&self.jobs, session, ctx, ticket, host.as_deref(), now).await {
                    quota::refund_all(&self.limits, &ctx.reserved);
                    ctx.reserved.items.clear();
                    ctx.decision = Decision::Rejected;
                    respond(session, ctx, reject, now).await;
                }
                Ok(true)
            }
            Ok(Admission::Jobs { tenant, path, query }) => {
                let answer = self
                    .jobs
                    .api(
                        &tenant,
                        &session.req_header().method.clone(),
                        &path,
                        query.as_deref(),
                        ctx.request_id.as_str(),
                    )
                    .await;
                self.write_reply(session, ctx, answer).await;
                Ok(true)
            }
            Err(reject) => {
                ctx.decision = Decision::Rejected;
                respond(session, ctx, reject, self.clock.now_millis()).await;
                Ok(true)
            }
        }
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(plan) = ctx.rule.as_ref().and_then(|r| r.actions.body.as_deref()) {
            body::upstream_body(&mut ctx.body, plan, body, end_of_stream);
        }
        if let (Some(limit), Some(chunk)) = (ctx.body_limit, body.as_ref()) {
            ctx.body_seen += chunk.len() as u64;
            if ctx.body_seen > limit {
                ctx.reject = Some(Reject::BodyTooLarge { limit });
                return Error::e_explain(ErrorType::HTTPStatus(413), "request body over the rule's max_body");
            }
        }
        Ok(())
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
        ctx.upstream_started = Some(Instant::now());
        forward::peer(&self.upstreams, ctx).map_err(|reject| {
            let status = reject.status();
            ctx.reject = Some(reject);
            Error::explain(ErrorType::HTTPStatus(status), "no upstream server available")
        })
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.decision = Decision::Forwarded;
        let host = ctx.upstream.as_deref().and_then(|u| self.upstreams.get(u)).and_then(|p| p.config.host.as_deref());
        // Each attempt (a retry after a failed connection included) sends the whole body again.
        ctx.body.whole_sent = false;
        if let Some(whole) = &ctx.body.whole {
            // A body read whole goes upstream with its length, however the client framed it.
            upstream_request.remove_header(&http::header::TRANSFER_ENCODING);
            // The client's `Expect: 100-continue` was answered by the gateway when it read the body.
            upstream_request.remove_header(&http::header::EXPECT);
            upstream_request.insert_header(http::header::CONTENT_LENGTH, whole.len().to_string())?;
        }
        forward::upstream_request(upstream_request, ctx, host)?;
        if let Some(plan) = ctx.rule.as_ref().and_then(|r| r.actions.body.as_deref()) {
            body::upstream_head(plan, upstream_request)?;
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if ctx.upstream_first_byte.is_none() {
            ctx.upstream_first_byte = ctx.upstream_started.map(|s| s.elapsed());
        }
        for i in 0..ctx.reserved.charges.len() {
            let settle = ctx.reserved.charges[i].settle_header.as_ref().and_then(|h| {
                upstream_response
                    .headers
                    .get(h)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
            });
            if let Some(actual) = settle {
                quota::settle(&self.limits, &mut ctx.reserved, i, actual, &mut ctx.limit_headers);
            }
        }
        if let Some(plan) = ctx.rule.as_ref().and_then(|r| r.actions.body.as_deref()) {
            if !upstream_response.status.is_informational() {
                ctx.body.response =
                    body::start_response(plan, upstream_response, ctx.body.strip_usage_event).map(Box::new);
                // An answer that has no body (to HEAD, 204, 304) ends with its head: its charges
                // keep their estimates as `missing`, not as a stream that broke off.
                let bodiless = session.req_header().method == http::Method::HEAD
                    || matches!(upstream_response.status.as_u16(), 204 | 304);
                if bodiless && ctx.body.response.is_some() {
                    meter::settle_from_answer(&self.limits, self.meter.metrics(), ctx, &mut None, true);
                }
            }
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.status = upstream_response.status.as_u16();
        if !ctx.limit_headers.is_empty() {
            let mut inserted = Ok(());
            ctx.limit_headers.render_values(self.clock.now_millis(), |name, value| {
                if inserted.is_ok() {
                    inserted = upstream_response.insert_header(name, value);
                }
            });
            inserted?;
        }
        if let Some(rule) = ctx.rule.as_ref().filter(|r| r.actions.openai_ratelimit_headers == Some(true)) {
            let tokens = rule.actions.charges.first().map(|c| &*c.metric);
            let mut inserted = Ok(());
            ctx.limit_headers.render_openai(self.clock.now_millis(), tokens, |name, value| {
                if inserted.is_ok() {
                    inserted = upstream_response.insert_header(name, value);
                }
            });
            inserted?;
        }
        forward::downstream_response(upstream_response, ctx)
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.upstream_reached = true;
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<std::time::Duration>> {
        if ctx.body.response.is_some() {
            meter::settle_from_answer(&self.limits, self.meter.metrics(), ctx, body, end_of_stream);
        }
        if end_of_stream {
            if let Some(start) = ctx.upstream_started {
                ctx.upstream_time = Some(start.elapsed());
            }
            // The upstream is done with this request: its concurrency slot is free now, not
            // only once the last bytes have reached the client and the request is logged, so a
            // client's next request never finds its own previous one still counted.
            ctx.slot = None;
        }
        Ok(None)
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut RequestCtx) -> FailToProxy {
        if ctx.upstream_time.is_none() {
            ctx.upstream_time = ctx.upstream_started.map(|s| s.elapsed());
        }
        let reject = classify(e, ctx);
        if !ctx.upstream_reached {
            // The upstream was never reached: the tenant got nothing, so it pays nothing.
            quota::refund_all(&self.limits, &ctx.reserved);
            ctx.reserved.items.clear();
        }
        let code = match reject {
            Some(reject) => {
                ctx.decision = match reject {
                    Reject::UpstreamTimeout { .. }
                    | Reject::UpstreamUnavailable { .. }
                    | Reject::NoHealthyUpstream { .. } => {
                        ctx.upstream_failure = Some(upstream_failure(e, &reject, ctx.upstream_reached));
                        Decision::UpstreamError
                    }
                    _ => Decision::Rejected,
                };
                respond(session, ctx, reject, self.clock.now_millis()).await;
                ctx.status
            }
            None => 0,
        };
        FailToProxy { error_code: code, can_reuse_downstream: false }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        let access_log = ctx.runtime.as_ref().map(|r| r.config.log.access_log).unwrap_or(true);
        meter::record(session, ctx, access_log, &self.meter, self.clock.now_millis());
    }
}
