//! The start-up check of the Kafka connection, with the `[kafka.client]` settings every client
//! uses. A credential the brokers refuse, or a broker certificate the configured CA does not
//! sign, cannot heal by retrying: `run` stops at once with an error that names it, instead of
//! starting an engine whose clients would retry (and log) for ever while reporting not ready.
//! A broker that does not answer yet is not an error here: the engine keeps trying, as always.
//! Nor does a mistyped topic name heal: once the brokers answer, each of the three topics must
//! exist (the engine would otherwise wait for an intents topic that never comes, not ready,
//! or abort every transaction on a missing output topic). And none of them may be compacted:
//! compaction keeps the last record of each key (the intents topic is keyed by contact) and
//! deletes the others, so intents would be lost before they are consumed, effects before their
//! readers get them, and `verify`, which reads the same topics, would not see what is gone.
//! A policy changed while the processor runs is seen by [`watch_compaction`].

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
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
/// permission) or do not answer is no verdict: `Checked::Unknown`.
pub fn compaction(config: &Config, within: Duration) -> Checked {
    let admin = match admin_client(config) {
        Ok(a) => a,
        Err(e) => return Checked::Unknown(e.to_string()),
    };
    let policies = match futures::executor::block_on(policies(&admin, config, within)) {
        Ok(p) => p,
        Err(reason) => return Checked::Unknown(reason),
    };
    match policies.into_iter().find(|p| p.compacts()) {
        Some(p) => Checked::Refused(p.refusal()),
        None => Checked::Fine,
    }
}

fn admin_client(config: &Config) -> rdkafka::error::KafkaResult<AdminClient<DefaultClientContext>> {
    crate::pipeline::kafka::client_config(config, &[]).create()
}

/// One topic of `[kafka]` and its `cleanup.policy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub key: &'static str,
    pub topic: String,
    pub policy: String,
}

impl Policy {
    pub fn compacts(&self) -> bool {
        compacts(&self.policy)
    }

    fn refusal(self) -> Error {
        Error::Compacted {
            key: self.key,
            topic: self.topic,
            policy: self.policy,
        }
    }
}

/// The `cleanup.policy` of each of the three topics, in one `DescribeConfigs`; an error (the
/// reason) when the brokers refuse or do not answer, for any of them.
async fn policies(
    admin: &AdminClient<DefaultClientContext>,
    config: &Config,
    within: Duration,
) -> Result<Vec<Policy>, String> {
    let named = topics(config);
    let resources: Vec<ResourceSpecifier<'_>> = named
        .iter()
        .map(|(_, t)| ResourceSpecifier::Topic(t))
        .collect();
    let opts = AdminOptions::new().request_timeout(Some(within));
    let described = admin
        .describe_configs(&resources, &opts)
        .await
        .map_err(|e| e.to_string())?;
    named
        .iter()
        .zip(described)
        .map(|((key, topic), result)| {
            let resource = result.map_err(|code| format!("{topic}: {code}"))?;
            Ok(Policy {
                key,
                topic: (*topic).to_owned(),
                policy: resource
                    .get("cleanup.policy")
                    .and_then(|e| e.value.clone())
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// How often [`watch_compaction`] reads the topics' `cleanup.policy`.
pub const COMPACTION_CHECK: Duration = Duration::from_secs(30);

/// While the processor runs, reads the three topics' `cleanup.policy` every
/// [`COMPACTION_CHECK`]: `causal_commit_topic_compacts` is 1 for a topic that compacts, and
/// each change is logged (ERROR when a topic starts compacting). The processor goes on: the
/// cleaner only compacts rolled segments, so intents consumed on time are safe, and pausing
/// would leave more of them to it; effects already produced are at risk whatever it does. The
/// alert pages for the setting to be reverted, and the next start refuses it.
pub async fn watch_compaction(config: std::sync::Arc<Config>, shutdown: CancellationToken) {
    let admin = match admin_client(&config) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "creating the Kafka client that watches the topics' cleanup.policy failed; a policy changed to compact is seen at the next start only");
            return;
        }
    };
    let mut tick = tokio::time::interval(COMPACTION_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut known: BTreeMap<String, bool> = BTreeMap::new();
    let mut unknown_logged = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let within = config.kafka.operation_timeout.min(COMPACTION_CHECK);
        let policies = match policies(&admin, &config, within).await {
            Ok(p) => p,
            Err(reason) => {
                if !unknown_logged {
                    tracing::warn!(reason = %reason, "could not read the topics' cleanup.policy (DescribeConfigs); a policy changed to compact is not seen");
                    unknown_logged = true;
                }
                continue;
            }
        };
        unknown_logged = false;
        for p in policies {
            let compacting = p.compacts();
            metrics::gauge!(m::TOPIC_COMPACTS, "topic" => p.topic.clone()).set(if compacting {
                1.0
            } else {
                0.0
            });
            let before = known.insert(p.topic.clone(), compacting);
            match (before, compacting) {
                (Some(false) | None, true) => tracing::error!(
                    setting = p.key,
                    topic = %p.topic,
                    policy = %p.policy,
                    "{}; the processor goes on (records consumed before the cleaner runs are                      safe), and will not start again until it is reverted",
                    p.clone().refusal()
                ),
                (Some(true), false) => tracing::info!(
                    setting = p.key,
                    topic = %p.topic,
                    policy = %p.policy,
                    "the topic no longer compacts"
                ),
                _ => {}
            }
        }
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

/// Connects to the brokers with the configuration's client settings and asks for the intents
/// topic's metadata. Fails on an authentication or TLS failure; returns once the brokers
/// answer, or after `within` without an answer (then the engine goes on trying). Blocking.
pub fn check(config: &Config, within: Duration) -> Result<(), Error> {
    let brokers = config.kafka.brokers.clone();
    let mut c = crate::pipeline::kafka::client_config(config, &[]);
    c.set(
        "client.id",
        format!("causal-commit-{}-check", config.instance_id()),
    );
    let producer: BaseProducer<Watch> = c
        .create_with_context(Watch::default())
        .map_err(Error::Create)?;
    let deadline = Instant::now() + within;
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
            return Err(match code {
                RDKafkaErrorCode::SSL => Error::Tls { brokers, reason },
                _ => Error::Authentication { brokers, reason },
            });
        }
        match answered {
            Ok(_) => {
                topics_exist(producer.client(), config)?;
                return match compaction(config, Duration::from_secs(5)) {
                    Checked::Refused(e) => Err(e),
                    Checked::Fine => Ok(()),
                    Checked::Unknown(reason) => {
                        tracing::warn!(
                            reason = %reason,
                            "could not read the topics' cleanup.policy (DescribeConfigs); a \
                             compacted topic would lose records unseen"
                        );
                        Ok(())
                    }
                };
            }
            Err(Some(code)) if is_final(code, "") => {
                let reason = format!("{code}");
                return Err(match code {
                    RDKafkaErrorCode::SSL => Error::Tls { brokers, reason },
                    _ => Error::Authentication { brokers, reason },
                });
            }
            Err(_) if Instant::now() >= deadline => {
                tracing::warn!(
                    brokers = %brokers,
                    "Kafka did not answer the start-up check in {within:?}; starting anyway (the \
                     consumer and producer keep trying)"
                );
                return Ok(());
            }
            Err(_) => {}
        }
    }
}

/// Each of the three topics is in the brokers' metadata with partitions. A metadata request
/// that fails is no verdict (the engine goes on trying, as for a broker that does not answer).
fn topics_exist<C: ClientContext>(
    client: &rdkafka::client::Client<C>,
    config: &Config,
) -> Result<(), Error> {
    let k = &config.kafka;
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
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::compacts;

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
