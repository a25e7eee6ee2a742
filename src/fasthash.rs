//! A small, fast, non-cryptographic hasher for in-process maps on the request path (tenant ids,
//! addresses, small integers).
//!
//! These maps only hold keys of tenants the gateway already authenticated (or values it made
//! itself), so flooding them with chosen colliding keys is not open to clients; SipHash's
//! protection is not needed and its cost is.

use std::hash::Hasher;

#[derive(Default, Clone, Copy)]
pub struct FastHasher(u64);

const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.write_u64(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.write_u64(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 56));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(K);
    }
    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }
    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }
    fn write_i64(&mut self, v: i64) {
        self.write_u64(v as u64);
    }
    fn write_u8(&mut self, v: u8) {
        self.write_u64(u64::from(v));
    }
}

/// `BuildHasher` for [`FastHasher`].
pub type Fast = std::hash::BuildHasherDefault<FastHasher>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::{BuildHasher, Hash};

    fn h<T: Hash>(v: T) -> u64 {
        Fast::default().hash_one(v)
    }

    #[test]
    fn distinct_short_keys_hash_apart() {
        assert_ne!(h("acme"), h("acmf"));
        assert_ne!(h("a"), h("a\0"));
        assert_ne!(h(("t", 1u32)), h(("t", 2u32)));
        assert_eq!(h("globex"), h("globex"));
    }
}
