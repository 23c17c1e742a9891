//! The consume-transform-produce loop, on one dedicated thread.
//!
//! One batch = one Kafka transaction. Records are polled into memory (nothing is produced while
//! polling, so a rebalance during polling only drops the in-memory records); then
//! [`Engine::process`] runs the data path as named steps:
//!
//! 1. **decode** the records (`crate::intent`); invalid ones are kept for their review record;
//! 2. **look up** what the idempotency store knows of the batch's intent ids (one round trip);
//! 3. **sequence**: each partition's sequencer ([`Lane`]) decides; due operator commands and
//!    wait timeouts are applied;
//! 4. **translate** the decisions into a [`BatchPlan`] (pure, `translate`): output records,
//!    audit rows, contact states, transition events;
//! 5. **persist** the durable state in one PostgreSQL round trip, tagged with each partition's
//!    next batch number and checked against its fencing token; the batch's Kafka transaction is
//!    begun just before it and its outputs queued, so the broker takes them while PostgreSQL
//!    writes (nothing visible before the commit; an abort discards them when the write fails);
//! 6. **commit** that transaction with the consumed offsets (whose metadata names the batch:
//!    the recovery point);
//! 7. **report**, only now that the batch is real: the lanes' new recovery points; then, off
//!    this thread while the next batch is polled, each transition's log line and metrics and
//!    the idempotency cache's write-through (settled before the next lookup).
//!
//! A failure in steps 2, 5 or 6 is handled in one place ([`Engine::fail`]): the in-memory state
//! is voided, each partition paused, restored from PostgreSQL against the committed offsets
//! (rows of batches that never committed in Kafka are rolled back), rewound and resumed. See
//! `docs/exactly-once.md`.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::message::{Headers, Message};
use rdkafka::TopicPartitionList;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::assignment::{Assignment, PauseCause};
use super::gather::{BatchClock, BatchLimit};
use super::health::Health;
use super::isolation::{self, Isolation, Verdict};
use super::kafka::{self, EngineConsumer, EngineContext, TxnProducer};
use super::lane::Lane;
use super::operator;
use super::output;
use super::report;
use super::restore::{RestoreError, Restored};
use super::stall::{self, FetchWatch, Reading, Stalled};
use super::translate::{self, Fresh, PartitionPlan, Topics};
use crate::config::Config;
use crate::intent::{InRecord, InvalidIntent, ValidIntent};
use crate::sequencer::{self, PriorOutcome};
use crate::store::lock_store::{self, LockStore};
use crate::store::postgres::{
    self as pg, AppliedCommand, PartitionWrite, StoredOutcome, TransitionRow,
};
use crate::store::recovery::RecoveryPoint;
use crate::store::snapshot::Held;
use crate::telemetry::metrics as m;
use crate::telemetry::trace::{BatchTrace, Step};

/// Engine failures that stop the process (everything else is retried in place).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kafka(#[from] kafka::Error),
    #[error("subscribing to topic {topic} failed: {source}")]
    Subscribe {
        topic: String,
        source: rdkafka::error::KafkaError,
    },
    #[error(transparent)]
    Store(#[from] pg::Error),
    #[error("invalid sequencer configuration: {0}")]
    Sequencer(#[from] sequencer::Error),
    /// librdkafka reported the consumer unusable (for instance `FencedInstanceId`: its static
    /// membership was taken by its own retried join while the coordinator moved, as a broker
    /// restart can cause). It never heals: the engine stops, and `pipeline::run_with` starts a
    /// new one, with a new consumer, from the committed recovery points.
    #[error("the Kafka consumer failed fatally ({0})")]
    ConsumerFatal(rdkafka::error::KafkaError),
    /// The brokers refuse `kafka.transaction_timeout`: no transactional producer can start, and
    /// retrying never mends it. The process stops, naming the setting.
    #[error(
        "kafka.transaction_timeout ({}) is above the brokers' transaction.max.timeout.ms \
         (15 minutes unless set otherwise): lower it, or raise the brokers' limit ({source})",
        humantime::format_duration(*.configured)
    )]
    TransactionTimeoutRefused {
        configured: Duration,
        source: kafka::Error,
    },
    /// The replacement consumer failed fatally too, soon after: another process is using this
    /// instance's `group.instance.id` (and transactional id). The process stops.
    #[error(
        "the Kafka consumer failed fatally again within {within:?} of being replaced ({error}); \
         another process is probably running with instance_id {instance_id:?}: each instance of \
         a group needs its own"
    )]
    ConsumerFatalAgain {
        error: rdkafka::error::KafkaError,
        within: Duration,
        instance_id: String,
    },
    /// The group coordinator assigned partitions of topics the consumer does not subscribe to:
    /// a static member that rejoins a stable group gets its previous assignment back without a
    /// rebalance, and after `kafka.intents_topic` changed that is the old topic's partitions.
    /// Nothing of them is read; `pipeline::run_with` starts a new engine once the coordinator
    /// has forgotten the member (its session timeout), which then gets a fresh assignment.
    #[error(
        "the group coordinator assigned partitions of {topics:?}, which this consumer does not \
         subscribe to (an assignment kept for its static membership from before \
         kafka.intents_topic changed)"
    )]
    StaleAssignment { topics: Vec<String> },
    /// The consumer fetched nothing of a partition with records to read, the broker answering,
    /// for `kafka.fetch_stall_timeout` (see `super::stall`): `pipeline::run_with` starts a new
    /// engine, with a new consumer, from the committed recovery points.
    #[error(
        "the Kafka consumer fetched nothing of partition {partition} for {}s, at offset \
         {position} with records up to {last_stable} to read",
        .for_.as_secs()
    )]
    ConsumerStalled {
        partition: i32,
        position: i64,
        last_stable: i64,
        for_: Duration,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How often operator commands are looked for.
const COMMAND_POLL: Duration = Duration::from_secs(1);
/// How long a stopped engine's close (its consumer leaving the group, its producers ending)
/// may take before it is abandoned (see [`close_within`]).
const CLOSE_WITHIN: Duration = Duration::from_secs(5);
/// How often the backlog gauges are refreshed.
const GAUGE_REFRESH: Duration = Duration::from_secs(1);
/// How often a partition paused at its bound is read for one batch (its missing predecessors
/// may be in it).
const PROBE: Duration = Duration::from_secs(1);
/// How long the engine waits before replaying after an output topic refused a record as too
/// large (a configuration no immediate retry mends).
const TOO_LARGE_RETRY: Duration = Duration::from_secs(5);
/// How long a batch refused for another batch's claims waits before its replay: about one
/// transaction of that batch, doubled at each refusal in a row up to [`CLAIM_RETRY_MAX`].
const CLAIM_RETRY: Duration = Duration::from_millis(200);
const CLAIM_RETRY_MAX: Duration = Duration::from_secs(5);
/// A committed batch PostgreSQL still does not record as committed this long after its commit
/// (the record after it failed, or was skipped for a write that then failed) is recorded again;
/// at most this often.
const REMARK_AFTER: Duration = Duration::from_secs(1);

pub struct Engine {
    pub(super) config: Arc<Config>,
    pub(super) seq_config: sequencer::Config,
    pub(super) topics: Topics,
    /// The intents topic's offsets as the consumer last heard them.
    watermarks: Option<kafka::CachedWatermarks>,
    pub(super) ctx: EngineContext,
    pub(super) consumer: EngineConsumer,
    pub(super) producer: Option<TxnProducer>,
    /// Why no producer can ever be created with this configuration (the engine stops).
    producer_refused: Option<kafka::Error>,
    /// A fatal consumer error seen by [`Engine::gather`]: the engine stops (see
    /// [`Error::ConsumerFatal`]).
    consumer_failed: Option<rdkafka::error::KafkaError>,
    /// The topics of a stale assignment, once seen (see [`Error::StaleAssignment`]).
    stale_assignment: Option<Vec<String>>,
    /// Whether the consumer still fetches the partitions it is told to read.
    fetches: FetchWatch,
    /// A partition it stopped fetching: the engine stops (see [`Error::ConsumerStalled`]).
    consumer_stalled: Option<Stalled>,
    shutdown: CancellationToken,
    pub(super) rt: tokio::runtime::Handle,
    pub(super) pool: PgPool,
    /// Locks and idempotency: Redis, with PostgreSQL as the fallback. Used through
    /// [`Engine::locks`] only, which settles the last batch's write-through first.
    lock_store: Arc<LockStore>,
    pub(super) writer: String,
    pub(super) lanes: BTreeMap<i32, Lane>,
    pub(super) assignment: Assignment,
    /// Partitions replayed one record per batch to find a record the stores refuse.
    isolation: Isolation,
    /// Partitions whose wait timeouts fired in the batch in hand.
    timeouts_fired: BTreeSet<i32>,
    /// Per partition, contacts another partition owns (learnt from refused writes), with the
    /// owner: their records are forwarded there, and each batch's write checks that the owner
    /// still owns them (migration 0017). Forgotten when the partition is revoked.
    owners: HashMap<i32, HashMap<String, i32>>,
    pub(super) next_restore_at: Instant,
    /// Replays in a row for another batch's claims (see [`Engine::wait_for_claims`]).
    claim_waits: u32,
    /// How many records a batch may hold now (fewer while PostgreSQL is too slow for a full
    /// one).
    batch_limit: BatchLimit,
    /// Each statement's limit in a restore: `postgres.statement_timeout`, longer once a
    /// restore outlasted it (see [`Engine::lengthen_restores`]).
    pub(super) restore_timeout: Duration,
    next_commands_at: Instant,
    next_gauges_at: Instant,
    /// The next time committed batches PostgreSQL does not record yet are recorded again.
    next_remark_at: Instant,
    /// The last of those records, while it runs.
    remarking: Option<tokio::task::JoinHandle<()>>,
    /// `(partition, fence, batch)` the records sent off the engine's thread marked.
    marked_tx: std::sync::mpsc::Sender<(i32, u64, u64)>,
    marked_rx: std::sync::mpsc::Receiver<(i32, u64, u64)>,
    health: Arc<Health>,
    /// Partitions that had records in the batch in hand.
    read: BTreeSet<i32>,
    /// The current batch's step timestamps, made into spans when it ends.
    batch_trace: BatchTrace,
    /// When the open transaction began, its outputs and offsets staged ([`Engine::stage`]).
    staged: Option<Instant>,
    /// The last committed batch's write-through and log lines, while they run (see
    /// [`Engine::report_transitions`]).
    writing_through: Cell<Option<tokio::task::JoinHandle<()>>>,
    logging: Cell<Option<tokio::task::JoinHandle<()>>>,
}

/// The records of one batch, decoded, per partition, in offset order.
#[derive(Default)]
struct Decoded {
    partitions: BTreeMap<i32, PartitionInput>,
}

#[derive(Default)]
struct PartitionInput {
    valid: Vec<(InRecord, Arc<ValidIntent>)>,
    invalid: Vec<(InRecord, InvalidIntent)>,
    /// Records quarantined by [`Isolation`], with the store's error.
    unprocessable: Vec<(InRecord, String)>,
    /// Valid records whose contact another partition owns, with the owner.
    forwards: Vec<(InRecord, Arc<ValidIntent>, i32)>,
    /// The offsets of the batch's records, in order.
    offsets: Vec<i64>,
    /// One past the last record of the batch.
    next_offset: i64,
}

/// What one batch writes and produces, per partition, and the operator commands it applies.
#[derive(Default)]
pub(super) struct BatchPlan {
    partitions: BTreeMap<i32, PartitionPart>,
    commands: Vec<AppliedCommand>,
    /// The wall clock when the batch was decided, before its outputs were queued (their
    /// records' timestamps are at or after it): see `pg::BatchWrite::decided_at_ms`.
    decided_at_ms: i64,
}

impl BatchPlan {
    /// The plan without the parts (and commands) of `partitions`.
    fn without(mut self, dropped: &BTreeSet<i32>) -> BatchPlan {
        self.partitions.retain(|p, _| !dropped.contains(p));
        self.commands.retain(|c| !dropped.contains(&c.partition));
        self
    }
}

struct PartitionPart {
    plan: PartitionPlan,
    /// The input records of this part, in order.
    offsets: Vec<i64>,
    batch_no: u64,
    fence: u64,
    /// One past the last record consumed by the end of this batch (-1: none ever).
    next_offset: i64,
    /// The lane's clock at this batch.
    clock_ms: u64,
}

/// The ids of the commands of `partition` among `commands`.
fn command_ids(commands: &[AppliedCommand], partition: i32) -> Vec<i64> {
    (commands.iter())
        .filter(|c| c.partition == partition)
        .map(|c| c.id)
        .collect()
}

/// The operator commands a batch applies (or refuses), and the re-submissions among them.
#[derive(Default)]
pub(super) struct Commands {
    applied: Vec<AppliedCommand>,
    resubmitted: Vec<translate::Resubmitted>,
}

impl BatchPlan {
    fn is_empty(&self) -> bool {
        self.partitions.is_empty() && self.commands.is_empty()
    }
}

/// A durable write that failed: the error, and the partitions written by the rest of it
/// (already voided, to be rolled back by their restore).
struct PartWritten {
    error: pg::Error,
    written: BTreeSet<i32>,
}

/// Fail point `durable-write-reply-lost`: a write PostgreSQL committed whose reply never came
/// back (the connection dropped after the commit), which the engine can only take as failed.
fn reply_lost() -> bool {
    fail::fail_point!("durable-write-reply-lost", |_| true);
    false
}

/// The partitions of a plan in at most `n` groups, one per transaction of its durable write
/// (see [`balance`]). A command whose partition has no part goes with the first group.
fn write_groups(plan: &BatchPlan, n: u32) -> Vec<BTreeSet<i32>> {
    let rows: Vec<(i32, usize)> = plan
        .partitions
        .iter()
        .map(|(p, part)| {
            let plan = &part.plan;
            let rows = plan.transitions.len()
                + plan.contacts.len()
                + plan.waiting.len()
                + plan.deleted.len();
            (*p, rows)
        })
        .collect();
    let mut groups = balance(&rows, n);
    let orphans = plan
        .commands
        .iter()
        .map(|c| c.partition)
        .filter(|p| !plan.partitions.contains_key(p));
    match groups.first_mut() {
        Some(first) => first.extend(orphans),
        None => groups.push(orphans.collect()),
    }
    groups
}

/// `(partition, rows)` in at most `n` non-empty groups of similar rows: the largest part
/// first, each into the lightest group so far (ties: the lower partition, the first group).
fn balance(rows: &[(i32, usize)], n: u32) -> Vec<BTreeSet<i32>> {
    let n = (n.max(1) as usize).min(rows.len().max(1));
    let mut parts: Vec<(usize, i32)> = rows.iter().map(|(p, r)| (*r, *p)).collect();
    parts.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut groups = vec![(0usize, BTreeSet::new()); n];
    for (rows, p) in parts {
        if let Some(lightest) = groups.iter_mut().min_by_key(|(load, _)| *load) {
            lightest.0 += rows;
            lightest.1.insert(p);
        }
    }
    groups
        .into_iter()
        .map(|(_, g)| g)
        .filter(|g| !g.is_empty())
        .collect()
}

/// Why a batch did not commit.
enum Failure {
    /// The idempotency store could not answer.
    Lookup(lock_store::Error),
    /// The durable write failed (fenced, or the store is unavailable).
    Persist(pg::Error),
    /// The Kafka transaction did not commit.
    Commit(kafka::Error),
}

impl Engine {
    pub fn new(
        config: Arc<Config>,
        pool: PgPool,
        locks: Arc<LockStore>,
        rt: tokio::runtime::Handle,
        shutdown: CancellationToken,
        health: Arc<Health>,
        effects: output::EffectPlacement,
    ) -> Result<Self> {
        let topics = Topics::of(&config, effects);
        let s = &config.sequencer;
        let seq_config = sequencer::Config {
            wait_timeout: s.wait_timeout,
            on_timeout: s.on_timeout,
            max_pending_per_contact: s.max_pending_per_contact.min(u32::MAX as usize) as u32,
            max_pending_per_partition: s.max_pending_per_partition,
            resume_pending_below: s.resume_pending_per_partition,
            max_pending_bytes_per_partition: s.max_pending_bytes_per_partition,
            resume_pending_bytes_below: s.resume_pending_bytes_per_partition,
            recent_outcomes_capacity: s.recent_intents_per_partition,
        };
        seq_config.validate()?;
        let ctx = EngineContext {
            topic: topics.intents.clone(),
            ..EngineContext::default()
        };
        let consumer = kafka::consumer(&config, ctx.clone())?;
        consumer
            .subscribe(&[&topics.intents])
            .map_err(|source| Error::Subscribe {
                topic: topics.intents.to_string(),
                source,
            })?;
        let writer = config.instance_id();
        let now = Instant::now();
        let (marked_tx, marked_rx) = std::sync::mpsc::channel();
        let batch_limit = BatchLimit::new(config.batch.max_records);
        let restore_timeout = config.postgres.statement_timeout;
        let fetches = FetchWatch::new(config.kafka.fetch_stall_timeout);
        metrics::gauge!(m::BATCH_LIMIT).set(batch_limit.records() as f64);
        Ok(Self {
            config,
            seq_config,
            watermarks: kafka::CachedWatermarks::of(&topics.intents),
            topics,
            ctx,
            consumer,
            producer: None,
            producer_refused: None,
            consumer_failed: None,
            stale_assignment: None,
            fetches,
            consumer_stalled: None,
            shutdown,
            rt,
            pool,
            lock_store: locks,
            writer,
            lanes: BTreeMap::new(),
            assignment: Assignment::default(),
            isolation: Isolation::default(),
            timeouts_fired: BTreeSet::new(),
            owners: HashMap::new(),
            next_restore_at: now,
            claim_waits: 0,
            batch_limit,
            restore_timeout,
            next_commands_at: now,
            next_gauges_at: now,
            next_remark_at: now,
            remarking: None,
            marked_tx,
            marked_rx,
            health,
            read: BTreeSet::new(),
            batch_trace: BatchTrace::default(),
            staged: None,
            writing_through: Cell::new(None),
            logging: Cell::new(None),
        })
    }

    /// Runs until the shutdown token fires; the batch in hand is committed before returning.
    /// Then the engine is dropped (its consumer closes, its producers end) within
    /// [`CLOSE_WITHIN`], or abandoned: see [`close_within`].
    pub fn run(mut self) -> Result<()> {
        let result = self.run_to_stop();
        close_within(self, CLOSE_WITHIN);
        result
    }

    fn run_to_stop(&mut self) -> Result<()> {
        tracing::info!(
            group = %self.config.kafka.group_id,
            topic = %self.topics.intents,
            writer = %self.writer,
            transactional_id = %kafka::transactional_id(&self.config),
            "engine started"
        );
        loop {
            let stopping = self.shutdown.is_cancelled();
            if !self.ensure_producer() {
                if stopping || self.producer_refused.is_some() {
                    break;
                }
                self.idle(Duration::from_secs(1));
                continue;
            }
            self.sync_assignment();
            self.restore_pending();
            self.batch_trace.start();
            if let Some(records) = self.gather() {
                self.process(records);
            }
            self.remark_quiet_lanes();
            // The producer's events (statistics for its broker watch) would queue up, unserved,
            // while no batch runs.
            if let Some(p) = &self.producer {
                p.poll();
            }
            self.refresh_gauges();
            if stopping
                || self.consumer_is_dead()
                || self.assigned_elsewhere()
                || self.consumer_stalled.is_some()
            {
                break;
            }
        }
        self.settle_report();
        let replaced = self.consumer_failed.is_some()
            || self.stale_assignment.is_some()
            || self.consumer_stalled.is_some();
        if replaced {
            // Another engine takes over in this process (`pipeline::run_with`): not ready
            // until it has restored its partitions, but not stopping either.
            self.health.set_partitions(0, 0);
        } else {
            self.health.set_stopping();
        }
        tracing::info!("engine stopping: releasing leases and leaving the group");
        // Test builds: the group's assignment arrives, unserved, while the engine stops.
        fail::fail_point!("engine-stopping");
        // The last batches are known committed: a restart after an offset reset resumes
        // without an operator (see store::recovery).
        let last = self.committed_batches();
        if let Err(e) = self.call(
            "recording the last committed batches",
            pg::mark_committed(&self.pool, &self.topics.intents, &last),
        ) {
            tracing::warn!(error = %e, "recording the last committed batches failed");
        }
        for (p, lane) in std::mem::take(&mut self.lanes) {
            self.release(p, lane.fence);
        }
        // Revoked inside the close that follows, not served here: a static member (KIP-345)
        // sends no LeaveGroup only when it revokes while closing, so that a restart within
        // the session gets its partitions back without a rebalance of the group.
        self.consumer.unsubscribe();
        if let Some(topics) = self.stale_assignment.take() {
            return Err(Error::StaleAssignment { topics });
        }
        if let Some(s) = self.consumer_stalled.take() {
            return Err(Error::ConsumerStalled {
                partition: s.partition,
                position: s.position,
                last_stable: s.last_stable,
                for_: s.for_,
            });
        }
        if let Some(source) = self.producer_refused.take() {
            return Err(Error::TransactionTimeoutRefused {
                configured: self.config.kafka.transaction_timeout,
                source,
            });
        }
        match self.consumer_failed.take() {
            Some(e) => Err(Error::ConsumerFatal(e)),
            None => Ok(()),
        }
    }

    /// Whether the coordinator assigned partitions of another topic than the intents topic
    /// (see [`Error::StaleAssignment`]): the engine stops before deciding anything more.
    fn assigned_elsewhere(&mut self) -> bool {
        if self.stale_assignment.is_none() && !self.shutdown.is_cancelled() {
            let foreign = self.ctx.foreign_topics();
            if !foreign.is_empty() {
                self.stale_assignment = Some(foreign.into_iter().collect());
            }
        }
        self.stale_assignment.is_some()
    }

    /// Whether the consumer is unusable: a fatal error from `poll`, or one librdkafka raised
    /// on its own threads (a fenced static member can be reported only there).
    fn consumer_is_dead(&mut self) -> bool {
        if self.consumer_failed.is_none() {
            if let Some((code, reason)) = self.consumer.client().fatal_error() {
                tracing::error!(
                    error = %code,
                    reason,
                    "the Kafka consumer failed fatally; the engine stops"
                );
                self.consumer_failed =
                    Some(rdkafka::error::KafkaError::MessageConsumptionFatal(code));
            }
        }
        self.consumer_failed.is_some()
    }

    /// Creates the transactional producer if there is none; false while it cannot be created.
    fn ensure_producer(&mut self) -> bool {
        if self.producer.is_some() {
            return true;
        }
        match TxnProducer::new(&self.config) {
            Ok(p) => {
                self.producer = Some(p);
                true
            }
            Err(e) if e.is_transaction_timeout_refused() => {
                self.producer_refused = Some(e);
                false
            }
            Err(e) => {
                tracing::error!(error = %e, "transactional producer unavailable; retrying");
                false
            }
        }
    }

    /// Serves the group protocol for a while without taking records.
    fn idle(&mut self, d: Duration) {
        let deadline = Instant::now() + d;
        while Instant::now() < deadline && !self.shutdown.is_cancelled() {
            if let Some(Ok(msg)) = self.consumer.poll(Duration::from_millis(100)) {
                // A record taken while idle is dropped: read again after a restore.
                let p = msg.partition();
                self.assignment.consumed_without_lane(p);
                if self.lanes.contains_key(&p) {
                    self.void_lane(p, PauseCause::Store);
                }
            }
            self.sync_assignment();
        }
    }

    /// Applies what the rebalance callbacks reported.
    fn sync_assignment(&mut self) {
        let (revoked, changed, assigned) = self.ctx.take_events();
        if !revoked && !changed {
            return;
        }
        let lanes: BTreeSet<i32> = self.lanes.keys().copied().collect();
        let dropped: Vec<Lane> = self
            .assignment
            .rebalanced(revoked, assigned, &lanes)
            .into_iter()
            .filter_map(|p| self.lanes.remove(&p))
            .collect();
        let last: Vec<(i32, u64, u64)> = dropped
            .iter()
            .filter(|l| l.batch_no > 0)
            .map(|l| (l.partition, l.fence, l.batch_no))
            .collect();
        if let Err(e) = self.call(
            "recording the last committed batches",
            pg::mark_committed(&self.pool, &self.topics.intents, &last),
        ) {
            tracing::warn!(error = %e, "recording the last committed batches failed");
        }
        // What a partition learnt of other partitions' contacts holds while it stays assigned
        // here: another instance may have decided otherwise meanwhile.
        let assignment = &self.assignment;
        self.owners.retain(|p, _| assignment.is_assigned(*p));
        for lane in dropped {
            self.isolation.forget(lane.partition);
            // Give the lease up so the next owner starts at once.
            self.release(lane.partition, lane.fence);
            report::clear_partition(lane.partition);
        }
        self.next_restore_at = Instant::now();
        metrics::gauge!(m::PARTITIONS_ASSIGNED).set(self.assignment.assigned().len() as f64);
    }

    /// Restores every assigned partition that has no lane (new assignment or after a failure).
    fn restore_pending(&mut self) {
        let now = Instant::now();
        if !self.assignment.has_missing() || now < self.next_restore_at {
            return;
        }
        let mut anchors = Vec::new();
        let to_restore = self.assignment.to_restore(now);
        // One question for the round, asked by the first restore that reads its log: which
        // topic the partitions are read from now.
        let mut topic_id = None;
        // Once PostgreSQL is out, the round stops: each restore would wait for it in turn
        // (up to `pg::answer_within` each, without polling Kafka); the partitions not tried
        // wait as long as the one that was.
        let mut outage: Option<RestoreError> = None;
        for (p, rewind) in to_restore {
            if let Some(e) = &outage {
                self.not_restored(p, e);
                continue;
            }
            match self.restore(p, rewind, &mut topic_id) {
                Ok(Restored {
                    lane,
                    anchor: Some(point),
                }) => anchors.push((lane, point)),
                Ok(Restored { lane, anchor: None }) => self.admit(lane),
                Err(e) => {
                    self.not_restored(p, &e);
                    outage = e.is_unavailable().then_some(e);
                }
            }
        }
        match self.anchor(&anchors) {
            Ok(()) => anchors.into_iter().for_each(|(lane, _)| self.admit(lane)),
            Err(e) => {
                self.recover_producer(&e);
                let e = RestoreError::Anchor(e);
                for (lane, _) in anchors {
                    self.not_restored(lane.partition, &e);
                }
            }
        }
        self.next_gauges_at = Instant::now();
    }

    /// A restored lane starts deciding.
    fn admit(&mut self, lane: Lane) {
        self.health.set_stores_ok(true);
        let p = lane.partition;
        self.assignment.restored(p);
        let paused = lane.backpressure;
        self.lanes.insert(p, lane);
        // Always re-issued: librdkafka keeps a partition's pause state across a revoke and
        // re-assign, and the restore re-evaluates backpressure.
        self.set_paused(p, paused);
        // Test builds: librdkafka fetches nothing more of this partition, the engine unaware
        // (what its stuck fetch states look like from here; see `stall`).
        fail::fail_point!("fetch-stuck", |_| {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&self.topics.intents, p);
            let _ = self.consumer.pause(&tpl);
        });
    }

    /// A partition that could not be restored stays paused and is retried.
    fn not_restored(&mut self, p: i32, e: &RestoreError) {
        let attempt = self
            .assignment
            .restore_failed(p, e.pause_cause(), Instant::now());
        // A failure that repeats is logged at attempts 1, 2, 4, 8 ... not each time.
        if attempt.is_power_of_two() {
            tracing::warn!(
                partition = p,
                attempt,
                error = %e,
                "partition not restored yet; paused"
            );
        }
        self.set_paused(p, true);
    }

    /// Gives a partition's lock and lease up (best effort: they expire anyway).
    pub(super) fn release(&self, partition: i32, fence: u64) {
        let topic = &self.topics.intents;
        // Outside the future: settling the write-through blocks on the runtime.
        let locks = self.locks();
        let lock = self.call(
            "releasing a lock",
            locks.release_lock(topic, partition, &self.writer),
        );
        let lease = self.call(
            "releasing a lease",
            pg::release_partition(&self.pool, topic, partition, fence),
        );
        if let Err(e) = lock {
            tracing::warn!(partition, error = %e, "releasing a lock failed");
        }
        if let Err(e) = lease {
            tracing::warn!(partition, error = %e, "releasing a lease failed");
        }
    }

    /// Pauses or resumes one partition. Always asks librdkafka: its pause state survives a
    /// revoke and re-assign of the same partition.
    pub(super) fn set_paused(&mut self, partition: i32, pause: bool) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topics.intents, partition);
        let result = if pause {
            self.consumer.pause(&tpl)
        } else {
            self.consumer.resume(&tpl)
        };
        match result {
            Ok(()) => {
                if let Some(lane) = self.lanes.get_mut(&partition) {
                    lane.paused = pause;
                }
            }
            Err(e) => tracing::warn!(partition, pause, error = %e, "pause/resume failed"),
        }
    }

    /// The longest a lane's clock advances in one tick (see `LaneClock`): a batch cycle takes
    /// up to the linger plus a commit; anything much longer is a stall.
    pub(super) fn max_credit_ms(&self) -> u64 {
        let linger = self.config.batch.max_linger.as_millis() as u64;
        (2 * linger).max(1_000)
    }

    /// Backpressure: a partition at its bound is paused, except while it is caught up (nothing
    /// is left to read, so nothing more is buffered), and except for a probe every [`PROBE`]:
    /// it is read again until records of it arrive or [`PROBE`] passes (its missing
    /// predecessors may be in what it has not read). At twice its bound it is not read at all
    /// until it drains (an operator may have to step in: see the runbook).
    fn apply_backpressure(&mut self) {
        let now = Instant::now();
        let s = &self.config.sequencer;
        let (hard_count, hard_bytes) = (
            s.max_pending_per_partition.saturating_mul(2),
            s.max_pending_bytes_per_partition.saturating_mul(2),
        );
        let mut changes = Vec::new();
        for (p, lane) in &mut self.lanes {
            let over_hard =
                lane.seq.waiting_count() >= hard_count || lane.seq.waiting_bytes() >= hard_bytes;
            let probe_over = lane
                .probing_until
                .is_some_and(|t| now >= t || self.read.contains(p));
            let pause = if !lane.backpressure || (lane.at_end && !over_hard) {
                lane.probing_until = None;
                false
            } else if over_hard || probe_over {
                lane.probing_until = None;
                lane.probe_at = now + PROBE;
                true
            } else if lane.probing_until.is_some() {
                false
            } else if lane.paused && now >= lane.probe_at {
                lane.probing_until = Some(now + PROBE);
                false
            } else {
                if !lane.paused {
                    lane.probe_at = now + PROBE;
                }
                true
            };
            if pause != lane.paused {
                changes.push((*p, pause));
            }
        }
        for (p, pause) in changes {
            self.set_paused(p, pause);
        }
    }

    /// Drops a lane whose in-memory state can no longer be trusted; it is restored (and its
    /// partition rewound) before its next record is processed.
    fn void_lane(&mut self, partition: i32, cause: PauseCause) {
        self.lanes.remove(&partition);
        if self.assignment.is_assigned(partition) {
            self.assignment.voided(partition, cause);
            self.set_paused(partition, true);
        }
    }

    fn void_all(&mut self, why: &str) {
        tracing::warn!(
            why,
            lanes = self.lanes.len(),
            "voiding in-memory state; restoring from the store"
        );
        let partitions: Vec<i32> = self.lanes.keys().copied().collect();
        for p in partitions {
            self.void_lane(p, PauseCause::Store);
        }
        self.next_restore_at = Instant::now();
    }

    /// Polls records until the batch is full or old enough. `None` when a rebalance voided it.
    fn gather(&mut self) -> Option<Vec<InRecord>> {
        self.read.clear();
        let mut records = Vec::new();
        let mut ends = BTreeSet::new();
        let mut clock = BatchClock::new(
            self.config.batch.max_linger,
            self.batch_limit.records(),
            Instant::now(),
        );
        loop {
            let polled = self.consumer.poll(clock.poll_timeout(Instant::now()));
            let polled_nothing = polled.is_none();
            let (revoked, changed) = self.ctx.peek_events();
            if revoked {
                if !records.is_empty() {
                    tracing::info!(
                        records = records.len(),
                        "rebalance: uncommitted batch dropped"
                    );
                }
                return None;
            }
            match polled {
                // A partition of another topic (see `assigned_elsewhere`): never decided.
                Some(Ok(msg)) if msg.topic() != &*self.topics.intents => return None,
                Some(Ok(msg)) => {
                    let p = msg.partition();
                    self.read.insert(p);
                    if let Some(lane) = self.lanes.get_mut(&p) {
                        lane.at_end = false;
                    }
                    records.push(in_record(&msg));
                    clock.record(Instant::now());
                    metrics::counter!(m::RECORDS_CONSUMED).increment(1);
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                    if let Some(lane) = self.lanes.get_mut(&p) {
                        lane.at_end = true;
                        ends.insert(p);
                    }
                }
                Some(Err(e @ rdkafka::error::KafkaError::MessageConsumptionFatal(_))) => {
                    tracing::error!(
                        error = %e,
                        "the Kafka consumer failed fatally; the batch in hand is dropped and the \
                         engine stops"
                    );
                    self.consumer_failed = Some(e);
                    return None;
                }
                Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
                None => {}
            }
            if clock.closes(Instant::now(), records.len(), polled_nothing)
                || changed
                || self.shutdown.is_cancelled()
            {
                self.note_end_offsets(&ends);
                return Some(records);
            }
        }
    }

    /// Whether the consumer moved back on its own in a partition: a record before the lane's
    /// committed offset, which no restore asked for. librdkafka's `auto.offset.reset` does that
    /// when the position is outside the log: the topic deleted and recreated under a running
    /// processor. Deciding those records and committing the lane's offset (it never goes back)
    /// would make the new log's records below it be skipped after the next restart: every lane
    /// is voided instead and restored, which refuses the partitions whose log no longer holds
    /// where they resume, with the cause and the way out (`recovery::within_log`).
    fn moved_back(&mut self, records: &[InRecord]) -> bool {
        let Some(r) = records.iter().find(|r| {
            self.lanes
                .get(&r.partition)
                .is_some_and(|l| r.offset < l.next_offset)
        }) else {
            return false;
        };
        tracing::error!(
            partition = r.partition,
            offset = r.offset,
            next_offset = self.lanes.get(&r.partition).map(|l| l.next_offset),
            "the Kafka consumer moved back on its own (the topic deleted and recreated, or its \
             offsets reset by the client): every partition is restored, and one whose log no \
             longer holds where it resumes is refused"
        );
        self.void_all("the consumer moved back on its own");
        true
    }

    /// Whether the consumer stepped over records deleted before it read them (retention, or
    /// `kafka-delete-records`, past a lagging processor): librdkafka then moves to the log's
    /// new start on its own, with a warning, and the records in between are gone. A batch
    /// whose records jump past where a lane expects its next one, to beyond a log start that is
    /// now past that point, voids every lane instead; the restores refuse the partitions
    /// concerned, naming the deleted offsets and the way out (`recovery::within_log`). A jump
    /// over transaction markers or aborted records leaves the log start where it was.
    fn skipped_deleted(&mut self, records: &[InRecord]) -> bool {
        let mut expected: HashMap<i32, i64> = HashMap::new();
        for r in records {
            let Some(lane) = self.lanes.get(&r.partition) else {
                continue;
            };
            let next = expected.entry(r.partition).or_insert(lane.next_offset);
            let jumped = *next >= 0 && r.offset > *next;
            let from = *next;
            *next = r.offset + 1;
            if !jumped {
                continue;
            }
            let client = self.consumer.client();
            let Some(start) =
                (self.watermarks.as_ref()).and_then(|w| w.log_start(client, r.partition))
            else {
                continue;
            };
            if start > from {
                tracing::error!(
                    partition = r.partition,
                    expected_offset = from,
                    log_start = start,
                    received_offset = r.offset,
                    "records were deleted before they were consumed (retention or \
                     kafka-delete-records past a lagging processor): every partition is \
                     restored, and one whose log no longer holds where it resumes is refused"
                );
                self.void_all("records deleted before they were consumed");
                return true;
            }
        }
        false
    }

    /// Where the consumer stands in the partitions whose end it reached: past their last
    /// record and the transaction markers after it; and whether the log goes on past that
    /// point (a producer's transaction still open holds its records, and all after them, from
    /// a `read_committed` consumer: the end reached is the last stable offset).
    fn note_end_offsets(&mut self, ends: &BTreeSet<i32>) {
        if ends.is_empty() {
            return;
        }
        let Ok(positions) = self.consumer.position() else {
            return;
        };
        for e in positions.elements() {
            if let (true, rdkafka::Offset::Offset(o)) = (ends.contains(&e.partition()), e.offset())
            {
                let client = self.consumer.client();
                let high = (self.watermarks.as_ref()).and_then(|w| w.high(client, e.partition()));
                if let Some(lane) = self.lanes.get_mut(&e.partition()) {
                    lane.end_offset = o;
                    let held = high.is_some_and(|h| h > o);
                    if lane.held_back.observe(held, Instant::now()) {
                        tracing::info!(
                            partition = e.partition(),
                            readable_to = o,
                            "nothing of this partition is held back any more"
                        );
                    }
                }
            }
        }
    }

    /// Decides, writes, commits and reports one batch (see the module documentation).
    fn process(&mut self, records: Vec<InRecord>) {
        // Test builds: a batch held up (a slow engine that lags behind its consumer's fetches).
        if !records.is_empty() {
            fail::fail_point!("engine-process");
        }
        let polled = records.len();
        self.batch_trace.polled(polled);
        self.sync_assignment();
        if self.moved_back(&records) || self.skipped_deleted(&records) {
            return;
        }
        let now_ms = output::now_ms();
        self.tick_clocks(now_ms);
        let input = self.decode(records);
        let priors = match self.look_up(&input) {
            Ok(priors) => priors,
            Err(e) => {
                if let lock_store::Error::Postgres(pg) = &e {
                    self.cut_batches_if_cancelled(pg, Step::Lookup, polled);
                }
                return self.fail(Failure::Lookup(e));
            }
        };
        self.batch_trace.done(Step::Lookup);
        let mut fresh = self.sequence(&input, &priors);
        let commands = self.apply_commands(&mut fresh);
        let plan = self.translate(&input, &fresh, commands, now_ms);
        if plan.is_empty() {
            self.apply_backpressure();
            return;
        }
        self.batch_trace.done(Step::Decide);
        let plan = self.one_writer_per_contact(plan);
        if let Err(e) = self.stage(&plan) {
            return self.fail(Failure::Commit(e));
        }
        let writing = Instant::now();
        if let Err(PartWritten { error: e, written }) = self.persist(&plan) {
            self.abort_staged();
            self.cut_batches_if_cancelled(&e, Step::DurableWrite, polled);
            // The parts already written are rolled back by their lanes' restore.
            let plan = plan.without(&written);
            if let Some(ids) = e.decided_before() {
                return self.put_back_outcomes(&ids);
            }
            if let Some(ids) = e.decided_in_flight() {
                return self.wait_for_claims(&ids);
            }
            if let Some(owned) = e.owned_elsewhere() {
                return self.forward_from_now_on(plan, owned);
            }
            if e.is_data_error() {
                return self.isolate(plan, &e);
            }
            return self.fail(Failure::Persist(e));
        }
        self.batch_trace.done(Step::DurableWrite);
        self.grow_batches(polled, writing.elapsed());
        self.commit_and_report(plan);
    }

    /// A statement of this batch (of `records`) was cancelled by `postgres.statement_timeout`:
    /// the next batches are smaller (see [`BatchLimit`]), or the same batch, replayed, would
    /// be cancelled again for as long as PostgreSQL stays this slow.
    fn cut_batches_if_cancelled(&mut self, error: &pg::Error, step: Step, records: usize) {
        if !error.is_cancelled() {
            return;
        }
        let limit = self.batch_limit.cancelled(records);
        metrics::gauge!(m::BATCH_LIMIT).set(limit as f64);
        tracing::warn!(
            step = step.name(),
            records,
            batch_limit = limit,
            statement_timeout = %humantime::format_duration(self.config.postgres.statement_timeout),
            "a batch's PostgreSQL statement outlasted postgres.statement_timeout; batches are cut \
             until a full one is written well within it (runbook: Processor stalled)"
        );
    }

    /// A batch of `records` was written in `took`: batches cut by
    /// [`Engine::cut_batches_if_cancelled`] grow back while writes are fast.
    fn grow_batches(&mut self, records: usize, took: Duration) {
        let timeout = self.config.postgres.statement_timeout;
        if let Some(limit) = self.batch_limit.written(records, took, timeout) {
            metrics::gauge!(m::BATCH_LIMIT).set(limit as f64);
            tracing::info!(
                records,
                took_ms = took.as_millis() as u64,
                batch_limit = limit,
                batch_max_records = self.config.batch.max_records,
                "PostgreSQL writes are fast again; batches grow back"
            );
        }
    }

    /// Two partitions of one batch wrote the same contact (its records arrive on both: the
    /// topic grew, or a producer's partitioner changed). One statement cannot upsert a row
    /// twice, so one of them writes it: the partition that owns it already (PostgreSQL's
    /// answer, one round trip taken only here), else the lowest; the others forward its
    /// records from now on. (Taking the lowest whatever PostgreSQL said made a partition learn
    /// a wrong owner while the real owner learnt it back: the two forwarded to each other.)
    fn one_writer_per_contact(&mut self, plan: BatchPlan) -> BatchPlan {
        let mut writers: HashMap<&str, Vec<i32>> = HashMap::new();
        for (p, part) in &plan.partitions {
            for c in &part.plan.contacts {
                writers.entry(c.contact_id.as_str()).or_default().push(*p);
            }
        }
        writers.retain(|_, ps| ps.len() > 1);
        if writers.is_empty() {
            return plan;
        }
        let contested: Vec<&str> = writers.keys().copied().collect();
        let known = self
            .call(
                "reading the owners of contacts",
                pg::contact_owners(&self.pool, &contested),
            )
            .unwrap_or_else(|e| {
                // The write decides then: a wrong guess is refused with the owner (CC004).
                tracing::warn!(error = %e, "reading the owners of contacts failed");
                HashMap::new()
            });
        let mut owned = Vec::new();
        for (contact, partitions) in writers {
            let lowest = partitions.iter().copied().min().unwrap_or_default();
            let owner = known.get(contact).copied().unwrap_or(lowest);
            for p in partitions.into_iter().filter(|p| *p != owner) {
                owned.push(pg::OwnedElsewhere {
                    partition: p,
                    contact: contact.to_owned(),
                    owner,
                });
            }
        }
        let refused = self.learn_owners(owned);
        plan.without(&refused)
    }

    /// The durable write refused contacts other partitions own: their records are forwarded
    /// to the owners from now on. The partitions that wrote them are replayed (their lanes
    /// decided those records as if they owned the contacts); the rest of the batch commits.
    fn forward_from_now_on(&mut self, plan: BatchPlan, owned: Vec<pg::OwnedElsewhere>) {
        let refused = self.learn_owners(owned);
        let rest = plan.without(&refused);
        if rest.is_empty() {
            return;
        }
        if let Err(PartWritten { error: e, .. }) = self.persist(&rest) {
            return self.fail(Failure::Persist(e));
        }
        self.batch_trace.done(Step::DurableWrite);
        self.commit_and_report(rest);
    }

    /// The durable write refused intents that PostgreSQL holds an outcome for from an earlier
    /// batch (R5, migration 0012): the lookup missed them, their outcome gone from Redis
    /// (older than `redis.idempotency_ttl`) and from the in-memory window of recent outcomes.
    /// Their outcomes are put back into Redis and every lane replays, where they are duplicates.
    fn put_back_outcomes(&mut self, ids: &[String]) {
        tracing::warn!(
            intents = ids.len(),
            intent_id = %ids.first().map_or("", String::as_str),
            "intents of this batch were decided in an earlier batch, their outcome no longer in \
             Redis (older than redis.idempotency_ttl): the outcomes are put back and the batch \
             replayed, where they are duplicates"
        );
        // This engine's lanes' last batches committed in Kafka: marked so, their rows count.
        let committed = self.committed_batches();
        let outcomes = match self.call("reading the outcomes decided before", async {
            pg::mark_committed(&self.pool, &self.topics.intents, &committed).await?;
            pg::lookup_committed_outcomes(&self.pool, ids).await
        }) {
            Ok(outcomes) => outcomes,
            Err(e) => return self.fail(Failure::Persist(e)),
        };
        if outcomes.len() < ids.len() {
            // Never expected (the write counts committed batches only, and this engine's
            // were just marked): the replay would be refused again.
            tracing::error!(
                refused = ids.len(),
                found = outcomes.len(),
                "not every intent the durable write says was decided before has a committed \
                 outcome in PostgreSQL"
            );
        }
        if let Err(e) = self.call("recording outcomes", self.locks().record(&outcomes)) {
            // The breaker is open then: the replay's lookup asks PostgreSQL.
            tracing::warn!(error = %e, "putting outcomes back into Redis failed");
        }
        self.void_all("intents decided in an earlier batch");
    }

    /// The durable write refused intents that a batch of another partition has claimed and not
    /// committed yet (R5, migration 0015): the same id decided twice at once, on two instances
    /// (a producer gave one id to two contacts). The first claim wins: every lane replays a
    /// little later, when that batch has committed (its outcome is then found, and this use
    /// of the id is a duplicate or a conflict) or rolled back (this use decides the id).
    fn wait_for_claims(&mut self, ids: &[String]) {
        tracing::warn!(
            intents = ids.len(),
            intent_id = %ids.first().map_or("", String::as_str),
            "intents of this batch are being decided by a batch of another partition that has \
             not committed yet (one intent id used twice at once): the batch is replayed once \
             that one has committed or rolled back"
        );
        self.void_all("intents being decided by another batch");
        // Doubling from one transaction's time: that batch's instance may have stopped before
        // its commit, and then only its partition's next restore (by whoever takes it over)
        // rolls its claims back.
        let wait = CLAIM_RETRY.saturating_mul(1 << self.claim_waits.min(5));
        self.claim_waits = self.claim_waits.saturating_add(1);
        self.next_restore_at = Instant::now() + wait.min(CLAIM_RETRY_MAX);
    }

    /// Each lane's last batch, committed in Kafka: (partition, fence, batch) as
    /// `pg::mark_committed` takes them.
    fn committed_batches(&self) -> Vec<(i32, u64, u64)> {
        self.lanes
            .values()
            .filter(|l| l.batch_no > 0)
            .map(|l| (l.partition, l.fence, l.batch_no))
            .collect()
    }

    /// Records who owns which contact, and voids the lanes that decided or forwarded them
    /// wrongly (they are restored and replay their records, now forwarding those contacts' to
    /// their owners, or deciding them). Returns those partitions.
    fn learn_owners(&mut self, owned: Vec<pg::OwnedElsewhere>) -> BTreeSet<i32> {
        let mut refused = BTreeSet::new();
        for o in owned {
            refused.insert(o.partition);
            let owners = self.owners.entry(o.partition).or_default();
            if o.owner == o.partition {
                // A forward's check found no other owner (migration 0017): the owner learnt
                // before lost the contact (its batch was rolled back), and no partition or
                // this one has created it since.
                tracing::info!(
                    partition = o.partition,
                    contact_id = %o.contact,
                    was_forwarded_to = owners.get(&o.contact),
                    "contact no longer owned by the partition its records were forwarded to: \
                     it is decided here"
                );
                owners.remove(&o.contact);
            } else {
                tracing::info!(
                    partition = o.partition,
                    contact_id = %o.contact,
                    owner = o.owner,
                    "contact owned by another partition: its records are forwarded there"
                );
                owners.insert(o.contact, o.owner);
            }
        }
        for p in &refused {
            self.void_lane(*p, PauseCause::Restoring);
        }
        self.next_restore_at = Instant::now();
        refused
    }

    /// Steps 6 and 7.
    fn commit_and_report(&mut self, plan: BatchPlan) {
        if let Err(e) = self.commit(&plan) {
            return self.fail(Failure::Commit(e));
        }
        self.batch_trace.done(Step::Commit);
        self.claim_waits = 0;
        let outputs = plan.partitions.values().flat_map(|p| &p.plan.outputs);
        self.batch_trace
            .committed(outputs.map(|o| o.span.as_deref()));
        self.report(plan);
    }

    /// The durable write failed for its data: finds the partitions whose part PostgreSQL refuses
    /// (adding them one at a time to trial writes, so refusals that only two parts together
    /// cause are found too), commits the others, and isolates the refused ones (see
    /// `isolation`). Only this failure path makes the extra round trips.
    fn isolate(&mut self, plan: BatchPlan, error: &pg::Error) {
        tracing::warn!(error = %error, "the durable write refused this batch's data; finding the partitions that cause it");
        let BatchPlan {
            partitions,
            commands,
            decided_at_ms,
        } = plan;
        let mut good = BatchPlan {
            decided_at_ms,
            ..BatchPlan::default()
        };
        let mut refused = Vec::new();
        for (p, part) in partitions {
            good.partitions.insert(p, part);
            let trial = self.call(
                "writing a trial batch",
                pg::try_batch(
                    &self.pool,
                    &self.topics.intents,
                    &self.writer,
                    self.config.locks.lease,
                    self.batch_write(&good, None),
                ),
            );
            match trial {
                Ok(()) => {}
                Err(e) if e.is_data_error() => {
                    if let Some(part) = good.partitions.remove(&p) {
                        refused.push((p, part, e));
                    }
                }
                Err(e) => return self.fail(Failure::Persist(e)),
            }
        }
        // Commands of refused partitions are voided with their lanes and applied again later
        // (alone, see `isolation`).
        good.commands = (commands.iter())
            .filter(|c| good.partitions.contains_key(&c.partition))
            .cloned()
            .collect();
        let now = Instant::now();
        for (p, part, e) in refused {
            let applied = command_ids(&commands, p);
            let timeouts = self.timeouts_fired.contains(&p);
            let failed = isolation::Part {
                offsets: &part.offsets,
                next_offset: part.next_offset,
                commands: &applied,
                timeouts,
            };
            let verdict = (self.isolation).failed(p, failed, &e.to_string(), now);
            tracing::warn!(
                partition = p,
                records = part.offsets.len(),
                commands = applied.len(),
                timeouts,
                verdict = ?verdict,
                error = %e,
                "isolating a record or command the durable store refuses"
            );
            self.void_lane(p, PauseCause::Store);
            if let Verdict::BackOff { retry_at, .. } = verdict {
                self.assignment.delay(p, retry_at);
            }
        }
        self.next_restore_at = Instant::now();
        if good.is_empty() {
            return;
        }
        if let Err(PartWritten { error: e, .. }) = self.persist(&good) {
            return self.fail(Failure::Persist(e));
        }
        self.batch_trace.done(Step::DurableWrite);
        self.commit_and_report(good);
    }

    /// Each lane's clock: the interval since its last tick counts if the partition was read
    /// (not paused) and is at its end (caught up), with nothing held back behind an open
    /// transaction.
    fn tick_clocks(&mut self, now_ms: i64) {
        let wall = now_ms.max(0) as u64;
        let now = Instant::now();
        for lane in self.lanes.values_mut() {
            // (Only at the end: once records are read again, the next end says whether the
            // hold is over.)
            let due = if lane.at_end {
                lane.held_back.due(now)
            } else {
                None
            };
            if let Some(held) = due {
                tracing::info!(
                    partition = lane.partition,
                    readable_to = lane.end_offset,
                    held_ms = held.as_millis() as u64,
                    "records of this partition are held back behind a producer's open \
                     transaction; its waits do not count until the transaction ends"
                );
            }
            // A partition whose wait timeouts the store refuses counts no time either (see
            // `isolation`): its timeouts are held.
            let counted = !lane.paused
                && lane.at_end
                && !lane.held_back.is_held()
                && !self.isolation.timeouts_held(lane.partition, now);
            lane.clock.tick(wall, counted);
        }
    }

    /// Step 1: decode and validate, per partition. Records of partitions without a lane are
    /// dropped here and read again after their restore.
    fn decode(&mut self, records: Vec<InRecord>) -> Decoded {
        let mut decoded = Decoded::default();
        // Isolating partitions take one record per batch: the rest is read again.
        let mut cut: BTreeMap<i32, i64> = BTreeMap::new();
        for record in records {
            let p = record.partition;
            if !self.lanes.contains_key(&p) {
                self.assignment.consumed_without_lane(p);
                continue;
            }
            if cut.contains_key(&p) {
                continue;
            }
            if self.isolation.commands_first(p) {
                // Its suspect commands are tried alone first: none of its records.
                cut.insert(p, record.offset);
                continue;
            }
            let input = decoded.partitions.entry(p).or_default();
            if self.isolation.one_at_a_time(p, record.offset) && !input.offsets.is_empty() {
                cut.insert(p, record.offset);
                continue;
            }
            input.next_offset = record.offset + 1;
            input.offsets.push(record.offset);
            if let Some(error) = self.isolation.quarantined(p, record.offset) {
                input.unprocessable.push((record, error.to_owned()));
                continue;
            }
            match crate::intent::decode(
                record.key.as_deref(),
                record.value.as_deref(),
                &self.config.limits,
            ) {
                Ok(v) => {
                    let owner = self
                        .owners
                        .get(&p)
                        .and_then(|o| o.get(&v.intent.contact_id))
                        .copied();
                    match owner {
                        Some(owner) => input.forwards.push((record, Arc::new(v), owner)),
                        None => input.valid.push((record, Arc::new(v))),
                    }
                }
                Err(e) => input.invalid.push((record, e)),
            }
        }
        for (p, offset) in cut {
            // Records are left past the cut: the lane is not at its end (its batch must not
            // commit the end offset read with them).
            if let Some(lane) = self.lanes.get_mut(&p) {
                lane.at_end = false;
            }
            let timeout = self.config.kafka.operation_timeout;
            let to = rdkafka::Offset::Offset(offset);
            if let Err(e) = self.consumer.seek(&self.topics.intents, p, to, timeout) {
                // The records past the cut are lost to this lane: restore and rewind.
                tracing::warn!(partition = p, error = %e, "seeking back an isolating partition failed");
                self.void_lane(p, PauseCause::Store);
                decoded.partitions.remove(&p);
            }
        }
        decoded
    }

    /// Step 2: what the idempotency store knows of the batch's intent ids (one round trip).
    fn look_up(&self, input: &Decoded) -> Result<HashMap<String, PriorOutcome>, lock_store::Error> {
        let ids: Vec<String> = input
            .partitions
            .values()
            .flat_map(|p| p.valid.iter().map(|(_, v)| v.intent.intent_id.clone()))
            .collect();
        let known = self.call("looking intents up", self.locks().lookup(&ids))?;
        Ok(known.into_iter().map(|o| (o.intent_id, o.prior)).collect())
    }

    /// Step 3: every valid intent goes to its partition's sequencer, in offset order; then due
    /// wait timeouts fire. Returns the intents first seen in this batch, per partition.
    fn sequence(
        &mut self,
        input: &Decoded,
        priors: &HashMap<String, PriorOutcome>,
    ) -> HashMap<i32, Fresh> {
        let mut fresh: HashMap<i32, Fresh> = HashMap::new();
        // Which partitions fire wait timeouts (on their first intent, or on the tick below):
        // within a batch the clock stands still, and a new wait is due after it.
        let due = |lane: &Lane| (lane.seq.next_timeout_at()).is_some_and(|t| t <= lane.clock.now());
        self.timeouts_fired = (self.lanes.iter())
            .filter(|(_, lane)| due(lane))
            .map(|(p, _)| *p)
            .collect();
        for (p, part) in &input.partitions {
            let Some(lane) = self.lanes.get_mut(p) else {
                continue;
            };
            let now = lane.clock.now();
            let seen = fresh.entry(*p).or_default();
            for (record, v) in &part.valid {
                seen.insert(record.offset, v.clone());
                let held = Held {
                    correlation_id: v.intent.correlation_id.clone(),
                    record: record.clone(),
                };
                let prior = priors.get(&v.intent.intent_id).copied();
                lane.seq
                    .on_intent(translate::meta(v, record), held, prior, now);
            }
        }
        for lane in self.lanes.values_mut() {
            let now = lane.clock.now();
            if lane.seq.next_timeout_at().is_some_and(|t| t <= now) {
                lane.seq.on_tick(now);
            }
        }
        fresh
    }

    /// Step 3b: operator commands (release a held contact, re-submit a manual-review item) of
    /// the owned partitions, at most once per [`COMMAND_POLL`], decided by `operator::apply`.
    /// Their results are written with the batch; they read as applied once it commits in
    /// Kafka, and a batch that never commits leaves them pending again (the restore).
    fn apply_commands(&mut self, fresh: &mut HashMap<i32, Fresh>) -> Commands {
        let mut out = Commands::default();
        if Instant::now() < self.next_commands_at || self.lanes.is_empty() {
            return out;
        }
        self.next_commands_at = Instant::now() + COMMAND_POLL;
        let partitions: Vec<i32> = self.lanes.keys().copied().collect();
        let topic = &self.topics.intents;
        let commands = self.call("reading operator commands", async {
            let commands = pg::pending_commands(&self.pool, topic, &partitions).await?;
            let ids: Vec<String> = commands
                .iter()
                .filter_map(|c| match c {
                    Ok(pg::Command {
                        action: pg::CommandAction::Resubmit(r),
                        ..
                    }) => Some(r.intent_id.clone()),
                    _ => None,
                })
                .collect();
            let priors = pg::lookup_outcomes(&self.pool, &ids).await?;
            Ok::<_, pg::Error>((commands, priors))
        });
        let (commands, priors) = match commands {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "reading operator commands failed");
                return out;
            }
        };
        let priors: HashMap<String, PriorOutcome> =
            priors.into_iter().map(|o| (o.intent_id, o.prior)).collect();
        let id_of = |c: &std::result::Result<pg::Command, pg::UnreadableCommand>| match c {
            Ok(c) => (c.id, c.partition),
            Err(u) => (u.id, u.partition),
        };
        // A partition isolating suspect commands applies one of them alone (see `isolation`).
        let mut to_apply = BTreeSet::new();
        for p in &partitions {
            let mut pending: Vec<i64> = (commands.iter())
                .map(id_of)
                .filter(|(_, partition)| partition == p)
                .map(|(id, _)| id)
                .collect();
            pending.sort_unstable();
            self.isolation.pending_commands(*p, &pending);
            to_apply.extend(self.isolation.commands_to_apply(*p, &pending));
        }
        for c in commands {
            let (id, partition) = id_of(&c);
            if !to_apply.contains(&id) {
                continue;
            }
            let Some(lane) = self.lanes.get_mut(&partition) else {
                continue;
            };
            let refused = self.isolation.refused_command(partition, id);
            let result = match &c {
                Err(u) => pg::CommandResult::Refused(u.why.clone()),
                Ok(_) if refused.is_some() => pg::CommandResult::Refused(format!(
                    "the durable store refuses what this command writes ({}); nothing was \
                     applied: fix the cause and issue it again",
                    refused.unwrap_or_default()
                )),
                Ok(c) => operator::apply(
                    &mut lane.seq,
                    lane.clock.now(),
                    c,
                    match &c.action {
                        pg::CommandAction::Resubmit(r) => priors.get(&r.intent_id).copied(),
                        _ => None,
                    },
                    &self.config.limits,
                    fresh.entry(partition).or_default(),
                    &mut out.resubmitted,
                ),
            };
            tracing::info!(
                command = id,
                partition,
                contact_id = c.as_ref().map_or("", |c| c.contact_id.as_str()),
                action = c.as_ref().map_or("unreadable", |c| c.action.as_str()),
                actor = c.as_ref().map_or("", |c| c.actor.as_str()),
                result = %result.to_column(),
                "operator command"
            );
            out.applied.push(AppliedCommand {
                id,
                partition,
                batch_no: lane.batch_no + 1,
                result,
            });
        }
        out
    }

    /// Step 4: each lane's decisions, invalid records and changed contacts become its part of
    /// the plan (pure). A partition is in the batch when it consumed records, decided
    /// something, or had a command applied.
    fn translate(
        &mut self,
        input: &Decoded,
        fresh: &HashMap<i32, Fresh>,
        commands: Commands,
        now_ms: i64,
    ) -> BatchPlan {
        let empty = Fresh::new();
        let mut plan = BatchPlan {
            partitions: BTreeMap::new(),
            commands: commands.applied,
            decided_at_ms: now_ms,
        };
        let commanded: BTreeSet<i32> = plan.commands.iter().map(|c| c.partition).collect();
        for (p, lane) in &mut self.lanes {
            let ctx = translate::Context {
                topics: &self.topics,
                partition: *p,
                fence: lane.fence,
                batch_no: lane.batch_no + 1,
                now_ms,
            };
            let mut part = PartitionPlan::default();
            for r in commands.resubmitted.iter().filter(|r| r.partition == *p) {
                translate::resubmitted(&ctx, r, &mut part);
            }
            let part_input = input.partitions.get(p);
            for (record, error) in part_input.iter().flat_map(|i| &i.invalid) {
                translate::invalid(&ctx, record, error, &mut part);
            }
            for (record, error) in part_input.iter().flat_map(|i| &i.unprocessable) {
                translate::unprocessable(&ctx, record, error, &mut part);
            }
            for (record, v, owner) in part_input.iter().flat_map(|i| &i.forwards) {
                translate::forwarded(&ctx, record, v, *owner, &mut part);
            }
            let mut decisions = Vec::new();
            lane.seq.drain_decisions(&mut decisions);
            translate::decisions(&ctx, fresh.get(p).unwrap_or(&empty), decisions, &mut part);
            if let Err(e) =
                translate::contacts(&ctx, lane.seq.take_dirty(), &mut lane.rows, &mut part)
            {
                // Unreachable for these plain types; the lane must not go on without its
                // durable state.
                tracing::error!(partition = p, error = %e, "contact state not serializable");
            }
            // A partition at its end whose position passed its committed offset (transaction
            // markers after its last record: records forwarded to it are transactional)
            // commits that position, so its lag reads 0.
            let past_markers =
                lane.at_end && lane.next_offset >= 0 && lane.end_offset > lane.next_offset;
            if part.is_empty() && part_input.is_none() && !commanded.contains(p) && !past_markers {
                continue;
            }
            part.deleted = lane.rows.take_releasable();
            let mut next_offset =
                part_input.map_or(lane.next_offset, |i| i.next_offset.max(lane.next_offset));
            if lane.at_end {
                next_offset = next_offset.max(lane.end_offset);
            }
            plan.partitions.insert(
                *p,
                PartitionPart {
                    plan: part,
                    offsets: part_input.map(|i| i.offsets.clone()).unwrap_or_default(),
                    batch_no: lane.batch_no + 1,
                    fence: lane.fence,
                    next_offset,
                    clock_ms: lane.clock.now().0,
                },
            );
        }
        plan
    }

    /// Step 5: the durable state first: no effect without its record. The batch's partitions
    /// are written in `postgres.parallel_writes` transactions at once (each one round trip
    /// holding whole partitions, balanced by rows; PostgreSQL's per-partition checks need no
    /// more). When one fails, the partitions the others wrote are voided: their restore rolls
    /// them back (Kafka has not committed their batch) and replays them, and the error names
    /// them so the caller handles the rest of the batch alone.
    fn persist(&mut self, plan: &BatchPlan) -> Result<(), PartWritten> {
        let groups = write_groups(plan, self.config.postgres.parallel_writes);
        let writes: Vec<pg::BatchRows> = groups
            .iter()
            .map(|partitions| self.batch_write(plan, Some(partitions)))
            .collect();
        let (pool, topic, writer) = (&self.pool, &self.topics.intents, &self.writer);
        let lease = self.config.locks.lease;
        let joined = self.call("writing a batch", async {
            Ok(futures::future::join_all(
                writes
                    .into_iter()
                    .map(|w| pg::apply_batch(pool, topic, writer, lease, w)),
            )
            .await)
        });
        let mut results = match joined {
            Ok(results) => results,
            // Given up: what PostgreSQL may still write of it is rolled back by the restore
            // that follows (or refused by its newer fencing token).
            Err(error) => {
                return Err(PartWritten {
                    error,
                    written: BTreeSet::new(),
                })
            }
        };
        if let Some(committed) = results.iter_mut().find(|r| r.is_ok()) {
            if reply_lost() {
                *committed = Err(pg::Error::Db {
                    what: "writing a batch",
                    source: sqlx::Error::Io(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "fail point durable-write-reply-lost",
                    )),
                });
            }
        }
        let mut written = BTreeSet::new();
        let mut errors = Vec::new();
        for (partitions, result) in groups.into_iter().zip(results) {
            match result {
                Ok(()) => written.extend(partitions),
                Err(e) => errors.push(e),
            }
        }
        // A failure that is not about the data (fenced, unavailable) decides what happens.
        errors.sort_by_key(|e| e.is_data_error() || e.owned_elsewhere().is_some());
        let Some(error) = errors.into_iter().next() else {
            return Ok(());
        };
        if !written.is_empty() {
            tracing::warn!(
                partitions = ?written,
                error = %error,
                "part of a durable write failed: the partitions written apart from it are \
                 rolled back by their restore and replayed"
            );
            for p in &written {
                self.void_lane(*p, PauseCause::Restoring);
            }
            self.next_restore_at = Instant::now();
        }
        Err(PartWritten { error, written })
    }

    /// The rows of a plan (of `only` these partitions, and their commands), for one write.
    fn batch_write<'p>(
        &self,
        plan: &'p BatchPlan,
        only: Option<&BTreeSet<i32>>,
    ) -> pg::BatchRows<'p> {
        let wanted = |p: &i32| only.is_none_or(|o| o.contains(p));
        let mut write = pg::BatchRows {
            partitions: Vec::with_capacity(plan.partitions.len()),
            commands: plan
                .commands
                .iter()
                .filter(|c| wanted(&c.partition))
                .collect(),
            decided_at_ms: Some(plan.decided_at_ms),
            ..Default::default()
        };
        for (p, part) in plan.partitions.iter().filter(|(p, _)| wanted(p)) {
            write.partitions.push(PartitionWrite {
                partition: *p,
                fence: part.fence,
                batch_no: part.batch_no,
                next_offset: part.next_offset,
                clock_ms: part.clock_ms,
            });
            write.transitions.extend(&part.plan.transitions);
            write.contacts.extend(&part.plan.contacts);
            write.waiting.extend(&part.plan.waiting);
            write.deleted.extend(&part.plan.deleted);
            write.forwards.extend(&part.plan.forwards);
        }
        // One check per (partition, contact, owner), however many of its records were
        // forwarded.
        write.forwards.sort_unstable_by(|a, b| {
            (a.partition, &a.contact_id, a.owner).cmp(&(b.partition, &b.contact_id, b.owner))
        });
        write.forwards.dedup();
        write
    }

    /// Step 5's Kafka half: begins the batch's transaction and queues its outputs, so that
    /// the broker takes them (AddPartitionsToTxn, the records) while PostgreSQL writes. Nothing
    /// of it is visible before [`Engine::commit`]; [`Engine::abort_staged`] discards it. (The
    /// offsets are added after the write: staged offsets would hold back every
    /// `read_committed` read of the group's committed offsets, KIP-447's `require_stable`,
    /// for as long as the transaction stays open.)
    fn stage(&mut self, plan: &BatchPlan) -> kafka::Result<()> {
        let producer = self
            .producer
            .as_mut()
            .ok_or(kafka::Error::Fatal(rdkafka::error::KafkaError::Canceled))?;
        self.staged = Some(Instant::now());
        producer.begin()?;
        for part in plan.partitions.values() {
            for out in &part.plan.outputs {
                producer.send(out)?;
            }
        }
        producer.poll();
        Ok(())
    }

    /// The durable write failed: the staged transaction is aborted (the producer re-created
    /// when it cannot be).
    fn abort_staged(&mut self) {
        if self.staged.take().is_none() {
            return;
        }
        let aborted = self.producer.as_mut().map(TxnProducer::abort);
        if let Some(Err(e)) = aborted {
            tracing::warn!(error = %e, "abort failed; re-creating the producer");
            self.reset_producer();
        }
    }

    /// Step 6: the offsets (with the recovery point) join the staged transaction, which
    /// commits (a batch not staged yet, after a partial write, is staged first).
    fn commit(&mut self, plan: &BatchPlan) -> kafka::Result<()> {
        if self.staged.is_none() {
            self.stage(plan)?;
        }
        let started = self.staged.take().unwrap_or_else(Instant::now);
        let mut offsets = Vec::with_capacity(plan.partitions.len());
        for (p, part) in &plan.partitions {
            if part.next_offset < 0 {
                tracing::error!(
                    partition = p,
                    "a partition without any consumed offset decided something; its recovery \
                     point cannot be committed"
                );
                continue;
            }
            let point = RecoveryPoint {
                batch: part.batch_no,
                fence: part.fence,
                clock_ms: part.clock_ms,
            };
            offsets.push((*p, part.next_offset, point.to_string()));
        }
        let producer = self
            .producer
            .as_mut()
            .ok_or(kafka::Error::Fatal(rdkafka::error::KafkaError::Canceled))?;
        let tpl = kafka::offsets_list(&self.topics.intents, &offsets)?;
        producer.commit(&tpl, &self.consumer)?;
        metrics::histogram!(m::TRANSACTION_DURATION).record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Step 7: the batch is real. Lanes move to their new recovery points, transitions are
    /// reported, the idempotency cache is written through.
    fn report(&mut self, plan: BatchPlan) {
        metrics::counter!(m::TRANSACTIONS, "result" => "commit").increment(1);
        let mut records = 0;
        let mut outcomes = Vec::new();
        let mut committed = Vec::with_capacity(plan.partitions.len());
        let mut rows = Vec::with_capacity(plan.partitions.len());
        for (p, mut part) in plan.partitions {
            committed.push((p, part.fence, part.batch_no));
            let commands = command_ids(&plan.commands, p);
            if self.timeouts_fired.contains(&p) && self.isolation.timeouts_committed(p) {
                tracing::info!(
                    partition = p,
                    "the store takes this partition's wait timeouts again: its clock counts"
                );
            }
            if self.isolation.committed(p, part.next_offset, &commands) {
                tracing::info!(
                    partition = p,
                    "isolation ended: the partition flows in full batches again"
                );
            }
            if let Some(lane) = self.lanes.get_mut(&p) {
                lane.rows.committed(std::mem::take(&mut part.plan.released));
                // This batch's write recorded the lane's previous batch as committed.
                lane.marked = lane.marked.max(lane.batch_no);
                lane.batch_no = part.batch_no;
                lane.committed_at = Instant::now();
                lane.next_offset = part.next_offset;
                if let Some(pause) = part.plan.pause {
                    lane.backpressure = pause;
                    if pause {
                        tracing::warn!(
                            partition = p,
                            waiting = lane.seq.waiting_count(),
                            "partition paused: backlog at its bound"
                        );
                    } else {
                        tracing::info!(
                            partition = p,
                            waiting = lane.seq.waiting_count(),
                            "partition resumed: backlog below its bound"
                        );
                    }
                }
            }
            records += part.offsets.len();
            outcomes.extend(report::idempotency_outcomes(&part.plan.transitions));
            rows.push((part.plan.transitions, part.plan.notes));
        }
        metrics::histogram!(m::BATCH_RECORDS).record(records as f64);
        let now_ms = output::now_ms();
        metrics::gauge!(m::LAST_COMMIT_TIMESTAMP).set(now_ms as f64 / 1000.0);
        self.health.committed(now_ms);
        self.report_transitions(rows, outcomes);
        // Not awaited: the next batch is gathered meanwhile.
        drop(self.mark_committed(committed));
        self.apply_backpressure();
        self.next_gauges_at = Instant::now();
    }

    /// The committed batch's log lines and metrics (one per transition), and the write-through
    /// of its outcomes to the idempotency cache (one Redis round trip): off the engine's
    /// thread, while the next batch is gathered and decoded. The write-through is settled
    /// before the lock store is used again (the next lookup sees it, as if it were written
    /// here), the log lines before the next batch's (they keep their batches' order).
    fn report_transitions(
        &self,
        rows: Vec<(Vec<TransitionRow>, Vec<translate::Note>)>,
        outcomes: Vec<StoredOutcome>,
    ) {
        self.settle_report();
        let locks = self.lock_store.clone();
        let writing = self.rt.spawn(async move {
            if let Err(e) = locks.record(&outcomes).await {
                tracing::warn!(error = %e, "recording outcomes in the idempotency store failed");
            }
        });
        let logging = self.rt.spawn_blocking(move || {
            for (transitions, notes) in &rows {
                for (row, note) in transitions.iter().zip(notes) {
                    report::transition(row, note);
                }
            }
        });
        self.writing_through.set(Some(writing));
        self.logging.set(Some(logging));
    }

    /// The lock store, once the last committed batch's write-through is done: every use (a
    /// lookup, a lock, a restore) sees it, as if it had been written on this thread. Blocks on
    /// the runtime: call it outside any future.
    pub(super) fn locks(&self) -> &LockStore {
        self.settle_write_through();
        &self.lock_store
    }

    /// Runs a call to the stores on the engine's runtime, given up ([`pg::Error::NoAnswer`])
    /// when it has not returned within [`pg::answer_within`] `postgres.statement_timeout`:
    /// PostgreSQL would have ended a slow statement itself by then (Redis calls end on their own
    /// timeouts), so the server runs nothing or its reply is lost. The engine's thread then goes
    /// on polling Kafka and pauses the partitions, as for any outage of the store.
    pub(super) fn call<T, E: From<pg::Error>>(
        &self,
        what: &'static str,
        call: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        self.call_within(what, self.config.postgres.statement_timeout, call)
    }

    /// [`Engine::call`] for statements that run under `statement_timeout` (a restore's).
    pub(super) fn call_within<T, E: From<pg::Error>>(
        &self,
        what: &'static str,
        statement_timeout: Duration,
        call: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let after = pg::answer_within(&self.config.postgres, statement_timeout);
        self.rt
            .block_on(async { tokio::time::timeout(after, call).await })
            .unwrap_or_else(|_| Err(pg::Error::NoAnswer { what, after }.into()))
    }

    /// Waits for the last committed batch's write-through (see
    /// [`Engine::report_transitions`]).
    fn settle_write_through(&self) {
        if let Some(mut task) = self.writing_through.take() {
            let within = pg::answer_within(
                &self.config.postgres,
                self.config.postgres.statement_timeout,
            );
            match self
                .rt
                .block_on(async { tokio::time::timeout(within, &mut task).await })
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "writing a committed batch's outcomes through failed");
                }
                Err(_) => {
                    // Only its PostgreSQL part can hang (registering the fallback after a
                    // failed Redis write, which already stopped trusting Redis), and it is
                    // asked again.
                    task.abort();
                    tracing::error!(
                        within = %humantime::format_duration(within),
                        "writing a committed batch's outcomes through did not end: PostgreSQL \
                         did not answer; given up"
                    );
                }
            }
        }
    }

    /// Waits for the last committed batch's whole report (see [`Engine::report_transitions`]).
    fn settle_report(&self) {
        self.settle_write_through();
        if let Some(task) = self.logging.take() {
            if let Err(e) = self.rt.block_on(task) {
                tracing::error!(error = %e, "reporting a committed batch's transitions failed");
            }
        }
    }

    /// Tells PostgreSQL which batches are now committed, off the engine's thread (best effort:
    /// the partitions' next batch writes record it too, so a row that write holds is skipped,
    /// see `pg::mark_committed_if_free`). The partitions it marked come back on `marked_rx`.
    fn mark_committed(&self, batches: Vec<(i32, u64, u64)>) -> tokio::task::JoinHandle<()> {
        let pool = self.pool.clone();
        let topic = self.topics.intents.clone();
        let marked = self.marked_tx.clone();
        self.rt.spawn(async move {
            // Test builds: the record is lost (as when PostgreSQL fails it).
            fail::fail_point!("record-committed", |_| ());
            match pg::mark_committed_if_free(&pool, &topic, &batches).await {
                Ok(partitions) => {
                    for b in batches.into_iter().filter(|b| partitions.contains(&b.0)) {
                        // The engine may be gone (stopping): nothing left to tell.
                        let _ = marked.send(b);
                    }
                }
                Err(e) => tracing::debug!(error = %e, "recording committed batches failed"),
            }
        })
    }

    /// Records again the committed batches PostgreSQL still does not record as committed
    /// [`REMARK_AFTER`] after their commit: the record sent after the commit failed, or skipped
    /// the partition's row for its next write, which then failed. A partition with traffic gets
    /// it from its next write; a quiet one would otherwise keep it unrecorded until the engine
    /// stops, and meanwhile a Redis failback waits for that batch's fate (docs/redis-fallback.md)
    /// and a restart after an offset reset needs an operator (store::recovery).
    fn remark_quiet_lanes(&mut self) {
        for (p, fence, batch) in self.marked_rx.try_iter() {
            if let Some(lane) = self.lanes.get_mut(&p) {
                if lane.fence == fence {
                    lane.marked = lane.marked.max(batch);
                }
            }
        }
        let now = Instant::now();
        // One at a time: while PostgreSQL does not answer, one waits for it.
        if now < self.next_remark_at || self.remarking.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        self.next_remark_at = now + REMARK_AFTER;
        let unmarked: Vec<_> = self
            .lanes
            .values()
            .filter(|l| l.marked < l.batch_no && now >= l.committed_at + REMARK_AFTER)
            .map(|l| (l.partition, l.fence, l.batch_no))
            .collect();
        if !unmarked.is_empty() {
            tracing::debug!(
                partitions = ?unmarked.iter().map(|b| b.0).collect::<Vec<_>>(),
                "recording committed batches again"
            );
            self.remarking = Some(self.mark_committed(unmarked));
        }
    }

    /// The one place a batch's failure is handled: nothing of it happened, so every lane's
    /// in-memory state is void and restored from the durable store (which rolls the batch's
    /// rows back) before anything else is decided.
    fn fail(&mut self, failure: Failure) {
        self.batch_trace.failed(match &failure {
            Failure::Lookup(_) => "idempotency lookup failed",
            Failure::Persist(_) => "durable write failed",
            Failure::Commit(_) => "transaction did not commit",
        });
        self.health.set_stores_ok(false);
        match failure {
            Failure::Lookup(e) => {
                metrics::counter!(m::STORE_ERRORS, "store" => "postgres").increment(1);
                tracing::error!(error = %e, "idempotency lookup failed; nothing is emitted");
                self.void_all("idempotency store unavailable");
            }
            Failure::Persist(e) if e.is_fenced() => {
                metrics::counter!(m::STORE_ERRORS, "store" => "postgres").increment(1);
                tracing::error!(error = %e, "fenced: another writer owns a partition of this batch");
                self.void_all("fenced");
                // Give the group protocol time to tell us about the new owner.
                self.next_restore_at = Instant::now() + self.config.locks.lease / 2;
            }
            Failure::Persist(e) => {
                metrics::counter!(m::STORE_ERRORS, "store" => "postgres").increment(1);
                tracing::error!(error = %e, "durable write failed; nothing is emitted");
                self.void_all("durable write failed");
            }
            Failure::Commit(e) => {
                metrics::counter!(m::TRANSACTIONS, "result" => "abort").increment(1);
                let too_large = e.is_record_too_large();
                if too_large {
                    tracing::error!(
                        error = %e,
                        max_output_bytes = self.config.limits.max_output_bytes,
                        side_effects_topic = %self.topics.side_effects,
                        manual_review_topic = %self.topics.manual_review,
                        "transaction failed: an output topic refused a record as too large; every output topic's max.message.bytes must be at least limits.max_output_bytes plus 4 KiB (runbook: Transactions aborting); restoring, again in 5 s"
                    );
                } else if !matches!(e, kafka::Error::Stuck { .. }) {
                    // (A stuck call has its own ERROR line in `recover_producer`.)
                    tracing::warn!(error = %e, "transaction failed; restoring");
                }
                self.recover_producer(&e);
                self.void_all("kafka transaction did not commit");
                if too_large {
                    // No retry mends it until the topic or the configuration is changed.
                    self.next_restore_at = Instant::now() + TOO_LARGE_RETRY;
                }
            }
        }
    }

    /// After a transaction failed: aborts it, or re-creates the producer when it cannot.
    fn recover_producer(&mut self, e: &kafka::Error) {
        self.staged = None;
        if e.needs_new_producer() {
            if matches!(e, kafka::Error::Stuck { .. }) {
                tracing::error!(
                    error = %e,
                    "a Kafka call never returned; the producer is given up, the new one fences its transaction, and the partitions restore from the durable state"
                );
            }
            self.reset_producer();
            return;
        }
        let aborted = self.producer.as_mut().map(TxnProducer::abort);
        if let Some(Err(e)) = aborted {
            tracing::warn!(error = %e, "abort failed; re-creating the producer");
            self.reset_producer();
        }
    }

    fn reset_producer(&mut self) {
        metrics::counter!(m::PRODUCER_RESETS).increment(1);
        tracing::warn!("re-creating the transactional producer");
        self.producer = None;
    }

    /// Refreshes the backlog, hold and pause gauges (on every tick, so a quiet partition's
    /// oldest wait keeps ageing).
    fn refresh_gauges(&mut self) {
        if Instant::now() < self.next_gauges_at {
            return;
        }
        self.next_gauges_at = Instant::now() + GAUGE_REFRESH;
        report::gauges(&self.lanes, &self.assignment, output::now_ms());
        report::positions(&self.ctx.lag, &self.consumer, &self.lanes, &self.assignment);
        self.watch_fetches();
        let assigned = self.assignment.assigned().len();
        self.health
            .set_partitions(assigned, self.lanes.len().min(assigned));
        let ready = self.health.view().ready;
        metrics::gauge!(m::READY).set(if ready { 1.0 } else { 0.0 });
    }

    /// Whether the consumer still fetches the partitions the engine reads (see
    /// `super::stall`); the first it stopped fetching stops the engine.
    fn watch_fetches(&mut self) {
        let now = Instant::now();
        let readings: Vec<Reading> = (self.lanes.iter())
            .map(|(p, lane)| Reading {
                partition: *p,
                offsets: self.ctx.lag.reading(*p, now, stall::FRESH),
                paused: lane.paused,
            })
            .collect();
        let stalled = self.fetches.look(now, &readings);
        let Some(first) = stalled.first().copied() else {
            return;
        };
        let statistics = self.ctx.last_statistics();
        for s in stalled {
            let librdkafka = stall::librdkafka_view(&statistics, &self.topics.intents, s.partition);
            tracing::error!(
                partition = s.partition,
                position = s.position,
                last_stable_offset = s.last_stable,
                stalled_s = s.for_.as_secs(),
                librdkafka = librdkafka.as_deref().unwrap_or("not in its statistics"),
                "the Kafka consumer fetched nothing of a partition with records to read while \
                 the broker answered; the consumer is replaced and its partitions restored"
            );
            metrics::counter!(m::CONSUMER_STALLS).increment(1);
        }
        self.consumer_stalled = Some(first);
    }
}

/// Drops a stopped `engine` on a thread of its own and waits for it at most `within`. Its
/// consumer's close can hang for good inside librdkafka (an assignment handed over while it
/// closes: librdkafka issue 4884), and a process that cannot end, or an engine that is never
/// replaced, is worse than a close left unfinished: past `within` the close is abandoned,
/// logged, and the process goes on (it exits, or the next engine starts; a consumer with the
/// same `group.instance.id` and a producer with the same `transactional.id` fence the old
/// ones). Nothing uncommitted is lost either way: the recovery points are in PostgreSQL.
/// Seen in CI: a processor stopping on a fatal error at start had the group's assignment
/// handed over in its close (`partitions assigned` its last line) and never exited. A close
/// otherwise takes milliseconds, the brokers down included (a static member sends no
/// LeaveGroup).
fn close_within(engine: Engine, within: Duration) {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("causal-commit-close".into())
        .spawn(move || {
            // Test builds: a close that does not end.
            fail::fail_point!("engine-close");
            drop(engine);
            let _ = done_tx.send(());
        });
    if let Err(e) = spawned {
        // The engine went with the closure: it was dropped here, on this thread.
        tracing::warn!(error = %e, "starting the close thread failed; the engine was closed in place");
        return;
    }
    if done_rx.recv_timeout(within).is_err() {
        tracing::warn!(
            within_ms = within.as_millis() as u64,
            "closing the Kafka clients did not end in time (librdkafka can hang in a consumer's \
             close); abandoned: the process goes on without waiting for it"
        );
    }
}

/// Copies a polled record out of librdkafka's buffer (it may outlive the poll: waiting intents
/// are kept until their turn).
fn in_record<M: Message>(msg: &M) -> InRecord {
    let headers = msg.headers();
    let traceparent = headers.and_then(|h| {
        h.iter()
            .find(|h| h.key == output::TRACEPARENT_HEADER)
            .and_then(|h| carried_traceparent(h.value.unwrap_or_default()))
    });
    InRecord {
        partition: msg.partition(),
        offset: msg.offset(),
        key: msg.key().map(<[u8]>::to_vec),
        value: msg.payload().map(<[u8]>::to_vec),
        traceparent,
    }
}

/// The producer's `traceparent` header as the outputs carry it on: only a valid one (W3C Trace
/// Context: an invalid one is ignored), written in version 00, so 55 bytes. The header is the
/// producer's to fill with anything, and every output of the record copies it: copied as it
/// came, a header of a megabyte made the effect larger than any topic takes.
fn carried_traceparent(value: &[u8]) -> Option<Vec<u8>> {
    crate::telemetry::trace::TraceParent::parse(value).map(|p| p.to_header())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_valid_traceparent_is_carried_on_and_never_longer_than_55_bytes() {
        let valid = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(carried_traceparent(valid).as_deref(), Some(&valid[..]));
        // W3C Trace Context: lowercase hex only.
        let upper = b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01";
        assert_eq!(carried_traceparent(upper), None);
        // A later version may be longer; only its first 55 bytes mean anything.
        let mut later = b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-".to_vec();
        later.extend(std::iter::repeat_n(b'x', 900_000));
        let carried = carried_traceparent(&later).expect("a later version is read");
        assert_eq!(carried.len(), 55);
        assert!(carried.starts_with(b"00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        for junk in [&b""[..], b"garbage", &[0xff; 1000][..]] {
            assert_eq!(carried_traceparent(junk), None);
        }
    }

    fn set(ps: &[i32]) -> BTreeSet<i32> {
        ps.iter().copied().collect()
    }

    #[test]
    fn a_batch_is_split_into_groups_of_similar_rows_each_partition_in_one() {
        let rows = [(0, 10), (1, 500), (2, 300), (3, 250), (4, 0)];
        assert_eq!(
            balance(&rows, 2),
            [set(&[0, 1, 4]), set(&[2, 3])],
            "500 + 10 + 0 against 300 + 250"
        );
        assert_eq!(balance(&rows, 1), [set(&[0, 1, 2, 3, 4])]);
        let three = balance(&rows, 3);
        assert_eq!(three, [set(&[1]), set(&[2]), set(&[0, 3, 4])]);
        // Every partition exactly once, whatever n.
        for n in 0..8 {
            let groups = balance(&rows, n);
            let mut all: Vec<i32> = groups.iter().flatten().copied().collect();
            all.sort_unstable();
            assert_eq!(all, [0, 1, 2, 3, 4], "n = {n}");
            assert!(groups.len() <= (n.max(1) as usize), "n = {n}");
        }
    }

    #[test]
    fn more_writes_than_partitions_leave_no_group_empty() {
        assert_eq!(balance(&[(7, 3)], 4), [set(&[7])]);
        assert_eq!(balance(&[(1, 4), (2, 5)], 4), [set(&[2]), set(&[1])]);
        // Parts without rows (offsets only) join the lightest group.
        assert_eq!(balance(&[(1, 0), (2, 0)], 4), [set(&[1, 2])]);
        assert!(balance(&[], 2).is_empty());
    }
}
