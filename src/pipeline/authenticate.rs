//! Stage 2, authenticate: turn the presented key or verified token and the tenant claims into
//! a [`Principal`].
//!
//! The key is hashed and looked up in the directory snapshot; no store is consulted. An API key
//! is authoritative: if a host, header or path names another tenant the answer is
//! `tenant_mismatch`. A verified token (see the token stage) is authoritative the same way, for
//! the tenant it names. Without either the principal is anonymous, and only a public rule will
//! accept it (see the authorize stage).

use super::resolve::{Claim, Hints};
use super::token::Verified;
use crate::directory::{Directory, Key, Tenant};
use crate::error::Reject;
use crate::keys::KeyHash;
use std::sync::Arc;

/// Who is calling, as far as the gateway can prove.
#[derive(Debug)]
pub enum Principal<'d> {
    /// A valid, unexpired, unrevoked key of an active tenant, from an allowed address.
    Keyed { key: &'d Key },
    /// A verified, unexpired token naming an active tenant, from an allowed address.
    Token { token: &'d Verified },
    /// No key. `tenant` is what a non-key source named, if it exists.
    Anonymous { tenant: Option<&'d Arc<Tenant>>, unknown: Option<String> },
}

impl<'d> Principal<'d> {
    pub fn tenant(&self) -> Option<&'d Arc<Tenant>> {
        match self {
            Principal::Keyed { key } => Some(&key.tenant),
            Principal::Token { token } => Some(&token.tenant),
            Principal::Anonymous { tenant, .. } => *tenant,
        }
    }
}

/// Runs the stage. `now_ms` comes from the injected clock.
pub fn authenticate<'d>(dir: &'d Directory, hints: &Hints<'_>, now_ms: i64) -> Result<Principal<'d>, Reject> {
    identify(dir, hints, now_ms).map_err(|(reject, _)| reject)
}

/// [`authenticate`], also returning on a refusal the key the secret matched, if it matched
/// one: the access log names the key and its tenant even when the key was then refused
/// (revoked, expired, another tenant's host, …). The key is not trusted for anything else.
pub fn identify<'d>(
    dir: &'d Directory,
    hints: &Hints<'_>,
    now_ms: i64,
) -> Result<Principal<'d>, (Reject, Option<&'d Key>)> {
    identify_with(dir, hints, None, now_ms)
}

/// [`identify`] for a request whose token the token stage verified (`token`).
pub fn identify_with<'d>(
    dir: &'d Directory,
    hints: &Hints<'_>,
    token: Option<&'d Verified>,
    now_ms: i64,
) -> Result<Principal<'d>, (Reject, Option<&'d Key>)> {
    if let Some(token) = token {
        let tenant = &token.tenant;
        if let Some(claim) = hints.claim.as_ref().filter(|c| !names(c, tenant)) {
            let reject =
                Reject::TokenTenantMismatch { token_tenant: tenant.id.to_string(), claimed: claim.tenant.to_string() };
            return Err((reject, None));
        }
        check_tenant(tenant, hints).map_err(|r| (r, None))?;
        return Ok(Principal::Token { token });
    }
    let Some(secret) = hints.credential else {
        let tenant = hints.claim.as_ref().and_then(|c| {
            dir.tenant(&c.tenant).or_else(|| {
                (c.source == crate::config::Source::Subdomain).then(|| dir.tenant_by_subdomain(&c.tenant)).flatten()
            })
        });
        let unknown = match (&hints.claim, tenant) {
            (Some(c), None) => Some(c.tenant.to_string()),
            _ => None,
        };
        return Ok(Principal::Anonymous { tenant, unknown });
    };
    let key = dir.key(&KeyHash::of(secret)).ok_or((Reject::InvalidKey, None))?;
    let refuse = |reject| Err((reject, Some(key)));
    if key.revoked_at().is_some_and(|t| t <= now_ms) {
        return refuse(Reject::KeyRevoked);
    }
    if key.expires().is_some_and(|e| e <= now_ms) {
        return refuse(Reject::KeyExpired);
    }
    let tenant = &key.tenant;
    if let Some(claim) = &hints.claim {
        if !names(claim, tenant) {
            return refuse(Reject::TenantMismatch {
                key_tenant: tenant.id.to_string(),
                claimed: claim.tenant.to_string(),
            });
        }
    }
    if let Err(reject) = check_tenant(tenant, hints) {
        return refuse(reject);
    }
    Ok(Principal::Keyed { key })
}

/// Whether a host, header or path claim names `tenant` (by id, or by one of its subdomains).
fn names(claim: &Claim<'_>, tenant: &Tenant) -> bool {
    *claim.tenant == *tenant.id
        || (claim.source == crate::config::Source::Subdomain && tenant.subdomains.iter().any(|s| *s == *claim.tenant))
}

/// Status and address checks that apply to a tenant however it was identified.
pub fn check_tenant(tenant: &Tenant, hints: &Hints<'_>) -> Result<(), Reject> {
    if tenant.status == crate::config::TenantStatus::Suspended {
        return Err(Reject::TenantSuspended { tenant: tenant.id.to_string() });
    }
    if !tenant.allows_ip(hints.client_ip) {
        return Err(Reject::IpNotAllowed { tenant: tenant.id.to_string() });
    }
    Ok(())
}
