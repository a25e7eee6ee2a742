//! The vocabulary every config file shares, below both the main config and the rule packs:
//! where a value came from and the diagnostics that point there, TOML values and their
//! error-collecting deserialization with messages in the user's words, units (sizes,
//! durations), and the rate and quota blocks that tiers and rules both write. It depends on
//! nothing else in the crate but the policy types, so `config` and `rules` can both build on it
//! without depending on each other.

pub mod diag;
pub mod limits;
pub mod units;
pub mod value;
pub mod words;

use diag::{Diagnostics, SourceFile};
use toml::Spanned;
use value::IntOrStr;

/// `*` matches any run of characters; everything else matches itself.
pub fn wildcard_match(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            let Some(tail) = text.strip_prefix(head) else { return false };
            if rest.is_empty() {
                return true;
            }
            (0..=tail.len()).any(|i| tail.is_char_boundary(i) && wildcard_match(rest, &tail[i..]))
        }
    }
}

/// Parses a size given as an integer or a string like `10MiB`.
pub fn size_value(v: &Spanned<IntOrStr>, src: &SourceFile, diags: &mut Diagnostics) -> Option<u64> {
    match v.get_ref() {
        IntOrStr::Int(n) if *n >= 0 => Some(*n as u64),
        IntOrStr::Int(_) => {
            diags.error_at(src, v.span(), "a size cannot be negative");
            None
        }
        IntOrStr::Str(s) => match units::parse_size(s) {
            Ok(n) => Some(n),
            Err(e) => {
                diags.error_at(src, v.span(), e);
                None
            }
        },
    }
}

/// Tenant ids are slugs: they appear in hostnames, paths, store keys and metric labels.
pub fn valid_slug(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}
