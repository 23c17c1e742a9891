//! Hostile input against the real Kafka and PostgreSQL: values the stores cannot hold, a record
//! the durable write refuses for a reason validation does not catch, and arbitrary
//! protobuf-valid intents through decode → sequencer → translation → the real batch write.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use prost::Message as _;

use crate::common::process::{cli, read_log, wait_for_log, Processor};
use crate::common::*;
use causal_commit::intent::{self, InRecord};
use causal_commit::pipeline::translate::{self, Context, Fresh, PartitionPlan, Topics};
use causal_commit::proto::{Intent, ReviewReason};
use causal_commit::sequencer::{self, Millis, Sequencer};
use causal_commit::store::postgres::{self as pg, BatchWrite, PartitionWrite};
use causal_commit::store::snapshot::Held;

/// Per contact, the commit sequences of its effects in topic order.
fn sequences(effects: &[causal_commit::proto::SideEffect]) -> Vec<(String, Vec<u64>)> {
    let mut v: Vec<(String, Vec<u64>)> = by_contact(effects)
        .into_iter()
        .map(|(c, fx)| (c, fx.iter().map(|e| e.commit_sequence).collect()))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_byte_intent_on_every_partition_is_invalid_and_every_valid_intent_commits_in_order() {
    let env = TestEnv::new("nul", 4).await;
    let cfg = env.config();
    let running = start(cfg.clone());
    for p in 0..4 {
        let mut batch = Vec::new();
        for seq in 1..=3u64 {
            for k in 0..5 {
                let c = format!("c{p}-{k}");
                batch.push(intent(&format!("{c}-i{seq}"), &c, seq));
            }
            if seq == 2 {
                // Valid UTF-8 and valid protobuf, but PostgreSQL cannot hold it.
                let c = format!("nul\u{0}{p}");
                batch.push(intent(&format!("i\u{0}{p}"), &c, 1));
            }
        }
        produce_to_partition(&cfg, p, &batch).await;
    }
    let (fx, rv) = wait_for_outputs(&cfg, 60, 4, Duration::from_secs(60)).await;
    running.stop().await;

    assert_eq!(fx.len(), 60, "every valid intent committed once");
    for (contact, seqs) in sequences(&fx) {
        assert_eq!(seqs, vec![1, 2, 3], "contact {contact} in order");
    }
    assert_eq!(rv.len(), 4, "one review per NUL-byte intent: {rv:?}");
    let partitions: BTreeSet<i32> = rv.iter().map(|r| r.source_partition).collect();
    assert_eq!(partitions, (0..4).collect());
    for r in &rv {
        assert_eq!(r.reason, ReviewReason::InvalidIntent as i32);
        assert!(r.detail.contains("U+0000"), "{}", r.detail);
    }
    let report = verify_report(&env.config, "").await;
    assert!(report.ok, "{:?}", report.violations);
}

/// A limit set low, which validation knows nothing of: a waiting intent over 2,000 bytes is
/// refused by the durable write (SQLSTATE 23514). Migrates the schema first.
async fn refuse_big_waiting_rows(cfg: &causal_commit::config::Config) {
    let (ok, _, err) = cli(cfg, &["migrate"]);
    assert!(ok, "migrate: {err}");
    let check = "ADD CONSTRAINT test_small_state CHECK (octet_length(entry::text) < 2000)";
    alter_table(cfg, "cc_waiting", check).await;
}

/// A DBA's `ALTER TABLE` of the world's `table`: `change` applied as is.
async fn alter_table(cfg: &causal_commit::config::Config, table: &str, change: &str) {
    let pool = sqlx::PgPool::connect(&database_url()).await.unwrap();
    let sql = format!("ALTER TABLE {}.{table} {change}", cfg.postgres.schema);
    sqlx::query(&sql).execute(&pool).await.unwrap();
}

/// Five contacts' first intents, then a contact's sequence 2 before its 1, with a payload too
/// large for [`refuse_big_waiting_rows`] once it waits: its 3,000 bytes make a waiting row of
/// about 4,300 (stored as base64), so the batch that writes it is refused.
fn five_and_a_refused_wait() -> Vec<Intent> {
    let mut big2 = intent("big-i2", "big", 2);
    big2.payload = vec![b'x'; 3_000].into();
    let mut intents: Vec<Intent> = (0..5)
        .map(|k| intent(&format!("a{k}-i1"), &format!("a{k}"), 1))
        .collect();
    intents.push(big2);
    intents
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_durable_write_refuses_is_unprocessable_and_its_partition_keeps_flowing() {
    let env = TestEnv::new("poison", 2).await;
    let cfg = env.config.clone();
    refuse_big_waiting_rows(&cfg).await;
    let log = std::env::temp_dir().join(format!("{}-run.log", env.name));
    let proc = Processor::spawn(&cfg, log.clone());
    produce_to_partition(&cfg, 0, &five_and_a_refused_wait()).await;
    let first = wait_for(
        &cfg,
        &cfg.kafka.side_effects_topic,
        5,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(first.len(), 5, "the records around the refused one commit");
    // Then the rest: the partition keeps flowing, and so does the other one.
    let mut p0: Vec<Intent> = (0..5)
        .map(|k| intent(&format!("a{k}-i2"), &format!("a{k}"), 2))
        .collect();
    p0.push(intent("big-i1", "big", 1));
    p0.extend((0..5).map(|k| intent(&format!("a{k}-i3"), &format!("a{k}"), 3)));
    produce_to_partition(&cfg, 0, &p0).await;
    let p1: Vec<Intent> = (1..=3u64)
        .flat_map(|seq| (0..5).map(move |k| intent(&format!("b{k}-i{seq}"), &format!("b{k}"), seq)))
        .collect();
    produce_to_partition(&cfg, 1, &p1).await;

    let (fx, rv) = wait_for_outputs(&cfg, 31, 1, Duration::from_secs(90)).await;
    assert!(proc.terminate(Duration::from_secs(30)));

    assert_eq!(fx.len(), 31, "every other intent committed once");
    for (contact, seqs) in sequences(&fx) {
        let expected = if contact == "big" {
            vec![1]
        } else {
            vec![1, 2, 3]
        };
        assert_eq!(seqs, expected, "contact {contact} in order");
    }
    assert_eq!(rv.len(), 1, "{rv:?}");
    let r = &rv[0];
    assert_eq!(r.reason, ReviewReason::Unprocessable as i32, "{}", r.detail);
    assert_eq!((r.intent_id.as_str(), r.source_partition), ("big-i2", 0));
    assert!(
        r.detail.contains("test_small_state"),
        "the store's error: {}",
        r.detail
    );
    // Partition 1 was never voided: restored once, at its assignment.
    let restored = |p: i64| {
        read_log(&log)
            .iter()
            .filter(|l| l["message"] == "partition restored" && l["partition"] == p)
            .count()
    };
    assert_eq!(
        restored(1),
        1,
        "partition 1 was restored only at its assignment"
    );
    assert!(
        restored(0) > 1,
        "partition 0 was replayed to isolate the record"
    );
}

/// A partition isolating a record the durable write refuses takes one record a batch and reads
/// the rest again. Intents that keep arriving on it meanwhile move its end, so an isolating
/// batch can read to that end: it must still commit the offset after the one record it took,
/// never the end it read to (that would skip every record read again after the cut).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intents_arriving_while_a_refused_record_is_isolated_each_commit_once_in_order() {
    let env = TestEnv::new("poison_flow", 1).await;
    let mut cfg = env.config.clone();
    // A linger longer than librdkafka's fetch wait (`fetch.wait.max.ms`, 500 ms): the end of
    // the partition is reported (the fetch after the one that brought its last records comes
    // back empty) while the batch that read those records is still open.
    cfg.batch.max_linger = Duration::from_millis(1_500);
    refuse_big_waiting_rows(&cfg).await;
    let log = std::env::temp_dir().join(format!("{}-run.log", env.name));
    let proc = Processor::spawn(&cfg, log.clone());
    produce_to_partition(&cfg, 0, &five_and_a_refused_wait()).await;
    let isolating = |lines: &[serde_json::Value]| {
        lines
            .iter()
            .any(|l| l["message"] == "isolating a record or command the durable store refuses")
            .then_some(())
    };
    wait_for_log(
        &log,
        Duration::from_secs(60),
        "the isolation begins",
        isolating,
    )
    .await;

    // One intent of contact `f` every 100 ms or so, while the partition isolates.
    let flow_began = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    const FLOW: u64 = 40;
    for seq in 1..=FLOW {
        produce_to_partition(&cfg, 0, &[intent(&format!("f-i{seq}"), "f", seq)]).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (fx, rv) = wait_for_outputs(&cfg, 5 + FLOW as usize, 1, Duration::from_secs(90)).await;
    assert!(proc.terminate(Duration::from_secs(30)));

    // The flow reached the partition before its isolation ended (the scenario took place).
    let ended: Vec<String> = read_log(&log)
        .iter()
        .filter(|l| l["message"] == "isolation ended: the partition flows in full batches again")
        .filter_map(|l| l["timestamp"].as_str().map(str::to_owned))
        .collect();
    let last_ended = ended.last().expect("the isolation ended");
    assert!(
        *last_ended > flow_began,
        "the isolation ended at {last_ended}, before the flow began at {flow_began}"
    );
    let mut expected: Vec<(String, Vec<u64>)> =
        (0..5).map(|k| (format!("a{k}"), vec![1])).collect();
    expected.push(("f".to_owned(), (1..=FLOW).collect()));
    assert_eq!(
        sequences(&fx),
        expected,
        "every intent but the refused one committed once, in order"
    );
    assert_eq!(rv.len(), 1, "{rv:?}");
    assert_eq!(
        rv[0].reason,
        ReviewReason::Unprocessable as i32,
        "{}",
        rv[0].detail
    );
    assert_eq!(rv[0].intent_id, "big-i2");
    let report = verify_report(&cfg, "").await;
    assert!(report.ok, "{:?}", report.violations);
}

/// A DBA's constraint that refuses every `WAIT_TIMEOUT` audit row, while a contact waits and
/// another contact's intents arrive one at a time on the same partition.
async fn refuse_wait_timeouts(cfg: &causal_commit::config::Config, refuse: bool) {
    let change = if refuse {
        "ADD CONSTRAINT test_no_timeouts CHECK (reason <> 'WAIT_TIMEOUT')"
    } else {
        "DROP CONSTRAINT test_no_timeouts"
    };
    alter_table(cfg, "cc_transition", change).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_timeout_the_store_refuses_never_gets_the_intent_beside_it_quarantined() {
    let env = TestEnv::new("refused_timeout", 1).await;
    let mut cfg = env.config.clone();
    // Each batch holds the one intent that arrives every 2 s, and lingers past the fetch that
    // reports the partition's end: the partition is caught up at every batch, so its clock
    // counts, and the wait timeout comes due in a batch that also holds an intent.
    cfg.batch.max_linger = Duration::from_millis(1_500);
    cfg.sequencer.wait_timeout = Duration::from_secs(2);
    let (ok, _, err) = cli(&cfg, &["migrate"]);
    assert!(ok, "migrate: {err}");
    refuse_wait_timeouts(&cfg, true).await;
    let log = std::env::temp_dir().join(format!("{}-run.log", env.name));
    let proc = Processor::spawn(&cfg, log.clone());
    // `w` waits for its sequence 1, which never comes.
    produce_to_partition(&cfg, 0, &[intent("w-i2", "w", 2)]).await;
    const FLOW: u64 = 12;
    for seq in 1..=FLOW {
        tokio::time::sleep(Duration::from_secs(2)).await;
        produce_to_partition(&cfg, 0, &[intent(&format!("f-i{seq}"), "f", seq)]).await;
    }
    let (fx, rv) = wait_for_outputs(&cfg, FLOW as usize, 0, Duration::from_secs(60)).await;
    assert_eq!(
        sequences(&fx),
        vec![("f".to_owned(), (1..=FLOW).collect())],
        "every intent of `f` committed once, in order, none blamed for the refused timeout: \
         reviews {:?}",
        rv.iter()
            .map(|r| (&r.intent_id, r.reason, &r.detail))
            .collect::<Vec<_>>()
    );
    assert!(rv.is_empty(), "nothing went to review: {rv:?}");
    // The scenario took place: the timeout failed a part that held an intent.
    let beside: Vec<serde_json::Value> = read_log(&log)
        .into_iter()
        .filter(|l| l["message"] == "isolating a record or command the durable store refuses")
        .filter(|l| l["timeouts"] == true && l["records"].as_u64().is_some_and(|n| n > 0))
        .collect();
    assert!(
        !beside.is_empty(),
        "no failed part held both a wait timeout and an intent"
    );
    // Each failure holds the timeouts longer, although intents commit in between.
    let attempts: Vec<u64> = (beside.iter())
        .filter_map(|l| l["verdict"].as_str())
        .filter_map(|v| v.strip_prefix("HoldTimeouts {")?.split("attempt: ").nth(1))
        .filter_map(|a| a.trim_end_matches([' ', '}']).parse().ok())
        .collect();
    assert!(
        attempts.len() >= 2 && attempts == (1..=attempts.len() as u64).collect::<Vec<_>>(),
        "{beside:?}"
    );

    // The DBA drops the constraint: the timeout is tried again and `w` goes to review.
    refuse_wait_timeouts(&cfg, false).await;
    let (fx, rv) = wait_for_outputs(&cfg, FLOW as usize, 1, Duration::from_secs(120)).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    assert_eq!(fx.len(), FLOW as usize);
    assert_eq!(rv.len(), 1, "{rv:?}");
    assert_eq!(rv[0].intent_id, "w-i2");
    assert_eq!(
        rv[0].reason,
        ReviewReason::WaitTimeout as i32,
        "{}",
        rv[0].detail
    );
    // `w` is on hold now, as R7 says, and waits for an operator: nothing else is pending.
    let report = verify_allowing_waiting(&cfg).await;
    assert!(report.ok, "{:?}", report.violations);
    assert_eq!(
        (report.held_contacts, report.waiting, report.committed),
        (1, 0, FLOW as usize)
    );
}

/// Mostly plausible text, often anything at all (control characters, NUL, any script).
fn text(plausible: &'static str) -> impl Strategy<Value = String> {
    prop_oneof![3 => plausible, 2 => any::<String>()]
}

fn arbitrary_intent() -> impl Strategy<Value = Intent> {
    (
        text("[a-zA-Z0-9 _.-]{1,16}"),
        text("c[0-3]"),
        text("[a-z]{0,8}"),
        text("[a-z0-9-]{0,12}"),
        any::<i32>(),
        prop_oneof![Just(0u64), 1..4u64, any::<u64>()],
        prop_oneof![Just(0u64), 1..3u64, any::<u64>()],
        prop_oneof![3 => 0..7i32, 1 => any::<i32>()],
        proptest::collection::vec(any::<u8>(), 0..64),
        any::<i64>(),
    )
        .prop_map(
            |(
                intent_id,
                contact_id,
                clinic_id,
                correlation_id,
                priority,
                seq,
                version,
                action,
                payload,
                at,
            )| Intent {
                intent_id,
                contact_id,
                clinic_id,
                correlation_id,
                dispatch_priority: priority,
                causal_sequence: seq,
                expected_version: version,
                action,
                payload: payload.into(),
                created_at_ms: at,
            },
        )
}

/// Some intents share ids and contacts, so duplicates, conflicts and waits happen too.
fn arbitrary_batch() -> impl Strategy<Value = Vec<Intent>> {
    proptest::collection::vec((arbitrary_intent(), 0..3usize, any::<bool>()), 1..16).prop_map(
        |items| {
            let mut out: Vec<Intent> = Vec::new();
            for (mut i, reuse, same_contact) in items {
                if let Some(prev) = out.get(reuse) {
                    if same_contact {
                        i.contact_id = prev.contact_id.clone();
                    } else {
                        i.intent_id = prev.intent_id.clone();
                    }
                }
                out.push(i);
            }
            out
        },
    )
}

#[test]
fn arbitrary_protobuf_valid_intents_end_as_decisions_and_never_fail_the_durable_write() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let guard = rt.block_on(shared_stack());
    let schema = unique("arbitrary").to_lowercase();
    let config = causal_commit::config::PostgresConfig {
        url: database_url().into(),
        schema,
        ..Default::default()
    };
    let _in_runtime = rt.enter();
    let pool = pg::pool(&config).unwrap();
    rt.block_on(pg::migrate(&pool, &config.schema)).unwrap();
    let fence = rt
        .block_on(pg::acquire_partition(
            &pool,
            "in",
            0,
            "prop",
            Duration::from_secs(60),
        ))
        .unwrap()
        .expect("a fresh partition");
    let topics = Topics {
        intents: "in".into(),
        side_effects: "fx".into(),
        manual_review: "mr".into(),
        effects: causal_commit::pipeline::output::EffectPlacement::new(None, 4).expect("keyed"),
        max_output_bytes: 1_000_000,
    };
    let limits = causal_commit::config::LimitsConfig::default();
    let decided = std::cell::Cell::new([0usize; 2]);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 96,
        ..ProptestConfig::default()
    });
    runner
        .run(&arbitrary_batch(), |batch| {
            let mut seq: Sequencer<Held> = Sequencer::new(sequencer::Config::default()).unwrap();
            let ctx = Context {
                topics: &topics,
                partition: 0,
                fence,
                batch_no: 1,
                now_ms: 1_000,
            };
            let mut plan = PartitionPlan::default();
            let mut fresh = Fresh::new();
            for (offset, i) in batch.iter().enumerate() {
                let record = InRecord {
                    partition: 0,
                    offset: offset as i64,
                    key: Some(i.contact_id.as_bytes().to_vec()),
                    value: Some(i.encode_to_vec()),
                    traceparent: None,
                };
                match intent::decode(record.key.as_deref(), record.value.as_deref(), &limits) {
                    Ok(v) => {
                        let v = Arc::new(v);
                        fresh.insert(record.offset, v.clone());
                        let held = Held {
                            correlation_id: v.intent.correlation_id.clone(),
                            record: record.clone(),
                        };
                        seq.on_intent(translate::meta(&v, &record), held, None, Millis(1_000));
                    }
                    Err(e) => translate::invalid(&ctx, &record, &e, &mut plan),
                }
            }
            let mut decisions = Vec::new();
            seq.drain_decisions(&mut decisions);
            translate::decisions(&ctx, &fresh, decisions, &mut plan);
            let mut rows = causal_commit::store::snapshot::WaitingRows::default();
            translate::contacts(&ctx, seq.take_dirty(), &mut rows, &mut plan).unwrap();
            // Every record ends as a decision: at least one audit row names its offset.
            let offsets: BTreeSet<i64> = plan.transitions.iter().map(|t| t.source_offset).collect();
            for offset in 0..batch.len() as i64 {
                prop_assert!(offsets.contains(&offset), "record {offset} has no decision");
            }
            let [mut sequenced, mut invalid] = decided.get();
            sequenced += fresh.len();
            invalid += batch.len() - fresh.len();
            decided.set([sequenced, invalid]);
            let write = BatchWrite {
                partitions: vec![PartitionWrite {
                    partition: 0,
                    fence,
                    batch_no: 1,
                    next_offset: batch.len() as i64,
                    clock_ms: 0,
                }],
                transitions: plan.transitions,
                contacts: plan.contacts,
                commands: Vec::new(),
                waiting: plan.waiting,
                deleted: Vec::new(),
                forwards: plan.forwards,
                decided_at_ms: Some(1_700_000_000_000),
            };
            let written = rt.block_on(pg::try_batch(
                &pool,
                "in",
                "prop",
                Duration::from_secs(60),
                &write,
            ));
            prop_assert!(
                written.is_ok(),
                "the durable write refused: {:?}",
                written.err()
            );
            Ok(())
        })
        .unwrap();
    let [sequenced, invalid] = decided.get();
    println!("arbitrary intents: {sequenced} sequenced, {invalid} invalid");
    assert!(
        sequenced > 50 && invalid > 50,
        "both paths exercised: {sequenced} / {invalid}"
    );
    drop(guard);
}

/// Bytes that decode as no protobuf message: every byte a field tag of wire type 7.
fn garbage(n: usize) -> Vec<u8> {
    vec![0xff; n]
}

/// Per source partition, the review records in `rv`.
fn review_of(
    rv: &[causal_commit::proto::ManualReview],
    partition: i32,
) -> &causal_commit::proto::ManualReview {
    let found: Vec<_> = rv
        .iter()
        .filter(|r| r.source_partition == partition)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one review from partition {partition}: {rv:?}"
    );
    found[0]
}

/// A careless (or hostile) producer writes records as large as the intents topic takes, and a
/// valid intent whose `traceparent` header is most of that: before, the first one's review
/// record (its bytes plus an envelope) was larger than librdkafka or the broker take, every
/// transaction holding it failed, and all partitions stalled for good; the header was copied
/// onto the effect. Now the reviews are cut to `limits.max_output_bytes` and say so, the
/// header is carried on only when it is a valid traceparent, and everything else commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_as_large_as_the_topic_takes_are_reviewed_cut_to_fit_and_no_partition_stalls() {
    let env = TestEnv::new("oversize", 2).await;
    let cfg = env.config();
    let (ok, _, err) = cli(&cfg, &["migrate"]);
    assert!(ok, "migrate: {err}");
    let log = std::env::temp_dir().join(format!("{}-run.log", env.name));
    let proc = Processor::spawn(&cfg, log.clone());

    let bytes = |i: &Intent| i.encode_to_vec();
    let ids = "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7";
    // A later version of the header may carry more fields: only its first 55 bytes count.
    let long_header = format!("01-{ids}-01-{}", "x".repeat(400_000));
    let junk_header = format!("not a traceparent {}", "y".repeat(300_000));
    let big_value = garbage(1_040_000);
    let (half_key, half_value) = (vec![b'k'; 520_000], garbage(520_000));
    let a = |seq: u64| intent(&format!("a-i{seq}"), "a", seq);
    let b = |seq: u64| intent(&format!("b-i{seq}"), "b", seq);
    type Traced<'a> = (i32, Vec<u8>, Vec<u8>, Option<&'a str>);
    let records: Vec<Traced<'_>> = vec![
        (0, b"a".to_vec(), bytes(&a(1)), None),
        (0, b"a".to_vec(), bytes(&a(2)), None),
        (0, b"a".to_vec(), big_value.clone(), None),
        (0, b"a".to_vec(), bytes(&a(3)), None),
        (0, b"a".to_vec(), bytes(&a(4)), None),
        (1, b"b".to_vec(), bytes(&b(1)), None),
        (1, b"b".to_vec(), bytes(&b(2)), None),
        (1, b"b".to_vec(), bytes(&b(3)), Some(long_header.as_str())),
        (1, b"b".to_vec(), bytes(&b(4)), Some(junk_header.as_str())),
        (1, half_key.clone(), half_value.clone(), None),
        (1, b"b".to_vec(), bytes(&b(5)), None),
    ];
    crate::common::produce_traced(&cfg, &records).await;

    let (fx, rv) = wait_for_outputs(&cfg, 9, 2, Duration::from_secs(60)).await;
    let traced =
        crate::common::read_with_traceparent(&cfg, &cfg.kafka.side_effects_topic, &[0, 1], 9);
    assert!(proc.terminate(Duration::from_secs(30)));

    assert_eq!(fx.len(), 9, "every valid intent committed once: {fx:?}");
    assert_eq!(
        sequences(&fx),
        vec![
            ("a".to_string(), vec![1, 2, 3, 4]),
            ("b".to_string(), vec![1, 2, 3, 4, 5])
        ]
    );
    assert_eq!(rv.len(), 2, "{rv:?}");
    for (partition, key, value) in [(0, &b"a"[..], &big_value), (1, &half_key[..], &half_value)] {
        let r = review_of(&rv, partition);
        assert_eq!(r.reason, ReviewReason::InvalidIntent as i32, "{}", r.detail);
        assert!(
            r.original_truncated,
            "partition {partition}: said to be cut"
        );
        assert_eq!(
            (r.original_key_size, r.original_value_size),
            (key.len() as u64, value.len() as u64)
        );
        assert!(value.starts_with(&r.original_value) && key.starts_with(&r.original_key));
        let carried = r.original_value.len() + r.original_key.len();
        assert!(
            carried > cfg.limits.max_output_bytes - 8192 && carried < key.len() + value.len(),
            "as much as fits: {carried} bytes"
        );
    }
    // The effects' trace headers: the long one read as version 00, the junk one dropped.
    let header_of = |intent_id: &str| {
        traced
            .iter()
            .find(|(_, v)| {
                causal_commit::proto::SideEffect::decode(v.as_slice())
                    .unwrap()
                    .intent_id
                    == intent_id
            })
            .map(|(tp, _)| tp.clone())
            .expect("the effect was read")
    };
    assert_eq!(header_of("b-i3"), Some(format!("00-{ids}-01")));
    assert_eq!(header_of("b-i4"), None);
    let failed = read_log(&log)
        .iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("transaction failed"))
        })
        .count();
    assert_eq!(failed, 0, "no transaction failed");
    let report = verify_report(&env.config, "").await;
    assert!(report.ok, "{:?}", report.violations);
}

/// A tired operator sets the manual-review topic's `max.message.bytes` below
/// `limits.max_output_bytes`: a review record the broker refuses fails its transaction. The
/// processor says which setting to fix (an error, every 5 s, not a tight loop), stays up, and
/// once the topic takes the record again, everything commits as if nothing happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_topic_below_max_output_bytes_is_named_and_processing_resumes_once_raised() {
    let env = TestEnv::new("toosmall", 1).await;
    let cfg = env.config();
    let set_limit = |bytes: &'static str| {
        let cfg = Arc::clone(&cfg);
        async move {
            let topic = &cfg.kafka.manual_review_topic;
            alter_topic_config(&cfg, topic, "max.message.bytes", bytes).await
        }
    };
    set_limit("20000").await;
    let (ok, _, err) = cli(&cfg, &["migrate"]);
    assert!(ok, "migrate: {err}");
    let log = std::env::temp_dir().join(format!("{}-run.log", env.name));
    let mut proc = Processor::spawn(&cfg, log.clone());
    let c = |seq: u64| intent(&format!("c-i{seq}"), "c", seq).encode_to_vec();
    crate::common::produce_traced::<&[u8]>(
        &cfg,
        &[
            (0, b"c", c(1), None),
            (0, b"c", garbage(50_000), None),
            (0, b"c", c(2), None),
        ],
    )
    .await;

    let named = |log: &std::path::Path| {
        read_log(log)
            .into_iter()
            .filter(|l| {
                l["level"] == "ERROR"
                    && l["message"].as_str().is_some_and(|m| {
                        m.contains("an output topic refused a record as too large")
                    })
            })
            .collect::<Vec<_>>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while named(&log).len() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let errors = named(&log);
    assert!(
        errors.len() >= 2,
        "the refusal named, and retried: {errors:?}"
    );
    assert_eq!(errors[0]["max_output_bytes"], cfg.limits.max_output_bytes);
    let (first, second) = (
        errors[0]["timestamp"].as_str().unwrap(),
        errors[1]["timestamp"].as_str().unwrap(),
    );
    let at = |t: &str| chrono::DateTime::parse_from_rfc3339(t).unwrap();
    assert!(
        at(second) - at(first) >= chrono::TimeDelta::seconds(4),
        "retried after a pause, not in a tight loop: {first} then {second}"
    );
    assert!(
        proc.child.try_wait().unwrap().is_none(),
        "the processor stays up"
    );
    let nothing = wait_for(
        &cfg,
        &cfg.kafka.side_effects_topic,
        1,
        Duration::from_secs(1),
    )
    .await;
    assert!(
        nothing.is_empty(),
        "nothing commits past the refused record"
    );

    set_limit("1048588").await;
    let (fx, rv) = wait_for_outputs(&cfg, 2, 1, Duration::from_secs(60)).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    assert_eq!(sequences(&fx), vec![("c".to_string(), vec![1, 2])]);
    assert_eq!(rv.len(), 1);
    assert!(!rv[0].original_truncated && rv[0].original_value.len() == 50_000);
    let report = verify_report(&env.config, "").await;
    assert!(report.ok, "{:?}", report.violations);
}

/// A producer that writes intents in Kafka transactions and aborts some of them. An aborted
/// record was never produced (CONTRACT §5: readers use `read_committed`): it gets no outcome,
/// blocks no sequence, and is no conflict for the committed record that reuses its intent id with
/// other content; the partitions, whose last entries are abort markers, still read as caught
/// up. The processor runs while the transactions are open, committed and aborted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producers_aborted_transactions_are_never_seen_and_its_committed_ones_flow() {
    use rdkafka::producer::Producer as _;
    let env = TestEnv::new("txnproducer", 2).await;
    let cfg = env.config();
    let running = start(cfg.clone());
    let contacts: Vec<String> = (0..10).map(|k| format!("k{k}")).collect();
    let ghost = |c: &str, seq: u64| {
        let mut i = intent(&format!("{c}-ghost{seq}"), c, seq);
        i.action = causal_commit::proto::Action::Cancel as i32;
        i
    };
    // (commit?, intents) in order, one transaction each.
    let transactions: Vec<(bool, Vec<Intent>)> = vec![
        (
            true,
            contacts
                .iter()
                .map(|c| intent(&format!("{c}-1"), c, 1))
                .collect(),
        ),
        // Seq 2 under the committed seq-2 intent's id with other content, and a seq 3.
        (
            false,
            contacts
                .iter()
                .flat_map(|c| {
                    let mut reused = ghost(c, 2);
                    reused.intent_id = format!("{c}-2");
                    [reused, ghost(c, 3)]
                })
                .collect(),
        ),
        (
            true,
            contacts
                .iter()
                .map(|c| intent(&format!("{c}-2"), c, 2))
                .collect(),
        ),
        (
            true,
            contacts
                .iter()
                .step_by(2)
                .map(|c| intent(&format!("{c}-3"), c, 3))
                .collect(),
        ),
        // The topic ends with abort markers.
        (false, contacts.iter().map(|c| ghost(c, 4)).collect()),
    ];
    let (c, id) = (env.config.clone(), format!("{}-producer", env.name));
    tokio::task::spawn_blocking(move || {
        let p = transactional_producer(&c, &id);
        for (commit, intents) in transactions {
            p.begin_transaction().expect("begin");
            for partition in 0..2 {
                let on_partition: Vec<Intent> = intents
                    .iter()
                    .filter(|i| i.contact_id[1..].parse::<i32>().unwrap() % 2 == partition)
                    .cloned()
                    .collect();
                send_in_transaction(&p, &c, partition, &on_partition);
            }
            // The processor polls while the transaction is open.
            std::thread::sleep(Duration::from_millis(500));
            let t = Duration::from_secs(30);
            match commit {
                true => p.commit_transaction(t).expect("commit"),
                false => p.abort_transaction(t).expect("abort"),
            }
        }
    })
    .await
    .expect("producer thread");

    caught_up(&cfg, Duration::from_secs(60)).await;
    let (fx, rv) = wait_for_outputs(&cfg, 25, 0, Duration::from_secs(30)).await;
    running.stop().await;

    assert!(rv.is_empty(), "no review of anything: {rv:?}");
    assert_eq!(fx.len(), 25, "each committed intent once");
    for e in &fx {
        assert!(!e.intent_id.contains("ghost"), "aborted: {e:?}");
        assert_eq!(e.action, causal_commit::proto::Action::Book as i32, "{e:?}");
    }
    for (contact, seqs) in sequences(&fx) {
        let k: usize = contact[1..].parse().unwrap();
        let want = if k.is_multiple_of(2) {
            vec![1, 2, 3]
        } else {
            vec![1, 2]
        };
        assert_eq!(seqs, want, "contact {contact}");
    }
    let report = verify_report(&env.config, "").await;
    assert!(report.ok, "{:?}", report.violations);
    assert_eq!((report.intents, report.committed), (25, 25));
    assert_eq!(report.waiting, 0);
}
