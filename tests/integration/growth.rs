//! Partitions added to the intents topic (contract R1): one sequence per contact whatever the
//! partition count, new partitions consumed without a restart, and two instances sharing them.

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
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .create()
        .expect("admin client");
    let results = admin
        .create_partitions(
            &[NewPartitions::new(&config.kafka.intents_topic, to)],
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
