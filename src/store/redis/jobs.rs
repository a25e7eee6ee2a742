//! The job store on Redis, shared by a fleet.
//!
//! Every key is tagged `{jobs}`, so each step is one script on one node, on a single Redis as
//! on a cluster (where all jobs then live on the master of that slot):
//!
//! - `tg:{jobs}:job:<id>`: a hash of the job: `spec` (JSON), and `status`, `worker`, `lease`,
//!   `started`, `finished`, `attempts`, `progress`, `error`, `expires`, `seq`
//! - `tg:{jobs}:queue`: the pending jobs, a sorted set scored by minus the priority, whose
//!   members (`<seq, 16 digits>:<id>`) order equal priorities oldest first
//! - `tg:{jobs}:running`: running jobs scored by lease expiry; `tg:{jobs}:finished`: finished
//!   jobs scored by the end of their retention
//! - `tg:{jobs}:t:<tenant>`: the tenant's jobs scored by `seq` (listing, cancel all)
//! - `tg:{jobs}:open`, `tg:{jobs}:depth`: pending-or-running jobs per tenant, pending per tier
//! - `tg:{jobs}:result:<id>`: the result (JSON); `tg:{jobs}:seq`: the submission counter
//!
//! A script names the keys it touches from the job ids it reads; they all share the one hash
//! tag, which is what a cluster needs.

use super::{backend, is_noscript, RedisStore};
use crate::store::jobs::{JobRecord, JobResult, JobSpec, JobState, JobStatus, JobStore, Reaped, Renewed, RetryLost};
use crate::store::jobs::{CLAIM_SCAN, LOST_ERROR};
use crate::store::StoreError;
use async_trait::async_trait;
use redis::FromRedisValue;
use std::collections::HashMap;

const P: &str = "tg:{jobs}:";
/// The key every script is routed by.
const ROUTE: &str = "tg:{jobs}:queue";
/// The deadline of a job call: longer than the hot-path timeout, since a job step may touch
/// many keys (cancel all, reap) and a submission is one call per job, not per request.
const JOB_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

const SUBMIT: &str = r#"
local p = 'tg:{jobs}:'
local open = tonumber(redis.call('HGET', p..'open', ARGV[2]) or '0')
if open >= tonumber(ARGV[7]) then return 0 end
local seq = redis.call('INCR', p..'seq')
local qm = string.format('%016d', seq)..':'..ARGV[1]
redis.call('HSET', p..'job:'..ARGV[1], 'spec', ARGV[6], 'tenant', ARGV[2], 'tier', ARGV[3], 'prio', ARGV[4],
  'idem', ARGV[5], 'ret', ARGV[8], 'status', 'pending', 'seq', seq, 'qm', qm, 'attempts', 0)
redis.call('ZADD', p..'queue', -tonumber(ARGV[4]), qm)
redis.call('ZADD', p..'t:'..ARGV[2], seq, ARGV[1])
redis.call('HINCRBY', p..'open', ARGV[2], 1)
redis.call('HINCRBY', p..'depth', ARGV[3], 1)
return 1
"#;

const CLAIM: &str = r#"
local p = 'tg:{jobs}:'
local cand = redis.call('ZRANGE', p..'queue', 0, tonumber(ARGV[4]) - 1)
for _, qm in ipairs(cand) do
  local id = string.sub(qm, 18)
  local k = p..'job:'..id
  local t = redis.call('HGET', k, 'tenant')
  if not t then
    redis.call('ZREM', p..'queue', qm)
  else
    local skip = false
    for i = 5, #ARGV do
      if ARGV[i] == t then skip = true; break end
    end
    if not skip then
      redis.call('ZREM', p..'queue', qm)
      redis.call('HSET', k, 'status', 'running', 'worker', ARGV[1], 'lease', ARGV[3], 'started', ARGV[2])
      redis.call('HINCRBY', k, 'attempts', 1)
      redis.call('ZADD', p..'running', ARGV[3], id)
      redis.call('HINCRBY', p..'depth', redis.call('HGET', k, 'tier'), -1)
      return id
    end
  end
end
return false
"#;

const UNCLAIM: &str = r#"
local p = 'tg:{jobs}:'
local k = p..'job:'..ARGV[1]
if redis.call('HGET', k, 'status') ~= 'running' or redis.call('HGET', k, 'worker') ~= ARGV[2] then return 0 end
redis.call('HSET', k, 'status', 'pending')
redis.call('HDEL', k, 'worker', 'lease', 'started')
redis.call('HINCRBY', k, 'attempts', -1)
redis.call('ZREM', p..'running', ARGV[1])
redis.call('ZADD', p..'queue', -tonumber(redis.call('HGET', k, 'prio')), redis.call('HGET', k, 'qm'))
redis.call('HINCRBY', p..'depth', redis.call('HGET', k, 'tier'), 1)
return 1
"#;

const RENEW: &str = r#"
local p = 'tg:{jobs}:'
local k = p..'job:'..ARGV[1]
local s = redis.call('HGET', k, 'status')
if s == 'running' and redis.call('HGET', k, 'worker') == ARGV[2] then
  redis.call('HSET', k, 'lease', ARGV[3])
  if ARGV[5] == '1' then redis.call('HSET', k, 'progress', ARGV[4]) end
  redis.call('ZADD', p..'running', ARGV[3], ARGV[1])
  return 'running'
end
if s == 'cancelled' and redis.call('HGET', k, 'worker') == ARGV[2] then return 'cancelled' end
return 'lost'
"#;

const FINISH: &str = r#"
local p = 'tg:{jobs}:'
local k = p..'job:'..ARGV[1]
if redis.call('HGET', k, 'status') ~= 'running' or redis.call('HGET', k, 'worker') ~= ARGV[2] then return 0 end
local exp = tonumber(ARGV[4]) + tonumber(redis.call('HGET', k, 'ret'))
redis.call('HSET', k, 'status', ARGV[3], 'finished', ARGV[4], 'expires', exp)
redis.call('HDEL', k, 'worker', 'lease')
if ARGV[6] == '1' then redis.call('HSET', k, 'error', ARGV[5]) end
if ARGV[8] == '1' then redis.call('SET', p..'result:'..ARGV[1], ARGV[7]) end
redis.call('ZREM', p..'running', ARGV[1])
redis.call('ZADD', p..'finished', exp, ARGV[1])
redis.call('HINCRBY', p..'open', redis.call('HGET', k, 'tenant'), -1)
return 1
"#;

const CANCEL: &str = r#"
local p = 'tg:{jobs}:'
local out = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local k = p..'job:'..id
  local t = redis.call('HGET', k, 'tenant')
  local s = redis.call('HGET', k, 'status')
  if t == ARGV[1] and (s == 'pending' or s == 'running') then
    if s == 'pending' then
      redis.call('ZREM', p..'queue', redis.call('HGET', k, 'qm'))
      redis.call('HINCRBY', p..'depth', redis.call('HGET', k, 'tier'), -1)
    else
      redis.call('ZREM', p..'running', id)
    end
    local exp = tonumber(ARGV[2]) + tonumber(redis.call('HGET', k, 'ret'))
    redis.call('HSET', k, 'status', 'cancelled', 'finished', ARGV[2], 'expires', exp)
    -- `worker` stays: the worker that was running it is told `cancelled`, any other `lost`.
    redis.call('HDEL', k, 'lease')
    redis.call('ZADD', p..'finished', exp, id)
    redis.call('HINCRBY', p..'open', t, -1)
    table.insert(out, id..'|'..s)
  end
end
return out
"#;

const REAP: &str = r#"
local p = 'tg:{jobs}:'
local requeued, failed = {}, {}
local lost = redis.call('ZRANGEBYSCORE', p..'running', '-inf', ARGV[1], 'LIMIT', 0, 100)
for _, id in ipairs(lost) do
  local k = p..'job:'..id
  redis.call('ZREM', p..'running', id)
  if redis.call('HGET', k, 'status') == 'running' then
    local attempts = tonumber(redis.call('HGET', k, 'attempts') or '0')
    local again = ARGV[2] == 'always' or (ARGV[2] == 'idempotent' and redis.call('HGET', k, 'idem') == '1')
    if again and attempts < 2 then
      redis.call('HSET', k, 'status', 'pending')
      redis.call('HDEL', k, 'worker', 'lease')
      redis.call('ZADD', p..'queue', -tonumber(redis.call('HGET', k, 'prio')), redis.call('HGET', k, 'qm'))
      redis.call('HINCRBY', p..'depth', redis.call('HGET', k, 'tier'), 1)
      table.insert(requeued, id)
    else
      local exp = tonumber(ARGV[1]) + tonumber(redis.call('HGET', k, 'ret'))
      redis.call('HSET', k, 'status', 'failed', 'finished', ARGV[1], 'expires', exp, 'error', ARGV[3])
      redis.call('HDEL', k, 'worker', 'lease')
      redis.call('ZADD', p..'finished', exp, id)
      redis.call('HINCRBY', p..'open', redis.call('HGET', k, 'tenant'), -1)
      table.insert(failed, id)
    end
  end
end
local gone = redis.call('ZRANGEBYSCORE', p..'finished', '-inf', ARGV[1], 'LIMIT', 0, 500)
for _, id in ipairs(gone) do
  local k = p..'job:'..id
  local t = redis.call('HGET', k, 'tenant')
  if t then redis.call('ZREM', p..'t:'..t, id) end
  redis.call('DEL', k, p..'result:'..id)
  redis.call('ZREM', p..'finished', id)
end
return {requeued, failed, #gone}
"#;

/// A number Redis wrote: an integer, or a Lua number in `%.17g`.
fn num(s: &str) -> Option<i64> {
    s.parse::<i64>().ok().or_else(|| s.parse::<f64>().ok().map(|f| f as i64))
}

fn decode(mut h: HashMap<String, String>) -> Option<JobRecord> {
    let spec = serde_json::from_str::<JobSpec>(h.get("spec")?)
        .map_err(|e| tracing::error!(error = %e, "skipping an unreadable job record"))
        .ok()?;
    let get = |h: &HashMap<String, String>, k: &str| h.get(k).and_then(|v| num(v));
    let state = JobState {
        status: h.get("status").and_then(|s| JobStatus::parse(s)),
        started_ms: get(&h, "started"),
        finished_ms: get(&h, "finished"),
        attempts: get(&h, "attempts").unwrap_or(0).clamp(0, u32::MAX as i64) as u32,
        progress: h.remove("progress"),
        error: h.remove("error"),
        expires_ms: get(&h, "expires"),
        seq: get(&h, "seq").unwrap_or(0).max(0) as u64,
    };
    Some(JobRecord { spec, state })
}

fn live(r: &JobRecord, now_ms: i64) -> bool {
    r.state.expires_ms.is_none_or(|e| e > now_ms)
}

impl RedisStore {
    /// Runs a job script as `EVALSHA`, and as `EVAL` when the server does not know it yet.
    async fn job_script<T: FromRedisValue>(
        &self,
        op: &'static str,
        script: &str,
        args: &[String],
    ) -> Result<T, StoreError> {
        let call = |eval: bool| {
            let mut c = redis::cmd(if eval { "EVAL" } else { "EVALSHA" });
            if eval {
                c.arg(script);
            } else {
                c.arg(redis::Script::new(script).get_hash());
            }
            c.arg(1).arg(ROUTE).arg(args);
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            pipe.add_command(c);
            pipe
        };
        let (answer,): (redis::RedisResult<redis::Value>,) =
            self.run_within(op, "jobs", &call(false), Some(JOB_TIMEOUT)).await?;
        let value = match answer {
            Err(e) if is_noscript(&e) => {
                let (answer,): (redis::RedisResult<redis::Value>,) =
                    self.run_within(op, "jobs", &call(true), Some(JOB_TIMEOUT)).await?;
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

    async fn job_records(&self, ids: &[String]) -> Result<Vec<JobRecord>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HGETALL").arg(format!("{P}job:{id}"));
        }
        let rows: Vec<HashMap<String, String>> = self.run_within("job_read", "jobs", &pipe, Some(JOB_TIMEOUT)).await?;
        Ok(rows.into_iter().filter_map(decode).collect())
    }

    async fn job_record(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        Ok(self.job_records(&[id.to_string()]).await?.pop())
    }

    async fn cancel_ids(
        &self,
        tenant: &str,
        before: Vec<JobRecord>,
        now_ms: i64,
    ) -> Result<Vec<JobRecord>, StoreError> {
        if before.is_empty() {
            return Ok(Vec::new());
        }
        let mut args = vec![tenant.to_string(), now_ms.to_string()];
        args.extend(before.iter().map(|r| r.spec.id.clone()));
        let done: Vec<String> = self.job_script("job_cancel", CANCEL, &args).await?;
        let mut out = Vec::new();
        for entry in done {
            let Some((id, was)) = entry.split_once('|') else { continue };
            if let Some(mut r) = before.iter().find(|r| r.spec.id == id).cloned() {
                // The status the script found, which is what the cancel acted on.
                r.state.status = JobStatus::parse(was);
                out.push(r);
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl JobStore for RedisStore {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn submit(&self, spec: &JobSpec, max_open: u32) -> Result<bool, StoreError> {
        let json = serde_json::to_string(spec).map_err(backend)?;
        let args = [
            spec.id.clone(),
            spec.tenant.clone(),
            spec.tier.clone(),
            spec.priority.to_string(),
            if spec.idempotent() { "1" } else { "0" }.to_string(),
            json,
            max_open.to_string(),
            spec.retention_ms.to_string(),
        ];
        let n: i64 = self.job_script("job_submit", SUBMIT, &args).await?;
        Ok(n == 1)
    }

    async fn claim(
        &self,
        worker: &str,
        skip: &[String],
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Option<JobRecord>, StoreError> {
        let mut args = vec![
            worker.to_string(),
            now_ms.to_string(),
            now_ms.saturating_add(lease_ms).to_string(),
            CLAIM_SCAN.to_string(),
        ];
        args.extend(skip.iter().cloned());
        let id: Option<String> = self.job_script("job_claim", CLAIM, &args).await?;
        match id {
            Some(id) => self.job_record(&id).await,
            None => Ok(None),
        }
    }

    async fn unclaim(&self, id: &str, worker: &str) -> Result<(), StoreError> {
        let _: i64 = self.job_script("job_unclaim", UNCLAIM, &[id.to_string(), worker.to_string()]).await?;
        Ok(())
    }

    async fn renew(
        &self,
        id: &str,
        worker: &str,
        progress: Option<&str>,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Renewed, StoreError> {
        let args = [
            id.to_string(),
            worker.to_string(),
            now_ms.saturating_add(lease_ms).to_string(),
            progress.unwrap_or("").to_string(),
            if progress.is_some() { "1" } else { "0" }.to_string(),
        ];
        let s: String = self.job_script("job_renew", RENEW, &args).await?;
        Ok(match s.as_str() {
            "running" => Renewed::Running,
            "cancelled" => Renewed::Cancelled,
            _ => Renewed::Lost,
        })
    }

    async fn finish(
        &self,
        id: &str,
        worker: &str,
        status: JobStatus,
        result: Option<&JobResult>,
        error: Option<&str>,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let result = result.map(serde_json::to_string).transpose().map_err(backend)?;
        let args = [
            id.to_string(),
            worker.to_string(),
            status.as_str().to_string(),
            now_ms.to_string(),
            error.unwrap_or("").to_string(),
            if error.is_some() { "1" } else { "0" }.to_string(),
            result.clone().unwrap_or_default(),
            if result.is_some() { "1" } else { "0" }.to_string(),
        ];
        let n: i64 = self.job_script("job_finish", FINISH, &args).await?;
        Ok(n == 1)
    }

    async fn get(&self, tenant: &str, id: &str, now_ms: i64) -> Result<Option<JobRecord>, StoreError> {
        Ok(self.job_record(id).await?.filter(|r| r.spec.tenant == tenant && live(r, now_ms)))
    }

    async fn peek(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        self.job_record(id).await
    }

    async fn status(&self, id: &str) -> Result<Option<(JobStatus, Option<i64>)>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET").arg(format!("{P}job:{id}")).arg("status").arg("started");
        let ((status, started),): ((Option<String>, Option<String>),) =
            self.run_within("job_status", "jobs", &pipe, Some(JOB_TIMEOUT)).await?;
        Ok(status.and_then(|s| JobStatus::parse(&s)).map(|s| (s, started.as_deref().and_then(num))))
    }

    async fn result(&self, tenant: &str, id: &str, now_ms: i64) -> Result<Option<JobResult>, StoreError> {
        if self.get(tenant, id, now_ms).await?.is_none() {
            return Ok(None);
        }
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(format!("{P}result:{id}"));
        let (json,): (Option<String>,) = self.run_within("job_result", "jobs", &pipe, Some(JOB_TIMEOUT)).await?;
        Ok(json.and_then(|j| serde_json::from_str(&j).ok()))
    }

    async fn list(
        &self,
        tenant: &str,
        status: Option<JobStatus>,
        before: Option<u64>,
        limit: usize,
        now_ms: i64,
    ) -> Result<(Vec<JobRecord>, Option<u64>), StoreError> {
        const BATCH: usize = 200;
        const MAX_SCANNED: usize = 2_000;
        let mut out = Vec::new();
        let mut cursor = before;
        let mut scanned = 0;
        loop {
            let max = match cursor {
                Some(c) => format!("({c}"),
                None => "+inf".to_string(),
            };
            let mut pipe = redis::pipe();
            pipe.cmd("ZREVRANGEBYSCORE")
                .arg(format!("{P}t:{tenant}"))
                .arg(max)
                .arg("-inf")
                .arg("LIMIT")
                .arg(0)
                .arg(BATCH);
            let (ids,): (Vec<String>,) = self.run_within("job_list", "jobs", &pipe, Some(JOB_TIMEOUT)).await?;
            let exhausted = ids.len() < BATCH;
            scanned += ids.len();
            let mut records = self.job_records(&ids).await?;
            records.sort_by_key(|r| std::cmp::Reverse(r.state.seq));
            for r in records {
                cursor = Some(r.state.seq);
                if live(&r, now_ms) && status.is_none_or(|s| r.status() == s) {
                    out.push(r);
                    if out.len() > limit {
                        out.truncate(limit);
                        return Ok((out.clone(), out.last().map(|r| r.state.seq)));
                    }
                }
            }
            if exhausted || ids.is_empty() {
                return Ok((out, None));
            }
            if scanned >= MAX_SCANNED {
                // Bounded work per page: the client continues below what was scanned.
                return Ok((out, cursor));
            }
        }
    }

    async fn cancel(&self, tenant: &str, id: &str, now_ms: i64) -> Result<Option<JobRecord>, StoreError> {
        let Some(before) = self.get(tenant, id, now_ms).await? else { return Ok(None) };
        if before.status().is_final() {
            return Ok(Some(before));
        }
        let mut done = self.cancel_ids(tenant, vec![before.clone()], now_ms).await?;
        // Finished between the read and the cancel: answer it as it is now.
        match done.pop() {
            Some(r) => Ok(Some(r)),
            None => self.get(tenant, id, now_ms).await,
        }
    }

    async fn cancel_all(&self, tenant: &str, now_ms: i64) -> Result<Vec<JobRecord>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("ZRANGE").arg(format!("{P}t:{tenant}")).arg(0).arg(-1);
        let (ids,): (Vec<String>,) = self.run_within("job_list", "jobs", &pipe, Some(JOB_TIMEOUT)).await?;
        let mut open = Vec::new();
        for chunk in ids.chunks(200) {
            open.extend(self.job_records(chunk).await?.into_iter().filter(|r| !r.status().is_final()));
        }
        self.cancel_ids(tenant, open, now_ms).await
    }

    async fn reap(&self, now_ms: i64, retry: RetryLost) -> Result<Reaped, StoreError> {
        let policy = match retry {
            RetryLost::Always => "always",
            RetryLost::Idempotent => "idempotent",
            RetryLost::Never => "never",
        };
        let args = [now_ms.to_string(), policy.to_string(), LOST_ERROR.to_string()];
        let (requeued, failed, deleted): (Vec<String>, Vec<String>, i64) =
            self.job_script("job_reap", REAP, &args).await?;
        Ok(Reaped { requeued, failed, deleted: deleted.max(0) as u64 })
    }

    async fn depth(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL").arg(format!("{P}depth"));
        let (map,): (HashMap<String, i64>,) = self.run_within("job_depth", "jobs", &pipe, Some(JOB_TIMEOUT)).await?;
        let mut out: Vec<(String, u64)> = map.into_iter().map(|(t, n)| (t, n.max(0) as u64)).collect();
        out.sort();
        Ok(out)
    }
}
