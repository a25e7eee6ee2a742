//! Lua-free rules: declarative route policies, validated and compiled once at load time.
//!
//! A request's rule is the first rule, in file order, whose every `match` condition holds.
//! [`RuleSet::find`] answers that through an index (exact paths in a hash table, prefixes in a
//! byte trie, globs in a segment trie), so its cost depends on the path, not on the number of
//! rules. Actions from `[defaults]` are merged into each rule at compile time, so the hot path
//! reads one finished [`Rule`].

pub mod body;
pub mod file;
pub mod glob;
pub mod matcher;

use crate::schema::diag::{Diagnostic, Diagnostics, Severity, SourceFile};
use crate::schema::value::SStr;
use crate::schema::{size_value, units};
pub use body::BodyPlan;
use file::{ActionsFile, ChargeFile, MatchFile, Presence, RuleFile};
use glob::Glob;
use http::{HeaderName, HeaderValue, Method};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use toml::Spanned;

/// Metrics every gateway has without declaring them.
pub const BUILTIN_METRICS: &[&str] = &["requests"];

/// What the rule compiler may check references against.
pub struct RefContext<'a> {
    /// Every tier's name, with its features.
    pub tiers: BTreeMap<&'a str, Vec<&'a str>>,
    /// Every upstream pool's name.
    pub upstreams: BTreeSet<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Exact(String),
    /// `*.example.com` is stored as `.example.com`.
    Suffix(String),
}

impl HostMatch {
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(h) => h.eq_ignore_ascii_case(host),
            HostMatch::Suffix(s) => {
                host.len() > s.len()
                    && host.is_char_boundary(host.len() - s.len())
                    && host[host.len() - s.len()..].eq_ignore_ascii_case(s)
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Any,
    Exact(String),
    Prefix(String),
    Glob(Glob),
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Any => true,
            PathMatch::Exact(p) => p == path,
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Glob(g) => g.matches(path),
        }
    }
}

/// A header or query condition: `None` means "present", `Some(v)` means "equals v".
pub type Cond<K> = (K, Option<String>);

/// The compiled `match` of a rule. Every present condition must hold.
#[derive(Debug, Clone, Default)]
pub struct Conditions {
    pub host: Option<HostMatch>,
    pub path: Option<PathMatch>,
    pub methods: Option<Vec<Method>>,
    pub headers: Vec<Cond<HeaderName>>,
    pub query: Vec<Cond<String>>,
    pub tiers: Option<Vec<Arc<str>>>,
    pub tenants: Option<Vec<String>>,
}

pub use crate::policy::{Period, QuotaSpec, RateSpec, StorePolicy};

/// Where the cost of a charge comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CostSource {
    Constant(u64),
    Header(HeaderName),
    Query(String),
    /// Dotted paths into the JSON request body: the largest value present, or the default
    /// when the body has none of them.
    Body {
        paths: Vec<Arc<str>>,
        default: u64,
        /// Body fields that multiply the estimate: the largest present, at least 1.
        multiplier: Vec<Arc<str>>,
    },
}

/// One metric a rule charges: what is reserved before forwarding, and what settles it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    pub metric: Arc<str>,
    pub cost: CostSource,
    pub max_cost: Option<u64>,
    pub settle_from_header: Option<HeaderName>,
    /// A dotted path into a JSON response body.
    pub settle_from_body: Option<Arc<str>>,
    /// A dotted path into the `data:` events of an event stream; the last event carrying it wins.
    pub settle_from_sse: Option<Arc<str>>,
}

/// The body of the gateway's own refusals on a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ErrorFormat {
    /// `application/problem+json` (RFC 9457).
    #[default]
    Problem,
    /// `{"error": {"message", "type", "code"}}`, as OpenAI-compatible SDKs read it.
    OpenAi,
}

/// At most this many charges per rule.
pub const MAX_CHARGES: usize = 8;

/// A rule's `deny`: the status and message of the refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deny {
    pub status: u16,
    pub message: String,
    /// The `Allow` header of a 405: the deny's own `allow` list, else the methods that other
    /// rules with the same host and path accept, else every method this rule does not match.
    pub allow: Option<Arc<str>>,
}

/// The actions of a rule, with `[defaults]` already merged in.
#[derive(Debug, Clone, Default)]
pub struct Actions {
    pub public: bool,
    pub require_scopes: Vec<Arc<str>>,
    pub require_feature: Option<Arc<str>>,
    pub deny: Option<Deny>,
    pub upstream: Option<Arc<str>>,
    pub set_request_headers: Vec<(HeaderName, HeaderValue)>,
    pub remove_request_headers: Vec<HeaderName>,
    pub set_response_headers: Vec<(HeaderName, HeaderValue)>,
    pub remove_response_headers: Vec<HeaderName>,
    pub max_body: Option<u64>,
    pub timeout: Option<Duration>,
    pub pass_credentials: bool,
    pub priority: i64,
    /// Keyed by tier name, or `default`.
    pub rate: BTreeMap<String, RateSpec>,
    /// The metrics the rule charges, each at most once.
    pub charges: Vec<Charge>,
    /// Add `stream_options.include_usage` to streamed JSON requests (see [`BodyPlan`]).
    pub inject_stream_usage: bool,
    /// A dotted path into the JSON request body naming the model (a report dimension).
    pub model_from_body: Option<Arc<str>>,
    pub error_format: Option<ErrorFormat>,
    /// Send OpenAI-style `x-ratelimit-*-requests`/`-tokens` headers.
    pub openai_ratelimit_headers: Option<bool>,
    /// What the gateway reads from request and response bodies, compiled from the above;
    /// `None` for a rule that reads no body (the common case, which then pays nothing).
    pub body: Option<Arc<BodyPlan>>,
    /// Keyed by tier name (or `default`), then metric.
    pub quota: BTreeMap<String, BTreeMap<String, QuotaSpec>>,
    /// Overrides the tier's store failure policy on this route.
    pub on_store_error: Option<StorePolicy>,
    /// `mode = "async"` or `"either"`: requests become jobs (`src/jobs/`).
    pub job: Option<Arc<JobRule>>,
}

/// How a rule's requests run as asynchronous jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRule {
    /// `async`: every request is a job. `either`: only requests with `Prefer: respond-async`.
    pub always: bool,
    /// A running job that has not finished after this ends as `timeout`.
    pub timeout: Duration,
    /// The most of the upstream's body kept as the result.
    pub result_max_bytes: u64,
    /// How long a finished job and its result stay readable.
    pub retention: Duration,
}

impl JobRule {
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
    pub const DEFAULT_RESULT_MAX_BYTES: u64 = 1 << 20;
    pub const DEFAULT_RETENTION: Duration = Duration::from_secs(86_400);
}

impl Actions {
    /// The rate that applies to `tier` on this rule, if the rule sets one.
    pub fn rate_for(&self, tier: &str) -> Option<&RateSpec> {
        self.rate.get(tier).or_else(|| self.rate.get("default"))
    }
}

/// One compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Position in evaluation order.
    pub index: usize,
    pub name: Arc<str>,
    /// `file:line` of the rule, for explain output and logs.
    pub origin: String,
    pub when: Conditions,
    pub actions: Actions,
}

/// What to do with a request no rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmatched {
    Allow,
    Deny,
}

/// All rules of a config, compiled.
#[derive(Debug)]
pub struct RuleSet {
    pub rules: Vec<Arc<Rule>>,
    /// The rule for unmatched requests under `unmatched = "allow"`: the defaults alone.
    pub fallback: Option<Arc<Rule>>,
    pub unmatched: Unmatched,
    pub metrics: BTreeSet<String>,
    /// Every request header a rule reads (conditions, charge costs): a client may not send one
    /// twice, since the gateway and the upstream must read one and the same value.
    pub read_headers: Vec<HeaderName>,
    /// `read_headers` plus every header a rule writes (`set_request_headers`,
    /// `remove_request_headers`): a client may not name one in `Connection` nor imitate one with
    /// underscores.
    pub named_headers: Vec<HeaderName>,
    /// Every query parameter a rule reads (conditions, charge costs); sent twice, refused.
    pub named_query: Vec<String>,
    /// Some rule sets `error_format`: a refusal made before its rule is known looks the rule up.
    pub error_formats: bool,
    index: matcher::Index,
}

impl RuleSet {
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The first rule that matches, or the fallback; `None` means "deny as no_route".
    pub fn find(&self, req: &matcher::RequestView<'_>) -> Option<&Arc<Rule>> {
        match self.index.find(&self.rules, req) {
            Some(i) => self.rules.get(i),
            None => self.fallback.as_ref(),
        }
    }
}

struct Compiler<'a, 'c> {
    ctx: &'a RefContext<'c>,
    features: BTreeSet<&'c str>,
    metrics: BTreeSet<String>,
    diags: &'a mut Diagnostics,
}

/// Compiles rule files into a [`RuleSet`], reporting every problem into `diags`.
pub fn compile(files: Vec<RuleFile>, ctx: &RefContext<'_>, diags: &mut Diagnostics) -> RuleSet {
    let mut metrics: BTreeSet<String> = BUILTIN_METRICS.iter().map(|s| s.to_string()).collect();
    for f in &files {
        for m in &f.metrics {
            metrics.insert(m.get_ref().clone());
        }
    }
    let features = ctx.tiers.values().flatten().copied().collect();
    let mut c = Compiler { ctx, features, metrics, diags };

    // unmatched: every file that sets it must agree.
    let mut unmatched: Option<(Unmatched, String)> = None;
    for f in &files {
        let (Some(u), Some(src)) = (&f.unmatched, &f.src) else { continue };
        let val = match u.get_ref().as_str() {
            "allow" => Unmatched::Allow,
            "deny" => Unmatched::Deny,
            other => {
                c.diags.error_at(src, u.span(), format!("unknown `unmatched` value `{other}`; use `allow` or `deny`"));
                continue;
            }
        };
        match &unmatched {
            Some((prev, at)) if *prev != val => {
                c.diags.error_at(src, u.span(), format!("`unmatched` is set differently in {at}; set it in one file"))
            }
            _ => unmatched = Some((val, src.path.display().to_string())),
        }
    }
    let unmatched = unmatched.map(|u| u.0).unwrap_or(Unmatched::Allow);

    // defaults: merged across files; a field set in two files is an error.
    let mut defaults = Actions::default();
    let mut defaults_seen: HashMap<&'static str, String> = HashMap::new();
    for f in &files {
        let (Some(d), Some(src)) = (&f.defaults, &f.src) else { continue };
        let dref = d.get_ref();
        if let Some(n) = &dref.name {
            c.diags.error_at(src, n.span(), "`[defaults]` cannot have a `name`");
        }
        if let Some(m) = &dref.matcher {
            c.diags.error_at(src, m.span(), "`[defaults]` cannot have a `match`; defaults apply to every rule");
        }
        let compiled = c.actions(src, dref);
        for field in set_fields(dref) {
            if let Some(prev) = defaults_seen.get(field) {
                c.diags.error_at(
                    src,
                    d.span(),
                    format!("`defaults.{field}` is also set in {prev}; set it in one file"),
                );
            }
            defaults_seen.insert(field, src.path.display().to_string());
        }
        defaults = merge(&defaults, &compiled, dref_fields(dref));
    }

    let mut rules: Vec<Arc<Rule>> = Vec::new();
    let mut names: HashMap<String, String> = HashMap::new();
    for f in &files {
        let Some(src) = &f.src else { continue };
        for r in &f.rules {
            let rf = r.get_ref();
            let (line, _) = src.line_col(r.span().start);
            let origin = format!("{}:{}", src.path.display(), line);
            let name = match &rf.name {
                Some(n) => {
                    if let Some(prev) = names.get(n.get_ref()) {
                        c.diags.error_at(
                            src,
                            n.span(),
                            format!("rule name `{}` is already used at {prev}", n.get_ref()),
                        );
                    }
                    names.insert(n.get_ref().clone(), origin.clone());
                    n.get_ref().clone()
                }
                None => {
                    c.diags.missing_at(
                        src,
                        r.span(),
                        "name",
                        r.span(),
                        "a rule needs a `name`, like `name = \"jobs-read\"`; logs and `tollgate rules explain` show it",
                    );
                    // Its conditions and actions are still checked, so that every mistake in
                    // it shows in the same pass.
                    if let Some(m) = &rf.matcher {
                        c.conditions(src, m);
                    }
                    c.actions(src, rf);
                    continue;
                }
            };
            let when = match &rf.matcher {
                Some(m) => c.conditions(src, m),
                None => Conditions::default(),
            };
            let own = c.actions(src, rf);
            let actions = merge(&defaults, &own, dref_fields(rf));
            if actions.charges.iter().any(|c| &*c.metric == "requests") {
                let span = rf
                    .charge
                    .as_ref()
                    .and_then(|ch| {
                        let named = ch.get_ref().0.iter().filter_map(|c| c.metric.as_ref());
                        named.clone().find(|m| m.get_ref() == "requests").or(named.clone().next()).map(|m| m.span())
                    })
                    .unwrap_or(r.span());
                c.diags.error_at(src, span, format!("rule `{name}` charges `requests`, which every request already counts once; charge another metric"));
            }
            if let Err(e) = BodyPlan::of(&actions) {
                c.diags.error_at(src, r.span(), format!("rule `{name}`: {e}"));
            }
            if actions.body.as_ref().is_some_and(|b| b.pre_read) && actions.max_body.is_none() {
                c.diags.error_at(src, r.span(), format!("rule `{name}` reads the whole request body (`cost_from_body` or `inject_stream_usage`) and needs a `max_body` to bound it, for example `max_body = \"4MiB\"`"));
            }
            for (tier, metrics) in &actions.quota {
                for metric in metrics.keys() {
                    let charged = actions.charges.iter().any(|c| *c.metric == **metric);
                    if metric != "requests" && !charged {
                        c.diags.error_at(src, r.span(), format!("rule `{name}` has a `quota.{tier}.{metric}`, but only `requests` and the rule's charged metric are counted on it"));
                    }
                }
            }
            if actions.public && !actions.require_scopes.is_empty() {
                c.diags.error_at(
                    src,
                    r.span(),
                    format!("rule `{name}` is public but requires scopes; a public route has no key to hold them"),
                );
            }
            let has_default_pool = ctx.upstreams.contains("default") || ctx.upstreams.len() == 1;
            if actions.public && actions.upstream.is_none() && !has_default_pool {
                c.diags.warn_at(
                    src,
                    r.span(),
                    format!("public rule `{name}` has no `upstream`: requests without a tenant will answer 502; set `upstream` or name a pool `default`"),
                );
            }
            rules.push(Arc::new(Rule { index: rules.len(), name: name.into(), origin, when, actions }));
        }
    }

    // Shadowing: a rule that an earlier, broader rule always wins over.
    for (j, later) in rules.iter().enumerate() {
        if let Some(earlier) = rules[..j].iter().find(|e| subsumes(&e.when, &later.when)) {
            let (file, line) = split_origin(&later.origin);
            c.diags.items.push(Diagnostic {
                severity: Severity::Warning,
                file: file.into(),
                line,
                col: 1,
                message: format!(
                    "rule `{}` can never match: rule `{}` ({}) comes first and matches everything it does",
                    later.name, earlier.name, earlier.origin
                ),
            });
        }
    }

    let fallback = match unmatched {
        Unmatched::Allow => Some(Arc::new(Rule {
            index: usize::MAX,
            name: "default".into(),
            origin: "(no rule matched; unmatched = \"allow\")".into(),
            when: Conditions::default(),
            actions: defaults,
        })),
        Unmatched::Deny => None,
    };
    allow_of_405_denies(&mut rules);
    let index = matcher::Index::build(&rules);
    let mut read_headers: Vec<HeaderName> = Vec::new();
    let mut named_headers: Vec<HeaderName> = Vec::new();
    let mut named_query: Vec<String> = Vec::new();
    for r in rules.iter().chain(fallback.iter()) {
        read_headers.extend(r.when.headers.iter().map(|(h, _)| h.clone()));
        named_query.extend(r.when.query.iter().map(|(q, _)| q.clone()));
        let a = &r.actions;
        named_headers.extend(a.set_request_headers.iter().map(|(h, _)| h.clone()));
        named_headers.extend(a.remove_request_headers.iter().cloned());
        for c in &a.charges {
            match &c.cost {
                CostSource::Header(h) => read_headers.push(h.clone()),
                CostSource::Query(q) => named_query.push(q.clone()),
                _ => {}
            }
        }
    }
    let by_name = |a: &HeaderName, b: &HeaderName| a.as_str().cmp(b.as_str());
    read_headers.sort_by(by_name);
    read_headers.dedup();
    named_headers.extend(read_headers.iter().cloned());
    named_headers.sort_by(by_name);
    named_headers.dedup();
    named_query.sort();
    named_query.dedup();
    let error_formats = rules.iter().chain(fallback.iter()).any(|r| r.actions.error_format.is_some());
    RuleSet {
        rules,
        fallback,
        unmatched,
        metrics: c.metrics,
        read_headers,
        named_headers,
        named_query,
        error_formats,
        index,
    }
}

fn split_origin(origin: &str) -> (String, usize) {
    match origin.rsplit_once(':') {
        Some((f, l)) => (f.to_string(), l.parse().unwrap_or(0)),
        None => (origin.to_string(), 0),
    }
}

/// Is every request that `later` matches also matched by `earlier`? Conservative: `false`
/// when unsure, so a warning is never wrong.
fn subsumes(earlier: &Conditions, later: &Conditions) -> bool {
    let host = match (&earlier.host, &later.host) {
        (None, _) => true,
        (Some(a), Some(b)) if a == b => true,
        (Some(HostMatch::Suffix(s)), Some(HostMatch::Exact(h))) => HostMatch::Suffix(s.clone()).matches(h),
        (Some(HostMatch::Suffix(a)), Some(HostMatch::Suffix(b))) => b.ends_with(a.as_str()),
        _ => false,
    };
    let path = match (&earlier.path, &later.path) {
        (None, _) | (Some(PathMatch::Any), _) => true,
        (Some(a), Some(b)) if a == b => true,
        (Some(PathMatch::Prefix(p)), Some(PathMatch::Exact(e) | PathMatch::Prefix(e))) => e.starts_with(p.as_str()),
        (Some(PathMatch::Glob(g)), Some(PathMatch::Exact(e))) => g.matches(e),
        (Some(PathMatch::Exact(_) | PathMatch::Prefix(_) | PathMatch::Glob(_)), _) => false,
    };
    let methods = match (&earlier.methods, &later.methods) {
        (None, _) => true,
        (Some(a), Some(b)) => b.iter().all(|m| a.contains(m)),
        (Some(_), None) => false,
    };
    let subset = |a: &Option<Vec<Arc<str>>>, b: &Option<Vec<Arc<str>>>| match (a, b) {
        (None, _) => true,
        (Some(a), Some(b)) => b.iter().all(|x| a.contains(x)),
        (Some(_), None) => false,
    };
    let tenants = match (&earlier.tenants, &later.tenants) {
        (None, _) => true,
        (Some(a), Some(b)) => b.iter().all(|x| a.contains(x)),
        (Some(_), None) => false,
    };
    host && path
        && methods
        && subset(&earlier.tiers, &later.tiers)
        && tenants
        && earlier.headers.iter().all(|h| later.headers.contains(h))
        && earlier.query.iter().all(|q| later.query.contains(q))
}

/// Gives every `deny` with status 405 and no `allow` list of its own the `Allow` header RFC 9110
/// requires: the methods that rules without a deny and with the same host and path accept, in
/// rule order; when none names methods, every standard method this rule does not match.
fn allow_of_405_denies(rules: &mut [Arc<Rule>]) {
    for i in 0..rules.len() {
        let needs = rules[i].actions.deny.as_ref().is_some_and(|d| d.status == 405 && d.allow.is_none());
        if !needs {
            continue;
        }
        let this = &rules[i].when;
        let mut methods: Vec<Method> = Vec::new();
        for other in rules.iter() {
            let same_route = other.when.path == this.path && other.when.host == this.host;
            if other.index == rules[i].index || other.actions.deny.is_some() || !same_route {
                continue;
            }
            for m in other.when.methods.iter().flatten() {
                if !methods.contains(m) && !this.methods.as_ref().is_some_and(|ms| ms.contains(m)) {
                    methods.push(m.clone());
                }
            }
        }
        if methods.is_empty() {
            // The methods a gateway serves by default (`[server] allowed_methods`).
            methods = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]
                .iter()
                .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                .filter(|m| !this.methods.as_ref().is_some_and(|ms| ms.contains(m)))
                .collect();
        }
        let allow: Arc<str> = methods.iter().map(Method::as_str).collect::<Vec<_>>().join(", ").into();
        let mut rule = (*rules[i]).clone();
        if let Some(d) = rule.actions.deny.as_mut() {
            d.allow = Some(allow);
        }
        rules[i] = Arc::new(rule);
    }
}

/// Which action fields a table sets, for merging over defaults.
#[derive(Default, Clone, Copy)]
struct Fields {
    public: bool,
    require_feature: bool,
    deny: bool,
    upstream: bool,
    max_body: bool,
    timeout: bool,
    pass_credentials: bool,
    priority: bool,
    charge: bool,
    inject_stream_usage: bool,
    model_from_body: bool,
    on_store_error: bool,
    job: bool,
}

fn dref_fields(a: &ActionsFile) -> Fields {
    Fields {
        public: a.public.is_some(),
        require_feature: a.require_feature.is_some(),
        deny: a.deny.is_some(),
        upstream: a.upstream.is_some(),
        max_body: a.max_body.is_some(),
        timeout: a.timeout.is_some(),
        pass_credentials: a.pass_credentials.is_some(),
        priority: a.priority.is_some(),
        charge: a.charge.is_some(),
        inject_stream_usage: a.inject_stream_usage.is_some(),
        model_from_body: a.model_from_body.is_some(),
        on_store_error: a.on_store_error.is_some(),
        job: a.mode.is_some(),
    }
}

fn set_fields(a: &ActionsFile) -> Vec<&'static str> {
    let mut v = Vec::new();
    macro_rules! chk {
        ($($f:ident),*) => { $( if a.$f.is_some() { v.push(stringify!($f)); } )* };
    }
    chk!(
        public,
        require_scopes,
        require_feature,
        deny,
        upstream,
        set_request_headers,
        remove_request_headers,
        set_response_headers,
        remove_response_headers,
        max_body,
        timeout,
        pass_credentials,
        priority,
        rate,
        charge,
        quota,
        inject_stream_usage,
        model_from_body,
        error_format,
        ratelimit_headers
    );
    v
}

/// Rule over defaults: scalars the rule sets win; lists are unioned; maps merge key by key.
fn merge(defaults: &Actions, own: &Actions, set: Fields) -> Actions {
    fn union<T: Clone + PartialEq>(a: &[T], b: &[T]) -> Vec<T> {
        let mut out = a.to_vec();
        for x in b {
            if !out.contains(x) {
                out.push(x.clone());
            }
        }
        out
    }
    fn merge_pairs(a: &[(HeaderName, HeaderValue)], b: &[(HeaderName, HeaderValue)]) -> Vec<(HeaderName, HeaderValue)> {
        let mut out: Vec<_> = a.iter().filter(|(k, _)| !b.iter().any(|(k2, _)| k2 == k)).cloned().collect();
        out.extend(b.iter().cloned());
        out
    }
    let mut out = Actions {
        public: if set.public { own.public } else { defaults.public },
        require_scopes: union(&defaults.require_scopes, &own.require_scopes),
        require_feature: if set.require_feature {
            own.require_feature.clone()
        } else {
            defaults.require_feature.clone()
        },
        deny: if set.deny { own.deny.clone() } else { defaults.deny.clone() },
        upstream: if set.upstream { own.upstream.clone() } else { defaults.upstream.clone() },
        set_request_headers: merge_pairs(&defaults.set_request_headers, &own.set_request_headers),
        remove_request_headers: union(&defaults.remove_request_headers, &own.remove_request_headers),
        set_response_headers: merge_pairs(&defaults.set_response_headers, &own.set_response_headers),
        remove_response_headers: union(&defaults.remove_response_headers, &own.remove_response_headers),
        max_body: if set.max_body { own.max_body } else { defaults.max_body },
        timeout: if set.timeout { own.timeout } else { defaults.timeout },
        pass_credentials: if set.pass_credentials { own.pass_credentials } else { defaults.pass_credentials },
        priority: if set.priority { own.priority } else { defaults.priority },
        rate: {
            let mut r = defaults.rate.clone();
            r.extend(own.rate.clone());
            r
        },
        charges: if set.charge { own.charges.clone() } else { defaults.charges.clone() },
        inject_stream_usage: if set.inject_stream_usage {
            own.inject_stream_usage
        } else {
            defaults.inject_stream_usage
        },
        model_from_body: if set.model_from_body {
            own.model_from_body.clone()
        } else {
            defaults.model_from_body.clone()
        },
        error_format: own.error_format.or(defaults.error_format),
        openai_ratelimit_headers: own.openai_ratelimit_headers.or(defaults.openai_ratelimit_headers),
        body: None,
        on_store_error: if set.on_store_error { own.on_store_error } else { defaults.on_store_error },
        job: if set.job { own.job.clone() } else { defaults.job.clone() },
        quota: {
            let mut q = defaults.quota.clone();
            for (tier, metrics) in &own.quota {
                q.entry(tier.clone()).or_default().extend(metrics.clone());
            }
            q
        },
    };
    // A plan that does not compile is reported where the rule is read (`BodyPlan::of` again).
    out.body = BodyPlan::of(&out).ok().flatten().map(Arc::new);
    out
}

fn positive(v: &Spanned<i64>, what: &str, src: &SourceFile, diags: &mut Diagnostics) -> Option<u64> {
    if *v.get_ref() > 0 {
        Some(*v.get_ref() as u64)
    } else {
        diags.error_at(src, v.span(), format!("`{what}` must be a positive number"));
        None
    }
}

impl Compiler<'_, '_> {
    /// A dotted path into a JSON body, checked now so a request never meets a bad one.
    fn body_path(&mut self, src: &SourceFile, p: &SStr) -> Option<Arc<str>> {
        match crate::scan::JsonPaths::new(&[p.get_ref().as_str()]) {
            Ok(_) => Some(p.get_ref().as_str().into()),
            Err(e) => {
                self.diags.error_at(src, p.span(), format!("`{}` is not a usable body path: {e}", p.get_ref()));
                None
            }
        }
    }

    /// One body path or a list of 1 to 4, each once. An upstream may honour one of several
    /// spellings of a field (`max_tokens`, `max_completion_tokens`): the largest value present
    /// is one none of them passes.
    fn body_paths(&mut self, src: &SourceFile, list: &Spanned<Vec<SStr>>, key: &str) -> Vec<Arc<str>> {
        const MOST: usize = 4;
        if list.get_ref().is_empty() || list.get_ref().len() > MOST {
            self.diags.error_at(src, list.span(), format!("`{key}` takes one path, or a list of 1 to {MOST} paths"));
        }
        let mut paths: Vec<Arc<str>> = Vec::with_capacity(list.get_ref().len());
        for one in list.get_ref() {
            let path = self.body_path(src, one).unwrap_or_else(|| "-".into());
            if paths.contains(&path) {
                self.diags.error_at(src, one.span(), format!("`{path}` is named twice in `{key}`"));
            }
            paths.push(path);
        }
        paths
    }

    fn charge(&mut self, src: &SourceFile, span: std::ops::Range<usize>, cf: &ChargeFile) -> Option<Charge> {
        let metric = match &cf.metric {
            Some(m) => Some(self.metric(src, m)),
            None => {
                self.diags.missing_at(
                    src,
                    span.clone(),
                    "metric",
                    span.clone(),
                    "a charge needs a `metric`, one of the names declared in `usage_metrics`",
                );
                None
            }
        };
        let sources = [
            cf.cost.is_some(),
            cf.cost_from_header.is_some(),
            cf.cost_from_query.is_some(),
            cf.cost_from_body.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if sources > 1 {
            self.diags.error_at(
                src,
                span.clone(),
                "a charge takes one of `cost`, `cost_from_header`, `cost_from_query` and `cost_from_body`",
            );
        }
        if let (Some(m), None) = (&cf.cost_multiplier_from_body, &cf.cost_from_body) {
            self.diags.error_at(
                src,
                m.span(),
                "`cost_multiplier_from_body` multiplies an estimate read from the body; set `cost_from_body` too",
            );
        }
        if let (Some(d), None) = (&cf.default_cost, &cf.cost_from_body) {
            self.diags.error_at(src, d.span(), "`default_cost` is the estimate when the body lacks `cost_from_body`; set `cost_from_body` too, or use `cost`");
        }
        let cost = if let Some(c) = &cf.cost {
            if *c.get_ref() < 0 {
                self.diags.error_at(src, c.span(), "a cost cannot be negative");
            }
            CostSource::Constant((*c.get_ref()).max(0) as u64)
        } else if let Some(h) = &cf.cost_from_header {
            CostSource::Header(self.header(src, h).unwrap_or(HeaderName::from_static("x-cost")))
        } else if let Some(q) = &cf.cost_from_query {
            CostSource::Query(q.get_ref().clone())
        } else if let Some(p) = &cf.cost_from_body {
            let default = match &cf.default_cost {
                Some(d) if *d.get_ref() < 0 => {
                    self.diags.error_at(src, d.span(), "a cost cannot be negative");
                    1
                }
                Some(d) => *d.get_ref() as u64,
                None => 1,
            };
            let paths = self.body_paths(src, p, "cost_from_body");
            let multiplier = match &cf.cost_multiplier_from_body {
                Some(m) => self.body_paths(src, m, "cost_multiplier_from_body"),
                None => Vec::new(),
            };
            CostSource::Body { paths, default, multiplier }
        } else {
            CostSource::Constant(1)
        };
        let max_cost = cf.max_cost.as_ref().and_then(|m| positive(m, "max_cost", src, self.diags));
        if let (CostSource::Body { default, .. }, Some(max)) = (&cost, max_cost) {
            if *default > max {
                self.diags.error_at(
                    src,
                    span.clone(),
                    format!("`default_cost` ({default}) is over `max_cost` ({max})"),
                );
            }
        }
        let settle_from_header = cf.settle_from_header.as_ref().and_then(|h| self.header(src, h));
        let settle_from_body = cf.settle_from_body.as_ref().and_then(|p| self.body_path(src, p));
        let settle_from_sse = cf.settle_from_sse.as_ref().and_then(|p| self.body_path(src, p));
        Some(Charge { metric: metric?, cost, max_cost, settle_from_header, settle_from_body, settle_from_sse })
    }

    /// `mode` and the job settings beside it.
    fn job_rule(&mut self, src: &SourceFile, a: &ActionsFile) -> Option<Arc<JobRule>> {
        let mut duration = |v: &Option<SStr>, what: &str, default: Duration| match v {
            None => default,
            Some(t) => match units::parse_duration(t.get_ref()) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => {
                    self.diags.error_at(src, t.span(), format!("`{what}` must be longer than zero"));
                    default
                }
                Err(e) => {
                    self.diags.error_at(src, t.span(), e);
                    default
                }
            },
        };
        let timeout = duration(&a.job_timeout, "job_timeout", JobRule::DEFAULT_TIMEOUT);
        let retention = duration(&a.retention, "retention", JobRule::DEFAULT_RETENTION);
        let result_max_bytes = a
            .result_max_bytes
            .as_ref()
            .and_then(|m| size_value(m, src, self.diags))
            .unwrap_or(JobRule::DEFAULT_RESULT_MAX_BYTES);
        let mode = match &a.mode {
            None => {
                let stray = [a.job_timeout.as_ref().map(|t| t.span()), a.retention.as_ref().map(|t| t.span())]
                    .into_iter()
                    .flatten()
                    .chain(a.result_max_bytes.as_ref().map(|m| m.span()))
                    .next();
                if let Some(span) = stray {
                    self.diags.error_at(
                        src,
                        span,
                        "job settings apply to asynchronous rules only; add `mode = \"async\"` or `mode = \"either\"`",
                    );
                }
                return None;
            }
            Some(m) => m,
        };
        let always = match mode.get_ref().as_str() {
            "sync" => return None,
            "async" => true,
            "either" => false,
            other => {
                self.diags.error_at(
                    src,
                    mode.span(),
                    format!("unknown mode `{other}`; use sync, async, or either (async on `Prefer: respond-async`)"),
                );
                return None;
            }
        };
        Some(Arc::new(JobRule { always, timeout, result_max_bytes, retention }))
    }

    fn header(&mut self, src: &SourceFile, s: &SStr) -> Option<HeaderName> {
        match HeaderName::from_bytes(s.get_ref().to_ascii_lowercase().as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.diags.error_at(src, s.span(), format!("`{}` is not a valid header name", s.get_ref()));
                None
            }
        }
    }

    fn header_pairs(&mut self, src: &SourceFile, m: &Option<BTreeMap<String, SStr>>) -> Vec<(HeaderName, HeaderValue)> {
        let mut out = Vec::new();
        for (k, v) in m.iter().flatten() {
            let name = match HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()) {
                Ok(n) => n,
                Err(_) => {
                    self.diags.error_at(src, v.span(), format!("`{k}` is not a valid header name"));
                    continue;
                }
            };
            match HeaderValue::from_str(v.get_ref()) {
                Ok(val) => out.push((name, val)),
                Err(_) => self.diags.error_at(
                    src,
                    v.span(),
                    format!("the value of header `{k}` has characters a header cannot carry"),
                ),
            }
        }
        out
    }

    fn metric(&mut self, src: &SourceFile, m: &SStr) -> Arc<str> {
        if !self.metrics.contains(m.get_ref()) {
            let known: Vec<&str> = self.metrics.iter().map(String::as_str).collect();
            self.diags.error_at(
                src,
                m.span(),
                format!(
                    "metric `{}` is not declared; declare it with `usage_metrics = [\"{}\"]` (declared: {})",
                    m.get_ref(),
                    m.get_ref(),
                    known.join(", ")
                ),
            );
        }
        m.get_ref().as_str().into()
    }

    fn tier_key(&mut self, src: &SourceFile, key: &str, span: std::ops::Range<usize>) {
        if key != "default" && !self.ctx.tiers.contains_key(key) {
            self.diags.error_at(src, span, format!("`{key}` is not a tier; use a defined tier name or `default`"));
        }
    }

    fn conditions(&mut self, src: &SourceFile, m: &Spanned<MatchFile>) -> Conditions {
        let mf = m.get_ref();
        let mut c = Conditions::default();
        if let Some(h) = &mf.host {
            let v = h.get_ref().to_ascii_lowercase();
            c.host = Some(match v.strip_prefix('*') {
                Some(suffix) if suffix.starts_with('.') && !suffix[1..].contains('*') => {
                    HostMatch::Suffix(suffix.to_string())
                }
                Some(_) => {
                    self.diags.error_at(src, h.span(), "a host wildcard must look like `*.example.com`");
                    HostMatch::Exact(v)
                }
                None if v.contains('*') => {
                    self.diags.error_at(src, h.span(), "a host wildcard must look like `*.example.com`");
                    HostMatch::Exact(v)
                }
                None => HostMatch::Exact(v),
            });
        }
        let path_kinds = [&mf.path, &mf.path_prefix, &mf.path_glob].iter().filter(|p| p.is_some()).count();
        if path_kinds > 1 {
            self.diags.error_at(src, m.span(), "use only one of `path`, `path_prefix` and `path_glob` in a match");
        }
        for p in [&mf.path, &mf.path_prefix, &mf.path_glob].into_iter().flatten() {
            if !p.get_ref().starts_with('/') {
                self.diags.error_at(src, p.span(), format!("`{}` must start with `/`", p.get_ref()));
            }
        }
        if let Some(p) = &mf.path {
            c.path = Some(PathMatch::Exact(p.get_ref().clone()));
        } else if let Some(p) = &mf.path_prefix {
            c.path = Some(PathMatch::Prefix(p.get_ref().clone()));
        } else if let Some(g) = &mf.path_glob {
            match Glob::compile(g.get_ref()) {
                Ok(glob) => c.path = Some(PathMatch::Glob(glob)),
                Err(e) => {
                    self.diags.error_at(src, g.span(), e);
                    // Never matches, so the broken rule cannot shadow anything either.
                    c.path = Some(PathMatch::Exact("\u{0}invalid glob".into()));
                }
            }
        }
        if let Some(ms) = &mf.methods {
            let mut out = Vec::new();
            for m in ms {
                let up = m.get_ref().to_ascii_uppercase();
                match Method::from_bytes(up.as_bytes()) {
                    Ok(method) => out.push(method),
                    Err(_) => self.diags.error_at(src, m.span(), format!("`{}` is not an HTTP method", m.get_ref())),
                }
            }
            c.methods = Some(out);
        }
        for (k, v) in mf.headers.iter().flatten() {
            let Ok(name) = HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()) else {
                self.diags.error_at(src, v.span(), format!("`{k}` is not a valid header name"));
                continue;
            };
            c.headers.push((name, self.presence(src, v)));
        }
        for (k, v) in mf.query.iter().flatten() {
            c.query.push((k.clone(), self.presence(src, v)));
        }
        if let Some(ts) = &mf.tiers {
            for t in ts {
                if !self.ctx.tiers.contains_key(t.get_ref().as_str()) {
                    self.diags.error_at(src, t.span(), format!("`{}` is not a tier", t.get_ref()));
                }
            }
            c.tiers = Some(ts.iter().map(|t| Arc::from(t.get_ref().as_str())).collect());
        }
        if let Some(ts) = &mf.tenants {
            for t in ts {
                if !crate::schema::valid_slug(t.get_ref()) {
                    self.diags.error_at(src, t.span(), format!("`{}` is not a valid tenant id", t.get_ref()));
                }
            }
            c.tenants = Some(ts.iter().map(|t| t.get_ref().clone()).collect());
        }
        c
    }

    fn presence(&mut self, src: &SourceFile, v: &Spanned<Presence>) -> Option<String> {
        match v.get_ref() {
            Presence::Present(true) => None,
            Presence::Present(false) => {
                self.diags.error_at(
                    src,
                    v.span(),
                    "use `true` for \"present\" or a string for \"equals\"; `false` is not supported",
                );
                None
            }
            Presence::Equals(s) => Some(s.clone()),
        }
    }

    fn actions(&mut self, src: &SourceFile, a: &ActionsFile) -> Actions {
        let mut out = Actions { public: a.public.as_ref().is_some_and(|p| *p.get_ref()), ..Actions::default() };
        for s in a.require_scopes.iter().flatten() {
            if s.get_ref().is_empty() || s.get_ref().contains(char::is_whitespace) {
                self.diags.error_at(src, s.span(), "a scope is a non-empty word without spaces");
            }
            out.require_scopes.push(s.get_ref().as_str().into());
        }
        if let Some(f) = &a.require_feature {
            if !self.features.contains(f.get_ref().as_str()) {
                let known: Vec<&str> = self.features.iter().copied().collect();
                let known = if known.is_empty() {
                    "no tier lists any feature".to_string()
                } else {
                    format!("features: {}", known.join(", "))
                };
                self.diags.error_at(
                    src,
                    f.span(),
                    format!("feature `{}` is in no tier ({known}); add it to a tier's `features`", f.get_ref()),
                );
            }
            out.require_feature = Some(f.get_ref().as_str().into());
        }
        if let Some(d) = &a.deny {
            let status = match &d.get_ref().status {
                None => 403,
                Some(s) if (400..=599).contains(s.get_ref()) => *s.get_ref() as u16,
                Some(s) => {
                    self.diags.error_at(src, s.span(), "a deny `status` must be between 400 and 599");
                    403
                }
            };
            let message = d.get_ref().message.clone().unwrap_or_else(|| "This route is not available.".into());
            let mut allow = None;
            if let Some(list) = &d.get_ref().allow {
                let mut methods = Vec::new();
                for m in list {
                    match http::Method::from_bytes(m.get_ref().as_bytes()) {
                        Ok(method) if m.get_ref().bytes().all(|b| b.is_ascii_uppercase()) => methods.push(method),
                        _ => self.diags.error_at(
                            src,
                            m.span(),
                            format!("`{}` is not an HTTP method in upper case, like \"GET\"", m.get_ref()),
                        ),
                    }
                }
                if status != 405 {
                    self.diags.error_at(src, d.span(), "a deny's `allow` list is only sent with `status = 405`");
                }
                allow = Some(methods.iter().map(http::Method::as_str).collect::<Vec<_>>().join(", ").into());
            }
            out.deny = Some(Deny { status, message, allow });
        }
        if let Some(u) = &a.upstream {
            if !self.ctx.upstreams.contains(u.get_ref().as_str()) {
                self.diags.error_at(
                    src,
                    u.span(),
                    format!("upstream `{}` is not defined; add `[upstreams.{}]`", u.get_ref(), u.get_ref()),
                );
            }
            out.upstream = Some(u.get_ref().as_str().into());
        }
        out.set_request_headers = self.header_pairs(src, &a.set_request_headers);
        out.set_response_headers = self.header_pairs(src, &a.set_response_headers);
        out.remove_request_headers =
            a.remove_request_headers.iter().flatten().filter_map(|h| self.header(src, h)).collect();
        out.remove_response_headers =
            a.remove_response_headers.iter().flatten().filter_map(|h| self.header(src, h)).collect();
        out.max_body = a.max_body.as_ref().and_then(|m| size_value(m, src, self.diags));
        if let Some(t) = &a.timeout {
            match units::parse_duration(t.get_ref()) {
                Ok(d) if !d.is_zero() => out.timeout = Some(d),
                Ok(_) => self.diags.error_at(src, t.span(), "a timeout of zero would fail every request"),
                Err(e) => self.diags.error_at(src, t.span(), e),
            }
        }
        out.pass_credentials = a.pass_credentials.unwrap_or(false);
        out.priority = a.priority.as_ref().map(|p| *p.get_ref()).unwrap_or(0);
        for (tier, r) in a.rate.iter().flatten() {
            self.tier_key(src, tier, r.span());
            if let Some(spec) = crate::schema::limits::rate_spec(r.get_ref(), r.span(), src, self.diags) {
                out.rate.insert(tier.clone(), spec);
            }
        }
        if let Some(ch) = &a.charge {
            let list = &ch.get_ref().0;
            if list.len() > MAX_CHARGES {
                self.diags.error_at(
                    src,
                    ch.span(),
                    format!("a rule charges at most {MAX_CHARGES} metrics; this one lists {}", list.len()),
                );
            }
            for cf in list.iter().take(MAX_CHARGES) {
                if let Some(c) = self.charge(src, ch.span(), cf) {
                    if out.charges.iter().any(|o| o.metric == c.metric) {
                        self.diags.error_at(
                            src,
                            ch.span(),
                            format!("the rule charges `{}` twice; charge each metric once", c.metric),
                        );
                    } else {
                        out.charges.push(c);
                    }
                }
            }
        }
        if let Some(b) = &a.inject_stream_usage {
            out.inject_stream_usage = *b.get_ref();
        }
        if let Some(m) = &a.model_from_body {
            out.model_from_body = self.body_path(src, m);
        }
        if let Some(f) = &a.error_format {
            match f.get_ref().as_str() {
                "problem" => out.error_format = Some(ErrorFormat::Problem),
                "openai" => out.error_format = Some(ErrorFormat::OpenAi),
                other => self.diags.error_at(
                    src,
                    f.span(),
                    format!("unknown error_format `{other}`; use problem (application/problem+json) or openai"),
                ),
            }
        }
        if let Some(h) = &a.ratelimit_headers {
            match h.get_ref().as_str() {
                "openai" => out.openai_ratelimit_headers = Some(true),
                "standard" => out.openai_ratelimit_headers = Some(false),
                other => self.diags.error_at(
                    src,
                    h.span(),
                    format!("unknown ratelimit_headers `{other}`; use standard or openai"),
                ),
            }
        }
        for (tier, metrics) in a.quota.iter().flatten() {
            for (metric, q) in metrics {
                self.tier_key(src, tier, q.span());
                self.metric(src, &Spanned::new(q.span(), metric.clone()));
                let spec = crate::schema::limits::quota_spec(q, src, self.diags);
                out.quota.entry(tier.clone()).or_default().insert(metric.clone(), spec);
            }
        }
        out.job = self.job_rule(src, a);
        if let Some(p) = &a.on_store_error {
            match StorePolicy::parse(p.get_ref()) {
                Some(v) => out.on_store_error = Some(v),
                None => self.diags.error_at(
                    src,
                    p.span(),
                    format!("unknown on_store_error `{}`; use local, open or closed", p.get_ref()),
                ),
            }
        }
        out
    }
}
