//! Asynchronous jobs: requests of `mode = "async"` rules are stored and answered `202`, and
//! workers inside the gateway forward them later, in priority order, under the tenant's
//! concurrency limit. See `docs/jobs.md` for the client's view.
//!
//! What this module guarantees:
//!
//! - **Admission first.** A job is stored only after authentication, rules, rate limit and
//!   quota passed (the pipeline's job stage); its quota reservation is held here until the job
//!   ends: settled from the result's `settle_from_header`, given back when a pending job is
//!   cancelled or the upstream was never reached.
//! - **Priority.** Workers claim the highest-priority pending job whose tenant has a free
//!   concurrency slot; a tenant whose slots are full is skipped until a slot frees (or for at
//!   most `poll_interval`).
//! - **Leases.** A running job's lease is renewed every third of `lease_ttl`; every instance
//!   reaps expired leases, so a stopped instance's jobs run again elsewhere (`retry_lost`).
//! - **Tenancy.** Every read and cancel is scoped to the caller's tenant.
//!
//! Nothing here runs on the request path except [`Jobs::submit`] (one store write per job) and
//! the `/_tollgate/jobs` API; a gateway with no asynchronous rule starts no worker.

pub mod client;

use crate::clock::SharedClock;
use crate::limits::quota::Reservation;
use crate::limits::Limits;
use crate::runtime::SharedRuntime;
use crate::store::jobs::{JobRecord, JobResult, JobSpec, JobStatus, JobStore};
use crate::store::StoreError;
use crate::upstream::Upstreams;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{oneshot, Notify};

/// The quota a job took at submission, held until it ends.
pub struct Held {
    pub items: Vec<Reservation>,
    /// The rule's charged metric, and the response header that settles it.
    pub charge_metric: Option<Arc<str>>,
    pub settle_header: Option<http::HeaderName>,
}

/// The job metrics (registered on the app's registry).
pub struct JobMetrics {
    pub submitted: IntCounterVec,
    pub finished: IntCounterVec,
    pub depth: IntGaugeVec,
    pub wait: HistogramVec,
    pub run: HistogramVec,
}

const JOB_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];

impl JobMetrics {
    pub fn new(registry: &Registry) -> JobMetrics {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|_| unreachable!("valid metric"));
            let _ = registry.register(Box::new(c.clone()));
            c
        };
        let histogram = |name: &str, help: &str| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(JOB_BUCKETS.to_vec()), &["tier"])
                .unwrap_or_else(|_| unreachable!("valid metric"));
            let _ = registry.register(Box::new(h.clone()));
            h
        };
        let depth =
            IntGaugeVec::new(Opts::new("tollgate_jobs_queue_depth", "Pending jobs per tier, fleet-wide."), &["tier"])
                .unwrap_or_else(|_| unreachable!("valid metric"));
        let _ = registry.register(Box::new(depth.clone()));
        JobMetrics {
            submitted: counter("tollgate_jobs_submitted_total", "Jobs accepted (202).", &["tier"]),
            finished: counter("tollgate_jobs_finished_total", "Jobs that ended, by final status.", &["tier", "status"]),
            depth,
            wait: histogram("tollgate_job_wait_seconds", "From submission to a worker starting the job."),
            run: histogram("tollgate_job_run_seconds", "From a worker starting the job to its end."),
        }
    }
}

/// Why a running job is stopped from outside its run.
enum Abort {
    /// Cancelled through the job API on this instance.
    Cancel,
    /// This instance is shutting down.
    Shutdown,
}

/// The job service of one instance.
pub struct Jobs {
    pub store: Arc<dyn JobStore>,
    runtime: SharedRuntime,
    upstreams: Arc<Upstreams>,
    limits: Arc<Limits>,
    /// Meters each run like a forwarded request (usage, ledger, request metrics).
    meter: Arc<crate::metering::Meter>,
    clock: SharedClock,
    /// This process's worker name in the store (instance id plus a start id).
    worker: String,
    pub metrics: JobMetrics,
    wake: Notify,
    held: Mutex<HashMap<String, Held>>,
    /// Runs in progress here: each with a number of its own (a job whose lease was lost may
    /// be claimed again here while its first run winds down) and the sender that aborts it.
    running: Mutex<HashMap<String, (u64, oneshot::Sender<Abort>)>>,
    runs: std::sync::atomic::AtomicU64,
    /// Tenants whose concurrency slots were full at the last claim.
    skip: Mutex<HashSet<String>>,
    /// Set at shutdown: running jobs are handed back rather than left to their lease.
    stopping: std::sync::atomic::AtomicBool,
    /// One claim at a time on this instance, from the claim to the slot (or the give-back): a
    /// job claimed and then given back would otherwise let a lower one be claimed meanwhile
    /// and take the slot first.
    claiming: tokio::sync::Mutex<()>,
    /// When the upkeep last looked at jobs accepted here and run elsewhere (ms).
    settled_at: std::sync::atomic::AtomicI64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A reply of the `/_tollgate/jobs` API or the admin listing.
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

fn reply(status: u16, v: Value) -> Reply {
    Reply {
        status,
        content_type: "application/json".into(),
        headers: Vec::new(),
        body: serde_json::to_vec(&v).unwrap_or_default(),
    }
}

/// A problem reply in the gateway's one shape.
pub fn problem(status: u16, code: &str, detail: &str, request_id: &str) -> Reply {
    let v = json!({
        "type": format!("urn:tollgate:error:{code}"),
        "title": crate::error::title_of(code),
        "status": status,
        "detail": detail,
        "code": code,
        "request_id": request_id,
    });
    let mut r = reply(status, v);
    r.content_type = "application/problem+json".into();
    if status == 503 {
        r.headers.push(("retry-after".into(), "1".into()));
    }
    r
}

fn time(ms: Option<i64>) -> Value {
    ms.map_or(Value::Null, |m| Value::String(crate::limits::headers::rfc3339(m)))
}

/// The client's view of a job.
pub fn view(r: &JobRecord) -> Value {
    let id = &r.spec.id;
    json!({
        "id": id,
        "status": r.status().as_str(),
        "priority": r.spec.priority,
        "method": r.spec.method,
        "path": r.spec.uri,
        "created_at": time(Some(r.spec.created_ms)),
        "started_at": time(r.state.started_ms),
        "finished_at": time(r.state.finished_ms),
        "progress": r.state.progress,
        "attempts": r.state.attempts,
        "error": r.state.error,
        "links": {"self": format!("/_tollgate/jobs/{id}"), "result": format!("/_tollgate/jobs/{id}/result")},
    })
}

/// A new job id: `job_` and 32 hex digits (128 random bits).
pub fn new_id() -> String {
    format!("job_{:032x}", rand::random::<u128>())
}

fn valid_id(id: &str) -> bool {
    id.len() == 36
        && id.starts_with("job_")
        && id[4..].bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Parses a listing query: `status`, `limit` (1-100, default 20), `cursor`.
pub fn list_query(query: Option<&str>) -> Result<(Option<JobStatus>, usize, Option<u64>), String> {
    let (mut status, mut limit, mut cursor) = (None, 20usize, None);
    let mut seen = HashSet::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if !seen.insert(k.to_string()) {
            return Err(format!("The query parameter `{k}` appears more than once; send it once."));
        }
        match k {
            "status" => {
                status = Some(JobStatus::parse(v).ok_or_else(|| {
                    format!(
                        "`status` must be one of pending, running, completed, failed, cancelled, timeout, not `{v}`."
                    )
                })?)
            }
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=100).contains(n))
                    .ok_or_else(|| "`limit` must be a whole number from 1 to 100.".to_string())?
            }
            "cursor" => {
                cursor = Some(
                    v.parse::<u64>()
                        .map_err(|_| "`cursor` must be the `next_cursor` of an earlier page.".to_string())?,
                )
            }
            other => return Err(format!("Unknown query parameter `{other}`; use status, limit and cursor.")),
        }
    }
    Ok((status, limit, cursor))
}

/// What the job service is built from (see `app.rs`).
pub struct Parts {
    pub store: Arc<dyn JobStore>,
    pub runtime: SharedRuntime,
    pub upstreams: Arc<Upstreams>,
    pub limits: Arc<Limits>,
    pub meter: Arc<crate::metering::Meter>,
    pub clock: SharedClock,
    /// This process's worker name in the store: the instance id plus a start id.
    pub worker: String,
}

impl Jobs {
    pub fn new(p: Parts, registry: &Registry) -> Arc<Jobs> {
        Arc::new(Jobs {
            store: p.store,
            runtime: p.runtime,
            upstreams: p.upstreams,
            limits: p.limits,
            meter: p.meter,
            clock: p.clock,
            worker: p.worker,
            metrics: JobMetrics::new(registry),
            wake: Notify::new(),
            held: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
            runs: std::sync::atomic::AtomicU64::new(0),
            skip: Mutex::new(HashSet::new()),
            stopping: std::sync::atomic::AtomicBool::new(false),
            claiming: tokio::sync::Mutex::new(()),
            settled_at: std::sync::atomic::AtomicI64::new(0),
        })
    }

    fn config(&self) -> crate::config::jobs::JobsConfig {
        self.runtime.load().config.jobs.clone()
    }

    /// Stores a job; `Ok(false)` when the tenant has too many open jobs. A job not stored
    /// gives its quota back.
    pub async fn submit(&self, spec: &JobSpec, held: Held, max_open: u32) -> Result<bool, StoreError> {
        let stored = self.store.submit(spec, max_open).await;
        if !matches!(stored, Ok(true)) {
            for r in &held.items {
                self.limits.quotas.refund(r, r.units);
            }
        }
        let ok = stored?;
        if ok {
            lock(&self.held).insert(spec.id.clone(), held);
            self.metrics.submitted.with_label_values(&[&spec.tier]).inc();
            event(self, spec, JobStatus::Pending, None);
            self.wake.notify_waiters();
        }
        Ok(ok)
    }

    /// Gives back the quota a job took (it was cancelled before it ran, or never reached the
    /// upstream).
    fn refund(&self, id: &str) {
        if let Some(h) = lock(&self.held).remove(id) {
            for r in &h.items {
                self.limits.quotas.refund(r, r.units);
            }
        }
    }

    /// Settles the charged metric from the result's settle header, and lets the reservation go.
    fn settle(&self, id: &str, result: Option<&JobResult>) {
        let Some(h) = lock(&self.held).remove(id) else { return };
        let (Some(metric), Some(header), Some(result)) = (&h.charge_metric, &h.settle_header, result) else { return };
        let actual = result
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(header.as_str()))
            .and_then(|(_, v)| v.trim().parse::<u64>().ok());
        let Some(actual) = actual else { return };
        for r in &h.items {
            let rule_scoped = r.metric.strip_prefix(&**metric).is_some_and(|rest| rest.starts_with('@'));
            if *r.metric == **metric || rule_scoped {
                self.limits.quotas.settle(r, actual);
            }
        }
    }

    /// Answers a `/_tollgate/jobs` call of `tenant`.
    pub async fn api(
        &self,
        tenant: &str,
        method: &http::Method,
        path: &str,
        query: Option<&str>,
        request_id: &str,
    ) -> Reply {
        let rest = path.trim_start_matches("/_tollgate/jobs");
        let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        let now = self.clock.now_millis();
        let unavailable = |e: StoreError| {
            tracing::warn!(error = %e, "job store call failed");
            problem(503, "store_unavailable", "The job store cannot be reached right now. Retry in 1 s.", request_id)
        };
        let not_found =
            || problem(404, "not_found", "No job with this id belongs to your tenant (or it expired).", request_id);
        let allow = |methods: &str| {
            let mut r = problem(405, "method_not_allowed", &format!("Use {methods} on this path."), request_id);
            r.headers.push(("allow".into(), methods.into()));
            r
        };
        if !segs.is_empty() && query.is_some_and(|q| !q.is_empty()) {
            return problem(400, "bad_request", "This path takes no query parameters.", request_id);
        }
        match (segs.as_slice(), method) {
            ([], &http::Method::GET) => self.list(tenant, query, request_id).await,
            ([], &http::Method::DELETE) => {
                if query.is_some_and(|q| !q.is_empty()) {
                    return problem(400, "bad_request", "This path takes no query parameters.", request_id);
                }
                match self.store.cancel_all(tenant, now).await {
                    Ok(done) => {
                        let ids: Vec<&str> = done.iter().map(|r| r.spec.id.as_str()).collect();
                        for r in &done {
                            self.cancelled(r).await;
                        }
                        reply(200, json!({"cancelled": ids}))
                    }
                    Err(e) => unavailable(e),
                }
            }
            ([], _) => allow("GET, DELETE"),
            ([id], m) | ([id, "result"], m) if !valid_id(id) => {
                if *m == http::Method::GET || *m == http::Method::DELETE {
                    not_found()
                } else {
                    allow(if segs.len() == 1 { "GET, DELETE" } else { "GET" })
                }
            }
            ([id], &http::Method::GET) => match self.store.get(tenant, id, now).await {
                Ok(Some(r)) => reply(200, view(&r)),
                Ok(None) => not_found(),
                Err(e) => unavailable(e),
            },
            ([id], &http::Method::DELETE) => match self.store.cancel(tenant, id, now).await {
                Ok(Some(before)) if before.status().is_final() => problem(
                    409,
                    "conflict",
                    &format!(
                        "The job already ended with status `{}`; there is nothing to cancel.",
                        before.status().as_str()
                    ),
                    request_id,
                ),
                Ok(Some(before)) => {
                    self.cancelled(&before).await;
                    match self.store.get(tenant, id, now).await {
                        Ok(Some(r)) => reply(200, view(&r)),
                        Ok(None) => not_found(),
                        Err(e) => unavailable(e),
                    }
                }
                Ok(None) => not_found(),
                Err(e) => unavailable(e),
            },
            ([_], _) => allow("GET, DELETE"),
            ([id, "result"], &http::Method::GET) => {
                let rec = match self.store.get(tenant, id, now).await {
                    Ok(Some(r)) => r,
                    Ok(None) => return not_found(),
                    Err(e) => return unavailable(e),
                };
                match self.store.result(tenant, id, now).await {
                    Ok(Some(res)) => {
                        let mut headers: Vec<(String, String)> = res
                            .headers
                            .into_iter()
                            .filter(|(k, _)| !client::HOP_BY_HOP.contains(&k.as_str()))
                            .collect();
                        // As the rule would have answered. The store keeps the upstream's own
                        // headers, which settle the job's charge.
                        rec.spec.response_headers.apply(&mut headers);
                        headers.push(("x-tollgate-job-id".into(), id.to_string()));
                        headers.push(("x-tollgate-job-status".into(), rec.status().as_str().into()));
                        if res.truncated {
                            headers.push(("x-tollgate-result-truncated".into(), "true".into()));
                        }
                        // The upstream's own content type travels in `headers`.
                        Reply { status: res.status, content_type: String::new(), headers, body: res.body }
                    }
                    Ok(None) => problem(
                        409,
                        "conflict",
                        &format!(
                            "The job is `{}` and has no result{}.",
                            rec.status().as_str(),
                            if rec.status().is_final() { "" } else { " yet; poll /_tollgate/jobs/{id} until it ends" }
                        ),
                        request_id,
                    ),
                    Err(e) => unavailable(e),
                }
            }
            ([_, "result"], _) => allow("GET"),
            _ => not_found(),
        }
    }

    /// One page of the tenant's jobs (also the admin listing).
    pub async fn list(&self, tenant: &str, query: Option<&str>, request_id: &str) -> Reply {
        let (status, limit, cursor) = match list_query(query) {
            Ok(q) => q,
            Err(detail) => return problem(400, "bad_request", &detail, request_id),
        };
        match self.store.list(tenant, status, cursor, limit, self.clock.now_millis()).await {
            Ok((items, next)) => reply(
                200,
                json!({"items": items.iter().map(view).collect::<Vec<_>>(), "next_cursor": next.map(|n| n.to_string())}),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "job store call failed");
                problem(
                    503,
                    "store_unavailable",
                    "The job store cannot be reached right now. Retry in 1 s.",
                    request_id,
                )
            }
        }
    }

    /// After a cancel: a pending job gives its quota back, a running one here is aborted.
    async fn cancelled(&self, before: &JobRecord) {
        match before.status() {
            JobStatus::Pending => self.refund(&before.spec.id),
            _ => {
                if let Some((_, tx)) = lock(&self.running).remove(&before.spec.id) {
                    let _ = tx.send(Abort::Cancel);
                }
            }
        }
        self.metrics.finished.with_label_values(&[&before.spec.tier, "cancelled"]).inc();
        event(self, &before.spec, JobStatus::Cancelled, None);
        self.callback(&before.spec, JobStatus::Cancelled);
    }
}

/// A job event in the access log (unless `[log] access_log = false`).
fn event(jobs: &Jobs, spec: &JobSpec, status: JobStatus, error: Option<&str>) {
    if !jobs.runtime.load().config.log.access_log {
        return;
    }
    tracing::info!(
        target: "tollgate::access",
        job_id = %spec.id,
        request_id = %spec.request_id,
        tenant = %spec.tenant,
        tier = %spec.tier,
        key_id = spec.key_id.as_deref().unwrap_or("-"),
        rule = %spec.rule,
        method = %spec.method,
        status = status.as_str(),
        error = error.unwrap_or("-"),
        "job"
    );
}

mod worker;
