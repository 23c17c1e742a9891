//! Partition leases, fencing tokens, and restores against the recovery point.

use sqlx::{PgPool, Row};

use super::outcomes::IDEMPOTENCY_ROWS;
use super::{db, Error, Result};
use crate::store::recovery::{self, KafkaCommitted, Resume, StoreView};

/// Takes the lease of one input partition for `owner` and returns a new fencing token, or
/// `None` while another owner holds a live lease. The same owner (a restarted instance) takes
/// its own lease back at once.
///
/// An owner that refused to restore the partition (`refused_fence`, see [`restore_partition`])
/// keeps refusing under its new token until its next restore decides again: the refusal is
/// carried over. Before, each retry's new token made the refusal stale for the half second
/// the retry spent asking Kafka before it refused again, and a `recovery-point resolve`
/// applied in that moment was refused as if no owner refused (the test
/// `offsets::a_resolve_never_takes_another_partitions_review_for_the_batchs_own` met it once
/// `resolve` read a little longer). A new owner's token still makes it stale.
pub async fn acquire_partition(
    pool: &PgPool,
    topic: &str,
    partition: i32,
    owner: &str,
    lease: std::time::Duration,
) -> Result<Option<u64>> {
    let fence: Option<i64> = sqlx::query_scalar(
        "INSERT INTO cc_partition (topic, partition, fence, owner, lease_until)
         VALUES ($1, $2, nextval('cc_fence_seq'), $3, now() + make_interval(secs => $4))
         ON CONFLICT (topic, partition) DO UPDATE
            SET fence = EXCLUDED.fence, owner = EXCLUDED.owner,
                lease_until = EXCLUDED.lease_until, updated_at = now(),
                refused_fence = CASE
                    WHEN cc_partition.refused_fence = cc_partition.fence
                     AND cc_partition.owner = EXCLUDED.owner THEN EXCLUDED.fence
                    ELSE cc_partition.refused_fence END
          WHERE cc_partition.owner = EXCLUDED.owner OR cc_partition.lease_until < now()
         RETURNING fence",
    )
    .bind(topic)
    .bind(partition)
    .bind(owner)
    .bind(lease.as_secs_f64())
    .fetch_optional(pool)
    .await
    .map_err(db("acquiring a partition lease"))?;
    Ok(fence.map(|f| f as u64))
}

/// Gives a partition's lease up (on revocation or shutdown) so the next owner starts at once.
pub async fn release_partition(
    pool: &PgPool,
    topic: &str,
    partition: i32,
    fence: u64,
) -> Result<()> {
    sqlx::query(
        "UPDATE cc_partition SET lease_until = now() WHERE topic = $1 AND partition = $2 AND fence = $3",
    )
    .bind(topic)
    .bind(partition)
    .bind(fence as i64)
    .execute(pool)
    .await
    .map_err(db("releasing a partition lease"))?;
    Ok(())
}

/// What bounds a restore: the log it must resume within, and how long each of its statements
/// may take.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreBounds {
    /// The partition's offsets now: the resume point must lie in them (`None` skips that
    /// check).
    pub log: Option<recovery::LogRange>,
    /// Each statement's limit, when it must differ from the session's
    /// (`postgres.statement_timeout`). A restore reads and reverts the state of every contact
    /// of the partition, so its statements grow with the partition, unlike a batch's.
    pub statement_timeout: Option<std::time::Duration>,
}

/// Brings a partition's durable state back to its last committed batch, reconciling Kafka's
/// committed offset (`kafka`) with what PostgreSQL knows ([`recovery::decide`]): rows of later
/// batches were written before a Kafka transaction that never committed, so they are removed
/// (contacts get their previous version back, commands become pending again). Returns the
/// partition's contact states and where it resumes. Fails with a fenced error when `fence` is
/// no longer the partition's token, and with [`Error::Refused`] when the two stores cannot be
/// reconciled without guessing, or the resume point is outside `bounds.log`: nothing changed
/// then but the record that this owner refuses (`cc_partition.refused_fence`, which `resolve`
/// requires).
pub async fn restore_partition(
    pool: &PgPool,
    topic: &str,
    partition: i32,
    fence: u64,
    group: &str,
    kafka: &KafkaCommitted,
    bounds: RestoreBounds,
) -> Result<RestoredPartition> {
    let log = bounds.log;
    let mut tx = pool.begin().await.map_err(db("starting a restore"))?;
    if let Some(timeout) = bounds.statement_timeout {
        sqlx::query("SELECT set_config('statement_timeout', $1, true)")
            .bind(format!("{}ms", timeout.as_millis()))
            .execute(&mut *tx)
            .await
            .map_err(db("setting a restore's statement timeout"))?;
    }
    type Row = (
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
        Option<String>,
        Option<String>,
    );
    let row: Option<Row> = sqlx::query_as(
        "SELECT fence, last_batch, last_next_offset, last_clock_ms,
                committed_batch, committed_next_offset, committed_clock_ms, writer_group,
                topic_id
           FROM cc_partition WHERE topic = $1 AND partition = $2 FOR UPDATE",
    )
    .bind(topic)
    .bind(partition)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db("locking a partition"))?;
    let Some((
        current,
        last,
        last_next,
        last_clock,
        committed,
        committed_next,
        committed_clock,
        writer_group,
        topic_id,
    )) = row.filter(|r| r.0 == fence as i64)
    else {
        return Err(Error::Db {
            what: "restoring a partition",
            source: sqlx::Error::Protocol(format!(
                "fenced: partition {partition} no longer has token {fence}"
            )),
        });
    };
    debug_assert_eq!(current, fence as i64);
    let store = StoreView {
        last_batch: last.max(0) as u64,
        last_next_offset: last_next,
        last_clock_ms: last_clock.max(0) as u64,
        committed_batch: committed.max(0) as u64,
        committed_next_offset: committed_next,
        committed_clock_ms: committed_clock.max(0) as u64,
        // NULL: restored last by a version that did not record it.
        written_under_another_group: writer_group.as_deref().is_some_and(|g| g != group),
        // NULL (or not an id): not recorded, nothing to compare.
        topic_id: topic_id.as_deref().and_then(|t| t.parse().ok()),
    };
    let decided = recovery::decide(kafka, &store).and_then(|r| match log {
        Some(log) => recovery::within_log(r, &store, log),
        None => Ok(r),
    });
    let resume = match decided {
        Ok(resume) => resume,
        Err(refusal) => {
            // Nothing of the restore is written but who refuses: `resolve` acts only for a
            // refusing owner (migration 0020).
            sqlx::query(
                "UPDATE cc_partition SET refused_fence = $3
                  WHERE topic = $1 AND partition = $2 AND refused_fence IS DISTINCT FROM $3",
            )
            .bind(topic)
            .bind(partition)
            .bind(fence as i64)
            .execute(&mut *tx)
            .await
            .map_err(db("recording a refused restore"))?;
            tx.commit()
                .await
                .map_err(db("recording a refused restore"))?;
            return Err(Error::Refused { partition, refusal });
        }
    };
    let b = resume.batch as i64;
    let dropped: Vec<(String, bool)> = sqlx::query_as(&format!(
        "DELETE FROM cc_transition WHERE topic = $1 AND partition = $2 AND batch_no > $3
         RETURNING intent_id, ({IDEMPOTENCY_ROWS})"
    ))
    .bind(topic)
    .bind(partition)
    .bind(b)
    .fetch_all(&mut *tx)
    .await
    .map_err(db("dropping uncommitted transitions"))?;
    let dropped_transitions = dropped.len() as u64;
    let mut rolled_back_outcomes: Vec<String> = dropped
        .into_iter()
        .filter(|(_, outcome)| *outcome)
        .map(|(id, _)| id)
        .collect();
    rolled_back_outcomes.sort_unstable();
    rolled_back_outcomes.dedup();
    // Their claims (migration 0015) go with them: decided by a batch that never committed.
    if !rolled_back_outcomes.is_empty() {
        sqlx::query(
            "DELETE FROM cc_decided
              WHERE intent_id = ANY($4) AND topic = $1 AND partition = $2 AND batch_no > $3",
        )
        .bind(topic)
        .bind(partition)
        .bind(b)
        .bind(&rolled_back_outcomes)
        .execute(&mut *tx)
        .await
        .map_err(db("dropping uncommitted claims"))?;
    }
    let reverted = sqlx::query(
        "UPDATE cc_contact
            SET state = prev_state, batch_no = prev_batch_no,
                on_hold = coalesce(jsonb_typeof(prev_state -> 'hold') = 'object', false),
                waiting = coalesce(jsonb_array_length(prev_state -> 'waiting'), 0),
                prev_state = NULL, prev_batch_no = NULL, updated_at = now()
          WHERE topic = $1 AND partition = $2 AND batch_no > $3
            AND prev_batch_no IS NOT NULL AND prev_batch_no <= $3",
    )
    .bind(topic)
    .bind(partition)
    .bind(b)
    .execute(&mut *tx)
    .await
    .map_err(db("reverting uncommitted contact states"))?
    .rows_affected();
    // Waiting rows no committed state names: written by a batch rolled back here, or released
    // by the last committed batch (the next batch would have deleted them). Before the
    // uncommitted contacts go, whose rows are among them.
    sqlx::query(
        "DELETE FROM cc_waiting w
          USING cc_contact c
          WHERE c.topic = $1 AND c.partition = $2 AND w.contact_id = c.contact_id
            AND (c.batch_no > $3
                 OR NOT EXISTS (
                    SELECT 1 FROM jsonb_array_elements(c.state -> 'waiting') x
                     WHERE (x ->> 'commit_sequence')::bigint = w.commit_sequence
                       AND (x ->> 'row')::bigint = w.batch_no))",
    )
    .bind(topic)
    .bind(partition)
    .bind(b)
    .execute(&mut *tx)
    .await
    .map_err(db("dropping waiting rows no committed state names"))?;
    // Contacts first written after the restored batch stay the partition's, without state
    // (migration 0018): another partition may have learnt this owner and forwarded their
    // records here; the owner creates them again from its own log.
    let dropped_contacts = sqlx::query(
        "UPDATE cc_contact
            SET state = NULL, batch_no = $3, on_hold = false, waiting = 0,
                prev_state = NULL, prev_batch_no = NULL, updated_at = now()
          WHERE topic = $1 AND partition = $2 AND batch_no > $3",
    )
    .bind(topic)
    .bind(partition)
    .bind(b)
    .execute(&mut *tx)
    .await
    .map_err(db("emptying uncommitted contacts"))?
    .rows_affected();
    sqlx::query(
        "UPDATE cc_command SET applied_batch = NULL, result = NULL
          WHERE topic = $1 AND partition = $2 AND applied_batch > $3",
    )
    .bind(topic)
    .bind(partition)
    .bind(b)
    .execute(&mut *tx)
    .await
    .map_err(db("reverting uncommitted commands"))?;
    sqlx::query(
        "UPDATE cc_partition
            SET last_batch = $3, last_next_offset = $4, last_clock_ms = $5,
                committed_batch = $3, committed_next_offset = $4, committed_clock_ms = $5,
                writer_group = $6, topic_id = coalesce($7, topic_id), refused_fence = NULL
          WHERE topic = $1 AND partition = $2",
    )
    .bind(topic)
    .bind(partition)
    .bind(b)
    .bind(resume.next_offset)
    .bind(resume.clock_ms as i64)
    .bind(group)
    .bind(log.and_then(|l| l.topic_id).map(|t| t.to_string()))
    .execute(&mut *tx)
    .await
    .map_err(db("recording the restored batch"))?;
    // `cc_resolved_state` (a call with a subquery, about 18 us a row) only for a contact whose
    // state names waiting intents: for an idle contact it returns the state as it is, and a
    // partition is mostly idle contacts (200,000 of them: 3.8 s with a call for each, 0.16 s).
    let states: Vec<serde_json::Value> = sqlx::query_scalar(
        "SELECT CASE WHEN state -> 'waiting' = '[]'::jsonb THEN state
                     ELSE cc_resolved_state(contact_id, state) END
           FROM cc_contact
          WHERE topic = $1 AND partition = $2 AND state IS NOT NULL ORDER BY contact_id",
    )
    .bind(topic)
    .bind(partition)
    .fetch_all(&mut *tx)
    .await
    .map_err(db("loading contact states"))?;
    tx.commit().await.map_err(db("committing a restore"))?;
    Ok(RestoredPartition {
        states,
        resume,
        previous_group: writer_group.filter(|_| store.written_under_another_group),
        dropped_transitions,
        reverted_contacts: reverted + dropped_contacts,
        rolled_back_outcomes,
    })
}

#[derive(Debug)]
pub struct RestoredPartition {
    pub states: Vec<serde_json::Value>,
    /// Where the partition resumes.
    pub resume: Resume,
    /// The other consumer group that wrote the partition last, when there is one: PostgreSQL
    /// alone decided where it resumes.
    pub previous_group: Option<String>,
    /// Uncommitted rows removed: evidence of a transaction that did not commit.
    pub dropped_transitions: u64,
    pub reverted_contacts: u64,
    /// Intent ids whose uncommitted outcome rows were removed (the idempotency cache must not
    /// keep them).
    pub rolled_back_outcomes: Vec<String>,
}

/// Records that each `(partition, fence, batch)` is its partition's committed batch (the next
/// batch's write records it too; this covers a partition that then goes quiet, a clean stop,
/// a revoke). Only a partition's current writer, and only for its last batch, in one round
/// trip. Waits for a row another transaction holds: see [`mark_committed_if_free`] for the
/// engine's own, best-effort, call after each commit.
pub async fn mark_committed(pool: &PgPool, topic: &str, batches: &[(i32, u64, u64)]) -> Result<()> {
    if batches.is_empty() {
        return Ok(());
    }
    bind_batches(
        sqlx::query(
            "UPDATE cc_partition p
                SET committed_batch = p.last_batch, committed_next_offset = p.last_next_offset,
                    committed_clock_ms = p.last_clock_ms
               FROM unnest($2::integer[], $3::bigint[], $4::bigint[]) AS x(part, fence, b)
              WHERE p.topic = $1 AND p.partition = x.part AND p.fence = x.fence
                AND p.last_batch = x.b",
        ),
        topic,
        batches,
    )
    .execute(pool)
    .await
    .map_err(db("recording committed batches"))?;
    Ok(())
}

/// [`mark_committed`] right after a Kafka commit, off the engine's thread, without waiting:
/// a partition's row that the next batch's write already holds is skipped (that write records
/// the commit itself), and the change is not waited for on disk (best effort: a restore never
/// depends on it). Waiting instead made both writes of the next batch queue behind it while it
/// queued behind one of them: 100 to 150 ms stalls of the durable write, seen in PostgreSQL's
/// lock-wait log under the bench.
///
/// Returns the partitions it marked (those skipped, or whose row moved on, are not listed).
pub async fn mark_committed_if_free(
    pool: &PgPool,
    topic: &str,
    batches: &[(i32, u64, u64)],
) -> Result<Vec<i32>> {
    if batches.is_empty() {
        return Ok(Vec::new());
    }
    // One statement, so its own transaction: a process frozen mid-call (a paused VM, SIGSTOP)
    // never holds these rows between two statements, where no other instance could take its
    // leases over until it woke. `synchronous_commit` is set for this transaction only, inside
    // the statement (a CTE the locking read joins, so that it runs).
    let rows = bind_batches(
        sqlx::query(
            "WITH settings AS MATERIALIZED (
                 SELECT set_config('synchronous_commit', 'off', true)
             ),
             free AS (
                 SELECT p.partition
                   FROM cc_partition p
                   JOIN unnest($2::integer[], $3::bigint[], $4::bigint[]) AS x(part, fence, b)
                     ON p.partition = x.part AND p.fence = x.fence AND p.last_batch = x.b
                  CROSS JOIN settings
                  WHERE p.topic = $1
                    FOR UPDATE OF p SKIP LOCKED
             )
             UPDATE cc_partition p
                SET committed_batch = p.last_batch, committed_next_offset = p.last_next_offset,
                    committed_clock_ms = p.last_clock_ms
               FROM free
              WHERE p.topic = $1 AND p.partition = free.partition
          RETURNING p.partition",
        ),
        topic,
        batches,
    )
    .fetch_all(pool)
    .await
    .map_err(db("recording committed batches"))?;
    rows.iter()
        .map(|r| r.try_get::<i32, _>(0))
        .collect::<std::result::Result<_, _>>()
        .map_err(db("recording committed batches"))
}

/// Binds `topic` and the `(partition, fence, batch)` columns as `$1` to `$4`.
fn bind_batches<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    topic: &'q str,
    batches: &[(i32, u64, u64)],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(topic)
        .bind(batches.iter().map(|b| b.0).collect::<Vec<_>>())
        .bind(batches.iter().map(|b| b.1 as i64).collect::<Vec<_>>())
        .bind(batches.iter().map(|b| b.2 as i64).collect::<Vec<_>>())
}

/// An operator's answer to a refused restore ([`Refusal::Ambiguous`](crate::store::recovery::Refusal)):
/// whether the partition's last batch committed in Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Its outputs are on the output topics: keep it.
    Committed,
    /// It never committed: the next restore rolls its rows back and its records are replayed.
    Aborted,
}

/// A partition's batches as PostgreSQL knows them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct BatchView {
    pub partition: i32,
    #[sqlx(try_from = "i64")]
    pub last_batch: u64,
    #[sqlx(try_from = "i64")]
    pub committed_batch: u64,
    pub last_next_offset: i64,
    pub committed_next_offset: i64,
    /// The consumer group that last restored the partition, so wrote its batches since (NULL:
    /// restored last by a version that did not record it).
    pub writer_group: Option<String>,
    /// The id of the topic its batches were consumed from, as recorded at its last restore
    /// (NULL: not recorded).
    pub topic_id: Option<String>,
    /// Its current owner refuses to restore it (`store::recovery`'s refusals): it writes no
    /// batch until an operator resolves or moves it, or its next restore succeeds.
    pub refused: bool,
}

/// The columns of a [`BatchView`], from `cc_partition`.
const BATCH_VIEW: &str = "SELECT partition, greatest(last_batch, 0) AS last_batch,
        greatest(committed_batch, 0) AS committed_batch, last_next_offset,
        committed_next_offset, writer_group, topic_id,
        coalesce(refused_fence = fence, false) AS refused
   FROM cc_partition";

/// What PostgreSQL knows of every partition of `topic`.
pub async fn batch_views(pool: &PgPool, topic: &str) -> Result<Vec<BatchView>> {
    sqlx::query_as(&format!("{BATCH_VIEW} WHERE topic = $1 ORDER BY partition"))
        .bind(topic)
        .fetch_all(pool)
        .await
        .map_err(db("reading partitions"))
}

/// What a batch produced, to look for on the output topics: effects by (intent id, commit
/// sequence), review records by their source partition and offset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutputs {
    /// The input partition the batch was consumed from (its reviews name it).
    pub partition: i32,
    pub effects: Vec<(String, u64)>,
    pub reviews: Vec<i64>,
    /// When the batch was written (ms since the Unix epoch), 0 when it wrote nothing: the
    /// earlier of PostgreSQL's time of its audit rows and the writer's own clock when it
    /// decided the batch (`cc_partition.last_decided_ms`, migration 0021). The output records
    /// carry the writer's clock, which may be behind PostgreSQL's.
    pub written_at_ms: i64,
}

/// The outputs batch `batch` of `partition` produced, read from its audit rows.
pub async fn batch_outputs(
    pool: &PgPool,
    topic: &str,
    partition: i32,
    batch: u64,
) -> Result<BatchOutputs> {
    // Each row's time is the earlier of PostgreSQL's and the writer's clock (`least` skips a
    // NULL: a batch written before migration 0021, or not the partition's last).
    let rows: Vec<(String, String, i64, i64, i64)> = sqlx::query_as(
        "SELECT t.to_state, t.intent_id, t.commit_sequence, t.source_offset,
                least((extract(epoch FROM t.at) * 1000)::bigint, p.last_decided_ms)
           FROM cc_transition t
           LEFT JOIN cc_partition p
             ON p.topic = t.topic AND p.partition = t.partition AND p.last_batch = t.batch_no
          WHERE t.topic = $1 AND t.partition = $2 AND t.batch_no = $3
            AND t.to_state IN ('committed_causal', 'blocked_conflict', 'manual_review')",
    )
    .bind(topic)
    .bind(partition)
    .bind(batch as i64)
    .fetch_all(pool)
    .await
    .map_err(db("reading a batch's outputs"))?;
    let mut out = BatchOutputs {
        partition,
        ..BatchOutputs::default()
    };
    for (state, intent_id, seq, offset, at) in rows {
        if out.written_at_ms == 0 || at < out.written_at_ms {
            out.written_at_ms = at;
        }
        if state == "committed_causal" {
            out.effects.push((intent_id, seq.max(0) as u64));
        } else {
            out.reviews.push(offset);
        }
    }
    Ok(out)
}

/// A partition's batches, its row locked until `tx` ends (`None`: never written).
async fn lock_partition(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    topic: &str,
    partition: i32,
) -> Result<Option<BatchView>> {
    sqlx::query_as(&format!(
        "{BATCH_VIEW} WHERE topic = $1 AND partition = $2 FOR UPDATE"
    ))
    .bind(topic)
    .bind(partition)
    .fetch_optional(&mut **tx)
    .await
    .map_err(db("locking a partition"))
}

/// Moves where a partition resumes to `to`, for a partition whose log (`log`, now) no longer
/// holds its resume point (records deleted before they were consumed), or is another log (the
/// topic recreated: its id is not the one recorded): audited, and refused when the log still
/// holds the point and is the one consumed (this never skips a record the log has) or the last
/// batch is not known committed (`resolve` it first). Records the topic's id. Returns the
/// previous resume offset.
pub async fn move_resume_point(
    pool: &PgPool,
    topic: &str,
    partition: i32,
    log: recovery::LogRange,
    to: i64,
    actor: &str,
) -> Result<i64> {
    let mut tx = pool.begin().await.map_err(db("starting a move"))?;
    let Some(view) = lock_partition(&mut tx, topic, partition).await? else {
        return Err(Error::NotMoved(format!(
            "partition {partition} has no durable state: it starts at its log's first offset by itself"
        )));
    };
    let from = view.last_next_offset;
    if view.last_batch != view.committed_batch {
        return Err(Error::NotMoved(format!(
            "partition {partition}'s last batch {} is not known committed: run \
             `causal-commit recovery-point resolve --partition {partition}` first",
            view.last_batch
        )));
    }
    let consumed: Option<recovery::TopicId> = view.topic_id.as_deref().and_then(|t| t.parse().ok());
    let replaced = matches!((consumed, log.topic_id), (Some(a), Some(b)) if a != b);
    if (log.low..=log.high).contains(&from) && !replaced {
        return Err(Error::NotMoved(format!(
            "partition {partition} resumes at offset {from}, which its log ({} to {}) still \
             holds: nothing to move (this command never skips records the log has)",
            log.low, log.high
        )));
    }
    sqlx::query(
        "UPDATE cc_partition
            SET last_next_offset = $3, committed_next_offset = $3,
                topic_id = coalesce($4, topic_id)
          WHERE topic = $1 AND partition = $2",
    )
    .bind(topic)
    .bind(partition)
    .bind(to)
    .bind(log.topic_id.map(|t| t.to_string()))
    .execute(&mut *tx)
    .await
    .map_err(db("moving a resume point"))?;
    super::audit_admin(
        &mut *tx,
        actor,
        "recovery_point_moved",
        "",
        serde_json::json!({
            "topic": topic,
            "partition": partition,
            "from": from,
            "to": to,
            "log_start": log.low,
            "log_end": log.high,
            "consumed_topic_id": view.topic_id,
            "topic_id": log.topic_id.map(|t| t.to_string()),
        }),
    )
    .await?;
    tx.commit().await.map_err(db("committing a move"))?;
    Ok(from)
}

/// Why `recovery-point resolve` leaves a partition alone whose last batch is not known
/// committed while no owner refuses it: that batch is its owner's to settle. Its running owner
/// may be committing it in Kafka right now (PostgreSQL is written first, and the record that
/// it committed follows the commit), and a restore settles it from Kafka's recovery point.
/// Deciding it from the output topics could call a batch aborted whose transaction commits a
/// moment later.
pub fn not_refusing(view: &BatchView) -> Error {
    Error::NotMoved(format!(
        "partition {}'s last batch {} is not known committed yet, but no owner refuses the \
         partition: the batch is its owner's to settle (a running owner records it committed \
         once its Kafka transaction commits; a restore settles it from Kafka's recovery \
         point). `resolve` is only for a partition whose owner refuses to start it (its log \
         says `partition not restored yet; paused` with the refusal, and `recovery-point \
         show` reads refused_by_owner true); nothing was changed",
        view.partition, view.last_batch
    ))
}

/// Records an operator's [`Resolution`] of a partition's last batch, audited, for a partition
/// whose owner refuses to restore it ([`not_refusing`] otherwise). Nothing changes when
/// PostgreSQL already knows the last batch committed. Returns the view before.
pub async fn resolve_recovery_point(
    pool: &PgPool,
    topic: &str,
    partition: i32,
    resolution: Resolution,
    actor: &str,
) -> Result<Option<BatchView>> {
    let mut tx = pool.begin().await.map_err(db("starting a resolution"))?;
    let Some(view) = lock_partition(&mut tx, topic, partition).await? else {
        return Ok(None);
    };
    if view.last_batch != view.committed_batch {
        if !view.refused {
            return Err(not_refusing(&view));
        }
        let sql = match resolution {
            Resolution::Committed => {
                "UPDATE cc_partition SET committed_batch = last_batch,
                        committed_next_offset = last_next_offset,
                        committed_clock_ms = last_clock_ms
                  WHERE topic = $1 AND partition = $2"
            }
            Resolution::Aborted => {
                "UPDATE cc_partition SET last_batch = committed_batch,
                        last_next_offset = committed_next_offset,
                        last_clock_ms = committed_clock_ms
                  WHERE topic = $1 AND partition = $2"
            }
        };
        sqlx::query(sql)
            .bind(topic)
            .bind(partition)
            .execute(&mut *tx)
            .await
            .map_err(db("recording a resolution"))?;
    }
    super::audit_admin(
        &mut *tx,
        actor,
        "recovery_point_resolved",
        "",
        serde_json::json!({
            "topic": topic,
            "partition": partition,
            "resolution": format!("{resolution:?}"),
            "last_batch": view.last_batch,
            "committed_batch": view.committed_batch,
        }),
    )
    .await?;
    tx.commit().await.map_err(db("committing a resolution"))?;
    Ok(Some(view))
}
