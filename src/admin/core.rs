//! The operations behind the admin API and tenant self-service: tenants, keys, reloads and the
//! audit log. The HTTP layers only parse and render; every rule about what may change lives
//! here, so the admin API and `/_tollgate/` behave the same.
//!
//! Every write goes to the store first, which gives it a version and appends it to the change
//! feed; then the instance catches up with the feed, its own change included, so a change
//! applies at once on the instance that took it. Other instances apply it when their feed poll
//! finds it (every 500 ms). Applying a change copies only the parts of the directory it touches
//! ([`crate::directory`]); reads (lists, gets) come from the directory's indexes, so neither
//! costs more with a million keys. Tenants declared in the config file are read-only here.

use crate::clock::SharedClock;
use crate::config::{self, policy, valid_slug, Config};
use crate::directory::{Builder, Directory, Source, Tenant};
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::runtime::{Runtime, SharedRuntime};
use crate::store::{
    off_the_runtime, Change, DirectoryStore, Feed, KeyRecord, Ledger, RecordKind, StoreError, TenantRecord, Versioned,
    LOAD_PAGE,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::io::Write;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The bounds of every admin API input, in one place. `openapi.json` states the same numbers
/// (`maxLength`, `maxItems`, `maxProperties`, `minimum`, `maximum`), and `tests/openapi.rs`
/// checks each of them against the running API, so the document and the code cannot drift
/// apart. Bounds keep one request from storing megabytes in a tenant record, or from making
/// the gateway scan decades of ledger rows.
pub mod bounds {
    use std::ops::RangeInclusive;

    /// Tenant ids are DNS labels: they appear in host names, paths and store keys.
    pub const TENANT_ID_MAX: usize = 63;
    /// A tenant's display name, in characters.
    pub const TENANT_NAME_MAX: usize = 200;
    /// RFC 5321's limit on an address in a mail path.
    pub const EMAIL_MAX: usize = 254;
    /// A tier name, as given in a request (it must also be a tier of the config).
    pub const TIER_MAX: usize = 128;
    pub const SUBDOMAINS_MAX: usize = 100;
    /// One DNS label.
    pub const SUBDOMAIN_MAX: usize = 63;
    pub const IP_ALLOW_MAX: usize = 100;
    /// One `ip_allow` entry, in characters (the longest IPv6 CIDR text is 49).
    pub const CIDR_MAX: usize = 64;
    /// An IANA time zone name (the longest today has 32 characters).
    pub const TIMEZONE_MAX: usize = 64;
    pub const BILLING_ANCHOR_DAY: RangeInclusive<i64> = 1..=31;
    pub const OVERRIDES_MAX: usize = 64;
    /// An override path such as `quotas.<metric>.limit`.
    pub const OVERRIDE_KEY_MAX: usize = 128;
    /// An override's integer value.
    pub const OVERRIDE_VALUE: RangeInclusive<i64> = 0..=i64::MAX;
    /// A key id in a path: `key_` and 16 hex digits for API keys, any id for config keys.
    pub const KEY_ID_MAX: usize = 128;
    /// A key's display name, in characters.
    pub const KEY_NAME_MAX: usize = 200;
    pub const SCOPES_MAX: usize = 64;
    /// One scope, in characters.
    pub const SCOPE_MAX: usize = 64;
    /// About ten years.
    pub const EXPIRES_IN_DAYS: RangeInclusive<i64> = 1..=3650;
    /// Up to 90 days.
    pub const GRACE_PERIOD_HOURS: RangeInclusive<i64> = 0..=2160;
    pub const DEFAULT_GRACE_PERIOD_HOURS: u32 = 24;
    /// `limit` of `GET /v1/tenants`.
    pub const TENANT_PAGE: RangeInclusive<i64> = 1..=1000;
    pub const DEFAULT_TENANT_PAGE: i64 = 100;
    /// `limit` of `GET /v1/audit`.
    pub const AUDIT_PAGE: RangeInclusive<i64> = 1..=100_000;
    pub const DEFAULT_AUDIT_PAGE: i64 = 1000;
    /// The years a usage report may cover.
    pub const REPORT_YEARS: RangeInclusive<i32> = 2000..=2100;
    /// The most days one usage report covers, counting both ends.
    pub const REPORT_MAX_DAYS: i64 = 366;
}

/// A refusal of an admin operation, mapped to HTTP by the callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminError {
    BadRequest(String),
    NotFound(String),
    Conflict(String),
    Unprocessable(String),
    Forbidden(String),
    Store(String),
}

impl AdminError {
    pub fn status(&self) -> u16 {
        match self {
            AdminError::BadRequest(_) => 400,
            AdminError::Forbidden(_) => 403,
            AdminError::NotFound(_) => 404,
            AdminError::Conflict(_) => 409,
            AdminError::Unprocessable(_) => 422,
            AdminError::Store(_) => 503,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            AdminError::BadRequest(_) => "bad_request",
            AdminError::Forbidden(_) => "insufficient_scope",
            AdminError::NotFound(_) => "not_found",
            AdminError::Conflict(_) => "conflict",
            AdminError::Unprocessable(_) => "unprocessable",
            AdminError::Store(_) => "store_unavailable",
        }
    }

    pub fn detail(&self) -> &str {
        match self {
            AdminError::BadRequest(d)
            | AdminError::NotFound(d)
            | AdminError::Conflict(d)
            | AdminError::Unprocessable(d)
            | AdminError::Forbidden(d)
            | AdminError::Store(d) => d,
        }
    }
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        AdminError::Store(format!("the store could not be written ({e}); nothing was changed, retry"))
    }
}

/// A JSON number as the client sent it. Integer fields are read through this type so that a
/// value out of range (negative, fractional, past `u32`) is refused with the field's name and
/// bounds, not with a generic type error.
#[derive(Debug, Clone, Deserialize)]
#[serde(transparent)]
pub struct Int(serde_json::Number);

impl Int {
    pub fn new(v: i64) -> Int {
        Int(v.into())
    }

    /// The value, when it is a whole number within `range`. JSON Schema counts `3.0` as an
    /// integer, so a zero fraction is accepted.
    pub fn within(&self, field: &str, range: &RangeInclusive<i64>) -> Result<i64, AdminError> {
        let n = &self.0;
        let v = n.as_i64().or_else(|| {
            n.as_f64().filter(|f| f.fract() == 0.0 && *f >= i64::MIN as f64 && *f < i64::MAX as f64).map(|f| f as i64)
        });
        match v {
            Some(v) if range.contains(&v) => Ok(v),
            _ => {
                Err(bad(format!("`{field}` must be a whole number from {} to {}, not {n}", range.start(), range.end())))
            }
        }
    }
}

/// `s` for an error message: at most 40 characters, so a refused 100 KB value is not echoed.
pub fn shown(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Refuses a string longer than `max` characters (JSON Schema's `maxLength` counts characters).
pub fn max_len(field: &str, value: &str, max: usize) -> Result<(), AdminError> {
    let n = value.chars().count();
    if n > max {
        return Err(bad(format!("`{field}` is at most {max} characters; this one has {n}")));
    }
    Ok(())
}

/// Refuses a list with more than `max` items.
fn max_items<T>(field: &str, items: &[T], max: usize) -> Result<(), AdminError> {
    if items.len() > max {
        return Err(bad(format!("`{field}` holds at most {max} entries; this one has {}", items.len())));
    }
    Ok(())
}

/// Who made a change, for the audit log.
#[derive(Debug, Clone)]
pub struct Actor {
    /// `admin:<token fingerprint>` or `key:<key id>`.
    pub id: String,
    pub request_id: String,
}

/// `POST /v1/tenants`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    pub id: String,
    pub name: Option<String>,
    pub email: Option<String>,
    pub tier: String,
    pub status: Option<String>,
    #[serde(default)]
    pub subdomains: Vec<String>,
    #[serde(default)]
    pub ip_allow: Vec<String>,
    pub billing_anchor_day: Option<Int>,
    pub timezone: Option<String>,
    #[serde(default)]
    pub overrides: serde_json::Map<String, Value>,
}

/// `PATCH /v1/tenants/{id}`: every field optional.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PatchTenant {
    pub name: Option<String>,
    pub email: Option<String>,
    pub tier: Option<String>,
    pub status: Option<String>,
    pub subdomains: Option<Vec<String>>,
    pub ip_allow: Option<Vec<String>>,
    pub billing_anchor_day: Option<Int>,
    pub timezone: Option<String>,
    pub overrides: Option<serde_json::Map<String, Value>>,
}

/// `POST .../keys`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    pub name: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    pub expires_in_days: Option<Int>,
}

/// A tenant as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct TenantView {
    pub id: String,
    pub name: String,
    pub email: String,
    pub tier: String,
    pub status: String,
    pub subdomains: Vec<String>,
    pub ip_allow: Vec<String>,
    pub billing_anchor_day: u32,
    pub timezone: String,
    pub overrides: serde_json::Map<String, Value>,
    /// `config` (read-only here) or `api`.
    pub source: &'static str,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
}

/// A key as the API shows it: never the secret, never the hash.
#[derive(Debug, Clone, Serialize)]
pub struct KeyView {
    pub id: String,
    pub tenant: String,
    pub name: String,
    pub scopes: Vec<String>,
    /// `active`, `rotating` (revoked at `revoked_at`), `revoked` or `expired`.
    pub status: &'static str,
    pub created_at: Option<String>,
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
    pub rotated_to: Option<String>,
    pub source: &'static str,
}

fn ts(ms: i64) -> String {
    crate::limits::headers::rfc3339(ms)
}

/// The append-only audit log: one JSON line per change, never a secret.
pub struct Audit {
    path: PathBuf,
    file: Mutex<Option<std::fs::File>>,
}

impl Audit {
    pub fn new(path: PathBuf) -> Audit {
        Audit { path, file: Mutex::new(None) }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    fn append(&self, entry: &Value) {
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            if let Some(dir) = self.path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            match std::fs::OpenOptions::new().create(true).append(true).open(&self.path) {
                Ok(f) => *guard = Some(f),
                Err(e) => {
                    tracing::error!(error = %e, path = %self.path.display(), "cannot open the audit log; entry logged here instead: {entry}");
                    return;
                }
            }
        }
        if let Some(f) = guard.as_mut() {
            let mut line = entry.to_string();
            line.push('\n');
            if let Err(e) = f.write_all(line.as_bytes()).and_then(|_| f.flush()) {
                tracing::error!(error = %e, "cannot write the audit log; entry: {entry}");
            }
        }
    }

    /// Entries, optionally only those about `tenant`, newest last.
    pub fn read(&self, tenant: Option<&str>, limit: usize) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let mut out: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| tenant.is_none_or(|t| v["tenant"].as_str() == Some(t)))
            .collect();
        if out.len() > limit {
            out.drain(..out.len() - limit);
        }
        out
    }
}

/// Everything the admin operations need.
pub struct AdminCore {
    pub runtime: SharedRuntime,
    pub dir_store: Arc<dyn DirectoryStore>,
    pub ledger: Arc<dyn Ledger>,
    pub limits: Arc<Limits>,
    pub metrics: Arc<Metrics>,
    pub clock: SharedClock,
    pub config_path: PathBuf,
    pub audit: Audit,
    /// Upstream pools as built at startup (a reload cannot change them).
    pub running_upstreams: Vec<(String, Vec<std::net::SocketAddr>)>,
    /// The last directory version applied from the store's feed.
    seen_version: AtomicU64,
    /// The feed's change at `seen_version`, as applied: the store's history must still hold it
    /// before newer changes are applied on top (see [`DirectoryStore::change_at`]).
    anchor: Mutex<Option<Versioned>>,
    /// Set once every store record has been loaded: `/readyz` answers ready only then.
    loaded: AtomicBool,
    /// Whether the last directory poll (or load) reached the store: `/readyz` reads it, so a
    /// probe adds no store call of its own to a store busy with a load.
    store_ok: AtomicBool,
    /// Set when the directory may miss store records it can now serve: the next poll loads
    /// every record again ([`crate::directory::Directory::needs_load`]).
    resync: AtomicBool,
    /// Serializes the store side on this instance: loads, feed polls, and the read-modify-write
    /// of admin changes, so changes are applied in the feed's order.
    sync: tokio::sync::Mutex<()>,
    /// Held while a new runtime is derived from the current one and swapped in (a change, a
    /// load, a config reload), so none of them undoes another.
    swap: Mutex<()>,
    /// Why the last [`AdminCore::reload`] (the SIGHUP path) failed, for the audit entry
    /// [`AdminCore::audit_reload`] writes right after it.
    last_signal_reload: Mutex<Option<&'static str>>,
}

/// Why a reload did not apply. Either way the running config stays in place.
#[derive(Clone, PartialEq, Eq)]
pub enum ReloadError {
    /// The file has errors, or removes a tier API tenants are on: every message. `force`
    /// never overrides these.
    Invalid(Vec<String>),
    /// The file is valid but would remove too much of the running config: every tenant, every
    /// key, the admin token, or more than `[admin] reload_max_removed_fraction` of the tenants.
    /// The message says what and how to override it.
    Refused(String),
}

/// The messages alone, as an operator reads them, without the variant's name.
impl std::fmt::Debug for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReloadError::Invalid(errors) => f.debug_list().entries(errors).finish(),
            ReloadError::Refused(detail) => write!(f, "{detail:?}"),
        }
    }
}

impl ReloadError {
    /// The problem `code` of the answer, also the audit log's `error: <code>`.
    pub fn code(&self) -> &'static str {
        match self {
            ReloadError::Invalid(_) => "invalid_config",
            ReloadError::Refused(_) => "reload_refused",
        }
    }
}

/// What a reload from `old` to `new` would remove that a reload without `force` refuses, each
/// in words; empty when the reload is safe. A file emptied or truncated by a deploy still
/// parses (each TOML table stands alone), so validation alone cannot catch it.
pub fn reload_removals(running: &Runtime, new: &Config) -> Vec<String> {
    let old = &*running.config;
    let mut out = Vec::new();
    // The running config's tenants and keys live in its directory; the new config still holds
    // its own.
    let old_ids: Vec<&str> = running.directory.config_tenants().map(|t| &*t.id).collect();
    let before = old_ids.len();
    if before > 0 && new.tenants.is_empty() {
        out.push(format!("every tenant ({before} → 0)"));
    } else if before > 0 {
        let kept: std::collections::HashSet<&str> = new.tenants.iter().map(|t| t.id.as_str()).collect();
        let removed: Vec<&str> = old_ids.iter().copied().filter(|id| !kept.contains(id)).collect();
        let share = removed.len() as f64 / before as f64;
        // The running config's bound, not the new file's: a damaged file must not be able to
        // loosen the check that guards against it.
        let max = old.admin.reload_max_removed_fraction;
        if share > max {
            let mut names: Vec<String> = removed.iter().take(5).map(|id| format!("`{id}`")).collect();
            if removed.len() > 5 {
                names.push(format!("and {} more", removed.len() - 5));
            }
            out.push(format!(
                "{} of {before} tenants ({:.0}%: {}), more than `[admin] reload_max_removed_fraction` = {max} allows",
                removed.len(),
                share * 100.0,
                names.join(", ")
            ));
        }
    }
    let old_keys = running.directory.config_key_count();
    if old_keys > 0 && new.tenants.iter().all(|t| t.keys.is_empty()) {
        out.push(format!("every key ({old_keys} → 0)"));
    }
    if old.admin.token_hash.is_some() && new.admin.token_hash.is_none() {
        out.push("the admin token (`[admin] token_hash`), which turns the admin API off".into());
    }
    out
}

/// The result of a successful reload.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadOutcome {
    pub summary: String,
    pub warnings: Vec<String>,
}

fn bad(msg: impl Into<String>) -> AdminError {
    AdminError::BadRequest(msg.into())
}

/// Refuses a tenant id that is not a DNS label (`config::valid_slug`: at most
/// [`bounds::TENANT_ID_MAX`] characters).
pub fn check_tenant_id(id: &str) -> Result<(), AdminError> {
    if !valid_slug(id) {
        return Err(bad(format!(
            "tenant id `{}` must be 1-{} characters of a-z, 0-9 and `-`, not starting or ending with `-`",
            shown(id),
            bounds::TENANT_ID_MAX
        )));
    }
    Ok(())
}

fn anchor_day(d: &Int) -> Result<u32, AdminError> {
    // Within 1..=31, so the conversion cannot fail.
    d.within("billing_anchor_day", &bounds::BILLING_ANCHOR_DAY).map(|v| v as u32)
}

impl AdminCore {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        runtime: SharedRuntime,
        dir_store: Arc<dyn DirectoryStore>,
        ledger: Arc<dyn Ledger>,
        limits: Arc<Limits>,
        metrics: Arc<Metrics>,
        clock: SharedClock,
        config_path: PathBuf,
        audit_path: PathBuf,
    ) -> Arc<AdminCore> {
        let running_upstreams =
            runtime.load().config.upstreams.iter().map(|(n, u)| (n.clone(), u.servers.clone())).collect();
        Arc::new(AdminCore {
            runtime,
            dir_store,
            ledger,
            limits,
            metrics,
            clock,
            config_path,
            audit: Audit::new(audit_path),
            running_upstreams,
            seen_version: AtomicU64::new(0),
            anchor: Mutex::new(None),
            loaded: AtomicBool::new(false),
            resync: AtomicBool::new(false),
            store_ok: AtomicBool::new(false),
            sync: tokio::sync::Mutex::new(()),
            swap: Mutex::new(()),
            last_signal_reload: Mutex::new(None),
        })
    }

    fn anchor_lock(&self) -> std::sync::MutexGuard<'_, Option<Versioned>> {
        self.anchor.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn swap_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.swap.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Swaps in a runtime. Called with [`AdminCore::swap`] held.
    fn publish(&self, config: Arc<Config>, directory: Directory) -> Arc<Runtime> {
        if directory.needs_load() {
            self.resync.store(true, Ordering::SeqCst);
        }
        self.metrics.tenants.set(directory.tenant_count() as i64);
        self.metrics.keys.set(directory.key_count() as i64);
        self.runtime.swap(Arc::new(Runtime { config, directory }))
    }

    /// Swaps in a runtime that shares nothing with the one it replaces (a load, a config
    /// reload), and frees the old one on a thread of its own once the last request holding it
    /// is done: freeing a million keys takes tens of milliseconds, which must not land on a
    /// request.
    fn publish_whole(&self, config: Arc<Config>, directory: Directory) {
        let old = self.publish(config, directory);
        let spawned = std::thread::Builder::new().name("tollgate-retire".into()).spawn(move || {
            // Requests hold a runtime for as long as they run; a minute covers any that is
            // still making progress, and past it the old runtime is freed wherever it is.
            for _ in 0..6_000 {
                if Arc::strong_count(&old) == 1 {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            drop(old);
        });
        if let Err(e) = spawned {
            tracing::debug!(error = %e, "cannot start a thread to free the old directory; it is freed in place");
        }
    }

    /// Whether every store record has been loaded once.
    pub fn loaded(&self) -> bool {
        self.loaded.load(Ordering::SeqCst)
    }

    /// Loads every store record, page by page, into a new directory with the running config's
    /// tenants, follows the feed from the version read first, and swaps it in. Memory during a
    /// load: the running directory, the one being built, and one page of records.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let _one = self.sync.lock().await;
        let r = self.full_load().await;
        self.store_ok.store(r.is_ok(), Ordering::SeqCst);
        r
    }

    /// Whether the store answered the last directory poll or load.
    pub fn store_reachable(&self) -> bool {
        self.store_ok.load(Ordering::SeqCst)
    }

    async fn full_load(&self) -> Result<(), StoreError> {
        let version = self.dir_store.version().await?;
        let base = self.runtime.load_full();
        let mut b = Builder::new(&base.config);
        b.keep_config_part(&base.directory);
        for kind in [RecordKind::Tenant, RecordKind::Key] {
            let mut cursor: Option<String> = None;
            loop {
                let page = self.dir_store.page(kind, cursor.as_deref(), LOAD_PAGE).await?;
                off_the_runtime(|| {
                    for t in &page.tenants {
                        b.tenant_record(t);
                    }
                    for k in &page.keys {
                        b.key_record(k);
                    }
                });
                match page.next {
                    Some(n) => cursor = Some(n),
                    None => break,
                }
            }
        }
        // Sorting a million keys into chunks takes a few hundred milliseconds: off the store
        // runtime's one worker, whose other tasks (Redis calls of requests among them) go on.
        let mut directory = off_the_runtime(|| b.finish());
        // Records written while the pages were read are fixed up by the feed.
        let changes = match self.dir_store.changes_since(version).await? {
            Feed::Changes(list) => list,
            Feed::Behind => {
                return Err(StoreError::Backend(
                    "the directory changed faster than it could be loaded; loading again".into(),
                ))
            }
        };
        for c in &changes {
            directory.apply(&base.config, &c.change);
        }
        // Only a config reload can have swapped in a runtime meanwhile (changes wait for
        // `sync`, which this load holds): resolve the store part against its config, outside
        // the swap lock, and check again under it.
        let mut config = base.config.clone();
        loop {
            let cur = self.runtime.load_full();
            if !Arc::ptr_eq(&cur.config, &config) {
                directory = off_the_runtime(|| Directory::combine(&cur.config, &cur.directory, &directory));
                config = cur.config.clone();
            }
            let _s = self.swap_lock();
            if Arc::ptr_eq(&self.runtime.load().config, &config) {
                if directory.skipped() > 0 {
                    tracing::warn!(
                        tenants = directory.skipped(),
                        "store tenants on tiers this config does not have are not served here"
                    );
                }
                self.seen_version.store(changes.last().map_or(version, |c| c.version), Ordering::SeqCst);
                self.publish_whole(config, directory);
                break;
            }
        }
        let last = self.seen_version.load(Ordering::SeqCst);
        let anchor = match changes.last() {
            Some(c) => Some(c.clone()),
            None if last > 0 => self.dir_store.change_at(last).await.ok().flatten(),
            None => None,
        };
        *self.anchor_lock() = anchor;
        self.loaded.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Applies the feed's changes since the last one applied; loads everything again when the
    /// feed no longer reaches back that far. Called with [`AdminCore::sync`] held.
    async fn catch_up(&self) -> Result<(), StoreError> {
        if !self.loaded() || self.resync.swap(false, Ordering::SeqCst) {
            return self.full_load().await;
        }
        let seen = self.seen_version.load(Ordering::SeqCst);
        match self.dir_store.changes_since(seen).await? {
            Feed::Changes(list) if list.is_empty() => Ok(()),
            Feed::Changes(list) => {
                // Newer changes go on top of the one applied last only if the store still has
                // that one: otherwise its history changed under this instance.
                let anchor = self.anchor_lock().clone();
                if let Some(anchor) = anchor {
                    if self.dir_store.change_at(seen).await?.as_ref() != Some(&anchor) {
                        tracing::warn!(
                            seen,
                            "the store's directory history is not the one this instance followed (a failover or a restore?); loading every record again"
                        );
                        return self.full_load().await;
                    }
                }
                let _s = self.swap_lock();
                let cur = self.runtime.load_full();
                let mut directory = cur.directory.clone();
                for c in &list {
                    directory.apply(&cur.config, &c.change);
                }
                self.seen_version.store(list.last().map_or(seen, |c| c.version), Ordering::SeqCst);
                *self.anchor_lock() = list.last().cloned();
                // The old runtime shares every chunk but the touched ones with the new one:
                // freeing it is freeing those.
                self.publish(cur.config.clone(), directory);
                Ok(())
            }
            Feed::Behind => {
                tracing::info!(seen, "this instance is behind the directory's change feed; loading every record again");
                self.full_load().await
            }
        }
    }

    /// After a write of this instance (with [`AdminCore::sync`] held): catches up with the feed,
    /// which holds the write; if the feed cannot be read, applies the write alone, and the
    /// next poll applies it again in order.
    async fn commit(&self, version: u64, change: Change) {
        if version <= self.seen_version.load(Ordering::SeqCst) {
            // Versions only grow: the store's history changed under this instance.
            self.resync.store(true, Ordering::SeqCst);
        }
        if let Err(e) = self.catch_up().await {
            tracing::warn!(error = %e, "cannot read the directory's change feed; applying this change alone");
        }
        if self.seen_version.load(Ordering::SeqCst) < version {
            let _s = self.swap_lock();
            let cur = self.runtime.load_full();
            let mut directory = cur.directory.clone();
            directory.apply(&cur.config, &change);
            self.publish(cur.config.clone(), directory);
        }
    }

    /// Follows the store's change feed, or retries the first load. Called every 500 ms.
    pub async fn poll(&self) {
        // A poll that finds another at work (a load of every record takes seconds) skips.
        let Ok(_one) = self.sync.try_lock() else { return };
        let r = self.catch_up().await;
        self.store_ok.store(r.is_ok(), Ordering::SeqCst);
        if let Err(e) = r {
            tracing::warn!(error = %e, "directory refresh failed; keeping the current snapshot");
        }
    }

    /// The SIGHUP reload: [`AdminCore::reload_with`] without `force` (a signal cannot say
    /// what it means to remove). [`AdminCore::audit_reload`] then records its result.
    pub fn reload(&self) -> Result<ReloadOutcome, ReloadError> {
        let r = self.reload_with(false);
        *self.last_signal_reload.lock().unwrap_or_else(|p| p.into_inner()) = r.as_ref().err().map(ReloadError::code);
        r
    }

    /// Validates the config file again and swaps it in. An invalid file changes nothing, and
    /// neither does a valid one that removes too much ([`reload_removals`]) unless `force`.
    pub fn reload_with(&self, force: bool) -> Result<ReloadOutcome, ReloadError> {
        match config::load(&self.config_path) {
            Err(diags) => {
                self.metrics.config_reloads.with_label_values(&["error"]).inc();
                let errors: Vec<String> = diags.items.iter().map(|d| d.to_string()).collect();
                tracing::error!(errors = %errors.join("; "), "config reload refused; the running config stays in place");
                Err(ReloadError::Invalid(errors))
            }
            Ok(loaded) => {
                // A tier that API tenants are on cannot disappear under them.
                let running = self.runtime.load_full();
                let stranded: Vec<String> = running
                    .directory
                    .tenants_after(None)
                    .filter(|t| t.source == Source::Store && !loaded.config.tiers.contains_key(&*t.tier.name))
                    .take(20)
                    .map(|t| format!("tenant `{}` (tier `{}`)", t.id, t.tier.name))
                    .collect();
                if !stranded.is_empty() {
                    self.metrics.config_reloads.with_label_values(&["error"]).inc();
                    let msg = format!(
                        "the new config removes tiers that API-managed tenants are on: {}; move them to another tier first (PUT /v1/tenants/{{id}}/tier)",
                        stranded.join(", ")
                    );
                    tracing::error!(error = %msg, "config reload refused; the running config stays in place");
                    return Err(ReloadError::Invalid(vec![msg]));
                }
                let mut warnings: Vec<String> = loaded.warnings.warnings().map(|w| w.to_string()).collect();
                let removals = reload_removals(&running, &loaded.config);
                if !removals.is_empty() {
                    let what = removals.join("; ");
                    if !force {
                        self.metrics.config_reloads.with_label_values(&["error"]).inc();
                        let detail = format!(
                            "The new config would remove: {what}. The running config stays in place. If the file was emptied or cut short by mistake, restore it and reload again; if the removal is intended, reload with `tollgate reload --force` or `POST /v1/reload?force=true`."
                        );
                        tracing::error!(removes = %what, "config reload refused; the running config stays in place");
                        return Err(ReloadError::Refused(detail));
                    }
                    warnings.push(format!("forced: the reload removed: {what}"));
                }
                let new: Vec<(String, Vec<std::net::SocketAddr>)> =
                    loaded.config.upstreams.iter().map(|(n, u)| (n.clone(), u.servers.clone())).collect();
                if new != self.running_upstreams {
                    warnings.push("upstream pools changed: restart (or upgrade with `run -u`) to apply them; routing uses the pools from startup".into());
                }
                let old = self.runtime.load().config.clone();
                if old.server.listen != loaded.config.server.listen
                    || old.server.admin_listen != loaded.config.server.admin_listen
                {
                    warnings.push("listen addresses changed: they apply on the next restart".into());
                }
                if old.server.h2c != loaded.config.server.h2c {
                    warnings.push("`server.h2c` changed: it applies on the next restart".into());
                }
                let protocols = |c: &crate::config::Config| -> Vec<(String, crate::config::UpstreamProtocol)> {
                    c.upstreams.iter().map(|(n, u)| (n.clone(), u.protocol)).collect()
                };
                if protocols(&old) != protocols(&loaded.config) {
                    warnings
                        .push("upstream protocols changed: restart (or upgrade with `run -u`) to apply them".into());
                }
                let summary = loaded.config.summary();
                let running_skipped = running.directory.skipped();
                let running_config_ids: Vec<String> =
                    running.directory.config_tenants().map(|t| t.id.to_string()).collect();
                drop(running);
                let mut config = loaded.config;
                let keys = crate::directory::take_keys(&mut config);
                let mut fresh = Directory::from_config_keys(&config, keys);
                // Store tenants this directory left out (on a tier this config may now have, or
                // shadowed by a config tenant this config no longer has) are read again.
                let kept: std::collections::HashSet<&str> = config.tenants.iter().map(|t| t.id.as_str()).collect();
                if running_skipped > 0 || running_config_ids.iter().any(|id| !kept.contains(id.as_str())) {
                    fresh.set_needs_load();
                }
                drop(kept);
                config.tenants = Vec::new();
                // Built outside the swap lock, which changes and loads also take; built again
                // if one of them swapped in a runtime meanwhile (a few tries, then under the lock).
                let config = Arc::new(config);
                for attempt in 0.. {
                    let base = self.runtime.load_full();
                    let directory = Directory::combine(&config, &fresh, &base.directory);
                    let _s = self.swap_lock();
                    let cur = self.runtime.load_full();
                    if Arc::ptr_eq(&cur, &base) || attempt == 3 {
                        let directory = if Arc::ptr_eq(&cur, &base) {
                            directory
                        } else {
                            Directory::combine(&config, &fresh, &cur.directory)
                        };
                        drop((cur, base));
                        self.publish_whole(config, directory);
                        break;
                    }
                }
                self.metrics.config_reloads.with_label_values(&["ok"]).inc();
                if warnings.is_empty() {
                    tracing::info!(summary = %summary, "config reloaded");
                } else {
                    tracing::warn!(summary = %summary, warnings = %warnings.join("; "), "config reloaded, with warnings");
                }
                Ok(ReloadOutcome { summary, warnings })
            }
        }
    }

    /// Appends one audit entry; `failure` is the problem code of a refused change.
    fn audit(&self, actor: &Actor, action: &str, tenant: &str, target: &str, failure: Option<&str>) {
        self.audit.append(&json!({
            "time": ts(self.clock.now_millis()),
            "actor": actor.id,
            "action": action,
            "tenant": tenant,
            "target": target,
            "request_id": actor.request_id,
            "result": match failure { None => "ok".to_string(), Some(code) => format!("error: {code}") },
        }));
    }

    /// Runs a change and writes its audit entry either way.
    async fn audited<T>(
        &self,
        actor: &Actor,
        action: &str,
        tenant: &str,
        target: &str,
        f: impl std::future::Future<Output = Result<T, AdminError>>,
    ) -> Result<T, AdminError> {
        let r = f.await;
        self.audit(actor, action, tenant, target, r.as_ref().err().map(AdminError::code));
        r
    }

    fn config_tenant(&self, id: &str) -> bool {
        self.runtime.load().directory.tenant(id).is_some_and(|t| t.source == Source::Config)
    }

    fn read_only(id: &str) -> AdminError {
        AdminError::Conflict(format!(
            "tenant `{id}` is declared in the config file and is read-only here; edit the file and reload instead"
        ))
    }

    /// One page of tenants (config and API) in id order, after `cursor`, optionally filtered;
    /// and the cursor of the next page. The cost is that of the page (and of the tenants a
    /// filter skips), not of the directory.
    pub fn tenant_page(
        &self,
        cursor: Option<&str>,
        limit: usize,
        tier: Option<&str>,
        status: Option<&str>,
    ) -> (Vec<TenantView>, Option<String>) {
        let rt = self.runtime.load();
        let mut page: Vec<TenantView> = rt
            .directory
            .tenants_after(cursor)
            .filter(|t| tier.is_none_or(|x| *t.tier.name == *x) && status.is_none_or(|x| t.status.as_str() == x))
            .take(limit + 1)
            .map(|t| tenant_view(t))
            .collect();
        let next = if page.len() > limit {
            page.truncate(limit);
            page.last().map(|t| t.id.clone())
        } else {
            None
        };
        (page, next)
    }

    pub fn tenant(&self, id: &str) -> Result<TenantView, AdminError> {
        let rt = self.runtime.load();
        rt.directory
            .tenant(id)
            .map(|t| tenant_view(t))
            .ok_or_else(|| AdminError::NotFound(format!("no tenant is called `{id}`")))
    }

    fn validate(&self, r: &TenantRecord) -> Result<(), AdminError> {
        let rt = self.runtime.load();
        check_tenant_id(&r.id)?;
        // Sizes first, so an oversized request is a 400 whatever else is wrong with it.
        max_len("name", &r.name, bounds::TENANT_NAME_MAX)?;
        max_len("email", &r.email, bounds::EMAIL_MAX)?;
        max_len("tier", &r.tier, bounds::TIER_MAX)?;
        max_len("timezone", &r.timezone, bounds::TIMEZONE_MAX)?;
        max_items("subdomains", &r.subdomains, bounds::SUBDOMAINS_MAX)?;
        for s in &r.subdomains {
            max_len("subdomains[]", s, bounds::SUBDOMAIN_MAX)?;
        }
        max_items("ip_allow", &r.ip_allow, bounds::IP_ALLOW_MAX)?;
        for c in &r.ip_allow {
            max_len("ip_allow[]", c, bounds::CIDR_MAX)?;
        }
        if r.overrides.len() > bounds::OVERRIDES_MAX {
            return Err(bad(format!(
                "`overrides` holds at most {} entries; this one has {}",
                bounds::OVERRIDES_MAX,
                r.overrides.len()
            )));
        }
        for k in r.overrides.keys() {
            max_len("overrides (a key)", k, bounds::OVERRIDE_KEY_MAX)?;
        }
        if !rt.config.tiers.contains_key(&r.tier) {
            let known: Vec<&str> = rt.config.tiers.keys().map(String::as_str).collect();
            return Err(AdminError::Unprocessable(format!(
                "tier `{}` does not exist (tiers: {})",
                r.tier,
                known.join(", ")
            )));
        }
        if r.status != "active" && r.status != "suspended" {
            return Err(bad("status must be `active` or `suspended`"));
        }
        for s in &r.subdomains {
            if !valid_slug(s) {
                return Err(bad(format!("subdomain `{}` must be one DNS label of a-z, 0-9 and `-`", shown(s))));
            }
            let taken = rt.directory.subdomain_owner(s).is_some_and(|t| *t.id != *r.id);
            if taken {
                return Err(AdminError::Conflict(format!("subdomain `{s}` belongs to another tenant")));
            }
        }
        for c in &r.ip_allow {
            config::parse_cidr(c).map_err(bad)?;
        }
        if !bounds::BILLING_ANCHOR_DAY.contains(&i64::from(r.billing_anchor_day)) {
            return Err(bad("`billing_anchor_day` is a day of the month, 1 to 31"));
        }
        r.timezone
            .parse::<chrono_tz::Tz>()
            .map_err(|_| bad(format!("`{}` is not an IANA time zone, like `Europe/Berlin`", shown(&r.timezone))))?;
        if !r.overrides.is_empty() {
            let mut table = toml::Table::new();
            for (k, v) in &r.overrides {
                let tv = match v {
                    Value::Number(n) => toml::Value::Integer(Int(n.clone()).within(k, &bounds::OVERRIDE_VALUE)?),
                    Value::String(s) => toml::Value::String(s.clone()),
                    _ => return Err(bad(format!("override `{k}` must be a number or a string"))),
                };
                table.insert(k.clone(), tv);
            }
            let src = config::SourceFile::new(std::path::Path::new("overrides"), String::new());
            let mut diags = config::Diagnostics::default();
            let o = policy::overrides(&toml::Spanned::new(0..0, table), &src, &mut diags);
            if let Some(e) = diags.errors().next() {
                return Err(bad(e.message.clone()));
            }
            for metric in o.quotas.keys() {
                if !rt.config.rules.metrics.contains(metric) {
                    return Err(AdminError::Unprocessable(format!("metric `{metric}` is not declared in the config")));
                }
            }
        }
        Ok(())
    }

    pub async fn create_tenant(&self, actor: &Actor, req: CreateTenant) -> Result<TenantView, AdminError> {
        // A refused id of any length is audited, shortened, so the log does not grow by a
        // request body per attempt.
        let id = if valid_slug(&req.id) { req.id.clone() } else { shown(&req.id) };
        self.audited(actor, "tenant.create", &id, &format!("tenant:{id}"), async {
            let now = self.clock.now_millis();
            let billing_anchor_day = req.billing_anchor_day.as_ref().map(anchor_day).transpose()?.unwrap_or(1);
            let r = TenantRecord {
                id: req.id.clone(),
                name: req.name.unwrap_or_else(|| req.id.clone()),
                email: req.email.unwrap_or_default(),
                tier: req.tier,
                status: req.status.unwrap_or_else(|| "active".into()),
                subdomains: req.subdomains.iter().map(|s| s.to_ascii_lowercase()).collect(),
                ip_allow: req.ip_allow,
                billing_anchor_day,
                timezone: req.timezone.unwrap_or_else(|| "UTC".into()),
                overrides: req.overrides,
                created_ms: now,
                updated_ms: now,
            };
            self.validate(&r)?;
            if self.config_tenant(&r.id) {
                return Err(AdminError::Conflict(format!("tenant `{}` already exists (in the config file)", r.id)));
            }
            let _one = self.sync.lock().await;
            let Some(version) = self.dir_store.put_tenant(&r, true).await? else {
                return Err(AdminError::Conflict(format!("tenant `{}` already exists", r.id)));
            };
            self.commit(version, Change::Tenant { record: r.clone() }).await;
            Ok(view(&r))
        })
        .await
    }

    async fn modify(
        &self,
        actor: &Actor,
        action: &str,
        id: &str,
        f: impl FnOnce(&mut TenantRecord) -> Result<(), AdminError>,
    ) -> Result<TenantView, AdminError> {
        self.audited(actor, action, id, &format!("tenant:{id}"), async {
            if self.config_tenant(id) {
                return Err(Self::read_only(id));
            }
            // Read the record fresh from the store, not from this instance's snapshot, so a
            // change another instance made a moment ago is not written over.
            let _one = self.sync.lock().await;
            let mut r = self
                .dir_store
                .get_tenant(id)
                .await?
                .ok_or_else(|| AdminError::NotFound(format!("no tenant is called `{id}`")))?;
            f(&mut r)?;
            r.updated_ms = self.clock.now_millis();
            self.validate(&r)?;
            let version = self.dir_store.put_tenant(&r, false).await?.unwrap_or(0);
            self.commit(version, Change::Tenant { record: r.clone() }).await;
            Ok(view(&r))
        })
        .await
    }

    pub async fn update_tenant(&self, actor: &Actor, id: &str, p: PatchTenant) -> Result<TenantView, AdminError> {
        self.modify(actor, "tenant.update", id, |r| {
            if let Some(v) = p.name {
                r.name = v;
            }
            if let Some(v) = p.email {
                r.email = v;
            }
            if let Some(v) = p.tier {
                r.tier = v;
            }
            if let Some(v) = p.status {
                r.status = v;
            }
            if let Some(v) = p.subdomains {
                r.subdomains = v.iter().map(|s| s.to_ascii_lowercase()).collect();
            }
            if let Some(v) = p.ip_allow {
                r.ip_allow = v;
            }
            if let Some(v) = &p.billing_anchor_day {
                r.billing_anchor_day = anchor_day(v)?;
            }
            if let Some(v) = p.timezone {
                r.timezone = v;
            }
            if let Some(v) = p.overrides {
                r.overrides = v;
            }
            Ok(())
        })
        .await
    }

    pub async fn set_status(&self, actor: &Actor, id: &str, status: &str) -> Result<TenantView, AdminError> {
        let action = if status == "suspended" { "tenant.suspend" } else { "tenant.reactivate" };
        self.modify(actor, action, id, |r| {
            r.status = status.to_string();
            Ok(())
        })
        .await
    }

    pub async fn set_tier(&self, actor: &Actor, id: &str, tier: &str) -> Result<TenantView, AdminError> {
        self.modify(actor, "tenant.set_tier", id, |r| {
            r.tier = tier.to_string();
            Ok(())
        })
        .await
    }

    pub async fn delete_tenant(&self, actor: &Actor, id: &str) -> Result<(), AdminError> {
        self.audited(actor, "tenant.delete", id, &format!("tenant:{id}"), async {
            if self.config_tenant(id) {
                return Err(Self::read_only(id));
            }
            let _one = self.sync.lock().await;
            let Some(version) = self.dir_store.delete_tenant(id).await? else {
                return Err(AdminError::NotFound(format!("no tenant is called `{id}`")));
            };
            self.commit(version, Change::TenantDeleted { id: id.to_string() }).await;
            Ok(())
        })
        .await
    }

    /// Keys of a tenant (config or API), without secrets or hashes. A store tenant's keys are
    /// read from the store in one call (their names and times are kept there, not in memory).
    pub async fn keys(&self, tenant: &str) -> Result<Vec<KeyView>, AdminError> {
        let now = self.clock.now_millis();
        let (t, config_keys, ids) = {
            let rt = self.runtime.load();
            let t = rt
                .directory
                .tenant(tenant)
                .cloned()
                .ok_or_else(|| AdminError::NotFound(format!("no tenant is called `{tenant}`")))?;
            let keys: Vec<_> = rt.directory.keys_of(&t).collect();
            if t.source == Source::Config {
                let views: Vec<KeyView> = keys
                    .iter()
                    .map(|(h, k)| KeyView {
                        id: k.id.to_string(),
                        tenant: tenant.to_string(),
                        name: rt.directory.key_name(h).unwrap_or_default().to_string(),
                        scopes: k.scopes.iter().map(|s| s.to_string()).collect(),
                        status: key_status(k.expires(), k.revoked_at(), now),
                        created_at: None,
                        expires_at: k.expires().map(ts),
                        revoked_at: k.revoked_at().filter(|t| *t != i64::MIN).map(ts),
                        rotated_to: None,
                        source: "config",
                    })
                    .collect();
                (t, Some(views), Vec::new())
            } else {
                let ids: Vec<String> = keys.iter().map(|(_, k)| k.id.to_string()).collect();
                (t, None, ids)
            }
        };
        if let Some(mut views) = config_keys {
            views.sort_by(|a, b| a.id.cmp(&b.id));
            return Ok(views);
        }
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let mut records = if refs.is_empty() { Vec::new() } else { self.dir_store.get_keys(&refs).await? };
        records.retain(|k| k.tenant == *t.id);
        records.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(records.iter().map(|k| key_view(k, now)).collect())
    }

    fn new_key_id() -> String {
        format!("key_{:016x}", rand::random::<u64>())
    }

    /// Creates a key; the secret is in the answer and nowhere else.
    pub async fn create_key(
        &self,
        actor: &Actor,
        tenant: &str,
        req: CreateKey,
    ) -> Result<(KeyView, String), AdminError> {
        let id = Self::new_key_id();
        self.audited(actor, "key.create", tenant, &format!("key:{id}"), async {
            if self.config_tenant(tenant) {
                return Err(Self::read_only(tenant));
            }
            if self.runtime.load().directory.tenant(tenant).is_none() {
                return Err(AdminError::NotFound(format!("no tenant is called `{tenant}`")));
            }
            if let Some(name) = &req.name {
                max_len("name", name, bounds::KEY_NAME_MAX)?;
            }
            max_items("scopes", &req.scopes, bounds::SCOPES_MAX)?;
            for s in &req.scopes {
                max_len("scopes[]", s, bounds::SCOPE_MAX)?;
                if s.is_empty() || s.contains(char::is_whitespace) {
                    return Err(bad(format!("scope `{s}` must be a word without spaces")));
                }
            }
            let expires_in_days = req
                .expires_in_days
                .as_ref()
                .map(|d| d.within("expires_in_days", &bounds::EXPIRES_IN_DAYS))
                .transpose()?;
            let now = self.clock.now_millis();
            let generated = crate::keys::generate(crate::keys::DEFAULT_PREFIX);
            let k = KeyRecord {
                id: id.clone(),
                tenant: tenant.to_string(),
                name: req.name.unwrap_or_default(),
                hash: generated.hash.to_string(),
                scopes: req.scopes,
                created_ms: now,
                expires_ms: expires_in_days.map(|d| now + d * 86_400_000),
                revoked_at_ms: None,
                rotated_to: None,
            };
            let _one = self.sync.lock().await;
            let version = gone_if_none(self.dir_store.put_key(&k).await?, &k.tenant)?;
            self.commit(version, Change::Key { record: k.clone() }).await;
            Ok((key_view(&k, now), generated.secret))
        })
        .await
    }

    /// A store key's record, read from the store. A config key answers that it is read-only;
    /// with `tenant`, another tenant's key is not found.
    async fn managed_key(&self, key_id: &str, tenant: Option<&str>) -> Result<KeyRecord, AdminError> {
        let found = self.dir_store.get_keys(&[key_id]).await?.into_iter().find(|k| k.id == key_id);
        if let Some(k) = found.filter(|k| tenant.is_none_or(|t| k.tenant == t)) {
            // A store key of a tenant id the config file now declares is not served (the config
            // tenant does not inherit it); it is the config's to manage.
            if self.config_tenant(&k.tenant) {
                return Err(Self::read_only(&k.tenant));
            }
            return Ok(k);
        }
        // Config keys are found by a walk over the config tenants' keys: only on this path, and
        // only as long as the config's keys.
        let owner = {
            let rt = self.runtime.load();
            let d = &rt.directory;
            let found = d
                .config_tenants()
                .filter(|t| tenant.is_none_or(|x| *t.id == *x))
                .find(|t| d.keys_of(t).any(|(_, k)| *k.id == *key_id))
                .map(|t| t.id.to_string());
            found
        };
        match owner {
            Some(t) => Err(Self::read_only(&t)),
            None => Err(AdminError::NotFound(format!("no key is called `{key_id}`"))),
        }
    }

    /// Revokes a key now. With `tenant`, only that tenant's keys can be touched.
    pub async fn revoke_key(&self, actor: &Actor, key_id: &str, tenant: Option<&str>) -> Result<KeyView, AdminError> {
        let owner = self.managed_key(key_id, tenant).await.map(|k| k.tenant).unwrap_or_default();
        self.audited(actor, "key.revoke", &owner, &format!("key:{key_id}"), async {
            let _one = self.sync.lock().await;
            let mut k = self.managed_key(key_id, tenant).await?;
            let now = self.clock.now_millis();
            if k.revoked_at_ms.is_none_or(|t| t > now) {
                k.revoked_at_ms = Some(now);
            }
            let version = gone_if_none(self.dir_store.put_key(&k).await?, &k.tenant)?;
            self.commit(version, Change::Key { record: k.clone() }).await;
            Ok(key_view(&k, now))
        })
        .await
    }

    /// Replaces a key: a new secret with the same scopes; the old key works until the grace
    /// period ends, then answers `key_revoked`.
    pub async fn rotate_key(
        &self,
        actor: &Actor,
        key_id: &str,
        grace_hours: u32,
        tenant: Option<&str>,
    ) -> Result<(KeyView, String), AdminError> {
        let owner = self.managed_key(key_id, tenant).await.map(|k| k.tenant).unwrap_or_default();
        let new_id = Self::new_key_id();
        self.audited(actor, "key.rotate", &owner, &format!("key:{key_id}->{new_id}"), async {
            Int::new(i64::from(grace_hours)).within("grace_period_hours", &bounds::GRACE_PERIOD_HOURS)?;
            let _one = self.sync.lock().await;
            let mut old = self.managed_key(key_id, tenant).await?;
            let now = self.clock.now_millis();
            if old.revoked_at_ms.is_some_and(|t| t <= now) {
                return Err(AdminError::Conflict(format!(
                    "key `{key_id}` is already revoked; create a new key instead"
                )));
            }
            let generated = crate::keys::generate(crate::keys::DEFAULT_PREFIX);
            let new = KeyRecord {
                id: new_id.clone(),
                tenant: old.tenant.clone(),
                name: old.name.clone(),
                hash: generated.hash.to_string(),
                scopes: old.scopes.clone(),
                created_ms: now,
                expires_ms: old.expires_ms,
                revoked_at_ms: None,
                rotated_to: None,
            };
            let grace_end = now + grace_hours as i64 * 3_600_000;
            old.revoked_at_ms = Some(old.revoked_at_ms.map_or(grace_end, |t| t.min(grace_end)));
            old.rotated_to = Some(new_id.clone());
            // The new key first: a failure between the two writes leaves the old key working.
            let v1 = gone_if_none(self.dir_store.put_key(&new).await?, &new.tenant)?;
            self.commit(v1, Change::Key { record: new.clone() }).await;
            let v2 = gone_if_none(self.dir_store.put_key(&old).await?, &old.tenant)?;
            self.commit(v2, Change::Key { record: old.clone() }).await;
            Ok((key_view(&new, now), generated.secret))
        })
        .await
    }

    /// Records the last [`AdminCore::reload`] (SIGHUP) in the audit log; `ok` is whether it
    /// applied.
    pub fn audit_reload(&self, actor: &Actor, ok: bool) {
        let failed = self.last_signal_reload.lock().unwrap_or_else(|p| p.into_inner()).take();
        let code = if ok { None } else { Some(failed.unwrap_or("invalid_config")) };
        self.audit_reload_code(actor, false, code);
    }

    /// Records a reload in the audit log: the action is `config.reload`, or
    /// `config.force_reload` when it was asked with `force`, whatever its result.
    pub fn audit_reload_result(&self, actor: &Actor, force: bool, r: &Result<ReloadOutcome, ReloadError>) {
        self.audit_reload_code(actor, force, r.as_ref().err().map(ReloadError::code));
    }

    fn audit_reload_code(&self, actor: &Actor, force: bool, failure: Option<&str>) {
        let action = if force { "config.force_reload" } else { "config.reload" };
        self.audit(actor, action, "", "config", failure);
    }

    /// Current usage of a tenant's quotas.
    pub async fn usage(&self, tenant: &str) -> Result<Vec<crate::metering::report::QuotaUsage>, AdminError> {
        let t = self.runtime.load().directory.tenant(tenant).cloned();
        let t = t.ok_or_else(|| AdminError::NotFound(format!("no tenant is called `{tenant}`")))?;
        Ok(crate::metering::report::current_usage(&self.limits, &t).await)
    }

    /// A usage report over an inclusive range of UTC days.
    pub async fn report(
        &self,
        tenant: &str,
        from: &str,
        to: &str,
    ) -> Result<crate::metering::report::Report, AdminError> {
        let (first, last) = (report_day("from", from)?, report_day("to", to)?);
        if first > last {
            return Err(bad(format!("`from` ({from}) is after `to` ({to})")));
        }
        let days = (last - first).num_days() + 1;
        if days > bounds::REPORT_MAX_DAYS {
            return Err(bad(format!(
                "a report covers at most {} days, counting both ends; {from} to {to} is {days} days: ask for it in parts",
                bounds::REPORT_MAX_DAYS
            )));
        }
        if self.runtime.load().directory.tenant(tenant).is_none() {
            return Err(AdminError::NotFound(format!("no tenant is called `{tenant}`")));
        }
        let (from, to) = (first.format("%Y-%m-%d").to_string(), last.format("%Y-%m-%d").to_string());
        let rows = self.ledger.rows(tenant, &from, &to).await?;
        Ok(crate::metering::report::build(tenant, &from, &to, &rows))
    }
}

/// The version of a key write, or 404 when the store found its tenant gone (deleted, perhaps by
/// another instance, since this one last looked).
fn gone_if_none(version: Option<u64>, tenant: &str) -> Result<u64, AdminError> {
    version.ok_or_else(|| AdminError::NotFound(format!("no tenant is called `{tenant}`")))
}

/// A report's `from` or `to`: exactly `YYYY-MM-DD`, a real day, in [`bounds::REPORT_YEARS`].
fn report_day(field: &str, s: &str) -> Result<chrono::NaiveDate, AdminError> {
    use chrono::Datelike;
    let shape = s.len() == 10
        && s.bytes().enumerate().all(|(i, b)| if i == 4 || i == 7 { b == b'-' } else { b.is_ascii_digit() });
    let day = shape.then(|| chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()).flatten();
    let Some(day) = day else {
        return Err(bad(format!("`{field}` must be a day written as YYYY-MM-DD, like 2027-01-31, not `{}`", shown(s))));
    };
    let years = &bounds::REPORT_YEARS;
    if !years.contains(&day.year()) {
        return Err(bad(format!("`{field}` must be a day in the years {} to {}, not {s}", years.start(), years.end())));
    }
    Ok(day)
}

fn key_status(expires: Option<i64>, revoked_at: Option<i64>, now: i64) -> &'static str {
    match (expires, revoked_at) {
        (_, Some(t)) if t <= now => "revoked",
        (Some(e), _) if e <= now => "expired",
        (_, Some(_)) => "rotating",
        _ => "active",
    }
}

fn key_view(k: &KeyRecord, now: i64) -> KeyView {
    KeyView {
        id: k.id.clone(),
        tenant: k.tenant.clone(),
        name: k.name.clone(),
        scopes: k.scopes.clone(),
        status: key_status(k.expires_ms, k.revoked_at_ms, now),
        created_at: Some(ts(k.created_ms)),
        expires_at: k.expires_ms.map(ts),
        revoked_at: k.revoked_at_ms.map(ts),
        rotated_to: k.rotated_to.clone(),
        source: "api",
    }
}

/// A tenant as the admin API shows it, from the directory alone.
fn tenant_view(t: &Tenant) -> TenantView {
    if t.source == Source::Store {
        return view(&t.to_record());
    }
    TenantView {
        id: t.id.to_string(),
        name: t.name.clone(),
        email: t.email.clone(),
        tier: t.tier.name.to_string(),
        status: t.status.as_str().into(),
        subdomains: t.subdomains.clone(),
        ip_allow: t.ip_allow.iter().map(|n| n.to_string()).collect(),
        billing_anchor_day: t.policy.billing_anchor_day,
        timezone: t.policy.timezone.name().into(),
        overrides: serde_json::Map::new(),
        source: "config",
        created_at: None,
        updated_at: None,
    }
}

fn view(r: &TenantRecord) -> TenantView {
    TenantView {
        id: r.id.clone(),
        name: r.name.clone(),
        email: r.email.clone(),
        tier: r.tier.clone(),
        status: r.status.clone(),
        subdomains: r.subdomains.clone(),
        ip_allow: r.ip_allow.clone(),
        billing_anchor_day: r.billing_anchor_day,
        timezone: r.timezone.clone(),
        overrides: r.overrides.clone(),
        source: "api",
        created_at: Some(ts(r.created_ms)),
        updated_at: Some(ts(r.updated_ms)),
    }
}
