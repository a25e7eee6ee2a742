//! An embedded echo upstream for `tollgate demo` and the integration tests.
//!
//! It answers every request with a JSON description of what it received (method, path, query,
//! headers, body length), so a person or a test can see exactly what the gateway forwarded.
//! Query parameters shape the answer:
//!
//! - `status=NNN`: answer with that status
//! - `delay_ms=N`: wait before answering (timeouts)
//! - `header=name:value` (repeatable): add a response header
//! - `sse=N`: stream N server-sent events, chunked; with a [`Gate`], each event after the first
//!   waits until the gate is opened, so a test can prove the gateway does not buffer
//!
//! `POST` to a path ending in `/chat/completions`, `/completions`, `/embeddings` or `/responses`
//! is answered as an OpenAI-compatible API would ([`llm`]): a JSON answer with a `usage` block,
//! or, for `"stream": true`, an event stream whose usage event comes when the request asks
//! `stream_options.include_usage` (always on `/responses`). The demo meters it.
//!
//! Every response carries `Server: tollgate-echo` and `X-Powered-By: echo`, so response header
//! rules have something to remove.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

pub mod llm;

/// Opens held SSE streams (see the module docs).
#[derive(Default)]
pub struct Gate {
    notify: Notify,
}

impl Gate {
    /// Releases the next held event (now, or as soon as the stream waits for it).
    pub fn open(&self) {
        self.notify.notify_one();
    }
}

/// Shared state of a running echo server.
#[derive(Default)]
pub struct EchoState {
    /// Requests served; tests compare it with what the gateway admitted.
    pub hits: AtomicU64,
    pub gate: Option<Arc<Gate>>,
}

/// Serves on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<EchoState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let _ = connection(stream, state).await;
        });
    }
}

/// Binds `addr` and serves in the background of the current runtime.
pub async fn spawn(addr: SocketAddr, state: Arc<EchoState>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(serve(listener, state));
    Ok(local)
}

struct Request {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body_len: usize,
    /// Kept for the generation endpoints only.
    body: Vec<u8>,
    keep_alive: bool,
}

/// A body the echo keeps to answer a generation request; longer ones are counted, not kept.
const MAX_KEPT_BODY: usize = 8 * 1024 * 1024;

async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<Request>> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let method = req.method.unwrap_or("GET").to_string();
                let target = req.path.unwrap_or("/");
                let (path, query) = target.split_once('?').unwrap_or((target, ""));
                let headers: Vec<(String, String)> = req
                    .headers
                    .iter()
                    .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
                    .collect();
                let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
                let keep_alive = !get("connection").is_some_and(|c| c.eq_ignore_ascii_case("close"));
                let chunked = get("transfer-encoding").is_some_and(|t| t.to_ascii_lowercase().contains("chunked"));
                let content_length: usize = get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
                let (path, query) = (path.to_string(), query.to_string());
                buf.drain(..head_len);
                let mut body = Vec::new();
                let keep = (method == "POST" && llm::endpoint(&path).is_some()).then_some(&mut body);
                let body_len = if chunked {
                    read_chunked(stream, buf, keep).await?
                } else {
                    read_exact_body(stream, buf, content_length, keep).await?
                };
                return Ok(Some(Request { method, path, query, headers, body_len, body, keep_alive }));
            }
            Ok(httparse::Status::Partial) => {}
            Err(_) => return Ok(None),
        }
        let mut tmp = [0u8; 8192];
        let n = stream.read(&mut tmp).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut tmp = [0u8; 16384];
    let n = stream.read(&mut tmp).await?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    buf.extend_from_slice(&tmp[..n]);
    Ok(())
}

/// Appends `data` to the kept body, if one is kept and it has room.
fn keep_part(keep: &mut Option<&mut Vec<u8>>, data: &[u8]) {
    if let Some(k) = keep {
        if k.len() + data.len() <= MAX_KEPT_BODY {
            k.extend_from_slice(data);
        }
    }
}

async fn read_exact_body(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    len: usize,
    mut keep: Option<&mut Vec<u8>>,
) -> std::io::Result<usize> {
    while buf.len() < len {
        fill(stream, buf).await?;
    }
    keep_part(&mut keep, &buf[..len]);
    buf.drain(..len);
    Ok(len)
}

async fn read_chunked(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    mut keep: Option<&mut Vec<u8>>,
) -> std::io::Result<usize> {
    let mut total = 0;
    loop {
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            fill(stream, buf).await?;
        };
        let size_text = String::from_utf8_lossy(&buf[..line_end]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("0").trim(), 16)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
        buf.drain(..line_end + 2);
        if size == 0 {
            // Trailers (ignored) end with an empty line.
            loop {
                if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                    let empty = i == 0;
                    buf.drain(..i + 2);
                    if empty {
                        return Ok(total);
                    }
                } else {
                    fill(stream, buf).await?;
                }
            }
        }
        while buf.len() < size + 2 {
            fill(stream, buf).await?;
        }
        keep_part(&mut keep, &buf[..size]);
        buf.drain(..size + 2);
        total += size;
    }
}

fn json_escape(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn params(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), v.replace("%3A", ":").replace("%3a", ":").replace("%20", " "))
        })
        .collect()
}

async fn connection(mut stream: TcpStream, state: Arc<EchoState>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut stream, &mut buf).await? {
        state.hits.fetch_add(1, Ordering::SeqCst);
        let p = params(&req.query);
        let get = |k: &str| p.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        if let Some(ms) = get("delay_ms").and_then(|v| v.parse::<u64>().ok()) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if req.method == "POST" {
            if let Some(endpoint) = llm::endpoint(&req.path) {
                llm::answer(&mut stream, endpoint, &req.body).await?;
                if !req.keep_alive {
                    return Ok(());
                }
                continue;
            }
        }
        let status: u16 = get("status").and_then(|v| v.parse().ok()).unwrap_or(200);
        let mut extra = String::new();
        for (k, v) in &p {
            if k == "header" {
                if let Some((name, value)) = v.split_once(':') {
                    extra.push_str(&format!("{name}: {value}\r\n"));
                }
            }
        }
        if let Some(n) = get("sse").and_then(|v| v.parse::<u32>().ok()) {
            let head = format!(
                "HTTP/1.1 {status} OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\nserver: tollgate-echo\r\nx-powered-by: echo\r\n{extra}\r\n"
            );
            stream.write_all(head.as_bytes()).await?;
            for i in 0..n {
                if i > 0 {
                    match &state.gate {
                        Some(g) => g.notify.notified().await,
                        None => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
                let event = format!("id: {i}\ndata: event {i}\n\n");
                stream.write_all(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes()).await?;
                stream.flush().await?;
            }
            stream.write_all(b"0\r\n\r\n").await?;
            if !req.keep_alive {
                return Ok(());
            }
            continue;
        }
        let headers_json: Vec<String> =
            req.headers.iter().map(|(k, v)| format!("{}:{}", json_escape(k), json_escape(v))).collect();
        let body = format!(
            "{{\"method\":{},\"path\":{},\"query\":{},\"body_bytes\":{},\"headers\":{{{}}}}}\n",
            json_escape(&req.method),
            json_escape(&req.path),
            json_escape(&req.query),
            req.body_len,
            headers_json.join(",")
        );
        let mut out = format!(
            "HTTP/1.1 {status} Echo\r\ncontent-type: application/json\r\ncontent-length: {}\r\nserver: tollgate-echo\r\nx-powered-by: echo\r\n{extra}{}\r\n",
            body.len(),
            if req.keep_alive { "" } else { "connection: close\r\n" }
        );
        if req.method != "HEAD" {
            out.push_str(&body);
        }
        // One write: a split head and body would meet Nagle and delayed ACKs (40 ms stalls).
        stream.write_all(out.as_bytes()).await?;
        if !req.keep_alive {
            return Ok(());
        }
    }
    Ok(())
}

/// Counts requests (for callers that only need the counter).
pub fn hits(state: &EchoState) -> u64 {
    state.hits.load(Ordering::SeqCst)
}
