//! Stage: job. On an asynchronous rule (`mode = "async"`, or `"either"` with
//! `Prefer: respond-async`), after rate limit and quota, the request is stored as a job and
//! answered `202` instead of being forwarded; the quota it reserved goes with the job
//! ([`crate::jobs`]). No concurrency slot is taken here: the worker that runs the job takes one.
//!
//! `X-Job-Priority`, `X-Callback-URL` and `Prefer` are the gateway's own headers on these
//! routes: they are checked here and never forwarded.

use super::authorize::Permit;
use super::ctx::{Decision, RequestCtx};
use crate::config::jobs::JobsConfig;
use crate::error::Reject;
use crate::jobs::{client, Held, Jobs};
use crate::rules::JobRule;
use crate::store::jobs::JobSpec;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;
use std::sync::Arc;

/// The most a request may lower its own priority below its tier's.
const MIN_REQUESTED_PRIORITY: i64 = -1_000_000;

/// What admission decided for a job.
pub struct Ticket {
    pub rule: Arc<JobRule>,
    pub priority: i64,
    pub callback: Option<String>,
}

fn one<'a>(req: &'a RequestHeader, name: &str) -> Result<Option<&'a str>, Reject> {
    let mut all = req.headers.get_all(name).iter();
    let first = all.next();
    if all.next().is_some() {
        return Err(Reject::InvalidJob { detail: format!("`{name}` appears more than once; send it once.") });
    }
    match first {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim()))
            .map_err(|_| Reject::InvalidJob { detail: format!("`{name}` must be visible ASCII.") }),
    }
}

/// `Prefer: respond-async` (RFC 7240), in any of the request's `Prefer` headers.
fn prefers_async(req: &RequestHeader) -> bool {
    req.headers.get_all("prefer").iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(|p| {
        let token = p.split([';', '=']).next().unwrap_or("").trim();
        token.eq_ignore_ascii_case("respond-async")
    })
}

/// Runs the stage: `Some` when the request becomes a job.
pub fn admit(permit: &Permit<'_>, req: &RequestHeader, cfg: &JobsConfig) -> Result<Option<Ticket>, Reject> {
    let Some(rule) = &permit.rule.actions.job else { return Ok(None) };
    if !rule.always && !prefers_async(req) {
        return Ok(None);
    }
    let Some(tenant) = permit.tenant else {
        return Err(Reject::InvalidJob {
            detail: "Asynchronous requests belong to a tenant: send your API key or token.".into(),
        });
    };
    let ceiling = tenant.policy.priority;
    let requested = match one(req, "x-job-priority")? {
        None => ceiling,
        Some(v) => {
            v.parse::<i64>().ok().filter(|p| *p >= MIN_REQUESTED_PRIORITY).ok_or_else(|| Reject::InvalidJob {
                detail: format!(
                    "`X-Job-Priority` must be a whole number up to your tier's priority ({ceiling}), not `{v}`."
                ),
            })?
        }
    };
    let priority = permit.rule.actions.priority.saturating_add(requested.min(ceiling));
    let callback = match one(req, "x-callback-url")? {
        None => None,
        Some(url) => {
            let allowed = cfg.callback_hosts_for(&tenant.id, &tenant.tier.name);
            let authority = client::split_url(url).map(|(a, _)| a);
            let host_ok = authority.as_deref().is_some_and(|a| {
                let host = a.rsplit_once(':').map_or(a, |(h, _)| h);
                allowed.iter().any(|h| h.eq_ignore_ascii_case(a) || h.eq_ignore_ascii_case(host))
            });
            if url.len() > 2048 || !host_ok || cfg.callback_secret.is_none() {
                return Err(Reject::InvalidJob {
                    detail: format!(
                        "`X-Callback-URL` must be an http:// URL on a host your plan allows ({}).",
                        if allowed.is_empty() { "none is configured".to_string() } else { allowed.join(", ") }
                    ),
                });
            }
            Some(url.to_string())
        }
    };
    Ok(Some(Ticket { rule: rule.clone(), priority, callback }))
}

/// Reads the body, stores the job and answers `202`. `pool_host` is the upstream pool's `host`
/// (the `Host` it is sent), as for a forwarded request.
pub async fn submit(
    jobs: &Jobs,
    session: &mut Session,
    ctx: &mut RequestCtx,
    ticket: Ticket,
    pool_host: Option<&str>,
    now_ms: i64,
) -> Result<(), Reject> {
    let cfg = ctx.runtime.as_ref().map(|r| r.config.jobs.clone()).unwrap_or_default();
    let limit = ctx.body_limit.unwrap_or(cfg.max_body);
    let mut body = Vec::new();
    // A body the rule already read whole (for its estimate) is the job's body.
    let mut read = ctx.body.whole.is_none();
    if let Some(whole) = &ctx.body.whole {
        body.extend_from_slice(whole);
    }
    while read {
        match session.read_request_body().await {
            Ok(Some(chunk)) if (body.len() + chunk.len()) as u64 <= limit => body.extend_from_slice(&chunk),
            Ok(Some(_)) => return Err(Reject::BodyTooLarge { limit }),
            Ok(None) => read = false,
            Err(_) => return Err(Reject::BadRequest { detail: "The request body could not be read.".into() }),
        }
    }
    let mut up = session.req_header().clone();
    if ctx.body.whole.is_some() {
        up.remove_header(&http::header::TRANSFER_ENCODING);
        up.insert_header(http::header::CONTENT_LENGTH, body.len().to_string()).map_err(|_| Reject::Internal)?;
    }
    for h in ["prefer", "x-job-priority", "x-callback-url"] {
        up.remove_header(h);
    }
    super::forward::upstream_request(&mut up, ctx, pool_host).map_err(|_| Reject::Internal)?;
    let headers = up
        .headers
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let (Some(tenant), Some(rule), Some(upstream)) = (ctx.tenant.clone(), ctx.rule.clone(), ctx.upstream.clone())
    else {
        return Err(Reject::Internal);
    };
    let spec = JobSpec {
        id: crate::jobs::new_id(),
        tenant: tenant.id.to_string(),
        tier: tenant.tier.name.to_string(),
        rule: rule.name.to_string(),
        priority: ticket.priority,
        method: up.method.as_str().to_string(),
        uri: up.uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
        upstream: upstream.to_string(),
        headers,
        body,
        callback: ticket.callback,
        timeout_ms: ticket.rule.timeout.as_millis().min(i64::MAX as u128) as i64,
        result_max_bytes: ticket.rule.result_max_bytes,
        retention_ms: ticket.rule.retention.as_millis().min(i64::MAX as u128) as i64,
        request_id: ctx.request_id.as_str().to_string(),
        key_id: ctx.key_id.as_ref().map(|k| k.to_string()),
        created_ms: now_ms,
        // A job carries its rule's first charge; further charges keep their estimates.
        charge: ctx.reserved.charges.first().map(|c| crate::store::jobs::JobCharge {
            metric: c.metric.to_string(),
            estimate: c.estimate,
            settle_header: c.settle_header.as_ref().map(|h| h.as_str().to_string()),
        }),
        response_headers: crate::store::jobs::ResponseEdits {
            remove: rule.actions.remove_response_headers.iter().map(|h| h.as_str().to_string()).collect(),
            set: rule
                .actions
                .set_response_headers
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
                .collect(),
        },
    };
    let charge = ctx.reserved.charges.first();
    let held = Held {
        items: std::mem::take(&mut ctx.reserved.items),
        charge_metric: charge.map(|c| c.metric.clone()),
        settle_header: charge.and_then(|c| c.settle_header.clone()),
    };
    match jobs.submit(&spec, held, cfg.max_open_per_tenant).await {
        Ok(true) => {}
        Ok(false) => return Err(Reject::JobQueueFull { limit: cfg.max_open_per_tenant }),
        Err(e) => {
            tracing::warn!(error = %e, "cannot store a job");
            return Err(Reject::StoreUnavailable { retry_after: 1 });
        }
    }
    let location = format!("/_tollgate/jobs/{}", spec.id);
    let body = serde_json::json!({
        "id": spec.id,
        "status": "pending",
        "links": {"self": location, "result": format!("{location}/result")},
    });
    let body = serde_json::to_vec(&body).unwrap_or_default();
    ctx.status = 202;
    ctx.decision = Decision::Served;
    let mut resp = ResponseHeader::build(202, Some(8)).map_err(|_| Reject::Internal)?;
    let _ = resp.insert_header("content-type", "application/json");
    let _ = resp.insert_header("content-length", body.len().to_string());
    let _ = resp.insert_header("location", location);
    let _ = resp.insert_header("cache-control", "no-store");
    let _ = resp.insert_header("x-request-id", ctx.request_id.header());
    ctx.limit_headers.render_values(now_ms, |name, value| {
        let _ = resp.insert_header(name, value);
    });
    if session.write_response_header(Box::new(resp), false).await.is_ok() {
        let _ = session.write_response_body(Some(Bytes::from(body)), true).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(prefer: &[&str]) -> RequestHeader {
        let mut r = RequestHeader::build("POST", b"/gen", None).expect("request");
        for p in prefer {
            r.append_header("prefer", *p).expect("header");
        }
        r
    }

    #[test]
    fn respond_async_is_found_in_any_prefer_header_and_spelling() {
        for yes in [
            &["respond-async"][..],
            &["RESPOND-ASYNC"],
            &["wait=10, respond-async"],
            &["return=minimal", "respond-async;x=1"],
            &[" respond-async "],
        ] {
            assert!(prefers_async(&req(yes)), "{yes:?}");
        }
        for no in
            [&[][..], &["respond-asynchronous"], &["wait=respond-async"], &["respond_async"], &["x-respond-async"]]
        {
            assert!(!prefers_async(&req(no)), "{no:?}");
        }
    }
}
