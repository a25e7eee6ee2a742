//! The validated model: what the gateway runs on. Every value here has been checked, so the
//! rest of the code never re-validates (`SocketAddr`, `Duration`, `KeyHash`, `IpNet`, compiled
//! rules).

use crate::keys::KeyHash;
use crate::rules::RuleSet;
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A whole, valid configuration.
#[derive(Debug)]
pub struct Config {
    /// The main file and every included file, in load order.
    pub files: Vec<PathBuf>,
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub tenancy: Tenancy,
    pub log: LogConfig,
    pub metering: MeteringConfig,
    pub metrics: MetricsConfig,
    pub admin: AdminConfig,
    /// `[jwt]`: shared, so the token verifier can tell a reloaded config from the one it runs.
    pub jwt: Arc<JwtConfig>,
    /// `[jobs]`: workers and callbacks of asynchronous rules.
    pub jobs: super::jobs::JobsConfig,
    pub tiers: BTreeMap<String, Arc<Tier>>,
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    pub tenants: Vec<TenantConfig>,
    pub rules: RuleSet,
}

impl Config {
    /// The one-line summary `tollgate check` prints.
    pub fn summary(&self) -> String {
        let keys: usize = self.tenants.iter().map(|t| t.keys.len()).sum();
        format!(
            "{} tiers, {} tenants, {} keys, {} upstreams, {} rules",
            self.tiers.len(),
            self.tenants.len(),
            keys,
            self.upstreams.len(),
            self.rules.len()
        )
    }
}

/// The methods allowed when the config names none: every method of RFC 9110 and RFC 5789 a
/// reverse proxy forwards. `CONNECT` is a tunnel, not a request to an API, and `TRACE` reflects
/// the request (credentials included) back to the client, so both are left out.
pub const DEFAULT_METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"];

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: Vec<SocketAddr>,
    pub admin_listen: SocketAddr,
    pub threads: usize,
    pub tls: Option<TlsConfig>,
    /// After SIGTERM (or the hand-over of a zero-downtime upgrade), how long requests in flight
    /// and the final usage flush get before the runtimes stop. Whole seconds.
    pub shutdown_grace: Duration,
    /// How long the runtimes then get to shut down (blocking work such as SQLite writes).
    pub shutdown_timeout: Duration,
    /// How long `tollgate run` keeps trying a listen address that another process holds before
    /// it gives up and exits 1.
    pub bind_retry: Duration,
    pub upgrade_sock: PathBuf,
    pub pid_file: PathBuf,
    /// Largest request head accepted; more is answered 431.
    pub max_header_bytes: usize,
    /// Methods the data plane serves, compared case-sensitively; others are answered 405.
    pub allowed_methods: Vec<http::Method>,
    /// `allowed_methods` as an `Allow` header value.
    pub allow_header: String,
    /// How long a client may take to send a whole request head, from the first byte it is
    /// awaited (connection accepted) to the end of the head. The connection is closed after.
    pub header_timeout: Duration,
    /// How long an idle keep-alive connection is kept between requests.
    pub idle_timeout: Duration,
    /// Connections the data plane holds at once; past it new ones are closed at accept. 0 until
    /// set: the server derives it from the open-files limit.
    pub max_connections: usize,
    /// Connections one client address may hold at once (trusted proxies are exempt).
    pub max_connections_per_ip: usize,
    /// Whether the proxy's worker threads take tasks from each other (Pingora's
    /// `work_stealing`). Off pins each connection to the thread that accepted it.
    pub work_stealing: bool,
    /// Idle upstream connections kept for reuse, per worker thread (Pingora's
    /// `upstream_keepalive_pool_size`).
    pub upstream_keepalive_pool_size: usize,
    /// Plaintext listeners take HTTP/2 with prior knowledge (h2c) besides HTTP/1.1.
    pub h2c: bool,
    /// The `Server` header of the gateway's own answers (refusals, gRPC statuses,
    /// self-service); `None` sends none.
    pub server_header: Option<http::HeaderValue>,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// SQLite, one file, one node.
    Embedded,
    /// Redis or Redis Cluster, shared by every instance.
    Redis,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// The SQLite file (embedded).
    pub path: PathBuf,
    /// `redis://` or `rediss://` URL(s): one Redis, or a Redis Cluster's seed nodes.
    pub urls: Vec<String>,
    /// `urls` are seeds of a Redis Cluster, discovered from them (`[store] cluster`; default:
    /// true with several URLs).
    pub cluster: bool,
    /// Hot-path store call timeout.
    pub timeout: Duration,
    /// How often counters and usage are written to the store.
    pub flush_interval: Duration,
    /// Consecutive failures that open the circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker stops calling the store.
    pub breaker_cooldown: Duration,
    /// Largest quota lease block an instance takes at once.
    pub max_lease_block: u64,
    /// This instance's name in shared state (concurrency slots).
    pub instance_id: String,
    /// Lifetime of a concurrency slot lease without a heartbeat.
    pub slot_ttl: Duration,
    /// Lifetime of a quota lease record in the store without a call from its holder: a
    /// crashed instance's unspent units come back within it.
    pub lease_ttl: Duration,
    /// A quota lease unused this long goes back to the store.
    pub lease_idle: Duration,
    /// How long requests wait for a quota lease call (one per counter) before the failure
    /// policy applies. At least `timeout`.
    pub lease_timeout: Duration,
}

/// A source the tenant can be resolved from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    ApiKey,
    Subdomain,
    Header,
    Path,
    /// A signed token of a `[[jwt.issuers]]` issuer.
    Jwt,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::ApiKey => "api_key",
            Source::Subdomain => "subdomain",
            Source::Header => "header",
            Source::Path => "path",
            Source::Jwt => "jwt",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Tenancy {
    pub resolve: Vec<Source>,
    /// Lower case, without a leading dot.
    pub base_domain: Option<String>,
    pub tenant_header: http::HeaderName,
    pub key_headers: Vec<http::HeaderName>,
    pub trusted_proxies: Vec<IpNet>,
    /// `[jwt] header`: a header that carries a token (besides `Authorization: Bearer`).
    pub token_header: Option<http::HeaderName>,
    /// `[jwt] cookie`: a cookie that carries a token.
    pub token_cookie: Option<String>,
}

impl Tenancy {
    pub fn uses(&self, s: Source) -> bool {
        self.resolve.contains(&s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Plain,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
    pub access_log: bool,
    /// Log lines the writer thread may have queued; past it new lines are dropped and counted
    /// (`tollgate_log_lines_dropped_total`), so a slow log consumer never blocks a request.
    pub buffer_lines: usize,
}

/// A plan: the template a tenant's limits and routing come from.
#[derive(Debug, Clone)]
pub struct Tier {
    pub name: Arc<str>,
    pub upstream: Arc<str>,
    pub features: Vec<Arc<str>>,
    pub limits: super::policy::TierLimits,
}

impl Tier {
    pub fn has_feature(&self, f: &str) -> bool {
        self.features.iter().any(|x| &**x == f)
    }
}

#[derive(Debug, Clone)]
pub struct HealthCheck {
    /// `None`: a TCP connect check. `Some(path)`: an HTTP GET that must answer 2xx.
    pub path: Option<String>,
    pub interval: Duration,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: Arc<str>,
    pub servers: Vec<SocketAddr>,
    pub health_check: Option<HealthCheck>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    /// Host header sent upstream; `None` keeps the client's.
    pub host: Option<String>,
    /// What the pool's servers speak.
    pub protocol: UpstreamProtocol,
}

/// The protocol of an upstream pool (`protocol = "h1" | "h2" | "h2c"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 over plain TCP (the default).
    #[default]
    H1,
    /// HTTP/2 over TLS, negotiated by ALPN; the certificate is checked against the system's
    /// roots and the pool's `host` (or the server's address).
    H2,
    /// HTTP/2 over plain TCP with prior knowledge (gRPC servers inside a network).
    H2c,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantStatus {
    Active,
    Suspended,
}

impl TenantStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TenantStatus::Active => "active",
            TenantStatus::Suspended => "suspended",
        }
    }
}

#[derive(Debug, Clone)]
pub struct TenantConfig {
    pub id: String,
    pub name: String,
    pub email: String,
    pub tier: String,
    pub status: TenantStatus,
    pub subdomains: Vec<String>,
    pub ip_allow: Vec<IpNet>,
    pub keys: Vec<KeyConfig>,
    pub billing_anchor_day: u32,
    pub timezone: chrono_tz::Tz,
    pub overrides: super::policy::Overrides,
}

#[derive(Debug, Clone)]
pub struct KeyConfig {
    pub id: String,
    pub name: String,
    pub hash: KeyHash,
    pub scopes: Vec<String>,
    /// Unix milliseconds.
    pub expires: Option<i64>,
    /// From this time on (Unix ms) the key answers `key_revoked`. A rotated key's grace
    /// period ends here; `revoked = true` in the config is "since forever".
    pub revoked_at: Option<i64>,
    pub created: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct MeteringConfig {
    /// How often usage aggregates are written to the ledger.
    pub flush_interval: Duration,
    /// Batches kept while the store is down; the oldest are dropped past this.
    pub max_buffered_batches: usize,
    pub webhook: Option<WebhookConfig>,
}

#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// `http://host:port/path`.
    pub url: String,
    /// HMAC-SHA256 key for `X-Tollgate-Signature`.
    pub secret: String,
    pub max_attempts: u32,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct MetricsConfig {
    /// Tenants that always get per-tenant series.
    pub tenant_allow: Vec<String>,
    /// The busiest N tenants (by requests since the last flush) also get them.
    pub tenant_top: usize,
    /// Upper bounds, in seconds, of the latency histograms' buckets (`None`: the defaults,
    /// `metrics::LATENCY_BUCKETS`, 1 ms to 600 s).
    pub latency_buckets: Option<Vec<f64>>,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// SHA-256 of the admin bearer token; `None` disables the `/v1` API.
    pub token_hash: Option<crate::keys::KeyHash>,
    pub audit_log: Option<PathBuf>,
    /// The largest share (0.0 to 1.0) of the running config's tenants a reload may remove
    /// without `force`. A file emptied or cut short by a deploy would otherwise take most
    /// tenants offline at once.
    pub reload_max_removed_fraction: f64,
}

/// The default of `[admin] reload_max_removed_fraction`.
pub const DEFAULT_RELOAD_MAX_REMOVED_FRACTION: f64 = 0.5;

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            token_hash: None,
            audit_log: None,
            reload_max_removed_fraction: DEFAULT_RELOAD_MAX_REMOVED_FRACTION,
        }
    }
}

/// `[jwt]`: the issuers whose signed tokens name a tenant. Validated in `config::jwt`; keys
/// from `jwks_file` and `hmac_secret_file` are read at load time, so a reload reads them again.
#[derive(Debug)]
pub struct JwtConfig {
    pub issuers: Vec<JwtIssuer>,
    /// Verified tokens kept (by SHA-256) until they expire.
    pub cache_size: usize,
    /// A longer token is refused before anything else is done with it.
    pub max_token_bytes: usize,
}

/// Defaults of `[jwt]`.
pub const DEFAULT_JWT_CACHE_SIZE: usize = 100_000;
pub const DEFAULT_MAX_TOKEN_BYTES: usize = 8 * 1024;

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig { issuers: Vec::new(), cache_size: DEFAULT_JWT_CACHE_SIZE, max_token_bytes: DEFAULT_MAX_TOKEN_BYTES }
    }
}

impl JwtConfig {
    /// The issuer whose `issuer` is exactly `iss`.
    pub fn issuer(&self, iss: &str) -> Option<usize> {
        self.issuers.iter().position(|i| i.issuer == iss)
    }
}

/// One `[[jwt.issuers]]`.
#[derive(Debug)]
pub struct JwtIssuer {
    /// The `iss` its tokens carry, compared exactly.
    pub issuer: String,
    /// A token's `aud` must name at least one of these.
    pub audiences: Vec<String>,
    /// The allowlist: all HMAC or all public-key, never `none`.
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    pub keys: JwtKeys,
    pub tenant_claim: ClaimPath,
    pub scopes_claim: ClaimPath,
    pub key_id_claim: ClaimPath,
    pub tier_claim: Option<ClaimPath>,
    /// The tiers `tier_claim` may name.
    pub tiers: Vec<Arc<Tier>>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
    /// How often a `jwks_url` is fetched again.
    pub jwks_refresh: Duration,
    /// The least time between two fetches, whatever asks for them (an unknown `kid`, a failure).
    pub jwks_refresh_floor: Duration,
    /// How long one fetch may take.
    pub jwks_timeout: Duration,
}

/// Where an issuer's keys come from.
#[derive(Debug, Clone)]
pub enum JwtKeys {
    /// Fetched in the background, and again on schedule or on an unknown `kid`.
    Url(String),
    /// A JWKS file, read at load.
    File { path: PathBuf, keys: Arc<crate::jwks::KeySet> },
    /// An HMAC secret file, read at load.
    Hmac { path: PathBuf, keys: Arc<crate::jwks::KeySet> },
}

/// A claim named by a dotted path (`tenant_id`, `realm_access.roles`). A key that itself holds
/// dots, like Auth0's namespaced `https://example.com/tenant`, is found too: at each level the
/// longest run of segments that is a key of the object wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimPath {
    pub text: String,
    pub segments: Vec<String>,
}

impl ClaimPath {
    /// `None` for a path with an empty segment.
    pub fn parse(text: &str) -> Option<ClaimPath> {
        let segments: Vec<String> = text.split('.').map(str::to_string).collect();
        if text.is_empty() || segments.iter().any(String::is_empty) {
            return None;
        }
        Some(ClaimPath { text: text.to_string(), segments })
    }

    /// The value at this path in `claims`.
    pub fn find<'c>(&self, claims: &'c serde_json::Map<String, serde_json::Value>) -> Option<&'c serde_json::Value> {
        find_in(claims, &self.segments)
    }
}

fn find_in<'c>(obj: &'c serde_json::Map<String, serde_json::Value>, segs: &[String]) -> Option<&'c serde_json::Value> {
    if let Some(v) = obj.get(&segs.join(".")) {
        return Some(v);
    }
    // Shorter and shorter runs of segments as this level's key, the rest one level down.
    for take in (1..segs.len()).rev() {
        if let Some(serde_json::Value::Object(inner)) = obj.get(&segs[..take].join(".")) {
            if let Some(v) = find_in(inner, &segs[take..]) {
                return Some(v);
            }
        }
    }
    None
}
