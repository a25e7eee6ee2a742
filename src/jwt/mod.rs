//! Tenants from JWTs: the token verifier the request path asks, and the keys it holds.
//!
//! A [`Jwt`] lives as long as the process. For each `[jwt]` config it runs on it keeps a
//! [`State`]: the issuers' key sets and a cache of verified tokens. A reload brings a new
//! config; the first request (or the watcher, within a second) that sees it builds a new state,
//! so new issuer settings apply at once, and the cache starts empty (what a token proved may
//! depend on the settings). A `jwks_url` that stays in the config keeps its [`fetch::Remote`],
//! so a reload does not drop the keys it fetched.
//!
//! The steady state costs one SHA-256 of the token and one lookup in a sharded map: no lock
//! held across an await, no I/O. A token is verified once ([`token`]); what it proved, an
//! [`Identity`], is cached until it expires ([`cache`]). The only waits are for a key fetch
//! that a token needs and that the floor allows: the first fetch after start, or a fetch after
//! an unknown `kid`. Both are bounded by the issuer's `jwks_timeout`.

pub mod cache;
pub mod fetch;
pub mod token;

use crate::clock::SharedClock;
use crate::config::{policy, JwtConfig, JwtKeys, Tier};
use crate::directory::{Directory, KeyId, Tenant};
use crate::error::Reject;
use crate::jwks::KeySet;
use crate::runtime::Runtime;
use arc_swap::{ArcSwap, ArcSwapOption};
use cache::{Digest, TokenCache};
use fetch::{Remote, Schedule, TaskGuard};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use token::SigError;

/// What a verified token proves. Cached; shared by every request that presents the token.
#[derive(Debug)]
pub struct Identity {
    /// The issuer's position in `[[jwt.issuers]]`.
    pub issuer: usize,
    /// The tenant id the token names (lower case; not yet looked up).
    pub tenant: Box<str>,
    pub scopes: Box<[Arc<str>]>,
    /// From `key_id_claim`, for the access log and `X-Key-ID`.
    pub key_id: Option<KeyId>,
    /// From `tier_claim`, one of the tiers the issuer may grant.
    pub tier: Option<Arc<Tier>>,
    /// Unix ms from which the token is refused (`exp` plus the leeway).
    pub until_ms: i64,
    /// The tenant this token acted as on the last runtime it was used with.
    resolved: ArcSwapOption<Resolved>,
}

/// A tenant looked up for a token on one runtime (one directory snapshot).
#[derive(Debug)]
struct Resolved {
    /// The runtime it was looked up on. A weak reference keeps the allocation, so no later
    /// runtime can have the same address while this is held: equal addresses mean the same
    /// directory snapshot, and so the same tenant record.
    runtime: Weak<Runtime>,
    tenant: Result<Arc<Tenant>, Reject>,
}

impl Identity {
    pub fn new(
        issuer: usize,
        tenant: Box<str>,
        scopes: Vec<Arc<str>>,
        key_id: Option<KeyId>,
        tier: Option<Arc<Tier>>,
        until_ms: i64,
    ) -> Identity {
        Identity {
            issuer,
            tenant,
            scopes: scopes.into_boxed_slice(),
            key_id,
            tier,
            until_ms,
            resolved: ArcSwapOption::empty(),
        }
    }

    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| &**s == scope)
    }

    /// The tenant the token acts as on `rt`: the directory's, or, when the token's tier
    /// differs from the tenant's, the tenant on that tier (the tier's limits, without the
    /// tenant's own overrides, which were written for its own tier).
    ///
    /// Every change to the directory (a suspension, a deletion, a reload) makes a new runtime,
    /// so the answer is looked up again on the first request after one and reused until the
    /// next: a suspension applies at once, and the steady state does no directory lookup.
    pub fn tenant_on(&self, rt: &Arc<Runtime>) -> Result<Arc<Tenant>, Reject> {
        if let Some(r) = &*self.resolved.load() {
            if std::ptr::eq(r.runtime.as_ptr(), Arc::as_ptr(rt)) {
                return r.tenant.clone();
            }
        }
        let tenant = self.tenant_in(&rt.directory);
        self.resolved.store(Some(Arc::new(Resolved { runtime: Arc::downgrade(rt), tenant: tenant.clone() })));
        tenant
    }

    /// [`Identity::tenant_on`], looked up in `dir` every time.
    pub fn tenant_in(&self, dir: &Directory) -> Result<Arc<Tenant>, Reject> {
        let Some(live) = dir.tenant(&self.tenant) else {
            return Err(Reject::UnknownTenant { tenant: self.tenant.to_string() });
        };
        let Some(tier) = self.tier.as_ref().filter(|t| t.name != live.tier.name) else {
            return Ok(live.clone());
        };
        let p = &live.policy;
        Ok(Arc::new(Tenant {
            tier: tier.clone(),
            policy: Arc::new(policy::merge(
                &tier.limits,
                &policy::Overrides::default(),
                p.billing_anchor_day,
                p.timezone,
            )),
            ..(**live).clone()
        }))
    }
}

/// Where one issuer's keys are, for the config a [`State`] was built for.
enum Keys {
    Fixed(Arc<KeySet>),
    Remote(Arc<Remote>),
}

/// The verifier's state for one config.
pub struct State {
    config: Arc<JwtConfig>,
    keys: Vec<Keys>,
    cache: TokenCache,
}

/// A `jwks_url`'s key set and the task that fetches it (none without a spawner).
type Fetching = (Arc<Remote>, Option<TaskGuard>);

/// The token verifier. One per process; see the module docs.
pub struct Jwt {
    clock: SharedClock,
    /// Where key fetch tasks run; `None` for a verifier that fetches nothing by itself.
    spawner: Option<tokio::runtime::Handle>,
    state: ArcSwap<State>,
    /// Key sets of the `jwks_url`s of the running config, and their fetch tasks.
    remotes: Mutex<HashMap<String, Fetching>>,
    rebuild: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Jwt {
    /// A verifier whose key fetches run on `spawner`.
    pub fn new(clock: SharedClock, spawner: Option<tokio::runtime::Handle>) -> Arc<Jwt> {
        let empty = Arc::new(JwtConfig::default());
        let state = State { config: empty, keys: Vec::new(), cache: TokenCache::new(1) };
        Arc::new(Jwt {
            clock,
            spawner,
            state: ArcSwap::from_pointee(state),
            remotes: Mutex::default(),
            rebuild: Mutex::default(),
        })
    }

    /// The state for `cfg`, built if `cfg` is not the config the current state is for.
    pub fn sync(&self, cfg: &Arc<JwtConfig>) -> Arc<State> {
        let current = self.state.load();
        if Arc::ptr_eq(&current.config, cfg) {
            return arc_swap::Guard::into_inner(current);
        }
        drop(current);
        let _one = lock(&self.rebuild);
        let current = self.state.load_full();
        if Arc::ptr_eq(&current.config, cfg) {
            return current;
        }
        let mut remotes = lock(&self.remotes);
        let mut kept: HashMap<String, Fetching> = HashMap::new();
        let mut keys = Vec::with_capacity(cfg.issuers.len());
        for issuer in &cfg.issuers {
            keys.push(match &issuer.keys {
                JwtKeys::File { keys, .. } | JwtKeys::Hmac { keys, .. } => Keys::Fixed(keys.clone()),
                JwtKeys::Url(url) => {
                    let schedule = Schedule {
                        every: issuer.jwks_refresh,
                        floor: issuer.jwks_refresh_floor,
                        timeout: issuer.jwks_timeout,
                    };
                    let entry = match kept.remove(url).or_else(|| remotes.remove(url)) {
                        Some(e) => {
                            e.0.set_schedule(schedule);
                            e
                        }
                        None => {
                            let remote = Remote::new(url.clone(), schedule);
                            let task =
                                self.spawner.as_ref().map(|h| TaskGuard(h.spawn(remote.clone().run()).abort_handle()));
                            (remote, task)
                        }
                    };
                    let remote = entry.0.clone();
                    kept.insert(url.clone(), entry);
                    Keys::Remote(remote)
                }
            });
        }
        // URLs no longer configured are dropped here, which stops their tasks.
        *remotes = kept;
        drop(remotes);
        let state = Arc::new(State { config: cfg.clone(), keys, cache: TokenCache::new(cfg.cache_size) });
        self.state.store(state.clone());
        state
    }

    /// Follows reloads without waiting for a request: every second, the state is brought in
    /// line with the running config, so a new issuer's keys are fetched right away.
    pub fn watch(self: &Arc<Self>, runtime: crate::runtime::SharedRuntime) {
        let Some(handle) = self.spawner.clone() else { return };
        let me = Arc::downgrade(self);
        handle.spawn(async move {
            loop {
                let Some(jwt) = me.upgrade() else { return };
                let cfg = runtime.load().config.jwt.clone();
                jwt.sync(&cfg);
                drop(jwt);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    /// Verifies `token` under `cfg` (the config of the request's runtime): from the cache, or
    /// checked in full and then cached.
    pub async fn verify(&self, cfg: &Arc<JwtConfig>, token: &[u8]) -> Result<Arc<Identity>, Reject> {
        let state = self.sync(cfg);
        let now = self.clock.now_millis();
        if token.len() > cfg.max_token_bytes {
            return Err(Reject::InvalidToken { detail: format!("it is longer than {} bytes", cfg.max_token_bytes) });
        }
        let digest = Digest::of(token);
        if let Some(id) = state.cache.get(&digest, now) {
            return Ok(id);
        }
        let parsed = token::parse(token, cfg.max_token_bytes)?;
        let index = token::issuer_of(cfg, &parsed)?;
        // The state was built for `cfg`, so it has a key source per issuer; never panic anyway.
        let (Some(issuer), Some(keys)) = (cfg.issuers.get(index), state.keys.get(index)) else {
            return Err(Reject::Internal);
        };
        let verified = match keys {
            Keys::Fixed(keys) => token::verify_signature(issuer, keys, &parsed),
            Keys::Remote(remote) => {
                let first = match remote.keys() {
                    Some(keys) => token::verify_signature(issuer, &keys, &parsed),
                    None => Err(SigError::UnknownKid),
                };
                match first {
                    Err(SigError::UnknownKid) => self.after_refresh(issuer, remote, &parsed).await,
                    other => other,
                }
            }
        };
        match verified {
            Ok(()) => {}
            Err(SigError::Refused(r)) => return Err(r),
            Err(SigError::UnknownKid) => {
                return Err(Reject::InvalidToken { detail: "its key (`kid`) is not one of its issuer's keys".into() })
            }
        }
        // The clock again: a wait for keys may have taken a while.
        let identity = Arc::new(token::check_claims(index, issuer, &parsed.claims, self.clock.now_millis())?);
        state.cache.insert(digest, identity.clone(), now);
        Ok(identity)
    }

    /// The signature check once the issuer's keys were fetched again, when the floor allows a
    /// fetch now; 503 `jwks_unavailable` when there are no keys to check with.
    async fn after_refresh(
        &self,
        issuer: &crate::config::JwtIssuer,
        remote: &Arc<Remote>,
        parsed: &token::Parsed<'_>,
    ) -> Result<(), SigError> {
        let unavailable = || {
            SigError::Refused(Reject::KeysUnavailable {
                issuer: issuer.issuer.clone(),
                retry_after: issuer.jwks_refresh_floor.as_secs().max(1),
            })
        };
        if let Some(mut done) = remote.refresh() {
            // Any fetch that finishes from now on, successful or not, ends the wait.
            let _ = tokio::time::timeout(issuer.jwks_timeout + Duration::from_millis(250), done.changed()).await;
        }
        match remote.keys() {
            None => Err(unavailable()),
            Some(keys) => match token::verify_signature(issuer, &keys, parsed) {
                Err(SigError::UnknownKid) if remote.last_error().is_some() => Err(unavailable()),
                other => other,
            },
        }
    }

    /// The key set an issuer of the current state holds now (for `rules explain` and tests).
    pub fn keys_of(&self, issuer: usize) -> Option<Arc<KeySet>> {
        match self.state.load().keys.get(issuer)? {
            Keys::Fixed(k) => Some(k.clone()),
            Keys::Remote(r) => r.keys(),
        }
    }

    /// Verified tokens held now.
    pub fn cached(&self) -> usize {
        self.state.load().cache.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::config::{ClaimPath, JwtIssuer};
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use jsonwebtoken::Algorithm;
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const START_MS: i64 = 1_750_000_000_000;

    fn config() -> Arc<JwtConfig> {
        Arc::new(JwtConfig {
            issuers: vec![JwtIssuer {
                issuer: "https://idp.test/".into(),
                audiences: vec!["api".into()],
                algorithms: vec![Algorithm::HS256],
                keys: JwtKeys::Hmac { path: "s".into(), keys: Arc::new(KeySet::hmac(SECRET)) },
                tenant_claim: ClaimPath::parse("tenant_id").unwrap(),
                scopes_claim: ClaimPath::parse("scope").unwrap(),
                key_id_claim: ClaimPath::parse("sub").unwrap(),
                tier_claim: None,
                tiers: vec![],
                leeway: Duration::from_secs(10),
                jwks_refresh: Duration::from_secs(600),
                jwks_refresh_floor: Duration::from_secs(5),
                jwks_timeout: Duration::from_secs(5),
            }],
            cache_size: 100,
            max_token_bytes: 8192,
        })
    }

    fn token(exp_s: i64) -> String {
        let b64 = |v: serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
        let input = format!(
            "{}.{}",
            b64(json!({"alg": "HS256"})),
            b64(json!({"iss": "https://idp.test/", "aud": "api", "exp": exp_s, "tenant_id": "acme", "scope": "read"}))
        );
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET);
        let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &key, Algorithm::HS256).unwrap();
        format!("{input}.{sig}")
    }

    fn block<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
    }

    #[test]
    fn a_cached_token_expires_on_the_injected_clock() {
        let clock = ManualClock::new(START_MS);
        let jwt = Jwt::new(clock.clone(), None);
        let cfg = config();
        let t = token(START_MS / 1000 + 60);
        let id = block(jwt.verify(&cfg, t.as_bytes())).unwrap();
        assert_eq!((&*id.tenant, jwt.cached()), ("acme", 1));
        // Served from the cache until exp + leeway, then refused as expired.
        clock.advance_millis(69_999);
        assert!(Arc::ptr_eq(&block(jwt.verify(&cfg, t.as_bytes())).unwrap(), &id));
        clock.advance_millis(1);
        assert_eq!(block(jwt.verify(&cfg, t.as_bytes())).unwrap_err(), Reject::TokenExpired);
        assert_eq!(jwt.cached(), 0, "the expired entry is gone");
    }

    #[test]
    fn a_new_config_starts_a_new_cache() {
        let jwt = Jwt::new(ManualClock::new(START_MS), None);
        let (a, b) = (config(), config());
        let t = token(START_MS / 1000 + 60);
        block(jwt.verify(&a, t.as_bytes())).unwrap();
        assert_eq!(jwt.cached(), 1);
        block(jwt.verify(&b, t.as_bytes())).unwrap();
        assert_eq!(jwt.cached(), 1, "verified again under the reloaded config, in a fresh cache");
    }

    #[test]
    fn a_token_over_the_limit_is_refused_before_hashing() {
        let jwt = Jwt::new(ManualClock::new(START_MS), None);
        let long = vec![b'a'; 9000];
        assert!(matches!(block(jwt.verify(&config(), &long)), Err(Reject::InvalidToken { .. })));
    }

    #[test]
    fn a_remote_without_keys_answers_unavailable_without_waiting_past_its_timeout() {
        let mut cfg = config();
        {
            let c = Arc::get_mut(&mut cfg).unwrap();
            let i = &mut c.issuers[0];
            i.algorithms = vec![Algorithm::RS256];
            i.keys = JwtKeys::Url("http://127.0.0.1:9/jwks".into());
            i.jwks_timeout = Duration::from_millis(200);
        }
        // No spawner: nothing fetches, so the keys never come.
        let jwt = Jwt::new(ManualClock::new(START_MS), None);
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(json!({"alg": "RS256", "kid": "k1"}).to_string()),
            URL_SAFE_NO_PAD.encode(json!({"iss": "https://idp.test/"}).to_string())
        );
        let started = std::time::Instant::now();
        let r = block(jwt.verify(&cfg, format!("{input}.c2ln").as_bytes()));
        assert!(matches!(r, Err(Reject::KeysUnavailable { .. })), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
