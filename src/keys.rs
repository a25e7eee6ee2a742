//! API key material: generation, hashing and the `sha256:<hex>` form stored in config and stores.
//!
//! Guarantees: a secret is never kept past the moment it is hashed. Everything that outlives a
//! request (the directory, the config, the stores, logs) holds only a [`KeyHash`].

use rand::Rng;
use sha2::{Digest, Sha256};
use std::fmt;

/// The prefix of live keys. It lets people and secret scanners recognise a Tollgate key.
pub const DEFAULT_PREFIX: &str = "tg_live";

/// Number of base62 characters of randomness in a generated key (≈ 190 bits).
const SECRET_CHARS: usize = 32;

/// Longest credential the gateway will even hash. Anything longer is rejected as invalid.
pub const MAX_KEY_LEN: usize = 256;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The SHA-256 of a key secret.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    /// Hashes a presented secret.
    pub fn of(secret: &[u8]) -> Self {
        KeyHash(Sha256::digest(secret).into())
    }

    /// Parses the stored form `sha256:<64 lowercase or uppercase hex>`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let hex_part = text.strip_prefix("sha256:").ok_or_else(|| {
            "a key hash must look like `sha256:<64 hex digits>`; `tollgate keygen` prints one".to_string()
        })?;
        if hex_part.len() != 64 {
            return Err(format!(
                "a SHA-256 hash has 64 hex digits, this one has {}; `tollgate keygen` prints a valid one",
                hex_part.len()
            ));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut out)
            .map_err(|_| "the hash contains a character that is not a hex digit".to_string())?;
        Ok(KeyHash(out))
    }
}

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only a short fingerprint: enough to correlate, too little to matter.
        write!(f, "KeyHash({}…)", hex::encode(&self.0[..4]))
    }
}

impl std::hash::Hash for KeyHash {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // The value is already a uniformly distributed digest, so eight of its bytes are a
        // perfect hash. See `IdentityHasher`.
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

/// A hasher for maps keyed by [`KeyHash`]: it passes the digest's own bits through.
///
/// This is safe against hash flooding because the map only ever contains digests of secrets the
/// gateway generated or an operator installed; a client can only look up, never insert.
#[derive(Default, Clone, Copy)]
pub struct IdentityHasher(u64);

impl std::hash::Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// `BuildHasher` for [`IdentityHasher`].
pub type IdentityBuild = std::hash::BuildHasherDefault<IdentityHasher>;

/// A freshly generated key: the secret (shown once) and its hash (stored).
pub struct GeneratedKey {
    pub secret: String,
    pub hash: KeyHash,
}

/// Generates `<prefix>_<32 base62 chars>` from the OS-seeded thread RNG.
pub fn generate(prefix: &str) -> GeneratedKey {
    let mut rng = rand::rng();
    let mut secret = String::with_capacity(prefix.len() + 1 + SECRET_CHARS);
    secret.push_str(prefix);
    secret.push('_');
    for _ in 0..SECRET_CHARS {
        let idx = rng.random_range(0..BASE62.len());
        secret.push(BASE62[idx] as char);
    }
    let hash = KeyHash::of(secret.as_bytes());
    GeneratedKey { secret, hash }
}

/// Checks the shape of a presented credential before it is hashed: printable ASCII, no spaces,
/// not empty, not absurdly long. Returns `false` for anything else.
pub fn well_formed(secret: &[u8]) -> bool {
    !secret.is_empty() && secret.len() <= MAX_KEY_LEN && secret.iter().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_prefix_and_hash() {
        let k = generate("tg_live");
        assert!(k.secret.starts_with("tg_live_"));
        assert_eq!(k.secret.len(), "tg_live_".len() + SECRET_CHARS);
        assert_eq!(KeyHash::of(k.secret.as_bytes()), k.hash);
        assert_eq!(KeyHash::parse(&k.hash.to_string()).unwrap(), k.hash);
        assert_ne!(generate("tg_live").secret, k.secret);
    }

    #[test]
    fn hash_parse_rejects_bad_forms() {
        assert!(KeyHash::parse("md5:abc").is_err());
        assert!(KeyHash::parse("sha256:abc").is_err());
        assert!(KeyHash::parse(&format!("sha256:{}", "zz".repeat(32))).is_err());
    }

    #[test]
    fn shape_check() {
        assert!(well_formed(b"tg_live_abc"));
        assert!(!well_formed(b""));
        assert!(!well_formed(b"has space"));
        assert!(!well_formed("caf\u{e9}".as_bytes()));
        assert!(!well_formed(&[b'a'; MAX_KEY_LEN + 1]));
    }
}
