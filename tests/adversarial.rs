//! The raw-socket adversarial suite: request shapes an attacker would try, each sent as exact
//! bytes to the real gateway in front of the real echo upstream, with the status, the problem
//! code and whether the upstream was reached, all checked. Then the connection edge: slow
//! heads, idle keep-alive, connection caps, and logs that never hold a secret.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const ADMIN_TOKEN: &str = "tg_admin_adversarialTokenZZZZZZZZZZZZZZZZZZZZZ";

fn config(echo: SocketAddr, server: &str) -> String {
    let tail = format!(
        r#"
[[rule]]
name = "deny-internal"
match = {{ path_glob = "/internal/**" }}
deny = {{ status = 403, message = "Internal." }}

[[rule]]
name = "deny-dotfiles"
match = {{ path_glob = "/**/.*/**" }}
deny = {{ status = 404, message = "Not found." }}

[[rule]]
name = "no-delete"
match = {{ path = "/thing", methods = ["DELETE"] }}
deny = {{ status = 403, message = "Nothing is deleted here." }}

[[rule]]
name = "generate"
match = {{ path = "/generate" }}
charge = {{ metric = "records", cost_from_query = "num_rows", max_cost = 1000 }}

[[rule]]
name = "no-debug"
match = {{ path_prefix = "/debug", headers = {{ "x-debug" = "1" }} }}
deny = {{ status = 403, message = "No debugging." }}

[[rule]]
name = "no-admin-flag"
match = {{ path_prefix = "/debug", query = {{ admin = "true" }} }}
deny = {{ status = 403, message = "No admin flag." }}

[[rule]]
name = "plan"
match = {{ path = "/plan" }}
set_request_headers = {{ "x-user-plan" = "basic" }}

[[rule]]
name = "upload"
match = {{ path = "/upload" }}
max_body = "1KiB"
public = true

[admin]
token_hash = "{}"
"#,
        hash_of(ADMIN_TOKEN)
    );
    standard_config(
        echo,
        Extra {
            top: r#"usage_metrics = ["records"]"#,
            server,
            tenancy: r#"resolve = ["api_key", "subdomain", "path"]"#,
            tail: &tail,
        },
    )
}

/// One request shape and what must happen to it.
struct Case {
    name: &'static str,
    raw: Vec<u8>,
    status: u16,
    /// The problem code; `Some("")` for an answer with no problem body (none is expected: the
    /// parser's own refusals are answered as problem documents too, see `src/guard.rs`), `None`
    /// for an upstream answer.
    code: Option<&'static str>,
    reached: bool,
    /// The path (and query) the upstream must have seen.
    upstream_target: Option<&'static str>,
}

fn raw(line: &str, headers: &[&str], body: &str) -> Vec<u8> {
    let mut s = format!("{line}\r\n");
    for h in headers {
        s.push_str(h);
        s.push_str("\r\n");
    }
    s.push_str("\r\n");
    s.push_str(body);
    s.into_bytes()
}

fn refused(name: &'static str, raw: Vec<u8>, status: u16, code: &'static str) -> Case {
    Case { name, raw, status, code: Some(code), reached: false, upstream_target: None }
}

fn passed(name: &'static str, raw: Vec<u8>, target: Option<&'static str>) -> Case {
    Case { name, raw, status: 200, code: None, reached: true, upstream_target: target }
}

fn cases() -> Vec<Case> {
    let acme = format!("Authorization: Bearer {ACME_KEY}");
    let globex = format!("Authorization: Bearer {GLOBEX_KEY}");
    let a = acme.as_str();
    let g = globex.as_str();
    let h = "Host: gateway.test";
    let big = format!("X-Big: {}", "b".repeat(20 * 1024));
    let many: Vec<String> = (0..300).map(|i| format!("X-Many-{i}: v")).collect();
    let many: Vec<&str> = std::iter::once(h).chain(many.iter().map(String::as_str)).collect();
    let body2k = "x".repeat(2048);
    let long_url = format!("GET /api/{} HTTP/1.1", "u".repeat(20 * 1024));
    let huge_head = format!("X-Huge: {}", "h".repeat(1100 * 1024));
    vec![
        // Request-target forms (RFC 9112 section 3.2).
        refused("relative target .env", raw("GET .env HTTP/1.1", &[h], ""), 400, "invalid_target"),
        refused(
            "relative target into a denied dir",
            raw("GET internal/secret.txt HTTP/1.1", &[h], ""),
            400,
            "invalid_target",
        ),
        refused(
            "relative target with an oversized body",
            raw("POST upload HTTP/1.1", &[h, "Content-Length: 2048"], &body2k),
            400,
            "invalid_target",
        ),
        refused("authority-form", raw("GET 127.0.0.1:19000 HTTP/1.1", &[h], ""), 400, "invalid_target"),
        refused("asterisk-form", raw("OPTIONS * HTTP/1.1", &[h], ""), 400, "invalid_target"),
        refused("CONNECT tunnel", raw("CONNECT 127.0.0.1:443 HTTP/1.1", &[h], ""), 400, "bad_request"),
        refused("other scheme", raw("GET ftp://gateway.test/x HTTP/1.1", &[h], ""), 400, "invalid_target"),
        refused("userinfo in target", raw("GET http://u:p@gateway.test/x HTTP/1.1", &[h], ""), 400, "bad_request"),
        refused(
            "userinfo in target, no Host",
            raw("GET http://u:p@gateway.test/x HTTP/1.1", &[], ""),
            400,
            "bad_request",
        ),
        passed(
            "absolute-form without Host",
            raw("GET http://gateway.test/api/x?a=1 HTTP/1.1", &[a], ""),
            Some("/api/x?a=1"),
        ),
        passed(
            "absolute-form agreeing with Host",
            raw("GET https://gateway.test/api/y HTTP/1.1", &[h, a], ""),
            Some("/api/y"),
        ),
        passed(
            "absolute-form, upper-case, no Host",
            raw("GET HTTP://GATEWAY.TEST./api/z HTTP/1.1", &[a], ""),
            Some("/api/z"),
        ),
        refused(
            "absolute-form spelled unlike Host",
            raw("GET HTTPS://GATEWAY.test./api/y HTTP/1.1", &[h, a], ""),
            400,
            "bad_request",
        ),
        refused(
            "absolute-form disagreeing with Host",
            raw("GET http://evil.test/api/x HTTP/1.1", &[h, a], ""),
            400,
            "bad_request",
        ),
        refused(
            "absolute-form into a denied dir",
            raw("GET http://gateway.test/internal/x HTTP/1.1", &[a], ""),
            403,
            "denied",
        ),
        // Path spellings: each must meet the deny rule, or be refused.
        refused("plain denied path", raw("GET /internal/x HTTP/1.1", &[h, a], ""), 403, "denied"),
        refused("encoded letter", raw("GET /%69nternal/x HTTP/1.1", &[h, a], ""), 403, "denied"),
        refused("encoded letter, lower hex", raw("GET /%69%6etern%61l/x HTTP/1.1", &[h, a], ""), 403, "denied"),
        refused("dot-dot", raw("GET /api/../internal/x HTTP/1.1", &[h, a], ""), 403, "denied"),
        refused("double slash", raw("GET //internal/x HTTP/1.1", &[h, a], ""), 403, "denied"),
        refused("dot segment", raw("GET /./internal/x HTTP/1.1", &[h, a], ""), 403, "denied"),
        refused("encoded dot-dot", raw("GET /api/%2e%2e/internal/x HTTP/1.1", &[h, a], ""), 403, "denied"),
        refused("dot-dot above the root", raw("GET /../../internal/x HTTP/1.1", &[h, a], ""), 403, "denied"),
        refused("encoded slash", raw("GET /internal%2fx HTTP/1.1", &[h, a], ""), 400, "invalid_target"),
        refused("encoded backslash", raw("GET /internal%5cx HTTP/1.1", &[h, a], ""), 400, "invalid_target"),
        refused("raw backslash", raw("GET /internal\\x HTTP/1.1", &[h, a], ""), 400, "invalid_target"),
        refused("semicolon parameter", raw("GET /internal;x=1/y HTTP/1.1", &[h, a], ""), 400, "invalid_target"),
        refused("encoded NUL", raw("GET /internal%00/x HTTP/1.1", &[h, a], ""), 400, "invalid_target"),
        refused("broken escape", raw("GET /api/%zz HTTP/1.1", &[h, a], ""), 400, "invalid_target"),
        refused("dotfile", raw("GET /.env HTTP/1.1", &[h, a], ""), 404, "denied"),
        refused("dot dir", raw("GET /app/.git/config HTTP/1.1", &[h, a], ""), 404, "denied"),
        refused("encoded dotfile", raw("GET /%2eenv HTTP/1.1", &[h, a], ""), 404, "denied"),
        passed(
            "encoded unreserved forwarded decoded",
            raw("GET /api/%78%2D1?n%75m=%7e HTTP/1.1", &[h, a], ""),
            Some("/api/x-1?num=~"),
        ),
        passed("dot segments forwarded resolved", raw("GET /api/./a/../b//c HTTP/1.1", &[h, a], ""), Some("/api/b/c")),
        passed("other escapes kept, upper-cased", raw("GET /caf%c3%a9 HTTP/1.1", &[h, a], ""), Some("/caf%C3%A9")),
        // Methods are case-sensitive.
        refused("lower-case delete", raw("delete /thing HTTP/1.1", &[h, a], ""), 405, "method_not_allowed"),
        refused("mixed-case Delete", raw("Delete /thing HTTP/1.1", &[h, a], ""), 405, "method_not_allowed"),
        refused("DELETE meets its deny", raw("DELETE /thing HTTP/1.1", &[h, a], ""), 403, "denied"),
        refused("lower-case get", raw("get /api/x HTTP/1.1", &[h, a], ""), 405, "method_not_allowed"),
        refused("TRACE", raw("TRACE /api/x HTTP/1.1", &[h, a], ""), 405, "method_not_allowed"),
        refused("unknown method", raw("FOO /api/x HTTP/1.1", &[h, a], ""), 405, "method_not_allowed"),
        passed("PATCH", raw("PATCH /api/x HTTP/1.1", &[h, a, "Content-Length: 0"], ""), Some("/api/x")),
        // Host.
        refused("no Host, HTTP/1.1", raw("GET /api/x HTTP/1.1", &[a], ""), 400, "invalid_host"),
        refused("no Host, HTTP/1.0", raw("GET /api/x HTTP/1.0", &[a], ""), 400, "invalid_host"),
        refused("two Hosts", raw("GET /api/x HTTP/1.1", &[h, "Host: acme.example.test", a], ""), 400, "bad_request"),
        refused("empty Host", raw("GET /api/x HTTP/1.1", &["Host: ", a], ""), 400, "invalid_host"),
        refused(
            "Host with an empty label",
            raw("GET /api/x HTTP/1.1", &["Host: acme..example.test", a], ""),
            400,
            "invalid_host",
        ),
        refused(
            "Host with a bad port",
            raw("GET /api/x HTTP/1.1", &["Host: acme.example.test:99999", a], ""),
            400,
            "invalid_host",
        ),
        refused(
            "Host with user info",
            raw("GET /api/x HTTP/1.1", &["Host: x@acme.example.test", a], ""),
            400,
            "bad_request",
        ),
        passed("IPv6 literal Host", raw("GET /api/x HTTP/1.1", &["Host: [::1]:8080", a], ""), Some("/api/x")),
        // Tenant spellings: a globex key on acme's host or prefix is always a mismatch.
        refused("subdomain", raw("GET /api/x HTTP/1.1", &["Host: acme.example.test", g], ""), 403, "tenant_mismatch"),
        refused(
            "subdomain, trailing dot",
            raw("GET /api/x HTTP/1.1", &["Host: acme.example.test.", g], ""),
            403,
            "tenant_mismatch",
        ),
        refused(
            "subdomain, upper case and port",
            raw("GET /api/x HTTP/1.1", &["Host: ACME.Example.Test:8443", g], ""),
            403,
            "tenant_mismatch",
        ),
        refused(
            "subdomain in absolute-form",
            raw("GET http://acme.example.test/api/x HTTP/1.1", &[g], ""),
            403,
            "tenant_mismatch",
        ),
        refused("path prefix", raw("GET /t/acme/api/x HTTP/1.1", &[h, g], ""), 403, "tenant_mismatch"),
        refused(
            "path prefix after a double slash",
            raw("GET //t/acme/api/x HTTP/1.1", &[h, g], ""),
            403,
            "tenant_mismatch",
        ),
        refused(
            "path prefix with an encoded t",
            raw("GET /%74/acme/api/x HTTP/1.1", &[h, g], ""),
            403,
            "tenant_mismatch",
        ),
        refused(
            "path prefix with an encoded tenant",
            raw("GET /t/%61cme/api/x HTTP/1.1", &[h, g], ""),
            403,
            "tenant_mismatch",
        ),
        refused("path prefix in upper case", raw("GET /t/ACME/api/x HTTP/1.1", &[h, g], ""), 403, "tenant_mismatch"),
        refused(
            "path prefix behind dot-dot",
            raw("GET /x/../t/acme/api HTTP/1.1", &[h, g], ""),
            403,
            "tenant_mismatch",
        ),
        passed("own path prefix, stripped", raw("GET //t/acme/api/x HTTP/1.1", &[h, a], ""), Some("/api/x")),
        // Framing.
        refused(
            "two equal Content-Lengths",
            raw("POST /api/x HTTP/1.1", &[h, a, "Content-Length: 3", "Content-Length: 3"], "abc"),
            400,
            "duplicate_header",
        ),
        refused(
            "two different Content-Lengths",
            raw("POST /api/x HTTP/1.1", &[h, a, "Content-Length: 3", "Content-Length: 4"], "abcd"),
            400,
            "bad_request",
        ),
        refused(
            "comma-joined Content-Length",
            raw("POST /api/x HTTP/1.1", &[h, a, "Content-Length: 3, 3"], "abc"),
            400,
            "duplicate_header",
        ),
        refused(
            "non-numeric Content-Length",
            raw("POST /api/x HTTP/1.1", &[h, a, "Content-Length: abc"], ""),
            400,
            "bad_request",
        ),
        refused(
            "signed Content-Length",
            raw("POST /api/x HTTP/1.1", &[h, a, "Content-Length: +3"], "abc"),
            400,
            "bad_request",
        ),
        refused(
            "Transfer-Encoding other than chunked",
            raw("POST /api/x HTTP/1.1", &[h, a, "Transfer-Encoding: gzip, chunked"], "3\r\nabc\r\n0\r\n\r\n"),
            400,
            "bad_request",
        ),
        refused(
            "Transfer-Encoding twice",
            raw(
                "POST /api/x HTTP/1.1",
                &[h, a, "Transfer-Encoding: chunked", "Transfer-Encoding: chunked"],
                "3\r\nabc\r\n0\r\n\r\n",
            ),
            400,
            "bad_request",
        ),
        passed(
            "Transfer-Encoding with Content-Length: chunked wins",
            raw(
                "POST /api/x HTTP/1.1",
                &[h, a, "Content-Length: 99", "Transfer-Encoding: chunked"],
                "3\r\nabc\r\n0\r\n\r\n",
            ),
            Some("/api/x"),
        ),
        refused(
            "bad chunk size",
            raw("POST /api/x HTTP/1.1", &[h, a, "Transfer-Encoding: chunked"], "zz\r\nabc\r\n0\r\n\r\n"),
            400,
            "bad_request",
        ),
        refused(
            "Connection names X-Forwarded-For",
            raw("GET /api/x HTTP/1.1", &[h, a, "Connection: X-Forwarded-For"], ""),
            400,
            "bad_request",
        ),
        refused(
            "Connection names a tenant header",
            raw("GET /api/x HTTP/1.1", &[h, a, "Connection: close, x-tenant-id"], ""),
            400,
            "bad_request",
        ),
        refused(
            "Connection names the credential",
            raw("GET /api/x HTTP/1.1", &[h, a, "Connection: authorization"], ""),
            400,
            "bad_request",
        ),
        refused(
            "underscore tenant header",
            raw("GET /api/x HTTP/1.1", &[h, a, "X_Tenant_ID: globex"], ""),
            400,
            "bad_request",
        ),
        refused(
            "underscore forwarded-for",
            raw("GET /api/x HTTP/1.1", &[h, a, "X_Forwarded_For: 10.0.0.1"], ""),
            400,
            "bad_request",
        ),
        passed(
            "Connection keep-alive",
            raw("GET /api/x HTTP/1.1", &[h, a, "Connection: keep-alive"], ""),
            Some("/api/x"),
        ),
        // Sizes and header syntax.
        refused("oversized URL", raw(&long_url, &[h, a], ""), 431, "headers_too_large"),
        refused(
            "head over the parser's 1 MiB",
            raw("GET /api/x HTTP/1.1", &[h, a, &huge_head], ""),
            431,
            "headers_too_large",
        ),
        refused("oversized header", raw("GET /api/x HTTP/1.1", &[h, a, &big], ""), 431, "headers_too_large"),
        refused("too many headers", raw("GET /api/x HTTP/1.1", &many, ""), 400, "bad_request"),
        refused("header without a colon", raw("GET /api/x HTTP/1.1", &[h, a, "NoColonHere"], ""), 400, "bad_request"),
        refused("space before the colon", raw("GET /api/x HTTP/1.1", &[h, a, "X-Test : 1"], ""), 400, "bad_request"),
        refused(
            "obsolete line folding",
            raw("GET /api/x HTTP/1.1", &[h, a, "X-Test: 1", " folded"], ""),
            400,
            "bad_request",
        ),
        refused("garbage request line", raw("HELLO", &[h], ""), 400, "bad_request"),
        refused("unknown version", raw("GET /api/x HTTP/3.0", &[h, a], ""), 400, "bad_request"),
        refused(
            "body over max_body, declared",
            raw("POST /upload HTTP/1.1", &[h, "Content-Length: 2048"], &body2k),
            413,
            "body_too_large",
        ),
        refused(
            "body over max_body, chunked",
            raw("POST /upload HTTP/1.1", &[h, "Transfer-Encoding: chunked"], &format!("800\r\n{body2k}\r\n0\r\n\r\n")),
            413,
            "body_too_large",
        ),
        // Charges: the cost the gateway reads is the one the upstream acts on.
        passed(
            "charged by the query",
            raw("POST /generate?num_rows=5 HTTP/1.1", &[h, a, "Content-Length: 0"], ""),
            Some("/generate?num_rows=5"),
        ),
        refused(
            "cost named twice",
            raw("POST /generate?num_rows=1&num_rows=900 HTTP/1.1", &[h, a, "Content-Length: 0"], ""),
            400,
            "bad_request",
        ),
        refused(
            "cost named twice, once encoded",
            raw("POST /generate?num_rows=1&n%75m_rows=900 HTTP/1.1", &[h, a, "Content-Length: 0"], ""),
            400,
            "bad_request",
        ),
        refused(
            "encoded cost over the maximum",
            raw("POST /generate?n%75m_rows=5000 HTTP/1.1", &[h, a, "Content-Length: 0"], ""),
            400,
            "invalid_cost",
        ),
        // Rule conditions and rule-set headers: read once, as the upstream reads them.
        refused("condition header", raw("GET /debug HTTP/1.1", &[h, a, "X-Debug: 1"], ""), 403, "denied"),
        refused(
            "condition header twice",
            raw("GET /debug HTTP/1.1", &[h, a, "X-Debug: 0", "X-Debug: 1"], ""),
            400,
            "duplicate_header",
        ),
        refused("condition query", raw("GET /debug?admin=true HTTP/1.1", &[h, a], ""), 403, "denied"),
        refused(
            "condition query twice",
            raw("GET /debug?admin=false&admin=true HTTP/1.1", &[h, a], ""),
            400,
            "bad_request",
        ),
        refused(
            "condition query twice, encoded",
            raw("GET /debug?admin=false&%61dmin=true HTTP/1.1", &[h, a], ""),
            400,
            "bad_request",
        ),
        refused(
            "underscore spelling of a rule-set header",
            raw("GET /plan HTTP/1.1", &[h, a, "X_User_Plan: enterprise"], ""),
            400,
            "bad_request",
        ),
        refused(
            "Connection names any other header",
            raw("GET /debug HTTP/1.1", &[h, a, "Connection: x-debug"], ""),
            400,
            "bad_request",
        ),
        refused(
            "Connection with ten tokens",
            raw("GET /api/x HTTP/1.1", &[h, a, "Connection: a, b, c, d, e, f, g, h, i, j"], ""),
            400,
            "bad_request",
        ),
        // Credentials.
        refused(
            "two different keys",
            raw("GET /api/x HTTP/1.1", &[h, a, &format!("X-API-Key: {GLOBEX_KEY}")], ""),
            400,
            "bad_request",
        ),
        refused("Authorization twice", raw("GET /api/x HTTP/1.1", &[h, a, g], ""), 400, "duplicate_header"),
        refused(
            "key in the query is not a key",
            raw(&format!("GET /api/x?api_key={ACME_KEY} HTTP/1.1"), &[h], ""),
            401,
            "missing_key",
        ),
    ]
}

/// Sends `raw` on a fresh connection and reads one answer.
fn send(addr: SocketAddr, raw: &[u8]) -> Resp {
    let mut conn = Conn::open(addr).expect("connect");
    conn.send_raw(raw).expect("send");
    conn.read_response(false).unwrap_or_else(|e| panic!("no answer: {e}"))
}

#[test]
fn request_shapes_get_their_documented_answers() {
    let echo = Echo::start();
    let gw = Gateway::start(&config(echo.addr, ""));
    let cases = cases();
    assert!(cases.len() >= 60, "the suite keeps at least 60 shapes, has {}", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let before = echo.hits();
        let resp = send(gw.addr, &case.raw);
        // The echo counts a request before answering; give a forwarded one a moment to land.
        let reached = echo.hits() > before;
        let code = if resp.header("content-type") == Some("application/problem+json") {
            Some(resp.problem_code())
        } else if resp.status >= 400 && resp.body.is_empty() {
            Some(String::new())
        } else {
            None
        };
        let mut wrong = Vec::new();
        if resp.status != case.status {
            wrong.push(format!("status {} (want {})", resp.status, case.status));
        }
        if code.as_deref() != case.code {
            wrong.push(format!("code {code:?} (want {:?})", case.code));
        }
        if reached != case.reached {
            wrong.push(format!("reached upstream: {reached} (want {})", case.reached));
        }
        if let (Some(want), true) = (case.upstream_target, resp.status == 200) {
            let v = resp.json();
            let q = v["query"].as_str().unwrap_or_default();
            let got = if q.is_empty() {
                v["path"].as_str().unwrap_or_default().to_string()
            } else {
                format!("{}?{q}", v["path"].as_str().unwrap_or_default())
            };
            if got != want {
                wrong.push(format!("upstream saw `{got}` (want `{want}`)"));
            }
            if v["headers"]["host"].as_str().is_none_or(str::is_empty) {
                wrong.push("upstream got no Host".into());
            }
        }
        if !wrong.is_empty() {
            failures.push(format!("{}: {}", case.name, wrong.join(", ")));
        }
    }
    assert!(failures.is_empty(), "{} of {} shapes misbehaved:\n{}", failures.len(), cases.len(), failures.join("\n"));

    // Logs never hold a key or the admin token, even for heads Pingora could not parse; the
    // admin listener gets a malformed head carrying its token.
    let mut conn = Conn::open(gw.admin).expect("admin");
    conn.send_raw(
        format!("GET /v1/tenants HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nBad Header\r\n\r\n")
            .as_bytes(),
    )
    .expect("send");
    let _ = conn.read_response(false);
    std::thread::sleep(Duration::from_millis(300));
    let log = gw.log();
    for secret in [ACME_KEY, GLOBEX_KEY, ADMIN_TOKEN] {
        assert!(!log.contains(secret), "a secret reached the log:\n{log}");
    }
    assert!(!log.contains("buf:"), "a raw request head reached the log:\n{log}");
}

#[test]
fn origin_headers_from_clients_are_replaced() {
    let echo = Echo::start();
    let gw = Gateway::start(&config(echo.addr, ""));
    let auth = bearer(ACME_KEY);
    let r = gw.get(
        "/api/x",
        &[
            ("host", "gateway.test"),
            ("authorization", &auth),
            ("x-real-ip", "6.6.6.6"),
            ("forwarded", "for=6.6.6.6;host=admin.internal;proto=https"),
            ("x-forwarded-host", "evil.test"),
            ("x-forwarded-port", "8443"),
            ("x-forwarded-for", "6.6.6.6"),
            ("true-client-ip", "6.6.6.6"),
            ("cf-connecting-ip", "6.6.6.6"),
        ],
    );
    assert_eq!(r.status, 200);
    let up = r.upstream_headers();
    for gone in ["forwarded", "x-forwarded-host", "x-forwarded-port", "true-client-ip", "cf-connecting-ip"] {
        assert!(up.get(gone).is_none(), "`{gone}` from an untrusted client reached the upstream: {up}");
    }
    assert_eq!(up["x-real-ip"], "127.0.0.1");
    assert_eq!(up["x-forwarded-for"], "127.0.0.1");
}

#[test]
fn a_trusted_proxys_whole_chain_reaches_the_upstream() {
    let echo = Echo::start();
    let gw = Gateway::start(&standard_config(
        echo.addr,
        Extra { tenancy: r#"trusted_proxies = ["127.0.0.1/32"]"#, ..Extra::default() },
    ));
    let auth = bearer(ACME_KEY);
    let r =
        gw.get("/api/x", &[("authorization", &auth), ("x-forwarded-for", "1.2.3.4"), ("x-forwarded-for", "6.6.6.6")]);
    assert_eq!(r.status, 200);
    let up = r.upstream_headers();
    // The gateway took 6.6.6.6 (the right-most untrusted entry) as the client; the upstream sees
    // the same chain it was read from.
    assert_eq!(up["x-forwarded-for"], "1.2.3.4, 6.6.6.6, 127.0.0.1");
    assert_eq!(up["x-real-ip"], "6.6.6.6");
}

#[test]
fn crafted_paths_cost_linear_time() {
    // `/**/.*/**` (the dotfile rule) against 5,000 dot segments, and a two-star segment pattern
    // against a 15,000-character segment: with a matcher that tries every split point these took
    // seconds of CPU on one worker. Linear matching answers at once even in a debug build.
    let echo = Echo::start();
    let tail = r#"
[[rule]]
name = "json-files"
match = { path_glob = "/files/*-*.json" }
deny = { status = 403, message = "No." }
"#;
    let gw = Gateway::start(&config(echo.addr, "").replace("[admin]", &format!("{tail}\n[admin]")));
    let auth = bearer(ACME_KEY);
    let dots = format!("/{}x", ".a/".repeat(5_000));
    let long_segment = format!("/files/{}", "-".repeat(15_000));
    for (path, status) in [(dots.as_str(), 404), (long_segment.as_str(), 200)] {
        let start = Instant::now();
        let r = gw.get(path, &[("host", "gateway.test"), ("authorization", &auth)]);
        let took = start.elapsed();
        assert_eq!(r.status, status, "{}", r.text());
        assert!(took < Duration::from_secs(1), "a {}-byte path took {took:?}", path.len());
    }
}

#[test]
fn pipelined_requests_are_all_answered_in_order() {
    let echo = Echo::start();
    let gw = Gateway::start(&config(echo.addr, ""));
    let auth = format!("Authorization: Bearer {ACME_KEY}");
    let mut batch = Vec::new();
    for p in ["/api/one", "/api/two", "/api/three"] {
        batch.extend(raw(&format!("GET {p} HTTP/1.1"), &["Host: gateway.test", &auth], ""));
    }
    let mut conn = Conn::open(gw.addr).expect("connect");
    conn.send_raw(&batch).expect("send");
    for p in ["/api/one", "/api/two", "/api/three"] {
        let r = conn.read_response(false).expect("answer");
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["path"], p);
    }
}

/// Whether the server closed `s` within `within` (reads until EOF or an error).
fn closed_within(s: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
    let mut buf = [0u8; 4096];
    while start.elapsed() < within {
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

#[test]
fn slow_heads_and_idle_connections_are_closed_quietly() {
    let echo = Echo::start();
    let gw = Gateway::start(&config(echo.addr, "header_timeout = \"2s\"\nidle_timeout = \"3s\""));

    // A head sent one byte at a time: closed at the head deadline, though every byte arrives
    // well within any per-read timeout.
    let mut slow = TcpStream::connect(gw.addr).expect("connect");
    slow.write_all(b"GET /api/x HTTP/1.1\r\nHost: gateway.test\r\n").expect("write");
    let start = Instant::now();
    let mut closed_at = None;
    while start.elapsed() < Duration::from_secs(8) {
        if slow.write_all(b"X").is_err() || closed_within(&mut slow, Duration::from_millis(250)).is_some() {
            closed_at = Some(start.elapsed());
            break;
        }
    }
    let took = closed_at.expect("a byte-a-time head was still open after 8 s");
    assert!(took >= Duration::from_millis(1500) && took < Duration::from_secs(5), "closed after {took:?}");

    // A connection that sends nothing is closed at the head deadline too.
    let mut silent = TcpStream::connect(gw.addr).expect("connect");
    let t = closed_within(&mut silent, Duration::from_secs(6)).expect("silent connection closed");
    assert!(t >= Duration::from_millis(1500), "closed too early: {t:?}");

    // Keep-alive: a second request within the idle time is served; then idle, it is closed.
    let mut conn = Conn::open(gw.addr).expect("connect");
    let auth = bearer(ACME_KEY);
    let hdrs = [("host", "gateway.test"), ("authorization", auth.as_str())];
    assert_eq!(conn.request("GET", "/api/a", &hdrs, b"").expect("first").status, 200);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(conn.request("GET", "/api/b", &hdrs, b"").expect("second").status, 200);
    let mut idle = TcpStream::connect(gw.addr).expect("connect");
    idle.write_all(&build_request("GET", "/api/c", &hdrs, b"")).expect("send");
    read_one_answer(&mut idle);
    let t = closed_within(&mut idle, Duration::from_secs(8)).expect("idle keep-alive closed");
    assert!(t >= Duration::from_secs(2), "idle connection closed after {t:?}, before idle_timeout");

    // A slow body is not a slow head: once the head is in, its deadline no longer applies,
    // though the whole exchange outlasts it.
    let mut body = Conn::open(gw.addr).expect("connect");
    std::thread::sleep(Duration::from_millis(1200));
    body.send_raw(format!("POST /api/slow HTTP/1.1\r\nHost: gateway.test\r\nContent-Length: 3\r\nAuthorization: Bearer {ACME_KEY}\r\n\r\na").as_bytes())
        .expect("send");
    std::thread::sleep(Duration::from_millis(1200));
    body.send_raw(b"bc").expect("send");
    assert_eq!(body.read_response(false).expect("answer").status, 200);

    std::thread::sleep(Duration::from_millis(200));
    let log = gw.log();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "closing slow or idle connections logged errors:\n{}", errors.join("\n"));
}

/// Reads one `Content-Length` answer off `s`, leaving the connection open.
fn read_one_answer(s: &mut TcpStream) {
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        let n = s.read(&mut b).expect("read");
        assert!(n > 0, "closed before answering");
        buf.extend_from_slice(&b[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("content-length");
        if buf.len() >= end + 4 + len {
            return;
        }
    }
}

fn metric(gw: &Gateway, prefix: &str) -> f64 {
    let text = get(gw.admin, "/metrics", &[]).expect("metrics").text();
    text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

#[test]
fn connection_caps_hold_and_the_admin_listener_stays_up() {
    let echo = Echo::start();
    let gw = Gateway::start(&config(echo.addr, "max_connections_per_ip = 5\nheader_timeout = \"30s\""));
    let held: Vec<TcpStream> = (0..5).map(|_| TcpStream::connect(gw.addr).expect("connect")).collect();
    std::thread::sleep(Duration::from_millis(300));
    // The sixth is closed at once, before it can send anything.
    let mut extra = TcpStream::connect(gw.addr).expect("connect");
    assert!(closed_within(&mut extra, Duration::from_secs(3)).is_some(), "sixth connection from one address was kept");
    assert_eq!(get(gw.admin, "/healthz", &[]).expect("admin").status, 200, "admin listener starved");
    let refused = r#"tollgate_connections_refused_total{listener="proxy",reason="max_connections_per_ip"}"#;
    assert!(metric(&gw, refused) >= 1.0, "refusal not counted");
    // A place given back is usable again.
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    let auth = bearer(ACME_KEY);
    let r = gw.get("/api/x", &[("host", "gateway.test"), ("authorization", &auth)]);
    assert_eq!(r.status, 200);
    let log = gw.log();
    assert!(log.contains("max_connections_per_ip"), "no log line names the cap:\n{log}");
}

#[test]
fn a_flood_of_idle_sockets_is_capped_in_total() {
    let echo = Echo::start();
    let gw = Gateway::start(&config(
        echo.addr,
        "max_connections = 200\nmax_connections_per_ip = 100000\nheader_timeout = \"30s\"",
    ));
    let mut held = Vec::new();
    for _ in 0..1000 {
        match TcpStream::connect(gw.addr) {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut open = 0;
    for s in held.iter_mut() {
        s.set_nonblocking(true).expect("nonblocking");
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => open += 1,
            _ => {}
        }
    }
    assert!(open <= 200, "{open} connections held against a cap of 200");
    assert!(open >= 150, "only {open} connections kept under a cap of 200");
    assert_eq!(get(gw.admin, "/healthz", &[]).expect("admin").status, 200, "admin listener starved");
    let refused = r#"tollgate_connections_refused_total{listener="proxy",reason="max_connections"}"#;
    assert!(metric(&gw, refused) >= 700.0);
}

// =============================================================================================
// JWT inputs: the spellings of a bearer token an attacker would try, against a gateway with
// `jwt` resolution on (an HS256 issuer whose secret is in a file, a token cookie). Kept apart
// from the cases above.

const JWT_ISSUER: &str = "https://idp.adversarial.test/";
const JWT_SECRET: &str = "the adversarial suite's HMAC secret, 32+ bytes";

fn jwt_config(echo: SocketAddr) -> String {
    let tail = format!(
        r#"
[jwt]
cookie = "session"
max_token_bytes = "2KiB"

[[jwt.issuers]]
issuer = "{JWT_ISSUER}"
audiences = ["api"]
algorithms = ["HS256"]
hmac_secret_file = "jwt.secret"
"#
    );
    standard_config(
        echo,
        Extra { tenancy: r#"resolve = ["api_key", "jwt", "subdomain", "path"]"#, tail: &tail, ..Extra::default() },
    )
}

fn jwt_token(claims: serde_json::Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256), &claims, &key).expect("sign")
}

fn jwt_cases() -> Vec<Case> {
    let exp =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) + 600;
    let t = jwt_token(serde_json::json!({"iss": JWT_ISSUER, "aud": "api", "exp": exp, "tenant_id": "acme"}));
    let other = jwt_token(serde_json::json!({"iss": JWT_ISSUER, "aud": "api", "exp": exp, "tenant_id": "globex"}));
    let parts: Vec<&str> = t.split('.').collect();
    let (h, p, s) = (parts[0], parts[1], parts[2]);
    let host = "Host: gateway.test";
    let bearer = |v: &str| format!("Authorization: {v}");
    let none = format!("eyJhbGciOiJub25lIn0.{p}.");
    let padded = format!("{h}=.{p}.{s}");
    let fat = jwt_token(
        serde_json::json!({"iss": JWT_ISSUER, "aud": "api", "exp": exp, "tenant_id": "acme", "pad": "x".repeat(3000)}),
    );
    let enormous = format!("Bearer {}.{}.{}", "a".repeat(20 * 1024), p, s);
    let line = "GET /thing HTTP/1.1";
    let ok = |name: &'static str, headers: Vec<String>| {
        let hs: Vec<&str> = std::iter::once(host).chain(headers.iter().map(String::as_str)).collect();
        passed(name, raw(line, &hs, ""), Some("/thing"))
    };
    let no = |name: &'static str, headers: Vec<String>, status: u16, code: &'static str| {
        let hs: Vec<&str> = std::iter::once(host).chain(headers.iter().map(String::as_str)).collect();
        refused(name, raw(line, &hs, ""), status, code)
    };
    vec![
        ok("jwt: Bearer", vec![bearer(&format!("Bearer {t}"))]),
        ok("jwt: bearer in lower case", vec![bearer(&format!("bearer {t}"))]),
        ok("jwt: BEARER in upper case", vec![bearer(&format!("BEARER {t}"))]),
        ok("jwt: spaces around the token", vec![bearer(&format!("Bearer   {t}   "))]),
        ok("jwt: in the cookie, among others", vec![format!("Cookie: a=1; session={t}; b=2")]),
        ok(
            "jwt: the same token in two cookie headers",
            vec![format!("Cookie: session={t}"), format!("Cookie: session={t}")],
        ),
        ok(
            "jwt: the same token in the header and the cookie",
            vec![bearer(&format!("Bearer {t}")), format!("Cookie: session={t}")],
        ),
        ok(
            "jwt: a spoofed tenant header is ignored",
            vec![bearer(&format!("Bearer {t}")), "X-Tenant-ID: globex".into()],
        ),
        no("jwt: a tab after Bearer", vec![bearer(&format!("Bearer\t{t}"))], 401, "invalid_key"),
        no("jwt: no space after Bearer", vec![bearer(&format!("Bearer{t}"))], 401, "invalid_key"),
        no("jwt: another scheme", vec![bearer(&format!("Token {t}"))], 401, "invalid_key"),
        no("jwt: Bearer alone", vec![bearer("Bearer")], 401, "invalid_key"),
        no("jwt: Bearer and a dot", vec![bearer("Bearer .")], 401, "invalid_token"),
        no(
            "jwt: two Authorization headers, same token",
            vec![bearer(&format!("Bearer {t}")), bearer(&format!("Bearer {t}"))],
            400,
            "duplicate_header",
        ),
        no(
            "jwt: two Authorization headers, two tenants",
            vec![bearer(&format!("Bearer {t}")), bearer(&format!("Bearer {other}"))],
            400,
            "duplicate_header",
        ),
        no(
            "jwt: two tokens, header and cookie",
            vec![bearer(&format!("Bearer {t}")), format!("Cookie: session={other}")],
            400,
            "bad_request",
        ),
        no(
            "jwt: two values of the token cookie",
            vec![format!("Cookie: session={t}; session={other}")],
            400,
            "bad_request",
        ),
        no(
            "jwt: an API key and a token",
            vec![format!("X-API-Key: {ACME_KEY}"), bearer(&format!("Bearer {t}"))],
            400,
            "bad_request",
        ),
        no("jwt: four parts", vec![bearer(&format!("Bearer {t}.{s}"))], 401, "invalid_token"),
        no("jwt: five parts (JWE)", vec![bearer(&format!("Bearer {h}.{p}.{s}.{s}.{s}"))], 401, "invalid_token"),
        no("jwt: a trailing dot", vec![bearer(&format!("Bearer {t}."))], 401, "invalid_token"),
        no("jwt: a leading dot", vec![bearer(&format!("Bearer .{t}"))], 401, "invalid_token"),
        no("jwt: two dots in a row", vec![bearer(&format!("Bearer {h}..{s}"))], 401, "invalid_token"),
        no("jwt: a space inside", vec![bearer(&format!("Bearer {h}. {p}.{s}"))], 401, "invalid_token"),
        no("jwt: base64 padding", vec![bearer(&format!("Bearer {padded}"))], 401, "invalid_token"),
        no("jwt: alg none", vec![bearer(&format!("Bearer {none}"))], 401, "invalid_token"),
        no("jwt: signature cut", vec![bearer(&format!("Bearer {h}.{p}.{}", &s[..s.len() - 2]))], 401, "invalid_token"),
        no(
            "jwt: another payload",
            vec![bearer(&format!("Bearer {h}.{}.{s}", other.split('.').nth(1).unwrap_or_default()))],
            401,
            "invalid_token",
        ),
        no("jwt: over max_token_bytes", vec![bearer(&format!("Bearer {fat}"))], 401, "invalid_token"),
        no("jwt: an empty token cookie", vec!["Cookie: session=".into()], 401, "invalid_token"),
        no("jwt: a token in the API key header", vec![format!("X-API-Key: {t}")], 401, "invalid_key"),
        no(
            "jwt: a token larger than the head limit",
            vec![format!("Authorization: {enormous}")],
            431,
            "headers_too_large",
        ),
    ]
}

#[test]
fn jwt_inputs_get_their_documented_answers() {
    let echo = Echo::start();
    let gw = Gateway::start_in(temp_dir("adv-jwt"), &jwt_config(echo.addr), &[("jwt.secret", JWT_SECRET)]);
    let cases = jwt_cases();
    let mut failures = Vec::new();
    for case in &cases {
        let before = echo.hits();
        let resp = send(gw.addr, &case.raw);
        let reached = echo.hits() > before;
        let code = (resp.header("content-type") == Some("application/problem+json")).then(|| resp.problem_code());
        let mut wrong = Vec::new();
        if resp.status != case.status {
            wrong.push(format!("status {} (want {})", resp.status, case.status));
        }
        if code.as_deref() != case.code {
            wrong.push(format!("code {code:?} (want {:?})", case.code));
        }
        if reached != case.reached {
            wrong.push(format!("reached upstream: {reached} (want {})", case.reached));
        }
        if resp.status == 200 {
            let v = resp.json();
            if v["headers"]["x-tenant-id"] != "acme" {
                wrong.push(format!("upstream saw tenant {}", v["headers"]["x-tenant-id"]));
            }
            if v["headers"].get("authorization").is_some()
                || v["headers"]["cookie"].as_str().is_some_and(|c| c.contains("session"))
            {
                wrong.push("the token went upstream".into());
            }
        }
        if !wrong.is_empty() {
            failures.push(format!("{}: {}", case.name, wrong.join(", ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} JWT shapes misbehaved:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    std::thread::sleep(Duration::from_millis(300));
    let log = gw.log();
    assert!(!log.contains(JWT_SECRET), "the HMAC secret reached the log");
    assert!(!log.contains("eyJ"), "a token reached the log:\n{log}");
}

// -------------------------------------------------------------------------------------------
// Request bodies the gateway reads (`cost_from_body`, `inject_stream_usage`, `model_from_body`)
// -------------------------------------------------------------------------------------------

const OPENAI_PACK: &str = include_str!("../lua-free-rules/openai-compatible.toml");

fn body_config(llm: SocketAddr) -> String {
    format!(
        r#"include = ["pack.toml"]

[server]
listen = ["{{LISTEN}}"]
admin_listen = "{{ADMIN}}"
threads = 1
upgrade_sock = "{{DIR}}/upgrade.sock"
pid_file = "{{DIR}}/tollgate.pid"

[store]
kind = "embedded"
path = "{{DIR}}/tollgate.db"

[upstreams.default]
servers = ["{llm}"]

[tiers.pro]
upstream = "default"
quotas.tokens = {{ limit = 1000000000, period = "month" }}

[[tenants]]
id = "acme"
tier = "pro"

[[tenants.keys]]
id = "acme-main"
hash = "{hash}"
scopes = ["generate", "read"]
"#,
        hash = hash_of(ACME_KEY)
    )
}

/// A chat completion request with `body`, framed by Content-Length or chunked, plus `extra` headers.
fn chat(body: &str, chunked: bool, extra: &[&str]) -> Vec<u8> {
    let auth = format!("Authorization: Bearer {ACME_KEY}");
    let mut headers = vec!["Host: llm.test", auth.as_str(), "Content-Type: application/json"];
    headers.extend_from_slice(extra);
    if chunked {
        headers.push("Transfer-Encoding: chunked");
        let mut framed = String::new();
        for part in body.as_bytes().chunks(7000) {
            framed.push_str(&format!("{:x}\r\n{}\r\n", part.len(), String::from_utf8_lossy(part)));
        }
        framed.push_str("0\r\n\r\n");
        raw("POST /v1/chat/completions HTTP/1.1", &headers, &framed)
    } else {
        let len = format!("Content-Length: {}", body.len());
        headers.push(&len);
        let headers: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
        let refs: Vec<&str> = headers.iter().map(String::as_str).collect();
        raw("POST /v1/chat/completions HTTP/1.1", &refs, body)
    }
}

/// (name, request, status, error code (OpenAI shape), forwarded, reserved estimate)
type BodyCase = (&'static str, Vec<u8>, u16, Option<&'static str>, bool, Option<&'static str>);

#[test]
fn request_bodies_the_gateway_reads_get_their_documented_answers() {
    let llm = common::llm::Llm::start();
    let gw = Gateway::start_in(temp_dir("adv-body"), &body_config(llm.addr), &[("pack.toml", OPENAI_PACK)]);
    let big = format!("{{\"messages\":\"{}\",\"max_tokens\":9}}", "q".repeat(80 * 1024));
    let deep = format!(
        "{{\"stream\":true,\"stream_options\":{{}},\"x\":{}1{},\"max_tokens\":1}}",
        "[".repeat(200),
        "]".repeat(200)
    );
    // UTF-16LE, which Python's `json.loads` detects and reads: ASCII with a NUL after each byte.
    let utf16: String = r#"{"max_tokens":900000}"#.chars().flat_map(|c| [c, '\0']).collect();
    let cases: Vec<BodyCase> = vec![
        ("plain", chat(r#"{"model":"m","max_tokens":40}"#, false, &[]), 200, None, true, Some("40")),
        ("UTF-16LE body", chat(&utf16, false, &[]), 400, Some("bad_request"), false, None),
        ("a NUL byte after the JSON", chat("{\"max_tokens\":5}\0", false, &[]), 400, Some("bad_request"), false, None),
        // Go's encoding/json (Ollama) matches keys ignoring case; Python's does not.
        ("Max_Tokens", chat(r#"{"Max_Tokens":900000}"#, false, &[]), 400, Some("bad_request"), false, None),
        (
            "max_tokens and MAX_TOKENS",
            chat(r#"{"max_tokens":10,"MAX_TOKENS":900000}"#, false, &[]),
            400,
            Some("bad_request"),
            false,
            None,
        ),
        (
            "a Kelvin sign for k",
            chat(r#"{"max_to\u212Aens":900000}"#, false, &[]),
            400,
            Some("bad_request"),
            false,
            None,
        ),
        ("a long s for s", chat(r#"{"\u017Ftream":true}"#, false, &[]), 400, Some("bad_request"), false, None),
        ("N for n", chat(r#"{"max_tokens":10,"N":50}"#, false, &[]), 400, Some("bad_request"), false, None),
        (
            "Max_Tokens after a member the rule does not read",
            chat(r#"{"model":"m","messages":[],"Max_Tokens":900000}"#, false, &[]),
            400,
            Some("bad_request"),
            false,
            None,
        ),
        (
            "a case variant off the read paths",
            chat(r#"{"messages":[{"Model":"x","MAX_TOKENS":1}],"max_tokens":3}"#, false, &[]),
            200,
            None,
            true,
            Some("3"),
        ),
        ("no max_tokens: the default", chat(r#"{"model":"m"}"#, false, &[]), 200, None, true, Some("1024")),
        ("max_tokens in a nested object", chat(r#"{"x":{"max_tokens":1}}"#, false, &[]), 200, None, true, Some("1024")),
        ("max_tokens as a string", chat(r#"{"max_tokens":"1"}"#, false, &[]), 400, Some("invalid_cost"), false, None),
        ("max_tokens negative", chat(r#"{"max_tokens":-1}"#, false, &[]), 400, Some("invalid_cost"), false, None),
        (
            "max_tokens over max_cost",
            chat(r#"{"max_tokens":1e30}"#, false, &[]),
            400,
            Some("invalid_cost"),
            false,
            None,
        ),
        ("max_completion_tokens", chat(r#"{"max_completion_tokens":30}"#, false, &[]), 200, None, true, Some("30")),
        (
            "both spellings: the larger",
            chat(r#"{"max_tokens":5,"max_completion_tokens":70}"#, false, &[]),
            200,
            None,
            true,
            Some("70"),
        ),
        (
            "both spellings, the other order",
            chat(r#"{"max_completion_tokens":5,"max_tokens":70}"#, false, &[]),
            200,
            None,
            true,
            Some("70"),
        ),
        (
            "max_completion_tokens as a string",
            chat(r#"{"max_tokens":5,"max_completion_tokens":"9"}"#, false, &[]),
            400,
            Some("invalid_cost"),
            false,
            None,
        ),
        ("n completions", chat(r#"{"max_tokens":10,"n":3}"#, false, &[]), 200, None, true, Some("30")),
        ("n with the default", chat(r#"{"n":2}"#, false, &[]), 200, None, true, Some("2048")),
        ("n of 0 counts as 1", chat(r#"{"max_tokens":10,"n":0}"#, false, &[]), 200, None, true, Some("10")),
        ("n as a string", chat(r#"{"max_tokens":10,"n":"3"}"#, false, &[]), 400, Some("invalid_cost"), false, None),
        (
            "n times max_tokens over max_cost",
            chat(r#"{"max_tokens":600000,"n":2}"#, false, &[]),
            400,
            Some("invalid_cost"),
            false,
            None,
        ),
        ("n twice", chat(r#"{"max_tokens":10,"n":3,"n":1}"#, false, &[]), 400, Some("bad_request"), false, None),
        ("max_tokens a fraction: rounded up", chat(r#"{"max_tokens":2.5}"#, false, &[]), 200, None, true, Some("3")),
        (
            "max_tokens twice",
            chat(r#"{"max_tokens":1,"max_tokens":900}"#, false, &[]),
            400,
            Some("bad_request"),
            false,
            None,
        ),
        ("stream twice", chat(r#"{"stream":false,"stream":true}"#, false, &[]), 400, Some("bad_request"), false, None),
        ("not JSON: the default", chat("max_tokens=5", false, &[]), 200, None, true, Some("1024")),
        (
            "gzip body",
            chat(r#"{"max_tokens":1}"#, false, &["Content-Encoding: gzip"]),
            400,
            Some("bad_request"),
            false,
            None,
        ),
        (
            "identity coding",
            chat(r#"{"max_tokens":2}"#, false, &["Content-Encoding: identity"]),
            200,
            None,
            true,
            Some("2"),
        ),
        // A stream the gateway cannot ask usage for would never settle: refused, not forwarded.
        (
            "stream as a number",
            chat(r#"{"stream":1,"max_tokens":1}"#, false, &[]),
            400,
            Some("bad_request"),
            false,
            None,
        ),
        (
            "stream as a string",
            chat(r#"{"stream":"true","max_tokens":1}"#, false, &[]),
            400,
            Some("bad_request"),
            false,
            None,
        ),
        (
            "stream_options not an object",
            chat(r#"{"stream":true,"stream_options":"x","max_tokens":1}"#, false, &[]),
            400,
            Some("bad_request"),
            false,
            None,
        ),
        (
            "stream_options next to nesting a parser refuses",
            chat(&deep, false, &[]),
            400,
            Some("bad_request"),
            false,
            None,
        ),
        (
            "stream_options next to a number a parser refuses",
            chat(r#"{"stream":true,"stream_options":{"include_usage":false},"x":1e400}"#, false, &[]),
            400,
            Some("bad_request"),
            false,
            None,
        ),
        (
            "stream false, stream_options odd: nothing to ask",
            chat(r#"{"stream":false,"stream_options":"x","max_tokens":4}"#, false, &[]),
            200,
            None,
            true,
            Some("4"),
        ),
        // Python's parser (so FastAPI-based servers) skips a byte-order mark; the gateway would
        // read no fields at all, neither the estimate nor `stream`.
        (
            "byte-order mark",
            chat("\u{feff}{\"stream\":true,\"max_tokens\":7}", false, &[]),
            400,
            Some("bad_request"),
            false,
            None,
        ),
        ("chunked, small", chat(r#"{"max_tokens":3}"#, true, &[]), 200, None, true, Some("3")),
        ("chunked over 64 KiB", chat(&big, true, &[]), 400, Some("bad_request"), false, None),
        ("Content-Length over 64 KiB", chat(&big, false, &[]), 200, None, true, Some("9")),
    ];
    let used = || {
        let r = send(
            gw.addr,
            &raw(
                "GET /_tollgate/usage HTTP/1.1",
                &["Host: llm.test", &format!("Authorization: Bearer {ACME_KEY}")],
                "",
            ),
        );
        r.json()["quotas"][0]["used"].as_u64().unwrap_or(0)
    };
    let mut failures = Vec::new();
    for (name, req, status, code, forwarded, estimate) in &cases {
        let before = llm.count();
        let used_before = used();
        let resp = send(gw.addr, req);
        let mut wrong = Vec::new();
        if resp.status != *status {
            wrong.push(format!("status {} (want {status}): {}", resp.status, resp.text()));
        }
        if let Some(code) = code {
            if resp.header("content-type") != Some("application/json") || resp.json()["error"]["code"] != *code {
                wrong.push(format!("body {} (want code {code})", resp.text()));
            }
        }
        if (llm.count() > before) != *forwarded {
            wrong.push(format!("forwarded: {} (want {forwarded})", llm.count() > before));
        }
        if let Some(est) = estimate {
            // The answer's headers show the quota after the estimate, before the settlement.
            let left = resp.header("x-ratelimit-remaining-tokens").and_then(|v| v.parse::<u64>().ok());
            let reserved = left.map(|l| 1_000_000_000 - l - used_before);
            if reserved != est.parse().ok() {
                wrong.push(format!("reserved {reserved:?} (want {est})"));
            }
        }
        if *forwarded && *status == 200 {
            // Forwarded with a Content-Length that matches what was sent, never chunked.
            let reqs = llm.state.requests.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, headers, body)) = reqs.last() {
                let cl = headers.iter().find(|(k, _)| k == "content-length").map(|(_, v)| v.clone());
                if cl != Some(body.len().to_string()) || headers.iter().any(|(k, _)| k == "transfer-encoding") {
                    wrong.push(format!("upstream framing {cl:?} for {} bytes", body.len()));
                }
            }
        }
        if !wrong.is_empty() {
            failures.push(format!("{name}: {}", wrong.join(", ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} body shapes misbehaved:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );

    // A client's Accept-Encoding never reaches an upstream whose answer the gateway reads.
    let resp = send(gw.addr, &chat(r#"{"max_tokens":1}"#, false, &["Accept-Encoding: gzip, br"]));
    assert_eq!(resp.status, 200);
    assert_eq!(llm.last_header("accept-encoding").as_deref(), Some("identity"));
    // `stream` only counts at the top level: a nested one is not a streamed request.
    let resp = send(gw.addr, &chat(r#"{"opts":{"stream":true},"max_tokens":1}"#, false, &[]));
    assert_eq!(resp.status, 200);
    let sent = llm.bodies().pop().unwrap_or_default();
    assert!(sent.get("stream_options").is_none(), "{sent}");
    // The key never reaches the upstream.
    assert!(llm.last_header("authorization").is_none());
}

/// A client that sends `Expect: 100-continue` waits for the interim answer before its body; on a
/// route that reads the body whole before forwarding, the gateway gives that answer itself (no
/// upstream is asked yet), and the final answer follows, forwarded or refused.
#[test]
fn a_body_read_whole_is_asked_for_with_100_continue() {
    let llm = common::llm::Llm::start();
    let gw = Gateway::start_in(temp_dir("adv-expect"), &body_config(llm.addr), &[("pack.toml", OPENAI_PACK)]);
    for (body, status) in [(r#"{"model":"m","max_tokens":40}"#, 200), (r#"{"max_tokens":1e30}"#, 400)] {
        let req = chat(body, false, &["Expect: 100-continue"]);
        let head_end = req.windows(4).position(|w| w == b"\r\n\r\n").map_or(req.len(), |p| p + 4);
        let before = llm.count();
        let mut conn = Conn::open(gw.addr).expect("connect");
        conn.send_raw(&req[..head_end]).expect("send head");
        // The body is only sent once the interim answer came (a real client would wait a while,
        // then send anyway; this one would wait 30 s).
        let (interim, _) = conn.read_head().expect("an interim answer before the body");
        assert_eq!(interim, 100, "{body}");
        conn.send_raw(&req[head_end..]).expect("send body");
        let resp = conn.read_response(false).expect("final answer");
        assert_eq!(resp.status, status, "{body}: {}", resp.text());
        if status == 200 {
            assert_eq!(llm.count(), before + 1);
            assert_eq!(
                llm.state.requests.lock().unwrap_or_else(|p| p.into_inner()).last().map(|r| r.2.clone()),
                Some(body.as_bytes().to_vec())
            );
            // The upstream is not asked to agree to a body that is already in hand.
            assert!(llm.last_header("expect").is_none());
        } else {
            assert_eq!(resp.json()["error"]["code"], "invalid_cost");
            assert_eq!(llm.count(), before);
        }
        // The connection carries the next request.
        let next = conn.request(
            "GET",
            "/_tollgate/usage",
            &[("Host", "llm.test"), ("Authorization", &format!("Bearer {ACME_KEY}"))],
            b"",
        );
        assert_eq!(next.as_ref().map(|r| r.status).map_err(|e| format!("{e} after {:?}", resp.headers)), Ok(200));
    }
    // A body over the route's limit is refused without the interim answer: it is never sent.
    let big = format!("{{\"messages\":\"{}\"}}", "q".repeat(5 * 1024 * 1024));
    let req = chat(&big, false, &["Expect: 100-continue"]);
    let head_end = req.windows(4).position(|w| w == b"\r\n\r\n").map_or(req.len(), |p| p + 4);
    let mut conn = Conn::open(gw.addr).expect("connect");
    conn.send_raw(&req[..head_end]).expect("send head");
    let (status, _) = conn.read_head().expect("an answer");
    assert_eq!(status, 413);

    // An upstream that cannot be reached after the interim answer: the refusal still follows it.
    let down: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let gw = Gateway::start_in(temp_dir("adv-expect-down"), &body_config(down), &[("pack.toml", OPENAI_PACK)]);
    let req = chat(r#"{"max_tokens":2}"#, false, &["Expect: 100-continue"]);
    let head_end = req.windows(4).position(|w| w == b"\r\n\r\n").map_or(req.len(), |p| p + 4);
    let mut conn = Conn::open(gw.addr).expect("connect");
    conn.send_raw(&req[..head_end]).expect("send head");
    assert_eq!(conn.read_head().expect("interim").0, 100);
    conn.send_raw(&req[head_end..]).expect("send body");
    let resp = conn.read_response(false).expect("final answer");
    assert_eq!(resp.status, 502, "{}", resp.text());
    assert_eq!(resp.json()["error"]["code"], "upstream_unavailable", "{}", resp.text());
}

/// A body read whole is consumed exactly: the next request on the connection, sent at once
/// behind it (pipelined) or after its answer, is parsed from the first byte after the body,
/// whatever the framing, whether the request was forwarded or refused after the read.
#[test]
fn requests_behind_a_body_read_whole_on_one_connection_are_parsed_from_its_end() {
    let llm = common::llm::Llm::start();
    let gw = Gateway::start_in(temp_dir("adv-pipe"), &body_config(llm.addr), &[("pack.toml", OPENAI_PACK)]);
    let auth = format!("Bearer {ACME_KEY}");
    let usage = build_request("GET", "/_tollgate/usage", &[("Host", "llm.test"), ("Authorization", &auth)], b"");
    let big = format!("{{\"messages\":\"{}\",\"max_tokens\":9}}", "q".repeat(80 * 1024));
    let shapes: Vec<(&str, Vec<u8>, u16, Option<&str>)> = vec![
        (
            "Content-Length",
            chat(r#"{"model":"m","max_tokens":40}"#, false, &[]),
            200,
            Some(r#"{"model":"m","max_tokens":40}"#),
        ),
        ("chunked", chat(r#"{"model":"m","max_tokens":41}"#, true, &[]), 200, Some(r#"{"model":"m","max_tokens":41}"#)),
        ("over 64 KiB", chat(&big, false, &[]), 200, Some(big.as_str())),
        ("empty", chat("", false, &[]), 200, Some("")),
        ("refused after the read", chat(r#"{"max_tokens":1e30}"#, true, &[]), 400, None),
    ];
    for (name, req, status, forwarded) in &shapes {
        for pipelined in [false, true] {
            let before = llm.count();
            let mut conn = Conn::open(gw.addr).expect("connect");
            let mut bytes = req.clone();
            if pipelined {
                bytes.extend_from_slice(&usage);
            }
            conn.send_raw(&bytes).expect("send");
            let first = conn.read_response(false).expect("first answer");
            assert_eq!(first.status, *status, "{name} (pipelined {pipelined}): {}", first.text());
            if !pipelined {
                conn.send_raw(&usage).expect("send");
            }
            let second = conn.read_response(false).expect("second answer");
            assert_eq!(second.status, 200, "{name} (pipelined {pipelined}): {}", second.text());
            assert_eq!(second.json()["tenant"], "acme", "{name}");
            match forwarded {
                Some(body) => {
                    assert_eq!(llm.count(), before + 1, "{name}: forwarded once");
                    let sent = llm.state.requests.lock().unwrap_or_else(|p| p.into_inner()).last().map(|r| r.2.clone());
                    assert_eq!(sent.as_deref(), Some(body.as_bytes()), "{name}: forwarded as read");
                }
                None => assert_eq!(llm.count(), before, "{name}: not forwarded"),
            }
        }
    }
}
