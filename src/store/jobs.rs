//! The job store: asynchronous jobs (`mode = "async"` rules), their queue, leases and results.
//!
//! One small trait, [`JobStore`], with two implementations: SQLite for one node
//! (`jobs_embedded`) and Redis for a fleet (`redis::jobs`). The conformance suite
//! (`tests/job_store.rs`) holds both to the same answers. What every implementation guarantees:
//!
//! - **Priority order.** [`JobStore::claim`] takes the pending job with the highest priority,
//!   the oldest first among equals, skipping the tenants it is told to skip (their concurrency
//!   slots are full).
//! - **One runner.** A claimed job is `running` under one worker's lease. Only that worker can
//!   renew it, finish it or give it back; a job cancelled meanwhile answers `cancelled` to the
//!   next renewal, and its late finish is refused.
//! - **Leases expire.** [`JobStore::reap`] puts a running job whose lease ran out back in the
//!   queue once (when [`RetryLost`] allows it for the job's method), and marks it `failed`
//!   otherwise; so a crashed instance's jobs are finished by another.
//! - **Retention.** A finished job, and its result, is readable until `finished + retention`
//!   and gone after (reads check the time; `reap` deletes).
//! - **Tenancy.** Every read and cancel names the tenant: another tenant's job reads as absent.

use super::StoreError;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// A job's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
    Timeout,
}

/// Every status, in lifecycle order.
pub const STATUSES: &[JobStatus] = &[
    JobStatus::Pending,
    JobStatus::Running,
    JobStatus::Completed,
    JobStatus::Failed,
    JobStatus::Cancelled,
    JobStatus::Timeout,
];

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Timeout => "timeout",
        }
    }

    pub fn parse(s: &str) -> Option<JobStatus> {
        STATUSES.iter().copied().find(|x| x.as_str() == s)
    }

    /// `true` once the job will not change again.
    pub fn is_final(self) -> bool {
        !matches!(self, JobStatus::Pending | JobStatus::Running)
    }
}

/// What a job asks for: fixed when it is submitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub id: String,
    pub tenant: String,
    pub tier: String,
    pub rule: String,
    pub priority: i64,
    pub method: String,
    /// Origin-form target: the path and query the upstream gets.
    pub uri: String,
    pub upstream: String,
    /// The headers the gateway would forward (credentials already removed).
    pub headers: Vec<(String, String)>,
    #[serde(with = "b64")]
    pub body: Vec<u8>,
    pub callback: Option<String>,
    pub timeout_ms: i64,
    pub result_max_bytes: u64,
    pub retention_ms: i64,
    pub request_id: String,
    pub key_id: Option<String>,
    pub created_ms: i64,
    /// The rule's charge, for metering the run.
    #[serde(default)]
    pub charge: Option<JobCharge>,
    /// The rule's response header edits, applied to the result as to a forwarded answer.
    #[serde(default)]
    pub response_headers: ResponseEdits,
}

/// Headers a rule removes from and sets on its answers (`remove_response_headers`,
/// `set_response_headers`), lower-case names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseEdits {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<(String, String)>,
}

impl ResponseEdits {
    /// Applies the edits to an answer's headers: removed first, then set (replacing).
    pub fn apply(&self, headers: &mut Vec<(String, String)>) {
        headers.retain(|(k, _)| {
            !self.remove.iter().any(|r| r.eq_ignore_ascii_case(k))
                && !self.set.iter().any(|(s, _)| s.eq_ignore_ascii_case(k))
        });
        headers.extend(self.set.iter().cloned());
    }
}

/// A job's charged metric: the estimate reserved at submission, and the response header that
/// settles it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobCharge {
    pub metric: String,
    pub estimate: u64,
    pub settle_header: Option<String>,
}

impl JobSpec {
    /// GET, HEAD, OPTIONS, PUT and DELETE may be sent twice with the same effect (RFC 9110).
    pub fn idempotent(&self) -> bool {
        matches!(self.method.as_str(), "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE")
    }
}

/// What changes while a job runs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JobState {
    pub status: Option<JobStatus>,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    /// Times the job was claimed (a lost lease that is retried makes it 2).
    pub attempts: u32,
    pub progress: Option<String>,
    pub error: Option<String>,
    /// When the finished job and its result are forgotten.
    pub expires_ms: Option<i64>,
    /// Submission order in the store; also the listing cursor.
    pub seq: u64,
}

/// A job as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    pub spec: JobSpec,
    pub state: JobState,
}

impl JobRecord {
    pub fn status(&self) -> JobStatus {
        self.state.status.unwrap_or(JobStatus::Pending)
    }
}

/// The upstream's answer, as the client would have received it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResult {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    #[serde(with = "b64")]
    pub body: Vec<u8>,
    /// The body was longer than the rule's `result_max_bytes` and was cut there.
    pub truncated: bool,
}

/// How a running job whose lease expired (its instance stopped) is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryLost {
    /// Run it once more whatever its method.
    Always,
    /// Run it once more when its method is idempotent; fail it otherwise (the default).
    Idempotent,
    /// Fail it.
    Never,
}

impl RetryLost {
    pub fn parse(s: &str) -> Option<RetryLost> {
        match s {
            "always" => Some(RetryLost::Always),
            "idempotent" => Some(RetryLost::Idempotent),
            "never" => Some(RetryLost::Never),
            _ => None,
        }
    }

    pub fn allows(self, spec: &JobSpec) -> bool {
        match self {
            RetryLost::Always => true,
            RetryLost::Idempotent => spec.idempotent(),
            RetryLost::Never => false,
        }
    }
}

/// The error of a job failed by [`JobStore::reap`].
pub const LOST_ERROR: &str = "the instance running the job stopped";

/// What one [`JobStore::reap`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reaped {
    /// Ids put back in the queue.
    pub requeued: Vec<String>,
    /// Ids marked `failed`.
    pub failed: Vec<String>,
    /// Finished jobs deleted after their retention.
    pub deleted: u64,
}

/// Answer to [`JobStore::renew`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewed {
    /// Still this worker's: go on.
    Running,
    /// Cancelled by the tenant: stop.
    Cancelled,
    /// No longer this worker's (its lease expired and it was requeued or failed), or gone.
    Lost,
}

/// The most pending jobs [`JobStore::claim`] looks at for a tenant it may run.
pub const CLAIM_SCAN: usize = 256;

#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// `embedded` or `redis`.
    fn name(&self) -> &'static str;

    /// Queues a job unless its tenant already has `max_open` pending or running ones; `false`
    /// when it has.
    async fn submit(&self, spec: &JobSpec, max_open: u32) -> Result<bool, StoreError>;

    /// Takes the best pending job whose tenant is not in `skip` (see the module docs) and marks
    /// it running under `worker` until `now_ms + lease_ms`.
    async fn claim(
        &self,
        worker: &str,
        skip: &[String],
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Option<JobRecord>, StoreError>;

    /// Gives a claimed job back to the queue, as it was before the claim.
    async fn unclaim(&self, id: &str, worker: &str) -> Result<(), StoreError>;

    /// Extends the lease of a job `worker` runs, recording its progress.
    async fn renew(
        &self,
        id: &str,
        worker: &str,
        progress: Option<&str>,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Renewed, StoreError>;

    /// Ends a job `worker` runs with a final status (and the result, if any). `false` when the
    /// job is no longer its (cancelled, or lost and taken over): nothing is written then.
    async fn finish(
        &self,
        id: &str,
        worker: &str,
        status: JobStatus,
        result: Option<&JobResult>,
        error: Option<&str>,
        now_ms: i64,
    ) -> Result<bool, StoreError>;

    /// The tenant's job, unless it is another tenant's or past its retention.
    async fn get(&self, tenant: &str, id: &str, now_ms: i64) -> Result<Option<JobRecord>, StoreError>;

    /// Any job by id, whatever its tenant: for the gateway's own upkeep, never for a client.
    async fn peek(&self, id: &str) -> Result<Option<JobRecord>, StoreError>;

    /// A job's status and start time alone (no body, no result): the cheap read of the upkeep.
    async fn status(&self, id: &str) -> Result<Option<(JobStatus, Option<i64>)>, StoreError>;

    /// The result of the tenant's job, under the same conditions as [`JobStore::get`].
    async fn result(&self, tenant: &str, id: &str, now_ms: i64) -> Result<Option<JobResult>, StoreError>;

    /// The tenant's jobs, newest first, optionally of one status, starting below the cursor
    /// (a `seq`); answers the page and the next cursor.
    async fn list(
        &self,
        tenant: &str,
        status: Option<JobStatus>,
        before: Option<u64>,
        limit: usize,
        now_ms: i64,
    ) -> Result<(Vec<JobRecord>, Option<u64>), StoreError>;

    /// Cancels the tenant's pending or running job; answers the record as it was before the
    /// call (`None`: no such job of this tenant). A final job is left as it is.
    async fn cancel(&self, tenant: &str, id: &str, now_ms: i64) -> Result<Option<JobRecord>, StoreError>;

    /// Cancels every pending and running job of the tenant; answers them as they were.
    async fn cancel_all(&self, tenant: &str, now_ms: i64) -> Result<Vec<JobRecord>, StoreError>;

    /// Handles expired leases and expired retention (see the module docs).
    async fn reap(&self, now_ms: i64, retry: RetryLost) -> Result<Reaped, StoreError>;

    /// Pending jobs per tier.
    async fn depth(&self) -> Result<Vec<(String, u64)>, StoreError>;
}

/// Bodies as base64 text in JSON.
pub mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}
