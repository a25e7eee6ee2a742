//! `[jobs]`: the workers that run asynchronous jobs (`mode = "async"` rules) and where their
//! completion callbacks may go. See `docs/jobs.md`.

use crate::schema::diag::{Diagnostics, SourceFile};
use crate::schema::value::SStr;
use crate::schema::words;
use crate::store::jobs::RetryLost;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;
use toml::Spanned;

/// The `[jobs]` table as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsFile {
    pub workers: Option<Spanned<i64>>,
    #[serde(default, deserialize_with = "words::duration")]
    pub poll_interval: Option<SStr>,
    #[serde(default, deserialize_with = "words::duration")]
    pub lease_ttl: Option<SStr>,
    pub retry_lost: Option<SStr>,
    pub max_open_per_tenant: Option<Spanned<i64>>,
    pub max_body: Option<Spanned<i64>>,
    pub callback_secret: Option<SStr>,
    pub callback_max_attempts: Option<Spanned<i64>>,
    #[serde(default, deserialize_with = "words::duration")]
    pub callback_timeout: Option<SStr>,
    /// Tier name → hosts (`host` or `host:port`) callbacks may go to.
    pub callback_hosts: Option<BTreeMap<String, Vec<String>>>,
    /// Tenant id → hosts; a tenant listed here uses its own list instead of its tier's.
    pub tenant_callback_hosts: Option<BTreeMap<String, Vec<String>>>,
}

/// The validated `[jobs]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobsConfig {
    /// Jobs one instance runs at once.
    pub workers: u32,
    /// How often idle workers look for jobs submitted to other instances.
    pub poll_interval: Duration,
    /// A running job's lease: renewed every third of it, and given up by a stopped instance
    /// after at most this long.
    pub lease_ttl: Duration,
    pub retry_lost: RetryLost,
    /// Pending and running jobs a tenant may have at once (429 `job_queue_full` beyond).
    pub max_open_per_tenant: u32,
    /// The body a job stores when its rule sets no `max_body`.
    pub max_body: u64,
    pub callback_secret: Option<String>,
    pub callback_max_attempts: u32,
    pub callback_timeout: Duration,
    pub callback_hosts: BTreeMap<String, Vec<String>>,
    pub tenant_callback_hosts: BTreeMap<String, Vec<String>>,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            workers: 4,
            poll_interval: Duration::from_millis(500),
            lease_ttl: Duration::from_secs(15),
            retry_lost: RetryLost::Idempotent,
            max_open_per_tenant: 1000,
            max_body: 1 << 20,
            callback_secret: None,
            callback_max_attempts: 5,
            callback_timeout: Duration::from_secs(5),
            callback_hosts: BTreeMap::new(),
            tenant_callback_hosts: BTreeMap::new(),
        }
    }
}

impl JobsConfig {
    /// The hosts a tenant's callbacks may go to.
    pub fn callback_hosts_for(&self, tenant: &str, tier: &str) -> &[String] {
        self.tenant_callback_hosts.get(tenant).or_else(|| self.callback_hosts.get(tier)).map_or(&[], Vec::as_slice)
    }
}

fn bounded(
    v: &Option<Spanned<i64>>,
    what: &str,
    range: std::ops::RangeInclusive<i64>,
    default: i64,
    src: &SourceFile,
    diags: &mut Diagnostics,
) -> i64 {
    match v {
        None => default,
        Some(n) if range.contains(n.get_ref()) => *n.get_ref(),
        Some(n) => {
            diags.error_at(
                src,
                n.span(),
                format!("`jobs.{what}` must be between {} and {}", range.start(), range.end()),
            );
            default
        }
    }
}

/// Validates `[jobs]`; `tiers` are the configured tier names.
pub fn validate(f: &JobsFile, tiers: &[&str], src: &SourceFile, diags: &mut Diagnostics) -> JobsConfig {
    let d = JobsConfig::default();
    let mut duration = |v: &Option<SStr>, default: Duration| match v {
        None => default,
        Some(t) => match crate::schema::units::parse_duration(t.get_ref()) {
            Ok(x) if !x.is_zero() => x,
            Ok(_) => {
                diags.error_at(src, t.span(), "this duration must be longer than zero");
                default
            }
            Err(e) => {
                diags.error_at(src, t.span(), e);
                default
            }
        },
    };
    let poll_interval = duration(&f.poll_interval, d.poll_interval);
    let lease_ttl = duration(&f.lease_ttl, d.lease_ttl);
    let callback_timeout = duration(&f.callback_timeout, d.callback_timeout);
    let retry_lost = match &f.retry_lost {
        None => d.retry_lost,
        Some(r) => RetryLost::parse(r.get_ref()).unwrap_or_else(|| {
            diags.error_at(
                src,
                r.span(),
                format!("unknown retry_lost `{}`; use idempotent, always or never", r.get_ref()),
            );
            d.retry_lost
        }),
    };
    let callback_secret = match &f.callback_secret {
        Some(s) if s.get_ref().len() >= 16 => Some(s.get_ref().clone()),
        Some(s) => {
            diags.error_at(src, s.span(), "`jobs.callback_secret` must be at least 16 characters");
            None
        }
        None => None,
    };
    let callback_hosts = f.callback_hosts.clone().unwrap_or_default();
    let tenant_callback_hosts = f.tenant_callback_hosts.clone().unwrap_or_default();
    for tier in callback_hosts.keys() {
        if !tiers.contains(&tier.as_str()) {
            diags.error_file(&src.path, format!("`jobs.callback_hosts` names tier `{tier}`, which is not defined"));
        }
    }
    let any_hosts = callback_hosts.values().chain(tenant_callback_hosts.values()).any(|h| !h.is_empty());
    if any_hosts && callback_secret.is_none() && f.callback_secret.is_none() {
        diags.error_file(
            &src.path,
            "`jobs.callback_hosts` allows callbacks but `jobs.callback_secret` is missing; add a secret of at least 16 characters to sign them",
        );
    }
    JobsConfig {
        workers: bounded(&f.workers, "workers", 0..=1024, d.workers as i64, src, diags) as u32,
        poll_interval,
        lease_ttl,
        retry_lost,
        max_open_per_tenant: bounded(
            &f.max_open_per_tenant,
            "max_open_per_tenant",
            1..=1_000_000,
            d.max_open_per_tenant as i64,
            src,
            diags,
        ) as u32,
        max_body: bounded(&f.max_body, "max_body", 0..=(64 << 20), d.max_body as i64, src, diags) as u64,
        callback_secret,
        callback_max_attempts: bounded(&f.callback_max_attempts, "callback_max_attempts", 1..=20, 5, src, diags) as u32,
        callback_timeout,
        callback_hosts,
        tenant_callback_hosts,
    }
}
