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
    pub price: Option<BTreeMap<String, Spanned<f64>>>,
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
    pub tiers: Vec<(SStr, TierFile)>,
    pub upstreams: Vec<(SStr, UpstreamFile)>,
    pub tenants: Vec<Spanned<TenantFile>>,
    /// Rule tables written directly in the main file (the same format as an included rule file).
    pub rules: Option<crate::rules::file::RuleFile>,
}

/// Parses the main file. Problems go into `diags`; what could be read is returned.
pub fn parse_main(src: &SourceFile, diags: &mut Diagnostics) -> MainFile {
    let mut out = MainFile::default();
    let Some(root) = parse_document(src, diags) else {
        return out;
    };
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
                    "unknown key `{other}`; the top-level tables are include, server, store, tenancy, log, metering, metrics, admin, tiers, upstreams, tenants{}",
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
