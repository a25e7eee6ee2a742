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
//! - `tg:{dir}:tenants`, `tg:{dir}:keys`: runtime-managed tenants and keys (JSON per field);
//!   `tg:{dir}:version`, bumped by every write; `tg:{dir}:changes`, the change feed, a sorted
//!   set of the JSON of each change scored by its version (the last `FEED_RETAINED`); and
//!   `tg:{dir}:tenant-keys:<tenant>`, the set of a tenant's key ids. All in the `{dir}` slot,
//!   so every write is one script: the record, the version and the feed change together.
//!
//! Counters need no server-side scripts. A lease is `INCRBY`, and when that passes the limit,
//! a `DECRBY` of the excess; so the sum of grants never exceeds the limit, whatever the
//! interleaving of instances. The ledger uses one small Lua script per tenant and flush
//! ([`Ledger::apply`]): it applies a batch only above the writer's mark and raises the mark
//! in the same atomic step, so a retried batch counts once. On one Redis every tenant's
//! script goes in one pipeline (one round trip per flush); on a cluster each tenant's is its
//! own call, all at once, so a stalled master holds up only the tenants it serves. Each
//! directory write is one script too (record, version, feed entry and feed trim), and a
//! follower reads the version and the feed after its own version with one more.
//!
//! Every call runs under the [`Breaker`]; the connection reconnects by itself when Redis
//! comes back. A cluster is discovered in the background from its seed URLs
//! ([`RedisStore::connect_cluster`]); tools that call once and exit wait for it with
//! [`RedisStore::wait_connected`].

pub mod jobs;

use super::{
    tenant_prefix, Breaker, Change, CounterKey, Counters, DirectoryStore, Feed, Grant, KeyRecord, LeaseRequest, Ledger,
    LedgerBatch, LedgerRow, Page, RecordKind, StoreError, StoreObserver, TenantRecord, Versioned, FEED_RETAINED,
};
use arc_swap::{ArcSwap, ArcSwapOption};
use async_trait::async_trait;
use dashmap::DashMap;
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
    breakers: Breakers,
    observer: Arc<dyn StoreObserver>,
    /// A single-Redis connection got a MOVED or ASK answer: it is a cluster node (logged once).
    moved_seen: std::sync::atomic::AtomicBool,
    /// Deadline of a quota lease call: longer than `timeout`, because a lease that is late
    /// under load is still worth waiting for (requests wait on one call per counter).
    lease_timeout: Duration,
}

/// Circuit breakers: one for a single Redis; on a cluster one per master node, so a stalled
/// or dead shard opens the breaker of its own tenants only. A key is mapped to its node
/// through the slot map (`CLUSTER SLOTS`, refreshed every few seconds); until the map is
/// known, or for a slot it does not cover, the shared breaker is used.
/// One range of the cluster's slot map.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct SlotRange {
    first: u16,
    last: u16,
    /// The master, `host:port`.
    node: String,
}

struct Breakers {
    shared: Arc<Breaker>,
    by_node: DashMap<String, Arc<Breaker>>,
    /// Slot ranges of the masters, sorted by `first`.
    slots: Arc<ArcSwap<Vec<SlotRange>>>,
}

impl Breakers {
    fn new(shared: Breaker) -> Breakers {
        Breakers {
            shared: Arc::new(shared),
            by_node: DashMap::new(),
            slots: Arc::new(ArcSwap::from_pointee(Vec::new())),
        }
    }

    /// The breaker of the node serving hash tag `tag` (a tenant, `dir`, `fleet`).
    fn for_tag(&self, tag: &str) -> Arc<Breaker> {
        let map = self.slots.load();
        if map.is_empty() {
            return self.shared.clone();
        }
        match range_of(&map, slot_of_tag(tag)) {
            Some(r) => {
                if let Some(b) = self.by_node.get(&r.node) {
                    return b.clone();
                }
                self.by_node.entry(r.node.clone()).or_insert_with(|| Arc::new(self.shared.fresh())).clone()
            }
            None => self.shared.clone(),
        }
    }
}

fn range_of(map: &[SlotRange], slot: u16) -> Option<&SlotRange> {
    let i = map.partition_point(|r| r.first <= slot);
    i.checked_sub(1).and_then(|i| map.get(i)).filter(|r| slot <= r.last)
}

/// The cluster hash slot of keys tagged `{tag}` (Redis's rule: CRC16/XMODEM of the first
/// non-empty `{…}` section of the key, modulo 16384).
fn slot_of_tag(tag: &str) -> u16 {
    // In `tg:{<tag>}:…` the hash tag runs from our `{` to the first `}`: the tag itself, or
    // its part before a `}` it contains. An empty one means the whole key is hashed.
    let bytes = tag.as_bytes();
    match bytes.iter().position(|b| *b == b'}') {
        Some(0) => crc16_xmodem(format!("tg:{{{tag}}}").as_bytes()) % 16384,
        Some(end) => crc16_xmodem(&bytes[..end]) % 16384,
        None => crc16_xmodem(bytes) % 16384,
    }
}

fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// Reads `CLUSTER SLOTS` into the masters' sorted slot ranges.
async fn read_slot_map(conn: &mut ClusterConnection) -> Result<Vec<SlotRange>, StoreError> {
    let reply: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await.map_err(backend)?;
    let mut out = Vec::new();
    for range in reply {
        let redis::Value::Array(parts) = range else { continue };
        let (Some(first), Some(last), Some(master)) = (parts.first(), parts.get(1), parts.get(2)) else { continue };
        let (Ok(first), Ok(last)) = (u16::from_redis_value_ref(first), u16::from_redis_value_ref(last)) else {
            continue;
        };
        let redis::Value::Array(node) = master else { continue };
        let (Some(host), Some(port)) = (node.first(), node.get(1)) else { continue };
        let (Ok(host), Ok(port)) = (String::from_redis_value_ref(host), u16::from_redis_value_ref(port)) else {
            continue;
        };
        out.push(SlotRange { first, last, node: format!("{host}:{port}") });
    }
    out.sort();
    Ok(out)
}

/// How long a ledger write on a replicated master waits for a replica's acknowledgement. Short:
/// the wait holds the node's connection; a replica slower than this is asked again next flush.
const REPLICA_WAIT: Duration = Duration::from_millis(100);

/// Timeout of bulk calls: ledger batches of tens of thousands of rows, directory loads.
const BULK_TIMEOUT: Duration = Duration::from_secs(30);

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// The fleet registry: live holders scored by when their heartbeat runs out.
const FLEET: &str = "tg:{fleet}:live";

/// The lease protocol of [`super::apply_lease`], run in Redis so that reclaiming expired
/// holders, settling the caller's report and granting happen in one atomic step.
///
/// KEYS: the counter, its holder records (`<holder>|g`, `|r`, `|h`: granted, returned,
/// held), its holder expiries (sorted set). ARGV: holder, granted, returned, held, need,
/// want, limit, expire-at ms (-1: never), holder TTL ms, units to add. Time is the server's, so instances
/// with skewed clocks agree on when a holder expires.
const LEASE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local total = tonumber(redis.call('GET', KEYS[1]) or '0')
for _, h in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  total = math.max(0, total - tonumber(redis.call('HGET', KEYS[2], h .. '|h') or '0'))
  redis.call('HDEL', KEYS[2], h .. '|g', h .. '|r', h .. '|h')
  redis.call('ZREM', KEYS[3], h)
end
local me = ARGV[1]
local kg, kr, held = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local g = redis.call('HGET', KEYS[2], me .. '|g')
if g then
  g = tonumber(g)
  local r = tonumber(redis.call('HGET', KEYS[2], me .. '|r') or '0')
  if g > kg then total = math.max(0, total - (g - kg)) end
  if kr > r then total = math.max(0, total - (kr - r)) end
end
total = total + tonumber(ARGV[10])
local need, want, limit = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local granted = 0
if want > 0 and limit - total >= need then
  granted = math.min(want, limit - total)
end
total = total + granted
redis.call('SET', KEYS[1], string.format('%d', total))
redis.call('HSET', KEYS[2], me .. '|g', string.format('%d', kg + granted), me .. '|r', string.format('%d', kr),
  me .. '|h', string.format('%d', held + granted))
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[9]), me)
local exp = tonumber(ARGV[8])
if exp >= 0 then
  for i = 1, 3 do redis.call('PEXPIREAT', KEYS[i], exp) end
end
return {granted, total}
";

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
        let breakers = Breakers::new(breaker);
        if let Conn::Cluster(slot) = &conn {
            // Keep the slot map current: after a failover the promoted replica's slots get
            // the breaker of their new node.
            let (conns, map) = (slot.clone(), breakers.slots.clone());
            tokio::spawn(async move {
                loop {
                    let mut read = false;
                    if let Some(c) = conns.conn.load_full() {
                        let mut c = (*c).clone();
                        match tokio::time::timeout(Duration::from_secs(2), read_slot_map(&mut c)).await {
                            Ok(Ok(m)) if !m.is_empty() => {
                                map.store(Arc::new(m));
                                read = true;
                            }
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => tracing::debug!(error = %e, "could not read the cluster slot map"),
                            Err(_) => tracing::debug!("reading the cluster slot map timed out"),
                        }
                    }
                    // Quickly until the first map is read, then every 2 s.
                    let pause = if read || !map.load().is_empty() { 2_000 } else { 100 };
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
            });
        }
        let lease_timeout = breakers.shared.timeout();
        RedisStore { conn, urls: urls.to_vec(), breakers, observer, moved_seen: Default::default(), lease_timeout }
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

    /// Runs one pipeline (one round trip) on keys tagged `{tag}`, under that node's breaker.
    async fn run<T: FromRedisValue>(&self, op: &'static str, tag: &str, pipe: &Pipeline) -> Result<T, StoreError> {
        self.run_within(op, tag, pipe, None).await
    }

    /// Runs one pipeline with `timeout` instead of the hot-path timeout (bulk background work).
    async fn run_bulk<T: FromRedisValue>(&self, op: &'static str, tag: &str, pipe: &Pipeline) -> Result<T, StoreError> {
        self.run_within(op, tag, pipe, Some(BULK_TIMEOUT)).await
    }

    async fn run_within<T: FromRedisValue>(
        &self,
        op: &'static str,
        tag: &str,
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
        let breaker = self.breakers.for_tag(tag);
        let r = match timeout {
            Some(t) => breaker.call_within(t, fut).await,
            None => breaker.call(fut).await,
        };
        if r.is_err() {
            self.observer.error("redis", op);
        }
        r
    }

    /// The breaker of a single Redis (on a cluster: the one used until the slot map is known).
    pub fn breaker(&self) -> Arc<Breaker> {
        self.breakers.shared.clone()
    }

    /// The breaker guarding keys tagged `{tag}` (a tenant): its node's on a cluster.
    pub fn breaker_for(&self, tag: &str) -> Arc<Breaker> {
        self.breakers.for_tag(tag)
    }

    /// Sets the deadline of quota lease calls (default: the hot-path timeout).
    pub fn with_lease_timeout(mut self, timeout: Duration) -> RedisStore {
        self.lease_timeout = timeout;
        self
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

    /// One tenant's batches on Redis Cluster; answers the id of the node that ran them. The
    /// caller counts them as written only once a replica of that node has them (when it has a
    /// replica, [`RedisStore::wait_replica`]): a failover right after would otherwise lose rows
    /// this instance believes applied. A retry is safe: the high-water mark skips what the
    /// master already has.
    async fn apply_one_on_cluster(&self, c: &TenantCall, timeout: Duration) -> Result<String, StoreError> {
        let run = |eval: bool| {
            let mut pipe = redis::pipe();
            pipe.add_command(c.cmd_of(eval, LEDGER_SCRIPT_CLUSTER));
            pipe
        };
        let answer: Result<((i64, String),), StoreError> =
            self.run_within("ledger_apply", &c.tenant, &run(false), Some(timeout)).await;
        let node = match answer {
            Ok(((_, node),)) => node,
            Err(StoreError::Backend(e)) if e.to_ascii_lowercase().contains("noscript") => {
                let ((_, node),): ((i64, String),) =
                    self.run_within("ledger_apply", &c.tenant, &run(true), Some(timeout)).await?;
                node
            }
            Err(e) => return Err(e),
        };
        Ok(node)
    }

    /// Whether the writes this client sent to `node` (the master serving `tag`) are safe from
    /// a failover: `node` has no replica connected (`ROLE`), or one acknowledged them (`WAIT`).
    async fn wait_replica(&self, tag: &str, node: &str) -> Result<(), StoreError> {
        let Conn::Cluster(slot) = &self.conn else { return Ok(()) };
        let route = redis::cluster_routing::SingleNodeRoutingInfo::SpecificNode(redis::cluster_routing::Route::new(
            slot_of_tag(tag),
            redis::cluster_routing::SlotAddr::Master,
        ));
        let fut = async {
            self.observer.round_trip("redis", "ledger_wait_replica");
            let Some(c) = slot.conn.load_full() else {
                return Err(StoreError::Backend("Redis Cluster is not connected".into()));
            };
            let mut c = (*c).clone();
            // Each pipeline runs on one connection: if the client sent it to another node (a
            // failover), the id says so. ROLE first, because WAIT holds the connection (and every
            // request's call multiplexed on it) until a replica answers or it times out.
            let mut role = redis::pipe();
            role.cmd("CLUSTER").arg("MYID");
            role.cmd("ROLE");
            let answers = c.route_pipeline(role, 0, 2, route.clone()).await.map_err(backend)?;
            let [id, role] = <[redis::Value; 2]>::try_from(answers).map_err(|_| backend("short answer"))?;
            if String::from_redis_value(id).map_err(backend)? != node {
                return Ok(false);
            }
            // ROLE on a master: ["master", offset, [[ip, port, offset], ...]].
            let replicas = match role {
                redis::Value::Array(parts) => match parts.get(2) {
                    Some(redis::Value::Array(r)) => r.len(),
                    _ => 0,
                },
                _ => 0,
            };
            if replicas == 0 {
                return Ok(true);
            }
            let mut wait = redis::pipe();
            wait.cmd("CLUSTER").arg("MYID");
            wait.cmd("WAIT").arg(1).arg(REPLICA_WAIT.as_millis() as u64);
            let answers = c.route_pipeline(wait, 0, 2, route).await.map_err(backend)?;
            let [id, acked] = <[redis::Value; 2]>::try_from(answers).map_err(|_| backend("short answer"))?;
            Ok(String::from_redis_value(id).map_err(backend)? == node
                && i64::from_redis_value(acked).map_err(backend)? >= 1)
        };
        let safe = self.breakers.for_tag(tag).call_within(REPLICA_WAIT + Duration::from_secs(1), fut).await?;
        if safe {
            Ok(())
        } else {
            Err(StoreError::Backend("no replica of the node that took the ledger write acknowledged it yet".into()))
        }
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

    async fn lease(&self, req: &LeaseRequest<'_>) -> Result<Grant, StoreError> {
        let k = quota_key(req.key);
        let mut pipe = redis::pipe();
        pipe.cmd("EVAL")
            .arg(LEASE_SCRIPT)
            .arg(3)
            .arg(&k)
            .arg(format!("{k}:h"))
            .arg(format!("{k}:e"))
            .arg(req.holder)
            .arg(req.granted)
            .arg(req.returned)
            .arg(req.held)
            .arg(req.need)
            .arg(req.want)
            .arg(req.limit)
            .arg(if req.expire_at_ms == i64::MAX { -1 } else { req.expire_at_ms })
            .arg(req.ttl_ms.max(1))
            .arg(req.add);
        let ((granted, total),): ((i64, i64),) =
            self.run_within("lease", &req.key.tenant, &pipe, Some(self.lease_timeout)).await?;
        Ok(Grant { granted: granted.max(0) as u64, total: total.max(0) as u64 })
    }

    async fn heartbeat(&self, holder: &str, now_ms: i64, ttl_ms: i64) -> Result<u32, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("ZREMRANGEBYSCORE").arg(FLEET).arg("-inf").arg(now_ms).ignore();
        pipe.cmd("ZADD").arg(FLEET).arg(now_ms + ttl_ms).arg(holder).ignore();
        pipe.cmd("PEXPIRE").arg(FLEET).arg(ttl_ms * 10).ignore();
        pipe.cmd("ZCARD").arg(FLEET);
        let (n,): (i64,) = self.run("heartbeat", "fleet", &pipe).await?;
        Ok(n.clamp(1, u32::MAX as i64) as u32)
    }

    async fn add(&self, key: &CounterKey, units: u64, expire_at_ms: i64) -> Result<u64, StoreError> {
        let k = quota_key(key);
        let mut pipe = redis::pipe();
        pipe.cmd("INCRBY").arg(&k).arg(units);
        expire(&mut pipe, &k, expire_at_ms);
        let (total,): (i64,) = self.run("add", &key.tenant, &pipe).await?;
        Ok(total.max(0) as u64)
    }

    async fn get(&self, key: &CounterKey) -> Result<u64, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(quota_key(key));
        let (v,): (Option<i64>,) = self.run("get", &key.tenant, &pipe).await?;
        Ok(v.unwrap_or(0).max(0) as u64)
    }

    async fn committed(&self, key: &CounterKey) -> Result<u64, StoreError> {
        let k = quota_key(key);
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(&k);
        pipe.cmd("HGETALL").arg(format!("{k}:h"));
        let (total, holders): (Option<i64>, std::collections::HashMap<String, i64>) =
            self.run("committed", &key.tenant, &pipe).await?;
        let held: i64 = holders.iter().filter(|(f, _)| f.ends_with("|h")).map(|(_, v)| (*v).max(0)).sum();
        Ok((total.unwrap_or(0) - held).max(0) as u64)
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
        let (c, p): (i64, Option<i64>) = self.run("window_add", tenant, &pipe).await?;
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
        let (held_before, count): (Option<f64>, i64) = self.run("slot_acquire", tenant, &pipe).await?;
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
        self.run::<()>("slot_release", tenant, &back).await?;
        Ok(false)
    }

    async fn slot_release(&self, tenant: &str, slot: &str) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("ZREM").arg(format!("{}:slots", tenant_prefix(tenant))).arg(slot).ignore();
        self.run::<()>("slot_release", tenant, &pipe).await
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
        self.run::<()>("slot_heartbeat", tenant, &pipe).await
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
/// The body of the ledger scripts, up to their answer.
macro_rules! ledger_script_body {
    () => {
        r"
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
"
    };
}

const LEDGER_SCRIPT: &str = concat!(ledger_script_body!(), "return applied\n");

/// On Redis Cluster the script also names the node it ran on, so that the replica
/// acknowledgement asked for afterwards is known to come from the same node.
const LEDGER_SCRIPT_CLUSTER: &str = concat!(ledger_script_body!(), "return {applied, redis.call('CLUSTER', 'MYID')}\n");

/// One writer's batches of one tenant, as the arguments of [`LEDGER_SCRIPT`].
struct TenantCall {
    tenant: Arc<str>,
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
        TenantCall { tenant: first.tenant.clone(), keys, args, batches: indexes, rows }
    }

    /// `EVALSHA` (`eval = false`) or `EVAL` of the script with these arguments.
    fn cmd(&self, eval: bool) -> redis::Cmd {
        self.cmd_of(eval, LEDGER_SCRIPT)
    }

    fn cmd_of(&self, eval: bool, script: &str) -> redis::Cmd {
        let mut c = redis::cmd(if eval { "EVAL" } else { "EVALSHA" });
        if eval {
            c.arg(script);
        } else {
            c.arg(redis::Script::new(script).get_hash());
        }
        c.arg(self.keys.len()).arg(&self.keys).arg(&self.args);
        c
    }
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
    /// `tag` picks the breaker: the tenant's on a cluster (one tenant per call).
    async fn run_scripts(&self, calls: &[&TenantCall], timeout: Duration, tag: &str) -> Vec<Result<(), StoreError>> {
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
            match self.run_within("ledger_apply", tag, &pipe_of(false, &all), Some(timeout)).await {
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
            .run_within::<Vec<redis::RedisResult<i64>>>("ledger_apply", tag, &pipe_of(true, &unknown), Some(timeout))
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
        let written = futures_util::future::join_all(calls.iter().map(|c| async move {
            // Grows with the size of a replay after an outage.
            let timeout = (CLUSTER_LEDGER_TIMEOUT + Duration::from_millis(c.rows as u64 / 100)).min(BULK_TIMEOUT);
            self.apply_one_on_cluster(c, timeout).await
        }))
        .await;
        // Then one replica check per node that took writes, covering all of them.
        let mut nodes: Vec<(String, &str)> = Vec::new();
        for (c, w) in calls.iter().zip(&written) {
            if let Ok(node) = w {
                if !nodes.iter().any(|(n, _)| n == node) {
                    nodes.push((node.clone(), &c.tenant));
                }
            }
        }
        let checks = futures_util::future::join_all(nodes.iter().map(|(node, tag)| self.wait_replica(tag, node))).await;
        written
            .into_iter()
            .map(|w| {
                let node = w?;
                let i = nodes.iter().position(|(n, _)| *n == node).unwrap_or(usize::MAX);
                checks.get(i).cloned().unwrap_or_else(|| Err(StoreError::Backend("no replica check".into())))
            })
            .collect()
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
            self.run_scripts(&calls.iter().collect::<Vec<_>>(), BULK_TIMEOUT, "ledger").await
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
            if days.is_empty() { Vec::new() } else { self.run_bulk("ledger_read", tenant, &pipe).await? };
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
const DIR_CHANGES: &str = "tg:{dir}:changes";
/// Set once a full load has passed over every key and put each in its tenant's key set: from
/// then on every key is in its set, since every write adds it.
const DIR_KEYS_INDEXED: &str = "tg:{dir}:tenant-keys-complete";

/// The set of a tenant's key ids (same `{dir}` slot as the rest of the directory).
fn dir_tenant_keys(tenant: &str) -> String {
    format!("tg:{{dir}}:tenant-keys:{tenant}")
}

/// Ids per `HMGET` of [`DirectoryStore::get_keys`] (all of them in one pipeline).
const HMGET_CHUNK: usize = 1_000;

/// The part of every directory write script that records the change: bumps the version,
/// adds the change to the feed under it, trims the feed to its last ARGV retained entries,
/// and returns the new version. `change` is the JSON of a [`super::Change`] (an object); the
/// feed's member is that of the [`super::Versioned`]: the same object with the version first,
/// which makes every member unique.
macro_rules! dir_feed_function {
    () => {
        r#"
local function feed(version_key, changes_key, change, retained)
  local v = redis.call('INCR', version_key)
  redis.call('ZADD', changes_key, v, string.format('{"version":%d,', v) .. string.sub(change, 2))
  redis.call('ZREMRANGEBYSCORE', changes_key, '-inf', v - tonumber(retained))
  return v
end
"#
    };
}

/// Writes a tenant. KEYS: tenants, version, changes. ARGV: id, record JSON, change JSON,
/// create (`1`: only if the id is new), feed length. Returns the new version, or 0 when
/// nothing was written.
const DIR_PUT_TENANT_SCRIPT: &str = concat!(
    dir_feed_function!(),
    r"
if ARGV[4] == '1' and redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return feed(KEYS[2], KEYS[3], ARGV[3], ARGV[5])
"
);

/// Writes a key and adds its id to its tenant's key set, if the tenant exists. KEYS: keys, the
/// tenant's key set, version, changes, tenants. ARGV: id, record JSON, change JSON, feed
/// length, tenant id. Returns the new version, or 0 when the tenant does not exist (then
/// nothing is written: a key written after its tenant was deleted would otherwise wait, unseen,
/// for a tenant of the same id).
const DIR_PUT_KEY_SCRIPT: &str = concat!(
    dir_feed_function!(),
    r"
if redis.call('HEXISTS', KEYS[5], ARGV[5]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
return feed(KEYS[3], KEYS[4], ARGV[3], ARGV[4])
"
);

/// Deletes a tenant and the keys its key set names. KEYS: tenants, keys, the tenant's key
/// set, version, changes. ARGV: id, change JSON, feed length. Returns the new version, or 0
/// when the tenant did not exist (then nothing is written).
///
/// A key in the set whose record now names another tenant (a key moved by a later write) is
/// left alone. Keys written before the key sets existed are put in their sets by the first
/// full load that reads them (see [`DIR_KEYS_INDEXED`]), which every instance does at start,
/// so a delete finds them too; no write scans every key. Followers drop a deleted tenant's
/// keys at once: the change says they are gone.
const DIR_DELETE_TENANT_SCRIPT: &str = concat!(
    dir_feed_function!(),
    r"
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then
  return 0
end
for _, id in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  local json = redis.call('HGET', KEYS[2], id)
  if json then
    local ok, rec = pcall(cjson.decode, json)
    if not ok or type(rec) ~= 'table' or rec.tenant == ARGV[1] then
      redis.call('HDEL', KEYS[2], id)
    end
  end
end
redis.call('DEL', KEYS[3])
return feed(KEYS[4], KEYS[5], ARGV[2], ARGV[3])
"
);

/// The version and the feed after ARGV[1], read together. KEYS: version, changes. ARGV: the
/// caller's version, the most changes to answer. Returns `{version, {member, ...}}`; the
/// members are left out when the caller is up to date, ahead, or too far behind.
const DIR_CHANGES_SCRIPT: &str = r"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local since, most = tonumber(ARGV[1]), tonumber(ARGV[2])
if since >= current or current - since > most then
  return {current, {}}
end
return {current, redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf', 'LIMIT', 0, most)}
";

fn decode<T: serde::de::DeserializeOwned>(json: &str, what: &str) -> Option<T> {
    match serde_json::from_str::<T>(json) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::error!(error = %e, "skipping an unreadable {what} record");
            None
        }
    }
}

impl RedisStore {
    /// Runs a directory script (every key of which is tagged `{dir}`) as `EVALSHA`, and again
    /// as `EVAL` with the script itself when the server does not know it yet (a restart, a
    /// failover, a new node), which caches it there.
    async fn dir_script<T: FromRedisValue>(
        &self,
        op: &'static str,
        script: &str,
        keys: &[&str],
        args: &[&str],
        timeout: Option<Duration>,
    ) -> Result<T, StoreError> {
        let call = |eval: bool| {
            let mut c = redis::cmd(if eval { "EVAL" } else { "EVALSHA" });
            if eval {
                c.arg(script);
            } else {
                c.arg(redis::Script::new(script).get_hash());
            }
            c.arg(keys.len()).arg(keys).arg(args);
            let mut pipe = redis::pipe();
            // The answer (or the server's error) comes back as the pipeline's one value, so an
            // unknown script is not a failed call for the breaker.
            pipe.ignore_errors();
            pipe.add_command(c);
            pipe
        };
        let (answer,): (redis::RedisResult<redis::Value>,) = self.run_within(op, "dir", &call(false), timeout).await?;
        let value = match answer {
            Err(e) if is_noscript(&e) => {
                let (answer,): (redis::RedisResult<redis::Value>,) =
                    self.run_within(op, "dir", &call(true), timeout).await?;
                answer
            }
            other => other,
        };
        let value = value.map_err(|e| {
            self.observer.error("redis", op);
            backend(e)
        })?;
        T::from_redis_value(value).map_err(backend)
    }

    /// Runs one directory write script; `Some(version)` when it wrote.
    async fn dir_write(
        &self,
        op: &'static str,
        script: &str,
        keys: &[&str],
        args: &[&str],
    ) -> Result<Option<u64>, StoreError> {
        let version: i64 = self.dir_script(op, script, keys, args, None).await?;
        Ok((version > 0).then_some(version as u64))
    }
}

#[async_trait]
impl DirectoryStore for RedisStore {
    async fn version(&self) -> Result<u64, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(DIR_VERSION);
        let (v,): (Option<i64>,) = self.run("dir_version", "dir", &pipe).await?;
        Ok(v.unwrap_or(0).max(0) as u64)
    }

    /// `HSCAN` of the tenants or keys hash with `COUNT = limit`; the cursor is `HSCAN`'s. A
    /// record may come twice (Redis rehashed between pages); the caller keeps one.
    async fn page(&self, kind: RecordKind, cursor: Option<&str>, limit: usize) -> Result<Page, StoreError> {
        let hash = match kind {
            RecordKind::Tenant => DIR_TENANTS,
            RecordKind::Key => DIR_KEYS,
        };
        let mut pipe = redis::pipe();
        pipe.cmd("HSCAN").arg(hash).arg(cursor.unwrap_or("0")).arg("COUNT").arg(limit.max(1));
        pipe.cmd("EXISTS").arg(DIR_KEYS_INDEXED);
        let ((next, fields), indexed): ((String, Vec<String>), i64) = self.run_bulk("dir_page", "dir", &pipe).await?;
        let mut page = Page { next: (next != "0").then_some(next), ..Page::default() };
        // Field, value, field, value…: the values are the records.
        super::off_the_runtime(|| {
            for json in fields.iter().skip(1).step_by(2) {
                match kind {
                    RecordKind::Tenant => page.tenants.extend(decode::<TenantRecord>(json, "tenant")),
                    RecordKind::Key => page.keys.extend(decode::<KeyRecord>(json, "key")),
                }
            }
        });
        if kind == RecordKind::Key && indexed == 0 {
            // Keys from before the per-tenant key sets: put each in its set as the load passes,
            // and mark the sets complete once a whole scan is done. Adding a key again is
            // harmless, so instances loading at once do not get in each other's way.
            let mut fix = redis::pipe();
            for k in &page.keys {
                fix.cmd("SADD").arg(dir_tenant_keys(&k.tenant)).arg(&k.id).ignore();
            }
            if page.next.is_none() {
                fix.cmd("SET").arg(DIR_KEYS_INDEXED).arg(1).ignore();
            }
            self.run_bulk::<()>("dir_index", "dir", &fix).await?;
        }
        Ok(page)
    }

    async fn changes_since(&self, since: u64) -> Result<Feed, StoreError> {
        let (since_arg, most) = (since.to_string(), FEED_RETAINED.to_string());
        let (current, members): (i64, Vec<String>) = self
            .dir_script(
                "dir_changes",
                DIR_CHANGES_SCRIPT,
                &[DIR_VERSION, DIR_CHANGES],
                &[&since_arg, &most],
                Some(BULK_TIMEOUT),
            )
            .await?;
        let current = current.max(0) as u64;
        if since == current {
            return Ok(Feed::Changes(Vec::new()));
        }
        if since > current || current - since > FEED_RETAINED {
            return Ok(Feed::Behind);
        }
        let mut changes = Vec::with_capacity(members.len());
        for json in &members {
            let change = match serde_json::from_str::<Versioned>(json) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "unreadable change in the directory feed; loading again");
                    return Ok(Feed::Behind);
                }
            };
            // Every version from `since + 1` on, without a gap: the first one missing means
            // the feed was trimmed past it, or the directory was written before the feed
            // existed.
            if change.version != since + 1 + changes.len() as u64 {
                return Ok(Feed::Behind);
            }
            changes.push(change);
        }
        if changes.len() as u64 != current - since {
            return Ok(Feed::Behind);
        }
        Ok(Feed::Changes(changes))
    }

    async fn change_at(&self, version: u64) -> Result<Option<Versioned>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("ZRANGEBYSCORE").arg(DIR_CHANGES).arg(version).arg(version);
        let (members,): (Vec<String>,) = self.run("dir_change_at", "dir", &pipe).await?;
        Ok(members.first().and_then(|j| serde_json::from_str::<Versioned>(j).ok()))
    }

    async fn get_tenant(&self, id: &str) -> Result<Option<TenantRecord>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGET").arg(DIR_TENANTS).arg(id);
        let (json,): (Option<String>,) = self.run("dir_get", "dir", &pipe).await?;
        Ok(json.and_then(|j| decode::<TenantRecord>(&j, "tenant")))
    }

    async fn get_keys(&self, ids: &[&str]) -> Result<Vec<KeyRecord>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for chunk in ids.chunks(HMGET_CHUNK) {
            pipe.cmd("HMGET").arg(DIR_KEYS).arg(chunk);
        }
        let found: Vec<Vec<Option<String>>> = if ids.len() > HMGET_CHUNK {
            self.run_bulk("dir_get_keys", "dir", &pipe).await?
        } else {
            self.run("dir_get_keys", "dir", &pipe).await?
        };
        Ok(found.iter().flatten().flatten().filter_map(|j| decode::<KeyRecord>(j, "key")).collect())
    }

    async fn put_tenant(&self, t: &TenantRecord, create: bool) -> Result<Option<u64>, StoreError> {
        let json = serde_json::to_string(t).map_err(backend)?;
        let change = serde_json::to_string(&Change::Tenant { record: t.clone() }).map_err(backend)?;
        let (create, most) = (if create { "1" } else { "0" }, FEED_RETAINED.to_string());
        self.dir_write(
            "dir_put",
            DIR_PUT_TENANT_SCRIPT,
            &[DIR_TENANTS, DIR_VERSION, DIR_CHANGES],
            &[&t.id, &json, &change, create, &most],
        )
        .await
    }

    async fn delete_tenant(&self, id: &str) -> Result<Option<u64>, StoreError> {
        let change = serde_json::to_string(&Change::TenantDeleted { id: id.to_string() }).map_err(backend)?;
        let (set, most) = (dir_tenant_keys(id), FEED_RETAINED.to_string());
        // As many steps as the tenant has keys, in one script: the bulk timeout.
        let version: i64 = self
            .dir_script(
                "dir_delete",
                DIR_DELETE_TENANT_SCRIPT,
                &[DIR_TENANTS, DIR_KEYS, &set, DIR_VERSION, DIR_CHANGES],
                &[id, &change, &most],
                Some(BULK_TIMEOUT),
            )
            .await?;
        Ok((version > 0).then_some(version as u64))
    }

    async fn put_key(&self, k: &KeyRecord) -> Result<Option<u64>, StoreError> {
        let json = serde_json::to_string(k).map_err(backend)?;
        let change = serde_json::to_string(&Change::Key { record: k.clone() }).map_err(backend)?;
        let (set, most) = (dir_tenant_keys(&k.tenant), FEED_RETAINED.to_string());
        self.dir_write(
            "dir_put_key",
            DIR_PUT_KEY_SCRIPT,
            &[DIR_KEYS, &set, DIR_VERSION, DIR_CHANGES, DIR_TENANTS],
            &[&k.id, &json, &change, &most, &k.tenant],
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::slot_of_tag;

    #[test]
    fn slots_follow_the_redis_cluster_hash() {
        // `CLUSTER KEYSLOT foo` is 12182 and `CLUSTER KEYSLOT somekey` 11058; a tagged key
        // hashes its tag only.
        assert_eq!(slot_of_tag("foo"), 12182);
        assert_eq!(slot_of_tag("somekey"), 11058);
        // `tg:{foo}bar}:…` is tagged `foo`.
        assert_eq!(slot_of_tag("foo}bar"), 12182);
    }
}
