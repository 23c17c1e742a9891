//! Reads one record of the manual-review topic, `read_committed`, by partition and offset: what
//! an operator re-submits is what causal-commit committed, byte for byte.

use std::time::{Duration, Instant};

use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Config;
use crate::proto::ManualReview;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kafka did not answer reading {topic} partition {partition}: {detail}")]
    Kafka {
        topic: String,
        partition: i32,
        detail: String,
    },
    #[error("{topic} has no committed record at partition {partition} offset {offset}")]
    NotFound {
        topic: String,
        partition: i32,
        offset: i64,
    },
    #[error("the record at {topic} partition {partition} offset {offset} is not a ManualReview: {detail}")]
    NotAReview {
        topic: String,
        partition: i32,
        offset: i64,
        detail: String,
    },
}

/// How long a read waits for the record before calling it missing.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The review record at `partition`/`offset` of the manual-review topic. Blocking.
pub fn read(config: &Config, partition: i32, offset: i64) -> Result<ManualReview, Error> {
    let topic = config.kafka.manual_review_topic.as_str();
    let kafka = |detail: String| Error::Kafka {
        topic: topic.to_string(),
        partition,
        detail,
    };
    let not_found = || Error::NotFound {
        topic: topic.to_string(),
        partition,
        offset,
    };
    if partition < 0 || offset < 0 {
        return Err(not_found());
    }
    let group = format!("causal-commit-admin-{}", uuid::Uuid::new_v4());
    let c = crate::pipeline::kafka::client_config(
        config,
        &[
            ("group.id", &group),
            ("enable.auto.commit", "false"),
            ("isolation.level", "read_committed"),
            ("enable.partition.eof", "true"),
        ],
    );
    let consumer: BaseConsumer = c.create().map_err(|e| kafka(e.to_string()))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), READ_TIMEOUT)
        .map_err(|e| kafka(e.to_string()))?;
    let exists = metadata
        .topics()
        .iter()
        .any(|t| t.partitions().iter().any(|p| p.id() == partition));
    if !exists {
        return Err(not_found());
    }
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, READ_TIMEOUT)
        .map_err(|e| kafka(e.to_string()))?;
    if offset < low || offset >= high {
        return Err(not_found());
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
        .map_err(|e| kafka(e.to_string()))?;
    consumer.assign(&tpl).map_err(|e| kafka(e.to_string()))?;
    let deadline = Instant::now() + READ_TIMEOUT;
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) if m.offset() == offset => {
                return ManualReview::decode(m.payload().unwrap_or_default()).map_err(|e| {
                    Error::NotAReview {
                        topic: topic.to_string(),
                        partition,
                        offset,
                        detail: e.to_string(),
                    }
                });
            }
            // A later record: the offset held a transaction marker or an aborted record.
            Some(Ok(m)) if m.offset() > offset => return Err(not_found()),
            Some(Ok(_)) => {}
            // The end of what is committed: the record is not (yet) committed.
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => return Err(not_found()),
            Some(Err(e)) => return Err(kafka(e.to_string())),
            None => {}
        }
    }
    Err(kafka(format!(
        "no answer within {}",
        humantime::format_duration(READ_TIMEOUT)
    )))
}

/// One manual-review record keyed by a contact, where it is: its review without the original
/// record's bytes (an original may be as large as the intents topic takes; the listing names
/// the item, `read` fetches it whole), or why it could not be read as one.
#[derive(Debug, Clone)]
pub struct Listed {
    pub partition: i32,
    pub offset: i64,
    pub review: Result<ManualReview, String>,
}

/// How long before the contact's first audited review a listing starts reading: a review
/// record's timestamp is the deciding instance's clock when it queued the record, before the
/// audit row took PostgreSQL's clock, and the two clocks may differ.
pub const LIST_SLACK_MS: i64 = 15 * 60 * 1000;

/// How long a listing may read: it answers (or fails, naming the topic) before the CLI's own
/// 30-s wait for the API gives up.
pub const LIST_WITHIN: Duration = Duration::from_secs(20);

/// The records of the manual-review topic keyed by `contact_id` with a timestamp at or after
/// `since_ms`, in (partition, offset) order: the first `limit` of them, and whether there were
/// more. Holds at most `limit + 1` per partition, without their original bytes. Blocking.
pub fn list(
    config: &Config,
    contact_id: &str,
    since_ms: i64,
    limit: usize,
) -> anyhow::Result<(Vec<Listed>, bool)> {
    let key = contact_id.as_bytes();
    let mut per_partition: std::collections::BTreeMap<i32, Vec<Listed>> = Default::default();
    crate::pipeline::read::read_topic_within(
        config,
        &config.kafka.manual_review_topic,
        Some(since_ms),
        LIST_WITHIN,
        |r| {
            if r.key != Some(key) {
                return Ok(());
            }
            let kept = per_partition.entry(r.partition).or_default();
            if kept.len() > limit {
                return Ok(());
            }
            let review = ManualReview::decode(r.value.unwrap_or_default())
                .map(|mut m| {
                    m.original_value = Default::default();
                    m.original_key = Default::default();
                    m
                })
                .map_err(|e| format!("not a ManualReview: {e}"));
            kept.push(Listed {
                partition: r.partition,
                offset: r.offset,
                review,
            });
            Ok(())
        },
    )?;
    let mut all: Vec<Listed> = per_partition.into_values().flatten().collect();
    let more = all.len() > limit;
    all.truncate(limit);
    Ok((all, more))
}
