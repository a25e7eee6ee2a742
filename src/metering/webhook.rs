//! Quota warning webhooks: a signed JSON POST per threshold crossing, sent off the request
//! path with bounded retries.
//!
//! Requests never wait for a webhook: warnings go into a bounded channel (full: the warning is
//! logged and dropped) that one task drains. Each POST carries
//! `X-Tollgate-Timestamp: <unix seconds>` and
//! `X-Tollgate-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`, so a
//! receiver can verify the sender and reject replays. Failed deliveries are retried with
//! exponential backoff (200 ms, 400 ms, …) up to `max_attempts`.

use crate::config::WebhookConfig;
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// What a warning webhook says.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Warning {
    pub tenant: String,
    pub metric: String,
    pub used: u64,
    pub limit: u64,
    /// Percent.
    pub threshold: u32,
    pub reset_at: Option<String>,
}

/// The sending side, held by the request path.
#[derive(Clone)]
pub struct WebhookSender {
    tx: mpsc::Sender<Warning>,
}

impl WebhookSender {
    /// Queues a warning; never waits.
    pub fn send(&self, w: Warning) {
        if let Err(e) = self.tx.try_send(w) {
            tracing::warn!(error = %e, "quota warning webhook queue is full; warning dropped");
        }
    }
}

/// `sha256=<hex>` signature of `"<timestamp>.<body>"`.
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Starts the delivery task on the current runtime and returns its sender.
pub fn start(config: WebhookConfig) -> WebhookSender {
    let (tx, mut rx) = mpsc::channel::<Warning>(1024);
    tokio::spawn(async move {
        while let Some(w) = rx.recv().await {
            deliver(&config, &w).await;
        }
    });
    WebhookSender { tx }
}

async fn deliver(config: &WebhookConfig, w: &Warning) {
    let body = match serde_json::to_vec(w) {
        Ok(b) => b,
        Err(_) => return,
    };
    let mut backoff = Duration::from_millis(200);
    for attempt in 1..=config.max_attempts {
        match tokio::time::timeout(config.timeout, post(config, &body)).await {
            Ok(Ok(status)) if (200..300).contains(&status) => return,
            Ok(Ok(status)) => tracing::warn!(status, attempt, tenant = %w.tenant, "quota warning webhook refused"),
            Ok(Err(e)) => tracing::warn!(error = %e, attempt, tenant = %w.tenant, "quota warning webhook failed"),
            Err(_) => tracing::warn!(attempt, tenant = %w.tenant, "quota warning webhook timed out"),
        }
        if attempt < config.max_attempts {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }
    tracing::error!(tenant = %w.tenant, metric = %w.metric, "quota warning webhook gave up after {} attempts", config.max_attempts);
}

/// One HTTP/1.1 POST; returns the status code.
async fn post(config: &WebhookConfig, body: &[u8]) -> std::io::Result<u16> {
    let rest = config.url.strip_prefix("http://").unwrap_or(&config.url);
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = if authority.contains(':') { authority.to_string() } else { format!("{authority}:80") };
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let ts = chrono::Utc::now().timestamp();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {authority}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nuser-agent: tollgate/{}\r\nx-tollgate-timestamp: {ts}\r\nx-tollgate-signature: {}\r\nconnection: close\r\n\r\n",
        body.len(),
        env!("CARGO_PKG_VERSION"),
        sign(&config.secret, ts, body)
    );
    let mut req = head.into_bytes();
    req.extend_from_slice(body);
    stream.write_all(&req).await?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.len() > 16 * 1024 {
            break;
        }
    }
    let line = String::from_utf8_lossy(&buf);
    line.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("the webhook receiver sent no HTTP status line"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_of_timestamp_and_body() {
        let s = sign("0123456789abcdef", 1700000000, b"{}");
        assert!(s.starts_with("sha256=") && s.len() == 7 + 64);
        assert_eq!(s, sign("0123456789abcdef", 1700000000, b"{}"));
        assert_ne!(s, sign("0123456789abcdef", 1700000001, b"{}"));
    }
}
