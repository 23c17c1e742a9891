//! The processor's own stalls never time a contact out (contract R7: the wait counts only time
//! during which the partition was being consumed and caught up), and a partition at its bound
//! is paused, lets the others flow, and drains when its missing predecessors arrive.

use std::time::{Duration, Instant};

use prost::Message as _;
use rdkafka::producer::FutureRecord;

use crate::common::process::{read_log, stack, Processor};
use crate::common::*;
use causal_commit::config::Config;
use causal_commit::proto::Intent;

const WAIT: Duration = Duration::from_secs(5);

/// Produces to one partition, keyed by contact.
async fn produce_to(config: &Config, partition: i32, intents: &[Intent]) {
    let p = producer(config);
    for i in intents {
        let value = i.encode_to_vec();
        let r = FutureRecord::to(&config.kafka.intents_topic)
            .partition(partition)
            .key(i.contact_id.as_bytes())
            .payload(&value);
        p.send(r, Duration::from_secs(10)).await.expect("delivered");
    }
}

/// Waits until PostgreSQL shows `contact` with `n` waiting intents.
async fn waiting(config: &Config, contact: &str, n: i32) {
    let pool = sqlx::PgPool::connect(&database_url()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let w: Option<i32> = sqlx::query_scalar(&format!(
            "SELECT waiting FROM {}.cc_contact WHERE contact_id = $1",
            config.postgres.schema
        ))
        .bind(contact)
        .fetch_optional(&pool)
        .await
        .unwrap_or(None);
        if w == Some(n) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{contact} never had {n} waiting (has {w:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The contact's effects in order, and every review of the run.
async fn outcome(config: &Config, contact: &str, effects_expected: usize) -> (Vec<u64>, usize) {
    let fx = effects(
        &wait_for(
            config,
            &config.kafka.side_effects_topic,
            effects_expected,
            Duration::from_secs(60),
        )
        .await,
    );
    let seqs = fx
        .iter()
        .filter(|e| e.contact_id == contact)
        .map(|e| e.commit_sequence)
        .collect();
    let reviews = read_all(config, &config.kafka.manual_review_topic).len();
    (seqs, reviews)
}

fn config_with_short_wait(env: &TestEnv) -> Config {
    let mut cfg = env.config.clone();
    cfg.sequencer.wait_timeout = WAIT;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_longer_than_the_wait_timeout_does_not_time_a_contact_out() {
    let env = TestEnv::exclusive("stall_pg", 1).await;
    let cfg = config_with_short_wait(&env);
    let running = start(std::sync::Arc::new(cfg.clone()));
    produce_to(&cfg, 0, &[intent("x-2", "x", 2)]).await;
    waiting(&cfg, "x", 1).await;
    stack("stop", "postgres");
    let down = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    produce_to(&cfg, 0, &[intent("x-1", "x", 1)]).await;
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(down.elapsed())).await;
    stack("start", "postgres");
    let (seqs, reviews) = outcome(&cfg, "x", 2).await;
    running.stop().await;
    assert_eq!(seqs, vec![1, 2], "both committed, in order");
    assert_eq!(reviews, 0, "no WAIT_TIMEOUT, no hold");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_stopped_longer_than_the_wait_timeout_does_not_time_a_contact_out() {
    let env = TestEnv::new("stall_stop", 1).await;
    let cfg = config_with_short_wait(&env);
    let log = std::env::temp_dir().join(format!("{}-run.log", env.name));
    let proc = Processor::spawn(&cfg, log.clone());
    produce_to(&cfg, 0, &[intent("y-2", "y", 2)]).await;
    waiting(&cfg, "y", 1).await;
    assert!(proc.terminate(Duration::from_secs(30)), "clean stop");
    let stopped = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    produce_to(&cfg, 0, &[intent("y-1", "y", 1)]).await;
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(stopped.elapsed())).await;
    let proc = Processor::spawn(&cfg, log);
    let (seqs, reviews) = outcome(&cfg, "y", 2).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    assert_eq!(seqs, vec![1, 2], "both committed, in order");
    assert_eq!(reviews, 0, "no WAIT_TIMEOUT, no hold");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_paused_at_its_bound_does_not_time_its_contacts_out() {
    let env = TestEnv::new("stall_bound", 1).await;
    let mut cfg = config_with_short_wait(&env);
    cfg.sequencer.max_pending_per_contact = 2;
    cfg.sequencer.max_pending_per_partition = 3;
    cfg.sequencer.resume_pending_per_partition = 1;
    let log = std::env::temp_dir().join(format!("{}-run.log", env.name));
    let proc = Processor::spawn(&cfg, log.clone());
    // Three contacts wait for their sequence 1: the partition is at its bound.
    let gaps: Vec<Intent> = ["a", "b", "c"]
        .iter()
        .map(|c| intent(&format!("{c}-2"), c, 2))
        .collect();
    produce_to(&cfg, 0, &gaps).await;
    waiting(&cfg, "c", 1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The predecessors, produced while the partition is paused, come 10 s after the gaps.
    let firsts: Vec<Intent> = ["a", "b", "c"]
        .iter()
        .map(|c| intent(&format!("{c}-1"), c, 1))
        .collect();
    produce_to(&cfg, 0, &firsts).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let fx = effects(
        &wait_for(
            &cfg,
            &cfg.kafka.side_effects_topic,
            6,
            Duration::from_secs(60),
        )
        .await,
    );
    let reviews = read_all(&cfg, &cfg.kafka.manual_review_topic).len();
    assert!(proc.terminate(Duration::from_secs(30)));
    let paused = read_log(&log)
        .iter()
        .any(|l| l["message"] == "partition paused: backlog at its bound");
    assert!(paused, "the partition reached its bound");
    for (contact, seqs) in by_contact(&fx) {
        let seqs: Vec<u64> = seqs.iter().map(|e| e.commit_sequence).collect();
        assert_eq!(seqs, vec![1, 2], "contact {contact} in order");
    }
    assert_eq!(fx.len(), 6);
    assert_eq!(reviews, 0, "no WAIT_TIMEOUT, no hold");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_at_its_bound_pauses_while_the_others_flow_and_drains_when_its_predecessors_arrive(
) {
    let env = TestEnv::new("bound", 2).await;
    let mut cfg = env.config.clone();
    // The bound in bytes: five waiting records of about 1.1 KB reach it, far below the count
    // bound (which the test above exercises).
    cfg.limits.max_record_bytes = 4_000;
    cfg.limits.max_payload_bytes = 3_000;
    cfg.sequencer.max_pending_bytes_per_partition = 5_000;
    cfg.sequencer.resume_pending_bytes_per_partition = 2_000;
    let log = std::env::temp_dir().join(format!("{}-run.log", env.name));
    let proc = Processor::spawn(&cfg, log.clone());
    let gaps: Vec<Intent> = (0..5)
        .map(|k| {
            let mut i = intent(&format!("g{k}-2"), &format!("g{k}"), 2);
            i.payload = vec![b'p'; 1_000].into();
            i
        })
        .collect();
    produce_to(&cfg, 0, &gaps).await;
    waiting(&cfg, "g4", 1).await;
    // Partition 0 is at its bound; partition 1 flows.
    let others: Vec<Intent> = (1..=3u64)
        .flat_map(|seq| (0..3).map(move |k| intent(&format!("o{k}-{seq}"), &format!("o{k}"), seq)))
        .collect();
    produce_to(&cfg, 1, &others).await;
    let fx = effects(
        &wait_for(
            &cfg,
            &cfg.kafka.side_effects_topic,
            9,
            Duration::from_secs(30),
        )
        .await,
    );
    assert_eq!(
        fx.len(),
        9,
        "the other partition flows while one is at its bound"
    );
    let log_has = |what: &str| read_log(&log).iter().any(|l| l["message"] == what);
    assert!(log_has("partition paused: backlog at its bound"));
    assert!(!log_has("partition resumed: backlog below its bound"));
    // The missing predecessors arrive: it drains and resumes, nothing lost.
    let firsts: Vec<Intent> = (0..5)
        .map(|k| intent(&format!("g{k}-1"), &format!("g{k}"), 1))
        .collect();
    produce_to(&cfg, 0, &firsts).await;
    let fx = effects(
        &wait_for(
            &cfg,
            &cfg.kafka.side_effects_topic,
            19,
            Duration::from_secs(60),
        )
        .await,
    );
    assert!(proc.terminate(Duration::from_secs(30)));
    assert!(log_has("partition resumed: backlog below its bound"));
    assert_eq!(fx.len(), 19, "every intent committed once");
    for (contact, seqs) in by_contact(&fx) {
        let seqs: Vec<u64> = seqs.iter().map(|e| e.commit_sequence).collect();
        let expected: Vec<u64> = if contact.starts_with('g') {
            vec![1, 2]
        } else {
            vec![1, 2, 3]
        };
        assert_eq!(seqs, expected, "contact {contact} in order");
    }
    let report = verify_report(&cfg, "").await;
    assert!(report.ok, "{:?}", report.violations);
}
