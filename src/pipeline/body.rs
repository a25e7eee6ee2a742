//! Stage: body. Reads what a rule's [`BodyPlan`] asks of request and response bodies.
//!
//! Request side: a rule whose charge costs come from the body, or that adds
//! `stream_options.include_usage`, has the whole body read (at most its `max_body`) before
//! the quota stage, so the estimate is reserved before anything is forwarded; the body then
//! goes upstream as read, or as rewritten, with a `Content-Length` that matches. A rule that
//! only names the model scans the body as it streams through.
//!
//! Response side: a JSON answer or an event stream is scanned as it passes, in bounded memory
//! and without holding it back (only the extra usage event the gateway asked for is held,
//! until it ends, to take it out). Charges settle when the answer ends.

use crate::error::Reject;
use crate::rules::BodyPlan;
use crate::scan::{Found, JsonScan, SseScan};
use bytes::{Bytes, BytesMut};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use std::sync::Arc;

/// Pingora resends at most this much of a request body that was read before forwarding (its
/// retry buffer). A body read whole is handed to the proxy through that buffer: it is enabled
/// once the rest of the body fits, and the first body the proxy forwards is replaced with the
/// whole body (see [`upstream_body`]).
const RESEND_WINDOW: u64 = 64 * 1024;

/// At most this much of a stream event is held back to take it out of the client's stream.
const MAX_HELD_EVENT: usize = 64 * 1024;

/// Reads the whole request body, at most `limit` bytes. A body with a content coding is
/// refused: the gateway could not read the fields it reserves from, while the upstream may
/// decode them.
pub async fn read_whole(session: &mut Session, limit: u64) -> Result<Bytes, Reject> {
    let coded = session
        .req_header()
        .headers
        .get_all(http::header::CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"identity"));
    if coded {
        return Err(Reject::BadRequest {
            detail: "This route reads the JSON request body to charge it; send it without a Content-Encoding.".into(),
        });
    }
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(Reject::BodyTooLarge { limit });
    }
    // A client that sent `Expect: 100-continue` waits for the interim answer before its body;
    // no upstream is asked before the body is in, so the gateway gives it (once the declared
    // length is known to fit), and the upstream is not asked again (see `upstream_request`).
    if expects_continue(session.req_header()) && !session.is_body_empty() {
        // An interim answer before the body is not a refusal: the connection stays reusable
        // (Pingora's default, restored after it, closes it on an answer written mid-body).
        session.set_close_on_response_before_downstream_finish(false);
        let sent = session.write_continue_response().await;
        session.set_close_on_response_before_downstream_finish(true);
        sent.map_err(|_| Reject::BadRequest { detail: "The request body could not be read.".into() })?;
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(8 * 1024).min(limit) as usize);
    let mut window_open = false;
    loop {
        // Without a declared length the tail cannot be known: the window opens at once, and a
        // body longer than it is refused below.
        let rest = declared.map(|n| n.saturating_sub(buf.len() as u64));
        if !window_open && rest.is_none_or(|r| r <= RESEND_WINDOW) {
            session.enable_retry_buffering();
            window_open = true;
        }
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if buf.len() as u64 + chunk.len() as u64 > limit {
                    return Err(Reject::BodyTooLarge { limit });
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(_) => return Err(Reject::BadRequest { detail: "The request body could not be read.".into() }),
        }
    }
    if !buf.is_empty() && session.get_retry_buffer().is_none() {
        return Err(Reject::BadRequest {
            detail: format!(
                "This route reads the request body before forwarding it; a body over {} KiB must be sent with a Content-Length.",
                RESEND_WINDOW / 1024
            ),
        });
    }
    Ok(buf.freeze())
}

/// The request asks for `100 Continue` before it sends its body.
fn expects_continue(req: &pingora::http::RequestHeader) -> bool {
    req.version == http::Version::HTTP_11
        && req.headers.get(http::header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Scans a request body read whole. A body that starts with a byte-order mark, is not UTF-8
/// (UTF-16 or UTF-32, which some parsers detect and read), names a field the gateway reads
/// twice, or names one in another case, is refused: parsers disagree on all of these (most
/// take the last of two equal keys; Python's skips the mark and reads UTF-16; Go's matches
/// `Max_Tokens` to `max_tokens`), so the gateway could reserve and ask for usage on one
/// reading while the upstream acts on another.
pub fn scan_whole(plan: &BodyPlan, body: &[u8]) -> Result<Option<Box<JsonScan>>, Reject> {
    let Some(paths) = plan.request.as_ref() else { return Ok(None) };
    if body.starts_with(b"\xEF\xBB\xBF") {
        // JSON texts carry no byte-order mark (RFC 8259), yet some parsers (Python's) skip one:
        // the gateway would read no field (neither the estimate nor `stream`) of a body the
        // upstream acts on.
        return Err(Reject::BadRequest {
            detail: "The request body starts with a byte-order mark; send the JSON without it.".into(),
        });
    }
    if body.starts_with(b"\xFE\xFF") || body.starts_with(b"\xFF\xFE") || memchr::memchr(0, body).is_some() {
        // UTF-8 JSON has no NUL byte (RFC 8259 requires UTF-8 and escapes control characters);
        // UTF-16 and UTF-32 texts have one in their first four bytes.
        return Err(Reject::BadRequest {
            detail:
                "The request body is not UTF-8 JSON (it has a NUL byte or a UTF-16 byte-order mark); send it as UTF-8."
                    .into(),
        });
    }
    let mut scan = Box::new(JsonScan::strict(paths));
    scan.feed(paths, body);
    scan.finish(paths);
    if scan.case_variant() {
        return Err(Reject::BadRequest {
            detail: "The request body names a field this route reads (such as `max_tokens`, `n`, `stream` or `model`) in another case; field names are lower case, as the API documents them.".into(),
        });
    }
    if scan.duplicated() {
        return Err(Reject::BadRequest {
            detail: "The request body names a field this route reads (such as `max_tokens`, `stream` or `model`) more than once; send each field once.".into(),
        });
    }
    Ok(Some(scan))
}

/// With `inject_stream_usage`: the body to forward when the client streams (`"stream": true`)
/// without asking for usage, with `"stream_options": {"include_usage": true}` added; `None`
/// when the body stays as it is. A body the gateway could not ask usage for is refused: its
/// stream would never settle (a `stream` that is not `true` or `false`, which lenient servers
/// still take as a stream; a `stream_options` that is not an object; a body whose rewrite a
/// parser refuses while the upstream's may not).
pub fn inject_usage(plan: &BodyPlan, scan: &JsonScan, body: &Bytes) -> Result<Option<Bytes>, Reject> {
    let Some((stream, options, include)) = plan.stream_at else { return Ok(None) };
    let unaskable = |what: &str| Reject::BadRequest {
        detail: format!("This route meters streams from their usage, which it could not ask for: {what}."),
    };
    match scan.get(stream) {
        Some(Found::Bool(true)) => {}
        None | Some(Found::Null) | Some(Found::Bool(false)) => return Ok(None),
        Some(_) => return Err(unaskable("send `stream` as true or false")),
    }
    if scan.get(include) == Some(&Found::Bool(true)) {
        return Ok(None);
    }
    let Some(start) = body.iter().position(|b| !b.is_ascii_whitespace()).filter(|&i| body[i] == b'{') else {
        return Ok(None);
    };
    match scan.get(options) {
        // The common case: no `stream_options` at all. The member goes first, so nothing of the
        // client's body moves or changes.
        None => {
            const MEMBER: &[u8] = br#""stream_options":{"include_usage":true}"#;
            let rest = &body[start + 1..];
            let empty = rest.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
            let mut out = BytesMut::with_capacity(body.len() + MEMBER.len() + 1);
            out.extend_from_slice(&body[..=start]);
            out.extend_from_slice(MEMBER);
            if !empty {
                out.extend_from_slice(b",");
            }
            out.extend_from_slice(rest);
            Ok(Some(out.freeze()))
        }
        // `stream_options` without `include_usage: true`: rewritten through a parser, since a
        // second `stream_options` member would be read differently by different servers.
        Some(Found::Object) | Some(Found::Null) => {
            let rewritten = serde_json::from_slice::<serde_json::Value>(body).ok().and_then(|mut doc| {
                let opts = doc.as_object_mut()?.entry("stream_options").or_insert_with(|| serde_json::json!({}));
                if opts.is_null() {
                    *opts = serde_json::json!({});
                }
                opts.as_object_mut()?.insert("include_usage".into(), serde_json::Value::Bool(true));
                serde_json::to_vec(&doc).ok()
            });
            match rewritten {
                Some(out) => Ok(Some(Bytes::from(out))),
                None => Err(unaskable("send the body as plain JSON (numbers within range, nesting under 128 levels)")),
            }
        }
        Some(_) => Err(unaskable("send `stream_options` as an object")),
    }
}

/// The model a request names, as a report dimension: at most 64 characters of letters,
/// digits and `._:/-@+`; anything else (or nothing) is `None`. A client chooses this text, so
/// it is checked before it can become a ledger row.
pub fn model_of(plan: &BodyPlan, scan: &JsonScan) -> Option<Arc<str>> {
    match scan.get(plan.model_at?)? {
        Found::Str { text, truncated: false }
            if !text.is_empty()
                && text.len() <= 64
                && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:/-@+".contains(&b)) =>
        {
            Some(text.as_str().into())
        }
        _ => None,
    }
}

/// What the body stage does to the request body on its way upstream: a body read whole replaces
/// the first body the proxy forwards (Pingora's resend buffer holding its tail, or nothing), and
/// every later piece is dropped; a streamed body is scanned for the model (none when it names
/// one twice).
pub fn upstream_body(state: &mut BodyState, plan: &BodyPlan, body: &mut Option<Bytes>, end_of_stream: bool) {
    if let Some(whole) = &state.whole {
        if !state.whole_sent {
            *body = Some(whole.clone());
            state.whole_sent = true;
        } else if body.is_some() {
            *body = Some(Bytes::new());
        }
        return;
    }
    let Some(paths) = plan.request.as_ref() else { return };
    // Strict: the body is already on its way and cannot be refused, so a model named twice
    // (which the upstream, like most parsers, may read as the last) is no model at all, never
    // the first name, which a client could pick to be priced as a cheaper model.
    let scan = state.request_scan.get_or_insert_with(|| Box::new(JsonScan::strict(paths)));
    if let Some(chunk) = body {
        scan.feed(paths, chunk);
    }
    if end_of_stream {
        scan.finish(paths);
        state.model = if scan.duplicated() || scan.case_variant() { None } else { model_of(plan, scan) };
    }
}

/// The request head that goes upstream on a rule that settles from the answer's body: the
/// answer is asked for without a content coding (a client's `Accept-Encoding: gzip`, which
/// OpenAI's SDKs send, would otherwise make the usage unreadable and the charge unsettled).
pub fn upstream_head(plan: &BodyPlan, req: &mut pingora::http::RequestHeader) -> pingora::Result<()> {
    if plan.json.is_some() || plan.sse.is_some() {
        req.insert_header(http::header::ACCEPT_ENCODING, "identity")?;
    }
    Ok(())
}

/// How an answer is scanned.
pub enum ResponseScan {
    Json(JsonScan),
    Sse(SseScan),
}

/// Why a charge kept its estimate (`tollgate_charges_unsettled_total` reason).
pub fn unsettled_reason(found: Option<&Found>) -> &'static str {
    match found {
        None | Some(Found::Null) => "missing",
        Some(_) => "invalid",
    }
}

/// Starts scanning an answer, when the rule settles a charge from it: an event stream
/// (`text/event-stream`) by its events, anything else as JSON.
pub fn start_response(plan: &BodyPlan, resp: &mut ResponseHeader, strip_usage_event: bool) -> Option<ResponseScan> {
    let sse = resp
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().get(..17).is_some_and(|t| t.eq_ignore_ascii_case("text/event-stream")));
    if sse {
        let paths = plan.sse.clone()?;
        let drop_when = match (strip_usage_event, plan.sse_choices_at) {
            (true, Some(choices)) => plan.sse_at.iter().flatten().next().map(|usage| (*usage, choices)),
            _ => None,
        };
        if drop_when.is_some() {
            // Events are taken out, so the length the upstream announced no longer holds.
            resp.remove_header(&http::header::CONTENT_LENGTH);
        }
        return Some(ResponseScan::Sse(SseScan::new(paths, drop_when, MAX_HELD_EVENT)));
    }
    let paths = plan.json.as_ref()?;
    Some(ResponseScan::Json(JsonScan::new(paths)))
}

impl ResponseScan {
    /// Scans one piece of the answer; an event stream may hold back or take out the extra
    /// usage event.
    pub fn feed(&mut self, plan: &BodyPlan, body: &mut Option<Bytes>, end_of_stream: bool) {
        match self {
            ResponseScan::Json(scan) => {
                if let (Some(paths), Some(chunk)) = (plan.json.as_ref(), body.as_ref()) {
                    scan.feed(paths, chunk);
                }
                if end_of_stream {
                    if let Some(paths) = plan.json.as_ref() {
                        scan.finish(paths);
                    }
                }
            }
            ResponseScan::Sse(scan) => {
                let chunk = body.take().unwrap_or_default();
                let out = scan.feed(chunk, end_of_stream);
                *body = Some(out);
            }
        }
    }

    /// What the answer says for charge `i`: `Ok(units)`, or why it does not settle it.
    pub fn settlement(&self, plan: &BodyPlan, i: usize) -> Option<Result<u64, &'static str>> {
        let found = match self {
            ResponseScan::Json(scan) => scan.get((*plan.json_at.get(i)?)?),
            ResponseScan::Sse(scan) => scan.last((*plan.sse_at.get(i)?)?),
        };
        Some(match found {
            Some(Found::Num(n)) => Ok(*n),
            other => Err(unsettled_reason(other)),
        })
    }
}

/// The body stage's part of a request's context.
#[derive(Default)]
pub struct BodyState {
    /// The request body read whole, as it goes upstream (rewritten or not).
    pub whole: Option<Bytes>,
    /// The whole body replaced the proxy's first piece of this attempt.
    pub whole_sent: bool,
    /// The client did not ask for stream usage and the gateway did: its event is taken out.
    pub strip_usage_event: bool,
    /// A streamed request body's scan (model only).
    pub request_scan: Option<Box<JsonScan>>,
    pub model: Option<Arc<str>>,
    pub response: Option<Box<ResponseScan>>,
    /// The answer ended and its charges were settled (or counted as unsettled).
    pub response_done: bool,
}
