//! Tenants from JWTs, end to end: the real gateway, a real JWKS server on 127.0.0.1 started by
//! the test, and tokens minted here with keys generated for this run (RSA, P-256, Ed25519, an
//! HMAC secret). Every algorithm, every refusal the issue names, key rotation, an identity
//! provider that is down at start, reloads, `rules explain --jwt`, and logs that never hold a
//! token.

mod common;

use common::*;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Keys and tokens

/// A signing key of one algorithm, with its public JWK.
struct SigningKey {
    alg: Algorithm,
    kid: String,
    enc: EncodingKey,
    jwk: Value,
}

impl SigningKey {
    fn new(alg: Algorithm, kid: &str, enc: EncodingKey) -> SigningKey {
        let mut jwk = Jwk::from_encoding_key(&enc, alg).expect("public jwk");
        jwk.common.key_id = Some(kid.to_string());
        let jwk = serde_json::to_value(&jwk).expect("jwk json");
        SigningKey { alg, kid: kid.to_string(), enc, jwk }
    }

    fn with_jwk(alg: Algorithm, kid: &str, enc: EncodingKey, jwk: Value) -> SigningKey {
        SigningKey { alg, kid: kid.to_string(), enc, jwk }
    }

    fn rsa(kid: &str) -> SigningKey {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).expect("rsa key");
        let der = key.to_pkcs1_der().expect("pkcs1");
        SigningKey::new(Algorithm::RS256, kid, EncodingKey::from_rsa_der(der.as_bytes()))
    }

    fn ec(kid: &str) -> SigningKey {
        use p256::pkcs8::EncodePrivateKey;
        let key = p256::SecretKey::random(&mut rand_core::OsRng);
        let der = key.to_pkcs8_der().expect("pkcs8");
        SigningKey::new(Algorithm::ES256, kid, EncodingKey::from_ec_der(der.as_bytes()))
    }

    fn ed(kid: &str) -> SigningKey {
        use ed25519_dalek::pkcs8::EncodePrivateKey;
        let key = ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng);
        let der = key.to_pkcs8_der().expect("pkcs8");
        // jsonwebtoken does not write OKP keys as JWKs; RFC 8037 is short.
        let x = b64(key.verifying_key().as_bytes());
        let jwk = json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig"});
        SigningKey::with_jwk(Algorithm::EdDSA, kid, EncodingKey::from_ed_der(der.as_bytes()), jwk)
    }

    fn sign(&self, claims: &Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&h, claims, &self.enc).expect("sign")
    }
}

/// One RSA key per test process: generating one takes a moment.
fn rsa_key() -> &'static SigningKey {
    static K: OnceLock<SigningKey> = OnceLock::new();
    K.get_or_init(|| SigningKey::rsa("rsa-1"))
}

fn jwks(keys: &[&SigningKey]) -> String {
    json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() }).to_string()
}

const HMAC_SECRET: &str = "an HMAC secret of at least 32 bytes, for HS256 tokens";

fn hs256(claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(HMAC_SECRET.as_bytes()))
        .expect("sign")
}

fn b64(v: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

const RSA_ISS: &str = "https://acme-idp.eu.auth0.test/";
const EC_ISS: &str = "https://keycloak.test/realms/saas";
const ED_ISS: &str = "https://ed.idp.test/";
const HS_ISS: &str = "https://internal.idp.test/";
const AUD: &str = "https://api.tollgate.test";
/// The Auth0-style namespaced claim of the RS256 issuer.
const NS_TENANT: &str = "https://tollgate.test/tenant";

/// Auth0-style claims: the tenant in a namespaced claim, scopes in `scope`.
fn auth0(tenant: &str, scope: &str) -> Value {
    json!({"iss": RSA_ISS, "aud": [AUD, "https://acme-idp.eu.auth0.test/userinfo"], "sub": "auth0|user-1",
           "exp": now() + 600, "iat": now(), NS_TENANT: tenant, "scope": scope})
}

/// Keycloak-style claims: the tenant in `organization`, roles as scopes.
fn keycloak(tenant: &str, roles: &[&str]) -> Value {
    json!({"iss": EC_ISS, "aud": AUD, "sub": "f1b2-user", "exp": now() + 600, "iat": now(),
           "organization": [tenant], "realm_access": {"roles": roles}})
}

// ---------------------------------------------------------------------------------------------
// A JWKS server

/// A tiny HTTP server for key sets: `GET /<name>` answers the body set for `name`.
struct JwksServer {
    addr: SocketAddr,
    bodies: Arc<Mutex<Vec<(String, String)>>>,
    hits: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl JwksServer {
    fn start() -> JwksServer {
        Self::start_on(TcpListener::bind("127.0.0.1:0").expect("bind"))
    }

    fn start_on(listener: TcpListener) -> JwksServer {
        let addr = listener.local_addr().expect("addr");
        let bodies: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let hits = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, h, s) = (bodies.clone(), hits.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                        break;
                    }
                }
                h.fetch_add(1, Ordering::SeqCst);
                let path = line.split_whitespace().nth(1).unwrap_or("/").trim_start_matches('/').to_string();
                let body = b.lock().unwrap().iter().find(|(n, _)| *n == path).map(|(_, v)| v.clone());
                let resp = match body {
                    // Chunked, as many identity providers answer.
                    Some(body) => format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                        body.len()
                    ),
                    None => "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_string(),
                };
                let _ = conn.write_all(resp.as_bytes());
            }
        });
        JwksServer { addr, bodies, hits, stop }
    }

    fn set(&self, name: &str, body: String) {
        let mut b = self.bodies.lock().unwrap();
        b.retain(|(n, _)| n != name);
        b.push((name.to_string(), body));
    }

    fn url(&self, name: &str) -> String {
        format!("http://{}/{name}", self.addr)
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

// ---------------------------------------------------------------------------------------------
// The gateway

/// Everything a test needs: the upstream, the JWKS server, the keys and the gateway.
struct Setup {
    echo: Echo,
    idp: JwksServer,
    ec: SigningKey,
    ed: SigningKey,
    gw: Gateway,
}

/// `[jwt]` for four issuers: RS256 and ES256 from the JWKS server (Auth0 and Keycloak
/// style), EdDSA from a JWKS file, HS256 from a secret file with a tier claim.
fn jwt_tables(idp: &JwksServer, extra_jwt: &str) -> String {
    format!(
        r#"
[[rule]]
name = "scoped"
match = {{ path = "/scoped" }}
require_scopes = ["generate"]

[jwt]
cookie = "session"
header = "x-id-token"
max_token_bytes = "4KiB"
{extra_jwt}

[[jwt.issuers]]
issuer = "{RSA_ISS}"
audiences = ["{AUD}"]
algorithms = ["RS256"]
jwks_url = "{rsa}"
tenant_claim = "{NS_TENANT}"
jwks_refresh_floor = "1s"

[[jwt.issuers]]
issuer = "{EC_ISS}"
audiences = ["{AUD}"]
algorithms = ["ES256"]
jwks_url = "{ec}"
tenant_claim = "organization"
scopes_claim = "realm_access.roles"
key_id_claim = "sub"
leeway = "5s"
jwks_refresh_floor = "1s"

[[jwt.issuers]]
issuer = "{ED_ISS}"
audiences = ["{AUD}"]
algorithms = ["EdDSA"]
jwks_file = "ed.json"

[[jwt.issuers]]
issuer = "{HS_ISS}"
audiences = ["{AUD}"]
algorithms = ["HS256"]
hmac_secret_file = "hs.secret"
tier_claim = "plan"
tiers = ["free", "pro"]
"#,
        rsa = idp.url("rsa.json"),
        ec = idp.url("ec.json"),
    )
}

fn start(extra_jwt: &str) -> Setup {
    let echo = Echo::start();
    let idp = JwksServer::start();
    let (ec, ed) = (SigningKey::ec("ec-1"), SigningKey::ed("ed-1"));
    idp.set("rsa.json", jwks(&[rsa_key()]));
    idp.set("ec.json", jwks(&[&ec]));
    let config = standard_config(
        echo.addr,
        Extra {
            tenancy: r#"resolve = ["api_key", "jwt", "subdomain", "path"]"#,
            tail: &jwt_tables(&idp, extra_jwt),
            ..Extra::default()
        },
    );
    let ed_jwks = jwks(&[&ed]);
    let gw = Gateway::start_in(
        temp_dir("jwt"),
        &config,
        &[("ed.json", &ed_jwks), ("hs.secret", &format!("{HMAC_SECRET}\n"))],
    );
    Setup { echo, idp, ec, ed, gw }
}

fn bearer_of(token: &str) -> String {
    format!("Bearer {token}")
}

fn get_with(gw: &Gateway, path: &str, token: &str) -> Resp {
    let auth = bearer_of(token);
    gw.get(path, &[("authorization", &auth)])
}

/// Asserts a problem answer and returns its body.
fn refused(r: &Resp, status: u16, code: &str) -> Value {
    assert_eq!((r.status, r.problem_code().as_str()), (status, code), "{}", r.text());
    r.json()
}

fn challenge_of(r: &Resp) -> String {
    r.header("www-authenticate").unwrap_or_default().to_string()
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn every_algorithm_names_the_tenant_its_scopes_and_its_key_id() {
    let s = start("");
    let tokens = [
        ("RS256", rsa_key().sign(&auth0("acme", "read generate")), "auth0|user-1"),
        ("ES256", s.ec.sign(&keycloak("acme", &["read", "generate"])), "f1b2-user"),
        (
            "EdDSA",
            s.ed.sign(&json!({"iss": ED_ISS, "aud": AUD, "exp": now() + 60, "tenant_id": "acme", "sub": "svc-7", "scope": "read generate"})),
            "svc-7",
        ),
        ("HS256", hs256(&json!({"iss": HS_ISS, "aud": AUD, "exp": now() + 60, "tenant_id": "acme", "sub": "m2m", "scope": ["read", "generate"]})), "m2m"),
    ];
    for (alg, token, sub) in &tokens {
        let before = s.echo.hits();
        let r = get_with(&s.gw, "/scoped", token);
        assert_eq!(r.status, 200, "{alg}: {}", r.text());
        assert_eq!(s.echo.hits(), before + 1);
        let h = r.upstream_headers();
        assert_eq!(h["x-tenant-id"], "acme", "{alg}");
        assert_eq!(h["x-tenant-tier"], "pro", "{alg}");
        assert_eq!(h["x-key-id"], *sub, "{alg}");
        assert!(h.get("authorization").is_none(), "{alg}: the token went upstream");
    }
    // Served again from the cache, the same way.
    let r = get_with(&s.gw, "/scoped", &tokens[0].1);
    assert_eq!(r.status, 200);
}

#[test]
fn every_bad_token_is_refused_with_the_right_code() {
    let s = start("");
    let rsa = rsa_key();
    let mut expired = auth0("acme", "read");
    expired["exp"] = json!(now() - 120);
    let mut early = auth0("acme", "read");
    early["nbf"] = json!(now() + 3600);
    let mut wrong_iss = auth0("acme", "read");
    wrong_iss["iss"] = json!("https://evil.test/");
    let mut wrong_aud = auth0("acme", "read");
    wrong_aud["aud"] = json!("https://other.api");

    let good = rsa.sign(&auth0("acme", "read"));
    let parts: Vec<&str> = good.split('.').collect();
    let forged_payload = b64(auth0("globex", "read generate admin").to_string().as_bytes());
    let tampered = format!("{}.{forged_payload}.{}", parts[0], parts[2]);
    let none_header = b64(br#"{"alg":"none","typ":"JWT"}"#);
    let unsigned = format!("{none_header}.{}.", parts[1]);
    let none_with_sig = format!("{none_header}.{}.{}", parts[1], parts[2]);
    // Algorithm confusion: HS256 "signed" with the issuer's public RSA key as the secret.
    let public_pem = {
        use rsa::pkcs8::{DecodePublicKey, EncodePublicKey};
        let jwk: Jwk = serde_json::from_value(rsa.jwk.clone()).expect("jwk");
        let jsonwebtoken::jwk::AlgorithmParameters::RSA(p) = &jwk.algorithm else { panic!("not rsa") };
        use base64::Engine;
        let d = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).expect("b64");
        let key = rsa::RsaPublicKey::new(rsa::BigUint::from_bytes_be(&d(&p.n)), rsa::BigUint::from_bytes_be(&d(&p.e)))
            .expect("public key");
        let pem = key.to_public_key_pem(rsa::pkcs8::LineEnding::LF).expect("pem");
        assert!(rsa::RsaPublicKey::from_public_key_pem(&pem).is_ok());
        pem
    };
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("rsa-1".into());
    let confused = jsonwebtoken::encode(&h, &auth0("acme", "read"), &EncodingKey::from_secret(public_pem.as_bytes()))
        .expect("sign");
    let confused_n = {
        let n = rsa.jwk["n"].as_str().unwrap_or_default();
        jsonwebtoken::encode(&h, &auth0("acme", "read"), &EncodingKey::from_secret(n.as_bytes())).expect("sign")
    };
    // Over `max_token_bytes` (4 KiB) but well inside the head limit.
    let mut fat = auth0("acme", "read");
    fat["padding"] = json!("p".repeat(5000));
    let huge = rsa.sign(&fat);
    // The right issuer and a good signature, from another issuer's key: refused.
    let ec_signed_as_rsa_issuer = {
        let mut c = auth0("acme", "read");
        c["iss"] = json!(RSA_ISS);
        s.ec.sign(&c)
    };

    for (name, token, code) in [
        ("expired", rsa.sign(&expired), "token_expired"),
        ("not yet valid", rsa.sign(&early), "invalid_token"),
        ("wrong issuer", rsa.sign(&wrong_iss), "invalid_token"),
        ("wrong audience", rsa.sign(&wrong_aud), "invalid_token"),
        ("tampered payload", tampered, "invalid_token"),
        ("alg none, no signature", unsigned, "invalid_token"),
        ("alg none, with a signature", none_with_sig, "invalid_token"),
        ("HS256 with the RSA public key (PEM) as secret", confused, "invalid_token"),
        ("HS256 with the RSA modulus as secret", confused_n, "invalid_token"),
        ("over max_token_bytes", huge, "invalid_token"),
        ("another issuer's key", ec_signed_as_rsa_issuer, "invalid_token"),
        ("not a JWT", "aaa.bbb.ccc".to_string(), "invalid_token"),
    ] {
        let before = s.echo.hits();
        let r = get_with(&s.gw, "/scoped", &token);
        assert_eq!((r.status, r.problem_code().as_str()), (401, code), "{name}: {}", r.text());
        assert_eq!(challenge_of(&r), format!("Bearer error=\"invalid_token\", error_description=\"{code}\""), "{name}");
        assert_eq!(s.echo.hits(), before, "{name} reached the upstream");
        assert!(!r.text().contains(&token[..token.len().min(40)]), "{name}: the answer echoes the token");
    }
    // A token larger than the whole head limit is the head's problem: 431.
    let mut enormous = auth0("acme", "read");
    enormous["padding"] = json!("p".repeat(20 * 1024));
    let r = get_with(&s.gw, "/scoped", &rsa.sign(&enormous));
    refused(&r, 431, "headers_too_large");
}

#[test]
fn the_tenant_must_exist_be_active_be_the_one_named_and_be_called_from_an_allowed_address() {
    let s = start("");
    let rsa = rsa_key();
    let v = refused(&get_with(&s.gw, "/", &rsa.sign(&auth0("nobody", "read"))), 404, "unknown_tenant");
    assert_eq!(v["tenant"], "nobody");
    let v = refused(&get_with(&s.gw, "/", &rsa.sign(&auth0("dormant", "read"))), 403, "tenant_suspended");
    assert_eq!(v["tenant"], "dormant");
    refused(&get_with(&s.gw, "/", &rsa.sign(&auth0("fortress", "read"))), 403, "ip_not_allowed");
    // Another source naming another tenant: 403 tenant_mismatch, as for a key.
    let token = rsa.sign(&auth0("acme", "read"));
    let auth = bearer_of(&token);
    let r = s.gw.get("/", &[("authorization", &auth), ("host", "globex.example.test")]);
    let v = refused(&r, 403, "tenant_mismatch");
    assert_eq!((v["tenant"].as_str(), v["claimed_tenant"].as_str()), (Some("acme"), Some("globex")));
    let r = s.gw.get("/t/globex/x", &[("authorization", &auth)]);
    refused(&r, 403, "tenant_mismatch");
    // The tenant's own subdomain and path agree.
    assert_eq!(s.gw.get("/", &[("authorization", &auth), ("host", "acme-eu.example.test")]).status, 200);
    assert_eq!(s.gw.get("/t/acme/x", &[("authorization", &auth)]).status, 200);
    // An API key and a token together are refused, whoever they name.
    let key = bearer_of(ACME_KEY);
    let r = s.gw.get("/", &[("x-api-key", ACME_KEY), ("authorization", &auth)]);
    refused(&r, 400, "bad_request");
    // The key alone still works with `jwt` on.
    assert_eq!(s.gw.get("/", &[("authorization", &key)]).status, 200);
}

#[test]
fn suspension_applies_at_once_to_a_cached_token() {
    let echo = Echo::start();
    let admin_token = "tg_admin_jwtSuspendTestTokenQQQQQQQQQQQQQQQ";
    let config = standard_config(
        echo.addr,
        Extra {
            tenancy: r#"resolve = ["jwt"]"#,
            tail: &format!(
                r#"
[admin]
token_hash = "{}"

[[jwt.issuers]]
issuer = "{HS_ISS}"
audiences = ["{AUD}"]
algorithms = ["HS256"]
hmac_secret_file = "hs.secret"
"#,
                hash_of(admin_token)
            ),
            ..Extra::default()
        },
    );
    let gw = Gateway::start_in(temp_dir("jwt-suspend"), &config, &[("hs.secret", HMAC_SECRET)]);
    let admin = format!("Bearer {admin_token}");
    let call = |method: &str, path: &str, body: &[u8]| {
        let h = [("authorization", admin.as_str()), ("content-type", "application/json")];
        request(gw.admin, method, path, &h, body).expect("admin call")
    };
    // A tenant made through the admin API (config tenants cannot be suspended there).
    let r = call("POST", "/v1/tenants", br#"{"id": "hooli", "tier": "free"}"#);
    assert_eq!(r.status, 201, "{}", r.text());
    let token = hs256(&json!({"iss": HS_ISS, "aud": AUD, "exp": now() + 600, "tenant_id": "hooli"}));
    assert_eq!(get_with(&gw, "/", &token).status, 200);
    assert_eq!(get_with(&gw, "/", &token).status, 200, "from the cache");
    let r = call("POST", "/v1/tenants/hooli/suspend", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    refused(&get_with(&gw, "/", &token), 403, "tenant_suspended");
    let r = call("POST", "/v1/tenants/hooli/reactivate", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(get_with(&gw, "/", &token).status, 200);
    let r = call("DELETE", "/v1/tenants/hooli", b"");
    assert_eq!(r.status, 204, "{}", r.text());
    refused(&get_with(&gw, "/", &token), 404, "unknown_tenant");
}

#[test]
fn a_tokens_scopes_feed_require_scopes() {
    let s = start("");
    let rsa = rsa_key();
    let v = refused(&get_with(&s.gw, "/scoped", &rsa.sign(&auth0("acme", "read"))), 403, "insufficient_scope");
    assert_eq!(v["missing_scopes"], json!(["generate"]));
    assert_eq!(get_with(&s.gw, "/scoped", &rsa.sign(&auth0("acme", "read generate"))).status, 200);
    // Keycloak roles as scopes.
    let r = get_with(&s.gw, "/scoped", &s.ec.sign(&keycloak("acme", &["read"])));
    refused(&r, 403, "insufficient_scope");
    // Routes without scope requirements take any verified token.
    assert_eq!(get_with(&s.gw, "/open", &s.ec.sign(&keycloak("acme", &[]))).status, 200);
}

#[test]
fn a_tier_claim_names_only_a_tier_its_issuer_may_grant() {
    let s = start("");
    let token = hs256(&json!({"iss": HS_ISS, "aud": AUD, "exp": now() + 60, "tenant_id": "globex", "plan": "pro"}));
    let r = get_with(&s.gw, "/", &token);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.upstream_headers()["x-tenant-tier"], "pro", "globex is free; the token makes it pro");
    let token = hs256(&json!({"iss": HS_ISS, "aud": AUD, "exp": now() + 60, "tenant_id": "globex"}));
    assert_eq!(get_with(&s.gw, "/", &token).upstream_headers()["x-tenant-tier"], "free");
    let token =
        hs256(&json!({"iss": HS_ISS, "aud": AUD, "exp": now() + 60, "tenant_id": "globex", "plan": "enterprise"}));
    refused(&get_with(&s.gw, "/", &token), 401, "invalid_token");
}

#[test]
fn a_rotated_key_is_fetched_on_its_unknown_kid_and_made_up_kids_cannot_hammer_the_idp() {
    let s = start("");
    let rsa = rsa_key();
    assert_eq!(get_with(&s.gw, "/", &rsa.sign(&auth0("acme", "read"))).status, 200);
    // The identity provider rotates: a new key appears in the set, and tokens use it. (Past
    // the floor since the fetch at start: a fetch within the floor would not be allowed.)
    std::thread::sleep(Duration::from_millis(1100));
    let next = SigningKey::ec("ec-2");
    s.idp.set("ec.json", jwks(&[&s.ec, &next]));
    let token = next.sign(&keycloak("acme", &["read"]));
    let r = get_with(&s.gw, "/", &token);
    assert_eq!(r.status, 200, "the new kid was not fetched: {}", r.text());
    // Made-up kids: each could ask for a fetch, the floor (1 s for the RSA issuer) allows one.
    std::thread::sleep(Duration::from_millis(1100));
    let before = s.idp.hits();
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_millis(900) {
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some(format!("made-up-{n}"));
        let t = jsonwebtoken::encode(&h, &auth0("acme", "read"), &rsa.enc).expect("sign");
        let r = get_with(&s.gw, "/", &t);
        refused(&r, 401, "invalid_token");
        n += 1;
    }
    let fetches = s.idp.hits() - before;
    assert!(n >= 5, "only {n} requests");
    assert!(fetches <= 2, "{fetches} fetches for {n} made-up kids within a second");
}

#[test]
fn an_identity_provider_down_at_start_is_fetched_once_it_is_up() {
    let echo = Echo::start();
    // A port with nothing behind it yet.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/jwks.json");
    let config = standard_config(
        echo.addr,
        Extra {
            tenancy: r#"resolve = ["jwt"]"#,
            tail: &format!(
                r#"
[[jwt.issuers]]
issuer = "{RSA_ISS}"
audiences = ["{AUD}"]
algorithms = ["RS256"]
jwks_url = "{url}"
tenant_claim = "{NS_TENANT}"
jwks_refresh_floor = "500ms"
jwks_timeout = "1s"
"#
            ),
            ..Extra::default()
        },
    );
    let gw = Gateway::start(&config);
    let token = rsa_key().sign(&auth0("acme", "read"));
    let r = get_with(&gw, "/", &token);
    let v = refused(&r, 503, "jwks_unavailable");
    assert!(r.header("retry-after").is_some());
    assert!(v["detail"].as_str().is_some_and(|d| d.contains(RSA_ISS)), "{v}");
    // Now the identity provider comes up on that port.
    let idp = JwksServer::start_on(TcpListener::bind(("127.0.0.1", port)).expect("bind the reserved port"));
    idp.set("jwks.json", jwks(&[rsa_key()]));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = get_with(&gw, "/", &token);
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "still {} after the JWKS server came up: {}", r.status, r.text());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(gw.log().contains("token signing keys fetched"), "{}", gw.log());
}

#[test]
fn keys_are_fetched_again_on_schedule_without_any_request() {
    let echo = Echo::start();
    let idp = JwksServer::start();
    idp.set("jwks.json", jwks(&[rsa_key()]));
    let config = standard_config(
        echo.addr,
        Extra {
            tenancy: r#"resolve = ["jwt"]"#,
            tail: &format!(
                r#"
[[jwt.issuers]]
issuer = "{RSA_ISS}"
audiences = ["{AUD}"]
algorithms = ["RS256"]
jwks_url = "{}"
tenant_claim = "{NS_TENANT}"
jwks_refresh = "1s"
jwks_refresh_floor = "500ms"
"#,
                idp.url("jwks.json")
            ),
            ..Extra::default()
        },
    );
    let gw = Gateway::start(&config);
    let start = idp.hits();
    std::thread::sleep(Duration::from_millis(3500));
    let fetched = idp.hits() - start;
    assert!((2..=5).contains(&fetched), "{fetched} fetches in 3.5 s with jwks_refresh = 1s");
    assert_eq!(get_with(&gw, "/", &rsa_key().sign(&auth0("acme", "read"))).status, 200);
}

#[test]
fn tokens_come_from_the_configured_cookie_or_header_and_do_not_go_upstream() {
    let s = start("");
    let token = rsa_key().sign(&auth0("acme", "read"));
    let cookie = format!("theme=dark; session={token}; lang=en");
    let r = s.gw.get("/", &[("cookie", &cookie)]);
    assert_eq!(r.status, 200, "{}", r.text());
    let h = r.upstream_headers();
    assert_eq!(h["x-tenant-id"], "acme");
    assert_eq!(h["cookie"], "theme=dark; lang=en", "the token cookie is taken out, the others kept");
    let r = s.gw.get("/", &[("x-id-token", &token)]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.upstream_headers().get("x-id-token").is_none());
    // The same token twice is one token; two different ones are refused.
    let auth = bearer_of(&token);
    assert_eq!(s.gw.get("/", &[("authorization", &auth), ("x-id-token", &token)]).status, 200);
    let other = rsa_key().sign(&auth0("globex", "read"));
    let r = s.gw.get("/", &[("authorization", &auth), ("x-id-token", &other)]);
    refused(&r, 400, "bad_request");
}

#[test]
fn a_reload_applies_new_issuer_settings() {
    let s = start("");
    let token = rsa_key().sign(&auth0("acme", "read"));
    assert_eq!(get_with(&s.gw, "/", &token).status, 200);
    // The operator moves the API to a new audience.
    let text = std::fs::read_to_string(&s.gw.config_path).expect("config");
    std::fs::write(
        &s.gw.config_path,
        text.replace(&format!("audiences = [\"{AUD}\"]"), "audiences = [\"https://api-v2.tollgate.test\"]"),
    )
    .expect("write");
    s.gw.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while get_with(&s.gw, "/", &token).status == 200 {
        assert!(Instant::now() < deadline, "the old audience is still accepted after the reload");
        std::thread::sleep(Duration::from_millis(100));
    }
    refused(&get_with(&s.gw, "/", &token), 401, "invalid_token");
    let mut v2 = auth0("acme", "read");
    v2["aud"] = json!("https://api-v2.tollgate.test");
    assert_eq!(get_with(&s.gw, "/", &rsa_key().sign(&v2)).status, 200, "the keys fetched before the reload are kept");
}

#[test]
fn no_token_reaches_a_log_line() {
    let s = start("");
    let rsa = rsa_key();
    let good = rsa.sign(&auth0("acme", "read"));
    let mut expired = auth0("acme", "read");
    expired["exp"] = json!(now() - 600);
    let expired = rsa.sign(&expired);
    let other = s.ec.sign(&keycloak("nobody", &["read"]));
    let tokens = [good.clone(), expired, other, format!("{}x", &good[..good.len() - 1])];
    for t in &tokens {
        let _ = get_with(&s.gw, "/scoped", t);
        let cookie = format!("session={t}");
        let _ = s.gw.get("/", &[("cookie", &cookie)]);
    }
    // A head Pingora cannot parse, carrying a token.
    let mut conn = Conn::open(s.gw.addr).expect("connect");
    conn.send_raw(
        format!("GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {good}\r\nBad Header\r\n\r\n").as_bytes(),
    )
    .expect("send");
    let _ = conn.read_response(false);
    std::thread::sleep(Duration::from_millis(300));
    let log = s.gw.log();
    assert!(log.contains("key_id=\"auth0|user-1\""), "no access line names the key id:\n{log}");
    for t in &tokens {
        let signature = t.rsplit('.').next().unwrap_or_default();
        assert!(!log.contains(t.as_str()), "a token reached the log:\n{log}");
        assert!(!log.contains(signature), "a token's signature reached the log:\n{log}");
        assert!(!log.contains(&t[..30]), "the start of a token reached the log:\n{log}");
    }
}

#[test]
fn rules_explain_shows_the_claims_the_tenant_and_the_scopes() {
    let s = start("");
    let explain = |token: &str, path: &str| {
        let out = std::process::Command::new(bin())
            .args(["rules", "explain", "-c"])
            .arg(&s.gw.config_path)
            .args(["--path", path, "--jwt", token])
            .output()
            .expect("run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let token = rsa_key().sign(&auth0("acme", "read"));
    let (code, out, err) = explain(&token, "/scoped");
    assert_eq!(code, Some(0), "{err}");
    for want in [
        &format!("token: verified (issuer `{RSA_ISS}`, RS256, key `rsa-1`)"),
        "claims used:",
        &format!("{NS_TENANT} = \"acme\"   (tenant_claim)"),
        "scope = \"read\"   (scopes_claim)",
        "sub = \"auth0|user-1\"   (key_id_claim)",
        "tenant: acme (tier pro",
        "scopes: read",
        "key id: auth0|user-1",
        "tier=pro tenant=acme",
        "result: rule `scoped`",
        "token scopes: missing generate: 403 insufficient_scope",
    ] {
        assert!(out.contains(want), "`{want}` not in:\n{out}");
    }
    let mut expired = keycloak("acme", &["read"]);
    expired["exp"] = json!(now() - 3600);
    let (code, out, _) = explain(&s.ec.sign(&expired), "/");
    assert_eq!(code, Some(0));
    assert!(out.contains("token: refused: 401 token_expired"), "{out}");
    assert!(out.contains("claims used (not trusted: the token is refused):"), "{out}");
    assert!(out.contains("organization = [\"acme\"]"), "{out}");
}

#[test]
fn config_mistakes_are_all_reported_with_their_lines() {
    let dir = temp_dir("jwt-config");
    std::fs::write(dir.join("short.secret"), "too short").expect("write");
    std::fs::write(dir.join("empty.json"), r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#).expect("write");
    let text = r#"
[tenancy]
resolve = ["api_key", "jwt"]

[upstreams.main]
servers = ["127.0.0.1:9000"]

[tiers.free]
upstream = "main"

[jwt]
header = "authorization"

[[jwt.issuers]]
issuer = "https://a.test/"
audiences = ["api"]
algorithms = ["RS256", "none", "HS256"]
jwks_url = "ftp://a.test/keys"

[[jwt.issuers]]
issuer = "https://b.test/"
audiences = ["api"]
algorithms = ["HS256"]
hmac_secret_file = "short.secret"
tier_claim = "plan"

[[jwt.issuers]]
issuer = "https://c.test/"
audiences = ["api"]
algorithms = ["ES256"]
jwks_file = "empty.json"
tiers = ["gold"]
tenant_claim = "org..id"

[[jwt.issuers]]
issuer = "https://a.test/"
algorithms = ["RS256"]
jwks_file = "missing.json"
hmac_secret_file = "short.secret"

[[jwt.issuers]]
issuer = "https://d.test/"
audiences = ["api"]
algorithms = ["EdDSA"]
jwks_file = "/dev/zero"
"#;
    let path = dir.join("tollgate.toml");
    std::fs::write(&path, text).expect("write");
    let d = match tollgate::config::load(&path) {
        Ok(_) => panic!("accepted"),
        Err(d) => d,
    };
    let errors: Vec<(usize, String)> = d.errors().map(|e| (e.line, e.message.clone())).collect();
    let want: &[(usize, &str)] = &[
        (12, "`Authorization: Bearer` is always read"),
        (17, "`none` is never accepted"),
        (17, "HMAC and public-key algorithms are never allowed for one issuer"),
        (18, "is not an http(s) URL"),
        (24, "bytes; HS256 needs at least 32"),
        (25, "`tier_claim` needs `tiers`"),
        (31, "has no key for issuer `https://c.test/`'s algorithms"),
        (32, "may grant tier `gold`, which is not defined"),
        (33, "`tenant_claim` is a claim name or a dotted path"),
        (35, "needs `audiences`"),
        (36, "issuer `https://a.test/` is listed twice"),
        (38, "cannot read the JWKS file"),
        (39, "has both `jwks_file` and `hmac_secret_file`"),
        (45, "not a regular file"),
    ];
    for (line, needle) in want {
        assert!(
            errors.iter().any(|(l, m)| l == line && m.contains(needle)),
            "no error on line {line} containing `{needle}`; got:\n{d}"
        );
    }
    assert_eq!(errors.len(), want.len(), "{d}");
}

#[test]
fn a_jwks_url_over_https_is_fetched_with_the_certificate_checked() {
    use std::process::{Command, Stdio};
    let dir = temp_dir("jwt-https");
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("openssl (scripts/ensure-deps.sh installs it)");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    // A CA, and a server certificate for 127.0.0.1 signed by it.
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=Test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "leaf.crt",
    ]);
    std::fs::write(dir.join("jwks.json"), jwks(&[rsa_key()])).expect("write");
    // `openssl s_server -WWW` serves the directory's files over HTTPS.
    let port = free_port();
    let mut server = Command::new("openssl")
        .args(["s_server", "-quiet", "-WWW", "-cert", "leaf.crt", "-key", "leaf.key", "-accept"])
        .arg(format!("127.0.0.1:{port}"))
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_server");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "s_server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let config = format!(
        r#"
[tenancy]
resolve = ["jwt"]

[upstreams.api]
servers = ["127.0.0.1:9000"]

[tiers.free]
upstream = "api"

[[jwt.issuers]]
issuer = "{RSA_ISS}"
audiences = ["{AUD}"]
algorithms = ["RS256"]
jwks_url = "https://127.0.0.1:{port}/jwks.json"
tenant_claim = "{NS_TENANT}"

[[tenants]]
id = "acme"
tier = "free"
"#
    );
    std::fs::write(dir.join("tollgate.toml"), config).expect("write");
    let token = rsa_key().sign(&auth0("acme", "read"));
    let explain = |ca: Option<&str>| {
        let mut cmd = Command::new(bin());
        cmd.args(["rules", "explain", "-c"]).arg(dir.join("tollgate.toml")).args(["--jwt", &token]);
        if let Some(ca) = ca {
            // The platform's root certificates, as rustls-native-certs reads them.
            cmd.env("SSL_CERT_FILE", dir.join(ca));
        }
        String::from_utf8_lossy(&cmd.output().expect("run").stdout).into_owned()
    };
    let trusted = explain(Some("ca.crt"));
    let untrusted = explain(None);
    let _ = server.kill();
    let _ = server.wait();
    assert!(trusted.contains("token: verified"), "{trusted}");
    assert!(trusted.contains("tenant: acme (tier free)"), "{trusted}");
    assert!(untrusted.contains("cannot be checked") && untrusted.contains("UnknownIssuer"), "{untrusted}");
}
