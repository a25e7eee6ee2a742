//! The directory: tenants and keys as an immutable, cheaply cloned snapshot.
//!
//! The hot path reads a [`Directory`] through an `ArcSwap` and never locks or touches a store.
//! A change (an admin write on this instance, or one read from the store's change feed) is
//! applied to a clone with [`Directory::apply`], which copies only the chunks of the maps it
//! touches ([`cow::CowMap`]), and the clone is swapped in whole: a request sees either the old
//! directory or the new one, never half of each, and a change costs about the same with ten
//! keys or a million.
//!
//! Memory: each key is held once, as a [`Key`] (its hash, id, tenant, scopes and times) plus a
//! per-tenant index entry; scope sets and tier policies are shared between the keys and tenants
//! that have the same ones. Config keys are taken out of the config model when the directory is
//! built, so the config does not hold a second copy.

pub mod cow;

use crate::config::{policy, Config, KeyConfig, TenantConfig, TenantStatus, Tier};
use crate::keys::KeyHash;
use crate::policy::Policy;
use crate::store::{Change, KeyRecord, TenantRecord};
use cow::CowMap;
use ipnet::IpNet;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

/// Where a tenant is declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The config file: read-only through the admin API.
    Config,
    /// The store (admin API, self-service).
    Store,
}

/// What a store tenant's record has that the directory does not otherwise need: kept so the
/// admin API answers from memory and a config reload can resolve the tenant again.
#[derive(Debug, Clone, Default)]
pub struct StoreMeta {
    pub overrides: serde_json::Map<String, serde_json::Value>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// A tenant, resolved against its tier.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: Arc<str>,
    pub name: String,
    pub email: String,
    pub tier: Arc<Tier>,
    pub status: TenantStatus,
    pub subdomains: Vec<String>,
    pub ip_allow: Vec<IpNet>,
    /// The tier's limits with this tenant's overrides applied; shared by every tenant with the
    /// same tier, billing day and time zone and no overrides.
    pub policy: Arc<Policy>,
    pub source: Source,
    /// `Some` for store tenants.
    pub store: Option<StoreMeta>,
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

    /// The store record this tenant was built from (store tenants; config tenants give their
    /// fields with empty metadata).
    pub fn to_record(&self) -> TenantRecord {
        let meta = self.store.clone().unwrap_or_default();
        TenantRecord {
            id: self.id.to_string(),
            name: self.name.clone(),
            email: self.email.clone(),
            tier: self.tier.name.to_string(),
            status: self.status.as_str().into(),
            subdomains: self.subdomains.clone(),
            ip_allow: self.ip_allow.iter().map(|n| n.to_string()).collect(),
            billing_anchor_day: self.policy.billing_anchor_day,
            timezone: self.policy.timezone.name().into(),
            overrides: meta.overrides,
            created_ms: meta.created_ms,
            updated_ms: meta.updated_ms,
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

/// A key's id, held inline when it fits (generated ids, `key_` and 16 hex digits, do), so a
/// million keys do not mean a million small allocations. Derefs to `str`; cloning copies 24
/// bytes or bumps a reference count.
#[derive(Clone)]
pub struct KeyId(IdRepr);

#[derive(Clone)]
enum IdRepr {
    Inline { len: u8, bytes: [u8; KeyId::INLINE] },
    Shared(Arc<str>),
}

impl KeyId {
    const INLINE: usize = 22;
}

impl From<&str> for KeyId {
    fn from(s: &str) -> KeyId {
        if s.len() <= KeyId::INLINE {
            let mut bytes = [0u8; KeyId::INLINE];
            bytes[..s.len()].copy_from_slice(s.as_bytes());
            KeyId(IdRepr::Inline { len: s.len() as u8, bytes })
        } else {
            KeyId(IdRepr::Shared(s.into()))
        }
    }
}

impl From<String> for KeyId {
    fn from(s: String) -> KeyId {
        KeyId::from(s.as_str())
    }
}

impl std::ops::Deref for KeyId {
    type Target = str;
    fn deref(&self) -> &str {
        match &self.0 {
            // Built from a `&str` cut at a length that fits: always valid UTF-8.
            IdRepr::Inline { len, bytes } => std::str::from_utf8(&bytes[..*len as usize]).unwrap_or_default(),
            IdRepr::Shared(s) => s,
        }
    }
}

impl std::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, f)
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self)
    }
}

impl PartialEq for KeyId {
    fn eq(&self, other: &KeyId) -> bool {
        **self == **other
    }
}

/// "Never", for a key's expiry and revocation time.
const NEVER: i64 = i64::MAX;

/// An API key, without its secret.
#[derive(Debug, Clone)]
pub struct Key {
    pub id: KeyId,
    pub tenant: Arc<Tenant>,
    /// Shared by every key with the same scopes.
    pub scopes: Arc<[Arc<str>]>,
    /// Unix ms, or [`NEVER`].
    expires_ms: i64,
    /// Unix ms, or [`NEVER`]; `i64::MIN` is "since forever" (`revoked = true` in the config).
    revoked_ms: i64,
}

impl Key {
    pub fn new(
        id: KeyId,
        tenant: Arc<Tenant>,
        scopes: Arc<[Arc<str>]>,
        expires: Option<i64>,
        revoked_at: Option<i64>,
    ) -> Key {
        Key { id, tenant, scopes, expires_ms: expires.unwrap_or(NEVER), revoked_ms: revoked_at.unwrap_or(NEVER) }
    }

    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| &**s == scope)
    }

    /// When the key expires (Unix ms).
    pub fn expires(&self) -> Option<i64> {
        (self.expires_ms != NEVER).then_some(self.expires_ms)
    }

    /// When the key is revoked from (Unix ms); in the future while a rotation's grace runs.
    pub fn revoked_at(&self) -> Option<i64> {
        (self.revoked_ms != NEVER).then_some(self.revoked_ms)
    }
}

/// The first eight bytes of a hash: the per-tenant index holds these, and finds the key by them.
fn prefix(h: &KeyHash) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.0[..8]);
    u64::from_be_bytes(b)
}

/// Policies and scope sets, shared between tenants and keys that have the same ones.
#[derive(Debug, Default)]
struct Interned {
    policies: HashMap<(Arc<str>, u32, chrono_tz::Tz), Arc<Policy>>,
    scopes: HashMap<Vec<String>, Arc<[Arc<str>]>>,
}

impl Interned {
    fn scopes(&mut self, scopes: &[String]) -> Arc<[Arc<str>]> {
        if let Some(s) = self.scopes.get(scopes) {
            return s.clone();
        }
        let s: Arc<[Arc<str>]> = scopes.iter().map(|s| Arc::from(s.as_str())).collect();
        self.scopes.insert(scopes.to_vec(), s.clone());
        s
    }
}

/// The immutable tenant and key snapshot.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    tenants: CowMap<Arc<str>, Arc<Tenant>>,
    subdomains: CowMap<Box<str>, Arc<Tenant>>,
    keys: CowMap<KeyHash, Key>,
    /// `(tenant id, hash prefix)` of every key: a tenant's keys, in order.
    by_tenant: CowMap<(Arc<str>, u64), ()>,
    /// Names of config keys that have one (store keys' names stay in the store).
    names: CowMap<KeyHash, Box<str>>,
    /// The sharing tables of the last full build; a change reuses what they hold.
    interned: Arc<Interned>,
    /// Ids of store tenants (and so their keys) left out because their tier is not in this
    /// config.
    skipped: CowMap<Box<str>, ()>,
    /// Set when a change or a reload may have made servable what this directory left out (a
    /// skipped tenant back on a known tier, a store tenant no longer shadowed by a config
    /// tenant): their keys are only in the store, so every record has to be read again.
    needs_load: bool,
}

/// Collects records for a full build; [`Builder::finish`] sorts them into a [`Directory`] once.
pub struct Builder<'c> {
    config: &'c Config,
    tenants: HashMap<Arc<str>, Arc<Tenant>>,
    keys: Vec<(KeyHash, Key)>,
    names: Vec<(KeyHash, Box<str>)>,
    interned: Interned,
    skipped: Vec<(Box<str>, ())>,
}

impl<'c> Builder<'c> {
    pub fn new(config: &'c Config) -> Builder<'c> {
        Builder {
            config,
            tenants: HashMap::with_capacity(config.tenants.len()),
            keys: Vec::new(),
            names: Vec::new(),
            interned: Interned::default(),
            skipped: Vec::new(),
        }
    }

    /// Adds a config tenant and the keys given (taken out of its config entry by the caller).
    pub fn config_tenant(&mut self, t: &TenantConfig, keys: Vec<KeyConfig>) {
        let Some(tier) = self.config.tiers.get(&t.tier) else { return };
        let policy = shared_policy(&mut self.interned, tier, &t.overrides, t.billing_anchor_day, t.timezone);
        let tenant = Arc::new(Tenant {
            id: t.id.as_str().into(),
            name: t.name.clone(),
            email: t.email.clone(),
            tier: tier.clone(),
            status: t.status,
            subdomains: t.subdomains.clone(),
            ip_allow: t.ip_allow.clone(),
            policy,
            source: Source::Config,
            store: None,
        });
        self.keys.reserve(keys.len());
        for k in keys {
            if !k.name.is_empty() {
                self.names.push((k.hash, k.name.into_boxed_str()));
            }
            let key = Key::new(k.id.into(), tenant.clone(), self.interned.scopes(&k.scopes), k.expires, k.revoked_at);
            self.keys.push((k.hash, key));
        }
        self.tenants.insert(tenant.id.clone(), tenant);
    }

    /// Adds a store tenant, unless a config tenant has its id (the config wins) or its tier is
    /// not in the config.
    pub fn tenant_record(&mut self, r: &TenantRecord) {
        if self.tenants.get(r.id.as_str()).is_some_and(|t| t.source == Source::Config) {
            return;
        }
        match store_tenant(self.config, &mut self.interned, r) {
            Some(t) => {
                self.tenants.insert(t.id.clone(), t);
            }
            None => self.skipped.push((Box::from(r.id.as_str()), ())),
        }
    }

    /// Adds a store key; a key whose tenant is unknown or declared in the config is left out.
    pub fn key_record(&mut self, k: &KeyRecord) {
        let Some(tenant) = self.tenants.get(k.tenant.as_str()) else { return };
        if tenant.source == Source::Config {
            return;
        }
        let Ok(hash) = KeyHash::parse(&k.hash) else {
            tracing::error!(key = %k.id, "skipping a key record with an unreadable hash");
            return;
        };
        let key = store_key(&mut self.interned, k, tenant.clone());
        self.keys.push((hash, key));
    }

    /// Adds a key kept from an earlier directory, under this build's tenant of the same id.
    fn kept_key(&mut self, hash: KeyHash, k: &Key) {
        let Some(tenant) = self.tenants.get(&*k.tenant.id) else { return };
        // A config tenant that now has the id does not inherit the store tenant's keys.
        if tenant.source == Source::Config {
            return;
        }
        let scopes = self.interned.scopes(&k.scopes.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let key = Key { tenant: tenant.clone(), scopes, ..k.clone() };
        self.keys.push((hash, key));
    }

    /// Keys added so far.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Keeps the config tenants and keys of `old`, built against this same config, as they are.
    pub fn keep_config_part(&mut self, old: &Directory) {
        for (_, t) in old.tenants.iter() {
            if t.source == Source::Config {
                self.tenants.insert(t.id.clone(), t.clone());
            }
        }
        for (h, k) in old.keys.iter() {
            if k.tenant.source == Source::Config {
                self.keys.push((*h, k.clone()));
            }
        }
        for (h, n) in old.names.iter() {
            self.names.push((*h, n.clone()));
        }
    }

    /// Adds the store tenants and keys of `old`, resolved against this build's config.
    fn store_part_of(&mut self, old: &Directory) {
        for (_, t) in old.tenants.iter() {
            if t.source == Source::Store {
                self.tenant_record(&t.to_record());
            }
        }
        self.keys.reserve(old.keys.len());
        for (h, k) in old.keys.iter() {
            if k.tenant.source == Source::Store {
                self.kept_key(*h, k);
            }
        }
    }

    pub fn finish(self) -> Directory {
        // A subdomain two tenants claim (a config reload can give a config tenant one that a
        // store tenant has) goes to the config tenant: the later of equal entries stays.
        let mut subdomains = Vec::new();
        for source in [Source::Store, Source::Config] {
            for t in self.tenants.values().filter(|t| t.source == source) {
                for s in &t.subdomains {
                    subdomains.push((Box::from(s.as_str()), t.clone()));
                }
            }
        }
        let by_tenant: Vec<((Arc<str>, u64), ())> =
            self.keys.iter().map(|(h, k)| ((k.tenant.id.clone(), prefix(h)), ())).collect();
        let by_tenant = CowMap::from_entries(by_tenant);
        Directory {
            tenants: CowMap::from_entries(self.tenants.into_iter().collect()),
            subdomains: CowMap::from_entries(subdomains),
            keys: CowMap::from_entries(self.keys),
            by_tenant,
            names: CowMap::from_entries(self.names),
            interned: Arc::new(self.interned),
            skipped: CowMap::from_entries(self.skipped),
            needs_load: false,
        }
    }
}

/// The policy of a tenant: the shared one for its tier, day and zone when it overrides nothing.
fn shared_policy(
    interned: &mut Interned,
    tier: &Arc<Tier>,
    overrides: &policy::Overrides,
    anchor_day: u32,
    tz: chrono_tz::Tz,
) -> Arc<Policy> {
    if *overrides != policy::Overrides::default() {
        return Arc::new(policy::merge(&tier.limits, overrides, anchor_day, tz));
    }
    interned
        .policies
        .entry((tier.name.clone(), anchor_day, tz))
        .or_insert_with(|| Arc::new(policy::merge(&tier.limits, overrides, anchor_day, tz)))
        .clone()
}

/// A store tenant resolved against the config; `None` when its tier is not there.
fn store_tenant(config: &Config, interned: &mut Interned, r: &TenantRecord) -> Option<Arc<Tenant>> {
    let tier = config.tiers.get(&r.tier)?;
    let overrides = store_overrides(&r.overrides);
    let anchor = r.billing_anchor_day.clamp(1, 31);
    let tz: chrono_tz::Tz = r.timezone.parse().unwrap_or(chrono_tz::UTC);
    Some(Arc::new(Tenant {
        id: r.id.as_str().into(),
        name: r.name.clone(),
        email: r.email.clone(),
        tier: tier.clone(),
        status: if r.status == "suspended" { TenantStatus::Suspended } else { TenantStatus::Active },
        subdomains: r.subdomains.clone(),
        ip_allow: r.ip_allow.iter().filter_map(|c| crate::config::parse_cidr(c).ok()).collect(),
        policy: shared_policy(interned, tier, &overrides, anchor, tz),
        source: Source::Store,
        store: Some(StoreMeta { overrides: r.overrides.clone(), created_ms: r.created_ms, updated_ms: r.updated_ms }),
    }))
}

/// A store tenant's overrides, as the config would give them. Values were validated when
/// written.
fn store_overrides(o: &serde_json::Map<String, serde_json::Value>) -> policy::Overrides {
    if o.is_empty() {
        return policy::Overrides::default();
    }
    let mut table = toml::Table::new();
    for (k, v) in o {
        let tv = match v {
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => toml::Value::Integer(i),
                None => continue,
            },
            serde_json::Value::String(s) => toml::Value::String(s.clone()),
            _ => continue,
        };
        table.insert(k.clone(), tv);
    }
    let src = crate::config::SourceFile::new(std::path::Path::new("(store)"), String::new());
    let mut diags = crate::config::Diagnostics::default();
    policy::overrides(&toml::Spanned::new(0..0, table), &src, &mut diags)
}

fn store_key(interned: &mut Interned, k: &KeyRecord, tenant: Arc<Tenant>) -> Key {
    Key::new(k.id.as_str().into(), tenant, interned.scopes(&k.scopes), k.expires_ms, k.revoked_at_ms)
}

impl Directory {
    /// The directory of a config alone. Its tenants' keys are taken out of `config`.
    pub fn from_config(config: &mut Config) -> Directory {
        let taken = take_keys(config);
        Directory::from_config_keys(config, taken)
    }

    /// The directory of a config whose keys were taken out with [`take_keys`].
    pub fn from_config_keys(config: &Config, keys: Vec<Vec<KeyConfig>>) -> Directory {
        let mut b = Builder::new(config);
        for (t, keys) in config.tenants.iter().zip(keys) {
            b.config_tenant(t, keys);
        }
        b.finish()
    }

    /// The directory for a new config: its tenants and keys (taken out of `config`), and the
    /// store tenants and keys of `old`, resolved against the new tiers.
    pub fn rebuild(config: &mut Config, old: &Directory) -> Directory {
        let taken = take_keys(config);
        let mut b = Builder::new(config);
        for (t, keys) in config.tenants.iter().zip(taken) {
            b.config_tenant(t, keys);
        }
        b.store_part_of(old);
        b.finish()
    }

    /// The config tenants and keys of `config_part` (built against `config`) with the store
    /// tenants and keys of `store_part`, resolved against `config`.
    pub fn combine(config: &Config, config_part: &Directory, store_part: &Directory) -> Directory {
        let mut b = Builder::new(config);
        b.keep_config_part(config_part);
        b.store_part_of(store_part);
        let mut d = b.finish();
        d.needs_load = config_part.needs_load || store_part.needs_load;
        d
    }

    /// Every key, in hash order.
    pub fn all_keys(&self) -> impl Iterator<Item = (&KeyHash, &Key)> + '_ {
        self.keys.iter().map(|(h, k)| (h, k))
    }

    /// How many keys config tenants have.
    pub fn config_key_count(&self) -> usize {
        self.keys.iter().filter(|(_, k)| k.tenant.source == Source::Config).count()
    }

    pub fn tenant(&self, id: &str) -> Option<&Arc<Tenant>> {
        self.tenants.get(id)
    }

    /// A tenant by one of its subdomains, or by its id used as a subdomain.
    pub fn tenant_by_subdomain(&self, label: &str) -> Option<&Arc<Tenant>> {
        self.subdomains.get(label).or_else(|| self.tenants.get(label))
    }

    /// The tenant that has `label` as one of its subdomains.
    pub fn subdomain_owner(&self, label: &str) -> Option<&Arc<Tenant>> {
        self.subdomains.get(label)
    }

    pub fn key(&self, hash: &KeyHash) -> Option<&Key> {
        self.keys.get(hash)
    }

    /// The name of a config key, if it has one.
    pub fn key_name(&self, hash: &KeyHash) -> Option<&str> {
        self.names.get(hash).map(|n| &**n)
    }

    pub fn tenant_count(&self) -> usize {
        self.tenants.len()
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Store tenants left out because this config has no tier of their name.
    pub fn skipped(&self) -> usize {
        self.skipped.len()
    }

    /// Whether every store record must be read again to serve everything (see the field).
    pub fn needs_load(&self) -> bool {
        self.needs_load
    }

    /// Marks that every store record must be read again.
    pub fn set_needs_load(&mut self) {
        self.needs_load = true;
    }

    /// Tenants in id order, after `cursor` (or from the first).
    pub fn tenants_after<'a>(&'a self, cursor: Option<&str>) -> Box<dyn Iterator<Item = &'a Arc<Tenant>> + 'a> {
        match cursor {
            Some(c) => Box::new(self.tenants.iter_from(c, false).map(|e| &e.1)),
            None => Box::new(self.tenants.iter().map(|e| &e.1)),
        }
    }

    /// A tenant's keys, by hash order.
    pub fn keys_of<'a>(&'a self, tenant: &'a Arc<Tenant>) -> impl Iterator<Item = (&'a KeyHash, &'a Key)> + 'a {
        self.by_tenant
            .iter_from(&(tenant.id.clone(), 0), true)
            .take_while(move |e| e.0 .0 == tenant.id)
            .flat_map(move |e| self.with_prefix(e.0 .1, &tenant.id))
    }

    /// The keys of `tenant` whose hash starts with `p`: almost always one, but two hashes can
    /// share their first eight bytes (an operator can install any hash), so every one is given.
    fn with_prefix<'a>(&'a self, p: u64, tenant: &'a str) -> impl Iterator<Item = (&'a KeyHash, &'a Key)> + 'a {
        let mut low = [0u8; 32];
        low[..8].copy_from_slice(&p.to_be_bytes());
        self.keys
            .iter_from(&KeyHash(low), true)
            .take_while(move |e| prefix(&e.0) == p)
            .filter(move |e| &*e.1.tenant.id == tenant)
            .map(|e| (&e.0, &e.1))
    }

    /// Every tenant declared in the config file.
    pub fn config_tenants(&self) -> impl Iterator<Item = &Arc<Tenant>> + '_ {
        self.tenants.iter().map(|e| &e.1).filter(|t| t.source == Source::Config)
    }

    /// Applies one change from the store. Changes to config tenants (the config wins) and keys of
    /// unknown tenants are ignored; applying a change twice is the same as once.
    pub fn apply(&mut self, config: &Config, change: &Change) {
        match change {
            Change::Tenant { record } => self.put_tenant(config, record),
            Change::TenantDeleted { id } => {
                self.skipped.remove(id.as_str());
                if self.tenants.get(id.as_str()).is_some_and(|t| t.source == Source::Store) {
                    self.remove_tenant(id);
                }
            }
            Change::Key { record } => self.put_key(record),
        }
    }

    fn put_tenant(&mut self, config: &Config, r: &TenantRecord) {
        let old = self.tenants.get(r.id.as_str()).cloned();
        if old.as_ref().is_some_and(|t| t.source == Source::Config) {
            return;
        }
        // The sharing tables of the last full build are read, not grown: a change adds at most
        // one policy of its own.
        let mut interned = Interned::default();
        if let Some(tier) = config.tiers.get(&r.tier) {
            let key =
                (tier.name.clone(), r.billing_anchor_day.clamp(1, 31), r.timezone.parse().unwrap_or(chrono_tz::UTC));
            if let Some(p) = self.interned.policies.get(&key) {
                interned.policies.insert(key, p.clone());
            }
        }
        let Some(new) = store_tenant(config, &mut interned, r) else {
            tracing::warn!(tenant = %r.id, tier = %r.tier, "a store tenant's tier is not in this config; it is not served here");
            if old.is_some() {
                self.remove_tenant(&r.id);
            }
            self.skipped.insert(Box::from(r.id.as_str()), ());
            return;
        };
        if self.skipped.remove(r.id.as_str()).is_some() {
            self.needs_load = true;
        }
        if let Some(old) = &old {
            for s in &old.subdomains {
                if self.subdomains.get(s.as_str()).is_some_and(|o| Arc::ptr_eq(o, old)) {
                    self.subdomains.remove(s.as_str());
                }
            }
            // Every key of the tenant points at the new record.
            let hashes: Vec<KeyHash> = self.keys_of(old).map(|(h, _)| *h).collect();
            for h in hashes {
                if let Some(k) = self.keys.get(&h) {
                    let k = Key { tenant: new.clone(), ..k.clone() };
                    self.keys.insert(h, k);
                }
            }
        }
        for s in &new.subdomains {
            if self.subdomains.get(s.as_str()).is_some_and(|o| o.source == Source::Config) {
                continue;
            }
            self.subdomains.insert(Box::from(s.as_str()), new.clone());
        }
        self.tenants.insert(new.id.clone(), new);
    }

    fn remove_tenant(&mut self, id: &str) {
        let Some(old) = self.tenants.remove(id) else { return };
        for s in &old.subdomains {
            if self.subdomains.get(s.as_str()).is_some_and(|o| Arc::ptr_eq(o, &old)) {
                self.subdomains.remove(s.as_str());
            }
        }
        let entries: Vec<(KeyHash, u64)> = self.keys_of(&old).map(|(h, _)| (*h, prefix(h))).collect();
        for (h, p) in entries {
            self.keys.remove(&h);
            self.names.remove(&h);
            self.by_tenant.remove(&(old.id.clone(), p));
        }
    }

    fn put_key(&mut self, r: &KeyRecord) {
        let Some(tenant) = self.tenants.get(r.tenant.as_str()).cloned() else { return };
        if tenant.source == Source::Config {
            return;
        }
        let Ok(hash) = KeyHash::parse(&r.hash) else {
            tracing::error!(key = %r.id, "skipping a key record with an unreadable hash");
            return;
        };
        let mut interned = Interned::default();
        if let Some(s) = self.interned.scopes.get(&r.scopes) {
            interned.scopes.insert(r.scopes.clone(), s.clone());
        }
        let key = store_key(&mut interned, r, tenant.clone());
        self.keys.insert(hash, key);
        self.by_tenant.insert((tenant.id.clone(), prefix(&hash)), ());
    }

    /// An estimate of the bytes the directory holds: its maps, keys' ids, tenants' records.
    pub fn heap_bytes(&self) -> usize {
        let ids: usize =
            self.keys.iter().map(|(_, k)| if k.id.len() > KeyId::INLINE { k.id.len() + 16 } else { 0 }).sum();
        self.tenants.heap_bytes()
            + self.subdomains.heap_bytes()
            + self.keys.heap_bytes()
            + self.by_tenant.heap_bytes()
            + self.names.heap_bytes()
            + ids
            + self.tenants.len() * std::mem::size_of::<Tenant>()
    }
}

/// Takes every config tenant's keys out of the config, in tenant order.
pub fn take_keys(config: &mut Config) -> Vec<Vec<KeyConfig>> {
    config.tenants.iter_mut().map(|t| std::mem::take(&mut t.keys)).collect()
}
