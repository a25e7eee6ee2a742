//! The embedded store: one node, one SQLite file.
//!
//! On one node the in-memory counters are the authority, so leases, windows and slots are
//! answered from memory under a short lock and never wait for the disk. What must survive a
//! restart (quota usage) is written to SQLite by [`Counters::persist_usage`], which the quota
//! engine calls every `flush_interval` and at shutdown; it runs on a blocking thread, off the
//! request path. A crash loses at most the usage of one flush interval.

use super::{
    apply_lease, Change, CounterKey, Counters, DirectoryStore, Feed, Grant, HolderRecord, KeyRecord, LeaseRequest,
    Ledger, LedgerBatch, LedgerRow, Page, RecordKind, StoreError, TenantRecord, Versioned, FEED_RETAINED,
};
use async_trait::async_trait;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, TransactionBehavior};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Usage older than this is not loaded at startup: no quota period is longer (except `never`,
/// whose period starts at 0 and is always loaded).
const PRELOAD_WINDOW_MS: i64 = 40 * 86_400_000;

#[derive(Default)]
struct Memory {
    granted: HashMap<CounterKey, u64>,
    /// Lease holders per counter (in one process there is one, but the protocol is the same).
    holders: HashMap<CounterKey, HashMap<String, HolderRecord>>,
    /// Usage persisted by earlier processes, loaded at open.
    persisted: HashMap<CounterKey, u64>,
    windows: HashMap<(String, i64), u64>,
    /// tenant → slot → expiry (ms)
    slots: HashMap<String, HashMap<String, i64>>,
}

/// The SQLite-backed store.
pub struct Embedded {
    path: PathBuf,
    db: Arc<Mutex<Connection>>,
    mem: Mutex<Memory>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl Embedded {
    /// Opens (or creates) the database and loads recent quota usage into memory.
    pub fn open(path: &Path, now_ms: i64) -> Result<Embedded, StoreError> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| backend(format!("cannot create {}: {e}", dir.display())))?;
            }
        }
        let conn = Connection::open(path).map_err(|e| backend(format!("cannot open {}: {e}", path.display())))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             PRAGMA cache_size = -32768;
             PRAGMA busy_timeout = 5000;
             CREATE TABLE IF NOT EXISTS usage (
                 tenant TEXT NOT NULL,
                 metric TEXT NOT NULL,
                 day TEXT NOT NULL,
                 value INTEGER NOT NULL,
                 cost_micros INTEGER NOT NULL,
                 PRIMARY KEY (tenant, day, metric)
             );
             CREATE TABLE IF NOT EXISTS quota_usage (
                 tenant TEXT NOT NULL,
                 metric TEXT NOT NULL,
                 period_start INTEGER NOT NULL,
                 used INTEGER NOT NULL,
                 updated_ms INTEGER NOT NULL,
                 PRIMARY KEY (tenant, metric, period_start)
             );",
        )
        .map_err(backend)?;
        directory_schema(&conn)?;
        ledger_schema(&conn)?;
        let mut mem = Memory::default();
        {
            let mut stmt = conn
                .prepare("SELECT tenant, metric, period_start, used FROM quota_usage WHERE period_start = 0 OR period_start >= ?1")
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![now_ms - PRELOAD_WINDOW_MS], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?, r.get::<_, i64>(3)?))
                })
                .map_err(backend)?;
            for row in rows {
                let (tenant, metric, period_start, used) = row.map_err(backend)?;
                let key = CounterKey { tenant: tenant.into(), metric: metric.into(), period_start };
                mem.granted.insert(key.clone(), used.max(0) as u64);
                mem.persisted.insert(key, used.max(0) as u64);
            }
        }
        Ok(Embedded { path: path.to_path_buf(), db: Arc::new(Mutex::new(conn)), mem: Mutex::new(mem) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The shared SQLite connection, for the usage ledger.
    pub fn connection(&self) -> Arc<Mutex<Connection>> {
        self.db.clone()
    }

    fn mem(&self) -> std::sync::MutexGuard<'_, Memory> {
        // A panic while holding this lock cannot leave the maps inconsistent (every update
        // is a single insert), so a poisoned lock is still safe to use.
        self.mem.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Counters for Embedded {
    fn name(&self) -> &'static str {
        "embedded"
    }

    async fn lease(&self, req: &LeaseRequest<'_>) -> Result<Grant, StoreError> {
        let mut mem = self.mem();
        let mem = &mut *mem;
        let total = mem.granted.entry(req.key.clone()).or_insert(0);
        let holders = mem.holders.entry(req.key.clone()).or_default();
        Ok(apply_lease(total, holders, req))
    }

    async fn add(&self, key: &CounterKey, units: u64, _expire_at_ms: i64) -> Result<u64, StoreError> {
        let mut mem = self.mem();
        let total = mem.granted.entry(key.clone()).or_insert(0);
        *total += units;
        Ok(*total)
    }

    async fn committed(&self, key: &CounterKey) -> Result<u64, StoreError> {
        let mem = self.mem();
        let total = mem.granted.get(key).copied().unwrap_or(0);
        let held: u64 = mem.holders.get(key).map(|h| h.values().map(|r| r.held).sum()).unwrap_or(0);
        Ok(total.saturating_sub(held))
    }

    async fn get(&self, key: &CounterKey) -> Result<u64, StoreError> {
        Ok(self.mem().granted.get(key).copied().unwrap_or(0))
    }

    async fn window_add(
        &self,
        tenant: &str,
        name: &str,
        window_ms: u64,
        now_ms: i64,
        n: i64,
    ) -> Result<(u64, u64), StoreError> {
        let w = window_ms.max(1) as i64;
        let idx = now_ms.div_euclid(w);
        let id = format!("{tenant}\u{0}{name}");
        let mut mem = self.mem();
        // Only this counter's old windows are dropped: others may use other window sizes.
        mem.windows.retain(|(k, i), _| *k != id || *i >= idx - 1);
        if mem.windows.len() > 1_000_000 {
            mem.windows.clear();
        }
        let cur = {
            let c = mem.windows.entry((id.clone(), idx)).or_insert(0);
            *c = c.saturating_add_signed(n);
            *c
        };
        let prev = mem.windows.get(&(id, idx - 1)).copied().unwrap_or(0);
        Ok((cur, prev))
    }

    async fn slot_acquire(
        &self,
        tenant: &str,
        slot: &str,
        limit: u32,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<bool, StoreError> {
        let mut mem = self.mem();
        let slots = mem.slots.entry(tenant.to_string()).or_default();
        slots.retain(|_, exp| *exp > now_ms);
        if slots.contains_key(slot) || slots.len() < limit as usize {
            slots.insert(slot.to_string(), now_ms + ttl_ms);
            Ok(true)
        } else {
            Ok(false)
        }
    }

    async fn slot_release(&self, tenant: &str, slot: &str) -> Result<(), StoreError> {
        if let Some(slots) = self.mem().slots.get_mut(tenant) {
            slots.remove(slot);
        }
        Ok(())
    }

    async fn slot_heartbeat(&self, tenant: &str, slots: &[String], now_ms: i64, ttl_ms: i64) -> Result<(), StoreError> {
        let mut mem = self.mem();
        if let Some(held) = mem.slots.get_mut(tenant) {
            for s in slots {
                if let Some(exp) = held.get_mut(s) {
                    *exp = now_ms + ttl_ms;
                }
            }
        }
        Ok(())
    }

    async fn persist_usage(&self, rows: &[(CounterKey, u64)]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let db = self.db.clone();
        let rows = rows.to_vec();
        let now = chrono::Utc::now().timestamp_millis();
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let mut conn = db.lock().unwrap_or_else(|p| p.into_inner());
            let tx = conn.transaction().map_err(backend)?;
            {
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT INTO quota_usage (tenant, metric, period_start, used, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT (tenant, metric, period_start) DO UPDATE SET used = excluded.used, updated_ms = excluded.updated_ms",
                    )
                    .map_err(backend)?;
                for (k, used) in &rows {
                    stmt.execute(params![&*k.tenant, &*k.metric, k.period_start, *used as i64, now]).map_err(backend)?;
                }
            }
            tx.commit().map_err(backend)
        })
        .await
        .map_err(backend)?
    }

    fn persisted_usage(&self, key: &CounterKey) -> u64 {
        self.mem().persisted.get(key).copied().unwrap_or(0)
    }
}

/// How long a writer's ledger mark outlives its last write (as on Redis).
const LEDGER_MARK_MS: i64 = 30 * 86_400_000;

/// The ledger's high-water marks: (writer, tenant) → highest batch `seq` applied. They replace
/// the per-batch `ledger_batches` table of earlier releases, which is dropped here (after the
/// shared schema above has created it; that line goes once nothing else edits it).
fn ledger_schema(conn: &Connection) -> Result<(), StoreError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS ledger_marks (
             writer TEXT NOT NULL,
             tenant TEXT NOT NULL,
             seq INTEGER NOT NULL,
             updated_ms INTEGER NOT NULL,
             PRIMARY KEY (writer, tenant)
         );
         CREATE INDEX IF NOT EXISTS ledger_marks_updated ON ledger_marks (updated_ms);
         DROP TABLE IF EXISTS ledger_batches;",
    )
    .map_err(backend)
}

/// The usage ledger is the `usage` table. A write adds its batches' rows and raises each
/// writer's high-water mark per tenant (`ledger_marks`) in one transaction, so a retried batch
/// is skipped and a failed write leaves nothing behind.
#[async_trait]
impl Ledger for Embedded {
    async fn apply(&self, batches: &[LedgerBatch]) -> Vec<Result<(), StoreError>> {
        let db = self.db.clone();
        let batches = batches.to_vec();
        let n = batches.len();
        let now = chrono::Utc::now().timestamp_millis();
        let r = tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let mut conn = db.lock().unwrap_or_else(|p| p.into_inner());
            // One transaction: every batch's rows and marks land together or not at all, so
            // a failure fails every batch and order within a tenant is kept.
            let tx = conn.transaction().map_err(backend)?;
            // Marks only guard retries, which happen within minutes: forget those of writers
            // gone for a month.
            tx.execute("DELETE FROM ledger_marks WHERE updated_ms < ?1", params![now - LEDGER_MARK_MS])
                .map_err(backend)?;
            {
                let mut mark = tx
                    .prepare_cached("SELECT seq FROM ledger_marks WHERE writer = ?1 AND tenant = ?2")
                    .map_err(backend)?;
                let mut set = tx
                    .prepare_cached(
                        "INSERT INTO ledger_marks (writer, tenant, seq, updated_ms) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (writer, tenant) DO UPDATE SET seq = excluded.seq, updated_ms = excluded.updated_ms",
                    )
                    .map_err(backend)?;
                let mut add = tx
                    .prepare_cached(
                        "INSERT INTO usage (tenant, metric, day, value, cost_micros) VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT (tenant, day, metric) DO UPDATE SET
                             value = value + excluded.value, cost_micros = cost_micros + excluded.cost_micros",
                    )
                    .map_err(backend)?;
                for b in &batches {
                    let seq = i64::try_from(b.seq).unwrap_or(i64::MAX);
                    let applied: Option<i64> = mark
                        .query_row(params![&*b.writer, &*b.tenant], |r| r.get(0))
                        .map(Some)
                        .or_else(|e| if e == rusqlite::Error::QueryReturnedNoRows { Ok(None) } else { Err(e) })
                        .map_err(backend)?;
                    if applied.is_some_and(|m| m >= seq) {
                        continue;
                    }
                    for r in &b.rows {
                        add.execute(params![&*b.tenant, &*r.metric, r.day, r.value as i64, r.cost_micros as i64])
                            .map_err(backend)?;
                    }
                    set.execute(params![&*b.writer, &*b.tenant, seq, now]).map_err(backend)?;
                }
            }
            tx.commit().map_err(backend)
        })
        .await
        .map_err(backend)
        .and_then(|r| r);
        vec![r; n]
    }

    async fn rows(&self, tenant: &str, from: &str, to: &str) -> Result<Vec<LedgerRow>, StoreError> {
        let db = self.db.clone();
        let (tenant, from, to) = (tenant.to_string(), from.to_string(), to.to_string());
        tokio::task::spawn_blocking(move || -> Result<Vec<LedgerRow>, StoreError> {
            let conn = db.lock().unwrap_or_else(|p| p.into_inner());
            let mut stmt = conn
                .prepare_cached(
                    "SELECT metric, day, value, cost_micros FROM usage
                     WHERE tenant = ?1 AND day >= ?2 AND day <= ?3 ORDER BY day, metric",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![tenant, from, to], |r| {
                    Ok(LedgerRow {
                        tenant: tenant.as_str().into(),
                        metric: r.get::<_, String>(0)?.into(),
                        day: r.get(1)?,
                        value: r.get::<_, i64>(2)?.max(0) as u64,
                        cost_micros: r.get::<_, i64>(3)?.max(0) as u64,
                    })
                })
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
        .map_err(backend)?
    }
}

impl Embedded {
    /// Runs `f` on the connection on a blocking thread.
    async fn with_db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = db.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut conn)
        })
        .await
        .map_err(backend)?
    }

    /// Runs one directory write in an immediate transaction: `write` changes the records and
    /// answers the change to record, or `None` to write nothing. The version bump and the
    /// feed entry commit with the records, or nothing does.
    async fn dir_write(
        &self,
        write: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<Option<Change>, StoreError> + Send + 'static,
    ) -> Result<Option<u64>, StoreError> {
        self.with_db(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend)?;
            let Some(change) = write(&tx)? else {
                // Nothing written: the transaction rolls back as it drops.
                return Ok(None);
            };
            let version = append_change(&tx, change)?;
            tx.commit().map_err(backend)?;
            Ok(Some(version))
        })
        .await
    }
}

/// The directory's tables. `dir_changes` is the change feed (the JSON of a [`Versioned`] per
/// version, the last [`FEED_RETAINED`] of them); `dir_keys_tenant` makes a tenant's keys an
/// index lookup. Every statement is `IF NOT EXISTS`, so a file written by an earlier release
/// (records and a version, no feed) opens as it is: its feed starts empty, and instances that
/// follow it load once.
fn directory_schema(conn: &Connection) -> Result<(), StoreError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS dir_tenants (id TEXT PRIMARY KEY, record TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS dir_keys (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, record TEXT NOT NULL);
         CREATE INDEX IF NOT EXISTS dir_keys_tenant ON dir_keys (tenant);
         CREATE TABLE IF NOT EXISTS dir_meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
         INSERT OR IGNORE INTO dir_meta (k, v) VALUES ('version', 0);
         CREATE TABLE IF NOT EXISTS dir_changes (version INTEGER PRIMARY KEY, change TEXT NOT NULL);",
    )
    .map_err(backend)
}

fn read_version(conn: &Connection) -> Result<u64, StoreError> {
    conn.query_row("SELECT v FROM dir_meta WHERE k = 'version'", [], |r| r.get::<_, i64>(0))
        .map(|v| v.max(0) as u64)
        .map_err(backend)
}

/// Bumps the version, records `change` under it and trims the feed to its last
/// [`FEED_RETAINED`] entries (an index range on the primary key: usually one row). Answers
/// the new version.
fn append_change(tx: &rusqlite::Transaction<'_>, change: Change) -> Result<u64, StoreError> {
    let version: i64 = tx
        .query_row("UPDATE dir_meta SET v = v + 1 WHERE k = 'version' RETURNING v", [], |r| r.get(0))
        .map_err(backend)?;
    let version = version.max(0) as u64;
    let json = serde_json::to_string(&Versioned { version, change }).map_err(backend)?;
    tx.prepare_cached("INSERT OR REPLACE INTO dir_changes (version, change) VALUES (?1, ?2)")
        .and_then(|mut st| st.execute(params![version as i64, json]))
        .map_err(backend)?;
    if version > FEED_RETAINED {
        tx.prepare_cached("DELETE FROM dir_changes WHERE version <= ?1")
            .and_then(|mut st| st.execute(params![(version - FEED_RETAINED) as i64]))
            .map_err(backend)?;
    }
    Ok(version)
}

/// Ids per `IN (…)` query: well under SQLite's limit on bound variables (32,766 since 3.32,
/// 999 before).
const IN_CHUNK: usize = 500;

fn decode<T: serde::de::DeserializeOwned>(json: &str, what: &str) -> Option<T> {
    match serde_json::from_str::<T>(json) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::error!(error = %e, "skipping an unreadable {what} record");
            None
        }
    }
}

#[async_trait]
impl DirectoryStore for Embedded {
    async fn version(&self) -> Result<u64, StoreError> {
        self.with_db(|c| read_version(c)).await
    }

    async fn page(&self, kind: RecordKind, cursor: Option<&str>, limit: usize) -> Result<Page, StoreError> {
        let cursor = cursor.map(str::to_string);
        let limit = limit.clamp(1, i64::MAX as usize);
        self.with_db(move |c| {
            let table = match kind {
                RecordKind::Tenant => "dir_tenants",
                RecordKind::Key => "dir_keys",
            };
            let mut st;
            let mut rows = match &cursor {
                Some(after) => {
                    st = c
                        .prepare_cached(&format!("SELECT id, record FROM {table} WHERE id > ?1 ORDER BY id LIMIT ?2"))
                        .map_err(backend)?;
                    st.query(params![after, limit as i64])
                }
                None => {
                    st = c
                        .prepare_cached(&format!("SELECT id, record FROM {table} ORDER BY id LIMIT ?1"))
                        .map_err(backend)?;
                    st.query(params![limit as i64])
                }
            }
            .map_err(backend)?;
            let mut page = Page::default();
            let (mut n, mut last) = (0usize, None::<String>);
            while let Some(row) = rows.next().map_err(backend)? {
                let (id, json): (String, String) = (row.get(0).map_err(backend)?, row.get(1).map_err(backend)?);
                n += 1;
                match kind {
                    RecordKind::Tenant => page.tenants.extend(decode::<TenantRecord>(&json, "tenant")),
                    RecordKind::Key => page.keys.extend(decode::<KeyRecord>(&json, "key")),
                }
                last = Some(id);
            }
            // A full page may have a successor; a short one is the last. (An unreadable record
            // still counts and moves the cursor: it is skipped, not retried.)
            page.next = if n == limit { last } else { None };
            Ok(page)
        })
        .await
    }

    async fn changes_since(&self, since: u64) -> Result<Feed, StoreError> {
        self.with_db(move |c| {
            // One read transaction: the version and the feed are of the same moment.
            let tx = c.transaction().map_err(backend)?;
            let current = read_version(&tx)?;
            if since == current {
                return Ok(Feed::Changes(Vec::new()));
            }
            // Ahead of the store (it was replaced or reset), or further behind than the feed
            // reaches.
            if since > current || current - since > FEED_RETAINED {
                return Ok(Feed::Behind);
            }
            let mut st = tx
                .prepare_cached("SELECT version, change FROM dir_changes WHERE version > ?1 ORDER BY version LIMIT ?2")
                .map_err(backend)?;
            let rows = st
                .query_map(params![since as i64, (current - since) as i64], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
                })
                .map_err(backend)?;
            let mut changes = Vec::with_capacity((current - since) as usize);
            for row in rows {
                let (version, json) = row.map_err(backend)?;
                // The feed must hold every version from `since + 1` on: a gap (trimmed, or a
                // file written before the feed existed) means a full load.
                if version.max(0) as u64 != since + 1 + changes.len() as u64 {
                    return Ok(Feed::Behind);
                }
                match serde_json::from_str::<Versioned>(&json) {
                    Ok(v) => changes.push(v),
                    Err(e) => {
                        tracing::error!(error = %e, version, "unreadable change in the directory feed; loading again");
                        return Ok(Feed::Behind);
                    }
                }
            }
            if changes.len() as u64 != current - since {
                return Ok(Feed::Behind);
            }
            Ok(Feed::Changes(changes))
        })
        .await
    }

    async fn change_at(&self, version: u64) -> Result<Option<Versioned>, StoreError> {
        self.with_db(move |c| {
            let json: Option<String> = c
                .prepare_cached("SELECT change FROM dir_changes WHERE version = ?1")
                .and_then(|mut st| st.query_row(params![version as i64], |r| r.get(0)).optional())
                .map_err(backend)?;
            Ok(json.and_then(|j| serde_json::from_str::<Versioned>(&j).ok()))
        })
        .await
    }

    async fn get_tenant(&self, id: &str) -> Result<Option<TenantRecord>, StoreError> {
        let id = id.to_string();
        self.with_db(move |c| {
            let json: Option<String> = c
                .prepare_cached("SELECT record FROM dir_tenants WHERE id = ?1")
                .and_then(|mut st| st.query_row(params![id], |r| r.get(0)).optional())
                .map_err(backend)?;
            Ok(json.and_then(|j| decode::<TenantRecord>(&j, "tenant")))
        })
        .await
    }

    async fn get_keys(&self, ids: &[&str]) -> Result<Vec<KeyRecord>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        self.with_db(move |c| {
            let mut out = Vec::new();
            for chunk in ids.chunks(IN_CHUNK) {
                let marks = vec!["?"; chunk.len()].join(", ");
                let mut st =
                    c.prepare_cached(&format!("SELECT record FROM dir_keys WHERE id IN ({marks})")).map_err(backend)?;
                let rows = st.query_map(params_from_iter(chunk), |r| r.get::<_, String>(0)).map_err(backend)?;
                for row in rows {
                    out.extend(decode::<KeyRecord>(&row.map_err(backend)?, "key"));
                }
            }
            Ok(out)
        })
        .await
    }

    async fn put_tenant(&self, t: &TenantRecord, create: bool) -> Result<Option<u64>, StoreError> {
        let json = serde_json::to_string(t).map_err(backend)?;
        let record = t.clone();
        self.dir_write(move |tx| {
            let n = if create {
                tx.execute("INSERT OR IGNORE INTO dir_tenants (id, record) VALUES (?1, ?2)", params![record.id, json])
            } else {
                tx.execute(
                    "INSERT INTO dir_tenants (id, record) VALUES (?1, ?2) ON CONFLICT (id) DO UPDATE SET record = excluded.record",
                    params![record.id, json],
                )
            }
            .map_err(backend)?;
            Ok((n > 0).then_some(Change::Tenant { record }))
        })
        .await
    }

    async fn delete_tenant(&self, id: &str) -> Result<Option<u64>, StoreError> {
        let id = id.to_string();
        self.dir_write(move |tx| {
            let n = tx.execute("DELETE FROM dir_tenants WHERE id = ?1", params![id]).map_err(backend)?;
            if n == 0 {
                return Ok(None);
            }
            // By the `dir_keys_tenant` index: as many rows as the tenant has keys.
            tx.execute("DELETE FROM dir_keys WHERE tenant = ?1", params![id]).map_err(backend)?;
            Ok(Some(Change::TenantDeleted { id }))
        })
        .await
    }

    async fn put_key(&self, k: &KeyRecord) -> Result<Option<u64>, StoreError> {
        let json = serde_json::to_string(k).map_err(backend)?;
        let record = k.clone();
        self.dir_write(move |tx| {
            // Only under a tenant that exists, in the same transaction.
            let exists = tx
                .prepare_cached("SELECT 1 FROM dir_tenants WHERE id = ?1")
                .and_then(|mut st| st.exists(params![record.tenant]))
                .map_err(backend)?;
            if !exists {
                return Ok(None);
            }
            tx.prepare_cached(
                "INSERT INTO dir_keys (id, tenant, record) VALUES (?1, ?2, ?3)
                     ON CONFLICT (id) DO UPDATE SET tenant = excluded.tenant, record = excluded.record",
            )
            .and_then(|mut st| st.execute(params![record.id, record.tenant, json]))
            .map_err(backend)?;
            Ok(Some(Change::Key { record }))
        })
        .await
    }
}
