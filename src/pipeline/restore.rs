//! Restoring a partition's lane from the durable store against its committed recovery point:
//! on every assignment, and after any failure. See `docs/exactly-once.md`.

use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};

use super::assignment::PauseCause;
use super::engine::Engine;
use super::kafka;
use super::lane::{Lane, LaneClock};
use crate::sequencer::{self, Decision, Sequencer};
use crate::store::lock_store::{self, LockResult};
use crate::store::postgres as pg;
use crate::store::recovery::{KafkaCommitted, LogRange, RecoveryPoint, TopicId};
use crate::store::snapshot::{self, Held, WaitingRows};
use crate::telemetry::metrics as m;

/// The longest a restore's statement may take, however often restores outlasted their limit
/// (unless `postgres.statement_timeout` is longer): the engine's thread does not poll the
/// consumer during a restore, and librdkafka removes a consumer from its group when it has
/// not polled for `max.poll.interval.ms` (5 minutes by default). A restore unanswered for
/// [`pg::answer_within`] this (4 minutes and 6 s by default) is given up.
const RESTORE_TIMEOUT_MAX: Duration = Duration::from_secs(120);

/// Why a partition could not be restored (it stays paused and is retried).
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("the partition's lock is held by {owner} for another {ttl:?}")]
    LockHeld { owner: String, ttl: Duration },
    #[error("another owner holds the partition's lease")]
    LeaseHeld,
    #[error("taking the partition's lock failed: {0}")]
    Lock(#[from] lock_store::Error),
    #[error(transparent)]
    Store(#[from] pg::Error),
    #[error("reading the committed offset failed: {0}")]
    CommittedOffset(rdkafka::error::KafkaError),
    #[error("rewinding to the committed offset failed: {0}")]
    Rewind(rdkafka::error::KafkaError),
    #[error("reading the partition's first and last offsets failed: {0}")]
    Watermarks(rdkafka::error::KafkaError),
    #[error("committing the partition's recovery point to Kafka failed: {0}")]
    Anchor(kafka::Error),
    #[error(transparent)]
    Snapshot(#[from] snapshot::Unreadable),
    #[error("the stored state does not load: {0}")]
    Sequencer(#[from] sequencer::Error),
}

impl RestoreError {
    /// The cause a partition that could not be restored is paused for.
    pub fn pause_cause(&self) -> PauseCause {
        match self {
            RestoreError::Store(pg::Error::Refused { .. }) => PauseCause::RecoveryPoint,
            _ => PauseCause::Store,
        }
    }

    /// PostgreSQL did not answer (or answered that it cannot serve now): the other partitions'
    /// restores would meet the same outage.
    pub fn is_unavailable(&self) -> bool {
        match self {
            RestoreError::Store(e) | RestoreError::Lock(lock_store::Error::Postgres(e)) => {
                e.is_unavailable()
            }
            _ => false,
        }
    }
}

/// A restored lane, with the recovery point Kafka lacks for it (if it does): that point is
/// committed to Kafka before the lane decides anything (see `Engine::anchor`).
pub(super) struct Restored {
    pub lane: Lane,
    pub anchor: Option<RecoveryPoint>,
}

impl Engine {
    /// Takes the partition's lock and a new fencing token, reads its recovery point, rolls the
    /// durable state back to it, rebuilds the sequencer, and (if `rewind`, or Kafka's committed
    /// offset is not where the partition resumes) moves the consumer there. `topic_id` is the
    /// intents topic's id for the round: asked by the first restore that reads its log.
    // Over 80 lines on purpose: the recovery procedure of docs/exactly-once.md, step by step in
    // its order (lock, fence, recovery point, roll back, Redis, rebuild, rewind), each step a call.
    pub(super) fn restore(
        &mut self,
        partition: i32,
        rewind: bool,
        topic_id: &mut Option<Option<TopicId>>,
    ) -> Result<Restored, RestoreError> {
        let started = Instant::now();
        let topic = self.topics.intents.to_string();
        // The lock (Redis, or the PostgreSQL lease on fallback) first, then a fencing token
        // from the durable store, which every write of this owner is checked against.
        let lease = self.config.locks.lease;
        let lock = self.call(
            "taking a partition's lock",
            self.locks()
                .acquire_lock(&topic, partition, &self.writer, lease),
        )?;
        if let LockResult::Held { owner, ttl } = lock {
            return Err(RestoreError::LockHeld { owner, ttl });
        }
        let fence = self
            .call(
                "acquiring a partition lease",
                pg::acquire_partition(&self.pool, &topic, partition, &self.writer, lease),
            )?
            .ok_or(RestoreError::LeaseHeld)?;
        let kafka = self.committed_point(&topic, partition)?;
        // The log as it is now: the resume point must lie in it (`recovery::within_log`).
        let (low, high) = self
            .consumer
            .fetch_watermarks(&topic, partition, self.config.kafka.operation_timeout)
            .map_err(RestoreError::Watermarks)?;
        // Asked once the brokers answered (while they do not, the id would only add a wait).
        let topic_id = *topic_id.get_or_insert_with(|| self.topic_id());
        let timeout = self.restore_timeout;
        let reading = Instant::now();
        let restored = self
            .call_within(
                "restoring a partition",
                timeout,
                pg::restore_partition(
                    &self.pool,
                    &topic,
                    partition,
                    fence,
                    &self.config.kafka.group_id,
                    &kafka,
                    pg::RestoreBounds {
                        log: Some(LogRange {
                            low,
                            high,
                            topic_id,
                        }),
                        statement_timeout: (timeout > self.config.postgres.statement_timeout)
                            .then_some(timeout),
                    },
                ),
            )
            .inspect_err(|e| {
                if e.is_cancelled() {
                    self.lengthen_restores(partition, timeout);
                }
            })?;
        let read_ms = reading.elapsed().as_millis() as u64;
        let resume = restored.resume;
        if let Some(previous) = &restored.previous_group {
            tracing::warn!(
                partition,
                previous_group = %previous,
                group = %self.config.kafka.group_id,
                kafka = ?kafka,
                resume_batch = resume.batch,
                "the partition was last written under another consumer group (another \
                 deployment over the same store): this group's recovery point does not speak \
                 for those batches, so PostgreSQL decides where it resumes"
            );
        }
        let batch_no = resume.batch;
        let next_offset = resume.next_offset;
        if resume.kafka_offset_overridden {
            tracing::warn!(
                partition,
                kafka = ?kafka,
                resume_batch = batch_no,
                resume_offset = next_offset,
                "the committed offset is not where the durable state is (offsets reset or \
                 expired, a new group, or another consumer in the group committed its own): \
                 resuming where the durable state is"
            );
        }
        // The idempotency cache catches up with the last committed batch (a crash may have
        // come between that batch's commit and its write-through).
        self.call(
            "refreshing the lock store",
            self.locks().partition_restored(&topic, partition, batch_no),
        )?;
        self.call(
            "forgetting rolled-back outcomes",
            self.locks()
                .outcomes_rolled_back(&topic, partition, &restored.rolled_back_outcomes),
        )?;
        let rebuilding = Instant::now();
        let mut seq: Sequencer<Held> = Sequencer::new(self.seq_config.clone())?;
        let mut rows = WaitingRows::default();
        let snapshots = restored
            .states
            .into_iter()
            .map(|s| rows.decode(s))
            .collect::<Result<Vec<_>, _>>()?;
        let contacts = snapshots.len();
        seq.restore(snapshots)?;
        let rebuild_ms = rebuilding.elapsed().as_millis() as u64;
        let mut pause = Vec::new();
        seq.drain_decisions(&mut pause);
        let backpressure = pause
            .iter()
            .any(|d| matches!(d, Decision::PausePartition { .. }));
        if rewind || resume.kafka_offset_overridden {
            self.consumer
                .seek(
                    &topic,
                    partition,
                    Offset::Offset(next_offset),
                    self.config.kafka.operation_timeout,
                )
                .map_err(RestoreError::Rewind)?;
        }
        let cause = if rewind { "recovery" } else { "assignment" };
        metrics::counter!(m::RESTORES, "cause" => cause).increment(1);
        metrics::counter!(m::ROLLED_BACK_ROWS)
            .increment(restored.dropped_transitions + restored.reverted_contacts);
        let backlog = seq.backlog();
        tracing::info!(
            partition,
            fence,
            batch_no,
            committed_offset = next_offset,
            contacts,
            waiting = backlog.waiting,
            held = backlog.contacts_held,
            rolled_back_transitions = restored.dropped_transitions,
            reverted_contacts = restored.reverted_contacts,
            elapsed_ms = started.elapsed().as_millis() as u64,
            read_ms,
            rebuild_ms,
            "partition restored"
        );
        // A partition that never committed a clock starts at the wall clock (see LaneClock).
        let clock_ms = match resume.clock_ms {
            0 => crate::pipeline::output::now_ms().max(0) as u64,
            ms => ms,
        };
        let lane = Lane {
            partition,
            fence,
            batch_no,
            // The restore recorded it (`cc_partition.committed_batch`).
            marked: batch_no,
            committed_at: Instant::now(),
            next_offset,
            seq,
            rows,
            backpressure,
            paused: true,
            probe_at: Instant::now(),
            probing_until: None,
            at_end: false,
            end_offset: -1,
            held_back: Default::default(),
            clock: LaneClock::starting_at(clock_ms, self.max_credit_ms()),
        };
        let anchor = (!resume.point_in_kafka).then_some(RecoveryPoint {
            batch: batch_no,
            fence,
            clock_ms: resume.clock_ms,
        });
        Ok(Restored { lane, anchor })
    }

    /// A restore of `partition` outlasted `timeout`, its statements' limit: the partition's
    /// state is large (its restore reads and reverts every contact of the partition, so it
    /// grows with the partition, unlike a batch) or PostgreSQL is slow. Restores get twice as
    /// long from now on, up to [`RESTORE_TIMEOUT_MAX`], or the same restore, retried, would be
    /// cancelled again for ever.
    fn lengthen_restores(&mut self, partition: i32, timeout: Duration) {
        let longer =
            (timeout * 2).min(RESTORE_TIMEOUT_MAX.max(self.config.postgres.statement_timeout));
        if longer <= self.restore_timeout {
            // Already as long as it gets (or made longer by another partition meanwhile).
            return;
        }
        self.restore_timeout = longer;
        tracing::warn!(
            partition,
            outlasted = %humantime::format_duration(timeout),
            restore_timeout = %humantime::format_duration(longer),
            "a partition's restore outlasted its statement timeout (a partition of many \
             contacts, or a slow PostgreSQL); restores may take longer from now on (runbook: \
             Partitions paused)"
        );
    }

    /// Commits the recovery points Kafka lacks (a new group, offsets reset or expired: see
    /// `store::recovery`) in one offsets-only transaction, before their lanes decide anything.
    /// Without it, a first batch that aborts would leave PostgreSQL's last batch with nothing in
    /// Kafka to say it did not commit, and the partition would refuse to start.
    pub(super) fn anchor(&mut self, lanes: &[(Lane, RecoveryPoint)]) -> kafka::Result<()> {
        if lanes.is_empty() {
            return Ok(());
        }
        let points: Vec<(i32, i64, String)> = lanes
            .iter()
            .map(|(lane, point)| (lane.partition, lane.next_offset, point.to_string()))
            .collect();
        let tpl = kafka::offsets_list(&self.topics.intents, &points)?;
        let producer = self
            .producer
            .as_mut()
            .ok_or(kafka::Error::Fatal(rdkafka::error::KafkaError::Canceled))?;
        // A Kafka transaction like a batch's: counted with them.
        let committed = producer.commit_offsets(&tpl, &self.consumer);
        let result = if committed.is_ok() { "commit" } else { "abort" };
        metrics::counter!(m::TRANSACTIONS, "result" => result).increment(1);
        committed?;
        for (lane, point) in lanes {
            tracing::info!(
                partition = lane.partition,
                batch_no = point.batch,
                committed_offset = lane.next_offset,
                "recovery point committed to Kafka (it had none for this partition)"
            );
        }
        Ok(())
    }

    /// The intents topic's id now, to tell its log from the one the durable state consumed
    /// (`recovery::within_log`). Brokers that do not say (no topic ids, or no answer) leave
    /// that comparison out, with a warning; the offsets are still checked.
    pub(super) fn topic_id(&self) -> Option<TopicId> {
        let topic = &self.topics.intents;
        match kafka::topic_id(
            self.consumer.client(),
            topic,
            self.config.kafka.operation_timeout,
        ) {
            Ok(id) => id,
            Err(reason) => {
                tracing::warn!(
                    topic = %topic,
                    reason = %reason,
                    "could not read the intents topic's id; this restore cannot tell a topic \
                     created again under the same name from the one consumed"
                );
                None
            }
        }
    }

    /// The partition's committed offset and recovery point in Kafka.
    fn committed_point(&self, topic: &str, partition: i32) -> Result<KafkaCommitted, RestoreError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        let committed = self
            .consumer
            .committed_offsets(tpl, self.config.kafka.operation_timeout)
            .map_err(RestoreError::CommittedOffset)?;
        let elements = committed.elements();
        let Some(e) = elements.first() else {
            return Ok(KafkaCommitted::Nothing);
        };
        let offset = match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        };
        Ok(KafkaCommitted::from_parts(offset, e.metadata()))
    }
}
