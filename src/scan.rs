//! Scanning response bodies as they pass: values at a few dotted paths of a JSON document, and
//! of every event of a `text/event-stream`, found without buffering the body.
//!
//! What this module guarantees:
//!
//! - **Any chunking gives the same answer.** [`JsonScan`] and [`SseScan`] take chunks of any
//!   size, split anywhere (inside a string, an escape, a number, a key, a literal, a line end);
//!   the values found, and the bytes [`SseScan`] passes on, do not depend on where the splits
//!   fall.
//! - **Bounded memory, independent of the body.** A [`JsonScan`] holds at most 8 frames of
//!   containers that can still lead to a path (paths have at most 8 segments), a 64-level stack
//!   of bracket kinds for content no path can reach (deeper content is tracked by a counter
//!   only), a 64-byte key buffer and one captured value of at most 256 bytes. An [`SseScan`]
//!   adds at most `max_held` bytes of an event held back for filtering.
//! - **Never fails, never panics, never reports a value at a wrong path.** Malformed JSON stops
//!   the scan where the structure becomes unclear; what was found before is kept.
//! - **The first occurrence wins** in a JSON document (duplicate keys: the first); across the
//!   events of a stream, the **last** event that carries a path wins.
//!
//! Choices where JSON leaves room:
//!
//! - Keys are compared **after** escape decoding: `"us\u0061ge"` is the key `usage`, as for
//!   every JSON parser. A key whose decoded text is longer than 64 bytes matches nothing (no
//!   path segment is longer).
//! - Content that no remaining path can reach (another key's value, later array elements) is
//!   skipped by matching brackets outside strings, checking only the bracket kinds, which is
//!   what makes a body cost well under a nanosecond per byte. Inside the containers that can
//!   lead to a path the grammar is checked fully.
//! - A number must follow JSON's grammar (`00012`, `1.`, `+1` are [`Found::BadNum`]); any
//!   negative number, `-0` included, is [`Found::BadNum`].
//! - A string or literal cut off by the end of the document is not reported; a number cut off
//!   there is (it may have been complete); an array is reported as soon as its first element
//!   (or its `]`) shows whether it is empty.

use bytes::{Bytes, BytesMut};
use std::sync::Arc;

/// At most this many paths in one [`JsonPaths`] (they are tracked in a `u16` bit set).
pub const MAX_PATHS: usize = 16;
/// At most this many segments in one path.
pub const MAX_SEGMENTS: usize = 8;
/// At most this many bytes in one segment, and in a key the scanner compares.
pub const MAX_SEGMENT_LEN: usize = 64;
/// The key buffer: a segment spelled with the longest characters Go's JSON decoder folds to
/// ASCII (3 bytes for `k`), so a strict scanner can compare such spellings too.
const KEY_BUF: usize = 3 * MAX_SEGMENT_LEN;
/// At most this many bytes of a string value are kept.
pub const MAX_STR: usize = 256;
/// Levels of skipped content whose bracket kinds are checked; deeper levels are only counted.
const SKIP_STACK: u32 = 64;
/// "No path" in the `u8` path index fields.
const NONE: u8 = u8::MAX;

struct Seg {
    text: Box<[u8]>,
    /// The array index a segment of digits also matches (canonical digits only: `0`, `12`, not
    /// `012`, as in JSON Pointer).
    index: Option<u64>,
}

struct Path {
    text: String,
    segs: Vec<Seg>,
}

/// A compiled set of dotted paths into a JSON document ("usage.total_tokens", "model",
/// "choices"); a segment of digits also matches that index of an array ("choices.0.index").
/// At most 16 paths, each at most 8 segments, each segment 1..=64 bytes of JSON-key text without
/// escapes.
pub struct JsonPaths {
    paths: Vec<Path>,
    /// Bit set of the paths whose last segment has index `d`.
    ends_at: [u16; MAX_SEGMENTS],
    /// Bit set of the paths with more than `d + 1` segments.
    longer: [u16; MAX_SEGMENTS],
    /// Bit `l` set: some path has a segment of `l` bytes at index `d` (a quick rejection of
    /// keys no path names).
    key_lens: [u128; MAX_SEGMENTS],
    /// For a key's first byte, the paths whose segment at index `d` it may begin when case is
    /// folded (strict scanners compare only those keys with [`fold_eq`]).
    fold_first: [[u16; 256]; MAX_SEGMENTS],
    all: u16,
}

impl JsonPaths {
    /// Compiles `paths`; the error says which path is wrong, why, and what to write instead.
    pub fn new<S: AsRef<str>>(paths: &[S]) -> Result<JsonPaths, String> {
        if paths.len() > MAX_PATHS {
            return Err(format!("{} body paths given, at most {MAX_PATHS} are allowed: remove some", paths.len()));
        }
        let mut out = JsonPaths {
            paths: Vec::with_capacity(paths.len()),
            ends_at: [0; MAX_SEGMENTS],
            longer: [0; MAX_SEGMENTS],
            key_lens: [0; MAX_SEGMENTS],
            fold_first: [[0; 256]; MAX_SEGMENTS],
            all: 0,
        };
        for (i, p) in paths.iter().enumerate() {
            let p = p.as_ref();
            if p.is_empty() {
                return Err("an empty body path: write a dotted path such as \
                            \"usage.total_tokens\""
                    .to_string());
            }
            let mut segs = Vec::new();
            for s in p.split('.') {
                if s.is_empty() {
                    return Err(format!(
                        "body path {p:?} has an empty segment: write segments separated by \
                         single dots, such as \"usage.total_tokens\""
                    ));
                }
                if s.len() > MAX_SEGMENT_LEN {
                    return Err(format!(
                        "body path {p:?} has a segment of {} bytes, at most {MAX_SEGMENT_LEN} \
                         are allowed: shorten it",
                        s.len()
                    ));
                }
                if let Some(c) = s.chars().find(|&c| c == '"' || c == '\\' || c < ' ') {
                    return Err(format!(
                        "body path {p:?} contains {c:?}: write the key as it reads after JSON \
                         decoding, without quotes, backslashes or control characters"
                    ));
                }
                let canonical = s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
                segs.push(Seg { text: s.as_bytes().into(), index: if canonical { s.parse().ok() } else { None } });
            }
            if segs.len() > MAX_SEGMENTS {
                return Err(format!(
                    "body path {p:?} has {} segments, at most {MAX_SEGMENTS} are allowed: \
                     point at a shallower value",
                    segs.len()
                ));
            }
            if out.paths.iter().any(|q| q.text == p) {
                return Err(format!("body path {p:?} is given twice: list it once"));
            }
            let bit = 1u16 << i;
            out.ends_at[segs.len() - 1] |= bit;
            for d in 0..segs.len() - 1 {
                out.longer[d] |= bit;
            }
            for (d, seg) in segs.iter().enumerate() {
                out.key_lens[d] |= 1 << seg.text.len();
                let first = seg.text[0].to_ascii_lowercase();
                let firsts = &mut out.fold_first[d];
                firsts[usize::from(first)] |= bit;
                firsts[usize::from(first.to_ascii_uppercase())] |= bit;
                // The first bytes of U+212A (Kelvin sign) and U+017F (long s).
                match first {
                    b'k' => firsts[0xE2] |= bit,
                    b's' => firsts[0xC5] |= bit,
                    _ => {}
                }
            }
            out.all |= bit;
            out.paths.push(Path { text: p.to_string(), segs });
        }
        Ok(out)
    }

    /// How many paths there are.
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    /// Whether there is no path (a scanner then does nothing).
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// The index of `path`, as given to [`JsonPaths::new`].
    pub fn index_of(&self, path: &str) -> Option<usize> {
        self.paths.iter().position(|p| p.text == path)
    }

    /// The paths of `alive` whose segment `d` satisfies `hit`.
    #[inline]
    fn matching(&self, alive: u16, d: usize, hit: impl Fn(&Seg) -> bool) -> u16 {
        let mut out = 0;
        let mut bits = alive;
        while bits != 0 {
            let p = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            if self.paths.get(p).and_then(|p| p.segs.get(d)).is_some_and(&hit) {
                out |= 1 << p;
            }
        }
        out
    }

    /// The paths of `alive` whose segment `d` is `key`.
    fn match_key(&self, alive: u16, d: usize, key: &[u8]) -> u16 {
        self.matching(alive, d, |seg| *seg.text == *key)
    }

    /// The paths of `alive` whose segment `d` is `key` only when case is ignored the way Go's
    /// `encoding/json` ignores it (ASCII case, plus the Kelvin sign for `k` and the long s
    /// for `s`): some parsers take `Max_Tokens` for `max_tokens`, others ignore it. Most keys
    /// cost one table load: their first byte begins no segment in any case.
    #[inline]
    fn case_variants(&self, alive: u16, d: usize, key: &[u8]) -> u16 {
        let Some(&first) = key.first() else { return 0 };
        let candidates = alive & self.fold_first[d][usize::from(first)];
        if candidates == 0 {
            return 0;
        }
        let lens = self.key_lens[d];
        let (shortest, longest) = (lens.trailing_zeros() as usize, 127 - lens.leading_zeros() as usize);
        if key.len() < shortest || key.len() > 3 * longest {
            return 0;
        }
        self.matching(candidates, d, |seg| seg.index.is_none() && *seg.text != *key && fold_eq(&seg.text, key))
    }

    /// The paths of `alive` whose segment `d` is the array index `index`.
    fn match_index(&self, alive: u16, d: usize, index: u64) -> u16 {
        self.matching(alive, d, |seg| seg.index == Some(index))
    }
}

/// `key` equals `seg` (ASCII, lower case) when case is folded as Go's `encoding/json` folds it:
/// ASCII letters either case, `K` (U+212A KELVIN SIGN) as `k`, `ſ` (U+017F) as `s`.
fn fold_eq(seg: &[u8], key: &[u8]) -> bool {
    let (mut i, mut j) = (0, 0);
    while i < seg.len() {
        let want = seg[i].to_ascii_lowercase();
        let rest = &key[j.min(key.len())..];
        if want == b'k' && rest.starts_with("\u{212A}".as_bytes()) {
            j += 3;
        } else if want == b's' && rest.starts_with("\u{17F}".as_bytes()) {
            j += 2;
        } else if rest.first().is_some_and(|b| b.to_ascii_lowercase() == want) {
            j += 1;
        } else {
            return false;
        }
        i += 1;
    }
    j == key.len()
}

/// What was found at a path.
#[derive(Debug, Clone, PartialEq)]
pub enum Found {
    /// A non-negative number: integers exactly, up to u64::MAX; a fraction rounded up
    /// (12.2 -> 13); exponents allowed (1e3 -> 1000); past u64::MAX saturates.
    Num(u64),
    /// A negative number or one that does not parse.
    BadNum,
    /// A string, decoded of JSON escapes (\" \\ \/ \b \f \n \r \t \uXXXX incl. surrogate pairs;
    /// a bad escape keeps the raw text), at most 256 bytes kept; `truncated` says more was there.
    Str {
        text: String,
        truncated: bool,
    },
    Bool(bool),
    Null,
    Object,
    /// An array; `empty` says it had no element.
    Array {
        empty: bool,
    },
}

impl Found {
    /// `*self = src.clone()`, reusing `self`'s string allocation when both are strings.
    fn assign(slot: &mut Option<Found>, src: &Found) {
        match (slot.as_mut(), src) {
            (Some(Found::Str { text, truncated }), Found::Str { text: t, truncated: tr }) => {
                text.clear();
                text.push_str(t);
                *truncated = *tr;
            }
            _ => *slot = Some(src.clone()),
        }
    }
}

/// The scanner's position in the grammar.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum St {
    /// A value is expected (`pending_*` say which paths it is for).
    Value,
    /// Just after `[`: an element or `]`.
    ArrFirst,
    /// Just after `{`: a key or `}`.
    ObjFirst,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After a value: `,` or the container's closer.
    After,
    /// Inside a string (key or value, see `sink`).
    Str,
    /// After a backslash in a string.
    Esc,
    /// Inside the hex digits of `\u`.
    Uni,
    /// After a high surrogate escape: expecting `\` of its low half.
    SurBs,
    /// After a high surrogate escape and `\`: expecting `u`.
    SurU,
    /// Inside a number or literal.
    Scalar,
    /// Skipping a container no path can reach.
    Skip,
    SkipStr,
    SkipEsc,
    /// The document is complete (or every path is found): nothing more to do.
    Done,
    /// The document is malformed: nothing more is found.
    Dead,
}

/// Where the characters of the current string go.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sink {
    Skip,
    Key,
    Cap(u8),
}

#[derive(Clone, Copy, Default)]
struct Frame {
    array: bool,
    /// The paths that continue inside this container.
    alive: u16,
    /// The index of the current element (arrays).
    index: u64,
}

/// The grammar state of a number being read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum NSt {
    Start,
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    Exp,
    Bad,
}

/// A number read incrementally, in bounded memory: its first 21 significant digits (u64::MAX
/// has 20), whether a non-zero digit came after them, and where the decimal point is.
#[derive(Clone, Copy)]
struct Num {
    st: NSt,
    neg: bool,
    sig: [u8; 21],
    nsig: u8,
    tail_nonzero: bool,
    /// Significant digits before the decimal point (negative: zeros after the point first).
    point: i64,
    exp: i64,
    exp_neg: bool,
}

impl Num {
    const fn new() -> Num {
        Num { st: NSt::Start, neg: false, sig: [0; 21], nsig: 0, tail_nonzero: false, point: 0, exp: 0, exp_neg: false }
    }

    fn digit(&mut self, d: u8, fraction: bool) {
        if self.nsig == 0 && d == 0 {
            if fraction {
                self.point -= 1;
            }
            return;
        }
        if (self.nsig as usize) < self.sig.len() {
            self.sig[self.nsig as usize] = d;
            self.nsig += 1;
        } else if d != 0 {
            self.tail_nonzero = true;
        }
        if !fraction {
            self.point += 1;
        }
    }

    fn push(&mut self, b: u8) {
        use NSt::*;
        self.st = match (self.st, b) {
            (Start, b'-') => {
                self.neg = true;
                Minus
            }
            (Start | Minus, b'0') => Zero,
            (Start | Minus | Int, b'1'..=b'9') | (Int, b'0') => {
                self.digit(b - b'0', false);
                Int
            }
            (Zero | Int, b'.') => Dot,
            (Dot | Frac, b'0'..=b'9') => {
                self.digit(b - b'0', true);
                Frac
            }
            (Zero | Int | Frac, b'e' | b'E') => E,
            (E, b'+') => ESign,
            (E, b'-') => {
                self.exp_neg = true;
                ESign
            }
            (E | ESign | Exp, b'0'..=b'9') => {
                self.exp = (self.exp * 10 + i64::from(b - b'0')).min(1_000_000_000);
                Exp
            }
            _ => Bad,
        };
    }

    fn finish(&self) -> Found {
        if !matches!(self.st, NSt::Zero | NSt::Int | NSt::Frac | NSt::Exp) || self.neg {
            return Found::BadNum;
        }
        if self.nsig == 0 {
            return Found::Num(0);
        }
        let k = self.point + if self.exp_neg { -self.exp } else { self.exp };
        if k > 20 {
            return Found::Num(u64::MAX);
        }
        if k <= 0 {
            // Only a non-zero fraction: rounded up.
            return Found::Num(1);
        }
        let k = k as usize;
        let nsig = self.nsig as usize;
        let mut v: Option<u64> = Some(0);
        for i in 0..k {
            let d = if i < nsig { self.sig[i] } else { 0 };
            v = v.and_then(|v| v.checked_mul(10)).and_then(|v| v.checked_add(u64::from(d)));
        }
        let round_up = self.tail_nonzero || self.sig[k.min(nsig)..nsig].iter().any(|&d| d != 0);
        if round_up {
            v = v.and_then(|v| v.checked_add(1));
        }
        Found::Num(v.unwrap_or(u64::MAX))
    }
}

/// A number or literal (`true`, `false`, `null`) being read.
#[derive(Clone, Copy)]
struct Scalar {
    num: bool,
    target: u8,
    n: Num,
    lit: [u8; 5],
    lit_len: u8,
}

impl Scalar {
    const fn new() -> Scalar {
        Scalar { num: false, target: NONE, n: Num::new(), lit: [0; 5], lit_len: 0 }
    }
}

/// The first `"` or `\\` in `s`: most strings in API bodies are short, and a plain loop over
/// their first bytes beats the set-up of a SIMD search; longer ones go to `memchr2`.
fn quote_or_backslash(s: &[u8]) -> Option<usize> {
    const SHORT: usize = 16;
    let head = &s[..s.len().min(SHORT)];
    if let Some(j) = head.iter().position(|&b| b == b'"' || b == b'\\') {
        return Some(j);
    }
    if s.len() <= SHORT {
        return None;
    }
    memchr::memchr2(b'"', b'\\', &s[SHORT..]).map(|j| j + SHORT)
}

/// The length of the rest of a string (after its opening quote) up to and including its closing
/// quote, if it ends in `s`.
fn skip_string(s: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let j = quote_or_backslash(s.get(at..)?)?;
        if s[at + j] == b'"' {
            return Some(at + j + 1);
        }
        at += j + 2;
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// The bytes a number or literal is made of (wider than the grammar, so that `1x` or `tru3`
/// is read as one bad token rather than two).
fn is_scalar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')
}

/// An incremental scanner over ONE JSON document, fed in chunks of any size split anywhere
/// (inside a string, an escape, a number, a key, a literal). Memory is bounded and independent
/// of the document: a nesting stack of at most 64 levels (deeper content is skipped, still
/// tracked by a depth counter so the document's shape stays right), a key buffer of 64 bytes
/// (a longer key matches nothing), one captured value at a time.
/// The FIRST occurrence of each path is kept. Scanning never fails or panics: malformed JSON
/// just yields what was found before it (and the scanner must never report a value at a
/// wrong path because of it).
pub struct JsonScan {
    found: Vec<Option<Found>>,
    found_mask: u16,
    /// Read the whole document, also past the first occurrence of every path, and note the
    /// paths that occur again ([`JsonScan::strict`]).
    strict: bool,
    /// `found_mask & settle` are the paths no longer looked for: every found one, or none
    /// when strict (kept as a mask so the hot loop tests no flag).
    settle: u16,
    dup_mask: u16,
    /// Paths met under a key that equals their segment only when case is ignored.
    case_mask: u16,
    all: u16,
    state: St,
    frames: [Frame; MAX_SEGMENTS],
    nframes: usize,
    skip_depth: u32,
    /// Bit `d` set: level `d` of the skipped content is an array.
    skip_kinds: u64,
    /// The path a value about to start is the last segment of, or NONE.
    pending_target: u8,
    /// The paths that continue inside a container about to start.
    pending_carry: u16,
    /// The path an array just opened is for, until its emptiness is known.
    arr_pending: u8,
    sink: Sink,
    key: [u8; KEY_BUF],
    key_len: usize,
    key_over: bool,
    cap: Vec<u8>,
    cap_trunc: bool,
    /// The `\u` escape being read: digits so far, their raw text, their value.
    u_n: u8,
    u_raw: [u8; 4],
    u_acc: u32,
    /// A high surrogate waiting for its low half (0 = none), with its raw digits.
    hi: u32,
    hi_raw: [u8; 4],
    scalar: Scalar,
    /// String allocations of values from earlier documents, reused by [`JsonScan::reset`].
    spare: Vec<String>,
}

impl JsonScan {
    pub fn new(paths: &JsonPaths) -> JsonScan {
        let mut s = JsonScan {
            found: vec![None; paths.len()],
            found_mask: 0,
            strict: false,
            settle: u16::MAX,
            dup_mask: 0,
            case_mask: 0,
            all: paths.all,
            state: St::Value,
            frames: [Frame::default(); MAX_SEGMENTS],
            nframes: 0,
            skip_depth: 0,
            skip_kinds: 0,
            pending_target: NONE,
            pending_carry: paths.all,
            arr_pending: NONE,
            sink: Sink::Skip,
            key: [0; KEY_BUF],
            key_len: 0,
            key_over: false,
            cap: Vec::with_capacity(MAX_STR + 4),
            cap_trunc: false,
            u_n: 0,
            u_raw: [0; 4],
            u_acc: 0,
            hi: 0,
            hi_raw: [0; 4],
            scalar: Scalar::new(),
            spare: Vec::new(),
        };
        s.reset();
        s
    }

    /// Reuse for the next document, keeping allocations.
    pub fn reset(&mut self) {
        for f in &mut self.found {
            if let Some(Found::Str { text, .. }) = f.take() {
                self.spare.push(text);
            }
        }
        self.found_mask = 0;
        self.dup_mask = 0;
        self.case_mask = 0;
        self.state = if self.all == 0 { St::Done } else { St::Value };
        self.nframes = 0;
        self.skip_depth = 0;
        self.skip_kinds = 0;
        self.pending_target = NONE;
        self.pending_carry = self.all;
        self.arr_pending = NONE;
        self.sink = Sink::Skip;
        self.key_len = 0;
        self.key_over = false;
        self.cap.clear();
        self.cap_trunc = false;
        self.hi = 0;
        self.u_n = 0;
    }

    /// A scanner that reads the whole document and notes every path that occurs more than
    /// once. For request bodies: parsers differ on which of two equal keys counts (most take
    /// the last, this scanner the first), so a body that names a field the gateway reads twice
    /// is refused rather than read one way by the gateway and another by the upstream.
    pub fn strict(paths: &JsonPaths) -> JsonScan {
        let mut s = JsonScan::new(paths);
        s.strict = true;
        s.settle = 0;
        s
    }

    /// Whether some path occurred more than once (only noted by a [`JsonScan::strict`] scanner).
    pub fn duplicated(&self) -> bool {
        self.dup_mask != 0
    }

    /// Whether a key along some path differs from the path's segment only in case (only noted
    /// by a [`JsonScan::strict`] scanner).
    pub fn case_variant(&self) -> bool {
        self.case_mask != 0
    }

    /// The paths no longer looked for: those found, unless every occurrence is wanted.
    fn settled(&self) -> u16 {
        self.found_mask & self.settle
    }

    /// The value found at path `i` (the index in [`JsonPaths`]), if any.
    pub fn get(&self, i: usize) -> Option<&Found> {
        self.found.get(i).and_then(Option::as_ref)
    }

    /// Call at the end of the document (a number at the very end completes here).
    pub fn finish(&mut self, paths: &JsonPaths) {
        if self.state == St::Scalar {
            self.end_scalar(paths);
        }
        if self.state != St::Dead {
            self.state = St::Done;
        }
    }

    pub fn feed(&mut self, paths: &JsonPaths, chunk: &[u8]) {
        let n = chunk.len();
        let mut i = 0;
        while i < n {
            if self.settled() == self.all {
                // Only the first occurrence counts: nothing left to find.
                self.state = St::Done;
            }
            match self.state {
                St::Done | St::Dead => return,
                St::Str => {
                    let rest = &chunk[i..];
                    match quote_or_backslash(rest) {
                        None => {
                            self.sink_bytes(rest);
                            return;
                        }
                        Some(j) => {
                            self.sink_bytes(&rest[..j]);
                            i += j + 1;
                            if rest[j] == b'"' {
                                self.end_string(paths);
                            } else {
                                self.state = St::Esc;
                            }
                        }
                    }
                }
                St::SkipStr => match quote_or_backslash(&chunk[i..]) {
                    None => return,
                    Some(j) => {
                        let b = chunk[i + j];
                        i += j + 1;
                        self.state = if b == b'"' { St::Skip } else { St::SkipEsc };
                    }
                },
                St::SkipEsc => {
                    i += 1;
                    self.state = St::SkipStr;
                }
                St::Skip => {
                    while i < n {
                        let b = chunk[i];
                        i += 1;
                        match b {
                            b',' if self.skip_depth == 0 => {
                                if !self.frames[self.nframes - 1].array {
                                    // The common case, a whole key in this chunk, read in place.
                                    if let Some(m) = self.fast_key(paths, &chunk[i..]) {
                                        i += m;
                                        if self.nothing_pending() {
                                            continue;
                                        }
                                        self.state = St::Value;
                                        break;
                                    }
                                }
                                self.next_member(paths);
                                break;
                            }
                            b'}' | b']' if self.skip_depth == 0 => {
                                self.close(b);
                                break;
                            }
                            b'"' => match skip_string(&chunk[i..]) {
                                Some(m) => i += m,
                                None => {
                                    self.state = St::SkipStr;
                                    break;
                                }
                            },
                            b'{' | b'[' => {
                                if self.skip_depth < SKIP_STACK {
                                    let bit = 1u64 << self.skip_depth;
                                    if b == b'[' {
                                        self.skip_kinds |= bit;
                                    } else {
                                        self.skip_kinds &= !bit;
                                    }
                                }
                                self.skip_depth = self.skip_depth.saturating_add(1);
                            }
                            b'}' | b']' => {
                                self.skip_depth -= 1;
                                if self.skip_depth < SKIP_STACK
                                    && ((self.skip_kinds >> self.skip_depth) & 1 == 1) != (b == b']')
                                {
                                    self.state = St::Dead;
                                    break;
                                }
                                if self.skip_depth == 0 && self.nframes == 0 {
                                    self.state = St::Done;
                                    break;
                                }
                            }
                            _ => {}
                        }
                    }
                }
                St::Esc => {
                    let b = chunk[i];
                    i += 1;
                    self.escape(b);
                }
                St::Uni => {
                    let b = chunk[i];
                    let v = match b {
                        b'0'..=b'9' => b - b'0',
                        b'a'..=b'f' => b - b'a' + 10,
                        b'A'..=b'F' => b - b'A' + 10,
                        _ => {
                            // A bad `\u` escape: its raw text, then `b` as string text again.
                            self.bad_unicode();
                            continue;
                        }
                    };
                    i += 1;
                    self.u_raw[self.u_n as usize] = b;
                    self.u_n += 1;
                    self.u_acc = self.u_acc * 16 + u32::from(v);
                    if self.u_n == 4 {
                        self.unicode_done();
                    }
                }
                St::SurBs => {
                    if chunk[i] == b'\\' {
                        i += 1;
                        self.state = St::SurU;
                    } else {
                        self.flush_hi();
                        self.state = St::Str;
                    }
                }
                St::SurU => {
                    if chunk[i] == b'u' {
                        i += 1;
                        self.u_n = 0;
                        self.u_acc = 0;
                        self.state = St::Uni;
                    } else {
                        // `\` then something else: the high half stays raw, the rest is an
                        // ordinary escape.
                        self.flush_hi();
                        self.state = St::Esc;
                    }
                }
                St::Scalar => {
                    while i < n && is_scalar(chunk[i]) {
                        self.scalar_push(chunk[i]);
                        i += 1;
                    }
                    if i < n {
                        self.end_scalar(paths);
                    }
                }
                St::Value | St::ArrFirst | St::ObjFirst | St::Key | St::Colon | St::After => {
                    let b = chunk[i];
                    if is_ws(b) || self.structural(paths, b) {
                        i += 1;
                    }
                }
            }
        }
    }

    /// Handles a structural byte; false when `b` must be read again in the new state.
    fn structural(&mut self, paths: &JsonPaths, b: u8) -> bool {
        match self.state {
            St::Value => self.begin_value(b),
            St::ArrFirst => {
                if self.arr_pending != NONE {
                    let t = self.arr_pending;
                    self.arr_pending = NONE;
                    self.record(t, Found::Array { empty: b == b']' });
                }
                if b == b']' {
                    self.close(b);
                    return true;
                }
                let top = self.frames[self.nframes - 1];
                if top.alive & !self.settled() == 0 {
                    self.skip_innermost();
                    return false;
                }
                self.element_match(paths);
                if self.nothing_pending() {
                    self.skip_depth = 0;
                    self.state = St::Skip;
                    return false;
                }
                self.begin_value(b)
            }
            St::ObjFirst | St::Key => {
                if b == b'}' && self.state == St::ObjFirst {
                    self.close(b);
                    return true;
                }
                if b != b'"' {
                    self.state = St::Dead;
                    return true;
                }
                let top = self.frames[self.nframes - 1];
                if top.alive & !self.settled() == 0 {
                    self.state = St::ObjFirst;
                    self.skip_innermost();
                    return false;
                }
                self.sink = Sink::Key;
                self.key_len = 0;
                self.key_over = false;
                self.state = St::Str;
                true
            }
            St::Colon => {
                self.state = if b != b':' {
                    St::Dead
                } else if self.nothing_pending() {
                    // No path goes through this key: its value is skipped, up to the `,` or
                    // the closer after it.
                    self.skip_depth = 0;
                    St::Skip
                } else {
                    St::Value
                };
                true
            }
            St::After => {
                if self.nframes == 0 {
                    self.state = St::Done;
                    return true;
                }
                match b {
                    b',' => self.next_member(paths),
                    b'}' | b']' => self.close(b),
                    _ => self.state = St::Dead,
                }
                true
            }
            _ => true,
        }
    }

    /// After a `,` in the innermost frame: the next key, or the next element (skipped when no
    /// path goes through it).
    fn next_member(&mut self, paths: &JsonPaths) {
        let top = &mut self.frames[self.nframes - 1];
        if top.array {
            top.index += 1;
            self.element_match(paths);
            if self.nothing_pending() {
                self.skip_depth = 0;
                self.state = St::Skip;
            } else {
                self.state = St::Value;
            }
        } else {
            self.state = St::Key;
        }
    }

    /// Reads `ws "key" ws :` at the start of `rest` when it is all there and the key has no
    /// escape: sets what the key's value is for, and returns the bytes read. None: the slow
    /// path reads it.
    fn fast_key(&mut self, paths: &JsonPaths, rest: &[u8]) -> Option<usize> {
        let mut j = 0;
        while j < rest.len() && is_ws(rest[j]) {
            j += 1;
        }
        if rest.get(j) != Some(&b'"') {
            return None;
        }
        let k0 = j + 1;
        let e = quote_or_backslash(&rest[k0..])?;
        if rest[k0 + e] != b'"' {
            return None;
        }
        let key = &rest[k0..k0 + e];
        let mut m = k0 + e + 1;
        while m < rest.len() && is_ws(rest[m]) {
            m += 1;
        }
        if rest.get(m) != Some(&b':') {
            return None;
        }
        let d = self.nframes - 1;
        let alive = self.frames[d].alive & !self.settled();
        let cur = if key.len() > MAX_SEGMENT_LEN || (paths.key_lens[d] >> key.len()) & 1 == 0 {
            0
        } else {
            paths.match_key(alive, d, key)
        };
        if self.strict && cur == 0 {
            self.case_mask |= paths.case_variants(alive, d, key);
        }
        self.set_pending(paths, cur, d);
        Some(m + 1)
    }

    fn nothing_pending(&self) -> bool {
        self.pending_target == NONE && self.pending_carry & !self.settled() == 0
    }

    /// Turns the innermost frame (just opened, or with nothing left to find) into skipped
    /// content of one level.
    fn skip_innermost(&mut self) {
        self.nframes -= 1;
        let array = self.frames[self.nframes].array;
        self.skip_depth = 1;
        self.skip_kinds = u64::from(array);
        self.state = St::Skip;
    }

    fn element_match(&mut self, paths: &JsonPaths) {
        let d = self.nframes - 1;
        let top = self.frames[d];
        let cur = paths.match_index(top.alive & !self.settled(), d, top.index);
        self.set_pending(paths, cur, d);
    }

    fn set_pending(&mut self, paths: &JsonPaths, cur: u16, d: usize) {
        let target = cur & paths.ends_at[d];
        self.pending_target = if target == 0 { NONE } else { target.trailing_zeros() as u8 };
        self.pending_carry = cur & paths.longer[d];
    }

    fn begin_value(&mut self, b: u8) -> bool {
        let t = self.pending_target;
        let carry = self.pending_carry & !self.settled();
        self.pending_target = NONE;
        self.pending_carry = 0;
        match b {
            b'"' => {
                self.sink = if t != NONE {
                    self.cap.clear();
                    self.cap_trunc = false;
                    Sink::Cap(t)
                } else {
                    Sink::Skip
                };
                self.state = St::Str;
            }
            b'{' | b'[' => {
                let array = b == b'[';
                if t != NONE {
                    if array {
                        self.arr_pending = t;
                    } else {
                        self.record(t, Found::Object);
                    }
                }
                if (carry != 0 || (array && t != NONE)) && self.nframes < MAX_SEGMENTS {
                    self.frames[self.nframes] = Frame { array, alive: carry, index: 0 };
                    self.nframes += 1;
                    self.state = if array { St::ArrFirst } else { St::ObjFirst };
                } else {
                    self.skip_depth = 1;
                    self.skip_kinds = u64::from(array);
                    self.state = St::Skip;
                }
            }
            b'-' | b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z' => {
                self.scalar = Scalar::new();
                self.scalar.num = !b.is_ascii_alphabetic();
                self.scalar.target = t;
                self.scalar_push(b);
                self.state = St::Scalar;
            }
            _ => self.state = St::Dead,
        }
        true
    }

    fn close(&mut self, b: u8) {
        let top = self.frames[self.nframes - 1];
        if top.array != (b == b']') {
            self.state = St::Dead;
            return;
        }
        self.nframes -= 1;
        self.after_value();
    }

    fn after_value(&mut self) {
        self.state = if self.nframes == 0 { St::Done } else { St::After };
    }

    fn record(&mut self, t: u8, f: Found) {
        let t = t as usize;
        if let Some(slot) = self.found.get_mut(t) {
            if slot.is_none() {
                *slot = Some(f);
                self.found_mask |= 1 << t;
            } else {
                self.dup_mask |= 1 << t;
            }
        }
    }

    fn scalar_push(&mut self, b: u8) {
        let s = &mut self.scalar;
        if s.num {
            if s.target != NONE {
                s.n.push(b);
            }
        } else if (s.lit_len as usize) < s.lit.len() {
            s.lit[s.lit_len as usize] = b;
            s.lit_len += 1;
        } else {
            s.lit_len = u8::MAX;
        }
    }

    fn end_scalar(&mut self, _paths: &JsonPaths) {
        let s = self.scalar;
        let f = if s.num {
            Some(s.n.finish())
        } else {
            match s.lit.get(..s.lit_len as usize) {
                Some(b"true") => Some(Found::Bool(true)),
                Some(b"false") => Some(Found::Bool(false)),
                Some(b"null") => Some(Found::Null),
                _ => None,
            }
        };
        match f {
            None => self.state = St::Dead,
            Some(f) => {
                if s.target != NONE {
                    self.record(s.target, f);
                }
                self.after_value();
            }
        }
    }

    fn end_string(&mut self, paths: &JsonPaths) {
        match self.sink {
            Sink::Skip => self.after_value(),
            Sink::Key => {
                let d = self.nframes - 1;
                let alive = self.frames[d].alive & !self.settled();
                let cur = if self.key_over
                    || self.key_len > MAX_SEGMENT_LEN
                    || (paths.key_lens[d] >> self.key_len) & 1 == 0
                {
                    0
                } else {
                    paths.match_key(alive, d, &self.key[..self.key_len])
                };
                if self.strict && cur == 0 && !self.key_over {
                    self.case_mask |= paths.case_variants(alive, d, &self.key[..self.key_len]);
                }
                self.set_pending(paths, cur, d);
                self.state = St::Colon;
            }
            Sink::Cap(t) => {
                let mut text = self.spare.pop().unwrap_or_default();
                text.clear();
                match std::str::from_utf8(&self.cap) {
                    Ok(s) => text.push_str(s),
                    Err(e) if self.cap_trunc && e.error_len().is_none() => {
                        // Cut inside a character at the 256-byte limit: keep whole characters.
                        let ok = &self.cap[..e.valid_up_to()];
                        text.push_str(std::str::from_utf8(ok).unwrap_or_default());
                    }
                    Err(_) => text.push_str(&String::from_utf8_lossy(&self.cap)),
                }
                let truncated = self.cap_trunc;
                self.record(t, Found::Str { text, truncated });
                self.after_value();
            }
        }
    }

    fn sink_bytes(&mut self, b: &[u8]) {
        match self.sink {
            Sink::Skip => {}
            Sink::Key => {
                if self.key_over || self.key_len + b.len() > KEY_BUF {
                    self.key_over = true;
                } else {
                    self.key[self.key_len..self.key_len + b.len()].copy_from_slice(b);
                    self.key_len += b.len();
                }
            }
            Sink::Cap(_) => {
                if self.cap_trunc {
                    return;
                }
                let room = MAX_STR - self.cap.len();
                if b.len() > room {
                    self.cap.extend_from_slice(&b[..room]);
                    self.cap_trunc = true;
                } else {
                    self.cap.extend_from_slice(b);
                }
            }
        }
    }

    fn sink_char(&mut self, c: char) {
        let mut buf = [0; 4];
        let s = c.encode_utf8(&mut buf);
        if let Sink::Cap(_) = self.sink {
            if !self.cap_trunc && self.cap.len() + s.len() > MAX_STR {
                // Whole characters only: a character that does not fit is not split.
                self.cap_trunc = true;
                return;
            }
        }
        self.sink_bytes(s.as_bytes());
    }

    fn escape(&mut self, b: u8) {
        self.state = St::Str;
        let c = match b {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                self.u_n = 0;
                self.u_acc = 0;
                self.state = St::Uni;
                return;
            }
            _ => {
                // A bad escape keeps its raw text.
                self.sink_bytes(&[b'\\', b]);
                return;
            }
        };
        self.sink_char(c);
    }

    /// A `\u` escape ended before four hex digits: its raw text is kept.
    fn bad_unicode(&mut self) {
        self.flush_hi();
        let n = self.u_n as usize;
        let raw = self.u_raw;
        self.sink_bytes(b"\\u");
        self.sink_bytes(&raw[..n]);
        self.state = St::Str;
    }

    /// A high surrogate that did not get its low half: its raw text is kept.
    fn flush_hi(&mut self) {
        if self.hi != 0 {
            let raw = self.hi_raw;
            self.hi = 0;
            self.sink_bytes(b"\\u");
            self.sink_bytes(&raw);
        }
    }

    fn unicode_done(&mut self) {
        let v = self.u_acc;
        self.state = St::Str;
        if (0xDC00..0xE000).contains(&v) && self.hi != 0 {
            let c = 0x10000 + ((self.hi - 0xD800) << 10) + (v - 0xDC00);
            self.hi = 0;
            if let Some(c) = char::from_u32(c) {
                self.sink_char(c);
            }
            return;
        }
        self.flush_hi();
        if (0xD800..0xDC00).contains(&v) {
            self.hi = v;
            self.hi_raw = self.u_raw;
            self.state = St::SurBs;
        } else if let Some(c) = char::from_u32(v) {
            self.sink_char(c);
        } else {
            // A lone low surrogate.
            let raw = self.u_raw;
            self.sink_bytes(b"\\u");
            self.sink_bytes(&raw);
        }
    }
}

/// The part of an SSE line being read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Line {
    Start,
    Name,
    /// After `data:`: one optional space.
    Space,
    Data,
    /// A comment or another field: ignored to the line end.
    Other,
}

/// The bytes [`SseScan::feed`] passes on: a range of the input, or a copy when something
/// held back or dropped breaks the range.
enum Out {
    Empty,
    Range(usize, usize),
    Owned(BytesMut),
}

impl Out {
    fn range(&mut self, chunk: &[u8], a: usize, b: usize) {
        if a == b {
            return;
        }
        match self {
            Out::Empty => *self = Out::Range(a, b),
            Out::Range(s, e) if *e == a => *e = b,
            Out::Range(s, e) => {
                let mut m = BytesMut::with_capacity(chunk.len());
                m.extend_from_slice(&chunk[*s..*e]);
                m.extend_from_slice(&chunk[a..b]);
                *self = Out::Owned(m);
            }
            Out::Owned(m) => m.extend_from_slice(&chunk[a..b]),
        }
    }

    fn bytes(&mut self, chunk: &[u8], extra: &[u8]) {
        if extra.is_empty() {
            return;
        }
        match self {
            Out::Empty => {
                let mut m = BytesMut::with_capacity(extra.len() + chunk.len());
                m.extend_from_slice(extra);
                *self = Out::Owned(m);
            }
            Out::Range(s, e) => {
                let mut m = BytesMut::with_capacity(extra.len() + chunk.len());
                m.extend_from_slice(&chunk[*s..*e]);
                m.extend_from_slice(extra);
                *self = Out::Owned(m);
            }
            Out::Owned(m) => m.extend_from_slice(extra),
        }
    }

    fn finish(self, chunk: &Bytes) -> Bytes {
        match self {
            Out::Empty => Bytes::new(),
            Out::Range(s, e) => chunk.slice(s..e),
            Out::Owned(m) => m.freeze(),
        }
    }
}

/// An incremental scanner over a text/event-stream (SSE, per the WHATWG HTML spec's
/// event-stream interpretation): lines end in \n, \r\n or \r (a \r at a chunk's end followed by
/// \n in the next chunk is one line end); an event ends at a blank line; `data:` lines (one
/// optional space after the colon removed) are the event's data, several joined with "\n";
/// comments (`:`) and other fields (event, id, retry) ignored. Each event's data is scanned as
/// one JSON document with JsonScan (data that is not JSON, such as `[DONE]`, finds nothing).
///
/// For each path, the value from the LAST event whose data carried that path is kept (`last`).
///
/// Filtering: with `drop_when = Some((carrier, empty))`, an event whose data carries
/// path `carrier` as Found::Num AND whose path `empty` is absent, null or an empty array, is
/// removed from the output (all its bytes: field lines and its blank line), and
/// `dropped()` counts it. To be able to drop, the bytes of an event in progress are held back
/// until the event ends; at most `max_held` bytes (e.g. 64 KiB) are held: an event bigger than
/// that is passed on as it comes and is never dropped. Without `drop_when`, `feed` returns the
/// input `Bytes` unchanged (the same buffer, zero copy) and holds nothing.
///
/// An event's size, for `max_held`, counts its bytes up to the first byte of the line end that
/// ends it, whatever the chunking, so whether an event can be dropped never depends on where
/// chunks are split. Only dispatched events (those with data, as the WHATWG spec dispatches
/// them) are counted in `events()` and can be dropped; a comment-only keep-alive is passed on.
pub struct SseScan {
    paths: Arc<JsonPaths>,
    json: JsonScan,
    drop_when: Option<(usize, usize)>,
    max_held: usize,
    last: Vec<Option<Found>>,
    events: u64,
    dropped: u64,
    line: Line,
    /// How many bytes of the field name matched `data` (5 = no longer can).
    name_len: u8,
    data_lines: u32,
    data_any: bool,
    /// A `\r` ended the previous chunk: a `\n` opening the next belongs to the same line end.
    cr_pending: bool,
    /// With `cr_pending`: the `\r` ended an event, kept (`Some(false)`) or dropped.
    cr_event: Option<bool>,
    /// Bytes of the event in progress held back from earlier chunks.
    held: Vec<u8>,
    /// Bytes of the event in progress in earlier chunks.
    ev_len: usize,
    /// The event in progress outgrew `max_held` and is being passed on.
    passing: bool,
}

impl SseScan {
    pub fn new(paths: Arc<JsonPaths>, drop_when: Option<(usize, usize)>, max_held: usize) -> SseScan {
        let json = JsonScan::new(&paths);
        let last = vec![None; paths.len()];
        SseScan {
            paths,
            json,
            drop_when,
            max_held,
            last,
            events: 0,
            dropped: 0,
            line: Line::Start,
            name_len: 0,
            data_lines: 0,
            data_any: false,
            cr_pending: false,
            cr_event: None,
            held: Vec::new(),
            ev_len: 0,
            passing: false,
        }
    }

    /// The value at path `i` from the last event whose data carried it.
    pub fn last(&self, i: usize) -> Option<&Found> {
        self.last.get(i).and_then(Option::as_ref)
    }

    /// Events seen (with data).
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Events removed from the output.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Scans `chunk` and returns the bytes to send on now. With `end_of_stream`, everything
    /// still held is returned (an unterminated last event is also treated as ended and scanned,
    /// but not dropped).
    pub fn feed(&mut self, chunk: Bytes, end_of_stream: bool) -> Bytes {
        let holding = self.drop_when.is_some();
        let buf: &[u8] = &chunk;
        let n = buf.len();
        let mut out = Out::Empty;
        let mut i = 0;
        // Where the unsent bytes of the event in progress begin in this chunk.
        let mut seg = 0;
        if self.cr_pending && n > 0 {
            self.cr_pending = false;
            if buf[0] == b'\n' {
                i = 1;
                match self.cr_event.take() {
                    None => {}
                    Some(true) => seg = 1,
                    Some(false) => {
                        out.range(buf, 0, 1);
                        seg = 1;
                    }
                }
            }
            self.cr_event = None;
        }
        while i < n {
            match self.line {
                Line::Start => {
                    let b = buf[i];
                    if b == b'\n' || b == b'\r' {
                        // A blank line: the event ends.
                        i += 1;
                        let size = self.ev_len + (i - seg);
                        let drop = self.end_event(size);
                        if b == b'\r' {
                            if i == n {
                                self.cr_pending = true;
                                self.cr_event = Some(drop);
                            } else if buf[i] == b'\n' {
                                i += 1;
                            }
                        }
                        if holding {
                            if drop {
                                self.held.clear();
                            } else {
                                out.bytes(buf, &self.held);
                                self.held.clear();
                                out.range(buf, seg, i);
                            }
                        }
                        seg = i;
                        continue;
                    }
                    if b == b':' {
                        self.line = Line::Other;
                        i += 1;
                    } else {
                        self.line = Line::Name;
                        self.name_len = 0;
                    }
                }
                Line::Name => {
                    while i < n {
                        let b = buf[i];
                        if b == b':' {
                            i += 1;
                            self.line = if self.name_len == 4 { Line::Space } else { Line::Other };
                            break;
                        }
                        if b == b'\r' || b == b'\n' {
                            // A field without a colon: its value is empty.
                            if self.name_len == 4 {
                                self.data_line();
                            }
                            self.line_end(buf, &mut i);
                            break;
                        }
                        self.name_len = if (self.name_len as usize) < 4 && b == b"data"[self.name_len as usize] {
                            self.name_len + 1
                        } else {
                            5
                        };
                        i += 1;
                    }
                }
                Line::Space => {
                    if buf[i] == b' ' {
                        i += 1;
                    }
                    self.data_line();
                    self.line = Line::Data;
                }
                Line::Data => {
                    let rest = &buf[i..];
                    match memchr::memchr2(b'\n', b'\r', rest) {
                        None => {
                            self.data_any |= !rest.is_empty();
                            self.json.feed(&self.paths, rest);
                            i = n;
                        }
                        Some(j) => {
                            self.data_any |= j > 0;
                            self.json.feed(&self.paths, &rest[..j]);
                            i += j;
                            self.line_end(buf, &mut i);
                        }
                    }
                }
                Line::Other => match memchr::memchr2(b'\n', b'\r', &buf[i..]) {
                    None => i = n,
                    Some(j) => {
                        i += j;
                        self.line_end(buf, &mut i);
                    }
                },
            }
        }
        if holding {
            let rest = &buf[seg..n];
            if self.passing {
                out.range(buf, seg, n);
            } else if self.held.len() + rest.len() > self.max_held {
                self.passing = true;
                out.bytes(buf, &self.held);
                self.held.clear();
                out.range(buf, seg, n);
            } else {
                self.held.extend_from_slice(rest);
            }
        }
        self.ev_len += n - seg;
        if end_of_stream {
            if self.ev_len > 0 || self.data_lines > 0 {
                // An unterminated last event: scanned, never dropped.
                self.passing = true;
                self.end_event(0);
            }
            if holding {
                out.bytes(buf, &self.held);
                self.held.clear();
            }
            self.cr_pending = false;
            self.cr_event = None;
            self.line = Line::Start;
        }
        if !holding {
            return chunk;
        }
        out.finish(&chunk)
    }

    /// A `data` field's value begins: lines after the first are joined with "\n".
    fn data_line(&mut self) {
        if self.data_lines > 0 {
            self.json.feed(&self.paths, b"\n");
        }
        self.data_lines += 1;
    }

    /// `buf[*i]` is `\r` or `\n`: steps over the line end (a `\r\n` is one).
    fn line_end(&mut self, buf: &[u8], i: &mut usize) {
        let b = buf[*i];
        *i += 1;
        if b == b'\r' {
            if *i == buf.len() {
                self.cr_pending = true;
                self.cr_event = None;
            } else if buf[*i] == b'\n' {
                *i += 1;
            }
        }
        self.line = Line::Start;
    }

    /// The event in progress ended, `size` bytes long: scans it, and says whether to drop it.
    fn end_event(&mut self, size: usize) -> bool {
        let dispatched = self.data_lines > 1 || (self.data_lines == 1 && self.data_any);
        let mut drop = false;
        if dispatched {
            self.json.finish(&self.paths);
            self.events += 1;
            for (i, slot) in self.last.iter_mut().enumerate() {
                if let Some(f) = self.json.get(i) {
                    Found::assign(slot, f);
                }
            }
            if let Some((carrier, empty)) = self.drop_when {
                drop = !self.passing
                    && size <= self.max_held
                    && matches!(self.json.get(carrier), Some(Found::Num(_)))
                    && matches!(self.json.get(empty), None | Some(Found::Null) | Some(Found::Array { empty: true }));
            }
            if drop {
                self.dropped += 1;
            }
        }
        self.json.reset();
        self.data_lines = 0;
        self.data_any = false;
        self.ev_len = 0;
        self.passing = false;
        self.line = Line::Start;
        drop
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_strict_scanner_notes_paths_that_occur_twice_and_keeps_the_first() {
        let paths = JsonPaths::new(&["max_tokens", "stream", "opts.n"]).unwrap();
        let dup = |doc: &str| {
            let mut s = JsonScan::strict(&paths);
            s.feed(&paths, doc.as_bytes());
            s.finish(&paths);
            (s.duplicated(), s.get(0).cloned())
        };
        assert_eq!(dup(r#"{"max_tokens":1,"stream":true}"#), (false, Some(Found::Num(1))));
        assert_eq!(dup(r#"{"max_tokens":1,"max_tokens":900}"#), (true, Some(Found::Num(1))));
        assert!(dup(r#"{"stream":false,"x":[1,{"stream":1}],"stream":true}"#).0);
        assert!(!dup(r#"{"opts":{"n":1},"opts":{"m":2}}"#).0, "an object twice, the path once");
        assert!(dup(r#"{"opts":{"n":1},"opts":{"n":2}}"#).0);
        assert_eq!(dup(r#"{"a":{"max_tokens":1},"max_tokens":2}"#), (false, Some(Found::Num(2))));
        // The default scanner stops at the first occurrences and notes nothing.
        let mut s = JsonScan::new(&paths);
        s.feed(&paths, br#"{"max_tokens":1,"stream":true,"opts":{"n":3},"max_tokens":2}"#);
        assert!(!s.duplicated());
    }

    #[test]
    fn a_strict_scanner_notes_keys_that_name_a_path_only_in_another_case() {
        let paths = JsonPaths::new(&["max_tokens", "stream", "opts.n"]).unwrap();
        let variant = |doc: &str| {
            let mut s = JsonScan::strict(&paths);
            s.feed(&paths, doc.as_bytes());
            s.finish(&paths);
            s.case_variant()
        };
        for doc in [
            r#"{"Max_Tokens":1}"#,
            r#"{"max_tokens":1,"MAX_TOKENS":2}"#,
            r#"{"STREAM":true}"#,
            r#"{"opts":{"N":1}}"#,
            r#"{"Opts":{"n":1}}"#,
            r#"{"max_to\u212Aens":1}"#,
            "{\"max_to\u{212A}ens\":1}",
            r#"{"\u017Ftream":true}"#,
        ] {
            assert!(variant(doc), "{doc}");
        }
        for doc in [
            r#"{"max_tokens":1,"stream":true,"opts":{"n":1}}"#,
            r#"{"x":{"Max_Tokens":1},"y":[{"STREAM":1}]}"#,
            r#"{"max_tokens_":1,"streams":true,"Max_Token":1}"#,
            r#"{"max_to\u212Aen":1}"#,
        ] {
            assert!(!variant(doc), "{doc}");
        }
        // After a member no path reads (the key is then read in place, not in the key buffer),
        // and split across chunks anywhere.
        for doc in [
            r#"{"messages":[],"Max_Tokens":900000}"#,
            r#"{"temperature":1,"opts":{"x":1,"N":50}}"#,
            "{\"model\":\"m\",\"max_to\u{212A}ens\":1}",
            r#"{"a":"b","STREAM":true}"#,
        ] {
            assert!(variant(doc), "{doc}");
            for cut in 1..doc.len() {
                let mut s = JsonScan::strict(&paths);
                s.feed(&paths, &doc.as_bytes()[..cut]);
                s.feed(&paths, &doc.as_bytes()[cut..]);
                s.finish(&paths);
                assert!(s.case_variant(), "{doc} cut at {cut}");
            }
        }
        assert!(!variant(r#"{"messages":[],"max_tokens":1,"temperature":0.5}"#));
        // A segment spelled with Kelvin signs is longer than any segment (3 bytes for each `k`).
        let ks = JsonPaths::new(&["kkkkkkkkkkkkkkkkkkkkkkkk"]).unwrap();
        let kelvins: String = std::iter::repeat_n('\u{212A}', 24).collect();
        for doc in [format!("{{\"{kelvins}\":1}}"), format!("{{\"x\":1,\"{kelvins}\":1}}")] {
            let mut s = JsonScan::strict(&ks);
            s.feed(&ks, doc.as_bytes());
            s.finish(&ks);
            assert!(s.case_variant(), "{doc}");
        }
        // The default scanner (answers) does not look.
        let mut s = JsonScan::new(&paths);
        s.feed(&paths, br#"{"Max_Tokens":1}"#);
        assert!(!s.case_variant());
    }
    use proptest::prelude::*;

    fn paths(p: &[&str]) -> JsonPaths {
        JsonPaths::new(p).expect("valid paths")
    }

    /// Scans `doc` fed in the pieces `splits` cuts it into; the values of every path.
    fn scan_split(p: &JsonPaths, doc: &[u8], splits: &[usize]) -> Vec<Option<Found>> {
        let mut s = JsonScan::new(p);
        let mut at = 0;
        for &cut in splits {
            let cut = cut.clamp(at, doc.len());
            s.feed(p, &doc[at..cut]);
            at = cut;
        }
        s.feed(p, &doc[at..]);
        s.finish(p);
        (0..p.len()).map(|i| s.get(i).cloned()).collect()
    }

    fn scan(p: &JsonPaths, doc: &str) -> Vec<Option<Found>> {
        scan_split(p, doc.as_bytes(), &[])
    }

    fn one(path: &str, doc: &str) -> Option<Found> {
        scan(&paths(&[path]), doc).remove(0)
    }

    fn s(t: &str) -> Option<Found> {
        Some(Found::Str { text: t.to_string(), truncated: false })
    }

    const CHAT: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"Hi \"there\"\n\u00e9\ud83d\ude00 \\ done"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21,"cost":12.000001}}"#;

    fn chat_paths() -> JsonPaths {
        paths(&[
            "usage.total_tokens",
            "model",
            "choices",
            "choices.0.message.content",
            "choices.0.index",
            "usage.cost",
            "usage",
            "choices.1",
            "missing",
        ])
    }

    #[test]
    fn finds_the_values_of_a_chat_completion() {
        let got = scan(&chat_paths(), CHAT);
        assert_eq!(
            got,
            vec![
                Some(Found::Num(21)),
                s("gpt-4o"),
                Some(Found::Array { empty: false }),
                s("Hi \"there\"\né😀 \\ done"),
                Some(Found::Num(0)),
                Some(Found::Num(13)),
                Some(Found::Object),
                None,
                None,
            ]
        );
    }

    /// Documents whose scan must not depend on where they are cut.
    fn representative() -> Vec<(JsonPaths, String)> {
        vec![
            (chat_paths(), CHAT.to_string()),
            (
                paths(&["a.b", "n", "t", "f", "z", "e", "k"]),
                r#" { "x" : [ {"b":1} , "}" ] , "a" : { "b" : -1.5e-3 } , "n" : 12345678901234567890 , "t" : true , "f":false,"z":null,"e":[ ],"k":"\uD83D\uDE00\ud800x\q\u12"}"#
                    .to_string(),
            ),
            (paths(&["n"]), r#"{"n":1e3}"#.to_string()),
            (paths(&["0.a", "1"]), r#"[{"a":"x\\\"y"},0.5]"#.to_string()),
            (paths(&["a"]), r#"{"a":4"#.to_string()),
        ]
    }

    #[test]
    fn every_two_piece_and_byte_by_byte_chunking_gives_the_whole_result() {
        for (p, doc) in representative() {
            let whole = scan(&p, &doc);
            assert!(whole.iter().any(Option::is_some), "{doc}");
            for cut in 0..=doc.len() {
                assert_eq!(scan_split(&p, doc.as_bytes(), &[cut]), whole, "{doc} cut at {cut}");
            }
            let every: Vec<usize> = (1..doc.len()).collect();
            assert_eq!(scan_split(&p, doc.as_bytes(), &every), whole, "{doc} byte by byte");
        }
    }

    #[test]
    fn the_second_representative_document_finds_each_kind() {
        let (p, doc) = &representative()[1];
        assert_eq!(
            scan(p, doc),
            vec![
                Some(Found::BadNum),
                Some(Found::Num(12345678901234567890)),
                Some(Found::Bool(true)),
                Some(Found::Bool(false)),
                Some(Found::Null),
                Some(Found::Array { empty: true }),
                s("😀\\ud800x\\q\\u12"),
            ]
        );
    }

    #[test]
    fn numbers() {
        let cases: &[(&str, Found)] = &[
            ("0", Found::Num(0)),
            ("21", Found::Num(21)),
            ("18446744073709551615", Found::Num(u64::MAX)),
            ("18446744073709551616", Found::Num(u64::MAX)),
            ("99999999999999999999999", Found::Num(u64::MAX)),
            ("12.2", Found::Num(13)),
            ("12.000001", Found::Num(13)),
            ("12.000", Found::Num(12)),
            ("0.0001", Found::Num(1)),
            ("0.0", Found::Num(0)),
            ("1e3", Found::Num(1000)),
            ("1E+3", Found::Num(1000)),
            ("1.25e2", Found::Num(125)),
            ("1.255e2", Found::Num(126)),
            ("1500e-3", Found::Num(2)),
            ("1000e-3", Found::Num(1)),
            ("1e400", Found::Num(u64::MAX)),
            ("1e-400", Found::Num(1)),
            ("0e5", Found::Num(0)),
            ("1.8446744073709551615e19", Found::Num(u64::MAX)),
            ("1.8446744073709551614e19", Found::Num(u64::MAX - 1)),
            ("-1", Found::BadNum),
            ("-0", Found::BadNum),
            ("00012", Found::BadNum),
            ("1.", Found::BadNum),
            ("1.e3", Found::BadNum),
            ("1e", Found::BadNum),
            ("1x", Found::BadNum),
            ("1.2.3", Found::BadNum),
        ];
        for (text, want) in cases {
            assert_eq!(one("n", &format!(r#"{{"n":{text}}}"#)).as_ref(), Some(want), "{text}");
            // At the very end of the document, completed by `finish`.
            assert_eq!(one("n", &format!(r#"{{"n":{text}"#)).as_ref(), Some(want), "{text} at end");
        }
        assert_eq!(one("n", r#"{"n":"12"}"#), s("12"), "a string is not a number");
        // `+` cannot start a JSON value: the document is malformed from there.
        assert_eq!(one("n", r#"{"n":+1}"#), None);
    }

    #[test]
    fn keys_are_compared_after_escape_decoding() {
        assert_eq!(one("usage.total_tokens", r#"{"us\u0061ge":{"total_tokens":7}}"#), Some(Found::Num(7)));
        assert!(JsonPaths::new(&["a\"b"]).is_err());
        // An escaped key that decodes to another name is that other name.
        assert_eq!(one("usage", r#"{"usage2":1,"us\u0067":2,"usage":3}"#), Some(Found::Num(3)));
        // A key longer than 64 bytes matches nothing, even if it starts with the path.
        let long = format!(r#"{{"{}":1,"a":2}}"#, "a".repeat(65));
        assert_eq!(one("a", &long), Some(Found::Num(2)));
        let key64 = "k".repeat(64);
        assert_eq!(one(&key64, &format!(r#"{{"{key64}":5}}"#)), Some(Found::Num(5)));
    }

    #[test]
    fn the_first_occurrence_wins() {
        let p = paths(&["a", "b.c"]);
        assert_eq!(
            scan(&p, r#"{"a":1,"b":{"c":2,"c":3},"a":4,"b":{"c":5}}"#),
            vec![Some(Found::Num(1)), Some(Found::Num(2))]
        );
        // A later occurrence fills a path the first did not carry.
        assert_eq!(scan(&p, r#"{"b":{"x":2},"b":{"c":6}}"#), vec![None, Some(Found::Num(6))]);
    }

    #[test]
    fn container_values() {
        let p = paths(&["o", "a", "e", "o.x"]);
        assert_eq!(
            scan(&p, r#"{"o":{"x":[1,{"y":2}]},"a":[[]],"e":[ ]}"#),
            vec![
                Some(Found::Object),
                Some(Found::Array { empty: false }),
                Some(Found::Array { empty: true }),
                Some(Found::Array { empty: false }),
            ]
        );
        assert_eq!(one("a.2.b", r#"{"a":[{"b":1},{"b":2},{"b":3}]}"#), Some(Found::Num(3)));
        assert_eq!(one("a.1", r#"{"a":[0,[1,2],7]}"#), Some(Found::Array { empty: false }));
        assert_eq!(one("a.01", r#"{"a":[0,9]}"#), None, "01 is no index");
        assert_eq!(one("a.01", r#"{"a":{"01":9}}"#), Some(Found::Num(9)));
    }

    #[test]
    fn nesting_deeper_than_the_stacks_keeps_the_shape() {
        for depth in [63, 64, 65, 200, 100_000] {
            let doc = format!(r#"{{"deep":{}1{},"usage":{{"total_tokens":3}}}}"#, "[".repeat(depth), "]".repeat(depth));
            assert_eq!(one("usage.total_tokens", &doc), Some(Found::Num(3)), "depth {depth}");
            let doc = format!(
                r#"{{"deep":{}1{},"usage":{{"total_tokens":3}}}}"#,
                r#"{"a":"#.repeat(depth),
                "}".repeat(depth)
            );
            assert_eq!(one("usage.total_tokens", &doc), Some(Found::Num(3)), "depth {depth}");
        }
        // A wrong closer inside the checked levels ends the scan: `usage` would otherwise be
        // read inside the array `a`.
        assert_eq!(one("usage", r#"{"a":[1},"usage":5]}"#), None);
        assert_eq!(one("usage", r#"{"a":{"b":[1}},"usage":5}"#), None);
    }

    #[test]
    fn a_megabyte_string_is_skipped_and_truncated() {
        let big = "x".repeat(1 << 20);
        let doc = format!(r#"{{"s":"{big}","t":"{big}","n":1}}"#);
        let got = scan(&paths(&["t", "n"]), &doc);
        assert_eq!(got[0], Some(Found::Str { text: "x".repeat(256), truncated: true }));
        assert_eq!(got[1], Some(Found::Num(1)));
        // Exactly 256 bytes is not truncated; a multibyte character never split.
        assert_eq!(one("t", &format!(r#"{{"t":"{}"}}"#, "y".repeat(256))), s(&"y".repeat(256)));
        let doc = format!(r#"{{"t":"{}é"}}"#, "y".repeat(255));
        assert_eq!(one("t", &doc), Some(Found::Str { text: "y".repeat(255), truncated: true }));
        let doc = format!(r#"{{"t":"{}\u00e9"}}"#, "y".repeat(255));
        assert_eq!(one("t", &doc), Some(Found::Str { text: "y".repeat(255), truncated: true }));
    }

    #[test]
    fn malformed_documents_keep_what_came_before() {
        let p = paths(&["a", "b"]);
        assert_eq!(scan(&p, r#"{"a":"ends mid-str"#), vec![None, None]);
        assert_eq!(scan(&p, r#"{"a":1,"b":"ends mid-str"#), vec![Some(Found::Num(1)), None]);
        assert_eq!(scan(&p, r#"{"a":1 garbage "b":2}"#), vec![Some(Found::Num(1)), None]);
        assert_eq!(scan(&p, r#"{"a":1,,"b":2}"#), vec![Some(Found::Num(1)), None]);
        assert_eq!(scan(&p, r#"{"a":tru,"b":2}"#), vec![None, None]);
        assert_eq!(scan(&p, r#"{"a" 1,"b":2}"#), vec![None, None]);
        assert_eq!(scan(&p, r#"{"a":1,}"#), vec![Some(Found::Num(1)), None]);
        assert_eq!(scan(&p, "[DONE]"), vec![None, None]);
        assert_eq!(scan(&p, ""), vec![None, None]);
        assert_eq!(scan(&p, "\u{0}\u{ff}{{{]]]\"\\"), vec![None, None]);
        // An array is reported once its first element (or its end) shows whether it is empty.
        assert_eq!(scan(&p, r#"{"a":[1,2"#), vec![Some(Found::Array { empty: false }), None]);
        assert_eq!(scan(&p, r#"{"a":[ "#), vec![None, None]);
        // A document after the root value is ignored.
        assert_eq!(scan(&p, r#"{"x":1} {"a":2}"#), vec![None, None]);
    }

    #[test]
    fn reset_scans_the_next_document_afresh() {
        let p = paths(&["m", "n"]);
        let mut sc = JsonScan::new(&p);
        sc.feed(&p, br#"{"m":"first","n":1}"#);
        sc.finish(&p);
        assert_eq!(sc.get(0).cloned(), s("first"));
        sc.reset();
        sc.feed(&p, br#"{"n":2,"m":"second"}"#);
        sc.finish(&p);
        assert_eq!(sc.get(0).cloned(), s("second"));
        assert_eq!(sc.get(1), Some(&Found::Num(2)));
        assert_eq!(sc.get(2), None);
    }

    #[test]
    fn path_errors_say_what_to_write() {
        for bad in ["", "a..b", ".a", "a.", "a\\b", "a.b.c.d.e.f.g.h.i"] {
            let e = JsonPaths::new(&[bad]).err().unwrap_or_default();
            assert!(e.contains("write") || e.contains("point at"), "{bad:?}: {e}");
        }
        assert!(JsonPaths::new(&["a".repeat(65)]).is_err());
        assert!(JsonPaths::new(&["a", "a"]).is_err());
        let many: Vec<String> = (0..17).map(|i| format!("p{i}")).collect();
        assert!(JsonPaths::new(&many).is_err());
        let p = JsonPaths::new(&many[..16]).expect("16 paths");
        assert_eq!(p.len(), 16);
        assert_eq!(p.index_of("p15"), Some(15));
        assert_eq!(p.index_of("p16"), None);
        assert!(JsonPaths::new::<&str>(&[]).expect("none").is_empty());
        let doc: String = format!("{{{}}}", (0..16).map(|i| format!(r#""p{i}":{i}"#)).collect::<Vec<_>>().join(","));
        let got = scan(&p, &doc);
        assert_eq!(got[15], Some(Found::Num(15)));
        assert!(got.iter().all(Option::is_some));
    }

    // ---- SSE ----

    fn chat_event(content: &str) -> String {
        format!(
            "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}}}}],\"usage\":null}}\n\n"
        )
    }

    const USAGE_EVENT: &str = "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":12,\"total_tokens\":21}}\n\n";

    /// A chat stream with `include_usage`: chunks, the usage event, `[DONE]`; and what the
    /// client sees when the usage event is removed.
    fn chat_stream() -> (String, String) {
        let mut chunks = String::new();
        for c in ["Hel", "lo", " \\\"world\\\""] {
            chunks.push_str(&chat_event(c));
        }
        let full = format!("{chunks}: keep-alive\n\n{USAGE_EVENT}data: [DONE]\n\n");
        let filtered = format!("{chunks}: keep-alive\n\ndata: [DONE]\n\n");
        (full, filtered)
    }

    fn sse_paths() -> Arc<JsonPaths> {
        Arc::new(paths(&["usage.total_tokens", "choices"]))
    }

    struct SseRun {
        out: Vec<u8>,
        total: Option<Found>,
        choices: Option<Found>,
        events: u64,
        dropped: u64,
    }

    /// Feeds `stream` cut at `splits` (the last piece marked end of stream).
    fn sse_split(stream: &[u8], splits: &[usize], drop_when: Option<(usize, usize)>, max_held: usize) -> SseRun {
        let mut sc = SseScan::new(sse_paths(), drop_when, max_held);
        let mut out = Vec::new();
        let mut at = 0;
        for &cut in splits {
            let cut = cut.clamp(at, stream.len());
            out.extend_from_slice(&sc.feed(Bytes::copy_from_slice(&stream[at..cut]), false));
            at = cut;
        }
        out.extend_from_slice(&sc.feed(Bytes::copy_from_slice(&stream[at..]), true));
        SseRun {
            out,
            total: sc.last(0).cloned(),
            choices: sc.last(1).cloned(),
            events: sc.events(),
            dropped: sc.dropped(),
        }
    }

    #[test]
    fn the_usage_event_settles_and_is_dropped() {
        let (full, filtered) = chat_stream();
        let r = sse_split(full.as_bytes(), &[], Some((0, 1)), 64 * 1024);
        assert_eq!(String::from_utf8_lossy(&r.out), filtered);
        assert_eq!(r.total, Some(Found::Num(21)));
        assert_eq!(r.choices, Some(Found::Array { empty: true }), "the last event carrying choices");
        assert_eq!((r.events, r.dropped), (5, 1));
        // Without drop_when the same stream passes whole, in the same buffer.
        let mut sc = SseScan::new(sse_paths(), None, 64 * 1024);
        let input = Bytes::from(full.clone());
        let out = sc.feed(input.clone(), true);
        assert_eq!(out.as_ptr(), input.as_ptr());
        assert_eq!(out.len(), input.len());
        assert_eq!(sc.last(0), Some(&Found::Num(21)));
        assert_eq!((sc.events(), sc.dropped()), (5, 0));
    }

    #[test]
    fn events_that_do_not_match_the_filter_are_kept() {
        // Usage present but choices not empty: kept. Usage not a number: kept.
        let kept = concat!(
            "data: {\"choices\":[{\"index\":0}],\"usage\":{\"total_tokens\":5}}\n\n",
            "data: {\"choices\":[],\"usage\":{\"total_tokens\":\"5\"}}\n\n",
            "data: {\"choices\":[],\"usage\":{\"total_tokens\":-5}}\n\n",
        );
        let r = sse_split(kept.as_bytes(), &[], Some((0, 1)), 1024);
        assert_eq!(String::from_utf8_lossy(&r.out), kept);
        assert_eq!(r.dropped, 0);
        assert_eq!(r.total, Some(Found::BadNum), "the last event carrying the path");
        // Absent or null `choices` count as empty.
        for ev in [
            "data: {\"usage\":{\"total_tokens\":5}}\n\n",
            "data: {\"choices\":null,\"usage\":{\"total_tokens\":5}}\n\n",
        ] {
            let r = sse_split(ev.as_bytes(), &[], Some((0, 1)), 1024);
            assert_eq!((r.out.len(), r.dropped), (0, 1), "{ev}");
        }
    }

    #[test]
    fn every_chunking_of_a_stream_gives_the_same_bytes_and_values() {
        let (full, filtered) = chat_stream();
        let crlf = full.replace('\n', "\r\n");
        let cr = full.replace('\n', "\r");
        for (stream, want) in [
            (full.clone(), filtered.clone()),
            (crlf.clone(), filtered.replace('\n', "\r\n")),
            (cr.clone(), filtered.replace('\n', "\r")),
        ] {
            let b = stream.as_bytes();
            let whole = sse_split(b, &[], Some((0, 1)), 64 * 1024);
            assert_eq!(String::from_utf8_lossy(&whole.out), want);
            assert_eq!(whole.total, Some(Found::Num(21)));
            for cut in 0..=b.len() {
                for drop_when in [None, Some((0, 1))] {
                    let r = sse_split(b, &[cut], drop_when, 64 * 1024);
                    let want_out = if drop_when.is_some() { want.as_bytes() } else { b };
                    assert_eq!(r.out, want_out, "cut at {cut}");
                    assert_eq!((&r.total, &r.choices), (&whole.total, &whole.choices), "cut at {cut}");
                    assert_eq!(r.events, 5);
                }
            }
            let every: Vec<usize> = (1..b.len()).collect();
            let r = sse_split(b, &every, Some((0, 1)), 64 * 1024);
            assert_eq!(r.out, want.as_bytes(), "byte by byte");
            assert_eq!(r.dropped, 1);
        }
    }

    #[test]
    fn line_ends_and_fields() {
        // Mixed line ends, a field without a space after the colon, event/id/retry fields,
        // comments, and data split over lines (joined with \n, a valid JSON whitespace).
        let stream = "event: response.completed\r\nid: 7\rretry: 10\n:c\ndata:{\"usage\":\r\ndata: {\"total_tokens\"\ndata: :4}}\r\r\n";
        let r = sse_split(stream.as_bytes(), &[], Some((0, 1)), 1024);
        assert_eq!(r.total, Some(Found::Num(4)));
        assert_eq!(r.events, 1);
        assert_eq!((r.out.len(), r.dropped), (0, 1));
        // The `\n` after the blank line's `\r` belongs to that dropped event: the next event
        // keeps its own bytes only.
        let two = "data: {\"usage\":{\"total_tokens\":4}}\r\r\ndata: 1\r\r\n";
        for cut in 0..=two.len() {
            let r = sse_split(two.as_bytes(), &[cut], Some((0, 1)), 1024);
            assert_eq!(String::from_utf8_lossy(&r.out), "data: 1\r\r\n", "cut {cut}");
            assert_eq!(r.events, 2);
        }
        // `data` must be the whole field name; `data` without a colon is an empty data line.
        let r = sse_split(b"datax: {\"usage\":{\"total_tokens\":4}}\n\n", &[], None, 1024);
        assert_eq!((r.total, r.events), (None, 0));
        let r = sse_split(b"data\ndata\n\n", &[], None, 1024);
        assert_eq!(r.events, 1, "two empty data lines are an event with data \"\\n\"");
        let r = sse_split(b"data:\n\n: ping\n\n", &[], Some((0, 1)), 1024);
        assert_eq!((r.events, r.out.len()), (0, 15));
    }

    #[test]
    fn a_data_line_split_at_every_offset() {
        let ev = "data: {\"type\":\"response.completed\",\"response\":{\"id\":\"r1\",\"usage\":{\"input_tokens\":3,\"output_tokens\":4,\"total_tokens\":7}}}\n\n";
        let stream = format!(
            "event: response.created\ndata: {{\"type\":\"response.created\"}}\n\nevent: response.completed\n{ev}"
        );
        let p = Arc::new(paths(&["response.usage.total_tokens", "type"]));
        for a in 0..stream.len() {
            for b in [a + 1, a + 7, stream.len()] {
                let mut sc = SseScan::new(p.clone(), None, 1024);
                let b = b.min(stream.len());
                let bytes = stream.as_bytes();
                sc.feed(Bytes::copy_from_slice(&bytes[..a]), false);
                sc.feed(Bytes::copy_from_slice(&bytes[a..b]), false);
                sc.feed(Bytes::copy_from_slice(&bytes[b..]), true);
                assert_eq!(sc.last(0), Some(&Found::Num(7)), "cut {a} {b}");
                assert_eq!(sc.last(1).cloned(), s("response.completed"));
                assert_eq!(sc.events(), 2);
            }
        }
    }

    #[test]
    fn events_larger_than_max_held_pass_as_they_come() {
        let pad = "x".repeat(300);
        let big = format!("data: {{\"pad\":\"{pad}\",\"choices\":[],\"usage\":{{\"total_tokens\":8}}}}\n\n");
        let small = "data: {\"choices\":[],\"usage\":{\"total_tokens\":2}}\n\n";
        let stream = format!("{big}{small}");
        let b = stream.as_bytes();
        for max_held in [big.len() - 2, big.len() - 1] {
            for cut in 0..=b.len() {
                let r = sse_split(b, &[cut, cut + 40], Some((0, 1)), max_held);
                assert_eq!(String::from_utf8_lossy(&r.out), big, "max {max_held} cut {cut}");
                assert_eq!((r.dropped, r.total.clone()), (1, Some(Found::Num(2))));
            }
        }
        // An event of exactly max_held bytes up to its blank line's first byte can be dropped.
        let r = sse_split(b, &[100], Some((0, 1)), big.len());
        assert_eq!((r.out.len(), r.dropped), (0, 2));
        // When an event passes early, the bytes sent before its end are its own, in order.
        let mut sc = SseScan::new(sse_paths(), Some((0, 1)), 64);
        let first = sc.feed(Bytes::copy_from_slice(&b[..50]), false);
        assert!(first.is_empty(), "50 bytes are held");
        let second = sc.feed(Bytes::copy_from_slice(&b[50..100]), false);
        assert_eq!(&second[..], &b[..100], "held bytes and the new ones, once past 64");
    }

    #[test]
    fn an_unterminated_last_event_is_scanned_but_not_dropped() {
        let stream = "data: {\"choices\":[],\"usage\":{\"total_tokens\":9}}";
        for cut in 0..=stream.len() {
            let r = sse_split(stream.as_bytes(), &[cut], Some((0, 1)), 1024);
            assert_eq!(r.out, stream.as_bytes());
            assert_eq!((r.total.clone(), r.events, r.dropped), (Some(Found::Num(9)), 1, 0));
        }
        // A number ending the stream completes at the end.
        let r = sse_split(b"data: {\"usage\":{\"total_tokens\":9", &[], None, 1024);
        assert_eq!(r.total, Some(Found::Num(9)));
    }

    // ---- Property tests against serde_json ----

    /// A JSON text for `v` with keys and strings escaped at random (`\uXXXX`, surrogate pairs,
    /// the short escapes, `\/`), and random whitespace.
    fn render(v: &serde_json::Value, rng: &mut u64, out: &mut String) {
        fn next(rng: &mut u64) -> u64 {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            *rng
        }
        fn ws(rng: &mut u64, out: &mut String) {
            match next(rng) % 8 {
                0 => out.push(' '),
                1 => out.push_str("\n\t "),
                _ => {}
            }
        }
        fn string(t: &str, rng: &mut u64, out: &mut String) {
            out.push('"');
            for c in t.chars() {
                let r = next(rng) % 4;
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str(if r == 0 { "\\u000a" } else { "\\n" }),
                    c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                    '/' if r == 0 => out.push_str("\\/"),
                    c if r == 0 => {
                        let mut units = [0u16; 2];
                        for u in c.encode_utf16(&mut units) {
                            out.push_str(&format!("\\u{u:04X}"));
                        }
                    }
                    c => out.push(c),
                }
            }
            out.push('"');
        }
        ws(rng, out);
        match v {
            serde_json::Value::Object(m) => {
                out.push('{');
                for (i, (k, x)) in m.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    ws(rng, out);
                    string(k, rng, out);
                    ws(rng, out);
                    out.push(':');
                    render(x, rng, out);
                }
                ws(rng, out);
                out.push('}');
            }
            serde_json::Value::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    render(x, rng, out);
                }
                ws(rng, out);
                out.push(']');
            }
            serde_json::Value::String(t) => string(t, rng, out),
            other => out.push_str(&other.to_string()),
        }
        ws(rng, out);
    }

    /// What the scanner must report for a value serde_json found.
    fn expected(v: &serde_json::Value) -> Found {
        match v {
            serde_json::Value::Null => Found::Null,
            serde_json::Value::Bool(b) => Found::Bool(*b),
            serde_json::Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), _, _) => Found::Num(u),
                (None, Some(_), _) => Found::BadNum,
                (_, _, Some(f)) if f < 0.0 => Found::BadNum,
                (_, _, Some(f)) => Found::Num(f.ceil() as u64),
                _ => Found::BadNum,
            },
            serde_json::Value::String(t) => {
                let mut end = t.len().min(MAX_STR);
                while !t.is_char_boundary(end) {
                    end -= 1;
                }
                Found::Str { text: t[..end].to_string(), truncated: end < t.len() }
            }
            serde_json::Value::Array(a) => Found::Array { empty: a.is_empty() },
            serde_json::Value::Object(_) => Found::Object,
        }
    }

    /// Every path of `v` (as segments) that a [`JsonPaths`] can express.
    fn all_paths(v: &serde_json::Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        if prefix.len() == MAX_SEGMENTS {
            return;
        }
        let children: Vec<(String, &serde_json::Value)> = match v {
            serde_json::Value::Object(m) => m.iter().map(|(k, x)| (k.clone(), x)).collect(),
            serde_json::Value::Array(a) => a.iter().enumerate().map(|(i, x)| (i.to_string(), x)).collect(),
            _ => return,
        };
        for (k, x) in children {
            if k.is_empty()
                || k.len() > MAX_SEGMENT_LEN
                || k.contains(|c: char| c == '.' || c == '"' || c == '\\' || c < ' ')
            {
                continue;
            }
            prefix.push(k);
            out.push(prefix.clone());
            all_paths(x, prefix, out);
            prefix.pop();
        }
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let key =
            prop_oneof!["[a-c]{1,2}", "[0-3]", Just("usage".to_string()), "[a-zé😀/~\"\\\\\n.]{1,4}", "k{60,70}",];
        let text = prop_oneof!["[a-z \"\\\\/\n\t\u{1}é😀]{0,12}", "x{250,260}", "[é😀]{120,130}",];
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<u64>().prop_map(serde_json::Value::from),
            (0u64..1000).prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            (0u32..1_000_000, 1u32..100)
                .prop_map(|(a, b)| serde_json::Value::from(f64::from(a) + f64::from(b) / 100.0)),
            text.prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(5, 48, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(serde_json::Value::Array),
                prop::collection::btree_map(key.clone(), inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn pointer(segs: &[String]) -> String {
        segs.iter().map(|s| format!("/{}", s.replace('~', "~0").replace('/', "~1"))).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn finds_what_serde_json_finds(
            v in json_value(),
            seed in 1u64..u64::MAX,
            pick in prop::collection::vec(any::<prop::sample::Index>(), 1..16),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let mut text = String::new();
            let mut rng = seed;
            render(&v, &mut rng, &mut text);
            prop_assert_eq!(&serde_json::from_str::<serde_json::Value>(&text).expect("valid"), &v);
            let mut candidates = Vec::new();
            all_paths(&v, &mut Vec::new(), &mut candidates);
            let mut chosen: Vec<Vec<String>> = Vec::new();
            for ix in &pick {
                if candidates.is_empty() { break; }
                let c = &candidates[ix.index(candidates.len())];
                if !chosen.contains(c) { chosen.push(c.clone()); }
            }
            // A path the value lacks, too.
            chosen.push(vec!["zz".to_string(), "0".to_string()]);
            let dotted: Vec<String> = chosen.iter().map(|c| c.join(".")).collect();
            let p = JsonPaths::new(&dotted).expect("paths from the value");
            let mut splits: Vec<usize> = cuts.iter().map(|c| c.index(text.len() + 1)).collect();
            splits.sort_unstable();
            let got = scan_split(&p, text.as_bytes(), &splits);
            for (i, c) in chosen.iter().enumerate() {
                let want = v.pointer(&pointer(c)).map(expected);
                prop_assert_eq!(&got[i], &want, "path {} in {}", dotted[i], text);
            }
        }

        #[test]
        fn random_chunkings_agree(doc_ix in 0usize..5, cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12)) {
            let (p, doc) = &representative()[doc_ix];
            let mut splits: Vec<usize> = cuts.iter().map(|c| c.index(doc.len() + 1)).collect();
            splits.sort_unstable();
            prop_assert_eq!(scan_split(p, doc.as_bytes(), &splits), scan(p, doc));
        }

        #[test]
        fn random_chunkings_of_a_stream_agree(
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
            line_end in 0usize..3,
            max_held in prop_oneof![Just(64 * 1024), 100usize..200],
        ) {
            let (full, _) = chat_stream();
            let stream = match line_end { 0 => full, 1 => full.replace('\n', "\r\n"), _ => full.replace('\n', "\r") };
            let b = stream.as_bytes();
            let mut splits: Vec<usize> = cuts.iter().map(|c| c.index(b.len() + 1)).collect();
            splits.sort_unstable();
            let whole = sse_split(b, &[], Some((0, 1)), max_held);
            let r = sse_split(b, &splits, Some((0, 1)), max_held);
            prop_assert_eq!(&r.out, &whole.out);
            prop_assert_eq!((&r.total, &r.choices, r.events, r.dropped), (&whole.total, &whole.choices, whole.events, whole.dropped));
            // The usage event is dropped when it fits in what is held: its size counts the
            // blank line's first byte, not the `\n` of its `\r\n`.
            let size = USAGE_EVENT.len() + usize::from(line_end == 1);
            prop_assert_eq!(r.dropped, u64::from(max_held >= size));
        }
    }
}
