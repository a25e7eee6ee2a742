//! An OpenAI-compatible upstream for the metering tests: chat completions, completions,
//! embeddings and the Responses API, as JSON answers with a `usage` block or as SSE streams of
//! chunk events, a final usage event (when the request asks `stream_options.include_usage`, or
//! always on the Responses API) and `data: [DONE]`.
//!
//! Request headers shape the answer (the gateway forwards them):
//! - `x-test-usage: P,C`: prompt and completion tokens (default `9,12`)
//! - `x-test-chunks: N`: content events in a stream (default 5)
//! - `x-test-delay-ms: N`: pause before each content event after the first (default 0)
//! - `x-test-pad: N`: bytes of content per event (default a few)
//! - `x-test-break: 1`: the stream stops before its usage event, without its terminating chunk
//! - `x-test-no-usage: 1`: the JSON answer carries no `usage`
//! - `x-test-status: 204` or `304`: that status, without a body (a HEAD request gets the JSON
//!   answer's head, without its body)
//!
//! Every request body is kept (`bodies`), so a test can see what the gateway forwarded.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request as received: path, headers (lower-case names), body.
pub type Received = (String, Vec<(String, String)>, Vec<u8>);

#[derive(Default)]
pub struct LlmState {
    /// Every request, in arrival order.
    pub requests: Mutex<Vec<Received>>,
}

pub struct Llm {
    pub addr: SocketAddr,
    pub state: Arc<LlmState>,
    _stop: std::sync::mpsc::Sender<()>,
}

impl Llm {
    pub fn start() -> Llm {
        let state = Arc::new(LlmState::default());
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let st = state.clone();
        std::thread::spawn(move || {
            let rt =
                tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
            rt.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                addr_tx.send(listener.local_addr().expect("addr")).expect("send");
                tokio::spawn(async move {
                    loop {
                        let Ok((s, _)) = listener.accept().await else { continue };
                        let _ = s.set_nodelay(true);
                        let st = st.clone();
                        tokio::spawn(async move {
                            let _ = connection(s, st).await;
                        });
                    }
                });
                tokio::task::spawn_blocking(move || {
                    let _ = stop_rx.recv();
                })
                .await
                .ok();
            });
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(10)).expect("llm started");
        Llm { addr, state, _stop: stop_tx }
    }

    /// The bodies received, as JSON.
    pub fn bodies(&self) -> Vec<serde_json::Value> {
        let reqs = self.state.requests.lock().unwrap_or_else(|p| p.into_inner());
        reqs.iter().map(|(_, _, b)| serde_json::from_slice(b).unwrap_or(serde_json::Value::Null)).collect()
    }

    /// A header of the last request received.
    pub fn last_header(&self, name: &str) -> Option<String> {
        let reqs = self.state.requests.lock().unwrap_or_else(|p| p.into_inner());
        reqs.last().and_then(|(_, h, _)| h.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
    }

    pub fn count(&self) -> usize {
        self.state.requests.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut tmp = [0u8; 16384];
    let n = s.read(&mut tmp).await?;
    buf.extend_from_slice(&tmp[..n]);
    Ok(n > 0)
}

async fn connection(mut s: TcpStream, state: Arc<LlmState>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let (head_len, method, path, headers, len) = loop {
            let mut hs = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut hs);
            if let Ok(httparse::Status::Complete(n)) = req.parse(&buf) {
                let headers: Vec<(String, String)> = req
                    .headers
                    .iter()
                    .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
                    .collect();
                let len = headers
                    .iter()
                    .find(|(k, _)| k == "content-length")
                    .and_then(|(_, v)| v.parse::<usize>().ok())
                    .unwrap_or(0);
                break (n, req.method.unwrap_or("GET").to_string(), req.path.unwrap_or("/").to_string(), headers, len);
            }
            if !fill(&mut s, &mut buf).await? {
                return Ok(());
            }
        };
        while buf.len() < head_len + len {
            if !fill(&mut s, &mut buf).await? {
                return Ok(());
            }
        }
        let body = buf[head_len..head_len + len].to_vec();
        buf.drain(..head_len + len);
        state.requests.lock().unwrap_or_else(|p| p.into_inner()).push((path.clone(), headers.clone(), body.clone()));
        answer(&mut s, &method, &path, &headers, &body).await?;
    }
}

async fn answer(
    s: &mut TcpStream,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let h = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
    if let Some(status) = h("x-test-status").filter(|v| *v == "204" || *v == "304") {
        return s
            .write_all(format!("HTTP/1.1 {status} No Body\r\ncontent-type: application/json\r\n\r\n").as_bytes())
            .await;
    }
    let (p, c) = h("x-test-usage")
        .and_then(|v| v.split_once(','))
        .and_then(|(a, b)| Some((a.trim().parse::<u64>().ok()?, b.trim().parse::<u64>().ok()?)))
        .unwrap_or((9, 12));
    let req: serde_json::Value = serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
    let model = req["model"].as_str().unwrap_or("test-model").to_string();
    let stream = req["stream"].as_bool() == Some(true);
    let responses = path.starts_with("/v1/responses");
    let usage = if responses {
        serde_json::json!({"input_tokens": p, "output_tokens": c, "total_tokens": p + c})
    } else if path.starts_with("/v1/embeddings") {
        serde_json::json!({"prompt_tokens": p, "total_tokens": p})
    } else {
        serde_json::json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
    };
    if !stream {
        let mut doc = serde_json::json!({
            "id": "cmpl-1",
            "object": "chat.completion",
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello \"there\" {not: usage}"}}],
        });
        if h("x-test-no-usage").is_none() {
            doc["usage"] = usage;
        }
        let text = serde_json::to_string(&doc).unwrap_or_default();
        let head =
            format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", text.len());
        if method == "HEAD" {
            return s.write_all(head.as_bytes()).await;
        }
        return s.write_all(format!("{head}{text}").as_bytes()).await;
    }
    let chunks: u32 = h("x-test-chunks").and_then(|v| v.parse().ok()).unwrap_or(5);
    let delay = Duration::from_millis(h("x-test-delay-ms").and_then(|v| v.parse().ok()).unwrap_or(0));
    let pad: usize = h("x-test-pad").and_then(|v| v.parse().ok()).unwrap_or(0);
    let include = responses || req["stream_options"]["include_usage"].as_bool() == Some(true);
    s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n").await?;
    let send = |event: String| {
        let framed = format!("{:x}\r\n{event}\r\n", event.len());
        framed.into_bytes()
    };
    for i in 0..chunks {
        if i > 0 && !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let content = format!("tok{i} {}", "x".repeat(pad));
        let event = if responses {
            let d = serde_json::json!({"type": "response.output_text.delta", "delta": content});
            format!("event: response.output_text.delta\ndata: {d}\n\n")
        } else {
            let mut d = serde_json::json!({"id": "c1", "object": "chat.completion.chunk", "model": model,
                "choices": [{"index": 0, "delta": {"content": content}}]});
            if include {
                d["usage"] = serde_json::Value::Null;
            }
            format!("data: {d}\n\n")
        };
        s.write_all(&send(event)).await?;
        s.flush().await?;
    }
    if h("x-test-break").is_some() {
        // Cut short: no usage event, no terminating chunk.
        s.flush().await?;
        return Err(std::io::ErrorKind::ConnectionAborted.into());
    }
    if include {
        let event = if responses {
            let d = serde_json::json!({"type": "response.completed", "response": {"id": "r1", "model": model, "usage": usage}});
            format!("event: response.completed\ndata: {d}\n\n")
        } else {
            let d = serde_json::json!({"id": "c1", "object": "chat.completion.chunk", "model": model, "choices": [], "usage": usage});
            format!("data: {d}\n\n")
        };
        s.write_all(&send(event)).await?;
    }
    if !responses {
        s.write_all(&send("data: [DONE]\n\n".to_string())).await?;
    }
    s.write_all(b"0\r\n\r\n").await?;
    s.flush().await
}
