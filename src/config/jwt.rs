//! `[jwt]` and `[[jwt.issuers]]`: from the file's tables to [`JwtConfig`], every problem
//! reported with its file and line, all of them in one pass.
//!
//! What is refused, and why:
//!
//! - `none` in `algorithms`: an unsigned token proves nothing.
//! - HMAC and public-key algorithms for one issuer: a token verifier that holds both kinds of
//!   key for one issuer is what algorithm confusion attacks (an HS256 token "signed" with the
//!   issuer's public RSA key as the secret) rely on.
//! - An HMAC secret shorter than its hash (RFC 7518, 3.2), or a key source that does not fit
//!   the algorithms.
//! - A `tier_claim` without `tiers`: the tiers an issuer may grant are the operator's choice,
//!   never the token's alone.
//!
//! `jwks_file` and `hmac_secret_file` are read here, so `tollgate check` sees a missing or
//! broken key file, and a reload reads the files again.

use super::diag::{Diagnostics, SourceFile};
use super::file::{JwtFile, SStr};
use super::model::{ClaimPath, JwtConfig, JwtIssuer, JwtKeys, Tier, DEFAULT_JWT_CACHE_SIZE, DEFAULT_MAX_TOKEN_BYTES};
use crate::jwks::KeySet;
use jsonwebtoken::{Algorithm, AlgorithmFamily};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// The algorithm names `algorithms` takes.
const ALGORITHMS: &str = "RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA, HS256, HS384, HS512";

/// What the `[jwt]` table gives the rest of the config.
pub struct Validated {
    pub jwt: JwtConfig,
    pub header: Option<http::HeaderName>,
    pub cookie: Option<String>,
}

fn duration(
    v: &Option<SStr>,
    key: &str,
    default: Duration,
    range: (Duration, Duration),
    src: &SourceFile,
    diags: &mut Diagnostics,
) -> Duration {
    let Some(s) = v else { return default };
    match super::units::parse_duration(s.get_ref()) {
        Ok(d) if d >= range.0 && d <= range.1 => d,
        Ok(_) => {
            diags.error_at(src, s.span(), format!("`{key}` must be from {} to {}", show(range.0), show(range.1)));
            default
        }
        Err(e) => {
            diags.error_at(src, s.span(), e);
            default
        }
    }
}

fn show(d: Duration) -> String {
    match d.as_millis() {
        0 => "0s".into(),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    }
}

fn claim(v: &Option<SStr>, key: &str, default: &str, src: &SourceFile, diags: &mut Diagnostics) -> ClaimPath {
    let fallback = || ClaimPath::parse(default).unwrap_or(ClaimPath { text: default.into(), segments: vec![] });
    let Some(s) = v else { return fallback() };
    match ClaimPath::parse(s.get_ref()) {
        Some(p) => p,
        None => {
            diags.error_at(
                src,
                s.span(),
                format!("`{key}` is a claim name or a dotted path like `realm_access.roles`, without empty parts"),
            );
            fallback()
        }
    }
}

/// The bytes of a key file, or an error at its line.
fn read_file(
    s: &SStr,
    what: &str,
    base: &Path,
    src: &SourceFile,
    diags: &mut Diagnostics,
) -> Option<(PathBuf, Vec<u8>)> {
    use std::io::Read;
    let p = Path::new(s.get_ref());
    let path = if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
    let max = crate::jwks::MAX_JWKS_BYTES as u64;
    // A regular file, read at most to the limit: a device or a pipe named by mistake must not
    // make loading the config hang or fill memory.
    let read = std::fs::metadata(&path).and_then(|m| {
        if !m.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        let mut bytes = Vec::new();
        std::fs::File::open(&path)?.take(max + 1).read_to_end(&mut bytes)?;
        Ok(bytes)
    });
    match read {
        Ok(b) if b.len() as u64 > max => {
            diags.error_at(src, s.span(), format!("{what} {} is larger than 1 MiB", path.display()));
            None
        }
        Ok(b) => Some((path, b)),
        Err(e) => {
            diags.error_at(src, s.span(), format!("cannot read the {what} {}: {e}", path.display()));
            None
        }
    }
}

/// The least secret length for an HMAC algorithm: its hash's size (RFC 7518, 3.2).
fn hmac_min(alg: Algorithm) -> usize {
    match alg {
        Algorithm::HS384 => 48,
        Algorithm::HS512 => 64,
        _ => 32,
    }
}

/// Validates `[jwt]`. `resolve_jwt` is the `"jwt"` entry of `[tenancy] resolve`, if there is
/// one; `tenancy_headers` are the header names the tenancy already uses for something else.
#[allow(clippy::too_many_arguments)]
pub fn validate(
    src: &SourceFile,
    base: &Path,
    f: &JwtFile,
    tiers: &BTreeMap<String, Arc<Tier>>,
    resolve_jwt: Option<&SStr>,
    tenancy_headers: &[&http::HeaderName],
    diags: &mut Diagnostics,
) -> Validated {
    let header = f.header.as_ref().and_then(|h| {
        let name = http::HeaderName::from_bytes(h.get_ref().to_ascii_lowercase().as_bytes()).ok();
        match name {
            None => {
                diags.error_at(src, h.span(), format!("`{}` is not a valid header name", h.get_ref()));
                None
            }
            Some(n) if n == http::header::AUTHORIZATION => {
                diags.error_at(
                    src,
                    h.span(),
                    "`Authorization: Bearer` is always read when `jwt` is a source; `header` names another header",
                );
                None
            }
            Some(n) if tenancy_headers.contains(&&n) || n == http::header::COOKIE || n == http::header::HOST => {
                diags.error_at(
                    src,
                    h.span(),
                    format!("`{n}` already has another use; a token header must be a header of its own"),
                );
                None
            }
            Some(n) => Some(n),
        }
    });
    let cookie = f.cookie.as_ref().and_then(|c| {
        let name = c.get_ref();
        let token =
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
        if token {
            Some(name.clone())
        } else {
            diags.error_at(src, c.span(), format!("`{name}` is not a valid cookie name"));
            None
        }
    });
    let cache_size = match &f.cache_size {
        None => DEFAULT_JWT_CACHE_SIZE,
        Some(n) if (1..=10_000_000).contains(n.get_ref()) => *n.get_ref() as usize,
        Some(n) => {
            diags.error_at(src, n.span(), "`cache_size` must be a whole number from 1 to 10000000");
            DEFAULT_JWT_CACHE_SIZE
        }
    };
    let max_token_bytes = match &f.max_token_bytes {
        None => DEFAULT_MAX_TOKEN_BYTES,
        Some(v) => match super::size_value(v, src, diags) {
            Some(n) if (256..=65_536).contains(&n) => n as usize,
            Some(_) => {
                diags.error_at(src, v.span(), "`max_token_bytes` must be from 256 bytes to 64KiB");
                DEFAULT_MAX_TOKEN_BYTES
            }
            None => DEFAULT_MAX_TOKEN_BYTES,
        },
    };

    let mut issuers: Vec<JwtIssuer> = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for ispan in &f.issuers {
        let i = ispan.get_ref();
        let table = ispan.span();
        let (name, who) = match &i.issuer {
            Some(s) if s.get_ref().is_empty() => {
                diags.error_at(src, s.span(), "`issuer` is empty; write the `iss` the tokens carry");
                (String::new(), "this issuer".to_string())
            }
            Some(s) => {
                if seen.contains(&s.get_ref().as_str()) {
                    diags.error_at(src, s.span(), format!("issuer `{}` is listed twice", s.get_ref()));
                }
                seen.push(s.get_ref());
                (s.get_ref().clone(), format!("issuer `{}`", s.get_ref()))
            }
            None => {
                diags.missing_at(
                    src,
                    table.clone(),
                    "issuer",
                    table.clone(),
                    "a `[[jwt.issuers]]` needs `issuer`, the `iss` its tokens carry, like \"https://acme.eu.auth0.com/\"",
                );
                (String::new(), "this issuer".to_string())
            }
        };
        let audiences: Vec<String> = i.audiences.iter().flatten().map(|a| a.get_ref().clone()).collect();
        if audiences.is_empty() || audiences.iter().any(String::is_empty) {
            diags.missing_at(
                src,
                table.clone(),
                "audiences",
                table.clone(),
                format!("{who} needs `audiences`: at least one `aud` a token must carry, like [\"https://api.example.com\"]"),
            );
        }

        // The allowlist.
        let mut algorithms: Vec<Algorithm> = Vec::new();
        let mut families: Vec<(AlgorithmFamily, &SStr)> = Vec::new();
        for a in i.algorithms.iter().flatten() {
            let text = a.get_ref();
            if text.eq_ignore_ascii_case("none") {
                diags.error_at(src, a.span(), "`none` is never accepted: an unsigned token proves nothing");
                continue;
            }
            let Ok(alg) = Algorithm::from_str(text) else {
                diags.error_at(src, a.span(), format!("`{text}` is not an algorithm; use {ALGORITHMS}"));
                continue;
            };
            let hmac = alg.family() == AlgorithmFamily::Hmac;
            if let Some((_, first)) = families.iter().find(|(fam, _)| (*fam == AlgorithmFamily::Hmac) != hmac) {
                diags.error_at(
                    src,
                    a.span(),
                    format!(
                        "{who} lists `{text}` with `{}`: HMAC and public-key algorithms are never allowed for one issuer (a token could use the public key as an HMAC secret); use two issuers",
                        first.get_ref()
                    ),
                );
                continue;
            }
            families.push((alg.family(), a));
            if !algorithms.contains(&alg) {
                algorithms.push(alg);
            }
        }
        if i.algorithms.as_ref().is_none_or(|l| l.is_empty()) {
            diags.missing_at(
                src,
                table.clone(),
                "algorithms",
                table.clone(),
                format!("{who} needs `algorithms`, the allowlist of signature algorithms, like [\"RS256\"]"),
            );
        }
        let hmac = algorithms.first().is_some_and(|a| a.family() == AlgorithmFamily::Hmac);

        // Exactly one key source, fitting the algorithms.
        let sources: Vec<(&str, &SStr)> =
            [("jwks_url", &i.jwks_url), ("jwks_file", &i.jwks_file), ("hmac_secret_file", &i.hmac_secret_file)]
                .into_iter()
                .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
                .collect();
        if sources.len() > 1 {
            diags.error_at(
                src,
                sources[1].1.span(),
                format!("{who} has both `{}` and `{}`; give exactly one key source", sources[0].0, sources[1].0),
            );
        }
        let keys = match sources.first() {
            None => {
                diags.missing_at(
                    src,
                    table.clone(),
                    "jwks_url",
                    table.clone(),
                    format!("{who} needs its keys: `jwks_url`, `jwks_file` or `hmac_secret_file`"),
                );
                None
            }
            Some(("hmac_secret_file", s)) => {
                if !algorithms.is_empty() && !hmac {
                    diags.error_at(
                        src,
                        s.span(),
                        format!("`hmac_secret_file` holds a secret for HS256/HS384/HS512, but {who} allows public-key algorithms; give `jwks_url` or `jwks_file`"),
                    );
                }
                read_file(s, "HMAC secret file", base, src, diags).and_then(|(path, bytes)| {
                    // A trailing newline is what editors and `echo` add, not part of the secret.
                    let secret = trim_end(&bytes);
                    let need = algorithms.iter().map(|a| hmac_min(*a)).max().unwrap_or(32);
                    if secret.len() < need {
                        diags.error_at(
                            src,
                            s.span(),
                            format!(
                                "the secret in {} is {} bytes; {} needs at least {need} (as long as its hash)",
                                path.display(),
                                secret.len(),
                                algorithms.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join("/")
                            ),
                        );
                        return None;
                    }
                    Some(JwtKeys::Hmac { path, keys: Arc::new(KeySet::hmac(secret)) })
                })
            }
            Some((kind, s)) => {
                if hmac {
                    diags.error_at(
                        src,
                        s.span(),
                        format!(
                            "`{kind}` gives public keys, but {who} allows HMAC algorithms; give `hmac_secret_file`"
                        ),
                    );
                }
                if *kind == "jwks_url" {
                    check_url(s, src, diags).map(JwtKeys::Url)
                } else {
                    read_file(s, "JWKS file", base, src, diags).and_then(|(path, bytes)| match KeySet::parse(&bytes) {
                        Err(e) => {
                            diags.error_at(src, s.span(), format!("{} is not a usable key set: {e}", path.display()));
                            None
                        }
                        Ok(set) if !algorithms.is_empty() && !set.fits_any(&algorithms) => {
                            let why = if set.skipped.is_empty() {
                                String::new()
                            } else {
                                format!(" (skipped: {})", set.skipped.join("; "))
                            };
                            diags.error_at(
                                src,
                                s.span(),
                                format!("{} has no key for {who}'s algorithms{why}", path.display()),
                            );
                            None
                        }
                        Ok(set) => {
                            for why in &set.skipped {
                                diags.warn_at(src, s.span(), format!("{}: {why}; it is not used", path.display()));
                            }
                            Some(JwtKeys::File { path, keys: Arc::new(set) })
                        }
                    })
                }
            }
        };

        let tenant_claim = claim(&i.tenant_claim, "tenant_claim", "tenant_id", src, diags);
        let scopes_claim = claim(&i.scopes_claim, "scopes_claim", "scope", src, diags);
        let key_id_claim = claim(&i.key_id_claim, "key_id_claim", "sub", src, diags);
        let tier_claim = i.tier_claim.as_ref().map(|t| claim(&Some(t.clone()), "tier_claim", "tier", src, diags));
        let mut allowed = Vec::new();
        for t in i.tiers.iter().flatten() {
            match tiers.get(t.get_ref()) {
                Some(tier) => allowed.push(tier.clone()),
                None => {
                    let known: Vec<&str> = tiers.keys().map(String::as_str).collect();
                    diags.error_at(
                        src,
                        t.span(),
                        format!(
                            "{who} may grant tier `{}`, which is not defined (defined: {})",
                            t.get_ref(),
                            known.join(", ")
                        ),
                    );
                }
            }
        }
        match (&i.tier_claim, &i.tiers) {
            (Some(t), None) => diags.error_at(
                src,
                t.span(),
                format!("`tier_claim` needs `tiers`, the tiers {who} may grant, like [\"free\", \"pro\"]"),
            ),
            (None, Some(list)) if !list.is_empty() => {
                diags.warn_at(src, list[0].span(), "`tiers` has no effect without `tier_claim`")
            }
            _ => {}
        }

        let leeway = duration(
            &i.leeway,
            "leeway",
            Duration::from_secs(60),
            (Duration::ZERO, Duration::from_secs(600)),
            src,
            diags,
        );
        let jwks_refresh = duration(
            &i.jwks_refresh,
            "jwks_refresh",
            Duration::from_secs(600),
            (Duration::from_secs(1), Duration::from_secs(86_400)),
            src,
            diags,
        );
        let jwks_refresh_floor = duration(
            &i.jwks_refresh_floor,
            "jwks_refresh_floor",
            Duration::from_secs(5).min(jwks_refresh),
            (Duration::from_millis(100), jwks_refresh),
            src,
            diags,
        );
        let jwks_timeout = duration(
            &i.jwks_timeout,
            "jwks_timeout",
            Duration::from_secs(5),
            (Duration::from_millis(100), Duration::from_secs(60)),
            src,
            diags,
        );
        let url_only = [
            ("jwks_refresh", &i.jwks_refresh),
            ("jwks_refresh_floor", &i.jwks_refresh_floor),
            ("jwks_timeout", &i.jwks_timeout),
        ];
        if i.jwks_url.is_none() {
            for (key, v) in url_only {
                if let Some(v) = v {
                    diags.warn_at(src, v.span(), format!("`{key}` applies to `jwks_url` only; {who} has none"));
                }
            }
        }
        if let Some(keys) = keys {
            issuers.push(JwtIssuer {
                issuer: name,
                audiences,
                algorithms,
                keys,
                tenant_claim,
                scopes_claim,
                key_id_claim,
                tier_claim,
                tiers: allowed,
                leeway,
                jwks_refresh,
                jwks_refresh_floor,
                jwks_timeout,
            });
        }
    }

    match (resolve_jwt, f.issuers.first()) {
        (Some(r), None) => diags.error_at(
            src,
            r.span(),
            "`jwt` resolution needs at least one `[[jwt.issuers]]`, the identity providers whose tokens are trusted",
        ),
        (None, Some(first)) => diags.warn_at(
            src,
            first.span(),
            "`[[jwt.issuers]]` is configured but `[tenancy] resolve` has no `jwt`: tokens will not be read",
        ),
        _ => {}
    }
    Validated { jwt: JwtConfig { issuers, cache_size, max_token_bytes }, header, cookie }
}

fn trim_end(b: &[u8]) -> &[u8] {
    let end = b.iter().rposition(|c| !c.is_ascii_whitespace()).map_or(0, |i| i + 1);
    &b[..end]
}

/// A `jwks_url`: `http://` or `https://`, a host, and a path.
fn check_url(s: &SStr, src: &SourceFile, diags: &mut Diagnostics) -> Option<String> {
    let text = s.get_ref();
    let parsed = text
        .parse::<http::Uri>()
        .ok()
        .filter(|u| matches!(u.scheme_str(), Some("http") | Some("https")) && u.host().is_some_and(|h| !h.is_empty()));
    let Some(uri) = parsed else {
        diags.error_at(
            src,
            s.span(),
            format!(
                "`{text}` is not an http(s) URL; write it like \"https://acme.eu.auth0.com/.well-known/jwks.json\""
            ),
        );
        return None;
    };
    if uri.scheme_str() == Some("http") {
        let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
        let local = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if !local {
            diags.warn_at(
                src,
                s.span(),
                "keys fetched over plain `http://` can be replaced by anyone on the way; use `https://`",
            );
        }
    }
    Some(text.clone())
}
