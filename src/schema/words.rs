//! What a config value should be, in the words of the people who write configs.
//!
//! serde describes a mismatch in Rust terms (``invalid type: integer `10`, expected i64``).
//! [`explain`] turns that into a sentence that names the key, says what is expected ("a whole
//! number", "a duration such as \"10s\"", "a list of strings") and what was written instead, and
//! adds how to fix it when that is clear (remove the quotes, add a unit).
//!
//! Most expectations follow from a field's Rust type. A few do not: to serde a duration is just a
//! string. Those fields name their kind with the helpers here, for example
//! `#[serde(default, deserialize_with = "words::duration")]`, so the words travel with the field.

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use std::fmt;
use std::marker::PhantomData;
use toml::de::DeValue;
use toml::Spanned;

/// A string with the place it came from (the file layer's `SStr`, named here without depending
/// on the module that uses these helpers).
type SStr = Spanned<String>;

/// A duration, written as a string with a unit.
pub const DURATION: &str = "a duration such as \"10s\"";
/// A size, written as a number of bytes or a string with a unit.
pub const SIZE: &str = "a size such as \"64KiB\", or a number of bytes";
/// A list of strings.
pub const STRINGS: &str = "a list of strings";
/// A list of whole numbers.
pub const NUMBERS: &str = "a list of whole numbers";
/// One string, or a list of them (`url`).
pub const STRING_OR_STRINGS: &str = "a string or a list of strings";
/// A point in time with an offset.
pub const TIME: &str = "a time such as 2027-01-31T00:00:00Z";
/// A header or query condition of a rule.
pub const PRESENCE: &str = "`true` (present) or a string (equal to it)";

/// What a kind of value is called, for a visitor's `expecting`.
trait Words {
    const WORDS: &'static str;
}

struct DurationWords;
impl Words for DurationWords {
    const WORDS: &'static str = DURATION;
}

struct StringsWords;
impl Words for StringsWords {
    const WORDS: &'static str = STRINGS;
}

struct NumbersWords;
impl Words for NumbersWords {
    const WORDS: &'static str = NUMBERS;
}

/// A string whose mismatch message names what the string stands for.
struct Text<W>(String, PhantomData<W>);

impl<'de, W: Words> Deserialize<'de> for Text<W> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<W>(PhantomData<W>);
        impl<W: Words> Visitor<'_> for V<W> {
            type Value = Text<W>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(W::WORDS)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<W>, E> {
                Ok(Text(v.to_string(), PhantomData))
            }
        }
        d.deserialize_string(V(PhantomData))
    }
}

/// A list whose mismatch message says what the list holds. An element of the wrong type is
/// reported by the element's own type, at the element.
struct List<T, W>(Vec<T>, PhantomData<W>);

impl<'de, T: Deserialize<'de>, W: Words> Deserialize<'de> for List<T, W> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T, W>(PhantomData<(T, W)>);
        impl<'de, T: Deserialize<'de>, W: Words> Visitor<'de> for V<T, W> {
            type Value = List<T, W>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(W::WORDS)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<List<T, W>, A::Error> {
                let mut out = Vec::new();
                while let Some(item) = seq.next_element()? {
                    out.push(item);
                }
                Ok(List(out, PhantomData))
            }
        }
        d.deserialize_seq(V(PhantomData))
    }
}

/// A list of strings that says so when it is something else, for a whole table entry such as
/// `include` (fields use [`strings`] and [`string_list`]).
#[derive(Debug, Default)]
pub struct Strings(pub Vec<SStr>);

impl<'de> Deserialize<'de> for Strings {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        List::<SStr, StringsWords>::deserialize(d).map(|l| Strings(l.0))
    }
}

/// For an optional duration field: `#[serde(default, deserialize_with = "words::duration")]`.
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SStr>, D::Error> {
    let text = Spanned::<Text<DurationWords>>::deserialize(d)?;
    let span = text.span();
    Ok(Some(Spanned::new(span, text.into_inner().0)))
}

/// For an optional list of strings: `#[serde(default, deserialize_with = "words::strings")]`.
pub fn strings<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<SStr>>, D::Error> {
    string_list(d).map(Some)
}

/// For a list of strings that defaults to empty:
/// `#[serde(default, deserialize_with = "words::string_list")]`.
pub fn string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SStr>, D::Error> {
    Strings::deserialize(d).map(|s| s.0)
}

/// For a field that takes one string or a list of them, such as `[store] url`:
/// `#[serde(default, deserialize_with = "words::string_or_strings")]`. One string becomes a
/// list of one, with the string's place; the list keeps the place of the whole value.
pub fn string_or_strings<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Spanned<Vec<SStr>>>, D::Error> {
    enum OneOrMany {
        One(String),
        Many(Vec<SStr>),
    }
    impl<'de> Deserialize<'de> for OneOrMany {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = OneOrMany;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str(STRING_OR_STRINGS)
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                    Ok(OneOrMany::One(v.to_string()))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                    let mut out = Vec::new();
                    while let Some(item) = seq.next_element()? {
                        out.push(item);
                    }
                    Ok(OneOrMany::Many(out))
                }
            }
            d.deserialize_any(V)
        }
    }
    let v = Spanned::<OneOrMany>::deserialize(d)?;
    let span = v.span();
    let list = match v.into_inner() {
        OneOrMany::One(s) => vec![Spanned::new(span.clone(), s)],
        OneOrMany::Many(list) => list,
    };
    Ok(Some(Spanned::new(span, list)))
}

/// For an optional list of whole numbers: `#[serde(default, deserialize_with = "words::numbers")]`.
pub fn numbers<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Spanned<i64>>>, D::Error> {
    List::<Spanned<i64>, NumbersWords>::deserialize(d).map(|l| Some(l.0))
}

/// The expected kind, as far as a hint needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    WholeNumber,
    Number,
    Bool,
    Str,
    Duration,
    List,
    Table,
    Other,
}

/// The user's words for what serde expected.
fn expected(rust: &str) -> (&str, Kind) {
    match rust {
        "a string" | "a borrowed string" | "a character" => ("a string", Kind::Str),
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" | "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => {
            ("a whole number", Kind::WholeNumber)
        }
        "f32" | "f64" => ("a number", Kind::Number),
        "a boolean" => ("true or false", Kind::Bool),
        // A list of tables, such as `keys`: brackets around the value would not fix it.
        "a sequence" => ("a list", Kind::Other),
        "a map" => ("a table", Kind::Table),
        s if s.starts_with("struct ") => ("a table", Kind::Table),
        DURATION => (DURATION, Kind::Duration),
        STRINGS | NUMBERS => (rust, Kind::List),
        other => (other, Kind::Other),
    }
}

/// The user's words for an untagged enum of the file layer, which serde names by its Rust name.
fn untagged(name: &str) -> &'static str {
    match name.trim() {
        "DateOrStr" => TIME,
        _ => "one of the forms this key accepts",
    }
}

/// What was written, in words: "the number 10", "the string \"2\"", "a list".
fn found(value: &DeValue<'_>, raw: &str) -> String {
    match value {
        DeValue::String(s) => format!("the string {}", shorten(&format!("{s:?}"))),
        DeValue::Integer(_) | DeValue::Float(_) => format!("the number {}", shorten(raw)),
        DeValue::Boolean(b) => format!("`{b}`"),
        DeValue::Datetime(d) => format!("the time {d}"),
        DeValue::Array(_) => "a list".to_string(),
        DeValue::Table(_) => "a table".to_string(),
    }
}

fn shorten(s: &str) -> String {
    const MAX: usize = 40;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(MAX - 1).collect::<String>())
    }
}

/// How to fix the value, when that is clear from what was written and what is expected.
fn hint(kind: Kind, value: &DeValue<'_>, raw: &str) -> Option<String> {
    let hint = match (kind, value) {
        (Kind::WholeNumber, DeValue::String(s)) if s.trim().parse::<i64>().is_ok() => "remove the quotes".to_string(),
        (Kind::Number, DeValue::String(s)) if s.trim().parse::<f64>().is_ok() => "remove the quotes".to_string(),
        (Kind::Bool, DeValue::String(s)) if matches!(s.trim(), "true" | "false") => "remove the quotes".to_string(),
        (Kind::WholeNumber, DeValue::Float(_)) => "write it without a fraction".to_string(),
        // An integer that is still refused as a whole number is out of range.
        (Kind::WholeNumber, DeValue::Integer(_)) => "it is too large".to_string(),
        (Kind::Duration, DeValue::Integer(_)) => format!("write it in quotes with a unit, like \"{raw}s\""),
        (Kind::Duration, _) => "write it in quotes with a unit, like \"10s\" or \"250ms\"".to_string(),
        (Kind::Str, DeValue::Integer(_) | DeValue::Float(_) | DeValue::Boolean(_)) => {
            format!("put it in quotes: \"{}\"", shorten(raw))
        }
        (Kind::List, DeValue::String(_) | DeValue::Integer(_) | DeValue::Float(_) | DeValue::Boolean(_)) => {
            format!("write it in brackets: [{}]", shorten(raw))
        }
        _ => return None,
    };
    Some(hint)
}

/// Rewrites a deserialization error about `label` (like "`threads`" or "entry 2 of `listen`")
/// in the user's words. `value` is what stands at the error's place and `raw` its source text,
/// when known.
pub fn explain(message: &str, label: &str, value: Option<&DeValue<'_>>, raw: &str) -> String {
    let message = message.trim();
    let (words, kind) = if let Some(rest) =
        message.strip_prefix("invalid type: ").or_else(|| message.strip_prefix("invalid value: "))
    {
        match rest.rsplit_once(", expected ") {
            Some((_, rust)) => expected(rust),
            None => return message.to_string(),
        }
    } else if let Some(name) = message.strip_prefix("data did not match any variant of untagged enum ") {
        (untagged(name), Kind::Other)
    } else if let Some(field) = message.strip_prefix("missing field ") {
        return format!("{label} needs {field}; add it");
    } else {
        return message.to_string();
    };
    let mut out = format!("{label} must be {words}");
    if let Some(v) = value {
        out.push_str(&format!(", not {}", found(v, raw)));
        if let Some(h) = hint(kind, v, raw) {
            out.push_str("; ");
            out.push_str(&h);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str) -> DeValue<'_> {
        DeValue::parse(text).expect("a TOML value").into_inner()
    }

    #[test]
    fn serde_words_become_user_words() {
        let v = value("\"2\"");
        assert_eq!(
            explain("invalid type: string \"2\", expected i64", "`threads`", Some(&v), "\"2\""),
            "`threads` must be a whole number, not the string \"2\"; remove the quotes"
        );
        let v = value("10");
        assert_eq!(
            explain(&format!("invalid type: integer `10`, expected {DURATION}"), "`shutdown_grace`", Some(&v), "10"),
            "`shutdown_grace` must be a duration such as \"10s\", not the number 10; write it in quotes with a unit, like \"10s\""
        );
        let v = value("\"yes\"");
        assert_eq!(
            explain("invalid type: string \"yes\", expected a boolean", "`revoked`", Some(&v), "\"yes\""),
            "`revoked` must be true or false, not the string \"yes\""
        );
        let v = value("\"a\"");
        assert_eq!(
            explain(&format!("invalid type: string \"a\", expected {STRINGS}"), "`listen`", Some(&v), "\"a\""),
            "`listen` must be a list of strings, not the string \"a\"; write it in brackets: [\"a\"]"
        );
        let v = value("5");
        assert_eq!(
            explain("invalid type: integer `5`, expected struct TlsFile", "`tls`", Some(&v), "5"),
            "`tls` must be a table, not the number 5"
        );
        assert_eq!(
            explain("data did not match any variant of untagged enum DateOrStr", "`expires`", None, ""),
            "`expires` must be a time such as 2027-01-31T00:00:00Z"
        );
        assert_eq!(explain("missing field `cert`", "`tls`", None, ""), "`tls` needs `cert`; add it");
        assert_eq!(explain("something else", "`x`", None, ""), "something else");
    }
}
