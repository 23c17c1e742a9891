//! One assigned input partition's lane: its sequencer, its fencing token, its recovery point
//! (the last batch committed in Kafka, and the offset after it) and its consumed-time clock.

use std::time::{Duration, Instant};

use crate::sequencer::{Millis, Sequencer};
use crate::store::snapshot::{Held, WaitingRows};

/// The state of one assigned partition.
pub struct Lane {
    pub partition: i32,
    /// Fencing token of this writer for this partition.
    pub fence: u64,
    /// The last batch known committed (the recovery point).
    pub batch_no: u64,
    /// The last batch PostgreSQL is known to record as committed (`cc_partition.committed_batch`):
    /// behind `batch_no` from a commit until the engine's record of it, or the partition's next
    /// write, reaches PostgreSQL.
    pub marked: u64,
    /// When `batch_no` committed (or the lane was restored).
    pub committed_at: Instant,
    /// One past the last record consumed and committed (-1: nothing ever committed).
    pub next_offset: i64,
    pub seq: Sequencer<Held>,
    /// Which of the sequencer's waiting intents have their `cc_waiting` row.
    pub rows: WaitingRows,
    /// The sequencer's backlog is at the partition's bound.
    pub backpressure: bool,
    /// What librdkafka was last told: the partition is paused.
    pub paused: bool,
    /// The next time a partition paused at its bound is read again.
    pub probe_at: Instant,
    /// A probe of a partition paused at its bound is under way until then.
    pub probing_until: Option<Instant>,
    /// The consumer reached the partition's end and has read nothing since: caught up.
    pub at_end: bool,
    /// The consumer's position when it last reached the end: past the last record and any
    /// transaction markers after it (records forwarded to this partition are transactional).
    pub end_offset: i64,
    /// Whether, when it last reached the end, the partition's log went on past it.
    pub held_back: HeldBack,
    /// The time the sequencer sees.
    pub clock: LaneClock,
}

/// How long a partition is held back before it is logged: a producer's transaction commits
/// within a batch or so (the processor's own forwards are transactional too); one left open
/// (a producer that crashed or hangs) lasts up to its `transaction.timeout.ms`.
pub const HELD_BACK_LOGGED_AFTER: Duration = Duration::from_secs(5);

/// Records of a producer's transaction still open, and whatever follows them, are in the
/// partition's log but a `read_committed` consumer cannot read them yet: the end it reaches is
/// the last stable offset, not the log's end. Such a partition is not caught up, for the clock.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HeldBack {
    /// Since when, while held back.
    since: Option<Instant>,
    /// The hold was logged (it lasted [`HELD_BACK_LOGGED_AFTER`]).
    logged: bool,
}

impl HeldBack {
    pub fn is_held(&self) -> bool {
        self.since.is_some()
    }

    /// The consumer reached the end: whether the log goes on past it. `true` when this ends a
    /// hold that was logged (so its end is logged too).
    pub fn observe(&mut self, held: bool, now: Instant) -> bool {
        match (held, self.since) {
            (true, None) => {
                self.since = Some(now);
                false
            }
            (true, Some(_)) => false,
            (false, _) => {
                self.since = None;
                std::mem::take(&mut self.logged)
            }
        }
    }

    /// How long it has been held back, once, when that reaches [`HELD_BACK_LOGGED_AFTER`]
    /// and was not logged yet.
    pub fn due(&mut self, now: Instant) -> Option<Duration> {
        let held = now.duration_since(self.since?);
        (!self.logged && held >= HELD_BACK_LOGGED_AFTER).then(|| {
            self.logged = true;
            held
        })
    }
}

/// A partition's consumed-time clock: the time the sequencer sees, so that a contact times out
/// only for time during which its partition was being consumed and caught up (contract R7).
///
/// It advances with the wall clock between two ticks only when the engine says the partition
/// was *counted* over that interval: it had a lane (restored), it was not paused, and it
/// reached the end of the partition (librdkafka's partition-EOF) during the interval, with no
/// record held back behind a producer's open transaction. Time while the processor is stopped,
/// restoring, stalled on a store or the broker, paused, lagging behind the partition's end,
/// or held at an open transaction does not count. One tick credits at most `max_credit`:
/// a tick that comes late (the engine's thread was blocked) is a stall, not consumed time.
///
/// The clock is persisted with every batch (the recovery point's `t`) and restored from it,
/// so a restart continues where the last commit left it. A partition that never committed
/// starts at the wall-clock time, so its values read as timestamps minus the time not counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneClock {
    now: u64,
    /// Wall-clock time of the last tick.
    last_tick: Option<u64>,
    max_credit: u64,
}

impl LaneClock {
    /// A clock at `ms`, crediting at most `max_credit_ms` per tick.
    pub fn starting_at(ms: u64, max_credit_ms: u64) -> Self {
        LaneClock {
            now: ms,
            last_tick: None,
            max_credit: max_credit_ms,
        }
    }

    /// The wall clock reads `wall_ms`; `counted` says whether the partition was consumed and
    /// caught up since the previous tick.
    pub fn tick(&mut self, wall_ms: u64, counted: bool) {
        if let (true, Some(last)) = (counted, self.last_tick) {
            self.now += wall_ms.saturating_sub(last).min(self.max_credit);
        }
        self.last_tick = Some(wall_ms);
    }

    pub fn now(&self) -> Millis {
        Millis(self.now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_is_logged_once_when_it_lasts_and_its_end_only_then() {
        let t0 = Instant::now();
        let mut h = HeldBack::default();
        assert!(!h.observe(true, t0));
        assert!(h.is_held());
        assert_eq!(
            h.due(t0 + Duration::from_secs(1)),
            None,
            "a short hold is not logged"
        );
        assert!(
            !h.observe(true, t0 + Duration::from_secs(2)),
            "still held: same start"
        );
        let at = t0 + HELD_BACK_LOGGED_AFTER;
        assert_eq!(h.due(at), Some(HELD_BACK_LOGGED_AFTER), "held since t0");
        assert_eq!(h.due(at + Duration::from_secs(9)), None, "logged once");
        assert!(h.observe(false, at), "the end of a logged hold is logged");
        assert!(!h.is_held());
        // A short hold: neither logged nor its end.
        assert!(!h.observe(true, at));
        assert_eq!(h.due(at + Duration::from_secs(1)), None);
        assert!(!h.observe(false, at + Duration::from_secs(2)));
    }

    #[test]
    fn counted_intervals_advance_the_clock_with_the_wall_clock() {
        let mut c = LaneClock::starting_at(1_000, 1_000);
        c.tick(50_000, true);
        assert_eq!(
            c.now(),
            Millis(1_000),
            "the first tick only sets the reference"
        );
        c.tick(50_200, true);
        c.tick(50_500, true);
        assert_eq!(c.now(), Millis(1_500));
    }

    #[test]
    fn intervals_not_counted_leave_the_clock_where_it_was() {
        let mut c = LaneClock::starting_at(0, 1_000);
        c.tick(10_000, true);
        c.tick(10_300, false); // paused, restoring or lagging
        c.tick(10_400, true);
        assert_eq!(c.now(), Millis(100));
    }

    #[test]
    fn a_late_tick_is_a_stall_and_credits_at_most_the_bound() {
        let mut c = LaneClock::starting_at(0, 1_000);
        c.tick(0, true);
        c.tick(12_000, true); // the engine was blocked for 12 s
        assert_eq!(c.now(), Millis(1_000));
    }

    #[test]
    fn a_wall_clock_going_back_credits_nothing() {
        let mut c = LaneClock::starting_at(5, 1_000);
        c.tick(10_000, true);
        c.tick(9_000, true);
        assert_eq!(c.now(), Millis(5));
        c.tick(9_100, true);
        assert_eq!(c.now(), Millis(105));
    }
}
