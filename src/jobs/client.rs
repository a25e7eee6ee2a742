//! The HTTP/1.1 exchanges of the job workers: a job's request to its upstream, and a
//! completion callback. One connection per exchange (`Connection: close`), so a job that runs
//! for minutes holds no pooled connection, and a body is read to its end whatever its framing.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Headers that describe one hop, never stored or replayed.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
    "expect",
];

/// An upstream's answer, the body cut at the caller's bound.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub truncated: bool,
}

/// The request bytes for `method uri` with `headers` (hop-by-hop ones dropped) and `body`.
pub fn request_bytes(
    method: &str,
    uri: &str,
    headers: &[(String, String)],
    extra: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(format!("{method} {uri} HTTP/1.1\r\n").as_bytes());
    for (k, v) in headers {
        if HOP_BY_HOP.contains(&k.to_ascii_lowercase().as_str()) {
            continue;
        }
        out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    for (k, v) in extra {
        out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    out.extend_from_slice(format!("content-length: {}\r\nconnection: close\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(body);
    out
}

struct Reader {
    stream: TcpStream,
    buf: Vec<u8>,
    eof: bool,
}

impl Reader {
    async fn fill(&mut self) -> std::io::Result<bool> {
        let mut tmp = [0u8; 16384];
        let n = self.stream.read(&mut tmp).await?;
        if n == 0 {
            self.eof = true;
            return Ok(false);
        }
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(true)
    }
}

/// Keeps up to `max` bytes of a body.
struct Sink {
    body: Vec<u8>,
    max: usize,
    truncated: bool,
}

impl Sink {
    fn push(&mut self, b: &[u8]) {
        let room = self.max.saturating_sub(self.body.len());
        if b.len() > room {
            self.truncated = true;
        }
        self.body.extend_from_slice(&b[..b.len().min(room)]);
    }
}

/// Sends `request` to `addr` and reads the answer; `on_head` sees the response head as soon
/// as it arrives (the progress header of a streamed answer).
pub async fn exchange(
    addr: SocketAddr,
    connect_timeout: Duration,
    request: &[u8],
    head_request: bool,
    max_body: u64,
    on_head: impl FnOnce(&[(String, String)]),
) -> std::io::Result<Answer> {
    let stream = tokio::time::timeout(connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = stream.set_nodelay(true);
    let mut r = Reader { stream, buf: Vec::with_capacity(8192), eof: false };
    r.stream.write_all(request).await?;
    let (status, headers, head_len) = loop {
        let mut hs = [httparse::EMPTY_HEADER; 128];
        let mut resp = httparse::Response::new(&mut hs);
        match resp.parse(&r.buf) {
            Ok(httparse::Status::Complete(n)) => {
                let headers: Vec<(String, String)> = resp
                    .headers
                    .iter()
                    .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
                    .collect();
                break (resp.code.unwrap_or(502), headers, n);
            }
            Ok(httparse::Status::Partial) => {
                if r.buf.len() > 64 * 1024 {
                    return Err(std::io::Error::other("the upstream's response head is over 64 KiB"));
                }
                if !r.fill().await? {
                    return Err(std::io::Error::other("the upstream closed the connection before answering"));
                }
            }
            Err(e) => return Err(std::io::Error::other(format!("the upstream's answer is not HTTP: {e}"))),
        }
    };
    on_head(&headers);
    r.buf.drain(..head_len);
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
    let mut sink = Sink { body: Vec::new(), max: usize::try_from(max_body).unwrap_or(usize::MAX), truncated: false };
    let no_body = head_request || status == 204 || status == 304 || (100..200).contains(&status);
    let chunked = get("transfer-encoding").is_some_and(|t| t.to_ascii_lowercase().contains("chunked"));
    if no_body {
    } else if chunked {
        read_chunked(&mut r, &mut sink).await?;
    } else if let Some(len) = get("content-length").and_then(|v| v.trim().parse::<u64>().ok()) {
        let mut left = len;
        loop {
            let take = (r.buf.len() as u64).min(left) as usize;
            sink.push(&r.buf[..take]);
            r.buf.drain(..take);
            left -= take as u64;
            if left == 0 {
                break;
            }
            if !r.fill().await? {
                return Err(std::io::Error::other("the upstream closed the connection in the middle of the body"));
            }
        }
    } else {
        loop {
            sink.push(&r.buf);
            r.buf.clear();
            if !r.fill().await? {
                break;
            }
        }
    }
    Ok(Answer { status, headers, body: sink.body, truncated: sink.truncated })
}

async fn read_chunked(r: &mut Reader, sink: &mut Sink) -> std::io::Result<()> {
    loop {
        let line_end = loop {
            if let Some(i) = r.buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            if !r.fill().await? {
                return Err(std::io::Error::other("the upstream closed the connection in the middle of a chunk"));
            }
        };
        let text = String::from_utf8_lossy(&r.buf[..line_end]).to_string();
        let size = usize::from_str_radix(text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| std::io::Error::other("the upstream sent a malformed chunk size"))?;
        r.buf.drain(..line_end + 2);
        if size == 0 {
            // Trailers are dropped; the connection closes after this exchange anyway.
            return Ok(());
        }
        while r.buf.len() < size + 2 {
            if !r.fill().await? {
                return Err(std::io::Error::other("the upstream closed the connection in the middle of a chunk"));
            }
        }
        sink.push(&r.buf[..size]);
        r.buf.drain(..size + 2);
        if r.eof && r.buf.is_empty() {
            return Ok(());
        }
    }
}

/// `host:port` and path of an `http://` URL; `None` for anything else.
pub fn split_url(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') || path.contains(char::is_whitespace) {
        return None;
    }
    Some((authority.to_ascii_lowercase(), path.to_string()))
}

/// One signed POST of `body` to an `http://` URL; answers the status.
pub async fn post(url: &str, body: &[u8], headers: &[(&str, &str)], timeout: Duration) -> std::io::Result<u16> {
    let (authority, path) = split_url(url).ok_or_else(|| std::io::Error::other("not an http:// URL"))?;
    let target = if authority.contains(':') { authority.clone() } else { format!("{authority}:80") };
    let addr = tokio::net::lookup_host(target)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other("the callback host has no address"))?;
    let mut h: Vec<(String, String)> =
        vec![("host".into(), authority), ("content-type".into(), "application/json".into())];
    h.extend(headers.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let req = request_bytes("POST", &path, &h, &[], body);
    let answer = tokio::time::timeout(timeout, exchange(addr, timeout, &req, false, 16 * 1024, |_| {}))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "the callback timed out"))??;
    Ok(answer.status)
}
