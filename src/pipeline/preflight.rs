//! The start-up check of the Kafka connection, with the `[kafka.client]` settings every client
//! uses. A credential the brokers refuse, or a broker certificate the configured CA does not
//! sign, cannot heal by retrying: `run` stops at once with an error that names it, instead of
//! starting an engine whose clients would retry (and log) for ever while reporting not ready.
//! A broker that does not answer yet is not an error here: the engine keeps trying, as always.
//! Nor does a mistyped topic name heal: once the brokers answer, each of the three topics must
//! exist (the engine would otherwise wait for an intents topic that never comes, not ready,
//! or abort every transaction on a missing output topic). A topic created just before the start
//! may not be in the answering broker's metadata yet (a broker learns it from the controller a
//! moment after the creation returns): a missing topic is asked for again for
//! [`TOPIC_APPEARS_WITHIN`] before it stops the start. And none of them may be compacted:
//! compaction keeps the last record of each key (the intents topic is keyed by contact) and
//! deletes the others, so intents would be lost before they are consumed, effects before their
//! readers get them, and `verify`, which reads the same topics, would not see what is gone.
//! A policy changed, or a topic deleted, while the processor runs is seen by [`watch_topics`].

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{
    BaseProducer, DeliveryResult, Producer, ProducerContext, ThreadedProducer,
};
use rdkafka::ClientContext;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::pipeline::kafka::{self, BrokerWatch, Setting, Watched};
use crate::telemetry::metrics as m;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "Kafka authentication failed on {brokers}: {reason} (check kafka.client sasl.mechanism, \
         sasl.username and sasl.password)"
    )]
    Authentication { brokers: String, reason: String },
    #[error(
        "the TLS handshake with Kafka failed on {brokers}: {reason} (check kafka.client \
         security.protocol and ssl.ca.location, the CA that signs the brokers' certificates)"
    )]
    Tls { brokers: String, reason: String },
    #[error("creating the Kafka client for the start-up check failed: {0}")]
    Create(KafkaError),
    #[error(
        "{key} {topic:?} cannot be used on {brokers}: {reason} (create the topic, see \
         deploy/, or fix the name)"
    )]
    Topic {
        key: &'static str,
        topic: String,
        brokers: String,
        reason: String,
    },
    #[error(
        "{key} {topic:?} has cleanup.policy={policy}: compaction keeps one record per key and \
         deletes the others, so records would be lost unseen; set cleanup.policy=delete \
         (kafka-configs --alter --entity-type topics --entity-name {topic} --add-config \
         cleanup.policy=delete)"
    )]
    Compacted {
        key: &'static str,
        topic: String,
        policy: String,
    },
    #[error(
        "kafka.side_effects_topic {topic:?} has {partitions} partitions, fewer than the \
         {recorded} its effects are spread over (recorded in the store at its first start): \
         each contact's effects stay on one partition (R1), which this topic does not have. \
         Create it again with at least {recorded} partitions, or point \
         kafka.side_effects_topic at a new topic (its own count is recorded at the next start; \
         runbook: Transactions aborting)"
    )]
    FewerEffectPartitions {
        topic: String,
        partitions: i32,
        recorded: i32,
    },
}

/// The three topics of `[kafka]` with the setting that names each.
fn topics(config: &Config) -> [(&'static str, &str); 3] {
    let k = &config.kafka;
    [
        ("kafka.intents_topic", &k.intents_topic),
        ("kafka.side_effects_topic", &k.side_effects_topic),
        ("kafka.manual_review_topic", &k.manual_review_topic),
    ]
}

/// The first of the three topics whose `cleanup.policy` compacts, as [`Error::Compacted`];
/// `Checked::Fine` when none does. A describe the brokers refuse (no `DescribeConfigs`
/// permission) or do not answer is no verdict: `Checked::Unknown`. Blocking. A one-shot
/// client (the verifier's): the events it raises during the describe are dropped with it.
pub fn compaction(config: &Config, within: Duration) -> Checked {
    let client_id = format!("causal-commit-{}-describe", config.instance_id());
    let client: BaseProducer =
        match kafka::client_config(config, &[("client.id", &client_id)]).create() {
            Ok(c) => c,
            Err(e) => return Checked::Unknown(e.to_string()),
        };
    match describe(client.client(), config, within) {
        Ok(described) => checked(&described),
        Err(reason) => Checked::Unknown(reason),
    }
}

/// What [`compaction`] says of the described topics.
fn checked(described: &[Described]) -> Checked {
    for d in described {
        match &d.seen {
            Seen::Policy(policy) if compacts(policy) => {
                return Checked::Refused(d.refusal(policy.clone()));
            }
            Seen::Policy(_) => {}
            Seen::Missing => {
                return Checked::Unknown(format!("{}: {}", d.topic, MISSING));
            }
            Seen::Unknown(reason) => return Checked::Unknown(format!("{}: {reason}", d.topic)),
        }
    }
    Checked::Fine
}

/// The watch's client, whose connections the topics are described on. Nothing is produced with it (a
/// producer is librdkafka's lightest client); its thread serves librdkafka's logs, errors and
/// statistics as they come (a client whose queue nobody serves piles them up, unseen, for as
/// long as it lives), and its [`BrokerWatch`] bootstraps it again if librdkafka leaves it
/// without a broker.
fn describing_client(config: &Config) -> rdkafka::error::KafkaResult<ThreadedProducer<Watched>> {
    let client_id = format!("causal-commit-{}-topics", config.instance_id());
    let watch = BrokerWatch::new("topics", &config.kafka.brokers);
    let client: ThreadedProducer<Watched> =
        kafka::watched_config(config, &[("client.id", &client_id)])
            .create_with_context(Watched(watch.clone()))?;
    watch.attach(client.client());
    Ok(client)
}

const MISSING: &str = "the brokers do not have it";

/// What the brokers say of one topic of `[kafka]`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// Its `cleanup.policy`.
    Policy(String),
    /// No such topic (deleted).
    Missing,
    /// The brokers refused to say (the reason).
    Unknown(String),
}

/// One topic of `[kafka]`, as described.
#[derive(Debug, Clone)]
struct Described {
    key: &'static str,
    topic: String,
    seen: Seen,
}

impl Described {
    fn refusal(&self, policy: String) -> Error {
        Error::Compacted {
            key: self.key,
            topic: self.topic.clone(),
            policy,
        }
    }
}

/// The three topics as the start-up check described them, for [`watch_topics`] to start from
/// (empty when the brokers did not answer it), and the side-effects topic's partition count.
#[derive(Debug, Default)]
pub struct Topics {
    described: Vec<Described>,
    side_effects_partitions: Option<i32>,
}

impl Topics {
    /// The side-effects topic's partition count, when the brokers answered the check.
    pub fn side_effects_partitions(&self) -> Option<i32> {
        self.side_effects_partitions
    }
}

/// The three topics in one `DescribeConfigs`; an error (the reason) when the request fails.
/// Blocking.
fn describe<C: ClientContext>(
    client: &rdkafka::client::Client<C>,
    config: &Config,
    within: Duration,
) -> Result<Vec<Described>, String> {
    let named = topics(config);
    let names: Vec<&str> = named.iter().map(|(_, t)| *t).collect();
    let settings = kafka::topic_setting(client, &names, "cleanup.policy", within)?;
    Ok(named
        .iter()
        .zip(settings)
        .map(|((key, topic), setting)| Described {
            key,
            topic: (*topic).to_owned(),
            seen: match setting {
                Setting::Value(Some(policy)) => Seen::Policy(policy),
                Setting::Value(None) => {
                    Seen::Unknown("the brokers listed no cleanup.policy".into())
                }
                Setting::Refused(RDKafkaErrorCode::UnknownTopicOrPartition, _) => Seen::Missing,
                Setting::Refused(code, message) if message.is_empty() => {
                    Seen::Unknown(code.to_string())
                }
                Setting::Refused(code, message) => Seen::Unknown(format!("{code}: {message}")),
            },
        })
        .collect())
}

/// How often [`watch_topics`] describes the three topics.
pub const TOPIC_CHECK: Duration = Duration::from_secs(30);

/// A change worth a log line, from what a topic was to what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Compacts,
    NoLongerCompacts,
    Deleted,
    Back,
    Unreadable,
}

fn change(before: Option<&Seen>, now: &Seen) -> Option<Change> {
    let compacting = |s: Option<&Seen>| matches!(s, Some(Seen::Policy(p)) if compacts(p));
    match now {
        Seen::Policy(p) if compacts(p) && !compacting(before) => Some(Change::Compacts),
        Seen::Policy(_) if compacting(before) && !compacting(Some(now)) => {
            Some(Change::NoLongerCompacts)
        }
        Seen::Policy(_) if before == Some(&Seen::Missing) => Some(Change::Back),
        Seen::Policy(_) => None,
        Seen::Missing if before != Some(&Seen::Missing) => Some(Change::Deleted),
        Seen::Missing => None,
        Seen::Unknown(_) if !matches!(before, Some(Seen::Unknown(_))) => Some(Change::Unreadable),
        Seen::Unknown(_) => None,
    }
}

/// While the processor runs, describes the three topics every [`TOPIC_CHECK`], for what an
/// operator may change under it:
///
/// - a `cleanup.policy` that compacts: `causal_commit_topic_compacts` is 1 for the topic, an
///   ERROR names it with the fix, and its revert is logged. The processor goes on: the cleaner
///   only compacts rolled segments, so intents consumed on time are safe, and pausing would
///   leave more of them to it; effects already produced are at risk whatever it does. The
///   alert pages for the setting to be reverted, and the next start refuses it;
/// - a topic deleted: an ERROR names it (the transactions' own errors only say that records
///   timed out). Nothing is lost: no transaction commits without it (an intents topic created
///   again is refused by the restore's checks); created again, processing goes on by itself.
///
/// - the side-effects topic's partition count against the `recorded` one its effects are
///   spread over ([`effect_partitions`]): created again with fewer, an ERROR names it (the
///   transactions with an effect for a missing partition time out: those contacts wait,
///   nothing is lost); given more, a WARN says the added ones stay empty.
///
/// It starts from what the start-up check described (`first`), so its first describe is one
/// [`TOPIC_CHECK`] later; at once when the check had no answer.
pub async fn watch_topics(
    config: std::sync::Arc<Config>,
    first: Topics,
    recorded: i32,
    shutdown: CancellationToken,
) {
    let client = match describing_client(&config) {
        Ok(c) => std::sync::Arc::new(c),
        Err(e) => {
            tracing::warn!(error = %e, "creating the Kafka client that watches the topics failed; a policy changed to compact is seen at the next start only");
            return;
        }
    };
    let mut known: BTreeMap<String, Seen> = BTreeMap::new();
    let mut partitions = first.side_effects_partitions;
    let start = match first.described.is_empty() {
        true => tokio::time::Instant::now(),
        false => tokio::time::Instant::now() + TOPIC_CHECK,
    };
    for d in first.described {
        gauge(&d);
        known.insert(d.topic, d.seen);
    }
    let mut tick = tokio::time::interval_at(start, TOPIC_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                // Dropping the client joins its polling thread: not on a runtime worker.
                let _ = tokio::task::spawn_blocking(move || drop(client)).await;
                return;
            }
            _ = tick.tick() => {}
        }
        let within = config.kafka.operation_timeout.min(TOPIC_CHECK);
        let (described_on, checked) = (client.clone(), config.clone());
        let (described, counted) = tokio::task::spawn_blocking(move || {
            let client = described_on.client();
            // A topic missing is the describe's to report.
            let topic = &checked.kafka.side_effects_topic;
            (
                describe(client, &checked, within),
                partition_count(client, topic, within),
            )
        })
        .await
        .unwrap_or_else(|e| (Err(e.to_string()), None));
        if let Some(now) = counted {
            effect_partitions(&config.kafka.side_effects_topic, partitions, now, recorded);
            partitions = Some(now);
        }
        let described = match described {
            Ok(d) => d,
            Err(reason) => {
                if !failing {
                    tracing::warn!(reason = %reason, "could not describe the topics (DescribeConfigs); a policy changed to compact is not seen");
                    failing = true;
                }
                continue;
            }
        };
        failing = false;
        for d in described {
            gauge(&d);
            if let Some(c) = change(known.get(&d.topic), &d.seen) {
                report(&d, c);
            }
            known.insert(d.topic.clone(), d.seen);
        }
    }
}

/// Reports the side-effects topic's partition count `now` against the `recorded` one its
/// effects are spread over, when it differs from what it was `before` (`None`: unknown).
pub fn effect_partitions(topic: &str, before: Option<i32>, now: i32, recorded: i32) {
    if before == Some(now) {
        return;
    }
    if now < recorded {
        let refusal = Error::FewerEffectPartitions {
            topic: topic.to_owned(),
            partitions: now,
            recorded,
        };
        tracing::error!(
            topic = %topic,
            partitions = now,
            recorded,
            "{refusal}. Until then every transaction with an effect for a missing partition \
             times out: those contacts' effects wait, and nothing is lost"
        );
    } else if now > recorded {
        tracing::warn!(
            topic = %topic,
            partitions = now,
            recorded,
            "the side-effects topic has more partitions than its effects are spread over \
             (recorded at its first start): each contact's effects stay on the partition they \
             were on (R1), and the added partitions stay empty. To spread effects over more \
             partitions, point kafka.side_effects_topic at a new topic (docs/exactly-once.md)"
        );
    } else if before.is_some_and(|b| b < recorded) {
        tracing::info!(topic = %topic, partitions = now, "the side-effects topic has its partitions again");
    }
}

/// `causal_commit_topic_compacts` for a topic whose policy is known.
fn gauge(d: &Described) {
    if let Seen::Policy(p) = &d.seen {
        let v = if compacts(p) { 1.0 } else { 0.0 };
        metrics::gauge!(m::TOPIC_COMPACTS, "topic" => d.topic.clone()).set(v);
    }
}

fn report(d: &Described, change: Change) {
    let (key, topic) = (d.key, &d.topic);
    let policy = match &d.seen {
        Seen::Policy(p) => p.as_str(),
        _ => "",
    };
    match change {
        Change::Compacts => tracing::error!(
            setting = key,
            topic = %topic,
            policy,
            "{}; the processor goes on (records consumed before the cleaner runs are safe), \
             and will not start again until it is reverted",
            d.refusal(policy.to_owned())
        ),
        Change::NoLongerCompacts => {
            tracing::info!(setting = key, topic = %topic, policy, "the topic no longer compacts")
        }
        Change::Deleted if key == "kafka.intents_topic" => tracing::error!(
            setting = key,
            topic = %topic,
            "{key} {topic:?} does not exist any more (deleted?): nothing is consumed; created \
             again, its partitions refuse to start until an operator says where they resume \
             (recovery-point resume-at; runbook: Partitions paused)"
        ),
        Change::Deleted => tracing::error!(
            setting = key,
            topic = %topic,
            "{key} {topic:?} does not exist any more (deleted?): no transaction commits without \
             it, so nothing is emitted and nothing is lost; create it again with its settings \
             (deploy/) and processing goes on by itself"
        ),
        Change::Back => tracing::info!(setting = key, topic = %topic, "the topic exists again"),
        Change::Unreadable => tracing::warn!(
            setting = key,
            topic = %topic,
            reason = ?d.seen,
            "could not describe the topic; a policy changed to compact is not seen"
        ),
    }
}

/// What [`compaction`] found.
#[derive(Debug)]
pub enum Checked {
    /// No topic compacts.
    Fine,
    /// A topic compacts.
    Refused(Error),
    /// The brokers did not say (the reason).
    Unknown(String),
}

/// Whether a `cleanup.policy` value (a list: `delete`, `compact`, `compact,delete`) compacts.
fn compacts(policy: &str) -> bool {
    policy.split(',').any(|p| p.trim() == "compact")
}

/// Keeps the first authentication or TLS failure librdkafka reports.
#[derive(Default)]
struct Watch {
    failure: Mutex<Option<(RDKafkaErrorCode, String)>>,
}

/// Failures that retrying cannot heal: refused credentials, and a certificate the configured
/// CAs do not accept (not any TLS error: a broker restarting mid-handshake is not final).
fn is_final(code: RDKafkaErrorCode, reason: &str) -> bool {
    match code {
        RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed => true,
        RDKafkaErrorCode::SSL => reason.contains("certificate"),
        _ => false,
    }
}

impl ClientContext for Watch {
    fn error(&self, error: KafkaError, reason: &str) {
        match error.rdkafka_error_code() {
            Some(code) if is_final(code, reason) => {
                let mut failure = self.failure.lock().unwrap_or_else(PoisonError::into_inner);
                failure.get_or_insert_with(|| (code, reason.to_string()));
            }
            _ => tracing::debug!(error = %error, reason, "kafka start-up check"),
        }
    }
}

impl ProducerContext for Watch {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

/// How long the start-up check asks again for a topic the brokers do not have yet.
pub const TOPIC_APPEARS_WITHIN: Duration = Duration::from_secs(5);

/// The start-up check's client, for the whole start however many rounds of the check it
/// takes: a first start waiting for the brokers asks again and again on the same client.
/// Dropping it joins librdkafka's threads: not on a runtime worker.
pub struct Checker {
    config: std::sync::Arc<Config>,
    producer: BaseProducer<Watch>,
}

impl Checker {
    /// A client with the configuration's settings; it connects when first asked.
    pub fn new(config: std::sync::Arc<Config>) -> Result<Self, Error> {
        let mut c = crate::pipeline::kafka::client_config(&config, &[]);
        c.set(
            "client.id",
            format!("causal-commit-{}-check", config.instance_id()),
        );
        let producer = c
            .create_with_context(Watch::default())
            .map_err(Error::Create)?;
        Ok(Self { config, producer })
    }

    /// Asks for the intents topic's metadata. Fails on an authentication or TLS failure, on a
    /// topic compacting, or missing for [`TOPIC_APPEARS_WITHIN`]; returns once the brokers
    /// answer, with the topics as described, or `None` after `within` without an answer, or
    /// as soon as `stop` fires while none came (the caller says what it does then). Blocking.
    pub fn check(
        &self,
        within: Duration,
        stop: &CancellationToken,
    ) -> Result<Option<Topics>, Error> {
        let (config, producer) = (&*self.config, &self.producer);
        let brokers = config.kafka.brokers.clone();
        let deadline = Instant::now() + within;
        let mut missing_since: Option<Instant> = None;
        loop {
            let answered = producer
                .client()
                .fetch_metadata(
                    Some(&config.kafka.intents_topic),
                    Duration::from_millis(250),
                )
                .map_err(|e| e.rdkafka_error_code());
            // Serves every queued event (logs and errors share the queue, one event per poll
            // round): the callback above sees the errors of this round.
            producer.poll(Duration::from_millis(250));
            let failure = producer
                .context()
                .failure
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some((code, reason)) = failure {
                return Err(refused_login(code, brokers, reason));
            }
            match answered {
                Ok(_) => match topics_exist(producer.client(), config) {
                    Ok(side_effects_partitions) => return self.described(side_effects_partitions),
                    Err(missing) => {
                        let since = *missing_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= TOPIC_APPEARS_WITHIN {
                            return Err(missing);
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                },
                Err(Some(code)) if is_final(code, "") => {
                    return Err(refused_login(code, brokers, code.to_string()));
                }
                Err(_) if Instant::now() >= deadline || stop.is_cancelled() => return Ok(None),
                Err(_) => {}
            }
        }
    }

    /// The brokers answered and the three topics exist: their settings, checked.
    fn described(&self, side_effects_partitions: Option<i32>) -> Result<Option<Topics>, Error> {
        let described = describe(self.producer.client(), &self.config, Duration::from_secs(5));
        let verdict = match &described {
            Ok(d) => checked(d),
            Err(reason) => Checked::Unknown(reason.clone()),
        };
        match verdict {
            Checked::Refused(e) => return Err(e),
            Checked::Fine => {}
            Checked::Unknown(reason) => tracing::warn!(
                reason = %reason,
                "could not read the topics' cleanup.policy (DescribeConfigs); a compacted topic \
                 would lose records unseen"
            ),
        }
        Ok(Some(Topics {
            described: described.unwrap_or_default(),
            side_effects_partitions,
        }))
    }
}

/// A final failure to log in to the brokers, as the error that names it.
fn refused_login(code: RDKafkaErrorCode, brokers: String, reason: String) -> Error {
    match code {
        RDKafkaErrorCode::SSL => Error::Tls { brokers, reason },
        _ => Error::Authentication { brokers, reason },
    }
}

/// Each of the three topics is in the brokers' metadata with partitions. A metadata request
/// that fails is no verdict (the engine goes on trying, as for a broker that does not answer).
/// The side-effects topic's partition count, when its metadata came.
fn topics_exist<C: ClientContext>(
    client: &rdkafka::client::Client<C>,
    config: &Config,
) -> Result<Option<i32>, Error> {
    let k = &config.kafka;
    let mut side_effects_partitions = None;
    for (key, topic) in topics(config) {
        let Ok(metadata) = client.fetch_metadata(Some(topic), Duration::from_secs(5)) else {
            continue;
        };
        let refused = match metadata.topics().first() {
            Some(t) => match t.error() {
                Some(e) => Some(RDKafkaErrorCode::from(e).to_string()),
                None if t.partitions().is_empty() => Some("it has no partitions".into()),
                None => None,
            },
            None => Some("the brokers do not list it".into()),
        };
        if let Some(reason) = refused {
            return Err(Error::Topic {
                key,
                topic: topic.to_owned(),
                brokers: k.brokers.clone(),
                reason,
            });
        }
        if key == "kafka.side_effects_topic" {
            side_effects_partitions = metadata
                .topics()
                .first()
                .map(|t| t.partitions().len() as i32);
        }
    }
    Ok(side_effects_partitions)
}

/// `topic`'s partition count from one metadata request; `None` without an answer within
/// `within`, or for a topic the brokers do not list with partitions. Blocking.
fn partition_count<C: ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
    within: Duration,
) -> Option<i32> {
    let metadata = client.fetch_metadata(Some(topic), within).ok()?;
    let t = metadata.topics().first()?;
    (t.error().is_none() && !t.partitions().is_empty()).then(|| t.partitions().len() as i32)
}

#[cfg(test)]
mod tests {
    use super::compacts;

    /// The events waiting in `client`'s main queue (librdkafka's logs, errors, statistics).
    fn unserved<C: rdkafka::ClientContext>(client: &rdkafka::client::Client<C>) -> usize {
        use rdkafka::bindings as rd;
        // SAFETY: the handle is alive (`client` is borrowed); the main queue's reference that
        // `rd_kafka_queue_get_main` gives is released once its length is read.
        #[allow(unsafe_code)]
        unsafe {
            let main = rd::rd_kafka_queue_get_main(client.native_ptr());
            let queued = rd::rd_kafka_queue_length(main);
            rd::rd_kafka_queue_destroy(main);
            queued
        }
    }

    #[test]
    fn the_topic_watchs_client_serves_its_events_as_they_come() {
        // Nothing listens on port 1: the client logs every refused connection and reports its
        // statistics (for its broker watch) every 2 s, for as long as it lives.
        let config = crate::config::Config::from_toml("[kafka]\nbrokers = \"127.0.0.1:1\"\n")
            .expect("a config");
        let client = super::describing_client(&config).expect("the client");
        std::thread::sleep(std::time::Duration::from_secs(5));
        let queued = unserved(rdkafka::producer::Producer::client(&client));
        assert!(
            queued <= 1,
            "{queued} events wait unserved in the client's queue"
        );
    }

    #[test]
    fn each_change_of_a_topic_is_reported_once() {
        use super::{change, Change, Seen};
        let delete = Seen::Policy("delete".into());
        let compact = Seen::Policy("compact,delete".into());
        let unknown = Seen::Unknown("Broker: Topic authorization failed".into());
        for (before, now, expected) in [
            (None, &delete, None),
            (None, &compact, Some(Change::Compacts)),
            (Some(&delete), &compact, Some(Change::Compacts)),
            (Some(&compact), &compact, None),
            (Some(&compact), &delete, Some(Change::NoLongerCompacts)),
            (Some(&delete), &Seen::Missing, Some(Change::Deleted)),
            (Some(&compact), &Seen::Missing, Some(Change::Deleted)),
            (Some(&Seen::Missing), &Seen::Missing, None),
            (Some(&Seen::Missing), &delete, Some(Change::Back)),
            (Some(&Seen::Missing), &compact, Some(Change::Compacts)),
            (Some(&delete), &unknown, Some(Change::Unreadable)),
            (Some(&unknown), &unknown, None),
            (Some(&unknown), &delete, None),
        ] {
            assert_eq!(change(before, now), expected, "{before:?} -> {now:?}");
        }
    }

    #[test]
    fn a_policy_compacts_when_its_list_names_compact() {
        for (policy, compacting) in [
            ("delete", false),
            ("", false),
            ("compact", true),
            ("compact,delete", true),
            ("delete, compact", true),
            ("compaction", false),
        ] {
            assert_eq!(compacts(policy), compacting, "{policy:?}");
        }
    }
}
