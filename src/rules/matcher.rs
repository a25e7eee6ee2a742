//! The compiled rule index and the request view rules are matched against.
//!
//! Rules are indexed by their path condition: exact paths in a hash table, prefixes in a byte
//! trie, globs in a segment trie, and rules without a path in one list. A lookup visits only
//! the entries on the request's own path, checks each candidate's remaining conditions, and
//! keeps the lowest rule index that matches, so first-match order is preserved without
//! scanning every rule. Nothing here allocates per request.

use super::glob::{seg_matches, Seg};
use super::{Conditions, HostMatch, PathMatch, Rule};
use http::{HeaderMap, Method};
use std::collections::HashMap;
use std::sync::Arc;

/// What a rule may look at.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a Method,
    /// Lower case, without the port.
    pub host: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub tier: Option<&'a str>,
    pub tenant: Option<&'a str>,
}

/// Looks up a query parameter's raw value (`Some("")` for a bare `?flag`).
pub fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

impl Conditions {
    /// Why this rule does not match, or `None` when it does.
    pub fn mismatch(&self, r: &RequestView<'_>) -> Option<String> {
        if let Some(h) = &self.host {
            if !h.matches(r.host) {
                let want = match h {
                    HostMatch::Exact(x) => x.clone(),
                    HostMatch::Suffix(s) => format!("*{s}"),
                };
                return Some(format!("host `{}` is not `{want}`", r.host));
            }
        }
        if let Some(p) = &self.path {
            if !p.matches(r.path) {
                let want = match p {
                    PathMatch::Any => "any".to_string(),
                    PathMatch::Exact(x) => format!("path = {x}"),
                    PathMatch::Prefix(x) => format!("path_prefix = {x}"),
                    PathMatch::Glob(g) => format!("path_glob = {g}"),
                };
                return Some(format!("path `{}` does not match {want}", r.path));
            }
        }
        if let Some(ms) = &self.methods {
            if !ms.contains(r.method) {
                let list: Vec<&str> = ms.iter().map(Method::as_str).collect();
                return Some(format!("method {} is not one of {}", r.method, list.join(", ")));
            }
        }
        for (name, want) in &self.headers {
            let got = r.headers.get(name);
            match (want, got) {
                (_, None) => return Some(format!("header `{name}` is absent")),
                (Some(w), Some(g)) if g.as_bytes() != w.as_bytes() => {
                    return Some(format!("header `{name}` is not `{w}`"))
                }
                _ => {}
            }
        }
        for (name, want) in &self.query {
            match (want, query_param(r.query, name)) {
                (_, None) => return Some(format!("query parameter `{name}` is absent")),
                (Some(w), Some(g)) if g != w => return Some(format!("query parameter `{name}` is not `{w}`")),
                _ => {}
            }
        }
        if let Some(ts) = &self.tiers {
            match r.tier {
                Some(t) if ts.iter().any(|x| &**x == t) => {}
                Some(t) => return Some(format!("tier `{t}` is not listed")),
                None => return Some("no tenant, so no tier".into()),
            }
        }
        if let Some(ts) = &self.tenants {
            match r.tenant {
                Some(t) if ts.iter().any(|x| x == t) => {}
                Some(t) => return Some(format!("tenant `{t}` is not listed")),
                None => return Some("no tenant".into()),
            }
        }
        None
    }

    /// The hot-path form of [`Conditions::mismatch`]: no strings built.
    pub fn matches(&self, r: &RequestView<'_>) -> bool {
        if let Some(h) = &self.host {
            if !h.matches(r.host) {
                return false;
            }
        }
        if let Some(p) = &self.path {
            if !p.matches(r.path) {
                return false;
            }
        }
        if let Some(ms) = &self.methods {
            if !ms.contains(r.method) {
                return false;
            }
        }
        for (name, want) in &self.headers {
            match (want, r.headers.get(name)) {
                (_, None) => return false,
                (Some(w), Some(g)) if g.as_bytes() != w.as_bytes() => return false,
                _ => {}
            }
        }
        for (name, want) in &self.query {
            match (want, query_param(r.query, name)) {
                (_, None) => return false,
                (Some(w), Some(g)) if g != w => return false,
                _ => {}
            }
        }
        if let Some(ts) = &self.tiers {
            if !r.tier.is_some_and(|t| ts.iter().any(|x| &**x == t)) {
                return false;
            }
        }
        if let Some(ts) = &self.tenants {
            if !r.tenant.is_some_and(|t| ts.iter().any(|x| x == t)) {
                return false;
            }
        }
        true
    }
}

#[derive(Debug, Default)]
struct ByteNode {
    /// Sorted by byte.
    children: Vec<(u8, u32)>,
    rules: Vec<usize>,
}

#[derive(Debug, Default)]
struct GlobNode {
    literal: HashMap<String, u32>,
    any: Option<u32>,
    wild: Vec<(Seg, u32)>,
    many: Option<u32>,
    rules: Vec<usize>,
}

/// The rule index. See the module docs.
#[derive(Debug, Default)]
pub struct Index {
    exact: HashMap<String, Vec<usize>>,
    prefix: Vec<ByteNode>,
    glob: Vec<GlobNode>,
    any: Vec<usize>,
}

impl Index {
    pub fn build(rules: &[Arc<Rule>]) -> Index {
        let mut ix = Index { prefix: vec![ByteNode::default()], glob: vec![GlobNode::default()], ..Index::default() };
        for r in rules {
            match &r.when.path {
                None | Some(PathMatch::Any) => ix.any.push(r.index),
                Some(PathMatch::Exact(p)) => ix.exact.entry(p.clone()).or_default().push(r.index),
                Some(PathMatch::Prefix(p)) => {
                    let mut node = 0usize;
                    for b in p.bytes() {
                        node = match ix.prefix[node].children.binary_search_by_key(&b, |c| c.0) {
                            Ok(i) => ix.prefix[node].children[i].1 as usize,
                            Err(i) => {
                                let new = ix.prefix.len() as u32;
                                ix.prefix.push(ByteNode::default());
                                ix.prefix[node].children.insert(i, (b, new));
                                new as usize
                            }
                        };
                    }
                    ix.prefix[node].rules.push(r.index);
                }
                Some(PathMatch::Glob(g)) => {
                    let mut node = 0usize;
                    for seg in &g.segs {
                        let next = match seg {
                            Seg::Literal(l) => ix.glob[node].literal.get(l).copied(),
                            Seg::Any => ix.glob[node].any,
                            Seg::Many => ix.glob[node].many,
                            Seg::Wild(_) => ix.glob[node].wild.iter().find(|(s, _)| s == seg).map(|x| x.1),
                        };
                        node = match next {
                            Some(n) => n as usize,
                            None => {
                                let new = ix.glob.len() as u32;
                                ix.glob.push(GlobNode::default());
                                match seg {
                                    Seg::Literal(l) => {
                                        ix.glob[node].literal.insert(l.clone(), new);
                                    }
                                    Seg::Any => ix.glob[node].any = Some(new),
                                    Seg::Many => ix.glob[node].many = Some(new),
                                    Seg::Wild(_) => ix.glob[node].wild.push((seg.clone(), new)),
                                }
                                new as usize
                            }
                        };
                    }
                    ix.glob[node].rules.push(r.index);
                }
            }
        }
        // Rule lists are built in rule order, so each is already sorted ascending.
        ix
    }

    /// The index of the first matching rule.
    pub fn find(&self, rules: &[Arc<Rule>], req: &RequestView<'_>) -> Option<usize> {
        let mut best = usize::MAX;
        let mut consider = |list: &[usize]| {
            for &i in list {
                if i >= best {
                    break;
                }
                if rules[i].when.matches(req) {
                    best = i;
                    break;
                }
            }
        };
        consider(&self.any);
        if let Some(list) = self.exact.get(req.path) {
            consider(list);
        }
        if self.prefix.len() > 1 {
            let mut node = 0usize;
            for b in req.path.bytes() {
                match self.prefix[node].children.binary_search_by_key(&b, |c| c.0) {
                    Ok(i) => node = self.prefix[node].children[i].1 as usize,
                    Err(_) => break,
                }
                consider(&self.prefix[node].rules);
            }
        }
        if self.glob.len() > 1 {
            let rest = req.path.strip_prefix('/').unwrap_or(req.path);
            self.walk_glob(rest, &mut consider);
        }
        (best != usize::MAX).then_some(best)
    }

    /// Visits every glob node that matches the whole of `rest` (the path without its leading
    /// `/`).
    ///
    /// The glob trie is run as an automaton over the path's segments: the set of nodes reached
    /// so far, plus the set of `**` edges that may still absorb segments, advanced one segment at
    /// a time. Each segment costs at most one visit per node, so the walk is linear in the path's
    /// length whatever the globs look like (trying every split point of every `**` instead
    /// would be quadratic, and a crafted path of a few thousand segments would stall a worker).
    /// Sets of up to 256 nodes live on the stack.
    fn walk_glob(&self, rest: &str, visit: &mut impl FnMut(&[usize])) {
        let words = self.glob.len().div_ceil(64);
        let mut stack = [0u64; 12];
        let mut heap;
        let bufs: &mut [u64] = if words <= 4 {
            &mut stack[..3 * words]
        } else {
            heap = vec![0u64; 3 * words];
            &mut heap
        };
        let (active, tail) = bufs.split_at_mut(words);
        let (stars, next) = tail.split_at_mut(words);
        active[0] = 1;
        self.close(active, stars);
        for seg in rest.split('/') {
            next.fill(0);
            for n in bits(active) {
                let node = &self.glob[n];
                if let Some(&c) = node.literal.get(seg) {
                    set(next, c as usize);
                }
                if let Some(c) = node.any {
                    set(next, c as usize);
                }
                for (w, c) in &node.wild {
                    if seg_matches(w, seg) {
                        set(next, *c as usize);
                    }
                }
            }
            // A `**` reached earlier absorbs this segment too.
            for (n, s) in next.iter_mut().zip(stars.iter()) {
                *n |= *s;
            }
            active.copy_from_slice(next);
            self.close(active, stars);
            if active.iter().all(|w| *w == 0) {
                return;
            }
        }
        for n in bits(active) {
            visit(&self.glob[n].rules);
        }
    }

    /// Adds what `**` reaches without taking a segment. A child always has a larger index than
    /// its parent, so visiting the set bits in increasing order, including bits set on the way,
    /// reaches every chain of `**` in one pass over the active nodes.
    fn close(&self, active: &mut [u64], stars: &mut [u64]) {
        for w in 0..active.len() {
            let mut done = 0u64;
            loop {
                let pending = active[w] & !done;
                if pending == 0 {
                    break;
                }
                let b = pending.trailing_zeros() as usize;
                done |= 1 << b;
                if let Some(m) = self.glob[w * 64 + b].many {
                    set(active, m as usize);
                    set(stars, m as usize);
                }
            }
        }
    }
}

fn set(words: &mut [u64], n: usize) {
    words[n / 64] |= 1 << (n % 64);
}

/// The indices of the set bits, in increasing order.
fn bits(words: &[u64]) -> impl Iterator<Item = usize> + '_ {
    words.iter().enumerate().flat_map(|(w, &word)| {
        let mut rest = word;
        std::iter::from_fn(move || {
            (rest != 0).then(|| {
                let b = rest.trailing_zeros() as usize;
                rest &= rest - 1;
                w * 64 + b
            })
        })
    })
}
