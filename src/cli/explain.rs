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
    if let Some((status, msg)) = &a.deny {
        let _ = writeln!(out, "  deny: {status} \"{msg}\"");
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
    if let Some(c) = &a.charge {
        let cost = match &c.cost {
            CostSource::Constant(n) => format!("{n}"),
            CostSource::Header(h) => format!("from header `{h}`"),
            CostSource::Query(q) => format!("from query `{q}`"),
        };
        let _ = write!(out, "  charge: {} cost {cost}", c.metric);
        if let Some(m) = c.max_cost {
            let _ = write!(out, " (max {m})");
        }
        if let Some(s) = &c.settle_from_header {
            let _ = write!(out, ", settled from `{s}`");
        }
        let _ = writeln!(out);
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
