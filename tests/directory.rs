//! The directory at scale, without timing: a directory built by a full load and one built by a
//! sequence of changes (as admin writes and the change feed produce them) answer the same; a
//! change applied twice, changes to different records applied in another order, and a replay
//! from an earlier version all end in the same state; an older snapshot never moves; a config
//! reload that changes one key changes only it.

use std::path::Path;
use tollgate::config::{self, Config, Diagnostics};
use tollgate::directory::{Builder, Directory, Source};
use tollgate::keys::KeyHash;
use tollgate::store::{Change, KeyRecord, TenantRecord};

const CONFIG: &str = r#"
[server]
listen = ["127.0.0.1:0"]

[upstreams.main]
servers = ["127.0.0.1:9"]

[tiers.free]
upstream = "main"
[tiers.free.rate]
requests_per_minute = 60

[tiers.pro]
upstream = "main"
[tiers.pro.quotas.requests]
limit = 1000
period = "month"

[[tenants]]
id = "cfg"
tier = "pro"
subdomains = ["cfg-app"]

[[tenants.keys]]
id = "cfg-k0"
name = "deploy"
hash = "sha256:00000000000000000000000000000000000000000000000000000000000000aa"
scopes = ["read"]

[[tenants.keys]]
id = "cfg-k1"
hash = "sha256:00000000000000000000000000000000000000000000000000000000000000bb"
scopes = ["read", "write"]
"#;

fn config() -> Config {
    let mut diags = Diagnostics::default();
    config::load_str(Path::new("directory-test.toml"), CONFIG.to_string(), &mut diags)
        .unwrap_or_else(|| panic!("{diags:?}"))
}

fn tenant(i: usize) -> TenantRecord {
    TenantRecord {
        id: format!("t{i:06}"),
        name: format!("Tenant {i}"),
        email: String::new(),
        tier: if i.is_multiple_of(3) { "pro" } else { "free" }.into(),
        status: "active".into(),
        subdomains: if i.is_multiple_of(5) { vec![format!("app-{i}")] } else { Vec::new() },
        ip_allow: Vec::new(),
        billing_anchor_day: 1 + (i % 28) as u32,
        timezone: "UTC".into(),
        overrides: if i.is_multiple_of(7) {
            serde_json::from_value(serde_json::json!({"rate.requests_per_minute": 600})).expect("overrides")
        } else {
            serde_json::Map::new()
        },
        created_ms: 1_000 + i as i64,
        updated_ms: 1_000 + i as i64,
    }
}

fn hash(i: usize, n: usize) -> KeyHash {
    KeyHash::of(format!("tg_live_t{i:06}_{n}_xxxxxxxxxxxxxxxxxxxxxxxxxx").as_bytes())
}

fn key(i: usize, n: usize) -> KeyRecord {
    KeyRecord {
        id: format!("key_{i:06}_{n}"),
        tenant: format!("t{i:06}"),
        name: String::new(),
        hash: hash(i, n).to_string(),
        scopes: if n.is_multiple_of(2) { vec!["read".into()] } else { vec!["read".into(), "generate".into()] },
        created_ms: 5,
        expires_ms: (n == 9).then_some(9_000_000_000_000),
        revoked_at_ms: (n == 8).then_some(7),
        rotated_to: None,
    }
}

/// Everything a lookup can observe, in a comparable form.
fn dump(d: &Directory) -> Vec<String> {
    let mut out = Vec::new();
    for t in d.tenants_after(None) {
        let keys: Vec<String> = d.keys_of(t).map(|(_, k)| k.id.to_string()).collect();
        out.push(format!(
            "tenant {:?} {:?} {:?} rate={:?} keys={keys:?}",
            t.source,
            serde_json::to_string(&t.to_record()).expect("json"),
            t.status,
            t.policy.rate.as_ref().map(|r| r.limit),
        ));
        for s in &t.subdomains {
            let owner = d.tenant_by_subdomain(s).map(|o| o.id.to_string());
            out.push(format!("subdomain {s} -> {owner:?}"));
        }
    }
    for (h, k) in d.all_keys() {
        out.push(format!(
            "key {h} {} {} {:?} {:?} {:?} {:?} {:?}",
            k.id,
            k.tenant.id,
            k.tenant.status,
            k.scopes,
            k.expires(),
            k.revoked_at(),
            d.key_name(h)
        ));
        assert!(std::ptr::eq(&**d.tenant(&k.tenant.id).expect("the key's tenant"), &*k.tenant));
    }
    out
}

fn loaded(config: &mut Config, tenants: &[TenantRecord], keys: &[KeyRecord]) -> Directory {
    let base = Directory::from_config(config);
    let mut b = Builder::new(config);
    b.keep_config_part(&base);
    for t in tenants {
        b.tenant_record(t);
    }
    for k in keys {
        b.key_record(k);
    }
    b.finish()
}

#[test]
fn a_load_and_a_sequence_of_changes_give_the_same_directory() {
    let mut cfg = config();
    const TENANTS: usize = 10_000;
    let tenants: Vec<TenantRecord> = (0..TENANTS).map(tenant).collect();
    let keys: Vec<KeyRecord> = (0..TENANTS).flat_map(|i| (0..10).map(move |n| key(i, n))).collect();
    let by_load = loaded(&mut cfg, &tenants, &keys);
    assert_eq!(by_load.key_count(), 100_000 + 2);
    assert_eq!(by_load.tenant_count(), TENANTS + 1);

    // The same records as writes arrive: each tenant, then its keys, one change at a time.
    let mut by_changes = Directory::from_config(&mut config());
    let mut changes = Vec::new();
    for i in 0..TENANTS {
        changes.push(Change::Tenant { record: tenants[i].clone() });
        for n in 0..10 {
            changes.push(Change::Key { record: keys[i * 10 + n].clone() });
        }
    }
    for c in &changes {
        by_changes.apply(&cfg, c);
    }
    let want = dump(&by_load);
    assert_eq!(dump(&by_changes), want);

    // Twice is once.
    let mut twice = by_changes.clone();
    for c in &changes[..5_000] {
        twice.apply(&cfg, c);
    }
    assert_eq!(dump(&twice), want);

    // A replay of a run from an earlier version ends where the run ended.
    let mut replayed = by_changes.clone();
    for c in &changes[changes.len() / 2..] {
        replayed.apply(&cfg, c);
    }
    assert_eq!(dump(&replayed), want);

    // Keys of different records commute: the keys in reverse order after all the tenants.
    let mut reordered = Directory::from_config(&mut config());
    for t in &tenants {
        reordered.apply(&cfg, &Change::Tenant { record: t.clone() });
    }
    for k in keys.iter().rev() {
        reordered.apply(&cfg, &Change::Key { record: k.clone() });
    }
    assert_eq!(dump(&reordered), want);
}

#[test]
fn a_change_moves_only_what_it_touches_and_old_snapshots_stay() {
    let mut cfg = config();
    let tenants: Vec<TenantRecord> = (0..300).map(tenant).collect();
    let keys: Vec<KeyRecord> = (0..300).flat_map(|i| (0..10).map(move |n| key(i, n))).collect();
    let before = loaded(&mut cfg, &tenants, &keys);
    let frozen = dump(&before);

    // A suspension reaches every key of the tenant.
    let mut d = before.clone();
    let mut t5 = tenant(5);
    t5.status = "suspended".into();
    t5.subdomains = vec!["moved-5".into()];
    d.apply(&cfg, &Change::Tenant { record: t5.clone() });
    for n in 0..10 {
        let k = d.key(&hash(5, n)).expect("key");
        assert_eq!(k.tenant.status, config::TenantStatus::Suspended);
    }
    assert!(d.tenant_by_subdomain("app-5").is_none(), "the old subdomain is released");
    assert_eq!(d.tenant_by_subdomain("moved-5").map(|t| t.id.to_string()), Some("t000005".into()));
    assert_eq!(d.key(&hash(6, 0)).expect("key").tenant.status, config::TenantStatus::Active);

    // A revocation is one key.
    let mut k = key(7, 3);
    k.revoked_at_ms = Some(42);
    d.apply(&cfg, &Change::Key { record: k });
    assert_eq!(d.key(&hash(7, 3)).expect("key").revoked_at(), Some(42));
    assert_eq!(d.key(&hash(7, 4)).expect("key").revoked_at(), None);

    // A deletion takes the tenant's keys and subdomains with it, and nothing else.
    d.apply(&cfg, &Change::TenantDeleted { id: "t000010".into() });
    assert!(d.tenant("t000010").is_none());
    assert!((0..10).all(|n| d.key(&hash(10, n)).is_none()));
    assert!(d.tenant_by_subdomain("app-10").is_none());
    assert_eq!(d.key_count(), before.key_count() - 10);
    assert!(d.key(&hash(11, 0)).is_some());

    // A key of a deleted or unknown tenant is not taken.
    d.apply(&cfg, &Change::Key { record: key(10, 0) });
    d.apply(&cfg, &Change::Key { record: key(999, 0) });
    assert!(d.key(&hash(10, 0)).is_none() && d.key(&hash(999, 0)).is_none());

    // The config wins over the store for a tenant id it declares.
    let mut clash = tenant(0);
    clash.id = "cfg".into();
    clash.status = "suspended".into();
    d.apply(&cfg, &Change::Tenant { record: clash });
    d.apply(&cfg, &Change::TenantDeleted { id: "cfg".into() });
    let c = d.tenant("cfg").expect("config tenant");
    assert_eq!((c.source, c.status), (Source::Config, config::TenantStatus::Active));
    assert_eq!(d.keys_of(c).count(), 2);

    // None of this moved the snapshot taken before.
    assert_eq!(dump(&before), frozen);
}

#[test]
fn a_reload_that_changes_one_key_changes_only_it() {
    let mut cfg = config();
    let tenants: Vec<TenantRecord> = (0..200).map(tenant).collect();
    let keys: Vec<KeyRecord> = (0..200).flat_map(|i| (0..10).map(move |n| key(i, n))).collect();
    let old = loaded(&mut cfg, &tenants, &keys);
    let text = CONFIG.replace(
        "00000000000000000000000000000000000000000000000000000000000000bb",
        "00000000000000000000000000000000000000000000000000000000000000cc",
    );
    let mut diags = Diagnostics::default();
    let mut new_cfg =
        config::load_str(Path::new("directory-test.toml"), text, &mut diags).unwrap_or_else(|| panic!("{diags:?}"));
    let new = Directory::rebuild(&mut new_cfg, &old);
    assert!(new_cfg.tenants.iter().all(|t| t.keys.is_empty()), "the config keeps no copy of its keys");
    let bb = KeyHash::parse(&format!("sha256:{}bb", "0".repeat(62))).expect("hash");
    let cc = KeyHash::parse(&format!("sha256:{}cc", "0".repeat(62))).expect("hash");
    assert!(new.key(&bb).is_none());
    assert_eq!(new.key(&cc).map(|k| k.id.to_string()), Some("cfg-k1".into()));
    let strip = |d: &Directory| -> Vec<String> {
        dump(d).into_iter().filter(|l| !l.contains("cfg-k1") && !l.contains(&bb.to_string())).collect()
    };
    assert_eq!(strip(&new), strip(&old));
}

#[test]
fn a_subdomain_claimed_by_a_config_tenant_and_a_store_tenant_goes_to_the_config_tenant() {
    let mut cfg = config();
    let mut r = tenant(1);
    r.subdomains = vec!["cfg-app".into()];
    // Loaded together, or the store tenant arriving as a change: either way the config wins.
    let d = loaded(&mut cfg, &[r.clone()], &[]);
    assert_eq!(d.tenant_by_subdomain("cfg-app").map(|t| t.id.to_string()), Some("cfg".into()));
    let mut d2 = Directory::from_config(&mut config());
    d2.apply(&cfg, &Change::Tenant { record: r.clone() });
    assert_eq!(d2.tenant_by_subdomain("cfg-app").map(|t| t.id.to_string()), Some("cfg".into()));
    // Deleting the store tenant leaves the config tenant's subdomain alone.
    d2.apply(&cfg, &Change::TenantDeleted { id: r.id.clone() });
    assert_eq!(d2.tenant_by_subdomain("cfg-app").map(|t| t.id.to_string()), Some("cfg".into()));
}

#[test]
fn a_config_tenant_taking_a_store_tenants_id_does_not_inherit_its_keys() {
    let mut cfg = config();
    let mut r = tenant(1);
    r.id = "acme".into();
    let mut k = key(1, 0);
    k.tenant = "acme".into();
    let old = loaded(&mut cfg, &[r], &[k]);
    assert!(old.key(&hash(1, 0)).is_some());
    // The operator moves `acme` into the config file and reloads.
    let text = format!("{CONFIG}\n[[tenants]]\nid = \"acme\"\ntier = \"free\"\n");
    let mut diags = Diagnostics::default();
    let mut new_cfg =
        config::load_str(Path::new("directory-test.toml"), text, &mut diags).unwrap_or_else(|| panic!("{diags:?}"));
    let new = Directory::rebuild(&mut new_cfg, &old);
    assert_eq!(new.tenant("acme").map(|t| t.source), Some(Source::Config));
    assert!(new.key(&hash(1, 0)).is_none(), "the store key came along with the id");
    assert_eq!(new.config_key_count(), 2);
}

#[test]
fn a_tenant_back_on_a_known_tier_asks_for_a_load_of_its_keys() {
    let mut cfg = config();
    let mut d = loaded(&mut cfg, &[tenant(1)], &[key(1, 0)]);
    assert!(d.key(&hash(1, 0)).is_some() && !d.needs_load());
    // Another instance's config has a tier this one does not: the tenant and its keys go.
    let mut elsewhere = tenant(1);
    elsewhere.tier = "gold".into();
    d.apply(&cfg, &Change::Tenant { record: elsewhere });
    assert!(d.tenant("t000001").is_none() && d.key(&hash(1, 0)).is_none());
    assert_eq!(d.skipped(), 1);
    // Back on a tier this config has: the tenant returns, and its keys, which only the store
    // holds now, call for a load of every record.
    d.apply(&cfg, &Change::Tenant { record: tenant(1) });
    assert!(d.tenant("t000001").is_some());
    assert!(d.needs_load());
    assert_eq!(d.skipped(), 0);
}
