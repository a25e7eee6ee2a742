//! The job store on SQLite, in the embedded store's file (one node).
//!
//! One row per job: the fixed [`JobSpec`] as JSON, the fields that change as columns, the
//! result as JSON. Every call is one transaction on a blocking thread, off the request path.

use super::jobs::{
    JobRecord, JobResult, JobSpec, JobState, JobStatus, JobStore, Reaped, Renewed, RetryLost, LOST_ERROR,
};
use super::StoreError;
use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};
use std::sync::{Arc, Mutex};

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Jobs in SQLite.
pub struct EmbeddedJobs {
    db: Arc<Mutex<Connection>>,
}

const COLUMNS: &str = "seq, spec, status, started_ms, finished_ms, attempts, progress, error, expires_ms";

fn record(r: &Row<'_>) -> rusqlite::Result<(String, JobState)> {
    let status: String = r.get(2)?;
    Ok((
        r.get(1)?,
        JobState {
            seq: r.get::<_, i64>(0)?.max(0) as u64,
            status: JobStatus::parse(&status),
            started_ms: r.get(3)?,
            finished_ms: r.get(4)?,
            attempts: r.get::<_, i64>(5)?.clamp(0, u32::MAX as i64) as u32,
            progress: r.get(6)?,
            error: r.get(7)?,
            expires_ms: r.get(8)?,
        },
    ))
}

fn decode((spec, state): (String, JobState)) -> Option<JobRecord> {
    match serde_json::from_str::<JobSpec>(&spec) {
        Ok(spec) => Some(JobRecord { spec, state }),
        Err(e) => {
            tracing::error!(error = %e, "skipping an unreadable job record");
            None
        }
    }
}

fn live(r: &JobRecord, now_ms: i64) -> bool {
    r.state.expires_ms.is_none_or(|e| e > now_ms)
}

impl EmbeddedJobs {
    /// Uses the embedded store's connection; creates the table on first use.
    pub fn open(db: Arc<Mutex<Connection>>) -> Result<EmbeddedJobs, StoreError> {
        {
            let conn = db.lock().unwrap_or_else(|p| p.into_inner());
            conn.execute_batch(
                "CREATE TABLE IF NOT EXISTS jobs (
                     seq INTEGER PRIMARY KEY AUTOINCREMENT,
                     id TEXT NOT NULL UNIQUE,
                     tenant TEXT NOT NULL,
                     tier TEXT NOT NULL,
                     priority INTEGER NOT NULL,
                     idempotent INTEGER NOT NULL,
                     spec TEXT NOT NULL,
                     status TEXT NOT NULL,
                     worker TEXT,
                     lease_ms INTEGER,
                     started_ms INTEGER,
                     finished_ms INTEGER,
                     attempts INTEGER NOT NULL DEFAULT 0,
                     progress TEXT,
                     error TEXT,
                     expires_ms INTEGER,
                     result TEXT
                 );
                 CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (status, priority DESC, seq);
                 CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs (tenant, seq);
                 CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (expires_ms);",
            )
            .map_err(backend)?;
        }
        Ok(EmbeddedJobs { db })
    }

    async fn tx<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = db.lock().unwrap_or_else(|p| p.into_inner());
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend)?;
            let out = f(&tx)?;
            tx.commit().map_err(backend)?;
            Ok(out)
        })
        .await
        .map_err(backend)?
    }
}

fn load(tx: &Transaction<'_>, id: &str) -> Result<Option<JobRecord>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1");
    Ok(tx.query_row(&sql, params![id], record).optional().map_err(backend)?.and_then(decode))
}

/// Ends a pending or running job as cancelled.
fn cancel_row(tx: &Transaction<'_>, id: &str, retention_ms: i64, now_ms: i64) -> Result<(), StoreError> {
    tx.execute(
        // `worker` stays: the worker that was running it is told `cancelled`, any other `lost`.
        "UPDATE jobs SET status = 'cancelled', finished_ms = ?2, expires_ms = ?3, lease_ms = NULL
         WHERE id = ?1 AND status IN ('pending', 'running')",
        params![id, now_ms, now_ms.saturating_add(retention_ms)],
    )
    .map_err(backend)?;
    Ok(())
}

#[async_trait]
impl JobStore for EmbeddedJobs {
    fn name(&self) -> &'static str {
        "embedded"
    }

    async fn submit(&self, spec: &JobSpec, max_open: u32) -> Result<bool, StoreError> {
        let json = serde_json::to_string(spec).map_err(backend)?;
        let spec = spec.clone();
        self.tx(move |tx| {
            let open: i64 = tx
                .query_row(
                    "SELECT COUNT(*) FROM jobs WHERE tenant = ?1 AND status IN ('pending', 'running')",
                    params![spec.tenant],
                    |r| r.get(0),
                )
                .map_err(backend)?;
            if open >= i64::from(max_open) {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO jobs (id, tenant, tier, priority, idempotent, spec, status) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending')",
                params![spec.id, spec.tenant, spec.tier, spec.priority, spec.idempotent(), json],
            )
            .map_err(backend)?;
            Ok(true)
        })
        .await
    }

    async fn claim(
        &self,
        worker: &str,
        skip: &[String],
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Option<JobRecord>, StoreError> {
        let (worker, skip) = (worker.to_string(), skip.to_vec());
        self.tx(move |tx| {
            let mut stmt = tx
                .prepare_cached("SELECT id, tenant FROM jobs WHERE status = 'pending' ORDER BY priority DESC, seq LIMIT ?1")
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![super::jobs::CLAIM_SCAN as i64], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .map_err(backend)?;
            let mut chosen = None;
            for row in rows {
                let (id, tenant) = row.map_err(backend)?;
                if !skip.contains(&tenant) {
                    chosen = Some(id);
                    break;
                }
            }
            drop(stmt);
            let Some(id) = chosen else { return Ok(None) };
            tx.execute(
                "UPDATE jobs SET status = 'running', worker = ?2, lease_ms = ?3, started_ms = ?4, attempts = attempts + 1
                 WHERE id = ?1",
                params![id, worker, now_ms.saturating_add(lease_ms), now_ms],
            )
            .map_err(backend)?;
            load(tx, &id)
        })
        .await
    }

    async fn unclaim(&self, id: &str, worker: &str) -> Result<(), StoreError> {
        let (id, worker) = (id.to_string(), worker.to_string());
        self.tx(move |tx| {
            tx.execute(
                "UPDATE jobs SET status = 'pending', worker = NULL, lease_ms = NULL, started_ms = NULL,
                 attempts = MAX(attempts - 1, 0) WHERE id = ?1 AND status = 'running' AND worker = ?2",
                params![id, worker],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn renew(
        &self,
        id: &str,
        worker: &str,
        progress: Option<&str>,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Renewed, StoreError> {
        let (id, worker, progress) = (id.to_string(), worker.to_string(), progress.map(str::to_string));
        self.tx(move |tx| {
            let row: Option<(String, Option<String>)> = tx
                .query_row("SELECT status, worker FROM jobs WHERE id = ?1", params![id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
                .map_err(backend)?;
            Ok(match row {
                Some((s, Some(w))) if s == "running" && w == worker => {
                    tx.execute(
                        "UPDATE jobs SET lease_ms = ?2, progress = COALESCE(?3, progress) WHERE id = ?1",
                        params![id, now_ms.saturating_add(lease_ms), progress],
                    )
                    .map_err(backend)?;
                    Renewed::Running
                }
                Some((s, Some(w))) if s == "cancelled" && w == worker => Renewed::Cancelled,
                _ => Renewed::Lost,
            })
        })
        .await
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
        let (id, worker, error) = (id.to_string(), worker.to_string(), error.map(str::to_string));
        self.tx(move |tx| {
            let Some(rec) = load(tx, &id)? else { return Ok(false) };
            let n = tx
                .execute(
                    "UPDATE jobs SET status = ?3, finished_ms = ?4, expires_ms = ?5, error = ?6, result = ?7,
                     worker = NULL, lease_ms = NULL WHERE id = ?1 AND status = 'running' AND worker = ?2",
                    params![
                        id,
                        worker,
                        status.as_str(),
                        now_ms,
                        now_ms.saturating_add(rec.spec.retention_ms),
                        error,
                        result
                    ],
                )
                .map_err(backend)?;
            Ok(n == 1)
        })
        .await
    }

    async fn get(&self, tenant: &str, id: &str, now_ms: i64) -> Result<Option<JobRecord>, StoreError> {
        let (tenant, id) = (tenant.to_string(), id.to_string());
        self.tx(move |tx| Ok(load(tx, &id)?.filter(|r| r.spec.tenant == tenant && live(r, now_ms)))).await
    }

    async fn peek(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let id = id.to_string();
        self.tx(move |tx| load(tx, &id)).await
    }

    async fn status(&self, id: &str) -> Result<Option<(JobStatus, Option<i64>)>, StoreError> {
        let id = id.to_string();
        self.tx(move |tx| {
            let row: Option<(String, Option<i64>)> = tx
                .query_row("SELECT status, started_ms FROM jobs WHERE id = ?1", params![id], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()
                .map_err(backend)?;
            Ok(row.and_then(|(s, started)| JobStatus::parse(&s).map(|s| (s, started))))
        })
        .await
    }

    async fn result(&self, tenant: &str, id: &str, now_ms: i64) -> Result<Option<JobResult>, StoreError> {
        let (tenant, id) = (tenant.to_string(), id.to_string());
        self.tx(move |tx| {
            let row: Option<(String, Option<i64>, Option<String>)> = tx
                .query_row("SELECT tenant, expires_ms, result FROM jobs WHERE id = ?1", params![id], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()
                .map_err(backend)?;
            Ok(match row {
                Some((t, expires, Some(json))) if t == tenant && expires.is_none_or(|e| e > now_ms) => {
                    serde_json::from_str(&json).ok()
                }
                _ => None,
            })
        })
        .await
    }

    async fn list(
        &self,
        tenant: &str,
        status: Option<JobStatus>,
        before: Option<u64>,
        limit: usize,
        now_ms: i64,
    ) -> Result<(Vec<JobRecord>, Option<u64>), StoreError> {
        let tenant = tenant.to_string();
        self.tx(move |tx| {
            let sql = format!(
                "SELECT {COLUMNS} FROM jobs WHERE tenant = ?1 AND seq < ?2 AND (?3 IS NULL OR status = ?3)
                 AND (expires_ms IS NULL OR expires_ms > ?4) ORDER BY seq DESC LIMIT ?5"
            );
            let mut stmt = tx.prepare_cached(&sql).map_err(backend)?;
            let before = before.map_or(i64::MAX, |b| b.min(i64::MAX as u64) as i64);
            let rows = stmt
                .query_map(params![tenant, before, status.map(JobStatus::as_str), now_ms, limit as i64 + 1], record)
                .map_err(backend)?;
            let mut out = Vec::new();
            for row in rows {
                if let Some(r) = decode(row.map_err(backend)?) {
                    out.push(r);
                }
            }
            let next = if out.len() > limit {
                out.truncate(limit);
                out.last().map(|r| r.state.seq)
            } else {
                None
            };
            Ok((out, next))
        })
        .await
    }

    async fn cancel(&self, tenant: &str, id: &str, now_ms: i64) -> Result<Option<JobRecord>, StoreError> {
        let (tenant, id) = (tenant.to_string(), id.to_string());
        self.tx(move |tx| {
            let Some(rec) = load(tx, &id)?.filter(|r| r.spec.tenant == tenant && live(r, now_ms)) else {
                return Ok(None);
            };
            cancel_row(tx, &id, rec.spec.retention_ms, now_ms)?;
            Ok(Some(rec))
        })
        .await
    }

    async fn cancel_all(&self, tenant: &str, now_ms: i64) -> Result<Vec<JobRecord>, StoreError> {
        let tenant = tenant.to_string();
        self.tx(move |tx| {
            let sql = format!(
                "SELECT {COLUMNS} FROM jobs WHERE tenant = ?1 AND status IN ('pending', 'running') ORDER BY seq"
            );
            let mut stmt = tx.prepare_cached(&sql).map_err(backend)?;
            let rows = stmt.query_map(params![tenant], record).map_err(backend)?;
            let mut out = Vec::new();
            for row in rows {
                if let Some(r) = decode(row.map_err(backend)?) {
                    out.push(r);
                }
            }
            drop(stmt);
            for r in &out {
                cancel_row(tx, &r.spec.id, r.spec.retention_ms, now_ms)?;
            }
            Ok(out)
        })
        .await
    }

    async fn reap(&self, now_ms: i64, retry: RetryLost) -> Result<Reaped, StoreError> {
        self.tx(move |tx| {
            let mut out = Reaped::default();
            let lost: Vec<(String, i64, bool, i64)> = {
                let mut stmt = tx
                    .prepare_cached(
                        "SELECT j.id, j.attempts, j.idempotent, j.spec FROM jobs j WHERE j.status = 'running' AND j.lease_ms <= ?1",
                    )
                    .map_err(backend)?;
                let rows = stmt
                    .query_map(params![now_ms], |r| {
                        let spec: String = r.get(3)?;
                        let retention = serde_json::from_str::<JobSpec>(&spec).map(|s| s.retention_ms).unwrap_or(0);
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, retention))
                    })
                    .map_err(backend)?;
                rows.collect::<Result<_, _>>().map_err(backend)?
            };
            for (id, attempts, idempotent, retention_ms) in lost {
                let again = match retry {
                    RetryLost::Always => true,
                    RetryLost::Idempotent => idempotent,
                    RetryLost::Never => false,
                };
                if again && attempts < 2 {
                    tx.execute(
                        "UPDATE jobs SET status = 'pending', worker = NULL, lease_ms = NULL WHERE id = ?1",
                        params![id],
                    )
                    .map_err(backend)?;
                    out.requeued.push(id);
                } else {
                    tx.execute(
                        "UPDATE jobs SET status = 'failed', worker = NULL, lease_ms = NULL, finished_ms = ?2,
                         expires_ms = ?3, error = ?4 WHERE id = ?1",
                        params![id, now_ms, now_ms.saturating_add(retention_ms), LOST_ERROR],
                    )
                    .map_err(backend)?;
                    out.failed.push(id);
                }
            }
            out.deleted = tx
                .execute("DELETE FROM jobs WHERE expires_ms IS NOT NULL AND expires_ms <= ?1", params![now_ms])
                .map_err(backend)? as u64;
            Ok(out)
        })
        .await
    }

    async fn depth(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.tx(|tx| {
            let mut stmt = tx
                .prepare_cached("SELECT tier, COUNT(*) FROM jobs WHERE status = 'pending' GROUP BY tier ORDER BY tier")
                .map_err(backend)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64)))
                .map_err(backend)?;
            rows.collect::<Result<_, _>>().map_err(backend)
        })
        .await
    }
}
