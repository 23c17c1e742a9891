//! Partitions added to the intents topic (contract R1): one sequence per contact whatever the
//! partition count, new partitions consumed without a restart, and two instances sharing them.
//! Partitions added to the side-effects topic: each contact's effects stay on their partition.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;

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
    let log = |name: &str| std::env::temp_dir().join(format!("{}-{name}.log", env.name));
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
    let log = |name: &str| std::env::temp_dir().join(format!("{}-{name}.log", env.name));
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
