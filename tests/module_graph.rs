//! The crate's modules form a layered graph: each depends only on lower ones. This test reads
//! every file under `src/`, collects the `crate::…` and `super::…` paths it names (doc comments
//! included, since a doc link is a dependency a reader follows), and fails on any cycle, between
//! top-level modules or between any two modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn modules(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            modules(&path, root, out);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let rel = path.strip_prefix(root).expect("under src").with_extension("");
        let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
        if parts.last().is_some_and(|p| p == "mod") {
            parts.pop();
        }
        let name = parts.join("::");
        if name == "main" || name == "lib" {
            continue;
        }
        out.insert(name, std::fs::read_to_string(&path).expect("read file"));
    }
}

/// Every `prefix` path named in `text`: the identifiers after `prefix`, up to two levels.
fn named_paths(text: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().last();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let mut segs = Vec::new();
        let mut s = rest;
        for _ in 0..2 {
            let end = s.find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')).unwrap_or(s.len());
            if end == 0 {
                break;
            }
            segs.push(s[..end].to_string());
            s = &s[end..];
            match s.strip_prefix("::") {
                Some(n) => s = n,
                None => break,
            }
        }
        if !segs.is_empty() {
            out.push(segs);
        }
    }
    out
}

fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Tarjan's strongly connected components; any component of two or more is a cycle.
    struct State<'g> {
        graph: &'g BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on: BTreeSet<&'g str>,
        next: usize,
        found: Vec<Vec<String>>,
    }
    fn visit<'g>(st: &mut State<'g>, v: &'g str) {
        st.index.insert(v, st.next);
        st.low.insert(v, st.next);
        st.next += 1;
        st.stack.push(v);
        st.on.insert(v);
        if let Some(ws) = st.graph.get(v) {
            for w in ws {
                if !st.index.contains_key(w.as_str()) {
                    visit(st, w);
                    let lw = st.low[w.as_str()];
                    let lv = st.low[v];
                    st.low.insert(v, lv.min(lw));
                } else if st.on.contains(w.as_str()) {
                    let iw = st.index[w.as_str()];
                    let lv = st.low[v];
                    st.low.insert(v, lv.min(iw));
                }
            }
        }
        if st.low[v] == st.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = st.stack.pop() {
                st.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                st.found.push(comp);
            }
        }
    }
    let mut st = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !st.index.contains_key(v.as_str()) {
            visit(&mut st, v);
        }
    }
    st.found
}

#[test]
fn no_module_imports_another_that_imports_it_back() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut mods = BTreeMap::new();
    modules(&root, &root, &mut mods);
    assert!(mods.contains_key("pipeline::canonical"), "the canonical request view has its own module");

    let mut graph: BTreeMap<String, BTreeSet<String>> = mods.keys().map(|m| (m.clone(), BTreeSet::new())).collect();
    for (m, text) in &mods {
        let mut deps = BTreeSet::new();
        for segs in named_paths(text, "crate::") {
            let two = segs.join("::");
            if mods.contains_key(&two) {
                deps.insert(two);
            } else if mods.contains_key(&segs[0]) {
                deps.insert(segs[0].clone());
            }
        }
        let parent = m.rsplit_once("::").map(|(p, _)| p.to_string());
        for segs in named_paths(text, "super::") {
            let cand = match &parent {
                Some(p) => format!("{p}::{}", segs[0]),
                None => segs[0].clone(),
            };
            if mods.contains_key(&cand) {
                deps.insert(cand);
            }
        }
        deps.remove(m);
        graph.insert(m.clone(), deps);
    }
    let module_cycles = cycles(&graph);
    assert!(module_cycles.is_empty(), "modules that import each other: {module_cycles:?}");

    let top = |m: &str| m.split("::").next().unwrap_or(m).to_string();
    let mut tops: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, deps) in &graph {
        let entry = tops.entry(top(m)).or_default();
        for d in deps {
            if top(d) != top(m) {
                entry.insert(top(d));
            }
        }
    }
    let top_cycles = cycles(&tops);
    assert!(top_cycles.is_empty(), "top-level modules that import each other: {top_cycles:?}");
}
