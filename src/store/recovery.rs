//! The recovery point: what a committed input offset's metadata says about the durable state,
//! and how a partition's restore reconciles it with what PostgreSQL knows ([`decide`]).
//!
//! Every batch commits its consumed offsets in its Kafka transaction with metadata
//! `cc:b=<batch>;f=<fence>[;t=<clock>]`: the number of the partition's last batch whose
//! transaction committed, the fencing token of its writer and the partition's consumed-time
//! clock at that commit (milliseconds; see the sequencer's wait timeout). Rows in PostgreSQL
//! tagged with a later batch belong to a transaction that never committed. See
//! `docs/exactly-once.md`.

use std::fmt;

/// A parsed recovery point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecoveryPoint {
    /// The partition's last batch whose Kafka transaction committed.
    pub batch: u64,
    /// Fencing token of the writer of that batch.
    pub fence: u64,
    /// The partition's consumed-time clock at that commit (0 when not recorded).
    pub clock_ms: u64,
}

/// Offset metadata that is not empty but is not a recovery point either.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("committed offset metadata {0:?} is not a causal-commit recovery point")]
pub struct Malformed(pub String);

const PREFIX: &str = "cc:";

impl RecoveryPoint {
    /// Parses committed offset metadata: `Ok(None)` when there is none (offsets reset with the
    /// Kafka tools, expired, or written by another group), an error when it is something else.
    pub fn parse(meta: &str) -> Result<Option<Self>, Malformed> {
        if meta.is_empty() {
            return Ok(None);
        }
        let malformed = || Malformed(meta.chars().take(200).collect());
        let rest = meta.strip_prefix(PREFIX).ok_or_else(malformed)?;
        let (mut batch, mut fence, mut clock_ms) = (None, None, 0);
        for kv in rest.split(';') {
            let (k, v) = kv.split_once('=').ok_or_else(malformed)?;
            let v: u64 = v.parse().map_err(|_| malformed())?;
            match k {
                "b" => batch = Some(v),
                "f" => fence = Some(v),
                "t" => clock_ms = v,
                // Keys added by later versions are ignored.
                _ => {}
            }
        }
        match (batch, fence) {
            (Some(batch), Some(fence)) => Ok(Some(RecoveryPoint {
                batch,
                fence,
                clock_ms,
            })),
            _ => Err(malformed()),
        }
    }
}

impl fmt::Display for RecoveryPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}b={};f={};t={}",
            self.batch, self.fence, self.clock_ms
        )
    }
}

/// What Kafka holds for a partition in the processor's group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KafkaCommitted {
    /// No committed offset (a new group, or offsets expired after the group sat empty).
    Nothing,
    /// A committed offset without a recovery point (reset with the Kafka tools, or committed
    /// by another program), with its metadata if any.
    Offset { offset: i64, metadata: String },
    /// A committed offset with its recovery point.
    Point { offset: i64, point: RecoveryPoint },
}

impl KafkaCommitted {
    /// From a committed offset (`None` or negative: none) and its metadata.
    pub fn from_parts(offset: Option<i64>, metadata: &str) -> Self {
        match offset.filter(|o| *o >= 0) {
            None => KafkaCommitted::Nothing,
            Some(offset) => match RecoveryPoint::parse(metadata) {
                Ok(Some(point)) => KafkaCommitted::Point { offset, point },
                Ok(None) | Err(_) => KafkaCommitted::Offset {
                    offset,
                    metadata: metadata.to_owned(),
                },
            },
        }
    }
}

/// The id Kafka gives a topic at its creation (KIP-516): a topic deleted and created again under
/// the same name has a new one. Shown as Kafka's tools show it (the 16 bytes in URL-safe
/// base64 without padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TopicId(u128);

impl TopicId {
    /// From its two halves; `None` for the zero id (a topic without one).
    pub fn from_bits(high: u64, low: u64) -> Option<Self> {
        let id = (u128::from(high) << 64) | u128::from(low);
        (id != 0).then_some(TopicId(id))
    }
}

impl fmt::Display for TopicId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use base64::Engine as _;
        f.write_str(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.0.to_be_bytes()))
    }
}

impl std::str::FromStr for TopicId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .ok()
            .and_then(|b| <[u8; 16]>::try_from(b).ok())
            .ok_or_else(|| format!("{s:?} is not a Kafka topic id"))?;
        Ok(TopicId(u128::from_be_bytes(bytes)))
    }
}

/// What PostgreSQL knows of a partition's batches (`cc_partition`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreView {
    /// The last batch written (committed in Kafka, or the one uncommitted batch).
    pub last_batch: u64,
    pub last_next_offset: i64,
    pub last_clock_ms: u64,
    /// The last batch known committed in Kafka.
    pub committed_batch: u64,
    pub committed_next_offset: i64,
    pub committed_clock_ms: u64,
    /// The partition was last restored, so its batches since were written, by another consumer
    /// group (another deployment over the same store): this group's recovery point does not
    /// speak for those batches.
    pub written_under_another_group: bool,
    /// The id of the topic the partition's batches were consumed from, as recorded at its last
    /// restore (`None`: not recorded, by an older version or a broker without topic ids).
    pub topic_id: Option<TopicId>,
}

/// Where a restored partition resumes: its last committed batch (rows of later batches are
/// rolled back), the next input offset to consume (-1: the start of the partition) and its
/// consumed-time clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    pub batch: u64,
    pub next_offset: i64,
    pub clock_ms: u64,
    /// Kafka's committed offset was not where the durable state says the partition is (offsets
    /// reset, expired, or a new group): the consumer must be moved to `next_offset`.
    pub kafka_offset_overridden: bool,
    /// Kafka's committed offset already carries this resume's recovery point at `next_offset`.
    /// When it does not, the engine commits it (an offsets-only transaction) before the
    /// partition writes its next batch: should that batch then abort, Kafka names the batch to
    /// roll back to instead of leaving PostgreSQL's last batch ambiguous.
    pub point_in_kafka: bool,
}

/// A restore that would roll committed history back or guess: the partition stays paused until
/// an operator resolves it (docs/exactly-once.md, "When a partition refuses to start").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "Kafka's recovery point says batch {kafka_batch} committed, but PostgreSQL's last batch \
         is {store_last_batch}: the two stores do not belong together (a restored backup, or \
         another deployment's group or schema). Nothing is decided until they do; see the \
         runbook, \"Partitions paused\""
    )]
    Mismatch {
        kafka_batch: u64,
        store_last_batch: u64,
    },
    #[error(
        "the committed offset has no recovery point (offsets reset or expired, a new group, \
         or another consumer in the group committed its own) and PostgreSQL cannot tell whether its last batch {store_last_batch} committed in Kafka \
         (last known committed: {store_committed_batch}); run `causal-commit recovery-point \
         resolve` for this partition"
    )]
    Ambiguous {
        store_last_batch: u64,
        store_committed_batch: u64,
    },
    #[error(
        "the partition's log ends at offset {high}, before offset {next_offset} where the \
         durable state resumes: the topic was deleted and recreated, or the brokers lost \
         records. Nothing is read from it until an operator says where it resumes: \
         `causal-commit recovery-point resume-at --partition P --earliest` (or --offset N); \
         see the runbook, \"Partitions paused\""
    )]
    LogReplaced { next_offset: i64, high: i64 },
    #[error(
        "the partition's log starts at offset {low}, after offset {next_offset} where the \
         durable state resumes: records {next_offset} to {low} (exclusive) were deleted \
         (retention, or delete-records) before they were consumed. Nothing is read from it \
         until an operator accepts it: `causal-commit recovery-point resume-at --partition P \
         --earliest`; see the runbook, \"Partitions paused\""
    )]
    LogDeleted { next_offset: i64, low: i64 },
    #[error(
        "the topic is not the one the durable state consumed: its id is {now}, the state was \
         consumed from {consumed} (the topic was deleted and created again under the same \
         name), so offset {next_offset}, where the state resumes, is in another log. Nothing is \
         read from it until an operator says where it resumes: `causal-commit recovery-point \
         resume-at --partition P --earliest` (or --offset N); see the runbook, \"Partitions \
         paused\""
    )]
    TopicReplaced {
        consumed: TopicId,
        now: TopicId,
        next_offset: i64,
    },
}

/// The offsets a partition of the intents topic holds now: its first record (`low`, past what
/// retention deleted) and its end (`high`, the high watermark).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRange {
    pub low: i64,
    pub high: i64,
    /// The topic's id now (`None`: the brokers did not say).
    pub topic_id: Option<TopicId>,
}

/// Where a [`Resume`] may start in the partition's log. Kafka offsets never go back on a topic:
/// a resume point past the log's end means the log is not the one the durable state consumed
/// (the topic deleted and recreated, or records lost by the brokers), and one before the log's
/// start means records were deleted (retention) before they were consumed. Either way the
/// consumer would be moved by `auto.offset.reset` and skip or reread records without a word:
/// the partition is refused instead, until an operator says where it resumes
/// (`causal-commit recovery-point resume-at`). A partition nothing was written for starts at
/// its first offset when Kafka names none, or one outside the log.
pub fn within_log(mut resume: Resume, store: &StoreView, log: LogRange) -> Result<Resume, Refusal> {
    let next = resume.next_offset;
    if store.last_batch == 0 {
        if next < 0 {
            // Where the consumer starts by itself (`auto.offset.reset=earliest`).
            resume.next_offset = log.low;
        } else if next < log.low || next > log.high {
            resume.next_offset = log.low;
            resume.kafka_offset_overridden = true;
        }
        return Ok(resume);
    }
    if next > log.high {
        return Err(Refusal::LogReplaced {
            next_offset: next,
            high: log.high,
        });
    }
    if next < log.low {
        return Err(Refusal::LogDeleted {
            next_offset: next,
            low: log.low,
        });
    }
    if let (Some(consumed), Some(now)) = (store.topic_id, log.topic_id) {
        if consumed != now {
            return Err(Refusal::TopicReplaced {
                consumed,
                now,
                next_offset: next,
            });
        }
    }
    Ok(resume)
}

/// Reconciles Kafka's committed offset with PostgreSQL's view. At most one batch per partition
/// is ever uncommitted, so a recovery point must name PostgreSQL's last batch (committed) or
/// the one before it (the last one aborted, or never reached Kafka); anything else is refused.
/// Without a recovery point, committed history is never rolled back: PostgreSQL's last batch
/// and offset win when it knows they committed, and the restore is refused when it cannot know.
pub fn decide(kafka: &KafkaCommitted, store: &StoreView) -> Result<Resume, Refusal> {
    let l = store.last_batch;
    match kafka {
        // A point of this group's from before another group wrote: were it one batch behind,
        // it would read as "the last batch aborted" and roll back the other group's committed
        // batch. PostgreSQL alone decides then, as for a group without a point.
        KafkaCommitted::Point { offset, point } if !store.written_under_another_group => {
            let committed = point.batch == l;
            if !(committed || l > 0 && point.batch == l - 1) {
                return Err(Refusal::Mismatch {
                    kafka_batch: point.batch,
                    store_last_batch: l,
                });
            }
            // The offset committed with batch L is the one written with it; a different one
            // was moved by hand with the metadata kept: the store's position wins.
            let moved =
                committed && store.last_next_offset >= 0 && *offset != store.last_next_offset;
            Ok(Resume {
                batch: point.batch,
                next_offset: if moved {
                    store.last_next_offset
                } else {
                    *offset
                },
                clock_ms: point.clock_ms,
                kafka_offset_overridden: moved,
                point_in_kafka: !moved,
            })
        }
        KafkaCommitted::Nothing | KafkaCommitted::Offset { .. } | KafkaCommitted::Point { .. } => {
            let offset = match kafka {
                KafkaCommitted::Offset { offset, .. } | KafkaCommitted::Point { offset, .. } => {
                    *offset
                }
                KafkaCommitted::Nothing => -1,
            };
            if l == 0 {
                // Nothing was ever written for this partition: a plain start.
                return Ok(Resume {
                    batch: 0,
                    next_offset: offset,
                    clock_ms: 0,
                    kafka_offset_overridden: false,
                    point_in_kafka: false,
                });
            }
            if store.committed_batch != l || store.last_next_offset < 0 {
                return Err(Refusal::Ambiguous {
                    store_last_batch: l,
                    store_committed_batch: store.committed_batch,
                });
            }
            Ok(Resume {
                batch: l,
                next_offset: store.last_next_offset,
                clock_ms: store.last_clock_ms,
                kafka_offset_overridden: offset != store.last_next_offset,
                point_in_kafka: false,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_point_outside_the_log_is_refused_and_a_fresh_partition_starts_at_its_first_offset()
    {
        let log = |low, high| LogRange {
            low,
            high,
            topic_id: None,
        };
        let at = |next_offset| Resume {
            batch: 5,
            next_offset,
            clock_ms: 0,
            kafka_offset_overridden: false,
            point_in_kafka: true,
        };
        // Inside the log, its two ends included: kept as it is.
        for next in [100, 300, 500] {
            assert_eq!(within_log(at(next), &store(), log(100, 500)), Ok(at(next)));
        }
        assert_eq!(
            within_log(at(500), &store(), log(0, 120)),
            Err(Refusal::LogReplaced {
                next_offset: 500,
                high: 120
            })
        );
        assert_eq!(
            within_log(at(500), &store(), log(650, 900)),
            Err(Refusal::LogDeleted {
                next_offset: 500,
                low: 650
            })
        );
        // Nothing written yet: no history to lose; the log's first offset.
        let fresh = StoreView::default();
        for next in [5, 2_000] {
            let r = within_log(
                Resume {
                    batch: 0,
                    ..at(next)
                },
                &fresh,
                log(10, 1_000),
            )
            .unwrap();
            assert_eq!((r.next_offset, r.kafka_offset_overridden), (10, true));
        }
        // Kafka names none: the consumer starts there by itself.
        let r = within_log(Resume { batch: 0, ..at(-1) }, &fresh, log(10, 1_000)).unwrap();
        assert_eq!((r.next_offset, r.kafka_offset_overridden), (10, false));
        let r = within_log(Resume { batch: 0, ..at(40) }, &fresh, log(10, 1_000)).unwrap();
        assert_eq!((r.next_offset, r.kafka_offset_overridden), (40, false));
    }

    #[test]
    fn a_resume_point_in_a_topic_created_again_is_refused_even_inside_its_log() {
        let id = |n: u64| TopicId::from_bits(n, 7);
        let log = |topic_id| LogRange {
            low: 0,
            high: 2_000,
            topic_id,
        };
        let at = Resume {
            batch: 5,
            next_offset: 500,
            clock_ms: 0,
            kafka_offset_overridden: false,
            point_in_kafka: true,
        };
        let consumed = StoreView {
            topic_id: id(1),
            ..store()
        };
        // The same topic, or one side unknown (an older version, a broker without ids): kept.
        for (stored, now) in [(id(1), id(1)), (None, id(2)), (id(1), None)] {
            let s = StoreView {
                topic_id: stored,
                ..store()
            };
            assert_eq!(within_log(at, &s, log(now)), Ok(at));
        }
        assert_eq!(
            within_log(at, &consumed, log(id(2))),
            Err(Refusal::TopicReplaced {
                consumed: id(1).unwrap(),
                now: id(2).unwrap(),
                next_offset: 500
            })
        );
        // Nothing consumed yet: nothing to skip or reread, whatever the id.
        let fresh = StoreView {
            topic_id: id(1),
            ..StoreView::default()
        };
        assert!(within_log(Resume { batch: 0, ..at }, &fresh, log(id(2))).is_ok());
    }

    #[test]
    fn a_topic_id_reads_as_kafka_shows_it_and_back() {
        // Kafka's Uuid.toString(): the 16 bytes, URL-safe base64 without padding.
        let id = TopicId::from_bits(0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210).unwrap();
        assert_eq!(id.to_string(), "ASNFZ4mrze_-3LqYdlQyEA");
        assert_eq!("ASNFZ4mrze_-3LqYdlQyEA".parse(), Ok(id));
        assert!(TopicId::from_bits(0, 0).is_none(), "the zero id is no id");
        assert!("not-an-id".parse::<TopicId>().is_err());
    }

    #[test]
    fn a_recovery_point_round_trips_through_its_metadata() {
        let p = RecoveryPoint {
            batch: 42,
            fence: 7,
            clock_ms: 123_456,
        };
        assert_eq!(RecoveryPoint::parse(&p.to_string()), Ok(Some(p)));
    }

    #[test]
    fn metadata_of_an_older_version_without_a_clock_parses_with_clock_zero() {
        let p = RecoveryPoint::parse("cc:b=3;f=9").unwrap().unwrap();
        assert_eq!((p.batch, p.fence, p.clock_ms), (3, 9, 0));
    }

    #[test]
    fn empty_metadata_is_no_recovery_point_not_batch_zero() {
        assert_eq!(RecoveryPoint::parse(""), Ok(None));
    }

    fn point(batch: u64) -> RecoveryPoint {
        RecoveryPoint {
            batch,
            fence: 3,
            clock_ms: batch * 1000,
        }
    }

    /// Five batches written and known committed; batch 5 ended at offset 500.
    fn store() -> StoreView {
        StoreView {
            last_batch: 5,
            last_next_offset: 500,
            last_clock_ms: 5000,
            committed_batch: 5,
            committed_next_offset: 500,
            committed_clock_ms: 5000,
            written_under_another_group: false,
            topic_id: None,
        }
    }

    #[test]
    fn a_point_from_before_another_group_wrote_does_not_speak_for_its_batches() {
        // Group A committed batch 5; group B took the partition over and wrote batch 6, known
        // committed. A's point (batch 5 = last - 1) must not roll B's batch back.
        let after_b = StoreView {
            last_batch: 6,
            last_next_offset: 560,
            last_clock_ms: 6000,
            committed_batch: 6,
            committed_next_offset: 560,
            committed_clock_ms: 6000,
            written_under_another_group: true,
            topic_id: None,
        };
        let a = KafkaCommitted::Point {
            offset: 500,
            point: point(5),
        };
        let r = decide(&a, &after_b).unwrap();
        assert_eq!((r.batch, r.next_offset), (6, 560), "B's batch is kept");
        assert!(r.kafka_offset_overridden, "the consumer moves to 560");
        assert!(!r.point_in_kafka, "A's group gets the point anchored");
        // The same point under one group: batch 6 aborted, rolled back.
        let one_group = StoreView {
            written_under_another_group: false,
            topic_id: None,
            ..after_b
        };
        assert_eq!(decide(&a, &one_group).unwrap().batch, 5);
        // B's batch written but not known committed: nobody can tell from here.
        let unconfirmed = StoreView {
            committed_batch: 5,
            ..after_b
        };
        assert!(matches!(
            decide(&a, &unconfirmed),
            Err(Refusal::Ambiguous { .. })
        ));
        // Many batches later, what was a mismatch resumes where the store is.
        let far = StoreView {
            last_batch: 40,
            committed_batch: 40,
            ..after_b
        };
        assert_eq!(decide(&a, &far).unwrap().batch, 40);
    }

    #[test]
    fn a_recovery_point_naming_the_last_batch_keeps_it() {
        let kafka = KafkaCommitted::Point {
            offset: 500,
            point: point(5),
        };
        let r = decide(&kafka, &store()).unwrap();
        assert_eq!((r.batch, r.next_offset, r.clock_ms), (5, 500, 5000));
        assert!(!r.kafka_offset_overridden);
        assert!(r.point_in_kafka);
    }

    #[test]
    fn a_recovery_point_one_behind_rolls_the_uncommitted_batch_back() {
        let s = StoreView {
            committed_batch: 4,
            committed_next_offset: 400,
            ..store()
        };
        let kafka = KafkaCommitted::Point {
            offset: 400,
            point: point(4),
        };
        let r = decide(&kafka, &s).unwrap();
        assert_eq!((r.batch, r.next_offset, r.clock_ms), (4, 400, 4000));
        assert!(r.point_in_kafka);
    }

    #[test]
    fn a_recovery_point_further_apart_is_refused() {
        for b in [0, 3, 6, 99] {
            let kafka = KafkaCommitted::Point {
                offset: 1,
                point: point(b),
            };
            assert_eq!(
                decide(&kafka, &store()),
                Err(Refusal::Mismatch {
                    kafka_batch: b,
                    store_last_batch: 5
                })
            );
        }
    }

    #[test]
    fn an_offset_moved_with_its_metadata_kept_resumes_where_the_store_is() {
        let kafka = KafkaCommitted::Point {
            offset: 0,
            point: point(5),
        };
        let r = decide(&kafka, &store()).unwrap();
        assert_eq!((r.batch, r.next_offset), (5, 500));
        assert!(r.kafka_offset_overridden);
        assert!(!r.point_in_kafka, "Kafka's point names another offset");
    }

    #[test]
    fn offsets_reset_to_earliest_or_latest_never_roll_committed_history_back() {
        for offset in [0, 10_000] {
            let kafka = KafkaCommitted::Offset {
                offset,
                metadata: String::new(),
            };
            let r = decide(&kafka, &store()).unwrap();
            assert_eq!((r.batch, r.next_offset, r.clock_ms), (5, 500, 5000));
            assert!(r.kafka_offset_overridden);
            assert!(!r.point_in_kafka);
        }
    }

    #[test]
    fn expired_offsets_or_a_new_group_resume_where_the_store_is() {
        let r = decide(&KafkaCommitted::Nothing, &store()).unwrap();
        assert_eq!((r.batch, r.next_offset), (5, 500));
        assert!(r.kafka_offset_overridden);
    }

    #[test]
    fn without_a_recovery_point_an_unconfirmed_last_batch_is_refused() {
        let s = StoreView {
            committed_batch: 4,
            ..store()
        };
        for kafka in [
            KafkaCommitted::Nothing,
            KafkaCommitted::Offset {
                offset: 0,
                metadata: "something else".into(),
            },
        ] {
            assert_eq!(
                decide(&kafka, &s),
                Err(Refusal::Ambiguous {
                    store_last_batch: 5,
                    store_committed_batch: 4
                })
            );
        }
        // A store written before offsets were recorded cannot say where to resume either.
        let old = StoreView {
            last_next_offset: -1,
            ..store()
        };
        assert!(decide(&KafkaCommitted::Nothing, &old).is_err());
    }

    #[test]
    fn a_partition_never_written_starts_where_kafka_says() {
        let fresh = StoreView::default();
        let r = decide(&KafkaCommitted::Nothing, &fresh).unwrap();
        assert_eq!((r.batch, r.next_offset), (0, -1));
        assert!(!r.point_in_kafka);
        let kafka = KafkaCommitted::Offset {
            offset: 42,
            metadata: String::new(),
        };
        let r = decide(&kafka, &fresh).unwrap();
        assert_eq!((r.batch, r.next_offset), (0, 42));
        assert!(!r.kafka_offset_overridden);
        let kafka = KafkaCommitted::Point {
            offset: 0,
            point: point(0),
        };
        assert_eq!(decide(&kafka, &fresh).unwrap().batch, 0);
    }

    /// What the engine does with a resume whose point Kafka lacks: commits it at the offset it
    /// resumes from (`anchored`) before writing the next batch.
    fn anchored(r: &Resume, offset: i64) -> KafkaCommitted {
        assert!(!r.point_in_kafka);
        KafkaCommitted::Point {
            offset,
            point: point(r.batch),
        }
    }

    #[test]
    fn once_its_point_is_in_kafka_a_new_groups_first_batch_that_aborts_rolls_back() {
        // A new group on a partition never written: batch 1 is written, then aborts in Kafka.
        let written = StoreView {
            last_batch: 1,
            last_next_offset: 80,
            ..StoreView::default()
        };
        let start = decide(&KafkaCommitted::Nothing, &StoreView::default()).unwrap();
        let r = decide(&anchored(&start, 0), &written).unwrap();
        assert_eq!((r.batch, r.next_offset), (0, 0), "batch 1 rolled back");
        assert!(r.point_in_kafka);
        // Without the point, PostgreSQL alone cannot tell whether batch 1 committed (it may
        // have, and the group's offsets expired since).
        assert!(matches!(
            decide(&KafkaCommitted::Nothing, &written),
            Err(Refusal::Ambiguous { .. })
        ));

        // A new group over a store with history: batch 6 is written, then aborts.
        let resumed = decide(&KafkaCommitted::Nothing, &store()).unwrap();
        let written = StoreView {
            last_batch: 6,
            last_next_offset: 600,
            ..store()
        };
        let r = decide(&anchored(&resumed, 500), &written).unwrap();
        assert_eq!((r.batch, r.next_offset), (5, 500), "batch 6 rolled back");
        assert!(decide(&KafkaCommitted::Nothing, &written).is_err());
    }

    #[test]
    fn foreign_metadata_counts_as_no_recovery_point() {
        let k = KafkaCommitted::from_parts(Some(7), "set by a tool");
        assert_eq!(
            k,
            KafkaCommitted::Offset {
                offset: 7,
                metadata: "set by a tool".into()
            }
        );
        assert_eq!(
            KafkaCommitted::from_parts(None, ""),
            KafkaCommitted::Nothing
        );
        assert_eq!(
            KafkaCommitted::from_parts(Some(-1001), ""),
            KafkaCommitted::Nothing
        );
    }

    #[test]
    fn foreign_or_truncated_metadata_is_an_error() {
        for meta in [
            "something else",
            "cc:",
            "cc:b=1",
            "cc:b=x;f=1",
            "cc:f=1;t=2",
        ] {
            assert!(RecoveryPoint::parse(meta).is_err(), "{meta:?}");
        }
    }
}
