//! The swappable runtime snapshot: one validated config plus the directory built from it and
//! from the tenants and keys the store manages.
//!
//! Requests load the current `Arc<Runtime>` once, at their start, and use it to the end; a
//! reload or a directory change swaps in a new one without affecting requests in flight.

use crate::config::{policy, Config, KeyConfig, TenantConfig, TenantStatus};
use crate::directory::Directory;
use crate::keys::KeyHash;
use crate::store::{DirectoryData, KeyRecord, TenantRecord};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::Arc;

pub struct Runtime {
    pub config: Arc<Config>,
    pub directory: Directory,
    /// Tenants and keys from the store (admin API), as last loaded.
    pub managed: Arc<DirectoryData>,
}

impl Runtime {
    /// A runtime with only the config's tenants.
    pub fn new(config: Config) -> Runtime {
        Runtime::build(Arc::new(config), Arc::new(DirectoryData::default()))
    }

    /// A runtime with the config's tenants plus the store's. A store tenant whose id a config
    /// tenant already uses is ignored: the config wins.
    pub fn build(config: Arc<Config>, managed: Arc<DirectoryData>) -> Runtime {
        let mut tenants: Vec<TenantConfig> = Vec::with_capacity(managed.tenants.len());
        let mut index: HashMap<&str, usize> = HashMap::new();
        for r in &managed.tenants {
            if config.tenants.iter().any(|t| t.id == r.id) {
                continue;
            }
            if let Some(t) = tenant_config(r) {
                index.insert(&r.id, tenants.len());
                tenants.push(t);
            }
        }
        for k in &managed.keys {
            if let (Some(&i), Some(kc)) = (index.get(k.tenant.as_str()), key_config(k)) {
                tenants[i].keys.push(kc);
            }
        }
        let directory = Directory::build(&config, config.tenants.iter().chain(tenants.iter()));
        Runtime { config, directory, managed }
    }
}

/// A store tenant as the directory needs it. Values were validated when written.
pub fn tenant_config(r: &TenantRecord) -> Option<TenantConfig> {
    let overrides = if r.overrides.is_empty() {
        policy::Overrides::default()
    } else {
        let mut table = toml::Table::new();
        for (k, v) in &r.overrides {
            let tv = match v {
                serde_json::Value::Number(n) => toml::Value::Integer(n.as_i64()?),
                serde_json::Value::String(s) => toml::Value::String(s.clone()),
                _ => continue,
            };
            table.insert(k.clone(), tv);
        }
        let src = crate::config::SourceFile::new(std::path::Path::new("(store)"), String::new());
        let mut diags = crate::config::Diagnostics::default();
        policy::overrides(&toml::Spanned::new(0..0, table), &src, &mut diags)
    };
    Some(TenantConfig {
        id: r.id.clone(),
        name: r.name.clone(),
        email: r.email.clone(),
        tier: r.tier.clone(),
        status: if r.status == "suspended" { TenantStatus::Suspended } else { TenantStatus::Active },
        subdomains: r.subdomains.clone(),
        ip_allow: r.ip_allow.iter().filter_map(|c| crate::config::parse_cidr(c).ok()).collect(),
        keys: Vec::new(),
        billing_anchor_day: r.billing_anchor_day.clamp(1, 31),
        timezone: r.timezone.parse().unwrap_or(chrono_tz::UTC),
        overrides,
    })
}

fn key_config(k: &KeyRecord) -> Option<KeyConfig> {
    Some(KeyConfig {
        id: k.id.clone(),
        name: k.name.clone(),
        hash: KeyHash::parse(&k.hash).ok()?,
        scopes: k.scopes.clone(),
        expires: k.expires_ms,
        revoked_at: k.revoked_at_ms,
        created: Some(k.created_ms),
    })
}

/// The handle everything that serves requests holds.
pub type SharedRuntime = Arc<ArcSwap<Runtime>>;

pub fn shared(rt: Runtime) -> SharedRuntime {
    Arc::new(ArcSwap::from_pointee(rt))
}
