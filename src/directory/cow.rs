//! An ordered map made for snapshots that change one record at a time.
//!
//! [`CowMap`] keeps its entries sorted in chunks of a few hundred, the chunks in segments of up
//! to [`MAX_SEGMENT`], each behind an `Arc`: a two-level tree of fixed height. Cloning the map
//! copies only the list of segments (one pointer and one key per segment: about 60 for a
//! million entries), and a change on the clone copies only the segment and the chunk it
//! touches (at most [`MAX_SEGMENT`] pointers and [`MAX_CHUNK`] entries), so a change costs about
//! the same with ten thousand entries or ten million, while requests keep reading the snapshot
//! they started with. Lookups are three binary searches (segment, chunk, entry); iteration in
//! key order from any point is what paginated listings need.

use std::borrow::Borrow;
use std::sync::Arc;

/// Entries per chunk of a bulk build.
const TARGET_CHUNK: usize = 256;
/// A chunk that grows past this splits in two.
const MAX_CHUNK: usize = 2 * TARGET_CHUNK;
/// Chunks per segment of a bulk build.
const TARGET_SEGMENT: usize = 64;
/// A segment that grows past this splits in two.
const MAX_SEGMENT: usize = 2 * TARGET_SEGMENT;

type Chunk<K, V> = Vec<(K, V)>;

/// Sorted, non-empty chunks, and the first key of each.
#[derive(Debug)]
struct Segment<K, V> {
    chunks: Vec<Arc<Chunk<K, V>>>,
    firsts: Vec<K>,
}

impl<K: Clone, V> Clone for Segment<K, V> {
    fn clone(&self) -> Self {
        Segment { chunks: self.chunks.clone(), firsts: self.firsts.clone() }
    }
}

/// The last position whose first key is `<= q`.
fn locate<K: Borrow<Q>, Q: Ord + ?Sized>(firsts: &[K], q: &Q) -> Option<usize> {
    firsts.partition_point(|f| f.borrow() <= q).checked_sub(1)
}

/// A sorted map of chunked, shared, copy-on-write entries. See the module documentation.
#[derive(Debug)]
pub struct CowMap<K, V> {
    segments: Vec<Arc<Segment<K, V>>>,
    /// The first key of each segment. Segments are never empty, nor are chunks.
    firsts: Vec<K>,
    len: usize,
}

impl<K, V> Default for CowMap<K, V> {
    fn default() -> Self {
        CowMap { segments: Vec::new(), firsts: Vec::new(), len: 0 }
    }
}

impl<K: Clone, V> Clone for CowMap<K, V> {
    fn clone(&self) -> Self {
        CowMap { segments: self.segments.clone(), firsts: self.firsts.clone(), len: self.len }
    }
}

impl<K: Ord + Clone, V: Clone> CowMap<K, V> {
    /// Builds from entries in any order; of two entries with the same key, the later one stays.
    pub fn from_entries(mut entries: Vec<(K, V)>) -> Self {
        // A stable sort keeps equal keys in their order, so "the later one" is well defined.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut map = CowMap::default();
        let mut segment = Segment { chunks: Vec::new(), firsts: Vec::new() };
        let mut out: Chunk<K, V> = Vec::with_capacity(TARGET_CHUNK);
        let mut it = entries.into_iter().peekable();
        while let Some(e) = it.next() {
            if it.peek().is_some_and(|n| n.0 == e.0) {
                continue;
            }
            out.push(e);
            if out.len() == TARGET_CHUNK {
                map.push_chunk(&mut segment, std::mem::replace(&mut out, Vec::with_capacity(TARGET_CHUNK)));
            }
        }
        if !out.is_empty() {
            map.push_chunk(&mut segment, out);
        }
        if !segment.chunks.is_empty() {
            map.push_segment(segment);
        }
        map
    }

    fn push_chunk(&mut self, segment: &mut Segment<K, V>, mut chunk: Chunk<K, V>) {
        chunk.shrink_to_fit();
        self.len += chunk.len();
        segment.firsts.push(chunk[0].0.clone());
        segment.chunks.push(Arc::new(chunk));
        if segment.chunks.len() == TARGET_SEGMENT {
            let full = std::mem::replace(segment, Segment { chunks: Vec::new(), firsts: Vec::new() });
            self.push_segment(full);
        }
    }

    fn push_segment(&mut self, segment: Segment<K, V>) {
        self.firsts.push(segment.firsts[0].clone());
        self.segments.push(Arc::new(segment));
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get<Q: Ord + ?Sized>(&self, q: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        let seg = &self.segments[locate(&self.firsts, q)?];
        let chunk = &seg.chunks[locate(&seg.firsts, q)?];
        chunk.binary_search_by(|e| e.0.borrow().cmp(q)).ok().map(|i| &chunk[i].1)
    }

    pub fn contains_key<Q: Ord + ?Sized>(&self, q: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.get(q).is_some()
    }

    /// Inserts or replaces; the segment and chunk written are copied first if another snapshot
    /// shares them.
    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        if self.segments.is_empty() {
            let mut segment = Segment { chunks: Vec::new(), firsts: Vec::new() };
            self.push_chunk(&mut segment, vec![(k, v)]);
            self.push_segment(segment);
            return None;
        }
        // Below every key: the first segment and chunk take it.
        let si = locate(&self.firsts, &k).unwrap_or(0);
        let seg = Arc::make_mut(&mut self.segments[si]);
        let ci = locate(&seg.firsts, &k).unwrap_or(0);
        let chunk = Arc::make_mut(&mut seg.chunks[ci]);
        let i = match chunk.binary_search_by(|e| e.0.cmp(&k)) {
            Ok(i) => return Some(std::mem::replace(&mut chunk[i].1, v)),
            Err(i) => i,
        };
        chunk.insert(i, (k, v));
        self.len += 1;
        if i == 0 {
            seg.firsts[ci] = chunk[0].0.clone();
            if ci == 0 {
                self.firsts[si] = chunk[0].0.clone();
            }
        }
        if chunk.len() > MAX_CHUNK {
            let upper = chunk.split_off(chunk.len() / 2);
            chunk.shrink_to_fit();
            seg.firsts.insert(ci + 1, upper[0].0.clone());
            seg.chunks.insert(ci + 1, Arc::new(upper));
        }
        if seg.chunks.len() > MAX_SEGMENT {
            let half = seg.chunks.len() / 2;
            let upper = Segment { chunks: seg.chunks.split_off(half), firsts: seg.firsts.split_off(half) };
            self.firsts.insert(si + 1, upper.firsts[0].clone());
            self.segments.insert(si + 1, Arc::new(upper));
        }
        None
    }

    pub fn remove<Q: Ord + ?Sized>(&mut self, q: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        // Find it first, so that nothing is copied for a key that is not there.
        let si = locate(&self.firsts, q)?;
        let ci = locate(&self.segments[si].firsts, q)?;
        let i = self.segments[si].chunks[ci].binary_search_by(|e| e.0.borrow().cmp(q)).ok()?;
        let seg = Arc::make_mut(&mut self.segments[si]);
        let chunk = Arc::make_mut(&mut seg.chunks[ci]);
        let (_, v) = chunk.remove(i);
        self.len -= 1;
        if chunk.is_empty() {
            seg.chunks.remove(ci);
            seg.firsts.remove(ci);
        } else if i == 0 {
            seg.firsts[ci] = chunk[0].0.clone();
        }
        if seg.chunks.is_empty() {
            self.segments.remove(si);
            self.firsts.remove(si);
        } else if ci == 0 {
            self.firsts[si] = seg.firsts[0].clone();
        }
        Some(v)
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = &(K, V)> + '_ {
        self.segments.iter().flat_map(|s| s.chunks.iter().flat_map(|c| c.iter()))
    }

    /// Entries in key order, from the first whose key is `>= from` (or `> from` without
    /// `inclusive`). A page of a listing costs the binary searches plus the page.
    pub fn iter_from<'a, Q: Ord + ?Sized>(&'a self, from: &Q, inclusive: bool) -> impl Iterator<Item = &'a (K, V)> + 'a
    where
        K: Borrow<Q>,
    {
        let si = locate(&self.firsts, from).unwrap_or(0);
        let ci = self.segments.get(si).and_then(|s| locate(&s.firsts, from)).unwrap_or(0);
        let start =
            self.segments.get(si).and_then(|s| s.chunks.get(ci)).map_or(0, |c| {
                c.partition_point(|e| if inclusive { e.0.borrow() < from } else { e.0.borrow() <= from })
            });
        self.segments.iter().skip(si).enumerate().flat_map(move |(sn, seg)| {
            seg.chunks
                .iter()
                .skip(if sn == 0 { ci } else { 0 })
                .enumerate()
                .flat_map(move |(cn, c)| c.iter().skip(if sn == 0 && cn == 0 { start } else { 0 }))
        })
    }

    /// Bytes held by the map itself, not counting what keys and values point to.
    pub fn heap_bytes(&self) -> usize {
        let entry = std::mem::size_of::<(K, V)>();
        let key = std::mem::size_of::<K>();
        self.segments
            .iter()
            .map(|s| {
                s.chunks.iter().map(|c| c.capacity() * entry + 16).sum::<usize>()
                    + s.firsts.capacity() * key
                    + s.chunks.capacity() * std::mem::size_of::<usize>()
            })
            .sum::<usize>()
            + self.firsts.capacity() * key
            + self.segments.capacity() * std::mem::size_of::<usize>()
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
        assert_eq!(m.firsts.len(), m.segments.len());
        for (si, seg) in m.segments.iter().enumerate() {
            assert!(!seg.chunks.is_empty() && seg.chunks.len() <= MAX_SEGMENT);
            assert_eq!(m.firsts[si], seg.firsts[0]);
            assert_eq!(seg.firsts.len(), seg.chunks.len());
            for (i, c) in seg.chunks.iter().enumerate() {
                assert!(!c.is_empty() && c.len() <= MAX_CHUNK);
                assert_eq!(seg.firsts[i], c[0].0);
            }
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
    fn segments_split_and_empty_as_a_large_map_grows_and_shrinks() {
        let mut rng = Lcg(11);
        let mut model = BTreeMap::new();
        // Built in bulk: several segments.
        let entries: Vec<(u64, u64)> = (0..40_000).map(|i| (rng.next() % 1_000_000, i)).collect();
        for (k, v) in &entries {
            model.insert(*k, *v);
        }
        let mut m = CowMap::from_entries(entries);
        assert!(m.segments.len() > 1);
        check(&m, &model);
        let snapshot = (m.clone(), model.clone());
        // Grown one entry at a time: chunks and segments split.
        for i in 0..150_000u64 {
            let k = rng.next() % 1_000_000;
            assert_eq!(m.insert(k, i), model.insert(k, i));
        }
        check(&m, &model);
        assert!(m.segments.len() > 3);
        // Emptied from the front: chunks and segments go, the firsts follow.
        let keys: Vec<u64> = model.keys().copied().collect();
        for k in &keys[..keys.len() - 10] {
            assert_eq!(m.remove(k), model.remove(k));
        }
        check(&m, &model);
        let from = keys[keys.len() - 5];
        assert_eq!(m.iter_from(&from, true).count(), 5);
        check(&snapshot.0, &snapshot.1);
    }

    #[test]
    fn emptied_and_rebuilt() {
        let mut m: CowMap<u64, u64> = CowMap::from_entries(vec![(1, 1), (1, 2)]);
        assert_eq!(m.get(&1), Some(&2), "the later of two equal keys stays");
        assert_eq!(m.remove(&1), Some(2));
        assert!(m.is_empty() && m.segments.is_empty());
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
