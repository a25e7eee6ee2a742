//! Stage 1½, token: check the bearer token the resolve stage found, for `jwt` resolution.
//!
//! Takes the unverified token from [`Hints`](super::resolve::Hints) and returns a [`Verified`]:
//! the [`Identity`] the token proves (from the verifier's cache, or checked in full: shape,
//! issuer, algorithm, key, signature, `exp`, `nbf`, `iat`, `aud`, see [`crate::jwt::token`])
//! and the tenant it names, as the request's directory snapshot has it, so a suspension or a
//! deletion applies at once. The authenticate stage then treats the token like an API key:
//! another tenant named by the host, a header or the path is a `tenant_mismatch`, and the
//! tenant's status and `ip_allow` apply.
//!
//! Refusals: 401 `invalid_token` and `token_expired`, 404 `unknown_tenant`, 503
//! `jwks_unavailable` while the issuer's keys cannot be fetched.

use crate::directory::Tenant;
use crate::error::Reject;
use crate::jwt::{Identity, Jwt};
use crate::runtime::Runtime;
use std::sync::Arc;

/// A token that verified, and the tenant it acts as.
#[derive(Debug)]
pub struct Verified {
    pub identity: Arc<Identity>,
    /// The directory's tenant, or that tenant on the token's tier (`tier_claim`).
    pub tenant: Arc<Tenant>,
}

/// Runs the stage. On a refusal after the token verified, also returns what it proved, so the
/// access log can name its key id.
pub async fn verify(jwt: &Jwt, rt: &Arc<Runtime>, token: &[u8]) -> Result<Verified, (Reject, Option<Arc<Identity>>)> {
    let identity = jwt.verify(&rt.config.jwt, token).await.map_err(|r| (r, None))?;
    match identity.tenant_on(rt) {
        Ok(tenant) => Ok(Verified { identity, tenant }),
        Err(r) => Err((r, Some(identity))),
    }
}
