//! Partitions added to the intents topic (contract R1): one sequence per contact whatever the
//! partition count, new partitions consumed without a restart, and two instances sharing them;
//! a producer that scatters each contact's intents over every partition (its own partitioner).
//! Partitions added to the side-effects topic: each contact's effects stay on their partition.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use serde_json::json;

use crate::common::process::Processor;
use crate::common::*;
use causal_commit::config::Config;
use causal_commit::proto::Intent;

pub(crate) async fn grow(config: &Config, to: usize) {
    grow_topic(config, &config.kafka.intents_topic, to).await;
}

async fn grow_topic(config: &Config, topic: &str, to: usize) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .create()
        .expect("admin client");
    let results = admin
        .create_partitions(
            &[NewPartitions::new(topic, to)],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create partitions");
    for r in results {
        r.expect("partitions added");
    }
}

/// Intents `from..=to` of every contact: `assigned` contacts without a causal sequence,
/// `strict` ones with it, interleaved across contacts.
fn wave(assigned: usize, strict: usize, from: u64, to: u64) -> Vec<Intent> {
    let mut out = Vec::new();
    for seq in from..=to {
        for k in 0..assigned {
            let c = format!("as{k}");
            out.push(intent(&format!("{c}-{seq}"), &c, 0));
        }
        for k in 0..strict {
            let c = format!("st{k}");
            out.push(intent(&format!("{c}-{seq}"), &c, seq));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_partitions_keeps_one_sequence_per_contact_across_two_instances() {
    let env = TestEnv::exclusive("growth", 12).await;
    let cfg = env.config.clone();
    let log = |name: &str| crate::failures::log_path(&env, name);
    let a = Processor::spawn(&cfg, log("a1"));
    // Strict contacts straddle the change: sequences 1..=3 before, 4..=6 after.
    produce_intents(&cfg, &wave(300, 60, 1, 3)).await;
    caught_up(&cfg, Duration::from_secs(120)).await;
    assert!(a.terminate(Duration::from_secs(30)));

    grow(&cfg, 24).await;
    let a = Processor::spawn(&cfg, log("a2"));
    let mut cfg_b = cfg.clone();
    cfg_b.instance_id = format!("{}-b", env.name);
    let b = Processor::spawn(&cfg_b, log("b2"));
    // The producer's partitioner now maps about half the contacts to another partition.
    produce_intents(&cfg, &wave(300, 60, 4, 6)).await;
    caught_up(&cfg, Duration::from_secs(180)).await;
    assert!(a.terminate(Duration::from_secs(30)));
    assert!(b.terminate(Duration::from_secs(30)));

    let fx = effects(&read_all(&cfg, &cfg.kafka.side_effects_topic));
    let mut per_contact: HashMap<&str, Vec<u64>> = HashMap::new();
    for e in &fx {
        per_contact
            .entry(&e.contact_id)
            .or_default()
            .push(e.commit_sequence);
    }
    assert_eq!(per_contact.len(), 360);
    for (contact, seqs) in &per_contact {
        assert_eq!(
            seqs,
            &[1, 2, 3, 4, 5, 6],
            "contact {contact}: one sequence, in order"
        );
    }
    assert_eq!(fx.len(), 360 * 6, "each intent committed once");
    let report = verify_report(&cfg, "").await;
    assert!(report.ok, "{:?}", report.violations);
}

/// A producer with a partitioner of its own (contract R1: "producers may use any
/// partitioner") sends every intent to a random partition of four, so each contact's intents
/// arrive on several partitions at once, consumed by two instances; one of them is killed
/// with SIGKILL mid-stream and started again. Strict contacts arrive out of order; assigned
/// contacts' intents are sent in order (their order across partitions is undefined, R2
/// numbers them in partition order); some intents of both are sent twice, to any partition (a
/// retry through another route). Every contact keeps one sequence: strict ones exactly as the
/// producer numbered them, assigned ones 1..=8, each numbered after the intents sent before it
/// to a partition it was sent to; every intent has one effect, the copies are duplicates,
/// nothing goes to manual review, and `verify` is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_scattering_each_contacts_intents_over_every_partition_keeps_one_sequence() {
    use rand::seq::SliceRandom as _;
    use rand::{Rng as _, SeedableRng as _};
    const PARTITIONS: i32 = 4;
    const CONTACTS: usize = 40;
    const PER_CONTACT: u64 = 8;
    let env = TestEnv::new("scatter", PARTITIONS).await;
    let cfg = env.config.clone();
    let log = |name: &str| crate::failures::log_path(&env, name);
    let mut rng = rand::rngs::StdRng::seed_from_u64(2026);

    let mut strict: Vec<Intent> = Vec::new();
    for k in 0..CONTACTS {
        let c = format!("st{k}");
        let mut seqs: Vec<u64> = (1..=PER_CONTACT).collect();
        seqs.shuffle(&mut rng);
        strict.extend(seqs.into_iter().map(|s| intent(&format!("{c}-{s}"), &c, s)));
    }
    strict.shuffle(&mut rng);
    let mut records: Vec<(i32, Intent)> = Vec::new();
    // Interleaves the strict intents with the assigned ones, each contact's assigned intents
    // in their order.
    let mut strict = strict.into_iter();
    for seq in 1..=PER_CONTACT {
        for k in 0..CONTACTS {
            let c = format!("as{k}");
            let i = intent(&format!("{c}-{seq}"), &c, 0);
            let p = rng.random_range(0..PARTITIONS);
            records.push((p, i.clone()));
            if rng.random_bool(0.2) {
                records.push((rng.random_range(0..PARTITIONS), i));
            }
            let s = strict.next().expect("as many strict intents");
            let p = rng.random_range(0..PARTITIONS);
            records.push((p, s.clone()));
            if rng.random_bool(0.1) {
                let other = (p + rng.random_range(1..PARTITIONS)) % PARTITIONS;
                records.push((other, s));
            }
        }
    }
    let intents = 2 * CONTACTS * PER_CONTACT as usize;
    println!("{} records for {intents} intents", records.len());
    // Where each intent was sent (partition, index in `records`), for the order check.
    let mut sent_to: HashMap<&str, Vec<(i32, usize)>> = HashMap::new();
    for (n, (p, i)) in records.iter().enumerate() {
        sent_to.entry(&i.intent_id).or_default().push((*p, n));
    }

    let mut cfg_b = cfg.clone();
    cfg_b.instance_id = format!("{}-b", env.name);
    let a = Processor::spawn(&cfg, log("a1"));
    let b = Processor::spawn(&cfg_b, log("b"));
    let (first, second) = records.split_at(records.len() / 2);
    produce_at(&cfg, first).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    a.kill9();
    produce_at(&cfg, second).await;
    let a = Processor::spawn(&cfg, log("a2"));
    caught_up(&cfg, Duration::from_secs(180)).await;
    assert!(a.terminate(Duration::from_secs(30)));
    assert!(b.terminate(Duration::from_secs(30)));

    let fx = effects(&read_all(&cfg, &cfg.kafka.side_effects_topic));
    assert_eq!(fx.len(), intents, "each intent committed once");
    let per_contact = by_contact(&fx);
    assert_eq!(per_contact.len(), 2 * CONTACTS);
    for (contact, effects) in &per_contact {
        let seqs: Vec<u64> = effects.iter().map(|e| e.commit_sequence).collect();
        let expected: Vec<u64> = (1..=PER_CONTACT).collect();
        assert_eq!(seqs, expected, "contact {contact}: one sequence, in order");
        if contact.starts_with("st") {
            for e in effects {
                assert_eq!(
                    e.intent_id,
                    format!("{contact}-{}", e.commit_sequence),
                    "strict: the producer's sequence"
                );
            }
        } else {
            // R2: an assigned intent is numbered where it is first seen, in that partition's
            // order: after every intent of its contact sent earlier to one of the partitions
            // it was sent to.
            let seq: HashMap<&str, u64> = effects
                .iter()
                .map(|e| (e.intent_id.as_str(), e.commit_sequence))
                .collect();
            for e in effects {
                let in_order = sent_to[e.intent_id.as_str()].iter().any(|&(q, n)| {
                    records[..n]
                        .iter()
                        .filter(|(p, i)| *p == q && i.contact_id == *contact)
                        .all(|(_, i)| {
                            i.intent_id == e.intent_id
                                || seq[i.intent_id.as_str()] < e.commit_sequence
                        })
                });
                assert!(
                    in_order,
                    "contact {contact}: {} (sequence {}) numbered before an intent sent earlier \
                     to each partition it was sent to",
                    e.intent_id, e.commit_sequence
                );
            }
        }
    }
    assert!(
        reviews(&read_all(&cfg, &cfg.kafka.manual_review_topic)).is_empty(),
        "nothing to review"
    );
    let report = verify_report(&cfg, "").await;
    assert!(report.ok, "{:?}", report.violations);
    assert_eq!(report.intents, intents);
    assert_eq!(report.committed, intents);
    let on_topic = read_all(&cfg, &cfg.kafka.intents_topic).len();
    assert!(
        on_topic > records.len(),
        "records were forwarded to their contacts' owner partitions"
    );
    // A record goes to its contact's owner, and on only if the owner changed meanwhile (a
    // batch rolled back): never back and forth.
    assert!(
        on_topic < 2 * records.len(),
        "{on_topic} records on the topic for {} produced: records forwarded back and forth",
        records.len()
    );
    assert_eq!(
        report.records, on_topic,
        "every record, copies included, was read"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_added_while_running_are_consumed_within_a_minute_without_a_restart() {
    let env = TestEnv::new("grow_live", 2).await;
    let cfg = env.config.clone();
    let proc = Processor::spawn(
        &cfg,
        std::env::temp_dir().join(format!("{}-run.log", env.name)),
    );
    produce_intents(&cfg, &wave(20, 0, 1, 1)).await;
    caught_up(&cfg, Duration::from_secs(60)).await;
    grow(&cfg, 4).await;
    let added = Instant::now();
    produce_intents(&cfg, &wave(20, 0, 2, 2)).await;
    caught_up(&cfg, Duration::from_secs(60)).await;
    let took = added.elapsed();
    assert!(proc.terminate(Duration::from_secs(30)));
    println!("intents on the new partitions committed {took:?} after they were added");
    let fx = effects(&read_all(&cfg, &cfg.kafka.side_effects_topic));
    assert_eq!(fx.len(), 40);
    for (contact, seqs) in by_contact(&fx) {
        let seqs: Vec<u64> = seqs.iter().map(|e| e.commit_sequence).collect();
        assert_eq!(seqs, vec![1, 2], "contact {contact}");
    }
}

/// An operator adds partitions to the side-effects topic (to spread its readers) under a
/// running processor, then restarts it. Each contact's effects stay on the partition they were
/// on (R1: a reader of one partition sees a contact's effects in commit order; librdkafka's
/// partitioner alone would move most contacts once it sees 8 partitions instead of 3), the
/// added partitions stay empty, and the start says so. A side-effects topic created again with
/// fewer partitions than its effects are spread over, under the running processor: nothing is
/// emitted, an ERROR names it; at the next start it is refused, naming both counts and the way
/// out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_added_to_the_side_effects_topic_move_no_contacts_effects() {
    use crate::common::process::read_log;
    let env = TestEnv::new("grow_effects", 3).await;
    let cfg = env.config.clone();
    let fx_topic = cfg.kafka.side_effects_topic.clone();
    let log = |name: &str| crate::failures::log_path(&env, name);
    let a = Processor::spawn(&cfg, log("a1"));
    produce_intents(&cfg, &wave(40, 40, 1, 2)).await;
    caught_up(&cfg, Duration::from_secs(60)).await;
    grow_topic(&cfg, &fx_topic, 8).await;
    produce_intents(&cfg, &wave(40, 40, 3, 3)).await;
    caught_up(&cfg, Duration::from_secs(60)).await;
    assert!(a.terminate(Duration::from_secs(30)));

    let b = Processor::spawn(&cfg, log("a2"));
    produce_intents(&cfg, &wave(40, 40, 4, 5)).await;
    caught_up(&cfg, Duration::from_secs(60)).await;
    let warned: Vec<_> = read_log(&log("a2"))
        .into_iter()
        .filter(|l| {
            l["level"] == "WARN"
                && l["partitions"] == 8
                && l["recorded"] == 3
                && l["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("added partitions stay empty"))
        })
        .collect();
    assert_eq!(
        warned.len(),
        1,
        "the start names the unused partitions once"
    );

    // Every contact's five effects on one partition, among the three recorded, in order.
    let mut per_contact: HashMap<String, (i32, Vec<u64>)> = HashMap::new();
    let placed = placed_effects(&cfg, &fx_topic, 8);
    for (partition, e) in &placed {
        let entry = per_contact
            .entry(e.contact_id.clone())
            .or_insert((*partition, Vec::new()));
        assert_eq!(
            entry.0, *partition,
            "contact {}: effects on two partitions",
            e.contact_id
        );
        entry.1.push(e.commit_sequence);
    }
    assert_eq!(placed.len(), 400, "each intent committed once");
    assert_eq!(per_contact.len(), 80);
    for (contact, (partition, seqs)) in &per_contact {
        assert!(
            *partition < 3,
            "contact {contact} on added partition {partition}"
        );
        assert_eq!(seqs, &[1, 2, 3, 4, 5], "contact {contact}: in order");
    }
    let report = verify_report(&cfg, "").await;
    assert!(report.ok, "{:?}", report.violations);

    // Created again with 2 partitions under the running processor: nothing emitted, named.
    crate::offsets::delete_topic(&cfg, &fx_topic).await;
    let recreated = Instant::now() + Duration::from_secs(30);
    loop {
        let admin: rdkafka::admin::AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &cfg.kafka.brokers)
            .create()
            .expect("admin client");
        let created = admin
            .create_topics(
                &[rdkafka::admin::NewTopic::new(
                    &fx_topic,
                    2,
                    rdkafka::admin::TopicReplication::Fixed(1),
                )],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .expect("create topic");
        // The deletion completes in the background: "marked for deletion" until then.
        if created.iter().all(|r| r.is_ok()) || Instant::now() > recreated {
            assert!(created.iter().all(|r| r.is_ok()), "{created:?}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    produce_intents(&cfg, &wave(40, 40, 6, 6)).await;
    crate::common::process::wait_for_log(
        &log("a2"),
        Duration::from_secs(90),
        "an ERROR naming the side-effects topic's missing partitions",
        |lines| {
            lines.iter().find(|l| {
                l["level"] == "ERROR"
                    && l["partitions"] == 2
                    && l["recorded"] == 3
                    && l["message"].as_str().is_some_and(|m| {
                        m.contains("fewer than the 3") && m.contains("nothing is lost")
                    })
            })?;
            Some(())
        },
    )
    .await;
    // The contacts of partitions 0 and 1 go on there; those of partition 2 wait.
    for (partition, e) in placed_effects(&cfg, &fx_topic, 2) {
        assert_eq!(e.commit_sequence, 6, "{e:?}");
        assert_eq!(per_contact[&e.contact_id].0, partition, "{e:?}");
    }
    assert!(b.terminate(Duration::from_secs(30)));
    // The next start refuses it, naming both counts and the way out.
    let mut c = Processor::spawn(&cfg, log("a3"));
    let status = c
        .exit_within(Duration::from_secs(30))
        .expect("a start over a topic with fewer partitions stops");
    assert!(!status.success());
    let failed: Vec<_> = read_log(&log("a3"))
        .into_iter()
        .filter(|l| l["message"] == "causal-commit failed")
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    let error = failed[0]["error"].as_str().unwrap_or_default();
    for named in [
        fx_topic.as_str(),
        "has 2 partitions",
        "the 3 its effects",
        "kafka.side_effects_topic at a new topic",
    ] {
        assert!(error.contains(named), "{named}: {error}");
    }
}

/// Every effect committed to `topic`'s first `partitions` partitions, with its partition, read
/// until none came for 3 s.
fn placed_effects(
    cfg: &Config,
    topic: &str,
    partitions: i32,
) -> Vec<(i32, causal_commit::proto::SideEffect)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .set("group.id", unique("fx-reader"))
        .set("isolation.level", "read_committed")
        .create()
        .expect("reader");
    let mut assignment = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        assignment
            .add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .expect("offset");
    }
    reader.assign(&assignment).expect("assign");
    let mut out = Vec::new();
    let mut idle_since = Instant::now();
    while idle_since.elapsed() < Duration::from_secs(3) {
        let Some(m) = reader.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m.expect("read");
        let e = effects(&[m.payload().unwrap_or_default().to_vec()]);
        out.push((m.partition(), e[0].clone()));
        idle_since = Instant::now();
    }
    out
}

/// Every partition of a test's intents topic acquired on the store by writer "w", for tests of
/// the batch write and the restore themselves.
struct Fenced {
    pool: sqlx::PgPool,
    topic: String,
    fences: Vec<u64>,
}

impl Fenced {
    const LEASE: Duration = Duration::from_secs(30);

    async fn new(env: &TestEnv, partitions: i32) -> Self {
        use causal_commit::store::postgres as pg;
        let pool = env.store().await;
        let topic = env.config.kafka.intents_topic.clone();
        let mut fences = Vec::new();
        for p in 0..partitions {
            let fence = pg::acquire_partition(&pool, &topic, p, "w", Self::LEASE)
                .await
                .unwrap()
                .expect("free");
            fences.push(fence);
        }
        Self {
            pool,
            topic,
            fences,
        }
    }

    /// Partition `p`'s row in batch `batch_no`.
    fn part(&self, p: i32, batch_no: u64) -> causal_commit::store::postgres::PartitionWrite {
        causal_commit::store::postgres::PartitionWrite {
            partition: p,
            fence: self.fences[p as usize],
            batch_no,
            next_offset: batch_no as i64,
            clock_ms: 0,
        }
    }

    async fn apply(
        &self,
        w: &causal_commit::store::postgres::BatchWrite,
    ) -> causal_commit::store::postgres::Result<()> {
        causal_commit::store::postgres::apply_batch(&self.pool, &self.topic, "w", Self::LEASE, w)
            .await
    }
}

/// Contact `id` written by partition `p` in batch `batch_no`, with `state`.
fn contact_row(
    id: &str,
    p: i32,
    batch_no: u64,
    state: serde_json::Value,
) -> causal_commit::store::postgres::ContactRow {
    causal_commit::store::postgres::ContactRow {
        contact_id: id.into(),
        partition: p,
        batch_no,
        state: serde_json::value::to_raw_value(&state).unwrap(),
        on_hold: false,
        waiting: 0,
    }
}

/// The batch write checks every forward against the contact's owner (migration 0017), in the
/// same statement: a forward to the owner is written; a forward to a partition that does not
/// own the contact (what the forwarding partition learnt went stale: the owner's batch was
/// rolled back, and another partition created the contact since, or none yet) is refused
/// naming the owner, or the forwarding partition itself when it owns the contact or none
/// does; nothing of a refused batch is written; a contact created by the same batch counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_to_a_partition_that_does_not_own_the_contact_is_refused_naming_the_owner() {
    use causal_commit::store::postgres::{BatchWrite, Forward, OwnedElsewhere};
    let env = TestEnv::new("fwdcheck", 3).await;
    let store = Fenced::new(&env, 3).await;
    let (pool, topic) = (&store.pool, &store.topic);
    let part = |p: i32, batch_no: u64| store.part(p, batch_no);
    let contact = |id: &str, p: i32, batch_no: u64| contact_row(id, p, batch_no, json!({}));
    let forward = |p: i32, id: &str, owner: i32| Forward {
        partition: p,
        contact_id: id.into(),
        owner,
    };
    let last_batch = |p: i32| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT last_batch FROM cc_partition WHERE topic = $1 AND partition = $2",
            )
            .bind(topic)
            .bind(p)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };

    // Partition 0 creates c, partition 1 creates e; partition 1 forwards c's records to 0:
    // written.
    let w = BatchWrite {
        partitions: vec![part(0, 1)],
        contacts: vec![contact("c", 0, 1)],
        ..BatchWrite::default()
    };
    store.apply(&w).await.unwrap();
    let w = BatchWrite {
        partitions: vec![part(1, 1)],
        contacts: vec![contact("e", 1, 1)],
        forwards: vec![forward(1, "c", 0)],
        ..BatchWrite::default()
    };
    store.apply(&w).await.unwrap();

    // Partition 1 forwards c to partition 2 (twice), e, which it owns, to partition 0, and f,
    // which has no row, to partition 0.
    let w = BatchWrite {
        partitions: vec![part(1, 2)],
        forwards: vec![
            forward(1, "c", 2),
            forward(1, "e", 0),
            forward(1, "c", 2),
            forward(1, "f", 0),
        ],
        ..BatchWrite::default()
    };
    let e = store.apply(&w).await.expect_err("stale owners are refused");
    let owned = e.owned_elsewhere().expect("a CC004 refusal");
    assert_eq!(
        owned,
        vec![
            OwnedElsewhere {
                partition: 1,
                contact: "c".into(),
                owner: 0,
            },
            OwnedElsewhere {
                partition: 1,
                contact: "e".into(),
                owner: 1,
            },
            OwnedElsewhere {
                partition: 1,
                contact: "f".into(),
                owner: 1,
            },
        ],
        "the owner, else the forwarding partition itself, once per contact"
    );
    assert_eq!(
        last_batch(1).await,
        1,
        "nothing of the refused batch is written"
    );

    // One batch in which partition 2 creates g and partition 1 forwards g's records to it.
    let w = BatchWrite {
        partitions: vec![part(1, 2), part(2, 1)],
        contacts: vec![contact("g", 2, 1)],
        forwards: vec![forward(1, "g", 2)],
        ..BatchWrite::default()
    };
    store.apply(&w).await.unwrap();
    assert_eq!(last_batch(1).await, 2);
    assert_eq!(last_batch(2).await, 1);
}

/// A restore that rolls back the batch which created a contact keeps the contact with its
/// partition, without state (migration 0018): another partition's write of it is still refused
/// naming that owner, its forwards there are still accepted, the restore loads no state for it,
/// and the owner creates it again, also over a second rollback (reverting to no state).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_keeps_a_contact_whose_creation_it_rolls_back_with_its_owner() {
    use causal_commit::store::postgres::{self as pg, BatchWrite, Forward, OwnedElsewhere};
    use causal_commit::store::recovery::{KafkaCommitted, RecoveryPoint};
    let env = TestEnv::new("own_restore", 2).await;
    let store = Fenced::new(&env, 2).await;
    let (pool, topic, fences) = (&store.pool, &store.topic, &store.fences);
    let write = |p: i32, batch_no: u64, contacts: &[&str], forwards: &[(&str, i32)]| BatchWrite {
        partitions: vec![store.part(p, batch_no)],
        contacts: contacts
            .iter()
            .map(|id| contact_row(id, p, batch_no, json!({ "of": id, "hold": null })))
            .collect(),
        forwards: forwards
            .iter()
            .map(|(id, owner)| Forward {
                partition: p,
                contact_id: (*id).into(),
                owner: *owner,
            })
            .collect(),
        ..BatchWrite::default()
    };
    // What a restore of partition 1 to `batch` loads, and leaves of each contact.
    let restore = |batch: u64| {
        let pool = pool.clone();
        let fence = fences[1];
        async move {
            let kafka = KafkaCommitted::Point {
                offset: batch as i64,
                point: RecoveryPoint {
                    batch,
                    fence,
                    clock_ms: 0,
                },
            };
            let restored =
                pg::restore_partition(&pool, topic, 1, fence, "g", &kafka, Default::default())
                    .await
                    .unwrap();
            let rows: Vec<(String, i32, i64, Option<serde_json::Value>)> = sqlx::query_as(
                "SELECT contact_id, partition, batch_no, state FROM cc_contact
                  WHERE topic = $1 ORDER BY 1",
            )
            .bind(topic)
            .fetch_all(&pool)
            .await
            .unwrap();
            (restored.states, rows)
        }
    };

    // Partition 1's batch 1 creates k and commits; its batch 2 creates c and changes k, and
    // never commits.
    store.apply(&write(1, 1, &["k"], &[])).await.unwrap();
    pg::mark_committed(pool, topic, &[(1, fences[1], 1)])
        .await
        .unwrap();
    store.apply(&write(1, 2, &["c", "k"], &[])).await.unwrap();
    let (states, rows) = restore(1).await;
    let k = json!({ "of": "k", "hold": null });
    assert_eq!(states, vec![k.clone()], "only k has a state to load");
    assert_eq!(
        rows,
        vec![
            ("c".into(), 1, 1, None),
            ("k".into(), 1, 1, Some(k.clone()))
        ],
        "c stays partition 1's, without state; k is back to batch 1"
    );

    // Partition 0 may not take c, and may forward its records to partition 1.
    let e = store
        .apply(&write(0, 1, &["c"], &[]))
        .await
        .expect_err("c is still owned");
    assert_eq!(
        e.owned_elsewhere().expect("a CC004 refusal"),
        vec![OwnedElsewhere {
            partition: 0,
            contact: "c".into(),
            owner: 1,
        }]
    );
    store
        .apply(&write(0, 1, &[], &[("c", 1)]))
        .await
        .expect("a forward to c's owner is accepted");

    // The owner creates c again; rolled back once more, c is back to no state.
    store.apply(&write(1, 2, &["c"], &[])).await.unwrap();
    let (states, rows) = restore(1).await;
    assert_eq!(states, vec![k.clone()]);
    assert_eq!(
        rows,
        vec![
            ("c".into(), 1, 1, None),
            ("k".into(), 1, 1, Some(k.clone()))
        ]
    );
    store.apply(&write(1, 2, &["c"], &[])).await.unwrap();
    pg::mark_committed(pool, topic, &[(1, fences[1], 2)])
        .await
        .unwrap();
    let (states, _) = restore(2).await;
    assert_eq!(states, vec![json!({ "of": "c", "hold": null }), k]);
}

/// One batch holds records of a contact from the partition that owns it and from a lower one
/// (a producer's partitioner changed while the processor was stopped). The owner keeps the
/// contact and the lower partition forwards to it: no partition learns a wrong owner (taking
/// the lowest partition whatever PostgreSQL said made partition 1 forward to 0 while 0,
/// refused, forwarded back to 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_on_its_owner_and_a_lower_partition_in_one_batch_stays_with_its_owner() {
    use crate::common::process::read_log;
    let env = TestEnv::new("own_batch", 2).await;
    let mut cfg = env.config.clone();
    // The restarted processor's first batch holds what both partitions have waiting.
    cfg.batch.max_linger = Duration::from_millis(1_000);
    let log = |name: &str| crate::failures::log_path(&env, name);
    let proc = Processor::spawn(&cfg, log("run1"));
    produce_at(&cfg, &[(1, intent("x-1", "x", 1))]).await;
    caught_up(&cfg, Duration::from_secs(60)).await;
    assert!(proc.terminate(Duration::from_secs(30)));

    let mut records = vec![
        (0, intent("x-2", "x", 2)),
        (1, intent("x-3", "x", 3)),
        (0, intent("x-4", "x", 4)),
    ];
    for c in 0..10 {
        let contact = format!("y{c}");
        records.push((c % 2, intent(&format!("{contact}-1"), &contact, 1)));
    }
    produce_at(&cfg, &records).await;
    let proc = Processor::spawn(&cfg, log("run2"));
    caught_up(&cfg, Duration::from_secs(90)).await;
    assert!(proc.terminate(Duration::from_secs(30)));

    let learnt: Vec<(i64, i64)> = read_log(&log("run2"))
        .iter()
        .filter(|l| {
            l["message"] == "contact owned by another partition: its records are forwarded there"
        })
        .map(|l| {
            (
                l["partition"].as_i64().unwrap(),
                l["owner"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        learnt,
        vec![(0, 1)],
        "partition 0 learns that 1 owns x, once"
    );
    let fx = effects(&read_all(&cfg, &cfg.kafka.side_effects_topic));
    let x = sequences_of(&fx, "x");
    assert_eq!(x, vec![("x-1", 1), ("x-2", 2), ("x-3", 3), ("x-4", 4)]);
    assert_eq!(fx.len(), 14);
    let report = verify_report(&cfg, "").await;
    assert!(report.ok, "{:?}", report.violations);
}

/// The owner's creation of a contact is rolled back (its Kafka commit never returns, the
/// producer is given up and the partition restored) after another partition learnt that owner
/// and forwarded records to it. A later record on that partition must still go to the owner,
/// after the ones forwarded before it: were the rolled-back creation to free the contact, the
/// forwarding partition would take it with that later record, numbered before the earlier
/// ones still waiting in the owner's log (R2: an assigned intent is numbered after those sent
/// before it to the same partition).
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_creation_keeps_the_contact_with_its_owner() {
    use crate::common::process::{rolled_back_transitions, split_two_partitions, wait_for_log};
    let env = TestEnv::new("own_rollback", 2).await;
    let mut cfg = env.config.clone();
    cfg.kafka.operation_timeout = Duration::from_secs(2);
    let log = |name: &str| crate::failures::log_path(&env, name);
    // b takes both partitions and gives each its first recovery point; then a joins, takes
    // one, and its first transaction (r-1's batch) holds in send_offsets_to_transaction until
    // it is given up; its next batch (the replay after the restore) is held 15 s, long enough
    // for b to see r-4 first.
    let mut cfg_b = cfg.clone();
    cfg_b.instance_id = format!("{}-b", env.name);
    let b = Processor::spawn(&cfg_b, log("b"));
    wait_for_log(
        &log("b"),
        Duration::from_secs(60),
        "b's recovery points",
        |lines| {
            let first = |l: &&serde_json::Value| {
                l["message"] == "recovery point committed to Kafka (it had none for this partition)"
            };
            (lines.iter().filter(first).count() == 2).then_some(())
        },
    )
    .await;
    let a = Processor::spawn_with_env(
        &cfg,
        log("a"),
        &[(
            "FAILPOINTS",
            "kafka-send-offsets=1*pause;engine-process=1*off->1*sleep(15000)",
        )],
    );
    let (owner, other) = split_two_partitions(&a, &b).await;
    let pool = env.store().await;
    let owner_of_r = || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i32>("SELECT partition FROM cc_contact WHERE contact_id = 'r'")
                .fetch_optional(&pool)
                .await
                .unwrap()
        }
    };

    produce_at(&cfg, &[(owner, intent("r-1", "r", 0))]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while owner_of_r().await != Some(owner) {
        assert!(Instant::now() < deadline, "a never wrote r");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // a's batch is written to PostgreSQL, its Kafka commit held: b learns that a owns r and
    // forwards r's next records there, in committed transactions.
    produce_at(
        &cfg,
        &[
            (other, intent("r-2", "r", 0)),
            (other, intent("r-3", "r", 0)),
        ],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let forwarded: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM cc_transition t
               JOIN cc_partition p ON p.topic = t.topic AND p.partition = t.partition
              WHERE t.contact_id = 'r' AND t.to_state = 'forwarded'
                AND t.batch_no <= p.committed_batch",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if forwarded == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "b never forwarded r-2 and r-3");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // a gives its held transaction up and restores its partition: r's creation is rolled back.
    wait_for_log(
        &log("a"),
        Duration::from_secs(60),
        "a rolls back",
        |lines| (rolled_back_transitions(lines, |l| l["partition"] == owner) > 0).then_some(()),
    )
    .await;
    assert_eq!(
        owner_of_r().await,
        Some(owner),
        "the rolled-back creation leaves r with its owner"
    );

    produce_at(&cfg, &[(other, intent("r-4", "r", 0))]).await;
    caught_up(&cfg, Duration::from_secs(90)).await;
    let fx = effects(&read_all(&cfg, &cfg.kafka.side_effects_topic));
    assert_eq!(fx.len(), 4, "r's four effects, nothing else");
    assert_eq!(
        sequences_of(&fx, "r"),
        vec![("r-1", 1), ("r-2", 2), ("r-3", 3), ("r-4", 4)],
        "r-4 is numbered after r-2 and r-3, sent before it to the same partition"
    );
    let report = verify_report(&cfg, "").await;
    assert!(report.ok, "{:?}", report.violations);
    for p in [a, b] {
        let log = p.log.clone();
        assert!(p.terminate(Duration::from_secs(30)), "{}", log.display());
    }
}
