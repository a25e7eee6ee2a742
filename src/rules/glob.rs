//! Path globs: `*` matches exactly one segment, `**` any number of segments (zero included),
//! and a `*` inside a segment (`*.json`, `.*`) matches any characters within that segment.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Literal(String),
    /// `*`: one whole segment.
    Any,
    /// A segment with `*` inside, like `.*` or `*.json`.
    Wild(String),
    /// `**`: zero or more segments.
    Many,
}

/// A compiled path glob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    pub text: String,
    pub segs: Vec<Seg>,
}

impl Glob {
    pub fn compile(text: &str) -> Result<Glob, String> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!("path_glob `{text}` must start with `/`"));
        };
        let mut segs = Vec::new();
        for part in rest.split('/') {
            let seg = if part == "**" {
                if segs.last() == Some(&Seg::Many) {
                    continue;
                }
                Seg::Many
            } else if part == "*" {
                Seg::Any
            } else if part.contains("**") {
                return Err(format!(
                    "path_glob `{text}`: `**` must be a whole segment, like `/api/**`, not part of `{part}`"
                ));
            } else if part.contains('*') {
                Seg::Wild(part.to_string())
            } else {
                Seg::Literal(part.to_string())
            };
            segs.push(seg);
        }
        Ok(Glob { text: text.to_string(), segs })
    }

    /// Does the glob match `path` (which starts with `/`)?
    pub fn matches(&self, path: &str) -> bool {
        let rest = path.strip_prefix('/').unwrap_or(path);
        let parts: Vec<&str> = rest.split('/').collect();
        match_segs(&self.segs, &parts)
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Matches one non-`**` segment pattern against one path segment.
pub fn seg_matches(seg: &Seg, part: &str) -> bool {
    match seg {
        Seg::Literal(l) => l == part,
        Seg::Any => true,
        Seg::Wild(w) => crate::config::wildcard_match(w, part),
        Seg::Many => true,
    }
}

fn match_segs(segs: &[Seg], parts: &[&str]) -> bool {
    match segs.split_first() {
        None => parts.is_empty(),
        Some((Seg::Many, rest)) => (0..=parts.len()).any(|i| match_segs(rest, &parts[i..])),
        Some((seg, rest)) => match parts.split_first() {
            Some((p, prest)) => seg_matches(seg, p) && match_segs(rest, prest),
            None => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_and_double_star() {
        let g = Glob::compile("/api/jobs/*").unwrap();
        assert!(g.matches("/api/jobs/42"));
        assert!(!g.matches("/api/jobs/42/logs"));
        let g = Glob::compile("/api/stream/**").unwrap();
        assert!(g.matches("/api/stream"));
        assert!(g.matches("/api/stream/a/b/c"));
        assert!(!g.matches("/api/streams"));
        let g = Glob::compile("/**/.*").unwrap();
        assert!(g.matches("/.env"));
        assert!(g.matches("/a/b/.git"));
        assert!(!g.matches("/a/b/git"));
        assert!(Glob::compile("/a**").is_err());
        assert!(Glob::compile("api").is_err());
    }
}
