//! Replays never change a decision: the first outcome of an intent id stays its idempotency
//! record, whatever a conflicting reuse of the id did in between, across a restart.

use std::time::Duration;

use prost::Message;

use crate::common::process::{split_two_partitions, Processor};
use crate::common::*;
use causal_commit::proto::ReviewReason;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_reuse_never_replaces_the_first_outcome_of_an_intent_id() {
    let env = TestEnv::new("reuse", 1).await;
    let cfg = env.config.clone();
    let log = std::env::temp_dir().join(format!("{}-run.log", env.name));
    let proc = Processor::spawn(&cfg, log.clone());
    let original = intent("x", "c", 1);
    let mut conflicting = original.clone();
    conflicting.payload = b"other content".to_vec().into();
    produce_intents(&cfg, std::slice::from_ref(&original)).await;
    wait_for(
        &cfg,
        &cfg.kafka.side_effects_topic,
        1,
        Duration::from_secs(30),
    )
    .await;
    produce_intents(&cfg, &[conflicting]).await;
    let rv = reviews(
        &wait_for(
            &cfg,
            &cfg.kafka.manual_review_topic,
            1,
            Duration::from_secs(30),
        )
        .await,
    );
    assert_eq!(rv[0].reason, ReviewReason::IdempotencyConflict as i32);
    assert!(proc.terminate(Duration::from_secs(30)));

    // After a restart (nothing in memory), the original content again is a duplicate of the
    // committed effect, not a conflict with the blocked reuse.
    let proc = Processor::spawn(&cfg, log.clone());
    produce_intents(&cfg, &[original]).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let duplicate = loop {
        let found = crate::common::process::read_log(&log)
            .into_iter()
            .find(|l| {
                l["message"] == "transition" && l["intent_id"] == "x" && l["state"] == "duplicate"
            });
        if let Some(l) = found {
            break l;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the redelivery was never decided"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(duplicate["detail"], "already committed_causal");
    assert!(proc.terminate(Duration::from_secs(30)));
    let fx = effects(&read_all(&cfg, &cfg.kafka.side_effects_topic));
    let rv = read_all(&cfg, &cfg.kafka.manual_review_topic);
    assert_eq!(fx.len(), 1, "no second effect");
    assert_eq!(rv.len(), 1, "no second conflict");
}

/// R5 "ever": an intent sent again after its outcome left Redis (`redis.idempotency_ttl`, here
/// its key deleted, as the expiry does, with Redis still in sync) and after a restart (the
/// in-memory window of recent outcomes is gone) is a duplicate: PostgreSQL's record decides.
/// Before, the miss was taken for an intent never seen and it got a second effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intent_sent_again_after_its_outcome_left_redis_is_a_duplicate() {
    let env = TestEnv::new("expired", 1).await;
    let cfg = env.config.clone();
    let log = std::env::temp_dir().join(format!("{}-run.log", env.name));
    let proc = Processor::spawn(&cfg, log.clone());
    let first = intent("again", "c", 0);
    produce_intents(&cfg, std::slice::from_ref(&first)).await;
    wait_for(
        &cfg,
        &cfg.kafka.side_effects_topic,
        1,
        Duration::from_secs(30),
    )
    .await;
    // A later batch: a restore writes its partition's last batch's outcomes to Redis again.
    produce_intents(&cfg, &[intent("later", "d", 0)]).await;
    wait_for(
        &cfg,
        &cfg.kafka.side_effects_topic,
        2,
        Duration::from_secs(30),
    )
    .await;
    assert!(proc.terminate(Duration::from_secs(30)));

    let key = redis_keys(&cfg).await.idem("again");
    let client = redis::Client::open(redis_url()).expect("redis client");
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    let deleted: i64 = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut con)
        .await
        .expect("DEL");
    assert_eq!(
        deleted, 1,
        "the outcome was in Redis, and is gone as after its TTL"
    );

    let proc = Processor::spawn(&cfg, log.clone());
    produce_intents(&cfg, &[first, intent("next", "c", 0)]).await;
    wait_for(
        &cfg,
        &cfg.kafka.side_effects_topic,
        3,
        Duration::from_secs(60),
    )
    .await;
    assert!(proc.terminate(Duration::from_secs(30)));
    let fx = effects(&read_all(&cfg, &cfg.kafka.side_effects_topic));
    let seqs = sequences_of(&fx, "c");
    assert_eq!(seqs, [("again", 1), ("next", 2)], "no second effect");
    let duplicate = crate::common::process::read_log(&log).into_iter().any(|l| {
        l["message"] == "transition" && l["intent_id"] == "again" && l["state"] == "duplicate"
    });
    assert!(duplicate, "the redelivery is decided a duplicate");
    let report = verify_report(&cfg, "").await;
    assert!(report.ok, "{:?}", report.violations);
}

/// A tired operator points two deployments (each its own PostgreSQL schema and topics: say
/// staging and production) at one Redis with the same `redis.key_prefix` (both left at the
/// default), and staging is fed a copy of production's intents. Each deployment's decisions
/// are its own: production commits every intent once, although staging decided the same
/// intent ids first, and neither takes the other's outcomes for its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_deployments_sharing_one_redis_key_prefix_each_commit_every_intent() {
    let staging = TestEnv::new("shared_stg", 1).await;
    let production = TestEnv::new("shared_prd", 1).await;
    let stg = staging.config.clone();
    let mut prd = production.config.clone();
    prd.redis.key_prefix = stg.redis.key_prefix.clone();
    let intents: Vec<_> = (0..20)
        .map(|i| intent(&format!("m{i}"), &format!("c{}", i % 5), 0))
        .collect();
    produce_intents(&stg, &intents).await;
    produce_intents(&prd, &intents).await;
    for (cfg, name) in [(&stg, &staging.name), (&prd, &production.name)] {
        let ids = effects_of_a_run(cfg, name, intents.len()).await;
        let mut want: Vec<&str> = intents.iter().map(|i| i.intent_id.as_str()).collect();
        want.sort_unstable();
        assert_eq!(ids, want, "{name}: every intent has its one effect");
        let report = verify_report(cfg, "").await;
        assert!(report.ok, "{name}: {:?}", report.violations);
    }
}

/// The same tired operator, one step further: staging's schema is a copy of production's made
/// with its rows (`pg_dump` restored under another schema name), so it carries production's
/// store id and epoch, and both share one Redis and key prefix. Staging, fed a copy of
/// production's intents, decides them first. Production must still commit every one of them
/// once: before, the copy used production's keys, found them in sync (same epoch, same Redis),
/// and wrote its outcomes there, and production took them for its own, deciding intents it had
/// never decided as duplicates, with no effect. (The copy is made here by giving staging's
/// fresh schema production's store id and epoch: what a restored dump carries.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_copied_with_its_rows_for_staging_never_decides_for_production() {
    let production = TestEnv::new("copy_prd", 1).await;
    let staging = TestEnv::new("copy_stg", 1).await;
    let prd = production.config.clone();
    let mut stg = staging.config.clone();
    stg.redis.key_prefix = prd.redis.key_prefix.clone();
    // Production runs first: its Redis is marked in sync with its epoch.
    let warm: Vec<_> = (0..5)
        .map(|i| intent(&format!("w{i}"), &format!("c{i}"), 0))
        .collect();
    produce_intents(&prd, &warm).await;
    effects_of_a_run(&prd, &production.name, warm.len()).await;
    let (prd_pool, stg_pool) = (production.store().await, staging.store().await);
    let (store_id, epoch): (String, i64) =
        sqlx::query_as("SELECT store_id, epoch FROM cc_store_state WHERE id = 1")
            .fetch_one(&prd_pool)
            .await
            .unwrap();
    sqlx::query("UPDATE cc_store_state SET store_id = $1, epoch = $2 WHERE id = 1")
        .bind(&store_id)
        .bind(epoch)
        .execute(&stg_pool)
        .await
        .unwrap();
    let (prd_keys, stg_keys) = (redis_keys(&prd).await, redis_keys(&stg).await);
    assert_ne!(
        prd_keys.epoch(),
        stg_keys.epoch(),
        "a copy of a schema keys its outcomes apart from the original's"
    );

    let intents: Vec<_> = (0..20)
        .map(|i| intent(&format!("m{i}"), &format!("c{}", i % 5), 0))
        .collect();
    produce_intents(&stg, &intents).await;
    produce_intents(&prd, &intents).await;
    effects_of_a_run(&stg, &staging.name, intents.len()).await;
    let ids = effects_of_a_run(&prd, &production.name, warm.len() + intents.len()).await;
    let mut want: Vec<String> = warm
        .iter()
        .chain(&intents)
        .map(|i| i.intent_id.clone())
        .collect();
    want.sort_unstable();
    assert_eq!(ids, want, "production: every intent has its one effect");
    for cfg in [&prd, &stg] {
        let report = verify_report(cfg, "").await;
        assert!(report.ok, "{:?}", report.violations);
    }
}

/// Runs a processor on `cfg` (its log named after `name`) until `n` effects are on its
/// side-effects topic, then stops it cleanly; the intent ids of those effects, sorted.
async fn effects_of_a_run(
    cfg: &causal_commit::config::Config,
    name: &str,
    n: usize,
) -> Vec<String> {
    let proc = Processor::spawn(cfg, std::env::temp_dir().join(format!("{name}-run.log")));
    let fx = effects(
        &wait_for(
            cfg,
            &cfg.kafka.side_effects_topic,
            n,
            Duration::from_secs(60),
        )
        .await,
    );
    assert!(proc.terminate(Duration::from_secs(30)));
    let mut ids: Vec<String> = fx.into_iter().map(|e| e.intent_id).collect();
    ids.sort_unstable();
    ids
}

/// R5 across instances: a careless producer gives one intent id to two contacts at once (an id
/// generator restarted, an id made per clinic), the contacts on two partitions that two
/// instances of the group consume side by side, so both batches are decided and written at the
/// same time. Each id gets one effect, ever, and its other use is an `IDEMPOTENCY_CONFLICT`:
/// neither instance may take the other's batch in flight for an intent never seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_intent_id_reused_for_two_contacts_on_two_instances_has_one_effect() {
    let env = TestEnv::new("reuse_2i", 2).await;
    let cfg = env.config.clone();
    let log = |name: &str| crate::failures::log_path(&env, name);
    let a = Processor::spawn(&cfg, log("a"));
    let mut cfg_b = cfg.clone();
    cfg_b.instance_id = format!("{}-b", env.name);
    let b = Processor::spawn(&cfg_b, log("b"));
    split_two_partitions(&a, &b).await;

    let p = producer(&cfg);
    let (waves, per_wave) = (8, 50);
    for w in 0..waves {
        let mut sends = Vec::new();
        for i in 0..per_wave {
            let id = format!("shared-{w}-{i}");
            for (partition, contact) in [(0, format!("a-{w}-{i}")), (1, format!("b-{w}-{i}"))] {
                let value = intent(&id, &contact, 0).encode_to_vec();
                let p = &p;
                let topic = cfg.kafka.intents_topic.clone();
                sends.push(async move {
                    let r = rdkafka::producer::FutureRecord::to(&topic)
                        .partition(partition)
                        .key(contact.as_bytes())
                        .payload(&value);
                    p.send(r, Duration::from_secs(10)).await.expect("delivered");
                });
            }
        }
        futures::future::join_all(sends).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let ids = waves * per_wave;
    caught_up(&cfg, Duration::from_secs(120)).await;
    assert!(a.terminate(Duration::from_secs(30)));
    assert!(b.terminate(Duration::from_secs(30)));
    let fx = effects(&read_all(&cfg, &cfg.kafka.side_effects_topic));
    let rv = reviews(&read_all(&cfg, &cfg.kafka.manual_review_topic));
    let mut per_id: std::collections::HashMap<&str, (usize, usize)> = Default::default();
    for e in &fx {
        per_id.entry(&e.intent_id).or_default().0 += 1;
    }
    for r in &rv {
        assert_eq!(
            r.reason,
            ReviewReason::IdempotencyConflict as i32,
            "{}: {:?}",
            r.intent_id,
            r
        );
        per_id.entry(&r.intent_id).or_default().1 += 1;
    }
    let twice: Vec<_> = per_id.iter().filter(|(_, n)| n.0 > 1).collect();
    assert!(
        twice.is_empty(),
        "{} ids with two effects: {twice:?}",
        twice.len()
    );
    assert_eq!(per_id.len(), ids);
    assert!(
        per_id.values().all(|n| *n == (1, 1)),
        "each id one effect and one conflict"
    );
    let report = verify_report(&cfg, "").await;
    assert!(report.ok, "{:?}", report.violations);
}

/// Upgrading to the claims (migration 0015) claims every intent id decided before, by the batch
/// of its first outcome, and nothing that is not an idempotency outcome (a waiting or duplicate
/// row, invalid input, a conflict's row): the ids decided by an older build stay decided.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_claims_every_intent_id_decided_before_it() {
    let env = TestEnv::new("claims_upgrade", 1).await;
    let mut cfg = env.config.clone();
    cfg.postgres.schema = unique("claims_upgrade").to_lowercase();
    let pool = migrate_below(&cfg, 15).await;
    sqlx::query(
        "INSERT INTO cc_transition (topic, partition, batch_no, source_offset, intent_id,
                contact_id, clinic_id, correlation_id, from_state, to_state, reason, writer, fence)
         VALUES ('t', 0, 1, 0, 'a', 'c', 'k', 'x', 'received', 'committed_causal', '', 'w', 1),
                ('t', 0, 2, 1, 'a', 'c', 'k', 'x', 'received', 'duplicate', '', 'w', 1),
                ('t', 1, 3, 0, 'b', 'd', 'k', 'x', 'received', 'waiting_previous_commit', '', 'w', 1),
                ('t', 1, 4, 1, 'b', 'd', 'k', 'x', 'waiting_previous_commit', 'manual_review',
                 'WAIT_TIMEOUT', 'w', 1),
                ('t', 1, 5, 2, 'b', 'e', 'k', 'x', 'received', 'blocked_conflict',
                 'IDEMPOTENCY_CONFLICT', 'w', 1),
                ('t', 0, 3, 2, 'bad', 'c', 'k', 'x', 'received', 'manual_review',
                 'INVALID_INTENT', 'w', 1),
                ('t', 0, 4, 3, 'w', 'f', 'k', 'x', 'received', 'waiting_previous_commit', '', 'w', 1)",
    )
    .execute(&pool)
    .await
    .expect("rows as the build before wrote them");
    causal_commit::store::postgres::migrate(&pool, &cfg.postgres.schema)
        .await
        .expect("the claims' migration");
    let claims: Vec<(String, i32, i64)> =
        sqlx::query_as("SELECT intent_id, partition, batch_no FROM cc_decided ORDER BY intent_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(claims, vec![("a".into(), 0, 1), ("b".into(), 1, 4)]);
}
