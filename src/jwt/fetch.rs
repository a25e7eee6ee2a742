//! Fetching a `jwks_url`, and keeping its key set fresh in the background.
//!
//! The request path never fetches. Each URL has one [`Remote`]: a task on the gateway's
//! background runtime fetches the key set at start, then every `jwks_refresh`, and sooner when
//! a request asks ([`Remote::refresh`]) because a token names a `kid` the set does not have
//! (the identity provider rotated its keys). Whatever asks, two fetches of one URL start at
//! least `jwks_refresh_floor` apart, so a flood of tokens with made-up `kid`s costs the identity
//! provider at most one request per floor. A failed fetch keeps the keys already held.
//!
//! Fetches use Pingora's own HTTP client, the one the gateway reaches its upstreams with:
//! HTTP/1.1, `https://` over rustls with the platform's root certificates (hostname checked),
//! chunked or sized bodies. No new client, no new TLS stack.

use crate::jwks::{KeySet, MAX_JWKS_BYTES};
use arc_swap::ArcSwapOption;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::upstreams::peer::HttpPeer;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

/// One HTTP client for every key fetch of the process, made on first use (it reads the
/// platform's root certificates).
fn connector() -> Result<&'static Connector, String> {
    static CONNECTOR: OnceLock<Option<Connector>> = OnceLock::new();
    CONNECTOR
        .get_or_init(|| std::panic::catch_unwind(|| Connector::new(None)).ok())
        .as_ref()
        .ok_or_else(|| "the HTTPS client could not be set up (root certificates)".to_string())
}

/// Fetches and parses the key set at `url` (`http://` or `https://`), within `timeout`.
pub async fn fetch(url: &str, timeout: Duration) -> Result<KeySet, String> {
    match tokio::time::timeout(timeout, get(url, timeout)).await {
        Ok(Ok(body)) => KeySet::parse(&body).map_err(|e| format!("the answer is {e}")),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

async fn get(url: &str, timeout: Duration) -> Result<Vec<u8>, String> {
    let uri = url.parse::<http::Uri>().map_err(|_| "not a URL".to_string())?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("not an http(s) URL".into()),
    };
    let host = uri.host().ok_or("the URL has no host")?;
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addr = tokio::net::lookup_host((bare, port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host} resolves to no address"))?;
    let mut peer = HttpPeer::new(addr, tls, bare.to_string());
    peer.options.connection_timeout = Some(timeout);
    peer.options.total_connection_timeout = Some(timeout);
    peer.options.read_timeout = Some(timeout);
    peer.options.write_timeout = Some(timeout);
    let (mut session, _) = connector()?.get_http_session(&peer).await.map_err(|e| format!("cannot connect: {e}"))?;
    let target = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or(host);
    let mut req = RequestHeader::build("GET", target.as_bytes(), None).map_err(|e| e.to_string())?;
    for (k, v) in [
        ("host", authority),
        ("accept", "application/jwk-set+json, application/json"),
        ("user-agent", concat!("tollgate/", env!("CARGO_PKG_VERSION"))),
        ("connection", "close"),
    ] {
        req.insert_header(k, v).map_err(|e| e.to_string())?;
    }
    session.write_request_header(Box::new(req)).await.map_err(|e| format!("cannot send the request: {e}"))?;
    session.finish_request_body().await.map_err(|e| format!("cannot send the request: {e}"))?;
    session.read_response_header().await.map_err(|e| format!("no answer: {e}"))?;
    let status = session.response_header().map(|r| r.status.as_u16()).unwrap_or(0);
    if status != 200 {
        return Err(format!("answered HTTP {status}"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = session.read_response_body().await.map_err(|e| format!("the answer broke off: {e}"))? {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            return Err(format!("the answer is larger than {} KiB", MAX_JWKS_BYTES / 1024));
        }
        body.extend_from_slice(&chunk);
    }
    session.shutdown().await;
    Ok(body)
}

/// How a [`Remote`] fetches; the first issuer naming the URL sets them, a reload updates them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    pub every: Duration,
    pub floor: Duration,
    pub timeout: Duration,
}

#[derive(Debug, Default)]
struct Progress {
    /// When the last fetch started.
    last_start: Option<Instant>,
    in_flight: bool,
    /// Failures since the last success.
    failures: u32,
    last_error: Option<String>,
}

/// The key set of one `jwks_url`, kept fresh by its own task.
pub struct Remote {
    pub url: String,
    keys: ArcSwapOption<KeySet>,
    schedule: Mutex<Schedule>,
    progress: Mutex<Progress>,
    /// Wakes the task for a fetch asked for by a request.
    wake: Notify,
    /// Counts finished fetches, successful or not: a request waiting for a fetch watches it.
    done: watch::Sender<u64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Remote {
    pub fn new(url: String, schedule: Schedule) -> Arc<Remote> {
        Arc::new(Remote {
            url,
            keys: ArcSwapOption::empty(),
            schedule: Mutex::new(schedule),
            progress: Mutex::new(Progress::default()),
            wake: Notify::new(),
            done: watch::channel(0).0,
        })
    }

    /// The keys held now; `None` until the first fetch succeeds.
    pub fn keys(&self) -> Option<Arc<KeySet>> {
        self.keys.load_full()
    }

    pub fn set_schedule(&self, s: Schedule) {
        *lock(&self.schedule) = s;
    }

    pub fn schedule(&self) -> Schedule {
        *lock(&self.schedule)
    }

    /// The last fetch's error, while fetches fail.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.progress).last_error.clone()
    }

    /// Asks for a fresh fetch and returns a receiver that changes when one finishes, or `None`
    /// when the floor does not allow a fetch now (the caller should not wait).
    pub fn refresh(&self) -> Option<watch::Receiver<u64>> {
        let floor = self.schedule().floor;
        let p = lock(&self.progress);
        let allowed = p.in_flight || p.last_start.is_none_or(|t| t.elapsed() >= floor);
        if !allowed {
            return None;
        }
        let rx = self.done.subscribe();
        drop(p);
        self.wake.notify_one();
        Some(rx)
    }

    /// The background task: fetch, then wait for the schedule or a request, never starting two
    /// fetches closer than the floor. Runs until aborted.
    pub async fn run(self: Arc<Self>) {
        loop {
            let s = self.schedule();
            let since = lock(&self.progress).last_start;
            if let Some(t) = since {
                tokio::time::sleep_until((t + s.floor).into()).await;
            }
            {
                let mut p = lock(&self.progress);
                p.in_flight = true;
                p.last_start = Some(Instant::now());
            }
            let result = fetch(&self.url, s.timeout).await;
            let next = {
                let mut p = lock(&self.progress);
                p.in_flight = false;
                match result {
                    Ok(set) => {
                        let was_failing = p.failures > 0;
                        p.failures = 0;
                        p.last_error = None;
                        if was_failing || self.keys.load().is_none() {
                            tracing::info!(url = %self.url, keys = %set.kids().join(","), "token signing keys fetched");
                        } else {
                            tracing::debug!(url = %self.url, keys = %set.kids().join(","), "token signing keys fetched");
                        }
                        for why in &set.skipped {
                            tracing::debug!(url = %self.url, "a key of the set is not used: {why}");
                        }
                        self.keys.store(Some(Arc::new(set)));
                        s.every
                    }
                    Err(e) => {
                        p.failures = p.failures.saturating_add(1);
                        tracing::warn!(url = %self.url, error = %e, failures = p.failures, "cannot fetch token signing keys; keeping the keys held");
                        p.last_error = Some(e);
                        // 1 s, 2 s, 4 s, … up to a minute (never past the schedule), at least
                        // the floor: a down identity provider is asked again soon, not hammered.
                        let backoff = Duration::from_secs(1u64 << p.failures.min(6).saturating_sub(1));
                        backoff.min(Duration::from_secs(60)).min(s.every).max(s.floor)
                    }
                }
            };
            self.done.send_modify(|n| *n += 1);
            tokio::select! {
                _ = tokio::time::sleep(next) => {}
                _ = self.wake.notified() => {}
            }
        }
    }
}

/// Aborts a task when dropped: a [`Remote`] whose URL left the config stops fetching.
pub struct TaskGuard(pub tokio::task::AbortHandle);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}
