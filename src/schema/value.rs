//! The TOML vocabulary every config file shares: values with the place they came from, and
//! deserialization that reports every problem with its file, line and column instead of
//! stopping at the first.
//!
//! Two rules shape the reports. A TOML syntax error is reported once, at its place, and the
//! file is not read further: what a parser finds after a syntax error is mostly the same mistake
//! seen again. A value of the wrong type is reported at the value, and the rest of its table is
//! still read and checked, so one pass over a file shows every mistake in it.

use super::diag::{Diagnostics, SourceFile};
use super::words;
use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde::Deserialize;
use std::fmt;
use std::ops::Range;
use toml::de::{DeArray, DeString, DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

/// A string with the place it came from.
pub type SStr = Spanned<String>;

/// A size, written as a number of bytes (`65536`) or as a string with a unit (`"64KiB"`).
#[derive(Debug, Clone)]
pub enum IntOrStr {
    Int(i64),
    Str(String),
}

impl<'de> Deserialize<'de> for IntOrStr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = IntOrStr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(words::SIZE)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IntOrStr, E> {
                Ok(IntOrStr::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IntOrStr, E> {
                i64::try_from(v).map(IntOrStr::Int).map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IntOrStr, E> {
                Ok(IntOrStr::Str(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A TOML datetime or an RFC 3339 string.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum DateOrStr {
    Date(toml::value::Datetime),
    Str(String),
}

/// Parses a TOML document. A syntax error is reported once, at its place, and `None` returned.
pub fn parse_document<'a>(src: &'a SourceFile, diags: &mut Diagnostics) -> Option<Spanned<DeTable<'a>>> {
    let (root, errors) = DeTable::parse_recoverable(&src.text);
    // The parser recovers and reads on, but after a mistake it mostly finds the same mistake
    // again (one missing `]` makes every later line a bad list element). Only the first is
    // worth reading; the file's other problems are reported once it parses.
    let Some(first) = errors.iter().min_by_key(|e| e.span().map_or(usize::MAX, |s| s.start)) else {
        return Some(root);
    };
    let (span, message) = syntax_error(src, root.get_ref(), &errors, first);
    diags.error_at(src, span, message);
    None
}

/// The place and message of the first syntax error, with what the parser's words leave out.
fn syntax_error(
    src: &SourceFile,
    root: &DeTable<'_>,
    errors: &[toml::de::Error],
    first: &toml::de::Error,
) -> (Range<usize>, String) {
    let span = first.span().unwrap_or(0..0);
    let message = first.message().trim();
    if message == "duplicate key" {
        return (span.clone(), duplicate(src, span));
    }
    if let Some((open, is_list)) = unclosed(src, root, errors, span.start) {
        let (close, what) = if is_list { ("]", "list") } else { ("}", "inline table") };
        let (open_line, _) = src.line_col(open);
        let (line, _) = src.line_col(span.start);
        let text = line_text(src, span.start).trim();
        let place = if line > open_line && !text.is_empty() {
            format!("before line {line} (`{}`), which is not part of it", shorten(text))
        } else {
            format!("at the end of the {what}")
        };
        let message = format!("TOML syntax: the {what} that starts here has no closing `{close}`; add it {place}");
        return (open..open + 1, message);
    }
    if let Some((open, quote)) = unclosed_string(src, root, message, span.start) {
        let rule = if quote.len() == 1 {
            format!(" (a string in `{quote}` ends on the line it starts on; use `{quote}{quote}{quote}` for text over several lines)")
        } else {
            String::new()
        };
        let message = format!("TOML syntax: the string that starts here has no closing `{quote}`; add it{rule}");
        return (open..open + 1, message);
    }
    (span, format!("TOML syntax: {message}"))
}

/// The list or inline table that is still open at the first error, when the parser also found
/// one never closed: a missing `]` or `}`. Returns its opening offset and whether it is a list.
fn unclosed(src: &SourceFile, root: &DeTable<'_>, errors: &[toml::de::Error], first: usize) -> Option<(usize, bool)> {
    let ends: Vec<(usize, bool)> = errors
        .iter()
        .filter_map(|e| {
            let is_list = if e.message().starts_with("unclosed array") {
                true
            } else if e.message().starts_with("unclosed inline table") {
                false
            } else {
                return None;
            };
            Some((e.span()?.start, is_list))
        })
        .collect();
    if ends.is_empty() {
        return None;
    }
    let text = &*src.text;
    let mut best: Option<(usize, bool)> = None;
    let mut visit = |v: &Spanned<DeValue<'_>>| {
        let start = v.span().start;
        let is_list = match (v.get_ref(), text.as_bytes().get(start)) {
            (DeValue::Array(_), Some(b'[')) => true,
            (DeValue::Table(_), Some(b'{')) => false,
            _ => return,
        };
        // Opened before the first error and still open where the parser gave up on it. The
        // innermost such one is meant: the one that starts last.
        let open = ends.iter().any(|&(end, l)| l == is_list && end >= first && !closed_before(text, start, end));
        if start < first && open && best.is_none_or(|(b, _)| start > b) {
            best = Some((start, is_list));
        }
    };
    for (_, v) in root.iter() {
        walk(v, &mut visit);
    }
    best
}

/// Whether the bracket at `open` is matched before `limit`, skipping strings and comments.
fn closed_before(text: &str, open: usize, limit: usize) -> bool {
    let b = text.as_bytes();
    let limit = limit.min(b.len());
    let mut depth = 0usize;
    let mut i = open;
    while i < limit {
        match b[i] {
            b'[' | b'{' => depth += 1,
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return true;
                }
            }
            b'#' => {
                while i < limit && b[i] != b'\n' {
                    i += 1;
                }
            }
            q @ (b'"' | b'\'') => {
                let triple = b.get(i..i + 3) == Some(&[q, q, q][..]);
                i += if triple { 3 } else { 1 };
                while i < limit {
                    if q == b'"' && b[i] == b'\\' {
                        i += 2;
                        continue;
                    }
                    if triple && b.get(i..i + 3) == Some(&[q, q, q][..]) {
                        i += 2;
                        break;
                    }
                    if !triple && (b[i] == q || b[i] == b'\n') {
                        break;
                    }
                    i += 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    false
}

/// The string that the first error ends, when that error is a missing closing quote: its
/// opening offset and its quote.
fn unclosed_string(src: &SourceFile, root: &DeTable<'_>, message: &str, first: usize) -> Option<(usize, &'static str)> {
    let kinds = [
        "invalid basic string",
        "invalid literal string",
        "invalid multi-line basic string",
        "invalid multi-line literal string",
    ];
    if !kinds.iter().any(|k| message.starts_with(k)) {
        return None;
    }
    let text = &*src.text;
    let mut found = None;
    let mut visit = |v: &Spanned<DeValue<'_>>| {
        if matches!(v.get_ref(), DeValue::String(_)) && v.span().end == first && v.span().start < first {
            found = Some(v.span().start);
        }
    };
    for (_, v) in root.iter() {
        walk(v, &mut visit);
    }
    let open = found?;
    let rest = &text[open..];
    let quote = ["\"\"\"", "\'\'\'", "\"", "\'"].into_iter().find(|q| rest.starts_with(q))?;
    Some((open, quote))
}

/// Calls `f` on `v` and every value inside it.
fn walk<'i>(v: &Spanned<DeValue<'i>>, f: &mut impl FnMut(&Spanned<DeValue<'i>>)) {
    f(v);
    match v.get_ref() {
        DeValue::Table(t) => t.iter().for_each(|(_, c)| walk(c, f)),
        DeValue::Array(a) => a.iter().for_each(|c| walk(c, f)),
        _ => {}
    }
}

/// The text of the line that holds `offset`, and where that line starts.
fn line_bounds(src: &SourceFile, offset: usize) -> Range<usize> {
    let text = &*src.text;
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    start..end
}

fn line_text(src: &SourceFile, offset: usize) -> &str {
    &src.text[line_bounds(src, offset)]
}

fn shorten(s: &str) -> String {
    const MAX: usize = 40;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(MAX - 1).collect::<String>())
    }
}

/// The message for a table or key defined twice, naming it and where it was first defined.
///
/// The parser's own error names neither. The first definition is found by reading the file up
/// to the line of the second one, which holds no error (the second one is the first error).
fn duplicate(src: &SourceFile, span: Range<usize>) -> String {
    let text = &*src.text;
    let line = line_bounds(src, span.start);
    let raw_key = text.get(span.clone()).unwrap_or("").to_string();
    let (before, _) = DeTable::parse_recoverable(&text[..line.start]);
    let before = before.into_inner();
    let header = text[line.clone()].trim_start();
    let is_header = header.starts_with('[');
    let path: Option<Vec<Seg>> = if is_header {
        key_chain(header).map(|keys| keys.into_iter().map(Seg::Key).collect())
    } else {
        // The key as written on its line, read as a one-line document to get its parts right.
        key_chain(&format!("{} = 0", &text[line.start..span.end.min(line.end)])).map(|keys| {
            let mut path = current_table(&before, text);
            path.extend(keys.into_iter().map(Seg::Key));
            path
        })
    };
    let Some(path) = path else {
        return format!("`{raw_key}` is defined twice in the same table; keep only one of the two");
    };
    let keys: Vec<&str> =
        path.iter().filter_map(|p| if let Seg::Key(k) = p { Some(k.as_str()) } else { None }).collect();
    let shown = keys.iter().map(|k| toml_key(k)).collect::<Vec<_>>().join(".");
    let Some((first, existing)) = lookup(&before, &path) else {
        return format!("`{shown}` is defined twice; keep only one of the two");
    };
    let (first_line, _) = src.line_col(first.start);
    let at = format!("{}:{first_line}", src.path.display());
    if !is_header {
        let key = keys.last().map(|k| toml_key(k)).unwrap_or_default();
        return format!("`{key}` is already set in this table, at {at}; keep only one of the two");
    }
    let first_is_list = line_text(src, first.start).trim_start().starts_with("[[");
    match (header.starts_with("[["), existing) {
        (false, DeValue::Array(_)) if first_is_list => format!(
            "`{shown}` is already a list of tables (`[[{shown}]]` at {at}); write this header as `[[{shown}]]` to add an entry to it"
        ),
        (false, DeValue::Table(_)) => format!(
            "table `[{shown}]` is already defined at {at}; a table is written once, so move these keys under that header"
        ),
        (true, _) => format!(
            "`{shown}` is already defined at {at}, and not as a list of tables; rename one of the two"
        ),
        (false, _) => format!("`{shown}` is already set to a value at {at}; rename one of the two"),
    }
}

/// The keys of the first (and only) chain of tables in a one-line document: `[a.b]` and
/// `a.b = 0` both give `["a", "b"]`. This reads quoted keys the way TOML does.
fn key_chain(line: &str) -> Option<Vec<String>> {
    let doc = DeTable::parse(line).ok()?.into_inner();
    let mut out = Vec::new();
    let mut table = &doc;
    loop {
        let mut entries = table.iter();
        let (key, value) = entries.next()?;
        out.push(key.get_ref().to_string());
        match value.get_ref() {
            DeValue::Table(t) if !t.is_empty() => table = t,
            _ => return Some(out),
        }
    }
}

/// The path of the table the last header of `root` opened (empty: the top level).
fn current_table(root: &DeTable<'_>, text: &str) -> Vec<Seg> {
    fn visit(t: &DeTable<'_>, text: &str, path: &mut Vec<Seg>, best: &mut (usize, Vec<Seg>)) {
        for (k, v) in t.iter() {
            path.push(Seg::Key(k.get_ref().to_string()));
            visit_value(v, text, path, best);
            path.pop();
        }
    }
    fn visit_value(v: &Spanned<DeValue<'_>>, text: &str, path: &mut Vec<Seg>, best: &mut (usize, Vec<Seg>)) {
        match v.get_ref() {
            DeValue::Table(t) => {
                // A table opened by a header carries the header's span, which starts with `[`.
                let start = v.span().start;
                if text.as_bytes().get(start) == Some(&b'[') && (best.1.is_empty() || start > best.0) {
                    *best = (start, path.clone());
                }
                visit(t, text, path, best);
            }
            DeValue::Array(a) => {
                for (i, c) in a.iter().enumerate() {
                    path.push(Seg::Index(i));
                    visit_value(c, text, path, best);
                    path.pop();
                }
            }
            _ => {}
        }
    }
    let mut best = (0, Vec::new());
    visit(root, text, &mut Vec::new(), &mut best);
    best.1
}

/// The key span and value at `path`. Inside a list of tables without an index, the last entry
/// is meant, as in a TOML header.
fn lookup<'a, 'i>(root: &'a DeTable<'i>, path: &[Seg]) -> Option<(Range<usize>, &'a DeValue<'i>)> {
    let mut table = root;
    let mut found: Option<(Range<usize>, &'a DeValue<'i>)> = None;
    let mut parts = path.iter().peekable();
    while let Some(part) = parts.next() {
        let Seg::Key(k) = part else { return None };
        let (key, value) = table.get_key_value(k.as_str())?;
        found = Some((key.span(), value.get_ref()));
        if parts.peek().is_none() {
            break;
        }
        let mut value = value.get_ref();
        if let DeValue::Array(a) = value {
            let item = match parts.peek() {
                Some(Seg::Index(i)) => {
                    let i = *i;
                    parts.next();
                    a.get(i)
                }
                _ => a.last(),
            };
            value = item?.get_ref();
        }
        match value {
            DeValue::Table(t) => table = t,
            _ => return None,
        }
    }
    found
}

/// A key as written in TOML: bare when it can be, quoted otherwise.
fn toml_key(k: &str) -> String {
    if !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        k.to_string()
    } else {
        format!("{k:?}")
    }
}

/// Deserializes a `[section.NAME]` table of tables, one entry at a time.
pub fn de_named_tables<T: DeserializeOwned>(
    src: &SourceFile,
    value: &Spanned<DeValue<'_>>,
    diags: &mut Diagnostics,
) -> Vec<(SStr, T)> {
    let mut out = Vec::new();
    match value.get_ref() {
        DeValue::Table(table) => {
            for (name, entry) in table.iter() {
                if let Some(v) = de_unit::<T>(src, name, entry, diags) {
                    out.push((Spanned::new(name.span(), name.get_ref().to_string()), v));
                }
            }
        }
        _ => diags.error_at(src, value.span(), "expected a table of named tables, like `[tiers.free]`"),
    }
    out
}

/// One step of a path into a TOML value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Seg {
    Key(String),
    Index(usize),
}

fn segments(path: &serde_ignored::Path<'_>, out: &mut Vec<Seg>) {
    use serde_ignored::Path;
    match path {
        Path::Root => {}
        Path::Seq { parent, index } => {
            segments(parent, out);
            out.push(Seg::Index(*index));
        }
        Path::Map { parent, key } => {
            segments(parent, out);
            // `Spanned<T>` travels through a private map; its keys are not the user's.
            if !key.starts_with("$__serde_spanned") && !key.starts_with("$__toml") {
                out.push(Seg::Key(key.clone()));
            }
        }
        Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => {
            segments(parent, out)
        }
    }
}

/// Finds the span of the key at the end of `path`, falling back to the enclosing value.
fn locate(value: &Spanned<DeValue<'_>>, path: &[Seg]) -> Range<usize> {
    let mut cur = value;
    let mut span = value.span();
    for seg in path {
        match (seg, cur.get_ref()) {
            (Seg::Key(k), DeValue::Table(t)) => {
                let found = t.iter().find(|(key, _)| key.get_ref().as_ref() == k.as_str());
                match found {
                    Some((key, v)) => {
                        span = key.span();
                        cur = v;
                    }
                    None => return span,
                }
            }
            (Seg::Index(i), DeValue::Array(a)) => match a.get(*i) {
                Some(v) => {
                    span = v.span();
                    cur = v;
                }
                None => return span,
            },
            _ => return span,
        }
    }
    span
}

fn dotted(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// The value at `path`, if there is one.
fn node_at<'a, 'i>(value: &'a Spanned<DeValue<'i>>, path: &[Seg]) -> Option<&'a Spanned<DeValue<'i>>> {
    let mut cur = value;
    for seg in path {
        cur = match (seg, cur.get_ref()) {
            (Seg::Key(k), DeValue::Table(t)) => t.get(k.as_str())?,
            (Seg::Index(i), DeValue::Array(a)) => a.get(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// Every leaf of a value: scalars, and empty lists and tables.
fn leaves(value: &Spanned<DeValue<'_>>, path: &mut Vec<Seg>, out: &mut Vec<Vec<Seg>>) {
    match value.get_ref() {
        DeValue::Table(t) if !t.is_empty() => {
            for (k, v) in t.iter() {
                path.push(Seg::Key(k.get_ref().to_string()));
                leaves(v, path, out);
                path.pop();
            }
        }
        DeValue::Array(a) if !a.is_empty() => {
            for (i, v) in a.iter().enumerate() {
                path.push(Seg::Index(i));
                leaves(v, path, out);
                path.pop();
            }
        }
        _ => out.push(path.clone()),
    }
}

/// A copy of `value` that holds only what lies on `path`. Spans are kept, so an error found in
/// the copy points at the original.
fn prune<'i>(value: &Spanned<DeValue<'i>>, path: &[Seg]) -> Spanned<DeValue<'i>> {
    match (path.split_first(), value.get_ref()) {
        (Some((Seg::Key(k), rest)), DeValue::Table(t)) => {
            let mut out = DeTable::new();
            if let Some((key, child)) = t.get_key_value(k.as_str()) {
                out.insert(key.clone(), prune(child, rest));
            }
            Spanned::new(value.span(), DeValue::Table(out))
        }
        (Some((Seg::Index(i), rest)), DeValue::Array(a)) => {
            let mut out = DeArray::new();
            if let Some(child) = a.get(*i) {
                out.push(prune(child, rest));
            }
            Spanned::new(value.span(), DeValue::Array(out))
        }
        _ => value.clone(),
    }
}

/// Removes what lies at `path`. A list or table that this leaves empty is removed too, so a
/// field whose every entry was wrong reads as unset rather than as empty. Returns whether
/// `value` itself is now empty for that reason.
fn remove(value: &mut Spanned<DeValue<'_>>, path: &[Seg]) -> bool {
    let Some((first, rest)) = path.split_first() else { return false };
    match (first, value.get_mut()) {
        (Seg::Key(k), DeValue::Table(t)) => {
            let gone = rest.is_empty() || t.get_mut(k.as_str()).is_some_and(|c| remove(c, rest));
            if gone {
                t.remove(k.as_str());
                return t.is_empty();
            }
            false
        }
        (Seg::Index(i), DeValue::Array(a)) => {
            let gone = rest.is_empty() || a.get_mut(*i).is_some_and(|c| remove(c, rest));
            if gone {
                let mut kept = DeArray::new();
                for (j, c) in a.iter().enumerate() {
                    if j != *i {
                        kept.push(c.clone());
                    }
                }
                *a = kept;
                return a.is_empty();
            }
            false
        }
        _ => false,
    }
}

/// The deepest part of `path` whose value has exactly `span`: where an error really is. A list
/// that should have been a number fails at the list, not at its first entry.
fn narrowest(value: &Spanned<DeValue<'_>>, path: &[Seg], span: &Range<usize>) -> Option<Vec<Seg>> {
    (0..=path.len())
        .rev()
        .find(|&n| node_at(value, &path[..n]).is_some_and(|v| v.span() == *span))
        .map(|n| path[..n].to_vec())
}

/// Finds the value with exactly `span` anywhere in `value`, with its path.
fn find_span(value: &Spanned<DeValue<'_>>, span: &Range<usize>, path: &mut Vec<Seg>) -> Option<Vec<Seg>> {
    if value.span() == *span {
        return Some(path.clone());
    }
    let found = match value.get_ref() {
        DeValue::Table(t) => t.iter().find_map(|(k, v)| {
            path.push(Seg::Key(k.get_ref().to_string()));
            let r = find_span(v, span, path);
            path.pop();
            r
        }),
        DeValue::Array(a) => a.iter().enumerate().find_map(|(i, v)| {
            path.push(Seg::Index(i));
            let r = find_span(v, span, path);
            path.pop();
            r
        }),
        _ => None,
    };
    found
}

/// How a message names the value at `path` under `name`: "`threads`", "`tls.listen`",
/// "entry 2 of `listen`". Keys above the last list index are left out: the line number says
/// which entry, and "`hash`" reads better than a full path.
fn label(name: &str, path: &[Seg]) -> String {
    match path.last() {
        None => format!("`{name}`"),
        Some(Seg::Index(i)) => format!("entry {} of {}", i + 1, label(name, &path[..path.len() - 1])),
        Some(Seg::Key(_)) => {
            let from = path.iter().rposition(|s| matches!(s, Seg::Index(_))).map_or(0, |i| i + 1);
            let keys: Vec<&str> =
                path[from..].iter().filter_map(|s| if let Seg::Key(k) = s { Some(k.as_str()) } else { None }).collect();
            format!("`{}`", keys.join("."))
        }
    }
}

/// Deserializes `value` and lists the keys that `T` does not know.
fn attempt<T: DeserializeOwned>(value: &Spanned<DeValue<'_>>) -> (Result<T, toml::de::Error>, Vec<Vec<Seg>>) {
    let mut unknown: Vec<Vec<Seg>> = Vec::new();
    let de = ValueDeserializer::from(value.clone());
    let result: Result<T, _> = serde_ignored::deserialize(de, |path| {
        let mut segs = Vec::new();
        segments(&path, &mut segs);
        unknown.push(segs);
    });
    (result, unknown)
}

fn report_unknown(src: &SourceFile, value: &Spanned<DeValue<'_>>, unknown: Vec<Vec<Seg>>, diags: &mut Diagnostics) {
    for path in unknown {
        let span = locate(value, &path);
        diags.error_at(src, span, format!("unknown key `{}`", dotted(&path)));
    }
}

/// Deserializes the value written under `key` (a top-level table, or an entry of a table of
/// named tables) on its own. See [`de_value`].
pub fn de_unit<T: DeserializeOwned>(
    src: &SourceFile,
    key: &Spanned<DeString<'_>>,
    value: &Spanned<DeValue<'_>>,
    diags: &mut Diagnostics,
) -> Option<T> {
    de_value(src, key.get_ref(), Some(key.span()), value, diags)
}

/// Deserializes one entry of the list of tables `name` (`[[tenants]]`, `[[rule]]`) on its own.
/// See [`de_value`].
pub fn de_item<T: DeserializeOwned>(
    src: &SourceFile,
    name: &str,
    value: &Spanned<DeValue<'_>>,
    diags: &mut Diagnostics,
) -> Option<T> {
    de_value(src, name, None, value, diags)
}

/// Deserializes one value, reporting every unknown key and every value of the wrong type, each
/// at its own line.
///
/// serde stops at the first value of the wrong type, which would hide the rest of the table.
/// So when the whole value fails, each leaf is tried on its own (in a copy that holds nothing
/// else) to find every wrong one; those are reported, marked in `diags` (so that "missing"
/// checks stay quiet about them) and left out, and the rest is deserialized and returned for
/// validation. Returns `None` only when nothing usable is left.
fn de_value<T: DeserializeOwned>(
    src: &SourceFile,
    name: &str,
    key_span: Option<Range<usize>>,
    value: &Spanned<DeValue<'_>>,
    diags: &mut Diagnostics,
) -> Option<T> {
    let (result, unknown) = attempt::<T>(value);
    if let Ok(v) = result {
        report_unknown(src, value, unknown, diags);
        return Some(v);
    }

    let mut all = Vec::new();
    leaves(value, &mut Vec::new(), &mut all);
    let mut bad: Vec<(Vec<Seg>, toml::de::Error)> = Vec::new();
    for leaf in all {
        let Err(e) = T::deserialize(ValueDeserializer::from(prune(value, &leaf))) else { continue };
        // The copy lacks the leaf's siblings; a field it requires is not missing in the file.
        if e.message().starts_with("missing field") {
            continue;
        }
        let at = e.span().and_then(|s| narrowest(value, &leaf, &s)).unwrap_or(leaf);
        if !bad.iter().any(|(p, _)| *p == at) {
            bad.push((at, e));
        }
    }
    for (path, e) in &bad {
        let node = node_at(value, path);
        let span = e.span().or_else(|| node.map(|n| n.span())).unwrap_or_else(|| value.span());
        let raw = node.and_then(|n| src.text.get(n.span())).unwrap_or("");
        diags.error_at(src, span, words::explain(e.message(), &label(name, path), node.map(|n| n.get_ref()), raw));
        if let Some(j) = path.iter().rposition(|s| matches!(s, Seg::Key(_))) {
            if let (Seg::Key(key), Some(table)) = (&path[j], node_at(value, &path[..j])) {
                diags.mark_invalid(src, table.span(), key);
                if let (0, Some(ks)) = (j, &key_span) {
                    diags.mark_invalid(src, ks.clone(), key);
                }
            }
        }
    }
    if bad.iter().any(|(p, _)| p.is_empty()) {
        return None;
    }

    let mut cleaned = value.clone();
    let mut paths: Vec<&Vec<Seg>> = bad.iter().map(|(p, _)| p).collect();
    // Last first, so that removing an entry of a list does not move the ones still to remove.
    paths.sort();
    for p in paths.into_iter().rev() {
        remove(&mut cleaned, p);
    }
    let (result, unknown) = attempt::<T>(&cleaned);
    report_unknown(src, &cleaned, unknown, diags);
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            // Something no single value explains, such as a required key that is missing.
            let span = e.span().unwrap_or_else(|| value.span());
            let path = find_span(&cleaned, &span, &mut Vec::new());
            let node = path.as_ref().and_then(|p| node_at(&cleaned, p));
            let raw = src.text.get(span.clone()).unwrap_or("");
            let label = label(name, path.as_deref().unwrap_or(&[]));
            diags.error_at(src, span, words::explain(e.message(), &label, node.map(|n| n.get_ref()), raw));
            None
        }
    }
}
