//! The echo's OpenAI-compatible answers, so the demo and the docs can meter a generation API
//! without one: deterministic usage from the request (prompt tokens: a quarter of the body's
//! bytes, rounded up; completion tokens: `max_completion_tokens`, `max_tokens` or
//! `max_output_tokens`, at most 16).

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The generation endpoints the echo answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
    Embeddings,
    Responses,
}

/// The endpoint `path` names, if any.
pub fn endpoint(path: &str) -> Option<Endpoint> {
    if path.ends_with("/chat/completions") {
        Some(Endpoint::Chat)
    } else if path.ends_with("/completions") {
        Some(Endpoint::Completions)
    } else if path.ends_with("/embeddings") {
        Some(Endpoint::Embeddings)
    } else if path.ends_with("/responses") {
        Some(Endpoint::Responses)
    } else {
        None
    }
}

const WORDS: [&str; 16] = [
    "This",
    " is",
    " the",
    " echo",
    " upstream",
    " answering",
    " as",
    " an",
    " OpenAI",
    "-compatible",
    " API",
    " would",
    ",",
    " token",
    " by",
    " token.",
];

/// Writes the answer to one generation request.
pub async fn answer(stream: &mut TcpStream, endpoint: Endpoint, body: &[u8]) -> std::io::Result<()> {
    let req: serde_json::Value = serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
    let model = req["model"].as_str().unwrap_or("echo-1").to_string();
    let prompt = (body.len() as u64).div_ceil(4);
    let max = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
        .iter()
        .find_map(|k| req[*k].as_u64())
        .unwrap_or(16);
    let completion = if endpoint == Endpoint::Embeddings { 0 } else { max.min(16) };
    let usage = match endpoint {
        Endpoint::Responses => {
            serde_json::json!({"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion})
        }
        Endpoint::Embeddings => serde_json::json!({"prompt_tokens": prompt, "total_tokens": prompt}),
        _ => {
            serde_json::json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
        }
    };
    let words = &WORDS[..completion as usize];
    if req["stream"].as_bool() != Some(true) || endpoint == Endpoint::Embeddings {
        let text: String = words.concat();
        let doc = match endpoint {
            Endpoint::Embeddings => serde_json::json!({"object": "list", "model": model,
                "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 0.5, 1.0]}], "usage": usage}),
            Endpoint::Responses => serde_json::json!({"id": "resp_echo", "object": "response", "model": model,
                "output": [{"type": "message", "content": [{"type": "output_text", "text": text}]}], "usage": usage}),
            _ => serde_json::json!({"id": "chatcmpl-echo", "object": "chat.completion", "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": usage}),
        };
        let text = doc.to_string();
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nserver: tollgate-echo\r\n\r\n",
            text.len()
        );
        return stream.write_all(format!("{head}{text}").as_bytes()).await;
    }
    stream
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\nserver: tollgate-echo\r\n\r\n")
        .await?;
    let include = endpoint == Endpoint::Responses || req["stream_options"]["include_usage"].as_bool() == Some(true);
    let mut events: Vec<String> = words
        .iter()
        .map(|w| match endpoint {
            Endpoint::Responses => {
                let d = serde_json::json!({"type": "response.output_text.delta", "delta": w});
                format!("event: response.output_text.delta\ndata: {d}\n\n")
            }
            _ => {
                let mut d = serde_json::json!({"id": "chatcmpl-echo", "object": "chat.completion.chunk", "model": model,
                    "choices": [{"index": 0, "delta": {"content": w}}]});
                if include {
                    d["usage"] = serde_json::Value::Null;
                }
                format!("data: {d}\n\n")
            }
        })
        .collect();
    match endpoint {
        Endpoint::Responses => {
            let d = serde_json::json!({"type": "response.completed", "response": {"id": "resp_echo", "model": model, "usage": usage}});
            events.push(format!("event: response.completed\ndata: {d}\n\n"));
        }
        _ => {
            if include {
                let d = serde_json::json!({"id": "chatcmpl-echo", "object": "chat.completion.chunk", "model": model,
                    "choices": [], "usage": usage});
                events.push(format!("data: {d}\n\n"));
            }
            events.push("data: [DONE]\n\n".to_string());
        }
    }
    for e in events {
        stream.write_all(format!("{:x}\r\n{e}\r\n", e.len()).as_bytes()).await?;
        stream.flush().await?;
    }
    stream.write_all(b"0\r\n\r\n").await?;
    stream.flush().await
}
