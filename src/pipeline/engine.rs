//! The consume-transform-produce loop, on one dedicated thread.
//!
//! One batch = one Kafka transaction: records are polled and processed into outputs in memory
//! (nothing is produced while polling, so a rebalance during polling only has to drop the
//! in-memory batch), then the outputs and the consumed offsets commit atomically.
//!
//! Failure handling follows the transactional protocol: an abortable error aborts and rewinds
//! every assigned partition to its committed offset; a fatal error or an unknown outcome (a
//! timed-out commit) re-creates the producer (whose `init_transactions` fences and finishes the
//! old one) and rewinds the same way. Offsets are never committed outside a transaction.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::message::{Headers, Message};
use rdkafka::Offset;
use tokio_util::sync::CancellationToken;

use super::kafka::{self, EngineConsumer, EngineContext, OutRecord, TxnProducer};
use super::output::{self, EffectFields, InRecord, ReviewFields, Source};
use crate::config::Config;
use crate::intent::{self, InvalidIntent};
use crate::proto::ReviewReason;
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
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Topic names, shared cheaply by every output record.
#[derive(Clone)]
pub struct Topics {
    pub intents: Arc<str>,
    pub side_effects: Arc<str>,
    pub manual_review: Arc<str>,
}

/// One transaction's worth of work.
#[derive(Default)]
struct Batch {
    outputs: Vec<OutRecord>,
    /// Per partition: one past the last consumed offset.
    next_offsets: std::collections::BTreeMap<i32, i64>,
    records: usize,
    started: Option<Instant>,
}

pub struct Engine {
    config: Arc<Config>,
    topics: Topics,
    ctx: EngineContext,
    consumer: EngineConsumer,
    producer: Option<TxnProducer>,
    shutdown: CancellationToken,
}

impl Engine {
    pub fn new(config: Arc<Config>, shutdown: CancellationToken) -> Result<Self> {
        let topics = Topics {
            intents: config.kafka.intents_topic.as_str().into(),
            side_effects: config.kafka.side_effects_topic.as_str().into(),
            manual_review: config.kafka.manual_review_topic.as_str().into(),
        };
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
        Ok(Self {
            config,
            topics,
            ctx,
            consumer,
            producer: None,
            shutdown,
        })
    }

    /// Runs until the shutdown token fires; the batch in hand is committed before returning.
    pub fn run(mut self) -> Result<()> {
        tracing::info!(
            group = %self.config.kafka.group_id,
            topic = %self.topics.intents,
            transactional_id = %kafka::transactional_id(&self.config),
            "engine started"
        );
        while !self.shutdown.is_cancelled() {
            if self.producer.is_none() {
                match TxnProducer::new(&self.config) {
                    Ok(p) => self.producer = Some(p),
                    Err(e) => {
                        tracing::error!(error = %e, "transactional producer unavailable; retrying");
                        self.pause_for(Duration::from_secs(1));
                        continue;
                    }
                }
            }
            let Some(batch) = self.gather() else { continue };
            if batch.records == 0 && batch.outputs.is_empty() {
                continue;
            }
            self.commit(batch);
        }
        tracing::info!("engine stopping: unsubscribing");
        self.consumer.unsubscribe();
        Ok(())
    }

    fn pause_for(&self, d: Duration) {
        let deadline = Instant::now() + d;
        while Instant::now() < deadline && !self.shutdown.is_cancelled() {
            // Keep serving the group protocol while waiting.
            let _ = self.consumer.poll(Duration::from_millis(100));
            let (revoked, _, _) = self.ctx.take_events();
            let _ = revoked;
        }
    }

    /// Polls and processes records until the batch is full or old enough. `None` when a
    /// rebalance voided the batch.
    fn gather(&mut self) -> Option<Batch> {
        let mut batch = Batch::default();
        let linger = self.config.batch.max_linger;
        let max = self.config.batch.max_records;
        loop {
            let timeout = match batch.started {
                None => Duration::from_millis(100),
                Some(t) => linger.saturating_sub(t.elapsed()),
            };
            let polled = self.consumer.poll(timeout);
            let (revoked, _changed, _assigned) = self.ctx.take_events();
            if revoked {
                // Eager assignment: every partition was revoked, and the new assignment starts
                // from the committed offsets. Nothing of this batch was produced: drop it.
                if batch.records > 0 {
                    tracing::info!(
                        records = batch.records,
                        "rebalance: uncommitted batch dropped"
                    );
                }
                return None;
            }
            match polled {
                Some(Ok(msg)) => {
                    let record = InRecord {
                        partition: msg.partition(),
                        offset: msg.offset(),
                        key: msg.key().map(<[u8]>::to_vec),
                        value: msg.payload().map(<[u8]>::to_vec),
                        traceparent: msg.headers().and_then(|h| {
                            h.iter()
                                .find(|h| h.key == output::TRACEPARENT_HEADER)
                                .and_then(|h| h.value.map(<[u8]>::to_vec))
                        }),
                    };
                    batch.started.get_or_insert_with(Instant::now);
                    batch.records += 1;
                    batch
                        .next_offsets
                        .insert(record.partition, record.offset + 1);
                    metrics::counter!(m::RECORDS_CONSUMED).increment(1);
                    self.process(&record, &mut batch);
                }
                Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
                None => {}
            }
            let full = batch.records >= max;
            let old = batch.started.is_some_and(|t| t.elapsed() >= linger);
            if full || old || (self.shutdown.is_cancelled()) {
                return Some(batch);
            }
        }
    }

    fn process(&mut self, record: &InRecord, batch: &mut Batch) {
        let source = Source {
            topic: &self.topics.intents,
            record,
        };
        let now = output::now_ms();
        match intent::decode(
            record.key.as_deref(),
            record.value.as_deref(),
            &self.config.limits,
        ) {
            Ok(valid) => {
                let i = &valid.intent;
                tracing::info!(
                    correlation_id = %i.correlation_id,
                    contact_id = %i.contact_id,
                    clinic_id = %i.clinic_id,
                    intent_id = %i.intent_id,
                    commit_sequence = i.causal_sequence,
                    state = "committed_causal",
                    "intent committed"
                );
                metrics::counter!(m::OUTCOMES, "state" => "committed_causal", "reason" => "")
                    .increment(1);
                batch.outputs.push(output::side_effect(
                    &self.topics.side_effects,
                    i,
                    record.traceparent.as_ref(),
                    &EffectFields {
                        commit_sequence: i.causal_sequence,
                        contact_version: 0,
                        committed_at_ms: now,
                        fencing_token: 0,
                        sequence_from_producer: i.causal_sequence > 0,
                    },
                ));
            }
            Err(invalid) => {
                self.invalid(&source, &invalid, now, batch);
            }
        }
    }

    fn invalid(&self, source: &Source<'_>, invalid: &InvalidIntent, now: i64, batch: &mut Batch) {
        let kind = invalid_kind(invalid);
        tracing::warn!(
            partition = source.record.partition,
            offset = source.record.offset,
            state = "manual_review",
            reason = "INVALID_INTENT",
            invalid = kind,
            detail = %invalid,
            "invalid intent sent to manual review"
        );
        metrics::counter!(m::INVALID_INTENTS, "reason" => kind).increment(1);
        metrics::counter!(m::OUTCOMES, "state" => "manual_review", "reason" => "INVALID_INTENT")
            .increment(1);
        batch.outputs.push(output::manual_review(
            &self.topics.manual_review,
            source,
            ReviewFields {
                reason: ReviewReason::InvalidIntent,
                detail: invalid.to_string(),
                intent: None,
                expected_sequence: 0,
                received_sequence: 0,
                waited_ms: 0,
                reviewed_at_ms: now,
                fencing_token: 0,
            },
        ));
    }

    /// Produces the batch and commits it with its offsets; on failure, aborts or re-creates the
    /// producer and rewinds to the committed offsets.
    fn commit(&mut self, batch: Batch) {
        let started = Instant::now();
        let result = self.try_commit(&batch);
        match result {
            Ok(()) => {
                metrics::counter!(m::TRANSACTIONS, "result" => "commit").increment(1);
                metrics::histogram!(m::TRANSACTION_DURATION)
                    .record(started.elapsed().as_secs_f64());
                metrics::histogram!(m::BATCH_RECORDS).record(batch.records as f64);
                metrics::gauge!(m::LAST_COMMIT_TIMESTAMP).set(output::now_ms() as f64 / 1000.0);
            }
            Err(e) => {
                metrics::counter!(m::TRANSACTIONS, "result" => "abort").increment(1);
                tracing::warn!(error = %e, records = batch.records, "transaction failed; rewinding");
                match e {
                    kafka::Error::Abortable(_)
                    | kafka::Error::Other(_)
                    | kafka::Error::NotInGroup => {
                        let aborted = self.producer.as_mut().map(TxnProducer::abort);
                        if let Some(Err(e)) = aborted {
                            tracing::warn!(error = %e, "abort failed; re-creating the producer");
                            self.reset_producer();
                        }
                    }
                    kafka::Error::Fatal(_) | kafka::Error::Create { .. } => self.reset_producer(),
                }
                self.rewind();
            }
        }
    }

    fn try_commit(&mut self, batch: &Batch) -> kafka::Result<()> {
        let producer = self
            .producer
            .as_mut()
            .ok_or_else(|| kafka::Error::Fatal(rdkafka::error::KafkaError::Canceled))?;
        producer.begin()?;
        for out in &batch.outputs {
            producer.send(out)?;
        }
        producer.poll();
        let next: Vec<(i32, i64, String)> = batch
            .next_offsets
            .iter()
            .map(|(p, o)| (*p, *o, String::new()))
            .collect();
        let tpl = kafka::offsets_list(&self.topics.intents, &next)?;
        producer.commit(&tpl, &self.consumer)
    }

    fn reset_producer(&mut self) {
        metrics::counter!(m::PRODUCER_RESETS).increment(1);
        tracing::warn!("re-creating the transactional producer");
        self.producer = None;
    }

    /// Moves every assigned partition back to its committed offset.
    fn rewind(&mut self) {
        let assignment = match self.consumer.assignment() {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "reading the assignment failed");
                return;
            }
        };
        let committed = match self
            .consumer
            .committed_offsets(assignment, self.config.kafka.operation_timeout)
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "reading committed offsets failed");
                return;
            }
        };
        let mut seek = rdkafka::TopicPartitionList::new();
        for e in committed.elements() {
            let offset = match e.offset() {
                Offset::Offset(o) => Offset::Offset(o),
                _ => Offset::Beginning,
            };
            let _ = seek.add_partition_offset(e.topic(), e.partition(), offset);
        }
        if let Err(e) = self
            .consumer
            .seek_partitions(seek, self.config.kafka.operation_timeout)
        {
            tracing::error!(error = %e, "rewinding to committed offsets failed");
        }
    }
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
