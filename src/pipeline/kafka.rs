//! librdkafka clients: configuration, the consumer context (rebalances, statistics) and the
//! transactional producer with its error classes.
//!
//! Every call here may block: they run on the engine's dedicated thread, never on a tokio worker.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientContext, TopicPartitionList};

use crate::config::Config;
use crate::telemetry::metrics as m;

mod admin_call;
pub mod call_thread;
pub mod stranded;
mod topic_config;
mod topic_id;
mod watermark;
use call_thread::CallThread;
pub use stranded::{BrokerWatch, Watched};
pub use topic_config::{topic_setting, Setting};
pub use topic_id::topic_id;
pub use watermark::CachedWatermarks;

/// How long past its own timeout a blocking transactional call may take before it is taken as
/// one that never returns (see [`call_thread`]).
pub const STUCK_GRACE: Duration = Duration::from_secs(10);

/// Kafka failures, classified the way the transactional protocol needs them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("creating the Kafka {what} client failed: {source}")]
    Create {
        what: &'static str,
        source: KafkaError,
    },
    /// The transaction must be aborted; the producer stays usable.
    #[error("Kafka transaction must abort: {0}")]
    Abortable(KafkaError),
    /// The producer is unusable (fenced, fatal, or an outcome that is unknown after a timeout):
    /// re-create it. Never retried blindly.
    #[error("Kafka producer must be re-created: {0}")]
    Fatal(KafkaError),
    #[error("Kafka call failed: {0}")]
    Other(#[from] KafkaError),
    /// The consumer has no group membership (between rebalances): abort and retry.
    #[error("the consumer is not a member of its group")]
    NotInGroup,
    /// A blocking librdkafka call did not return: the producer is given up and re-created, the
    /// transaction's outcome is unknown.
    #[error(
        "Kafka producer call {call} did not return within {}; the producer is given up (librdkafka issues 5456/5511)",
        humantime::format_duration(*.waited)
    )]
    Stuck {
        call: &'static str,
        waited: Duration,
    },
    /// Records of the transaction to abort were still unacknowledged after [`ABORT_DRAIN`]:
    /// librdkafka's abort would wait for them and most likely fail too, so the producer is
    /// re-created (the new one fences the transaction).
    #[error(
        "{left} records of the transaction to abort unacknowledged after {}; the producer is re-created",
        humantime::format_duration(*.waited)
    )]
    Undelivered { left: i32, waited: Duration },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How long an abort waits for its transaction's records to be acknowledged (a healthy broker
/// takes milliseconds) before the producer is re-created instead.
pub const ABORT_DRAIN: Duration = Duration::from_secs(2);

impl Error {
    fn kafka_error(&self) -> Option<&KafkaError> {
        match self {
            Error::Abortable(e) | Error::Fatal(e) | Error::Other(e) => Some(e),
            Error::Create { source, .. } => Some(source),
            Error::NotInGroup | Error::Stuck { .. } | Error::Undelivered { .. } => None,
        }
    }

    /// A record larger than librdkafka's `message.max.bytes` or a topic's `max.message.bytes`:
    /// a configuration below `limits.max_output_bytes`, which no retry mends.
    pub fn is_record_too_large(&self) -> bool {
        self.kafka_error().is_some_and(|e| {
            e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge)
                || e.to_string().contains("Message size too large")
        })
    }

    /// The brokers refused the producer's `transaction.timeout.ms` (`kafka.transaction_timeout`)
    /// as above their `transaction.max.timeout.ms`: a configuration no retry mends.
    pub fn is_transaction_timeout_refused(&self) -> bool {
        self.kafka_error().is_some_and(|e| {
            e.rdkafka_error_code() == Some(RDKafkaErrorCode::InvalidTransactionTimeout)
                || e.to_string()
                    .contains("Transaction timeout is larger than the maximum")
        })
    }

    /// The producer cannot go on: re-create it (never abort through it).
    pub fn needs_new_producer(&self) -> bool {
        matches!(
            self,
            Error::Fatal(_)
                | Error::Create { .. }
                | Error::Stuck { .. }
                | Error::Undelivered { .. }
        )
    }
}

/// What the engine learns from rebalance callbacks (they run inside `poll`, on the engine's
/// thread; the engine reads and clears this after each poll).
#[derive(Debug, Default)]
pub struct RebalanceEvents {
    /// Partitions were revoked since the engine last looked: any uncommitted work is void.
    pub revoked: bool,
    /// The partitions assigned now.
    pub assigned: BTreeSet<i32>,
    /// The assignment changed since the engine last looked.
    pub changed: bool,
    /// Topics other than the intents topic that the coordinator assigned partitions of (see
    /// `Engine::assigned_elsewhere`); never part of `assigned`.
    pub foreign: BTreeSet<String>,
}

#[derive(Clone, Default)]
pub struct EngineContext {
    pub events: Arc<Mutex<RebalanceEvents>>,
    pub topic: Arc<str>,
    /// The consumer's positions, for the lag monitor (cleared here on revocation).
    pub lag: Arc<super::lag::Positions>,
    /// Set by [`consumer`]: bootstraps the consumer again if librdkafka forgets every broker.
    pub brokers: Arc<BrokerWatch>,
    /// The consumer's last statistics report, for the log of a stalled partition (see
    /// `super::stall`).
    pub statistics: Arc<Mutex<Vec<u8>>>,
}

impl EngineContext {
    /// The consumer's last statistics report (empty before the first, or with statistics off).
    pub fn last_statistics(&self) -> Vec<u8> {
        (self
            .statistics
            .lock()
            .unwrap_or_else(PoisonError::into_inner))
        .clone()
    }

    pub fn take_events(&self) -> (bool, bool, BTreeSet<i32>) {
        let mut ev = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        let out = (ev.revoked, ev.changed, ev.assigned.clone());
        ev.revoked = false;
        ev.changed = false;
        out
    }

    /// The topics other than the intents topic that partitions were assigned of.
    pub fn foreign_topics(&self) -> BTreeSet<String> {
        let ev = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        ev.foreign.clone()
    }

    /// Whether a revocation or an assignment change happened since the last `take_events`,
    /// without clearing it.
    pub fn peek_events(&self) -> (bool, bool) {
        let ev = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        (ev.revoked, ev.changed)
    }
}

// Statistics go to the broker watch, and are kept for the fetch watch's log (`super::stall`):
// librdkafka's consumer lag is measured from a committed offset this consumer never moves;
// `super::lag` measures it from the consumer's position.
impl ClientContext for EngineContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if is_partition_end(&error) {
            return;
        }
        tracing::warn!(error = %error, reason, "kafka client error");
    }

    fn stats_raw(&self, statistics: &[u8]) {
        self.brokers.observe(statistics);
        let mut kept = self
            .statistics
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        kept.clear();
        kept.extend_from_slice(statistics);
    }
}

/// Reaching a partition's end is how the engine learns it is caught up, not an error.
/// librdkafka reports it to the poll (`PartitionEOF(partition)`) and also to the error
/// callback, where rust-rdkafka wraps it as a global error without the partition.
fn is_partition_end(error: &KafkaError) -> bool {
    matches!(
        error,
        KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
    )
}

impl ConsumerContext for EngineContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut ev = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let revoked: Vec<i32> = tpl
                    .elements()
                    .iter()
                    .filter(|e| e.topic() == &*self.topic)
                    .map(|e| e.partition())
                    .collect();
                tracing::info!(partitions = ?revoked, "partitions revoked");
                ev.revoked = true;
                ev.changed = true;
                self.lag.revoke(&revoked);
                for p in revoked {
                    ev.assigned.remove(&p);
                }
            }
            Rebalance::Assign(tpl) => {
                let (ours, theirs): (Vec<_>, Vec<_>) = tpl
                    .elements()
                    .into_iter()
                    .partition(|e| e.topic() == &*self.topic);
                let assigned: Vec<i32> = ours.iter().map(|e| e.partition()).collect();
                tracing::info!(partitions = ?assigned, "partitions assigned");
                // Only the intents topic is subscribed to: partitions of another topic are an
                // assignment the coordinator kept from before the subscription changed.
                for e in theirs {
                    tracing::error!(
                        topic = e.topic(),
                        partition = e.partition(),
                        "the group coordinator assigned a partition of a topic this consumer \
                         does not subscribe to"
                    );
                    ev.foreign.insert(e.topic().to_owned());
                }
                ev.changed = true;
                ev.assigned.extend(assigned);
            }
            Rebalance::Error(e) => tracing::error!(error = %e, "rebalance error"),
        }
        metrics::gauge!(m::PARTITIONS_ASSIGNED).set(ev.assigned.len() as f64);
    }
}

pub type EngineConsumer = BaseConsumer<EngineContext>;

/// How long a client without any usable broker waits before it bootstraps again from
/// `kafka.brokers` (librdkafka's `metadata.recovery.rebootstrap.trigger.ms`, default 300 s).
/// librdkafka drops ("decommissions") a broker that a metadata response leaves out, and a
/// broker in controlled shutdown can answer with none: after a restart of a single broker, or of
/// every broker a client knew, the client then has no broker to ask until it bootstraps again.
/// At the default that is five minutes, as long as a producer's message timeout: the chaos
/// test's workload producer lost its queued records that way (tests/integration/chaos.rs).
pub const REBOOTSTRAP_AFTER_MS: &str = "10000";

/// A client configuration for `kafka.brokers`: the defaults every Kafka client of
/// causal-commit starts from, then the client's own `settings`, then `[kafka.client]` (which
/// may override them; the keys correctness depends on are refused there by the configuration's
/// check). A caller sets what nothing may override after this.
pub fn client_config(config: &Config, settings: &[(&str, &str)]) -> ClientConfig {
    configured(config, false, settings)
}

/// [`client_config`] for a long-lived client with a [`BrokerWatch`]: statistics on (before
/// `[kafka.client]`, which may change their interval).
pub fn watched_config(config: &Config, settings: &[(&str, &str)]) -> ClientConfig {
    configured(config, true, settings)
}

fn configured(config: &Config, watched: bool, settings: &[(&str, &str)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set(
        "metadata.recovery.rebootstrap.trigger.ms",
        REBOOTSTRAP_AFTER_MS,
    );
    // Never create a topic by asking for it: on brokers with auto.create.topics.enable, a
    // producer (librdkafka's default is true for producers) or a metadata request would create
    // a mistyped or deleted topic with the brokers' defaults, and the start-up check, which
    // refuses a missing topic, would pass. Reserved: `[kafka.client]` cannot set it.
    c.set("allow.auto.create.topics", "false");
    if watched {
        BrokerWatch::enable(&mut c);
    }
    c.set("bootstrap.servers", &config.kafka.brokers);
    for (k, v) in settings {
        c.set(*k, *v);
    }
    for (k, v) in &config.kafka.client {
        c.set(k, v);
    }
    c
}

/// The consumer's default `session.timeout.ms`: how long the group coordinator keeps a member
/// (a static one too) that stopped heartbeating.
const SESSION_TIMEOUT_MS: &str = "10000";

/// The consumer's session timeout: `session.timeout.ms` from `[kafka.client]`, or the default.
pub fn session_timeout(config: &Config) -> Duration {
    let ms = config
        .kafka
        .client
        .get("session.timeout.ms")
        .unwrap_or(SESSION_TIMEOUT_MS);
    Duration::from_millis(ms.parse().unwrap_or(10_000))
}

/// The input consumer: manual offsets (they travel inside transactions), read_committed, an
/// eager assignor so that a revocation always revokes every partition (see `engine`), and
/// static membership (`group.instance.id` = instance id) so that a restarted instance gets its
/// partitions back at once instead of waiting for its old session to expire.
pub fn consumer(config: &Config, ctx: EngineContext) -> Result<EngineConsumer> {
    let client_id = format!("causal-commit-{}", config.instance_id());
    // Defaults the user may tune through `kafka.client`.
    let mut c = watched_config(
        config,
        &[
            ("session.timeout.ms", SESSION_TIMEOUT_MS),
            ("heartbeat.interval.ms", "1000"),
            // Partitions added to the topic are noticed (and assigned) within seconds.
            ("topic.metadata.refresh.interval.ms", "10000"),
            ("group.instance.id", &config.instance_id()),
            ("client.id", &client_id),
        ],
    );
    // What correctness depends on: never overridden (validation refuses these keys).
    c.set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", &config.kafka.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("partition.assignment.strategy", "range")
        // Where the durable state resumes is checked against the log at every restore
        // (`recovery::within_log`); a reset that moves the consumer back on its own (the topic
        // recreated under it) is caught by the engine (`Engine::moved_back`). Not `error`:
        // librdkafka then stops the partition in a state no seek leaves.
        .set("auto.offset.reset", "earliest")
        // Reaching a partition's end is how the engine knows it is caught up (the wait
        // timeout counts only caught-up time).
        .set("enable.partition.eof", "true");
    let ctx = EngineContext {
        brokers: BrokerWatch::new("consumer", &config.kafka.brokers),
        ..ctx
    };
    let consumer: EngineConsumer = c.create_with_context(ctx).map_err(|source| Error::Create {
        what: "consumer",
        source,
    })?;
    consumer.context().brokers.attach(consumer.client());
    Ok(consumer)
}

/// Transactional id of this instance: stable across restarts, so a restarted instance fences
/// (and aborts) its predecessor's open transaction at once.
pub fn transactional_id(config: &Config) -> String {
    format!("{}-{}", config.kafka.group_id, config.instance_id())
}

/// The one transactional producer of the engine.
///
/// Its calls that wait on a coordinator (`init_transactions`, `send_offsets_to_transaction`,
/// `commit_transaction`, `abort_transaction`) run on its call thread, bounded by the operation
/// timeout plus [`STUCK_GRACE`]; the others run on the caller's thread.
pub struct TxnProducer {
    producer: CallThread<BaseProducer<Watched>>,
    timeout: Duration,
    open: bool,
}

impl TxnProducer {
    pub fn new(config: &Config) -> Result<Self> {
        let txn_ms = config.kafka.transaction_timeout.as_millis();
        let mut c = watched_config(config, &[]);
        c.set("transactional.id", transactional_id(config))
            .set("enable.idempotence", "true")
            .set("transaction.timeout.ms", txn_ms.to_string())
            // Must stay below the transaction timeout (librdkafka refuses otherwise).
            .set("message.timeout.ms", (txn_ms * 9 / 10).to_string())
            // Back-to-back transactions otherwise wait ~100 ms on CONCURRENT_TRANSACTIONS.
            .set("retry.backoff.ms", "10")
            .set("linger.ms", "5")
            // Every record made fits `limits.max_output_bytes` (key, value, headers); librdkafka
            // counts some framing on top, and refuses a larger one before sending it.
            .set(
                "message.max.bytes",
                (config.limits.max_output_bytes + 65_536).to_string(),
            )
            .set(
                "client.id",
                format!("causal-commit-{}-txn", config.instance_id()),
            );
        let watch = BrokerWatch::new("producer", &config.kafka.brokers);
        let producer: BaseProducer<Watched> = c
            .create_with_context(Watched(watch.clone()))
            .map_err(|source| Error::Create {
                what: "producer",
                source,
            })?;
        watch.attach(producer.client());
        let producer = CallThread::spawn("cc-kafka-txn", producer, |p| {
            p.poll(Duration::ZERO);
        })
        .map_err(|e| Error::Create {
            what: "producer",
            source: KafkaError::ClientCreation(format!("its call thread: {e}")),
        })?;
        let mut this = Self {
            producer,
            timeout: config.kafka.operation_timeout,
            open: false,
        };
        this.bounded("init_transactions", move |p, timeout| {
            p.init_transactions(timeout)
        })?;
        Ok(this)
    }

    /// Runs a call that waits on a coordinator on the call thread, for at most the operation
    /// timeout plus [`STUCK_GRACE`].
    fn bounded(
        &mut self,
        call: &'static str,
        f: impl FnOnce(&BaseProducer<Watched>, Duration) -> rdkafka::error::KafkaResult<()>
            + Send
            + 'static,
    ) -> Result<()> {
        let timeout = self.timeout;
        let waited = timeout + STUCK_GRACE;
        match self.producer.call(waited, move |p| f(p, timeout)) {
            Some(result) => result.map_err(classify),
            None => {
                metrics::counter!(m::KAFKA_CALLS_STUCK, "call" => call).increment(1);
                Err(Error::Stuck { call, waited })
            }
        }
    }

    pub fn begin(&mut self) -> Result<()> {
        if !self.open {
            self.producer.get().begin_transaction().map_err(classify)?;
            self.open = true;
        }
        Ok(())
    }

    /// Queues one record; waits for room when librdkafka's queue is full.
    pub fn send(&mut self, record: &OutRecord) -> Result<()> {
        let mut headers = rdkafka::message::OwnedHeaders::new_with_capacity(record.headers.len());
        for (k, v) in &record.headers {
            headers = headers.insert(rdkafka::message::Header {
                key: k,
                value: Some(v.as_slice()),
            });
        }
        let mut rec = BaseRecord::to(&record.topic)
            .key(&record.key)
            .payload(&record.value)
            .headers(headers);
        if let Some(p) = record.partition {
            rec = rec.partition(p);
        }
        loop {
            match self.producer.get().send(rec) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    rec = back;
                    self.producer.get().poll(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(classify(e)),
            }
        }
    }

    /// Queues one record given by its parts, as they are (no key, no value, any header name):
    /// what the benchmark's passthrough mode copies. Waits for room like [`Self::send`].
    pub fn send_raw(
        &mut self,
        topic: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: Option<rdkafka::message::OwnedHeaders>,
    ) -> Result<()> {
        let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic);
        if let Some(k) = key {
            rec = rec.key(k);
        }
        if let Some(v) = value {
            rec = rec.payload(v);
        }
        if let Some(h) = headers {
            rec = rec.headers(h);
        }
        loop {
            match self.producer.get().send(rec) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    rec = back;
                    self.producer.get().poll(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(classify(e)),
            }
        }
    }

    /// Adds the consumed offsets (with the group's metadata, KIP-447) and commits.
    pub fn commit(
        &mut self,
        offsets: &TopicPartitionList,
        consumer: &EngineConsumer,
    ) -> Result<()> {
        let cgm = consumer.group_metadata().ok_or(Error::NotInGroup)?;
        self.deliver_outstanding(self.timeout);
        if offsets.count() > 0 {
            let offsets = offsets.clone();
            self.bounded("send_offsets_to_transaction", move |p, timeout| {
                fail::fail_point!("kafka-send-offsets");
                p.send_offsets_to_transaction(&offsets, &cgm, timeout)
            })?;
        }
        self.bounded("commit_transaction", |p, timeout| {
            p.commit_transaction(timeout)
        })?;
        self.open = false;
        Ok(())
    }

    /// Serves delivery reports until every record of the transaction is acknowledged or
    /// `within` passes (a commit gives the operation timeout, and `commit_transaction` then
    /// waits for the rest itself; an abort gives [`ABORT_DRAIN`]). Returns how many were still
    /// outstanding at the end (0: all served).
    ///
    /// rdkafka's `commit_transaction` flushes first, and its flush polls in slices of 100 ms
    /// that always last their full 100 ms (`BaseProducer::poll` serves events until its
    /// deadline), so every commit took at least 100 ms whatever its size. Polled here in 1 ms
    /// slices, the flush inside the commit finds nothing left and returns at once.
    fn deliver_outstanding(&self, within: Duration) -> i32 {
        let deadline = std::time::Instant::now() + within;
        let producer = self.producer.get();
        loop {
            let left = producer.in_flight_count();
            if left == 0 || std::time::Instant::now() >= deadline {
                return left;
            }
            producer.poll(Duration::from_millis(1));
        }
    }

    /// A transaction of offsets alone (recovery points Kafka lacks), committed at once.
    pub fn commit_offsets(
        &mut self,
        offsets: &TopicPartitionList,
        consumer: &EngineConsumer,
    ) -> Result<()> {
        self.begin()?;
        self.commit(offsets, consumer)
    }

    /// Aborts the open transaction. Its records' delivery reports are served first: librdkafka's
    /// abort waits for every outstanding record, and without this poll it waited out its
    /// timeout and failed ("the event queue must be polled for delivery report events"), so
    /// every failed durable write re-created the producer. Records still unacknowledged after
    /// [`ABORT_DRAIN`] (the brokers gone or struggling) would make the abort wait out its
    /// timeout and most likely fail: it is not tried, and the caller re-creates the producer,
    /// whose initialisation aborts the transaction (as before for every failed write).
    pub fn abort(&mut self) -> Result<()> {
        if self.open {
            let waited = ABORT_DRAIN.min(self.timeout);
            let left = self.deliver_outstanding(waited);
            if left > 0 {
                return Err(Error::Undelivered { left, waited });
            }
            self.bounded("abort_transaction", |p, timeout| {
                p.abort_transaction(timeout)
            })?;
            self.open = false;
        }
        Ok(())
    }

    /// Serves the producer's events without waiting: delivery reports, errors, and statistics
    /// (every 2 s, for its broker watch), which queue up in memory until served.
    pub fn poll(&self) {
        self.producer.get().poll(Duration::ZERO);
    }
}

/// One record to produce inside the current transaction.
#[derive(Debug, Clone)]
pub struct OutRecord {
    pub topic: Arc<str>,
    /// An explicit partition (a record forwarded to its contact's owner); `None`: by key.
    pub partition: Option<i32>,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub headers: Vec<(&'static str, Vec<u8>)>,
    /// The processor's span for this record (its context is the `traceparent` header),
    /// emitted once the transaction has committed. Only for sampled traces.
    pub span: Option<Box<crate::telemetry::trace::IntentSpan>>,
}

/// Maps librdkafka's transactional error flags onto our classes. A timeout is an unknown
/// outcome: treated as fatal so the producer is re-created (a late EndTxn must not be trusted).
pub fn classify(e: KafkaError) -> Error {
    match &e {
        KafkaError::Transaction(t) if t.is_fatal() => Error::Fatal(e),
        KafkaError::Transaction(t) if t.txn_requires_abort() => Error::Abortable(e),
        KafkaError::Transaction(t)
            if matches!(
                t.code(),
                RDKafkaErrorCode::OperationTimedOut
                    | RDKafkaErrorCode::MessageTimedOut
                    | RDKafkaErrorCode::RequestTimedOut
                    | RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
                    | RDKafkaErrorCode::State
            ) =>
        {
            Error::Fatal(e)
        }
        KafkaError::Transaction(_) => Error::Abortable(e),
        _ => Error::Other(e),
    }
}

/// Offsets `next` (one past the last processed record) per partition, with metadata naming the
/// batch (the recovery point checked against the durable store on assignment).
pub fn offsets_list(topic: &str, next: &[(i32, i64, String)]) -> Result<TopicPartitionList> {
    let mut tpl = TopicPartitionList::with_capacity(next.len());
    for (partition, offset, meta) in next {
        let mut elem = tpl.add_partition(topic, *partition);
        elem.set_offset(rdkafka::Offset::Offset(*offset))?;
        elem.set_metadata(meta.as_str());
    }
    Ok(tpl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_of_a_partition_is_not_a_client_error_and_real_errors_are() {
        assert!(is_partition_end(&KafkaError::PartitionEOF(3)));
        assert!(is_partition_end(&KafkaError::Global(
            RDKafkaErrorCode::PartitionEOF
        )));
        for code in [
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::Authentication,
        ] {
            assert!(!is_partition_end(&KafkaError::Global(code)), "{code:?}");
        }
    }

    #[test]
    fn no_client_creates_a_topic_by_naming_it() {
        let config =
            Config::from_toml("[kafka.client]\n\"linger.ms\" = \"5\"\n").expect("a config");
        for c in [
            client_config(&config, &[("client.id", "x")]),
            watched_config(&config, &[]),
        ] {
            assert_eq!(c.get("allow.auto.create.topics"), Some("false"));
            assert_eq!(c.get("linger.ms"), Some("5"));
        }
    }
}
