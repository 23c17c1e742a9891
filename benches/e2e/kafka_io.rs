//! The harness's own Kafka clients: topic admin, the group's committed offsets (progress), the
//! fixed-rate producer of the latency phases and the read_committed observer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use prost::Message as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use causal_commit::config::Config;
use causal_commit::proto::{Intent, SideEffect};

const TIMEOUT: Duration = Duration::from_secs(10);

fn admin(brokers: &str) -> anyhow::Result<AdminClient<DefaultClientContext>> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?)
}

pub async fn create_topics(brokers: &str, topics: &[(&str, i32)]) -> anyhow::Result<()> {
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(TIMEOUT));
    for r in admin(brokers)?.create_topics(&new, &opts).await? {
        if let Err((topic, e)) = r {
            bail!("creating topic {topic} failed: {e}");
        }
    }
    Ok(())
}

/// Deletes every topic whose name starts with `prefix` (the world's own topics, Kafka Streams'
/// changelogs included) and, best effort, the given consumer groups.
pub async fn delete_world(brokers: &str, prefix: &str, groups: &[String]) -> anyhow::Result<()> {
    let admin = admin(brokers)?;
    let md = admin
        .inner()
        .fetch_metadata(None, TIMEOUT)
        .context("listing topics")?;
    let names: Vec<String> = md
        .topics()
        .iter()
        .map(|t| t.name().to_string())
        .filter(|n| n.starts_with(prefix))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(TIMEOUT));
    if !names.is_empty() {
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        for r in admin.delete_topics(&refs, &opts).await? {
            if let Err((topic, e)) = r {
                eprintln!("bench: deleting topic {topic} failed: {e}");
            }
        }
    }
    let refs: Vec<&str> = groups.iter().map(String::as_str).collect();
    // A static member stays in its group for its session timeout: deleting may be refused;
    // an empty group without offsets expires by itself.
    let _ = admin.delete_groups(&refs, &opts).await;
    Ok(())
}

fn partitions(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<Vec<i32>> {
    let md = consumer
        .fetch_metadata(Some(topic), TIMEOUT)
        .with_context(|| format!("metadata of {topic}"))?;
    Ok(md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect())
}

/// Partitions of `topic` (0 when it does not exist).
pub fn partition_count(brokers: &str, topic: &str) -> anyhow::Result<usize> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    Ok(partitions(&consumer, topic)?.len())
}

/// Sum of the high watermarks of `topic` (records produced so far, non-transactional input).
pub fn end_offsets(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<i64> {
    let mut sum = 0;
    for p in partitions(consumer, topic)? {
        sum += consumer.fetch_watermarks(topic, p, TIMEOUT)?.1;
    }
    Ok(sum)
}

/// Reads what a consumer group has committed on the intents topic, without joining it.
pub struct Progress {
    reader: BaseConsumer,
    topic: String,
    partitions: Vec<i32>,
}

impl Progress {
    /// `config.kafka.group_id` names the group (Kafka Streams: its application id). The reader
    /// never subscribes, so it does not join the group.
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        // read_uncommitted: librdkafka then fetches offsets without "require stable", which
        // would wait out every pending transaction (back-to-back transactions starve it); the
        // broker still answers with committed offsets only.
        let reader: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &config.kafka.brokers)
            .set("group.id", &config.kafka.group_id)
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_uncommitted")
            .create()
            .context("creating the offsets reader")?;
        let partitions = partitions(&reader, &config.kafka.intents_topic)?;
        Ok(Self {
            reader,
            topic: config.kafka.intents_topic.clone(),
            partitions,
        })
    }

    /// Records committed by the group (sum over partitions).
    pub fn committed(&self) -> anyhow::Result<i64> {
        let mut tpl = TopicPartitionList::new();
        for p in &self.partitions {
            tpl.add_partition(&self.topic, *p);
        }
        // A fresh broker creates the offsets topic on the first request, and answers "not
        // coordinator" or "loading" until it has: retried, as every Kafka client does.
        let deadline = Instant::now() + COORDINATOR_WAIT;
        let committed = loop {
            match self.reader.committed_offsets(tpl.clone(), TIMEOUT) {
                Err(e) if coordinator_not_ready(&e) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                other => break other?,
            }
        };
        Ok(committed
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            })
            .sum())
    }

    pub fn end(&self) -> anyhow::Result<i64> {
        end_offsets(&self.reader, &self.topic)
    }
}

/// How long the group's coordinator may take to become available on a fresh broker.
const COORDINATOR_WAIT: Duration = Duration::from_secs(60);

fn coordinator_not_ready(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::NotCoordinator
                | RDKafkaErrorCode::CoordinatorLoadInProgress
                | RDKafkaErrorCode::CoordinatorNotAvailable
        )
    )
}

/// How the fixed-rate production went.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Produced {
    pub records: usize,
    pub planned_s: f64,
    pub took_s: f64,
}

/// The bench's producer of intents: idempotent (so each partition receives them in
/// generation order), connected and holding `topic`'s metadata when this returns, so a phase
/// timed from its first send does not count the client's start-up (a real producer is
/// long-lived).
pub fn producer(brokers: &str, topic: &str) -> anyhow::Result<BaseProducer> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("client.id", "causal-commit-bench-live")
        .create()
        .context("creating the live producer")?;
    producer
        .client()
        .fetch_metadata(Some(topic), TIMEOUT)
        .with_context(|| format!("reading {topic}'s metadata"))?;
    Ok(producer)
}

/// Produces `intents` with `producer` at `rate` per second (0 = as fast as possible), in
/// their order, stamping `created_at_ms` at send time.
pub fn produce_at_rate(
    producer: &BaseProducer,
    topic: &str,
    intents: Vec<Intent>,
    rate: f64,
) -> anyhow::Result<Produced> {
    let records = intents.len();
    let started = Instant::now();
    for (i, mut intent) in intents.into_iter().enumerate() {
        if rate > 0.0 {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            let now = Instant::now();
            if due > now + Duration::from_millis(1) {
                std::thread::sleep(due - now);
            }
        }
        intent.created_at_ms = now_ms();
        let value = intent.encode_to_vec();
        let headers = OwnedHeaders::new().insert(Header {
            key: "correlation_id",
            value: Some(intent.correlation_id.as_bytes()),
        });
        let record = BaseRecord::to(topic)
            .key(intent.contact_id.as_bytes())
            .payload(&value)
            .headers(headers);
        send(producer, record).context("queueing a live intent")?;
    }
    producer.flush(Duration::from_secs(60))?;
    Ok(Produced {
        records,
        planned_s: if rate > 0.0 {
            records as f64 / rate
        } else {
            0.0
        },
        took_s: started.elapsed().as_secs_f64(),
    })
}

/// What the side-effects topic carries: effects, or (passthrough) the intents themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carried {
    Effects,
    Intents,
}

/// A read_committed consumer positioned at the current end of the side-effects topic, so it
/// sees exactly what is committed from now on.
pub fn observer(brokers: &str, topic: &str) -> anyhow::Result<BaseConsumer> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("causal-commit-bench-observer-{}", uuid::Uuid::new_v4()),
        )
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "10")
        .create()
        .context("creating the observer")?;
    let mut tpl = TopicPartitionList::new();
    for p in partitions(&consumer, topic)? {
        let (_, high) = consumer.fetch_watermarks(topic, p, TIMEOUT)?;
        tpl.add_partition_offset(topic, p, Offset::Offset(high))?;
    }
    consumer.assign(&tpl)?;
    Ok(consumer)
}

/// Receives committed records until `expected` of those whose intent id starts with `prefix`
/// were seen, or `within` passed; returns each one's `created_at_ms` and latency (receipt -
/// created_at_ms), in ms.
pub fn observe(
    consumer: &BaseConsumer,
    carried: Carried,
    prefix: &str,
    expected: usize,
    within: Duration,
) -> Vec<(i64, i64)> {
    let deadline = Instant::now() + within;
    let mut latencies = Vec::with_capacity(expected);
    while latencies.len() < expected && Instant::now() < deadline {
        let Some(Ok(msg)) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let received = now_ms();
        let Some(value) = msg.payload() else {
            continue;
        };
        let decoded = match carried {
            Carried::Effects => SideEffect::decode(value)
                .ok()
                .map(|e| (e.intent_id, e.created_at_ms)),
            Carried::Intents => Intent::decode(value)
                .ok()
                .map(|i| (i.intent_id, i.created_at_ms)),
        };
        if let Some((id, created)) = decoded {
            if id.starts_with(prefix) {
                latencies.push((created, received - created));
            }
        }
    }
    latencies
}

/// Committed records on the output topics at the end of a run.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct OutputCounts {
    pub effects: usize,
    pub distinct_effects: usize,
    pub reviews: usize,
}

pub fn count_outputs(config: &Config, carried: Carried) -> anyhow::Result<OutputCounts> {
    let mut counts = OutputCounts::default();
    let mut ids: HashMap<String, ()> = HashMap::new();
    causal_commit::pipeline::read::read_topic(config, &config.kafka.side_effects_topic, |r| {
        let Some(value) = r.value else {
            return Ok(());
        };
        counts.effects += 1;
        let id = match carried {
            Carried::Effects => SideEffect::decode(value).map(|e| e.intent_id),
            Carried::Intents => Intent::decode(value).map(|i| i.intent_id),
        };
        if let Ok(id) = id {
            ids.insert(id, ());
        }
        Ok(())
    })?;
    counts.distinct_effects = ids.len();
    causal_commit::pipeline::read::read_topic(config, &config.kafka.manual_review_topic, |_| {
        counts.reviews += 1;
        Ok(())
    })?;
    Ok(counts)
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Copies every record of `from` to the same partition of `to` (created beforehand with as
/// many partitions), in order, with its key, value, headers and timestamp: every consumer
/// of a bench invocation works on a byte-identical input, down to the interleaving the
/// concurrent producers of the preload happened to make. Checks that the broker acknowledged
/// every record copied.
pub fn copy_topic(brokers: &str, from: &str, to: &str) -> anyhow::Result<i64> {
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{to}-copier"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.max.bytes", "52428800")
        .create()
        .context("creating the copier's consumer")?;
    let producer: BaseProducer<Acks> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .set("client.id", "causal-commit-bench-copier")
        .create_with_context(Acks::default())
        .context("creating the copier's producer")?;
    let parts = partitions(&reader, from)?;
    let mut ends = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in &parts {
        let (low, high) = reader.fetch_watermarks(from, *p, TIMEOUT)?;
        if high > low {
            ends.insert(*p, high);
            tpl.add_partition_offset(from, *p, Offset::Offset(low))?;
        }
    }
    reader.assign(&tpl)?;
    let mut left: HashMap<i32, i64> = ends.clone();
    let mut copied = 0i64;
    let deadline = Instant::now() + Duration::from_secs(600);
    while !left.is_empty() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "copying {from} to {to} timed out"
        );
        let Some(polled) = reader.poll(Duration::from_millis(200)) else {
            continue;
        };
        let msg = polled.with_context(|| format!("reading {from}"))?;
        let p = msg.partition();
        let Some(end) = left.get(&p).copied() else {
            continue;
        };
        let mut record = BaseRecord::to(to).partition(p);
        if let Some(k) = msg.key() {
            record = record.key(k);
        }
        if let Some(v) = msg.payload() {
            record = record.payload(v);
        }
        if let Some(h) = msg.headers() {
            record = record.headers(h.detach());
        }
        if let Some(ms) = msg.timestamp().to_millis() {
            record = record.timestamp(ms);
        }
        send(&producer, record).with_context(|| format!("copying a record to {to}"))?;
        copied += 1;
        if msg.offset() + 1 >= end {
            left.remove(&p);
        }
    }
    producer.flush(Duration::from_secs(60))?;
    let acks = producer.context();
    let (acked, failed) = (acks.acked.load(Relaxed), acks.failed.load(Relaxed));
    anyhow::ensure!(
        failed == 0 && acked == copied as u64,
        "copying {from} to {to}: {acked} of {copied} records acknowledged, {failed} failed"
    );
    Ok(copied)
}

/// Counts the brokers' acknowledgements of a producer's records.
#[derive(Default)]
struct Acks {
    acked: AtomicU64,
    failed: AtomicU64,
}

impl rdkafka::ClientContext for Acks {}

impl rdkafka::producer::ProducerContext for Acks {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, _: ()) {
        let counter = if result.is_ok() {
            &self.acked
        } else {
            &self.failed
        };
        counter.fetch_add(1, Relaxed);
    }
}

/// Queues `record`, serving delivery reports while librdkafka's queue is full.
fn send<C, K, P>(
    producer: &BaseProducer<C>,
    mut record: BaseRecord<'_, K, P, C::DeliveryOpaque>,
) -> anyhow::Result<()>
where
    C: rdkafka::producer::ProducerContext,
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    loop {
        match producer.send(record) {
            Ok(()) => break,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                producer.poll(Duration::from_millis(1));
            }
            Err((e, _)) => bail!("{e}"),
        }
    }
    producer.poll(Duration::ZERO);
    Ok(())
}
