//! Configuration: the TOML file, its includes, and the validated model.
//!
//! Two layers, as in river and linkerd: [`file`] mirrors the TOML with serde, and this module
//! converts it into [`model::Config`], checking every value and reference. Loading never stops
//! at the first problem: all of them come back together in [`Diagnostics`], each with file,
//! line and column. A failed load changes nothing; callers keep running on the old config.

pub mod file;
pub mod jobs;
pub mod jwt;
pub mod model;
pub mod policy;

pub use crate::schema::diag::{self, Diagnostic, Diagnostics, Severity, SourceFile};
pub use crate::schema::units;
pub use crate::schema::{size_value, valid_slug, wildcard_match};
pub use model::*;

use crate::keys::KeyHash;
use file::{DateOrStr, MainFile, SStr};
use ipnet::IpNet;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use toml::Spanned;

/// The result of a load that succeeded: the config and any warnings.
pub struct Loaded {
    pub config: Config,
    pub warnings: Diagnostics,
}

/// Reads, validates and compiles the config at `path` and everything it includes.
pub fn load(path: &Path) -> Result<Loaded, Diagnostics> {
    let mut diags = Diagnostics::default();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            diags.error_file(path, format!("cannot read the config file: {e}"));
            return Err(diags);
        }
    };
    let config = load_str(path, text, &mut diags);
    diags.sort();
    config.ok_or(diags.clone()).and_then(|config| {
        if diags.has_errors() {
            Err(diags.clone())
        } else {
            Ok(Loaded { config, warnings: diags })
        }
    })
}

/// Validates config text as if it were the file at `path` (includes resolve relative to it).
pub fn load_str(path: &Path, text: String, diags: &mut Diagnostics) -> Option<Config> {
    // An empty file is valid TOML, and every section has defaults, so it would load as a
    // gateway with no tenants, no keys and no admin token. That is almost always a file
    // truncated by a deploy or an editor, never an intended config.
    if is_blank(&text) {
        diags.error_file(
            path,
            "the config file is empty (it holds nothing but whitespace and comments), so it would serve no tenant and no key; restore the file (a deploy or an editor may have cut it short), or start from the commented example config/tollgate.toml, then run `tollgate check` again",
        );
        return None;
    }
    let src = SourceFile::new(path, text);
    let main = file::parse_main(&src, diags);
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();

    let mut files = vec![path.to_path_buf()];
    let mut rule_files = Vec::new();
    for pattern in &main.include {
        for inc in expand_include(&base_dir, pattern, &src, diags) {
            match std::fs::read_to_string(&inc) {
                Ok(text) => {
                    let isrc = SourceFile::new(&inc, text);
                    rule_files.push(crate::rules::file::parse_rule_file(&isrc, diags));
                    files.push(inc);
                }
                Err(e) => {
                    diags.error_at(&src, pattern.span(), format!("cannot read included file {}: {e}", inc.display()))
                }
            }
        }
    }
    let config = validate(&src, &base_dir, main, rule_files, files, diags);
    if diags.has_errors() {
        None
    } else {
        config
    }
}

/// True when `text` holds no TOML at all: only blank lines and `#` comments.
fn is_blank(text: &str) -> bool {
    text.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#')
    })
}

/// Expands one `include` entry. A `*` is allowed in the last path component.
fn expand_include(base: &Path, pattern: &SStr, src: &SourceFile, diags: &mut Diagnostics) -> Vec<PathBuf> {
    let full = base.join(pattern.get_ref());
    let file_pat = full.file_name().and_then(|f| f.to_str()).unwrap_or("").to_string();
    if !file_pat.contains('*') {
        if !full.is_file() {
            diags.error_at(src, pattern.span(), format!("included file {} does not exist", full.display()));
            return vec![];
        }
        return vec![full];
    }
    let dir = full.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.to_string_lossy().contains('*') {
        diags.error_at(
            src,
            pattern.span(),
            "`*` is only allowed in the file name of an include, not in its directories",
        );
        return vec![];
    }
    let mut out: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .filter(|p| p.file_name().and_then(|f| f.to_str()).is_some_and(|name| wildcard_match(&file_pat, name)))
            .collect(),
        Err(e) => {
            diags.error_at(src, pattern.span(), format!("cannot list {}: {e}", dir.display()));
            return vec![];
        }
    };
    out.sort();
    if out.is_empty() {
        diags.warn_at(src, pattern.span(), format!("include `{}` matches no file", pattern.get_ref()));
    }
    out
}

fn duration_or(v: &Option<SStr>, default: Duration, src: &SourceFile, diags: &mut Diagnostics) -> Duration {
    match v {
        None => default,
        Some(s) => match units::parse_duration(s.get_ref()) {
            Ok(d) => d,
            Err(e) => {
                diags.error_at(src, s.span(), e);
                default
            }
        },
    }
}

fn socket_addr(s: &SStr, what: &str, src: &SourceFile, diags: &mut Diagnostics) -> Option<SocketAddr> {
    match s.get_ref().parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            diags.error_at(
                src,
                s.span(),
                format!(
                    "`{}` is not a valid {what} address; write it as `IP:PORT`, like `127.0.0.1:8080`",
                    s.get_ref()
                ),
            );
            None
        }
    }
}

/// Parses a CIDR or a bare IP (taken as a /32 or /128).
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    if let Ok(n) = text.parse::<IpNet>() {
        return Ok(n.trunc());
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(format!("`{text}` is not an IP address or CIDR block; write it like `10.0.0.0/8` or `192.0.2.7`"))
}

fn cidrs(list: &[SStr], src: &SourceFile, diags: &mut Diagnostics) -> Vec<IpNet> {
    list.iter()
        .filter_map(|s| match parse_cidr(s.get_ref()) {
            Ok(n) => Some(n),
            Err(e) => {
                diags.error_at(src, s.span(), e);
                None
            }
        })
        .collect()
}

/// The default instance id: the host name and process id, unique enough among a fleet.
fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "tollgate".into());
    format!("{host}-{}", std::process::id())
}

/// Default `log.buffer_lines`: about half a second of access log at 30,000 requests a second,
/// a few MiB of memory at most.
pub const DEFAULT_LOG_BUFFER_LINES: usize = 16_384;

/// The levels a `log.level` directive may name, for messages.
const LOG_LEVELS: &str = "error, warn, info, debug, trace or off";

/// Checks `log.level` as the log setup reads it (comma-separated directives, each a level or
/// `target=level`) and returns it without the spaces around directives, which the filter
/// itself does not allow.
///
/// `EnvFilter` alone accepts too much: it reads a bare word that is not a level as a target
/// name, so `"verbose"` means "everything from a module named verbose", which silences every
/// message the gateway writes. A directive without a level is therefore refused here.
fn log_level(text: &str) -> Result<String, String> {
    use tracing_subscriber::filter::LevelFilter;
    let directives: Vec<&str> = text.split(',').map(str::trim).filter(|d| !d.is_empty()).collect();
    if directives.is_empty() {
        return Err(format!("`log.level` is empty; use a level ({LOG_LEVELS}), like \"info\""));
    }
    for d in &directives {
        let d = *d;
        let (target, level) = match d.rsplit_once('=') {
            Some((target, level)) => (Some(target.trim()), level.trim()),
            None => (None, d),
        };
        let is_level = !level.is_empty() && level.parse::<LevelFilter>().is_ok();
        match target {
            None if !is_level => {
                return Err(format!(
                    "`{d}` is not a log level; use {LOG_LEVELS}, or `target=level` directives separated by commas, like \"info,tollgate::access=off\""
                ))
            }
            Some("") => {
                return Err(format!("`{d}` names no target; write `target=level`, like `tollgate::access=off`"))
            }
            Some(_) if !is_level => {
                return Err(format!("`{d}`: `{level}` is not a log level; use {LOG_LEVELS}"));
            }
            _ => {}
        }
    }
    // The directives' own syntax (span and field filters) is the filter's to judge.
    let level = directives.join(",");
    match tracing_subscriber::EnvFilter::try_new(&level) {
        Ok(_) => Ok(level),
        Err(e) => Err(format!(
            "`{text}` is not a valid log filter ({e}); use a level ({LOG_LEVELS}) or `target=level` directives"
        )),
    }
}

fn header_name(s: &SStr, src: &SourceFile, diags: &mut Diagnostics) -> Option<http::HeaderName> {
    match http::HeaderName::from_bytes(s.get_ref().to_ascii_lowercase().as_bytes()) {
        Ok(h) => Some(h),
        Err(_) => {
            diags.error_at(src, s.span(), format!("`{}` is not a valid header name", s.get_ref()));
            None
        }
    }
}

fn validate(
    src: &SourceFile,
    base_dir: &Path,
    mut main: MainFile,
    rule_files: Vec<crate::rules::file::RuleFile>,
    files: Vec<PathBuf>,
    diags: &mut Diagnostics,
) -> Option<Config> {
    let rel = |p: &str| -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base_dir.join(p)
        }
    };

    // [server]
    let s = &main.server;
    let listen = match &s.listen {
        None => vec![SocketAddr::from(([127, 0, 0, 1], 8080))],
        Some(list) => {
            if list.is_empty() {
                diags.error_file(&src.path, "`server.listen` is empty; give at least one address");
            }
            list.iter().filter_map(|a| socket_addr(a, "listen", src, diags)).collect()
        }
    };
    let admin_listen = s
        .admin_listen
        .as_ref()
        .and_then(|a| socket_addr(a, "admin_listen", src, diags))
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9090)));
    let threads = match &s.threads {
        None => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        Some(t) if *t.get_ref() >= 1 && *t.get_ref() <= 1024 => *t.get_ref() as usize,
        Some(t) => {
            diags.error_at(src, t.span(), "`threads` must be between 1 and 1024");
            1
        }
    };
    let tls = s.tls.as_ref().and_then(|t| {
        let span = t.span();
        let t = t.get_ref();
        let need = |v: &Option<SStr>, key: &str, what: &str, diags: &mut Diagnostics| {
            if v.is_none() {
                diags.missing_at(src, span.clone(), key, span.clone(), format!("`server.tls` needs `{key}`, {what}"));
            }
        };
        need(&t.listen, "listen", "the HTTPS address, like \"0.0.0.0:8443\"", diags);
        need(&t.cert, "cert", "the path of the PEM certificate chain", diags);
        need(&t.key, "key", "the path of the certificate's PEM private key", diags);
        let listen = t.listen.as_ref().and_then(|l| socket_addr(l, "tls.listen", src, diags));
        let file = |v: &Option<SStr>, what: &str, diags: &mut Diagnostics| {
            let v = v.as_ref()?;
            let path = rel(v.get_ref());
            if !path.is_file() {
                diags.error_at(src, v.span(), format!("{what} {} does not exist", path.display()));
            }
            Some(path)
        };
        let cert = file(&t.cert, "TLS certificate", diags);
        let key = file(&t.key, "TLS key", diags);
        Some(TlsConfig { listen: listen?, cert: cert?, key: key? })
    });
    let max_header_bytes =
        s.max_header_bytes.as_ref().and_then(|v| size_value(v, src, diags)).unwrap_or(64 * 1024) as usize;
    if max_header_bytes < 1024 {
        if let Some(v) = &s.max_header_bytes {
            diags.error_at(src, v.span(), "`max_header_bytes` below 1KiB would reject ordinary requests");
        }
    }
    let allowed_methods: Vec<http::Method> = match &s.allowed_methods {
        None => DEFAULT_METHODS.iter().filter_map(|m| http::Method::from_bytes(m.as_bytes()).ok()).collect(),
        Some(list) => {
            let mut out = Vec::new();
            for m in list {
                let name = m.get_ref();
                if name.is_empty() || name.len() > 32 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                    diags.error_at(src, m.span(), format!("`{name}` is not an HTTP method; write it like `GET`"));
                } else if name.as_str() == "CONNECT" {
                    diags.error_at(src, m.span(), "`CONNECT` opens a tunnel, which the gateway does not proxy");
                } else if let Ok(method) = http::Method::from_bytes(name.as_bytes()) {
                    if !out.contains(&method) {
                        out.push(method);
                    }
                }
            }
            if list.is_empty() {
                diags.error_file(&src.path, "`server.allowed_methods` is empty; every request would be refused");
            }
            out
        }
    };
    let allow_header = allowed_methods.iter().map(http::Method::as_str).collect::<Vec<_>>().join(", ");
    let count = |v: &Option<Spanned<i64>>, key: &str, default: usize, max: i64, diags: &mut Diagnostics| match v {
        None => default,
        Some(n) if *n.get_ref() >= 1 && *n.get_ref() <= max => *n.get_ref() as usize,
        Some(n) => {
            diags.error_at(src, n.span(), format!("`{key}` must be a whole number from 1 to {max}"));
            default
        }
    };
    let max_connections = count(&s.max_connections, "max_connections", 0, 10_000_000, diags);
    let max_connections_per_ip = count(&s.max_connections_per_ip, "max_connections_per_ip", 1024, 10_000_000, diags);
    let upstream_keepalive_pool_size =
        count(&s.upstream_keepalive_pool_size, "upstream_keepalive_pool_size", 128, 1_000_000, diags);
    let header_timeout = duration_or(&s.header_timeout, Duration::from_secs(10), src, diags);
    let idle_timeout = duration_or(&s.idle_timeout, Duration::from_secs(60), src, diags);
    for (v, key, d) in
        [(&s.header_timeout, "header_timeout", header_timeout), (&s.idle_timeout, "idle_timeout", idle_timeout)]
    {
        if let Some(v) = v {
            if d < Duration::from_secs(1) || d > Duration::from_secs(3600) {
                diags.error_at(src, v.span(), format!("`{key}` must be from 1s to 1h"));
            }
        }
    }
    let bind_retry = duration_or(&s.bind_retry, Duration::from_secs(2), src, diags);
    if let Some(v) = &s.bind_retry {
        if bind_retry > Duration::from_secs(60) {
            diags.error_at(src, v.span(), "`bind_retry` must be at most 1m");
        }
    }
    let server = ServerConfig {
        listen,
        admin_listen,
        threads,
        tls,
        shutdown_grace: duration_or(&s.shutdown_grace, Duration::from_secs(2), src, diags),
        shutdown_timeout: duration_or(&s.shutdown_timeout, Duration::from_secs(5), src, diags),
        bind_retry,
        upgrade_sock: s
            .upgrade_sock
            .as_ref()
            .map(|p| rel(p.get_ref()))
            .unwrap_or_else(|| PathBuf::from("/tmp/tollgate_upgrade.sock")),
        pid_file: s.pid_file.as_ref().map(|p| rel(p.get_ref())).unwrap_or_else(|| PathBuf::from("/tmp/tollgate.pid")),
        max_header_bytes,
        allowed_methods,
        allow_header,
        header_timeout,
        idle_timeout,
        max_connections,
        max_connections_per_ip,
        work_stealing: s.work_stealing.unwrap_or(true),
        upstream_keepalive_pool_size,
        h2c: s.h2c.unwrap_or(true),
        server_header: s.server_header.as_ref().and_then(|v| match http::HeaderValue::from_str(v.get_ref()) {
            Ok(h) if !v.get_ref().trim().is_empty() => Some(h),
            _ => {
                diags.error_at(
                    src,
                    v.span(),
                    "`server_header` must be non-empty visible ASCII, like \"tollgate\"; leave it out to send no `Server` header",
                );
                None
            }
        }),
    };

    // [store]
    let sf = &main.store;
    let store_kind = match sf.kind.as_ref().map(|k| k.get_ref().as_str()) {
        None | Some("embedded") => StoreKind::Embedded,
        Some("redis") => StoreKind::Redis,
        Some(other) => {
            if let Some(k) = &sf.kind {
                diags.error_at(src, k.span(), format!("unknown store kind `{other}`; use `embedded` or `redis`"));
            }
            StoreKind::Embedded
        }
    };
    let mut urls = Vec::new();
    for u in sf.url.iter().flat_map(|l| l.get_ref()) {
        // A comma-separated string is a list too (the form before lists were accepted).
        for part in u.get_ref().split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if !(part.starts_with("redis://") || part.starts_with("rediss://")) {
                diags.error_at(
                    src,
                    u.span(),
                    format!("`{part}` is not a Redis URL; write it like `redis://127.0.0.1:6379`"),
                );
            }
            urls.push(part.to_string());
        }
    }
    if store_kind == StoreKind::Redis && urls.is_empty() {
        match (&sf.url, &sf.kind) {
            (Some(u), _) => diags.error_at(
                src,
                u.span(),
                "`url` names no Redis; give at least one, like `url = \"redis://127.0.0.1:6379\"`",
            ),
            (None, Some(k)) => {
                diags.error_at(src, k.span(), "`kind = \"redis\"` needs `url`, like `redis://127.0.0.1:6379`")
            }
            (None, None) => {}
        }
    }
    let cluster = match &sf.cluster {
        None => urls.len() > 1,
        Some(c) => {
            let on = *c.get_ref();
            if store_kind != StoreKind::Redis {
                diags.error_at(
                    src,
                    c.span(),
                    "`cluster` applies to a Redis store; add `kind = \"redis\"` and `url`, or remove `cluster`",
                );
            } else if !on && urls.len() > 1 {
                diags.error_at(
                    src,
                    c.span(),
                    format!(
                        "`cluster = false` means one Redis, but `url` names {}; give one URL, or set `cluster = true` \
                         if they are seeds of a Redis Cluster",
                        urls.len()
                    ),
                );
            }
            on
        }
    };
    let breaker_failures = match &sf.breaker_failures {
        None => 5,
        Some(v) if *v.get_ref() >= 1 => *v.get_ref() as u32,
        Some(v) => {
            diags.error_at(src, v.span(), "`breaker_failures` must be at least 1");
            5
        }
    };
    let max_lease_block = match &sf.max_lease_block {
        None => 1000,
        Some(v) if *v.get_ref() >= 1 => *v.get_ref() as u64,
        Some(v) => {
            diags.error_at(src, v.span(), "`max_lease_block` must be at least 1");
            1000
        }
    };
    let timeout = duration_or(&sf.timeout, Duration::from_millis(50), src, diags);
    if timeout.is_zero() {
        if let Some(t) = &sf.timeout {
            diags.error_at(src, t.span(), "a store timeout of zero would fail every call");
        }
    }
    let flush_interval = duration_or(&sf.flush_interval, Duration::from_secs(1), src, diags);
    if flush_interval.is_zero() || flush_interval > Duration::from_secs(60) {
        if let Some(t) = &sf.flush_interval {
            diags.error_at(src, t.span(), "`flush_interval` must be between 1ms and 60s");
        }
    }
    let lease_ttl = duration_or(&sf.lease_ttl, Duration::from_secs(10), src, diags);
    if lease_ttl < Duration::from_millis(500) {
        if let Some(t) = &sf.lease_ttl {
            diags.error_at(src, t.span(), "`lease_ttl` must be at least 500ms (leases are renewed every third of it)");
        }
    }
    let lease_idle = duration_or(&sf.lease_idle, Duration::from_secs(5), src, diags);
    let lease_timeout = duration_or(&sf.lease_timeout, Duration::from_millis(500), src, diags);
    if lease_timeout.is_zero() {
        if let Some(t) = &sf.lease_timeout {
            diags.error_at(src, t.span(), "a `lease_timeout` of zero would fail every lease call");
        }
    }
    let store = StoreConfig {
        kind: store_kind,
        lease_ttl,
        lease_idle,
        lease_timeout: lease_timeout.max(timeout),
        path: sf.path.as_ref().map(|p| rel(p.get_ref())).unwrap_or_else(|| rel("tollgate.db")),
        urls,
        cluster,
        timeout,
        flush_interval,
        breaker_failures,
        breaker_cooldown: duration_or(&sf.breaker_cooldown, Duration::from_secs(5), src, diags),
        max_lease_block,
        instance_id: sf.instance_id.as_ref().map(|i| i.get_ref().clone()).unwrap_or_else(default_instance_id),
        slot_ttl: duration_or(&sf.slot_ttl, Duration::from_secs(10), src, diags),
    };

    // [tenancy]
    let t = &main.tenancy;
    let mut resolve = Vec::new();
    for s in t.resolve.clone().unwrap_or_default() {
        let src_kind = match s.get_ref().as_str() {
            "api_key" => Source::ApiKey,
            "subdomain" => Source::Subdomain,
            "header" => Source::Header,
            "path" => Source::Path,
            "jwt" => Source::Jwt,
            other => {
                diags.error_at(
                    src,
                    s.span(),
                    format!("unknown tenant source `{other}`; use api_key, jwt, subdomain, header or path"),
                );
                continue;
            }
        };
        if resolve.contains(&src_kind) {
            diags.error_at(src, s.span(), format!("`{}` is listed twice in `resolve`", s.get_ref()));
        }
        resolve.push(src_kind);
    }
    if t.resolve.is_none() {
        resolve = vec![Source::ApiKey, Source::Subdomain, Source::Path];
    }
    if !resolve.contains(&Source::ApiKey) && !resolve.contains(&Source::Jwt) {
        if let Some(first) = t.resolve.as_ref().and_then(|r| r.first()) {
            diags.warn_at(
                src,
                first.span(),
                "`resolve` has no `api_key`: API keys will not be read, and only public routes can be served",
            );
        }
    }
    if resolve.contains(&Source::Header) && t.trusted_proxies.as_ref().is_none_or(|p| p.is_empty()) {
        if let Some(h) = t.resolve.as_ref().and_then(|r| r.iter().find(|s| s.get_ref() == "header")) {
            diags.warn_at(src, h.span(), "`header` resolution is on but `trusted_proxies` is empty: the tenant header is only believed from trusted proxies, so it will be ignored");
        }
    }
    let base_domain =
        t.base_domain.as_ref().map(|d| d.get_ref().trim_start_matches('.').trim_end_matches('.').to_ascii_lowercase());
    if resolve.contains(&Source::Subdomain) && base_domain.is_none() {
        if let Some(r) = t.resolve.as_ref().and_then(|r| r.iter().find(|s| s.get_ref() == "subdomain")) {
            diags.error_at(src, r.span(), "`subdomain` resolution needs `tenancy.base_domain`, like `api.example.com`");
        }
    }
    let tenant_header = t
        .tenant_header
        .as_ref()
        .and_then(|h| header_name(h, src, diags))
        .unwrap_or(http::HeaderName::from_static("x-tenant-id"));
    let key_headers = match &t.key_headers {
        None => vec![http::header::AUTHORIZATION, http::HeaderName::from_static("x-api-key")],
        Some(list) => list.iter().filter_map(|h| header_name(h, src, diags)).collect(),
    };
    let mut tenancy = Tenancy {
        resolve,
        base_domain,
        tenant_header,
        key_headers,
        trusted_proxies: cidrs(t.trusted_proxies.as_deref().unwrap_or(&[]), src, diags),
        // From `[jwt]`, once the tiers its issuers may grant are known.
        token_header: None,
        token_cookie: None,
    };

    // [log]
    let log = LogConfig {
        format: match main.log.format.as_ref().map(|f| f.get_ref().as_str()) {
            None | Some("plain") => LogFormat::Plain,
            Some("json") => LogFormat::Json,
            Some(other) => {
                if let Some(f) = &main.log.format {
                    diags.error_at(src, f.span(), format!("unknown log format `{other}`; use `plain` or `json`"));
                }
                LogFormat::Plain
            }
        },
        level: match &main.log.level {
            None => "info".into(),
            Some(l) => match log_level(l.get_ref()) {
                Ok(level) => level,
                Err(e) => {
                    diags.error_at(src, l.span(), e);
                    l.get_ref().clone()
                }
            },
        },
        access_log: main.log.access_log.unwrap_or(true),
        buffer_lines: match &main.log.buffer_lines {
            None => DEFAULT_LOG_BUFFER_LINES,
            Some(n) if (1024..=1_048_576).contains(n.get_ref()) => *n.get_ref() as usize,
            Some(n) => {
                diags.error_at(src, n.span(), "`buffer_lines` must be a whole number from 1024 to 1048576");
                DEFAULT_LOG_BUFFER_LINES
            }
        },
    };

    // [metering], [metrics], [admin]
    let mf = &main.metering;
    let webhook = mf.webhook.as_ref().and_then(|w| {
        let wf = w.get_ref();
        // Every key is checked before giving up, so that one bad key does not hide the next.
        let url = match &wf.url {
            Some(u) if u.get_ref().starts_with("http://") => Some(u.get_ref().clone()),
            Some(u) => {
                diags.error_at(
                    src,
                    u.span(),
                    "the webhook `url` must start with `http://` (send it to a local relay for TLS)",
                );
                None
            }
            None => {
                diags.missing_at(
                    src,
                    w.span(),
                    "url",
                    w.span(),
                    "a webhook needs a `url`, like \"http://127.0.0.1:9100/quota\"",
                );
                None
            }
        };
        let secret = match &wf.secret {
            Some(s) if s.get_ref().len() >= 16 => Some(s.get_ref().clone()),
            Some(s) => {
                diags.error_at(src, s.span(), "the webhook `secret` must be at least 16 characters");
                None
            }
            None => {
                diags.missing_at(
                    src,
                    w.span(),
                    "secret",
                    w.span(),
                    "a webhook needs a `secret` of at least 16 characters to sign its requests",
                );
                None
            }
        };
        let max_attempts = match &wf.max_attempts {
            None => 5,
            Some(a) if (1..=20).contains(a.get_ref()) => *a.get_ref() as u32,
            Some(a) => {
                diags.error_at(src, a.span(), "`max_attempts` must be between 1 and 20");
                5
            }
        };
        let timeout = duration_or(&wf.timeout, Duration::from_secs(2), src, diags);
        Some(WebhookConfig { url: url?, secret: secret?, max_attempts, timeout })
    });
    let metering = MeteringConfig {
        flush_interval: duration_or(&mf.flush_interval, Duration::from_secs(1), src, diags),
        max_buffered_batches: match &mf.max_buffered_batches {
            None => 3600,
            Some(n) if *n.get_ref() >= 1 => *n.get_ref() as usize,
            Some(n) => {
                diags.error_at(src, n.span(), "`max_buffered_batches` must be at least 1");
                3600
            }
        },
        webhook,
    };
    if metering.flush_interval.is_zero() {
        if let Some(f) = &mf.flush_interval {
            diags.error_at(src, f.span(), "a flush interval of zero would spin");
        }
    }
    let metrics = match &main.metrics.tenant_labels {
        None => MetricsConfig::default(),
        Some(tl) => {
            let t = tl.get_ref();
            let top = match &t.top {
                None => 0,
                Some(n) if (0..=1000).contains(n.get_ref()) => *n.get_ref() as usize,
                Some(n) => {
                    diags.error_at(
                        src,
                        n.span(),
                        "`top` must be between 0 and 1000: per-tenant series must stay bounded",
                    );
                    0
                }
            };
            MetricsConfig {
                tenant_allow: t.allow.iter().map(|a| a.get_ref().clone()).collect(),
                tenant_top: top,
                latency_buckets: None,
            }
        }
    };
    let metrics = MetricsConfig {
        latency_buckets: main.metrics.latency_buckets.as_ref().and_then(|b| {
            let v = b.get_ref();
            let ok = !v.is_empty()
                && v.len() <= 64
                && v.iter().all(|x| x.is_finite() && *x > 0.0)
                && v.windows(2).all(|w| w[0] < w[1]);
            if !ok {
                diags.error_at(
                    src,
                    b.span(),
                    "`latency_buckets` must be 1 to 64 increasing positive numbers of seconds, like [0.01, 0.1, 1, 10, 600]",
                );
            }
            ok.then(|| v.clone())
        }),
        ..metrics
    };
    let admin = AdminConfig {
        token_hash: main.admin.token_hash.as_ref().and_then(|h| match KeyHash::parse(h.get_ref()) {
            Ok(k) => Some(k),
            Err(e) => {
                diags.error_at(src, h.span(), format!("admin token_hash: {e}"));
                None
            }
        }),
        audit_log: main.admin.audit_log.as_ref().map(|p| rel(p.get_ref())),
        reload_max_removed_fraction: match &main.admin.reload_max_removed_fraction {
            None => DEFAULT_RELOAD_MAX_REMOVED_FRACTION,
            // `contains` is false for NaN, which TOML can spell as `nan`.
            Some(f) if (0.0..=1.0).contains(f.get_ref()) => *f.get_ref(),
            Some(f) => {
                diags.error_at(
                    src,
                    f.span(),
                    format!(
                        "`reload_max_removed_fraction` must be a number from 0.0 to 1.0 (the share of the running tenants a reload may remove, like 0.5 for half), not {}",
                        f.get_ref()
                    ),
                );
                DEFAULT_RELOAD_MAX_REMOVED_FRACTION
            }
        },
    };

    // [upstreams.NAME]
    let mut upstreams = BTreeMap::new();
    for (name, u) in &main.upstreams {
        let mut servers = Vec::new();
        match &u.servers {
            None => diags.missing_at(
                src,
                name.span(),
                "servers",
                name.span(),
                format!(
                    "upstream `{}` has no `servers`; add them, like `servers = [\"10.0.0.5:9000\"]`",
                    name.get_ref()
                ),
            ),
            Some(list) if list.is_empty() => {
                diags.error_at(src, name.span(), format!("upstream `{}` has an empty `servers` list", name.get_ref()))
            }
            Some(list) => {
                for s in list {
                    match s.get_ref().to_socket_addrs().map(|it| it.collect::<Vec<_>>()) {
                        Ok(addrs) if !addrs.is_empty() => {
                            for a in addrs {
                                if !servers.contains(&a) {
                                    servers.push(a);
                                }
                            }
                        }
                        _ => diags.error_at(
                            src,
                            s.span(),
                            format!("`{}` is not a `host:port` address that resolves", s.get_ref()),
                        ),
                    }
                }
            }
        }
        let health_check = u.health_check.as_ref().map(|h| HealthCheck {
            path: h.get_ref().path.as_ref().map(|p| p.get_ref().clone()),
            interval: duration_or(&h.get_ref().interval, Duration::from_secs(5), src, diags),
        });
        if let Some(Some(p)) = u.health_check.as_ref().map(|h| h.get_ref().path.as_ref()) {
            if !p.get_ref().starts_with('/') {
                diags.error_at(src, p.span(), "a health check path must start with `/`");
            }
        }
        upstreams.insert(
            name.get_ref().clone(),
            UpstreamConfig {
                name: name.get_ref().as_str().into(),
                servers,
                health_check,
                connect_timeout: duration_or(&u.connect_timeout, Duration::from_secs(2), src, diags),
                read_timeout: duration_or(&u.read_timeout, Duration::from_secs(60), src, diags),
                write_timeout: duration_or(&u.write_timeout, Duration::from_secs(60), src, diags),
                host: u.host.as_ref().map(|h| h.get_ref().clone()),
                protocol: match u.protocol.as_ref().map(|p| p.get_ref().as_str()) {
                    None | Some("h1") => UpstreamProtocol::H1,
                    Some("h2") => UpstreamProtocol::H2,
                    Some("h2c") => UpstreamProtocol::H2c,
                    Some(other) => {
                        if let Some(p) = &u.protocol {
                            diags.error_at(
                                src,
                                p.span(),
                                format!("unknown upstream protocol `{other}`; use \"h1\", \"h2\" (HTTP/2 over TLS) or \"h2c\" (HTTP/2 without TLS)"),
                            );
                        }
                        UpstreamProtocol::H1
                    }
                },
            },
        );
    }

    // [tiers.NAME]
    let mut tiers = BTreeMap::new();
    for (name, tf) in &main.tiers {
        let upstream = match &tf.upstream {
            Some(u) => {
                if !upstreams.contains_key(u.get_ref()) {
                    diags.error_at(
                        src,
                        u.span(),
                        format!(
                            "tier `{}` names upstream `{}`, which is not defined; add `[upstreams.{}]`",
                            name.get_ref(),
                            u.get_ref(),
                            u.get_ref()
                        ),
                    );
                }
                u.get_ref().clone()
            }
            None => {
                if upstreams.len() == 1 {
                    upstreams.keys().next().cloned().unwrap_or_default()
                } else {
                    diags.missing_at(
                        src,
                        name.span(),
                        "upstream",
                        name.span(),
                        format!(
                            "tier `{}` has no `upstream`; name one of the pools (it may be left out only when exactly one pool is defined)",
                            name.get_ref()
                        ),
                    );
                    String::new()
                }
            }
        };
        let features = tf
            .features
            .as_ref()
            .map(|f| f.iter().map(|x| Arc::from(x.get_ref().as_str())).collect())
            .unwrap_or_default();
        let limits = policy::tier_limits(tf, src, diags);
        tiers.insert(
            name.get_ref().clone(),
            Arc::new(Tier { name: name.get_ref().as_str().into(), upstream: upstream.into(), features, limits }),
        );
    }

    // [[tenants]]
    let mut tenants = Vec::new();
    // The file is the operator's: no hash flooding to fear, and a million keys to check.
    type Fast = crate::fasthash::Fast;
    let mut seen_ids: HashMap<String, (), Fast> = HashMap::default();
    let mut seen_subdomains: HashSet<String, Fast> = HashSet::default();
    let mut seen_key_ids: HashSet<String, Fast> = HashSet::default();
    let mut seen_hashes: HashSet<KeyHash, crate::keys::IdentityBuild> = HashSet::default();
    // Tenants come parsed, or (a large file) as text read one at a time here, each dropped once
    // its config is built; a tenant's problems are reported against its own part of the file.
    let main_src = src;
    let parsed = std::mem::take(&mut main.tenants);
    let chunks = std::mem::take(&mut main.tenant_chunks);
    let n_parsed = parsed.len();
    let mut parsed = parsed.into_iter();
    tenants.reserve(n_parsed + chunks.len());
    // Tenants with overrides, for the check of their metrics once the rules are compiled.
    let mut with_overrides: Vec<(usize, Option<SourceFile>, std::ops::Range<usize>)> = Vec::new();
    for i in 0..n_parsed + chunks.len() {
        let (part, tspan) = match parsed.next() {
            Some(t) => (None, t),
            None => match file::parse_tenant_chunk(main_src, &chunks[i - n_parsed], diags) {
                Some((part, t)) => (Some(part), t),
                None => continue,
            },
        };
        let src = part.as_ref().unwrap_or(main_src);
        let tf = tspan.get_ref();
        // A tenant without a usable id is still checked key by key, so that its other mistakes
        // show in the same pass; messages then call it "this tenant".
        let (id, who, id_span) = match &tf.id {
            Some(id) => (id.get_ref().clone(), format!("tenant `{}`", id.get_ref()), id.span()),
            None => {
                diags.missing_at(src, tspan.span(), "id", tspan.span(), "a tenant needs an `id`, like `id = \"acme\"`");
                (String::new(), "this tenant".to_string(), tspan.span())
            }
        };
        if let Some(sid) = &tf.id {
            if !valid_slug(&id) {
                diags.error_at(
                    src,
                    sid.span(),
                    format!("tenant id `{id}` must be 1-63 characters of a-z, 0-9 and `-`"),
                );
            }
            if seen_ids.insert(id.clone(), ()).is_some() {
                diags.error_at(src, sid.span(), format!("tenant `{id}` is defined twice"));
            }
        }
        let tier = match &tf.tier {
            Some(t) => {
                if !tiers.contains_key(t.get_ref()) {
                    let known: Vec<&str> = tiers.keys().map(String::as_str).collect();
                    diags.error_at(
                        src,
                        t.span(),
                        format!(
                            "{who} names tier `{}`, which is not defined (defined: {})",
                            t.get_ref(),
                            known.join(", ")
                        ),
                    );
                }
                t.get_ref().clone()
            }
            None => {
                diags.missing_at(
                    src,
                    tspan.span(),
                    "tier",
                    id_span.clone(),
                    format!("{who} has no `tier`; name one of the `[tiers.NAME]`"),
                );
                String::new()
            }
        };
        let status = match tf.status.as_ref().map(|s| s.get_ref().as_str()) {
            None | Some("active") => TenantStatus::Active,
            Some("suspended") => TenantStatus::Suspended,
            Some(other) => {
                if let Some(s) = &tf.status {
                    diags.error_at(
                        src,
                        s.span(),
                        format!("unknown tenant status `{other}`; use `active` or `suspended`"),
                    );
                }
                TenantStatus::Active
            }
        };
        let mut subdomains = Vec::new();
        for sd in &tf.subdomains {
            let v = sd.get_ref().to_ascii_lowercase();
            if !valid_slug(&v) {
                diags.error_at(
                    src,
                    sd.span(),
                    format!("subdomain `{}` must be one DNS label of a-z, 0-9 and `-`", sd.get_ref()),
                );
            } else if !seen_subdomains.insert(v.clone()) {
                diags.error_at(src, sd.span(), format!("subdomain `{v}` is claimed by two tenants"));
            }
            subdomains.push(v);
        }
        let ip_allow = cidrs(&tf.ip_allow, src, diags);
        let mut keys = Vec::with_capacity(tf.keys.len());
        for kspan in &tf.keys {
            let kf = kspan.get_ref();
            // Like a tenant, a key without an id is still checked, as "this key".
            let (kwho, kid_span) = match &kf.id {
                Some(kid) => {
                    if !seen_key_ids.insert(kid.get_ref().clone()) {
                        diags.error_at(src, kid.span(), format!("key id `{}` is used twice", kid.get_ref()));
                    }
                    (format!("key `{}`", kid.get_ref()), kid.span())
                }
                None => {
                    diags.missing_at(
                        src,
                        kspan.span(),
                        "id",
                        kspan.span(),
                        "a key needs an `id`, like `id = \"acme-key\"`",
                    );
                    ("this key".to_string(), kspan.span())
                }
            };
            let hash = match &kf.hash {
                None => {
                    diags.missing_at(
                        src,
                        kspan.span(),
                        "hash",
                        kid_span,
                        format!("{kwho} has no `hash`; `tollgate keygen` prints one"),
                    );
                    None
                }
                Some(h) => match KeyHash::parse(h.get_ref()) {
                    Ok(hash) => {
                        if !seen_hashes.insert(hash) {
                            diags.error_at(src, h.span(), "this key hash is used by two keys");
                        }
                        Some(hash)
                    }
                    Err(e) => {
                        diags.error_at(src, h.span(), e);
                        None
                    }
                },
            };
            let expires = kf.expires.as_ref().and_then(|e| {
                let text = match e.get_ref() {
                    DateOrStr::Date(d) => d.to_string(),
                    DateOrStr::Str(s) => s.clone(),
                };
                match chrono::DateTime::parse_from_rfc3339(&text) {
                    Ok(dt) => Some(dt.timestamp_millis()),
                    Err(_) => {
                        diags.error_at(
                            src,
                            e.span(),
                            format!("`{text}` is not an RFC 3339 time; write it like `2027-01-31T00:00:00Z`"),
                        );
                        None
                    }
                }
            });
            for sc in &kf.scopes {
                if sc.get_ref().is_empty() || sc.get_ref().contains(char::is_whitespace) {
                    diags.error_at(src, sc.span(), "a scope is a non-empty word without spaces");
                }
            }
            if let (Some(hash), Some(kid)) = (hash, &kf.id) {
                keys.push(KeyConfig {
                    id: kid.get_ref().clone(),
                    name: kf.name.clone().unwrap_or_default(),
                    hash,
                    scopes: kf.scopes.iter().map(|s| s.get_ref().clone()).collect(),
                    expires,
                    revoked_at: kf.revoked.then_some(i64::MIN),
                    created: None,
                });
            }
        }
        let billing_anchor_day = match &tf.billing_anchor_day {
            None => 1,
            Some(d) if (1..=31).contains(d.get_ref()) => *d.get_ref() as u32,
            Some(d) => {
                diags.error_at(src, d.span(), "`billing_anchor_day` is a day of the month, 1 to 31");
                1
            }
        };
        let timezone = match &tf.timezone {
            None => chrono_tz::UTC,
            Some(z) => z.get_ref().parse::<chrono_tz::Tz>().unwrap_or_else(|_| {
                diags.error_at(
                    src,
                    z.span(),
                    format!("`{}` is not an IANA time zone; write it like `Europe/Berlin` or `UTC`", z.get_ref()),
                );
                chrono_tz::UTC
            }),
        };
        let overrides = tf.overrides.as_ref().map(|o| policy::overrides(o, src, diags)).unwrap_or_default();
        if !overrides.quotas.is_empty() {
            let span = tf.overrides.as_ref().map(|o| o.span()).unwrap_or(tspan.span());
            with_overrides.push((tenants.len(), part, span));
        }
        tenants.push(TenantConfig {
            billing_anchor_day,
            timezone,
            overrides,
            name: tf.name.clone().unwrap_or_else(|| id.clone()),
            id,
            email: tf.email.clone().unwrap_or_default(),
            tier,
            status,
            subdomains,
            ip_allow,
            keys,
        });
    }

    // Rules: the main file's own, then each include in order.
    let mut all_rule_files = Vec::new();
    if let Some(r) = main.rules {
        all_rule_files.push(r);
    }
    all_rule_files.extend(rule_files);
    let ctx = crate::rules::RefContext {
        tiers: tiers.iter().map(|(name, t)| (name.as_str(), t.features.iter().map(|f| &**f).collect())).collect(),
        upstreams: upstreams.keys().map(String::as_str).collect(),
    };
    let rules = crate::rules::compile(all_rule_files, &ctx, diags);

    // Tier quotas and prices may only name metrics that exist.
    for (name, tf) in &main.tiers {
        let metrics = tf
            .quotas
            .iter()
            .flatten()
            .map(|(m, q)| (m, q.span()))
            .chain(tf.price.iter().flatten().map(|(m, p)| (m, p.span())));
        for (metric, span) in metrics {
            if !rules.metrics.contains(metric) {
                let known: Vec<&str> = rules.metrics.iter().map(String::as_str).collect();
                diags.error_at(src, span, format!("tier `{}` names metric `{metric}`, which is not declared; declare it with `usage_metrics = [\"{metric}\"]` (declared: {})", name.get_ref(), known.join(", ")));
            }
        }
    }
    for (i, part, span) in with_overrides {
        let t = &tenants[i];
        for metric in t.overrides.quotas.keys() {
            if !rules.metrics.contains(metric) {
                diags.error_at(
                    part.as_ref().unwrap_or(src),
                    span.clone(),
                    format!("tenant `{}` overrides a quota on metric `{metric}`, which is not declared", t.id),
                );
            }
        }
    }

    if tiers.is_empty() && !tenants.is_empty() {
        diags.error_file(&src.path, "tenants are defined but no tier is; add a `[tiers.NAME]` table");
    }

    // [jwt]
    let resolve_jwt = main.tenancy.resolve.as_ref().and_then(|r| r.iter().find(|s| s.get_ref() == "jwt"));
    let mut taken: Vec<&http::HeaderName> = tenancy.key_headers.iter().collect();
    taken.push(&tenancy.tenant_header);
    let jwt = jwt::validate(src, base_dir, &main.jwt, &tiers, resolve_jwt, &taken, diags);
    tenancy.token_header = jwt.header;
    tenancy.token_cookie = jwt.cookie;
    let jwt = Arc::new(jwt.jwt);
    let tier_names: Vec<&str> = tiers.keys().map(String::as_str).collect();
    let jobs = jobs::validate(&main.jobs, &tier_names, src, diags);

    Some(Config {
        files,
        server,
        store,
        tenancy,
        log,
        metering,
        metrics,
        admin,
        jwt,
        jobs,
        tiers,
        upstreams,
        tenants,
        rules,
    })
}
