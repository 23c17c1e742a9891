//! `causal_commit_consumer_lag`: per assigned partition, the records a read_committed consumer
//! could read that this instance has not consumed yet — the partition's last stable offset minus
//! the consumer's position.
//!
//! librdkafka's own `consumer_lag` statistic is measured from the consumer's committed offset,
//! which this consumer never moves (offsets are committed by the transactional producer), so it
//! only grows. Its `ls_offset` statistic is no better for a paused partition: it comes from fetch
//! responses, and a paused partition is not fetched, so its lag would freeze while producers
//! keep writing. So:
//!
//! - the engine hands its positions over ([`Positions::publish`], once a second, with the
//!   backlog gauges): librdkafka's application position (past transaction markers), or the
//!   lane's committed offset right after a seek;
//! - a [`Monitor`] thread asks the brokers for the last stable offsets of those partitions
//!   (one ListOffsets round trip per leader, read_committed, every [`INTERVAL`]) on a client of
//!   its own, so a slow broker never blocks the engine, and sets the gauge;
//! - a revoked partition's gauge goes to 0 at once ([`Positions::revoke`], from the rebalance
//!   callback), so two instances never both report the same partition's lag.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::kafka::{self, BrokerWatch, Watched};
use crate::config::Config;
use crate::telemetry::metrics as m;

/// How often the last stable offsets are asked for.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// The engine's assigned partitions and their positions (next offset to consume), shared with
/// the [`Monitor`].
#[derive(Debug, Default)]
pub struct Positions {
    assigned: Mutex<BTreeMap<i32, Option<i64>>>,
}

impl Positions {
    /// The engine's assignment now, each partition with its position when known. Partitions
    /// no longer in it have their lag cleared.
    pub fn publish(&self, now: impl IntoIterator<Item = (i32, Option<i64>)>) {
        let mut assigned = self.lock();
        let now: BTreeMap<i32, Option<i64>> = now.into_iter().collect();
        for p in assigned.keys().filter(|p| !now.contains_key(p)) {
            clear(*p);
        }
        *assigned = now;
    }

    /// `partitions` were revoked: their lag is no longer this instance's to report.
    pub fn revoke(&self, partitions: &[i32]) {
        let mut assigned = self.lock();
        for p in partitions {
            assigned.remove(p);
            clear(*p);
        }
    }

    /// The partitions whose lag can be computed.
    fn known(&self) -> Vec<i32> {
        self.lock()
            .iter()
            .filter(|(_, pos)| pos.is_some())
            .map(|(p, _)| *p)
            .collect()
    }

    /// Sets the gauge of every partition still assigned, from its last stable offset. Under the
    /// lock, so a revocation in between is never overwritten by a stale figure.
    fn report(&self, last_stable: &BTreeMap<i32, i64>) {
        let assigned = self.lock();
        for (p, lag) in lags(&assigned, last_stable) {
            metrics::gauge!(m::CONSUMER_LAG, "partition" => p.to_string()).set(lag as f64);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<i32, Option<i64>>> {
        self.assigned.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn clear(partition: i32) {
    metrics::gauge!(m::CONSUMER_LAG, "partition" => partition.to_string()).set(0.0);
}

/// Lag per assigned partition with a known position and a known last stable offset. Never
/// negative: the position can be ahead of an end offset read a moment earlier.
fn lags(
    assigned: &BTreeMap<i32, Option<i64>>,
    last_stable: &BTreeMap<i32, i64>,
) -> Vec<(i32, i64)> {
    assigned
        .iter()
        .filter_map(|(p, pos)| {
            let pos = (*pos)?;
            let end = *last_stable.get(p)?;
            Some((*p, (end - pos).max(0)))
        })
        .collect()
}

/// The thread that turns [`Positions`] into lag; stops when dropped or when `shutdown` fires.
pub struct Monitor {
    stop: CancellationToken,
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Monitor {
    /// Starts the monitor on its own read_committed client (no group). If the client cannot be
    /// created, the lag is not reported (logged) and processing goes on.
    pub fn spawn(config: &Config, positions: Arc<Positions>, shutdown: &CancellationToken) -> Self {
        let stop = shutdown.child_token();
        let client_id = format!("causal-commit-{}-lag", config.instance_id());
        let c = kafka::watched_config(
            config,
            &[
                ("isolation.level", "read_committed"),
                ("enable.auto.commit", "false"),
                ("client.id", &client_id),
            ],
        );
        let topic = config.kafka.intents_topic.clone();
        let timeout = config.kafka.operation_timeout.min(INTERVAL);
        let watch = BrokerWatch::new("lag", &config.kafka.brokers);
        let client: BaseConsumer<Watched> = match c
            .create_with_context::<_, BaseConsumer<Watched>>(Watched(watch.clone()))
        {
            Ok(client) => {
                watch.attach(client.client());
                client
            }
            Err(e) => {
                tracing::warn!(error = %e, "creating the lag monitor's Kafka client failed; causal_commit_consumer_lag is not reported");
                return Self { stop };
            }
        };
        let token = stop.clone();
        let spawned = std::thread::Builder::new()
            .name("causal-commit-lag".into())
            .spawn(move || {
                let mut next = Instant::now();
                while !token.is_cancelled() {
                    if Instant::now() < next {
                        // Serves the client's statistics (its broker watch); it consumes nothing.
                        let _ = client.poll(Duration::from_millis(100));
                        continue;
                    }
                    next = Instant::now() + INTERVAL;
                    let partitions = positions.known();
                    if partitions.is_empty() {
                        continue;
                    }
                    match last_stable_offsets(&client, &topic, &partitions, timeout) {
                        Ok(ends) => positions.report(&ends),
                        Err(e) => {
                            tracing::debug!(error = %e, "asking for the last stable offsets failed")
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "starting the lag monitor failed; causal_commit_consumer_lag is not reported");
        }
        Self { stop }
    }
}

/// One ListOffsets (latest, read_committed: the last stable offset) for `partitions`.
fn last_stable_offsets(
    client: &BaseConsumer<Watched>,
    topic: &str,
    partitions: &[i32],
    timeout: Duration,
) -> rdkafka::error::KafkaResult<BTreeMap<i32, i64>> {
    let mut tpl = TopicPartitionList::with_capacity(partitions.len());
    for p in partitions {
        // For a ListOffsets by time, -1 (Offset::End) asks for the end.
        tpl.add_partition_offset(topic, *p, Offset::End)?;
    }
    let out = client.offsets_for_times(tpl, timeout)?;
    Ok(out
        .elements()
        .iter()
        .filter(|e| e.error().is_ok())
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_the_last_stable_offset_minus_the_position_for_known_partitions_only() {
        let assigned = BTreeMap::from([(0, Some(10)), (1, None), (2, Some(7)), (3, Some(12))]);
        let ends = BTreeMap::from([(0, 15), (1, 40), (2, 7), (3, 11)]);
        // 1 has no position yet, 4 is not assigned, 3's end was read before the position moved.
        assert_eq!(lags(&assigned, &ends), vec![(0, 5), (2, 0), (3, 0)]);
    }

    #[test]
    fn a_revoked_partition_is_cleared_and_no_longer_reported() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let positions = Positions::default();
        metrics::with_local_recorder(&recorder, || {
            positions.publish([(0, Some(1)), (1, Some(2)), (2, None)]);
            assert_eq!(positions.known(), vec![0, 1]);
            positions.report(&BTreeMap::from([(0, 6), (1, 9), (2, 9)]));
            positions.revoke(&[1]);
            // A report computed before the revocation lands after it: 1 stays cleared.
            positions.report(&BTreeMap::from([(0, 6), (1, 9)]));
        });
        let text = handle.render();
        assert!(
            text.contains("causal_commit_consumer_lag{partition=\"0\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("causal_commit_consumer_lag{partition=\"1\"} 0"),
            "{text}"
        );
        assert!(
            !text.contains("partition=\"2\""),
            "no position, no figure: {text}"
        );
        assert_eq!(positions.known(), vec![0]);
        metrics::with_local_recorder(&recorder, || positions.publish([(2, Some(3))]));
        assert_eq!(positions.known(), vec![2]);
        assert!(handle
            .render()
            .contains("causal_commit_consumer_lag{partition=\"0\"} 0"));
    }
}
