//! The TOML vocabulary every config file shares: values with the place they came from, and
//! deserialization that reports every problem with its file, line and column instead of
//! stopping at the first.

use super::diag::{Diagnostics, SourceFile};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::ops::Range;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

/// A string with the place it came from.
pub type SStr = Spanned<String>;

/// An integer or a string, for values such as sizes that may be written either way.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum IntOrStr {
    Int(i64),
    Str(String),
}

/// A TOML datetime or an RFC 3339 string.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum DateOrStr {
    Date(toml::value::Datetime),
    Str(String),
}

/// Parses a TOML document, reporting every syntax error.
pub fn parse_document<'a>(src: &'a SourceFile, diags: &mut Diagnostics) -> Option<Spanned<DeTable<'a>>> {
    let (root, errors) = DeTable::parse_recoverable(&src.text);
    if !errors.is_empty() {
        for e in errors {
            let span = e.span().unwrap_or(0..0);
            diags.error_at(src, span, format!("TOML syntax: {}", e.message().trim()));
        }
        return None;
    }
    Some(root)
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
                if let Some(v) = de_unit::<T>(src, entry, diags) {
                    out.push((Spanned::new(name.span(), name.get_ref().to_string()), v));
                }
            }
        }
        _ => diags.error_at(src, value.span(), "expected a table of named tables, like `[tiers.free]`"),
    }
    out
}

/// One step of a path into a TOML value.
#[derive(Debug, Clone)]
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

/// Deserializes one value on its own. Unknown keys are reported (all of them, each at its
/// line) and a type error is reported at its span. Returns `None` only when the value could not
/// be read at all.
pub fn de_unit<T: DeserializeOwned>(
    src: &SourceFile,
    value: &Spanned<DeValue<'_>>,
    diags: &mut Diagnostics,
) -> Option<T> {
    let mut unknown: Vec<Vec<Seg>> = Vec::new();
    let de = ValueDeserializer::from(value.clone());
    let result: Result<T, _> = serde_ignored::deserialize(de, |path| {
        let mut segs = Vec::new();
        segments(&path, &mut segs);
        unknown.push(segs);
    });
    for path in unknown {
        let span = locate(value, &path);
        diags.error_at(src, span, format!("unknown key `{}`", dotted(&path)));
    }
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            let span = e.span().unwrap_or_else(|| value.span());
            diags.error_at(src, span, e.message().trim().to_string());
            None
        }
    }
}
