//! Operator changes to the group's offsets (contract §5 "Operator changes"): resetting them with
//! the standard Kafka tool to the earliest or the latest offset never rolls committed history
//! back and never emits an effect twice; a partition whose last batch PostgreSQL cannot confirm
//! refuses to start, with a clear error, until `causal-commit recovery-point resolve`.

use std::time::{Duration, Instant};

use crate::common::process::{cli, read_log, rolled_back_transitions, Processor};
use crate::common::*;
use causal_commit::config::Config;
use causal_commit::demo::{self, ProduceOptions};

fn workload(count: usize, contacts: usize, prefix: &str, seed: u64) -> ProduceOptions {
    ProduceOptions {
        count,
        contacts,
        clinics: 5,
        producers: 2,
        rate: 0,
        strict_fraction: 0.5,
        duplicate_fraction: 0.0,
        invalid: 0,
        seed,
        prefix: prefix.to_string(),
    }
}

async fn caught_up(config: &Config) {
    let c = config.clone();
    tokio::task::spawn_blocking(move || demo::wait_caught_up(&c, Duration::from_secs(120)))
        .await
        .unwrap()
        .expect("the processor catches up");
}

async fn transitions(config: &Config) -> i64 {
    let pool = sqlx::PgPool::connect(&database_url()).await.unwrap();
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {}.cc_transition",
        config.postgres.schema
    ))
    .fetch_one(&pool)
    .await
    .unwrap()
}

/// `kafka-consumer-groups --reset-offsets ... --execute` with the Kafka tool, retried while the
/// group still has its (static) member.
fn reset_offsets(config: &Config, to: &str) {
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/stack.sh");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = std::process::Command::new("bash")
            .arg(&script)
            .args(["kafka-consumer-groups", "--group", &config.kafka.group_id])
            .args([
                "--topic",
                &config.kafka.intents_topic,
                "--reset-offsets",
                to,
                "--execute",
            ])
            .output()
            .expect("run the Kafka tool");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        if out.status.success() && !text.contains("Error") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "resetting offsets failed: {text}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The committed offsets now carry no recovery point.
fn assert_no_recovery_points(config: &Config) {
    let points = causal_commit::pipeline::read::committed_points(config).unwrap();
    assert!(!points.is_empty());
    for (p, c) in points {
        assert_eq!(
            c.recovery,
            Ok(None),
            "partition {p} still has a recovery point"
        );
    }
}

async fn verified(config: &Config, intents: usize) {
    let report = verify_report(config, "").await;
    assert!(report.ok, "{:?}", report.violations);
    assert_eq!(
        report.committed, intents,
        "every intent committed exactly once"
    );
}

fn log_of(env: &TestEnv, run: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("{}-{run}.log", env.name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_reset_to_earliest_or_latest_lose_no_history_and_emit_nothing_twice() {
    let env = TestEnv::new("reset", 3).await;
    let cfg = env.config.clone();
    let proc = Processor::spawn(&cfg, log_of(&env, "run1"));
    demo::produce(&cfg, &workload(900, 300, "r", 1))
        .await
        .unwrap();
    caught_up(&cfg).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    let history = transitions(&cfg).await;

    // Reset to the earliest offset: the processor resumes where its durable state is, decides
    // nothing again and rolls nothing back.
    let c = cfg.clone();
    tokio::task::spawn_blocking(move || {
        reset_offsets(&c, "--to-earliest");
        assert_no_recovery_points(&c);
    })
    .await
    .unwrap();
    let log = log_of(&env, "run2");
    let proc = Processor::spawn(&cfg, log.clone());
    demo::produce(&cfg, &workload(300, 100, "s", 2))
        .await
        .unwrap();
    caught_up(&cfg).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    let lines = read_log(&log);
    let rolled_back = rolled_back_transitions(&lines, |_| true);
    assert_eq!(rolled_back, 0, "committed history is never rolled back");
    assert!(lines.iter().any(|l| l["message"]
        .as_str()
        .unwrap_or("")
        .contains("resuming where the durable state is")));
    let after_earliest = transitions(&cfg).await;
    assert!(after_earliest > history, "the new intents were processed");

    // Intents produced while the processor is stopped, then offsets reset to the latest
    // offset: nothing is skipped either, the durable state says where the partition is.
    demo::produce(&cfg, &workload(300, 100, "t", 3))
        .await
        .unwrap();
    let c = cfg.clone();
    tokio::task::spawn_blocking(move || reset_offsets(&c, "--to-latest"))
        .await
        .unwrap();
    let proc = Processor::spawn(&cfg, log_of(&env, "run3"));
    caught_up(&cfg).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    verified(&cfg, 1_500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_whose_last_batch_is_unconfirmed_refuses_to_start_until_resolved() {
    let env = TestEnv::new("refuse", 1).await;
    let cfg = env.config.clone();
    let proc = Processor::spawn(&cfg, log_of(&env, "run1"));
    demo::produce(&cfg, &workload(60, 20, "u", 4))
        .await
        .unwrap();
    caught_up(&cfg).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    let history = transitions(&cfg).await;

    // As after a crash between a Kafka commit and PostgreSQL learning of it, followed by an
    // offset reset: the last batch's fate is unknown to both stores.
    let pool = sqlx::PgPool::connect(&database_url()).await.unwrap();
    sqlx::query(&format!(
        "UPDATE {}.cc_partition SET committed_batch = last_batch - 1",
        cfg.postgres.schema
    ))
    .execute(&pool)
    .await
    .unwrap();
    let c = cfg.clone();
    tokio::task::spawn_blocking(move || reset_offsets(&c, "--to-earliest"))
        .await
        .unwrap();

    let log = log_of(&env, "run2");
    let proc = Processor::spawn(&cfg, log.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    let refused = loop {
        let refusal = read_log(&log).into_iter().find(|l| {
            l["message"] == "partition not restored yet; paused"
                && l["error"]
                    .as_str()
                    .unwrap_or("")
                    .contains("refuses to start")
        });
        if let Some(r) = refusal {
            break r;
        }
        assert!(Instant::now() < deadline, "the partition never refused");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let error = refused["error"].as_str().unwrap().to_string();
    assert!(
        error.contains("recovery-point resolve"),
        "names the way out: {error}"
    );
    assert_eq!(
        transitions(&cfg).await,
        history,
        "nothing rolled back or decided again"
    );

    // The way out: the batch's outputs are on the topics, so it committed.
    let (ok, out, err) = cli(&cfg, &["recovery-point", "resolve", "--partition", "0"]);
    assert!(ok, "resolve: {out} {err}");
    assert!(out.contains("Committed"), "{out}");
    demo::produce(&cfg, &workload(30, 10, "v", 5))
        .await
        .unwrap();
    caught_up(&cfg).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    verified(&cfg, 90).await;
}
