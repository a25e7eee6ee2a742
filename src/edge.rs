//! The connection edge: what happens to a TCP connection before and between HTTP requests.
//!
//! Pingora reads request heads with a per-read timeout and, once a client has asked for
//! keep-alive, waits for the next request forever, so a client sending one header byte at a
//! time, or thousands of idle sockets, can hold the process's file descriptors. [`Edge`] wraps an
//! HTTP application (the proxy or the admin API) and guarantees, per listener:
//!
//! - **A whole-head deadline.** A connection that has not delivered a complete request head
//!   `header_timeout` after it was accepted is closed. On a reused keep-alive connection the
//!   bound is `idle_timeout + header_timeout` from the end of the previous response.
//! - **An idle deadline.** A keep-alive connection with no byte of a new request for
//!   `idle_timeout` is closed quietly (a debug line, never an error).
//! - **Connection caps.** At most `max_connections` connections at once, and at most
//!   `max_connections_per_ip` from one client address or IPv6 /64 (trusted proxies are exempt from the
//!   per-address cap). A connection over a cap is closed at accept, counted in
//!   `tollgate_connections_refused_total{listener,reason}`, and logged at most once a second
//!   per listener. The data plane's default total cap leaves half the file-descriptor limit for
//!   upstream connections and the admin listener, which has caps of its own, so a flood on the
//!   data plane cannot starve the admin API.
//! - **Pipelining kept.** Requests pipelined behind another are answered in order, not dropped.
//! - **HTTP/2 told apart cheaply.** With h2c on, a plaintext connection is read for at most the
//!   24 bytes of the HTTP/2 preface, stopping at the first byte that differs, and the bytes are
//!   put back; a preface goes to Pingora's HTTP/2 server, anything else to the HTTP/1 loop below.
//!   ALPN `h2` on the TLS listener does the same without reading.
//! - **Parser refusals in the gateway's shape.** On the data plane, each HTTP/1 connection's
//!   stream is wrapped by [`crate::guard::Guarded`], armed while a head is awaited.
//!
//! The head deadline learns that a head was read through the connection's user context: the
//! edge stores a [`HeadMarker`] in it before each request, and the application hands it back to
//! [`mark_head_read`] as soon as the head is parsed (`ProxyHttp::on_connection_reuse` in the
//! gateway, the first line of the admin app's handler).
//!
//! What this costs a request: the application runs inside the edge's own task, so the marker
//! needs no shared state: [`mark_head_read`] sets a thread-local flag that the edge reads right
//! after each poll of the application, and the marker is zero-sized, so boxing it allocates
//! nothing. The deadline is one timer per connection, not per request: each request only notes
//! its own deadline, and the timer (armed for an earlier request's deadline) is moved forward
//! when it fires while a head is still awaited. A busy keep-alive connection therefore touches
//! the runtime's timer wheel about once per `header_timeout`, not once per request.

use async_trait::async_trait;
use ipnet::IpNet;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::server::ShutdownWatch;
use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// The edge puts this in a session's connection user context before each request; the
/// application passes it to [`mark_head_read`] once the head is read.
#[derive(Debug, Clone, Copy, Default)]
pub struct HeadMarker;

thread_local! {
    /// Set by [`mark_head_read`] during a poll of the application; read and cleared by the edge
    /// around each poll (see the module docs).
    static HEAD_READ: Cell<bool> = const { Cell::new(false) };
}

/// Marks the head of the request whose session carried `ctx` as read. Called by applications
/// with whatever user context their session held.
pub fn mark_head_read(ctx: Option<Box<dyn std::any::Any + Send + Sync>>) {
    if ctx.is_some_and(|c| c.is::<HeadMarker>()) {
        HEAD_READ.set(true);
    }
}

/// Runs `app` to its end, or until `by` passes before it reads a request head (`None`).
/// `timer` is the connection's one timer; it may be armed for an earlier request's deadline and
/// is moved to `by` only when it fires while no head has been read.
/// `watch`, when the connection is guarded, is disarmed after the poll that read the head.
async fn head_within<F: Future>(
    app: F,
    mut timer: Pin<&mut Sleep>,
    by: Instant,
    watch: Option<&crate::guard::Watch>,
) -> Option<F::Output> {
    let mut app = std::pin::pin!(app);
    let mut head_read = false;
    std::future::poll_fn(|cx| {
        let outer = HEAD_READ.replace(false);
        let polled = app.as_mut().poll(cx);
        let read_now = HEAD_READ.replace(outer);
        if read_now && !head_read {
            if let Some(w) = watch {
                w.disarm();
            }
        }
        head_read |= read_now;
        if let Poll::Ready(out) = polled {
            return Poll::Ready(Some(out));
        }
        if head_read {
            return Poll::Pending;
        }
        while timer.as_mut().poll(cx).is_ready() {
            if timer.deadline() >= by {
                return Poll::Ready(None);
            }
            timer.as_mut().reset(by);
        }
        Poll::Pending
    })
    .await
}

/// Deadlines and caps of one listener.
#[derive(Debug, Clone)]
pub struct EdgeLimits {
    /// `listener` label of the metrics and logs (`proxy`, `admin`).
    pub listener: &'static str,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Addresses exempt from the per-address cap (load balancers, trusted proxies).
    pub exempt: Vec<IpNet>,
}

/// Counts of open connections, total and per client address.
#[derive(Debug, Default)]
struct Open {
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Holds one connection's place under the caps; frees it when dropped.
struct Place<'a> {
    open: &'a Open,
    ip: Option<IpAddr>,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.open.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = self.ip {
            let mut map = self.open.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = map.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&ip);
                }
            }
        }
    }
}

/// An HTTP application behind deadlines and connection caps.
pub struct Edge<A> {
    app: Arc<A>,
    limits: EdgeLimits,
    open: Open,
    refused: prometheus::IntCounterVec,
    timed_out: prometheus::IntCounterVec,
    /// Unix seconds of the last "refused" log line, so a flood logs once a second.
    last_log: AtomicI64,
    /// The TLS listener's address and acceptor. Its handshake runs here, after a place under the
    /// caps is taken and within the head deadline, rather than in Pingora's accept loop, where it
    /// would hold a file descriptor for up to a minute outside every cap.
    tls: Option<(std::net::SocketAddr, pingora::listeners::tls::Acceptor)>,
    /// Plaintext connections that open with the HTTP/2 preface speak h2c.
    h2c: bool,
    /// Answers the HTTP/1 parser's own refusals in the gateway's shape (see [`crate::guard`]).
    refusals: Option<Arc<crate::guard::Refusals>>,
}

/// The client connection preface of HTTP/2 (RFC 9113, section 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads just enough of a plaintext connection to tell an HTTP/2 preface from an HTTP/1 request
/// line, and puts what it read back. Stops at the first byte that differs from the preface, so
/// a short HTTP/1 request (`GET / HTTP/1.0` and a blank line is 18 bytes) is never waited on
/// for bytes it will not send. `None`: closed, or no byte by `by`.
async fn opens_with_h2_preface(stream: &mut pingora::protocols::l4::stream::Stream, by: Instant) -> Option<bool> {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut n = 0;
    let h2 = loop {
        match tokio::time::timeout_at(by, stream.read(&mut buf[n..])).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => {
                stream.rewind(&buf[..n]);
                return if n == 0 { None } else { Some(false) };
            }
            Ok(Ok(k)) => n += k,
        }
        if buf[..n] != H2_PREFACE[..n] {
            break false;
        }
        if n == H2_PREFACE.len() {
            break true;
        }
    };
    stream.rewind(&buf[..n]);
    Some(h2)
}

impl<A> Edge<A> {
    pub fn new(app: A, limits: EdgeLimits, metrics: &crate::metrics::Metrics) -> Edge<A> {
        Edge {
            app: Arc::new(app),
            limits,
            open: Open::default(),
            refused: metrics.connections_refused.clone(),
            timed_out: metrics.connections_timed_out.clone(),
            last_log: AtomicI64::new(0),
            tls: None,
            h2c: false,
            refusals: None,
        }
    }

    /// Plaintext connections may speak HTTP/2 with prior knowledge. The application must accept
    /// h2c too (`HttpServerOptions::h2c`): the edge only tells the protocols apart.
    pub fn with_h2c(mut self, h2c: bool) -> Self {
        self.h2c = h2c;
        self
    }

    /// HTTP/1 heads the parser refuses are answered, counted and logged by the gateway.
    pub fn with_refusals(mut self, refusals: Arc<crate::guard::Refusals>) -> Self {
        self.refusals = Some(refusals);
        self
    }

    /// Connections accepted on `addr` (a plain TCP listener of this service) speak TLS.
    pub fn with_tls(mut self, addr: std::net::SocketAddr, acceptor: pingora::listeners::tls::Acceptor) -> Self {
        self.tls = Some((addr, acceptor));
        self
    }

    fn is_tls(&self, local: Option<std::net::SocketAddr>) -> bool {
        match (&self.tls, local) {
            (Some((addr, _)), Some(l)) => {
                addr.port() == l.port() && (addr.ip().is_unspecified() || addr.ip() == l.ip())
            }
            _ => false,
        }
    }

    /// Takes a place for a connection from `ip`, or says which cap is full.
    fn admit(&self, ip: Option<IpAddr>) -> Result<Place<'_>, &'static str> {
        let total = self.open.total.fetch_add(1, Ordering::AcqRel) + 1;
        // From here on the place is held; dropping it (on refusal too) gives it back.
        let mut place = Place { open: &self.open, ip: None };
        if total > self.limits.max_connections {
            return Err("max_connections");
        }
        let Some(ip) = ip else { return Ok(place) };
        if self.limits.exempt.iter().any(|n| n.contains(&ip)) {
            return Ok(place);
        }
        // One IPv6 subscriber holds a whole /64, so the cap counts the /64, not the address.
        let ip = match ip {
            IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
            v4 => v4,
        };
        let mut map = self.open.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= self.limits.max_connections_per_ip {
            return Err("max_connections_per_ip");
        }
        *n += 1;
        place.ip = Some(ip);
        Ok(place)
    }

    fn log_refusal(&self, ip: Option<IpAddr>, reason: &'static str) {
        self.refused.with_label_values(&[self.limits.listener, reason]).inc();
        let now = chrono::Utc::now().timestamp();
        let last = self.last_log.load(Ordering::Relaxed);
        if now > last && self.last_log.compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            let limit = if reason == "max_connections" {
                self.limits.max_connections
            } else {
                self.limits.max_connections_per_ip
            };
            tracing::warn!(
                listener = self.limits.listener,
                client = %ip.map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
                reason,
                limit,
                "connection refused: `server.{reason}` reached (raise it, or find the client holding connections); \
                 further refusals this second are only counted in tollgate_connections_refused_total"
            );
        }
    }
}

#[async_trait]
impl<A> ServerApp for Edge<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let ip = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| crate::directory::canonical_ip(a.ip())));
        let _place = match self.admit(ip) {
            Ok(place) => place,
            Err(reason) => {
                self.log_refusal(ip, reason);
                return None;
            }
        };
        let accepted = std::time::Instant::now();
        let local = stream.get_socket_digest().and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied());
        let stream: Stream = match &self.tls {
            Some((_, acceptor)) if self.is_tls(local) => {
                // TCP listeners hand over Pingora's L4 stream; the handshake needs the concrete type.
                let Ok(l4) = stream.into_any().downcast::<pingora::protocols::l4::stream::Stream>() else {
                    tracing::error!(
                        listener = self.limits.listener,
                        "a TLS connection arrived on an unexpected stream type"
                    );
                    return None;
                };
                match tokio::time::timeout(self.limits.header_timeout, acceptor.tls_handshake(*l4)).await {
                    Ok(Ok(tls)) => Box::new(tls),
                    Ok(Err(e)) => {
                        tracing::debug!(listener = self.limits.listener, client = ?ip, error = %e, "TLS handshake failed");
                        return None;
                    }
                    Err(_) => {
                        self.timed_out.with_label_values(&[self.limits.listener, "tls_handshake"]).inc();
                        tracing::debug!(listener = self.limits.listener, client = ?ip, "TLS handshake not complete in time; connection closed");
                        return None;
                    }
                }
            }
            _ if self.h2c => {
                let Ok(mut l4) = stream.into_any().downcast::<pingora::protocols::l4::stream::Stream>() else {
                    tracing::error!(
                        listener = self.limits.listener,
                        "a connection arrived on an unexpected stream type"
                    );
                    return None;
                };
                let by = Instant::now() + self.limits.header_timeout;
                match opens_with_h2_preface(&mut l4, by).await {
                    Some(true) => {
                        // HTTP/2 has its own connection management in Pingora; only the caps apply.
                        return self.app.process_new(l4, shutdown).await;
                    }
                    Some(false) => l4,
                    None => {
                        if by <= Instant::now() {
                            self.timed_out.with_label_values(&[self.limits.listener, "header_timeout"]).inc();
                        }
                        return None;
                    }
                }
            }
            _ => stream,
        };
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            // HTTP/2 has its own connection management in Pingora; only the caps apply.
            return self.app.process_new(stream, shutdown).await;
        }
        let watch = self.refusals.as_ref().map(|_| Arc::new(crate::guard::Watch::default()));
        let stream: Stream = match (&self.refusals, &watch) {
            (Some(r), Some(w)) => Box::new(crate::guard::Guarded::new(stream, w.clone(), r.clone(), ip)),
            _ => stream,
        };
        let idle = self.limits.idle_timeout.as_secs().max(1);
        let mut session = ServerSession::new_http1(stream);
        session.set_pipelining_enabled(true);
        // The handshake counts against the first head's deadline.
        let mut budget = self.limits.header_timeout.saturating_sub(accepted.elapsed()).max(Duration::from_millis(1));
        let mut timer = std::pin::pin!(tokio::time::sleep(budget));
        loop {
            // Pingora's keep-alive timeout bounds each read of the next head; our own
            // deadline bounds the whole head.
            session.set_keepalive(if *shutdown.borrow() { None } else { Some(idle) });
            session.set_connection_user_context(Some(Box::new(HeadMarker)));
            let by = Instant::now() + budget;
            if let Some(w) = &watch {
                w.arm();
            }
            let app = self.app.process_new_http(session, shutdown);
            let Some(outcome) = head_within(app, timer.as_mut(), by, watch.as_deref()).await else {
                self.timed_out.with_label_values(&[self.limits.listener, "header_timeout"]).inc();
                tracing::debug!(listener = self.limits.listener, client = ?ip, "request head not complete in time; connection closed");
                return None;
            };
            let (stream, settings) = outcome?.consume();
            session = ServerSession::new_http1(stream);
            if let Some(settings) = settings {
                settings.apply_to_session(&mut session);
            }
            session.set_pipelining_enabled(true);
            budget = self.limits.idle_timeout + self.limits.header_timeout;
        }
    }

    async fn cleanup(&self) {
        self.app.cleanup().await;
    }
}

/// Raises the soft open-files limit to the hard limit and returns it, so the connection caps
/// can be sized from what the process may really open.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

/// The data plane's default total cap for an open-files limit: half of what remains after a
/// reserve for the admin listener, the store, logs and health checks, since every proxied
/// connection may hold an upstream connection too.
pub fn default_max_connections(fd_limit: u64) -> usize {
    (fd_limit.saturating_sub(512) / 2).max(64) as usize
}
