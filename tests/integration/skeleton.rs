//! The transactional path against the real broker: valid intents become exactly one effect,
//! invalid records become manual-review records, and the partition keeps flowing.

use std::time::Duration;

use crate::common::*;
use prost::Message as _;

use causal_commit::proto::ReviewReason;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_intent_appears_exactly_once_on_side_effects_with_its_ids() {
    let env = TestEnv::new("skel_valid", 1).await;
    let cfg = env.config();
    let running = start(cfg.clone());
    let i = intent("intent-1", "contact-1", 1);
    produce_intents(&cfg, std::slice::from_ref(&i)).await;

    let got = wait_for(
        &cfg,
        &cfg.kafka.side_effects_topic,
        1,
        Duration::from_secs(60),
    )
    .await;
    // Give a wrong second effect time to show up before asserting "exactly once".
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = wait_for(
        &cfg,
        &cfg.kafka.side_effects_topic,
        got.len(),
        Duration::ZERO,
    )
    .await;
    running.stop().await;

    let effects = effects(&got);
    assert_eq!(effects.len(), 1, "exactly one effect: {effects:?}");
    assert_eq!(effects[0].intent_id, "intent-1");
    assert_eq!(effects[0].correlation_id, "corr-intent-1");
    assert_eq!(effects[0].contact_id, "contact-1");
    assert_eq!(effects[0].commit_sequence, 1);
    assert_eq!(&effects[0].payload[..], b"payload-intent-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_records_go_to_manual_review_and_later_records_still_flow() {
    let env = TestEnv::new("skel_invalid", 1).await;
    let cfg = env.config();
    let running = start(cfg.clone());
    let mismatched = intent("intent-x", "contact-x", 1);
    let after = intent("intent-after", "contact-2", 1);
    produce_raw(
        &cfg,
        &[
            (Some(b"contact-g".to_vec()), vec![0xff, 0xff, 0xff, 0x01]),
            (Some(b"someone-else".to_vec()), mismatched.encode_to_vec()),
            (Some(b"contact-2".to_vec()), after.encode_to_vec()),
        ],
    )
    .await;

    let (effects, reviews) = wait_for_outputs(&cfg, 1, 2, Duration::from_secs(60)).await;
    running.stop().await;

    assert_eq!(reviews.len(), 2, "{reviews:?}");
    assert!(reviews
        .iter()
        .all(|r| r.reason == ReviewReason::InvalidIntent as i32));
    assert_eq!(&reviews[0].original_value[..], &[0xff, 0xff, 0xff, 0x01]);
    assert_eq!(&reviews[0].original_key[..], b"contact-g");
    assert_eq!(reviews[0].source_offset, 0);
    assert!(
        reviews[1].detail.contains("does not equal contact_id"),
        "{}",
        reviews[1].detail
    );
    assert_eq!(reviews[1].original_value, mismatched.encode_to_vec());

    assert_eq!(effects.len(), 1);
    assert_eq!(effects[0].intent_id, "intent-after");
}

/// Producers choose their own compression: a careless one turns on whichever codec its team
/// likes. Intents compressed with each codec Kafka has (gzip, snappy, lz4, zstd; batched by a
/// linger so they are compressed together) are consumed like any other, in order, with no
/// review: a consumer built without a codec would fail every fetch of the partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intents_compressed_with_every_codec_kafka_has_are_consumed_in_order() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let env = TestEnv::new("skel_codecs", 1).await;
    let cfg = env.config();
    let running = start(cfg.clone());
    const CODECS: [&str; 4] = ["gzip", "snappy", "lz4", "zstd"];
    for codec in CODECS {
        let producer: FutureProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &cfg.kafka.brokers)
            .set("enable.idempotence", "true")
            .set("compression.type", codec)
            .set("linger.ms", "50")
            .create()
            .expect("producer");
        let contact = format!("z-{codec}");
        let deliveries: Vec<_> = (1..=3)
            .map(|seq| {
                let i = intent(&format!("{contact}-i{seq}"), &contact, seq);
                let value = i.encode_to_vec();
                let record = FutureRecord::to(&cfg.kafka.intents_topic)
                    .key(contact.as_bytes())
                    .payload(&value);
                producer
                    .send_result(record)
                    .map_err(|(e, _)| e)
                    .expect("queued")
            })
            .collect();
        for d in deliveries {
            d.await.expect("not cancelled").expect("delivered");
        }
    }
    let (fx, rv) = wait_for_outputs(&cfg, 3 * CODECS.len(), 0, Duration::from_secs(60)).await;
    running.stop().await;
    for codec in CODECS {
        let contact = format!("z-{codec}");
        let want: Vec<(String, u64)> = (1..=3).map(|s| (format!("{contact}-i{s}"), s)).collect();
        let got: Vec<(String, u64)> = sequences_of(&fx, &contact)
            .into_iter()
            .map(|(id, s)| (id.to_owned(), s))
            .collect();
        assert_eq!(got, want, "{codec}");
    }
    assert_eq!(fx.len(), 3 * CODECS.len(), "nothing twice");
    assert!(rv.is_empty(), "nothing reviewed: {rv:?}");
}
