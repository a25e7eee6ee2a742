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
    c.check("GET", "/v1/tenants/{id}/jobs", &call("GET", "/v1/tenants/acme/jobs?status=pending&limit=5", None));
    c.check("GET", "/v1/tenants/{id}/jobs", &call("GET", "/v1/tenants/acme/jobs?limit=500", None));
    c.check("GET", "/v1/tenants/{id}/jobs", &call("GET", "/v1/tenants/nobody/jobs", None));
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
    // A config cut short before its tenants: refused (409) unless forced; `force` is a boolean.
    let cfg = std::fs::read_to_string(&gw.config_path).expect("read config");
    let cut = cfg.find("\n[[tenants]]\n").expect("tenants in the config");
    std::fs::write(&gw.config_path, &cfg[..cut]).expect("write");
    c.check("POST", "/v1/reload", &call("POST", "/v1/reload", None));
    c.check("POST", "/v1/reload", &call("POST", "/v1/reload?force=maybe", None));
    std::fs::write(&gw.config_path, &cfg).expect("write");
    c.check("POST", "/v1/reload", &call("POST", "/v1/reload?force=false", None));
    // A broken config: the reload answers 422 with the errors.
    std::fs::write(&gw.config_path, format!("{cfg}\n[[tenants]]\nid = \"broken\"\ntier = \"nope\"\n")).expect("write");
    c.check("POST", "/v1/reload", &call("POST", "/v1/reload", None));

    assert!(c.errors.is_empty(), "responses that do not match the document:\n{}", c.errors.join("\n"));
    assert!(c.checked.len() >= 38, "{:?}", c.checked);
    for status in ["POST /v1/reload 409", "POST /v1/reload 400"] {
        assert!(c.checked.iter().any(|x| x == status), "{status} was not seen: {:?}", c.checked);
    }
}

/// The jobs document (`docs/jobs-openapi.json`) matches the real `/_tollgate/jobs` endpoints:
/// each is called on a running gateway with an asynchronous rule, and every answer must be
/// declared there and valid against its schema.
#[test]
fn every_job_response_matches_the_jobs_document() {
    let echo = Echo::start();
    let tail =
        "[[rule]]\nname = \"gen\"\nmatch = { path_prefix = \"/gen\" }\nmode = \"async\"\njob_timeout = \"300ms\"\n";
    let gw = Gateway::start(&standard_config(echo.addr, Extra { tail, ..Extra::default() }));
    let doc: Value = serde_json::from_str(include_str!("../docs/jobs-openapi.json")).expect("the document is JSON");
    let mut c = Checker { doc, checked: Vec::new(), errors: Vec::new() };
    let auth = bearer(ACME_KEY);
    let a: &[(&str, &str)] = &[("authorization", auth.as_str())];
    let r = gw.request("POST", "/gen/rows", a, b"{}");
    c.check("POST", "/{async-route}", &r);
    let id = r.json()["id"].as_str().unwrap_or_default().to_string();
    c.check("POST", "/{async-route}", &gw.request("POST", "/gen", &[a[0], ("x-job-priority", "x")], b""));
    c.check("POST", "/{async-route}", &gw.request("POST", "/gen", &[], b""));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while gw.get(&format!("/_tollgate/jobs/{id}"), a).json()["status"] != "completed" {
        assert!(std::time::Instant::now() < deadline, "the job did not complete");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    c.check("GET", "/_tollgate/jobs/{id}", &gw.get(&format!("/_tollgate/jobs/{id}"), a));
    c.check("GET", "/_tollgate/jobs/{id}", &gw.get(&format!("/_tollgate/jobs/{id}"), &[]));
    c.check("GET", "/_tollgate/jobs/{id}", &gw.get("/_tollgate/jobs/job_00000000000000000000000000000000", a));
    c.check("GET", "/_tollgate/jobs/{id}/result", &gw.get(&format!("/_tollgate/jobs/{id}/result"), a));
    c.check("DELETE", "/_tollgate/jobs/{id}", &gw.request("DELETE", &format!("/_tollgate/jobs/{id}"), a, b""));
    c.check("GET", "/_tollgate/jobs", &gw.get("/_tollgate/jobs?limit=1", a));
    c.check("GET", "/_tollgate/jobs", &gw.get("/_tollgate/jobs?limit=0", a));
    c.check("GET", "/_tollgate/jobs", &gw.get("/_tollgate/jobs?status=completed&status=failed", a));
    let pending =
        gw.request("POST", "/gen?delay_ms=5000", a, b"").json()["id"].as_str().unwrap_or_default().to_string();
    c.check("DELETE", "/_tollgate/jobs/{id}", &gw.request("DELETE", &format!("/_tollgate/jobs/{pending}"), a, b""));
    let timed_out =
        gw.request("POST", "/gen?delay_ms=3000", a, b"").json()["id"].as_str().unwrap_or_default().to_string();
    c.check("GET", "/_tollgate/jobs/{id}/result", &gw.get(&format!("/_tollgate/jobs/{timed_out}/result"), a));
    c.check("DELETE", "/_tollgate/jobs", &gw.request("DELETE", "/_tollgate/jobs", a, b""));
    c.check("PUT", "/_tollgate/jobs", &gw.request("PUT", "/_tollgate/jobs", a, b""));
    assert!(c.errors.is_empty(), "responses that do not match the document:\n{}", c.errors.join("\n"));
    for seen in [
        "POST /{async-route} 202",
        "POST /{async-route} 400",
        "POST /{async-route} 401",
        "DELETE /_tollgate/jobs/{id} 409",
    ] {
        assert!(c.checked.iter().any(|x| x == seen), "{seen} was not seen: {:?}", c.checked);
    }
    // Every input of the jobs document is bounded too.
    let doc = c.doc.clone();
    let mut errors = Vec::new();
    let mut seen = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        let shared = item.get("parameters").and_then(Value::as_array).cloned().unwrap_or_default();
        for (method, op) in item.as_object().expect("path item") {
            if method == "parameters" {
                continue;
            }
            let own = op.get("parameters").and_then(Value::as_array).cloned().unwrap_or_default();
            for p in shared.iter().chain(&own) {
                let at = format!("{} {path} parameter `{}`", method.to_uppercase(), p["name"].as_str().unwrap_or("?"));
                walk_inputs(&doc, &p["schema"], &at, &mut seen, &mut errors);
            }
        }
    }
    assert!(errors.is_empty(), "unbounded inputs in jobs-openapi.json:\n{}", errors.join("\n"));
}

/// Where a schema sits in the document, for messages.
fn walk_inputs(doc: &Value, schema: &Value, at: &str, seen: &mut Vec<String>, errors: &mut Vec<String>) {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        if !seen.iter().any(|s| s == r) {
            seen.push(r.to_string());
            walk_inputs(doc, resolve(doc, schema), r, seen, errors);
        }
        return;
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        for (i, s) in schema.get(key).and_then(Value::as_array).into_iter().flatten().enumerate() {
            walk_inputs(doc, s, &format!("{at}/{key}/{i}"), seen, errors);
        }
    }
    let types: Vec<&str> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let has = |k: &str| schema.get(k).is_some();
    if types.is_empty() && !has("anyOf") && !has("oneOf") && !has("allOf") && !has("enum") {
        errors.push(format!("{at}: no type, so nothing bounds it"));
    }
    if types.contains(&"string") && !has("maxLength") && !has("enum") {
        errors.push(format!("{at}: a string without maxLength or enum"));
    }
    if (types.contains(&"integer") || types.contains(&"number")) && !(has("minimum") && has("maximum")) {
        errors.push(format!("{at}: a number without minimum and maximum"));
    }
    if types.contains(&"array") {
        if !has("maxItems") {
            errors.push(format!("{at}: an array without maxItems"));
        }
        match schema.get("items") {
            Some(items) => walk_inputs(doc, items, &format!("{at}/items"), seen, errors),
            None => errors.push(format!("{at}: an array without items")),
        }
    }
    if types.contains(&"object") {
        for (name, p) in schema.get("properties").and_then(Value::as_object).into_iter().flatten() {
            walk_inputs(doc, p, &format!("{at}/{name}"), seen, errors);
        }
        match schema.get("additionalProperties") {
            Some(Value::Bool(false)) => {}
            Some(extra) if extra.is_object() => {
                if !has("maxProperties") {
                    errors.push(format!("{at}: open properties without maxProperties"));
                }
                match schema.get("propertyNames") {
                    Some(names) if names.get("maxLength").is_some() => {}
                    _ => errors.push(format!("{at}: open properties without propertyNames.maxLength")),
                }
                walk_inputs(doc, extra, &format!("{at}/additionalProperties"), seen, errors);
            }
            _ => errors.push(format!("{at}: an object that takes any property (set additionalProperties)")),
        }
    }
}

/// Every input the document describes (path and query parameters, request bodies) is bounded:
/// strings by `maxLength` or `enum`, numbers by `minimum` and `maximum`, arrays by `maxItems`,
/// open objects by `maxProperties`. Answers are produced by the gateway and are not walked.
#[test]
fn the_document_bounds_every_input() {
    let doc: Value = serde_json::from_str(include_str!("../src/admin/openapi.json")).expect("the document is JSON");
    let mut errors = Vec::new();
    let mut seen = Vec::new();
    let mut inputs = 0;
    for (path, item) in doc["paths"].as_object().expect("paths") {
        let shared = item.get("parameters").and_then(Value::as_array).cloned().unwrap_or_default();
        for (method, op) in item.as_object().expect("path item") {
            if method == "parameters" {
                continue;
            }
            let own = op.get("parameters").and_then(Value::as_array).cloned().unwrap_or_default();
            for p in shared.iter().chain(&own) {
                let at = format!("{} {path} parameter `{}`", method.to_uppercase(), p["name"].as_str().unwrap_or("?"));
                walk_inputs(&doc, &p["schema"], &at, &mut seen, &mut errors);
                inputs += 1;
            }
            if let Some(body) = op.pointer("/requestBody/content/application~1json/schema") {
                walk_inputs(&doc, body, &format!("{} {path} body", method.to_uppercase()), &mut seen, &mut errors);
                inputs += 1;
            }
        }
    }
    assert!(errors.is_empty(), "unbounded inputs in openapi.json:\n{}", errors.join("\n"));
    assert!(inputs >= 25, "only {inputs} inputs were walked");
    // The walker itself notices a loose schema.
    let mut found = Vec::new();
    let loose = json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}, "s": {"type": ["string", "null"]}, "a": {"type": "array", "items": {"type": "string", "enum": ["x"]}}}});
    walk_inputs(&doc, &loose, "loose", &mut Vec::new(), &mut found);
    assert_eq!(found.len(), 4, "{found:?}");
}

/// The probes and the document take GET only; every other method (HEAD included) is a 405
/// problem with `Allow: GET`, like the rest of the admin API.
#[test]
fn probes_and_the_document_refuse_other_methods() {
    let echo = Echo::start();
    let gw = Gateway::start(&standard_config(echo.addr, Extra::default()));
    for path in ["/healthz", "/readyz", "/metrics", "/v1/openapi.json"] {
        for method in ["TRACE", "PUT", "DELETE", "POST", "PATCH", "OPTIONS", "HEAD"] {
            let r = request(gw.admin, method, path, &[], b"").expect("request");
            assert_eq!(r.status, 405, "{method} {path}: {}", r.text());
            assert_eq!(r.header("allow"), Some("GET"), "{method} {path}");
            if method != "HEAD" {
                assert_eq!(r.problem_code(), "method_not_allowed", "{method} {path}");
            }
        }
        // A query string does not break a probe.
        assert_eq!(get(gw.admin, &format!("{path}?cache=1"), &[]).expect("get").status, 200, "{path}");
    }
}

/// One request of the bound table and what it must answer.
struct Row {
    label: String,
    method: &'static str,
    template: &'static str,
    path: String,
    body: Option<Value>,
    status: u16,
    /// Words the answer's `detail` must hold (for a refusal: the field and its limit).
    needles: Vec<String>,
}

fn row(label: impl Into<String>, method: &'static str, template: &'static str, path: impl Into<String>) -> Row {
    Row { label: label.into(), method, template, path: path.into(), body: None, status: 200, needles: Vec::new() }
}

impl Row {
    fn body(mut self, b: Value) -> Row {
        self.body = Some(b);
        self
    }

    fn answers(mut self, status: u16) -> Row {
        self.status = status;
        self
    }

    /// A 400 whose detail names `field` and `limit`.
    fn refused(mut self, field: &str, limit: impl ToString) -> Row {
        self.status = 400;
        self.needles = vec![field.to_string(), limit.to_string()];
        self
    }

    /// A 400 for another reason than size: the value passed its length bound.
    fn refused_for(mut self, needle: &str) -> Row {
        self.status = 400;
        self.needles = vec![needle.to_string()];
        self
    }
}

/// Every bound of the document, read from the document itself: the value at the bound is
/// accepted (or refused for another reason than its size) and the one past it is refused with
/// 400 `bad_request`, a detail naming the field and the limit, and an answer the document
/// declares.
#[test]
fn every_bound_is_enforced_at_its_value() {
    let echo = Echo::start();
    let long_tier = "t".repeat(128);
    let long_metric = "m".repeat(115);
    let metrics: Vec<String> = (0..16).map(|i| format!("\"m{i:02}\"")).collect();
    let top = format!("usage_metrics = [{}, \"{long_metric}\"]", metrics.join(", "));
    let tail = format!(
        "[admin]\ntoken_hash = \"{}\"\naudit_log = \"{{DIR}}/audit.log\"\n\n[tiers.{long_tier}]\nupstream = \"default\"\n",
        hash_of(TOKEN)
    );
    let gw = Gateway::start(&standard_config(echo.addr, Extra { top: &top, tail: &tail, ..Extra::default() }));
    let auth = bearer(TOKEN);
    let doc = get(gw.admin, "/v1/openapi.json", &[]).expect("openapi").json();
    let num = |v: &Value, what: &str| v.as_i64().unwrap_or_else(|| panic!("{what} is not in the document"));
    let prop = |schema: &str, field: &str, key: &str| {
        num(&doc["components"]["schemas"][schema]["properties"][field][key], &format!("{schema}.{field}.{key}"))
    };
    let item = |schema: &str, field: &str, key: &str| {
        num(
            &doc["components"]["schemas"][schema]["properties"][field]["items"][key],
            &format!("{schema}.{field}[].{key}"),
        )
    };
    let param = |path: &str, method: &str, name: &str, key: &str| {
        let op = &doc["paths"][path];
        let list = op[method]["parameters"].as_array().into_iter().chain(op["parameters"].as_array()).flatten();
        let p = list.into_iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("{path} {name}"));
        num(&p["schema"][key], &format!("{path} {name}.{key}"))
    };
    let call = |method: &str, path: &str, body: Option<&Value>| {
        let b = body.map(Value::to_string).unwrap_or_default();
        request(gw.admin, method, path, &[("authorization", auth.as_str())], b.as_bytes()).expect("admin call")
    };
    let s = |c: char, n: i64| c.to_string().repeat(n as usize);
    // Each created tenant needs its own id.
    let mut n = 0;
    let mut id = || {
        n += 1;
        format!("b-{n}")
    };
    let tenant = |id: String, extra: Value| {
        let mut b = json!({"id": id, "tier": "free"});
        if let (Some(o), Some(e)) = (b.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        b
    };
    let post = "/v1/tenants";
    let mut rows: Vec<Row> = Vec::new();

    // POST /v1/tenants: strings.
    let max = prop("CreateTenant", "id", "maxLength");
    rows.push(row("id at max", "POST", post, post).body(json!({"id": s('a', max), "tier": "free"})).answers(201));
    rows.push(
        row("id past max", "POST", post, post)
            .body(json!({"id": s('a', max + 1), "tier": "free"}))
            .refused("tenant id", max),
    );
    for field in ["name", "email"] {
        let max = prop("CreateTenant", field, "maxLength");
        rows.push(
            row(format!("{field} at max"), "POST", post, post)
                .body(tenant(id(), json!({field: s('x', max)})))
                .answers(201),
        );
        rows.push(
            row(format!("{field} past max"), "POST", post, post)
                .body(tenant(id(), json!({field: s('x', max + 1)})))
                .refused(field, max),
        );
    }
    let max = prop("CreateTenant", "tier", "maxLength");
    assert_eq!(max as usize, long_tier.len());
    rows.push(row("tier at max", "POST", post, post).body(json!({"id": id(), "tier": long_tier})).answers(201));
    rows.push(
        row("tier past max", "POST", post, post)
            .body(json!({"id": id(), "tier": s('t', max + 1)}))
            .refused("tier", max),
    );
    let max = prop("CreateTenant", "timezone", "maxLength");
    rows.push(
        row("timezone at max", "POST", post, post)
            .body(tenant(id(), json!({"timezone": s('z', max)})))
            .refused_for("IANA"),
    );
    rows.push(
        row("timezone past max", "POST", post, post)
            .body(tenant(id(), json!({"timezone": s('z', max + 1)})))
            .refused("timezone", max),
    );
    // Arrays and their items.
    let max = prop("CreateTenant", "subdomains", "maxItems");
    let labels = |p: &str, k: i64| (0..k).map(|i| format!("{p}{i}")).collect::<Vec<_>>();
    rows.push(
        row("subdomains at max", "POST", post, post)
            .body(tenant(id(), json!({"subdomains": labels("sa", max)})))
            .answers(201),
    );
    rows.push(
        row("subdomains past max", "POST", post, post)
            .body(tenant(id(), json!({"subdomains": labels("sb", max + 1)})))
            .refused("subdomains", max),
    );
    let max = item("CreateTenant", "subdomains", "maxLength");
    rows.push(
        row("subdomain at max", "POST", post, post)
            .body(tenant(id(), json!({"subdomains": [s('d', max)]})))
            .answers(201),
    );
    rows.push(
        row("subdomain past max", "POST", post, post)
            .body(tenant(id(), json!({"subdomains": [s('e', max + 1)]})))
            .refused("subdomains", max),
    );
    let max = prop("CreateTenant", "ip_allow", "maxItems");
    let ips = |k: i64| (0..k).map(|i| format!("10.0.{}.{}/32", i / 256, i % 256)).collect::<Vec<_>>();
    rows.push(
        row("ip_allow at max", "POST", post, post).body(tenant(id(), json!({"ip_allow": ips(max)}))).answers(201),
    );
    rows.push(
        row("ip_allow past max", "POST", post, post)
            .body(tenant(id(), json!({"ip_allow": ips(max + 1)})))
            .refused("ip_allow", max),
    );
    let max = item("CreateTenant", "ip_allow", "maxLength");
    rows.push(
        row("ip_allow entry at max", "POST", post, post)
            .body(tenant(id(), json!({"ip_allow": [s('1', max)]})))
            .refused_for("not an IP address"),
    );
    rows.push(
        row("ip_allow entry past max", "POST", post, post)
            .body(tenant(id(), json!({"ip_allow": [s('1', max + 1)]})))
            .refused("ip_allow", max),
    );
    // Integers.
    let (lo, hi) =
        (prop("CreateTenant", "billing_anchor_day", "minimum"), prop("CreateTenant", "billing_anchor_day", "maximum"));
    for (v, ok) in [(lo, true), (lo - 1, false), (hi, true), (hi + 1, false)] {
        let r = row(format!("billing_anchor_day {v}"), "POST", post, post)
            .body(tenant(id(), json!({"billing_anchor_day": v})));
        rows.push(if ok { r.answers(201) } else { r.refused("billing_anchor_day", if v < lo { lo } else { hi }) });
    }
    // Overrides: count, key length, integer values, string values.
    let overrides = &doc["components"]["schemas"]["Overrides"];
    let max = num(&overrides["maxProperties"], "Overrides.maxProperties");
    let mut full = serde_json::Map::new();
    for i in 0..16 {
        full.insert(format!("quotas.m{i:02}.limit"), json!(1));
        full.insert(format!("quotas.m{i:02}.period"), json!("day"));
        full.insert(format!("quotas.m{i:02}.enforcement"), json!("soft"));
        full.insert(format!("quotas.m{i:02}.overage"), json!(10));
    }
    assert_eq!(full.len() as i64, max, "the test config declares enough metrics for a full set of overrides");
    rows.push(
        row("overrides at max", "POST", post, post).body(tenant(id(), json!({"overrides": full.clone()}))).answers(201),
    );
    full.insert("rate.burst".into(), json!(5));
    rows.push(
        row("overrides past max", "POST", post, post)
            .body(tenant(id(), json!({"overrides": full})))
            .refused("overrides", max),
    );
    let max = num(&overrides["propertyNames"]["maxLength"], "Overrides.propertyNames.maxLength");
    assert_eq!(format!("quotas.{long_metric}.limit").len() as i64, max);
    rows.push(
        row("override key at max", "POST", post, post)
            .body(tenant(id(), json!({"overrides": {format!("quotas.{long_metric}.limit"): 1}})))
            .answers(201),
    );
    rows.push(
        row("override key past max", "POST", post, post)
            .body(tenant(id(), json!({"overrides": {format!("quotas.{long_metric}m.limit"): 1}})))
            .refused("overrides", max),
    );
    let value = &doc["components"]["schemas"]["OverrideValue"]["anyOf"][0];
    let (lo, hi) = (num(&value["minimum"], "OverrideValue.minimum"), num(&value["maximum"], "OverrideValue.maximum"));
    rows.push(
        row("override value at min", "POST", post, post)
            .body(tenant(id(), json!({"overrides": {"quotas.m00.limit": lo}})))
            .answers(201),
    );
    rows.push(
        row("override value past min", "POST", post, post)
            .body(tenant(id(), json!({"overrides": {"quotas.m00.limit": lo - 1}})))
            .refused("quotas.m00.limit", lo),
    );
    rows.push(
        row("override value at max", "POST", post, post)
            .body(tenant(id(), json!({"overrides": {"quotas.m00.limit": hi}})))
            .answers(201),
    );
    rows.push(
        row("override value past max", "POST", post, post)
            .body(tenant(id(), json!({"overrides": {"quotas.m00.limit": (hi as u64) + 1}})))
            .refused("quotas.m00.limit", hi),
    );
    rows.push(
        row("override string outside its enum", "POST", post, post)
            .body(tenant(id(), json!({"overrides": {"quotas.m00.period": "fortnight"}})))
            .refused_for("quotas.m00.period"),
    );
    rows.push(
        row("status outside its enum", "POST", post, post)
            .body(tenant(id(), json!({"status": "AAA"})))
            .refused_for("status"),
    );

    // PATCH and PUT share the checks.
    let t = "/v1/tenants/{id}";
    rows.push(row("create b-patch", "POST", post, post).body(json!({"id": "b-patch", "tier": "free"})).answers(201));
    rows.push(
        row("patch billing_anchor_day past max", "PATCH", t, "/v1/tenants/b-patch")
            .body(json!({"billing_anchor_day": 32}))
            .refused("billing_anchor_day", 31),
    );
    rows.push(
        row("patch name past max", "PATCH", t, "/v1/tenants/b-patch")
            .body(json!({"name": s('x', 201)}))
            .refused("name", 200),
    );
    let max = prop("SetTier", "tier", "maxLength");
    let tier = "/v1/tenants/{id}/tier";
    rows.push(row("set tier at max", "PUT", tier, "/v1/tenants/b-patch/tier").body(json!({"tier": long_tier})));
    rows.push(
        row("set tier past max", "PUT", tier, "/v1/tenants/b-patch/tier")
            .body(json!({"tier": s('t', max + 1)}))
            .refused("tier", max),
    );

    // POST /v1/tenants/{id}/keys.
    let keys = "/v1/tenants/{id}/keys";
    let kp = "/v1/tenants/b-patch/keys";
    let max = prop("CreateKey", "name", "maxLength");
    rows.push(row("key name at max", "POST", keys, kp).body(json!({"name": s('k', max)})).answers(201));
    rows.push(row("key name past max", "POST", keys, kp).body(json!({"name": s('k', max + 1)})).refused("name", max));
    let max = prop("CreateKey", "scopes", "maxItems");
    let scopes = |k: i64| (0..k).map(|i| format!("s{i}")).collect::<Vec<_>>();
    rows.push(row("scopes at max", "POST", keys, kp).body(json!({"scopes": scopes(max)})).answers(201));
    rows.push(row("scopes past max", "POST", keys, kp).body(json!({"scopes": scopes(max + 1)})).refused("scopes", max));
    let max = item("CreateKey", "scopes", "maxLength");
    rows.push(row("scope at max", "POST", keys, kp).body(json!({"scopes": [s('s', max)]})).answers(201));
    rows.push(
        row("scope past max", "POST", keys, kp).body(json!({"scopes": [s('s', max + 1)]})).refused("scopes", max),
    );
    let (lo, hi) = (prop("CreateKey", "expires_in_days", "minimum"), prop("CreateKey", "expires_in_days", "maximum"));
    for (v, ok) in [(lo, true), (lo - 1, false), (hi, true), (hi + 1, false)] {
        let r = row(format!("expires_in_days {v}"), "POST", keys, kp).body(json!({"expires_in_days": v}));
        rows.push(if ok { r.answers(201) } else { r.refused("expires_in_days", if v < lo { lo } else { hi }) });
    }

    // Query parameters.
    let list = "/v1/tenants";
    let (lo, hi) = (param(list, "get", "limit", "minimum"), param(list, "get", "limit", "maximum"));
    for (v, ok) in [(lo, true), (lo - 1, false), (hi, true), (hi + 1, false)] {
        let r = row(format!("limit {v}"), "GET", list, format!("{list}?limit={v}"));
        rows.push(if ok { r } else { r.refused("limit", if v < lo { lo } else { hi }) });
    }
    rows.push(row("limit not a number", "GET", list, format!("{list}?limit=ten")).refused_for("limit"));
    for name in ["cursor", "tier"] {
        let max = param(list, "get", name, "maxLength");
        rows.push(row(format!("{name} at max"), "GET", list, format!("{list}?{name}={}", s('c', max))));
        rows.push(
            row(format!("{name} past max"), "GET", list, format!("{list}?{name}={}", s('c', max + 1)))
                .refused(name, max),
        );
    }
    rows.push(row("status active", "GET", list, format!("{list}?status=active")));
    rows.push(
        row("status outside its enum", "GET", list, format!("{list}?status=AAA"))
            .refused("status", "active, suspended"),
    );
    rows.push(
        row("unknown parameter", "GET", list, format!("{list}?colour=red"))
            .refused("colour", "limit, cursor, tier, status"),
    );
    rows.push(row("parameter given twice", "GET", list, format!("{list}?limit=1&limit=2")).refused_for("twice"));
    rows.push(
        row("parameter on an endpoint without any", "GET", "/v1/tiers", "/v1/tiers?verbose=1")
            .refused("verbose", "no query parameters"),
    );
    let audit = "/v1/audit";
    let (lo, hi) = (param(audit, "get", "limit", "minimum"), param(audit, "get", "limit", "maximum"));
    for (v, ok) in [(lo, true), (lo - 1, false), (hi, true), (hi + 1, false)] {
        let r = row(format!("audit limit {v}"), "GET", audit, format!("{audit}?limit={v}"));
        rows.push(if ok { r } else { r.refused("limit", if v < lo { lo } else { hi }) });
    }
    let max = param(audit, "get", "tenant", "maxLength");
    rows.push(row("audit tenant at max", "GET", audit, format!("{audit}?tenant={}", s('a', max))));
    rows.push(
        row("audit tenant past max", "GET", audit, format!("{audit}?tenant={}", s('a', max + 1)))
            .refused("tenant", max),
    );
    let report = "/v1/tenants/{id}/usage/report";
    let rp = |q: &str| format!("/v1/tenants/acme/usage/report?{q}");
    for (q, ok, needles) in [
        ("from=2000-01-01&to=2000-01-31", true, ["", ""]),
        ("from=1999-12-31&to=2000-01-31", false, ["from", "2000"]),
        ("from=2100-12-01&to=2100-12-31", true, ["", ""]),
        ("from=2100-12-01&to=2101-01-01", false, ["to", "2100"]),
        ("from=2028-01-01&to=2028-12-31", true, ["", ""]),
        ("from=2027-01-01&to=2028-01-02", false, ["366", "days"]),
        ("from=2027-01-31&to=2027-01-01", false, ["from", "after"]),
        ("from=2027-1-1&to=2027-01-31", false, ["from", "YYYY-MM-DD"]),
        ("from=2027-01-01&to=2027-01-31&format=xml", false, ["format", "json, csv"]),
    ] {
        let r = row(format!("report {q}"), "GET", report, rp(q));
        rows.push(if ok { r } else { r.refused(needles[0], needles[1]) });
    }
    assert_eq!(param(report, "get", "from", "maxLength"), 10);

    // Path parameters.
    let max = param(t, "get", "id", "maxLength");
    rows.push(row("path id at max", "GET", t, format!("/v1/tenants/{}", s('z', max))).answers(404));
    rows.push(row("path id past max", "GET", t, format!("/v1/tenants/{}", s('a', max + 1))).refused("tenant id", max));
    rows.push(row("path id not a label", "GET", t, "/v1/tenants/Bad_Id").refused("tenant id", "a-z"));
    let key = "/v1/keys/{key_id}";
    let max = param(key, "delete", "key_id", "maxLength");
    rows.push(row("path key_id at max", "DELETE", key, format!("/v1/keys/{}", s('k', max))).answers(404));
    rows.push(
        row("path key_id past max", "DELETE", key, format!("/v1/keys/{}", s('k', max + 1))).refused("key_id", max),
    );

    let mut c = Checker { doc: doc.clone(), checked: Vec::new(), errors: Vec::new() };
    let mut failures = Vec::new();
    for r in &rows {
        let resp = call(r.method, &r.path, r.body.as_ref());
        c.check(r.method, r.template, &resp);
        let detail =
            if resp.status >= 400 { resp.json()["detail"].as_str().unwrap_or("").to_string() } else { String::new() };
        if resp.status != r.status {
            failures.push(format!(
                "{}: {} {} answered {} (want {}): {detail}",
                r.label, r.method, r.template, resp.status, r.status
            ));
            continue;
        }
        if r.status == 400 {
            if resp.problem_code() != "bad_request" {
                failures.push(format!("{}: code {}", r.label, resp.problem_code()));
            }
            for needle in &r.needles {
                if !detail.contains(needle.as_str()) {
                    failures.push(format!("{}: `{needle}` is not in the detail: {detail}", r.label));
                }
            }
            if detail.len() > 400 {
                failures.push(format!("{}: the detail echoes too much ({} bytes)", r.label, detail.len()));
            }
        }
    }
    // Grace periods, each on a fresh key (a rotation changes the key it rotates).
    let (lo, hi) =
        (prop("RotateKey", "grace_period_hours", "minimum"), prop("RotateKey", "grace_period_hours", "maximum"));
    for (v, ok) in [(lo, true), (lo - 1, false), (hi, true), (hi + 1, false)] {
        let made = call("POST", kp, Some(&json!({"scopes": ["read"]}))).json();
        let key_id = made["key"]["id"].as_str().expect("key id").to_string();
        let resp = call("POST", &format!("/v1/keys/{key_id}/rotate"), Some(&json!({"grace_period_hours": v})));
        c.check("POST", "/v1/keys/{key_id}/rotate", &resp);
        let want = if ok { 201 } else { 400 };
        let detail = resp.json()["detail"].as_str().unwrap_or("").to_string();
        let limit = if v < lo { lo } else { hi };
        let names_the_limit = detail.contains("grace_period_hours") && detail.contains(&limit.to_string());
        if resp.status != want || (!ok && !names_the_limit) {
            failures.push(format!("grace_period_hours {v}: {} {detail}", resp.status));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} bounds are not enforced as documented:\n{}",
        failures.len(),
        rows.len() + 4,
        failures.join("\n")
    );
    assert!(c.errors.is_empty(), "answers that do not match the document:\n{}", c.errors.join("\n"));
}
