//! Stage 3, authorize: find the request's rule and apply its access actions.
//!
//! Takes the [`Principal`] from authentication and returns a [`Permit`], the only value the
//! later stages (limits, forwarding) accept. A permit proves that the rule was found, the
//! route's key and scope and feature requirements hold, and no `deny` or body limit refused
//! the request.

use super::authenticate::{check_tenant, Principal};
use super::resolve::Hints;
use crate::directory::{Key, Tenant};
use crate::error::Reject;
use crate::rules::matcher::RequestView;
use crate::rules::{Rule, RuleSet};
use http::Method;
use pingora::http::RequestHeader;
use std::sync::Arc;

/// Proof that a request may proceed, and what it may proceed with.
#[derive(Debug)]
pub struct Permit<'d> {
    pub rule: &'d Arc<Rule>,
    pub tenant: Option<&'d Arc<Tenant>>,
    pub key: Option<&'d Key>,
}

/// Runs the stage.
pub fn authorize<'d>(
    rules: &'d RuleSet,
    req: &RequestHeader,
    hints: &Hints<'_>,
    principal: Principal<'d>,
) -> Result<Permit<'d>, Reject> {
    authorize_rule(rules, req, hints, principal).map_err(|(reject, _)| reject)
}

/// [`authorize`], also returning on a refusal the rule that matched, if one did: a `deny`,
/// a missing scope or a body too large is logged and counted under the rule that refused it.
pub fn authorize_rule<'d>(
    rules: &'d RuleSet,
    req: &RequestHeader,
    hints: &Hints<'_>,
    principal: Principal<'d>,
) -> Result<Permit<'d>, (Reject, Option<&'d Arc<Rule>>)> {
    let tenant = principal.tenant();
    let view = RequestView {
        method: &req.method,
        host: hints.host,
        path: hints.path,
        query: hints.query,
        headers: &req.headers,
        tier: tenant.map(|t| &*t.tier.name),
        tenant: tenant.map(|t| &*t.id),
    };
    let rule = rules.find(&view).ok_or((Reject::NoRoute, None))?;
    check(rule, req, hints, principal, tenant).map_err(|reject| (reject, Some(rule)))
}

/// The matched rule's access actions.
fn check<'d>(
    rule: &'d Arc<Rule>,
    req: &RequestHeader,
    hints: &Hints<'_>,
    principal: Principal<'d>,
    tenant: Option<&'d Arc<Tenant>>,
) -> Result<Permit<'d>, Reject> {
    let a = &rule.actions;
    if let Some(d) = &a.deny {
        return Err(Reject::Denied {
            status: d.status,
            message: d.message.clone(),
            rule: rule.name.to_string(),
            allow: d.allow.as_deref().map(str::to_string),
        });
    }
    let mut token = None;
    let key = match principal {
        Principal::Keyed { key } => Some(key),
        Principal::Token { token: t } => {
            token = Some(&t.identity);
            None
        }
        Principal::Anonymous { tenant, unknown } => {
            if !a.public {
                return Err(Reject::MissingKey);
            }
            if let Some(t) = unknown {
                return Err(Reject::UnknownTenant { tenant: t });
            }
            if let Some(t) = tenant {
                check_tenant(t, hints)?;
            }
            None
        }
    };
    // A token's scopes count like a key's.
    let has = |s: &str| match (key, token) {
        (Some(k), _) => k.has_scope(s),
        (None, Some(t)) => t.has_scope(s),
        (None, None) => false,
    };
    if key.is_some() || token.is_some() {
        let missing: Vec<String> = a.require_scopes.iter().filter(|s| !has(s)).map(|s| s.to_string()).collect();
        if !missing.is_empty() {
            return Err(if key.is_some() {
                Reject::InsufficientScope { missing }
            } else {
                Reject::TokenInsufficientScope { missing }
            });
        }
    }
    if let Some(feature) = &a.require_feature {
        match tenant {
            Some(t) if t.tier.has_feature(feature) => {}
            Some(t) => {
                return Err(Reject::FeatureNotInTier { feature: feature.to_string(), tier: t.tier.name.to_string() })
            }
            // A public route without a tenant cannot have a tier feature.
            None => return Err(Reject::MissingKey),
        }
    }
    if let Some(limit) = a.max_body {
        if let Some(len) = content_length(req)? {
            if len > limit {
                return Err(Reject::BodyTooLarge { limit });
            }
        }
    }
    Ok(Permit { rule, tenant, key })
}

fn content_length(req: &RequestHeader) -> Result<Option<u64>, Reject> {
    if req.method == Method::GET && !req.headers.contains_key(http::header::CONTENT_LENGTH) {
        return Ok(None);
    }
    match req.headers.get(http::header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or(Reject::BadRequest { detail: "Content-Length is not a number.".into() }),
    }
}
