//! The directory: tenants and keys as an immutable snapshot.
//!
//! The hot path reads a [`Directory`] through an `ArcSwap` and never locks or touches a store.
//! Changes (a reload, an admin API write) build a new snapshot and swap it in whole, so a
//! request sees either the old directory or the new one, never half of each.

use crate::config::{Config, KeyConfig, TenantConfig, TenantStatus, Tier};
use crate::keys::{IdentityBuild, KeyHash};
use crate::policy::Policy;
use ipnet::IpNet;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

/// A tenant, resolved against its tier.
#[derive(Debug)]
pub struct Tenant {
    pub id: Arc<str>,
    pub name: String,
    pub email: String,
    pub tier: Arc<Tier>,
    pub status: TenantStatus,
    pub subdomains: Vec<String>,
    pub ip_allow: Vec<IpNet>,
    /// The tier's limits with this tenant's overrides applied.
    pub policy: Policy,
}

impl Tenant {
    /// `true` when the tenant has no allowlist or `ip` is inside it.
    pub fn allows_ip(&self, ip: Option<IpAddr>) -> bool {
        if self.ip_allow.is_empty() {
            return true;
        }
        match ip {
            Some(ip) => {
                let ip = canonical_ip(ip);
                self.ip_allow.iter().any(|n| n.contains(&ip))
            }
            None => false,
        }
    }
}

/// Maps IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) to IPv4, so an IPv4 allowlist works on
/// dual-stack listeners.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// An API key, without its secret.
#[derive(Debug)]
pub struct Key {
    pub id: Arc<str>,
    pub tenant: Arc<Tenant>,
    pub scopes: Box<[Arc<str>]>,
    /// Unix milliseconds.
    pub expires: Option<i64>,
    /// Revoked from this time on (Unix ms).
    pub revoked_at: Option<i64>,
}

impl Key {
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| &**s == scope)
    }
}

/// The immutable tenant and key snapshot.
#[derive(Debug, Default)]
pub struct Directory {
    tenants: HashMap<Arc<str>, Arc<Tenant>>,
    subdomains: HashMap<String, Arc<Tenant>>,
    keys: HashMap<KeyHash, Key, IdentityBuild>,
}

impl Directory {
    /// Builds the directory from config-declared tenants.
    pub fn from_config(config: &Config) -> Directory {
        Directory::build(config, config.tenants.iter())
    }

    /// Builds a directory from tenant records (config or store) against the config's tiers.
    /// Tenants whose tier no longer exists are skipped: they cannot be served.
    pub fn build<'a>(config: &Config, tenants: impl Iterator<Item = &'a TenantConfig>) -> Directory {
        let mut d = Directory::default();
        for t in tenants {
            d.insert(config, t);
        }
        d
    }

    fn insert(&mut self, config: &Config, t: &TenantConfig) {
        let Some(tier) = config.tiers.get(&t.tier) else { return };
        let tenant = Arc::new(Tenant {
            id: t.id.as_str().into(),
            name: t.name.clone(),
            email: t.email.clone(),
            tier: tier.clone(),
            status: t.status,
            subdomains: t.subdomains.clone(),
            ip_allow: t.ip_allow.clone(),
            policy: crate::config::policy::merge(&tier.limits, &t.overrides, t.billing_anchor_day, t.timezone),
        });
        for s in &t.subdomains {
            self.subdomains.insert(s.clone(), tenant.clone());
        }
        for k in &t.keys {
            self.keys.insert(k.hash, key_entry(k, &tenant));
        }
        self.tenants.insert(tenant.id.clone(), tenant);
    }

    pub fn tenant(&self, id: &str) -> Option<&Arc<Tenant>> {
        self.tenants.get(id)
    }

    /// A tenant by one of its subdomains, or by its id used as a subdomain.
    pub fn tenant_by_subdomain(&self, label: &str) -> Option<&Arc<Tenant>> {
        self.subdomains.get(label).or_else(|| self.tenants.get(label))
    }

    pub fn key(&self, hash: &KeyHash) -> Option<&Key> {
        self.keys.get(hash)
    }

    pub fn tenant_count(&self) -> usize {
        self.tenants.len()
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Reserves room for a bulk build (benches, large stores).
    pub fn with_capacity(tenants: usize, keys: usize) -> Directory {
        Directory {
            tenants: HashMap::with_capacity(tenants),
            subdomains: HashMap::new(),
            keys: HashMap::with_capacity_and_hasher(keys, IdentityBuild::default()),
        }
    }

    /// Adds one tenant record (used by bulk loaders).
    pub fn add(&mut self, config: &Config, t: &TenantConfig) {
        self.insert(config, t);
    }
}

fn key_entry(k: &KeyConfig, tenant: &Arc<Tenant>) -> Key {
    Key {
        id: k.id.as_str().into(),
        tenant: tenant.clone(),
        scopes: k.scopes.iter().map(|s| Arc::from(s.as_str())).collect(),
        expires: k.expires,
        revoked_at: k.revoked_at,
    }
}
