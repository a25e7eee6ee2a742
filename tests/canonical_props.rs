//! Property tests for the canonical request view (`pipeline::canonical`).
//!
//! Every gateway stage, and the upstream, acts on the one value `canonicalize` builds, so these
//! properties state what makes that value safe to share: it is a fixed point (forwarding it and
//! reading it again changes nothing), it has one shape, every spelling of a path or a host that
//! it accepts collapses to the same canonical form, and the rule matcher sees exactly what is
//! forwarded. A spelling may be refused; it may never be accepted as something else.

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use proptest::prelude::*;
use std::path::Path;
use tollgate::config::{self, Config, Diagnostics, DEFAULT_METHODS};
use tollgate::error::Reject;
use tollgate::pipeline::canonical::{canonical_host, canonicalize, normalize_path, normalize_query, RequestPolicy};
use tollgate::rules::matcher::RequestView;

// ---- fixtures ----

fn methods() -> Vec<Method> {
    DEFAULT_METHODS.iter().map(|m| Method::from_bytes(m.as_bytes()).unwrap()).collect()
}

/// Owns what a [`RequestPolicy`] borrows, so each property can build one.
struct Fixture {
    methods: Vec<Method>,
    keys: Vec<HeaderName>,
    tenant: HeaderName,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture {
            methods: methods(),
            keys: vec![HeaderName::from_static("x-api-key")],
            tenant: HeaderName::from_static("x-tenant-id"),
        }
    }

    fn policy(&self) -> RequestPolicy<'_> {
        RequestPolicy {
            allowed_methods: &self.methods,
            allow_header: "GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH",
            key_headers: &self.keys,
            tenant_header: Some(&self.tenant),
            rule_headers: &[],
            read_headers: &[],
            read_query: &[],
        }
    }
}

fn host_headers(host: Option<&str>) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Some(host) = host {
        h.insert(http::header::HOST, HeaderValue::from_str(host).unwrap());
    }
    h
}

/// What a property compares: the method, host, path, query and whether the target was rewritten.
#[derive(Debug, Clone, PartialEq, Eq)]
struct View {
    host: String,
    path: String,
    query: Option<String>,
    rewritten: bool,
    target: String,
}

fn canon(fx: &Fixture, method: &str, target: &str, host: Option<&str>) -> Result<View, Reject> {
    let m = Method::from_bytes(method.as_bytes()).unwrap();
    let h = host_headers(host);
    canonicalize(&m, target.as_bytes(), &h, &fx.policy()).map(|c| View {
        host: c.host().to_string(),
        path: c.path().to_string(),
        query: c.query().map(str::to_string),
        rewritten: c.rewritten(),
        target: c.target(),
    })
}

// ---- generators ----

const UNRESERVED_PUNCT: &[char] = &['-', '.', '_', '~'];
/// Path characters that are neither unreserved nor refused: they pass through unchanged.
const SUB_DELIMS: &[char] = &['!', '$', '&', '\'', '(', ')', '*', '+', ',', '=', ':', '@'];

fn is_unreserved(c: char) -> bool {
    c.is_ascii_alphanumeric() || UNRESERVED_PUNCT.contains(&c)
}

/// One character of a path as written, kept apart from escapes so a transformation can
/// percent-encode a literal without splitting an escape that is already there.
#[derive(Debug, Clone)]
enum Tok {
    Lit(char),
    /// `%XX` of a byte that is not unreserved, in whatever hex case it was written.
    Esc(String),
}

fn tok() -> impl Strategy<Value = Tok> {
    prop_oneof![
        6 => prop::sample::select(
            ('a'..='z').chain('A'..='Z').chain('0'..='9').chain(UNRESERVED_PUNCT.iter().copied()).collect::<Vec<_>>()
        )
        .prop_map(Tok::Lit),
        1 => prop::sample::select(SUB_DELIMS.to_vec()).prop_map(Tok::Lit),
        // Escapes of bytes that stay encoded: space, `"`, `%`, `?`, `#`, `/`-free and NUL-free.
        1 => (prop::sample::select(vec![0x20u8, 0x22, 0x25, 0x3f, 0x23, 0x7f, 0xc3, 0xa9, 0xff]), any::<bool>())
            .prop_map(|(b, lower)| Tok::Esc(if lower { format!("%{b:02x}") } else { format!("%{b:02X}") })),
    ]
}

/// A path as segments of tokens; `trailing` adds a final `/`.
#[derive(Debug, Clone)]
struct PathSpec {
    segs: Vec<Vec<Tok>>,
    trailing: bool,
}

fn path_spec() -> impl Strategy<Value = PathSpec> {
    (prop::collection::vec(prop::collection::vec(tok(), 1..6), 0..5), any::<bool>())
        .prop_map(|(segs, trailing)| PathSpec { segs, trailing })
}

/// How one spelling of a path differs from the plain one.
#[derive(Debug, Clone)]
struct Spelling {
    /// Per literal (cycled): 0 = as is, 1 = `%xx`, 2 = `%XX`; only unreserved characters.
    encode: Vec<u8>,
    /// Per slash (cycled): 0 = as is, 1 = `//`, 2 = `/./`, 3 = `/x/../` (with a random segment).
    slash: Vec<u8>,
    junk: String,
}

fn spelling() -> impl Strategy<Value = Spelling> {
    (prop::collection::vec(0u8..3, 1..16), prop::collection::vec(0u8..4, 1..8), "[a-z0-9._~-]{1,6}").prop_map(
        |(encode, slash, junk)| Spelling {
            encode,
            slash,
            // `.` and `..` are dot segments themselves; `x/../` needs a real segment.
            junk: if junk.chars().all(|c| c == '.') { format!("{junk}x") } else { junk },
        },
    )
}

/// The same path with no segment that is `.` or `..` on its own, for properties about the
/// segments under a fixed prefix (a `..` among them would leave the prefix, as it should).
fn without_dot_segments(mut spec: PathSpec) -> PathSpec {
    for seg in &mut spec.segs {
        if seg.len() <= 2 && seg.iter().all(|t| matches!(t, Tok::Lit('.'))) {
            seg.push(Tok::Lit('z'));
        }
    }
    spec
}

fn render(spec: &PathSpec, sp: Option<&Spelling>) -> String {
    let mut out = String::new();
    let mut lit = 0usize;
    let mut slash = 0usize;
    let mut push_slash = |out: &mut String| {
        out.push('/');
        if let Some(sp) = sp {
            match sp.slash[slash % sp.slash.len()] {
                1 => out.push('/'),
                2 => out.push_str("./"),
                3 => {
                    out.push_str(&sp.junk);
                    out.push_str("/../");
                }
                _ => {}
            }
        }
        slash += 1;
    };
    if spec.segs.is_empty() {
        push_slash(&mut out);
        return out;
    }
    for seg in &spec.segs {
        push_slash(&mut out);
        for t in seg {
            match t {
                Tok::Esc(e) => out.push_str(e),
                Tok::Lit(c) => {
                    let how = sp.map_or(0, |sp| sp.encode[lit % sp.encode.len()]);
                    lit += 1;
                    match how {
                        1 if is_unreserved(*c) => out.push_str(&format!("%{:02x}", *c as u8)),
                        2 if is_unreserved(*c) => out.push_str(&format!("%{:02X}", *c as u8)),
                        _ => out.push(*c),
                    }
                }
            }
        }
    }
    if spec.trailing {
        push_slash(&mut out);
    }
    out
}

/// A query of mixed literals and escapes (either hex case, any byte but the ones that end it).
fn query() -> impl Strategy<Value = Option<String>> {
    let part = prop_oneof![
        3 => "[a-zA-Z0-9._~=&+!$'()*,;:@/?-]{1,4}",
        1 => (any::<u8>(), any::<bool>())
            .prop_map(|(b, lower)| if lower { format!("%{b:02x}") } else { format!("%{b:02X}") }),
    ];
    prop::option::of(prop::collection::vec(part, 0..6).prop_map(|v| v.concat()))
}

/// A host name of 1 to 4 labels, an IPv4 address, or a bracketed IPv6 literal.
fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::collection::vec("[a-z0-9][a-z0-9_-]{0,8}", 1..5).prop_map(|l| l.join(".")),
        1 => (any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>()).prop_map(|(a, b, c, d)| format!("{a}.{b}.{c}.{d}")),
        1 => prop::collection::vec("[0-9a-f]{1,4}", 1..5).prop_map(|g| format!("[::{}]", g.join(":"))),
    ]
}

/// A spelling of `host`: random upper case, maybe a trailing dot (names only), maybe a port.
fn host_spelling(host: &str, upper: &[bool], dot: bool, port: Option<u16>) -> String {
    let mut s: String = host
        .chars()
        .enumerate()
        .map(|(i, c)| if upper[i % upper.len()] { c.to_ascii_uppercase() } else { c })
        .collect();
    if dot && !s.starts_with('[') {
        s.push('.');
    }
    if let Some(p) = port {
        s.push_str(&format!(":{p}"));
    }
    s
}

fn method_spelling(name: &str, upper: &[bool]) -> String {
    name.chars().enumerate().map(|(i, c)| if upper[i % upper.len()] { c } else { c.to_ascii_lowercase() }).collect()
}

/// Checks the documented shape of a canonical path.
fn assert_path_shape(path: &str) -> Result<(), TestCaseError> {
    prop_assert!(path.starts_with('/'), "{path:?} does not start with /");
    prop_assert!(!path.contains("//"), "{path:?} has an empty segment");
    for seg in path.split('/') {
        prop_assert!(seg != "." && seg != "..", "{path:?} has a dot segment");
    }
    for bad in [";", "\\"] {
        prop_assert!(!path.contains(bad), "{path:?} contains {bad}");
    }
    let b = path.as_bytes();
    for (i, _) in path.match_indices('%') {
        let hex = path.get(i + 1..i + 3);
        prop_assert!(
            hex.is_some_and(|h| h.bytes().all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(&c))),
            "{path:?}: bad escape"
        );
        let v = u8::from_str_radix(hex.unwrap_or("00"), 16).unwrap();
        prop_assert!(!matches!(v, b'/' | b'\\' | 0 | b';'), "{path:?} has %{v:02X}");
        prop_assert!(
            !(v as char).is_ascii_alphanumeric() && !b"-._~".contains(&v),
            "{path:?} encodes unreserved {v:#x}"
        );
        prop_assert!(b[i + 1].is_ascii_uppercase() || b[i + 1].is_ascii_digit());
    }
    Ok(())
}

// ---- properties ----

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// Forwarding the canonical target and reading it again yields the same request: the
    /// upstream acts on what the gateway checked, and a second gateway in front changes nothing.
    #[test]
    fn canonical_form_is_a_fixed_point(
        spec in path_spec(),
        sp in prop::option::of(spelling()),
        q in query(),
        h in host(),
        upper in prop::collection::vec(any::<bool>(), 1..8),
        port in prop::option::of(any::<u16>()),
        absolute in any::<bool>(),
        m in prop::sample::select(DEFAULT_METHODS.to_vec()),
    ) {
        let fx = Fixture::new();
        let mut target = render(&spec, sp.as_ref());
        if let Some(q) = &q {
            target = format!("{target}?{q}");
        }
        let spelled = host_spelling(&h, &upper, false, port);
        let first = if absolute {
            canon(&fx, m, &format!("http://{spelled}{target}"), None)
        } else {
            canon(&fx, m, &target, Some(&spelled))
        };
        let Ok(first) = first else { return Ok(()) };
        let again = canon(&fx, m, &first.target, Some(&first.host));
        prop_assert_eq!(
            again.as_ref().map(|v| (&v.path, &v.query, &v.host)),
            Ok((&first.path, &first.query, &first.host))
        );
        prop_assert!(!again.unwrap().rewritten, "the canonical target of {target:?} is rewritten again");
        // Every accepted spelling that differs from the forwarded target says so.
        prop_assert_eq!(first.rewritten, absolute || first.target != target);
        if let Some(q) = &first.query {
            let again = normalize_query(q).unwrap();
            prop_assert_eq!(again.as_ref(), q.as_str());
        }
    }

    /// Whatever is accepted has the documented shape.
    #[test]
    fn canonical_paths_have_one_shape(
        spec in path_spec(),
        sp in prop::option::of(spelling()),
        raw in "/[a-zA-Z0-9%./;\\\\~_-]{0,24}",
    ) {
        for p in [render(&spec, sp.as_ref()), raw] {
            if let Ok(n) = normalize_path(&p) {
                assert_path_shape(&n)?;
                let again = normalize_path(&n).unwrap();
                prop_assert_eq!(again.as_ref(), n.as_ref(), "not idempotent for {:?}", p);
            }
            let lower = p.to_ascii_lowercase();
            if ["%2f", "%5c", "%00", ";", "\\"].iter().any(|bad| lower.contains(bad)) {
                prop_assert!(normalize_path(&p).is_err(), "{p:?} was accepted");
            }
        }
    }

    /// Percent-encoded unreserved characters (either hex case), `./` segments, `x/../` segments
    /// and doubled slashes never change which path is meant.
    #[test]
    fn spellings_of_a_path_collapse(spec in path_spec(), sp in spelling(), q in query()) {
        let fx = Fixture::new();
        let plain = render(&spec, None);
        let spelled = render(&spec, Some(&sp));
        let suffix = q.map(|q| format!("?{q}")).unwrap_or_default();
        let Ok(base) = canon(&fx, "GET", &format!("{plain}{suffix}"), Some("api.example.com")) else { return Ok(()) };
        // Refusing a spelling is allowed; accepting it as another path is not.
        if let Ok(v) = canon(&fx, "GET", &format!("{spelled}{suffix}"), Some("api.example.com")) {
            prop_assert_eq!(&v.path, &base.path, "{:?} and {:?} differ", spelled, plain);
            prop_assert_eq!(&v.query, &base.query);
            prop_assert_eq!(v.rewritten, spelled != base.path || base.rewritten);
        }
    }

    /// Upper case, a trailing dot, a port, and naming the host in an absolute-form target
    /// instead of `Host` all give the same canonical host.
    #[test]
    fn spellings_of_a_host_collapse(
        h in host(),
        upper in prop::collection::vec(any::<bool>(), 1..8),
        dot in any::<bool>(),
        port in prop::option::of(any::<u16>()),
        via in 0u8..3,
    ) {
        let fx = Fixture::new();
        let base = canon(&fx, "GET", "/", Some(&h)).map(|v| v.host);
        prop_assert_eq!(base.as_deref(), Ok(h.as_str()), "the plain host {:?} is refused or changed", h);
        let spelled = host_spelling(&h, &upper, dot, port);
        prop_assert_eq!(canonical_host(&spelled).map(|c| c.into_owned()).ok(), Some(h.clone()));
        let got = match via {
            0 => canon(&fx, "GET", "/", Some(&spelled)),
            1 => canon(&fx, "GET", &format!("http://{spelled}/"), None),
            _ => canon(&fx, "GET", &format!("HTTP://{spelled}/"), Some(&h.to_ascii_uppercase())),
        };
        prop_assert_eq!(got.map(|v| v.host), Ok(h));
    }

    /// An absolute-form target and a `Host` header that name different hosts are refused.
    #[test]
    fn disagreeing_hosts_are_refused(
        a in "[ab]{1,2}(\\.[ab]{1,2})?",
        b in "[ab]{1,2}(\\.[ab]{1,2})?",
        upper in prop::collection::vec(any::<bool>(), 1..8),
        dots in (any::<bool>(), any::<bool>()),
        ports in (prop::option::of(any::<u16>()), prop::option::of(any::<u16>())),
        path in "/[a-z]{0,3}",
    ) {
        let fx = Fixture::new();
        let ta = host_spelling(&a, &upper, dots.0, ports.0);
        let hb = host_spelling(&b, &upper, dots.1, ports.1);
        let got = canon(&fx, "GET", &format!("http://{ta}{path}"), Some(&hb));
        if a == b {
            prop_assert_eq!(got.map(|v| v.host), Ok(a));
        } else {
            prop_assert!(matches!(got, Err(Reject::InvalidHost { .. })), "{ta:?} vs {hb:?}: {got:?}");
        }
    }

    /// The rule matcher sees what is forwarded: every accepted spelling of `/internal/...` is
    /// matched by the rule that denies `/internal/**`, and no spelling of `DELETE` other than
    /// `DELETE` itself is accepted (so none can slip past the rule that denies it).
    #[test]
    fn matching_and_forwarding_agree(
        spec in path_spec(),
        sp in spelling(),
        prefix in prop::sample::select(vec!["", "/a/..", "/./", "//", "/%2e", "/b/%2E%2e", "/c/./..", "/%2E"]),
        internal in prop::sample::select(vec![
            "internal", "%69nternal", "%69nt%65rnal", "inte%72nal", "INTERNAL", "%69%6E%74%65%72%6e%61%6c",
        ]),
        absolute in any::<bool>(),
        m in prop::sample::select(DEFAULT_METHODS.to_vec()),
        upper in prop::collection::vec(any::<bool>(), 1..8),
    ) {
        let fx = Fixture::new();
        let cfg = rules_config();
        let method = method_spelling(m, &upper);
        let rest = render(&without_dot_segments(spec), Some(&sp));
        let target = format!("{prefix}/{internal}{rest}");
        let target = if absolute { format!("http://API.example.com{target}") } else { target };
        let mut headers = host_headers(if absolute { None } else { Some("api.example.com") });
        headers.insert("x-probe", HeaderValue::from_static("1"));
        let parsed = Method::from_bytes(method.as_bytes()).unwrap();
        let policy = fx.policy();
        match canonicalize(&parsed, target.as_bytes(), &headers, &policy) {
            Ok(c) => {
                prop_assert_eq!(c.method().as_str(), m, "method spelling {:?} accepted", method);
                let rule = matched(cfg, &c, &headers);
                let is_internal = c.path() == "/internal" || c.path().starts_with("/internal/");
                if internal == "INTERNAL" {
                    // Paths are case-sensitive: `/INTERNAL` is another path, not a spelling.
                    prop_assert!(!is_internal);
                } else {
                    prop_assert!(is_internal, "{:?} became {:?}", target, c.path());
                    prop_assert_eq!(rule.as_deref(), Some("deny-internal"), "{:?} -> {:?}", target, c.path());
                }
                if c.method() == Method::DELETE && !is_internal {
                    prop_assert_eq!(rule.as_deref(), Some("deny-delete"));
                }
            }
            Err(Reject::MethodNotAllowed { case_only, .. }) => {
                prop_assert_ne!(method.as_str(), m);
                prop_assert!(case_only);
            }
            Err(e) => prop_assert!(false, "{:?} refused: {:?}", target, e),
        }
    }

    /// `DELETE` anywhere outside `/internal` is matched by the method rule, and any other
    /// spelling of it is refused before matching.
    #[test]
    fn delete_is_denied_in_every_accepted_spelling(
        upper in prop::collection::vec(any::<bool>(), 1..8),
        spec in path_spec(),
    ) {
        let fx = Fixture::new();
        let cfg = rules_config();
        let method = method_spelling("DELETE", &upper);
        let parsed = Method::from_bytes(method.as_bytes()).unwrap();
        let headers = host_headers(Some("api.example.com"));
        let target = format!("/api{}", render(&without_dot_segments(spec), None));
        let policy = fx.policy();
        match canonicalize(&parsed, target.as_bytes(), &headers, &policy) {
            Ok(c) => {
                prop_assert_eq!(method.as_str(), "DELETE");
                let rule = matched(cfg, &c, &headers);
                prop_assert_eq!(rule.as_deref(), Some("deny-delete"));
            }
            Err(e) => {
                prop_assert_ne!(method.as_str(), "DELETE", "{:?} refused: {:?}", target, e);
                prop_assert!(matches!(e, Reject::MethodNotAllowed { case_only: true, .. }), "{e:?}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// Arbitrary bytes in the target and in header values are refused or accepted, never a panic.
    #[test]
    fn arbitrary_bytes_never_panic(
        m in prop_oneof![
            prop::sample::select(DEFAULT_METHODS.to_vec()).prop_map(str::to_string),
            "[A-Za-z!#$%&'*+.^_`|~-]{1,8}",
        ],
        target in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            "(http://|HTTPS://|//)?[\\[\\]a-zA-Z0-9.%:/?@;\\\\#*_~ -]{0,40}".prop_map(String::into_bytes),
        ],
        hs in prop::collection::vec(
            (
                prop::sample::select(vec![
                    "host", "content-length", "transfer-encoding", "connection", "x_tenant_id",
                    "x-api-key", "x_forwarded_for", "x-custom", "x__api__key",
                ]),
                prop_oneof![
                    prop::collection::vec(any::<u8>(), 0..24),
                    "[a-zA-Z0-9.:\\[\\], _-]{0,24}".prop_map(String::into_bytes),
                ],
            ),
            0..5,
        ),
    ) {
        let fx = Fixture::new();
        let Ok(method) = Method::from_bytes(m.as_bytes()) else { return Ok(()) };
        let mut headers = HeaderMap::new();
        for (name, value) in hs {
            if let Ok(v) = HeaderValue::from_bytes(&value) {
                headers.append(HeaderName::from_static(name), v);
            }
        }
        if let Ok(c) = canonicalize(&method, &target, &headers, &fx.policy()) {
            assert_path_shape(c.path())?;
            prop_assert!(!c.host().is_empty());
        }
        let s = String::from_utf8_lossy(&target);
        let _ = canonical_host(&s);
        let _ = normalize_query(&s);
        if let Ok(p) = normalize_path(&s) {
            assert_path_shape(&p)?;
        }
    }
}

// ---- the rule set ----

const RULES_CONFIG: &str = r#"
[upstreams.main]
servers = ["127.0.0.1:9000"]

[tiers.free]
upstream = "main"

[[rule]]
name = "deny-internal"
match = { path_glob = "/internal/**" }
deny = { status = 404, message = "Not found." }

[[rule]]
name = "deny-delete"
match = { methods = ["DELETE"] }
deny = { status = 405, message = "Deleting is not served." }

[[rule]]
name = "public"
public = true
"#;

fn rules_config() -> &'static Config {
    static CFG: std::sync::OnceLock<Config> = std::sync::OnceLock::new();
    CFG.get_or_init(|| {
        let mut diags = Diagnostics::default();
        let cfg = config::load_str(Path::new("canonical-props/tollgate.toml"), RULES_CONFIG.to_string(), &mut diags);
        cfg.unwrap_or_else(|| panic!("the rules config does not load: {:#?}", diags.items))
    })
}

fn matched(cfg: &Config, c: &tollgate::pipeline::canonical::Canonical<'_>, headers: &HeaderMap) -> Option<String> {
    let view = RequestView {
        method: c.method(),
        host: c.host(),
        path: c.path(),
        query: c.query(),
        headers,
        tier: None,
        tenant: None,
    };
    cfg.rules.find(&view).map(|r| r.name.to_string())
}

#[test]
fn the_rule_set_matches_as_the_properties_assume() {
    let fx = Fixture::new();
    let cfg = rules_config();
    let headers = host_headers(Some("a"));
    let policy = fx.policy();
    for (method, target, want) in [
        ("GET", "/internal/x", "deny-internal"),
        ("GET", "/internal", "deny-internal"),
        ("DELETE", "/api/x", "deny-delete"),
        ("GET", "/api/x", "public"),
    ] {
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        let c = canonicalize(&m, target.as_bytes(), &headers, &policy).unwrap();
        assert_eq!(matched(cfg, &c, &headers).as_deref(), Some(want), "{method} {target}");
    }
    let m = Method::from_bytes(b"delete").unwrap();
    assert!(matches!(canonicalize(&m, b"/api/x", &headers, &policy), Err(Reject::MethodNotAllowed { .. })));
}
