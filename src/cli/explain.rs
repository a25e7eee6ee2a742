//! `tollgate rules explain`: which rule a request would match, why each earlier rule did not,
//! and the effective policy after tier and rule merging. It runs the same matcher as the
//! gateway, so what it prints is what traffic gets.

use crate::config::Config;
use crate::rules::matcher::RequestView;
use crate::rules::{CostSource, Rule};
use std::fmt::Write;

/// Renders the explanation for one request as text.
pub fn explain(config: &Config, req: &RequestView<'_>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "request: {} {}{} host={} tier={} tenant={}",
        req.method,
        req.path,
        req.query.map(|q| format!("?{q}")).unwrap_or_default(),
        if req.host.is_empty() { "-" } else { req.host },
        req.tier.unwrap_or("-"),
        req.tenant.unwrap_or("-"),
    );
    let found = config.rules.find(req);
    let matched_index = found.map(|r| r.index);
    for rule in &config.rules.rules {
        if Some(rule.index) == matched_index {
            let _ = writeln!(out, "  #{} {} ({}): MATCH", rule.index + 1, rule.name, rule.origin);
            break;
        }
        let why = rule.when.mismatch(req).unwrap_or_else(|| "matches, but an earlier rule won".into());
        let _ = writeln!(out, "  #{} {} ({}): no: {why}", rule.index + 1, rule.name, rule.origin);
    }
    match found {
        None => {
            let _ = writeln!(out, "result: no rule matches and unmatched = \"deny\": 404 no_route");
        }
        Some(rule) => {
            if rule.index == usize::MAX {
                let _ = writeln!(out, "result: no rule matches; unmatched = \"allow\" applies the defaults");
            } else {
                let _ = writeln!(out, "result: rule `{}`", rule.name);
            }
            policy(config, rule, req, &mut out);
        }
    }
    out
}

fn policy(config: &Config, rule: &Rule, req: &RequestView<'_>, out: &mut String) {
    let a = &rule.actions;
    let tier = req.tier.and_then(|t| config.tiers.get(t));
    let _ = writeln!(out, "effective policy:");
    if let Some(d) = &a.deny {
        let _ = writeln!(out, "  deny: {} \"{}\"", d.status, d.message);
        if let Some(allow) = &d.allow {
            let _ = writeln!(out, "  allow: {allow}");
        }
        return;
    }
    let _ = writeln!(out, "  key required: {}", if a.public { "no (public)" } else { "yes" });
    if !a.require_scopes.is_empty() {
        let s: Vec<&str> = a.require_scopes.iter().map(|s| &**s).collect();
        let _ = writeln!(out, "  require_scopes: {}", s.join(", "));
    }
    if let Some(f) = &a.require_feature {
        let verdict = match tier {
            Some(t) if t.has_feature(f) => format!("tier `{}` has it", t.name),
            Some(t) => format!("tier `{}` lacks it: 403 feature_not_in_tier", t.name),
            None => "depends on the tenant's tier".into(),
        };
        let _ = writeln!(out, "  require_feature: {f} ({verdict})");
    }
    let upstream = match (&a.upstream, tier) {
        (Some(u), _) => format!("{u} (from the rule)"),
        (None, Some(t)) => format!("{} (from tier `{}`)", t.upstream, t.name),
        (None, None) => "the tenant tier's upstream".into(),
    };
    let _ = writeln!(out, "  upstream: {upstream}");
    if let Some(m) = a.max_body {
        let _ = writeln!(out, "  max_body: {m} bytes");
    }
    if let Some(t) = a.timeout {
        let _ = writeln!(out, "  timeout: {}ms", t.as_millis());
    }
    if a.pass_credentials {
        let _ = writeln!(out, "  pass_credentials: yes");
    }
    if a.priority != 0 {
        let _ = writeln!(out, "  priority: {}", a.priority);
    }
    let tier_name = req.tier.unwrap_or("default");
    let (rate, from) = match (a.rate_for(tier_name), tier.and_then(|t| t.limits.rate.as_ref())) {
        (Some(r), _) => (Some(r), "the rule"),
        (None, Some(r)) => (Some(r), "the tier"),
        (None, None) => (None, ""),
    };
    if let Some(r) = rate {
        let _ = writeln!(
            out,
            "  rate: {} per {}s, burst {}{} (from {from})",
            r.limit,
            r.period.as_secs(),
            r.burst,
            if r.global { ", global" } else { "" }
        );
    }
    if let Some(t) = tier {
        for (metric, q) in &t.limits.quotas {
            let _ = writeln!(
                out,
                "  quota {metric}: {} per {}{} (from tier `{}`)",
                q.limit,
                q.period.as_str(),
                if q.hard { "" } else { ", soft" },
                t.name
            );
        }
        if let Some(c) = &t.limits.concurrency {
            let _ = writeln!(out, "  concurrency: {}{}", c.limit, if c.queue.is_some() { " (queued)" } else { "" });
        }
    }
    for c in &a.charges {
        let cost = match &c.cost {
            CostSource::Constant(n) => format!("{n}"),
            CostSource::Header(h) => format!("from header `{h}`"),
            CostSource::Query(q) => format!("from query `{q}`"),
            CostSource::Body { paths, default, multiplier } => {
                let from = match paths.as_slice() {
                    [one] => format!("from body field `{one}` (default {default})"),
                    _ => format!("from the largest of body fields `{}` (default {default})", paths.join("`, `")),
                };
                match multiplier.as_slice() {
                    [] => from,
                    [one] => format!("{from} times body field `{one}`"),
                    _ => format!("{from} times the largest of body fields `{}`", multiplier.join("`, `")),
                }
            }
        };
        let _ = write!(out, "  charge: {} cost {cost}", c.metric);
        if let Some(m) = c.max_cost {
            let _ = write!(out, " (max {m})");
        }
        let mut settled: Vec<String> = Vec::new();
        if let Some(s) = &c.settle_from_header {
            settled.push(format!("header `{s}`"));
        }
        if let Some(p) = &c.settle_from_body {
            settled.push(format!("JSON body field `{p}`"));
        }
        if let Some(p) = &c.settle_from_sse {
            settled.push(format!("the last stream event carrying `{p}`"));
        }
        if settled.is_empty() {
            let _ = write!(out, ", not settled (the estimate is final)");
        } else {
            let _ = write!(out, ", settled from {}", settled.join(", else "));
        }
        let _ = writeln!(out);
    }
    if a.inject_stream_usage {
        let _ = writeln!(out, "  streamed requests: `stream_options.include_usage` added when missing, its usage event taken out of the client's stream");
    }
    if let Some(m) = &a.model_from_body {
        let _ = writeln!(out, "  model: from body field `{m}` (a report dimension)");
    }
    if a.error_format == Some(crate::rules::ErrorFormat::OpenAi) {
        let _ = writeln!(out, "  refusals: OpenAI error shape");
    }
    if a.openai_ratelimit_headers == Some(true) {
        let _ = writeln!(out, "  headers: x-ratelimit-*-requests and x-ratelimit-*-tokens");
    }
    for (tier, metrics) in &a.quota {
        for (metric, q) in metrics {
            let _ = writeln!(
                out,
                "  quota[{tier}].{metric}: {} per {:?}{}",
                q.limit,
                q.period,
                if q.hard { "" } else { " (soft)" }
            );
        }
    }
    for (k, v) in &a.set_request_headers {
        let _ = writeln!(out, "  set request header: {k}: {}", v.to_str().unwrap_or("?"));
    }
    for k in &a.remove_request_headers {
        let _ = writeln!(out, "  remove request header: {k}");
    }
    for (k, v) in &a.set_response_headers {
        let _ = writeln!(out, "  set response header: {k}: {}", v.to_str().unwrap_or("?"));
    }
    for k in &a.remove_response_headers {
        let _ = writeln!(out, "  remove response header: {k}");
    }
}

/// What `rules explain --jwt` learned from a token, for the rest of the explanation.
#[derive(Debug, Default)]
pub struct TokenFacts {
    /// The report: the checks, the claims used, the tenant and the scopes.
    pub text: String,
    /// Set when the token verified.
    pub tenant: Option<String>,
    pub tier: Option<String>,
    pub scopes: Option<Vec<String>>,
}

/// A claim's value as JSON, cut short for the screen.
fn shown(v: &serde_json::Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 120 {
        format!("{}…", s.chars().take(120).collect::<String>())
    } else {
        s
    }
}

/// A NumericDate claim with its time and how far it is from `now_ms`.
fn when(v: &serde_json::Value, now_ms: i64) -> String {
    let Some(secs) = v.as_f64() else { return shown(v) };
    let ms = (secs * 1000.0) as i64;
    let delta = (ms - now_ms) / 1000;
    let span = |s: i64| match s {
        s if s >= 86_400 => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
        s if s >= 3600 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m {}s", s / 60, s % 60),
        s => format!("{s}s"),
    };
    let rel = if delta >= 0 { format!("in {}", span(delta)) } else { format!("{} ago", span(-delta)) };
    format!("{} ({}, {rel})", shown(v), crate::limits::headers::rfc3339(ms))
}

/// Checks `token` as the gateway would at `now_ms`, with `keys` giving each issuer's key set
/// (`Err` with the reason when it could not be had), and reports what it proves.
pub fn token(
    config: &Config,
    token: &str,
    now_ms: i64,
    keys: &dyn Fn(usize) -> Result<std::sync::Arc<crate::jwks::KeySet>, String>,
) -> TokenFacts {
    use crate::jwt::token::{check_claims, issuer_of, parse, verify_signature, SigError};
    let mut f = TokenFacts::default();
    let out = &mut f.text;
    let refused = |out: &mut String, r: &crate::error::Reject| {
        let detail = match r {
            crate::error::Reject::InvalidToken { detail } => format!(": {detail}"),
            _ => String::new(),
        };
        let _ = writeln!(out, "token: refused: {} {}{detail}", r.status(), r.code());
    };
    if !config.tenancy.uses(crate::config::Source::Jwt) {
        let _ = writeln!(out, "note: `[tenancy] resolve` has no `jwt`: the gateway would not read this token");
    }
    let parsed = match parse(token.trim().as_bytes(), config.jwt.max_token_bytes) {
        Ok(p) => p,
        Err(r) => {
            refused(out, &r);
            return f;
        }
    };
    let index = match issuer_of(&config.jwt, &parsed) {
        Ok(i) => i,
        Err(r) => {
            if let Some(iss) = parsed.claims.get("iss") {
                let _ = writeln!(out, "token: iss = {} (not verified)", shown(iss));
            }
            refused(out, &r);
            return f;
        }
    };
    let issuer = &config.jwt.issuers[index];
    let kid = parsed.kid.as_deref().map(|k| format!(", key `{k}`")).unwrap_or_default();
    let verdict = match keys(index) {
        Err(e) => {
            let _ = writeln!(
                out,
                "token: cannot be checked: the keys of issuer `{}` are not available: {e}",
                issuer.issuer
            );
            let _ = writeln!(out, "  (the gateway answers 503 jwks_unavailable while that lasts)");
            return f;
        }
        Ok(set) => match verify_signature(issuer, &set, &parsed) {
            Ok(()) => check_claims(index, issuer, &parsed.claims, now_ms),
            Err(SigError::Refused(r)) => Err(r),
            Err(SigError::UnknownKid) => Err(crate::error::Reject::InvalidToken {
                detail: format!("its key (`kid`) is not one of its issuer's keys (it has: {})", set.kids().join(", ")),
            }),
        },
    };
    let verified = verdict.is_ok();
    match &verdict {
        Ok(_) => {
            let _ = writeln!(out, "token: verified (issuer `{}`, {:?}{kid})", issuer.issuer, parsed.alg);
        }
        Err(r) => refused(out, r),
    }
    let _ = writeln!(out, "  claims used{}:", if verified { "" } else { " (not trusted: the token is refused)" });
    let c = &parsed.claims;
    for name in ["iss", "aud"] {
        if let Some(v) = c.get(name) {
            let _ = writeln!(out, "    {name} = {}", shown(v));
        }
    }
    for name in ["exp", "nbf", "iat"] {
        if let Some(v) = c.get(name) {
            let _ = writeln!(out, "    {name} = {}", when(v, now_ms));
        }
    }
    let mut paths = vec![
        (&issuer.tenant_claim, "tenant_claim"),
        (&issuer.scopes_claim, "scopes_claim"),
        (&issuer.key_id_claim, "key_id_claim"),
    ];
    if let Some(t) = &issuer.tier_claim {
        paths.push((t, "tier_claim"));
    }
    for (path, key) in paths {
        let value = path.find(c).map(shown).unwrap_or_else(|| "(absent)".into());
        let _ = writeln!(out, "    {} = {value}   ({key})", path.text);
    }
    let _ = writeln!(out, "    leeway: {}s", issuer.leeway.as_secs());
    let Ok(identity) = verdict else { return f };
    let own = config.tenants.iter().find(|t| *t.id == *identity.tenant);
    let tier = identity.tier.as_ref().map(|t| t.name.to_string()).or_else(|| own.map(|t| t.tier.clone()));
    let from = match (&identity.tier, &issuer.tier_claim) {
        (Some(_), Some(p)) => format!(", from the token's `{}` claim", p.text),
        _ => String::new(),
    };
    match own {
        Some(t) => {
            let status = match t.status {
                crate::config::TenantStatus::Suspended => ", suspended: 403 tenant_suspended",
                crate::config::TenantStatus::Active => "",
            };
            let _ =
                writeln!(out, "  tenant: {} (tier {}{from}{status})", identity.tenant, tier.as_deref().unwrap_or("-"));
        }
        None => {
            let _ = writeln!(
                out,
                "  tenant: {} (not in this config file: 404 unknown_tenant, unless the store holds it)",
                identity.tenant
            );
        }
    }
    let scopes: Vec<String> = identity.scopes.iter().map(|s| s.to_string()).collect();
    let _ = writeln!(out, "  scopes: {}", if scopes.is_empty() { "(none)".to_string() } else { scopes.join(", ") });
    let _ = writeln!(out, "  key id: {}", identity.key_id.as_deref().unwrap_or("-"));
    f.tenant = Some(identity.tenant.to_string());
    f.tier = tier;
    f.scopes = Some(scopes);
    f
}

/// The verdict on a rule's `require_scopes` for a token's scopes.
pub fn scope_verdict(config: &Config, req: &RequestView<'_>, scopes: &[String]) -> Option<String> {
    let rule = config.rules.find(req)?;
    if rule.actions.require_scopes.is_empty() {
        return None;
    }
    let missing: Vec<&str> =
        rule.actions.require_scopes.iter().map(|s| &**s).filter(|s| !scopes.iter().any(|x| x == s)).collect();
    Some(if missing.is_empty() {
        "token scopes: the rule's require_scopes are all there".to_string()
    } else {
        format!("token scopes: missing {}: 403 insufficient_scope", missing.join(", "))
    })
}
