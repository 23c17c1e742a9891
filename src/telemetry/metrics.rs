//! The one list of metrics causal-commit exports (Prometheus names, low-cardinality labels).
//! Never use a contact, clinic or intent id as a label.

use std::net::SocketAddr;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::PrometheusBuilder;

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
/// Contact-level transitions. Labels: `event` = held | skipped | released, `reason`
/// (WAIT_TIMEOUT, CONTACT_BACKLOG_OVERFLOW or OPERATOR).
pub const CONTACT_EVENTS: &str = "causal_commit_contact_events_total";
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
/// Input records per committed transaction.
pub const BATCH_RECORDS: &str = "causal_commit_batch_records";
/// Transactional producers re-created after a fatal or indefinite error.
pub const PRODUCER_RESETS: &str = "causal_commit_producer_resets_total";
/// 1 for the active lock/idempotency store. Label: `mode` = redis | postgres.
pub const LOCK_STORE_MODE: &str = "causal_commit_lock_store_mode";
/// Records between the consumer position and the partition end. Label: `partition`.
pub const CONSUMER_LAG: &str = "causal_commit_consumer_lag";
/// Partitions assigned to this instance.
pub const PARTITIONS_ASSIGNED: &str = "causal_commit_partitions_assigned";
/// Partitions paused. Label: `cause` = restoring | store | recovery_point | backpressure.
pub const PARTITIONS_PAUSED: &str = "causal_commit_partitions_paused";
/// Unix time of the last committed transaction (a stalled consumer stops moving it).
pub const LAST_COMMIT_TIMESTAMP: &str = "causal_commit_last_commit_timestamp_seconds";
/// 1 while the instance is ready (partitions assigned and restored, stores answering).
pub const READY: &str = "causal_commit_ready";
/// Partition restores from the durable store (assignment or recovery). Label: `cause`.
pub const RESTORES: &str = "causal_commit_restores_total";
/// Uncommitted rows removed by restores (evidence of transactions that did not commit).
pub const ROLLED_BACK_ROWS: &str = "causal_commit_rolled_back_rows_total";
/// Failed calls to a backing store. Label: `store` = postgres | redis.
pub const STORE_ERRORS: &str = "causal_commit_store_errors_total";

/// Describes every metric, so /metrics documents them before they first move.
pub fn describe() {
    describe_counter!(
        OUTCOMES,
        "Outcome of every consumed record, by state and reason"
    );
    describe_counter!(RECORDS_CONSUMED, "Records consumed from the intents topic");
    describe_counter!(
        INVALID_INTENTS,
        "Invalid input records sent to manual review"
    );
    describe_gauge!(BACKLOG_WAITING, "Intents in waiting_previous_commit");
    describe_gauge!(
        BACKLOG_OLDEST_AGE,
        Unit::Seconds,
        "Age of the oldest waiting intent"
    );
    describe_gauge!(CONTACTS_ON_HOLD, "Contacts held for manual review");
    describe_gauge!(
        HELD_OLDEST_AGE,
        Unit::Seconds,
        "How long the longest-held contact has been on hold"
    );
    describe_counter!(
        MANUAL_REVIEW_RECORDS,
        "Manual-review records produced, by reason"
    );
    describe_counter!(
        CONTACT_EVENTS,
        "Contact-level transitions (held, skipped, released), by reason"
    );
    describe_histogram!(
        COMMIT_LATENCY,
        Unit::Seconds,
        "Intent created to effect committed"
    );
    describe_counter!(TRANSACTIONS, "Kafka transactions by result");
    describe_histogram!(
        TRANSACTION_DURATION,
        Unit::Seconds,
        "Kafka transaction commit time"
    );
    describe_histogram!(BATCH_RECORDS, "Input records per committed transaction");
    describe_counter!(PRODUCER_RESETS, "Transactional producers re-created");
    describe_gauge!(
        LOCK_STORE_MODE,
        "Active lock and idempotency store (1 = active)"
    );
    describe_gauge!(CONSUMER_LAG, "Records not yet consumed, per partition");
    describe_gauge!(PARTITIONS_ASSIGNED, "Partitions assigned to this instance");
    describe_gauge!(PARTITIONS_PAUSED, "Partitions paused, by cause");
    describe_gauge!(
        LAST_COMMIT_TIMESTAMP,
        Unit::Seconds,
        "Unix time of the last commit"
    );
    describe_counter!(STORE_ERRORS, "Failed store calls, by store");
    describe_gauge!(
        READY,
        "1 while ready: partitions assigned and restored, stores answering"
    );
    describe_counter!(RESTORES, "Partition restores from the durable store");
    describe_counter!(
        ROLLED_BACK_ROWS,
        "Uncommitted durable rows removed by restores"
    );
}

/// Installs the Prometheus recorder and serves `/metrics` on `listen` (in the current tokio
/// runtime). Without `listen`, metrics are recorded nowhere.
pub fn install_exporter(listen: Option<SocketAddr>) -> anyhow::Result<()> {
    let Some(addr) = listen else {
        return Ok(());
    };
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(COMMIT_LATENCY.into()),
            &[
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ],
        )?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(TRANSACTION_DURATION.into()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
            ],
        )?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(BATCH_RECORDS.into()),
            &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0],
        )?
        .install()?;
    describe();
    Ok(())
}
