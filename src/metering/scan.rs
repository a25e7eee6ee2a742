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
//! - A string, array or literal cut off by the end of the document is not reported; a number
//!   cut off there is (it may have been complete).

use bytes::{Bytes, BytesMut};
use std::sync::Arc;

/// At most this many paths in one [`JsonPaths`] (they are tracked in a `u16` bit set).
pub const MAX_PATHS: usize = 16;
/// At most this many segments in one path.
pub const MAX_SEGMENTS: usize = 8;
/// At most this many bytes in one segment, and in a key the scanner compares.
pub const MAX_SEGMENT_LEN: usize = 64;
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

    /// The paths of `alive` whose segment `d` is `key`.
    fn match_key(&self, alive: u16, d: usize, key: &[u8]) -> u16 {
        let mut out = 0;
        let mut bits = alive;
        while bits != 0 {
            let p = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            if let Some(seg) = self.paths.get(p).and_then(|p| p.segs.get(d)) {
                if *seg.text == *key {
                    out |= 1 << p;
                }
            }
        }
        out
    }

    /// The paths of `alive` whose segment `d` is the array index `index`.
    fn match_index(&self, alive: u16, d: usize, index: u64) -> u16 {
        let mut out = 0;
        let mut bits = alive;
        while bits != 0 {
            let p = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            if let Some(seg) = self.paths.get(p).and_then(|p| p.segs.get(d)) {
                if seg.index == Some(index) {
                    out |= 1 << p;
                }
            }
        }
        out
    }
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
    key: [u8; MAX_SEGMENT_LEN],
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
            key: [0; MAX_SEGMENT_LEN],
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
            if self.found_mask == self.all {
                // Only the first occurrence counts: nothing left to find.
                self.state = St::Done;
            }
            match self.state {
                St::Done | St::Dead => return,
                St::Str => {
                    let rest = &chunk[i..];
                    match memchr::memchr2(b'"', b'\\', rest) {
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
                St::SkipStr => match memchr::memchr2(b'"', b'\\', &chunk[i..]) {
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
                            b'"' => {
                                self.state = St::SkipStr;
                                break;
                            }
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
                                if self.skip_depth == 0 {
                                    self.after_value();
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
                    if is_ws(b) {
                        i += 1;
                    } else if self.structural(paths, b) {
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
                if top.alive & !self.found_mask == 0 {
                    self.to_skip();
                    return false;
                }
                self.element_match(paths);
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
                if top.alive & !self.found_mask == 0 {
                    self.state = St::ObjFirst;
                    self.to_skip();
                    return false;
                }
                self.sink = Sink::Key;
                self.key_len = 0;
                self.key_over = false;
                self.state = St::Str;
                true
            }
            St::Colon => {
                self.state = if b == b':' { St::Value } else { St::Dead };
                true
            }
            St::After => {
                if self.nframes == 0 {
                    self.state = St::Done;
                    return true;
                }
                match b {
                    b',' => {
                        let top = &mut self.frames[self.nframes - 1];
                        if top.array {
                            top.index += 1;
                            self.element_match(paths);
                            self.state = St::Value;
                        } else {
                            self.state = St::Key;
                        }
                    }
                    b'}' | b']' => self.close(b),
                    _ => self.state = St::Dead,
                }
                true
            }
            _ => true,
        }
    }

    /// Turns the innermost frame (just opened, or with nothing left to find) into skipped
    /// content of one level.
    fn to_skip(&mut self) {
        self.nframes -= 1;
        let array = self.frames[self.nframes].array;
        self.skip_depth = 1;
        self.skip_kinds = u64::from(array);
        self.state = St::Skip;
    }

    fn element_match(&mut self, paths: &JsonPaths) {
        let d = self.nframes - 1;
        let top = self.frames[d];
        let cur = paths.match_index(top.alive & !self.found_mask, d, top.index);
        self.set_pending(paths, cur, d);
    }

    fn set_pending(&mut self, paths: &JsonPaths, cur: u16, d: usize) {
        let target = cur & paths.ends_at[d];
        self.pending_target = if target == 0 { NONE } else { target.trailing_zeros() as u8 };
        self.pending_carry = cur & paths.longer[d];
    }

    fn begin_value(&mut self, b: u8) -> bool {
        let t = self.pending_target;
        let carry = self.pending_carry & !self.found_mask;
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
                let alive = self.frames[d].alive & !self.found_mask;
                let cur = if self.key_over { 0 } else { paths.match_key(alive, d, &self.key[..self.key_len]) };
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
                if self.key_over || self.key_len + b.len() > MAX_SEGMENT_LEN {
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
