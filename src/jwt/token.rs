//! One token, taken apart and checked: its shape, its header, its signature, its claims.
//!
//! Everything here is a pure function of the token, the issuer's settings, its keys and the
//! time it is given, so the checks are tested with a fixed clock, and `rules explain --jwt`
//! runs exactly what the gateway runs.
//!
//! Order: shape and header (cheap, before any key is touched), the issuer named by `iss`
//! (read before the signature only to pick the issuer whose keys must then verify it), the
//! algorithm against that issuer's allowlist, the key by `kid`, the signature, and only then
//! the claims: `exp` (401 `token_expired`), `nbf`, `iat`, `aud`, and the claims that name the
//! tenant, its scopes, the key id and the tier.

use super::Identity;
use crate::config::{JwtConfig, JwtIssuer};
use crate::directory::KeyId;
use crate::error::Reject;
use crate::jwks::{b64url, KeySet};
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};
use std::str::FromStr;
use std::sync::Arc;

/// Scopes kept from one token, at most; each at most [`MAX_SCOPE_LEN`] bytes.
const MAX_SCOPES: usize = 256;
const MAX_SCOPE_LEN: usize = 256;
/// A `kid` longer than this names no key anyone publishes.
const MAX_KID_LEN: usize = 256;

fn invalid(detail: impl Into<String>) -> Reject {
    Reject::InvalidToken { detail: detail.into() }
}

/// A token taken apart, its signature not yet checked.
#[derive(Debug)]
pub struct Parsed<'t> {
    pub alg: Algorithm,
    pub kid: Option<String>,
    pub claims: Map<String, Value>,
    /// `header.payload`, what the signature covers.
    pub signing_input: &'t [u8],
    pub signature: &'t str,
}

/// The base64url alphabet and the dot, as a table: one look-up per byte.
const fn token_bytes() -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            1
        } else if b == b'.' {
            2
        } else {
            0
        };
        c += 1;
    }
    t
}
const TOKEN_BYTES: [u8; 256] = token_bytes();

/// Whether `value` looks like a JWT at all: three non-empty base64url parts.
pub fn is_jwt_shaped(value: &[u8]) -> bool {
    let (mut dots, mut prev_dot) = (0, true);
    for b in value {
        match TOKEN_BYTES[usize::from(*b)] {
            1 => prev_dot = false,
            2 if !prev_dot => {
                dots += 1;
                prev_dot = true;
            }
            _ => return false,
        }
    }
    dots == 2 && !prev_dot
}

fn json_object(part: &str, what: &str) -> Result<Map<String, Value>, Reject> {
    let bytes = b64url(part).map_err(|_| invalid(format!("its {what} is not base64url")))?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(invalid(format!("its {what} is not a JSON object"))),
    }
}

/// Takes a token apart: `header.payload.signature`, at most `max_bytes` long.
pub fn parse(token: &[u8], max_bytes: usize) -> Result<Parsed<'_>, Reject> {
    if token.len() > max_bytes {
        return Err(invalid(format!("it is longer than {max_bytes} bytes")));
    }
    if !is_jwt_shaped(token) {
        return Err(invalid("it is not a JWT (three base64url parts separated by dots)"));
    }
    // Shaped: ASCII, exactly two dots.
    let text = std::str::from_utf8(token).map_err(|_| invalid("it is not a JWT"))?;
    let mut it = text.splitn(3, '.');
    let (Some(h), Some(p), Some(signature)) = (it.next(), it.next(), it.next()) else {
        return Err(invalid("it is not a JWT"));
    };
    let header = json_object(h, "header")?;
    let alg = match header.get("alg") {
        Some(Value::String(a)) if a.eq_ignore_ascii_case("none") => {
            return Err(invalid("it is unsigned (`alg: none`), which is never accepted"))
        }
        Some(Value::String(a)) => {
            Algorithm::from_str(a).map_err(|_| invalid("its algorithm (`alg`) is not one Tollgate checks"))?
        }
        _ => return Err(invalid("its header has no `alg`")),
    };
    if header.contains_key("crit") {
        return Err(invalid("its header has critical extensions (`crit`), which Tollgate does not implement"));
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) if k.len() <= MAX_KID_LEN => Some(k.clone()),
        Some(_) => return Err(invalid("its `kid` is not a key id")),
    };
    let claims = json_object(p, "payload")?;
    Ok(Parsed { alg, kid, claims, signing_input: &token[..h.len() + 1 + p.len()], signature })
}

/// The issuer a token names in `iss`, among the configured ones.
pub fn issuer_of(cfg: &JwtConfig, parsed: &Parsed<'_>) -> Result<usize, Reject> {
    match parsed.claims.get("iss") {
        Some(Value::String(iss)) => {
            cfg.issuer(iss).ok_or_else(|| invalid("its issuer (`iss`) is not one this gateway trusts"))
        }
        _ => Err(invalid("it names no issuer (`iss`)")),
    }
}

/// Why a signature did not verify.
#[derive(Debug, PartialEq, Eq)]
pub enum SigError {
    /// The token names a `kid` the key set does not have: the keys may need fetching again.
    UnknownKid,
    /// Refused for good.
    Refused(Reject),
}

/// Checks the algorithm against the issuer's allowlist and the signature against its keys.
pub fn verify_signature(issuer: &JwtIssuer, keys: &KeySet, parsed: &Parsed<'_>) -> Result<(), SigError> {
    if !issuer.algorithms.contains(&parsed.alg) {
        return Err(SigError::Refused(invalid(format!(
            "it is signed with {:?}, which its issuer's `algorithms` do not allow",
            parsed.alg
        ))));
    }
    let mut tried = false;
    for key in keys.candidates(parsed.kid.as_deref(), parsed.alg) {
        tried = true;
        if let Ok(true) = jsonwebtoken::crypto::verify(parsed.signature, parsed.signing_input, &key.key, parsed.alg) {
            return Ok(());
        }
    }
    match (&parsed.kid, tried) {
        (Some(_), false) => Err(SigError::UnknownKid),
        (None, false) => Err(SigError::Refused(invalid("its issuer has no key for its algorithm"))),
        _ => Err(SigError::Refused(invalid("its signature does not verify"))),
    }
}

/// A NumericDate claim in seconds: absent, or a JSON number (anything else is refused, so a
/// string `exp` can never pass for an absent one).
fn numeric(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, Reject> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            n.as_f64().filter(|v| v.is_finite()).map(Some).ok_or_else(|| invalid(format!("its `{name}` is not a time")))
        }
        Some(_) => Err(invalid(format!("its `{name}` is not a number of seconds"))),
    }
}

/// A claim that must be a string (or a list holding exactly one string, as Keycloak writes
/// single-valued attributes).
fn one_string(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        Value::Array(a) if a.len() == 1 => a[0].as_str(),
        _ => None,
    }
}

/// The access log's key id from a claim: visible ASCII of at most 128 bytes is kept as it is;
/// anything else (spaces, Unicode, control characters, a huge value) is replaced by a digest of
/// it, so the log and the `X-Key-ID` header always get a clean value.
fn key_id(v: &Value) -> Option<KeyId> {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    if !text.is_empty() && text.len() <= 128 && text.bytes().all(|b| b.is_ascii_graphic()) {
        return Some(KeyId::from(text));
    }
    let d = super::cache::Digest::of(text.as_bytes());
    Some(KeyId::from(format!("sha256:{}", hex::encode(&d.0[..12]))))
}

/// Checks the claims of a token whose signature verified, at `now_ms`, and returns what the
/// token proves.
pub fn check_claims(
    index: usize,
    issuer: &JwtIssuer,
    claims: &Map<String, Value>,
    now_ms: i64,
) -> Result<Identity, Reject> {
    let now = now_ms as f64 / 1000.0;
    let leeway = issuer.leeway.as_secs_f64();
    let exp = numeric(claims, "exp")?.ok_or_else(|| invalid("it has no expiry (`exp`)"))?;
    if now >= exp + leeway {
        return Err(Reject::TokenExpired);
    }
    if let Some(nbf) = numeric(claims, "nbf")? {
        if now + leeway < nbf {
            return Err(invalid("it is not valid yet (`nbf`)"));
        }
    }
    if let Some(iat) = numeric(claims, "iat")? {
        if iat > now + leeway {
            return Err(invalid("it was issued in the future (`iat`)"));
        }
    }
    let aud_ok = match claims.get("aud") {
        Some(Value::String(a)) => issuer.audiences.iter().any(|x| x == a),
        Some(Value::Array(list)) => {
            list.iter().filter_map(Value::as_str).any(|a| issuer.audiences.iter().any(|x| x == a))
        }
        None => return Err(invalid("it names no audience (`aud`)")),
        Some(_) => false,
    };
    if !aud_ok {
        return Err(invalid("its audience (`aud`) is not one this gateway accepts"));
    }

    let claim = &issuer.tenant_claim.text;
    let tenant =
        issuer.tenant_claim.find(claims).ok_or_else(|| invalid(format!("it names no tenant (claim `{claim}`)")))?;
    let tenant = one_string(tenant)
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| crate::config::valid_slug(t))
        .ok_or_else(|| invalid(format!("its `{claim}` claim is not a tenant id")))?;

    let mut scopes: Vec<Arc<str>> = Vec::new();
    let mut push = |s: &str| {
        if !s.is_empty() && s.len() <= MAX_SCOPE_LEN && scopes.len() < MAX_SCOPES && !scopes.iter().any(|x| &**x == s) {
            scopes.push(s.into());
        }
    };
    match issuer.scopes_claim.find(claims) {
        Some(Value::String(s)) => s.split_whitespace().for_each(&mut push),
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).for_each(&mut push),
        _ => {}
    }

    let key_id = issuer.key_id_claim.find(claims).and_then(key_id);

    let tier = match &issuer.tier_claim {
        None => None,
        Some(path) => match path.find(claims) {
            None => None,
            Some(v) => {
                let name = one_string(v).ok_or_else(|| invalid(format!("its `{}` claim is not a tier", path.text)))?;
                let tier = issuer.tiers.iter().find(|t| &*t.name == name).ok_or_else(|| {
                    invalid(format!("its tier (claim `{}`) is not one its issuer may grant", path.text))
                })?;
                Some(tier.clone())
            }
        },
    };

    // Accepted until `exp` plus the leeway, in whole milliseconds.
    let until_ms = ((exp + leeway) * 1000.0).clamp(i64::MIN as f64, i64::MAX as f64) as i64;
    Ok(Identity::new(index, tenant.into(), scopes, key_id, tier, until_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClaimPath, JwtKeys};
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use serde_json::json;
    use std::time::Duration;

    const NOW_MS: i64 = 1_750_000_000_000;
    const NOW: i64 = NOW_MS / 1000;
    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn issuer() -> JwtIssuer {
        JwtIssuer {
            issuer: "https://idp.test/".into(),
            audiences: vec!["api".into()],
            algorithms: vec![Algorithm::HS256],
            keys: JwtKeys::Hmac { path: "s".into(), keys: Arc::new(KeySet::hmac(SECRET)) },
            tenant_claim: ClaimPath::parse("org.id").unwrap(),
            scopes_claim: ClaimPath::parse("scope").unwrap(),
            key_id_claim: ClaimPath::parse("sub").unwrap(),
            tier_claim: None,
            tiers: vec![],
            leeway: Duration::from_secs(30),
            jwks_refresh: Duration::from_secs(600),
            jwks_refresh_floor: Duration::from_secs(5),
            jwks_timeout: Duration::from_secs(5),
        }
    }

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    fn sign(header: Value, claims: Value) -> String {
        let input = format!("{}.{}", b64(&header), b64(&claims));
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET);
        let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &key, Algorithm::HS256).unwrap();
        format!("{input}.{sig}")
    }

    fn claims(extra: Value) -> Value {
        let mut c = json!({"iss": "https://idp.test/", "aud": "api", "exp": NOW + 300, "org": {"id": "Acme"}, "sub": "user-1", "scope": "read write read"});
        if let (Some(c), Value::Object(e)) = (c.as_object_mut(), extra) {
            for (k, v) in e {
                if v.is_null() {
                    c.remove(&k);
                } else {
                    c.insert(k, v);
                }
            }
        }
        c
    }

    /// Runs every check on a token at `now_ms`.
    fn run(token: &str, now_ms: i64) -> Result<Identity, Reject> {
        let iss = issuer();
        let p = parse(token.as_bytes(), 8192)?;
        match verify_signature(&iss, &KeySet::hmac(SECRET), &p) {
            Ok(()) => {}
            Err(SigError::Refused(r)) => return Err(r),
            Err(SigError::UnknownKid) => return Err(invalid("unknown kid")),
        }
        check_claims(0, &iss, &p.claims, now_ms)
    }

    fn code(r: Result<Identity, Reject>) -> String {
        match r {
            Ok(_) => "ok".into(),
            Err(e) => format!("{}: {}", e.code(), e.problem("").body.len()),
        }
        .split(':')
        .next()
        .unwrap_or_default()
        .to_string()
    }

    #[test]
    fn a_good_token_proves_its_tenant_scopes_and_key_id() {
        let t = sign(json!({"alg": "HS256", "typ": "JWT"}), claims(json!({})));
        let id = run(&t, NOW_MS).unwrap();
        assert_eq!(&*id.tenant, "acme", "tenant ids are lower case");
        assert_eq!(id.scopes.iter().map(|s| &**s).collect::<Vec<_>>(), vec!["read", "write"]);
        assert_eq!(id.key_id.as_deref(), Some("user-1"));
        assert_eq!(id.until_ms, (NOW + 300 + 30) * 1000);
    }

    #[test]
    fn exp_nbf_and_iat_honour_the_leeway_on_an_injected_clock() {
        let t = sign(json!({"alg": "HS256"}), claims(json!({"exp": NOW})));
        assert_eq!(code(run(&t, NOW_MS + 29_999)), "ok", "inside the 30 s leeway");
        assert_eq!(code(run(&t, NOW_MS + 30_000)), "token_expired", "at exp + leeway");
        let t = sign(json!({"alg": "HS256"}), claims(json!({"nbf": NOW + 60})));
        assert_eq!(code(run(&t, NOW_MS)), "invalid_token", "not yet valid");
        assert_eq!(code(run(&t, NOW_MS + 30_000)), "ok", "valid from nbf - leeway");
        let t = sign(json!({"alg": "HS256"}), claims(json!({"iat": NOW + 31})));
        assert_eq!(code(run(&t, NOW_MS)), "invalid_token", "issued in the future");
        let t = sign(json!({"alg": "HS256"}), claims(json!({"iat": NOW + 29})));
        assert_eq!(code(run(&t, NOW_MS)), "ok");
    }

    #[test]
    fn claims_of_the_wrong_type_are_refused_not_ignored() {
        for bad in
            [json!({"exp": "99999999999"}), json!({"exp": null}), json!({"nbf": "99999999999"}), json!({"iat": [1]})]
        {
            let t = sign(json!({"alg": "HS256"}), claims(bad.clone()));
            assert_eq!(code(run(&t, NOW_MS)), "invalid_token", "{bad}");
        }
    }

    #[test]
    fn issuer_audience_and_tenant_must_be_right() {
        for (extra, want) in [
            (json!({"aud": ["other", "api"]}), "ok"),
            (json!({"aud": "other"}), "invalid_token"),
            (json!({"aud": null}), "invalid_token"),
            (json!({"aud": 7}), "invalid_token"),
            (json!({"org": null}), "invalid_token"),
            (json!({"org": {"id": "not a slug"}}), "invalid_token"),
            (json!({"org": {"id": ["globex"]}}), "ok"),
            (json!({"org.id": "initech"}), "ok"),
        ] {
            let t = sign(json!({"alg": "HS256"}), claims(extra.clone()));
            assert_eq!(code(run(&t, NOW_MS)), want, "{extra}");
        }
        // The issuer is picked by `iss`; an unknown one is refused before any key is used.
        let cfg = JwtConfig { issuers: vec![issuer()], ..JwtConfig::default() };
        let t = sign(json!({"alg": "HS256"}), claims(json!({"iss": "https://evil.test/"})));
        let p = parse(t.as_bytes(), 8192).unwrap();
        assert!(issuer_of(&cfg, &p).is_err());
    }

    #[test]
    fn malformed_unsigned_and_tampered_tokens_are_invalid() {
        let good = sign(json!({"alg": "HS256"}), claims(json!({})));
        let mut parts: Vec<&str> = good.split('.').collect();
        let forged = b64(&claims(json!({"org": {"id": "globex"}})));
        parts[1] = &forged;
        let tampered = parts.join(".");
        let unsigned = format!("{}.{}.", b64(&json!({"alg": "none"})), b64(&claims(json!({}))));
        let none_signed = format!("{}.{}.c2ln", b64(&json!({"alg": "none"})), b64(&claims(json!({}))));
        let crit = sign(json!({"alg": "HS256", "crit": ["exp"]}), claims(json!({})));
        for t in [
            tampered.as_str(),
            unsigned.as_str(),
            none_signed.as_str(),
            crit.as_str(),
            "a.b",
            "a.b.c.d",
            "..",
            "e30.e30.e30",
            "e30=.e30.sig",
            "eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24.c2ln",
        ] {
            assert_eq!(code(run(t, NOW_MS)), "invalid_token", "{t}");
        }
        let huge = format!("{}.{}.{}", "a".repeat(9000), "b", "c");
        assert_eq!(code(run(&huge, NOW_MS)), "invalid_token");
    }

    #[test]
    fn an_algorithm_outside_the_allowlist_is_refused() {
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET);
        let input = format!("{}.{}", b64(&json!({"alg": "HS384"})), b64(&claims(json!({}))));
        let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &key, Algorithm::HS384).unwrap();
        assert_eq!(code(run(&format!("{input}.{sig}"), NOW_MS)), "invalid_token");
    }

    #[test]
    fn odd_key_ids_are_replaced_by_a_digest() {
        assert_eq!(key_id(&json!("auth0|abc")).as_deref(), Some("auth0|abc"));
        assert_eq!(key_id(&json!(42)).as_deref(), Some("42"));
        let odd = key_id(&json!("user name\n")).unwrap();
        assert!(odd.starts_with("sha256:") && odd.len() == 31, "{odd:?}");
        assert!(key_id(&json!("x".repeat(200))).unwrap().starts_with("sha256:"));
        assert!(key_id(&json!({"a": 1})).is_none());
    }

    #[test]
    fn a_tier_claim_may_name_only_an_allowed_tier() {
        use crate::config::policy::TierLimits;
        use crate::config::Tier;
        let tier = |n: &str| {
            Arc::new(Tier { name: n.into(), upstream: "u".into(), features: vec![], limits: TierLimits::default() })
        };
        let mut iss = issuer();
        iss.tier_claim = ClaimPath::parse("plan");
        iss.tiers = vec![tier("free"), tier("pro")];
        let check = |plan: Value| {
            let c = claims(json!({ "plan": plan }));
            check_claims(0, &iss, c.as_object().unwrap(), NOW_MS).map(|i| i.tier.map(|t| t.name.to_string()))
        };
        assert_eq!(check(json!("pro")), Ok(Some("pro".into())));
        assert!(matches!(check(json!("enterprise")), Err(Reject::InvalidToken { .. })));
        assert!(matches!(check(json!(3)), Err(Reject::InvalidToken { .. })));
        let c = claims(json!({}));
        assert_eq!(check_claims(0, &iss, c.as_object().unwrap(), NOW_MS).map(|i| i.tier.is_none()), Ok(true));
    }
}
