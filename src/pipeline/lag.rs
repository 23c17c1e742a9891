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
//!   lane's committed offset right after a seek, or, for a partition nothing was ever consumed
//!   or committed of, its log's start, which the monitor asks the broker for (a consumer
//!   stuck before its first record has lag too);
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

/// Where the engine's consumer stands in a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// The next offset to consume.
    At(i64),
    /// Nothing consumed here yet, nor ever committed: the consumer starts at the log's first
    /// offset (`auto.offset.reset=earliest`), which the monitor asks the broker for.
    LogStart,
}

/// The engine's assigned partitions and their positions (next offset to consume), shared with
/// the [`Monitor`].
#[derive(Debug, Default)]
pub struct Positions {
    assigned: Mutex<BTreeMap<i32, Option<Position>>>,
    /// Per partition, the position and the last stable offset of the monitor's last report,
    /// with when: what the engine's fetch watch (see `super::stall`) looks at.
    readings: Mutex<BTreeMap<i32, (i64, i64, Instant)>>,
}

impl Positions {
    /// The engine's assignment now, each partition with its position when known. Partitions
    /// no longer in it have their lag cleared.
    pub fn publish(&self, now: impl IntoIterator<Item = (i32, Option<Position>)>) {
        let mut assigned = self.lock();
        let now: BTreeMap<i32, Option<Position>> = now.into_iter().collect();
        for p in assigned.keys().filter(|p| !now.contains_key(p)) {
            clear(*p);
        }
        self.readings().retain(|p, _| now.contains_key(p));
        *assigned = now;
    }

    /// `partitions` were revoked: their lag is no longer this instance's to report.
    pub fn revoke(&self, partitions: &[i32]) {
        let mut assigned = self.lock();
        let mut readings = self.readings();
        for p in partitions {
            assigned.remove(p);
            readings.remove(p);
            clear(*p);
        }
    }

    /// A partition's position and last stable offset as the monitor last reported them, when
    /// that was within `fresh` of `now`: a broker that does not answer the monitor leaves none.
    pub fn reading(&self, partition: i32, now: Instant, fresh: Duration) -> Option<(i64, i64)> {
        let readings = self.readings();
        let (position, last_stable, at) = readings.get(&partition)?;
        (now.saturating_duration_since(*at) <= fresh).then_some((*position, *last_stable))
    }

    /// The partitions whose lag can be computed, and those of them whose position is the
    /// log's start.
    fn known(&self) -> (Vec<i32>, Vec<i32>) {
        let assigned = self.lock();
        let with = |f: fn(&Position) -> bool| {
            (assigned.iter())
                .filter(|(_, pos)| pos.as_ref().is_some_and(f))
                .map(|(p, _)| *p)
                .collect()
        };
        (with(|_| true), with(|pos| *pos == Position::LogStart))
    }

    /// Sets the gauge of every partition still assigned, from its last stable offset (and its
    /// log start, for a partition read from there). Under the lock, so a revocation in between
    /// is never overwritten by a stale figure.
    fn report(&self, last_stable: &BTreeMap<i32, i64>, log_starts: &BTreeMap<i32, i64>) {
        let assigned = self.lock();
        let now = Instant::now();
        let mut readings = self.readings();
        for (p, position, end) in resolved(&assigned, last_stable, log_starts) {
            let lag = (end - position).max(0);
            metrics::gauge!(m::CONSUMER_LAG, "partition" => p.to_string()).set(lag as f64);
            readings.insert(p, (position, end, now));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<i32, Option<Position>>> {
        self.assigned.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Taken after [`Self::lock`] when both are held.
    fn readings(&self) -> std::sync::MutexGuard<'_, BTreeMap<i32, (i64, i64, Instant)>> {
        self.readings.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn clear(partition: i32) {
    metrics::gauge!(m::CONSUMER_LAG, "partition" => partition.to_string()).set(0.0);
}

/// `(partition, position, last stable offset)` of each assigned partition whose position and
/// last stable offset are known (a log start position known from `log_starts`). The lag is
/// the difference, never negative: the position can be ahead of an end offset read a moment
/// earlier.
fn resolved(
    assigned: &BTreeMap<i32, Option<Position>>,
    last_stable: &BTreeMap<i32, i64>,
    log_starts: &BTreeMap<i32, i64>,
) -> Vec<(i32, i64, i64)> {
    assigned
        .iter()
        .filter_map(|(p, pos)| {
            let position = match (*pos)? {
                Position::At(o) => o,
                Position::LogStart => *log_starts.get(p)?,
            };
            let end = *last_stable.get(p)?;
            Some((*p, position, end))
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
                    let (partitions, from_start) = positions.known();
                    if partitions.is_empty() {
                        continue;
                    }
                    let ends = list_offsets(&client, &topic, &partitions, Offset::End, timeout);
                    // Only until the engine consumes their first record.
                    let starts = match from_start.is_empty() {
                        true => Ok(BTreeMap::new()),
                        false => {
                            list_offsets(&client, &topic, &from_start, Offset::Beginning, timeout)
                        }
                    };
                    match ends.and_then(|ends| Ok((ends, starts?))) {
                        Ok((ends, starts)) => positions.report(&ends, &starts),
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

/// One ListOffsets for `partitions`: `Offset::End` asks for the last stable offsets (the client
/// reads committed), `Offset::Beginning` for the logs' first offsets.
fn list_offsets(
    client: &BaseConsumer<Watched>,
    topic: &str,
    partitions: &[i32],
    which: Offset,
    timeout: Duration,
) -> rdkafka::error::KafkaResult<BTreeMap<i32, i64>> {
    let mut tpl = TopicPartitionList::with_capacity(partitions.len());
    for p in partitions {
        // For a ListOffsets by time, -1 (Offset::End) asks for the end, -2 for the start.
        tpl.add_partition_offset(topic, *p, which)?;
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
    use Position::{At, LogStart};

    #[test]
    fn lag_is_the_last_stable_offset_minus_the_position_for_known_partitions_only() {
        let assigned = BTreeMap::from([
            (0, Some(At(10))),
            (1, None),
            (2, Some(At(7))),
            (3, Some(At(12))),
            (5, Some(LogStart)),
            (6, Some(LogStart)),
        ]);
        let ends = BTreeMap::from([(0, 15), (1, 40), (2, 7), (3, 11), (5, 30), (6, 30)]);
        let starts = BTreeMap::from([(5, 4)]);
        // 1 has no position yet, 4 is not assigned, 3's end was read before the position moved,
        // 5 is read from its log's start (4), 6's start is not known yet.
        let lags: Vec<(i32, i64)> = resolved(&assigned, &ends, &starts)
            .into_iter()
            .map(|(p, pos, end)| (p, (end - pos).max(0)))
            .collect();
        assert_eq!(lags, vec![(0, 5), (2, 0), (3, 0), (5, 26)]);
    }

    #[test]
    fn a_revoked_partition_is_cleared_and_no_longer_reported() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let positions = Positions::default();
        let now = Instant::now();
        let fresh = Duration::from_secs(10);
        metrics::with_local_recorder(&recorder, || {
            positions.publish([
                (0, Some(At(1))),
                (1, Some(At(2))),
                (2, None),
                (3, Some(LogStart)),
            ]);
            assert_eq!(positions.known(), (vec![0, 1, 3], vec![3]));
            let starts = BTreeMap::from([(3, 5)]);
            positions.report(&BTreeMap::from([(0, 6), (1, 9), (2, 9), (3, 8)]), &starts);
            positions.revoke(&[1]);
            // A report computed before the revocation lands after it: 1 stays cleared.
            positions.report(&BTreeMap::from([(0, 6), (1, 9)]), &BTreeMap::new());
        });
        let text = handle.render();
        for (p, lag) in [(0, 5), (1, 0), (3, 3)] {
            let line = format!("causal_commit_consumer_lag{{partition=\"{p}\"}} {lag}");
            assert!(text.contains(&line), "{line}: {text}");
        }
        assert!(
            !text.contains("partition=\"2\""),
            "no position, no figure: {text}"
        );
        assert_eq!(positions.reading(0, Instant::now(), fresh), Some((1, 6)));
        assert_eq!(positions.reading(3, Instant::now(), fresh), Some((5, 8)));
        assert_eq!(positions.reading(1, Instant::now(), fresh), None, "revoked");
        assert_eq!(positions.reading(2, Instant::now(), fresh), None);
        assert_eq!(
            positions.reading(0, now + Duration::from_secs(11), fresh),
            None,
            "too old"
        );
        assert_eq!(positions.known(), (vec![0, 3], vec![3]));
        metrics::with_local_recorder(&recorder, || positions.publish([(2, Some(At(3)))]));
        assert_eq!(positions.known(), (vec![2], vec![]));
        assert_eq!(
            positions.reading(0, Instant::now(), fresh),
            None,
            "no longer assigned"
        );
        assert!(handle
            .render()
            .contains("causal_commit_consumer_lag{partition=\"0\"} 0"));
    }
}
