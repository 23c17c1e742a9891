//! The contract verifier against the real broker and PostgreSQL, for what only they can show:
//! a clean processor run passes with exact counts (and per prefix), the reading keeps only
//! committed batches of the audit, the audit's times order holds, releases and commits, and an
//! intent not consumed yet is reported with why. Each violation kind is proved on hand-built
//! worlds by the unit tests of `src/verify/`.

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
use causal_commit::proto::{Intent, ManualReview, ReviewReason, SideEffect};
use causal_commit::sequencer::{
    ContactSnapshot, Intent as SeqIntent, IntentMeta, Millis, WaitingSnapshot,
};
use causal_commit::store::recovery::RecoveryPoint;
use causal_commit::store::snapshot::Held;
use causal_commit::verify::Report;

fn reasons(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// Every needle is part of one of the report's violation examples.
#[track_caller]
fn has_violations(report: &Report, needles: &[&str]) {
    for needle in needles {
        assert!(
            report.violations.iter().any(|v| v.contains(needle)),
            "no violation like {needle:?} in {:#?}",
            report.violations
        );
    }
}

/// The CLI on `config`'s world: (exit code, report parsed from stdout, stderr).
async fn cli_verify(config: &Config, prefix: &str) -> (Option<i32>, Report, String) {
    let c = config.clone();
    let p = prefix.to_string();
    let out = tokio::task::spawn_blocking(move || {
        process::command(&c)
            .args(["verify", "--prefix", &p])
            .env("RUST_LOG", "off")
            .output()
            .expect("run causal-commit verify")
    })
    .await
    .expect("cli");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("verify prints a JSON report ({e}): {stdout}\nstderr: {stderr}")
    });
    (out.status.code(), report, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_run_verifies_ok_with_exact_counts_and_per_prefix() {
    let env = TestEnv::new("verify_ok", 2).await;
    let cfg = env.config();
    let running = start(cfg.clone());

    // p1: a strict contact produced out of order (2, 1, retry of 1, 3), a stale version guard
    // in slot 4 (blocked, resolves it) and 5 after it. p2: an assigned contact, its first id
    // reused with other content (an idempotency conflict), and one garbage record.
    let a = |id: &str, seq| intent(id, "p1-c1", seq);
    let mut stale = a("p1-a4", 4);
    stale.expected_version = 1;
    let mut reused = intent("p2-b1", "p2-c2", 0);
    reused.payload = b"other content".to_vec().into();
    produce_intents(
        &cfg,
        &[
            a("p1-a2", 2),
            a("p1-a1", 1),
            a("p1-a1", 1),
            a("p1-a3", 3),
            stale,
            a("p1-a5", 5),
            intent("p2-b1", "p2-c2", 0),
            reused,
            intent("p2-b2", "p2-c2", 0),
        ],
    )
    .await;
    produce_raw(
        &cfg,
        &[(Some(b"p2-garbage".to_vec()), vec![0xff, 0xff, 0xff, 0x01])],
    )
    .await;

    let effects = wait_for(
        &cfg,
        &cfg.kafka.side_effects_topic,
        6,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(effects.len(), 6, "six effects");
    let reviews = wait_for(
        &cfg,
        &cfg.kafka.manual_review_topic,
        3,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(reviews.len(), 3, "three manual-review records");
    caught_up(&cfg, Duration::from_secs(60)).await;
    running.stop().await;

    let all = verify_report(&cfg, "").await;
    assert_eq!(
        all,
        Report {
            intents: 7,
            records: 10,
            invalid_records: 1,
            committed: 6,
            manual_review: reasons(&[
                ("IDEMPOTENCY_CONFLICT", 1),
                ("INVALID_INTENT", 1),
                ("VERSION_CONFLICT", 1)
            ]),
            blocked: 2,
            ok: true,
            ..Report::default()
        }
    );

    // A prefix checks one run's intents (and invalid records keyed with it) only.
    let p1 = verify_report(&cfg, "p1-").await;
    assert!(p1.ok, "{p1:#?}");
    assert_eq!(
        (p1.intents, p1.records, p1.invalid_records, p1.committed),
        (5, 6, 0, 4)
    );
    assert_eq!(p1.manual_review, reasons(&[("VERSION_CONFLICT", 1)]));
    let p2 = verify_report(&cfg, "p2-").await;
    assert!(p2.ok, "{p2:#?}");
    assert_eq!(
        (p2.intents, p2.records, p2.invalid_records, p2.committed),
        (2, 4, 1, 2)
    );
    assert_eq!(
        p2.manual_review,
        reasons(&[("IDEMPOTENCY_CONFLICT", 1), ("INVALID_INTENT", 1)])
    );
    let none = verify_report(&cfg, "nobody-").await;
    assert_eq!(
        none,
        Report {
            ok: true,
            ..Report::default()
        }
    );

    // The CLI prints the same report and exits 0.
    let (code, printed, stderr) = cli_verify(&cfg, "").await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(printed, all);
}

/// Produces raw values to `topic` with a plain (non-transactional) producer.
async fn produce_to(config: &Config, topic: &str, values: &[Vec<u8>]) {
    let p = producer(config);
    for value in values {
        let r = FutureRecord::to(topic).key("k").payload(value);
        p.send(r, Duration::from_secs(10)).await.expect("delivered");
    }
}

/// The effect of `i` as the processor writes it.
fn effect(i: &Intent, seq: u64, version: u64) -> Vec<u8> {
    SideEffect {
        intent_id: i.intent_id.clone(),
        contact_id: i.contact_id.clone(),
        clinic_id: i.clinic_id.clone(),
        correlation_id: i.correlation_id.clone(),
        dispatch_priority: i.dispatch_priority,
        action: i.action,
        payload: i.payload.clone(),
        created_at_ms: i.created_at_ms,
        commit_sequence: seq,
        contact_version: version,
        committed_at_ms: i.created_at_ms,
        fencing_token: 1,
        sequence_from_producer: i.causal_sequence > 0,
    }
    .encode_to_vec()
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
                    size: 0,
                },
                payload: Held {
                    record: InRecord {
                        partition: 0,
                        offset: *offset,
                        key: Some(contact.as_bytes().to_vec()),
                        value: None,
                        traceparent: None,
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

/// A test world with its schema migrated, for outputs and audit rows written by hand.
async fn migrated(name: &str) -> (TestEnv, sqlx::PgPool) {
    let env = TestEnv::new(name, 1).await;
    let pool = causal_commit::store::postgres::pool(&env.config.postgres).expect("pool");
    causal_commit::store::postgres::migrate(&pool, &env.config.postgres.schema)
        .await
        .expect("migrate");
    (env, pool)
}

/// One `cc_transition` row on intents partition 0.
struct Row<'a> {
    batch: i64,
    offset: i64,
    intent_id: &'a str,
    contact_id: &'a str,
    to_state: &'a str,
    reason: &'a str,
    seq: i64,
    detail: &'a str,
    /// Its `at` (milliseconds): one time per batch, as the rows of one transaction have.
    at_ms: i64,
}

async fn insert(pool: &sqlx::PgPool, config: &Config, r: Row<'_>) {
    sqlx::query(
        "INSERT INTO cc_transition (topic, partition, batch_no, source_offset, intent_id,
             contact_id, clinic_id, correlation_id, from_state, to_state, reason, commit_sequence,
             detail, writer, fence, at)
         VALUES ($1, 0, $2, $3, $4, $5, 'clinic-1', '', 'received', $6, $7, $8, $9, 'test', 1,
                 to_timestamp($10::float8 / 1000))",
    )
    .bind(&config.kafka.intents_topic)
    .bind(r.batch)
    .bind(r.offset)
    .bind(r.intent_id)
    .bind(r.contact_id)
    .bind(r.to_state)
    .bind(r.reason)
    .bind(r.seq)
    .bind(r.detail)
    .bind(r.at_ms)
    .execute(pool)
    .await
    .expect("insert a transition");
}

/// An operator's release of `contact` on intents partition 0 (resume, or skip to `skip_to`),
/// applied in `batch`, as the admin path records it: the command and its admin audit row.
async fn operator_request(
    pool: &sqlx::PgPool,
    config: &Config,
    contact: &str,
    skip_to: i64,
    batch: i64,
) {
    let action = if skip_to > 0 { "skip_to" } else { "resume" };
    let command: i64 = sqlx::query_scalar(
        "INSERT INTO cc_command (topic, partition, contact_id, action, skip_to, actor,
                                 applied_batch, result)
         VALUES ($1, 0, $2, $3, $4, 'op', $5, 'applied') RETURNING id",
    )
    .bind(&config.kafka.intents_topic)
    .bind(contact)
    .bind(action)
    .bind(skip_to)
    .bind(batch)
    .fetch_one(pool)
    .await
    .expect("insert a command");
    causal_commit::store::postgres::audit_admin(
        pool,
        "op",
        action,
        contact,
        serde_json::json!({ "command": command, "result": "queued" }),
    )
    .await
    .expect("audit a command");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reading_keeps_committed_batches_of_the_audit_only() {
    // No processor: the outputs and the audit are written by hand. Batch 1 is committed in
    // Kafka (the recovery point), batch 2 is not.
    let (env, pool) = migrated("verify_read").await;
    let cfg = env.config();

    // Intents partition 0, offsets 0 ..= 7, then a garbage record at 8.
    let inputs = [
        intent("i-1", "c-1", 1),
        intent("i-2", "c-1", 2),
        intent("i-3", "c-2", 1),
        intent("i-4", "c-2", 3), // 2 is skipped only in batch 2: a gap
        intent("i-5", "c-3", 1),
        intent("i-6", "c-3", 4), // 2..=3 skipped by an operator in batch 1
        intent("i-7", "c-6", 2), // waiting in the committed (previous) state
        intent("i-8", "c-6", 3), // waiting only in the uncommitted state: lost
    ];
    produce_intents(&cfg, &inputs).await;
    produce_raw(
        &cfg,
        &[(Some(b"g-1".to_vec()), vec![0xff, 0xff, 0xff, 0x01])],
    )
    .await;
    let committed = [
        (0, 1, 1),
        (1, 2, 2),
        (2, 1, 1),
        (3, 3, 2),
        (4, 1, 1),
        (5, 4, 2),
    ];
    let values: Vec<Vec<u8>> = committed
        .iter()
        .map(|(i, seq, version)| effect(&inputs[*i], *seq, *version))
        .collect();
    produce_to(&cfg, &cfg.kafka.side_effects_topic, &values).await;
    let invalid = ManualReview {
        original_value: vec![0xff, 0xff, 0xff, 0x01].into(),
        original_key: b"g-1".to_vec().into(),
        reason: ReviewReason::InvalidIntent as i32,
        source_topic: cfg.kafka.intents_topic.clone(),
        source_partition: 0,
        source_offset: 8,
        ..ManualReview::default()
    };
    produce_to(
        &cfg,
        &cfg.kafka.manual_review_topic,
        &[invalid.encode_to_vec()],
    )
    .await;

    commit_recovery_point(&cfg, 9, 1);
    let now = chrono::Utc::now().timestamp_millis();
    let row = |batch: i64, offset, intent_id, contact_id, to_state, seq| Row {
        batch,
        offset,
        intent_id,
        contact_id,
        to_state,
        reason: "",
        seq,
        detail: "",
        at_ms: now + batch * 1_000,
    };
    for (i, seq, _) in committed {
        let intent = &inputs[i];
        let r = row(
            1,
            i as i64,
            &intent.intent_id,
            &intent.contact_id,
            "committed_causal",
            seq as i64,
        );
        insert(&pool, &cfg, r).await;
    }
    let invalid_row = Row {
        reason: "INVALID_INTENT",
        ..row(1, 8, "", "", "manual_review", 0)
    };
    insert(&pool, &cfg, invalid_row).await;
    let skip = |from: u64, to: u64| serde_json::json!({ "from": from, "to": to }).to_string();
    let (skip_c3, skip_c2) = (skip(2, 3), skip(2, 2));
    for (batch, contact, detail, to, skip_to) in [
        (1, "c-3", skip_c3.as_str(), "SkipTo(4)", 4),
        (2, "c-2", skip_c2.as_str(), "SkipTo(3)", 3),
    ] {
        operator_request(&pool, &cfg, contact, skip_to, batch).await;
        let skipped = Row {
            reason: "OPERATOR",
            detail,
            ..row(batch, -1, "", contact, "skipped", 2)
        };
        insert(&pool, &cfg, skipped).await;
        let released = Row {
            reason: "OPERATOR",
            detail: to,
            ..row(batch, -1, "", contact, "released", 0)
        };
        insert(&pool, &cfg, released).await;
    }
    // Audited as committed without an effect: a mismatch in batch 1, in flight in batch 2.
    insert(&pool, &cfg, row(1, 7, "i-8", "c-6", "committed_causal", 3)).await;
    insert(&pool, &cfg, row(2, 6, "i-7", "c-6", "committed_causal", 2)).await;
    sqlx::query(
        "INSERT INTO cc_contact (contact_id, topic, partition, batch_no, state, prev_batch_no,
                                 prev_state, waiting)
         VALUES ('c-6', $1, 0, 2, $2, 1, $3, 2)",
    )
    .bind(&cfg.kafka.intents_topic)
    .bind(state("c-6", &[("i-7", 2, 6), ("i-8", 3, 7)]))
    .bind(state("c-6", &[("i-7", 2, 6)]))
    .execute(&pool)
    .await
    .expect("insert c-6");

    let report = verify_report(&cfg, "").await;
    assert_eq!(
        report,
        Report {
            intents: 8,
            records: 9,
            invalid_records: 1,
            committed: 6,
            manual_review: reasons(&[("INVALID_INTENT", 1)]),
            waiting: 1,
            gaps: 1,
            lost: 1,
            audit_mismatches: 1,
            ok: false,
            violations: report.violations.clone(),
            ..Report::default()
        }
    );
    has_violations(
        &report,
        &[
            "contact c-2: sequence 2 is unresolved",
            "intent i-8 (intents 0/7): no outcome (lost)",
            "intent i-8: audited as committed with sequence 3, but no such effect exists",
        ],
    );

    // The CLI prints the report and exits 1 with a one-line summary.
    let (code, printed, stderr) = cli_verify(&cfg, "").await;
    assert_eq!(code, Some(1));
    assert_eq!(printed, report);
    assert_eq!(
        stderr.trim_end(),
        "causal-commit: the contract is violated: 1 gaps, 1 lost, 1 audit_mismatches, 1 waiting (see the report)"
    );
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

    let report = verify_report(&cfg, "").await;
    assert!(!report.ok);
    assert_eq!((report.intents, report.records, report.lost), (1, 1, 1));
    assert_eq!(report.committed, 0);
    assert_eq!(
        report.violations,
        vec!["intent u-1 (intents 0/0): no outcome; the processor group has committed nothing on this partition (lost)".to_string()]
    );
}

/// A tired operator's typo in a topic name. Read as empty, a topic that does not exist made
/// `verify` pass (nothing to check, nothing violated) and `wait-caught-up` report caught up at
/// once. Both now fail at once, naming the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_that_does_not_exist_fails_verify_and_wait_caught_up_naming_it() {
    let env = TestEnv::new("typo", 1).await;
    let (ok, _, err) = crate::common::process::cli(&env.config, &["migrate"]);
    assert!(ok, "migrate: {err}");
    // The configuration with one of the three topic names mistyped, and that name.
    let typo = |which: usize| {
        let mut c = env.config.clone();
        let k = &mut c.kafka;
        let topic = [
            &mut k.intents_topic,
            &mut k.side_effects_topic,
            &mut k.manual_review_topic,
        ]
        .into_iter()
        .nth(which)
        .expect("one of three");
        topic.push_str("-typo");
        let name = topic.clone();
        (c, name)
    };
    for which in 0..3 {
        let (cfg, name) = typo(which);
        let (ok, out, err) = crate::common::process::cli(&cfg, &["verify"]);
        assert!(!ok, "verify of {name} passed: {out}");
        assert!(
            err.contains(&format!("{name:?} does not exist")),
            "names the topic: {err}"
        );
    }
    let (cfg, name) = typo(0);
    let started = std::time::Instant::now();
    let (ok, _, err) = crate::common::process::cli(&cfg, &["wait-caught-up"]);
    assert!(
        !ok && err.contains(&format!("{name:?} does not exist")),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "at once, not at the wait's timeout: {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_while_held_past_a_version_guard_or_before_a_predecessor_and_releases_nobody_asked_for_are_read_and_reported(
) {
    // No processor: a world a broken one would leave, written by hand. c-1 is held by a wait
    // timeout in batch 1, and its late sequence 1 commits in batch 2 with no release (R7).
    // c-2's second intent expects version 5 and commits on version 1 (R6). c-3 is held the
    // same way, released in batch 2 at an operator's request, and its sequence 1 commits in
    // that batch: no violation. c-4's sequence 2 commits in batch 1, and its sequence 1 is
    // skipped in batch 2 (R3) by a release no operator asked for (R9).
    let (env, pool) = migrated("verify_holds").await;
    let cfg = env.config();

    let mut stale = intent("i-4", "c-2", 2);
    stale.expected_version = 5;
    let inputs = [
        intent("i-1", "c-1", 2),
        intent("i-2", "c-1", 1),
        intent("i-3", "c-2", 1),
        stale,
        intent("i-5", "c-3", 2),
        intent("i-6", "c-3", 1),
        intent("i-7", "c-4", 2),
    ];
    produce_intents(&cfg, &inputs).await;
    // The processor's clock: the timeouts come after wait_timeout, the effects after them.
    let now = chrono::Utc::now().timestamp_millis();
    let (timed_out, committed_at) = (now + 600_000, now + 700_000);
    let effects: Vec<Vec<u8>> = [(1, 1, 1), (2, 1, 1), (3, 2, 2), (5, 1, 1), (6, 2, 1)]
        .iter()
        .map(|(i, seq, version)| {
            let mut e = SideEffect::decode(&effect(&inputs[*i], *seq, *version)[..]).unwrap();
            e.committed_at_ms = committed_at;
            e.encode_to_vec()
        })
        .collect();
    produce_to(&cfg, &cfg.kafka.side_effects_topic, &effects).await;
    let timeout = |i: usize| {
        let intent = &inputs[i];
        ManualReview {
            original_value: intent.encode_to_vec().into(),
            original_key: intent.contact_id.as_bytes().to_vec().into(),
            reason: ReviewReason::WaitTimeout as i32,
            detail: "waited past wait_timeout".into(),
            intent_id: intent.intent_id.clone(),
            contact_id: intent.contact_id.clone(),
            correlation_id: intent.correlation_id.clone(),
            expected_sequence: 1,
            received_sequence: 2,
            source_topic: cfg.kafka.intents_topic.clone(),
            source_partition: 0,
            source_offset: i as i64,
            reviewed_at_ms: timed_out,
            ..ManualReview::default()
        }
        .encode_to_vec()
    };
    produce_to(
        &cfg,
        &cfg.kafka.manual_review_topic,
        &[timeout(0), timeout(4)],
    )
    .await;

    // The audit, on PostgreSQL's clock: batch 1 at t1, batch 2 a second later.
    commit_recovery_point(&cfg, 7, 2);
    let t1 = now + 650_000;
    let t2 = t1 + 1_000;
    let row = |batch, at, i: usize, to_state, reason, seq| Row {
        batch,
        offset: i as i64,
        intent_id: &inputs[i].intent_id,
        contact_id: &inputs[i].contact_id,
        to_state,
        reason,
        seq,
        detail: "",
        at_ms: at,
    };
    for r in [
        row(1, t1, 0, "manual_review", "WAIT_TIMEOUT", 2),
        row(1, t1, 4, "manual_review", "WAIT_TIMEOUT", 2),
        row(1, t1, 2, "committed_causal", "", 1),
        row(1, t1, 3, "committed_causal", "", 2),
        row(2, t2, 1, "committed_causal", "", 1),
        row(2, t2, 5, "committed_causal", "", 1),
        Row {
            offset: -1,
            intent_id: "",
            detail: "Resume",
            ..row(2, t2, 5, "released", "OPERATOR", 0)
        },
        row(1, t1, 6, "committed_causal", "", 2),
        Row {
            offset: -1,
            intent_id: "",
            detail: r#"{"from":1,"to":1}"#,
            ..row(2, t2, 6, "skipped", "OPERATOR", 1)
        },
        Row {
            offset: -1,
            intent_id: "",
            detail: "SkipTo(2)",
            ..row(2, t2, 6, "released", "OPERATOR", 0)
        },
    ] {
        insert(&pool, &cfg, r).await;
    }
    // The operator's request for c-3's release, applied in batch 2.
    operator_request(&pool, &cfg, "c-3", 0, 2).await;

    let (code, report, stderr) = cli_verify(&cfg, "").await;
    assert_eq!(
        report,
        Report {
            intents: 7,
            records: 7,
            committed: 5,
            manual_review: reasons(&[("WAIT_TIMEOUT", 2)]),
            unresolved_slots: 2,
            committed_before_predecessor: 1,
            version_guard_violations: 1,
            committed_while_held: 1,
            reopened_without_operator: 1,
            ok: false,
            violations: report.violations.clone(),
            ..Report::default()
        }
    );
    has_violations(
        &report,
        &[
            "intent i-4: expected_version 5, yet committed as sequence 2 on the contact's version 1",
            "contact c-1: intent i-2 committed as sequence 1 in a batch after the contact's hold (WAIT_TIMEOUT of intents 0/0) and before any operator release",
            "contact c-4: intent i-7 committed as sequence 2 while sequence 1 was unresolved (resolved 1000 ms later, in a later batch)",
            "contact c-4: release, skip to 2 applied in batch 2 of partition 0 with no operator request for it (admin API or CLI, audited) applied there",
        ],
    );
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains(
            "1 committed_before_predecessor, 1 version_guard_violations, 1 committed_while_held, 1 reopened_without_operator"
        ),
        "{stderr}"
    );
}

/// A careless producer whose clock runs half an hour ahead: its records' timestamps say they
/// were produced after the processor timed them out. The timeout is judged from the audited
/// start of the wait (batch times), so `verify` does not call it unjustified (it did, when it
/// timed waits from the records' timestamps).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_clock_half_an_hour_ahead_does_not_make_a_timeout_unjustified() {
    use crate::common::process::Processor;
    let mut env = TestEnv::new("verify_skew", 1).await;
    env.config.sequencer.wait_timeout = Duration::from_secs(2);
    let cfg = env.config();
    let proc = Processor::spawn(
        &cfg,
        std::env::temp_dir().join(format!("{}-run.log", env.name)),
    );
    let ahead = chrono::Utc::now().timestamp_millis() + 30 * 60_000;
    let value = intent("k-2", "k", 2).encode_to_vec();
    let record = FutureRecord::to(&cfg.kafka.intents_topic)
        .key("k")
        .payload(&value)
        .timestamp(ahead);
    producer(&cfg)
        .send(record, Duration::from_secs(10))
        .await
        .expect("delivered");
    let got = wait_for(
        &cfg,
        &cfg.kafka.manual_review_topic,
        1,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(reviews(&got)[0].reason, ReviewReason::WaitTimeout as i32);
    assert!(proc.terminate(Duration::from_secs(30)), "clean stop");

    let report = verify_allowing_waiting(&cfg).await;
    assert_eq!(report.manual_review.get("WAIT_TIMEOUT"), Some(&1));
    assert!(report.ok, "{:?}", report.violations);
}
