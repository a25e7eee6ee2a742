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

    /// Does the glob match `path` (which starts with `/`)? Allocates nothing.
    pub fn matches(&self, path: &str) -> bool {
        let rest = path.strip_prefix('/').unwrap_or(path);
        match_segs(&self.segs, Some(rest))
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
        Seg::Wild(w) => crate::schema::wildcard_match(w, part),
        Seg::Many => true,
    }
}

/// `rest` is the unmatched remainder of the path (`None`: no segments left).
fn match_segs(segs: &[Seg], rest: Option<&str>) -> bool {
    match segs.split_first() {
        None => rest.is_none(),
        Some((Seg::Many, tail)) => {
            let mut r = rest;
            loop {
                if match_segs(tail, r) {
                    return true;
                }
                match r {
                    None => return false,
                    Some(s) => r = s.split_once('/').map(|(_, t)| t),
                }
            }
        }
        Some((seg, tail)) => match rest {
            None => false,
            Some(s) => {
                let (part, after) = match s.split_once('/') {
                    Some((p, a)) => (p, Some(a)),
                    None => (s, None),
                };
                seg_matches(seg, part) && match_segs(tail, after)
            }
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
