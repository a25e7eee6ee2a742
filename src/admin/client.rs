//! The admin CLI's HTTP client: `tollgate tenants …`, `keys …`, `reload` and `audit` call the
//! admin API of a running gateway. Plain HTTP/1.1 over a blocking socket: the admin listener is on
//! localhost (or reached through a tunnel), and the CLI makes one request per run.

use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A parsed answer.
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Sends one request to the admin API. `base` is like `http://127.0.0.1:9090`.
pub fn call(base: &str, token: &str, method: &str, path: &str, body: Option<&Value>) -> Result<Answer, String> {
    let rest =
        base.strip_prefix("http://").ok_or_else(|| format!("--admin-url must start with http://, got `{base}`"))?;
    let authority = rest.trim_end_matches('/');
    let mut stream = TcpStream::connect(authority).map_err(|e| {
        format!("cannot reach the admin API at {base}: {e}. Is the gateway running, and is --admin-url right?")
    })?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {authority}\r\nauthorization: Bearer {token}\r\nconnection: close\r\nuser-agent: tollgate-cli/{}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if body.is_some() {
        req.push_str(&format!("content-type: application/json\r\ncontent-length: {}\r\n", payload.len()));
    }
    req.push_str("\r\n");
    req.push_str(&payload);
    stream.write_all(req.as_bytes()).map_err(|e| format!("cannot send the request: {e}"))?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(|e| format!("cannot read the answer: {e}"))?;
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(&raw) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Err("the admin API sent a malformed answer".into()),
    };
    let status = resp.code.unwrap_or(0);
    let chunked = resp.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding") && String::from_utf8_lossy(h.value).contains("chunked")
    });
    let mut body = raw[head_len..].to_vec();
    if chunked {
        body = dechunk(&body);
    }
    Ok(Answer { status, body })
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(pos) = data.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&data[..pos]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = pos + 2;
        let end = (start + size).min(data.len());
        out.extend_from_slice(&data[start..end]);
        data = &data[(end + 2).min(data.len())..];
    }
    out
}

/// A path segment (a tenant or key id) percent-encoded, so that no id can end the path early,
/// name another endpoint (`acme/keys`) or break the request line (a space).
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `?name=value&…` of the parameters that are given, percent-encoded; `""` when none is.
pub fn query(params: &[(&str, Option<String>)]) -> String {
    let given: Vec<String> =
        params.iter().filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", segment(v)))).collect();
    if given.is_empty() {
        String::new()
    } else {
        format!("?{}", given.join("&"))
    }
}

/// Prints a successful answer (pretty JSON) or turns a problem into an error message.
pub fn render(a: Answer) -> Result<String, String> {
    let a = check(a)?;
    let text = String::from_utf8_lossy(&a.body).to_string();
    if a.body.is_empty() {
        return Ok("ok\n".into());
    }
    Ok(match serde_json::from_slice::<Value>(&a.body) {
        Ok(v) => serde_json::to_string_pretty(&v).unwrap_or(text) + "\n",
        Err(_) => text,
    })
}

/// Passes a successful (2xx) answer through; turns a problem into an error message with its
/// status, code, detail and any errors.
pub fn check(a: Answer) -> Result<Answer, String> {
    if (200..300).contains(&a.status) {
        return Ok(a);
    }
    let text = String::from_utf8_lossy(&a.body).to_string();
    let detail = serde_json::from_slice::<Value>(&a.body)
        .ok()
        .map(|v| {
            let mut d = format!(
                "{} ({}): {}",
                a.status,
                v["code"].as_str().unwrap_or("error"),
                v["detail"].as_str().unwrap_or("")
            );
            if let Some(errs) = v["errors"].as_array() {
                for e in errs {
                    d.push_str(&format!("\n  {}", e.as_str().unwrap_or_default()));
                }
            }
            d
        })
        .unwrap_or_else(|| format!("{}: {text}", a.status));
    Err(detail)
}
