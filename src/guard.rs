//! Protocol errors that the HTTP/1 parser answers before the gateway sees a request, answered
//! in the gateway's own shape instead.
//!
//! Pingora parses each HTTP/1 request head itself. A head it cannot accept (a garbage request
//! line, a header line without a colon, a `Content-Length` that is not a number or two that
//! disagree, `Transfer-Encoding` on HTTP/1.0, a head over 1 MiB) or a `CONNECT` request is
//! answered there with a canned, empty `400`/`405` carrying `Server: Pingora`, and no hook of
//! the proxy runs. [`Guarded`] wraps a client connection's stream so that such an answer never
//! leaves the process: while a request head is awaited (the edge *arms* the [`Watch`] before
//! each request and disarms it once the head reached the gateway), a write that is Pingora's
//! canned refusal is swallowed and replaced by the gateway's problem document
//! (`bad_request`, `headers_too_large` when more than `server.max_header_bytes` was read, or
//! `method_not_allowed` for `CONNECT`), rendered by [`crate::error::Reject::problem`], which is
//! counted in `tollgate_rejections_total` and written to the access log like any refusal.
//!
//! Guarantees: the replacement is only ever written in place of a response whose status line is
//! Pingora's and whose first header is `Server: Pingora`, while the watch is armed, so an answer
//! of the gateway or of an upstream is never touched. The connection is closed after it, as
//! Pingora would. What it costs: one relaxed atomic load per read and write of a connection.

use crate::error::Reject;
use crate::metering::{Meter, Record};
use crate::runtime::SharedRuntime;
use async_trait::async_trait;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID, UniqueIDType, ALPN,
};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the wrapper needs to answer and record a refusal: shared by every connection of a
/// listener.
pub struct Refusals {
    pub runtime: SharedRuntime,
    pub meter: Arc<Meter>,
}

/// One connection's state, shared between the edge (which arms and disarms it) and the stream.
#[derive(Debug, Default)]
pub struct Watch {
    armed: AtomicBool,
    /// Bytes read since the watch was last armed: the size of the head being awaited.
    read: AtomicUsize,
}

impl Watch {
    /// A request head is awaited from now on.
    pub fn arm(&self) {
        self.read.store(0, Ordering::Relaxed);
        self.armed.store(true, Ordering::Relaxed);
    }

    /// The head reached the gateway: whatever is written from here on is the gateway's.
    pub fn disarm(&self) {
        self.armed.store(false, Ordering::Relaxed);
    }

    fn is_armed(&self) -> bool {
        self.armed.load(Ordering::Relaxed)
    }
}

/// A client stream whose parser-level refusals are answered by the gateway.
pub struct Guarded {
    inner: Stream,
    watch: Arc<Watch>,
    refusals: Arc<Refusals>,
    client: Option<IpAddr>,
    started: Instant,
    /// The replacement answer, and how much of it was written.
    pending: Option<(Vec<u8>, usize)>,
}

impl std::fmt::Debug for Guarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded").field("inner", &self.inner).finish()
    }
}

impl Guarded {
    pub fn new(inner: Stream, watch: Arc<Watch>, refusals: Arc<Refusals>, client: Option<IpAddr>) -> Guarded {
        Guarded { inner, watch, refusals, client, started: Instant::now(), pending: None }
    }

    /// Pingora's canned answer: its status line, then `Server: Pingora` first (see
    /// `pingora_core::protocols::http::error_resp`). Returns its status.
    fn canned_status(buf: &[u8]) -> Option<u16> {
        let line_end = buf.windows(2).position(|w| w == b"\r\n")?;
        let (line, rest) = (&buf[..line_end], &buf[line_end + 2..]);
        let status = line.strip_prefix(b"HTTP/1.")?.get(2..5)?;
        let first = rest.get(..16)?;
        if !first.eq_ignore_ascii_case(b"server: pingora\r") {
            return None;
        }
        std::str::from_utf8(status).ok()?.parse().ok()
    }

    /// Renders, meters and logs the gateway's answer in place of Pingora's `status`.
    fn replace(&mut self, status: u16) -> Vec<u8> {
        let rt = self.refusals.runtime.load();
        let server = &rt.config.server;
        let reject = match status {
            405 => Reject::MethodNotAllowed {
                method: "CONNECT".into(),
                allow: server.allow_header.clone(),
                case_only: false,
            },
            _ if self.watch.read.load(Ordering::Relaxed) > server.max_header_bytes => {
                Reject::HeadersTooLarge { limit: server.max_header_bytes }
            }
            _ => Reject::BadRequest {
                detail: "The request could not be parsed as HTTP/1.1: a malformed request line or header line, a \
                         Content-Length that is not a number or that disagrees with another, or framing the gateway \
                         does not accept (docs/errors.md, `bad_request`). Fix the request; do not retry it unchanged."
                    .into(),
            },
        };
        let request_id = random_id();
        let mut problem = reject.problem(&request_id);
        if let Some(s) = &server.server_header {
            problem.headers.push(("server", s.to_str().unwrap_or("").to_string()));
        }
        problem.headers.push(("connection", "close".to_string()));
        let reason = http::StatusCode::from_u16(problem.status).ok().and_then(|s| s.canonical_reason()).unwrap_or("");
        let mut out = format!("HTTP/1.1 {} {reason}\r\n", problem.status).into_bytes();
        for (k, v) in &problem.headers {
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&problem.body);

        let code = reject.code();
        let elapsed = self.started.elapsed();
        self.refusals.meter.record(
            &Record {
                tenant: None,
                rule: "-",
                decision: "rejected",
                reason: Some(code),
                status: problem.status,
                bytes_in: 0,
                bytes_out: problem.body.len() as u64,
                upstream: None,
                upstream_secs: None,
                total_secs: elapsed.as_secs_f64(),
                charges: &[],
                model: None,
                admitted: false,
            },
            chrono::Utc::now().timestamp_millis(),
        );
        if rt.config.log.access_log {
            crate::logging::access(&crate::logging::Access {
                request_id: &request_id,
                method: "-",
                path: "-",
                tenant: "-",
                tier: "-",
                key_id: "-",
                rule: "-",
                decision: "rejected",
                reason: code,
                status: problem.status,
                bytes_in: 0,
                bytes_out: problem.body.len() as u64,
                upstream: "-",
                upstream_us: None,
                total_us: elapsed.as_micros().min(u128::from(u64::MAX)) as u64,
                client_ip: self.client,
                charge_metric: "-",
                charge_units: None,
                quota_metric: "-",
                quota_remaining: None,
            });
        }
        out
    }

    /// Writes what is left of the replacement; ready once all of it is written.
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while let Some((bytes, sent)) = self.pending.as_mut() {
            if *sent >= bytes.len() {
                break;
            }
            match Pin::new(&mut self.inner).poll_write(cx, &bytes[*sent..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *sent += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// 128 random bits as 32 hex digits, the shape of the gateway's request ids.
fn random_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

impl AsyncRead for Guarded {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.watch.is_armed() {
            self.watch.read.fetch_add(buf.filled().len() - before, Ordering::Relaxed);
        }
        polled
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        if self.pending.is_none() && self.watch.is_armed() {
            if let Some(status) = Guarded::canned_status(buf) {
                let bytes = self.replace(status);
                self.pending = Some((bytes, 0));
            }
        }
        if self.pending.is_some() {
            // Pingora's own bytes (its head and empty body) are dropped; ours go out instead.
            return match self.drive(cx) {
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                _ => Poll::Ready(Ok(buf.len())),
            };
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.drive(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut self.inner).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.drive(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut self.inner).poll_shutdown(cx),
            other => other,
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if self.pending.is_some() || self.watch.is_armed() {
            // Rare (a head is awaited): go through `poll_write`, which may replace the answer.
            let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &**b);
            return self.poll_write(cx, first);
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for Guarded {
    async fn shutdown(&mut self) {
        let _ = tokio::io::AsyncWriteExt::shutdown(self).await;
    }
}

impl UniqueID for Guarded {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Guarded {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Guarded {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> std::time::Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> std::time::Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Guarded {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: pingora::protocols::raw_connect::ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Guarded {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: pingora::protocols::SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for Guarded {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::Guarded;

    #[test]
    fn only_pingoras_canned_answers_are_recognised() {
        let canned = b"HTTP/1.1 400 Bad Request\r\nServer: Pingora\r\nDate: x\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(Guarded::canned_status(canned), Some(400));
        let connect = b"HTTP/1.1 405 Method Not Allowed\r\nserver: Pingora\r\n\r\n";
        assert_eq!(Guarded::canned_status(connect), Some(405));
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/problem+json\r\nserver: Pingora\r\n\r\n";
        assert_eq!(Guarded::canned_status(ours), None);
        assert_eq!(Guarded::canned_status(b"HTTP/1.1 400 Bad"), None);
        assert_eq!(Guarded::canned_status(b"{\"a\":1}"), None);
    }
}
