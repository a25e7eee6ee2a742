//! Verified tokens, by the SHA-256 of the token, until they expire.
//!
//! A signature check costs tens of microseconds (RSA) where the rest of authentication costs
//! well under one, and a client sends the same token until it expires, so each token is checked
//! once. What is cached is what the token proved (tenant, scopes, key id, tier), never the
//! token. The tenant's status is not: it is read from the directory on every request, so a
//! suspension applies at once.
//!
//! Bounded: `[jwt] cache_size` entries, in 16 shards, each behind its own short lock. A full
//! shard first drops its expired entries; if none has expired it drops an arbitrary one (its
//! keys are hashes, so that is a random one).

use super::Identity;
use crate::keys::IdentityBuild;
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

const SHARDS: usize = 16;

/// The SHA-256 of a token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(token: &[u8]) -> Digest {
        Digest(Sha256::digest(token).into())
    }
}

impl Hash for Digest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Already uniformly distributed: eight bytes of it are a hash.
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[8..16]);
        state.write_u64(u64::from_le_bytes(b));
    }
}

struct Entry {
    identity: Arc<Identity>,
    /// Unix ms after which the token is no longer accepted.
    until_ms: i64,
}

pub struct TokenCache {
    shards: Vec<Mutex<HashMap<Digest, Entry, IdentityBuild>>>,
    per_shard: usize,
}

impl TokenCache {
    pub fn new(capacity: usize) -> TokenCache {
        let capacity = capacity.max(1);
        let n = SHARDS.min(capacity);
        TokenCache { shards: (0..n).map(|_| Mutex::new(HashMap::default())).collect(), per_shard: capacity.div_ceil(n) }
    }

    fn shard(&self, d: &Digest) -> std::sync::MutexGuard<'_, HashMap<Digest, Entry, IdentityBuild>> {
        let i = usize::from(d.0[0]) % self.shards.len();
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the token proved, if it was verified and has not expired at `now_ms`.
    pub fn get(&self, d: &Digest, now_ms: i64) -> Option<Arc<Identity>> {
        let mut shard = self.shard(d);
        let e = shard.get(d)?;
        if now_ms < e.until_ms {
            return Some(e.identity.clone());
        }
        shard.remove(d);
        None
    }

    /// Keeps a verified token's identity until `identity.until_ms`.
    pub fn insert(&self, d: Digest, identity: Arc<Identity>, now_ms: i64) {
        let until_ms = identity.until_ms;
        if until_ms <= now_ms {
            return;
        }
        let mut shard = self.shard(&d);
        if shard.len() >= self.per_shard && !shard.contains_key(&d) {
            shard.retain(|_, e| e.until_ms > now_ms);
            if shard.len() >= self.per_shard {
                if let Some(victim) = shard.keys().next().copied() {
                    shard.remove(&victim);
                }
            }
        }
        shard.insert(d, Entry { identity, until_ms });
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(tenant: &str, until_ms: i64) -> Arc<Identity> {
        Arc::new(Identity::new(0, tenant.into(), vec![], None, None, until_ms))
    }

    #[test]
    fn entries_live_until_their_expiry() {
        let c = TokenCache::new(100);
        let d = Digest::of(b"a.b.c");
        c.insert(d, identity("acme", 2_000), 1_000);
        assert_eq!(c.get(&d, 1_999).map(|i| i.tenant.to_string()), Some("acme".into()));
        assert!(c.get(&d, 2_000).is_none(), "gone at its expiry");
        assert!(c.is_empty(), "an expired entry is dropped when found");
        c.insert(d, identity("acme", 2_000), 2_000);
        assert!(c.is_empty(), "an already expired token is not kept");
    }

    #[test]
    fn the_cache_stays_within_its_size() {
        let c = TokenCache::new(64);
        for i in 0..10_000u32 {
            c.insert(Digest::of(&i.to_le_bytes()), identity("t", i64::MAX), 0);
        }
        assert!(c.len() <= 64, "{} entries", c.len());
        // Expired entries go first when a shard is full.
        let c = TokenCache::new(16);
        let old: Vec<Digest> = (0..16u32).map(|i| Digest::of(&i.to_be_bytes())).collect();
        for d in &old {
            c.insert(*d, identity("old", 10), 0);
        }
        let fresh = Digest::of(b"fresh");
        c.insert(fresh, identity("new", 1_000), 20);
        assert!(c.get(&fresh, 21).is_some());
    }
}
