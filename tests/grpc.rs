//! gRPC through the gateway: a real `tonic` server behind an `h2c` pool and a real `tonic`
//! client on the plaintext listener (h2c with prior knowledge). Messages are raw bytes through a
//! pass-through codec, so no `.proto` file and no protoc are needed.

mod common;

use bytes::{Buf, BufMut};
use common::*;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

/// Messages are the bytes themselves.
#[derive(Debug, Default, Clone, Copy)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;
type Messages = std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Vec<u8>, Status>> + Send>>;

/// `test.Echo`: `Stream` answers three messages, then ends with OK, or (asked `trailer`) with
/// `OUT_OF_RANGE` and an `x-trailer` metadata entry, both in the trailers after the data; any
/// other method echoes its request, tenant header prefixed, with an `x-upstream` header.
#[derive(Clone)]
struct EchoService;

impl tonic::server::NamedService for EchoService {
    const NAME: &'static str = "test.Echo";
}

struct Unary;

impl tonic::server::UnaryService<Vec<u8>> for Unary {
    type Response = Vec<u8>;
    type Future = BoxFuture<Result<tonic::Response<Vec<u8>>, Status>>;
    fn call(&mut self, req: tonic::Request<Vec<u8>>) -> Self::Future {
        Box::pin(async move {
            let tenant = req.metadata().get("x-tenant-id").and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
            let key_seen = req.metadata().get("authorization").is_some();
            let mut body = format!("{tenant}:{key_seen}:").into_bytes();
            body.extend_from_slice(req.get_ref());
            let mut resp = tonic::Response::new(body);
            resp.metadata_mut().insert("x-upstream", "tonic".parse().expect("value"));
            Ok(resp)
        })
    }
}

struct ServerStream;

impl tonic::server::ServerStreamingService<Vec<u8>> for ServerStream {
    type Response = Vec<u8>;
    type ResponseStream = Messages;
    type Future = BoxFuture<Result<tonic::Response<Messages>, Status>>;
    fn call(&mut self, req: tonic::Request<Vec<u8>>) -> Self::Future {
        let fail = req.get_ref() == b"trailer";
        Box::pin(async move {
            let mut items: Vec<Result<Vec<u8>, Status>> =
                (1..=3).map(|i| Ok(format!("msg {i}").into_bytes())).collect();
            if fail {
                let mut md = tonic::metadata::MetadataMap::new();
                md.insert("x-trailer", "kept".parse().expect("value"));
                items.push(Err(Status::with_metadata(Code::OutOfRange, "no more messages", md)));
            }
            let stream: Messages = Box::pin(futures_util::stream::iter(items));
            Ok(tonic::Response::new(stream))
        })
    }
}

impl<B> tonic::codegen::Service<http::Request<B>> for EchoService
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() == "/test.Echo/Stream" {
            Box::pin(async move { Ok(tonic::server::Grpc::new(Raw).server_streaming(ServerStream, req).await) })
        } else {
            Box::pin(async move { Ok(tonic::server::Grpc::new(Raw).unary(Unary, req).await) })
        }
    }
}

/// Starts the tonic server on its own runtime thread; returns its address.
fn start_tonic() -> SocketAddr {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("rt");
        rt.block_on(async move {
            let _ = tonic::transport::Server::builder().add_service(EchoService).serve(addr).await;
        });
    });
    for _ in 0..200 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return addr;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the tonic server did not start");
}

fn config(echo: SocketAddr, grpc: SocketAddr) -> String {
    let tail = format!(
        r#"
[upstreams.grpc]
servers = ["{grpc}"]
protocol = "h2c"
connect_timeout = "500ms"

[upstreams.grpc_dead]
servers = ["127.0.0.1:{dead}"]
protocol = "h2c"
connect_timeout = "500ms"

[[rule]]
name = "grpc-limited"
match = {{ path = "/test.Echo/Limited" }}
upstream = "grpc"
rate.pro = {{ requests_per_minute = 1, burst = 1 }}

[[rule]]
name = "grpc-dead"
match = {{ path_prefix = "/test.Dead/" }}
upstream = "grpc_dead"

[[rule]]
name = "grpc"
match = {{ path_prefix = "/test.Echo/" }}
upstream = "grpc"
"#,
        dead = free_port()
    );
    standard_config(echo, Extra { tail: &tail, ..Extra::default() })
}

async fn client(gw: SocketAddr) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{gw}"))
        .expect("uri")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connect to the gateway");
    tonic::client::Grpc::new(channel)
}

fn request(msg: &[u8], key: Option<&str>) -> tonic::Request<Vec<u8>> {
    let mut req = tonic::Request::new(msg.to_vec());
    if let Some(k) = key {
        req.metadata_mut().insert("authorization", bearer(k).parse().expect("value"));
    }
    req
}

async fn unary(
    c: &mut tonic::client::Grpc<tonic::transport::Channel>,
    path: &'static str,
    req: tonic::Request<Vec<u8>>,
) -> Result<tonic::Response<Vec<u8>>, Status> {
    c.ready().await.expect("ready");
    c.unary(req, http::uri::PathAndQuery::from_static(path), Raw).await
}

#[test]
fn grpc_calls_pass_through_with_their_trailers() {
    let echo = Echo::start();
    let grpc = start_tonic();
    let gw = Gateway::start(&config(echo.addr, grpc));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    rt.block_on(async {
        let mut c = client(gw.addr).await;

        // Unary, keyed: forwarded over h2c upstream, the tenant injected, the key not forwarded.
        let r = unary(&mut c, "/test.Echo/Say", request(b"hello", Some(ACME_KEY)))
            .await
            .unwrap_or_else(|s| panic!("{s:?}\n{}", gw.log()));
        assert_eq!(r.get_ref(), b"acme:false:hello");
        assert_eq!(r.metadata().get("x-upstream").and_then(|v| v.to_str().ok()), Some("tonic"));

        // Server streaming: three messages, then the OK status in the trailers.
        c.ready().await.expect("ready");
        let resp = c
            .server_streaming(
                request(b"ok", Some(ACME_KEY)),
                http::uri::PathAndQuery::from_static("/test.Echo/Stream"),
                Raw,
            )
            .await
            .expect("stream");
        let mut stream = resp.into_inner();
        let mut got = Vec::new();
        while let Some(m) = stream.message().await.expect("message") {
            got.push(String::from_utf8(m).expect("utf8"));
        }
        assert_eq!(got, ["msg 1", "msg 2", "msg 3"]);

        // The same, ending in an error status with metadata: both arrive after the data.
        c.ready().await.expect("ready");
        let resp = c
            .server_streaming(
                request(b"trailer", Some(ACME_KEY)),
                http::uri::PathAndQuery::from_static("/test.Echo/Stream"),
                Raw,
            )
            .await
            .expect("stream");
        let mut stream = resp.into_inner();
        let mut n = 0;
        let status = loop {
            match stream.message().await {
                Ok(Some(_)) => n += 1,
                Ok(None) => panic!("the stream ended without its trailers' status"),
                Err(s) => break s,
            }
        };
        assert_eq!(n, 3);
        assert_eq!((status.code(), status.message()), (Code::OutOfRange, "no more messages"));
        assert_eq!(status.metadata().get("x-trailer").and_then(|v| v.to_str().ok()), Some("kept"));
    });
}

#[test]
fn grpc_refusals_are_grpc_statuses() {
    let echo = Echo::start();
    let grpc = start_tonic();
    let gw = Gateway::start(&config(echo.addr, grpc));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    rt.block_on(async {
        let mut c = client(gw.addr).await;

        // No key: UNAUTHENTICATED, with the problem's detail as the message.
        let s = unary(&mut c, "/test.Echo/Say", request(b"x", None)).await.expect_err("refused");
        assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
        assert!(s.message().contains("API key"), "{s:?}");
        assert_eq!(s.metadata().get("tollgate-error-code").and_then(|v| v.to_str().ok()), Some("missing_key"));
        assert!(s.metadata().get("x-request-id").is_some());

        // A revoked key: UNAUTHENTICATED too; a key without the tenant's scope is not needed here.
        let s = unary(&mut c, "/test.Echo/Say", request(b"x", Some(REVOKED_KEY))).await.expect_err("refused");
        assert_eq!(s.code(), Code::Unauthenticated);

        // Rate limited: the first call passes, the second is RESOURCE_EXHAUSTED, with the
        // rate-limit headers as metadata.
        let r = unary(&mut c, "/test.Echo/Limited", request(b"x", Some(ACME_KEY))).await.expect("first call");
        assert_eq!(r.metadata().get("x-ratelimit-limit").and_then(|v| v.to_str().ok()), Some("1"));
        let s = unary(&mut c, "/test.Echo/Limited", request(b"x", Some(ACME_KEY))).await.expect_err("limited");
        assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
        let md = |k: &str| s.metadata().get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
        assert_eq!(md("x-ratelimit-limit").as_deref(), Some("1"));
        assert_eq!(md("x-ratelimit-remaining").as_deref(), Some("0"));
        assert!(md("retry-after").is_some_and(|v| v.parse::<u64>().is_ok_and(|n| n >= 1)), "{s:?}");

        // An upstream nobody listens on: UNAVAILABLE.
        let s = unary(&mut c, "/test.Dead/Say", request(b"x", Some(ACME_KEY))).await.expect_err("unavailable");
        assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    });
}
