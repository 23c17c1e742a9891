//! Operator changes to the group's offsets (contract §5 "Operator changes"): resetting them with
//! the standard Kafka tool to the earliest or the latest offset never rolls committed history
//! back and never emits an effect twice; a partition whose last batch PostgreSQL cannot confirm
//! refuses to start, with a clear error, until `causal-commit recovery-point resolve`; and the
//! store restored from a backup older than the group's last commit refuses, deciding nothing,
//! until its latest state is back.

use std::time::{Duration, Instant};

use crate::common::process::{cli, read_log, rolled_back_transitions, wait_for_log, Processor};
use crate::common::*;
use causal_commit::config::Config;
use causal_commit::demo::{self, ProduceOptions};

/// How long a run may take to catch up.
const CATCH_UP: Duration = Duration::from_secs(120);

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

/// Waits until `partition`'s last batch is written to PostgreSQL and not known committed (a
/// fail point holds its Kafka transaction open).
#[cfg(feature = "failpoints")]
async fn written_not_committed(config: &Config, partition: i32) {
    wait_for_value(
        &format!(
            "SELECT last_batch > committed_batch FROM {}.cc_partition WHERE partition = $1",
            config.postgres.schema
        ),
        partition,
        Duration::from_secs(60),
        &format!("partition {partition}: no batch was ever written"),
        |unconfirmed| unconfirmed == Some(&true),
    )
    .await;
}

/// [`reset_offsets_blocking`] off the async runtime.
async fn reset_offsets(config: &Config, to: &'static str) {
    let c = config.clone();
    tokio::task::spawn_blocking(move || reset_offsets_blocking(&c, to))
        .await
        .unwrap();
}

/// `kafka-consumer-groups --reset-offsets ... --execute` with the Kafka tool, retried while the
/// group still has its (static) member.
fn reset_offsets_blocking(config: &Config, to: &str) {
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
    caught_up(&cfg, CATCH_UP).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    let history = transitions(&cfg).await;

    // Reset to the earliest offset: the processor resumes where its durable state is, decides
    // nothing again and rolls nothing back.
    let c = cfg.clone();
    tokio::task::spawn_blocking(move || {
        reset_offsets_blocking(&c, "--to-earliest");
        assert_no_recovery_points(&c);
    })
    .await
    .unwrap();
    let log = log_of(&env, "run2");
    let proc = Processor::spawn(&cfg, log.clone());
    demo::produce(&cfg, &workload(300, 100, "s", 2))
        .await
        .unwrap();
    caught_up(&cfg, CATCH_UP).await;
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
    reset_offsets(&cfg, "--to-latest").await;
    let log = log_of(&env, "run3");
    let proc = Processor::spawn(&cfg, log.clone());
    // The reset put the committed offsets at the end: "caught up" means something only once
    // the processor has moved them back to where its durable state resumes.
    wait_for_log(
        &log,
        Duration::from_secs(60),
        "the recovery points were never committed",
        |lines| {
            let committed = lines.iter().filter(|l| {
                l["message"] == "recovery point committed to Kafka (it had none for this partition)"
            });
            (committed.count() >= 3).then_some(())
        },
    )
    .await;
    caught_up(&cfg, CATCH_UP).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    verified(&cfg, 1_500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_whose_last_batch_is_unconfirmed_refuses_to_start_until_resolved() {
    unconfirmed_then_resolved("refuse", 0).await;
}

/// The same, with PostgreSQL's clock five minutes ahead of the processor's (NTP gone wrong on
/// one of the two hosts): the audit rows carry PostgreSQL's time, the output records the
/// processor's. Before, `resolve` looked for the last batch's outputs from a minute before
/// PostgreSQL's time of its write, after every record of it: it found none, called the
/// committed batch aborted and rolled it back, and the restart emitted its effects again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolve_finds_the_last_batchs_outputs_whatever_postgresqls_clock_said() {
    unconfirmed_then_resolved("skewresolve", 5).await;
}

/// Every partition has an offset 0. Partition 1's first record, invalid, is reviewed and
/// committed; then partition 0's first batch, an invalid record and an intent, is written to
/// PostgreSQL and the processor is killed before its Kafka transaction commits, and the
/// group's offsets are reset. `resolve` finds neither output of that batch (its transaction
/// never committed): it is aborted, and the replay emits both. Before, `resolve` matched a
/// review by its source offset alone: partition 1's review of offset 0 read as this batch's,
/// the batch was called committed, and its review and effect were never emitted.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolve_never_takes_another_partitions_review_for_the_batchs_own() {
    let env = TestEnv::new("resolveother", 2).await;
    let cfg = env.config.clone();
    let invalid = |contact: &str| causal_commit::proto::Intent {
        intent_id: String::new(),
        ..intent("none", contact, 0)
    };
    let proc = Processor::spawn(&cfg, log_of(&env, "run1"));
    produce_at(&cfg, &[(1, invalid("b1")), (1, intent("p1-i1", "c1", 0))]).await;
    let (_, rv) = wait_for_outputs(&cfg, 1, 1, CATCH_UP).await;
    assert_eq!((rv[0].source_partition, rv[0].source_offset), (1, 0));
    assert!(proc.terminate(Duration::from_secs(30)));

    // Partition 0's batch is written to PostgreSQL, its transaction held open, and the
    // processor killed.
    let proc = Processor::spawn_with_env(
        &cfg,
        log_of(&env, "run2"),
        &[("FAILPOINTS", "kafka-send-offsets=sleep(30000)")],
    );
    produce_at(&cfg, &[(0, invalid("b0")), (0, intent("p0-i1", "c0", 0))]).await;
    written_not_committed(&cfg, 0).await;
    proc.kill9();
    reset_offsets(&cfg, "--to-earliest").await;

    let log = log_of(&env, "run3");
    let proc = Processor::spawn(&cfg, log.clone());
    refused(&log, "refuses to start", &[0]).await;
    let (ok, out, err) = cli(&cfg, &["recovery-point", "resolve", "--partition", "0"]);
    assert!(ok, "resolve: {out} {err}");
    assert!(out.contains("Aborted"), "{out}");
    let (fx, rv) = wait_for_outputs(&cfg, 2, 2, CATCH_UP).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    let mut reviewed: Vec<(i32, i64)> = (rv.iter())
        .map(|r| (r.source_partition, r.source_offset))
        .collect();
    reviewed.sort_unstable();
    assert_eq!(
        reviewed,
        [(0, 0), (1, 0)],
        "each invalid record reviewed once"
    );
    let mut ids: Vec<&str> = fx.iter().map(|e| e.intent_id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["p0-i1", "p1-i1"]);
    verified(&cfg, 2).await;
}

/// A one-partition run whose last batch is made unconfirmed and the group's offsets reset to
/// the earliest; the restart refuses, naming the way out, `recovery-point resolve` finds the
/// batch's outputs on the topics (so it committed), and the partition goes on: every intent
/// commits once, in order. `db_clock_ahead_min` moves every audit row's time that far ahead,
/// as PostgreSQL's clock running ahead of the processor's would have written it.
async fn unconfirmed_then_resolved(name: &str, db_clock_ahead_min: i32) {
    let env = TestEnv::new(name, 1).await;
    let cfg = env.config.clone();
    let history = ran_then_unconfirmed(&env, "u", 4).await;
    let pool = sqlx::PgPool::connect(&database_url()).await.unwrap();
    sqlx::query(&format!(
        "UPDATE {}.cc_transition SET at = at + make_interval(mins => $1)",
        cfg.postgres.schema
    ))
    .bind(db_clock_ahead_min)
    .execute(&pool)
    .await
    .unwrap();

    let log = log_of(&env, "run2");
    let proc = Processor::spawn(&cfg, log.clone());
    let errors = refused(&log, "refuses to start", &[0]).await;
    let error = &errors[0];
    assert!(
        error.contains("recovery-point resolve"),
        "names the way out: {error}"
    );
    unchanged_and_refused(&cfg, history).await;

    // The way out: the batch's outputs are on the topics, so it committed.
    let (ok, out, err) = cli(&cfg, &["recovery-point", "resolve", "--partition", "0"]);
    assert!(ok, "resolve: {out} {err}");
    assert!(out.contains("Committed"), "{out}");
    assert!(
        out.contains("committed: the effect of intent") && out.contains(" offset "),
        "names the output it found: {out}"
    );
    demo::produce(&cfg, &workload(30, 10, "v", 5))
        .await
        .unwrap();
    caught_up(&cfg, CATCH_UP).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    assert_eq!(rolled_back_transitions(&read_log(&log), |_| true), 0);
    verified(&cfg, 90).await;
}

/// The output topics' retention (shorter than the time a partition stood refused), or an
/// operator's `kafka-delete-records`, took the last batch's outputs before `resolve` looked
/// for them. Before, finding none, `resolve` called the committed batch aborted, and the
/// restart rolled it back and replayed it: its effects emitted twice. Now it refuses, naming
/// the deleted records, and changes nothing; told `--committed`, the partition goes on with
/// nothing rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolve_never_calls_a_batch_aborted_when_its_outputs_may_have_been_deleted() {
    let env = TestEnv::new("trimresolve", 1).await;
    let cfg = env.config.clone();
    let history = ran_then_unconfirmed(&env, "t", 9).await;
    for topic in [
        &cfg.kafka.side_effects_topic,
        &cfg.kafka.manual_review_topic,
    ] {
        delete_records(&cfg, topic, 0, rdkafka::Offset::End).await;
    }

    let log = log_of(&env, "run2");
    let proc = Processor::spawn(&cfg, log.clone());
    refused(&log, "refuses to start", &[0]).await;
    let (ok, out, err) = cli(&cfg, &["recovery-point", "resolve", "--partition", "0"]);
    assert!(!ok, "resolve cannot tell, and says so: {out}");
    assert!(
        err.contains(&format!(
            "{} partition 0 starts at offset",
            cfg.kafka.side_effects_topic
        )) && err.contains("were deleted")
            && err.contains("nothing was changed")
            && err.contains("--committed or --aborted"),
        "names the deleted records and the way out: {err}"
    );
    unchanged_and_refused(&cfg, history).await;

    // The operator knows (the processor's log said the batch committed): told so, the
    // partition goes on from there, nothing rolled back.
    let (ok, out, err) = cli(
        &cfg,
        &[
            "recovery-point",
            "resolve",
            "--partition",
            "0",
            "--committed",
        ],
    );
    assert!(ok, "resolve --committed: {out} {err}");
    demo::produce(&cfg, &workload(30, 10, "w", 10))
        .await
        .unwrap();
    caught_up(&cfg, CATCH_UP).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    assert_eq!(rolled_back_transitions(&read_log(&log), |_| true), 0);
    let pool = sqlx::PgPool::connect(&database_url()).await.unwrap();
    let committed: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {}.cc_transition
          WHERE to_state = 'committed_causal' AND intent_id LIKE 'w-%'",
        cfg.postgres.schema
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(committed, 30, "the new intents commit once each");
}

/// 60 intents on `env`'s one partition committed (run `run1`, stopped), then, as after a crash
/// between a Kafka commit and PostgreSQL learning of it followed by an offset reset to the
/// earliest, the last batch's fate made unknown to both stores. Returns the audit's row count.
async fn ran_then_unconfirmed(env: &TestEnv, prefix: &str, seed: u64) -> i64 {
    let cfg = &env.config;
    let proc = Processor::spawn(cfg, log_of(env, "run1"));
    demo::produce(cfg, &workload(60, 20, prefix, seed))
        .await
        .unwrap();
    caught_up(cfg, CATCH_UP).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    let history = transitions(cfg).await;
    let pool = sqlx::PgPool::connect(&database_url()).await.unwrap();
    sqlx::query(&format!(
        "UPDATE {}.cc_partition SET committed_batch = last_batch - 1",
        cfg.postgres.schema
    ))
    .execute(&pool)
    .await
    .unwrap();
    reset_offsets(cfg, "--to-earliest").await;
    history
}

/// A refusing owner's restores are retried, each under a new fencing token taken half a second
/// before it asks Kafka and refuses again. Its refusal holds across its own new tokens (a
/// `resolve` in between is not told that no owner refuses), and not across another owner's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_holds_across_its_owners_retries_and_not_across_another_owners() {
    use causal_commit::store::postgres as pg;
    let env = TestEnv::new("refusalkept", 1).await;
    let cfg = &env.config;
    let pool = pg::pool(&cfg.postgres).unwrap();
    let topic = &cfg.kafka.intents_topic;
    let lease = Duration::from_secs(30);
    let refused = || async { pg::batch_views(&pool, topic).await.unwrap()[0].refused };
    let fence = pg::acquire_partition(&pool, topic, 0, "a", lease)
        .await
        .unwrap()
        .expect("a new lease");
    // What a refused restore records (`restore_partition`).
    sqlx::query("UPDATE cc_partition SET refused_fence = $2 WHERE topic = $1")
        .bind(topic)
        .bind(fence as i64)
        .execute(&pool)
        .await
        .unwrap();
    assert!(refused().await);
    let retry = pg::acquire_partition(&pool, topic, 0, "a", lease)
        .await
        .unwrap()
        .expect("its own lease back");
    assert!(retry > fence);
    assert!(refused().await, "the owner's retry still refuses");
    assert!(
        pg::acquire_partition(&pool, topic, 0, "b", lease)
            .await
            .unwrap()
            .is_none(),
        "another owner waits for the live lease"
    );
    pg::release_partition(&pool, topic, 0, retry).await.unwrap();
    pg::acquire_partition(&pool, topic, 0, "b", lease)
        .await
        .unwrap()
        .expect("the released lease");
    assert!(!refused().await, "another owner has not refused (yet)");
}

/// The audit still holds `history` rows (nothing rolled back or decided again), and partition
/// 0 is still refused by its owner (`recovery-point show`).
async fn unchanged_and_refused(cfg: &Config, history: i64) {
    assert_eq!(
        transitions(cfg).await,
        history,
        "nothing rolled back or decided again"
    );
    let (ok, out, err) = cli(cfg, &["recovery-point", "show"]);
    assert!(ok, "show: {err}");
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown[0]["refused_by_owner"], true, "refused: {shown}");
}

/// A tired operator runs `recovery-point resolve` on a partition that does not refuse: its
/// owner is running, and its last batch is written to PostgreSQL while its Kafka transaction
/// has not committed yet (held 8 s here by a fail point, as a slow broker does). Nothing of
/// that batch is visible on the output topics, so a resolve judging from them alone would
/// call it aborted and roll PostgreSQL's record of it back under a transaction that then
/// commits. The command is refused instead, naming the running owner, and changes nothing:
/// every intent commits once, in order, before and after a restart (a restore).
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolve_of_a_partition_its_owner_is_running_is_refused_and_changes_nothing() {
    let env = TestEnv::new("liveresolve", 1).await;
    let cfg = env.config.clone();
    let proc = Processor::spawn_with_env(
        &cfg,
        log_of(&env, "run1"),
        &[("FAILPOINTS", "kafka-send-offsets=sleep(8000)")],
    );
    demo::produce(&cfg, &workload(40, 10, "h", 6))
        .await
        .unwrap();
    // The partition's last batch is written to PostgreSQL, its transaction still open.
    written_not_committed(&cfg, 0).await;
    let (ok, out, err) = cli(&cfg, &["recovery-point", "resolve", "--partition", "0"]);
    assert!(!ok, "the resolve is refused: {out}");
    assert!(
        err.contains("no owner refuses the partition") && err.contains("nothing was changed"),
        "names why: {err}"
    );
    caught_up(&cfg, CATCH_UP).await;
    demo::produce(&cfg, &workload(20, 10, "i", 7))
        .await
        .unwrap();
    caught_up(&cfg, CATCH_UP).await;
    let (ok, out, err) = cli(&cfg, &["recovery-point", "show"]);
    assert!(ok, "show: {err}");
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown[0]["refused_by_owner"], false, "{shown}");
    assert!(proc.terminate(Duration::from_secs(30)));
    assert!(
        !read_log(&log_of(&env, "run1"))
            .iter()
            .any(|l| l["message"] == "partition not restored yet; paused"),
        "the partition never refused"
    );
    verified(&cfg, 60).await;

    // A restart restores the partition from what PostgreSQL records: nothing to roll back.
    let log = log_of(&env, "run2");
    let proc = Processor::spawn(&cfg, log.clone());
    demo::produce(&cfg, &workload(20, 10, "j", 8))
        .await
        .unwrap();
    caught_up(&cfg, CATCH_UP).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    assert_eq!(rolled_back_transitions(&read_log(&log), |_| true), 0);
    verified(&cfg, 80).await;
}

/// Deletes the intents topic and creates it again with `partitions` (a tired operator
/// "cleaning" it), retrying the creation while the deletion completes.
async fn recreate_intents_topic(config: &Config, partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .create()
        .expect("admin client");
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let topic = config.kafka.intents_topic.as_str();
    delete_topic(config, topic).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        let created = admin.create_topics(&[new], &opts).await.expect("create");
        if created.iter().all(|r| r.is_ok()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "topic not created again: {created:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The partitions of `log` refused with an error containing `cause`, once each of `partitions`
/// was (within a minute).
async fn refused(log: &std::path::Path, cause: &str, partitions: &[i64]) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let lines = read_log(log);
        let errors: Vec<(i64, String)> = lines
            .iter()
            .filter(|l| l["message"] == "partition not restored yet; paused")
            .filter_map(|l| Some((l["partition"].as_i64()?, l["error"].as_str()?.to_string())))
            .filter(|(_, e)| e.contains(cause))
            .collect();
        if partitions
            .iter()
            .all(|p| errors.iter().any(|(q, _)| q == p))
        {
            return errors.into_iter().map(|(_, e)| e).collect();
        }
        assert!(
            Instant::now() < deadline,
            "partitions {partitions:?} never refused with {cause:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `kafka-delete-records` with the admin API: the intents partition's records before `offset`
/// go.
async fn delete_records_before(config: &Config, partition: i32, offset: i64) {
    let topic = &config.kafka.intents_topic;
    delete_records(config, topic, partition, rdkafka::Offset::Offset(offset)).await;
}

/// The records of `topic`'s `partition` before `offset` (`Offset::End`: every record) go.
async fn delete_records(config: &Config, topic: &str, partition: i32, offset: rdkafka::Offset) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .create()
        .expect("admin client");
    let mut before = rdkafka::TopicPartitionList::new();
    before
        .add_partition_offset(topic, partition, offset)
        .unwrap();
    let deleted = admin
        .delete_records(
            &before,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("delete records");
    assert!(
        deleted.elements().iter().all(|e| e.error().is_ok()),
        "{deleted:?}"
    );
}

/// `recovery-point resume-at --partition P --earliest`, which must succeed; its output.
fn resume_at_earliest(config: &Config, partition: &str) -> String {
    let args = [
        "recovery-point",
        "resume-at",
        "--partition",
        partition,
        "--earliest",
    ];
    let (ok, out, err) = cli(config, &args);
    assert!(ok, "resume-at {partition}: {out} {err}");
    out
}

/// Effects on the side-effects topic of intents whose id starts with `prefix`.
fn effects_of(config: &Config, prefix: &str) -> usize {
    effects(&read_all(config, &config.kafka.side_effects_topic))
        .iter()
        .filter(|e| e.intent_id.starts_with(prefix))
        .count()
}

async fn verified_prefix(config: &Config, prefix: &str, intents: usize) {
    let report = verify_report(config, prefix).await;
    assert!(report.ok, "{prefix}: {:?}", report.violations);
    assert_eq!(
        report.committed, intents,
        "{prefix}: every intent committed once"
    );
}

/// The intents topic deleted and created again while the processor is stopped (before: the
/// durable state's resume offsets, past the new log's end, were overridden by librdkafka's
/// reset to the beginning, the new records were processed but the old offsets committed, and
/// after the next restart the new records below them were skipped: 83 of 300 intents lost).
/// Now every partition refuses, naming the cause and `recovery-point resume-at`; nothing new is
/// decided until the operator says where to resume; then everything commits, across restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intents_topic_recreated_is_refused_until_an_operator_says_where_to_resume() {
    let env = TestEnv::new("recreate", 2).await;
    let cfg = env.config.clone();
    let proc = Processor::spawn(&cfg, log_of(&env, "run1"));
    demo::produce(&cfg, &workload(600, 60, "w", 11))
        .await
        .unwrap();
    caught_up(&cfg, CATCH_UP).await;
    assert!(proc.terminate(Duration::from_secs(30)));

    recreate_intents_topic(&cfg, 2).await;
    demo::produce(&cfg, &workload(200, 20, "x", 12))
        .await
        .unwrap();
    let log = log_of(&env, "run2");
    let proc = Processor::spawn(&cfg, log.clone());
    let errors = refused(&log, "log ends at offset", &[0, 1]).await;
    assert!(
        errors
            .iter()
            .all(|e| e.contains("recovery-point resume-at")),
        "names the way out: {errors:?}"
    );
    assert_eq!(effects_of(&cfg, "x-"), 0, "nothing decided while refused");
    // The command never skips what a log holds: refused for a point inside the log.
    let (ok, _, err) = cli(
        &cfg,
        &[
            "recovery-point",
            "resume-at",
            "--partition",
            "0",
            "--offset",
            "999999",
        ],
    );
    assert!(!ok && err.contains("not in partition 0's log"), "{err}");

    for p in ["0", "1"] {
        let out = resume_at_earliest(&cfg, p);
        assert!(out.contains("resumes at offset 0"), "{out}");
        let args = [
            "recovery-point",
            "resume-at",
            "--partition",
            p,
            "--earliest",
        ];
        let (ok, _, err) = cli(&cfg, &args);
        assert!(
            !ok && err.contains("still holds"),
            "a second move is refused: {err}"
        );
    }
    caught_up(&cfg, CATCH_UP).await;
    demo::produce(&cfg, &workload(200, 20, "y", 13))
        .await
        .unwrap();
    caught_up(&cfg, CATCH_UP).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    // Produced while stopped, read after a restart from the committed offsets: none skipped.
    demo::produce(&cfg, &workload(200, 20, "z", 14))
        .await
        .unwrap();
    let proc = Processor::spawn(&cfg, log_of(&env, "run3"));
    caught_up(&cfg, CATCH_UP).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    for prefix in ["x-", "y-", "z-"] {
        verified_prefix(&cfg, prefix, 200).await;
    }
}

/// The intents topic deleted and created again while the processor is stopped, and refilled
/// past the old offsets before it starts: offsets alone cannot tell the new log from the old
/// one (before: each partition resumed at the old offsets, and the new records below them were
/// skipped in silence). The topic's id can: every partition refuses, naming both ids and
/// `recovery-point resume-at`, which now moves a point the new log holds; then every new intent
/// commits once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intents_topic_recreated_and_refilled_past_the_old_offsets_is_refused() {
    let env = TestEnv::new("recreate_refill", 2).await;
    let cfg = env.config.clone();
    let proc = Processor::spawn(&cfg, log_of(&env, "run1"));
    demo::produce(&cfg, &workload(200, 20, "w", 31))
        .await
        .unwrap();
    caught_up(&cfg, CATCH_UP).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    let before = causal_commit::pipeline::read::log_ranges(&cfg).unwrap();

    recreate_intents_topic(&cfg, 2).await;
    demo::produce(&cfg, &workload(1_000, 100, "x", 32))
        .await
        .unwrap();
    let after = causal_commit::pipeline::read::log_ranges(&cfg).unwrap();
    for (p, old) in &before {
        let new = &after[p];
        assert!(
            new.high > old.high,
            "partition {p} refilled past its old end ({} > {})",
            new.high,
            old.high
        );
        assert_ne!(old.topic_id, new.topic_id, "a new topic id");
        assert!(new.topic_id.is_some(), "the broker gives topic ids");
    }
    let log = log_of(&env, "run2");
    let proc = Processor::spawn(&cfg, log.clone());
    let errors = refused(&log, "not the one the durable state consumed", &[0, 1]).await;
    let new_id = after[&0].topic_id.unwrap().to_string();
    assert!(
        errors
            .iter()
            .all(|e| e.contains(&new_id) && e.contains("recovery-point resume-at")),
        "names the topic id and the way out: {errors:?}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(effects_of(&cfg, "x-"), 0, "nothing decided while refused");
    for p in ["0", "1"] {
        let out = resume_at_earliest(&cfg, p);
        assert!(out.contains("resumes at offset 0"), "{out}");
    }
    caught_up(&cfg, CATCH_UP).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    verified_prefix(&cfg, "x-", 1_000).await;
}

/// The processor restarted at once with `kafka.intents_topic` changed (a tired operator moving
/// the group to a new topic). Over the same PostgreSQL schema, whose contacts belong to the old
/// topic's partitions, `run` stops at start naming both topics and the ways out (before, every
/// write of those contacts was refused as owned by another partition, again and again). With a
/// schema of its own: the coordinator hands a static member that rejoins a stable group its
/// previous assignment back, the old topic's partitions, without a rebalance. Before, the
/// engine took those partition numbers as the new topic's, restored them, and read nothing of
/// the new topic for as long as it ran. Now it names the stale assignment, waits out its
/// session and joins afresh; every new intent commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_moved_to_another_intents_topic_reads_that_topic() {
    let env = TestEnv::new("moved_topic", 2).await;
    let cfg = env.config.clone();
    let proc = Processor::spawn(&cfg, log_of(&env, "run1"));
    demo::produce(&cfg, &workload(100, 10, "m", 51))
        .await
        .unwrap();
    caught_up(&cfg, CATCH_UP).await;

    let mut moved = cfg.clone();
    moved.kafka.intents_topic = format!("{}-v2", cfg.kafka.intents_topic);
    moved.postgres.schema = format!("{}_v2", cfg.postgres.schema);
    moved.redis.key_prefix = format!("{}:v2", cfg.redis.key_prefix);
    create_topics(&moved, &[(&moved.kafka.intents_topic, 3)]).await;
    // (Refused at start, before it joins the group: the first processor still runs.)
    let mut same_schema = moved.clone();
    same_schema.postgres = cfg.postgres.clone();
    let log = log_of(&env, "same_schema");
    let mut refused = Processor::spawn(&same_schema, log.clone());
    let status = refused.exit_within(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| !s.success()),
        "run stops over a schema of another topic: {status:?}"
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains(&format!(
            "holds the causal sequences of the contacts of intents topic {:?}",
            cfg.kafka.intents_topic
        )) && text.contains("add partitions to"),
        "names the topic and the ways out: {text}"
    );
    migrate_as_owner(&moved).await;
    demo::produce(&moved, &workload(300, 30, "n", 52))
        .await
        .unwrap();
    // Restarted at once, within the first one's session.
    assert!(proc.terminate(Duration::from_secs(30)));
    let log = log_of(&env, "run2");
    let proc = Processor::spawn(&moved, log.clone());
    caught_up(&moved, CATCH_UP).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    let named = read_log(&log).iter().any(|l| {
        l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("the group coordinator assigned a partition of a topic"))
            && l["topic"] == cfg.kafka.intents_topic.as_str()
    });
    assert!(named, "the stale assignment of the old topic is named");
    verified_prefix(&moved, "n-", 300).await;
}

/// The same, with the processor running while the topic is deleted and created again: it
/// never commits the old log's offsets against the new one, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intents_topic_recreated_under_a_running_processor_loses_nothing() {
    let env = TestEnv::new("recreate_live", 1).await;
    let cfg = env.config.clone();
    let proc = intents_topic_replaced_under_a_running_processor(&env, false).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    demo::produce(&cfg, &workload(100, 10, "c", 23))
        .await
        .unwrap();
    let proc = Processor::spawn(&cfg, log_of(&env, "run2"));
    caught_up(&cfg, CATCH_UP).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    verified_prefix(&cfg, "b-", 100).await;
    verified_prefix(&cfg, "c-", 100).await;
}

/// Records deleted before the processor consumed them (retention while it was down, or
/// `kafka-delete-records`): they are gone upstream, and the processor does not step over the
/// hole silently: the partition refuses, naming the deleted offsets, until an operator accepts
/// it with `recovery-point resume-at --earliest`; then the rest commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_deleted_before_they_were_consumed_are_named_until_an_operator_accepts_it() {
    let env = TestEnv::new("deleted", 1).await;
    let cfg = env.config.clone();
    let proc = Processor::spawn(&cfg, log_of(&env, "run1"));
    demo::produce(&cfg, &workload(100, 10, "d", 31))
        .await
        .unwrap();
    caught_up(&cfg, CATCH_UP).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    let resume = causal_commit::pipeline::read::committed_points(&cfg).unwrap()[&0].offset;

    // Assigned sequences only: no intent waits for one that was deleted.
    let assigned = ProduceOptions {
        strict_fraction: 0.0,
        ..workload(100, 10, "e", 32)
    };
    demo::produce(&cfg, &assigned).await.unwrap();
    delete_records_before(&cfg, 0, resume + 40).await;

    let log = log_of(&env, "run2");
    let proc = Processor::spawn(&cfg, log.clone());
    let errors = refused(&log, "log starts at offset", &[0]).await;
    assert!(
        errors[0].contains(&format!("records {resume} to {}", resume + 40)),
        "names the deleted offsets: {}",
        errors[0]
    );
    assert_eq!(effects_of(&cfg, "e-"), 0, "nothing decided while refused");
    resume_at_earliest(&cfg, "0");
    caught_up(&cfg, CATCH_UP).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    verified_prefix(&cfg, "e-", 60).await;
}

/// A tired operator's blue/green: a second deployment of the same store under another group id
/// (the configuration copied with a new `kafka.group_id`), then back to the first. A group's
/// committed recovery points speak only for the batches its own instances wrote: a partition
/// last written under another group is decided by PostgreSQL alone. Found from outside: the
/// first group's points, one batch behind the second group's, read as "that batch aborted", and
/// the second group's committed batch was rolled back and its effects emitted again (67
/// transitions rolled back here); points further behind refused the partition as a mismatch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_under_another_group_and_back_emits_nothing_twice() {
    let env = TestEnv::new("bluegreen", 3).await;
    let blue = env.config.clone();
    let mut green = blue.clone();
    green.kafka.group_id = format!("{}-green", blue.kafka.group_id);
    green.instance_id = format!("{}-green", env.name);

    let proc = Processor::spawn(&blue, log_of(&env, "blue1"));
    demo::produce(&blue, &workload(600, 200, "a", 1))
        .await
        .unwrap();
    caught_up(&blue, CATCH_UP).await;
    assert!(proc.terminate(Duration::from_secs(30)));

    // Intents that wait for the next deployment: green takes them in one batch per partition.
    demo::produce(&blue, &workload(60, 30, "b", 2))
        .await
        .unwrap();
    let proc = Processor::spawn(&green, log_of(&env, "green"));
    caught_up(&green, CATCH_UP).await;
    assert!(proc.terminate(Duration::from_secs(30)));

    // Back to blue, whose committed points are one batch behind on every partition.
    let log = log_of(&env, "blue2");
    let proc = Processor::spawn(&blue, log.clone());
    demo::produce(&blue, &workload(60, 30, "c", 3))
        .await
        .unwrap();
    caught_up(&blue, CATCH_UP).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    let lines = read_log(&log);
    assert_eq!(
        rolled_back_transitions(&lines, |_| true),
        0,
        "the other group's committed batches are never rolled back"
    );
    let took_over = lines
        .iter()
        .filter(|l| l["previous_group"].as_str() == Some(green.kafka.group_id.as_str()))
        .count();
    assert_eq!(
        took_over, 3,
        "each partition says which group wrote it last"
    );
    verified(&blue, 720).await;

    // And green again, its points now many batches behind (before: refused as a mismatch).
    demo::produce(&blue, &workload(60, 30, "d", 4))
        .await
        .unwrap();
    let log = log_of(&env, "green2");
    let proc = Processor::spawn(&green, log.clone());
    caught_up(&green, CATCH_UP).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    assert_eq!(rolled_back_transitions(&read_log(&log), |_| true), 0);
    verified(&blue, 780).await;
}

/// Records deleted before a *running* processor read them (retention past a lagging processor,
/// or `kafka-delete-records`): librdkafka moves the consumer to the log's new start on its own
/// and the records in between are gone; before, the engine went on from there in silence. A
/// fail point holds one batch for 20 s while the consumer may prefetch only about 1 KB; the
/// intents produced meanwhile, one record batch each, are deleted up to 10 before the end.
/// Once the batch goes on, the consumer's next fetch finds its offset gone: the engine names
/// the jump, restores, and the partition refuses naming the deleted offsets until an operator
/// accepts them with `resume-at`; then the rest commits.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_deleted_under_a_running_processor_are_named_until_an_operator_accepts_it() {
    let env = TestEnv::new("deletedlive", 1).await;
    let mut cfg = env.config.clone();
    for (k, v) in [
        ("queued.max.messages.kbytes", "1"),
        ("fetch.message.max.bytes", "1"),
    ] {
        cfg.kafka.client.insert(k, v.to_string());
    }
    // Each the first intent of its own contact, one record batch each.
    let one = |i: usize| {
        let (id, contact) = (format!("b{i}"), format!("c{i}"));
        let value = prost::Message::encode_to_vec(&intent(&id, &contact, 1));
        (0, contact, value, None)
    };
    let log = log_of(&env, "run");
    let proc = Processor::spawn_with_env(
        &cfg,
        log.clone(),
        &[("FAILPOINTS", "engine-process=1*off->1*sleep(20000)")],
    );
    produce_traced(&cfg, &[one(100)]).await;
    caught_up(&cfg, CATCH_UP).await;
    // The next batch is held 20 s; the intents arrive one record batch at a time.
    let batches: Vec<_> = (0..60).map(one).collect();
    produce_traced(&cfg, &batches).await;
    let end = causal_commit::pipeline::read::log_ranges(&cfg).unwrap()[&0].high;
    delete_records_before(&cfg, 0, end - 10).await;
    let lines = read_log(&log);
    assert!(
        !lines
            .iter()
            .any(|l| l["message"] == "shutdown requested: draining the batch in hand"),
        "still running"
    );

    let errors = refused(&log, "log starts at offset", &[0]).await;
    assert!(
        errors[0].contains(&format!("to {}", end - 10)),
        "names the deleted offsets: {}",
        errors[0]
    );
    let jumped: Vec<serde_json::Value> = read_log(&log)
        .into_iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("records were deleted before they were consumed"))
        })
        .collect();
    assert_eq!(jumped.len(), 1, "the engine names the jump once");
    assert_eq!(jumped[0]["log_start"].as_i64(), Some(end - 10));
    resume_at_earliest(&cfg, "0");
    caught_up(&cfg, CATCH_UP).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    // The verifier reads the intents topic: the intents committed before their records were
    // deleted are gone from it, so their effects are all it can flag.
    let report = verify_report(&cfg, "").await;
    assert_eq!(
        (
            report.duplicates_emitted,
            report.lost,
            report.reorders,
            report.gaps
        ),
        (0, 0, 0, 0),
        "{:?}",
        report.violations
    );
    assert!(
        report
            .violations
            .iter()
            .all(|v| v.contains("for an intent never consumed (effect without intent)")),
        "{:?}",
        report.violations
    );
    // Offsets 0 to the jump's expected offset were consumed and committed, then deleted.
    let consumed_then_deleted = jumped[0]["expected_offset"]
        .as_u64()
        .expect("expected_offset");
    assert_eq!(report.effects_without_intent as u64, consumed_then_deleted);
    assert_eq!(
        report.committed,
        report.intents + report.effects_without_intent,
        "what the log holds commits, besides what committed before its records were deleted"
    );
    for i in 50..60 {
        assert_eq!(
            effects_of(&cfg, &format!("b{i}")),
            1,
            "b{i}, after the deleted records, committed once"
        );
    }
}

/// A tired operator deletes the side-effects topic under a running processor. Every
/// transaction aborts while it is gone, its errors saying only that records timed out: the
/// topic watch names the missing topic (ERROR) within its 30-s check. Nothing is lost: once the
/// topic is created again the intents consumed meanwhile commit, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_side_effects_topic_deleted_under_a_running_processor_is_named_and_loses_nothing() {
    let env = TestEnv::new("effects_deleted", 2).await;
    let cfg = env.config.clone();
    let log = log_of(&env, "run");
    let proc = Processor::spawn(&cfg, log.clone());
    demo::produce(&cfg, &workload(200, 40, "a", 41))
        .await
        .unwrap();
    caught_up(&cfg, CATCH_UP).await;
    let offsets = |cfg: &Config| -> Vec<(i32, i64)> {
        let points = causal_commit::pipeline::read::committed_points(cfg).unwrap();
        let mut at: Vec<(i32, i64)> = points.iter().map(|(p, point)| (*p, point.offset)).collect();
        at.sort_unstable();
        at
    };
    let before = offsets(&cfg);
    delete_topic(&cfg, &cfg.kafka.side_effects_topic).await;
    demo::produce(&cfg, &workload(100, 20, "b", 42))
        .await
        .unwrap();
    named_missing(
        &log,
        "kafka.side_effects_topic",
        &cfg.kafka.side_effects_topic,
    )
    .await;
    assert_eq!(
        offsets(&cfg),
        before,
        "no transaction committed (no input offset moved) while the topic is gone"
    );
    create_topics(&cfg, &[(&cfg.kafka.side_effects_topic, 2)]).await;
    caught_up(&cfg, CATCH_UP).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    verified_prefix(&cfg, "b-", 100).await;
}

/// The intents topic deleted under a running processor and left deleted for a while: the topic
/// check names it (ERROR, pointing at `resume-at`); created again and refilled, its partition
/// refuses until an operator says where it resumes, then the new intents commit once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intents_topic_deleted_under_a_running_processor_is_named() {
    let env = TestEnv::new("intents_deleted", 1).await;
    let proc = intents_topic_replaced_under_a_running_processor(&env, true).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    verified_prefix(&env.config, "b-", 100).await;
}

/// A processor (log `run1`) commits 400 intents `a-`; the intents topic is deleted under it
/// and created again, at once or (`left_deleted`) once the topic check has named it gone;
/// refilled with 100 intents `b-`, its partition refuses until `resume-at`, then they commit.
/// Returns the processor, still running.
async fn intents_topic_replaced_under_a_running_processor(
    env: &TestEnv,
    left_deleted: bool,
) -> Processor {
    let cfg = &env.config;
    let log = log_of(env, "run1");
    let proc = Processor::spawn(cfg, log.clone());
    demo::produce(cfg, &workload(400, 40, "a", 21))
        .await
        .unwrap();
    caught_up(cfg, CATCH_UP).await;
    if left_deleted {
        delete_topic(cfg, &cfg.kafka.intents_topic).await;
        let error = named_missing(&log, "kafka.intents_topic", &cfg.kafka.intents_topic).await;
        assert!(error.contains("recovery-point resume-at"), "{error}");
        create_topics(cfg, &[(&cfg.kafka.intents_topic, 1)]).await;
    } else {
        recreate_intents_topic(cfg, 1).await;
    }
    demo::produce(cfg, &workload(100, 10, "b", 22))
        .await
        .unwrap();
    refused(&log, "log ends at offset", &[0]).await;
    resume_at_earliest(cfg, "0");
    caught_up(cfg, CATCH_UP).await;
    proc
}

/// Waits (up to two topic checks, 65 s) for the one ERROR naming `topic` (the setting `key`) as
/// gone; returns its message.
async fn named_missing(log: &std::path::Path, key: &str, topic: &str) -> String {
    let named = format!("{key} {topic:?} does not exist any more");
    let deadline = Instant::now() + Duration::from_secs(65);
    let errors = loop {
        let errors: Vec<_> = read_log(log)
            .into_iter()
            .filter(|l| l["message"].as_str().is_some_and(|m| m.contains(&named)))
            .collect();
        if !errors.is_empty() || Instant::now() > deadline {
            break errors;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(errors.len(), 1, "{topic} named once as gone, within 65 s");
    assert_eq!(errors[0]["level"], "ERROR", "{}", errors[0]);
    errors[0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

pub(crate) async fn delete_topic(config: &Config, topic: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .create()
        .expect("admin client");
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let deleted = admin.delete_topics(&[topic], &opts).await.expect("delete");
    assert!(deleted.iter().all(|r| r.is_ok()), "{deleted:?}");
}

/// A careless developer runs a plain consumer in the processor's consumer group (the group id
/// copied from the config, librdkafka's default assignors, which include the processor's
/// `range`) while intents flow: it is assigned some of the partitions, reads their records,
/// and commits offsets of its own (auto-commit, no recovery point) past what the processor
/// decided, then leaves. Nothing it read is lost, and nothing is emitted twice: the processor
/// takes the partitions back where its durable state is, not at the foreign offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_consumer_in_the_processors_group_loses_nothing() {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    let env = TestEnv::new("foreign_member", 4).await;
    let cfg = env.config.clone();
    let proc = Processor::spawn(&cfg, log_of(&env, "run"));
    demo::produce(&cfg, &workload(200, 40, "a", 51))
        .await
        .unwrap();
    caught_up(&cfg, CATCH_UP).await;
    let foreign: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .set("group.id", &cfg.kafka.group_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "200")
        .create()
        .expect("foreign consumer");
    foreign
        .subscribe(&[&cfg.kafka.intents_topic])
        .expect("subscribe");
    let reading = tokio::task::spawn_blocking(move || {
        // Reads for 30 s: long enough to join (one rebalance), to be assigned, and to commit.
        let (mut read, mut assigned) = (0usize, 0usize);
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            if let Some(Ok(_)) = foreign.poll(Duration::from_millis(100)) {
                read += 1;
            }
            assigned = assigned.max(foreign.assignment().map(|a| a.count()).unwrap_or(0));
        }
        let _ = foreign.commit_consumer_state(CommitMode::Sync);
        foreign.unsubscribe();
        (read, assigned)
    });
    tokio::time::sleep(Duration::from_secs(8)).await;
    demo::produce(&cfg, &workload(400, 40, "b", 52))
        .await
        .unwrap();
    let (read, assigned) = reading.await.unwrap();
    assert!(
        assigned > 0 && read > 0,
        "the foreign consumer took partitions ({assigned}) and read records ({read}) away from \
         the processor"
    );
    let fx = wait_for(
        &cfg,
        &cfg.kafka.side_effects_topic,
        600,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(fx.len(), 600, "every intent has its effect");
    assert!(proc.terminate(Duration::from_secs(30)));
    let overridden = read_log(&log_of(&env, "run"))
        .into_iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("the committed offset is not where the durable"))
        })
        .count();
    assert!(
        overridden > 0,
        "the foreign offsets were seen and overridden by the durable state"
    );
    verified_prefix(&cfg, "a-", 200).await;
    verified_prefix(&cfg, "b-", 400).await;
}

/// A tired operator adds an instance to the group with a configuration copied from elsewhere: its
/// `postgres.schema` is not the group's. The partitions the group gives it were written by the
/// first instance's store, which its own has never seen: it refuses each of them, naming the
/// mismatch, instead of deciding their intents again from nothing (which would emit every
/// effect a second time). Its schema stays empty. Once it is stopped, the first instance takes
/// them back and every intent commits once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_of_the_group_on_another_schema_decides_nothing_again() {
    let env = TestEnv::new("otherschema", 4).await;
    let cfg = env.config.clone();
    let mut stray = cfg.clone();
    stray.postgres.schema = format!("{}_copy", cfg.postgres.schema);
    stray.instance_id = format!("{}-b", env.name);
    migrate_as_owner(&stray).await;

    let proc = Processor::spawn(&cfg, log_of(&env, "first"));
    demo::produce(&cfg, &workload(400, 200, "a", 1))
        .await
        .unwrap();
    caught_up(&cfg, CATCH_UP).await;

    let log = log_of(&env, "stray");
    let stray_proc = Processor::spawn(&stray, log.clone());
    // The stray instance is given some of the four partitions (which ones is the assignor's).
    let deadline = Instant::now() + Duration::from_secs(90);
    let refusals = loop {
        let lines = read_log(&log);
        let refused: std::collections::BTreeSet<i64> = lines
            .iter()
            .filter(|l| l["message"] == "partition not restored yet; paused")
            .filter(|l| {
                l["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("do not belong together"))
            })
            .filter_map(|l| l["partition"].as_i64())
            .collect();
        if !refused.is_empty() {
            break refused;
        }
        assert!(
            Instant::now() < deadline,
            "the stray instance never refused a partition"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    // More intents while it holds them: none of its partitions' is decided by it.
    demo::produce(&cfg, &workload(200, 100, "b", 2))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(stray_proc.terminate(Duration::from_secs(30)));
    assert_eq!(
        transitions(&stray).await,
        0,
        "the stray instance decided nothing (it refused partitions {refusals:?})"
    );

    caught_up(&cfg, CATCH_UP).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    verified(&cfg, 600).await;
}

/// Runs one of PostgreSQL's client programs on the stack's database, as its owner.
fn pg_tool(program: &str, args: &[&str]) {
    let out = std::process::Command::new(program)
        .arg(format!("--dbname={}", database_url()))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `pg_dump` of the test's schema in the custom format.
fn dump_schema(config: &Config, file: &std::path::Path) {
    let file = format!("--file={}", file.display());
    pg_tool(
        "pg_dump",
        &[
            "--format=custom",
            "--schema",
            &config.postgres.schema,
            &file,
        ],
    );
}

/// `pg_restore --clean` of a dump made by [`dump_schema`]: the schema's tables are dropped and
/// created again with the dump's rows, as an operator restores a backup.
fn restore_schema(config: &Config, file: &std::path::Path) {
    let file = file.display().to_string();
    pg_tool(
        "pg_restore",
        &[
            "--clean",
            "--if-exists",
            "--exit-on-error",
            "--schema",
            &config.postgres.schema,
            &file,
        ],
    );
}

/// One run of a processor: `work` produced, consumed to the end, the processor stopped.
async fn run_through(env: &TestEnv, run: &str, work: &ProduceOptions) {
    let proc = Processor::spawn(&env.config, log_of(env, run));
    demo::produce(&env.config, work).await.unwrap();
    caught_up(&env.config, CATCH_UP).await;
    assert!(proc.terminate(Duration::from_secs(30)));
}

/// A tired operator restores PostgreSQL from last night's backup after the group has committed
/// batches since: the store is behind Kafka's committed offsets, and the batches it lost have
/// their effects out already. Deciding from the old state would emit those intents' effects
/// again, and give their contacts sequences already used. Every partition the store is behind
/// on refuses instead, naming a restored backup; nothing is decided or emitted meanwhile, new
/// intents included. The way out (the runbook's): restore the store's latest state; the
/// partitions then go on where they were, every intent committed once, later ones too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_restored_from_an_older_backup_refuses_until_its_latest_state_is_back() {
    let env = TestEnv::new("oldbackup", 2).await;
    let cfg = env.config.clone();
    let (old, latest) = (
        std::env::temp_dir().join(format!("{}-old.dump", env.name)),
        std::env::temp_dir().join(format!("{}-latest.dump", env.name)),
    );
    run_through(&env, "run1", &workload(100, 40, "a", 1)).await;
    dump_schema(&cfg, &old);
    run_through(&env, "run2", &workload(100, 40, "b", 2)).await;
    dump_schema(&cfg, &latest);
    assert_eq!(effects_of(&cfg, ""), 200);

    restore_schema(&cfg, &old);
    let history = transitions(&cfg).await;
    let log = log_of(&env, "run3");
    let proc = Processor::spawn(&cfg, log.clone());
    let errors = refused(&log, "do not belong together", &[0, 1]).await;
    assert!(
        errors.iter().all(|e| e.contains("a restored backup")),
        "names a restored backup: {errors:?}"
    );
    demo::produce(&cfg, &workload(50, 20, "c", 3))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(effects_of(&cfg, ""), 200, "nothing emitted again");
    assert_eq!(transitions(&cfg).await, history, "nothing decided");
    assert!(proc.terminate(Duration::from_secs(30)));

    restore_schema(&cfg, &latest);
    // The refused run's 50 intents are decided now, and 10 more after them.
    run_through(&env, "run4", &workload(10, 5, "d", 4)).await;
    verified(&cfg, 260).await;
}
