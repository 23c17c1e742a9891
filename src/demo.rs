//! The demo workload: a generator of concurrent intents (`causal-commit produce`) and a
//! read-back of the output topics (`causal-commit summary`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use prost::Message as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::Consumer;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Config;
use crate::pipeline::kafka::{self, BrokerWatch, Watched};
use crate::proto::{Action, Intent, ManualReview, ReviewReason, SideEffect};

/// What `produce` generates.
#[derive(Debug, Clone, clap::Args)]
pub struct ProduceOptions {
    /// Intents to produce (duplicates and invalid records come on top).
    #[arg(long, default_value_t = 5000)]
    pub count: usize,
    /// Distinct contacts.
    #[arg(long, default_value_t = 500)]
    pub contacts: usize,
    /// Distinct clinics (tenants).
    #[arg(long, default_value_t = 20)]
    pub clinics: usize,
    /// Concurrent producers; one contact's intents are spread over all of them.
    #[arg(long, default_value_t = 4)]
    pub producers: usize,
    /// Total intents per second (0 = as fast as possible).
    #[arg(long, default_value_t = 0)]
    pub rate: u32,
    /// Fraction of contacts whose producer gives the causal sequence (strict mode).
    #[arg(long, default_value_t = 0.8)]
    pub strict_fraction: f64,
    /// Fraction of intents sent twice (a producer retry).
    #[arg(long, default_value_t = 0.02)]
    pub duplicate_fraction: f64,
    /// Undecodable records mixed in.
    #[arg(long, default_value_t = 5)]
    pub invalid: usize,
    /// Random seed (same seed, same intents).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Prefix of every intent_id and contact_id (several runs stay distinct).
    #[arg(long, default_value = "demo")]
    pub prefix: String,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct ProduceReport {
    pub intents: usize,
    pub duplicates_sent: usize,
    pub invalid_sent: usize,
    pub elapsed_ms: u128,
}

/// One record to send: key, value.
type Raw = (Vec<u8>, Vec<u8>);

/// Builds the demo intents. Each contact's intents are numbered in causal order; the caller
/// spreads them over concurrent producers, so they arrive interleaved.
pub fn generate(opts: &ProduceOptions) -> (Vec<Raw>, ProduceReport) {
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let contacts = opts.contacts.max(1);
    let strict: Vec<bool> = (0..contacts)
        .map(|_| rng.random_bool(opts.strict_fraction.clamp(0.0, 1.0)))
        .collect();
    let mut next_seq = vec![0u64; contacts];
    let mut out = Vec::with_capacity(opts.count + opts.invalid);
    let mut report = ProduceReport::default();
    let actions = [
        Action::Book,
        Action::Confirm,
        Action::SendMessage,
        Action::Reschedule,
        Action::Cancel,
    ];
    for i in 0..opts.count {
        let c = rng.random_range(0..contacts);
        next_seq[c] += 1;
        let contact_id = format!("{}-contact-{c}", opts.prefix);
        let intent = Intent {
            intent_id: format!("{}-intent-{i}", opts.prefix),
            contact_id: contact_id.clone(),
            clinic_id: format!("clinic-{}", c % opts.clinics.max(1)),
            correlation_id: format!("{}-corr-{i}", opts.prefix),
            dispatch_priority: rng.random_range(0..10),
            causal_sequence: if strict[c] { next_seq[c] } else { 0 },
            expected_version: 0,
            action: actions[(next_seq[c] as usize - 1) % actions.len()] as i32,
            payload: format!("{{\"n\":{i}}}").into_bytes().into(),
            created_at_ms: chrono::Utc::now().timestamp_millis(),
        };
        let raw = (contact_id.into_bytes(), intent.encode_to_vec());
        if rng.random_bool(opts.duplicate_fraction.clamp(0.0, 1.0)) {
            out.push(raw.clone());
            report.duplicates_sent += 1;
        }
        out.push(raw);
        report.intents += 1;
    }
    for i in 0..opts.invalid {
        let at = rng.random_range(0..=out.len());
        out.insert(
            at,
            (
                format!("{}-garbage-{i}", opts.prefix).into_bytes(),
                vec![0xff, 0xfe, 0xfd, i as u8],
            ),
        );
        report.invalid_sent += 1;
    }
    (out, report)
}

/// Produces the demo intents with `opts.producers` concurrent producers.
pub async fn produce(config: &Config, opts: &ProduceOptions) -> anyhow::Result<ProduceReport> {
    let started = Instant::now();
    let (records, mut report) = generate(opts);
    let producers = opts.producers.max(1);
    let mut lanes: Vec<Vec<Raw>> = vec![Vec::new(); producers];
    for (i, r) in records.into_iter().enumerate() {
        lanes[i % producers].push(r);
    }
    let per_lane_rate = if opts.rate == 0 {
        0.0
    } else {
        f64::from(opts.rate) / producers as f64
    };
    let mut tasks = tokio::task::JoinSet::new();
    for (n, lane) in lanes.into_iter().enumerate() {
        let client_id = format!("causal-commit-demo-{n}");
        let c = kafka::watched_config(
            config,
            &[
                ("enable.idempotence", "true"),
                ("linger.ms", "5"),
                ("client.id", &client_id),
            ],
        );
        let watch = BrokerWatch::new("producer", &config.kafka.brokers);
        let producer: FutureProducer<Watched> = c
            .create_with_context(Watched(watch.clone()))
            .context("creating a demo producer")?;
        watch.attach(producer.client());
        let topic = config.kafka.intents_topic.clone();
        tasks.spawn(async move {
            let mut deliveries = Vec::with_capacity(lane.len());
            let lane_started = Instant::now();
            for (i, (key, value)) in lane.iter().enumerate() {
                if per_lane_rate > 0.0 {
                    let due = Duration::from_secs_f64(i as f64 / per_lane_rate);
                    if let Some(wait) = due.checked_sub(lane_started.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
                let corr = Intent::decode(value.as_slice())
                    .map(|i| i.correlation_id)
                    .unwrap_or_default();
                let headers = OwnedHeaders::new().insert(Header {
                    key: "correlation_id",
                    value: Some(corr.as_bytes()),
                });
                let record = FutureRecord::to(&topic)
                    .key(key.as_slice())
                    .payload(value.as_slice())
                    .headers(headers);
                // Queue without awaiting each delivery: keep many in flight.
                match producer.send_result(record) {
                    Ok(f) => deliveries.push(f),
                    Err((e, _)) => anyhow::bail!("queueing a demo intent failed: {e}"),
                }
                if deliveries.len() >= 10_000 {
                    for f in deliveries.drain(..) {
                        f.await?
                            .map_err(|(e, _)| anyhow::anyhow!("delivery failed: {e}"))?;
                    }
                }
            }
            for f in deliveries {
                f.await?
                    .map_err(|(e, _)| anyhow::anyhow!("delivery failed: {e}"))?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    report.elapsed_ms = started.elapsed().as_millis();
    Ok(report)
}

/// What the output topics hold (read_committed).
#[derive(Debug, Default, serde::Serialize)]
pub struct Summary {
    pub effects: usize,
    pub contacts: usize,
    pub manual_review: usize,
    pub manual_review_by_reason: HashMap<String, usize>,
    pub out_of_order_contacts: usize,
    pub duplicate_effects: usize,
}

/// Reads `side-effects` and `intents.manual-review` from the beginning to their current end
/// with read_committed. Blocking: call from a blocking thread.
pub fn summarize(config: &Config, prefix: &str) -> anyhow::Result<Summary> {
    let mut summary = Summary::default();
    let mut last_seq: HashMap<String, u64> = HashMap::new();
    let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
    crate::pipeline::read::read_topic(config, &config.kafka.side_effects_topic, |record| {
        let Some(value) = record.value else {
            return Ok(());
        };
        let e = SideEffect::decode(value).context("decoding a SideEffect")?;
        if !e.intent_id.starts_with(prefix) {
            return Ok(());
        }
        summary.effects += 1;
        if !seen.insert(e.intent_id.clone()) {
            summary.duplicate_effects += 1;
        }
        let prev = last_seq.insert(e.contact_id.clone(), e.commit_sequence);
        if prev.is_some_and(|p| p >= e.commit_sequence) {
            summary.out_of_order_contacts += 1;
        }
        Ok(())
    })?;
    summary.contacts = last_seq.len();
    crate::pipeline::read::read_topic(config, &config.kafka.manual_review_topic, |record| {
        let Some(value) = record.value else {
            return Ok(());
        };
        let r = ManualReview::decode(value).context("decoding a ManualReview")?;
        let key = String::from_utf8_lossy(&r.original_key);
        if !(r.intent_id.starts_with(prefix) || key.starts_with(prefix)) {
            return Ok(());
        }
        summary.manual_review += 1;
        let reason = ReviewReason::try_from(r.reason)
            .map(|r| r.as_str_name().to_string())
            .unwrap_or_else(|_| r.reason.to_string());
        *summary.manual_review_by_reason.entry(reason).or_default() += 1;
        Ok(())
    })?;
    Ok(summary)
}

/// How out of order an input arrives: the strict-mode intents that reach the processor before
/// their contact's previous sequence (R3 makes each of them wait), and the most that are ahead
/// at once. The interleaving of concurrent producers sets it, so two productions of the same
/// seed differ; the bench reports it beside its figures.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ArrivalOrder {
    /// Records read.
    pub records: u64,
    /// Intents that carry a `causal_sequence`.
    pub strict: u64,
    /// Strict intents that arrived before their predecessor.
    pub ahead: u64,
    /// The most strict intents ahead of a predecessor at one time, over all contacts.
    pub peak_ahead: u64,
    /// Records that are not intents (undecodable): counted in `records` only.
    pub undecodable: u64,
    #[serde(skip)]
    pending: u64,
}

impl std::fmt::Display for ArrivalOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} records, {} with a causal_sequence, of which {} ({:.1}%) arrive before their \
             predecessor (each waits: R3); at most {} ahead at once",
            self.records,
            self.strict,
            self.ahead,
            self.ahead_fraction() * 100.0,
            self.peak_ahead
        )
    }
}

/// One contact's arrivals so far: the next sequence due and those already ahead of it.
#[derive(Debug, Default)]
struct Arrivals {
    due: u64,
    ahead: std::collections::BTreeSet<u64>,
}

impl ArrivalOrder {
    /// Reads `topic` from its beginning to its current end. Blocking.
    pub fn of_topic(config: &Config, topic: &str) -> anyhow::Result<ArrivalOrder> {
        let mut order = ArrivalOrder::default();
        let mut contacts: HashMap<String, Arrivals> = HashMap::new();
        crate::pipeline::read::read_topic(config, topic, |record| {
            order.records += 1;
            match record.value.map(Intent::decode) {
                Some(Ok(i)) => order.observe(&mut contacts, i.contact_id, i.causal_sequence),
                _ => order.undecodable += 1,
            }
            Ok(())
        })?;
        Ok(order)
    }

    /// Strict intents ahead of a predecessor, per strict intent.
    pub fn ahead_fraction(&self) -> f64 {
        self.ahead as f64 / self.strict.max(1) as f64
    }

    /// One intent, in its partition's order (a contact's intents share a partition).
    fn observe(&mut self, contacts: &mut HashMap<String, Arrivals>, contact: String, seq: u64) {
        if seq == 0 {
            return;
        }
        self.strict += 1;
        let c = contacts.entry(contact).or_insert(Arrivals {
            due: 1,
            ahead: Default::default(),
        });
        if seq == c.due {
            c.due += 1;
            while c.ahead.remove(&c.due) {
                c.due += 1;
                self.pending -= 1;
            }
        } else if seq > c.due && c.ahead.insert(seq) {
            self.ahead += 1;
            self.pending += 1;
            self.peak_ahead = self.peak_ahead.max(self.pending);
        }
    }
}

/// Waits until the consumer group has committed offsets at the end of every partition of the
/// intents topic (the processor has caught up). Blocking.
pub fn wait_caught_up(config: &Config, within: Duration) -> anyhow::Result<()> {
    let topic = &config.kafka.intents_topic;
    let timeout = Duration::from_secs(10);
    let deadline = Instant::now() + within;
    let mut reader = None;
    loop {
        // A failed call (a broker restarting, the group coordinator moving) is asked again, by a
        // new client, until the deadline: a wait must not end on a transient error.
        let asked = match reader.take() {
            Some(r) => Ok(r),
            None => crate::pipeline::read::offsets_reader(config),
        }
        .and_then(|(consumer, partitions)| {
            let behind = records_behind(&consumer, topic, &partitions, timeout)?;
            Ok((behind, (consumer, partitions)))
        });
        match asked {
            Ok((0, _)) => return Ok(()),
            Ok((behind, kept)) => {
                reader = Some(kept);
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "the processor is still {behind} records behind after {within:?}"
                );
            }
            // A topic that does not exist is a configuration, not a broker restarting.
            Err(e) if e.is::<crate::pipeline::read::TopicMissing>() => return Err(e),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(
                    error = format!("{e:#}"),
                    "reading the group's progress failed; asking again"
                );
            }
            Err(e) => {
                return Err(e.context(format!(
                    "reading the group's progress still failed after {within:?}"
                )))
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Records of `topic`'s `partitions` past the group's committed offsets.
fn records_behind(
    consumer: &rdkafka::consumer::BaseConsumer,
    topic: &str,
    partitions: &[i32],
    timeout: Duration,
) -> anyhow::Result<i64> {
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition(topic, *p);
    }
    let committed = consumer.committed_offsets(tpl, timeout)?;
    let mut behind = 0i64;
    for e in committed.elements() {
        let (_, high) = consumer.fetch_watermarks(topic, e.partition(), timeout)?;
        let at = match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        };
        behind += (high - at).max(0);
    }
    Ok(behind)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order_of(arrivals: &[(&str, u64)]) -> ArrivalOrder {
        let mut order = ArrivalOrder::default();
        let mut contacts = HashMap::new();
        for (contact, seq) in arrivals {
            order.records += 1;
            order.observe(&mut contacts, contact.to_string(), *seq);
        }
        order
    }

    #[test]
    fn in_order_arrivals_are_never_ahead() {
        let o = order_of(&[("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3), ("c", 0)]);
        assert_eq!((o.records, o.strict, o.ahead, o.peak_ahead), (6, 5, 0, 0));
    }

    #[test]
    fn an_intent_before_its_predecessor_is_ahead_until_the_gap_fills() {
        // a: 3 and 2 arrive before 1; b: 2 before 1 while a's two are still ahead.
        let o = order_of(&[("a", 3), ("a", 2), ("b", 2), ("a", 1), ("b", 1), ("a", 5)]);
        assert_eq!(o.strict, 6);
        assert_eq!(o.ahead, 4, "a3, a2, b2, a5");
        assert_eq!(o.peak_ahead, 3, "a3, a2 and b2 at once");
        assert!((o.ahead_fraction() - 4.0 / 6.0).abs() < 1e-9);
    }

    #[test]
    fn a_repeated_or_passed_sequence_is_not_counted_ahead() {
        let o = order_of(&[("a", 1), ("a", 1), ("a", 3), ("a", 3), ("a", 2), ("a", 2)]);
        assert_eq!((o.strict, o.ahead, o.peak_ahead), (6, 1, 1));
    }
}
