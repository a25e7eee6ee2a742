//! The workers and the upkeep of one instance: claim, run, renew, finish; reap lost leases and
//! expired results; send completion callbacks.

use super::{client, event, lock, Abort, Jobs};
use crate::limits::concurrency::SlotGuard;
use crate::policy::ConcurrencySpec;
use crate::store::jobs::{JobRecord, JobResult, JobSpec, JobStatus, Renewed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};

/// The status a run cancelled before its answer is metered with (nginx's "client closed
/// request").
const CLIENT_CLOSED: u16 = 499;

/// How a run ended, before it is written.
struct Outcome {
    status: JobStatus,
    result: Option<JobResult>,
    error: Option<String>,
    /// The upstream was reached: the tenant pays.
    reached: bool,
    progress: Option<String>,
}

/// Why a run stopped before its upstream answered.
enum Stopped {
    /// Cancelled through the job API (here, or on another instance).
    Cancelled,
    /// This instance is shutting down.
    Shutdown,
    /// The lease passed to another worker.
    Lost,
}

impl Jobs {
    /// Runs `workers` worker loops and the upkeep loop until `shutdown` turns true.
    pub async fn serve(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let workers = self.config().workers;
        let mut tasks = Vec::new();
        for _ in 0..workers {
            let me = self.clone();
            let sd = shutdown.clone();
            tasks.push(tokio::spawn(async move { me.work(sd).await }));
        }
        loop {
            let cfg = self.config();
            let tick = (cfg.lease_ttl / 3).min(cfg.poll_interval).max(Duration::from_millis(50));
            self.upkeep().await;
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = shutdown.changed() => break,
            }
        }
        // Running jobs go back to the queue now (or fail, per `retry_lost`), instead of waiting
        // for their leases to expire.
        self.stopping.store(true, std::sync::atomic::Ordering::Release);
        for (_, (_, tx)) in lock(&self.running).drain() {
            let _ = tx.send(Abort::Shutdown);
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Settles or refunds the quota of jobs accepted here that ended elsewhere (another
    /// instance ran or cancelled them): every 2 s, at most 100 jobs, one status read each.
    async fn settle_remote(&self) {
        const BATCH: usize = 100;
        const EVERY_MS: i64 = 2_000;
        let now = self.clock.now_millis();
        let last = self.settled_at.load(std::sync::atomic::Ordering::Relaxed);
        if now - last < EVERY_MS {
            return;
        }
        self.settled_at.store(now, std::sync::atomic::Ordering::Relaxed);
        let ids: Vec<String> =
            lock(&self.held).keys().filter(|id| !lock(&self.running).contains_key(*id)).take(BATCH).cloned().collect();
        for id in ids {
            let Ok(found) = self.store.status(&id).await else { return };
            let Some((status, started)) = found else {
                lock(&self.held).remove(&id);
                continue;
            };
            match status {
                JobStatus::Pending | JobStatus::Running => {}
                JobStatus::Completed => {
                    // The tenant is in the record; the result read is scoped by it.
                    let tenant = self.store.peek(&id).await.ok().flatten().map(|r| r.spec.tenant);
                    let now = self.clock.now_millis();
                    let result = match tenant {
                        Some(t) => self.store.result(&t, &id, now).await.ok().flatten(),
                        None => None,
                    };
                    self.settle(&id, result.as_ref());
                }
                _ if started.is_none() => self.refund(&id),
                _ => {
                    lock(&self.held).remove(&id);
                }
            }
        }
    }

    /// `true` when the running config has an asynchronous rule. Without one the job system
    /// makes no store call at all (jobs left from an earlier config wait until one returns).
    fn enabled(&self) -> bool {
        let rt = self.runtime.load();
        let rules = &rt.config.rules;
        rules.rules.iter().chain(rules.fallback.iter()).any(|r| r.actions.job.is_some())
    }

    async fn upkeep(&self) {
        if !self.enabled() {
            return;
        }
        let cfg = self.config();
        let now = self.clock.now_millis();
        match self.store.reap(now, cfg.retry_lost).await {
            Ok(reaped) => {
                if !reaped.requeued.is_empty() {
                    tracing::warn!(jobs = ?reaped.requeued, "jobs whose instance stopped are queued again");
                    self.wake.notify_waiters();
                }
                for id in &reaped.failed {
                    if let Ok(Some(r)) = self.store.peek(id).await {
                        self.metrics.finished.with_label_values(&[&r.spec.tier, "failed"]).inc();
                        event(self, &r.spec, JobStatus::Failed, r.state.error.as_deref());
                        self.callback(&r.spec, JobStatus::Failed);
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "job upkeep failed"),
        }
        if let Ok(depth) = self.store.depth().await {
            self.metrics.depth.reset();
            for (tier, n) in depth {
                self.metrics.depth.with_label_values(&[&tier]).set(n as i64);
            }
        }
        // Slots may have freed on other instances or by synchronous requests.
        lock(&self.skip).clear();
        self.settle_remote().await;
    }

    async fn work(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            if *shutdown.borrow() {
                return;
            }
            let cfg = self.config();
            if !self.enabled() {
                // No asynchronous rule: no store traffic (a reload that adds one is seen here).
                tokio::select! {
                    _ = tokio::time::sleep(cfg.poll_interval) => continue,
                    _ = shutdown.changed() => return,
                }
            }
            let lease_ms = cfg.lease_ttl.as_millis() as i64;
            let started = {
                let _one = self.claiming.lock().await;
                let skip: Vec<String> = lock(&self.skip).iter().cloned().collect();
                match self.store.claim(&self.worker, &skip, self.clock.now_millis(), lease_ms).await {
                    Ok(Some(job)) => self.slot_for(job).await,
                    Ok(None) => None,
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot claim a job");
                        None
                    }
                }
            };
            if let Some((job, slot)) = started {
                self.clone().run(job, slot).await;
                continue;
            }
            let notified = self.wake.notified();
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(cfg.poll_interval) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Takes the tenant's concurrency slot without waiting; when the slots are full, gives the
    /// job back and skips the tenant until a slot frees. `Some` with the slot (if the tenant
    /// has a limit) when the job may run.
    async fn slot_for(&self, job: JobRecord) -> Option<(JobRecord, Option<SlotGuard>)> {
        let rt = self.runtime.load_full();
        let Some(t) = rt.directory.tenant(&job.spec.tenant) else { return Some((job, None)) };
        let Some(c) = &t.policy.concurrency else { return Some((job, None)) };
        let now_only = ConcurrencySpec { limit: c.limit, queue: None };
        match self.limits.concurrency.acquire(&t.id, &now_only, job.spec.priority, t.policy.on_store_error).await {
            Ok(g) => Some((job, Some(g))),
            Err(_) => {
                lock(&self.skip).insert(job.spec.tenant.clone());
                if let Err(e) = self.store.unclaim(&job.spec.id, &self.worker).await {
                    tracing::warn!(error = %e, job_id = %job.spec.id, "cannot give a job back; its lease will expire");
                }
                None
            }
        }
    }

    /// Runs a claimed job holding its tenant's slot, and records how it ended.
    async fn run(self: Arc<Self>, job: JobRecord, slot: Option<SlotGuard>) {
        let id = job.spec.id.clone();
        let run = self.runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.clone().run_inner(job, slot, run).await;
        // Only now, once its quota is settled or refunded here: the upkeep leaves the jobs in
        // `running` to this worker. Another run of the same job is left in place.
        let mut running = lock(&self.running);
        if running.get(&id).is_some_and(|(r, _)| *r == run) {
            running.remove(&id);
        }
    }

    async fn run_inner(self: Arc<Self>, job: JobRecord, slot: Option<SlotGuard>, run: u64) {
        let spec = &job.spec;
        let started = self.clock.now_millis();
        self.metrics.wait.with_label_values(&[&spec.tier]).observe((started - spec.created_ms).max(0) as f64 / 1000.0);
        event(&self, spec, JobStatus::Running, None);
        let (abort_tx, abort_rx) = oneshot::channel();
        lock(&self.running).insert(spec.id.clone(), (run, abort_tx));
        // A shutdown that began between the claim and the line above drained `running` without
        // this job: it goes back to the queue now rather than run past the process's end and
        // wait out its lease. (`stopping` is set before the drain, so one of the two always
        // sees the job.) Nothing was forwarded, so it goes back whatever `retry_lost` says.
        if self.stopping.load(std::sync::atomic::Ordering::Acquire) {
            drop(slot);
            if let Err(e) = self.store.unclaim(&spec.id, &self.worker).await {
                tracing::warn!(error = %e, job_id = %spec.id, "cannot hand a job back at shutdown; its lease will expire");
            }
            return;
        }
        let clock = Instant::now();
        let outcome = self.execute(spec, abort_rx).await;
        drop(slot);
        self.metrics.run.with_label_values(&[&spec.tier]).observe(clock.elapsed().as_secs_f64());
        let outcome = match outcome {
            Ok(o) => o,
            Err(Stopped::Shutdown) => {
                self.hand_back(spec).await;
                // A cancel that came as it stopped made the store refuse the hand-back.
                if self.cancelled_here(spec).await {
                    self.meter_cancelled(spec, clock.elapsed().as_secs_f64());
                }
                return;
            }
            Err(why) => {
                // The cancel was recorded and announced by whoever cancelled it; a lost lease
                // is metered by the worker that runs the job again.
                if matches!(why, Stopped::Cancelled) {
                    self.meter_cancelled(spec, clock.elapsed().as_secs_f64());
                }
                lock(&self.skip).remove(&spec.tenant);
                self.wake.notify_waiters();
                return;
            }
        };
        let now = self.clock.now_millis();
        if let Some(p) = outcome.progress.as_deref() {
            // A progress header on an answer that ended at once was not renewed in yet.
            let _ = self
                .store
                .renew(&spec.id, &self.worker, Some(p), now, self.config().lease_ttl.as_millis() as i64)
                .await;
        }
        let written = self
            .store
            .finish(&spec.id, &self.worker, outcome.status, outcome.result.as_ref(), outcome.error.as_deref(), now)
            .await;
        match written {
            Ok(true) => {
                self.meter_run(spec, &outcome, clock.elapsed().as_secs_f64(), now);
                if outcome.reached {
                    self.settle(&spec.id, outcome.result.as_ref());
                } else {
                    self.refund(&spec.id);
                }
                self.metrics.finished.with_label_values(&[&spec.tier, outcome.status.as_str()]).inc();
                event(&self, spec, outcome.status, outcome.error.as_deref());
                self.callback(spec, outcome.status);
            }
            // Cancelled while the answer was on its way: metered if the upstream had it, its
            // reservation back if not. (Lost to another worker: that run settles it.)
            Ok(false) => {
                if self.cancelled_here(spec).await {
                    if outcome.reached {
                        self.meter_cancelled(spec, clock.elapsed().as_secs_f64());
                    } else {
                        self.refund(&spec.id);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, job_id = %spec.id, "cannot record a job's end; its lease will expire"),
        }
        lock(&self.skip).remove(&spec.tenant);
        self.wake.notify_waiters();
    }

    /// After the store refused a run's end: whether the job was cancelled while this worker
    /// ran it (the store says `cancelled` only to that worker; any other hears `lost`).
    async fn cancelled_here(&self, spec: &JobSpec) -> bool {
        let lease_ms = self.config().lease_ttl.as_millis() as i64;
        let now = self.clock.now_millis();
        matches!(self.store.renew(&spec.id, &self.worker, None, now, lease_ms).await, Ok(Renewed::Cancelled))
    }

    /// Meters a run that was cancelled once the upstream had it, like a forwarded request whose
    /// client went away: the charge at its estimate, status 499. Its quota reservation stays,
    /// so the ledger and the quota agree.
    fn meter_cancelled(&self, spec: &JobSpec, secs: f64) {
        let cancelled =
            Outcome { status: JobStatus::Cancelled, result: None, error: None, reached: true, progress: None };
        self.meter_run(spec, &cancelled, secs, self.clock.now_millis());
    }

    /// Meters a run that ended here like a forwarded request: the ledger counts one request
    /// (and the charge, settled from the result or else the estimate) per job that reached
    /// its upstream. The submission itself (a 202 the gateway answered) is not usage.
    fn meter_run(&self, spec: &JobSpec, outcome: &Outcome, secs: f64, now_ms: i64) {
        let rt = self.runtime.load_full();
        let tenant = rt.directory.tenant(&spec.tenant).cloned();
        let result = outcome.result.as_ref();
        let status = result.map_or(
            match outcome.status {
                JobStatus::Timeout => 504,
                JobStatus::Cancelled => CLIENT_CLOSED,
                _ => 502,
            },
            |r| r.status,
        );
        let charges: Vec<crate::metering::ChargeInfo> = spec
            .charge
            .iter()
            .map(|c| {
                let settled = c.settle_header.as_deref().and_then(|h| {
                    result?
                        .headers
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case(h))
                        .and_then(|(_, v)| v.trim().parse().ok())
                });
                crate::metering::ChargeInfo::new(Arc::from(c.metric.as_str()), c.estimate, settled)
            })
            .collect();
        let (decision, failure) = match outcome.status {
            JobStatus::Completed | JobStatus::Cancelled => ("forwarded", None),
            JobStatus::Timeout => ("upstream_error", Some("timeout")),
            _ if outcome.reached => ("upstream_error", Some("error")),
            _ => ("upstream_error", Some("connect_error")),
        };
        self.meter.record_with(
            &crate::metering::Record {
                tenant: tenant.as_deref(),
                rule: &spec.rule,
                decision,
                reason: None,
                status,
                bytes_in: spec.body.len() as u64,
                bytes_out: result.map_or(0, |r| r.body.len() as u64),
                upstream: Some(&spec.upstream),
                upstream_secs: Some(secs),
                total_secs: secs,
                charges: &charges,
                model: None,
                admitted: outcome.reached,
            },
            &crate::metering::Detail { upstream_failure: failure, first_byte_secs: None },
            now_ms,
        );
    }

    /// At shutdown: the job runs again elsewhere when `retry_lost` allows, else it fails.
    async fn hand_back(&self, spec: &JobSpec) {
        let cfg = self.config();
        let written = if cfg.retry_lost.allows(spec) {
            self.store.unclaim(&spec.id, &self.worker).await.map(|()| true)
        } else {
            let now = self.clock.now_millis();
            let lost = crate::store::jobs::LOST_ERROR;
            let done = self.store.finish(&spec.id, &self.worker, JobStatus::Failed, None, Some(lost), now).await;
            if matches!(done, Ok(true)) {
                self.metrics.finished.with_label_values(&[&spec.tier, "failed"]).inc();
                event(self, spec, JobStatus::Failed, Some(lost));
            }
            done
        };
        if let Err(e) = written {
            tracing::warn!(error = %e, job_id = %spec.id, "cannot hand a job back at shutdown; its lease will expire");
        }
    }

    /// Forwards the job, renewing its lease meanwhile, until it ends or is stopped.
    async fn execute(&self, spec: &JobSpec, mut abort: oneshot::Receiver<Abort>) -> Result<Outcome, Stopped> {
        let cfg = self.config();
        let lease_ms = cfg.lease_ttl.as_millis() as i64;
        let progress: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
        let seen = Arc::new(tokio::sync::Notify::new());
        let forward = self.forward(spec, progress.clone(), seen.clone());
        tokio::pin!(forward);
        let timeout = tokio::time::sleep(Duration::from_millis(spec.timeout_ms.max(1) as u64));
        tokio::pin!(timeout);
        let renew_every = (cfg.lease_ttl / 3).max(Duration::from_millis(50));
        loop {
            tokio::select! {
                out = &mut forward => return Ok(Outcome { progress: lock(&progress).clone(), ..out }),
                _ = &mut timeout => {
                    return Ok(Outcome {
                        status: JobStatus::Timeout,
                        result: None,
                        error: Some(format!("the job ran longer than its job_timeout ({} ms)", spec.timeout_ms)),
                        reached: true,
                        progress: lock(&progress).clone(),
                    });
                }
                why = &mut abort => {
                    return Err(match why {
                        Ok(Abort::Cancel) => Stopped::Cancelled,
                        Ok(Abort::Shutdown) => Stopped::Shutdown,
                        // Never sent: its lease will expire, and the job run again.
                        Err(_) => Stopped::Lost,
                    })
                }
                _ = tokio::time::sleep(renew_every) => {}
                _ = seen.notified() => {}
            }
            let p = lock(&progress).clone();
            match self.store.renew(&spec.id, &self.worker, p.as_deref(), self.clock.now_millis(), lease_ms).await {
                Ok(Renewed::Running) => {}
                Ok(Renewed::Cancelled) => return Err(Stopped::Cancelled),
                Ok(Renewed::Lost) => return Err(Stopped::Lost),
                Err(e) => tracing::debug!(error = %e, job_id = %spec.id, "cannot renew a job's lease"),
            }
        }
    }

    async fn forward(
        &self,
        spec: &JobSpec,
        progress: Arc<std::sync::Mutex<Option<String>>>,
        seen: Arc<tokio::sync::Notify>,
    ) -> Outcome {
        let failed = |error: String, reached: bool| Outcome {
            status: JobStatus::Failed,
            result: None,
            error: Some(error),
            reached,
            progress: None,
        };
        let Some(pool) = self.upstreams.get(&spec.upstream) else {
            return failed(format!("the upstream `{}` is no longer configured", spec.upstream), false);
        };
        let Some(addr) = pool.lb.select(b"", 256).and_then(|b| b.addr.as_inet().copied()) else {
            return failed(format!("no server of the upstream `{}` is healthy", spec.upstream), false);
        };
        let extra = [("x-tollgate-job-id", spec.id.as_str())];
        let req = client::request_bytes(&spec.method, &spec.uri, &spec.headers, &extra, &spec.body);
        let head = spec.method == "HEAD";
        let on_head = |h: &[(String, String)]| {
            if let Some((_, v)) = h.iter().find(|(k, _)| k == "x-job-progress") {
                *lock(&progress) = Some(v.chars().take(64).collect());
                seen.notify_one();
            }
        };
        match client::exchange(addr, pool.config.connect_timeout, &req, head, spec.result_max_bytes, on_head).await {
            Ok(a) => {
                let headers: Vec<(String, String)> =
                    a.headers.into_iter().filter(|(k, _)| !client::HOP_BY_HOP.contains(&k.as_str())).collect();
                Outcome {
                    status: JobStatus::Completed,
                    result: Some(JobResult { status: a.status, headers, body: a.body, truncated: a.truncated }),
                    error: None,
                    reached: true,
                    progress: None,
                }
            }
            Err(e) => failed(
                format!("the upstream `{}` failed: {e}", spec.upstream),
                e.kind() != std::io::ErrorKind::ConnectionRefused && e.kind() != std::io::ErrorKind::TimedOut,
            ),
        }
    }

    /// Sends the completion callback of a job that asked for one, off this task, with retries.
    pub(super) fn callback(&self, spec: &JobSpec, status: JobStatus) {
        let Some(url) = spec.callback.clone() else { return };
        let cfg = self.config();
        let Some(secret) = cfg.callback_secret.clone() else { return };
        let body = serde_json::json!({
            "id": spec.id,
            "tenant": spec.tenant,
            "status": status.as_str(),
            "links": {"self": format!("/_tollgate/jobs/{}", spec.id), "result": format!("/_tollgate/jobs/{}/result", spec.id)},
        });
        let body = serde_json::to_vec(&body).unwrap_or_default();
        let id = spec.id.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            for attempt in 1..=cfg.callback_max_attempts {
                let ts = chrono::Utc::now().timestamp();
                let sig = crate::metering::webhook::sign(&secret, ts, &body);
                let ts = ts.to_string();
                let headers = [
                    ("x-tollgate-timestamp", ts.as_str()),
                    ("x-tollgate-signature", sig.as_str()),
                    ("x-tollgate-job-id", id.as_str()),
                ];
                match client::post(&url, &body, &headers, cfg.callback_timeout).await {
                    Ok(s) if (200..300).contains(&s) => return,
                    Ok(s) => tracing::warn!(status = s, attempt, job_id = %id, "job callback refused"),
                    Err(e) => tracing::warn!(error = %e, attempt, job_id = %id, "job callback failed"),
                }
                if attempt < cfg.callback_max_attempts {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
            tracing::error!(job_id = %id, "job callback gave up after {} attempts", cfg.callback_max_attempts);
        });
    }
}
