//! Tenants and keys managed at runtime (admin API, self-service), as the stores keep them.
//!
//! A [`DirectoryStore`] holds the records and a version number that every write bumps. Each
//! instance polls the version and rebuilds its directory snapshot when it moves, so a
//! revocation, a suspension, a tier change or a new key reaches every instance within the
//! poll interval.

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

/// Everything runtime-managed, as loaded.
#[derive(Debug, Clone, Default)]
pub struct DirectoryData {
    pub version: u64,
    pub tenants: Vec<TenantRecord>,
    pub keys: Vec<KeyRecord>,
}

/// Tenants and keys, with a change version.
#[async_trait]
pub trait DirectoryStore: Send + Sync + 'static {
    /// The change version: any write increases it.
    async fn version(&self) -> Result<u64, StoreError>;

    /// Every record, and the version they were read at.
    async fn load(&self) -> Result<DirectoryData, StoreError>;

    /// Writes a tenant. With `create`, fails (returns `false`) if the id exists.
    async fn put_tenant(&self, t: &TenantRecord, create: bool) -> Result<bool, StoreError>;

    /// Deletes a tenant and its keys; `false` if it did not exist.
    async fn delete_tenant(&self, id: &str) -> Result<bool, StoreError>;

    /// Writes a key (create or update).
    async fn put_key(&self, k: &KeyRecord) -> Result<(), StoreError>;
}
