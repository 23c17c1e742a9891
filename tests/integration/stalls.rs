//! The processor's own stalls never time a contact out (contract R7: the wait counts only time
//! during which the partition was being consumed and caught up), and a partition at its bound
//! is paused, lets the others flow, and drains when its missing predecessors arrive.

use std::time::{Duration, Instant};

use crate::common::http;
use crate::common::process::{read_log, stack, wait_for_log, Frozen, Processor};
use crate::common::*;
use causal_commit::config::Config;
use causal_commit::proto::Intent;

const WAIT: Duration = Duration::from_secs(5);

/// Waits until PostgreSQL shows `contact` with `n` waiting intents.
async fn waiting(config: &Config, contact: &str, n: i32) {
    wait_for_value(
        &format!(
            "SELECT waiting FROM {}.cc_contact WHERE contact_id = $1",
            config.postgres.schema
        ),
        contact.to_string(),
        Duration::from_secs(30),
        &format!("{contact} never had {n} waiting"),
        |w| w == Some(&n),
    )
    .await;
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

/// Also watches the consumer's fetches closely: none of these stalls is a consumer that stopped
/// fetching, and a test that asserts so fails if one is taken for it.
fn config_with_short_wait(env: &TestEnv) -> Config {
    let mut cfg = env.config.clone();
    cfg.sequencer.wait_timeout = WAIT;
    cfg.kafka.fetch_stall_timeout = Duration::from_secs(10);
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_longer_than_the_wait_timeout_does_not_time_a_contact_out() {
    let env = TestEnv::exclusive("stall_pg", 1).await;
    let cfg = config_with_short_wait(&env);
    let running = start(std::sync::Arc::new(cfg.clone()));
    produce_to_partition(&cfg, 0, &[intent("x-2", "x", 2)]).await;
    waiting(&cfg, "x", 1).await;
    stack("stop", "postgres");
    let down = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    produce_to_partition(&cfg, 0, &[intent("x-1", "x", 1)]).await;
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
    produce_to_partition(&cfg, 0, &[intent("y-2", "y", 2)]).await;
    waiting(&cfg, "y", 1).await;
    assert!(proc.terminate(Duration::from_secs(30)), "clean stop");
    let stopped = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    produce_to_partition(&cfg, 0, &[intent("y-1", "y", 1)]).await;
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
    produce_to_partition(&cfg, 0, &gaps).await;
    waiting(&cfg, "c", 1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The predecessors, produced while the partition is paused, come 10 s after the gaps.
    let firsts: Vec<Intent> = ["a", "b", "c"]
        .iter()
        .map(|c| intent(&format!("{c}-1"), c, 1))
        .collect();
    produce_to_partition(&cfg, 0, &firsts).await;
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
    produce_to_partition(&cfg, 0, &gaps).await;
    waiting(&cfg, "g4", 1).await;
    // Partition 0 is at its bound; partition 1 flows.
    let others: Vec<Intent> = (1..=3u64)
        .flat_map(|seq| (0..3).map(move |k| intent(&format!("o{k}-{seq}"), &format!("o{k}"), seq)))
        .collect();
    produce_to_partition(&cfg, 1, &others).await;
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
    produce_to_partition(&cfg, 0, &firsts).await;
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

/// A producer's Kafka transaction left open (a producer that crashed or hangs mid-transaction)
/// holds every later record of its partition back from a `read_committed` consumer until the
/// producer or the broker ends it (`transaction.timeout.ms`, up to 15 min by the broker's
/// default limit). The partition is not caught up meanwhile (its log goes on past what can be
/// read): that time does not count towards a wait. Found from outside: the consumer reaches
/// the end of what it can read, so the contacts whose predecessors sat behind the open
/// transaction timed out and went on hold. Once the transaction ends, a real gap still times
/// out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producers_transaction_left_open_does_not_time_out_the_contacts_behind_it() {
    use rdkafka::producer::Producer as _;
    let env = TestEnv::new("stall_txn", 1).await;
    let mut cfg = config_with_short_wait(&env);
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    cfg.telemetry.metrics_listen = metrics.to_string();
    let held_back = || async move {
        let samples = http::parse_samples(&http::scrape(metrics).await);
        http::value(&samples, "causal_commit_partitions_held_back", &[])
    };
    let (c, id) = (cfg.clone(), format!("{}-producer", env.name));
    let txn = tokio::task::spawn_blocking(move || transactional_producer(&c, &id))
        .await
        .unwrap();
    let log = std::env::temp_dir().join(format!("{}-run.log", env.name));
    let proc = Processor::spawn(&cfg, log.clone());
    // x waits for its sequence 1, which comes behind the open transaction; y's never comes.
    produce_to_partition(&cfg, 0, &[intent("x-2", "x", 2), intent("y-2", "y", 2)]).await;
    waiting(&cfg, "y", 1).await;
    let c = cfg.clone();
    let txn = tokio::task::spawn_blocking(move || {
        txn.begin_transaction().expect("begin");
        send_in_transaction(&txn, &c, 0, &[intent("z-1", "z", 1)]);
        txn
    })
    .await
    .unwrap();
    produce_to_partition(&cfg, 0, &[intent("x-1", "x", 1)]).await;
    // Three wait timeouts with the partition held back.
    tokio::time::sleep(3 * WAIT).await;
    let held = read_all(&cfg, &cfg.kafka.manual_review_topic).len();
    assert_eq!(held, 0, "no WAIT_TIMEOUT while the partition is held back");
    assert_eq!(
        held_back().await,
        Some(1.0),
        "the gauge shows the partition"
    );
    let said = read_log(&log).iter().any(|l| {
        l["partition"] == 0
            && l["held_ms"].as_u64().is_some_and(|ms| ms >= 5_000)
            && l["message"]
                .as_str()
                .is_some_and(|m| m.contains("open transaction"))
    });
    assert!(said, "an INFO line names the partition held back");
    assert_eq!(
        fetch_stalls(&read_log(&log)),
        Vec::<serde_json::Value>::new()
    );
    tokio::task::spawn_blocking(move || txn.abort_transaction(Duration::from_secs(30)))
        .await
        .unwrap()
        .expect("abort");

    let (fx, rv) = wait_for_outputs(&cfg, 2, 1, Duration::from_secs(60)).await;
    assert_eq!(
        held_back().await,
        Some(0.0),
        "nothing held back once it ended"
    );
    assert!(proc.terminate(Duration::from_secs(30)));
    let x: Vec<u64> = fx
        .iter()
        .filter(|e| e.contact_id == "x")
        .map(|e| e.commit_sequence)
        .collect();
    assert_eq!(
        x,
        vec![1, 2],
        "x committed in order once its predecessor was readable"
    );
    assert_eq!(fx.len(), 2, "nothing of the aborted transaction: {fx:?}");
    assert_eq!(rv.len(), 1, "{rv:?}");
    assert_eq!(
        (rv[0].intent_id.as_str(), rv[0].reason),
        (
            "y-2",
            causal_commit::proto::ReviewReason::WaitTimeout as i32
        ),
        "the real gap times out once the transaction is over"
    );
    let report = verify_report(&cfg, "").await;
    assert!(report.violations.is_empty(), "{:?}", report.violations);
    assert_eq!(
        (report.intents, report.committed, report.held_contacts),
        (3, 2, 1),
        "the aborted intent is no intent; y is held for an operator"
    );
}

/// The engine's record of a committed batch, sent off its thread right after each Kafka commit,
/// never waits for a partition's row that another transaction holds (the next batch's write,
/// which records the commit itself): it skips that row, marks the free ones, and returns at
/// once. (Waiting made both writes of the next batch queue behind it in the bench.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_a_committed_batch_skips_a_partition_whose_row_a_write_holds() {
    use causal_commit::store::postgres as pg;
    use causal_commit::store::postgres::{BatchWrite, PartitionWrite};

    let env = TestEnv::new("markfree", 2).await;
    let topic = env.config.kafka.intents_topic.clone();
    let pool = env.store().await;
    let lease = Duration::from_secs(30);
    let mut fences = Vec::new();
    for p in 0..2 {
        let fence = pg::acquire_partition(&pool, &topic, p, "w", lease)
            .await
            .unwrap()
            .unwrap();
        fences.push(fence);
    }
    let write = BatchWrite {
        partitions: (0..2)
            .map(|p| PartitionWrite {
                partition: p,
                fence: fences[p as usize],
                batch_no: 1,
                next_offset: 1,
                clock_ms: 0,
            })
            .collect(),
        ..BatchWrite::default()
    };
    pg::apply_batch(&pool, &topic, "w", lease, &write)
        .await
        .unwrap();
    let committed = |p: i32| {
        let pool = pool.clone();
        let topic = topic.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT committed_batch FROM cc_partition WHERE topic = $1 AND partition = $2",
            )
            .bind(&topic)
            .bind(p)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!((committed(0).await, committed(1).await), (0, 0));

    // Another transaction (the next batch's write) holds partition 1's row.
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM cc_partition WHERE topic = $1 AND partition = 1 FOR UPDATE")
        .bind(&topic)
        .execute(&mut *holder)
        .await
        .unwrap();
    let batches = [(0, fences[0], 1), (1, fences[1], 1)];
    let started = Instant::now();
    tokio::time::timeout(
        Duration::from_secs(5),
        pg::mark_committed_if_free(&pool, &topic, &batches),
    )
    .await
    .expect("returns without waiting for the held row")
    .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(
        (committed(0).await, committed(1).await),
        (1, 0),
        "the free partition is marked, the held one skipped"
    );
    holder.rollback().await.unwrap();

    // Free again: marked. The waiting form marks whatever it is given.
    pg::mark_committed_if_free(&pool, &topic, &batches)
        .await
        .unwrap();
    assert_eq!((committed(0).await, committed(1).await), (1, 1));
}

/// What arrives while the store stalls: 20 intents of `y` on partition 1, then, 2 s later, the
/// predecessor `x-1` of the waiting `x-2` on partition 0.
async fn arrive_during_the_stall(cfg: &Config) {
    let others: Vec<Intent> = (1..=20)
        .map(|n| intent(&format!("y-{n}"), "y", n))
        .collect();
    produce_to_partition(cfg, 1, &others).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    produce_to_partition(cfg, 0, &[intent("x-1", "x", 1)]).await;
}

/// A tired operator runs `VACUUM FULL` (or a `LOCK TABLE`) on the audit during traffic:
/// PostgreSQL is up and answers, but every durable write waits for the lock, longer than the
/// statement timeout, the Kafka transaction timeout and the wait timeout together. The write's
/// stall times nobody out (R7), nothing is emitted without its record, and once the lock goes
/// every intent commits once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_locked_longer_than_every_timeout_stalls_without_timing_out_or_losing() {
    let env = TestEnv::new("stall_lock", 2).await;
    let cfg = config_with_short_wait(&env);
    let log = std::env::temp_dir().join(format!("{}-run.log", env.name));
    let proc = Processor::spawn(&cfg, log.clone());
    produce_to_partition(&cfg, 0, &[intent("x-2", "x", 2)]).await;
    waiting(&cfg, "x", 1).await;

    let lock = locked_exclusively(&env.store().await, &cfg, "cc_transition").await;
    let locked = Instant::now();
    arrive_during_the_stall(&cfg).await;
    tokio::time::sleep(Duration::from_secs(40).saturating_sub(locked.elapsed())).await;
    let emitted_while_locked = read_all(&cfg, &cfg.kafka.side_effects_topic).len();
    lock.commit().await.unwrap();

    let (seqs, reviews) = outcome(&cfg, "x", 22).await;
    assert!(proc.terminate(Duration::from_secs(30)), "clean stop");
    let lines = read_log(&log);
    let logged = |message: &str| lines.iter().filter(|l| l["message"] == message).count();
    assert!(
        logged("durable write failed; nothing is emitted") >= 1,
        "the lock made the write fail"
    );
    assert_eq!(
        logged("abort failed; re-creating the producer"),
        0,
        "the staged transaction is aborted by the producer that began it"
    );
    assert_eq!(emitted_while_locked, 0, "no effect without its record");
    assert_eq!(fetch_stalls(&lines), Vec::<serde_json::Value>::new());
    assert_eq!(seqs, vec![1, 2], "both committed, in order");
    assert_eq!(reviews, 0, "no WAIT_TIMEOUT, no hold");
    let report = crate::failures::verified(&cfg).await;
    crate::failures::assert_clean(&report, 22);
}

/// The database made read-only by `ALTER DATABASE ... SET default_transaction_read_only`, as a
/// DBA freezing writes for maintenance does; reset at the end whatever the test's fate.
struct ReadOnlyDatabase {
    name: String,
}

impl ReadOnlyDatabase {
    async fn set() -> Self {
        let pool = sqlx::PgPool::connect(&database_url()).await.unwrap();
        let name: String = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(&pool)
            .await
            .unwrap();
        sqlx::query(&format!(
            "ALTER DATABASE \"{name}\" SET default_transaction_read_only = on"
        ))
        .execute(&pool)
        .await
        .unwrap();
        Self { name }
    }

    /// Writes allowed again, for sessions that start from now on.
    async fn reset(&self) {
        allow_writes(&self.name).await;
    }
}

impl Drop for ReadOnlyDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(allow_writes(&name));
        })
        .join();
    }
}

async fn allow_writes(database: &str) {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(&database_url()).await.unwrap();
    // This session starts read-only too, and ALTER DATABASE is a write.
    sqlx::query("SET default_transaction_read_only = off")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query(&format!(
        "ALTER DATABASE \"{database}\" RESET default_transaction_read_only"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
}

/// A failover to a read-only server, or a DBA freezing writes for maintenance: PostgreSQL is
/// up, answers reads and refuses every write (SQLSTATE 25006, "cannot execute ... in a
/// read-only transaction") for longer than the wait timeout, then allows them again. It is
/// an outage of the durable store, not a poison record: nothing is emitted without its record,
/// nothing is quarantined as `UNPROCESSABLE`, nobody times out (R7), an instance started
/// meanwhile waits instead of exiting, and once writes are allowed every intent commits once,
/// in order, within a minute, through sessions that started read-only and were never dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_turns_read_only_under_traffic_stalls_without_timing_out_or_losing() {
    let env = TestEnv::exclusive("stall_readonly", 2).await;
    let cfg = config_with_short_wait(&env);
    let log = |run: &str| std::env::temp_dir().join(format!("{}-{run}.log", env.name));
    let proc = Processor::spawn(&cfg, log("run1"));
    produce_to_partition(&cfg, 0, &[intent("x-2", "x", 2)]).await;
    waiting(&cfg, "x", 1).await;

    let read_only = ReadOnlyDatabase::set().await;
    // Its sessions open now start read-only, as on a server that fails over to a standby.
    let runtime = sqlx::PgPool::connect(&runtime_database_url())
        .await
        .unwrap();
    let dropped = terminate_processor_sessions(&runtime).await;
    let frozen = Instant::now();
    arrive_during_the_stall(&cfg).await;
    tokio::time::sleep(Duration::from_secs(8).saturating_sub(frozen.elapsed())).await;
    // A second instance starts meanwhile (a rolling deployment's new one, a scale-out).
    let mut cfg_b = cfg.clone();
    cfg_b.instance_id = format!("{}-b", env.name);
    let mut second = Processor::spawn(&cfg_b, log("run2"));
    tokio::time::sleep(Duration::from_secs(25).saturating_sub(frozen.elapsed())).await;
    assert!(
        second.exit_within(Duration::from_millis(300)).is_none(),
        "the instance started meanwhile waits for the store: {:?}",
        read_log(&log("run2")).last()
    );
    let emitted_while_frozen = read_all(&cfg, &cfg.kafka.side_effects_topic).len();
    // Writes allowed again; the sessions that started read-only are left as they are.
    read_only.reset().await;

    let (seqs, reviews) = outcome(&cfg, "x", 22).await;
    assert!(proc.terminate(Duration::from_secs(30)), "clean stop");
    assert!(second.terminate(Duration::from_secs(30)), "clean stop");
    println!("sessions dropped at the freeze: {dropped}");
    let refused_write = |l: &serde_json::Value| {
        l["error"]
            .as_str()
            .is_some_and(|e| e.contains("read-only transaction"))
    };
    let first = read_log(&log("run1"));
    assert!(
        first.iter().any(
            |l| l["message"] == "durable write failed; nothing is emitted" && refused_write(l)
        ),
        "the frozen store refused a write"
    );
    let second = read_log(&log("run2"));
    assert!(
        second.iter().any(refused_write),
        "the instance started meanwhile met the frozen store"
    );
    assert_eq!(emitted_while_frozen, 0, "no effect without its record");
    assert_eq!(fetch_stalls(&first), Vec::<serde_json::Value>::new());
    assert_eq!(fetch_stalls(&second), Vec::<serde_json::Value>::new());
    assert_eq!(seqs, vec![1, 2], "both committed, in order");
    assert_eq!(reviews, 0, "no WAIT_TIMEOUT, no UNPROCESSABLE, no hold");
    let report = crate::failures::verified(&cfg).await;
    crate::failures::assert_clean(&report, 22);
}

/// A statement of the processor's runtime role waits for a lock.
async fn write_waits_for_lock(pool: &sqlx::PgPool) -> bool {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE usename = $1 \
         AND wait_event_type = 'Lock' AND state = 'active')",
    )
    .bind(runtime_role())
    .fetch_one(pool)
    .await
    .unwrap()
}

/// A PostgreSQL that stops answering without closing anything: a hung disk, a paused VM, a
/// network that drops packets (here its processes stopped with SIGSTOP). Its connections stay
/// open and its statement timeout never fires, since it runs nothing. The processor gives
/// each call up when the server's own timeouts would have answered long before, says so
/// (not ready, a log line naming PostgreSQL), keeps polling Kafka so that it stays in its
/// group however long the freeze lasts, emits nothing without its record, times nobody out,
/// and once the server answers again every intent commits once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_that_stops_answering_is_given_up_on_and_waited_out_in_the_group() {
    let env = TestEnv::exclusive("stall_frozen_pg", 2).await;
    let mut cfg = config_with_short_wait(&env);
    // A call is given up after 1 + 2 × 3 + 1 = 8 s (pg::answer_within).
    cfg.postgres.statement_timeout = Duration::from_secs(3);
    cfg.postgres.connect_timeout = Duration::from_secs(1);
    // librdkafka takes a consumer out of its group when it has not polled for
    // max.poll.interval.ms (at least session.timeout.ms; the broker's floor is 6 s): the
    // freeze lasts twice that.
    cfg.kafka.client.insert("session.timeout.ms", "6000");
    cfg.kafka.client.insert("max.poll.interval.ms", "16000");
    let probes = format!("127.0.0.1:{}", free_port());
    cfg.telemetry.metrics_listen = probes.clone();
    let probes: std::net::SocketAddr = probes.parse().unwrap();
    let log = std::env::temp_dir().join(format!("{}-run.log", env.name));
    let proc = Processor::spawn(&cfg, log.clone());
    produce_to_partition(&cfg, 0, &[intent("x-2", "x", 2)]).await;
    waiting(&cfg, "x", 1).await;
    let ready = || async { crate::common::http::http_get(probes, "/readyz").await };
    assert_eq!(
        ready().await.map(|r| r.0),
        Some(200),
        "ready before the freeze"
    );

    // A statement in flight when the server stops (an idle session is pinged before use, and
    // that ping gives up on its own): a durable write held on a lock until the freeze (or,
    // if the lock outlasts the write's statement timeout first, the restore that follows).
    let pool = env.store().await;
    let lock = locked_exclusively(&pool, &cfg, "cc_transition").await;
    arrive_during_the_stall(&cfg).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !write_waits_for_lock(&pool).await {
        assert!(
            Instant::now() < deadline,
            "no durable write waited for the lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let frozen = Frozen::service("postgres");
    let at = Instant::now();
    let mut not_ready_after = None;
    while at.elapsed() < Duration::from_secs(35) {
        if not_ready_after.is_none() && ready().await.map(|r| r.0) == Some(503) {
            not_ready_after = Some(at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let members = group_members(&cfg);
    let emitted_while_frozen = read_all(&cfg, &cfg.kafka.side_effects_topic).len();
    drop(frozen);
    lock.rollback().await.unwrap();

    let (seqs, reviews) = outcome(&cfg, "x", 22).await;
    assert!(proc.terminate(Duration::from_secs(30)), "clean stop");
    let lines = read_log(&log);
    let given_up = lines.iter().find(|l| {
        l["error"]
            .as_str()
            .is_some_and(|e| e.contains("PostgreSQL did not answer"))
    });
    println!(
        "given up: {given_up:?}; not ready after {not_ready_after:?}; members {members}; \
         emitted {emitted_while_frozen}"
    );
    assert!(
        given_up.is_some(),
        "a call to the frozen store was given up and logged"
    );
    assert!(
        not_ready_after.is_some_and(|t| t < Duration::from_secs(12)),
        "not ready while the store does not answer (after {not_ready_after:?})"
    );
    assert_eq!(
        members, 1,
        "the processor stayed in its group through the freeze"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.to_string().contains("maximum poll interval")),
        "never out of the group for not polling"
    );
    assert_eq!(emitted_while_frozen, 0, "no effect without its record");
    // Calls that found every session stuck in the frozen server were explained as a server
    // that does not answer, not as one that refuses or a pool that is too small.
    let hung = causal_commit::store::postgres::sessions::Probe::NoAnswer
        .meaning(cfg.postgres.max_connections);
    let causes = crate::failures::no_session_causes(&log);
    assert!(
        causes.iter().any(|(cause, _)| *cause == hung),
        "the pool's timeouts during the freeze name a hung server: {causes:?}"
    );
    assert_eq!(fetch_stalls(&lines), Vec::<serde_json::Value>::new());
    assert_eq!(seqs, vec![1, 2], "both committed, in order");
    assert_eq!(reviews, 0, "no WAIT_TIMEOUT, no UNPROCESSABLE, no hold");
    let report = crate::failures::verified(&cfg).await;
    crate::failures::assert_clean(&report, 22);
}

/// The log lines of a consumer replaced for fetching nothing of a partition (`pipeline::stall`).
fn fetch_stalls(lines: &[serde_json::Value]) -> Vec<serde_json::Value> {
    (lines.iter())
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("the Kafka consumer fetched nothing"))
        })
        .cloned()
        .collect()
}

/// A consumer that stops fetching a partition it was told to read, the broker answering: what
/// librdkafka's fetcher can do after a leader change (its issues 4492 and 3396; here two
/// instances sat idle for three minutes with records to read after their broker came back from
/// a freeze). Nothing failed, so nothing was logged and nothing was decided. A fail point
/// pauses one partition inside librdkafka right after its restore, behind the engine's back:
/// once it has fetched nothing of that partition for `kafka.fetch_stall_timeout` while its
/// last stable offset was ahead, the engine says so with librdkafka's view of the partition,
/// counts it, and a new consumer restores and reads it; every intent commits once, in order.
/// Meanwhile the other partition flowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_the_consumer_stops_fetching_has_the_consumer_replaced() {
    let env = TestEnv::new("stall_fetch", 2).await;
    let mut cfg = env.config.clone();
    cfg.kafka.fetch_stall_timeout = Duration::from_secs(15);
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    cfg.telemetry.metrics_listen = metrics.to_string();
    let intents: Vec<Intent> = (1..=5u64)
        .flat_map(|seq| {
            (0..200).map(move |c| intent(&format!("c{c}-{seq}"), &format!("c{c}"), seq))
        })
        .collect();
    produce_backlog(&cfg, &intents).await;
    let log = std::env::temp_dir().join(format!("{}-run.log", env.name));
    let proc =
        Processor::spawn_with_env(&cfg, log.clone(), &[("FAILPOINTS", "fetch-stuck=1*return")]);
    let stall = wait_for_log(&log, Duration::from_secs(90), "a stall logged", |lines| {
        fetch_stalls(lines).into_iter().next()
    })
    .await;
    let effects_at_stall = effects(&read_all(&cfg, &cfg.kafka.side_effects_topic));
    let replaced = wait_for_log(
        &log,
        Duration::from_secs(10),
        "the consumer replaced",
        |lines| {
            lines
                .iter()
                .any(|l| {
                    l["message"].as_str().is_some_and(|m| {
                        m.starts_with("the engine starts again with a new consumer")
                    })
                })
                .then_some(())
        },
    )
    .await;
    caught_up(&cfg, Duration::from_secs(120)).await;
    let samples = http::parse_samples(&http::scrape(metrics).await);
    assert!(proc.terminate(Duration::from_secs(30)), "clean stop");
    println!("stall: {stall}; replaced: {replaced:?}");

    let lines = read_log(&log);
    let p = stall["partition"].as_i64().expect("the partition named");
    let (position, last_stable) = (
        stall["position"].as_i64().unwrap(),
        stall["last_stable_offset"].as_i64().unwrap(),
    );
    assert!(position < last_stable, "records to read: {stall}");
    let at = |l: &serde_json::Value| {
        chrono::DateTime::parse_from_rfc3339(l["timestamp"].as_str().unwrap()).unwrap()
    };
    let restored = (lines.iter())
        .find(|l| l["message"] == "partition restored" && l["partition"] == p)
        .expect("the partition was restored first");
    let waited = (at(&stall) - at(restored)).num_milliseconds();
    assert!(
        (15_000..40_000).contains(&waited),
        "said once the timeout had passed, not before and not much after: {waited} ms"
    );
    assert!(
        stall["stalled_s"].as_u64().is_some_and(|s| s >= 15),
        "{stall}"
    );
    assert!(
        stall["librdkafka"]
            .as_str()
            .is_some_and(|v| v.contains("fetch_state=")),
        "librdkafka's view of the partition: {stall}"
    );
    assert_eq!(fetch_stalls(&lines).len(), 1, "one stall, one replacement");
    // The other partition flowed meanwhile, all of it; nothing of the stuck one, which was
    // never fetched (a fresh group: it was read from its log's start, offset 0).
    assert_eq!(position, 0, "{stall}");
    assert_eq!(
        effects_at_stall.len() as i64,
        1_000 - last_stable,
        "every intent of the other partition committed, none of the stuck one"
    );
    assert_eq!(
        http::value(&samples, "causal_commit_consumer_stalls_total", &[]),
        Some(1.0)
    );
    let report = crate::failures::verified(&cfg).await;
    crate::failures::assert_clean(&report, 1_000);
}

/// A PostgreSQL too slow for a full batch (a throttled disk, a busy neighbour; here
/// `postgres.statement_timeout` set far below what a 20,000-record write takes) cancels every
/// full-size durable write. Retrying the same full-size batch stalls the partitions for as
/// long as the store stays slow, although smaller batches would pass: the processor cuts its
/// batches after a write cancelled by the statement timeout and the backlog drains, every
/// intent once, in order, nothing timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_too_slow_for_a_full_batch_gets_smaller_batches_and_the_backlog_drains() {
    let env = TestEnv::new("stall_slow_write", 4).await;
    let mut cfg = env.config.clone();
    // A 20,000-record write takes about 400 ms on an idle two-core machine; 1,000 records
    // about 20 ms.
    cfg.postgres.statement_timeout = Duration::from_millis(150);
    let contacts = 2_500;
    let per_contact = 10;
    let intents: Vec<Intent> = (1..=per_contact)
        .flat_map(|seq| {
            (0..contacts)
                .map(move |c| intent(&format!("slow-{c}-{seq}"), &format!("slow-{c}"), seq))
        })
        .collect();
    produce_backlog(&cfg, &intents).await;
    let log = std::env::temp_dir().join(format!("{}.log", env.name));
    let proc = Processor::spawn(&cfg, log.clone());
    let total = intents.len();
    let fx = effects(
        &wait_for(
            &cfg,
            &cfg.kafka.side_effects_topic,
            total,
            Duration::from_secs(150),
        )
        .await,
    );
    assert!(proc.terminate(Duration::from_secs(30)), "clean stop");
    let lines = read_log(&log);
    let cancelled = lines
        .iter()
        .filter(|l| {
            l["message"] == "durable write failed; nothing is emitted"
                && l["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("statement timeout"))
        })
        .count();
    let cut = lines
        .iter()
        .filter_map(|l| {
            (l["message"].as_str().is_some_and(|m| {
                m.starts_with("a batch's PostgreSQL statement outlasted postgres.statement_timeout")
            }))
            .then(|| l["batch_limit"].as_u64())
            .flatten()
        })
        .collect::<Vec<_>>();
    println!("cancelled writes: {cancelled}, batch limits: {cut:?}");
    assert_eq!(
        fx.len(),
        total,
        "every intent has its effect ({cancelled} writes cancelled)"
    );
    assert!(cancelled >= 1, "a full batch's write was cancelled");
    assert!(
        !cut.is_empty() && cut.iter().all(|&n| n < cfg.batch.max_records as u64),
        "each cancelled write cut the batches: {cut:?}"
    );
    assert!(
        read_all(&cfg, &cfg.kafka.manual_review_topic).is_empty(),
        "nothing timed out or was isolated"
    );
    let report = crate::failures::verified(&cfg).await;
    crate::failures::assert_clean(&report, total);
    forget_redis_keys(&cfg).await;
}

/// A partition of many contacts, restarted: its restore reads and reverts the state of every
/// contact of the partition, so its statements grow with the partition while a batch's do not.
/// Under a `postgres.statement_timeout` that every batch keeps within but the whole partition's
/// read does not (as a partition grows over months under the default 10 s), each restore was
/// cancelled and retried the same way: the partition never started again. A cancelled restore
/// now makes restores longer, and the partition starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_whose_restore_outlasts_the_statement_timeout_still_starts() {
    let env = TestEnv::new("restore_many", 1).await;
    let contacts = RESTORE_MANY_CONTACTS;
    let intents: Vec<Intent> = (0..contacts)
        .map(|c| intent(&format!("many-{c}-1"), &format!("many-{c}"), 1))
        .collect();
    produce_backlog(&env.config, &intents).await;
    let log = |run: &str| std::env::temp_dir().join(format!("{}-{run}.log", env.name));
    let first = Processor::spawn(&env.config, log("run1"));
    let committed = wait_for(
        &env.config,
        &env.config.kafka.side_effects_topic,
        contacts,
        Duration::from_secs(120),
    )
    .await
    .len();
    assert!(first.terminate(Duration::from_secs(30)), "clean stop");
    assert_eq!(committed, contacts, "the first run commits every contact");

    // Restarted with a statement timeout each batch keeps within, and the restore does not.
    let mut cfg = env.config.clone();
    cfg.postgres.statement_timeout = RESTORE_MANY_TIMEOUT;
    produce_intents(&cfg, &[intent("many-7-2", "many-7", 2)]).await;
    let second = Processor::spawn(&cfg, log("run2"));
    let fx = effects(
        &wait_for(
            &cfg,
            &cfg.kafka.side_effects_topic,
            contacts + 1,
            Duration::from_secs(60),
        )
        .await,
    );
    assert!(second.terminate(Duration::from_secs(30)), "clean stop");
    let lines = read_log(&log("run2"));
    let cancelled = lines
        .iter()
        .filter(|l| {
            l["message"] == "partition not restored yet; paused"
                && l["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("statement timeout"))
        })
        .count();
    let restored: Vec<_> = lines
        .iter()
        .filter(|l| l["message"] == "partition restored")
        .map(|l| (l["contacts"].as_u64(), l["elapsed_ms"].as_u64()))
        .collect();
    println!("restores cancelled: {cancelled}; restored (contacts, ms): {restored:?}");
    assert!(
        cancelled >= 1,
        "the restore outlasted the statement timeout at first (else this test shows nothing)"
    );
    assert_eq!(
        fx.len(),
        contacts + 1,
        "the partition started again and committed the new intent"
    );
    assert_eq!(
        sequences_of(&fx, "many-7"),
        vec![("many-7-1", 1), ("many-7-2", 2)]
    );
    assert!(
        lines.iter().any(|l| l["message"].as_str().is_some_and(
            |m| m.starts_with("a partition's restore outlasted its statement timeout")
        )),
        "the longer restores are logged"
    );
    let report = crate::failures::verified(&cfg).await;
    crate::failures::assert_clean(&report, contacts + 1);
    forget_redis_keys(&cfg).await;
}

/// Contacts in the one partition of the restore test: enough that reading all their states
/// takes several times [`RESTORE_MANY_TIMEOUT`].
const RESTORE_MANY_CONTACTS: usize = 400_000;
const RESTORE_MANY_TIMEOUT: Duration = Duration::from_millis(100);
