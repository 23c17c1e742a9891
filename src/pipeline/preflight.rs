//! The start-up check of the Kafka connection, with the `[kafka.client]` settings every client
//! uses. A credential the brokers refuse, or a broker certificate the configured CA does not
//! sign, cannot heal by retrying: `run` stops at once with an error that names it, instead of
//! starting an engine whose clients would retry (and log) for ever while reporting not ready.
//! A broker that does not answer yet is not an error here: the engine keeps trying, as always.
//! Nor does a mistyped topic name heal: once the brokers answer, each of the three topics must
//! exist (the engine would otherwise wait for an intents topic that never comes, not ready,
//! or abort every transaction on a missing output topic).

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;

use crate::config::Config;

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
    let mut c = crate::pipeline::kafka::client_config();
    for (k, v) in &config.kafka.client {
        c.set(k, v);
    }
    c.set("bootstrap.servers", &brokers).set(
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
            Ok(_) => return topics_exist(producer.client(), config),
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
    for (key, topic) in [
        ("kafka.intents_topic", &k.intents_topic),
        ("kafka.side_effects_topic", &k.side_effects_topic),
        ("kafka.manual_review_topic", &k.manual_review_topic),
    ] {
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
                topic: topic.clone(),
                brokers: k.brokers.clone(),
                reason,
            });
        }
    }
    Ok(())
}
