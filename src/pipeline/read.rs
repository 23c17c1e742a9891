//! Read-only Kafka access for the tools (`verify`, `summary`, `wait-caught-up`) and tests: a
//! topic's committed records, and a group's committed offsets with their recovery points,
//! read without joining (or disturbing) the group.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers as _, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Config;
use crate::store::recovery::RecoveryPoint;

/// A client of the processor's group that never subscribes, so it does not join (or disturb)
/// the group: it only reads committed offsets. Returns it with the intents topic's partitions.
pub fn offsets_reader(config: &Config) -> anyhow::Result<(BaseConsumer, Vec<i32>)> {
    let topic = &config.kafka.intents_topic;
    let c = crate::pipeline::kafka::client_config(
        config,
        &[
            ("group.id", &config.kafka.group_id),
            ("enable.auto.commit", "false"),
        ],
    );
    let consumer: BaseConsumer = c.create().context("creating an offsets reader")?;
    let partitions = partitions_of(&consumer, topic, Duration::from_secs(10))?;
    Ok((consumer, partitions))
}

/// One record handed to the callback of [`read_topic`].
#[derive(Debug, Clone, Copy)]
pub struct TopicRecord<'a> {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    /// `None` for a tombstone (a record without a value).
    pub value: Option<&'a [u8]>,
    /// The record's timestamp (create or log-append time), when it has one.
    pub timestamp_ms: Option<i64>,
    /// The value of its `cc-forwarded-from` header, when it has one.
    pub forwarded_from: Option<&'a [u8]>,
}

/// Calls `f` on every committed record of `topic` (tombstones included), from the beginning to
/// the end the topic has when the call starts. Each partition's records come in offset order;
/// partitions are interleaved.
pub fn read_topic(
    config: &Config,
    topic: &str,
    f: impl FnMut(TopicRecord<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    read_topic_since(config, topic, None, f)
}

/// Each partition's log now: its first offset and its end (`recovery-point`).
pub fn log_ranges(
    config: &Config,
) -> anyhow::Result<std::collections::BTreeMap<i32, crate::store::recovery::LogRange>> {
    let (consumer, partitions) = offsets_reader(config)?;
    let topic = &config.kafka.intents_topic;
    let topic_id =
        crate::pipeline::kafka::topic_id(consumer.client(), topic, Duration::from_secs(10))
            .map_err(|e| anyhow::anyhow!("reading {topic}'s topic id: {e}"))?;
    partitions
        .into_iter()
        .map(|p| {
            let (low, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .with_context(|| format!("reading the offsets of {topic} [{p}]"))?;
            Ok((
                p,
                crate::store::recovery::LogRange {
                    low,
                    high,
                    topic_id,
                },
            ))
        })
        .collect()
}

/// A partition's committed position in the processor's group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedPoint {
    /// The next offset to consume (-1 when the group has no committed offset).
    pub offset: i64,
    /// What the committed offset's metadata says (`Ok(None)`: no metadata).
    pub recovery: Result<Option<RecoveryPoint>, crate::store::recovery::Malformed>,
}

/// The processor group's committed offset and recovery point per partition of the intents
/// topic.
pub fn committed_points(config: &Config) -> anyhow::Result<HashMap<i32, CommittedPoint>> {
    let topic = &config.kafka.intents_topic;
    let (consumer, partitions) = offsets_reader(config)?;
    let timeout = Duration::from_secs(10);
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, timeout).with_context(|| {
        format!(
            "reading the committed offsets of group {}",
            config.kafka.group_id
        )
    })?;
    Ok(committed
        .elements()
        .iter()
        .map(|e| {
            let point = match e.offset() {
                Offset::Offset(o) => CommittedPoint {
                    offset: o,
                    recovery: RecoveryPoint::parse(e.metadata()),
                },
                _ => CommittedPoint {
                    offset: -1,
                    recovery: Ok(None),
                },
            };
            (e.partition(), point)
        })
        .collect())
}

/// Where [`first_output_committed`] found an output of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundOutput {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// What it is: the effect of an intent at a sequence, or the review of an input offset.
    pub what: String,
    /// How many records were read to find it.
    pub read: u64,
}

/// The first committed output of a batch on the output topics (`read_committed`), read from a
/// minute before the batch was decided: reading stops there, however much the topics hold
/// after it. `None` after reading both topics to their end, unless a topic may have lost
/// records written since then ([`trimmed_since`]): that fails, as nothing can tell.
pub fn first_output_committed(
    config: &Config,
    outputs: &crate::store::postgres::BatchOutputs,
    within: Duration,
) -> anyhow::Result<Option<FoundOutput>> {
    use std::collections::HashSet;

    use prost::Message as _;

    use crate::proto::{ManualReview, SideEffect};

    let effects: HashSet<(&str, u64)> = outputs
        .effects
        .iter()
        .map(|(id, seq)| (id.as_str(), *seq))
        .collect();
    let reviews: HashSet<i64> = outputs.reviews.iter().copied().collect();
    // The records carry the writer's clock from when it queued them, at or after
    // `written_at_ms` (which is no later than the writer's clock when it decided the batch);
    // on a topic with `message.timestamp.type=LogAppendTime` they carry the broker's clock,
    // which may differ a little from the writer's: a minute's slack.
    let since = outputs.written_at_ms - 60_000;
    let is_effect = |v: &[u8]| {
        let e = SideEffect::decode(v).ok()?;
        effects
            .contains(&(e.intent_id.as_str(), e.commit_sequence))
            .then(|| {
                format!(
                    "the effect of intent {:?} at sequence {}",
                    e.intent_id, e.commit_sequence
                )
            })
    };
    let is_review = |v: &[u8]| {
        let m = ManualReview::decode(v).ok()?;
        // Every partition has an offset 57: a review of another partition's record at the
        // same offset is not this batch's (it made a batch that never committed read as
        // committed).
        let ours = m.source_topic == config.kafka.intents_topic
            && m.source_partition == outputs.partition
            && reviews.contains(&m.source_offset);
        ours.then(|| {
            format!(
                "the review of input offset {} (intent {:?})",
                m.source_offset, m.intent_id
            )
        })
    };
    /// What an output record is of the batch, if it is.
    type Matches<'m> = &'m dyn Fn(&[u8]) -> Option<String>;
    let searches: [(&String, Matches); 2] = [
        (&config.kafka.side_effects_topic, &is_effect),
        (&config.kafka.manual_review_topic, &is_review),
    ];
    let mut read = 0u64;
    for (topic, matches) in searches {
        let mut found = None;
        read_topic_within(config, topic, Some(since), within, |r| {
            read += 1;
            let Some(what) = r.value.and_then(matches) else {
                return Ok(());
            };
            found = Some(FoundOutput {
                topic: topic.clone(),
                partition: r.partition,
                offset: r.offset,
                what,
                read,
            });
            Err(StopReading.into())
        })?;
        if found.is_some() {
            return Ok(found);
        }
    }
    // Finding no output proves the batch aborted only if the topics still hold every record
    // since it was decided (looked at after reading, so a deletion meanwhile counts): an
    // output deleted since (a retention shorter than the time the partition stood refused,
    // or records deleted by hand) made a committed batch read as aborted, and its replay
    // emitted its effects again.
    for (topic, _) in searches {
        if let Some((partition, start)) = trimmed_since(config, topic, since)? {
            anyhow::bail!(
                "none of the batch's outputs was found, but {topic} partition {partition} \
                 starts at offset {start} now: the records before it were deleted (retention, \
                 or deleted records), and the batch's outputs may have been among them"
            );
        }
    }
    Ok(None)
}

/// Per partition of `topic`, the offset of its first record at or after `since_ms`; a
/// partition with none is left out.
fn first_offsets_since(
    consumer: &BaseConsumer,
    topic: &str,
    partitions: &[i32],
    since_ms: i64,
    timeout: Duration,
) -> anyhow::Result<HashMap<i32, i64>> {
    let mut wanted = TopicPartitionList::new();
    for p in partitions {
        wanted.add_partition_offset(topic, *p, Offset::Offset(since_ms.max(0)))?;
    }
    let mut starts = HashMap::new();
    for e in consumer.offsets_for_times(wanted, timeout)?.elements() {
        if let Offset::Offset(o) = e.offset() {
            starts.insert(e.partition(), o);
        } // else: nothing written since
    }
    Ok(starts)
}

/// The first partition of `topic` that may have lost records written at or after `since_ms`,
/// with the offset its log starts at now: records before it were deleted (retention, or
/// `kafka-delete-records`), and nothing retained shows that they were all older. A partition
/// whose first record at or after `since_ms` has a retained predecessor (older, then) lost
/// none of them; nor did one whose log still starts at offset 0.
fn trimmed_since(
    config: &Config,
    topic: &str,
    since_ms: i64,
) -> anyhow::Result<Option<(i32, i64)>> {
    let consumer = reader(config, "retention")?;
    let timeout = Duration::from_secs(10);
    let partitions = partitions_of(&consumer, topic, timeout)?;
    let starts = first_offsets_since(&consumer, topic, &partitions, since_ms, timeout)?;
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        let start = starts.get(&p).copied().unwrap_or(high);
        if low > 0 && start <= low {
            return Ok(Some((p, low)));
        }
    }
    Ok(None)
}

/// Returned by a [`read_topic_within`] callback to stop reading there: the read ends with
/// `Ok`.
#[derive(Debug, thiserror::Error)]
#[error("reading stopped by its caller")]
pub struct StopReading;

/// A read_committed consumer of its own throw-away group (`causal-commit-<purpose>-<uuid>`),
/// with `[kafka.client]` applied, that commits nothing: for reading topics end to end.
pub fn reader(config: &Config, purpose: &str) -> anyhow::Result<BaseConsumer> {
    let group = format!("causal-commit-{purpose}-{}", uuid::Uuid::new_v4());
    crate::pipeline::kafka::client_config(
        config,
        &[
            ("group.id", &group),
            ("enable.auto.commit", "false"),
            ("isolation.level", "read_committed"),
            ("enable.partition.eof", "false"),
        ],
    )
    .create()
    .context("creating a reader")
}

/// The partitions `topic` has now.
pub fn partitions_of(
    consumer: &BaseConsumer,
    topic: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<i32>> {
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .with_context(|| format!("reading metadata of {topic}"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        // Read as empty, a missing topic made `verify` pass and `wait-caught-up` report caught
        // up: a typo in a topic name must not look like a clean run.
        return Err(TopicMissing(topic.to_string()).into());
    }
    Ok(partitions)
}

/// A topic the brokers do not have (no partition in its metadata).
#[derive(Debug, thiserror::Error)]
#[error("topic {0:?} does not exist (no partition in the brokers' metadata): check the topic names in [kafka]")]
pub struct TopicMissing(pub String);

/// [`read_topic`] from the first offset at or after `since_ms` (record timestamps) in each
/// partition, or from the beginning.
fn read_topic_since(
    config: &Config,
    topic: &str,
    since_ms: Option<i64>,
    f: impl FnMut(TopicRecord<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    read_topic_within(config, topic, since_ms, READ_WITHIN, f)
}

/// How long [`read_topic`] and [`read_topic_since`] may take to reach the end of a topic.
const READ_WITHIN: Duration = Duration::from_secs(120);

/// [`read_topic_since`], failing when the end is not reached `within` (an answer owed to
/// someone waiting: the admin API's).
// One loop of one consumer (seek by time, poll to the high watermarks, classify each record);
// splitting it would thread the consumer's state through helpers for no clarity.
pub fn read_topic_within(
    config: &Config,
    topic: &str,
    since_ms: Option<i64>,
    within: Duration,
    mut f: impl FnMut(TopicRecord<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let consumer = reader(config, "reader")?;
    let timeout = Duration::from_secs(10);
    let partitions = partitions_of(&consumer, topic, timeout)?;
    // Where each partition starts: its beginning, or the first record at or after `since_ms`.
    let starts = match since_ms {
        Some(since) => first_offsets_since(&consumer, topic, &partitions, since, timeout)?,
        None => HashMap::new(),
    };
    let mut ends = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        // With read_committed the high watermark may sit past the last stable offset; records up
        // to it are delivered once their transaction is decided.
        let (low, high) = consumer.fetch_watermarks(topic, *p, timeout)?;
        let start = match since_ms {
            None => low,
            Some(_) => match starts.get(p) {
                Some(o) => *o,
                None => continue,
            },
        };
        if high > start {
            ends.insert(*p, high);
            tpl.add_partition_offset(topic, *p, Offset::Offset(start))?;
        }
    }
    if ends.is_empty() {
        return Ok(());
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + within;
    let mut positions: HashMap<i32, i64> = HashMap::new();
    while ends
        .iter()
        .any(|(p, end)| positions.get(p).copied().unwrap_or(-1) + 1 < *end)
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "reading {topic} did not reach its end within {}",
            humantime::format_duration(within)
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(msg)) => {
                positions.insert(msg.partition(), msg.offset());
                let handled = f(TopicRecord {
                    partition: msg.partition(),
                    offset: msg.offset(),
                    key: msg.key(),
                    value: msg.payload(),
                    timestamp_ms: msg.timestamp().to_millis(),
                    forwarded_from: msg.headers().and_then(|h| {
                        h.iter()
                            .find(|h| h.key == super::output::FORWARDED_FROM_HEADER)
                            .and_then(|h| h.value)
                    }),
                });
                match handled {
                    Err(e) if e.is::<StopReading>() => return Ok(()),
                    handled => handled?,
                }
            }
            Some(Err(e)) => anyhow::bail!("reading {topic} failed: {e}"),
            None => {
                if let Ok(pos) = consumer.position() {
                    for e in pos.elements() {
                        if let Offset::Offset(o) = e.offset() {
                            positions.insert(e.partition(), o - 1);
                        }
                    }
                }
            }
        }
    }
    Ok(())
}
