//! The OpenAPI document served at `/v1/openapi.json` matches the real admin API: every
//! endpoint is called on a running gateway, and each response (status and body) must be
//! declared in the document and valid against its schema.

mod common;
use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "tg_admin_openapiTOKENxxxxxxxxxxxxxxxxxxxxxxx";

/// Resolves `#/components/schemas/...` references.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let mut cur = doc;
            for part in r.trim_start_matches("#/").split('/') {
                cur = &cur[part];
            }
            resolve(doc, cur)
        }
        None => schema,
    }
}

fn type_ok(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        _ => false,
    }
}

/// Validates `v` against the schema subset the document uses; returns every violation.
fn validate(doc: &Value, schema: &Value, v: &Value, at: &str, errors: &mut Vec<String>) {
    let schema = resolve(doc, schema);
    if let Some(t) = schema.get("type") {
        let ok = match t {
            Value::String(t) => type_ok(t, v),
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).any(|t| type_ok(t, v)),
            _ => true,
        };
        if !ok {
            errors.push(format!("{at}: {v} is not of type {t}"));
            return;
        }
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            errors.push(format!("{at}: {v} is not one of {e:?}"));
        }
    }
    if let Some(obj) = v.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        for req in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
            if let Some(name) = req.as_str() {
                if !obj.contains_key(name) {
                    errors.push(format!("{at}: required `{name}` is missing"));
                }
            }
        }
        for (k, val) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(s) => validate(doc, s, val, &format!("{at}.{k}"), errors),
                None => {
                    if schema.get("additionalProperties") == Some(&Value::Bool(false)) {
                        errors.push(format!("{at}: `{k}` is not in the schema"));
                    }
                }
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for (i, item) in arr.iter().enumerate() {
            validate(doc, items, item, &format!("{at}[{i}]"), errors);
        }
    }
}

struct Checker {
    doc: Value,
    checked: Vec<String>,
    errors: Vec<String>,
}

impl Checker {
    /// Checks one response of `METHOD template` against the document.
    fn check(&mut self, method: &str, template: &str, r: &Resp) {
        let op = &self.doc["paths"][template][method.to_ascii_lowercase()];
        if op.is_null() && r.status == 405 && !self.doc["paths"][template].is_null() {
            // A method the path does not take: a Problem, with `Allow` naming the ones it does.
            assert!(r.header("allow").is_some(), "405 without Allow on {template}");
            let doc = self.doc.clone();
            let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            validate(
                &doc,
                &json!({"$ref": "#/components/schemas/Problem"}),
                &body,
                &format!("{method} {template} 405"),
                &mut self.errors,
            );
            self.checked.push(format!("{method} {template} 405"));
            return;
        }
        if op.is_null() {
            self.errors.push(format!("{method} {template} is not in the document"));
            return;
        }
        let resp = &op["responses"][r.status.to_string()];
        if resp.is_null() {
            self.errors.push(format!("{method} {template}: status {} is not declared", r.status));
            return;
        }
        self.checked.push(format!("{method} {template} {}", r.status));
        if r.body.is_empty() {
            return;
        }
        let ctype = r.header("content-type").unwrap_or("").split(';').next().unwrap_or("").trim().to_string();
        let schema = &resp["content"][&ctype]["schema"];
        if resp["content"][&ctype].is_null() {
            self.errors.push(format!("{method} {template} {}: content type {ctype} is not declared", r.status));
            return;
        }
        if ctype.ends_with("json") {
            let body: Value = match serde_json::from_slice(&r.body) {
                Ok(v) => v,
                Err(e) => {
                    self.errors.push(format!("{method} {template}: body is not JSON: {e}"));
                    return;
                }
            };
            let doc = self.doc.clone();
            validate(&doc, schema, &body, &format!("{method} {template} {}", r.status), &mut self.errors);
        }
    }
}

#[test]
fn every_admin_response_matches_the_openapi_document() {
    let echo = Echo::start();
    let tail = format!(
        "[admin]\ntoken_hash = \"{}\"\naudit_log = \"{{DIR}}/audit.log\"\n\n[tiers.gold]\nupstream = \"default\"\nquotas.requests = {{ limit = 1000, period = \"month\" }}\n",
        hash_of(TOKEN)
    );
    let gw = Gateway::start(&standard_config(echo.addr, Extra { tail: &tail, ..Extra::default() }));
    let auth = bearer(TOKEN);
    let a = auth.as_str();
    let doc = get(gw.admin, "/v1/openapi.json", &[]).expect("openapi").json();
    assert_eq!(doc["openapi"].as_str().map(|v| v.starts_with("3.1")), Some(true));
    let mut c = Checker { doc, checked: Vec::new(), errors: Vec::new() };
    let call = |method: &str, path: &str, body: Option<Value>| {
        let b = body.map(|b| b.to_string()).unwrap_or_default();
        let mut h = vec![("authorization", a)];
        if !b.is_empty() {
            h.push(("content-type", "application/json"));
        }
        request(gw.admin, method, path, &h, b.as_bytes()).expect("admin call")
    };

    for p in ["/healthz", "/readyz", "/metrics"] {
        let r = get(gw.admin, p, &[]).expect("call");
        c.check("GET", p, &r);
    }
    c.check("GET", "/v1/tenants", &get(gw.admin, "/v1/tenants", &[]).expect("call"));
    c.check("GET", "/v1/tenants", &call("GET", "/v1/tenants?limit=2", None));
    c.check(
        "POST",
        "/v1/tenants",
        &call("POST", "/v1/tenants", Some(json!({"id": "initech", "tier": "gold", "email": "a@b.c"}))),
    );
    c.check("POST", "/v1/tenants", &call("POST", "/v1/tenants", Some(json!({"id": "initech", "tier": "gold"}))));
    c.check("POST", "/v1/tenants", &call("POST", "/v1/tenants", Some(json!({"id": "x", "tier": "platinum"}))));
    c.check("POST", "/v1/tenants", &call("POST", "/v1/tenants", Some(json!({"id": "Bad Id", "tier": "gold"}))));
    c.check("PUT", "/v1/tenants", &call("PUT", "/v1/tenants", None));
    c.check("GET", "/v1/tenants/{id}", &call("GET", "/v1/tenants/initech", None));
    c.check("GET", "/v1/tenants/{id}", &call("GET", "/v1/tenants/nobody", None));
    c.check("PATCH", "/v1/tenants/{id}", &call("PATCH", "/v1/tenants/initech", Some(json!({"name": "Initech"}))));
    c.check("PATCH", "/v1/tenants/{id}", &call("PATCH", "/v1/tenants/acme", Some(json!({"name": "Acme"}))));
    c.check("POST", "/v1/tenants/{id}/suspend", &call("POST", "/v1/tenants/initech/suspend", None));
    c.check("POST", "/v1/tenants/{id}/reactivate", &call("POST", "/v1/tenants/initech/reactivate", None));
    c.check("PUT", "/v1/tenants/{id}/tier", &call("PUT", "/v1/tenants/initech/tier", Some(json!({"tier": "free"}))));
    let r = call(
        "POST",
        "/v1/tenants/initech/keys",
        Some(json!({"name": "ci", "scopes": ["read"], "expires_in_days": 30})),
    );
    c.check("POST", "/v1/tenants/{id}/keys", &r);
    let key_id = r.json()["key"]["id"].as_str().unwrap_or_default().to_string();
    c.check("GET", "/v1/tenants/{id}/keys", &call("GET", "/v1/tenants/initech/keys", None));
    c.check("GET", "/v1/tenants/{id}/keys", &call("GET", "/v1/tenants/acme/keys", None));
    c.check("GET", "/v1/tenants/{id}/usage", &call("GET", "/v1/tenants/initech/usage", None));
    c.check(
        "GET",
        "/v1/tenants/{id}/usage/report",
        &call("GET", "/v1/tenants/initech/usage/report?from=2027-01-01&to=2027-01-31", None),
    );
    c.check(
        "GET",
        "/v1/tenants/{id}/usage/report",
        &call("GET", "/v1/tenants/initech/usage/report?from=2027-01-01&to=2027-01-31&format=csv", None),
    );
    c.check(
        "GET",
        "/v1/tenants/{id}/usage/report",
        &call("GET", "/v1/tenants/initech/usage/report?from=nope&to=2027-01-31", None),
    );
    c.check(
        "POST",
        "/v1/keys/{key_id}/rotate",
        &call("POST", &format!("/v1/keys/{key_id}/rotate"), Some(json!({"grace_period_hours": 1}))),
    );
    c.check("DELETE", "/v1/keys/{key_id}", &call("DELETE", &format!("/v1/keys/{key_id}"), None));
    c.check("DELETE", "/v1/keys/{key_id}", &call("DELETE", "/v1/keys/key_nope", None));
    c.check("GET", "/v1/tiers", &call("GET", "/v1/tiers", None));
    c.check("POST", "/v1/reload", &call("POST", "/v1/reload", None));
    c.check("GET", "/v1/audit", &call("GET", "/v1/audit?tenant=initech", None));
    c.check("DELETE", "/v1/tenants/{id}", &call("DELETE", "/v1/tenants/initech", None));
    c.check("DELETE", "/v1/tenants/{id}", &call("DELETE", "/v1/tenants/initech", None));
    c.check(
        "POST",
        "/v1/tenants",
        &call("POST", "/v1/tenants", Some(json!({"id": "y", "tier": "gold", "colour": "red"}))),
    );
    let big = format!("{{\"id\": \"z\", \"tier\": \"gold\", \"name\": \"{}\"}}", "n".repeat(1_100_000));
    c.check(
        "POST",
        "/v1/tenants",
        &request(gw.admin, "POST", "/v1/tenants", &[("authorization", a)], big.as_bytes()).expect("big"),
    );
    c.check("GET", "/v1/openapi.json", &get(gw.admin, "/v1/openapi.json", &[]).expect("openapi"));
    // A broken config: the reload answers 422 with the errors.
    let cfg = std::fs::read_to_string(&gw.config_path).expect("read config");
    std::fs::write(&gw.config_path, format!("{cfg}\n[[tenants]]\nid = \"broken\"\ntier = \"nope\"\n")).expect("write");
    c.check("POST", "/v1/reload", &call("POST", "/v1/reload", None));

    assert!(c.errors.is_empty(), "responses that do not match the document:\n{}", c.errors.join("\n"));
    assert!(c.checked.len() >= 35, "{:?}", c.checked);
}
