//! Replays never change a decision: the first outcome of an intent id stays its idempotency
//! record, whatever a conflicting reuse of the id did in between, across a restart.

use std::time::Duration;

use crate::common::process::Processor;
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
    let seqs: Vec<(&str, u64)> = fx
        .iter()
        .filter(|e| e.contact_id == "c")
        .map(|e| (e.intent_id.as_str(), e.commit_sequence))
        .collect();
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
        let log = std::env::temp_dir().join(format!("{name}-run.log"));
        let proc = Processor::spawn(cfg, log);
        let fx = effects(
            &wait_for(
                cfg,
                &cfg.kafka.side_effects_topic,
                intents.len(),
                Duration::from_secs(60),
            )
            .await,
        );
        assert!(proc.terminate(Duration::from_secs(30)));
        let mut ids: Vec<&str> = fx.iter().map(|e| e.intent_id.as_str()).collect();
        ids.sort_unstable();
        let mut want: Vec<&str> = intents.iter().map(|i| i.intent_id.as_str()).collect();
        want.sort_unstable();
        assert_eq!(ids, want, "{name}: every intent has its one effect");
        let report = verify_report(cfg, "").await;
        assert!(report.ok, "{name}: {:?}", report.violations);
    }
}
