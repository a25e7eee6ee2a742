//! The Redis store: shared counters for a fleet, on Redis or Redis Cluster.
//!
//! Keys (the `{tenant}` hash tag keeps each tenant's keys in one cluster slot):
//!
//! - `tg:{acme}:q:<metric>:<period_start>`: units of a quota granted to all instances
//! - `tg:{acme}:w:<name>:<window>`: sliding-window request counts (`mode = "global"`)
//! - `tg:{acme}:slots`: a sorted set of concurrency slot leases, scored by expiry
//! - `tg:{acme}:usage:<YYYY-MM-DD>`: the usage ledger, a hash of `metric` and `metric|cost`
//! - `tg:{ledger}:lb:<batch>` (one Redis) or `tg:{acme}:lb:<batch>` (per tenant, Redis
//!   Cluster): marks a ledger batch as applied (kept 7 days)
//! - `tg:{dir}:tenants`, `tg:{dir}:keys`: runtime-managed tenants and keys (JSON per field),
//!   and `tg:{dir}:version`, bumped by every write (one slot, so writes are transactions)
//!
//! Nothing needs server-side scripts. A lease is `INCRBY`, and when that passes the limit, a
//! `DECRBY` of the excess; so the sum of grants never exceeds the limit, whatever the
//! interleaving of instances. Every call runs under the [`Breaker`]; the connection
//! reconnects by itself when Redis comes back.

use super::{
    tenant_prefix, Breaker, CounterKey, Counters, DirectoryData, DirectoryStore, Grant, KeyRecord, Ledger, LedgerBatch,
    LedgerRow, StoreError, StoreObserver, TenantRecord,
};
use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{FromRedisValue, Pipeline};
use std::sync::Arc;
use std::time::Duration;

enum Conn {
    Single(ConnectionManager),
    /// Filled by a background task once the cluster answers; empty while it does not.
    Cluster(Arc<ArcSwapOption<ClusterConnection>>),
}

/// The Redis-backed store.
pub struct RedisStore {
    conn: Conn,
    breaker: Breaker,
    observer: Arc<dyn StoreObserver>,
}

/// Timeout of bulk calls: ledger batches of tens of thousands of rows, directory loads.
const BULK_TIMEOUT: Duration = Duration::from_secs(30);

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn quota_key(k: &CounterKey) -> String {
    format!("{}:q:{}:{}", tenant_prefix(&k.tenant), k.metric, k.period_start)
}

impl RedisStore {
    /// Creates the client. It connects lazily, so the gateway starts (and applies its failure
    /// policy) even while Redis is down. One URL means a single Redis; several mean a cluster.
    /// Must be called inside a Tokio runtime.
    pub fn connect(
        urls: &[String],
        breaker: Breaker,
        observer: Arc<dyn StoreObserver>,
        timeout: Duration,
    ) -> Result<RedisStore, StoreError> {
        let conn = if urls.len() == 1 {
            let client = redis::Client::open(urls[0].as_str()).map_err(backend)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout.max(Duration::from_millis(100))))
                // Longer than the breaker's timeout, so a hung call is reported as a timeout.
                // No connection-level response timeout: every call has its own (the hot-path
                // timeout, or a longer one for bulk work), enforced by the breaker.
                .set_response_timeout(None)
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500));
            Conn::Single(ConnectionManager::new_lazy_with_config(client, config).map_err(backend)?)
        } else {
            let client = ClusterClient::new(urls.to_vec()).map_err(backend)?;
            let slot: Arc<ArcSwapOption<ClusterConnection>> = Arc::new(ArcSwapOption::empty());
            let fill = slot.clone();
            tokio::spawn(async move {
                loop {
                    match client.get_async_connection().await {
                        Ok(c) => {
                            fill.store(Some(Arc::new(c)));
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "Redis Cluster not reachable yet; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
            });
            Conn::Cluster(slot)
        };
        Ok(RedisStore { conn, breaker, observer })
    }

    /// Runs one pipeline (one round trip) under the breaker.
    async fn run<T: FromRedisValue>(&self, op: &'static str, pipe: &Pipeline) -> Result<T, StoreError> {
        self.run_within(op, pipe, None).await
    }

    /// Runs one pipeline with `timeout` instead of the hot-path timeout (bulk background work).
    async fn run_bulk<T: FromRedisValue>(&self, op: &'static str, pipe: &Pipeline) -> Result<T, StoreError> {
        self.run_within(op, pipe, Some(BULK_TIMEOUT)).await
    }

    async fn run_within<T: FromRedisValue>(
        &self,
        op: &'static str,
        pipe: &Pipeline,
        timeout: Option<Duration>,
    ) -> Result<T, StoreError> {
        let fut = async {
            // Counted only when Redis is really called (not when the breaker refuses).
            self.observer.round_trip("redis", op);
            match &self.conn {
                Conn::Single(m) => {
                    let mut c = m.clone();
                    pipe.query_async::<T>(&mut c).await.map_err(backend)
                }
                Conn::Cluster(slot) => {
                    let Some(c) = slot.load_full() else {
                        return Err(StoreError::Backend("Redis Cluster is not connected".into()));
                    };
                    let mut c = (*c).clone();
                    pipe.query_async::<T>(&mut c).await.map_err(backend)
                }
            }
        };
        let r = match timeout {
            Some(t) => self.breaker.call_within(t, fut).await,
            None => self.breaker.call(fut).await,
        };
        if r.is_err() {
            self.observer.error("redis", op);
        }
        r
    }

    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    fn is_cluster(&self) -> bool {
        matches!(self.conn, Conn::Cluster(_))
    }
}

fn expire(pipe: &mut Pipeline, key: &str, expire_at_ms: i64) {
    if expire_at_ms != i64::MAX {
        pipe.cmd("PEXPIREAT").arg(key).arg(expire_at_ms).ignore();
    }
}

#[async_trait]
impl Counters for RedisStore {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn lease(&self, key: &CounterKey, want: u64, limit: u64, expire_at_ms: i64) -> Result<Grant, StoreError> {
        let k = quota_key(key);
        let mut pipe = redis::pipe();
        pipe.cmd("INCRBY").arg(&k).arg(want);
        expire(&mut pipe, &k, expire_at_ms);
        let (total,): (i64,) = self.run("lease", &pipe).await?;
        let total = total.max(0) as u64;
        if total <= limit {
            return Ok(Grant { granted: want, total });
        }
        // Over the limit: hand back what does not fit. Every instance does the same for its
        // own increment, so the grants add up to at most the limit.
        let excess = want.min(total - limit);
        let mut back = redis::pipe();
        back.cmd("DECRBY").arg(&k).arg(excess);
        let (after,): (i64,) = self.run("lease_return", &back).await?;
        Ok(Grant { granted: want - excess, total: after.max(0) as u64 })
    }

    async fn give_back(&self, key: &CounterKey, units: u64) -> Result<(), StoreError> {
        if units == 0 {
            return Ok(());
        }
        let k = quota_key(key);
        let mut pipe = redis::pipe();
        pipe.cmd("DECRBY").arg(&k).arg(units);
        let (after,): (i64,) = self.run("give_back", &pipe).await?;
        if after < 0 {
            // More came back than the counter held (it was reset, or a give-back was repeated):
            // floor it at zero so later leases still respect the limit.
            let mut fix = redis::pipe();
            fix.cmd("INCRBY").arg(&k).arg(-after).ignore();
            self.run::<()>("give_back_floor", &fix).await?;
        }
        Ok(())
    }

    async fn add(&self, key: &CounterKey, units: u64, expire_at_ms: i64) -> Result<u64, StoreError> {
        let k = quota_key(key);
        let mut pipe = redis::pipe();
        pipe.cmd("INCRBY").arg(&k).arg(units);
        expire(&mut pipe, &k, expire_at_ms);
        let (total,): (i64,) = self.run("add", &pipe).await?;
        Ok(total.max(0) as u64)
    }

    async fn get(&self, key: &CounterKey) -> Result<u64, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(quota_key(key));
        let (v,): (Option<i64>,) = self.run("get", &pipe).await?;
        Ok(v.unwrap_or(0).max(0) as u64)
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
        let prefix = tenant_prefix(tenant);
        let cur = format!("{prefix}:w:{name}:{idx}");
        let prev = format!("{prefix}:w:{name}:{}", idx - 1);
        let mut pipe = redis::pipe();
        pipe.cmd("INCRBY").arg(&cur).arg(n);
        pipe.cmd("PEXPIRE").arg(&cur).arg(w * 2).ignore();
        pipe.cmd("GET").arg(&prev);
        let (c, p): (i64, Option<i64>) = self.run("window_add", &pipe).await?;
        Ok((c.max(0) as u64, p.unwrap_or(0).max(0) as u64))
    }

    async fn slot_acquire(
        &self,
        tenant: &str,
        slot: &str,
        limit: u32,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<bool, StoreError> {
        let key = format!("{}:slots", tenant_prefix(tenant));
        let mut pipe = redis::pipe();
        pipe.cmd("ZREMRANGEBYSCORE").arg(&key).arg("-inf").arg(now_ms).ignore();
        pipe.cmd("ZSCORE").arg(&key).arg(slot);
        pipe.cmd("ZADD").arg(&key).arg(now_ms + ttl_ms).arg(slot).ignore();
        pipe.cmd("PEXPIRE").arg(&key).arg(ttl_ms * 4).ignore();
        pipe.cmd("ZCARD").arg(&key);
        let (held_before, count): (Option<f64>, i64) = self.run("slot_acquire", &pipe).await?;
        if count as u64 <= limit as u64 {
            return Ok(true);
        }
        // Over the limit. A slot this caller already held stays held (it was only renewed);
        // only a new one is taken back.
        if held_before.is_some() {
            return Ok(true);
        }
        // Too many: take ours back out. Like leases, add-then-check never over-admits.
        let mut back = redis::pipe();
        back.cmd("ZREM").arg(&key).arg(slot).ignore();
        self.run::<()>("slot_release", &back).await?;
        Ok(false)
    }

    async fn slot_release(&self, tenant: &str, slot: &str) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("ZREM").arg(format!("{}:slots", tenant_prefix(tenant))).arg(slot).ignore();
        self.run::<()>("slot_release", &pipe).await
    }

    async fn slot_heartbeat(&self, tenant: &str, slots: &[String], now_ms: i64, ttl_ms: i64) -> Result<(), StoreError> {
        if slots.is_empty() {
            return Ok(());
        }
        let key = format!("{}:slots", tenant_prefix(tenant));
        let mut pipe = redis::pipe();
        for s in slots {
            pipe.cmd("ZADD").arg(&key).arg("XX").arg(now_ms + ttl_ms).arg(s).ignore();
        }
        pipe.cmd("PEXPIRE").arg(&key).arg(ttl_ms * 4).ignore();
        self.run::<()>("slot_heartbeat", &pipe).await
    }
}

/// How long a ledger batch marker is kept: far longer than any retry.
const BATCH_MARKER_MS: i64 = 7 * 86_400_000;

fn usage_key(tenant: &str, day: &str) -> String {
    format!("{}:usage:{day}", tenant_prefix(tenant))
}

/// Adds one tenant's rows and batch marker to `pipe`. The caller wraps them in MULTI/EXEC, so
/// the marker and the increments apply together or not at all.
fn add_tenant_batch(pipe: &mut Pipeline, tenant: &str, id: &str, rows: &[&LedgerRow]) {
    pipe.cmd("SET").arg(format!("{}:lb:{id}", tenant_prefix(tenant))).arg(1).arg("PX").arg(BATCH_MARKER_MS).ignore();
    add_rows(pipe, tenant, rows);
}

fn add_rows(pipe: &mut Pipeline, tenant: &str, rows: &[&LedgerRow]) {
    for r in rows {
        let key = usage_key(tenant, &r.day);
        pipe.cmd("HINCRBY").arg(&key).arg(&*r.metric).arg(r.value).ignore();
        if r.cost_micros > 0 {
            pipe.cmd("HINCRBY").arg(&key).arg(format!("{}|cost", r.metric)).arg(r.cost_micros).ignore();
        }
    }
}

impl RedisStore {
    /// One node: the whole batch is one transaction in one round trip, with one batch marker
    /// (`tg:{ledger}:lb:<id>`) instead of one per tenant.
    async fn apply_single_node(
        &self,
        batch: &LedgerBatch,
        by_tenant: std::collections::BTreeMap<&str, Vec<&LedgerRow>>,
    ) -> Result<(), StoreError> {
        let marker = format!("tg:{{ledger}}:lb:{}", batch.id);
        if batch.uncertain {
            let mut check = redis::pipe();
            check.cmd("EXISTS").arg(&marker);
            let (applied,): (i64,) = self.run_bulk("ledger_check", &check).await?;
            if applied > 0 {
                return Ok(());
            }
        }
        let mut pipe = redis::pipe();
        pipe.cmd("MULTI").ignore();
        pipe.cmd("SET").arg(&marker).arg(1).arg("PX").arg(BATCH_MARKER_MS).ignore();
        for (t, rows) in &by_tenant {
            add_rows(&mut pipe, t, rows);
        }
        pipe.cmd("EXEC").ignore();
        self.run_bulk::<()>("ledger_apply", &pipe).await
    }
}

#[async_trait]
impl Ledger for RedisStore {
    async fn apply(&self, batch: &LedgerBatch) -> Result<(), StoreError> {
        let mut by_tenant: std::collections::BTreeMap<&str, Vec<&LedgerRow>> = std::collections::BTreeMap::new();
        for r in &batch.rows {
            by_tenant.entry(&r.tenant).or_default().push(r);
        }
        if !self.is_cluster() {
            return self.apply_single_node(batch, by_tenant).await;
        }
        if batch.uncertain {
            // The last attempt may have landed: skip the tenants whose marker exists.
            let mut check = redis::pipe();
            for t in by_tenant.keys() {
                check.cmd("EXISTS").arg(format!("{}:lb:{}", tenant_prefix(t), batch.id));
            }
            let applied: Vec<i64> = if self.is_cluster() {
                let mut out = Vec::new();
                for t in by_tenant.keys() {
                    let mut one = redis::pipe();
                    one.cmd("EXISTS").arg(format!("{}:lb:{}", tenant_prefix(t), batch.id));
                    let (v,): (i64,) = self.run("ledger_check", &one).await?;
                    out.push(v);
                }
                out
            } else {
                self.run_bulk("ledger_check", &check).await?
            };
            let done: Vec<&str> = by_tenant.keys().zip(applied).filter(|(_, a)| *a > 0).map(|(t, _)| *t).collect();
            for t in done {
                by_tenant.remove(t);
            }
        }
        if by_tenant.is_empty() {
            return Ok(());
        }
        if self.is_cluster() {
            // Each tenant's keys share a slot; different tenants may not.
            for (t, rows) in &by_tenant {
                let mut pipe = redis::pipe();
                pipe.cmd("MULTI").ignore();
                add_tenant_batch(&mut pipe, t, &batch.id, rows);
                pipe.cmd("EXEC").ignore();
                self.run_bulk::<()>("ledger_apply", &pipe).await?;
            }
            return Ok(());
        }
        Ok(())
    }

    async fn rows(&self, tenant: &str, from: &str, to: &str) -> Result<Vec<LedgerRow>, StoreError> {
        let parse =
            |d: &str| chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").map_err(|e| StoreError::Backend(e.to_string()));
        let (mut day, last) = (parse(from)?, parse(to)?);
        let mut days = Vec::new();
        while day <= last && days.len() <= 3660 {
            days.push(day.format("%Y-%m-%d").to_string());
            day = day.succ_opt().unwrap_or(last + chrono::Duration::days(1));
        }
        let mut pipe = redis::pipe();
        for d in &days {
            pipe.cmd("HGETALL").arg(usage_key(tenant, d));
        }
        let maps: Vec<std::collections::HashMap<String, i64>> =
            if days.is_empty() { Vec::new() } else { self.run_bulk("ledger_read", &pipe).await? };
        let mut out = Vec::new();
        for (d, map) in days.iter().zip(maps) {
            let mut metrics: Vec<(&String, &i64)> = map.iter().filter(|(k, _)| !k.ends_with("|cost")).collect();
            metrics.sort();
            for (m, v) in metrics {
                let cost = map.get(&format!("{m}|cost")).copied().unwrap_or(0);
                out.push(LedgerRow {
                    tenant: tenant.into(),
                    metric: m.as_str().into(),
                    day: d.clone(),
                    value: (*v).max(0) as u64,
                    cost_micros: cost.max(0) as u64,
                });
            }
        }
        Ok(out)
    }
}

const DIR_TENANTS: &str = "tg:{dir}:tenants";
const DIR_KEYS: &str = "tg:{dir}:keys";
const DIR_VERSION: &str = "tg:{dir}:version";

#[async_trait]
impl DirectoryStore for RedisStore {
    async fn version(&self) -> Result<u64, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(DIR_VERSION);
        let (v,): (Option<i64>,) = self.run("dir_version", &pipe).await?;
        Ok(v.unwrap_or(0).max(0) as u64)
    }

    async fn load(&self) -> Result<DirectoryData, StoreError> {
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("GET").arg(DIR_VERSION).cmd("HGETALL").arg(DIR_TENANTS).cmd("HGETALL").arg(DIR_KEYS);
        let (v, tenants, keys): (
            Option<i64>,
            std::collections::HashMap<String, String>,
            std::collections::HashMap<String, String>,
        ) = self.run_bulk("dir_load", &pipe).await?;
        let mut data = DirectoryData { version: v.unwrap_or(0).max(0) as u64, ..DirectoryData::default() };
        for (_, json) in tenants {
            match serde_json::from_str::<TenantRecord>(&json) {
                Ok(t) => data.tenants.push(t),
                Err(e) => tracing::error!(error = %e, "skipping an unreadable tenant record"),
            }
        }
        for (_, json) in keys {
            match serde_json::from_str::<KeyRecord>(&json) {
                Ok(k) => data.keys.push(k),
                Err(e) => tracing::error!(error = %e, "skipping an unreadable key record"),
            }
        }
        data.tenants.sort_by(|a, b| a.id.cmp(&b.id));
        data.keys.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(data)
    }

    async fn put_tenant(&self, t: &TenantRecord, create: bool) -> Result<bool, StoreError> {
        let json = serde_json::to_string(t).map_err(backend)?;
        if create {
            let mut pipe = redis::pipe();
            pipe.cmd("HSETNX").arg(DIR_TENANTS).arg(&t.id).arg(&json);
            let (fresh,): (i64,) = self.run("dir_put", &pipe).await?;
            if fresh == 0 {
                return Ok(false);
            }
            let mut bump = redis::pipe();
            bump.cmd("INCR").arg(DIR_VERSION).ignore();
            self.run::<()>("dir_put", &bump).await?;
            return Ok(true);
        }
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("HSET").arg(DIR_TENANTS).arg(&t.id).arg(&json).ignore().cmd("INCR").arg(DIR_VERSION).ignore();
        self.run::<()>("dir_put", &pipe).await?;
        Ok(true)
    }

    async fn delete_tenant(&self, id: &str) -> Result<bool, StoreError> {
        let data = self.load().await?;
        let keys: Vec<&str> = data.keys.iter().filter(|k| k.tenant == id).map(|k| k.id.as_str()).collect();
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("HDEL").arg(DIR_TENANTS).arg(id);
        for k in &keys {
            pipe.cmd("HDEL").arg(DIR_KEYS).arg(*k).ignore();
        }
        pipe.cmd("INCR").arg(DIR_VERSION).ignore();
        let (n,): (i64,) = self.run("dir_delete", &pipe).await?;
        Ok(n > 0)
    }

    async fn put_key(&self, k: &KeyRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(k).map_err(backend)?;
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("HSET").arg(DIR_KEYS).arg(&k.id).arg(&json).ignore().cmd("INCR").arg(DIR_VERSION).ignore();
        self.run::<()>("dir_put_key", &pipe).await
    }
}
