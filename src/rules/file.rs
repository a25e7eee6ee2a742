//! The rule file schema: serde structs that mirror `lua-free-rules/*.toml`.
//!
//! A rule file may hold `unmatched`, `metrics`, `[defaults]` and `[[rule]]` tables. The main
//! config file may hold the same keys; they are read with the same code.

use crate::schema::diag::{Diagnostics, SourceFile};
pub use crate::schema::limits::{QuotaFile, RateFile};
use crate::schema::value::{de_item, de_unit, IntOrStr, SStr};
use crate::schema::words;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use toml::de::{DeString, DeValue};
use toml::Spanned;

/// Top-level keys that belong to the rule format.
pub const TOP_LEVEL_KEYS: &[&str] = &["rule", "defaults", "unmatched", "usage_metrics"];

/// A header or query condition: `true` means present, a string means equal to it.
#[derive(Debug, Clone)]
pub enum Presence {
    Present(bool),
    Equals(String),
}

impl<'de> Deserialize<'de> for Presence {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Presence;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(words::PRESENCE)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Presence, E> {
                Ok(Presence::Present(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Presence, E> {
                Ok(Presence::Equals(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct MatchFile {
    pub host: Option<SStr>,
    pub path: Option<SStr>,
    pub path_prefix: Option<SStr>,
    pub path_glob: Option<SStr>,
    #[serde(default, deserialize_with = "words::strings")]
    pub methods: Option<Vec<SStr>>,
    pub headers: Option<BTreeMap<String, Spanned<Presence>>>,
    pub query: Option<BTreeMap<String, Spanned<Presence>>>,
    #[serde(default, deserialize_with = "words::strings")]
    pub tiers: Option<Vec<SStr>>,
    #[serde(default, deserialize_with = "words::strings")]
    pub tenants: Option<Vec<SStr>>,
}

#[derive(Debug, Deserialize)]
pub struct DenyFile {
    pub status: Option<Spanned<i64>>,
    pub message: Option<String>,
    #[serde(default, deserialize_with = "words::strings")]
    pub allow: Option<Vec<SStr>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChargeFile {
    pub metric: Option<SStr>,
    pub cost: Option<Spanned<i64>>,
    pub cost_from_header: Option<SStr>,
    pub cost_from_query: Option<SStr>,
    /// A dotted path into the JSON request body (`max_tokens`), or a list of them (the largest
    /// value present is the estimate).
    #[serde(default, deserialize_with = "words::string_or_strings")]
    pub cost_from_body: Option<Spanned<Vec<SStr>>>,
    /// A dotted path to a whole number in the JSON request body that multiplies the estimate
    /// (`n`, the number of completions asked for), or a list of them (the largest present).
    #[serde(default, deserialize_with = "words::string_or_strings")]
    pub cost_multiplier_from_body: Option<Spanned<Vec<SStr>>>,
    /// The estimate when the body carries none of `cost_from_body`.
    pub default_cost: Option<Spanned<i64>>,
    pub max_cost: Option<Spanned<i64>>,
    pub settle_from_header: Option<SStr>,
    /// A dotted path into a JSON response body (`usage.total_tokens`).
    pub settle_from_body: Option<SStr>,
    /// A dotted path into the `data:` events of a `text/event-stream` response.
    pub settle_from_sse: Option<SStr>,
}

/// `charge`: one table, or an array of them (several metrics from one answer).
#[derive(Debug, Clone, Default)]
pub struct Charges(pub Vec<ChargeFile>);

impl<'de> Deserialize<'de> for Charges {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Charges;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a charge table, or an array of charge tables")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Charges, A::Error> {
                let one = ChargeFile::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(Charges(vec![one]))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Charges, A::Error> {
                let mut all = Vec::new();
                while let Some(c) = seq.next_element::<ChargeFile>()? {
                    all.push(c);
                }
                Ok(Charges(all))
            }
        }
        d.deserialize_any(V)
    }
}

/// A `[[rule]]` table, or `[defaults]` (which may not have `name` or `match`). One struct for
/// both, because serde's `flatten` would hide unknown keys and lose spans.
#[derive(Debug, Default, Deserialize)]
pub struct ActionsFile {
    pub name: Option<SStr>,
    #[serde(rename = "match")]
    pub matcher: Option<Spanned<MatchFile>>,
    pub public: Option<Spanned<bool>>,
    #[serde(default, deserialize_with = "words::strings")]
    pub require_scopes: Option<Vec<SStr>>,
    pub require_feature: Option<SStr>,
    pub deny: Option<Spanned<DenyFile>>,
    pub upstream: Option<SStr>,
    pub set_request_headers: Option<BTreeMap<String, SStr>>,
    #[serde(default, deserialize_with = "words::strings")]
    pub remove_request_headers: Option<Vec<SStr>>,
    pub set_response_headers: Option<BTreeMap<String, SStr>>,
    #[serde(default, deserialize_with = "words::strings")]
    pub remove_response_headers: Option<Vec<SStr>>,
    pub max_body: Option<Spanned<IntOrStr>>,
    #[serde(default, deserialize_with = "words::duration")]
    pub timeout: Option<SStr>,
    pub pass_credentials: Option<bool>,
    pub priority: Option<Spanned<i64>>,
    pub rate: Option<BTreeMap<String, Spanned<RateFile>>>,
    pub charge: Option<Spanned<Charges>>,
    /// Adds `stream_options.include_usage` to streamed JSON requests that lack it, and takes
    /// the extra usage event out of the client's stream.
    pub inject_stream_usage: Option<Spanned<bool>>,
    /// A dotted path into the JSON request body naming the model: a report dimension.
    pub model_from_body: Option<SStr>,
    /// `problem` (default) or `openai`: the body of the gateway's refusals on this route.
    pub error_format: Option<SStr>,
    /// `openai` adds `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` to answers.
    pub ratelimit_headers: Option<SStr>,
    pub quota: Option<BTreeMap<String, BTreeMap<String, Spanned<QuotaFile>>>>,
    pub on_store_error: Option<SStr>,
    /// `sync` (the default), `async`, or `either` (async when the client sends
    /// `Prefer: respond-async`); see `docs/jobs.md`.
    pub mode: Option<SStr>,
    #[serde(default, deserialize_with = "words::duration")]
    pub job_timeout: Option<SStr>,
    pub result_max_bytes: Option<Spanned<IntOrStr>>,
    #[serde(default, deserialize_with = "words::duration")]
    pub retention: Option<SStr>,
}

/// One rule file (or the rule part of the main file), after reading.
#[derive(Debug, Default)]
pub struct RuleFile {
    pub src: Option<SourceFile>,
    pub unmatched: Option<SStr>,
    pub metrics: Vec<SStr>,
    pub defaults: Option<Spanned<ActionsFile>>,
    pub rules: Vec<Spanned<ActionsFile>>,
}

/// Reads the rule tables of a document whose top-level keys were already split out.
pub fn parse_rule_tables(
    src: &SourceFile,
    tables: Vec<(&Spanned<DeString<'_>>, &Spanned<DeValue<'_>>)>,
    diags: &mut Diagnostics,
) -> RuleFile {
    let mut out = RuleFile { src: Some(src.clone()), ..RuleFile::default() };
    for (key, value) in tables {
        match key.get_ref().as_ref() {
            "unmatched" => out.unmatched = de_unit(src, key, value, diags),
            "usage_metrics" => {
                out.metrics = de_unit::<words::Strings>(src, key, value, diags).map(|m| m.0).unwrap_or_default()
            }
            "defaults" => {
                out.defaults = de_unit::<ActionsFile>(src, key, value, diags).map(|d| Spanned::new(value.span(), d))
            }
            "rule" => match value.get_ref() {
                DeValue::Array(items) => {
                    for item in items.iter() {
                        if let Some(r) = de_item::<ActionsFile>(src, "rule", item, diags) {
                            out.rules.push(Spanned::new(item.span(), r));
                        }
                    }
                }
                _ => diags.error_at(
                    src,
                    value.span(),
                    "`rule` must be an array of tables: write each rule as `[[rule]]`",
                ),
            },
            other => diags.error_at(src, key.span(), format!("unknown key `{other}`")),
        }
    }
    out
}

/// Parses a whole rule file.
pub fn parse_rule_file(src: &SourceFile, diags: &mut Diagnostics) -> RuleFile {
    let Some(root) = crate::schema::value::parse_document(src, diags) else {
        return RuleFile { src: Some(src.clone()), ..RuleFile::default() };
    };
    let mut tables = Vec::new();
    for (key, value) in root.get_ref().iter() {
        if TOP_LEVEL_KEYS.contains(&key.get_ref().as_ref()) {
            tables.push((key, value));
        } else {
            diags.error_at(
                src,
                key.span(),
                format!(
                    "unknown key `{}` in a rule file; a rule file holds rule, defaults, unmatched and usage_metrics",
                    key.get_ref()
                ),
            );
        }
    }
    parse_rule_tables(src, tables, diags)
}
