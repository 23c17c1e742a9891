//! The lock / idempotency store against the real local Redis and PostgreSQL: the fast path (one
//! Redis round trip per lookup), partition locks, fallback when Redis is stopped or slow,
//! failback with resynchronisation, FLUSHALL, AUTH, the crash window after a Kafka commit,
//! another instance's fallback, and what Redis may hold around batches that are rolled back
//! (docs/redis-fallback.md, "Only committed outcomes").
//!
//! Every test has its own PostgreSQL schema and Redis key prefix. Tests that stop, freeze or
//! flush Redis hold the stack exclusively (and restart / wait for Redis at the end, even on
//! failure); the others hold it shared, so they never run while Redis is disrupted.
//! "Redis lost its data" is simulated by deleting this test's keys only, so that the other
//! tests sharing the server are not disturbed.
//!
//! Each test is one scenario read top to bottom (some are long because the scenario is).

use crate::common::process::{self as process, freeze_redis};
use crate::common::{redis_url, scan_keys};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use causal_commit::config::Config;
use causal_commit::sequencer::{Outcome, PriorOutcome, Reason, State};
use causal_commit::store::lock_store::{LockResult, LockStore, Mode};
use causal_commit::store::postgres::{
    self as pg, BatchWrite, PartitionWrite, RestoredPartition, StoredOutcome, Transition,
    TransitionRow,
};
use causal_commit::store::recovery::{KafkaCommitted, RecoveryPoint};
use causal_commit::store::redis as raw;
use sqlx::PgPool;

const TOPIC: &str = "intents";

fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "causal_commit=info".into()),
        )
        .with_test_writer()
        .with_ansi(false)
        .try_init();
}

/// One partition as the tests drive it: its fencing token and its batches.
#[derive(Debug, Clone, Copy, Default)]
struct Part {
    fence: u64,
    last_batch: u64,
    next_offset: i64,
}

/// One test's private world: its schema, its key prefix, a raw Redis client to look behind the
/// store's back, and the partitions whose batches it writes through the real batch write.
struct World {
    config: Config,
    pool: PgPool,
    raw: redis::Client,
    /// The store id (`postgres::lock_store::store_id`): its Redis keys are under `{key_prefix}:{store_id}`.
    store_id: String,
    parts: HashMap<i32, Part>,
    /// Intents with an idempotency outcome written: deciding one again is a re-submission.
    decided: std::collections::HashSet<String>,
}

impl World {
    async fn new(name: &str, tweak: impl FnOnce(&mut Config)) -> Self {
        logs();
        let id = crate::common::unique(name);
        let mut config = Config {
            instance_id: format!("{id}-a"),
            ..Config::default()
        };
        config.postgres.url = crate::common::database_url().into();
        config.postgres.schema = id.clone();
        config.redis.url = redis_url().into();
        config.redis.key_prefix = format!("cctest:{id}");
        config.redis.breaker_open_for = Duration::from_millis(500);
        tweak(&mut config);
        config.validate().expect("test config is valid");
        let pool = pg::pool(&config.postgres).expect("pool");
        pg::migrate(&pool, &config.postgres.schema)
            .await
            .expect("migrate");
        let store_id = pg::lock_store::store_id(&pool).await.expect("store id");
        Self {
            raw: redis::Client::open(redis_url()).expect("redis client"),
            config,
            pool,
            store_id,
            parts: HashMap::new(),
            decided: Default::default(),
        }
    }

    async fn store(&self) -> LockStore {
        LockStore::new(&self.config, self.pool.clone(), &self.store_id).expect("lock store")
    }

    fn keys(&self) -> raw::Keys {
        raw::Keys::new(&self.config.redis.key_prefix, &self.store_id)
    }

    async fn con(&self) -> redis::aio::MultiplexedConnection {
        self.raw
            .get_multiplexed_async_connection()
            .await
            .expect("raw redis connection")
    }

    /// What Redis holds for an intent, read directly.
    async fn redis_entry(&self, intent_id: &str) -> Option<StoredOutcome> {
        let v: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.keys().idem(intent_id))
            .query_async(&mut self.con().await)
            .await
            .expect("GET");
        v.map(|v| {
            raw::decode_outcome(intent_id, &v)
                .expect("decodable entry")
                .0
        })
    }

    /// Puts an entry into Redis behind the store's back, as an older version's resynchronisation
    /// (which copied batches that were not committed yet) could have left it.
    async fn plant(&self, o: &StoredOutcome) {
        let value = format!("{}|1", raw::encode_outcome(o).expect("terminal outcome"));
        let _: () = redis::cmd("SET")
            .arg(self.keys().idem(&o.intent_id))
            .arg(value)
            .arg("EX")
            .arg(3600)
            .query_async(&mut self.con().await)
            .await
            .expect("SET");
    }

    /// Redis loses everything this test wrote (what FLUSHALL or a restart without persistence
    /// does, limited to this test's keys).
    async fn lose_redis_data(&self) {
        let mut con = self.con().await;
        let keys = scan_keys(&mut con, &format!("{}:*", self.config.redis.key_prefix)).await;
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL")
                .arg(keys)
                .query_async(&mut con)
                .await
                .expect("DEL");
        }
    }

    /// Deletes the epoch key: Redis is out of sync and the next health check resynchronises it
    /// (a full copy, as after a FLUSHALL), without touching the idempotency entries.
    async fn forget_epoch(&self) {
        let _: () = redis::cmd("DEL")
            .arg(self.keys().epoch())
            .query_async(&mut self.con().await)
            .await
            .expect("DEL epoch");
    }

    /// Writes the next batch of `partition` through the real batch write (fenced, tagged with
    /// its batch number), one audit row per outcome. Until [`World::commit`] (or a restore) the
    /// batch is the partition's one uncommitted batch.
    async fn write_batch(&mut self, partition: i32, outcomes: &[StoredOutcome]) -> u64 {
        let mut part = self.parts.get(&partition).copied().unwrap_or_default();
        if part.fence == 0 {
            part.fence = pg::acquire_partition(
                &self.pool,
                TOPIC,
                partition,
                &self.config.instance_id,
                Duration::from_secs(300),
            )
            .await
            .expect("acquire")
            .expect("a free partition");
        }
        let batch_no = part.last_batch + 1;
        let mut write = BatchWrite::default();
        for o in outcomes {
            let row = audit_row(o, partition, batch_no, part);
            if raw::is_idempotency_outcome(o) && !self.decided.insert(o.intent_id.clone()) {
                // The engine decides an intent again only for an operator's re-submission,
                // which its batch records (the durable write refuses it otherwise: R5).
                write.transitions.push(TransitionRow {
                    transition: Transition::Resubmitted,
                    ..row.clone()
                });
            }
            write.transitions.push(row);
            part.next_offset += 1;
        }
        write.partitions.push(PartitionWrite {
            partition,
            fence: part.fence,
            batch_no,
            next_offset: part.next_offset,
            clock_ms: 0,
        });
        pg::apply_batch(
            &self.pool,
            TOPIC,
            &self.config.instance_id,
            Duration::from_secs(300),
            &write,
        )
        .await
        .expect("batch write");
        part.last_batch = batch_no;
        self.parts.insert(partition, part);
        batch_no
    }

    /// Records in PostgreSQL that the partition's last batch committed in Kafka (what the
    /// engine does right after each commit).
    async fn commit(&self, partition: i32) {
        let part = self.parts[&partition];
        pg::mark_committed(
            &self.pool,
            TOPIC,
            &[(partition, part.fence, part.last_batch)],
        )
        .await
        .expect("mark committed");
    }

    /// A batch written and committed.
    async fn write_committed(&mut self, partition: i32, outcomes: &[StoredOutcome]) -> u64 {
        let b = self.write_batch(partition, outcomes).await;
        self.commit(partition).await;
        b
    }

    /// Restores the partition as the engine does when Kafka's recovery point names
    /// `kafka_batch`: later batches are rolled back.
    async fn restore(&mut self, partition: i32, kafka_batch: u64) -> RestoredPartition {
        let part = self.parts[&partition];
        let kafka = KafkaCommitted::Point {
            offset: part.next_offset,
            point: RecoveryPoint {
                batch: kafka_batch,
                fence: part.fence,
                clock_ms: 0,
            },
        };
        let restored = pg::restore_partition(
            &self.pool,
            TOPIC,
            partition,
            part.fence,
            "g",
            &kafka,
            Default::default(),
        )
        .await
        .expect("restore");
        let p = self.parts.get_mut(&partition).expect("partition");
        p.last_batch = restored.resume.batch;
        p.next_offset = restored.resume.next_offset;
        restored
    }

    async fn mode_audits(&self) -> Vec<serde_json::Value> {
        sqlx::query_scalar(
            "SELECT detail FROM cc_admin_audit WHERE action = 'lock_store_mode' ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .expect("audit rows")
    }

    async fn pg_epoch(&self) -> i64 {
        sqlx::query_scalar("SELECT epoch FROM cc_store_state WHERE id = 1")
            .fetch_one(&self.pool)
            .await
            .expect("epoch")
    }
}

/// The audit row the engine writes for an outcome.
fn audit_row(o: &StoredOutcome, partition: i32, batch_no: u64, part: Part) -> TransitionRow {
    let c = o.columns();
    TransitionRow {
        partition,
        batch_no,
        source_offset: part.next_offset,
        intent_id: o.intent_id.clone(),
        contact_id: format!("contact-{}", o.intent_id),
        clinic_id: "clinic".into(),
        correlation_id: "corr".into(),
        transition: Transition::Record {
            waited: false,
            to: c.state.parse::<State>().expect("a state"),
            reason: (!c.reason.is_empty()).then(|| c.reason.parse().expect("a reason")),
        },
        commit_sequence: c.commit_sequence,
        contact_version: c.contact_version,
        fingerprint: o.prior.fingerprint,
        detail: String::new(),
        fence: part.fence,
    }
}

fn outcome(id: &str, state: &str, reason: &str, seq: u64) -> StoredOutcome {
    let reason = || reason.parse::<Reason>().expect("a reason");
    let outcome = match state {
        "committed_causal" => Outcome::Committed {
            commit_sequence: seq,
            contact_version: seq,
        },
        "waiting_previous_commit" => Outcome::Waiting {
            commit_sequence: seq,
        },
        "blocked_conflict" => Outcome::Blocked {
            reason: reason(),
            commit_sequence: seq,
        },
        "manual_review" => Outcome::ManualReview {
            reason: reason(),
            commit_sequence: seq,
        },
        other => panic!("no outcome {other}"),
    };
    StoredOutcome {
        intent_id: id.to_string(),
        prior: PriorOutcome {
            fingerprint: 0xfeed_0000_0000_0000 ^ seq,
            outcome,
        },
    }
}

fn committed(prefix: &str, n: u64) -> Vec<StoredOutcome> {
    (1..=n)
        .map(|i| outcome(&format!("{prefix}-{i}"), "committed_causal", "", i))
        .collect()
}

fn ids(outcomes: &[StoredOutcome]) -> Vec<String> {
    outcomes.iter().map(|o| o.intent_id.clone()).collect()
}

fn sorted(mut v: Vec<StoredOutcome>) -> Vec<StoredOutcome> {
    v.sort_by(|a, b| a.intent_id.cmp(&b.intent_id));
    v
}

/// Runs health checks until `cond` holds (or panics after `within`).
async fn settle(
    store: &LockStore,
    within: Duration,
    what: &str,
    cond: impl Fn(&LockStore) -> bool,
) {
    let deadline = Instant::now() + within;
    loop {
        store.health_check().await;
        if cond(store) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not reached within {within:?} (mode {}, in sync {}, {:?})",
            store.mode(),
            store.redis_in_sync(),
            store.stats()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn in_sync(store: &LockStore) {
    settle(store, Duration::from_secs(10), "Redis in sync", |s| {
        s.mode() == Mode::Redis && s.redis_in_sync()
    })
    .await;
}

fn stack_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/stack.sh")
}

/// Starts Redis again when dropped, even when the test failed half-way.
struct RestartRedis;

impl Drop for RestartRedis {
    fn drop(&mut self) {
        let status = Command::new("bash")
            .arg(stack_script())
            .args(["start", "redis"])
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("WARNING: could not restart Redis: {status:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_is_one_redis_round_trip_and_matches_postgres() {
    let _shared = crate::common::shared_stack().await;
    let mut w = World::new("ls_fast", |_| {}).await;
    let store = w.store().await;
    in_sync(&store).await;

    // A committed batch: durable rows first, then the write-through.
    let mut batch = committed("fast", 40);
    batch.push(outcome(
        "fast-blocked",
        "blocked_conflict",
        "VERSION_CONFLICT",
        7,
    ));
    batch.push(outcome("fast-review", "manual_review", "WAIT_TIMEOUT", 8));
    // Not idempotency outcomes: invalid input and a non-terminal state.
    let invalid = outcome("fast-invalid", "manual_review", "INVALID_INTENT", 0);
    let waiting = outcome("fast-waiting", "waiting_previous_commit", "", 9);
    let mut all = batch.clone();
    all.push(invalid.clone());
    all.push(waiting.clone());
    w.write_committed(0, &all).await;
    store.record(&all).await.expect("record");
    assert_eq!(w.redis_entry("fast-invalid").await, None);
    assert_eq!(w.redis_entry("fast-waiting").await, None);
    let ttl: i64 = redis::cmd("TTL")
        .arg(w.keys().idem("fast-1"))
        .query_async(&mut w.con().await)
        .await
        .unwrap();
    let week = 7 * 24 * 3600;
    assert!(ttl > week - 60 && ttl <= week, "TTL {ttl}");

    // Known and unknown ids together: one Redis call, no PostgreSQL, same answer as PostgreSQL.
    let mut query = ids(&all);
    query.extend((1..=40).map(|i| format!("never-seen-{i}")));
    let before = store.stats();
    let found = store.lookup(&query).await.expect("lookup");
    let after = store.stats();
    assert_eq!(after.redis_calls - before.redis_calls, 1, "one round trip");
    assert_eq!(after.lookups_redis - before.lookups_redis, 1);
    assert_eq!(after.lookups_postgres, before.lookups_postgres);
    let durable = pg::lookup_outcomes(&w.pool, &query).await.unwrap();
    assert_eq!(sorted(found), sorted(durable.clone()));
    assert_eq!(durable.len(), batch.len());

    // Redis really answers: an outcome only Redis knows is returned.
    let only_redis = outcome("only-in-redis", "committed_causal", "", 3);
    store
        .record(std::slice::from_ref(&only_redis))
        .await
        .unwrap();
    let found = store.lookup(&["only-in-redis".to_string()]).await.unwrap();
    assert_eq!(found, vec![only_redis]);

    // A newer outcome overwrites an older one (re-submitted and committed).
    let again = outcome("fast-review", "committed_causal", "", 8);
    w.write_committed(0, std::slice::from_ref(&again)).await;
    store.record(std::slice::from_ref(&again)).await.unwrap();
    let found = store.lookup(&["fast-review".to_string()]).await.unwrap();
    assert_eq!(found, vec![again]);
    assert_eq!(store.mode(), Mode::Redis);
    assert!(w.mode_audits().await.is_empty(), "no mode change happened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_exclude_a_second_owner_until_release_or_expiry_and_fencing_rejects_stale_tokens() {
    let _shared = crate::common::shared_stack().await;
    let w = World::new("ls_locks", |_| {}).await;
    let store = w.store().await;
    let lease = Duration::from_secs(5);

    assert_eq!(
        store
            .acquire_lock(TOPIC, 3, "owner-a", lease)
            .await
            .unwrap(),
        LockResult::Granted { store: Mode::Redis }
    );
    match store
        .acquire_lock(TOPIC, 3, "owner-b", lease)
        .await
        .unwrap()
    {
        LockResult::Held { owner, ttl } => {
            assert_eq!(owner, "owner-a");
            assert!(ttl > Duration::from_secs(3) && ttl <= lease, "{ttl:?}");
        }
        other => panic!("owner-b must be refused while owner-a holds the lock: {other:?}"),
    }
    // Another partition is independent; the holder renews its own lock.
    assert_eq!(
        store
            .acquire_lock(TOPIC, 4, "owner-b", lease)
            .await
            .unwrap(),
        LockResult::Granted { store: Mode::Redis }
    );
    assert_eq!(
        store
            .acquire_lock(TOPIC, 3, "owner-a", lease)
            .await
            .unwrap(),
        LockResult::Granted { store: Mode::Redis }
    );
    // Only the owner releases.
    assert!(!store.release_lock(TOPIC, 3, "owner-b").await.unwrap());
    assert!(store.release_lock(TOPIC, 3, "owner-a").await.unwrap());
    assert!(!store.release_lock(TOPIC, 3, "owner-a").await.unwrap());
    assert_eq!(
        store
            .acquire_lock(TOPIC, 3, "owner-b", Duration::from_millis(300))
            .await
            .unwrap(),
        LockResult::Granted { store: Mode::Redis }
    );
    assert!(matches!(
        store
            .acquire_lock(TOPIC, 3, "owner-a", lease)
            .await
            .unwrap(),
        LockResult::Held { .. }
    ));
    // Expiry frees it.
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(
        store
            .acquire_lock(TOPIC, 3, "owner-a", lease)
            .await
            .unwrap(),
        LockResult::Granted { store: Mode::Redis }
    );

    // The lock is advisory; PostgreSQL's fencing is not: a token taken earlier is refused.
    let pg_lease = Duration::from_secs(1);
    let old = pg::acquire_partition(&w.pool, TOPIC, 3, "owner-b", pg_lease)
        .await
        .unwrap()
        .expect("free partition");
    pg::release_partition(&w.pool, TOPIC, 3, old).await.unwrap();
    let new = pg::acquire_partition(&w.pool, TOPIC, 3, "owner-a", pg_lease)
        .await
        .unwrap()
        .expect("released partition");
    assert!(new > old, "fencing tokens increase: {old} then {new}");
    let write = |fence: u64| BatchWrite {
        partitions: vec![PartitionWrite {
            partition: 3,
            fence,
            batch_no: 1,
            next_offset: 1,
            clock_ms: 0,
        }],
        transitions: vec![TransitionRow {
            partition: 3,
            batch_no: 1,
            source_offset: 0,
            intent_id: "fenced".into(),
            contact_id: "c".into(),
            clinic_id: String::new(),
            correlation_id: String::new(),
            transition: Transition::Record {
                waited: false,
                to: State::CommittedCausal,
                reason: None,
            },
            commit_sequence: 1,
            contact_version: 1,
            fingerprint: 0,
            detail: String::new(),
            fence,
        }],
        ..BatchWrite::default()
    };
    let err = pg::apply_batch(&w.pool, TOPIC, "owner-b", pg_lease, &write(old))
        .await
        .expect_err("a stale token must be refused");
    assert!(err.is_fenced(), "{err}");
    pg::apply_batch(&w.pool, TOPIC, "owner-a", pg_lease, &write(new))
        .await
        .expect("the current token writes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_falls_back_to_postgres_and_fails_back_with_the_fallback_outcomes() {
    let _exclusive = crate::common::exclusive_stack().await;
    let mut w = World::new("ls_down", |_| {}).await;
    let store = w.store().await;
    in_sync(&store).await;
    let epoch_before = w.pg_epoch().await;

    let before = committed("before", 20);
    let mut review = outcome("resubmitted", "manual_review", "WAIT_TIMEOUT", 21);
    let mut first = before.clone();
    first.push(review.clone());
    w.write_committed(0, &first).await;
    store.record(&first).await.unwrap();
    assert_eq!(w.redis_entry("resubmitted").await, Some(review.clone()));

    let _restart = RestartRedis;
    process::stack("stop", "redis");

    // Every lookup answers from PostgreSQL; the mode changes at the breaker's threshold.
    let threshold = w.config.redis.breaker_failures;
    for call in 1..=threshold {
        let found = store
            .lookup(&ids(&first))
            .await
            .expect("lookup while Redis is down");
        assert_eq!(sorted(found), sorted(first.clone()), "call {call}");
        let expected = if call < threshold {
            Mode::Redis
        } else {
            Mode::Postgres
        };
        assert_eq!(store.mode(), expected, "after {call} failed calls");
    }
    let audits = w.mode_audits().await;
    assert_eq!(audits.len(), 1, "{audits:?}");
    assert_eq!(audits[0]["from"], "redis");
    assert_eq!(audits[0]["to"], "postgres");
    assert!(
        audits[0]["cause"].as_str().unwrap().contains("looking up"),
        "{audits:?}"
    );
    assert!(
        w.pg_epoch().await > epoch_before,
        "the fallback bumps the epoch"
    );
    assert_eq!(
        store
            .acquire_lock(TOPIC, 0, "me", Duration::from_secs(5))
            .await
            .unwrap(),
        LockResult::Granted {
            store: Mode::Postgres
        }
    );

    // Decided during the fallback (written by the engine's batch; record is a no-op now): new
    // intents, and the manual-review item re-submitted and committed.
    let during = committed("during", 15);
    review = outcome("resubmitted", "committed_causal", "", 21);
    let mut second = during.clone();
    second.push(review.clone());
    w.write_committed(0, &second).await;
    store
        .record(&second)
        .await
        .expect("record in postgres mode");
    let found = store.lookup(&ids(&second)).await.unwrap();
    assert_eq!(sorted(found), sorted(second.clone()));

    // Redis still down: the probe fails and the mode stays.
    tokio::time::sleep(w.config.redis.breaker_open_for).await;
    assert_eq!(store.health_check().await, Mode::Postgres);

    process::stack("start", "redis");
    settle(&store, Duration::from_secs(15), "failback", |s| {
        s.mode() == Mode::Redis
    })
    .await;
    assert!(store.redis_in_sync());
    let audits = w.mode_audits().await;
    assert_eq!(audits.len(), 2, "{audits:?}");
    assert_eq!(audits[1]["from"], "postgres");
    assert_eq!(audits[1]["to"], "redis");

    // The restarted Redis (no persistence) was refilled: outcomes from before and during.
    for o in before.iter().chain(&second) {
        assert_eq!(w.redis_entry(&o.intent_id).await.as_ref(), Some(o));
    }
    let mut all_ids = ids(&before);
    all_ids.extend(ids(&second));
    let s0 = store.stats();
    let found = store.lookup(&all_ids).await.unwrap();
    let s1 = store.stats();
    assert_eq!(s1.lookups_redis - s0.lookups_redis, 1, "answered by Redis");
    assert_eq!(s1.lookups_postgres, s0.lookups_postgres);
    let mut expected = before.clone();
    expected.extend(second);
    assert_eq!(sorted(found), sorted(expected));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_redis_opens_the_breaker_and_failback_never_trusts_stale_entries() {
    let _exclusive = crate::common::exclusive_stack().await;
    let mut w = World::new("ls_slow", |c| {
        c.redis.command_timeout = Duration::from_millis(250);
        c.redis.breaker_open_for = Duration::from_secs(1);
    })
    .await;
    let store = w.store().await;
    in_sync(&store).await;

    // Before: X ends in manual review; Y commits.
    let x_review = outcome("x", "manual_review", "WAIT_TIMEOUT", 1);
    let y = outcome("y", "committed_causal", "", 2);
    w.write_committed(0, &[x_review.clone(), y.clone()]).await;
    store.record(&[x_review.clone(), y.clone()]).await.unwrap();
    let query: Vec<String> = ["x", "y", "z"].iter().map(|s| s.to_string()).collect();
    assert_eq!(
        sorted(store.lookup(&query).await.unwrap()),
        vec![x_review.clone(), y.clone()]
    );

    // Redis stops answering for about 2.5 s: every call times out after command_timeout.
    let paused_at = Instant::now();
    let freeze = freeze_redis(2500).await;
    let threshold = w.config.redis.breaker_failures;
    for call in 1..=threshold {
        let t = Instant::now();
        let found = store
            .lookup(&query)
            .await
            .expect("lookup while Redis is slow");
        assert!(
            t.elapsed() < Duration::from_millis(1200),
            "call {call} took {:?}",
            t.elapsed()
        );
        assert_eq!(
            sorted(found),
            vec![x_review.clone(), y.clone()],
            "call {call}"
        );
    }
    assert_eq!(
        store.mode(),
        Mode::Postgres,
        "the breaker opened within its threshold"
    );
    assert!(store.stats().redis_failures >= u64::from(threshold));
    assert!(
        paused_at.elapsed() < Duration::from_millis(2500),
        "still frozen: real timeouts"
    );

    // During the fallback X is re-submitted and commits, Z commits.
    let x_committed = outcome("x", "committed_causal", "", 1);
    let z = outcome("z", "committed_causal", "", 3);
    w.write_committed(0, &[x_committed.clone(), z.clone()])
        .await;
    store
        .record(&[x_committed.clone(), z.clone()])
        .await
        .unwrap();
    let want = vec![x_committed.clone(), y.clone(), z.clone()];
    assert_eq!(sorted(store.lookup(&query).await.unwrap()), want);

    // Redis answers again, with its stale entry for X and nothing for Z.
    drop(freeze);
    assert_eq!(
        w.redis_entry("x").await,
        Some(x_review.clone()),
        "stale entry"
    );
    assert_eq!(w.redis_entry("z").await, None);
    // Not trusted before the failback ...
    assert_eq!(sorted(store.lookup(&query).await.unwrap()), want);
    // ... and overwritten by it.
    settle(&store, Duration::from_secs(10), "failback", |s| {
        s.mode() == Mode::Redis
    })
    .await;
    assert!(store.redis_in_sync());
    assert_eq!(w.redis_entry("x").await, Some(x_committed.clone()));
    assert_eq!(w.redis_entry("z").await, Some(z.clone()));
    let s0 = store.stats();
    assert_eq!(sorted(store.lookup(&query).await.unwrap()), want);
    assert_eq!(store.stats().lookups_redis - s0.lookups_redis, 1);
    let audits = w.mode_audits().await;
    assert_eq!(audits.len(), 2, "{audits:?}");
    assert!(
        audits[0]["cause"]
            .as_str()
            .unwrap()
            .contains("did not answer"),
        "{audits:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_that_times_out_trips_at_once_and_never_lands_late() {
    let _exclusive = crate::common::exclusive_stack().await;
    let mut w = World::new("ls_late", |c| {
        c.redis.command_timeout = Duration::from_millis(250);
        c.redis.breaker_open_for = Duration::from_secs(3);
    })
    .await;
    let store = w.store().await;
    in_sync(&store).await;

    // A first batch goes through (and loads the write script).
    let early = outcome("early", "committed_causal", "", 1);
    w.write_committed(0, std::slice::from_ref(&early)).await;
    store
        .record(std::slice::from_ref(&early))
        .await
        .expect("record");
    assert_eq!(w.redis_entry("early").await, Some(early));

    let late = outcome("late", "committed_causal", "", 2);
    w.write_committed(0, std::slice::from_ref(&late)).await;
    let freeze = freeze_redis(1500).await;
    store
        .record(std::slice::from_ref(&late))
        .await
        .expect("record");
    assert_eq!(
        store.mode(),
        Mode::Postgres,
        "one failed write-through is enough"
    );
    assert_eq!(store.stats().redis_failures, 1);
    // The frozen server reads the write when it wakes up, and finds its deadline passed.
    drop(freeze);
    assert_eq!(
        w.redis_entry("late").await,
        None,
        "a timed-out write never lands later"
    );
    // Lookups still know it (PostgreSQL), and the failback copies it.
    assert_eq!(
        store
            .lookup(&ids(std::slice::from_ref(&late)))
            .await
            .unwrap(),
        vec![late.clone()]
    );
    settle(&store, Duration::from_secs(10), "failback", |s| {
        s.mode() == Mode::Redis
    })
    .await;
    assert_eq!(w.redis_entry("late").await, Some(late));
}

/// The same for a write-through of several calls sent together: call k carries the deadline
/// send + (k + 1) x the timeout, and the write is given up only when every call has answered
/// or passed its deadline, so nothing of it lands once it failed. Redis frozen past the last
/// deadline (nothing lands), and frozen until between the second and the third deadline (the
/// last calls land, but before the write returns).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_of_several_calls_that_times_out_never_lands_late() {
    let _exclusive = crate::common::exclusive_stack().await;
    let timeout = Duration::from_millis(250);
    let mut w = World::new("ls_late_many", |c| {
        c.redis.command_timeout = timeout;
        c.redis.breaker_open_for = Duration::from_secs(3);
    })
    .await;
    let store = w.store().await;
    let calls = 4;
    for freeze_ms in [2000, 600] {
        in_sync(&store).await;
        let failures = store.stats().redis_failures;
        let batch = sorted(committed(
            &format!("late-{freeze_ms}"),
            (calls - 1) * raw::KEYS_PER_CALL as u64 + 1,
        ));
        w.write_committed(0, &batch).await;
        let keys: Vec<String> = batch.iter().map(|o| w.keys().idem(&o.intent_id)).collect();
        let freeze = freeze_redis(freeze_ms).await;
        let t = Instant::now();
        store.record(&batch).await.expect("record");
        let gave_up = t.elapsed();
        // Redis runs on this machine: its clock (the entries' stamps) is this clock.
        let gave_up_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert_eq!(
            store.mode(),
            Mode::Postgres,
            "{freeze_ms}: the write-through failed"
        );
        assert_eq!(store.stats().redis_failures, failures + 1);
        drop(freeze);
        // Past every deadline of the write.
        tokio::time::sleep(
            (timeout * calls as u32 + Duration::from_millis(500)).saturating_sub(t.elapsed()),
        )
        .await;
        // Each entry ends with the server time at which its call ran (`|<stamp ms>`).
        let values: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut w.con().await)
            .await
            .unwrap();
        let stamps: Vec<u64> = values
            .iter()
            .flatten()
            .map(|v| v.rsplit('|').next().unwrap().parse().expect("stamp"))
            .collect();
        println!(
            "{freeze_ms}: given up after {gave_up:?}, {} of {} entries landed",
            stamps.len(),
            keys.len()
        );
        assert!(
            stamps.iter().all(|s| *s <= gave_up_at),
            "{freeze_ms}: calls of a write given up on ran after it was given up ({} of {} \
             entries, given up after {gave_up:?})",
            stamps.iter().filter(|s| **s > gave_up_at).count(),
            stamps.len()
        );
        if freeze_ms == 2000 {
            assert!(
                stamps.is_empty(),
                "frozen past every deadline: nothing lands"
            );
            assert!(
                gave_up >= timeout * calls as u32 - Duration::from_millis(50),
                "given up after {gave_up:?}, before the last call's deadline"
            );
        }
        // PostgreSQL answers meanwhile, and the failback copies the batch.
        assert_eq!(sorted(store.lookup(&ids(&batch)).await.unwrap()), batch);
        settle(&store, Duration::from_secs(15), "failback", |s| {
            s.mode() == Mode::Redis && s.redis_in_sync()
        })
        .await;
        let copied: usize = redis::cmd("EXISTS")
            .arg(&keys)
            .query_async(&mut w.con().await)
            .await
            .unwrap();
        assert_eq!(copied, batch.len(), "{freeze_ms}: copied back");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_many_thousand_outcomes_is_written_through_and_looked_up_within_the_command_timeout(
) {
    let _exclusive = crate::common::exclusive_stack().await;
    // 40 ms: far less than Redis takes for 40,000 keys in one call (about 150 ms for the write
    // on an idle two-core machine, more under load: the bench's 20,000-outcome batches timed
    // out at 250 ms and the store fell back), far more than for a call of 1,000 (about 4 ms).
    let mut w = World::new("ls_big", |c| {
        c.redis.command_timeout = Duration::from_millis(40);
    })
    .await;
    let store = w.store().await;
    in_sync(&store).await;

    let batch = committed("big", 40_000);
    w.write_committed(0, &batch).await;
    let before = store.stats();
    store.record(&batch).await.expect("record");
    assert_eq!(
        store.mode(),
        Mode::Redis,
        "a big write-through to a healthy Redis is no failure ({:?})",
        store.stats()
    );
    let held: usize = redis::cmd("EXISTS")
        .arg(
            batch
                .iter()
                .map(|o| w.keys().idem(&o.intent_id))
                .collect::<Vec<_>>(),
        )
        .query_async(&mut w.con().await)
        .await
        .unwrap();
    assert_eq!(held, batch.len(), "every outcome written through");

    let found = store.lookup(&ids(&batch)).await.expect("lookup");
    let after = store.stats();
    assert_eq!(after.redis_failures, before.redis_failures);
    assert_eq!(
        after.lookups_redis - before.lookups_redis,
        1,
        "Redis answered the lookup"
    );
    assert_eq!(after.lookups_postgres, before.lookups_postgres);
    assert_eq!(sorted(found), sorted(batch));

    // Building the calls is the client's time, not Redis's: a build slower than the first
    // call's whole share (a busy machine; 10 to 15 ms of the 40 here on an idle one) fails
    // nothing, because each deadline is counted from the end of the build.
    let again = committed("big-slow", 5_000);
    w.write_committed(1, &again).await;
    fail::cfg("redis-put-built", "sleep(120)").expect("failpoint");
    let recorded = store.record(&again).await;
    fail::remove("redis-put-built");
    recorded.expect("record");
    assert_eq!(
        store.mode(),
        Mode::Redis,
        "a slow build is not Redis's time ({:?})",
        store.stats()
    );
    assert_eq!(store.stats().redis_failures, before.redis_failures);
    assert!(w.mode_audits().await.is_empty(), "no mode change happened");
}

/// A TCP proxy to the tests' Redis that holds every chunk a client sends for `delay` before it
/// passes it on (answers come back at once): each round trip through it costs `delay`. Returns
/// the Redis URL that goes through it.
async fn delaying_redis_proxy(delay: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = redis_url();
    let host_port = url
        .trim_start_matches("redis://")
        .split('/')
        .next()
        .and_then(|a| a.rsplit('@').next())
        .expect("host:port in the Redis URL")
        .to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let target = host_port.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                continue;
            };
            let (mut client_in, mut client_out) = client.into_split();
            let (mut server_in, mut server_out) = server.into_split();
            let (tx, mut rx) =
                tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n @ 1..) = client_in.read(&mut buf).await {
                    let due = tokio::time::Instant::now() + delay;
                    if tx.send((due, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            });
            tokio::spawn(async move {
                while let Some((due, bytes)) = rx.recv().await {
                    tokio::time::sleep_until(due).await;
                    if server_out.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut server_in, &mut client_out).await;
            });
        }
    });
    url.replacen(&host_port, &format!("127.0.0.1:{port}"), 1)
}

/// CONTRACT §7: at most one Redis round trip per batch. Through a proxy that delays every
/// request by 250 ms, the write-through of 20,000 outcomes and the lookup of their ids (20 calls
/// of 1,000 keys each) take about one delay each, not twenty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_one_round_trip_to_redis_however_many_calls_it_takes() {
    let _shared = crate::common::shared_stack().await;
    let delay = Duration::from_millis(250);
    let proxied = delaying_redis_proxy(delay).await;
    let via_proxy = proxied.clone();
    let mut w = World::new("ls_rtt", |c| {
        c.redis.url = via_proxy.into();
        c.redis.command_timeout = Duration::from_secs(2);
    })
    .await;

    // The proxy delays each round trip: two GETs one after the other take two delays.
    let mut c = redis::Client::open(proxied)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let t = Instant::now();
    for _ in 0..2 {
        let _: Option<String> = redis::cmd("GET")
            .arg("none")
            .query_async(&mut c)
            .await
            .unwrap();
    }
    assert!(
        t.elapsed() >= delay * 2,
        "the proxy delays: {:?}",
        t.elapsed()
    );

    let store = w.store().await;
    settle(&store, Duration::from_secs(30), "Redis in sync", |s| {
        s.mode() == Mode::Redis && s.redis_in_sync()
    })
    .await;
    let calls = 20;
    let batch = sorted(committed("rtt", calls * raw::KEYS_PER_CALL as u64));
    w.write_committed(0, &batch).await;
    let s0 = store.stats();
    let t = Instant::now();
    store.record(&batch).await.expect("record");
    let written = t.elapsed();
    let t = Instant::now();
    let found = store.lookup(&ids(&batch)).await.expect("lookup");
    let looked_up = t.elapsed();
    let s1 = store.stats();
    assert_eq!(store.mode(), Mode::Redis);
    assert_eq!(s1.redis_failures, s0.redis_failures);
    assert_eq!(s1.lookups_redis - s0.lookups_redis, 1, "Redis answered");
    assert_eq!(sorted(found), batch);
    // One after the other, 20 calls would take at least 20 delays (5 s).
    let one_by_one = delay * calls as u32;
    for (what, took) in [("write-through", written), ("lookup", looked_up)] {
        println!("{what} of {} keys through the proxy: {took:?}", batch.len());
        assert!(
            took < one_by_one / 2,
            "the {what} of {calls} calls took {took:?}: more than one round trip of {delay:?} each"
        );
    }
}

/// A lookup of more than `KEYS_PER_CALL` ids is several MGETs; Redis answers it only if every
/// one saw the same epoch key. Here the key changes between the two calls, once from the
/// marked key to another (as a copy by another instance at a newer epoch leaves it), once from
/// another key back to the marked one: whichever call's key a broken check trusted, one of the
/// two lookups would be answered by Redis.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_whose_calls_see_two_epoch_keys_is_answered_by_postgres() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    // The calls of a lookup go out together (one round trip); the fail points send them one by
    // one and run the test's change between two of them.
    const ONE_BY_ONE: &str = "redis-calls-one-by-one";
    const BETWEEN_CALLS: &str = "redis-next-call";
    // Exclusive: the failpoint is the process's, no other test's lookup may run into it.
    let _exclusive = crate::common::exclusive_stack().await;
    let mut w = World::new("ls_split", |_| {}).await;
    let store = w.store().await;
    let batch = sorted(committed("split", raw::KEYS_PER_CALL as u64 + 500));
    w.write_committed(0, &batch).await;
    store.record(&batch).await.expect("record");
    let epoch_key = w.keys().epoch();

    for (case, marked_first) in [
        ("marked key, then another", true),
        ("another key, then the marked one", false),
    ] {
        in_sync(&store).await;
        let s0 = store.stats();
        assert_eq!(sorted(store.lookup(&ids(&batch)).await.unwrap()), batch);
        assert_eq!(
            store.stats().lookups_redis - s0.lookups_redis,
            1,
            "{case}: in sync, Redis answers a two-call lookup"
        );
        let marked: String = redis::cmd("GET")
            .arg(&epoch_key)
            .query_async(&mut w.con().await)
            .await
            .expect("the marked epoch key");
        let other = format!("{marked}-elsewhere");
        let (before, between) = if marked_first {
            (marked.clone(), other)
        } else {
            (other, marked.clone())
        };
        let _: () = redis::cmd("SET")
            .arg(&epoch_key)
            .arg(&before)
            .query_async(&mut w.con().await)
            .await
            .unwrap();
        let fired = Arc::new(AtomicUsize::new(0));
        {
            let (fired, client, key) = (fired.clone(), w.raw.clone(), epoch_key.clone());
            fail::cfg(ONE_BY_ONE, "return").expect("failpoint");
            fail::cfg_callback(BETWEEN_CALLS, move || {
                if fired.fetch_add(1, Ordering::SeqCst) == 0 {
                    let mut c = client.get_connection().expect("redis connection");
                    let _: () = redis::cmd("SET")
                        .arg(&key)
                        .arg(&between)
                        .query(&mut c)
                        .expect("SET the epoch key");
                }
            })
            .expect("failpoint");
        }
        let s1 = store.stats();
        let found = store.lookup(&ids(&batch)).await;
        fail::remove(BETWEEN_CALLS);
        fail::remove(ONE_BY_ONE);
        let s2 = store.stats();
        assert_eq!(
            fired.load(Ordering::SeqCst),
            1,
            "{case}: the lookup made two calls"
        );
        assert_eq!(sorted(found.expect("lookup")), batch, "{case}");
        assert_eq!(
            (
                s2.lookups_redis - s1.lookups_redis,
                s2.lookups_postgres - s1.lookups_postgres
            ),
            (0, 1),
            "{case}: PostgreSQL answers a lookup whose calls saw two epoch keys"
        );
        assert_eq!(
            s2.redis_failures, s1.redis_failures,
            "{case}: no Redis failure"
        );
        assert_eq!(store.mode(), Mode::Redis, "{case}: no mode change");
    }
    assert!(w.mode_audits().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_makes_redis_out_of_sync_until_resynchronised() {
    let _exclusive = crate::common::exclusive_stack().await;
    let mut w = World::new("ls_flush", |_| {}).await;
    let store = w.store().await;
    in_sync(&store).await;
    let batch = sorted(committed("flush", 30));
    w.write_committed(1, &batch).await;
    store.record(&batch).await.unwrap();
    let s0 = store.stats();
    assert_eq!(sorted(store.lookup(&ids(&batch)).await.unwrap()), batch);
    assert_eq!(store.stats().lookups_redis - s0.lookups_redis, 1);

    // ASYNC: the keys are gone at once and freed off Redis's main thread (a synchronous flush
    // of a large keyspace outlasts the client's 500 ms).
    let _: () = redis::cmd("FLUSHALL")
        .arg("ASYNC")
        .query_async(&mut w.con().await)
        .await
        .unwrap();
    // The epoch key went with the data: misses are not trusted, PostgreSQL answers.
    let s1 = store.stats();
    assert_eq!(sorted(store.lookup(&ids(&batch)).await.unwrap()), batch);
    let s2 = store.stats();
    assert_eq!(s2.lookups_postgres - s1.lookups_postgres, 1);
    assert_eq!(s2.lookups_redis, s1.lookups_redis);
    assert!(!store.redis_in_sync());
    assert_eq!(
        store.mode(),
        Mode::Redis,
        "Redis is healthy: no mode change"
    );

    store.health_check().await;
    assert!(store.redis_in_sync(), "one health check resynchronises");
    assert!(store.stats().resynced_outcomes >= batch.len() as u64);
    for o in &batch {
        assert_eq!(w.redis_entry(&o.intent_id).await.as_ref(), Some(o));
    }
    let s3 = store.stats();
    assert_eq!(sorted(store.lookup(&ids(&batch)).await.unwrap()), batch);
    assert_eq!(store.stats().lookups_redis - s3.lookups_redis, 1);
    assert!(w.mode_audits().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_from_the_url_works_and_a_wrong_password_falls_back() {
    let _shared = crate::common::shared_stack().await;
    let w = World::new("ls_auth", |_| {}).await;
    let user = format!("cc_{}", &w.config.postgres.schema[8..]);
    let password = "s3cret-pw";
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("on")
        .arg(format!(">{password}"))
        .arg(format!("~{}:*", w.config.redis.key_prefix))
        .arg("+@all")
        .query_async(&mut w.con().await)
        .await
        .expect("ACL SETUSER");
    struct DelUser(String);
    impl Drop for DelUser {
        fn drop(&mut self) {
            let _ = Command::new("redis-cli")
                .args(["-u", &redis_url(), "ACL", "DELUSER", &self.0])
                .output();
        }
    }
    let _del = DelUser(user.clone());
    let hostport = redis_url().trim_start_matches("redis://").to_string();

    let mut config = w.config.clone();
    config.redis.url = format!("redis://{user}:{password}@{hostport}").into();
    let store = LockStore::new(&config, w.pool.clone(), &w.store_id).unwrap();
    in_sync(&store).await;
    let o = outcome("authed", "committed_causal", "", 1);
    store.record(std::slice::from_ref(&o)).await.unwrap();
    assert_eq!(
        store.lookup(&ids(std::slice::from_ref(&o))).await.unwrap(),
        vec![o.clone()]
    );
    assert_eq!(store.stats().redis_failures, 0);

    config.redis.url = format!("redis://{user}:wrong@{hostport}").into();
    let refused = LockStore::new(&config, w.pool.clone(), &w.store_id).unwrap();
    for _ in 0..config.redis.breaker_failures {
        assert!(refused
            .lookup(&ids(std::slice::from_ref(&o)))
            .await
            .unwrap()
            .is_empty());
    }
    assert_eq!(refused.mode(), Mode::Postgres);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_restored_rewrites_a_batch_committed_without_its_write_through() {
    let _shared = crate::common::shared_stack().await;
    let mut w = World::new("ls_crash", |_| {}).await;
    let store = w.store().await;
    in_sync(&store).await;
    // Batch 1 recorded normally; batch 2 committed, then the process died before record().
    let b1 = committed("b1", 5);
    w.write_committed(2, &b1).await;
    store.record(&b1).await.unwrap();
    let b2 = committed("b2", 5);
    w.write_batch(2, &b2).await;
    assert!(
        store.lookup(&ids(&b2)).await.unwrap().is_empty(),
        "the crash window: Redis misses batch 2"
    );

    // The next owner restores the partition at batch 2 (Kafka's recovery point: it committed,
    // but PostgreSQL was never told) and tells the store.
    let restored = w.restore(2, 2).await;
    assert!(restored.rolled_back_outcomes.is_empty());
    let next = w.store().await;
    next.partition_restored(TOPIC, 2, 2).await.unwrap();
    in_sync(&next).await;
    let s0 = next.stats();
    let mut all = b1.clone();
    all.extend(b2.clone());
    assert_eq!(sorted(next.lookup(&ids(&all)).await.unwrap()), sorted(all));
    assert_eq!(next.stats().lookups_redis - s0.lookups_redis, 1);
    // Rows of an uncommitted batch are rolled back before the call, and batch 0 is a no-op.
    next.partition_restored(TOPIC, 7, 0).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_instance_in_fallback_keeps_redis_untrusted_until_it_is_resynchronised() {
    let _shared = crate::common::shared_stack().await;
    let mut w = World::new("ls_multi", |_| {}).await;
    let healthy = w.store().await;
    in_sync(&healthy).await;
    // X went to manual review earlier; Redis knows it.
    let x_review = outcome("x-by-a", "manual_review", "WAIT_TIMEOUT", 1);
    w.write_committed(5, std::slice::from_ref(&x_review)).await;
    healthy
        .record(std::slice::from_ref(&x_review))
        .await
        .unwrap();

    // Instance A cannot reach Redis (a partition of the network, here a closed port).
    let mut config_a = w.config.clone();
    config_a.instance_id = format!("{}-other", w.config.instance_id);
    config_a.redis.url = "redis://127.0.0.1:1".into();
    let a = LockStore::new(&config_a, w.pool.clone(), &w.store_id).unwrap();
    for _ in 0..config_a.redis.breaker_failures {
        a.lookup(&["warm-up".to_string()]).await.unwrap();
    }
    assert_eq!(a.mode(), Mode::Postgres);
    // While it owns partition 5, A re-submits X, which commits (batch 2), and commits Y
    // (batch 3); Redis never hears of either.
    let x = outcome("x-by-a", "committed_causal", "", 1);
    let y = outcome("y-by-a", "committed_causal", "", 2);
    w.write_committed(5, std::slice::from_ref(&x)).await;
    a.record(std::slice::from_ref(&x)).await.unwrap();
    w.write_committed(5, std::slice::from_ref(&y)).await;
    a.record(std::slice::from_ref(&y)).await.unwrap();
    assert_eq!(
        w.redis_entry("x-by-a").await,
        Some(x_review.clone()),
        "stale in Redis"
    );

    // The healthy instance takes partition 5 over (restored at batch 3, which it writes to
    // Redis again). X's outcome in Redis is stale: the refreshed epoch makes PostgreSQL answer
    // the whole lookup (a Redis hit is not trusted either).
    healthy.partition_restored(TOPIC, 5, 3).await.unwrap();
    assert_eq!(w.redis_entry("x-by-a").await, Some(x_review.clone()));
    assert_eq!(w.redis_entry("y-by-a").await, Some(y.clone()));
    assert_eq!(
        sorted(healthy.lookup(&ids(&[x.clone(), y.clone()])).await.unwrap()),
        vec![x.clone(), y.clone()]
    );
    // Redis is not marked in sync while A's fallback row is alive.
    for _ in 0..3 {
        healthy.health_check().await;
    }
    assert!(!healthy.redis_in_sync());
    assert_eq!(
        healthy
            .lookup(&ids(std::slice::from_ref(&x)))
            .await
            .unwrap(),
        vec![x.clone()]
    );

    // A dies; once its row is dead, the healthy instance resynchronises.
    drop(a);
    sqlx::query("UPDATE cc_store_fallback SET alive_until = now() - interval '1 second'")
        .execute(&w.pool)
        .await
        .unwrap();
    in_sync(&healthy).await;
    assert_eq!(w.redis_entry("x-by-a").await, Some(x.clone()));
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM cc_store_fallback")
        .fetch_one(&w.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0, "covered fallback rows are removed");
    let s0 = healthy.stats();
    assert_eq!(
        healthy
            .lookup(&ids(std::slice::from_ref(&x)))
            .await
            .unwrap(),
        vec![x]
    );
    assert_eq!(healthy.stats().lookups_redis - s0.lookups_redis, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_epoch_key_from_another_server_incarnation_is_not_trusted() {
    let _shared = crate::common::shared_stack().await;
    let mut w = World::new("ls_runid", |_| {}).await;
    let store = w.store().await;
    in_sync(&store).await;
    let batch = sorted(committed("snap", 10));
    w.write_committed(0, &batch).await;
    store.record(&batch).await.unwrap();

    // What a restart from an old snapshot looks like: the right epoch number, written by
    // another incarnation of the server, and an outcome missing.
    let epoch = w.pg_epoch().await;
    let mut con = w.con().await;
    let _: () = redis::cmd("SET")
        .arg(w.keys().epoch())
        .arg(raw::epoch_token(
            epoch,
            "0000000000000000000000000000000000000000",
            0,
        ))
        .query_async(&mut con)
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(w.keys().idem("snap-3"))
        .query_async(&mut con)
        .await
        .unwrap();
    let s0 = store.stats();
    assert_eq!(sorted(store.lookup(&ids(&batch)).await.unwrap()), batch);
    assert_eq!(store.stats().lookups_postgres - s0.lookups_postgres, 1);

    // The health check copies everything younger than the TTL, then trusts Redis again.
    store.health_check().await;
    assert!(store.redis_in_sync());
    assert_eq!(w.redis_entry("snap-3").await.as_ref(), Some(&batch[3]));
    let s1 = store.stats();
    assert_eq!(sorted(store.lookup(&ids(&batch)).await.unwrap()), batch);
    assert_eq!(store.stats().lookups_redis - s1.lookups_redis, 1);
}

// ---------------------------------------------------------------------------------------------
// Only outcomes of committed batches (docs/redis-fallback.md, "Only committed outcomes")

/// Runs one health check in the background (a resynchronisation the test interleaves with).
fn spawn_health_check(store: &Arc<LockStore>) -> tokio::task::JoinHandle<Mode> {
    let store = store.clone();
    tokio::spawn(async move { store.health_check().await })
}

/// How long a test lets a background resynchronisation get going before it interleaves.
const LET_IT_START: Duration = Duration::from_millis(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_during_an_uncommitted_batch_never_makes_its_replay_a_duplicate() {
    let _shared = crate::common::shared_stack().await;
    let mut w = World::new("ls_rollback", |_| {}).await;
    let store = Arc::new(w.store().await);
    in_sync(&store).await;
    // Batch 1 committed and written through; batch 2 written to PostgreSQL, its Kafka
    // transaction not committed yet.
    let kept = committed("kept", 3);
    w.write_committed(0, &kept).await;
    store.record(&kept).await.unwrap();
    let doomed = committed("doomed", 3);
    w.write_batch(0, &doomed).await;

    // A resynchronisation runs meanwhile (the epoch key is gone, as after a FLUSHALL) ...
    w.forget_epoch().await;
    let resync = spawn_health_check(&store);
    tokio::time::sleep(LET_IT_START).await;
    for o in &doomed {
        assert_eq!(
            w.redis_entry(&o.intent_id).await,
            None,
            "the resynchronisation copied a batch not known committed"
        );
    }
    // ... and the Kafka transaction of batch 2 aborts: the partition is restored at batch 1.
    let restored = w.restore(0, 1).await;
    assert_eq!(restored.rolled_back_outcomes, ids(&doomed));
    store.partition_restored(TOPIC, 0, 1).await.unwrap();
    store
        .outcomes_rolled_back(TOPIC, 0, &restored.rolled_back_outcomes)
        .await
        .unwrap();
    resync.await.unwrap();
    in_sync(&store).await;

    for o in &doomed {
        assert_eq!(
            w.redis_entry(&o.intent_id).await,
            None,
            "Redis holds an outcome of a batch that never committed"
        );
    }
    // The replay looks its intents up: new, not duplicates (answered by the trusted Redis).
    let mut query = ids(&kept);
    query.extend(ids(&doomed));
    let s0 = store.stats();
    assert_eq!(sorted(store.lookup(&query).await.unwrap()), kept);
    assert_eq!(store.stats().lookups_redis - s0.lookups_redis, 1);
    // The replayed batch commits; its outcomes are known from then on.
    w.write_committed(0, &doomed).await;
    store.record(&doomed).await.unwrap();
    let mut all = kept.clone();
    all.extend(doomed.clone());
    assert_eq!(
        sorted(store.lookup(&query).await.unwrap()),
        sorted(all.clone())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_batch_not_yet_marked_in_postgres_is_waited_for_before_redis_is_trusted() {
    let _shared = crate::common::shared_stack().await;
    let mut w = World::new("ls_unmarked", |_| {}).await;
    let store = Arc::new(w.store().await);
    in_sync(&store).await;
    let first = committed("first", 3);
    w.write_committed(1, &first).await;
    store.record(&first).await.unwrap();
    // Batch 2 commits in Kafka and is written through; PostgreSQL does not know yet that it
    // committed (the engine tells it asynchronously) when Redis loses its data.
    let second = committed("second", 3);
    w.write_batch(1, &second).await;
    store.record(&second).await.unwrap();
    w.lose_redis_data().await;

    let resync = spawn_health_check(&store);
    tokio::time::sleep(LET_IT_START).await;
    assert!(
        !store.redis_in_sync(),
        "Redis lacks batch 2, which may have committed: its misses are not trusted yet"
    );
    let mut all = first.clone();
    all.extend(second.clone());
    assert_eq!(sorted(store.lookup(&ids(&all)).await.unwrap()), all);
    // PostgreSQL learns of the commit: the resynchronisation copies batch 2 and finishes.
    w.commit(1).await;
    resync.await.unwrap();
    assert!(store.redis_in_sync());
    for o in &all {
        assert_eq!(w.redis_entry(&o.intent_id).await.as_ref(), Some(o));
    }
    let s0 = store.stats();
    assert_eq!(sorted(store.lookup(&ids(&all)).await.unwrap()), all);
    assert_eq!(store.stats().lookups_redis - s0.lookups_redis, 1);

    // A batch whose fate stays unknown keeps Redis untrusted (the resynchronisation gives up
    // after a bounded wait and is retried by the next health check).
    let third = committed("third", 2);
    w.write_batch(1, &third).await;
    store.record(&third).await.unwrap();
    w.lose_redis_data().await;
    store.health_check().await;
    assert!(!store.redis_in_sync());
    w.commit(1).await;
    in_sync(&store).await;
    for o in first.iter().chain(&second).chain(&third) {
        assert_eq!(w.redis_entry(&o.intent_id).await.as_ref(), Some(o));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_noted_during_a_resync_keeps_redis_untrusted_until_it_is_corrected() {
    let _shared = crate::common::shared_stack().await;
    let mut w = World::new("ls_counter", |_| {}).await;
    let store = Arc::new(w.store().await);
    in_sync(&store).await;
    // Partition 0: batch 2 is uncommitted, and Redis already holds one of its outcomes (as an
    // older version's resynchronisation, which copied uncommitted batches, left it).
    w.write_committed(0, &committed("p0", 1)).await;
    let stale = outcome("stale", "committed_causal", "", 7);
    w.write_batch(0, std::slice::from_ref(&stale)).await;
    w.plant(&stale).await;
    // Partition 1: an uncommitted batch that keeps the resynchronisation waiting.
    w.write_committed(1, &committed("p1", 1)).await;
    w.write_batch(1, &committed("p1-open", 1)).await;

    w.forget_epoch().await;
    let resync = spawn_health_check(&store);
    tokio::time::sleep(LET_IT_START).await;
    // Partition 0 is rolled back by an owner that dies before it can correct Redis; then
    // partition 1's batch turns out committed.
    let restored = w.restore(0, 1).await;
    assert_eq!(restored.rolled_back_outcomes, vec!["stale".to_string()]);
    w.commit(1).await;
    resync.await.unwrap();
    assert!(
        !store.redis_in_sync(),
        "a rollback after the resynchronisation read the corrections interrupts it"
    );
    // The next resynchronisation applies the correction, then trusts Redis.
    in_sync(&store).await;
    assert_eq!(w.redis_entry("stale").await, None);
    let s0 = store.stats();
    assert!(store
        .lookup(&["stale".to_string()])
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.stats().lookups_redis - s0.lookups_redis, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_intent_gets_its_earlier_committed_outcome_back_in_redis() {
    let _shared = crate::common::shared_stack().await;
    let mut w = World::new("ls_earlier", |_| {}).await;
    let store = w.store().await;
    in_sync(&store).await;
    // X went to manual review in batch 1; batch 2 is unrelated.
    let review = outcome("x-earlier", "manual_review", "WAIT_TIMEOUT", 4);
    w.write_committed(3, std::slice::from_ref(&review)).await;
    store.record(std::slice::from_ref(&review)).await.unwrap();
    let other = committed("other", 2);
    w.write_committed(3, &other).await;
    store.record(&other).await.unwrap();
    // X is re-submitted and commits in batch 3, whose Kafka transaction then aborts; Redis holds
    // that uncommitted outcome (left by an older version's resynchronisation).
    let again = outcome("x-earlier", "committed_causal", "", 4);
    w.write_batch(3, std::slice::from_ref(&again)).await;
    w.plant(&again).await;

    let restored = w.restore(3, 2).await;
    assert_eq!(restored.rolled_back_outcomes, vec!["x-earlier".to_string()]);
    store.partition_restored(TOPIC, 3, 2).await.unwrap();
    store
        .outcomes_rolled_back(TOPIC, 3, &restored.rolled_back_outcomes)
        .await
        .unwrap();
    assert_eq!(
        w.redis_entry("x-earlier").await,
        Some(review.clone()),
        "Redis agrees with PostgreSQL: the manual review is X's record again"
    );
    let s0 = store.stats();
    assert_eq!(
        store.lookup(&["x-earlier".to_string()]).await.unwrap(),
        vec![review]
    );
    assert_eq!(store.stats().lookups_redis - s0.lookups_redis, 1);
    assert!(store.redis_in_sync());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_that_cannot_reach_redis_keeps_it_untrusted_until_it_is_corrected() {
    let _shared = crate::common::shared_stack().await;
    let mut w = World::new("ls_unreach", |_| {}).await;
    let healthy = w.store().await;
    in_sync(&healthy).await;
    let y = outcome("y-unreach", "committed_causal", "", 1);
    w.write_committed(4, std::slice::from_ref(&y)).await;
    healthy.record(std::slice::from_ref(&y)).await.unwrap();
    let x = outcome("x-unreach", "committed_causal", "", 2);
    w.write_batch(4, std::slice::from_ref(&x)).await;
    w.plant(&x).await;
    let epoch_before = w.pg_epoch().await;

    // The partition's new owner B cannot reach Redis (a closed port) when it rolls batch 2 back.
    // (Its `partition_restored` would fail to write to Redis too; only the rollback's call is
    // made here.)
    let mut config_b = w.config.clone();
    config_b.instance_id = format!("{}-b", w.config.instance_id);
    config_b.redis.url = "redis://127.0.0.1:1".into();
    let b = LockStore::new(&config_b, w.pool.clone(), &w.store_id).unwrap();
    let restored = w.restore(4, 1).await;
    b.outcomes_rolled_back(TOPIC, 4, &restored.rolled_back_outcomes)
        .await
        .unwrap();
    assert_eq!(b.mode(), Mode::Postgres);
    assert!(
        w.pg_epoch().await > epoch_before,
        "every Redis is out of sync until the correction is applied"
    );

    // The healthy instance sees it at its next health check: PostgreSQL answers, and Redis is
    // not resynchronised while B is in fallback.
    healthy.health_check().await;
    assert!(!healthy.redis_in_sync());
    assert!(healthy
        .lookup(&ids(std::slice::from_ref(&x)))
        .await
        .unwrap()
        .is_empty());

    // B dies; once its row is dead, the resynchronisation applies the correction first.
    drop(b);
    sqlx::query("UPDATE cc_store_fallback SET alive_until = now() - interval '1 second'")
        .execute(&w.pool)
        .await
        .unwrap();
    in_sync(&healthy).await;
    assert_eq!(w.redis_entry("x-unreach").await, None);
    let s0 = healthy.stats();
    assert_eq!(
        healthy.lookup(&ids(&[x, y.clone()])).await.unwrap(),
        vec![y]
    );
    assert_eq!(healthy.stats().lookups_redis - s0.lookups_redis, 1);
}

// ---------------------------------------------------------------------------------------------
// The first terminal outcome stays the idempotency record

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_conflict_never_replaces_the_first_outcome_in_redis_or_postgres() {
    let _shared = crate::common::shared_stack().await;
    let mut w = World::new("ls_conflict", |_| {}).await;
    let store = w.store().await;
    in_sync(&store).await;
    let with = |fingerprint: u64, outcome: Outcome| StoredOutcome {
        intent_id: "x-conflict".into(),
        prior: PriorOutcome {
            fingerprint,
            outcome,
        },
    };
    // X with content A commits; X with content B is blocked as a conflict (its row carries B's
    // fingerprint).
    let a = with(
        0xaaaa,
        Outcome::Committed {
            commit_sequence: 1,
            contact_version: 1,
        },
    );
    let b = with(
        0xbbbb,
        Outcome::Blocked {
            reason: Reason::IdempotencyConflict,
            commit_sequence: 1,
        },
    );
    w.write_committed(0, std::slice::from_ref(&a)).await;
    store.record(std::slice::from_ref(&a)).await.unwrap();
    w.write_committed(0, std::slice::from_ref(&b)).await;
    store.record(std::slice::from_ref(&b)).await.unwrap();

    let query = vec!["x-conflict".to_string()];
    assert_eq!(w.redis_entry("x-conflict").await, Some(a.clone()));
    let s0 = store.stats();
    assert_eq!(store.lookup(&query).await.unwrap(), vec![a.clone()]);
    assert_eq!(store.stats().lookups_redis - s0.lookups_redis, 1);
    assert_eq!(
        pg::lookup_outcomes(&w.pool, &query).await.unwrap(),
        vec![a.clone()]
    );

    // A full resynchronisation copies A, never B.
    w.lose_redis_data().await;
    in_sync(&store).await;
    assert_eq!(w.redis_entry("x-conflict").await, Some(a.clone()));
    let s1 = store.stats();
    assert_eq!(store.lookup(&query).await.unwrap(), vec![a.clone()]);
    assert_eq!(store.stats().lookups_redis - s1.lookups_redis, 1);

    // A conflict entry in Redis (never written by this version) is never returned either:
    // PostgreSQL answers that lookup.
    w.plant(&b).await;
    assert_eq!(store.lookup(&query).await.unwrap(), vec![a]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_that_meets_an_unreadable_outcome_does_not_mark_redis_in_sync() {
    let _shared = crate::common::shared_stack().await;
    let mut w = World::new("ls_unreadable", |_| {}).await;
    let store = w.store().await;
    in_sync(&store).await;
    // A blocked row without a reason passes the table's constraints but is not an outcome.
    let good = committed("good", 2);
    let mut rows = good.clone();
    rows.push(outcome("odd", "blocked_conflict", "VERSION_CONFLICT", 3));
    w.write_committed(2, &rows).await;
    sqlx::query("UPDATE cc_transition SET reason = '' WHERE intent_id = 'odd'")
        .execute(&w.pool)
        .await
        .unwrap();

    w.lose_redis_data().await;
    for _ in 0..3 {
        store.health_check().await;
        assert!(
            !store.redis_in_sync(),
            "a miss of that id would be taken for 'never seen'"
        );
    }
    let s0 = store.stats();
    assert_eq!(sorted(store.lookup(&ids(&good)).await.unwrap()), good);
    assert_eq!(store.stats().lookups_postgres - s0.lookups_postgres, 1);

    // Once the row is readable, the next resynchronisation finishes.
    sqlx::query("UPDATE cc_transition SET reason = 'VERSION_CONFLICT' WHERE intent_id = 'odd'")
        .execute(&w.pool)
        .await
        .unwrap();
    in_sync(&store).await;
    assert_eq!(
        w.redis_entry("odd").await,
        Some(outcome("odd", "blocked_conflict", "VERSION_CONFLICT", 3))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_loses_its_data_during_a_resync_is_not_marked_in_sync() {
    let _shared = crate::common::shared_stack().await;
    let mut w = World::new("ls_midflush", |_| {}).await;
    let store = Arc::new(w.store().await);
    in_sync(&store).await;
    let done = committed("done", 3);
    w.write_committed(6, &done).await;
    store.record(&done).await.unwrap();
    // An uncommitted batch keeps the resynchronisation waiting ...
    w.write_batch(6, &committed("open", 1)).await;
    w.forget_epoch().await;
    let resync = spawn_health_check(&store);
    tokio::time::sleep(LET_IT_START).await;
    // ... while Redis loses what it copied.
    w.lose_redis_data().await;
    w.commit(6).await;
    resync.await.unwrap();
    assert!(
        !store.redis_in_sync(),
        "the copy was lost before the mark: Redis must not be trusted"
    );
    in_sync(&store).await;
    for o in &done {
        assert_eq!(w.redis_entry(&o.intent_id).await.as_ref(), Some(o));
    }
}
