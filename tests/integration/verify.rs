//! The contract verifier against the real broker and PostgreSQL: a clean run passes with exact
//! counts, and every kind of violation is found and counted.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::*;
use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};

use causal_commit::config::Config;
use causal_commit::intent::InRecord;
use causal_commit::proto::{ManualReview, ReviewReason, SideEffect};
use causal_commit::sequencer::{
    ContactSnapshot, Intent as SeqIntent, IntentMeta, Millis, WaitingSnapshot,
};
use causal_commit::store::recovery::RecoveryPoint;
use causal_commit::store::snapshot::Held;
use causal_commit::verify::{verify, Report};

async fn run_verify(config: &Config, prefix: &str) -> Report {
    let c = config.clone();
    let p = prefix.to_string();
    tokio::task::spawn_blocking(move || verify(&c, &p))
        .await
        .expect("verifier thread")
        .expect("verify runs")
}

fn reasons(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// The CLI on `config`'s world: (exit code, report parsed from stdout).
fn cli_verify(config: &Config, prefix: &str) -> (Option<i32>, Report) {
    let out = process::command(config)
        .args(["verify", "--prefix", prefix])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run causal-commit verify");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "verify prints a JSON report ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_run_verifies_ok_with_exact_counts() {
    let env = TestEnv::new("verify_ok", 2).await;
    let cfg = env.config();
    let running = start(cfg.clone());

    // Contact p1-c1 in strict mode, produced out of order (2, 1, 3), with a producer retry of
    // sequence 1 (the same bytes); contact p2-c2 with assigned sequences; one garbage record.
    let a1 = intent("p1-a1", "p1-c1", 1);
    let a2 = intent("p1-a2", "p1-c1", 2);
    let a3 = intent("p1-a3", "p1-c1", 3);
    let b1 = intent("p2-b1", "p2-c2", 0);
    let b2 = intent("p2-b2", "p2-c2", 0);
    produce_intents(&cfg, &[a2, a1.clone(), b1, a1, a3, b2]).await;
    produce_raw(
        &cfg,
        &[(Some(b"p2-garbage".to_vec()), vec![0xff, 0xff, 0xff, 0x01])],
    )
    .await;

    let effects_raw = wait_for(
        &cfg,
        &cfg.kafka.side_effects_topic,
        5,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(effects_raw.len(), 5, "five effects");
    let reviews_raw = wait_for(
        &cfg,
        &cfg.kafka.manual_review_topic,
        1,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(reviews_raw.len(), 1, "one manual-review record");
    let c = (*cfg).clone();
    tokio::task::spawn_blocking(move || {
        causal_commit::demo::wait_caught_up(&c, Duration::from_secs(60))
    })
    .await
    .expect("waiter")
    .expect("the processor caught up");
    running.stop().await;

    let all = run_verify(&cfg, "").await;
    assert_eq!(
        all,
        Report {
            intents: 5,
            records: 7,
            invalid_records: 1,
            committed: 5,
            duplicates_emitted: 0,
            gaps: 0,
            reorders: 0,
            lost: 0,
            manual_review: reasons(&[("INVALID_INTENT", 1)]),
            blocked: 0,
            waiting: 0,
            unresolved_manual_review_slots: 0,
            effects_without_intent: 0,
            malformed_outputs: 0,
            ok: true,
            violations: vec![],
        }
    );

    // A prefix checks one run's intents (and invalid records keyed with it) only.
    let p1 = run_verify(&cfg, "p1-").await;
    assert!(p1.ok, "{p1:?}");
    assert_eq!(
        (p1.intents, p1.records, p1.invalid_records, p1.committed),
        (3, 4, 0, 3)
    );
    assert!(p1.manual_review.is_empty(), "{p1:?}");
    let p2 = run_verify(&cfg, "p2-").await;
    assert!(p2.ok, "{p2:?}");
    assert_eq!(
        (p2.intents, p2.records, p2.invalid_records, p2.committed),
        (2, 3, 1, 2)
    );
    assert_eq!(p2.manual_review, reasons(&[("INVALID_INTENT", 1)]));
    let none = run_verify(&cfg, "nobody-").await;
    assert_eq!(
        none,
        Report {
            ok: true,
            ..Report::default()
        }
    );

    // The CLI prints the same report and exits 0.
    let c = (*cfg).clone();
    let (code, printed) = tokio::task::spawn_blocking(move || cli_verify(&c, ""))
        .await
        .expect("cli");
    assert_eq!(code, Some(0));
    assert_eq!(printed, all);
}

/// Produces raw values to `topic` with a plain (non-transactional) producer.
async fn produce_to(config: &Config, topic: &str, records: &[(&str, Vec<u8>)]) {
    let p = producer(config);
    for (key, value) in records {
        let r = FutureRecord::to(topic).key(*key).payload(value);
        p.send(r, Duration::from_secs(10)).await.expect("delivered");
    }
}

fn effect(intent_id: &str, contact_id: &str, seq: u64) -> (&'static str, Vec<u8>) {
    let e = SideEffect {
        intent_id: intent_id.into(),
        contact_id: contact_id.into(),
        clinic_id: "clinic-1".into(),
        commit_sequence: seq,
        contact_version: seq,
        ..SideEffect::default()
    };
    // The key does not matter to the verifier (one partition here).
    ("k", e.encode_to_vec())
}

fn review(
    config: &Config,
    reason: ReviewReason,
    key: &str,
    intent_id: &str,
    offset: i64,
) -> (&'static str, Vec<u8>) {
    let r = ManualReview {
        original_key: key.as_bytes().to_vec().into(),
        reason: reason as i32,
        intent_id: intent_id.into(),
        source_topic: config.kafka.intents_topic.clone(),
        source_partition: 0,
        source_offset: offset,
        ..ManualReview::default()
    };
    ("k", r.encode_to_vec())
}

/// A contact state whose waiting list holds `waiting` (intent_id, sequence, source offset).
fn state(contact: &str, waiting: &[(&str, u64, i64)]) -> serde_json::Value {
    let mut s = ContactSnapshot::<Held>::new(contact);
    s.next_sequence = waiting.iter().map(|w| w.1).max().unwrap_or(0) + 1;
    s.gap_since = (!waiting.is_empty()).then_some(Millis(1));
    s.waiting = waiting
        .iter()
        .map(|(id, seq, offset)| WaitingSnapshot {
            commit_sequence: *seq,
            since: Millis(1),
            intent: SeqIntent {
                meta: IntentMeta {
                    intent_id: id.to_string(),
                    contact_id: contact.into(),
                    causal_sequence: *seq,
                    expected_version: 0,
                    priority: 0,
                    fingerprint: 0,
                    offset: *offset,
                    resubmission: false,
                },
                payload: Held {
                    record: InRecord {
                        partition: 0,
                        offset: *offset,
                        key: Some(contact.as_bytes().to_vec()),
                        value: None,
                        traceparent: None,
                        resubmission: false,
                    },
                    correlation_id: format!("corr-{id}"),
                },
            },
        })
        .collect();
    serde_json::to_value(&s).expect("a snapshot serializes")
}

/// Commits the processor group's offset on intents partition 0 with a recovery point naming
/// `batch` as the last batch committed in Kafka.
fn commit_recovery_point(config: &Config, next_offset: i64, batch: u64) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", &config.kafka.group_id)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&config.kafka.intents_topic, 0, Offset::Offset(next_offset))
        .expect("offset");
    tpl.find_partition(&config.kafka.intents_topic, 0)
        .expect("partition in list")
        .set_metadata(
            RecoveryPoint {
                batch,
                fence: 1,
                clock_ms: 0,
            }
            .to_string(),
        );
    consumer
        .commit(&tpl, CommitMode::Sync)
        .expect("commit offsets");
}

#[allow(clippy::too_many_arguments)]
async fn transition(
    pool: &sqlx::PgPool,
    config: &Config,
    batch: i64,
    offset: i64,
    intent_id: &str,
    contact_id: &str,
    to_state: &str,
    reason: &str,
    seq: i64,
    detail: &str,
) {
    sqlx::query(
        "INSERT INTO cc_transition (topic, partition, batch_no, source_offset, intent_id,
             contact_id, clinic_id, correlation_id, from_state, to_state, reason, commit_sequence,
             detail, writer, fence)
         VALUES ($1, 0, $2, $3, $4, $5, 'clinic-1', '', 'received', $6, $7, $8, $9, 'test', 1)",
    )
    .bind(&config.kafka.intents_topic)
    .bind(batch)
    .bind(offset)
    .bind(intent_id)
    .bind(contact_id)
    .bind(to_state)
    .bind(reason)
    .bind(seq)
    .bind(detail)
    .execute(pool)
    .await
    .expect("insert a transition");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn violations_are_found_and_counted() {
    // No processor: the outputs and the audit are written by hand, describing each violation.
    let env = TestEnv::new("verify_bad", 1).await;
    let cfg = env.config();
    let pool = causal_commit::store::postgres::pool(&cfg.postgres).expect("pool");
    causal_commit::store::postgres::migrate(&pool, &cfg.postgres.schema)
        .await
        .expect("migrate");

    // Inputs, partition 0: i-1 .. i-13 at offsets 0 .. 12, then two garbage records.
    let inputs = [
        intent("i-1", "c-1", 1),
        intent("i-2", "c-1", 2),
        intent("i-3", "c-1", 3),
        intent("i-4", "c-2", 1),
        intent("i-5", "c-3", 1),
        intent("i-6", "c-3", 4),
        intent("i-7", "c-4", 1),  // only an uncommitted audit row: lost
        intent("i-8", "c-5", 1),  // blocked (version conflict)
        intent("i-9", "c-6", 2),  // waiting
        intent("i-10", "c-7", 2), // manual review (wait timeout), slot unresolved
        intent("i-11", "c-3", 3), // blocked (sequence conflict): resolves no slot
        intent("i-12", "c-9", 2), // waiting in the committed (previous) state
        intent("i-13", "c-9", 3), // waiting only in an uncommitted state: lost
    ];
    produce_intents(&cfg, &inputs).await;
    let garbage = vec![0xff, 0xff, 0xff, 0x01];
    produce_raw(
        &cfg,
        &[
            (Some(b"g-1".to_vec()), garbage.clone()), // offset 13: no review, lost
            (Some(b"g-2".to_vec()), garbage.clone()), // offset 14: reviewed
        ],
    )
    .await;

    produce_to(
        &cfg,
        &cfg.kafka.side_effects_topic,
        &[
            effect("i-1", "c-1", 1),
            effect("i-3", "c-1", 3),
            effect("i-2", "c-1", 2), // reorder: 2 after 3
            effect("i-4", "c-2", 1),
            effect("i-4", "c-2", 1), // duplicate id + duplicate pair + reorder (1 after 1)
            effect("i-5", "c-3", 1),
            effect("i-6", "c-3", 4),   // 2 is skipped (committed), 3 is a gap
            effect("ghost", "c-8", 1), // never consumed
            effect("i-5", "c-3", 0),   // malformed (no sequence), attributed to i-5
            ("k", garbage.clone()),    // malformed
        ],
    )
    .await;
    produce_to(
        &cfg,
        &cfg.kafka.manual_review_topic,
        &[
            review(&cfg, ReviewReason::WaitTimeout, "c-7", "i-10", 9),
            review(&cfg, ReviewReason::InvalidIntent, "g-2", "", 14),
            ("k", garbage.clone()), // malformed
        ],
    )
    .await;

    // The audit: batch 1 is committed in Kafka (the recovery point), batch 2 is not.
    commit_recovery_point(&cfg, 15, 1);
    let skip = |a: u64, b: u64| serde_json::json!({ "from": a, "to": b }).to_string();
    transition(
        &pool,
        &cfg,
        1,
        -1,
        "",
        "c-3",
        "skipped",
        "WAIT_TIMEOUT",
        2,
        &skip(2, 2),
    )
    .await;
    transition(
        &pool,
        &cfg,
        2,
        -1,
        "",
        "c-3",
        "skipped",
        "WAIT_TIMEOUT",
        3,
        &skip(3, 3),
    )
    .await;
    transition(
        &pool,
        &cfg,
        2,
        6,
        "i-7",
        "c-4",
        "manual_review",
        "WAIT_TIMEOUT",
        1,
        "",
    )
    .await;
    transition(
        &pool,
        &cfg,
        1,
        7,
        "i-8",
        "c-5",
        "blocked_conflict",
        "VERSION_CONFLICT",
        1,
        "",
    )
    .await;
    transition(
        &pool,
        &cfg,
        1,
        9,
        "i-10",
        "c-7",
        "manual_review",
        "WAIT_TIMEOUT",
        2,
        "",
    )
    .await;
    transition(
        &pool,
        &cfg,
        1,
        10,
        "i-11",
        "c-3",
        "blocked_conflict",
        "SEQUENCE_CONFLICT",
        3,
        "",
    )
    .await;
    let contact =
        |id: &str, batch: i64, st: serde_json::Value, prev: Option<(i64, serde_json::Value)>| {
            let waiting = st["waiting"].as_array().map_or(0, Vec::len) as i32;
            sqlx::query(
            "INSERT INTO cc_contact (contact_id, topic, partition, batch_no, state, prev_batch_no,
                                     prev_state, waiting)
             VALUES ($1, $2, 0, $3, $4, $5, $6, $7)",
        )
        .bind(id.to_string())
        .bind(cfg.kafka.intents_topic.clone())
        .bind(batch)
        .bind(st)
        .bind(prev.as_ref().map(|p| p.0))
        .bind(prev.map(|p| p.1))
        .bind(waiting)
        .execute(&pool)
        };
    contact("c-6", 1, state("c-6", &[("i-9", 2, 8)]), None)
        .await
        .expect("insert c-6");
    contact(
        "c-9",
        2,
        state("c-9", &[("i-12", 2, 11), ("i-13", 3, 12)]),
        Some((1, state("c-9", &[("i-12", 2, 11)]))),
    )
    .await
    .expect("insert c-9");

    let report = run_verify(&cfg, "").await;
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
    let expected = Report {
        intents: 13,
        records: 15,
        invalid_records: 2,
        committed: 8,
        duplicates_emitted: 2,
        gaps: 1,
        reorders: 2,
        lost: 3,
        manual_review: reasons(&[("INVALID_INTENT", 1), ("WAIT_TIMEOUT", 1)]),
        blocked: 2,
        waiting: 2,
        unresolved_manual_review_slots: 1,
        effects_without_intent: 1,
        malformed_outputs: 3,
        ok: false,
        violations: report.violations.clone(),
    };
    assert_eq!(report, expected);
    let has = |needle: &str| report.violations.iter().any(|v| v.contains(needle));
    for needle in [
        "contact c-1: sequence 2 after 3 (reorder)",
        "contact c-2: sequence 1 after 1 (reorder)",
        "intent i-4: 2 effects (duplicate)",
        "contact c-2: sequence 1 emitted 2 times (duplicate)",
        "contact c-3: sequence 3 has no effect, version-conflict block, skip or manual review below the highest effect 4 (gap)",
        "intent i-7 (intents 0/6): no outcome (lost)",
        "intent i-13 (intents 0/12): no outcome (lost)",
        "invalid record intents 0/13",
        "intent ghost:",
        "(malformed)",
        "effect of intent i-5 without commit_sequence (malformed)",
    ] {
        assert!(
            has(needle),
            "no violation like {needle:?} in {:#?}",
            report.violations
        );
    }
    assert!(report.violations.len() <= causal_commit::verify::MAX_EXAMPLES);

    // A prefix narrows the intents, effects, reviews and audit rows it looks at; outputs that
    // do not decode belong to no prefix and always count.
    let narrow = run_verify(&cfg, "i-1").await;
    assert_eq!(
        narrow,
        Report {
            intents: 5, // i-1, i-10, i-11, i-12, i-13
            records: 5,
            invalid_records: 0,
            committed: 1,
            duplicates_emitted: 0,
            gaps: 0,
            reorders: 0,
            lost: 1, // i-13
            manual_review: reasons(&[("WAIT_TIMEOUT", 1)]),
            blocked: 1,
            waiting: 1,
            unresolved_manual_review_slots: 1,
            effects_without_intent: 0,
            malformed_outputs: 2,
            ok: false,
            violations: narrow.violations.clone(),
        }
    );

    // The CLI prints the report and exits 1.
    let c = (*cfg).clone();
    let (code, printed) = tokio::task::spawn_blocking(move || cli_verify(&c, ""))
        .await
        .expect("cli");
    assert_eq!(code, Some(1));
    assert_eq!(printed, report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unprocessed_intent_is_lost_and_says_why() {
    let env = TestEnv::new("verify_lost", 1).await;
    let cfg = env.config();
    let pool = causal_commit::store::postgres::pool(&cfg.postgres).expect("pool");
    causal_commit::store::postgres::migrate(&pool, &cfg.postgres.schema)
        .await
        .expect("migrate");
    produce_intents(&cfg, &[intent("u-1", "c-1", 0)]).await;

    let report = run_verify(&cfg, "").await;
    assert!(!report.ok);
    assert_eq!((report.intents, report.records, report.lost), (1, 1, 1));
    assert_eq!(report.committed, 0);
    assert_eq!(
        report.violations,
        vec!["intent u-1 (intents 0/0): no outcome (lost); the processor group has committed nothing on this partition".to_string()]
    );
}
