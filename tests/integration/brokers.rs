//! A Kafka client that librdkafka left without any broker bootstraps again (the broker watch of
//! `causal_commit::pipeline::kafka::stranded`), against the real broker.
//!
//! After a broker restart librdkafka 2.12 can drop every broker it knew (a metadata response
//! from the broker in controlled shutdown lists none) and never bootstrap again: the chaos test
//! with `CC_CHAOS_BROKER=1` caught a producer stuck that way for good. That race cannot be
//! provoked on demand, but the state it leaves can: a client created without any broker is in
//! it from the start. Watched, it must find the broker and deliver; unwatched (the control), it
//! must not, which shows the watch is what makes the difference.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::util::Timeout;

use crate::common::*;

use causal_commit::pipeline::kafka::stranded::{STATS_INTERVAL_MS, STRANDED_REPORTS};
use causal_commit::pipeline::kafka::{BrokerWatch, Watched};

/// How long librdkafka keeps a record it cannot deliver: the control's failure, bounded.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(15);

/// Sends one record from a producer that knows no broker, whose watch adds `bootstrap` back
/// (empty: no watch). Returns the delivery's outcome and how long it took.
async fn deliver_knowing_no_broker(
    topic: &str,
    bootstrap: &str,
) -> (Result<(i32, i64), KafkaError>, Duration) {
    let mut c = ClientConfig::new();
    BrokerWatch::enable(&mut c);
    c.set(
        "message.timeout.ms",
        MESSAGE_TIMEOUT.as_millis().to_string(),
    )
    .set("client.id", "causal-commit-test-stranded");
    let watch = BrokerWatch::new("producer", bootstrap);
    let producer: FutureProducer<Watched> = c
        .create_with_context(Watched(watch.clone()))
        .expect("a producer without bootstrap.servers is created");
    watch.attach(producer.client());
    let started = Instant::now();
    let delivery = producer
        .send(
            FutureRecord::to(topic).key("stranded").payload("stranded"),
            Timeout::Never,
        )
        .await
        .map(|d| (d.partition, d.offset))
        .map_err(|(e, _)| e);
    (delivery, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_knows_no_broker_bootstraps_again_from_kafka_brokers() {
    let env = TestEnv::new("stranded", 1).await;
    let topic = env.config.kafka.intents_topic.clone();
    let brokers = env.config.kafka.brokers.clone();
    let (watched, unwatched) = tokio::join!(
        deliver_knowing_no_broker(&topic, &brokers),
        deliver_knowing_no_broker(&topic, ""),
    );

    let (delivered, took) = watched;
    let (partition, offset) =
        delivered.expect("the watched producer finds the broker and delivers");
    println!("watched: delivered to {partition}@{offset} after {took:?}");
    let interval = Duration::from_millis(STATS_INTERVAL_MS.parse().unwrap());
    // The watch acts on its STRANDED_REPORTS-th report without a broker, not before, and soon.
    assert!(
        took >= interval * (STRANDED_REPORTS - 1),
        "delivered after {took:?}: before the watch could have acted, so it was not needed"
    );
    assert!(
        took < interval * (STRANDED_REPORTS + 2),
        "delivered only after {took:?}"
    );

    let (lost, waited) = unwatched;
    match lost {
        Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut)) => {}
        other => panic!("without the watch the record must time out, got {other:?}"),
    }
    assert!(waited >= MESSAGE_TIMEOUT, "timed out after {waited:?}");
}
