//! The seed story's evidence against the real Kafka and PostgreSQL: causal order whatever the
//! arrival order and priority, version conflicts blocked and audited, one log line per
//! transition, and the wait timeout's hold, kept through a crash and a handover to another
//! instance, released by an operator.

use std::time::Duration;

use crate::common::process::{cli, read_log, Processor};
use crate::common::*;
use rdkafka::producer::FutureRecord;

use causal_commit::proto::{Intent, ReviewReason};
use prost::Message as _;

const PERMUTATIONS: [[usize; 3]; 6] = [
    [0, 1, 2],
    [0, 2, 1],
    [1, 0, 2],
    [1, 2, 0],
    [2, 0, 1],
    [2, 1, 0],
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_evidence_1_three_concurrent_intents_keep_causal_order() {
    let env = TestEnv::new("seed1", 3).await;
    let cfg = env.config();
    let running = start(cfg.clone());
    // Three independent producers, as in the story: each sends one of the three intents.
    let producers = [producer(&cfg), producer(&cfg), producer(&cfg)];
    let mut contacts = Vec::new();
    for (n, perm) in PERMUTATIONS.iter().enumerate() {
        for reversed in [false, true] {
            let contact = format!("c{n}-{}", if reversed { "rev" } else { "same" });
            let intents: Vec<Intent> = (1..=3u64)
                .map(|seq| {
                    let mut i = intent(&format!("{contact}-i{seq}"), &contact, seq);
                    // Reversed: the last intent is the most urgent.
                    i.dispatch_priority = if reversed { seq as i32 * 10 } else { 5 };
                    i
                })
                .collect();
            for (slot, &which) in perm.iter().enumerate() {
                let i = &intents[which];
                let value = i.encode_to_vec();
                producers[slot]
                    .send(
                        FutureRecord::to(&cfg.kafka.intents_topic)
                            .key(i.contact_id.as_bytes())
                            .payload(&value),
                        Duration::from_secs(10),
                    )
                    .await
                    .expect("delivered");
            }
            contacts.push(contact);
        }
    }
    let got = wait_for(
        &cfg,
        &cfg.kafka.side_effects_topic,
        36,
        Duration::from_secs(90),
    )
    .await;
    running.stop().await;

    let effects = effects(&got);
    assert_eq!(effects.len(), 36, "one effect per intent");
    let per_contact = by_contact(&effects);
    for contact in &contacts {
        let seqs: Vec<(u64, &str)> = per_contact[contact]
            .iter()
            .map(|e| (e.commit_sequence, e.intent_id.as_str()))
            .collect();
        let expected: Vec<(u64, String)> =
            (1..=3).map(|s| (s, format!("{contact}-i{s}"))).collect();
        let expected: Vec<(u64, &str)> = expected.iter().map(|(s, i)| (*s, i.as_str())).collect();
        assert_eq!(seqs, expected, "contact {contact} out of causal order");
        let versions: Vec<u64> = per_contact[contact]
            .iter()
            .map(|e| e.contact_version)
            .collect();
        assert_eq!(versions, vec![1, 2, 3], "contact {contact} versions");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_evidence_2_version_conflict_is_blocked() {
    let env = TestEnv::new("seed2", 1).await;
    let cfg = env.config();
    let running = start(cfg.clone());
    let first = intent("v-1", "patient", 1);
    let mut stale = intent("v-2", "patient", 2);
    // The producer believes the contact is at version 5; it is at 1 after the first commit.
    stale.expected_version = 5;
    let mut fresh = intent("v-3", "patient", 3);
    fresh.expected_version = 1;
    produce_intents(&cfg, &[first, stale, fresh]).await;

    let (effects, reviews) = wait_for_outputs(&cfg, 2, 1, Duration::from_secs(60)).await;
    running.stop().await;

    let ids: Vec<(&str, u64)> = effects
        .iter()
        .map(|e| (e.intent_id.as_str(), e.commit_sequence))
        .collect();
    assert_eq!(
        ids,
        vec![("v-1", 1), ("v-3", 3)],
        "no effect for the blocked intent"
    );
    assert_eq!(reviews.len(), 1);
    assert_eq!(reviews[0].reason, ReviewReason::VersionConflict as i32);
    assert_eq!(reviews[0].intent_id, "v-2");
    assert!(
        reviews[0].detail.contains("expected contact version 5"),
        "{}",
        reviews[0].detail
    );

    let pool = causal_commit::store::postgres::pool(&env.config.postgres).unwrap();
    let audit: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT to_state, reason, commit_sequence FROM cc_transition WHERE intent_id = 'v-2'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        audit,
        vec![(
            "blocked_conflict".to_string(),
            "VERSION_CONFLICT".to_string(),
            2
        )],
        "one audit row for the blocked intent"
    );
    // The referee reads the same: v-3 committed on the version it expected (R6), v-2's
    // conflict is justified, nothing else is wrong.
    let report = verify_report(&cfg, "").await;
    assert!(report.ok, "{}: {:?}", report.summary(), report.violations);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_evidence_4_log_has_contact_sequence_state() {
    let env = TestEnv::new("seed4", 1).await;
    let log = std::env::temp_dir().join(format!("{}.log", env.name));
    let proc = Processor::spawn(&env.config, log);
    // Out of order: 2 waits for 1; a duplicate; a conflicting id reuse.
    let one = intent("log-1", "log-contact", 1);
    let two = intent("log-2", "log-contact", 2);
    let mut conflict = intent("log-1", "log-contact", 1);
    conflict.payload = b"other content".to_vec().into();
    produce_intents(
        &env.config,
        &[two.clone(), one.clone(), one.clone(), conflict],
    )
    .await;
    let cfg = env.config();
    let (effects, reviewed) = wait_for_outputs(&cfg, 2, 1, Duration::from_secs(90)).await;
    // The effect carries the original content, the review the conflicting one.
    assert_eq!(effects.len(), 2);
    assert_eq!(&effects[0].payload[..], b"payload-log-1");
    assert_eq!(&reviewed[0].intent_id, "log-1");
    assert_eq!(reviewed[0].reason, ReviewReason::IdempotencyConflict as i32);
    let lines = proc.log_lines();
    assert!(
        proc.terminate(Duration::from_secs(30)),
        "clean exit on SIGTERM"
    );

    let transitions: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["message"] == "transition")
        .collect();
    let states: Vec<(String, String, u64)> = transitions
        .iter()
        .map(|l| {
            (
                l["intent_id"].as_str().unwrap_or_default().to_string(),
                l["state"].as_str().unwrap_or_default().to_string(),
                l["commit_sequence"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect();
    for expected in [
        ("log-2", "waiting_previous_commit", 2),
        ("log-1", "committed_causal", 1),
        ("log-2", "committed_causal", 2),
        ("log-1", "duplicate", 0),
        ("log-1", "blocked_conflict", 0),
    ] {
        let e = (expected.0.to_string(), expected.1.to_string(), expected.2);
        assert!(
            states.contains(&e),
            "missing transition {e:?} in {states:?}"
        );
    }
    for l in &transitions {
        for field in [
            "contact_id",
            "commit_sequence",
            "state",
            "correlation_id",
            "clinic_id",
        ] {
            assert!(l.get(field).is_some(), "log line without {field}: {l}");
        }
        assert_eq!(l["contact_id"], "log-contact");
        assert_eq!(
            l["correlation_id"],
            "corr-log-1".replace("log-1", l["intent_id"].as_str().unwrap_or_default(),)
        );
    }
}

/// Produces `i`, then reads the manual-review topic until it holds `n` records.
async fn reviewed(
    cfg: &causal_commit::config::Config,
    i: Intent,
    n: usize,
    within: Duration,
) -> Vec<causal_commit::proto::ManualReview> {
    produce_intents(cfg, &[i]).await;
    let got = wait_for(cfg, &cfg.kafka.manual_review_topic, n, within).await;
    crate::common::reviews(&got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_timeout_holds_the_contact_until_an_operator_releases_it() {
    let mut env = TestEnv::new("hold", 1).await;
    env.config.sequencer.wait_timeout = Duration::from_secs(2);
    // The operator path goes through the admin API.
    crate::admin::with_admin(&mut env.config);
    let cfg = env.config();
    let log = std::env::temp_dir().join(format!("{}-run.log", env.name));
    let proc = Processor::spawn(&cfg, log.clone());
    // Sequence 1 does not come in time: 2 waits, times out, the contact is held.
    let r = reviewed(&cfg, intent("h-2", "held", 2), 1, Duration::from_secs(60)).await;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].reason, ReviewReason::WaitTimeout as i32);
    assert_eq!(
        (r[0].intent_id.as_str(), r[0].expected_sequence),
        ("h-2", 1)
    );
    assert!(r[0].waited_ms >= 2000, "waited {} ms", r[0].waited_ms);

    // While held, a later intent goes to manual review too.
    let r = reviewed(&cfg, intent("h-3", "held", 3), 2, Duration::from_secs(30)).await;
    assert_eq!(r[1].reason, ReviewReason::ContactOnHold as i32);
    assert_eq!(r[1].intent_id, "h-3");

    // Neither a crash nor the missing predecessor lifts the hold (R7, R9): killed with -9 and
    // started again, the processor sends the late sequence 1 to review too, with no effect.
    proc.kill9();
    let proc = Processor::spawn(&cfg, log);
    let r = reviewed(&cfg, intent("h-1", "held", 1), 3, Duration::from_secs(60)).await;
    assert_eq!(
        (r[2].intent_id.as_str(), r[2].reason),
        ("h-1", ReviewReason::ContactOnHold as i32)
    );

    // The operator path: skip the missing sequences so 4 commits next.
    let (ok, stdout, stderr) = tokio::task::spawn_blocking({
        let c = env.config.clone();
        move || {
            cli(
                &c,
                &[
                    "release",
                    "--contact",
                    "held",
                    "--skip-to",
                    "4",
                    "--actor",
                    "test",
                ],
            )
        }
    })
    .await
    .unwrap();
    assert!(ok, "release failed: {stdout} {stderr}");
    produce_intents(&cfg, &[intent("h-4", "held", 4)]).await;
    let got = wait_for(
        &cfg,
        &cfg.kafka.side_effects_topic,
        1,
        Duration::from_secs(30),
    )
    .await;
    assert!(proc.terminate(Duration::from_secs(30)), "clean stop");
    let effects = effects(&got);
    assert_eq!(effects.len(), 1);
    assert_eq!(
        (effects[0].intent_id.as_str(), effects[0].commit_sequence),
        ("h-4", 4)
    );

    let pool = causal_commit::store::postgres::pool(&env.config.postgres).unwrap();
    let audit: Vec<(String, String)> = sqlx::query_as(
        "SELECT to_state, reason FROM cc_transition WHERE contact_id = 'held' ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let audit: Vec<(&str, &str)> = audit
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    for expected in [
        ("waiting_previous_commit", ""),
        ("held", "WAIT_TIMEOUT"),
        ("manual_review", "WAIT_TIMEOUT"),
        ("manual_review", "CONTACT_ON_HOLD"),
        ("skipped", "OPERATOR"),
        ("released", "OPERATOR"),
        ("committed_causal", ""),
    ] {
        assert!(
            audit.contains(&expected),
            "missing {expected:?} in {audit:?}"
        );
    }
    let admin: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM cc_admin_audit WHERE contact_id = 'held' AND actor = 'test'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(admin, 1, "the operator action is audited");
    // The referee: every review justified, nothing committed while held, sequences 1 to 3
    // resolved by the operator's skip.
    let report = verify_report(&cfg, "").await;
    assert!(report.ok, "{}: {:?}", report.summary(), report.violations);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_contact_stays_held_when_another_instance_takes_its_partition() {
    let mut env = TestEnv::new("hold_moves", 2).await;
    env.config.sequencer.wait_timeout = Duration::from_secs(2);
    let cfg = env.config();
    let log = |who: &str| std::env::temp_dir().join(format!("{}-{who}.log", env.name));
    let a = Processor::spawn(&cfg, log("a"));
    let r = reviewed(&cfg, intent("m-2", "moved", 2), 1, Duration::from_secs(60)).await;
    assert_eq!(
        (r[0].intent_id.as_str(), r[0].reason),
        ("m-2", ReviewReason::WaitTimeout as i32)
    );

    // A second instance joins, then the first leaves: the group hands every partition, the
    // held contact's too, to the second, which restores it from PostgreSQL.
    let mut cfg_b = (*cfg).clone();
    cfg_b.instance_id = format!("{}-b", env.name);
    let b = Processor::spawn(&cfg_b, log("b"));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(a.terminate(Duration::from_secs(30)), "a leaves cleanly");

    // The late predecessor reaches the second instance: still held, so it goes to review.
    let r = reviewed(&cfg, intent("m-1", "moved", 1), 2, Duration::from_secs(60)).await;
    assert_eq!(
        (r[1].intent_id.as_str(), r[1].reason),
        ("m-1", ReviewReason::ContactOnHold as i32)
    );
    let b_log = b.log.clone();
    assert!(b.terminate(Duration::from_secs(30)), "b stops cleanly");
    let decided_by_b = read_log(&b_log)
        .iter()
        .any(|l| l["message"] == "transition" && l["intent_id"] == "m-1");
    assert!(decided_by_b, "the second instance decided m-1");
    let effects = wait_for(&cfg, &cfg.kafka.side_effects_topic, 0, Duration::ZERO).await;
    assert!(effects.is_empty(), "no effect while held");
    // The referee: no violation; the contact is held, its slots 1 and 2 unresolved (pending).
    let report = verify_report(&cfg, "").await;
    assert_eq!(report.violation_counts(), vec![], "{:?}", report.violations);
    assert_eq!(report.pending(), (0, 2, 1), "{}", report.summary());
}
