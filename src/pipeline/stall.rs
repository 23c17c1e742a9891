//! A consumer that stops fetching a partition it is told to read, while the broker answers.
//!
//! librdkafka can leave a partition's fetcher idle for good after a leader change: its issues
//! 4492 ("Partition stuck and does not receive any message", fetch state
//! `validate-epoch-wait`) and 3396 tell of consumers that read nothing more from a partition
//! with records to read, no error reported, until the process restarted. Here two instances sat
//! idle for three minutes with 2,516 records to read after their only broker, frozen for 50 s,
//! came back fenced for a moment (its metadata listing no broker, then new leader epochs).
//! Nothing in the log said so: the engine had nothing to decide.
//!
//! [`FetchWatch`] compares, once a second, each partition the engine reads (assigned, restored,
//! not paused by the engine) with its last stable offset, as the lag monitor last read it from
//! the broker (`super::lag`, at most [`FRESH`] old: a broker that answers nobody is an outage,
//! not a stall). A partition whose position has stayed below that offset, unchanged, for
//! `kafka.fetch_stall_timeout` while the engine kept polling is stalled: the engine logs it
//! with librdkafka's own view of the partition (its fetch state, leader and offsets, from the
//! consumer's statistics), counts it in `causal_commit_consumer_stalls_total`, and the consumer
//! is replaced by a new one that restores its partitions from the committed state (see
//! `super::run_engines`), which is what the process restart those reports ended with did.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How old a last stable offset may be to count: two rounds of the lag monitor.
pub const FRESH: Duration = Duration::from_secs(2 * super::lag::INTERVAL.as_secs());

/// A gap longer than this between two looks is the engine's own stall (a long batch, a store
/// call, a restore), not the consumer's: every partition's wait starts again.
pub const ENGINE_GAP: Duration = Duration::from_secs(5);

/// What the engine knows of one partition it reads from, at one look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    pub partition: i32,
    /// The consumer's position (next offset to consume) and the partition's last stable
    /// offset, as the lag monitor last reported them, when recently enough ([`FRESH`]).
    pub offsets: Option<(i64, i64)>,
    /// Paused by the engine (backpressure, a store outage, a restore): not fetched on purpose.
    pub paused: bool,
}

/// A partition with records to read that the consumer did not move in for `for_`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stalled {
    pub partition: i32,
    pub position: i64,
    pub last_stable: i64,
    pub for_: Duration,
}

/// Per partition: where the consumer stood, and since when, while it had records to read.
#[derive(Debug)]
pub struct FetchWatch {
    timeout: Duration,
    waiting: BTreeMap<i32, (i64, Instant)>,
    last_look: Option<Instant>,
}

impl FetchWatch {
    /// A watch that reports a partition stalled after `timeout`; zero turns it off.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            waiting: BTreeMap::new(),
            last_look: None,
        }
    }

    /// One look at the partitions the engine reads (any partition not given is forgotten);
    /// returns the stalled ones.
    pub fn look(&mut self, now: Instant, readings: &[Reading]) -> Vec<Stalled> {
        if self.timeout.is_zero() {
            return Vec::new();
        }
        if self
            .last_look
            .is_some_and(|at| now.saturating_duration_since(at) > ENGINE_GAP)
        {
            self.waiting.clear();
        }
        self.last_look = Some(now);
        let mut seen = BTreeMap::new();
        let mut stalled = Vec::new();
        for r in readings {
            let (Some((position, last_stable)), false) = (r.offsets, r.paused) else {
                continue;
            };
            if position >= last_stable {
                continue;
            }
            let since = match self.waiting.get(&r.partition) {
                Some((at, since)) if *at == position => *since,
                _ => now,
            };
            seen.insert(r.partition, (position, since));
            let for_ = now.saturating_duration_since(since);
            if for_ >= self.timeout {
                stalled.push(Stalled {
                    partition: r.partition,
                    position,
                    last_stable,
                    for_,
                });
            }
        }
        self.waiting = seen;
        stalled
    }
}

/// librdkafka's view of one partition of `topic`, from a statistics report of the consumer
/// (`fetch_state`, `leader`, `fetchq_cnt`, `next_offset`, `app_offset`, `ls_offset`), as a
/// short text for the log; `None` when the report does not list it.
pub fn librdkafka_view(statistics: &[u8], topic: &str, partition: i32) -> Option<String> {
    let report: serde_json::Value = serde_json::from_slice(statistics).ok()?;
    let p = report
        .get("topics")?
        .get(topic)?
        .get("partitions")?
        .get(partition.to_string())?;
    let field = |k: &str| {
        p.get(k)
            .map(|v| v.to_string())
            .unwrap_or_else(|| "?".into())
    };
    Some(format!(
        "fetch_state={} leader={} fetchq_cnt={} next_offset={} app_offset={} ls_offset={}",
        p.get("fetch_state").and_then(|v| v.as_str()).unwrap_or("?"),
        field("leader"),
        field("fetchq_cnt"),
        field("next_offset"),
        field("app_offset"),
        field("ls_offset"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(partition: i32, position: i64, last_stable: i64) -> Reading {
        Reading {
            partition,
            offsets: Some((position, last_stable)),
            paused: false,
        }
    }

    const T: Duration = Duration::from_secs(30);

    /// Looks once a second from `start` for `secs` seconds with the same readings; returns the
    /// first look that reported a stall, in seconds from `start`.
    fn first_stall(
        watch: &mut FetchWatch,
        start: Instant,
        secs: u64,
        r: &[Reading],
    ) -> Option<u64> {
        (0..=secs).find(|s| !watch.look(start + Duration::from_secs(*s), r).is_empty())
    }

    #[test]
    fn a_partition_behind_its_last_stable_offset_that_does_not_move_is_stalled_after_the_timeout() {
        let mut w = FetchWatch::new(T);
        let t0 = Instant::now();
        let stalled = first_stall(&mut w, t0, 60, &[reading(0, 10, 25), reading(1, 7, 7)]);
        assert_eq!(stalled, Some(30));
        assert_eq!(
            w.look(t0 + Duration::from_secs(31), &[reading(0, 10, 25)]),
            vec![Stalled {
                partition: 0,
                position: 10,
                last_stable: 25,
                for_: Duration::from_secs(31),
            }]
        );
    }

    #[test]
    fn a_moving_position_a_caught_up_partition_a_paused_one_and_an_unknown_end_are_not_stalls() {
        let t0 = Instant::now();
        let mut w = FetchWatch::new(T);
        // Moving, however slowly (one record every 20 s).
        for s in 0..=90u64 {
            let r = reading(0, 10 + (s / 20) as i64, 1_000);
            assert!(w.look(t0 + Duration::from_secs(s), &[r]).is_empty(), "{s}");
        }
        let mut paused = reading(0, 10, 25);
        paused.paused = true;
        // No recent report of the monitor (a broker that does not answer it).
        let mut unknown = reading(1, 10, 25);
        unknown.offsets = None;
        // At or past the end (a position read after a last stable offset read earlier).
        let at_end = [reading(3, 25, 25), reading(4, 30, 25)];
        let mut w = FetchWatch::new(T);
        let all = [paused, unknown, at_end[0], at_end[1]];
        assert_eq!(first_stall(&mut w, t0, 120, &all), None);
    }

    #[test]
    fn a_wait_starts_again_after_a_pause_a_move_or_the_engines_own_stall() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // Looks once a second over [from, to]: the first second a stall was reported.
        let looks = |w: &mut FetchWatch, from: u64, to: u64, r: Reading| {
            (from..=to).find(|s| !w.look(at(*s), &[r]).is_empty())
        };
        let mut paused = reading(0, 10, 25);
        paused.paused = true;
        let mut w = FetchWatch::new(T);
        assert_eq!(looks(&mut w, 0, 20, reading(0, 10, 25)), None);
        assert_eq!(looks(&mut w, 21, 22, paused), None);
        // Resumed at 23: 30 s from there.
        assert_eq!(looks(&mut w, 23, 100, reading(0, 10, 25)), Some(53));
        // The engine away for 40 s (a long restore): the consumer was not polled meanwhile.
        let mut w = FetchWatch::new(T);
        assert_eq!(looks(&mut w, 0, 20, reading(0, 10, 25)), None);
        assert_eq!(looks(&mut w, 60, 100, reading(0, 10, 25)), Some(90));
        // A gap of 5 s is still the consumer's.
        let mut w = FetchWatch::new(T);
        assert_eq!(looks(&mut w, 0, 20, reading(0, 10, 25)), None);
        assert_eq!(looks(&mut w, 25, 100, reading(0, 10, 25)), Some(30));
        // A position that moved restarts the wait.
        let mut w = FetchWatch::new(T);
        assert_eq!(looks(&mut w, 0, 28, reading(0, 10, 25)), None);
        assert_eq!(looks(&mut w, 29, 100, reading(0, 11, 25)), Some(59));
    }

    #[test]
    fn a_zero_timeout_turns_the_watch_off() {
        let mut w = FetchWatch::new(Duration::ZERO);
        assert_eq!(
            first_stall(&mut w, Instant::now(), 600, &[reading(0, 1, 2)]),
            None
        );
    }

    #[test]
    fn librdkafkas_view_of_a_partition_is_read_from_its_statistics() {
        let stats = br#"{"topics":{"t.intents":{"partitions":{"0":{"fetch_state":"validate-epoch-wait","leader":1,"fetchq_cnt":0,"next_offset":803,"app_offset":803,"ls_offset":2099},"-1":{}}}}}"#;
        assert_eq!(
            librdkafka_view(stats, "t.intents", 0).as_deref(),
            Some(
                "fetch_state=validate-epoch-wait leader=1 fetchq_cnt=0 next_offset=803 \
                 app_offset=803 ls_offset=2099"
            )
        );
        assert_eq!(librdkafka_view(stats, "t.intents", 1), None);
        assert_eq!(librdkafka_view(stats, "other", 0), None);
        assert_eq!(librdkafka_view(b"not json", "t.intents", 0), None);
    }
}
