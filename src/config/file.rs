//! The file layer: serde structs that mirror the TOML exactly, and the machinery that reads
//! them while collecting every problem.
//!
//! A file is parsed once into toml's spanned document. Each table (`[server]`, every
//! `[tiers.X]`, every `[[tenants]]` entry, every `[[rule]]`) is then deserialized on its own, so
//! one bad table does not hide the problems of the next. Unknown keys are found with
//! `serde_ignored` and reported at the key's own line, all of them, instead of stopping at the
//! first as `deny_unknown_fields` would. A value of the wrong type is reported in the user's
//! words ("a duration such as \"10s\""); fields whose kind their Rust type does not tell name it
//! with a `words::` helper.

use super::diag::{Diagnostics, SourceFile};
pub use crate::schema::value::{de_item, de_named_tables, de_unit, parse_document, DateOrStr, IntOrStr, SStr};
use crate::schema::words;
use serde::Deserialize;
use std::collections::BTreeMap;
use toml::de::DeValue;
use toml::Spanned;

#[derive(Debug, Default, Deserialize)]
pub struct ServerFile {
    #[serde(default, deserialize_with = "words::strings")]
    pub listen: Option<Vec<SStr>>,
    pub admin_listen: Option<SStr>,
    pub threads: Option<Spanned<i64>>,
    pub tls: Option<Spanned<TlsFile>>,
    #[serde(default, deserialize_with = "words::duration")]
    pub shutdown_grace: Option<SStr>,
    #[serde(default, deserialize_with = "words::duration")]
    pub shutdown_timeout: Option<SStr>,
    #[serde(default, deserialize_with = "words::duration")]
    pub bind_retry: Option<SStr>,
    pub upgrade_sock: Option<SStr>,
    pub pid_file: Option<SStr>,
    pub max_header_bytes: Option<Spanned<IntOrStr>>,
    #[serde(default, deserialize_with = "words::strings")]
    pub allowed_methods: Option<Vec<SStr>>,
    #[serde(default, deserialize_with = "words::duration")]
    pub header_timeout: Option<SStr>,
    #[serde(default, deserialize_with = "words::duration")]
    pub idle_timeout: Option<SStr>,
    pub max_connections: Option<Spanned<i64>>,
    pub max_connections_per_ip: Option<Spanned<i64>>,
    pub work_stealing: Option<bool>,
    pub upstream_keepalive_pool_size: Option<Spanned<i64>>,
    pub h2c: Option<bool>,
    pub server_header: Option<SStr>,
}

/// All three keys are needed; their absence is reported in validation, in the user's words.
#[derive(Debug, Deserialize)]
pub struct TlsFile {
    pub listen: Option<SStr>,
    pub cert: Option<SStr>,
    pub key: Option<SStr>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StoreFile {
    pub kind: Option<SStr>,
    pub path: Option<SStr>,
    /// One URL, a comma-separated string of URLs, or a list.
    #[serde(default, deserialize_with = "words::string_or_strings")]
    pub url: Option<Spanned<Vec<SStr>>>,
    pub cluster: Option<Spanned<bool>>,
    #[serde(default, deserialize_with = "words::duration")]
    pub timeout: Option<SStr>,
    #[serde(default, deserialize_with = "words::duration")]
    pub flush_interval: Option<SStr>,
    pub breaker_failures: Option<Spanned<i64>>,
    #[serde(default, deserialize_with = "words::duration")]
    pub breaker_cooldown: Option<SStr>,
    pub max_lease_block: Option<Spanned<i64>>,
    pub instance_id: Option<SStr>,
    #[serde(default, deserialize_with = "words::duration")]
    pub slot_ttl: Option<SStr>,
    #[serde(default, deserialize_with = "words::duration")]
    pub lease_ttl: Option<SStr>,
    #[serde(default, deserialize_with = "words::duration")]
    pub lease_idle: Option<SStr>,
    #[serde(default, deserialize_with = "words::duration")]
    pub lease_timeout: Option<SStr>,
}

#[derive(Debug, Default, Deserialize)]
pub struct TenancyFile {
    #[serde(default, deserialize_with = "words::strings")]
    pub resolve: Option<Vec<SStr>>,
    pub base_domain: Option<SStr>,
    pub tenant_header: Option<SStr>,
    #[serde(default, deserialize_with = "words::strings")]
    pub key_headers: Option<Vec<SStr>>,
    #[serde(default, deserialize_with = "words::strings")]
    pub trusted_proxies: Option<Vec<SStr>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct LogFile {
    pub format: Option<SStr>,
    pub level: Option<SStr>,
    pub access_log: Option<bool>,
    pub buffer_lines: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct MeteringFile {
    #[serde(default, deserialize_with = "words::duration")]
    pub flush_interval: Option<SStr>,
    pub max_buffered_batches: Option<Spanned<i64>>,
    pub webhook: Option<Spanned<WebhookFile>>,
}

#[derive(Debug, Deserialize)]
pub struct WebhookFile {
    pub url: Option<SStr>,
    pub secret: Option<SStr>,
    pub max_attempts: Option<Spanned<i64>>,
    #[serde(default, deserialize_with = "words::duration")]
    pub timeout: Option<SStr>,
}

#[derive(Debug, Default, Deserialize)]
pub struct MetricsFile {
    pub tenant_labels: Option<Spanned<TenantLabelsFile>>,
    /// Upper bounds, in seconds, of the latency histograms' buckets.
    pub latency_buckets: Option<Spanned<Vec<f64>>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct TenantLabelsFile {
    #[serde(default, deserialize_with = "words::string_list")]
    pub allow: Vec<SStr>,
    pub top: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct AdminFile {
    pub token_hash: Option<SStr>,
    pub audit_log: Option<SStr>,
    pub reload_max_removed_fraction: Option<Spanned<f64>>,
}

/// `[jwt]`: where tokens are read from, and `[[jwt.issuers]]`.
#[derive(Debug, Default, Deserialize)]
pub struct JwtFile {
    pub header: Option<SStr>,
    pub cookie: Option<SStr>,
    pub cache_size: Option<Spanned<i64>>,
    pub max_token_bytes: Option<Spanned<IntOrStr>>,
    #[serde(default)]
    pub issuers: Vec<Spanned<IssuerFile>>,
}

/// One `[[jwt.issuers]]` table.
#[derive(Debug, Deserialize)]
pub struct IssuerFile {
    pub issuer: Option<SStr>,
    #[serde(default, deserialize_with = "words::strings")]
    pub audiences: Option<Vec<SStr>>,
    #[serde(default, deserialize_with = "words::strings")]
    pub algorithms: Option<Vec<SStr>>,
    pub jwks_url: Option<SStr>,
    pub jwks_file: Option<SStr>,
    pub hmac_secret_file: Option<SStr>,
    pub tenant_claim: Option<SStr>,
    pub scopes_claim: Option<SStr>,
    pub key_id_claim: Option<SStr>,
    pub tier_claim: Option<SStr>,
    #[serde(default, deserialize_with = "words::strings")]
    pub tiers: Option<Vec<SStr>>,
    #[serde(default, deserialize_with = "words::duration")]
    pub leeway: Option<SStr>,
    #[serde(default, deserialize_with = "words::duration")]
    pub jwks_refresh: Option<SStr>,
    #[serde(default, deserialize_with = "words::duration")]
    pub jwks_refresh_floor: Option<SStr>,
    #[serde(default, deserialize_with = "words::duration")]
    pub jwks_timeout: Option<SStr>,
}

#[derive(Debug, Deserialize)]
pub struct TierFile {
    pub upstream: Option<SStr>,
    #[serde(default, deserialize_with = "words::strings")]
    pub features: Option<Vec<SStr>>,
    pub rate: Option<Spanned<crate::rules::file::RateFile>>,
    pub quotas: Option<BTreeMap<String, Spanned<crate::rules::file::QuotaFile>>>,
    pub concurrency: Option<Spanned<i64>>,
    pub queue: Option<Spanned<QueueFile>>,
    pub priority: Option<Spanned<i64>>,
    pub on_store_error: Option<SStr>,
    pub price: Option<BTreeMap<String, Spanned<PriceFile>>>,
    #[serde(default, deserialize_with = "words::numbers")]
    pub warn_at: Option<Vec<Spanned<i64>>>,
}

#[derive(Debug, Deserialize)]
pub struct QueueFile {
    pub max: Option<Spanned<i64>>,
    #[serde(default, deserialize_with = "words::duration")]
    pub timeout: Option<SStr>,
}

#[derive(Debug, Deserialize)]
pub struct HealthCheckFile {
    pub path: Option<SStr>,
    #[serde(default, deserialize_with = "words::duration")]
    pub interval: Option<SStr>,
}

#[derive(Debug, Deserialize)]
pub struct UpstreamFile {
    #[serde(default, deserialize_with = "words::strings")]
    pub servers: Option<Vec<SStr>>,
    pub health_check: Option<Spanned<HealthCheckFile>>,
    #[serde(default, deserialize_with = "words::duration")]
    pub connect_timeout: Option<SStr>,
    #[serde(default, deserialize_with = "words::duration")]
    pub read_timeout: Option<SStr>,
    #[serde(default, deserialize_with = "words::duration")]
    pub write_timeout: Option<SStr>,
    pub host: Option<SStr>,
    pub protocol: Option<SStr>,
}

#[derive(Debug, Deserialize)]
pub struct TenantFile {
    pub id: Option<SStr>,
    pub name: Option<String>,
    pub email: Option<String>,
    pub tier: Option<SStr>,
    pub status: Option<SStr>,
    #[serde(default, deserialize_with = "words::string_list")]
    pub subdomains: Vec<SStr>,
    #[serde(default, deserialize_with = "words::string_list")]
    pub ip_allow: Vec<SStr>,
    #[serde(default)]
    pub keys: Vec<Spanned<KeyFile>>,
    pub billing_anchor_day: Option<Spanned<i64>>,
    pub timezone: Option<SStr>,
    pub overrides: Option<Spanned<toml::Table>>,
}

#[derive(Debug, Deserialize)]
pub struct KeyFile {
    pub id: Option<SStr>,
    pub name: Option<String>,
    pub hash: Option<SStr>,
    #[serde(default, deserialize_with = "words::string_list")]
    pub scopes: Vec<SStr>,
    pub expires: Option<Spanned<DateOrStr>>,
    #[serde(default)]
    pub revoked: bool,
}

/// The main config file, table by table. Each field is `None` when its table is absent or
/// could not be read (its problems are then already in the diagnostics).
#[derive(Debug, Default)]
pub struct MainFile {
    pub include: Vec<SStr>,
    pub server: ServerFile,
    pub store: StoreFile,
    pub tenancy: TenancyFile,
    pub log: LogFile,
    pub metering: MeteringFile,
    pub metrics: MetricsFile,
    pub admin: AdminFile,
    pub jwt: JwtFile,
    pub jobs: super::jobs::JobsFile,
    pub tiers: Vec<(SStr, TierFile)>,
    pub upstreams: Vec<(SStr, UpstreamFile)>,
    pub tenants: Vec<Spanned<TenantFile>>,
    /// The `[[tenants]]` tables of a file read a table at a time ([`split_tenants`]), still as
    /// text: validation reads each on its own and keeps only what it builds from it.
    pub tenant_chunks: Vec<TenantChunk>,
    /// Rule tables written directly in the main file (the same format as an included rule file).
    pub rules: Option<crate::rules::file::RuleFile>,
}

/// One `[[tenants]]` table of the main file, with its `[[tenants.keys]]` and sub-tables.
#[derive(Debug, Clone)]
pub struct TenantChunk {
    /// Bytes of the file.
    pub range: std::ops::Range<usize>,
    /// Lines of the file before it.
    pub first_line: usize,
}

/// Splits a config into its head (every other table) and its `[[tenants]]` tables, when the
/// file has the layout that allows reading one tenant at a time: all other tables first, then
/// only tenant tables (`[[tenants]]`, `[[tenants.keys]]`, `[tenants.…]`), and no multi-line
/// string anywhere (one could hold a line that looks like a table header). Returns `None`
/// otherwise, and the file is read as one document.
///
/// Why: the TOML library builds a document tree of the whole file before anything else can
/// look at it, about twenty times the size of the text. A file of a million keys would peak at
/// gigabytes; read a tenant at a time, its peak is the text and what is kept from it.
pub fn split_tenants(text: &str) -> Option<(usize, Vec<TenantChunk>)> {
    if text.contains("\"\"\"") || text.contains("'''") {
        return None;
    }
    let mut head_end = None;
    let mut chunks: Vec<TenantChunk> = Vec::new();
    let (mut pos, mut line_no) = (0usize, 0usize);
    for line in text.split_inclusive('\n') {
        let t = line.trim_start();
        if t.starts_with('[') {
            let header = table_header(t);
            let after_tenants = head_end.is_some();
            match header {
                Some((true, name)) if name == "tenants" => {
                    if let Some(last) = chunks.last_mut() {
                        last.range.end = pos;
                    }
                    head_end.get_or_insert(pos);
                    chunks.push(TenantChunk { range: pos..text.len(), first_line: line_no });
                }
                Some((_, name)) if after_tenants && name.starts_with("tenants.") => {}
                // Another table after the tenants, or a line this reader does not take apart.
                _ if after_tenants => return None,
                _ => {}
            }
        }
        pos += line.len();
        line_no += 1;
    }
    head_end.map(|h| (h, chunks))
}

/// `(is an array of tables, dotted name)` of a table header line; `None` for anything else,
/// including quoted keys.
fn table_header(line: &str) -> Option<(bool, String)> {
    let (double, rest) = match line.strip_prefix("[[") {
        Some(r) => (true, r),
        None => (false, line.strip_prefix('[')?),
    };
    let close = if double { "]]" } else { "]" };
    let end = rest.find(close)?;
    let (inner, after) = (&rest[..end], rest[end + close.len()..].trim());
    if !(after.is_empty() || after.starts_with('#')) || inner.contains(['"', '\'', '[', ']']) {
        return None;
    }
    let parts: Vec<&str> = inner.split('.').map(str::trim).collect();
    if parts.iter().any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')) {
        return None;
    }
    Some((double, parts.join(".")))
}

/// Reads one tenant table of a split file: its text on its own, reported at its own lines.
pub fn parse_tenant_chunk(
    main: &SourceFile,
    chunk: &TenantChunk,
    diags: &mut Diagnostics,
) -> Option<(SourceFile, Spanned<TenantFile>)> {
    let text = main.text.get(chunk.range.clone())?.to_string();
    let part = SourceFile::part(&main.path, text, chunk.range.start, chunk.first_line);
    let tenant = {
        let root = parse_document(&part, diags)?;
        let mut found = None;
        for (key, value) in root.get_ref().iter() {
            match (key.get_ref().as_ref(), value.get_ref()) {
                ("tenants", DeValue::Array(items)) => {
                    for item in items.iter() {
                        if let Some(t) = de_item::<TenantFile>(&part, "tenants", item, diags) {
                            found = Some(Spanned::new(item.span(), t));
                        }
                    }
                }
                // The split only cuts at `[[tenants]]` headers, so nothing else can be here.
                _ => diags.error_at(
                    &part,
                    key.span(),
                    "only `[[tenants]]` tables can follow the first `[[tenants]]` here",
                ),
            }
        }
        found
    }?;
    Some((part, tenant))
}

/// Parses the main file. Problems go into `diags`; what could be read is returned.
pub fn parse_main(src: &SourceFile, diags: &mut Diagnostics) -> MainFile {
    let mut out = MainFile::default();
    // A large file is read a tenant at a time when its layout allows ([`split_tenants`]); the
    // head is then every table but the tenants, at the same offsets as in the file.
    let split = split_tenants(&src.text);
    let head = split.as_ref().map(|(end, _)| SourceFile::part(&src.path, src.text[..*end].to_string(), 0, 0));
    let Some(root) = parse_document(head.as_ref().unwrap_or(src), diags) else {
        return out;
    };
    if split.is_some() && root.get_ref().get("tenants").is_some() {
        // `tenants` also written in the head (inline or dotted): read the whole file as one
        // document, and let it report the clash.
        drop(root);
        return parse_whole(src, diags, out);
    }
    out.tenant_chunks = split.map(|(_, chunks)| chunks).unwrap_or_default();
    read_root(src, &root, diags, out)
}

fn parse_whole(src: &SourceFile, diags: &mut Diagnostics, out: MainFile) -> MainFile {
    let Some(root) = parse_document(src, diags) else {
        return out;
    };
    read_root(src, &root, diags, out)
}

fn read_root(
    src: &SourceFile,
    root: &Spanned<toml::de::DeTable<'_>>,
    diags: &mut Diagnostics,
    mut out: MainFile,
) -> MainFile {
    let mut rule_tables: Vec<(&Spanned<toml::de::DeString>, &Spanned<DeValue>)> = Vec::new();
    for (key, value) in root.get_ref().iter() {
        match key.get_ref().as_ref() {
            "include" => {
                if let Some(v) = de_unit::<words::Strings>(src, key, value, diags) {
                    out.include = v.0;
                }
            }
            "server" => out.server = de_unit(src, key, value, diags).unwrap_or_default(),
            "store" => out.store = de_unit(src, key, value, diags).unwrap_or_default(),
            "tenancy" => out.tenancy = de_unit(src, key, value, diags).unwrap_or_default(),
            "log" => out.log = de_unit(src, key, value, diags).unwrap_or_default(),
            "metering" => out.metering = de_unit(src, key, value, diags).unwrap_or_default(),
            "metrics" => out.metrics = de_unit(src, key, value, diags).unwrap_or_default(),
            "admin" => out.admin = de_unit(src, key, value, diags).unwrap_or_default(),
            "jwt" => out.jwt = de_unit(src, key, value, diags).unwrap_or_default(),
            "jobs" => out.jobs = de_unit(src, key, value, diags).unwrap_or_default(),
            "tiers" => out.tiers = de_named_tables(src, value, diags),
            "upstreams" => out.upstreams = de_named_tables(src, value, diags),
            "tenants" => match value.get_ref() {
                DeValue::Array(items) => {
                    for item in items.iter() {
                        if let Some(t) = de_item::<TenantFile>(src, "tenants", item, diags) {
                            out.tenants.push(Spanned::new(item.span(), t));
                        }
                    }
                }
                _ => diags.error_at(src, value.span(), "`tenants` must be an array of tables: write each tenant as `[[tenants]]`"),
            },
            k if crate::rules::file::TOP_LEVEL_KEYS.contains(&k) => rule_tables.push((key, value)),
            other => diags.error_at(
                src,
                key.span(),
                format!(
                    "unknown key `{other}`; the top-level tables are include, server, store, tenancy, log, metering, metrics, admin, jwt, jobs, tiers, upstreams, tenants{}",
                    " (and the rule keys rule, defaults, unmatched, usage_metrics)"
                ),
            ),
        }
    }
    if !rule_tables.is_empty() {
        out.rules = Some(crate::rules::file::parse_rule_tables(src, rule_tables, diags));
    }
    out
}

/// A price: per unit, or per model (`price.output_tokens = { "gpt-4o" = 0.00001, default = 0.000002 }`).
#[derive(Debug, Clone)]
pub enum PriceFile {
    Flat(f64),
    PerModel(BTreeMap<String, f64>),
}

impl<'de> Deserialize<'de> for PriceFile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = PriceFile;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a price per unit, or a table of prices per model")
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<PriceFile, E> {
                Ok(PriceFile::Flat(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PriceFile, E> {
                Ok(PriceFile::Flat(v as f64))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PriceFile, E> {
                Ok(PriceFile::Flat(v as f64))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<PriceFile, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<String, f64>()? {
                    out.insert(k, v);
                }
                Ok(PriceFile::PerModel(out))
            }
        }
        d.deserialize_any(V)
    }
}
