//! Tenants and keys managed at runtime (admin API, self-service), as the stores keep them.
//!
//! A [`DirectoryStore`] holds the records, a version number that every write bumps, and a feed
//! of the recent changes. Each instance polls the feed and applies what changed to its
//! directory, so a revocation, a suspension, a tier change or a new key reaches every instance
//! within the poll interval, at a cost that depends on the change, not on the directory's size.

use super::StoreError;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// A tenant created through the API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TenantRecord {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub email: String,
    pub tier: String,
    /// `active` or `suspended`.
    pub status: String,
    #[serde(default)]
    pub subdomains: Vec<String>,
    #[serde(default)]
    pub ip_allow: Vec<String>,
    pub billing_anchor_day: u32,
    pub timezone: String,
    /// Dotted override paths (`rate.requests_per_minute`) to values.
    #[serde(default)]
    pub overrides: serde_json::Map<String, serde_json::Value>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// An API key created through the API. Only the hash of the secret is kept.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KeyRecord {
    pub id: String,
    pub tenant: String,
    pub name: String,
    /// `sha256:<hex>`.
    pub hash: String,
    pub scopes: Vec<String>,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
    /// Revoked from this time on; in the future while a rotation's grace period runs.
    pub revoked_at_ms: Option<i64>,
    /// The key that replaced this one in a rotation.
    #[serde(default)]
    pub rotated_to: Option<String>,
}

/// Everything runtime-managed, as loaded (the CLI's view; the gateway loads in pages).
#[derive(Debug, Clone, Default)]
pub struct DirectoryData {
    pub version: u64,
    pub tenants: Vec<TenantRecord>,
    pub keys: Vec<KeyRecord>,
}

/// Which records a page of [`DirectoryStore::page`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    Tenant,
    Key,
}

/// One page of a full load.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub tenants: Vec<TenantRecord>,
    pub keys: Vec<KeyRecord>,
    /// Where the next page starts; `None` after the last page. Opaque to the caller.
    pub next: Option<String>,
}

/// One write, as the change feed tells it. Every change carries the whole record, so applying
/// the same change twice, or a run of changes again from an earlier version, ends in the same
/// state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    /// A tenant created or rewritten.
    Tenant { record: TenantRecord },
    /// A tenant deleted, with every key it had.
    TenantDeleted { id: String },
    /// A key created or rewritten (a revocation or rotation rewrites the record).
    Key { record: KeyRecord },
}

/// A change and the directory version it produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Versioned {
    pub version: u64,
    #[serde(flatten)]
    pub change: Change,
}

/// What [`DirectoryStore::changes_since`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Feed {
    /// Every change after the given version, oldest first (empty when nothing changed).
    Changes(Vec<Versioned>),
    /// The feed no longer reaches back to the given version: load everything again.
    Behind,
}

/// How many changes the stores keep in their feed. An instance further behind loads again.
pub const FEED_RETAINED: u64 = 10_000;

/// Tenants and keys, with a change version and a feed of recent changes.
///
/// Every write bumps the version by one and appends one [`Change`] to the feed, atomically
/// with the record itself. Other instances follow the feed ([`DirectoryStore::changes_since`])
/// and apply only what changed; an instance that fell behind the retained feed loads again in
/// pages ([`DirectoryStore::page`]).
#[async_trait]
pub trait DirectoryStore: Send + Sync + 'static {
    /// The change version: every write increases it by one.
    async fn version(&self) -> Result<u64, StoreError>;

    /// One page of at most about `limit` records of `kind`, starting at `cursor` (`None`: the
    /// first page). A full load reads the version first, then every page, then the feed since
    /// that version: records written during the load are fixed up by the feed. A page may
    /// repeat a record an earlier page held.
    async fn page(&self, kind: RecordKind, cursor: Option<&str>, limit: usize) -> Result<Page, StoreError>;

    /// The changes after `version`, oldest first, or [`Feed::Behind`].
    async fn changes_since(&self, version: u64) -> Result<Feed, StoreError>;

    /// The feed's change of exactly `version`, if the feed still holds it. An instance compares
    /// it with the change it applied last before it applies newer ones: a different one means the
    /// store's history is not the one the instance followed (a failover that lost writes, a
    /// store restored from an older copy), and it loads every record again.
    async fn change_at(&self, version: u64) -> Result<Option<Versioned>, StoreError>;

    /// One tenant record.
    async fn get_tenant(&self, id: &str) -> Result<Option<TenantRecord>, StoreError>;

    /// Key records by id, in no particular order; ids that do not exist are left out.
    async fn get_keys(&self, ids: &[&str]) -> Result<Vec<KeyRecord>, StoreError>;

    /// Writes a tenant. With `create`, writes nothing and returns `None` if the id exists;
    /// otherwise the version of the change.
    async fn put_tenant(&self, t: &TenantRecord, create: bool) -> Result<Option<u64>, StoreError>;

    /// Deletes a tenant and every key it has; `None` if it did not exist, otherwise the
    /// version of the change.
    async fn delete_tenant(&self, id: &str) -> Result<Option<u64>, StoreError>;

    /// Writes a key (create or update) under its tenant; the version of the change, or `None`
    /// (nothing written) when the tenant does not exist.
    async fn put_key(&self, k: &KeyRecord) -> Result<Option<u64>, StoreError>;

    /// Every record (the CLI's full view), read page by page.
    async fn load(&self) -> Result<DirectoryData, StoreError> {
        let mut data = DirectoryData { version: self.version().await?, ..DirectoryData::default() };
        for kind in [RecordKind::Tenant, RecordKind::Key] {
            let mut cursor: Option<String> = None;
            loop {
                let page = self.page(kind, cursor.as_deref(), LOAD_PAGE).await?;
                data.tenants.extend(page.tenants);
                data.keys.extend(page.keys);
                match page.next {
                    Some(n) => cursor = Some(n),
                    None => break,
                }
            }
        }
        data.tenants.sort_by(|a, b| a.id.cmp(&b.id));
        data.tenants.dedup_by(|a, b| a.id == b.id);
        data.keys.sort_by(|a, b| a.id.cmp(&b.id));
        data.keys.dedup_by(|a, b| a.id == b.id);
        Ok(data)
    }
}

/// Records per page of a full load: large enough that a load is a few hundred round trips for
/// a million keys, small enough that a page is a few megabytes.
pub const LOAD_PAGE: usize = 5_000;
