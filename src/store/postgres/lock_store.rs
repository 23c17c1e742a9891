//! The lock / idempotency store's SQL: its bookkeeping (`cc_store_state`, `cc_store_fallback`,
//! `cc_store_correction`: migrations 0002 and 0004) and what it reads of the audit to fill Redis.
//! The facade (`store::lock_store`) calls these named functions and carries no query text.
//!
//! Outcomes are read for Redis only from batches PostgreSQL knows committed
//! (`batch_no <= cc_partition.committed_batch`): a batch past that mark may still be rolled
//! back. See docs/redis-fallback.md, "Only committed outcomes".

use std::time::Duration;

use sqlx::{PgPool, Postgres, Transaction};

use super::outcomes::{OutcomeRow, IDEMPOTENCY_ROWS};
use super::{db, Result};

/// An outcome row read for Redis, with the seconds it has left to live there.
pub type TimedRow = (OutcomeRow, i64);

type TimedTuple = (String, i64, String, String, i64, i64, i64);
/// A [`TimedTuple`] and whether its batch is known committed.
type LatestTuple = (String, i64, String, String, i64, i64, i64, bool);

fn timed(rows: Vec<TimedTuple>) -> Vec<TimedRow> {
    rows.into_iter()
        .map(|(id, fp, state, reason, seq, version, ttl)| {
            ((id, fp, state, reason, seq, version), ttl)
        })
        .collect()
}

/// The columns of an outcome for Redis, `t` being `cc_transition` and `$ttl` the TTL in seconds.
fn timed_columns(ttl: &str) -> String {
    format!(
        "t.intent_id, t.fingerprint, t.to_state, t.reason, t.commit_sequence, t.contact_version,
         ceil({ttl} - extract(epoch FROM now() - t.at))::bigint"
    )
}

/// This store's identity for Redis: its keys live under `{redis.key_prefix}:{store_id}:`. It is
/// the id migration 0014 drew for the schema, hashed with where the schema is now: the
/// cluster's `system_identifier`, the database and the schema. A copy of the schema made with
/// its rows (`pg_dump` restored into another schema, database or cluster, for staging say)
/// carries the drawn id and its epoch, but not the place: its keys are its own, so on a shared
/// Redis and key prefix it neither takes the original's outcomes for its own nor writes its own
/// into the original's (which would make the original decide intents it never decided as
/// duplicates, without an effect). Every instance of one deployment computes the same id. A
/// failover to a physical replica keeps all three, so the keys stay; a physical copy (a
/// snapshot or base backup restored under the same database and schema names) keeps them too,
/// and needs a key prefix of its own (docs/redis-fallback.md). 16 hex digits.
pub async fn store_id(pool: &PgPool) -> Result<String> {
    // PUBLIC may call it by default; where an operator or a managed service revoked it, the
    // store is keyed by its database and schema alone.
    let cluster: String = match sqlx::query_scalar(
        "SELECT system_identifier::text FROM pg_control_system()",
    )
    .fetch_one(pool)
    .await
    .map_err(db("reading the cluster's system identifier"))
    {
        Ok(id) => id,
        Err(e) if e.is_unavailable() => return Err(e),
        Err(e) => {
            tracing::warn!(error = %e, "the cluster's system identifier cannot be read: the store's Redis keys are told apart by its database and schema only");
            String::new()
        }
    };
    sqlx::query_scalar(
        "SELECT substr(md5(concat_ws('/', store_id, $1::text, current_database(),
                                     current_schema())), 1, 16)
           FROM cc_store_state WHERE id = 1",
    )
    .bind(cluster)
    .fetch_one(pool)
    .await
    .map_err(db("reading the store id"))
}

/// The PostgreSQL epoch (0 when the row is missing, which the migration prevents: it then
/// matches no Redis).
pub async fn load_epoch(pool: &PgPool) -> Result<i64> {
    let e: Option<i64> = sqlx::query_scalar("SELECT epoch FROM cc_store_state WHERE id = 1")
        .fetch_optional(pool)
        .await
        .map_err(db("reading the lock-store epoch"))?;
    Ok(e.unwrap_or(0))
}

/// Bumps the epoch, records (or lowers) this instance's watermark — outcomes written since
/// `back` ago may be missing from Redis — and writes `audit` (the mode change) as an admin audit
/// row, in one transaction. Returns the new epoch.
pub async fn register_fallback(
    pool: &PgPool,
    instance: &str,
    back: Duration,
    alive_for: Duration,
    audit: Option<serde_json::Value>,
) -> Result<i64> {
    let mut tx = pool
        .begin()
        .await
        .map_err(db("starting the fallback registration"))?;
    let epoch: i64 = sqlx::query_scalar(
        "INSERT INTO cc_store_state (id, epoch, mode, changed_by) VALUES (1, 2, 'postgres', $1)
         ON CONFLICT (id) DO UPDATE
            SET epoch = cc_store_state.epoch + 1, mode = 'postgres',
                changed_by = EXCLUDED.changed_by, updated_at = now()
         RETURNING epoch",
    )
    .bind(instance)
    .fetch_one(&mut *tx)
    .await
    .map_err(db("bumping the lock-store epoch"))?;
    sqlx::query(
        "INSERT INTO cc_store_fallback (instance, since_id, since, alive_until)
         SELECT $1, cc_transition_id_at(now() - make_interval(secs => $2)) - 1,
                now() - make_interval(secs => $2), now() + make_interval(secs => $3)
         ON CONFLICT (instance) DO UPDATE
            SET since_id = least(cc_store_fallback.since_id, EXCLUDED.since_id),
                since = least(cc_store_fallback.since, EXCLUDED.since),
                alive_until = EXCLUDED.alive_until",
    )
    .bind(instance)
    .bind(back.as_secs_f64())
    .bind(alive_for.as_secs_f64())
    .execute(&mut *tx)
    .await
    .map_err(db("recording the fallback watermark"))?;
    if let Some(detail) = audit {
        super::audit_admin(&mut *tx, "system", "lock_store_mode", "", detail).await?;
    }
    tx.commit()
        .await
        .map_err(db("committing the fallback registration"))?;
    Ok(epoch)
}

/// Keeps this instance's fallback row alive; false when it is gone.
pub async fn renew_fallback(pool: &PgPool, instance: &str, alive_for: Duration) -> Result<bool> {
    let n = sqlx::query(
        "UPDATE cc_store_fallback SET alive_until = now() + make_interval(secs => $2)
          WHERE instance = $1",
    )
    .bind(instance)
    .bind(alive_for.as_secs_f64())
    .execute(pool)
    .await
    .map_err(db("renewing the fallback row"))?
    .rows_affected();
    Ok(n > 0)
}

/// Writes the audit row of a mode change that had to wait (a failback).
pub async fn audit_mode_change(pool: &PgPool, detail: serde_json::Value) -> Result<()> {
    super::audit_admin(pool, "system", "lock_store_mode", "", detail).await
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FallbackRow {
    pub instance: String,
    pub since_id: i64,
    pub alive: bool,
}

/// A partition's last batch, not known committed when read.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct OpenBatch {
    pub topic: String,
    pub partition: i32,
    pub batch: u64,
}

/// What a resynchronisation starts from, read in one snapshot.
#[derive(Debug, Clone)]
pub struct SyncView {
    pub epoch: i64,
    pub fallbacks: Vec<FallbackRow>,
    /// The newest `cc_transition` id.
    pub max_id: i64,
    /// Every partition whose last batch is not known committed.
    pub open: Vec<OpenBatch>,
}

impl SyncView {
    /// Instances other than `instance` whose fallback is alive (their decisions may be missing
    /// from Redis, and more may come).
    pub fn live_fallbacks_except(&self, instance: &str) -> Vec<String> {
        self.fallbacks
            .iter()
            .filter(|r| r.alive && r.instance != instance)
            .map(|r| r.instance.clone())
            .collect()
    }

    pub fn lowest_watermark(&self) -> Option<i64> {
        self.fallbacks.iter().map(|r| r.since_id).min()
    }
}

async fn repeatable_read(
    pool: &PgPool,
    what: &'static str,
) -> Result<Transaction<'static, Postgres>> {
    let mut tx = pool.begin().await.map_err(db(what))?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await
        .map_err(db(what))?;
    Ok(tx)
}

pub async fn read_sync_view(pool: &PgPool) -> Result<SyncView> {
    let mut tx = repeatable_read(pool, "starting the resynchronisation's read").await?;
    let epoch: Option<i64> = sqlx::query_scalar("SELECT epoch FROM cc_store_state WHERE id = 1")
        .fetch_optional(&mut *tx)
        .await
        .map_err(db("reading the lock-store epoch"))?;
    let fallbacks: Vec<(String, i64, bool)> = sqlx::query_as(
        "SELECT instance, since_id, alive_until > now() FROM cc_store_fallback ORDER BY instance",
    )
    .fetch_all(&mut *tx)
    .await
    .map_err(db("reading fallback rows"))?;
    let max_id: i64 = sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM cc_transition")
        .fetch_one(&mut *tx)
        .await
        .map_err(db("reading the newest transition"))?;
    let open: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT topic, partition, last_batch FROM cc_partition
          WHERE last_batch > committed_batch ORDER BY topic, partition",
    )
    .fetch_all(&mut *tx)
    .await
    .map_err(db("reading partitions with a batch not known committed"))?;
    tx.commit().await.map_err(db("ending a state read"))?;
    Ok(SyncView {
        epoch: epoch.unwrap_or(0),
        fallbacks: fallbacks
            .into_iter()
            .map(|(instance, since_id, alive)| FallbackRow {
                instance,
                since_id,
                alive,
            })
            .collect(),
        max_id,
        open: open
            .into_iter()
            .map(|(topic, partition, batch)| OpenBatch {
                topic,
                partition,
                batch: batch.max(0) as u64,
            })
            .collect(),
    })
}

/// The smallest transition id written at most `age` ago.
pub async fn transition_id_since(pool: &PgPool, age: Duration) -> Result<i64> {
    sqlx::query_scalar("SELECT cc_transition_id_at(now() - make_interval(secs => $1))")
        .bind(age.as_secs_f64())
        .fetch_one(pool)
        .await
        .map_err(db("finding the oldest outcome to resynchronise"))
}

/// The idempotency rows with ids in `[lo, hi)` of batches known committed, younger than `ttl`,
/// in id order.
pub async fn committed_outcomes_between(
    pool: &PgPool,
    lo: i64,
    hi: i64,
    ttl: Duration,
) -> Result<Vec<TimedRow>> {
    let rows: Vec<TimedTuple> = sqlx::query_as(&format!(
        "SELECT {}
           FROM cc_transition t
           JOIN cc_partition p ON p.topic = t.topic AND p.partition = t.partition
          WHERE t.id >= $1 AND t.id < $2 AND {IDEMPOTENCY_ROWS}
            AND t.batch_no <= p.committed_batch
            AND t.at > now() - make_interval(secs => $3)
          ORDER BY t.id",
        timed_columns("$3")
    ))
    .bind(lo)
    .bind(hi)
    .bind(ttl.as_secs_f64())
    .fetch_all(pool)
    .await
    .map_err(db("reading outcomes to resynchronise"))?;
    Ok(timed(rows))
}

/// The idempotency rows of one batch, if PostgreSQL knows it committed (none otherwise),
/// younger than `ttl`, in id order.
pub async fn committed_batch_outcomes(
    pool: &PgPool,
    topic: &str,
    partition: i32,
    batch: u64,
    ttl: Duration,
) -> Result<Vec<TimedRow>> {
    let rows: Vec<TimedTuple> = sqlx::query_as(&format!(
        "SELECT {}
           FROM cc_transition t
           JOIN cc_partition p ON p.topic = t.topic AND p.partition = t.partition
          WHERE t.topic = $1 AND t.partition = $2 AND t.batch_no = $3 AND {IDEMPOTENCY_ROWS}
            AND t.batch_no <= p.committed_batch
            AND t.at > now() - make_interval(secs => $4)
          ORDER BY t.id",
        timed_columns("$4")
    ))
    .bind(topic)
    .bind(partition)
    .bind(batch as i64)
    .bind(ttl.as_secs_f64())
    .fetch_all(pool)
    .await
    .map_err(db("reading a committed batch's outcomes"))?;
    Ok(timed(rows))
}

/// `(committed_batch, last_batch)` of each listed partition that has a row.
pub async fn partition_batches(
    pool: &PgPool,
    partitions: &[(String, i32)],
) -> Result<Vec<((String, i32), (u64, u64))>> {
    let rows: Vec<(String, i32, i64, i64)> = sqlx::query_as(
        "SELECT p.topic, p.partition, p.committed_batch, p.last_batch
           FROM cc_partition p
           JOIN unnest($1::text[], $2::integer[]) AS k(topic, partition)
             ON p.topic = k.topic AND p.partition = k.partition",
    )
    .bind(partitions.iter().map(|p| p.0.clone()).collect::<Vec<_>>())
    .bind(partitions.iter().map(|p| p.1).collect::<Vec<_>>())
    .fetch_all(pool)
    .await
    .map_err(db("reading partitions' batches"))?;
    Ok(rows
        .into_iter()
        .map(|(t, p, c, l)| ((t, p), (c.max(0) as u64, l.max(0) as u64)))
        .collect())
}

/// A rolled-back intent id whose Redis entry may be wrong (noted by the rollback itself: the
/// trigger of migration 0004).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotedCorrection {
    pub id: i64,
    pub intent_id: String,
}

/// The pending corrections (of one partition, or all) and the rollback counter, in one
/// snapshot: a rollback that is not in the list has bumped the counter past `rollbacks`.
#[derive(Debug, Clone, Default)]
pub struct Corrections {
    pub rollbacks: i64,
    pub noted: Vec<NotedCorrection>,
}

pub async fn pending_corrections(
    pool: &PgPool,
    partition: Option<(&str, i32)>,
) -> Result<Corrections> {
    let mut tx = repeatable_read(pool, "starting to read corrections").await?;
    let rollbacks: Option<i64> =
        sqlx::query_scalar("SELECT rollbacks FROM cc_store_state WHERE id = 1")
            .fetch_optional(&mut *tx)
            .await
            .map_err(db("reading the rollback counter"))?;
    let noted: Vec<(i64, String)> = sqlx::query_as(
        "SELECT id, intent_id FROM cc_store_correction
          WHERE $1::text IS NULL OR (topic = $1 AND partition = $2)
          ORDER BY id",
    )
    .bind(partition.map(|p| p.0))
    .bind(partition.map_or(0, |p| p.1))
    .fetch_all(&mut *tx)
    .await
    .map_err(db("reading pending corrections"))?;
    tx.commit().await.map_err(db("ending a corrections read"))?;
    Ok(Corrections {
        rollbacks: rollbacks.unwrap_or(0),
        noted: noted
            .into_iter()
            .map(|(id, intent_id)| NotedCorrection { id, intent_id })
            .collect(),
    })
}

/// Removes corrections that were applied to Redis.
pub async fn forget_corrections(pool: &PgPool, ids: &[i64]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM cc_store_correction WHERE id = ANY($1)")
        .bind(ids)
        .execute(pool)
        .await
        .map_err(db("removing applied corrections"))?;
    Ok(())
}

/// The latest idempotency row of each of `intent_ids` (ids without one are absent), whether its
/// batch is known committed, and the seconds it has left to live in Redis (`ttl` after it was
/// written; zero or less when expired).
pub async fn latest_outcomes(
    pool: &PgPool,
    intent_ids: &[String],
    ttl: Duration,
) -> Result<Vec<(TimedRow, bool)>> {
    let rows: Vec<LatestTuple> = sqlx::query_as(&format!(
        "SELECT DISTINCT ON (t.intent_id) {},
                    coalesce(t.batch_no <= p.committed_batch, false)
               FROM cc_transition t
               LEFT JOIN cc_partition p ON p.topic = t.topic AND p.partition = t.partition
              WHERE t.intent_id = ANY($1) AND {IDEMPOTENCY_ROWS}
              ORDER BY t.intent_id, t.id DESC",
        timed_columns("$2")
    ))
    .bind(intent_ids)
    .bind(ttl.as_secs_f64())
    .fetch_all(pool)
    .await
    .map_err(db("reading the outcomes of rolled-back intents"))?;
    Ok(rows
        .into_iter()
        .map(|(id, fp, state, reason, seq, version, ttl, committed)| {
            (((id, fp, state, reason, seq, version), ttl), committed)
        })
        .collect())
}

/// The final step of a resynchronisation, under the lock-store state row's lock: no fallback
/// registers and no rollback commits between its checks and [`MarkTx::finish`] (both update
/// that row), so the epoch key written in between is true when written.
pub struct MarkTx<'a> {
    tx: Transaction<'a, Postgres>,
}

/// The lock-store state as seen under its lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockedState {
    pub epoch: i64,
    pub rollbacks: i64,
}

impl<'a> MarkTx<'a> {
    pub async fn begin(pool: &'a PgPool) -> Result<Self> {
        let tx = pool
            .begin()
            .await
            .map_err(db("starting the resynchronisation mark"))?;
        Ok(Self { tx })
    }

    pub async fn lock_state(&mut self) -> Result<LockedState> {
        let row: Option<(i64, i64)> =
            sqlx::query_as("SELECT epoch, rollbacks FROM cc_store_state WHERE id = 1 FOR UPDATE")
                .fetch_optional(&mut *self.tx)
                .await
                .map_err(db("locking the lock-store state"))?;
        let (epoch, rollbacks) = row.unwrap_or((0, 0));
        Ok(LockedState { epoch, rollbacks })
    }

    /// Instances other than `instance` whose fallback row is alive.
    pub async fn live_fallbacks_except(&mut self, instance: &str) -> Result<Vec<String>> {
        sqlx::query_scalar(
            "SELECT instance FROM cc_store_fallback WHERE instance <> $1 AND alive_until > now()",
        )
        .bind(instance)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db("reading fallback rows"))
    }

    /// Redis is marked: this instance's and dead fallback rows are covered, the applied
    /// corrections are done.
    pub async fn finish(mut self, instance: &str, applied_corrections: &[i64]) -> Result<()> {
        sqlx::query("DELETE FROM cc_store_fallback WHERE instance = $1 OR alive_until <= now()")
            .bind(instance)
            .execute(&mut *self.tx)
            .await
            .map_err(db("clearing fallback rows"))?;
        sqlx::query("DELETE FROM cc_store_correction WHERE id = ANY($1)")
            .bind(applied_corrections)
            .execute(&mut *self.tx)
            .await
            .map_err(db("removing applied corrections"))?;
        sqlx::query(
            "UPDATE cc_store_state SET mode = 'redis', changed_by = $1, updated_at = now()
              WHERE id = 1",
        )
        .bind(instance)
        .execute(&mut *self.tx)
        .await
        .map_err(db("recording the synchronisation"))?;
        self.tx
            .commit()
            .await
            .map_err(db("committing the resynchronisation mark"))
    }
}
