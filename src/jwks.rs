//! JSON Web Key Sets (RFC 7517): the keys an identity provider signs its tokens with.
//!
//! A [`KeySet`] is read from a JWKS document (a `jwks_file`, or the body fetched from a
//! `jwks_url`) or made from an HMAC secret (`hmac_secret_file`). Only keys that can verify a
//! signature are kept, each checked here so that nothing a key set holds can make verification
//! fail in a surprising way later:
//!
//! - RSA keys of 2048 to 4096 bits; P-256 and P-384 keys whose coordinates have their curve's
//!   size; Ed25519 keys of 32 bytes.
//! - A key marked for encryption (`use` other than `sig`, `key_ops` without `verify`, or an
//!   encryption `alg`) is skipped, and so is a symmetric (`oct`) key: a key set is public, so
//!   a shared secret in one would let anyone who reads it sign tokens. HMAC secrets come only
//!   from `hmac_secret_file`.
//! - What is skipped is named in [`KeySet::skipped`], so `tollgate check` and the fetch log
//!   can say why a key is not used.
//!
//! This module sits below `config` (which reads `jwks_file`) and `jwt` (which fetches
//! `jwks_url`), and depends on neither.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use serde_json::Value;
use std::fmt;
use std::str::FromStr;

/// The largest JWKS document read (a real one is a few KiB).
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Keys kept from one document at most; the rest are skipped.
const MAX_KEYS: usize = 64;

/// The curve of an elliptic-curve or Edwards key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Curve {
    P256,
    P384,
    Ed25519,
}

/// One key that can verify signatures.
pub struct VerifyKey {
    /// `kid`, when the document gives one.
    pub kid: Option<String>,
    pub family: AlgorithmFamily,
    /// For EC and OKP keys.
    pub curve: Option<Curve>,
    /// The key's own `alg`, when the document gives one: then only that algorithm may use it.
    pub alg: Option<Algorithm>,
    pub key: DecodingKey,
}

impl VerifyKey {
    /// Whether this key may check a signature made with `alg`.
    pub fn fits(&self, alg: Algorithm) -> bool {
        if self.alg.is_some_and(|a| a != alg) || alg.family() != self.family {
            return false;
        }
        match alg {
            Algorithm::ES256 => self.curve == Some(Curve::P256),
            Algorithm::ES384 => self.curve == Some(Curve::P384),
            Algorithm::EdDSA => self.curve == Some(Curve::Ed25519),
            _ => true,
        }
    }
}

impl fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key material: for an HMAC key it is the secret.
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("family", &self.family)
            .field("curve", &self.curve)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// The verifying keys of one issuer.
#[derive(Debug, Default)]
pub struct KeySet {
    keys: Vec<VerifyKey>,
    /// Why each key of the document that is not kept was left out.
    pub skipped: Vec<String>,
}

impl KeySet {
    /// Reads a JWKS document: `{"keys": [...]}`. Fails only when the document itself is not a
    /// key set; keys that cannot be used are skipped and named in [`KeySet::skipped`].
    pub fn parse(json: &[u8]) -> Result<KeySet, String> {
        if json.len() > MAX_JWKS_BYTES {
            return Err(format!("the key set is larger than {} KiB", MAX_JWKS_BYTES / 1024));
        }
        let doc: Value = serde_json::from_slice(json).map_err(|e| format!("not JSON ({e})"))?;
        let Some(list) = doc.get("keys").and_then(Value::as_array) else {
            return Err("not a JWKS: it has no `keys` array".into());
        };
        let mut set = KeySet::default();
        for (i, jwk) in list.iter().enumerate() {
            let name = match jwk.get("kid").and_then(Value::as_str) {
                Some(kid) => format!("key `{}`", shorten(kid)),
                None => format!("key #{}", i + 1),
            };
            if set.keys.len() >= MAX_KEYS {
                set.skipped.push(format!("{name}: more than {MAX_KEYS} keys in one set"));
                continue;
            }
            match read_key(jwk) {
                Ok(k) => set.keys.push(k),
                Err(why) => set.skipped.push(format!("{name}: {why}")),
            }
        }
        Ok(set)
    }

    /// A one-key set holding an HMAC secret.
    pub fn hmac(secret: &[u8]) -> KeySet {
        let key = VerifyKey {
            kid: None,
            family: AlgorithmFamily::Hmac,
            curve: None,
            alg: None,
            key: DecodingKey::from_secret(secret),
        };
        KeySet { keys: vec![key], skipped: Vec::new() }
    }

    /// The keys that may check a signature made with `alg`: the one named `kid` when the token
    /// names one, otherwise every key that fits.
    pub fn candidates<'a>(&'a self, kid: Option<&'a str>, alg: Algorithm) -> impl Iterator<Item = &'a VerifyKey> + 'a {
        self.keys.iter().filter(move |k| {
            k.fits(alg)
                && (kid.is_none() || k.kid.as_deref() == kid || k.kid.is_none() && k.family == AlgorithmFamily::Hmac)
        })
    }

    /// Whether some key fits one of `algs`.
    pub fn fits_any(&self, algs: &[Algorithm]) -> bool {
        self.keys.iter().any(|k| algs.iter().any(|a| k.fits(*a)))
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The `kid`s of the keys, for messages (`-` for a key without one).
    pub fn kids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.kid.as_deref().unwrap_or("-")).collect()
    }
}

/// At most 64 characters of a string taken from outside, for messages.
fn shorten(s: &str) -> String {
    let mut out: String = s.chars().take(64).filter(|c| !c.is_control()).collect();
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}

/// Base64url without padding, as JWK members are written (padding is tolerated).
pub fn b64url(s: &str) -> Result<Vec<u8>, String> {
    URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).map_err(|_| "is not base64url".to_string())
}

fn member<'v>(jwk: &'v Value, name: &str) -> Result<&'v str, String> {
    jwk.get(name).and_then(Value::as_str).ok_or_else(|| format!("has no `{name}`"))
}

fn bytes_of(jwk: &Value, name: &str) -> Result<Vec<u8>, String> {
    b64url(member(jwk, name)?).map_err(|e| format!("`{name}` {e}"))
}

/// Reads one JWK into a verifying key, or says why it cannot be one.
fn read_key(jwk: &Value) -> Result<VerifyKey, String> {
    if !jwk.is_object() {
        return Err("not a JSON object".into());
    }
    if let Some(u) = jwk.get("use") {
        if u.as_str() != Some("sig") {
            return Err(format!("`use` is {u}, not \"sig\""));
        }
    }
    if let Some(ops) = jwk.get("key_ops") {
        let verify = ops.as_array().is_some_and(|a| a.iter().any(|o| o.as_str() == Some("verify")));
        if !verify {
            return Err("`key_ops` does not include \"verify\"".into());
        }
    }
    let alg = match jwk.get("alg") {
        None => None,
        Some(a) => {
            let name = a.as_str().ok_or("`alg` is not a string")?;
            Some(
                Algorithm::from_str(name)
                    .map_err(|_| format!("`alg` {} is not a signature algorithm Tollgate checks", shorten(name)))?,
            )
        }
    };
    let kid = match jwk.get("kid") {
        None => None,
        Some(k) => Some(k.as_str().ok_or("`kid` is not a string")?.to_string()),
    };
    let kty = member(jwk, "kty")?;
    let (family, curve, key) = match kty {
        "RSA" => {
            let n = bytes_of(jwk, "n")?;
            let e = bytes_of(jwk, "e")?;
            let n_bits = bits(&n);
            if !(2048..=4096).contains(&n_bits) {
                return Err(format!("an RSA key of {n_bits} bits; 2048 to 4096 bits are accepted"));
            }
            let e_bits = bits(&e);
            if !(2..=64).contains(&e_bits) || e.last().is_none_or(|b| b % 2 == 0) {
                return Err("an RSA key with an unusable exponent".into());
            }
            (AlgorithmFamily::Rsa, None, DecodingKey::from_rsa_raw_components(&n, &e))
        }
        "EC" => {
            let (curve, size) = match member(jwk, "crv")? {
                "P-256" => (Curve::P256, 32),
                "P-384" => (Curve::P384, 48),
                other => return Err(format!("curve {} is not P-256 or P-384", shorten(other))),
            };
            let x = bytes_of(jwk, "x")?;
            let y = bytes_of(jwk, "y")?;
            if x.len() != size || y.len() != size {
                return Err(format!("coordinates that are not {size} bytes long"));
            }
            let key = DecodingKey::from_ec_components(member(jwk, "x")?, member(jwk, "y")?)
                .map_err(|_| "unreadable coordinates".to_string())?;
            (AlgorithmFamily::Ec, Some(curve), key)
        }
        "OKP" => {
            let crv = member(jwk, "crv")?;
            if crv != "Ed25519" {
                return Err(format!("curve {} is not Ed25519", shorten(crv)));
            }
            let x = bytes_of(jwk, "x")?;
            if x.len() != 32 {
                return Err("an Ed25519 key that is not 32 bytes long".into());
            }
            let key = DecodingKey::from_ed_components(member(jwk, "x")?).map_err(|_| "unreadable `x`".to_string())?;
            (AlgorithmFamily::Ed, Some(Curve::Ed25519), key)
        }
        "oct" => {
            return Err(
                "a symmetric (`oct`) key; a key set is public, so HMAC secrets come only from `hmac_secret_file`"
                    .into(),
            )
        }
        other => return Err(format!("key type {} is not RSA, EC or OKP", shorten(other))),
    };
    let key = VerifyKey { kid, family, curve, alg, key };
    if let Some(a) = alg {
        if !key.fits(a) {
            return Err(format!("`alg` {a:?} does not fit a {kty} key"));
        }
    }
    Ok(key)
}

/// Significant bits of a big-endian unsigned number.
fn bits(be: &[u8]) -> usize {
    match be.iter().position(|b| *b != 0) {
        None => 0,
        Some(i) => (be.len() - i - 1) * 8 + (8 - be[i].leading_zeros() as usize),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn b64(n: usize, fill: u8) -> String {
        URL_SAFE_NO_PAD.encode(vec![fill; n])
    }

    #[test]
    fn keeps_signing_keys_and_says_why_others_are_skipped() {
        let doc = json!({"keys": [
            {"kty": "RSA", "kid": "r1", "n": b64(256, 0xc1), "e": "AQAB", "alg": "RS256", "use": "sig"},
            {"kty": "RSA", "kid": "small", "n": b64(128, 0xc1), "e": "AQAB"},
            {"kty": "RSA", "kid": "enc", "n": b64(256, 0xc1), "e": "AQAB", "use": "enc"},
            {"kty": "RSA", "kid": "oaep", "n": b64(256, 0xc1), "e": "AQAB", "alg": "RSA-OAEP"},
            {"kty": "EC", "kid": "e1", "crv": "P-256", "x": b64(32, 1), "y": b64(32, 2)},
            {"kty": "EC", "kid": "short", "crv": "P-256", "x": b64(31, 1), "y": b64(32, 2)},
            {"kty": "EC", "kid": "k1", "crv": "secp256k1", "x": b64(32, 1), "y": b64(32, 2)},
            {"kty": "OKP", "kid": "d1", "crv": "Ed25519", "x": b64(32, 3)},
            {"kty": "OKP", "kid": "d-short", "crv": "Ed25519", "x": b64(16, 3)},
            {"kty": "oct", "kid": "s1", "k": b64(32, 4)},
            {"kty": "EC", "kid": "mismatch", "crv": "P-256", "x": b64(32, 1), "y": b64(32, 2), "alg": "ES384"},
        ]});
        let set = KeySet::parse(doc.to_string().as_bytes()).unwrap();
        assert_eq!(set.kids(), vec!["r1", "e1", "d1"]);
        assert_eq!(set.skipped.len(), 8, "{:?}", set.skipped);
        assert!(set.skipped.iter().any(|s| s.contains("`oct`")));
        assert!(set.skipped.iter().any(|s| s.starts_with("key `small`") && s.contains("1024 bits")));
        assert_eq!(set.candidates(Some("r1"), Algorithm::RS256).count(), 1);
        assert_eq!(set.candidates(Some("r1"), Algorithm::PS256).count(), 0, "the key's own alg binds it");
        assert_eq!(set.candidates(Some("e1"), Algorithm::ES384).count(), 0, "a P-256 key never checks ES384");
        assert_eq!(set.candidates(None, Algorithm::EdDSA).count(), 1);
        assert_eq!(set.candidates(Some("nope"), Algorithm::RS256).count(), 0);
        assert!(set.fits_any(&[Algorithm::ES256]));
        assert!(!set.fits_any(&[Algorithm::HS256]), "no HMAC key ever comes from a key set");
    }

    #[test]
    fn a_document_that_is_not_a_key_set_is_refused() {
        assert!(KeySet::parse(b"not json").is_err());
        assert!(KeySet::parse(b"{\"keys\": 3}").is_err());
        assert!(KeySet::parse(&vec![b' '; MAX_JWKS_BYTES + 1]).is_err());
        assert!(KeySet::parse(b"{\"keys\": []}").is_ok_and(|s| s.is_empty()));
    }

    #[test]
    fn hmac_sets_fit_hmac_algorithms_only() {
        let set = KeySet::hmac(&[7u8; 32]);
        assert_eq!(set.candidates(Some("any-kid"), Algorithm::HS256).count(), 1);
        assert_eq!(set.candidates(None, Algorithm::RS256).count(), 0);
        assert!(!format!("{set:?}").contains("7, 7"), "the secret is never in debug output");
    }

    #[test]
    fn counts_bits() {
        assert_eq!(bits(&[0, 0, 1]), 1);
        assert_eq!(bits(&[0x80, 0]), 16);
        assert_eq!(bits(&[]), 0);
    }
}
