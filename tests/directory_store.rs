//! Directory store conformance: one suite that every [`DirectoryStore`] backend must pass.
//!
//! Each `suite_*` function is written once against a [`Backend`] and run against [`Embedded`]
//! on a fresh SQLite file, [`RedisStore`] on a fresh `redis-server`, and [`RedisStore`] on a
//! fresh three-master Redis Cluster (the `directory!` macro generates one `embedded_*`,
//! `redis_*` and `redis_cluster_*` test per suite). Whatever the backend:
//!
//! - **Versions**: every write bumps the version by exactly one and answers it; creating a
//!   tenant that exists and deleting one that does not write nothing and bump nothing.
//! - **The feed**: `changes_since(v)` answers exactly the changes after `v`, oldest first,
//!   with whole records; nothing when `v` is current; `Behind` when `v` is ahead of the store
//!   or older than the last [`FEED_RETAINED`] changes, which is all the feed keeps.
//! - **Replay**: the changes since any version, applied over the records loaded at that
//!   version, give exactly what `load()` answers (after random mixes of writes).
//! - **Deleting a tenant** deletes its keys and no other tenant's.
//! - **Paged loads** yield every record at least once and nothing else; `load()` answers
//!   exactly the records written.
//! - **Gets** of missing ids answer nothing.
//!
//! Backend-specific: a SQLite file and a Redis written by the release before the feed (records
//! and a version, no feed) are read as they are, and their followers load once; on Redis every
//! directory key is in the `{dir}` slot, and writes go on after the server forgets its scripts.

mod common;
use common::{cluster_slot, temp_dir, Redis, RedisCluster};
use futures_util::stream::{self, StreamExt};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tollgate::clock::{Clock, SystemClock};
use tollgate::store::embedded::Embedded;
use tollgate::store::redis::RedisStore;
use tollgate::store::{
    Breaker, Change, DirectoryStore, Feed, KeyRecord, NoObserver, RecordKind, TenantRecord, Versioned, FEED_RETAINED,
};

// ---------------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------------

/// A temp directory removed when the test ends.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a backend runs on, kept alive while the store is used and inspected by some checks.
enum Server {
    Sqlite(TempDir),
    Redis(Redis),
    Cluster(RedisCluster),
}

/// A store under test.
struct Backend {
    store: Arc<dyn DirectoryStore>,
    server: Server,
}

fn breaker(timeout: Duration) -> Breaker {
    Breaker::new(timeout, 5, Duration::from_secs(1), Arc::new(SystemClock))
}

impl Backend {
    /// [`Embedded`] on a SQLite file in a fresh temp dir.
    fn embedded() -> Backend {
        let dir = TempDir(temp_dir("directory-store"));
        let store =
            Embedded::open(&dir.0.join("tollgate.db"), SystemClock.now_millis()).expect("open the embedded store");
        Backend { store: Arc::new(store), server: Server::Sqlite(dir) }
    }

    /// [`RedisStore`] on a fresh `redis-server`. Must be called inside a Tokio runtime.
    fn redis() -> Backend {
        let redis = Redis::start();
        let timeout = Duration::from_secs(5);
        let store = RedisStore::connect(&[redis.url()], breaker(timeout), Arc::new(NoObserver), timeout)
            .expect("create the Redis store");
        Backend { store: Arc::new(store), server: Server::Redis(redis) }
    }

    /// [`RedisStore`] on a fresh three-master Redis Cluster, discovered from one seed.
    async fn redis_cluster() -> Backend {
        let cluster = RedisCluster::start(3, 0, 5000);
        let timeout = Duration::from_secs(5);
        let store = RedisStore::connect_cluster(&[cluster.url(0)], breaker(timeout), Arc::new(NoObserver), timeout)
            .expect("create the Redis Cluster store");
        store.wait_connected(tokio::time::Instant::now() + Duration::from_secs(10)).await.expect("cluster discovered");
        Backend { store: Arc::new(store), server: Server::Cluster(cluster) }
    }

    /// Runs a command on the Redis node holding the directory (`{dir}` slot).
    fn redis_query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Option<T> {
        match &self.server {
            Server::Sqlite(_) => None,
            Server::Redis(r) => {
                let mut c = redis::Client::open(r.url()).expect("client").get_connection().expect("connect");
                Some(cmd.query(&mut c).expect("redis command"))
            }
            Server::Cluster(c) => {
                let node = c.master_of_slot(cluster_slot("tg:{dir}:version"), 0);
                Some(c.query(node, cmd).expect("redis command"))
            }
        }
    }

    /// How many changes the feed holds.
    fn feed_len(&self) -> u64 {
        match &self.server {
            Server::Sqlite(dir) => {
                let c = rusqlite::Connection::open(dir.0.join("tollgate.db")).expect("open the file");
                c.query_row("SELECT COUNT(*) FROM dir_changes", [], |r| r.get::<_, i64>(0)).expect("count") as u64
            }
            _ => self.redis_query::<u64>(redis::cmd("ZCARD").arg("tg:{dir}:changes")).expect("ZCARD"),
        }
    }

    /// Every Redis key (on every master); `None` for SQLite.
    fn redis_keys(&self) -> Option<Vec<String>> {
        match &self.server {
            Server::Sqlite(_) => None,
            Server::Redis(_) => self.redis_query(redis::cmd("KEYS").arg("*")),
            Server::Cluster(c) => Some(c.keys_on_masters("*")),
        }
    }
}

/// Generates an `embedded`, a `redis` and a `redis_cluster` test running `$suite`.
macro_rules! directory {
    ($suite:ident: $embedded:ident, $redis:ident, $cluster:ident $(,)?) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $embedded() {
            let backend = Backend::embedded();
            $suite(&backend).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $redis() {
            let backend = Backend::redis();
            $suite(&backend).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $cluster() {
            let backend = Backend::redis_cluster().await;
            $suite(&backend).await;
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Records and a model of the directory
// ---------------------------------------------------------------------------------------------

fn tenant(id: &str, tier: &str) -> TenantRecord {
    TenantRecord {
        id: id.into(),
        name: format!("Tenant {id}"),
        email: format!("ops@{id}.example"),
        tier: tier.into(),
        status: "active".into(),
        subdomains: vec![format!("{id}.api.example")],
        ip_allow: vec![],
        billing_anchor_day: 1,
        timezone: "UTC".into(),
        overrides: serde_json::Map::new(),
        created_ms: 1_767_225_600_000,
        updated_ms: 1_767_225_600_000,
    }
}

fn key(id: &str, tenant: &str) -> KeyRecord {
    KeyRecord {
        id: id.into(),
        tenant: tenant.into(),
        name: format!("key {id}"),
        hash: format!("sha256:{:064x}", id.len()),
        scopes: vec!["read".into()],
        created_ms: 1_767_225_600_000,
        expires_ms: None,
        revoked_at_ms: None,
        rotated_to: None,
    }
}

/// The directory as a follower holds it: records by id.
#[derive(Debug, Default, Clone, PartialEq)]
struct Model {
    tenants: BTreeMap<String, TenantRecord>,
    keys: BTreeMap<String, KeyRecord>,
}

impl Model {
    async fn loaded(store: &dyn DirectoryStore) -> (u64, Model) {
        let data = store.load().await.expect("load");
        let model = Model {
            tenants: data.tenants.into_iter().map(|t| (t.id.clone(), t)).collect(),
            keys: data.keys.into_iter().map(|k| (k.id.clone(), k)).collect(),
        };
        (data.version, model)
    }

    fn apply(&mut self, change: &Change) {
        match change {
            Change::Tenant { record } => {
                self.tenants.insert(record.id.clone(), record.clone());
            }
            Change::TenantDeleted { id } => {
                self.tenants.remove(id);
                self.keys.retain(|_, k| k.tenant != *id);
            }
            Change::Key { record } => {
                self.keys.insert(record.id.clone(), record.clone());
            }
        }
    }
}

async fn changes(store: &dyn DirectoryStore, since: u64) -> Vec<Versioned> {
    match store.changes_since(since).await.expect("changes_since") {
        Feed::Changes(c) => c,
        Feed::Behind => panic!("the feed is behind version {since}"),
    }
}

async fn version(store: &dyn DirectoryStore) -> u64 {
    store.version().await.expect("version")
}

/// Writes `n` keys of `tenant` named `<prefix>-<i>`, `in_flight` at a time.
async fn put_keys(store: &dyn DirectoryStore, tenant: &str, prefix: &str, n: usize, in_flight: usize) -> Vec<u64> {
    stream::iter(0..n)
        .map(|i| async move {
            store.put_key(&key(&format!("{prefix}-{i:05}"), tenant)).await.expect("put_key").expect("the tenant exists")
        })
        .buffer_unordered(in_flight)
        .collect()
        .await
}

// ---------------------------------------------------------------------------------------------
// Suites
// ---------------------------------------------------------------------------------------------

async fn suite_versions(b: &Backend) {
    let s = &*b.store;
    assert_eq!(version(s).await, 0, "a new directory is at version 0");
    assert_eq!(s.put_tenant(&tenant("acme", "free"), true).await.unwrap(), Some(1));
    assert_eq!(version(s).await, 1);
    // Creating again writes nothing: the record stays the first one.
    assert_eq!(s.put_tenant(&tenant("acme", "pro"), true).await.unwrap(), None);
    assert_eq!(version(s).await, 1);
    assert_eq!(s.get_tenant("acme").await.unwrap().map(|t| t.tier), Some("free".into()));
    // An update (and an upsert of a new id) is a write.
    assert_eq!(s.put_tenant(&tenant("acme", "pro"), false).await.unwrap(), Some(2));
    assert_eq!(s.put_tenant(&tenant("globex", "free"), false).await.unwrap(), Some(3));
    assert_eq!(s.put_key(&key("k1", "acme")).await.unwrap(), Some(4));
    assert_eq!(s.put_key(&key("k1", "acme")).await.unwrap(), Some(5), "rewriting the same record is a write");
    assert_eq!(s.delete_tenant("nobody").await.unwrap(), None);
    assert_eq!(version(s).await, 5, "deleting a missing tenant bumps nothing");
    assert_eq!(s.delete_tenant("acme").await.unwrap(), Some(6));
    assert_eq!(s.delete_tenant("acme").await.unwrap(), None, "deleted once");
    assert_eq!(version(s).await, 6);
    // Writes that wrote nothing left nothing in the feed either.
    let feed = changes(s, 0).await;
    assert_eq!(feed.iter().map(|c| c.version).collect::<Vec<_>>(), (1..=6).collect::<Vec<_>>());
}

async fn suite_feed(b: &Backend) {
    let s = &*b.store;
    let acme = tenant("acme", "free");
    let mut acme_pro = tenant("acme", "pro");
    acme_pro.overrides.insert("rate.requests_per_minute".into(), serde_json::json!(600));
    let mut k1 = key("k1", "acme");
    let mut expected = Vec::new();
    let mut push = |v: u64, change: Change| expected.push(Versioned { version: v, change });

    push(s.put_tenant(&acme, true).await.unwrap().unwrap(), Change::Tenant { record: acme.clone() });
    push(s.put_key(&k1).await.unwrap().unwrap(), Change::Key { record: k1.clone() });
    k1.revoked_at_ms = Some(1_767_225_700_000);
    push(s.put_key(&k1).await.unwrap().unwrap(), Change::Key { record: k1.clone() });
    push(s.put_tenant(&acme_pro, false).await.unwrap().unwrap(), Change::Tenant { record: acme_pro.clone() });
    push(
        s.put_tenant(&tenant("globex", "free"), true).await.unwrap().unwrap(),
        Change::Tenant { record: tenant("globex", "free") },
    );
    push(s.delete_tenant("globex").await.unwrap().unwrap(), Change::TenantDeleted { id: "globex".into() });
    let current = version(s).await;
    assert_eq!(current, 6);

    assert_eq!(changes(s, 0).await, expected, "every change, oldest first, with whole records");
    for since in 0..=current {
        assert_eq!(changes(s, since).await, expected[since as usize..], "changes after version {since}");
    }
    assert_eq!(s.changes_since(current).await.unwrap(), Feed::Changes(vec![]));
    assert_eq!(s.changes_since(current + 5).await.unwrap(), Feed::Behind, "ahead of the store");
    // Each change can be read back by its version, as instances check what they applied last.
    for v in 1..=current {
        assert_eq!(s.change_at(v).await.unwrap().as_ref(), Some(&expected[v as usize - 1]), "change {v}");
    }
    assert_eq!(s.change_at(0).await.unwrap(), None);
    assert_eq!(s.change_at(current + 1).await.unwrap(), None);
    assert_eq!(s.changes_since(current + 1).await.unwrap(), Feed::Behind);
}

async fn suite_feed_is_trimmed(b: &Backend) {
    let s = &*b.store;
    s.put_tenant(&tenant("acme", "free"), true).await.unwrap();
    let writes = FEED_RETAINED as usize + 25;
    let mut versions = put_keys(s, "acme", "k", writes, 32).await;
    versions.sort_unstable();
    assert_eq!(versions, (2..=writes as u64 + 1).collect::<Vec<_>>(), "one version per write, none shared");
    let current = version(s).await;
    assert_eq!(current, writes as u64 + 1);
    assert_eq!(b.feed_len(), FEED_RETAINED, "the feed keeps the last FEED_RETAINED changes");

    assert_eq!(s.changes_since(0).await.unwrap(), Feed::Behind, "version 1 was trimmed");
    assert_eq!(s.changes_since(current - FEED_RETAINED - 1).await.unwrap(), Feed::Behind);
    let last = changes(s, current - 10).await;
    assert_eq!(last.iter().map(|c| c.version).collect::<Vec<_>>(), (current - 9..=current).collect::<Vec<_>>());
    assert!(last.iter().all(|c| matches!(&c.change, Change::Key { record } if record.tenant == "acme")));
    // The oldest change kept is still reachable.
    let all = changes(s, current - FEED_RETAINED).await;
    assert_eq!(all.len() as u64, FEED_RETAINED);
    assert_eq!(all.first().map(|c| c.version), Some(current - FEED_RETAINED + 1));
}

/// A small deterministic generator (xorshift64*), so a failing mix can be replayed by seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) % n
    }
}

async fn suite_replay_matches_load(b: &Backend) {
    let s = &*b.store;
    // A scripted mix first: creates, updates, keys, a revocation, a tenant deleted with keys.
    s.put_tenant(&tenant("acme", "free"), true).await.unwrap();
    s.put_tenant(&tenant("globex", "free"), true).await.unwrap();
    s.put_tenant(&tenant("initech", "free"), true).await.unwrap();
    s.put_tenant(&tenant("globex", "pro"), false).await.unwrap();
    for (k, t) in [("a1", "acme"), ("a2", "acme"), ("g1", "globex"), ("g2", "globex"), ("i1", "initech")] {
        s.put_key(&key(k, t)).await.unwrap();
    }
    let mut revoked = key("g1", "globex");
    revoked.revoked_at_ms = Some(1);
    s.put_key(&revoked).await.unwrap();
    s.delete_tenant("acme").await.unwrap();

    // Then random writes, with snapshots along the way.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut snapshots = vec![(0, Model::default())];
    for step in 0..300 {
        let t = format!("t{}", rng.below(6));
        match rng.below(10) {
            0 => {
                s.delete_tenant(&t).await.unwrap();
            }
            1 | 2 => {
                let tier = ["free", "pro", "enterprise"][rng.below(3) as usize];
                s.put_tenant(&tenant(&t, tier), rng.below(2) == 0).await.unwrap();
            }
            _ => {
                let mut k = key(&format!("k{}", rng.below(40)), &t);
                k.revoked_at_ms = (rng.below(4) == 0).then_some(step);
                s.put_key(&k).await.unwrap();
            }
        }
        if step % 50 == 0 {
            snapshots.push(Model::loaded(s).await);
        }
    }

    let (current, loaded) = Model::loaded(s).await;
    for (at, snapshot) in snapshots {
        let mut replayed = snapshot;
        let feed = changes(s, at).await;
        assert_eq!(feed.last().map(|c| c.version).unwrap_or(at), current);
        for c in &feed {
            replayed.apply(&c.change);
        }
        assert_eq!(replayed, loaded, "the changes since version {at} over its records give what load() gives");
    }
    assert!(loaded.tenants.keys().all(|t| t != "acme") && !loaded.keys.contains_key("a1"));

    if let Some(keys) = b.redis_keys() {
        assert!(
            keys.iter().all(|k| k.starts_with("tg:{dir}:")),
            "every directory key is in the {{dir}} slot: {keys:?}"
        );
        assert!(!keys.iter().any(|k| k == "tg:{dir}:tenant-keys:acme"), "a deleted tenant's key set is gone");
    }
}

async fn suite_delete_tenant_removes_its_keys(b: &Backend) {
    let s = &*b.store;
    for t in ["acme", "globex"] {
        s.put_tenant(&tenant(t, "free"), true).await.unwrap();
    }
    let ids = ["a1", "a2", "a3", "g1", "g2"];
    for id in ids {
        s.put_key(&key(id, if id.starts_with('a') { "acme" } else { "globex" })).await.unwrap();
    }
    s.put_key(&key("a2", "acme")).await.unwrap();
    // A key of a tenant with no tenant record is not written at all.
    let before = version(s).await;
    assert_eq!(s.put_key(&key("o1", "orphan")).await.unwrap(), None);
    assert_eq!(version(s).await, before, "a refused key write bumps nothing");
    // A key rewritten under another tenant belongs to that one.
    s.put_key(&key("m1", "acme")).await.unwrap();
    s.put_key(&key("m1", "globex")).await.unwrap();

    let v = s.delete_tenant("acme").await.unwrap().expect("acme existed");
    assert_eq!(
        changes(s, v - 1).await,
        vec![Versioned { version: v, change: Change::TenantDeleted { id: "acme".into() } }]
    );
    assert_eq!(s.get_tenant("acme").await.unwrap(), None);
    assert_eq!(s.get_keys(&["a1", "a2", "a3"]).await.unwrap(), vec![]);
    let mut left: Vec<String> = s.get_keys(&ids).await.unwrap().into_iter().map(|k| k.id).collect();
    left.sort();
    assert_eq!(left, ["g1", "g2"]);
    let data = s.load().await.unwrap();
    assert_eq!(data.keys.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(), ["g1", "g2", "m1"]);
    assert_eq!(data.tenants.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), ["globex"]);

    // A tenant created again under the same id starts with no keys, and deleting it again
    // touches only its new ones.
    s.put_tenant(&tenant("acme", "free"), true).await.unwrap();
    s.put_key(&key("a9", "acme")).await.unwrap();
    assert_eq!(s.get_keys(&["a1", "a9"]).await.unwrap().len(), 1);
    s.delete_tenant("acme").await.unwrap().expect("acme exists again");
    assert_eq!(s.get_keys(&["a9"]).await.unwrap(), vec![]);
    assert_eq!(s.get_keys(&["g1", "g2", "m1", "o1"]).await.unwrap().len(), 3);
    // globex's delete takes the key it took over.
    s.delete_tenant("globex").await.unwrap().expect("globex exists");
    assert_eq!(s.get_keys(&["g1", "g2", "m1", "o1"]).await.unwrap(), vec![]);
}

async fn suite_paged_load(b: &Backend) {
    let s = &*b.store;
    const KEYS: usize = 12_345;
    for t in ["acme", "globex", "initech"] {
        s.put_tenant(&tenant(t, "free"), true).await.unwrap();
    }
    put_keys(s, "acme", "acme", KEYS / 2, 32).await;
    put_keys(s, "globex", "globex", KEYS - KEYS / 2, 32).await;
    let written: HashSet<String> = (0..KEYS / 2)
        .map(|i| format!("acme-{i:05}"))
        .chain((0..KEYS - KEYS / 2).map(|i| format!("globex-{i:05}")))
        .collect();
    assert_eq!(written.len(), KEYS);

    let mut seen = HashSet::new();
    let (mut cursor, mut pages, mut records) = (None::<String>, 0, 0);
    loop {
        let page = s.page(RecordKind::Key, cursor.as_deref(), 1_000).await.expect("page");
        assert!(page.tenants.is_empty(), "a key page holds keys only");
        assert!(page.keys.len() <= 2_000, "a page is about `limit` records, not {}", page.keys.len());
        pages += 1;
        records += page.keys.len();
        for k in page.keys {
            assert!(written.contains(&k.id), "a key nobody wrote: {}", k.id);
            assert_eq!(k, key(&k.id, &k.tenant));
            seen.insert(k.id);
        }
        match page.next {
            Some(n) => cursor = Some(n),
            None => break,
        }
        assert!(pages < 1_000, "paging does not end");
    }
    assert_eq!(seen, written, "every key at least once");
    assert!(pages >= 2, "12,345 keys in pages of 1,000 take several pages, not {pages}");
    assert!(records >= KEYS);

    let tenants = s.page(RecordKind::Tenant, None, 1_000).await.unwrap();
    assert!(tenants.keys.is_empty());
    assert_eq!(tenants.tenants.len(), 3);
    assert_eq!(tenants.next, None);

    let data = s.load().await.unwrap();
    assert_eq!(data.version, KEYS as u64 + 3);
    assert_eq!(data.tenants, ["acme", "globex", "initech"].map(|t| tenant(t, "free")));
    let mut expected: Vec<KeyRecord> =
        written.iter().map(|id| key(id, if id.starts_with("acme") { "acme" } else { "globex" })).collect();
    expected.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(data.keys, expected, "load() answers exactly the records written, each once");
}

async fn suite_missing_records(b: &Backend) {
    let s = &*b.store;
    assert_eq!(s.get_tenant("nobody").await.unwrap(), None);
    assert_eq!(s.get_keys(&[]).await.unwrap(), vec![]);
    assert_eq!(s.get_keys(&["nothing"]).await.unwrap(), vec![]);
    let empty = s.page(RecordKind::Key, None, 100).await.unwrap();
    assert!(empty.keys.is_empty() && empty.next.is_none());
    assert_eq!(s.changes_since(0).await.unwrap(), Feed::Changes(vec![]), "an empty directory has no changes");
    assert_eq!(s.changes_since(1).await.unwrap(), Feed::Behind);

    s.put_tenant(&tenant("acme", "free"), true).await.unwrap();
    s.put_key(&key("k1", "acme")).await.unwrap();
    s.put_key(&key("k2", "acme")).await.unwrap();
    assert_eq!(s.get_tenant("acme").await.unwrap(), Some(tenant("acme", "free")));
    assert_eq!(s.get_tenant("acm").await.unwrap(), None);
    assert_eq!(s.get_keys(&["k1", "nothing"]).await.unwrap(), vec![key("k1", "acme")]);
    // Many ids at once (more than one query or command's worth), most of them missing.
    let names: Vec<String> = (0..2_500).map(|i| format!("missing-{i}")).chain(["k2".into(), "k1".into()]).collect();
    let ids: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut found = s.get_keys(&ids).await.unwrap();
    found.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(found, vec![key("k1", "acme"), key("k2", "acme")]);
}

directory!(suite_versions: embedded_versions, redis_versions, redis_cluster_versions);
directory!(suite_feed: embedded_feed, redis_feed, redis_cluster_feed);
directory!(suite_feed_is_trimmed: embedded_feed_is_trimmed, redis_feed_is_trimmed, redis_cluster_feed_is_trimmed);
directory!(suite_replay_matches_load:
    embedded_replay_matches_load, redis_replay_matches_load, redis_cluster_replay_matches_load);
directory!(suite_delete_tenant_removes_its_keys:
    embedded_delete_tenant_removes_its_keys,
    redis_delete_tenant_removes_its_keys,
    redis_cluster_delete_tenant_removes_its_keys);
directory!(suite_paged_load: embedded_paged_load, redis_paged_load, redis_cluster_paged_load);
directory!(suite_missing_records: embedded_missing_records, redis_missing_records, redis_cluster_missing_records);

// ---------------------------------------------------------------------------------------------
// Directories written before the feed existed
// ---------------------------------------------------------------------------------------------

/// Followers of a directory written by the release before the feed (records and version 7,
/// no feed): they are up to date at 7, behind before it, and follow the feed from the next
/// write on.
async fn check_written_before_the_feed(s: &dyn DirectoryStore) {
    let data = s.load().await.unwrap();
    assert_eq!(data.version, 7);
    assert_eq!(data.tenants, vec![tenant("acme", "free")]);
    assert_eq!(data.keys, vec![key("k1", "acme")]);
    assert_eq!(s.get_tenant("acme").await.unwrap(), Some(tenant("acme", "free")));
    assert_eq!(s.changes_since(7).await.unwrap(), Feed::Changes(vec![]));
    assert_eq!(s.changes_since(3).await.unwrap(), Feed::Behind, "the feed does not reach back to version 3");
    assert_eq!(s.changes_since(0).await.unwrap(), Feed::Behind);

    assert_eq!(s.put_key(&key("k2", "acme")).await.unwrap(), Some(8));
    assert_eq!(changes(s, 7).await, vec![Versioned { version: 8, change: Change::Key { record: key("k2", "acme") } }]);
    assert_eq!(s.changes_since(6).await.unwrap(), Feed::Behind);
    assert_eq!(s.put_tenant(&tenant("acme", "pro"), false).await.unwrap(), Some(9));
    assert_eq!(changes(s, 7).await.len(), 2);
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_opens_a_file_from_before_the_feed() {
    let dir = TempDir(temp_dir("directory-store-old"));
    let path: &Path = &dir.0.join("tollgate.db");
    {
        // The directory tables as the release before the feed created them.
        let c = rusqlite::Connection::open(path).unwrap();
        c.execute_batch(
            "CREATE TABLE dir_tenants (id TEXT PRIMARY KEY, record TEXT NOT NULL);
             CREATE TABLE dir_keys (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, record TEXT NOT NULL);
             CREATE TABLE dir_meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
             INSERT INTO dir_meta (k, v) VALUES ('version', 7);",
        )
        .unwrap();
        c.execute("INSERT INTO dir_tenants (id, record) VALUES ('acme', ?1)", [json(&tenant("acme", "free"))]).unwrap();
        c.execute("INSERT INTO dir_keys (id, tenant, record) VALUES ('k1', 'acme', ?1)", [json(&key("k1", "acme"))])
            .unwrap();
    }
    let store = Embedded::open(path, SystemClock.now_millis()).expect("a file from before the feed opens");
    check_written_before_the_feed(&store).await;
    // Deleting the tenant takes its old keys with it (they are in `dir_keys` by tenant).
    assert!(store.delete_tenant("acme").await.unwrap().is_some());
    assert_eq!(store.get_keys(&["k1", "k2"]).await.unwrap(), vec![]);
    drop(store);
    // And it opens again.
    let store = Embedded::open(path, SystemClock.now_millis()).expect("reopen");
    assert_eq!(version(&store).await, 10);
    assert_eq!(changes(&store, 7).await.len(), 3);
}

/// Writes tenant `acme` and its key `key_id` as an earlier release did: the records (and the
/// version, if given), no feed, no per-tenant key set.
fn write_records_only(r: &Redis, key_id: &str, version: Option<u64>) {
    let mut c = redis::Client::open(r.url()).unwrap().get_connection().unwrap();
    let mut pipe = redis::pipe();
    pipe.cmd("HSET").arg("tg:{dir}:tenants").arg("acme").arg(json(&tenant("acme", "free")));
    pipe.cmd("HSET").arg("tg:{dir}:keys").arg(key_id).arg(json(&key(key_id, "acme")));
    if let Some(v) = version {
        pipe.cmd("SET").arg("tg:{dir}:version").arg(v);
    }
    pipe.exec(&mut c).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_reads_a_directory_from_before_the_feed() {
    let b = Backend::redis();
    let Server::Redis(r) = &b.server else { unreachable!() };
    write_records_only(r, "k1", Some(7));
    check_written_before_the_feed(&*b.store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keys_from_before_the_key_sets_go_with_their_tenant_after_a_load() {
    let b = Backend::redis();
    let Server::Redis(r) = &b.server else { unreachable!() };
    // A directory written before the per-tenant key sets: records only.
    write_records_only(r, "old", None);
    let s = &*b.store;
    // The load every instance does at start puts the old key in its set and marks the sets
    // complete; a later delete then takes the key with the tenant, so a tenant created again
    // under the same id does not inherit it.
    assert_eq!(s.load().await.unwrap().keys, vec![key("old", "acme")]);
    assert_eq!(r.command(&["EXISTS", "tg:{dir}:tenant-keys-complete"]), ":1");
    assert!(s.delete_tenant("acme").await.unwrap().is_some());
    assert_eq!(s.get_keys(&["old"]).await.unwrap(), vec![]);
    s.put_tenant(&tenant("acme", "free"), true).await.unwrap();
    assert_eq!(s.load().await.unwrap().keys, vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_directory_writes_go_on_after_a_script_flush() {
    let b = Backend::redis();
    let Server::Redis(r) = &b.server else { unreachable!() };
    let s = &*b.store;
    assert_eq!(s.put_tenant(&tenant("acme", "free"), true).await.unwrap(), Some(1));
    assert_eq!(s.put_key(&key("k1", "acme")).await.unwrap(), Some(2));
    assert_eq!(r.command(&["SCRIPT", "FLUSH"]), "+OK");
    // Every script is unknown again: each call sends it again and answers as before.
    assert_eq!(s.changes_since(0).await.unwrap(), Feed::Changes(changes(s, 0).await));
    assert_eq!(s.put_tenant(&tenant("acme", "pro"), true).await.unwrap(), None);
    assert_eq!(s.put_key(&key("k2", "acme")).await.unwrap(), Some(3));
    assert_eq!(s.delete_tenant("acme").await.unwrap(), Some(4));
    assert_eq!(changes(s, 0).await.len(), 4);
    assert_eq!(s.get_keys(&["k1", "k2"]).await.unwrap(), vec![]);
    assert!(b.store.version().await.is_ok(), "the breaker stayed closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_unreadable_records_are_skipped() {
    let b = Backend::redis();
    let s = &*b.store;
    s.put_tenant(&tenant("acme", "free"), true).await.unwrap();
    s.put_key(&key("k1", "acme")).await.unwrap();
    let _: () = b.redis_query(redis::cmd("HSET").arg("tg:{dir}:keys").arg("bad").arg("{not json")).unwrap();
    let _: () = b.redis_query(redis::cmd("HSET").arg("tg:{dir}:tenants").arg("bad").arg("[]")).unwrap();
    assert_eq!(s.get_keys(&["k1", "bad"]).await.unwrap(), vec![key("k1", "acme")]);
    assert_eq!(s.get_tenant("bad").await.unwrap(), None);
    let data = s.load().await.unwrap();
    assert_eq!(data.tenants, vec![tenant("acme", "free")]);
    assert_eq!(data.keys, vec![key("k1", "acme")]);
}
