//! Job store conformance: one behavioural suite that every [`JobStore`] must pass, run against
//! SQLite ([`EmbeddedJobs`]) and a real `redis-server` ([`RedisStore`]). Time is injected: every
//! call takes `now_ms` from a [`ManualClock`] the test moves, so leases and retention are tested
//! without sleeping.
//!
//! Whatever the backend: claims follow priority then age and skip the tenants named; a claim
//! given back is claimed again as it was; only the claiming worker renews or finishes a job; a
//! cancelled running job answers `Cancelled` to its worker and refuses its late finish; an
//! expired lease is requeued once (per [`RetryLost`]) or failed; a finished job and its result
//! are readable until `finished + retention` and gone after; another tenant's job reads as
//! absent; `max_open` bounds a tenant's open jobs; listings page newest first.

mod common;
use common::{temp_dir, Redis};
use std::sync::Arc;
use std::time::Duration;
use tollgate::clock::{Clock, ManualClock, SystemClock};
use tollgate::store::embedded::Embedded;
use tollgate::store::jobs::{
    JobCharge, JobResult, JobSpec, JobStatus, JobStore, Renewed, ResponseEdits, RetryLost, LOST_ERROR,
};
use tollgate::store::jobs_embedded::EmbeddedJobs;
use tollgate::store::redis::RedisStore;
use tollgate::store::{Breaker, NoObserver};

const START: i64 = 1_900_000_000_000;
const LEASE: i64 = 1_000;
const RETENTION: i64 = 60_000;

struct Backend {
    store: Arc<dyn JobStore>,
    _redis: Option<Redis>,
}

fn embedded() -> Backend {
    let dir = temp_dir("job-store");
    let db = Embedded::open(&dir.join("tollgate.db"), SystemClock.now_millis()).expect("open");
    let jobs = EmbeddedJobs::open(db.connection()).expect("jobs table");
    Backend { store: Arc::new(jobs), _redis: None }
}

fn redis() -> Backend {
    let redis = Redis::start();
    let timeout = Duration::from_secs(2);
    let breaker = Breaker::new(timeout, 5, Duration::from_secs(1), Arc::new(SystemClock));
    let store = RedisStore::connect(&[redis.url()], breaker, Arc::new(NoObserver), timeout).expect("redis store");
    Backend { store: Arc::new(store), _redis: Some(redis) }
}

macro_rules! conformance {
    ($suite:ident: $embedded:ident, $redis:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $embedded() {
            let b = embedded();
            $suite(b.store.clone(), ManualClock::new(START)).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $redis() {
            let b = redis();
            $suite(b.store.clone(), ManualClock::new(START)).await;
        }
    };
}

fn spec(id: &str, tenant: &str, priority: i64, method: &str, now: i64) -> JobSpec {
    JobSpec {
        id: id.into(),
        tenant: tenant.into(),
        tier: if tenant == "acme" { "pro".into() } else { "free".into() },
        rule: "generate".into(),
        priority,
        method: method.into(),
        uri: "/gen?rows=10".into(),
        upstream: "default".into(),
        headers: vec![("x-tenant-id".into(), tenant.into())],
        body: b"{\"rows\":10}".to_vec(),
        callback: None,
        timeout_ms: 10_000,
        result_max_bytes: 1024,
        retention_ms: RETENTION,
        request_id: format!("req-{id}"),
        key_id: Some("k1".into()),
        created_ms: now,
        charge: Some(JobCharge { metric: "rows".into(), estimate: 10, settle_header: Some("x-rows".into()) }),
        response_headers: ResponseEdits { remove: vec!["server".into()], set: vec![("x-served".into(), "1".into())] },
    }
}

async fn put(s: &Arc<dyn JobStore>, id: &str, tenant: &str, priority: i64, method: &str, now: i64) {
    assert!(s.submit(&spec(id, tenant, priority, method, now), 100).await.expect("submit"), "{id} refused");
}

async fn claimed(s: &Arc<dyn JobStore>, skip: &[&str], now: i64) -> Option<String> {
    let skip: Vec<String> = skip.iter().map(|t| t.to_string()).collect();
    s.claim("w1", &skip, now, LEASE).await.expect("claim").map(|r| r.spec.id)
}

async fn priority_then_age_skipping_full_tenants(s: Arc<dyn JobStore>, clock: Arc<ManualClock>) {
    let now = clock.now_millis();
    put(&s, "a", "acme", 0, "POST", now).await;
    put(&s, "b", "acme", 0, "POST", now).await;
    put(&s, "c", "globex", 5, "POST", now).await;
    put(&s, "d", "acme", 5, "POST", now).await;
    let depth = s.depth().await.expect("depth");
    assert_eq!(depth, vec![("free".to_string(), 1), ("pro".to_string(), 3)]);
    assert_eq!(claimed(&s, &[], now).await.as_deref(), Some("c"), "priority first, then the oldest");
    assert_eq!(claimed(&s, &["acme"], now).await, None, "a skipped tenant's jobs stay queued");
    assert_eq!(claimed(&s, &[], now).await.as_deref(), Some("d"));
    // Given back, a job is claimed again first, as it was.
    s.unclaim("d", "w1").await.expect("unclaim");
    let r = s.claim("w1", &[], now, LEASE).await.expect("claim").expect("d again");
    assert_eq!((r.spec.id.as_str(), r.state.attempts, r.status()), ("d", 1, JobStatus::Running));
    assert_eq!(r.spec, spec("d", "acme", 5, "POST", now), "the spec comes back as submitted");
    assert_eq!(claimed(&s, &[], now).await.as_deref(), Some("a"));
    assert_eq!(claimed(&s, &[], now).await.as_deref(), Some("b"));
    assert_eq!(claimed(&s, &[], now).await, None);
    assert_eq!(s.depth().await.expect("depth").iter().map(|(_, n)| n).sum::<u64>(), 0);
}
conformance!(priority_then_age_skipping_full_tenants: embedded_priority, redis_priority);

async fn one_runner_and_cancel(s: Arc<dyn JobStore>, clock: Arc<ManualClock>) {
    let now = clock.now_millis();
    put(&s, "j1", "acme", 0, "POST", now).await;
    s.claim("w1", &[], now, LEASE).await.expect("claim").expect("j1");
    assert_eq!(s.renew("j1", "w1", Some("40"), now + 100, LEASE).await.expect("renew"), Renewed::Running);
    assert_eq!(s.renew("j1", "w2", None, now + 100, LEASE).await.expect("renew"), Renewed::Lost, "not w2's job");
    assert_eq!(s.get("acme", "j1", now).await.expect("get").and_then(|r| r.state.progress), Some("40".into()));
    // Another tenant can neither see nor cancel it.
    assert_eq!(s.get("globex", "j1", now).await.expect("get"), None);
    assert_eq!(s.cancel("globex", "j1", now).await.expect("cancel"), None);
    let before = s.cancel("acme", "j1", now + 200).await.expect("cancel").expect("found");
    assert_eq!(before.status(), JobStatus::Running);
    assert_eq!(s.renew("j1", "w1", None, now + 300, LEASE).await.expect("renew"), Renewed::Cancelled);
    let late = JobResult { status: 200, headers: vec![], body: b"late".to_vec(), truncated: false };
    assert!(!s.finish("j1", "w1", JobStatus::Completed, Some(&late), None, now + 400).await.expect("finish"));
    let r = s.get("acme", "j1", now + 500).await.expect("get").expect("j1");
    assert_eq!((r.status(), r.state.finished_ms), (JobStatus::Cancelled, Some(now + 200)));
    assert_eq!(s.result("acme", "j1", now + 500).await.expect("result"), None);
    // Cancelling a final job changes nothing.
    let again = s.cancel("acme", "j1", now + 600).await.expect("cancel").expect("found");
    assert_eq!(again.status(), JobStatus::Cancelled);

    // Cancel all: pending and running ones, this tenant's only.
    put(&s, "p1", "acme", 0, "POST", now).await;
    put(&s, "p2", "acme", 0, "POST", now).await;
    put(&s, "g1", "globex", 0, "POST", now).await;
    assert_eq!(claimed(&s, &["globex"], now).await.as_deref(), Some("p1"));
    let mut all: Vec<(String, JobStatus)> = s
        .cancel_all("acme", now)
        .await
        .expect("cancel all")
        .into_iter()
        .map(|r| (r.spec.id.clone(), r.status()))
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(all, vec![("p1".into(), JobStatus::Running), ("p2".into(), JobStatus::Pending)]);
    assert_eq!(s.get("globex", "g1", now).await.expect("get").map(|r| r.status()), Some(JobStatus::Pending));
    assert_eq!(claimed(&s, &[], now).await.as_deref(), Some("g1"), "cancelled jobs left the queue");
}
conformance!(one_runner_and_cancel: embedded_cancel, redis_cancel);

async fn results_expire_after_retention(s: Arc<dyn JobStore>, clock: Arc<ManualClock>) {
    let now = clock.now_millis();
    put(&s, "r1", "acme", 0, "POST", now).await;
    s.claim("w1", &[], now, LEASE).await.expect("claim").expect("r1");
    let result = JobResult {
        status: 201,
        headers: vec![("content-type".into(), "application/json".into())],
        body: (0..=255u8).collect(),
        truncated: true,
    };
    clock.advance_millis(500);
    let end = clock.now_millis();
    assert!(s.finish("r1", "w1", JobStatus::Completed, Some(&result), None, end).await.expect("finish"));
    assert_eq!(s.result("acme", "r1", end).await.expect("result"), Some(result.clone()), "bytes come back exactly");
    assert_eq!(s.result("globex", "r1", end).await.expect("result"), None);
    let r = s.get("acme", "r1", end).await.expect("get").expect("r1");
    assert_eq!((r.status(), r.state.started_ms, r.state.finished_ms), (JobStatus::Completed, Some(now), Some(end)));
    clock.advance_millis(RETENTION - 1);
    assert!(s.get("acme", "r1", clock.now_millis()).await.expect("get").is_some(), "kept for the whole retention");
    assert_eq!(s.reap(clock.now_millis(), RetryLost::Never).await.expect("reap").deleted, 0);
    clock.advance_millis(1);
    let t = clock.now_millis();
    assert_eq!(s.get("acme", "r1", t).await.expect("get"), None, "gone at finished + retention");
    assert_eq!(s.result("acme", "r1", t).await.expect("result"), None);
    assert_eq!(s.reap(t, RetryLost::Never).await.expect("reap").deleted, 1);
    assert_eq!(s.peek("r1").await.expect("peek"), None);
    assert!(s.list("acme", None, None, 10, t).await.expect("list").0.is_empty());
}
conformance!(results_expire_after_retention: embedded_retention, redis_retention);

async fn expired_leases_are_retried_once_or_failed(s: Arc<dyn JobStore>, clock: Arc<ManualClock>) {
    let now = clock.now_millis();
    put(&s, "post", "acme", 0, "POST", now).await;
    put(&s, "get", "acme", 0, "GET", now).await;
    claimed(&s, &[], now).await.expect("post");
    claimed(&s, &[], now).await.expect("get");
    clock.advance_millis(LEASE - 1);
    let reaped = s.reap(clock.now_millis(), RetryLost::Idempotent).await.expect("reap");
    assert!(reaped.requeued.is_empty() && reaped.failed.is_empty(), "the leases have not expired yet");
    clock.advance_millis(1);
    let reaped = s.reap(clock.now_millis(), RetryLost::Idempotent).await.expect("reap");
    assert_eq!((reaped.requeued, reaped.failed), (vec!["get".to_string()], vec!["post".to_string()]));
    let post = s.get("acme", "post", clock.now_millis()).await.expect("get").expect("post");
    assert_eq!((post.status(), post.state.error.as_deref()), (JobStatus::Failed, Some(LOST_ERROR)));
    // The requeued one runs again (a second attempt), and is not retried a third time.
    let again = s.claim("w2", &[], clock.now_millis(), LEASE).await.expect("claim").expect("get again");
    assert_eq!((again.spec.id.as_str(), again.state.attempts), ("get", 2));
    assert_eq!(s.renew("get", "w1", None, clock.now_millis(), LEASE).await.expect("renew"), Renewed::Lost);
    assert!(!s.finish("get", "w1", JobStatus::Completed, None, None, clock.now_millis()).await.expect("finish"));
    clock.advance_millis(LEASE);
    let reaped = s.reap(clock.now_millis(), RetryLost::Always).await.expect("reap");
    assert_eq!(reaped.failed, vec!["get".to_string()]);
    // `always` retries a POST too.
    put(&s, "post2", "acme", 0, "POST", clock.now_millis()).await;
    claimed(&s, &[], clock.now_millis()).await.expect("post2");
    clock.advance_millis(LEASE);
    assert_eq!(s.reap(clock.now_millis(), RetryLost::Always).await.expect("reap").requeued, vec!["post2".to_string()]);
    // `never` fails even a GET.
    put(&s, "get2", "acme", 0, "GET", clock.now_millis()).await;
    claimed(&s, &["nobody"], clock.now_millis()).await.expect("post2 or get2");
    claimed(&s, &[], clock.now_millis()).await.expect("the other");
    clock.advance_millis(LEASE);
    let mut failed = s.reap(clock.now_millis(), RetryLost::Never).await.expect("reap").failed;
    failed.sort();
    assert_eq!(failed, vec!["get2".to_string(), "post2".to_string()]);
    // A job w1 lost and w3 runs again, then cancelled: only w3, which runs it, is told
    // `cancelled` (and meters the cancelled run); w1 is told `lost`.
    put(&s, "gone", "acme", 0, "GET", clock.now_millis()).await;
    assert_eq!(claimed(&s, &[], clock.now_millis()).await.as_deref(), Some("gone"));
    clock.advance_millis(LEASE);
    assert_eq!(
        s.reap(clock.now_millis(), RetryLost::Idempotent).await.expect("reap").requeued,
        vec!["gone".to_string()]
    );
    s.claim("w3", &[], clock.now_millis(), LEASE).await.expect("claim").expect("gone again");
    s.cancel("acme", "gone", clock.now_millis()).await.expect("cancel").expect("found");
    assert_eq!(s.renew("gone", "w1", None, clock.now_millis(), LEASE).await.expect("renew"), Renewed::Lost);
    assert_eq!(s.renew("gone", "w3", None, clock.now_millis(), LEASE).await.expect("renew"), Renewed::Cancelled);
}
conformance!(expired_leases_are_retried_once_or_failed: embedded_leases, redis_leases);

async fn open_jobs_are_bounded_and_listed_newest_first(s: Arc<dyn JobStore>, clock: Arc<ManualClock>) {
    let now = clock.now_millis();
    for i in 0..3 {
        assert!(s.submit(&spec(&format!("o{i}"), "acme", 0, "POST", now), 3).await.expect("submit"));
    }
    assert!(!s.submit(&spec("o3", "acme", 0, "POST", now), 3).await.expect("submit"), "the fourth open job is refused");
    assert!(s.submit(&spec("g0", "globex", 0, "POST", now), 3).await.expect("submit"), "per tenant");
    s.cancel("acme", "o0", now).await.expect("cancel");
    assert!(s.submit(&spec("o3", "acme", 0, "POST", now), 3).await.expect("submit"), "a cancelled job is not open");
    let (page, next) = s.list("acme", None, None, 2, now).await.expect("list");
    assert_eq!(page.iter().map(|r| r.spec.id.as_str()).collect::<Vec<_>>(), vec!["o3", "o2"]);
    let (page, next) = s.list("acme", None, next, 2, now).await.expect("list");
    assert_eq!(page.iter().map(|r| r.spec.id.as_str()).collect::<Vec<_>>(), vec!["o1", "o0"]);
    assert_eq!(next, None);
    let (page, _) = s.list("acme", Some(JobStatus::Cancelled), None, 10, now).await.expect("list");
    assert_eq!(page.iter().map(|r| r.spec.id.as_str()).collect::<Vec<_>>(), vec!["o0"]);
    let (page, _) = s.list("globex", Some(JobStatus::Pending), None, 10, now).await.expect("list");
    assert_eq!(page.iter().map(|r| r.spec.id.as_str()).collect::<Vec<_>>(), vec!["g0"]);
}
conformance!(open_jobs_are_bounded_and_listed_newest_first: embedded_open, redis_open);
