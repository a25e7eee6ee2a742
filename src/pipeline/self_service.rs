//! Tenant self-service on the data plane, under `/_tollgate/`, with the tenant's own key:
//!
//! - `GET /_tollgate/usage`: current quota usage (scope `read` or `billing`)
//! - `GET /_tollgate/keys`, `POST /_tollgate/keys`: list or create the tenant's keys (`admin`)
//! - `DELETE /_tollgate/keys/{id}`: revoke one of the tenant's own keys (`admin`)
//!
//! The gateway answers these itself; nothing is forwarded. Changes go through the same
//! [`AdminCore`] as the admin API, with the key id as the audit actor.

use crate::admin::core::{Actor, AdminCore, AdminError, CreateKey};
use crate::directory::Key;
use http::Method;
use serde_json::{json, Value};
use std::sync::Arc;

/// A self-service request, resolved and authenticated.
pub struct Call {
    pub tenant: Arc<str>,
    pub key_id: crate::directory::KeyId,
    pub scopes: Vec<Arc<str>>,
    pub method: Method,
    pub path: String,
    pub request_id: String,
}

impl Call {
    pub fn new(key: &Key, method: &Method, path: &str, request_id: &str) -> Call {
        Call {
            tenant: key.tenant.id.clone(),
            key_id: key.id.clone(),
            scopes: key.scopes.to_vec(),
            method: method.clone(),
            path: path.to_string(),
            request_id: request_id.to_string(),
        }
    }

    fn has(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| &**s == scope)
    }
}

/// The answer: status, content type, extra headers, body.
pub struct Answer {
    pub status: u16,
    pub content_type: &'static str,
    /// `Allow` on a 405, `Retry-After` on a 503, as every other answer of those codes has.
    pub headers: &'static [(&'static str, &'static str)],
    pub body: Vec<u8>,
}

fn ok(status: u16, v: Value) -> Answer {
    Answer { status, content_type: "application/json", headers: &[], body: serde_json::to_vec(&v).unwrap_or_default() }
}

fn problem(status: u16, code: &str, detail: &str, request_id: &str) -> Answer {
    let v = json!({
        "type": format!("urn:tollgate:error:{code}"),
        // The same title as anywhere else this code is answered.
        "title": crate::error::title_of(code),
        "status": status,
        "detail": detail,
        "code": code,
        "request_id": request_id,
    });
    let headers: &'static [(&'static str, &'static str)] = if status == 503 { &[("retry-after", "1")] } else { &[] };
    Answer {
        status,
        content_type: "application/problem+json",
        headers,
        body: serde_json::to_vec(&v).unwrap_or_default(),
    }
}

/// A 405 with the `Allow` header listing what the path takes.
fn method_not_allowed(allow: &'static [(&'static str, &'static str)], request_id: &str) -> Answer {
    let methods = allow.first().map(|(_, m)| *m).unwrap_or_default();
    let mut a = problem(405, "method_not_allowed", &format!("Use {methods} on this path."), request_id);
    a.headers = allow;
    a
}

fn from_admin(e: AdminError, request_id: &str) -> Answer {
    problem(e.status(), e.code(), e.detail(), request_id)
}

fn scope_needed(call: &Call, scopes: &[&str]) -> Option<Answer> {
    if scopes.iter().any(|s| call.has(s)) {
        return None;
    }
    let detail = format!("This needs a key with the {} scope.", scopes.join(" or "));
    let mut a = problem(403, "insufficient_scope", &detail, &call.request_id);
    if let Ok(mut v) = serde_json::from_slice::<Value>(&a.body) {
        v["missing_scopes"] = json!(scopes);
        a.body = serde_json::to_vec(&v).unwrap_or_default();
    }
    Some(a)
}

/// Handles one self-service call.
pub async fn handle(core: &AdminCore, call: &Call, body: &[u8]) -> Answer {
    let rid = call.request_id.as_str();
    let actor = Actor { id: format!("key:{}", call.key_id), request_id: call.request_id.clone() };
    let segs: Vec<&str> = call.path.trim_start_matches("/_tollgate/").split('/').filter(|s| !s.is_empty()).collect();
    match (segs.as_slice(), &call.method) {
        (["usage"], &Method::GET) => {
            if let Some(a) = scope_needed(call, &["read", "billing"]) {
                return a;
            }
            match core.usage(&call.tenant).await {
                Ok(u) => ok(200, json!({"tenant": &*call.tenant, "quotas": u})),
                Err(e) => from_admin(e, rid),
            }
        }
        (["keys"], &Method::GET) => {
            if let Some(a) = scope_needed(call, &["admin"]) {
                return a;
            }
            match core.keys(&call.tenant).await {
                Ok(k) => ok(200, json!({"items": k})),
                Err(e) => from_admin(e, rid),
            }
        }
        (["keys"], &Method::POST) => {
            if let Some(a) = scope_needed(call, &["admin"]) {
                return a;
            }
            let req: CreateKey = match serde_json::from_slice(if body.is_empty() { b"{}" } else { body }) {
                Ok(r) => r,
                Err(e) => return problem(400, "bad_request", &format!("The JSON body is not valid here: {e}."), rid),
            };
            match core.create_key(&actor, &call.tenant, req).await {
                Ok((k, secret)) => ok(201, json!({"key": k, "secret": secret})),
                Err(e) => from_admin(e, rid),
            }
        }
        (["keys", id], &Method::DELETE) => {
            if let Some(a) = scope_needed(call, &["admin"]) {
                return a;
            }
            match core.revoke_key(&actor, id, Some(&call.tenant)).await {
                Ok(k) => ok(200, json!(k)),
                Err(e) => from_admin(e, rid),
            }
        }
        (["usage"], _) => method_not_allowed(&[("allow", "GET")], rid),
        (["keys"], _) => method_not_allowed(&[("allow", "GET, POST")], rid),
        (["keys", _], _) => method_not_allowed(&[("allow", "DELETE")], rid),
        _ => problem(404, "not_found", "Self-service endpoints: /_tollgate/usage and /_tollgate/keys.", rid),
    }
}
