//! Passthrough mode (`[bench] passthrough = true`, the benchmark's ceiling) against the real
//! broker: every record is copied exactly once (read_committed) with its key, value and headers
//! as they are, the group's offsets end at the end of the input, across a stop and a restart,
//! and no store is touched (PostgreSQL and Redis point at closed ports).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use crate::common::*;
use causal_commit::config::Config;

/// Key, value, headers (in order).
type Rec = (Option<Vec<u8>>, Option<Vec<u8>>, Vec<(String, Vec<u8>)>);

/// Record `i`: valid intents, garbage, records without key or value, any header names.
fn record(i: usize) -> Rec {
    let key = (!i.is_multiple_of(50)).then(|| format!("contact-{}", i % 37).into_bytes());
    let value = if i.is_multiple_of(97) {
        None
    } else if i.is_multiple_of(7) {
        Some(vec![0xff, 0xfe, (i % 256) as u8])
    } else {
        let mut intent = intent(&format!("pt-{i}"), &format!("contact-{}", i % 37), 0);
        // Deterministic bytes: the test rebuilds the record to compare.
        intent.created_at_ms = 1_700_000_000_000 + i as i64;
        Some(prost::Message::encode_to_vec(&intent))
    };
    let mut headers = vec![("seq".to_string(), i.to_string().into_bytes())];
    if i.is_multiple_of(3) {
        headers.push((format!("x-any-name-{i}"), vec![i as u8, 0, 1]));
    }
    (key, value, headers)
}

async fn produce(config: &Config, range: std::ops::Range<usize>) {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    for i in range {
        let (key, value, headers) = record(i);
        let mut h = OwnedHeaders::new();
        for (k, v) in &headers {
            h = h.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let mut r: FutureRecord<'_, Vec<u8>, Vec<u8>> =
            FutureRecord::to(&config.kafka.intents_topic).headers(h);
        if let Some(k) = &key {
            r = r.key(k);
        }
        if let Some(v) = &value {
            r = r.payload(v);
        }
        p.send(r, Duration::from_secs(10)).await.expect("delivered");
    }
}

/// Every committed record of `topic` (read_committed), from the beginning to its end now.
fn read_all_copies(config: &Config, topic: &str) -> Vec<Rec> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", unique("pt-reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .expect("reader");
    let timeout = Duration::from_secs(10);
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .expect("metadata");
    let mut ends = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions().iter().map(|p| p.id()) {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout).expect("marks");
        if high > low {
            ends.insert(p, high);
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("offset");
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return out;
    }
    consumer.assign(&tpl).expect("assign");
    let mut next: HashMap<i32, i64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ends
        .iter()
        .any(|(p, end)| next.get(p).copied().unwrap_or(0) < *end)
    {
        assert!(Instant::now() < deadline, "{topic} not read to its end");
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                next.insert(m.partition(), m.offset() + 1);
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default();
                out.push((
                    m.key().map(<[u8]>::to_vec),
                    m.payload().map(<[u8]>::to_vec),
                    headers,
                ));
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            // Transaction markers take offsets too: the position says where we are.
            None => {
                for e in consumer.position().expect("position").elements() {
                    if let Offset::Offset(o) = e.offset() {
                        next.insert(e.partition(), o);
                    }
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_copies_every_record_once_with_its_headers_and_commits_to_the_end() {
    let mut env = TestEnv::new("passthrough", 3).await;
    env.config.bench.passthrough = true;
    // The mode must not touch a store: nothing listens on these.
    env.config.postgres.url = "postgres://nobody:nothing@127.0.0.1:1/none"
        .to_string()
        .into();
    env.config.redis.url = "redis://127.0.0.1:1".to_string().into();
    // Several transactions per run.
    env.config.batch.max_records = 100;
    let cfg = env.config();

    produce(&cfg, 0..600).await;
    let running = start(cfg.clone());
    caught_up(&cfg, Duration::from_secs(60)).await;
    running.stop().await;
    // A restart carries on from the committed offsets: nothing twice, nothing lost.
    produce(&cfg, 600..1000).await;
    let running = start(cfg.clone());
    caught_up(&cfg, Duration::from_secs(60)).await;
    running.stop().await;

    let c = cfg.clone();
    let copies = tokio::task::spawn_blocking(move || {
        let topic = c.kafka.side_effects_topic.clone();
        read_all_copies(&c, &topic)
    })
    .await
    .expect("reader");
    assert_eq!(copies.len(), 1000, "exactly one copy per input record");
    let mut by_seq: BTreeMap<usize, Rec> = BTreeMap::new();
    for copy in copies {
        let seq = copy
            .2
            .iter()
            .find(|(k, _)| k == "seq")
            .and_then(|(_, v)| String::from_utf8(v.clone()).ok())
            .and_then(|s| s.parse().ok())
            .expect("every copy keeps its seq header");
        assert!(
            by_seq.insert(seq, copy).is_none(),
            "record {seq} copied twice"
        );
    }
    for (i, copy) in &by_seq {
        assert_eq!(copy, &record(*i), "record {i} copied as it is");
    }
    assert_eq!(by_seq.len(), 1000);
}
