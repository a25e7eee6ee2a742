//! HTTP/2 through the gateway, with a real HTTP/2 client (the `h2` crate): h2c with prior
//! knowledge on the plaintext listener and h2 negotiated by ALPN on the TLS listener. Also the
//! HTTP/1 parser's own refusals, which the gateway answers as problem documents, counts and logs.

mod common;

use bytes::Bytes;
use common::*;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;
use tokio::net::TcpStream;

/// What an HTTP/2 exchange gave back.
struct H2Resp {
    status: u16,
    headers: http::HeaderMap,
    body: Vec<u8>,
    /// How many DATA frames (chunks) the body arrived in.
    chunks: usize,
}

impl H2Resp {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

type Sender = h2::client::SendRequest<Bytes>;

async fn h2c(addr: SocketAddr) -> Sender {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = h2::client::handshake(tcp).await.expect("h2c handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

async fn h2_tls(addr: SocketAddr, cert: &std::path::Path) -> (Sender, Option<Vec<u8>>) {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from_pem_file(cert).expect("cert")).expect("root");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls = connector.connect(name, tcp).await.expect("TLS handshake");
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let (send, conn) = h2::client::handshake(tls).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, alpn)
}

async fn exchange(send: &mut Sender, req: http::Request<()>) -> H2Resp {
    let send = send.clone();
    let mut send = send.ready().await.expect("ready");
    let (resp, _) = send.send_request(req, true).expect("send");
    let resp = tokio::time::timeout(Duration::from_secs(10), resp).await.expect("answer in time").expect("response");
    let (parts, mut body) = resp.into_parts();
    let mut out = Vec::new();
    let mut chunks = 0;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body");
        let _ = body.flow_control().release_capacity(chunk.len());
        if !chunk.is_empty() {
            chunks += 1;
        }
        out.extend_from_slice(&chunk);
    }
    H2Resp { status: parts.status.as_u16(), headers: parts.headers, body: out, chunks }
}

fn get(uri: &str, headers: &[(&str, &str)]) -> http::Request<()> {
    let mut b = http::Request::builder().method("GET").uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).expect("request")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

/// The HTTP/2 behaviours every listener must show: a keyed request forwarded, a refusal as a
/// problem document, tenancy from `:authority`, a conflicting `host` refused, a streamed body.
async fn common_checks(send: &mut Sender, scheme: &str, port: u16, gw: &Gateway) {
    let auth = bearer(ACME_KEY);
    let base = format!("{scheme}://gateway.test:{port}");
    let r = exchange(send, get(&format!("{base}/api/x?q=1"), &[("authorization", &auth)])).await;
    assert_eq!(r.status, 200, "{}\n{}", String::from_utf8_lossy(&r.body), gw.log());
    let v = r.json();
    assert_eq!((v["path"].as_str(), v["query"].as_str()), (Some("/api/x"), Some("q=1")));
    assert_eq!(v["headers"]["x-tenant-id"], "acme");
    assert!(v["headers"].get("authorization").is_none(), "the key went upstream");
    assert_eq!(v["headers"]["host"].as_str().map(|h| h.starts_with("gateway.test")), Some(true), "{v}");
    assert_eq!(r.header("server"), Some("tollgate-echo"), "the upstream's own Server header is kept");

    let r = exchange(send, get(&format!("{base}/api/x"), &[])).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert_eq!(r.json()["code"], "missing_key");
    assert!(r.header("server").is_none());

    // Subdomain tenancy reads `:authority`: the key is acme's, the authority names globex.
    let r =
        exchange(send, get(&format!("{scheme}://globex.example.test:{port}/api/x"), &[("authorization", &auth)])).await;
    assert_eq!((r.status, r.json()["code"].as_str()), (403, Some("tenant_mismatch")));
    assert_eq!(r.json()["claimed_tenant"], "globex");
    let r =
        exchange(send, get(&format!("{scheme}://acme.example.test:{port}/api/x"), &[("authorization", &auth)])).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["headers"]["x-tenant-id"], "acme");

    // A `host` header that names another host than `:authority` is refused 400 as on HTTP/1.1,
    // by Pingora's HTTP/2 server before the gateway sees it (docs/errors.md): an empty 400,
    // never forwarded, never `Server: Pingora`.
    let r = exchange(
        send,
        get(&format!("{scheme}://acme.example.test:{port}/api/x"), &[("authorization", &auth), ("host", "evil.test")]),
    )
    .await;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.header("server").is_none());
    // The same `host` as `:authority` is fine.
    let r = exchange(
        send,
        get(
            &format!("{scheme}://acme.example.test:{port}/api/x"),
            &[("authorization", &auth), ("host", &format!("acme.example.test:{port}"))],
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    // A streamed (SSE) answer arrives in pieces, not buffered whole.
    let r = exchange(send, get(&format!("{base}/api/events?sse=5"), &[("authorization", &auth)])).await;
    assert_eq!(r.status, 200);
    let text = String::from_utf8_lossy(&r.body).into_owned();
    assert_eq!(text.matches("data:").count(), 5, "{text}");
    assert!(r.chunks >= 2, "the stream came in {} chunk(s)", r.chunks);
}

#[test]
fn h2c_with_prior_knowledge_on_the_plaintext_listener() {
    let echo = Echo::start();
    let gw = Gateway::start(&standard_config(echo.addr, Extra::default()));
    runtime().block_on(async {
        let mut send = h2c(gw.addr).await;
        common_checks(&mut send, "http", gw.addr.port(), &gw).await;
    });
    // HTTP/1.1 still works on the same listener, short requests included.
    assert_eq!(gw.get("/api/x", &[("authorization", &bearer(ACME_KEY))]).status, 200);
    let mut c = Conn::open(gw.addr).expect("connect");
    c.send_raw(b"GET / HTTP/1.0\r\n\r\n").expect("send");
    let r = c.read_response(false).expect("an answer to a request shorter than the h2 preface");
    assert_eq!(r.problem_code(), "invalid_host");
}

#[test]
fn h2c_can_be_turned_off() {
    let echo = Echo::start();
    let gw = Gateway::start(&standard_config(echo.addr, Extra { server: "h2c = false", ..Extra::default() }));
    let got = runtime().block_on(async {
        let tcp = TcpStream::connect(gw.addr).await.expect("connect");
        tokio::time::timeout(Duration::from_secs(5), async {
            let (send, conn) = h2::client::handshake(tcp).await.ok()?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let send = send.ready().await.ok();
            let mut send = send?;
            let (resp, _) = send.send_request(get("http://gateway.test/api/x", &[]), true).ok()?;
            resp.await.ok()
        })
        .await
        .ok()
        .flatten()
    });
    assert!(got.is_none(), "h2c answered with h2c = false");
}

#[test]
fn h2_over_tls_is_negotiated_by_alpn() {
    let echo = Echo::start();
    let dir = temp_dir("h2tls");
    let ok = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .output()
        .expect("openssl (scripts/ensure-deps.sh installs it)");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let tls_port = free_port();
    let server = format!("tls = {{ listen = \"127.0.0.1:{tls_port}\", cert = \"cert.pem\", key = \"key.pem\" }}");
    let cert = dir.join("cert.pem");
    let gw = Gateway::start_in(dir, &standard_config(echo.addr, Extra { server: &server, ..Extra::default() }), &[]);
    let addr: SocketAddr = format!("127.0.0.1:{tls_port}").parse().expect("addr");
    runtime().block_on(async {
        let (mut send, alpn) = h2_tls(addr, &cert).await;
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
        common_checks(&mut send, "https", tls_port, &gw).await;
        let r = exchange(
            &mut send,
            get(&format!("https://gateway.test:{tls_port}/api/x"), &[("authorization", &bearer(ACME_KEY))]),
        )
        .await;
        assert_eq!(r.json()["headers"]["x-forwarded-proto"], "https");
    });
}

/// Sends `raw` on a fresh connection and reads one answer.
fn send_raw(addr: SocketAddr, raw: &[u8]) -> Resp {
    let mut conn = Conn::open(addr).expect("connect");
    conn.send_raw(raw).expect("send");
    conn.read_response(false).unwrap_or_else(|e| panic!("no answer: {e}"))
}

fn rejections(gw: &Gateway, reason: &str) -> u64 {
    let text = common::get(gw.admin, "/metrics", &[]).expect("metrics").text();
    text.lines()
        .filter(|l| l.starts_with("tollgate_rejections_total{") && l.contains(&format!("reason=\"{reason}\"")))
        .filter_map(|l| l.rsplit(' ').next().and_then(|n| n.parse::<f64>().ok()))
        .sum::<f64>() as u64
}

#[test]
fn protocol_errors_are_problem_documents_counted_and_logged() {
    let echo = Echo::start();
    let server = "server_header = \"tollgate\"";
    let gw = Gateway::start(&standard_config(echo.addr, Extra { server, ..Extra::default() }));
    let a = format!("Authorization: Bearer {ACME_KEY}");
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("garbage request line", b"HELLO THERE\r\n\r\n".to_vec(), 400, "bad_request"),
        (
            "non-numeric Content-Length",
            format!("POST /api/x HTTP/1.1\r\nHost: gateway.test\r\n{a}\r\nContent-Length: abc\r\n\r\n").into_bytes(),
            400,
            "bad_request",
        ),
        (
            "two different Content-Lengths",
            format!(
                "POST /api/x HTTP/1.1\r\nHost: gateway.test\r\n{a}\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
            )
            .into_bytes(),
            400,
            "bad_request",
        ),
        (
            "two equal Content-Lengths",
            format!(
                "POST /api/x HTTP/1.1\r\nHost: gateway.test\r\n{a}\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc"
            )
            .into_bytes(),
            400,
            "duplicate_header",
        ),
        (
            "bad chunk size",
            format!(
                "POST /api/x HTTP/1.1\r\nHost: gateway.test\r\n{a}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"
            )
            .into_bytes(),
            400,
            "bad_request",
        ),
        (
            "CONNECT",
            b"CONNECT gateway.test:443 HTTP/1.1\r\nHost: gateway.test:443\r\n\r\n".to_vec(),
            405,
            "method_not_allowed",
        ),
    ];
    for (name, raw, status, code) in cases {
        let before = rejections(&gw, code);
        let r = send_raw(gw.addr, &raw);
        assert_eq!(r.status, status, "{name}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("application/problem+json"), "{name}");
        assert_eq!(r.problem_code(), code, "{name}");
        assert_eq!(r.header("server"), Some("tollgate"), "{name}: the configured Server header");
        assert!(r.header("x-request-id").is_some(), "{name}");
        let mut counted = false;
        for _ in 0..50 {
            if rejections(&gw, code) == before + 1 {
                counted = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(counted, "{name}: tollgate_rejections_total{{reason=\"{code}\"}} did not grow by one");
        let id = r.header("x-request-id").unwrap_or_default().to_string();
        let mut logged = false;
        for _ in 0..50 {
            logged = gw.log().lines().any(|l| l.contains(&id) && l.contains(code));
            if logged {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(logged, "{name}: no access-log line for {id}:\n{}", gw.log());
    }
    // A head larger than max_header_bytes that the parser refuses is `headers_too_large`.
    let huge = format!("GET /api/x HTTP/1.1\r\nHost: gateway.test\r\nX-Huge: {}\r\n\r\n", "h".repeat(1100 * 1024));
    let r = send_raw(gw.addr, huge.as_bytes());
    assert_eq!((r.status, r.problem_code().as_str()), (431, "headers_too_large"));
    assert!(!gw.log().contains(ACME_KEY), "a key reached the log");
}

#[test]
fn no_server_header_by_default() {
    let echo = Echo::start();
    let gw = Gateway::start(&standard_config(echo.addr, Extra::default()));
    let r = send_raw(gw.addr, b"HELLO THERE\r\n\r\n");
    assert_eq!((r.status, r.problem_code().as_str()), (400, "bad_request"));
    assert!(r.header("server").is_none(), "Server: {:?}", r.header("server"));
    let r = gw.get("/api/x", &[]);
    assert_eq!(r.status, 401);
    assert!(r.header("server").is_none());
}

#[test]
fn a_reload_applies_the_server_header_and_says_h2c_waits_for_a_restart() {
    const TOKEN: &str = "h2-reload-admin-token-0123456789";
    let echo = Echo::start();
    let tail = format!("[admin]\ntoken_hash = \"{}\"\n", hash_of(TOKEN));
    let gw = Gateway::start(&standard_config(echo.addr, Extra { tail: &tail, ..Extra::default() }));
    assert!(gw.get("/api/x", &[]).header("server").is_none());
    let changed = standard_config(
        echo.addr,
        Extra { server: "h2c = false\nserver_header = \"edge\"", tail: &tail, ..Extra::default() },
    );
    let text = render(&changed, gw.addr, gw.admin, &gw.dir);
    std::fs::write(&gw.config_path, text).expect("write config");
    let r = common::request(gw.admin, "POST", "/v1/reload", &[("authorization", &bearer(TOKEN))], b"").expect("reload");
    assert_eq!(r.status, 200, "{}", r.text());
    let warnings = r.json()["warnings"].to_string();
    assert!(warnings.contains("`server.h2c` changed: it applies on the next restart"), "{warnings}");
    assert_eq!(gw.get("/api/x", &[]).header("server"), Some("edge"), "the Server header follows the reload");
    assert_eq!(send_raw(gw.addr, b"HELLO THERE\r\n\r\n").header("server"), Some("edge"));
    // h2c stays as the process started.
    runtime().block_on(async {
        let mut send = h2c(gw.addr).await;
        let r = exchange(&mut send, get(&format!("http://gateway.test:{}/api/x", gw.addr.port()), &[])).await;
        assert_eq!(r.status, 401);
    });
}

/// An HTTP/2 upstream that answers what it received: the request body's length and its
/// trailers (as `x-saw-trailers`), then a body and trailers of its own.
fn start_h2_upstream() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        runtime().block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(tcp).await else { return };
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        tokio::spawn(async move {
                            let mut body = req.into_body();
                            let mut n = 0;
                            while let Some(Ok(chunk)) = body.data().await {
                                n += chunk.len();
                                let _ = body.flow_control().release_capacity(chunk.len());
                            }
                            let saw = match body.trailers().await {
                                Ok(Some(t)) => t
                                    .iter()
                                    .map(|(k, v)| format!("{k}={}", v.to_str().unwrap_or("?")))
                                    .collect::<Vec<_>>()
                                    .join(","),
                                _ => "none".to_string(),
                            };
                            let resp = http::Response::builder()
                                .status(200)
                                .header("x-saw-trailers", saw)
                                .header("x-saw-bytes", n.to_string())
                                .body(())
                                .expect("response");
                            let Ok(mut send) = respond.send_response(resp, false) else { return };
                            let _ = send.send_data(Bytes::from_static(b"answer"), false);
                            let mut t = http::HeaderMap::new();
                            t.insert("x-up-trailer", http::HeaderValue::from_static("kept"));
                            let _ = send.send_trailers(t);
                        });
                    }
                });
            }
        });
    });
    addr
}

/// Trailers as Pingora 0.9 carries them, pinned so a change of it is noticed: an upstream's
/// response trailers reach an HTTP/2 client; an HTTP/1.1 client gets the body without them; a
/// client's request trailers are not forwarded (Pingora reads none), while the body still
/// arrives whole (docs/deployment.md).
#[test]
fn trailers_between_http2_peers() {
    let echo = Echo::start();
    let up = start_h2_upstream();
    let tail = format!(
        "\n[upstreams.h2up]\nservers = [\"{up}\"]\nprotocol = \"h2c\"\n\n[[rule]]\nname = \"h2up\"\nmatch = {{ path_prefix = \"/h2/\" }}\nupstream = \"h2up\"\n"
    );
    let gw = Gateway::start(&standard_config(echo.addr, Extra { tail: &tail, ..Extra::default() }));
    let auth = bearer(ACME_KEY);
    runtime().block_on(async {
        let send = h2c(gw.addr).await;
        let mut send = send.ready().await.expect("ready");
        let req = http::Request::builder()
            .method("POST")
            .uri(format!("http://gateway.test:{}/h2/x", gw.addr.port()))
            .header("authorization", &auth)
            .body(())
            .expect("request");
        let (resp, mut body) = send.send_request(req, false).expect("send");
        body.send_data(Bytes::from_static(b"hello"), false).expect("data");
        let mut t = http::HeaderMap::new();
        t.insert("x-client-trailer", http::HeaderValue::from_static("sent"));
        body.send_trailers(t).expect("trailers");
        let resp = tokio::time::timeout(Duration::from_secs(10), resp).await.expect("in time").expect("response");
        let (parts, mut rb) = resp.into_parts();
        assert_eq!(parts.status, 200, "{}", gw.log());
        let header = |n: &str| parts.headers.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
        assert_eq!(header("x-saw-bytes").as_deref(), Some("5"), "the request body arrived whole");
        assert_eq!(header("x-saw-trailers").as_deref(), Some("none"), "request trailers are not forwarded");
        let mut out = Vec::new();
        while let Some(Ok(c)) = rb.data().await {
            let _ = rb.flow_control().release_capacity(c.len());
            out.extend_from_slice(&c);
        }
        assert_eq!(out, b"answer");
        let trailers = rb.trailers().await.expect("trailers").expect("the upstream's trailers");
        assert_eq!(trailers.get("x-up-trailer").and_then(|v| v.to_str().ok()), Some("kept"));
    });
    // HTTP/1.1 with a chunked body and trailers, to the same HTTP/2 upstream.
    let mut c = Conn::open(gw.addr).expect("connect");
    c.send_raw(
        format!(
            "POST /h2/x HTTP/1.1\r\nHost: gateway.test\r\nAuthorization: {auth}\r\nTE: trailers\r\n\
             Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-client-trailer: sent\r\n\r\n"
        )
        .as_bytes(),
    )
    .expect("send");
    let r = c.read_response(false).expect("answer");
    assert_eq!(r.status, 200);
    assert_eq!((r.header("x-saw-bytes"), r.header("x-saw-trailers")), (Some("5"), Some("none")));
    assert_eq!(r.body, b"answer");
}
