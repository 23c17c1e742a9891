//! Passthrough mode (`[bench] passthrough = true`): the benchmark's throughput ceiling.
//!
//! The same consumer and transactional producer as the engine (same client settings, same
//! batching by `batch.max_records` / `batch.max_linger`, records polled into memory before the
//! transaction begins), but every record is copied as it is (key, value, headers) to the
//! side-effects topic: no decoding, no sequencing, no PostgreSQL, no Redis. Each batch commits
//! in one Kafka transaction with the consumed offsets and the group's metadata (KIP-447), so a
//! passthrough run is exactly-once too, and what separates it from a full run is the product's
//! own work. It keeps none of the contract's other promises: never run it in production.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::Offset;
use tokio_util::sync::CancellationToken;

use super::gather::BatchClock;
use super::kafka::{self, EngineConsumer, EngineContext, TxnProducer};
use crate::config::Config;
use crate::telemetry::metrics as m;

/// Failures that stop a passthrough run (Kafka errors inside a batch are retried in place).
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

/// Runs the passthrough loop on its own thread (librdkafka's transactional calls block) until
/// `shutdown` fires; the batch in hand is committed first.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("causal-commit-passthrough".into())
        .spawn(move || {
            let _ = tx.send(Passthrough::new(config, shutdown).and_then(Passthrough::run));
        })?;
    match rx.await {
        Ok(result) => Ok(result?),
        Err(_) => anyhow::bail!("the passthrough thread ended without a result (it panicked)"),
    }
}

/// One consumed record, copied out of librdkafka's buffer.
struct Copied {
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Option<OwnedHeaders>,
}

/// The records of one transaction and, per partition, the first and next offsets.
#[derive(Default)]
struct Batch {
    records: Vec<Copied>,
    /// partition -> (first offset in the batch, one past the last).
    span: BTreeMap<i32, (i64, i64)>,
}

struct Passthrough {
    config: Arc<Config>,
    intents: Arc<str>,
    side_effects: String,
    ctx: EngineContext,
    consumer: EngineConsumer,
    producer: Option<TxnProducer>,
    shutdown: CancellationToken,
}

impl Passthrough {
    fn new(config: Arc<Config>, shutdown: CancellationToken) -> Result<Self> {
        let intents: Arc<str> = config.kafka.intents_topic.as_str().into();
        let ctx = EngineContext {
            topic: intents.clone(),
            ..EngineContext::default()
        };
        let consumer = kafka::consumer(&config, ctx.clone())?;
        consumer
            .subscribe(&[&intents])
            .map_err(|source| Error::Subscribe {
                topic: intents.to_string(),
                source,
            })?;
        Ok(Self {
            side_effects: config.kafka.side_effects_topic.clone(),
            config,
            intents,
            ctx,
            consumer,
            producer: None,
            shutdown,
        })
    }

    fn run(mut self) -> Result<()> {
        tracing::warn!(
            group = %self.config.kafka.group_id,
            from = %self.intents,
            to = %self.side_effects,
            transactional_id = %kafka::transactional_id(&self.config),
            "passthrough mode (benchmark only): records are copied, no sequencing, no stores"
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
            if let Some(batch) = self.gather() {
                if !batch.records.is_empty() {
                    self.commit(&batch);
                }
            }
            // Its events (statistics for its broker watch) queue up while no batch runs.
            if let Some(p) = &self.producer {
                p.poll();
            }
            if stopping {
                break;
            }
        }
        tracing::info!("passthrough stopping: leaving the group");
        self.consumer.unsubscribe();
        Ok(())
    }

    /// Serves the group protocol for a while without taking records: a record polled meanwhile
    /// is put back (its partition is rewound to it).
    fn idle(&mut self, d: Duration) {
        if let Some(Ok(msg)) = self.consumer.poll(d) {
            let (p, o) = (msg.partition(), msg.offset());
            drop(msg);
            let timeout = self.config.kafka.operation_timeout;
            if let Err(e) = self
                .consumer
                .seek(&self.intents, p, Offset::Offset(o), timeout)
            {
                tracing::warn!(partition = p, error = %e, "rewind failed");
            }
        }
    }

    /// Polls until the batch closes, by the engine's rule ([`BatchClock`]). `None` when a
    /// revocation voided it (nothing was produced yet; the next owner starts from the committed
    /// offsets).
    fn gather(&mut self) -> Option<Batch> {
        let mut batch = Batch::default();
        let mut clock = BatchClock::new(
            self.config.batch.max_linger,
            self.config.batch.max_records,
            Instant::now(),
        );
        loop {
            let polled = self.consumer.poll(clock.poll_timeout(Instant::now()));
            let polled_nothing = polled.is_none();
            let (revoked, changed) = {
                let mut ev = self
                    .ctx
                    .events
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let seen = (ev.revoked, ev.changed);
                ev.revoked = false;
                ev.changed = false;
                seen
            };
            if revoked {
                if !batch.records.is_empty() {
                    tracing::info!(
                        records = batch.records.len(),
                        "rebalance: uncommitted batch dropped"
                    );
                }
                return None;
            }
            match polled {
                Some(Ok(msg)) => {
                    let (p, o) = (msg.partition(), msg.offset());
                    let span = batch.span.entry(p).or_insert((o, o + 1));
                    span.1 = o + 1;
                    batch.records.push(Copied {
                        key: msg.key().map(<[u8]>::to_vec),
                        value: msg.payload().map(<[u8]>::to_vec),
                        headers: msg.headers().map(|h| h.detach()),
                    });
                    clock.record(Instant::now());
                    metrics::counter!(m::RECORDS_CONSUMED).increment(1);
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {}
                Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
                None => {}
            }
            if clock.closes(Instant::now(), batch.records.len(), polled_nothing)
                || changed
                || self.shutdown.is_cancelled()
            {
                return Some(batch);
            }
        }
    }

    /// One transaction: the copies, the consumed offsets, commit. On failure the transaction
    /// is aborted (or the producer re-created) and the batch's partitions are rewound.
    fn commit(&mut self, batch: &Batch) {
        let started = Instant::now();
        match self.try_commit(batch) {
            Ok(()) => {
                metrics::counter!(m::TRANSACTIONS, "result" => "commit").increment(1);
                metrics::histogram!(m::TRANSACTION_DURATION)
                    .record(started.elapsed().as_secs_f64());
                metrics::histogram!(m::BATCH_RECORDS).record(batch.records.len() as f64);
                metrics::gauge!(m::LAST_COMMIT_TIMESTAMP)
                    .set(super::output::now_ms() as f64 / 1000.0);
            }
            Err(e) => {
                metrics::counter!(m::TRANSACTIONS, "result" => "abort").increment(1);
                tracing::warn!(error = %e, records = batch.records.len(), "transaction failed; rewinding");
                let reset = e.needs_new_producer()
                    || match self.producer.as_mut().map(TxnProducer::abort) {
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "abort failed; re-creating the producer");
                            true
                        }
                        _ => false,
                    };
                if reset {
                    metrics::counter!(m::PRODUCER_RESETS).increment(1);
                    self.producer = None;
                }
                self.rewind(batch);
            }
        }
    }

    fn try_commit(&mut self, batch: &Batch) -> kafka::Result<()> {
        let producer = self
            .producer
            .as_mut()
            .ok_or(kafka::Error::Fatal(rdkafka::error::KafkaError::Canceled))?;
        producer.begin()?;
        for r in &batch.records {
            producer.send_raw(
                &self.side_effects,
                r.key.as_deref(),
                r.value.as_deref(),
                r.headers.clone(),
            )?;
        }
        producer.poll();
        let next: Vec<(i32, i64, String)> = batch
            .span
            .iter()
            .map(|(p, (_, next))| (*p, *next, String::new()))
            .collect();
        let offsets = kafka::offsets_list(&self.intents, &next)?;
        producer.commit(&offsets, &self.consumer)
    }

    /// Moves the batch's partitions back to its first records, so they are copied again in
    /// the next transaction. A partition no longer assigned starts from the committed offset.
    fn rewind(&self, batch: &Batch) {
        for (p, (first, _)) in &batch.span {
            if let Err(e) = self.consumer.seek(
                &self.intents,
                *p,
                Offset::Offset(*first),
                self.config.kafka.operation_timeout,
            ) {
                tracing::warn!(partition = p, error = %e, "rewind failed");
            }
        }
    }
}
