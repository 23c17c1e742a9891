//! The one list of metrics causal-commit exports (Prometheus names, low-cardinality labels).
//! Never use a contact, clinic or intent id as a label.
//!
//! [`ALL`] describes every metric with its type and labels; `deploy/prometheus/metrics.txt`
//! (what the alert rules and the dashboard are checked against) must say the same, which a unit
//! test below checks. [`register_known_series`] makes every series with a known label value
//! appear at zero from start-up, so `rate(...{result="abort"})` has data before the first abort.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Every consumed record's outcome. Labels: `state`, `reason` ("" when none).
pub const OUTCOMES: &str = "causal_commit_outcomes_total";
/// Records consumed from the intents topic.
pub const RECORDS_CONSUMED: &str = "causal_commit_records_consumed_total";
/// Invalid input records. Label: `reason` (the validation failure kind).
pub const INVALID_INTENTS: &str = "causal_commit_invalid_intents_total";
/// Intents waiting for their predecessor. Label: `partition`.
pub const BACKLOG_WAITING: &str = "causal_commit_backlog_waiting";
/// Age of the oldest waiting intent. Label: `partition`.
pub const BACKLOG_OLDEST_AGE: &str = "causal_commit_backlog_oldest_age_seconds";
/// Manual-review records produced. Label: `reason` (the contract's reason code).
pub const MANUAL_REVIEW_RECORDS: &str = "causal_commit_manual_review_records_total";
/// Contacts put on hold. Label: `reason` = WAIT_TIMEOUT | CONTACT_BACKLOG_OVERFLOW.
pub const CONTACT_HOLDS: &str = "causal_commit_contact_holds_total";
/// The other contact-level transitions. Labels: `event` = skipped | released, `reason`
/// (WAIT_TIMEOUT for a skip by the timeout policy, OPERATOR otherwise).
pub const CONTACT_EVENTS: &str = "causal_commit_contact_events_total";
/// Records whose contact another partition owns, forwarded to that partition.
pub const FORWARDED: &str = "causal_commit_forwarded_records_total";
/// Contacts on hold (manual review needed before they move again).
pub const CONTACTS_ON_HOLD: &str = "causal_commit_contacts_on_hold";
/// How long the longest-held contact has been on hold (0 when none).
pub const HELD_OLDEST_AGE: &str = "causal_commit_held_oldest_age_seconds";
/// Intent created (producer clock) -> effect committed.
pub const COMMIT_LATENCY: &str = "causal_commit_commit_latency_seconds";
/// Kafka transactions. Label: `result` = commit | abort.
pub const TRANSACTIONS: &str = "causal_commit_transactions_total";
/// Time to commit one Kafka transaction.
pub const TRANSACTION_DURATION: &str = "causal_commit_transaction_duration_seconds";
/// How long each step of a committed batch took. Label: `step` = poll | lookup | decide |
/// durable_write | commit (see `trace`).
pub const BATCH_STEP: &str = "causal_commit_batch_step_seconds";
/// Input records per committed transaction.
pub const BATCH_RECORDS: &str = "causal_commit_batch_records";
/// Records a batch may hold now: `batch.max_records`, less while PostgreSQL is too slow for a
/// full batch (`pipeline::gather::BatchLimit`).
pub const BATCH_LIMIT: &str = "causal_commit_batch_limit_records";
/// Transactional producers re-created after a fatal or indefinite error.
pub const PRODUCER_RESETS: &str = "causal_commit_producer_resets_total";
/// Kafka clients bootstrapped again after librdkafka left them without any broker
/// (`pipeline::kafka::stranded`). Label: `client` = consumer | producer | lag.
pub const KAFKA_REBOOTSTRAPS: &str = "causal_commit_kafka_rebootstraps_total";
/// Blocking transactional calls that did not return within the operation timeout plus
/// `kafka::STUCK_GRACE`: the producer was given up (`pipeline::kafka::call_thread`). Label:
/// `call`.
pub const KAFKA_CALLS_STUCK: &str = "causal_commit_kafka_calls_stuck_total";
/// Consumers replaced because they fetched nothing of a partition with records to read, the
/// broker answering, for `kafka.fetch_stall_timeout` (`pipeline::stall`).
pub const CONSUMER_STALLS: &str = "causal_commit_consumer_stalls_total";
/// 1 for the active lock/idempotency store. Label: `mode` = redis | postgres.
pub const LOCK_STORE_MODE: &str = "causal_commit_lock_store_mode";
/// Records of an assigned partition not consumed yet: its last stable offset (what a
/// read_committed consumer can read) minus the consumer's position. Label: `partition`.
pub const CONSUMER_LAG: &str = "causal_commit_consumer_lag";
/// Partitions assigned to this instance.
pub const PARTITIONS_ASSIGNED: &str = "causal_commit_partitions_assigned";
/// Partitions paused. Label: `cause` = restoring | store | recovery_point | backpressure.
pub const PARTITIONS_PAUSED: &str = "causal_commit_partitions_paused";
/// Assigned partitions read to their end whose log goes on past it: a producer's Kafka
/// transaction still open holds its records, and every later one, back from a read_committed
/// consumer (their waits do not count meanwhile, contract R7).
pub const PARTITIONS_HELD_BACK: &str = "causal_commit_partitions_held_back";
/// Unix time of the last committed transaction (a stalled consumer stops moving it). Absent
/// until the instance's first commit.
pub const LAST_COMMIT_TIMESTAMP: &str = "causal_commit_last_commit_timestamp_seconds";
/// 1 while the instance is ready (partitions assigned and restored, stores answering).
pub const READY: &str = "causal_commit_ready";
/// Partition restores from the durable store. Label: `cause` = assignment | recovery.
pub const RESTORES: &str = "causal_commit_restores_total";
/// Uncommitted rows removed by restores (evidence of transactions that did not commit).
pub const ROLLED_BACK_ROWS: &str = "causal_commit_rolled_back_rows_total";
/// Failed calls to a backing store. Label: `store` = postgres | redis.
pub const STORE_ERRORS: &str = "causal_commit_store_errors_total";
/// 1 while a topic of `[kafka]` has a `cleanup.policy` that compacts (records lost unseen),
/// else 0; read every 30 s while the processor runs. Label: `topic`.
pub const TOPIC_COMPACTS: &str = "causal_commit_topic_compacts";

/// A metric's Prometheus type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A label and, when it is a closed set, its values (empty: any value).
#[derive(Debug, Clone, Copy)]
pub struct Label {
    pub name: &'static str,
    pub values: &'static [&'static str],
}

/// One exported metric.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [Label],
    pub help: &'static str,
    pub unit: Option<Unit>,
}

/// The states of `causal_commit_outcomes_total` (`sequencer::State`).
pub const STATES: &[&str] = &[
    "committed_causal",
    "duplicate",
    "blocked_conflict",
    "manual_review",
    "waiting_previous_commit",
];
/// Reasons of a `blocked_conflict` outcome.
pub const BLOCK_REASONS: &[&str] = &[
    "VERSION_CONFLICT",
    "SEQUENCE_CONFLICT",
    "IDEMPOTENCY_CONFLICT",
];
/// Reasons of a `manual_review` outcome.
pub const REVIEW_ONLY_REASONS: &[&str] = &[
    "WAIT_TIMEOUT",
    "CONTACT_ON_HOLD",
    "INVALID_INTENT",
    "CONTACT_BACKLOG_OVERFLOW",
    "UNPROCESSABLE",
];
/// Every reason a manual-review record carries (`sequencer::Reason`).
pub const REVIEW_REASONS: &[&str] = &[
    "WAIT_TIMEOUT",
    "CONTACT_ON_HOLD",
    "VERSION_CONFLICT",
    "SEQUENCE_CONFLICT",
    "IDEMPOTENCY_CONFLICT",
    "INVALID_INTENT",
    "CONTACT_BACKLOG_OVERFLOW",
    "UNPROCESSABLE",
];
/// Why a contact goes on hold (`sequencer::HoldReason::code`).
pub const HOLD_REASONS: &[&str] = &["WAIT_TIMEOUT", "CONTACT_BACKLOG_OVERFLOW"];
/// Validation failures (`intent::InvalidIntent::kind`).
pub const INVALID_KINDS: &[&str] = &[
    "no_value",
    "record_too_large",
    "undecodable",
    "missing_field",
    "field_too_long",
    "control_character",
    "payload_too_large",
    "missing_key",
    "key_mismatch",
    "unknown_action",
    "unspecified_action",
];
/// The watched Kafka clients of a processor (`causal_commit_kafka_rebootstraps_total`).
pub const KAFKA_CLIENTS: &[&str] = &["consumer", "producer", "lag", "topics"];
/// The producer calls bounded by its call thread.
pub const KAFKA_TXN_CALLS: &[&str] = &[
    "init_transactions",
    "send_offsets_to_transaction",
    "commit_transaction",
    "abort_transaction",
];
/// `pipeline::assignment::PauseCause`.
pub const PAUSE_CAUSES: &[&str] = &["restoring", "store", "recovery_point", "backpressure"];

const PARTITION: &[Label] = &[Label {
    name: "partition",
    values: &[],
}];

/// Every metric causal-commit exports.
pub const ALL: &[Metric] = &[
    Metric {
        name: OUTCOMES,
        kind: Kind::Counter,
        labels: &[
            Label {
                name: "state",
                values: STATES,
            },
            Label {
                name: "reason",
                values: &[],
            },
        ],
        help: "Outcome of every consumed record, by state and reason",
        unit: None,
    },
    Metric {
        name: RECORDS_CONSUMED,
        kind: Kind::Counter,
        labels: &[],
        help: "Records consumed from the intents topic",
        unit: None,
    },
    Metric {
        name: INVALID_INTENTS,
        kind: Kind::Counter,
        labels: &[Label {
            name: "reason",
            values: INVALID_KINDS,
        }],
        help: "Invalid input records sent to manual review, by validation failure",
        unit: None,
    },
    Metric {
        name: MANUAL_REVIEW_RECORDS,
        kind: Kind::Counter,
        labels: &[Label {
            name: "reason",
            values: REVIEW_REASONS,
        }],
        help: "Manual-review records produced, by reason",
        unit: None,
    },
    Metric {
        name: BACKLOG_WAITING,
        kind: Kind::Gauge,
        labels: PARTITION,
        help: "Intents in waiting_previous_commit",
        unit: None,
    },
    Metric {
        name: BACKLOG_OLDEST_AGE,
        kind: Kind::Gauge,
        labels: PARTITION,
        help: "Age of the oldest waiting intent",
        unit: Some(Unit::Seconds),
    },
    Metric {
        name: CONTACTS_ON_HOLD,
        kind: Kind::Gauge,
        labels: &[],
        help: "Contacts held for manual review",
        unit: None,
    },
    Metric {
        name: HELD_OLDEST_AGE,
        kind: Kind::Gauge,
        labels: &[],
        help: "How long the longest-held contact has been on hold",
        unit: Some(Unit::Seconds),
    },
    Metric {
        name: FORWARDED,
        kind: Kind::Counter,
        labels: &[],
        help: "Records forwarded to the partition that owns their contact",
        unit: None,
    },
    Metric {
        name: CONTACT_HOLDS,
        kind: Kind::Counter,
        labels: &[Label {
            name: "reason",
            values: HOLD_REASONS,
        }],
        help: "Contacts put on hold, by reason",
        unit: None,
    },
    Metric {
        name: CONTACT_EVENTS,
        kind: Kind::Counter,
        labels: &[
            Label {
                name: "event",
                values: &["skipped", "released"],
            },
            Label {
                name: "reason",
                values: &["WAIT_TIMEOUT", "OPERATOR"],
            },
        ],
        help: "Contact sequences skipped and held contacts released, by cause",
        unit: None,
    },
    Metric {
        name: COMMIT_LATENCY,
        kind: Kind::Histogram,
        labels: &[],
        help: "Intent created to effect committed",
        unit: Some(Unit::Seconds),
    },
    Metric {
        name: TRANSACTIONS,
        kind: Kind::Counter,
        labels: &[Label {
            name: "result",
            values: &["commit", "abort"],
        }],
        help: "Kafka transactions by result (batches and recovery-point commits)",
        unit: None,
    },
    Metric {
        name: TRANSACTION_DURATION,
        kind: Kind::Histogram,
        labels: &[],
        help: "Kafka transaction time, begin (before the durable write) to commit",
        unit: Some(Unit::Seconds),
    },
    Metric {
        name: BATCH_STEP,
        kind: Kind::Histogram,
        labels: &[Label {
            name: "step",
            values: &super::trace::Step::NAMES,
        }],
        help: "Time each step of a committed batch took",
        unit: Some(Unit::Seconds),
    },
    Metric {
        name: BATCH_RECORDS,
        kind: Kind::Histogram,
        labels: &[],
        help: "Input records per committed transaction",
        unit: None,
    },
    Metric {
        name: BATCH_LIMIT,
        kind: Kind::Gauge,
        labels: &[],
        help: "Records a batch may hold now (batch.max_records, less while PostgreSQL is too slow for a full batch)",
        unit: None,
    },
    Metric {
        name: PRODUCER_RESETS,
        kind: Kind::Counter,
        labels: &[],
        help: "Transactional producers re-created",
        unit: None,
    },
    Metric {
        name: KAFKA_REBOOTSTRAPS,
        kind: Kind::Counter,
        labels: &[Label {
            name: "client",
            values: KAFKA_CLIENTS,
        }],
        help: "Kafka clients bootstrapped again after librdkafka left them without any broker",
        unit: None,
    },
    Metric {
        name: KAFKA_CALLS_STUCK,
        kind: Kind::Counter,
        labels: &[Label {
            name: "call",
            values: KAFKA_TXN_CALLS,
        }],
        help: "Transactional producer calls that did not return in time; the producer was given up and re-created",
        unit: None,
    },
    Metric {
        name: CONSUMER_STALLS,
        kind: Kind::Counter,
        labels: &[],
        help: "Kafka consumers replaced because they fetched nothing of a partition with records to read while the broker answered",
        unit: None,
    },
    Metric {
        name: LOCK_STORE_MODE,
        kind: Kind::Gauge,
        labels: &[Label {
            name: "mode",
            values: &["redis", "postgres"],
        }],
        help: "Active lock and idempotency store (1 = active)",
        unit: None,
    },
    Metric {
        name: CONSUMER_LAG,
        kind: Kind::Gauge,
        labels: PARTITION,
        help: "Records not consumed yet: last stable offset minus the consumer position",
        unit: None,
    },
    Metric {
        name: PARTITIONS_ASSIGNED,
        kind: Kind::Gauge,
        labels: &[],
        help: "Partitions assigned to this instance",
        unit: None,
    },
    Metric {
        name: PARTITIONS_PAUSED,
        kind: Kind::Gauge,
        labels: &[Label {
            name: "cause",
            values: PAUSE_CAUSES,
        }],
        help: "Partitions paused, by cause",
        unit: None,
    },
    Metric {
        name: PARTITIONS_HELD_BACK,
        kind: Kind::Gauge,
        labels: &[],
        help: "Partitions whose records are held back behind a producer's open transaction",
        unit: None,
    },
    Metric {
        name: LAST_COMMIT_TIMESTAMP,
        kind: Kind::Gauge,
        labels: &[],
        help: "Unix time of the last commit",
        unit: Some(Unit::Seconds),
    },
    Metric {
        name: RESTORES,
        kind: Kind::Counter,
        labels: &[Label {
            name: "cause",
            values: &["assignment", "recovery"],
        }],
        help: "Partition restores from the durable store",
        unit: None,
    },
    Metric {
        name: ROLLED_BACK_ROWS,
        kind: Kind::Counter,
        labels: &[],
        help: "Uncommitted durable rows removed by restores",
        unit: None,
    },
    Metric {
        name: STORE_ERRORS,
        kind: Kind::Counter,
        labels: &[Label {
            name: "store",
            values: &["postgres", "redis"],
        }],
        help: "Failed store calls, by store",
        unit: None,
    },
    Metric {
        name: TOPIC_COMPACTS,
        kind: Kind::Gauge,
        labels: &[Label {
            name: "topic",
            values: &[],
        }],
        help: "1 while the topic's cleanup.policy compacts (records deleted unseen)",
        unit: None,
    },
    Metric {
        name: READY,
        kind: Kind::Gauge,
        labels: &[],
        help: "1 while ready: partitions assigned and restored, stores answering",
        unit: None,
    },
];

/// Describes every metric, so /metrics documents them.
pub fn describe() {
    for m in ALL {
        match (m.kind, m.unit) {
            (Kind::Counter, Some(u)) => describe_counter!(m.name, u, m.help),
            (Kind::Counter, None) => describe_counter!(m.name, m.help),
            (Kind::Gauge, Some(u)) => describe_gauge!(m.name, u, m.help),
            (Kind::Gauge, None) => describe_gauge!(m.name, m.help),
            (Kind::Histogram, Some(u)) => describe_histogram!(m.name, u, m.help),
            (Kind::Histogram, None) => describe_histogram!(m.name, m.help),
        }
    }
}

/// Registers, at zero, every series whose labels are known before anything happens: each
/// counter and histogram with each of its label values, and the gauges that are not
/// per-partition (those appear with their partition's assignment). A series that has not
/// moved is then exported as 0 instead of being absent, so rates and ratios over it have data.
/// [`LAST_COMMIT_TIMESTAMP`] is left absent until the first commit (a 0 would read as "last
/// commit in 1970"), and [`LOCK_STORE_MODE`] is set by the lock store when it is created.
pub fn register_known_series() {
    for m in ALL {
        match m.kind {
            Kind::Counter => register_counter(m),
            Kind::Histogram => match m.labels {
                [label] => {
                    for value in label.values {
                        let _ = metrics::histogram!(m.name, label.name => *value);
                    }
                }
                _ => {
                    let _ = metrics::histogram!(m.name);
                }
            },
            Kind::Gauge => {}
        }
    }
    for state in STATES {
        let reasons: &[&str] = match *state {
            "blocked_conflict" => BLOCK_REASONS,
            "manual_review" => REVIEW_ONLY_REASONS,
            _ => &[""],
        };
        for reason in reasons {
            metrics::counter!(OUTCOMES, "state" => *state, "reason" => *reason).absolute(0);
        }
    }
    for (event, reason) in [
        ("skipped", "WAIT_TIMEOUT"),
        ("skipped", "OPERATOR"),
        ("released", "OPERATOR"),
    ] {
        metrics::counter!(CONTACT_EVENTS, "event" => event, "reason" => reason).absolute(0);
    }
    for gauge in [
        CONTACTS_ON_HOLD,
        HELD_OLDEST_AGE,
        PARTITIONS_ASSIGNED,
        PARTITIONS_HELD_BACK,
        READY,
    ] {
        metrics::gauge!(gauge).set(0.0);
    }
    for cause in PAUSE_CAUSES {
        metrics::gauge!(PARTITIONS_PAUSED, "cause" => *cause).set(0.0);
    }
}

/// A counter with no label, or one closed label: each value at zero. Counters with several
/// labels are registered by hand above (only some combinations exist).
fn register_counter(m: &Metric) {
    match m.labels {
        [] => metrics::counter!(m.name).absolute(0),
        [label] => {
            for value in label.values {
                metrics::counter!(m.name, label.name => *value).absolute(0);
            }
        }
        _ => {}
    }
}

/// The recorder's configuration: histogram buckets (without them the exporter renders
/// summaries, which cannot be aggregated across instances).
fn builder() -> anyhow::Result<PrometheusBuilder> {
    Ok(PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(COMMIT_LATENCY.into()),
            &[
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full(TRANSACTION_DURATION.into()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full(BATCH_STEP.into()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full(BATCH_RECORDS.into()),
            &[
                1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0, 10000.0, 20000.0, 50000.0,
            ],
        )?)
}

/// Installs the Prometheus recorder as the global one and returns the handle that renders
/// `/metrics` (served by [`super::server`]). Every metric is described and its known series
/// registered at zero. Call once per process.
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let handle = builder()?.install_recorder()?;
    describe();
    register_known_series();
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::pipeline::assignment::PauseCause;
    use crate::sequencer::{Reason, State};

    const METRICS_TXT: &str = include_str!("../../deploy/prometheus/metrics.txt");

    /// metrics.txt as (name -> (type, label -> closed values)).
    type Listed = BTreeMap<String, (String, BTreeMap<String, BTreeSet<String>>)>;

    fn listed() -> Listed {
        let mut out = BTreeMap::new();
        for line in METRICS_TXT.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut words = line.split_whitespace();
            let name = words.next().expect("a name").to_string();
            let kind = words.next().expect("a type").to_string();
            let labels = words
                .map(|l| {
                    let (name, values) = l.split_once('=').unwrap_or((l, ""));
                    let values = values
                        .split('|')
                        .filter(|v| !v.is_empty())
                        .map(str::to_string)
                        .collect();
                    (name.to_string(), values)
                })
                .collect();
            out.insert(name, (kind, labels));
        }
        out
    }

    fn exported() -> Listed {
        ALL.iter()
            .map(|m| {
                let labels = m
                    .labels
                    .iter()
                    .map(|l| {
                        let values = l.values.iter().map(|v| v.to_string()).collect();
                        (l.name.to_string(), values)
                    })
                    .collect();
                (m.name.to_string(), (m.kind.as_str().to_string(), labels))
            })
            .collect()
    }

    #[test]
    fn metrics_txt_lists_exactly_the_exported_metrics_with_their_types_and_labels() {
        let mut listed = listed();
        // Prometheus makes `up` for every target; we do not export it.
        assert!(listed.remove("up").is_some(), "metrics.txt lists up");
        let exported = exported();
        for (name, spec) in &exported {
            assert_eq!(
                listed.get(name),
                Some(spec),
                "deploy/prometheus/metrics.txt must list {name} as the code exports it"
            );
        }
        for name in listed.keys() {
            assert!(
                exported.contains_key(name),
                "deploy/prometheus/metrics.txt lists {name}, which src/telemetry/metrics.rs does not export"
            );
        }
    }

    #[test]
    fn every_metric_but_the_per_partition_ones_is_exported_at_zero_from_start_up() {
        let recorder = builder().expect("buckets").build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe();
            register_known_series();
        });
        handle.run_upkeep();
        let text = handle.render();
        for expected in [
            r#"causal_commit_transactions_total{result="abort"} 0"#,
            r#"causal_commit_transactions_total{result="commit"} 0"#,
            r#"causal_commit_outcomes_total{state="blocked_conflict",reason="VERSION_CONFLICT"} 0"#,
            r#"causal_commit_outcomes_total{state="committed_causal",reason=""} 0"#,
            r#"causal_commit_manual_review_records_total{reason="UNPROCESSABLE"} 0"#,
            r#"causal_commit_contact_holds_total{reason="WAIT_TIMEOUT"} 0"#,
            r#"causal_commit_store_errors_total{store="redis"} 0"#,
            r#"causal_commit_partitions_paused{cause="backpressure"} 0"#,
            "causal_commit_commit_latency_seconds_count 0",
            "causal_commit_ready 0",
        ] {
            assert!(text.contains(expected), "{expected} missing from:\n{text}");
        }
        for m in ALL {
            let per_partition = m.labels.iter().any(|l| l.name == "partition");
            // The lock store sets its mode when it is created; the first commit sets its time;
            // the first read of the topics' cleanup.policy sets theirs; the engine sets its
            // batch limit (batch.max_records) when it starts.
            let set_later = [
                LAST_COMMIT_TIMESTAMP,
                LOCK_STORE_MODE,
                TOPIC_COMPACTS,
                BATCH_LIMIT,
            ];
            if per_partition || set_later.contains(&m.name) {
                continue;
            }
            assert!(
                text.contains(&format!("# TYPE {} {}", m.name, m.kind.as_str())),
                "{} is not exported at start-up",
                m.name
            );
        }
        // Only outcome combinations that can happen.
        assert!(!text.contains(r#"state="committed_causal",reason="WAIT_TIMEOUT""#));
    }

    #[test]
    fn closed_label_sets_are_the_code_enums() {
        let states: Vec<&str> = State::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            states.iter().collect::<BTreeSet<_>>(),
            STATES.iter().collect()
        );
        let reasons: BTreeSet<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(reasons, REVIEW_REASONS.iter().copied().collect());
        let by_state: BTreeSet<&str> = BLOCK_REASONS
            .iter()
            .chain(REVIEW_ONLY_REASONS)
            .copied()
            .collect();
        assert_eq!(
            by_state, reasons,
            "every reason belongs to one outcome state"
        );
        let causes: Vec<&str> = PauseCause::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(causes, PAUSE_CAUSES);
        for hold in HOLD_REASONS {
            assert!(reasons.contains(hold));
        }
    }

    #[test]
    fn invalid_kinds_are_every_validation_failure() {
        use crate::intent::InvalidIntent as I;
        let every = [
            I::NoValue,
            I::RecordTooLarge { size: 2, max: 1 },
            I::Undecodable(String::new()),
            I::MissingField("intent_id"),
            I::FieldTooLong {
                field: "intent_id",
                len: 2,
                max: 1,
            },
            I::ControlCharacter {
                field: "intent_id",
                code: 0,
                at: 0,
            },
            I::PayloadTooLarge { len: 2, max: 1 },
            I::MissingKey {
                contact_id: String::new(),
            },
            I::KeyMismatch {
                key: String::new(),
                contact_id: String::new(),
            },
            I::UnknownAction(99),
            I::UnspecifiedAction,
        ];
        // A new variant must be added above (and to INVALID_KINDS): this match is exhaustive.
        for e in &every {
            match e {
                I::NoValue
                | I::RecordTooLarge { .. }
                | I::Undecodable(_)
                | I::MissingField(_)
                | I::FieldTooLong { .. }
                | I::ControlCharacter { .. }
                | I::PayloadTooLarge { .. }
                | I::MissingKey { .. }
                | I::KeyMismatch { .. }
                | I::UnknownAction(_)
                | I::UnspecifiedAction => {}
            }
        }
        let kinds: BTreeSet<&str> = every.iter().map(|e| e.kind()).collect();
        assert_eq!(kinds, INVALID_KINDS.iter().copied().collect());
        assert_eq!(kinds.len(), INVALID_KINDS.len());
    }
}
