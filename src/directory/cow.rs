//! An ordered map made for snapshots that change one record at a time.
//!
//! [`CowMap`] keeps its entries sorted in chunks of a few hundred, each behind an `Arc`. Cloning
//! the map copies only the list of chunks (one pointer and one key per chunk), and a change on
//! the clone copies only the chunk it touches: a directory of a million keys takes a change by
//! copying about 4,000 pointers and one chunk of at most [`MAX_CHUNK`] entries, while requests
//! keep reading the snapshot they started with. Lookups are two binary searches (chunk, then
//! entry); iteration in key order from any point is what paginated listings need.

use std::borrow::Borrow;
use std::sync::Arc;

/// Entries per chunk of a bulk build.
const TARGET_CHUNK: usize = 256;
/// A chunk that grows past this splits in two.
const MAX_CHUNK: usize = 2 * TARGET_CHUNK;

/// A sorted map of chunked, shared, copy-on-write entries. See the module documentation.
#[derive(Debug)]
pub struct CowMap<K, V> {
    chunks: Vec<Arc<Vec<(K, V)>>>,
    /// The first key of each chunk: a contiguous array for the first binary search. Chunks are
    /// never empty.
    firsts: Vec<K>,
    len: usize,
}

impl<K, V> Default for CowMap<K, V> {
    fn default() -> Self {
        CowMap { chunks: Vec::new(), firsts: Vec::new(), len: 0 }
    }
}

impl<K: Clone, V> Clone for CowMap<K, V> {
    fn clone(&self) -> Self {
        CowMap { chunks: self.chunks.clone(), firsts: self.firsts.clone(), len: self.len }
    }
}

impl<K: Ord + Clone, V: Clone> CowMap<K, V> {
    /// Builds from entries in any order; of two entries with the same key, the later one stays.
    pub fn from_entries(mut entries: Vec<(K, V)>) -> Self {
        // A stable sort keeps equal keys in their order, so "the later one" is well defined.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(K, V)> = Vec::new();
        let mut map = CowMap::default();
        let mut it = entries.into_iter().peekable();
        while let Some(e) = it.next() {
            if it.peek().is_some_and(|n| n.0 == e.0) {
                continue;
            }
            out.push(e);
            if out.len() == TARGET_CHUNK {
                map.push_chunk(std::mem::replace(&mut out, Vec::with_capacity(TARGET_CHUNK)));
            }
        }
        if !out.is_empty() {
            map.push_chunk(out);
        }
        map
    }

    fn push_chunk(&mut self, mut chunk: Vec<(K, V)>) {
        chunk.shrink_to_fit();
        self.len += chunk.len();
        self.firsts.push(chunk[0].0.clone());
        self.chunks.push(Arc::new(chunk));
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The chunk that holds `q` if any chunk does: the last whose first key is `<= q`.
    fn chunk_for<Q: Ord + ?Sized>(&self, q: &Q) -> Option<usize>
    where
        K: Borrow<Q>,
    {
        self.firsts.partition_point(|f| f.borrow() <= q).checked_sub(1)
    }

    pub fn get<Q: Ord + ?Sized>(&self, q: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        let c = &self.chunks[self.chunk_for(q)?];
        c.binary_search_by(|e| e.0.borrow().cmp(q)).ok().map(|i| &c[i].1)
    }

    pub fn contains_key<Q: Ord + ?Sized>(&self, q: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.get(q).is_some()
    }

    /// Inserts or replaces; the chunk written is copied first if another snapshot shares it.
    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        let Some(ci) = self.chunk_for(&k).or(if self.chunks.is_empty() { None } else { Some(0) }) else {
            self.push_chunk(vec![(k, v)]);
            return None;
        };
        let chunk = Arc::make_mut(&mut self.chunks[ci]);
        match chunk.binary_search_by(|e| e.0.cmp(&k)) {
            Ok(i) => Some(std::mem::replace(&mut chunk[i].1, v)),
            Err(i) => {
                chunk.insert(i, (k, v));
                self.len += 1;
                if i == 0 {
                    self.firsts[ci] = chunk[0].0.clone();
                }
                if chunk.len() > MAX_CHUNK {
                    let upper = chunk.split_off(chunk.len() / 2);
                    chunk.shrink_to_fit();
                    self.firsts.insert(ci + 1, upper[0].0.clone());
                    self.chunks.insert(ci + 1, Arc::new(upper));
                }
                None
            }
        }
    }

    pub fn remove<Q: Ord + ?Sized>(&mut self, q: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        let ci = self.chunk_for(q)?;
        let i = self.chunks[ci].binary_search_by(|e| e.0.borrow().cmp(q)).ok()?;
        let chunk = Arc::make_mut(&mut self.chunks[ci]);
        let (_, v) = chunk.remove(i);
        self.len -= 1;
        if chunk.is_empty() {
            self.chunks.remove(ci);
            self.firsts.remove(ci);
        } else if i == 0 {
            self.firsts[ci] = chunk[0].0.clone();
        }
        Some(v)
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = &(K, V)> + '_ {
        self.chunks.iter().flat_map(|c| c.iter())
    }

    /// Entries in key order, from the first whose key is `>= from` (or `> from` without
    /// `inclusive`). A page of a listing costs the two binary searches plus the page.
    pub fn iter_from<'a, Q: Ord + ?Sized>(&'a self, from: &Q, inclusive: bool) -> impl Iterator<Item = &'a (K, V)> + 'a
    where
        K: Borrow<Q>,
    {
        let ci = self.chunk_for(from).unwrap_or(0);
        let start = self
            .chunks
            .get(ci)
            .map_or(0, |c| c.partition_point(|e| if inclusive { e.0.borrow() < from } else { e.0.borrow() <= from }));
        self.chunks.iter().skip(ci).enumerate().flat_map(move |(n, c)| c.iter().skip(if n == 0 { start } else { 0 }))
    }

    /// Bytes held by the map itself, not counting what keys and values point to.
    pub fn heap_bytes(&self) -> usize {
        let entry = std::mem::size_of::<(K, V)>();
        self.chunks.iter().map(|c| c.capacity() * entry + 16).sum::<usize>()
            + self.firsts.capacity() * std::mem::size_of::<K>()
            + self.chunks.capacity() * std::mem::size_of::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A small deterministic generator, so a failure replays.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    fn check(m: &CowMap<u64, u64>, model: &BTreeMap<u64, u64>) {
        assert_eq!(m.len(), model.len());
        let got: Vec<(u64, u64)> = m.iter().copied().collect();
        let want: Vec<(u64, u64)> = model.iter().map(|(k, v)| (*k, *v)).collect();
        assert_eq!(got, want);
        for (i, c) in m.chunks.iter().enumerate() {
            assert!(!c.is_empty() && c.len() <= MAX_CHUNK);
            assert_eq!(m.firsts[i], c[0].0);
        }
    }

    #[test]
    fn inserts_and_removes_match_an_ordered_map_and_old_snapshots_do_not_move() {
        let mut rng = Lcg(7);
        let mut model = BTreeMap::new();
        let entries: Vec<(u64, u64)> = (0..3000).map(|i| (rng.next() % 5000, i)).collect();
        for (k, v) in &entries {
            model.insert(*k, *v);
        }
        let mut m = CowMap::from_entries(entries);
        check(&m, &model);
        for round in 0..20_000u64 {
            let before = (m.clone(), model.clone());
            let k = rng.next() % 6000;
            if rng.next().is_multiple_of(3) {
                assert_eq!(m.remove(&k), model.remove(&k));
            } else {
                assert_eq!(m.insert(k, round), model.insert(k, round));
            }
            assert_eq!(m.get(&k), model.get(&k));
            if round % 997 == 0 {
                check(&m, &model);
                // The snapshot taken before the change still reads as it was.
                check(&before.0, &before.1);
            }
        }
        check(&m, &model);
        for from in [0u64, 1, 2500, 5999, 7000] {
            let got: Vec<u64> = m.iter_from(&from, false).map(|e| e.0).take(700).collect();
            let want: Vec<u64> = model.range(from + 1..).map(|(k, _)| *k).take(700).collect();
            assert_eq!(got, want, "after {from}");
            let got: Vec<u64> = m.iter_from(&from, true).map(|e| e.0).take(700).collect();
            let want: Vec<u64> = model.range(from..).map(|(k, _)| *k).take(700).collect();
            assert_eq!(got, want, "from {from}");
        }
    }

    #[test]
    fn emptied_and_rebuilt() {
        let mut m: CowMap<u64, u64> = CowMap::from_entries(vec![(1, 1), (1, 2)]);
        assert_eq!(m.get(&1), Some(&2), "the later of two equal keys stays");
        assert_eq!(m.remove(&1), Some(2));
        assert!(m.is_empty() && m.chunks.is_empty());
        assert_eq!(m.iter_from(&0, true).count(), 0);
        m.insert(5, 5);
        m.insert(3, 3);
        assert_eq!(m.iter().map(|e| e.0).collect::<Vec<_>>(), vec![3, 5]);
        assert_eq!(m.firsts, vec![3]);
    }

    #[test]
    fn string_keys_are_looked_up_by_str() {
        let m: CowMap<Arc<str>, u32> = CowMap::from_entries(vec![("b".into(), 2), ("a".into(), 1)]);
        assert_eq!(m.get("a"), Some(&1));
        assert_eq!(m.get("c"), None);
        assert_eq!(m.iter_from("a", false).map(|e| e.1).collect::<Vec<_>>(), vec![2]);
    }
}
