//! The consume-transform-produce loop, on one dedicated thread.
//!
//! One batch = one Kafka transaction. Records are polled into memory (nothing is produced while
//! polling, so a rebalance during polling only drops the in-memory records), then:
//!
//! 1. decoded and validated; invalid ones become `INVALID_INTENT` manual-review records;
//! 2. the idempotency store is asked, in one round trip, what it knows of the batch's intent ids;
//! 3. each partition's sequencer ([`Lane`]) decides, and its decisions become effects,
//!    manual-review records, audit rows and contact states;
//! 4. the durable state is written in one PostgreSQL round trip, tagged with each partition's
//!    next batch number and checked against its fencing token;
//! 5. the outputs and the consumed offsets (whose metadata names the batch number: the
//!    recovery point) commit in one Kafka transaction.
//!
//! Any failure after step 3 voids the in-memory state: every lane is dropped, its partition
//! paused, and restored from PostgreSQL against the committed offsets (rows of batches that
//! never committed in Kafka are rolled back), then rewound and resumed. See
//! `docs/exactly-once.md`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::kafka::{self, EngineConsumer, EngineContext, OutRecord, TxnProducer};
use super::lane::{self, Lane, Translated, Translator};
use super::output::{self, ReviewFields, Source};
use crate::config::Config;
use crate::intent::{InRecord, InvalidIntent, ValidIntent};
use crate::proto::ReviewReason;
use crate::sequencer::{self, Millis, Outcome, PriorOutcome, Reason, Release, Sequencer};
use crate::store::lock_store::{LockResult, LockStore};
use crate::store::postgres::{self as pg, BatchWrite, StoredOutcome, TransitionRow};
use crate::store::recovery::RecoveryPoint;
use crate::store::snapshot::{self, Held};
use crate::telemetry::metrics as m;

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
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Topic names, shared cheaply by every output record.
#[derive(Clone)]
pub struct Topics {
    pub intents: Arc<str>,
    pub side_effects: Arc<str>,
    pub manual_review: Arc<str>,
}

/// How often operator commands are looked for.
const COMMAND_POLL: Duration = Duration::from_secs(1);
/// How long to wait before retrying a partition that could not be restored.
const RESTORE_RETRY: Duration = Duration::from_secs(1);

pub struct Engine {
    config: Arc<Config>,
    seq_config: sequencer::Config,
    topics: Topics,
    ctx: EngineContext,
    consumer: EngineConsumer,
    producer: Option<TxnProducer>,
    shutdown: CancellationToken,
    rt: tokio::runtime::Handle,
    pool: PgPool,
    /// Locks and idempotency: Redis, with PostgreSQL as the fallback.
    locks: Arc<LockStore>,
    writer: String,
    lanes: BTreeMap<i32, Lane>,
    assigned: BTreeSet<i32>,
    /// Assigned partitions without a lane, with whether their position must be rewound.
    to_restore: BTreeMap<i32, bool>,
    next_restore_at: Instant,
    next_commands_at: Instant,
    paused: BTreeSet<i32>,
    /// Operator commands applied in the batch being built.
    pending_applied: Vec<pg::AppliedCommand>,
    /// Partitions whose state changed through a command in the batch being built.
    command_partitions: BTreeSet<i32>,
}

impl Engine {
    pub fn new(
        config: Arc<Config>,
        pool: PgPool,
        locks: Arc<LockStore>,
        rt: tokio::runtime::Handle,
        shutdown: CancellationToken,
    ) -> Result<Self> {
        let topics = Topics {
            intents: config.kafka.intents_topic.as_str().into(),
            side_effects: config.kafka.side_effects_topic.as_str().into(),
            manual_review: config.kafka.manual_review_topic.as_str().into(),
        };
        let s = &config.sequencer;
        let seq_config = sequencer::Config {
            wait_timeout: s.wait_timeout,
            on_timeout: s.on_timeout,
            max_pending_per_contact: s.max_pending_per_contact.min(u32::MAX as usize) as u32,
            max_pending_per_partition: s.max_pending_per_partition,
            resume_pending_below: s.resume_pending_per_partition,
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
        Ok(Self {
            config,
            seq_config,
            topics,
            ctx,
            consumer,
            producer: None,
            shutdown,
            rt,
            pool,
            locks,
            writer,
            lanes: BTreeMap::new(),
            assigned: BTreeSet::new(),
            to_restore: BTreeMap::new(),
            next_restore_at: Instant::now(),
            next_commands_at: Instant::now(),
            paused: BTreeSet::new(),
            pending_applied: Vec::new(),
            command_partitions: BTreeSet::new(),
        })
    }

    /// Runs until the shutdown token fires; the batch in hand is committed before returning.
    pub fn run(mut self) -> Result<()> {
        tracing::info!(
            group = %self.config.kafka.group_id,
            topic = %self.topics.intents,
            writer = %self.writer,
            transactional_id = %kafka::transactional_id(&self.config),
            "engine started"
        );
        loop {
            let stopping = self.shutdown.is_cancelled();
            if self.producer.is_none() {
                match TxnProducer::new(&self.config) {
                    Ok(p) => self.producer = Some(p),
                    Err(e) => {
                        tracing::error!(error = %e, "transactional producer unavailable; retrying");
                        if stopping {
                            break;
                        }
                        self.idle(Duration::from_secs(1));
                        continue;
                    }
                }
            }
            self.sync_assignment();
            self.restore_pending();
            let records = self.gather();
            if let Some(records) = records {
                self.process(records);
            }
            if stopping {
                break;
            }
        }
        tracing::info!("engine stopping: releasing leases and leaving the group");
        for (p, lane) in std::mem::take(&mut self.lanes) {
            self.release(p, lane.fence);
        }
        self.consumer.unsubscribe();
        Ok(())
    }

    /// Serves the group protocol for a while without taking records.
    fn idle(&mut self, d: Duration) {
        let deadline = Instant::now() + d;
        while Instant::now() < deadline && !self.shutdown.is_cancelled() {
            if let Some(Ok(msg)) = self.consumer.poll(Duration::from_millis(100)) {
                // A record of a partition that has no lane yet: it is read again after restore.
                self.to_restore
                    .entry(msg.partition())
                    .and_modify(|s| *s = true);
                if let Some(lane) = self.lanes.remove(&msg.partition()) {
                    self.void_lane(lane.partition);
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
        if revoked {
            // Eager assignor: everything was revoked. Give the leases up so the next owners
            // start at once; in-memory state is void.
            for (p, lane) in std::mem::take(&mut self.lanes) {
                self.release(p, lane.fence);
                clear_partition_gauges(p);
            }
            self.to_restore.clear();
            self.paused.clear();
        }
        for p in &assigned {
            if !self.lanes.contains_key(p) {
                self.to_restore.entry(*p).or_insert(false);
            }
        }
        self.to_restore.retain(|p, _| assigned.contains(p));
        self.assigned = assigned;
        self.next_restore_at = Instant::now();
        metrics::gauge!(m::PARTITIONS_ASSIGNED).set(self.assigned.len() as f64);
    }

    /// Restores every assigned partition that has no lane (new assignment or after a failure).
    fn restore_pending(&mut self) {
        if self.to_restore.is_empty() || Instant::now() < self.next_restore_at {
            return;
        }
        let pending: Vec<(i32, bool)> = self.to_restore.iter().map(|(p, s)| (*p, *s)).collect();
        for (p, seek) in pending {
            match self.restore(p, seek) {
                Ok(lane) => {
                    self.to_restore.remove(&p);
                    let backpressure = lane.backpressure;
                    self.lanes.insert(p, lane);
                    if !backpressure {
                        self.set_paused(p, false);
                    }
                }
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "partition not restored yet; paused");
                    self.set_paused(p, true);
                    self.next_restore_at = Instant::now() + RESTORE_RETRY;
                }
            }
        }
        self.update_gauges();
    }

    /// Gives a partition's lock and lease up (best effort: they expire anyway).
    fn release(&self, partition: i32, fence: u64) {
        let topic = &self.topics.intents;
        let (lock, lease) = self.rt.block_on(async {
            (
                self.locks
                    .release_lock(topic, partition, &self.writer)
                    .await,
                pg::release_partition(&self.pool, topic, partition, fence).await,
            )
        });
        if let Err(e) = lock {
            tracing::warn!(partition, error = %e, "releasing a lock failed");
        }
        if let Err(e) = lease {
            tracing::warn!(partition, error = %e, "releasing a lease failed");
        }
    }

    fn restore(&mut self, partition: i32, seek: bool) -> Result<Lane, String> {
        let started = Instant::now();
        let topic = self.topics.intents.to_string();
        // The lock (Redis, or the PostgreSQL lease on fallback) first, then a fencing token
        // from the durable store, which every write of this owner is checked against.
        match self
            .rt
            .block_on(self.locks.acquire_lock(
                &topic,
                partition,
                &self.writer,
                self.config.locks.lease,
            ))
            .map_err(|e| e.to_string())?
        {
            LockResult::Granted { .. } => {}
            LockResult::Held { owner, ttl } => {
                return Err(format!(
                    "the partition's lock is held by {owner} for another {ttl:?}"
                ))
            }
        }
        let fence = self
            .rt
            .block_on(pg::acquire_partition(
                &self.pool,
                &topic,
                partition,
                &self.writer,
                self.config.locks.lease,
            ))
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "another owner holds the partition's lease".to_string())?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&topic, partition);
        let committed = self
            .consumer
            .committed_offsets(tpl, self.config.kafka.operation_timeout)
            .map_err(|e| format!("reading the committed offset: {e}"))?;
        let (offset, batch_no) = committed
            .elements()
            .first()
            .map(|e| {
                let point = RecoveryPoint::parse(e.metadata()).ok().flatten();
                (e.offset(), point.map_or(0, |p| p.batch))
            })
            .unwrap_or((Offset::Invalid, 0));
        let restored = self
            .rt
            .block_on(pg::restore_partition(
                &self.pool, &topic, partition, fence, batch_no,
            ))
            .map_err(|e| e.to_string())?;
        // The idempotency cache catches up with the last committed batch (a crash may have
        // come between that batch's commit and its write-through).
        self.rt
            .block_on(self.locks.partition_restored(&topic, partition, batch_no))
            .map_err(|e| e.to_string())?;
        let mut seq: Sequencer<Held> =
            Sequencer::new(self.seq_config.clone()).map_err(|e| e.to_string())?;
        let snapshots = restored
            .states
            .into_iter()
            .map(snapshot::decode)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let contacts = snapshots.len();
        seq.restore(snapshots).map_err(|e| e.to_string())?;
        let mut pause = Vec::new();
        seq.drain_decisions(&mut pause);
        let backpressure = pause
            .iter()
            .any(|d| matches!(d, sequencer::Decision::PausePartition { .. }));
        let next_offset = match offset {
            Offset::Offset(o) => o,
            _ => -1,
        };
        if seek {
            let to = if next_offset >= 0 {
                Offset::Offset(next_offset)
            } else {
                Offset::Beginning
            };
            self.consumer
                .seek(&topic, partition, to, self.config.kafka.operation_timeout)
                .map_err(|e| format!("rewinding to the committed offset: {e}"))?;
        }
        metrics::counter!(m::RESTORES, "cause" => if seek { "recovery" } else { "assignment" })
            .increment(1);
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
            "partition restored"
        );
        Ok(Lane {
            partition,
            fence,
            batch_no,
            next_offset,
            seq,
            backpressure,
        })
    }

    /// Pauses or resumes one partition. Always asks librdkafka, whatever `self.paused` says:
    /// its pause state survives a revoke and re-assign of the same partition.
    fn set_paused(&mut self, partition: i32, pause: bool) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topics.intents, partition);
        let result = if pause {
            self.consumer.pause(&tpl)
        } else {
            self.consumer.resume(&tpl)
        };
        match result {
            Ok(()) => {
                if pause {
                    self.paused.insert(partition);
                } else {
                    self.paused.remove(&partition);
                }
            }
            Err(e) => tracing::warn!(partition, pause, error = %e, "pause/resume failed"),
        }
        metrics::gauge!(m::PARTITIONS_PAUSED).set(self.paused.len() as f64);
    }

    /// Drops a lane whose in-memory state can no longer be trusted; it is restored (and its
    /// partition rewound) before its next record is processed.
    fn void_lane(&mut self, partition: i32) {
        self.lanes.remove(&partition);
        if self.assigned.contains(&partition) {
            self.to_restore.insert(partition, true);
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
            self.void_lane(p);
        }
        self.next_restore_at = Instant::now();
    }

    /// Polls records until the batch is full or old enough. `None` when a rebalance voided it.
    fn gather(&mut self) -> Option<Vec<InRecord>> {
        let mut records = Vec::new();
        let linger = self.config.batch.max_linger;
        let max = self.config.batch.max_records;
        let mut started: Option<Instant> = None;
        let tick_deadline = Instant::now() + linger;
        loop {
            let timeout = match started {
                None => tick_deadline.saturating_duration_since(Instant::now()),
                Some(t) => linger.saturating_sub(t.elapsed()),
            };
            let polled = self.consumer.poll(timeout.max(Duration::from_millis(1)));
            let (revoked, changed) = {
                let ev = self.ctx.events.lock().unwrap_or_else(|p| p.into_inner());
                (ev.revoked, ev.changed)
            };
            if revoked {
                if !records.is_empty() {
                    tracing::info!(
                        records = records.len(),
                        "rebalance: uncommitted batch dropped"
                    );
                }
                return None;
            }
            if let Some(Ok(msg)) = &polled {
                let headers = msg.headers();
                let header = |name: &str| {
                    headers.and_then(|h| {
                        h.iter()
                            .find(|h| h.key == name)
                            .map(|h| h.value.unwrap_or_default().to_vec())
                    })
                };
                records.push(InRecord {
                    partition: msg.partition(),
                    offset: msg.offset(),
                    key: msg.key().map(<[u8]>::to_vec),
                    value: msg.payload().map(<[u8]>::to_vec),
                    traceparent: header(output::TRACEPARENT_HEADER),
                    resubmission: header(output::RESUBMISSION_HEADER).is_some(),
                });
                started.get_or_insert_with(Instant::now);
                metrics::counter!(m::RECORDS_CONSUMED).increment(1);
            } else if let Some(Err(e)) = polled {
                tracing::warn!(error = %e, "consumer error");
            }
            let full = records.len() >= max;
            let old = match started {
                Some(t) => t.elapsed() >= linger,
                None => Instant::now() >= tick_deadline,
            };
            if full || old || changed || self.shutdown.is_cancelled() {
                return Some(records);
            }
        }
    }

    /// Decides, writes and commits one batch.
    fn process(&mut self, records: Vec<InRecord>) {
        self.sync_assignment();
        let now = output::now_ms();
        let now_m = Millis(now.max(0) as u64);
        let mut out = Translated::default();
        let mut touched: BTreeMap<i32, i64> = BTreeMap::new();
        let mut fresh: HashMap<(i32, i64), Arc<ValidIntent>> = HashMap::new();
        let mut valid: Vec<(InRecord, Arc<ValidIntent>)> = Vec::new();
        let mut invalid_rows: Vec<TransitionRow> = Vec::new();

        // 1. Decode; records of partitions without a lane are read again after their restore.
        for record in records {
            let Some(lane) = self.lanes.get(&record.partition) else {
                self.to_restore
                    .entry(record.partition)
                    .and_modify(|s| *s = true);
                continue;
            };
            touched.insert(record.partition, record.offset + 1);
            match crate::intent::decode(
                record.key.as_deref(),
                record.value.as_deref(),
                &self.config.limits,
            ) {
                Ok(v) => {
                    let v = Arc::new(v);
                    fresh.insert((record.partition, record.offset), v.clone());
                    valid.push((record, v));
                }
                Err(e) => {
                    let row =
                        self.invalid(&record, &e, lane.fence, lane.batch_no + 1, now, &mut out);
                    invalid_rows.push(row);
                }
            }
        }
        out.transitions.extend(invalid_rows);

        // 2. What the durable store knows of these intent ids (one round trip).
        let ids: Vec<String> = valid
            .iter()
            .map(|(_, v)| v.intent.intent_id.clone())
            .collect();
        let known = match self.rt.block_on(self.locks.lookup(&ids)) {
            Ok(rows) => rows
                .into_iter()
                .filter_map(|r| prior(&r).map(|p| (r.intent_id, p)))
                .collect::<HashMap<_, _>>(),
            Err(e) => {
                metrics::counter!(m::STORE_ERRORS, "store" => "postgres").increment(1);
                tracing::error!(error = %e, "idempotency lookup failed; nothing is emitted");
                self.void_all("idempotency store unavailable");
                return;
            }
        };

        // 3. Sequence.
        for (record, v) in valid {
            let Some(lane) = self.lanes.get_mut(&record.partition) else {
                continue;
            };
            let meta = lane::meta(&v, &record, record.resubmission);
            let held = Held {
                correlation_id: v.intent.correlation_id.clone(),
                record,
            };
            lane.seq
                .on_intent(meta, held, known.get(&v.intent.intent_id).copied(), now_m);
        }
        self.apply_commands(now_m);
        for lane in self.lanes.values_mut() {
            if lane.seq.next_timeout_at().is_some_and(|t| t <= now_m) {
                lane.seq.on_tick(now_m);
            }
        }

        // 4. Translate decisions into outputs, audit rows and contact states.
        let mut pauses = Vec::new();
        let translator = Translator {
            intents_topic: &self.topics.intents,
            side_effects_topic: &self.topics.side_effects,
            manual_review_topic: &self.topics.manual_review,
            now_ms: now,
            fresh: &fresh,
        };
        for lane in self.lanes.values_mut() {
            let before = (out.transitions.len(), out.contacts.len(), out.outputs.len());
            out.pause = None;
            lane.translate(&translator, &mut out);
            let after = (out.transitions.len(), out.contacts.len(), out.outputs.len());
            if before != after {
                touched.entry(lane.partition).or_insert(lane.next_offset);
            }
            if let Some(p) = out.pause.take() {
                pauses.push((lane.partition, p));
            }
        }
        let commands = std::mem::take(&mut self.pending_applied);
        for p in std::mem::take(&mut self.command_partitions) {
            if let Some(lane) = self.lanes.get(&p) {
                touched.entry(p).or_insert(lane.next_offset);
            }
        }
        if touched.is_empty() && commands.is_empty() {
            return;
        }
        let mut write = BatchWrite {
            partitions: Vec::new(),
            transitions: std::mem::take(&mut out.transitions),
            contacts: std::mem::take(&mut out.contacts),
            commands,
        };
        for p in touched.keys() {
            if let Some(lane) = self.lanes.get(p) {
                write.partitions.push((*p, lane.fence, lane.batch_no + 1));
            }
        }

        // 5. Durable state first: no effect without its record.
        let written = self.rt.block_on(pg::apply_batch(
            &self.pool,
            &self.topics.intents,
            &self.writer,
            self.config.locks.lease,
            &write,
        ));
        if let Err(e) = written {
            metrics::counter!(m::STORE_ERRORS, "store" => "postgres").increment(1);
            if e.is_fenced() {
                tracing::error!(error = %e, "fenced: another writer owns a partition of this batch");
                self.void_all("fenced");
                // Give the group protocol time to tell us about the new owner.
                self.next_restore_at = Instant::now() + self.config.locks.lease / 2;
            } else {
                tracing::error!(error = %e, "durable write failed; nothing is emitted");
                self.void_all("durable write failed");
            }
            return;
        }

        // 6. Outputs and offsets in one Kafka transaction.
        let offsets: Vec<(i32, i64, String)> = touched
            .iter()
            .filter_map(|(p, next)| {
                let lane = self.lanes.get(p)?;
                let next = (*next).max(lane.next_offset);
                (next >= 0).then(|| {
                    let point = RecoveryPoint {
                        batch: lane.batch_no + 1,
                        fence: lane.fence,
                        clock_ms: 0,
                    };
                    (*p, next, point.to_string())
                })
            })
            .collect();
        let started = Instant::now();
        match self.try_commit(&out.outputs, &offsets) {
            Ok(()) => {
                for (p, next, _) in &offsets {
                    if let Some(lane) = self.lanes.get_mut(p) {
                        lane.batch_no += 1;
                        lane.next_offset = *next;
                    }
                }
                // Partitions touched without a known offset still advanced their batch.
                for p in touched.keys() {
                    if !offsets.iter().any(|(q, _, _)| q == p) {
                        if let Some(lane) = self.lanes.get_mut(p) {
                            lane.batch_no += 1;
                        }
                    }
                }
                for (p, pause) in pauses {
                    if let Some(lane) = self.lanes.get_mut(&p) {
                        lane.backpressure = pause;
                    }
                    self.set_paused(p, pause);
                }
                metrics::counter!(m::TRANSACTIONS, "result" => "commit").increment(1);
                metrics::histogram!(m::TRANSACTION_DURATION)
                    .record(started.elapsed().as_secs_f64());
                // Write-through of the batch's terminal outcomes (one Redis round trip).
                let outcomes = terminal_outcomes(&write.transitions);
                if let Err(e) = self.rt.block_on(self.locks.record(&outcomes)) {
                    tracing::warn!(error = %e, "recording outcomes in the idempotency store failed");
                }
                metrics::histogram!(m::BATCH_RECORDS).record(write.transitions.len() as f64);
                metrics::gauge!(m::LAST_COMMIT_TIMESTAMP).set(output::now_ms() as f64 / 1000.0);
                self.update_gauges();
            }
            Err(e) => {
                metrics::counter!(m::TRANSACTIONS, "result" => "abort").increment(1);
                tracing::warn!(error = %e, outputs = out.outputs.len(), "transaction failed; restoring");
                match e {
                    kafka::Error::Fatal(_) | kafka::Error::Create { .. } => self.reset_producer(),
                    _ => {
                        let aborted = self.producer.as_mut().map(TxnProducer::abort);
                        if let Some(Err(e)) = aborted {
                            tracing::warn!(error = %e, "abort failed; re-creating the producer");
                            self.reset_producer();
                        }
                    }
                }
                self.void_all("kafka transaction did not commit");
            }
        }
    }

    /// Applies operator commands (release a held contact) of the owned partitions.
    fn apply_commands(&mut self, now: Millis) {
        if Instant::now() < self.next_commands_at || self.lanes.is_empty() {
            return;
        }
        self.next_commands_at = Instant::now() + COMMAND_POLL;
        let partitions: Vec<i32> = self.lanes.keys().copied().collect();
        let commands = match self.rt.block_on(pg::pending_commands(
            &self.pool,
            &self.topics.intents,
            &partitions,
        )) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "reading operator commands failed");
                return;
            }
        };
        for c in commands {
            let Some(lane) = self.lanes.get_mut(&c.partition) else {
                continue;
            };
            let release = match c.action.as_str() {
                "skip_to" => Release::SkipTo(c.skip_to),
                _ => Release::Resume,
            };
            let result = match lane.seq.release(&c.contact_id, release, now) {
                Ok(()) => "applied".to_string(),
                Err(e) => format!("refused: {e}"),
            };
            tracing::info!(
                command = c.id,
                contact_id = %c.contact_id,
                action = %c.action,
                skip_to = c.skip_to,
                actor = %c.actor,
                result = %result,
                "operator command"
            );
            self.pending_applied.push(pg::AppliedCommand {
                id: c.id,
                batch_no: lane.batch_no + 1,
                result,
            });
            self.command_partitions.insert(c.partition);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn invalid(
        &self,
        record: &InRecord,
        invalid: &InvalidIntent,
        fence: u64,
        batch_no: u64,
        now: i64,
        out: &mut Translated,
    ) -> TransitionRow {
        let kind = invalid_kind(invalid);
        let source = Source {
            topic: &self.topics.intents,
            record,
        };
        // What can still be read of a record that failed validation, for the audit.
        let partial = record
            .value
            .as_deref()
            .and_then(|v| <crate::proto::Intent as prost::Message>::decode(v).ok());
        lane::log_transition(
            partial.as_ref().map_or("", |i| i.correlation_id.as_str()),
            partial.as_ref().map_or("", |i| i.contact_id.as_str()),
            partial.as_ref().map_or("", |i| i.clinic_id.as_str()),
            partial.as_ref().map_or("", |i| i.intent_id.as_str()),
            0,
            "manual_review",
            Reason::InvalidIntent.as_str(),
            &invalid.to_string(),
        );
        metrics::counter!(m::INVALID_INTENTS, "reason" => kind).increment(1);
        metrics::counter!(m::OUTCOMES, "state" => "manual_review", "reason" => "INVALID_INTENT")
            .increment(1);
        out.outputs.push(output::manual_review(
            &self.topics.manual_review,
            &source,
            ReviewFields {
                reason: ReviewReason::InvalidIntent,
                detail: invalid.to_string(),
                intent: partial.as_ref(),
                expected_sequence: 0,
                received_sequence: partial.as_ref().map_or(0, |i| i.causal_sequence),
                waited_ms: 0,
                reviewed_at_ms: now,
                fencing_token: fence,
            },
        ));
        TransitionRow {
            partition: record.partition,
            batch_no,
            source_offset: record.offset,
            intent_id: partial
                .as_ref()
                .map(|i| i.intent_id.clone())
                .unwrap_or_default(),
            contact_id: partial
                .as_ref()
                .map(|i| i.contact_id.clone())
                .unwrap_or_default(),
            clinic_id: partial
                .as_ref()
                .map(|i| i.clinic_id.clone())
                .unwrap_or_default(),
            correlation_id: partial
                .as_ref()
                .map(|i| i.correlation_id.clone())
                .unwrap_or_default(),
            from_state: "received",
            to_state: "manual_review",
            reason: Reason::InvalidIntent.as_str(),
            detail: invalid.to_string(),
            fence,
            ..TransitionRow::default()
        }
    }

    fn try_commit(
        &mut self,
        outputs: &[OutRecord],
        offsets: &[(i32, i64, String)],
    ) -> kafka::Result<()> {
        let producer = self
            .producer
            .as_mut()
            .ok_or(kafka::Error::Fatal(rdkafka::error::KafkaError::Canceled))?;
        producer.begin()?;
        for out in outputs {
            producer.send(out)?;
        }
        producer.poll();
        let tpl = kafka::offsets_list(&self.topics.intents, offsets)?;
        producer.commit(&tpl, &self.consumer)
    }

    fn reset_producer(&mut self) {
        metrics::counter!(m::PRODUCER_RESETS).increment(1);
        tracing::warn!("re-creating the transactional producer");
        self.producer = None;
    }

    fn update_gauges(&self) {
        let now = output::now_ms().max(0) as u64;
        let mut held = 0;
        for (p, lane) in &self.lanes {
            let b = lane.seq.backlog();
            held += b.contacts_held;
            let label = p.to_string();
            metrics::gauge!(m::BACKLOG_WAITING, "partition" => label.clone()).set(b.waiting as f64);
            let age = b
                .oldest_waiting_since
                .map_or(0.0, |since| now.saturating_sub(since.0) as f64 / 1000.0);
            metrics::gauge!(m::BACKLOG_OLDEST_AGE, "partition" => label).set(age);
        }
        metrics::gauge!(m::CONTACTS_ON_HOLD).set(held as f64);
    }
}

fn clear_partition_gauges(p: i32) {
    metrics::gauge!(m::BACKLOG_WAITING, "partition" => p.to_string()).set(0.0);
    metrics::gauge!(m::BACKLOG_OLDEST_AGE, "partition" => p.to_string()).set(0.0);
}

/// The batch's terminal outcomes, for the idempotency store's write-through.
fn terminal_outcomes(rows: &[TransitionRow]) -> Vec<StoredOutcome> {
    rows.iter()
        .filter(|r| {
            !r.intent_id.is_empty()
                && r.reason != Reason::InvalidIntent.as_str()
                && matches!(
                    r.to_state,
                    "committed_causal" | "blocked_conflict" | "manual_review"
                )
        })
        .map(|r| StoredOutcome {
            intent_id: r.intent_id.clone(),
            fingerprint: r.fingerprint,
            state: r.to_state.to_string(),
            reason: r.reason.to_string(),
            commit_sequence: r.commit_sequence,
            contact_version: r.contact_version,
        })
        .collect()
}

/// A stored terminal outcome as the sequencer's `prior`.
fn prior(r: &StoredOutcome) -> Option<PriorOutcome> {
    let reason = || match r.reason.as_str() {
        "VERSION_CONFLICT" => Reason::VersionConflict,
        "SEQUENCE_CONFLICT" => Reason::SequenceConflict,
        "IDEMPOTENCY_CONFLICT" => Reason::IdempotencyConflict,
        "WAIT_TIMEOUT" => Reason::WaitTimeout,
        "CONTACT_ON_HOLD" => Reason::ContactOnHold,
        "CONTACT_BACKLOG_OVERFLOW" => Reason::ContactBacklogOverflow,
        _ => Reason::InvalidIntent,
    };
    let outcome = match r.state.as_str() {
        "committed_causal" => Outcome::Committed {
            commit_sequence: r.commit_sequence,
            contact_version: r.contact_version,
        },
        "blocked_conflict" => Outcome::Blocked {
            reason: reason(),
            commit_sequence: r.commit_sequence,
        },
        "manual_review" => Outcome::ManualReview {
            reason: reason(),
            commit_sequence: r.commit_sequence,
        },
        _ => return None,
    };
    Some(PriorOutcome {
        fingerprint: r.fingerprint,
        outcome,
    })
}

/// A short, low-cardinality name for a validation failure (a metric label).
pub fn invalid_kind(e: &InvalidIntent) -> &'static str {
    match e {
        InvalidIntent::NoValue => "no_value",
        InvalidIntent::RecordTooLarge { .. } => "record_too_large",
        InvalidIntent::Undecodable(_) => "undecodable",
        InvalidIntent::MissingField(_) => "missing_field",
        InvalidIntent::FieldTooLong { .. } => "field_too_long",
        InvalidIntent::PayloadTooLarge { .. } => "payload_too_large",
        InvalidIntent::MissingKey { .. } => "missing_key",
        InvalidIntent::KeyMismatch { .. } => "key_mismatch",
        InvalidIntent::UnknownAction(_) => "unknown_action",
        InvalidIntent::UnspecifiedAction => "unspecified_action",
    }
}
