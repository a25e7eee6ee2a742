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
///
/// Greedy with one backtrack point (the last `*`), so the cost is at most the text's length times
/// the pattern's: a crafted text cannot make it explode the way trying every split point of
/// every `*` would. Bytes are compared, which for UTF-8 is the same as comparing characters.
pub fn wildcard_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|b| *b == b'*')
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

#[cfg(test)]
mod tests {
    use super::wildcard_match;

    #[test]
    fn wildcards_match_runs_of_characters() {
        for (p, t, want) in [
            ("*-*.json", "a-b.json", true),
            ("*-*.json", "a-b-c.json", true),
            ("*-*.json", "ab.json", false),
            ("a*b*c", "abc", true),
            ("a*b*c", "aXbYbZc", true),
            ("a*b", "ab", true),
            ("a*b", "a", false),
            ("*", "", true),
            ("x*", "", false),
            ("*.caf\u{e9}", "menu.caf\u{e9}", true),
            ("exact", "exact", true),
            ("exact", "exacT", false),
        ] {
            assert_eq!(wildcard_match(p, t), want, "{p} ~ {t}");
        }
        // Linear, not exponential or quadratic in practice: a long near-miss answers at once.
        let text = "-".repeat(100_000);
        assert!(!wildcard_match("*-*.json", &text));
    }
}
