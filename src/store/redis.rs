//! The Redis store: shared counters for a fleet, on Redis or Redis Cluster.
//!
//! Keys (the `{tenant}` hash tag keeps each tenant's keys in one cluster slot, so one
//! pipeline, transaction or script covers them on a cluster as on one Redis):
//!
//! - `tg:{acme}:q:<metric>:<period_start>`: units of a quota granted to all instances
//! - `tg:{acme}:w:<name>:<window>`: sliding-window request counts (`mode = "global"`)
//! - `tg:{acme}:slots`: a sorted set of concurrency slot leases, scored by expiry
//! - `tg:{acme}:usage:<YYYY-MM-DD>`: the usage ledger, a hash of `metric` and `metric|cost`
//! - `tg:{acme}:lhwm`: the ledger's high-water marks, a hash of writer → highest batch `seq`
//!   applied for this tenant; it expires 30 days after the tenant's last ledger write, so
//!   the ledger keeps one mark per writer and tenant however many batches it applies.
//!   (Releases before it kept one `tg:{…}:lb:<batch>` key per batch for 7 days; those expire
//!   by themselves.)
//! - `tg:{dir}:tenants`, `tg:{dir}:keys`: runtime-managed tenants and keys (JSON per field),
//!   and `tg:{dir}:version`, bumped by every write (one slot, so writes are transactions)
//!
//! Counters need no server-side scripts. A lease is `INCRBY`, and when that passes the limit,
//! a `DECRBY` of the excess; so the sum of grants never exceeds the limit, whatever the
//! interleaving of instances. The ledger uses one small Lua script per tenant and flush
//! ([`Ledger::apply`]): it applies a batch only above the writer's mark and raises the mark
//! in the same atomic step, so a retried batch counts once. On one Redis every tenant's
//! script goes in one pipeline (one round trip per flush); on a cluster each tenant's is its
//! own call, all at once, so a stalled master holds up only the tenants it serves.
//!
//! Every call runs under the [`Breaker`]; the connection reconnects by itself when Redis
//! comes back. A cluster is discovered in the background from its seed URLs
//! ([`RedisStore::connect_cluster`]); tools that call once and exit wait for it with
//! [`RedisStore::wait_connected`].

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
    Cluster(Arc<ClusterSlot>),
}

/// The cluster connection, once discovered, and why discovery last failed.
#[derive(Default)]
struct ClusterSlot {
    conn: ArcSwapOption<ClusterConnection>,
    last_error: std::sync::Mutex<Option<String>>,
}

/// The Redis-backed store.
pub struct RedisStore {
    conn: Conn,
    /// The configured URLs (seeds, on a cluster), for messages.
    urls: Vec<String>,
    breaker: Breaker,
    observer: Arc<dyn StoreObserver>,
    /// A single-Redis connection got a MOVED or ASK answer: it is a cluster node (logged once).
    moved_seen: std::sync::atomic::AtomicBool,
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
    /// policy) even while Redis is down. One URL means a single Redis; several mean a cluster
    /// (see [`RedisStore::connect_cluster`] for a cluster named by one seed). Must be called
    /// inside a Tokio runtime.
    pub fn connect(
        urls: &[String],
        breaker: Breaker,
        observer: Arc<dyn StoreObserver>,
        timeout: Duration,
    ) -> Result<RedisStore, StoreError> {
        if urls.len() != 1 {
            return Self::connect_cluster(urls, breaker, observer, timeout);
        }
        let client = redis::Client::open(urls[0].as_str()).map_err(backend)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout.max(Duration::from_millis(100))))
            // Longer than the breaker's timeout, so a hung call is reported as a timeout.
            // No connection-level response timeout: every call has its own (the hot-path
            // timeout, or a longer one for bulk work), enforced by the breaker.
            .set_response_timeout(None)
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = Conn::Single(ConnectionManager::new_lazy_with_config(client, config).map_err(backend)?);
        Ok(RedisStore::with(conn, urls, breaker, observer))
    }

    /// A Redis Cluster, discovered from `seeds` (one node is enough; more help when that one
    /// is down at startup). Discovery runs in the background and is retried every second, so
    /// the gateway starts while the cluster is unreachable; until it answers, calls fail like
    /// calls to a dead Redis. Must be called inside a Tokio runtime.
    pub fn connect_cluster(
        seeds: &[String],
        breaker: Breaker,
        observer: Arc<dyn StoreObserver>,
        timeout: Duration,
    ) -> Result<RedisStore, StoreError> {
        let client = ClusterClient::builder(seeds.to_vec())
            .connection_timeout(timeout.max(Duration::from_millis(500)))
            .build()
            .map_err(backend)?;
        let slot = Arc::new(ClusterSlot::default());
        let fill = slot.clone();
        tokio::spawn(async move {
            loop {
                match client.get_async_connection().await {
                    Ok(c) => {
                        fill.conn.store(Some(Arc::new(c)));
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "Redis Cluster not reachable yet; retrying");
                        *fill.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Ok(RedisStore::with(Conn::Cluster(slot), seeds, breaker, observer))
    }

    fn with(conn: Conn, urls: &[String], breaker: Breaker, observer: Arc<dyn StoreObserver>) -> RedisStore {
        RedisStore { conn, urls: urls.to_vec(), breaker, observer, moved_seen: Default::default() }
    }

    /// Waits until the store can take calls, or until `deadline`. A single Redis connects on
    /// its first call, so this returns at once; a cluster is discovered in the background, and
    /// a tool that calls right after [`RedisStore::connect_cluster`] would otherwise fail
    /// before discovery had a chance. The error says which seeds were tried and why they
    /// failed.
    pub async fn wait_connected(&self, deadline: tokio::time::Instant) -> Result<(), String> {
        let Conn::Cluster(slot) = &self.conn else { return Ok(()) };
        loop {
            if slot.conn.load().is_some() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let why = slot.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let why = why.map(|e| format!(" (last error: {e})")).unwrap_or_default();
                return Err(format!(
                    "Redis Cluster did not answer through the seed(s) {}{why}. Check that at least one seed \
                     is reachable from here, that it is a cluster node (`redis-cli -h HOST -p PORT cluster info` \
                     shows cluster_state:ok), and that [store] url names the cluster's nodes",
                    self.urls.join(", ")
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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
                    pipe.query_async::<T>(&mut c).await.map_err(|e| self.single_error(e))
                }
                Conn::Cluster(slot) => {
                    let Some(c) = slot.conn.load_full() else {
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

    /// A MOVED or ASK answer means `url` names a Redis Cluster node: say how to configure it.
    fn single_error(&self, e: redis::RedisError) -> StoreError {
        let redirected =
            matches!(e.kind(), redis::ErrorKind::Server(redis::ServerErrorKind::Moved | redis::ServerErrorKind::Ask));
        if redirected && !self.moved_seen.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::error!(
                url = %self.urls.join(","),
                "the Redis at [store] url is a Redis Cluster node (it answered MOVED); set `cluster = true` in \
                 [store] so that the cluster is discovered from it"
            );
        }
        backend(e)
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

/// How long a writer's ledger high-water mark outlives its last write: far longer than any
/// retry, so only marks of writers that are gone for good expire.
const LEDGER_MARK_MS: i64 = 30 * 86_400_000;

/// Time one tenant's ledger write may take on a cluster. Short, so that a stalled master
/// delays the next flush (and the other tenants in it) by this much at most; the tenant's
/// batches stay buffered and are replayed.
const CLUSTER_LEDGER_TIMEOUT: Duration = Duration::from_secs(1);

fn usage_key(tenant: &str, day: &str) -> String {
    format!("{}:usage:{day}", tenant_prefix(tenant))
}

/// The hash of a tenant's ledger high-water marks: field = writer, value = highest applied seq.
pub fn ledger_mark_key(tenant: &str) -> String {
    format!("{}:lhwm", tenant_prefix(tenant))
}

/// Applies a writer's batches of one tenant in order, each only when its seq is above the
/// writer's mark, and raises the mark, in one atomic step. Every key is the tenant's (one
/// slot), and every key is passed in KEYS, so it runs on Redis Cluster as on one Redis.
///
/// KEYS[1]: the mark hash; KEYS[2..]: the tenant's usage hashes (one per day).
/// ARGV: writer, mark lifetime (ms), batch count, then per batch: seq, field count, and per
/// field: index into KEYS, field, increment. Returns how many batches were applied.
const LEDGER_SCRIPT: &str = r"
local mark = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local top = false
local applied = 0
local i = 4
for _ = 1, tonumber(ARGV[3]) do
  local seq, n = ARGV[i], tonumber(ARGV[i + 1])
  i = i + 2
  if tonumber(seq) > mark then
    for j = i, i + 3 * (n - 1), 3 do
      redis.call('HINCRBY', KEYS[tonumber(ARGV[j])], ARGV[j + 1], ARGV[j + 2])
    end
    mark = tonumber(seq)
    top = seq
    applied = applied + 1
  end
  i = i + 3 * n
end
if top then
  redis.call('HSET', KEYS[1], ARGV[1], top)
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return applied
";

/// One writer's batches of one tenant, as the arguments of [`LEDGER_SCRIPT`].
struct TenantCall {
    keys: Vec<String>,
    args: Vec<String>,
    /// Indexes of the batches it carries, in the caller's slice.
    batches: Vec<usize>,
    rows: usize,
}

impl TenantCall {
    fn new(batches: &[LedgerBatch], indexes: Vec<usize>) -> TenantCall {
        let first = &batches[indexes[0]];
        let mut keys = vec![ledger_mark_key(&first.tenant)];
        let mut args = vec![first.writer.to_string(), LEDGER_MARK_MS.to_string(), indexes.len().to_string()];
        let mut rows = 0;
        for &i in &indexes {
            let b = &batches[i];
            let mut fields = Vec::new();
            for r in &b.rows {
                let key = usage_key(&b.tenant, &r.day);
                let k = match keys.iter().position(|x| *x == key) {
                    Some(k) => k + 1,
                    None => {
                        keys.push(key);
                        keys.len()
                    }
                };
                fields.push((k, r.metric.to_string(), r.value));
                if r.cost_micros > 0 {
                    fields.push((k, format!("{}|cost", r.metric), r.cost_micros));
                }
            }
            rows += b.rows.len();
            args.push(b.seq.to_string());
            args.push(fields.len().to_string());
            for (k, field, n) in fields {
                args.push(k.to_string());
                args.push(field);
                args.push(n.to_string());
            }
        }
        TenantCall { keys, args, batches: indexes, rows }
    }

    /// `EVALSHA` (`eval = false`) or `EVAL` of the script with these arguments.
    fn cmd(&self, eval: bool) -> redis::Cmd {
        let mut c = redis::cmd(if eval { "EVAL" } else { "EVALSHA" });
        if eval {
            c.arg(LEDGER_SCRIPT);
        } else {
            c.arg(ledger_script_sha());
        }
        c.arg(self.keys.len()).arg(&self.keys).arg(&self.args);
        c
    }
}

fn ledger_script_sha() -> &'static str {
    static SHA: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SHA.get_or_init(|| redis::Script::new(LEDGER_SCRIPT).get_hash().to_string())
}

/// Groups batches into one script call per (tenant, writer), each keeping the batches' order.
fn tenant_calls(batches: &[LedgerBatch]) -> Vec<TenantCall> {
    let mut groups: Vec<((&str, &str), Vec<usize>)> = Vec::new();
    let mut index: std::collections::HashMap<(&str, &str), usize> = std::collections::HashMap::new();
    for (i, b) in batches.iter().enumerate() {
        let k = (&*b.tenant, &*b.writer);
        match index.get(&k) {
            Some(&g) => groups[g].1.push(i),
            None => {
                index.insert(k, groups.len());
                groups.push((k, vec![i]));
            }
        }
    }
    groups.into_iter().map(|(_, idx)| TenantCall::new(batches, idx)).collect()
}

fn is_noscript(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

impl RedisStore {
    /// Runs `calls` as one pipeline of `EVALSHA`s, within `timeout`, and answers one result
    /// per call. Calls the server does not know the script for (a restart, a failover, a new
    /// node) are sent again as `EVAL` with the script itself, which caches it there.
    async fn run_scripts(&self, calls: &[&TenantCall], timeout: Duration) -> Vec<Result<(), StoreError>> {
        let pipe_of = |eval: bool, which: &[usize]| {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for &c in which {
                pipe.add_command(calls[c].cmd(eval));
            }
            pipe
        };
        let all: Vec<usize> = (0..calls.len()).collect();
        let mut out: Vec<Result<(), StoreError>> = vec![Ok(()); calls.len()];
        let answers: Vec<redis::RedisResult<i64>> =
            match self.run_within("ledger_apply", &pipe_of(false, &all), Some(timeout)).await {
                Ok(a) => a,
                Err(e) => return vec![Err(e); calls.len()],
            };
        let mut unknown = Vec::new();
        for (c, a) in all.iter().zip(answers) {
            match a {
                Ok(_) => {}
                Err(e) if is_noscript(&e) => unknown.push(*c),
                Err(e) => out[*c] = Err(backend(e)),
            }
        }
        if unknown.is_empty() {
            return out;
        }
        match self
            .run_within::<Vec<redis::RedisResult<i64>>>("ledger_apply", &pipe_of(true, &unknown), Some(timeout))
            .await
        {
            Ok(answers) => {
                for (c, a) in unknown.iter().zip(answers) {
                    if let Err(e) = a {
                        out[*c] = Err(backend(e));
                    }
                }
            }
            Err(e) => {
                for c in unknown {
                    out[c] = Err(e.clone());
                }
            }
        }
        out
    }

    /// Redis Cluster: one call per tenant (tenants live on different masters), all at once,
    /// each with its own short timeout, so a stalled master holds up only its own tenants.
    async fn apply_cluster(&self, calls: &[TenantCall]) -> Vec<Result<(), StoreError>> {
        futures_util::future::join_all(calls.iter().map(|c| async move {
            // Grows with the size of a replay after an outage.
            let timeout = (CLUSTER_LEDGER_TIMEOUT + Duration::from_millis(c.rows as u64 / 100)).min(BULK_TIMEOUT);
            let mut r = self.run_scripts(&[c], timeout).await;
            r.pop().unwrap_or_else(|| Err(StoreError::Backend("no answer".into())))
        }))
        .await
    }
}

#[async_trait]
impl Ledger for RedisStore {
    async fn apply(&self, batches: &[LedgerBatch]) -> Vec<Result<(), StoreError>> {
        let calls = tenant_calls(batches);
        let answers = if self.is_cluster() {
            self.apply_cluster(&calls).await
        } else {
            // One Redis: every tenant's call in one pipeline, one round trip per flush.
            self.run_scripts(&calls.iter().collect::<Vec<_>>(), BULK_TIMEOUT).await
        };
        let mut out: Vec<Result<(), StoreError>> = vec![Ok(()); batches.len()];
        for (call, answer) in calls.iter().zip(answers) {
            if let Err(e) = answer {
                for &b in &call.batches {
                    out[b] = Err(e.clone());
                }
            }
        }
        out
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
