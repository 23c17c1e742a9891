//! When a batch being polled closes: the one rule the engine and the passthrough share.
//!
//! A batch closes when it is full (`batch.max_records`), when its first record has waited
//! `batch.max_linger`, or, with no record yet, when the linger since polling began is over (the
//! engine's tick). Records that trickle in are worth lingering for; records already waiting when
//! polling began (they queued up while the previous batch was processed) are not: such a batch
//! is *behind*, takes what the client holds and closes at the first poll that finds nothing
//! ready (it polls without waiting). Lingering would only add to their wait, and under a steady
//! flow it would make every batch wait out the whole linger: new records keep arriving, so the
//! client's queue is never empty for long, and the cycle the next records wait for grows by the
//! linger.
//!
//! Pure: every method takes the time, so the rule is tested without a clock.

use std::time::{Duration, Instant};

/// A batch's first record polled this soon after polling began was waiting already: the batch
/// is behind and does not linger. librdkafka does not expose its queue's length on a consumer,
/// so how soon the first record comes is the sign.
pub const WAITING_ALREADY: Duration = Duration::from_millis(2);
/// The shortest poll of a batch that waits for records: a zero timeout would spin. (A batch
/// behind polls with a zero timeout: it closes at the first poll that finds nothing.)
const MIN_POLL: Duration = Duration::from_millis(1);

/// The state of one batch being polled.
#[derive(Debug, Clone, Copy)]
pub struct BatchClock {
    linger: Duration,
    max_records: usize,
    polling_since: Instant,
    /// When the first record came.
    started: Option<Instant>,
    behind: bool,
}

impl BatchClock {
    /// A batch starts polling at `now`.
    pub fn new(linger: Duration, max_records: usize, now: Instant) -> Self {
        BatchClock {
            linger,
            max_records,
            polling_since: now,
            started: None,
            behind: false,
        }
    }

    /// How long the next poll may wait.
    pub fn poll_timeout(&self, now: Instant) -> Duration {
        let t = match self.started {
            Some(_) if self.behind => return Duration::ZERO,
            None => (self.polling_since + self.linger).saturating_duration_since(now),
            Some(t) => self.linger.saturating_sub(now.saturating_duration_since(t)),
        };
        t.max(MIN_POLL)
    }

    /// A record was polled at `now`.
    pub fn record(&mut self, now: Instant) {
        if self.started.is_none() {
            self.behind = now.saturating_duration_since(self.polling_since) < WAITING_ALREADY;
            self.started = Some(now);
        }
    }

    /// Whether the batch, holding `records` after a poll that returned nothing at all
    /// (`polled_nothing`: the poll timed out, or found nothing ready), closes at `now`.
    pub fn closes(&self, now: Instant, records: usize, polled_nothing: bool) -> bool {
        let drained = self.behind && polled_nothing;
        let full = records >= self.max_records;
        let old = match self.started {
            Some(t) => now.saturating_duration_since(t) >= self.linger,
            None => now >= self.polling_since + self.linger,
        };
        full || old || drained
    }
}

/// How many records a batch may hold now: `batch.max_records`, or fewer while PostgreSQL is
/// too slow for a full batch.
///
/// A durable write (or a fallback lookup) that `postgres.statement_timeout` cancelled would be
/// cancelled again on the same batch replayed: a store slowed down (a throttled disk, a busy
/// neighbour) would stall the partitions until it recovers, although smaller batches pass.
/// So each cancellation halves the batch that was cancelled, down to one record, and a write
/// of a full batch at the limit that took at most a quarter of the timeout doubles the limit
/// again (the doubled batch is expected to take half the timeout at most), up to
/// `batch.max_records`. Pure: the engine says what happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimit {
    max: usize,
    now: usize,
}

impl BatchLimit {
    pub fn new(max_records: usize) -> Self {
        BatchLimit {
            max: max_records,
            now: max_records,
        }
    }

    /// The records a batch may hold now.
    pub fn records(&self) -> usize {
        self.now
    }

    /// Whether batches are cut below `batch.max_records`.
    pub fn is_cut(&self) -> bool {
        self.now < self.max
    }

    /// The statement timeout cancelled a step of a batch of `records`: the limit becomes half
    /// of that batch (or of the limit, if smaller). Returns the new limit.
    pub fn cancelled(&mut self, records: usize) -> usize {
        self.now = (records.min(self.now) / 2).max(1);
        self.now
    }

    /// A batch of `records` was written in `took`; `timeout` is the statement timeout. Returns
    /// the new limit when it grew.
    pub fn written(&mut self, records: usize, took: Duration, timeout: Duration) -> Option<usize> {
        if !self.is_cut() || records < self.now || took.saturating_mul(4) > timeout {
            return None;
        }
        self.now = self.now.saturating_mul(2).min(self.max);
        Some(self.now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINGER: Duration = Duration::from_millis(100);
    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn an_empty_batch_waits_out_the_linger_then_closes() {
        let t0 = Instant::now();
        let c = BatchClock::new(LINGER, 10, t0);
        assert_eq!(c.poll_timeout(t0), LINGER);
        assert_eq!(c.poll_timeout(t0 + 40 * MS), 60 * MS);
        assert!(!c.closes(t0 + 99 * MS, 0, true));
        assert!(c.closes(t0 + LINGER, 0, true));
        assert_eq!(
            c.poll_timeout(t0 + 2 * LINGER),
            MIN_POLL,
            "never a zero poll"
        );
    }

    #[test]
    fn trickling_records_linger_from_the_first_one() {
        let t0 = Instant::now();
        let mut c = BatchClock::new(LINGER, 10, t0);
        c.record(t0 + 30 * MS);
        assert_eq!(c.poll_timeout(t0 + 30 * MS), LINGER);
        // A poll that timed out does not close a batch that is not behind.
        assert!(!c.closes(t0 + 50 * MS, 1, true));
        c.record(t0 + 60 * MS);
        assert_eq!(
            c.poll_timeout(t0 + 60 * MS),
            70 * MS,
            "the first record sets the age"
        );
        assert!(!c.closes(t0 + 129 * MS, 2, false));
        assert!(c.closes(t0 + 130 * MS, 2, false));
    }

    #[test]
    fn a_batch_whose_records_were_waiting_closes_once_drained() {
        let t0 = Instant::now();
        let mut c = BatchClock::new(LINGER, 10, t0);
        c.record(t0 + MS);
        assert_eq!(
            c.poll_timeout(t0 + MS),
            Duration::ZERO,
            "behind: never waits"
        );
        c.record(t0 + 2 * MS);
        assert!(!c.closes(t0 + 2 * MS, 2, false), "records still coming");
        assert!(
            c.closes(t0 + 2 * MS, 2, true),
            "the first poll that finds nothing closes it"
        );
    }

    #[test]
    fn a_batch_behind_under_a_steady_flow_does_not_wait_out_the_linger() {
        // Records keep coming (a fetch every few ms): each poll finds one until the client's
        // queue is empty for a moment, and that moment closes the batch, long before the linger.
        let t0 = Instant::now();
        let mut c = BatchClock::new(LINGER, 100_000, t0);
        let mut now = t0;
        for i in 0..500u32 {
            now = t0 + Duration::from_micros(u64::from(i) * 20);
            c.record(now);
            assert!(!c.closes(now, i as usize + 1, false));
            assert_eq!(c.poll_timeout(now), Duration::ZERO);
        }
        assert!(c.closes(now + MS, 500, true), "closed 11 ms in, not 100");
    }

    #[test]
    fn a_first_record_at_the_threshold_is_not_behind() {
        let t0 = Instant::now();
        let mut c = BatchClock::new(LINGER, 10, t0);
        c.record(t0 + WAITING_ALREADY);
        assert!(!c.closes(t0 + 20 * MS, 1, true));
        assert_eq!(c.poll_timeout(t0 + WAITING_ALREADY), LINGER);
    }

    #[test]
    fn a_full_batch_closes_at_once() {
        let t0 = Instant::now();
        let mut c = BatchClock::new(LINGER, 3, t0);
        c.record(t0 + 50 * MS);
        assert!(!c.closes(t0 + 50 * MS, 2, false));
        assert!(c.closes(t0 + 50 * MS, 3, false));
    }

    const TIMEOUT: Duration = Duration::from_secs(10);

    #[test]
    fn a_cancelled_batch_is_halved_down_to_one_record() {
        let mut l = BatchLimit::new(20_000);
        assert!(!l.is_cut());
        assert_eq!(l.cancelled(20_000), 10_000);
        // A smaller batch than the limit (it closed on its linger) halves from its own size.
        assert_eq!(l.cancelled(3_000), 1_500);
        assert!(l.is_cut());
        for _ in 0..20 {
            l.cancelled(l.records());
        }
        assert_eq!(l.records(), 1, "never below one record");
    }

    #[test]
    fn only_a_full_batch_written_well_within_the_timeout_grows_the_limit_back() {
        let mut l = BatchLimit::new(20_000);
        assert_eq!(
            l.written(20_000, MS, TIMEOUT),
            None,
            "not cut: nothing to grow"
        );
        l.cancelled(20_000);
        l.cancelled(10_000);
        assert_eq!(l.records(), 5_000);
        assert_eq!(
            l.written(4_999, MS, TIMEOUT),
            None,
            "a batch below the limit says nothing about a full one"
        );
        assert_eq!(
            l.written(5_000, TIMEOUT / 4 + MS, TIMEOUT),
            None,
            "doubled, it would take over half the timeout"
        );
        assert_eq!(l.written(5_000, TIMEOUT / 4, TIMEOUT), Some(10_000));
        assert_eq!(l.written(10_000, MS, TIMEOUT), Some(20_000));
        assert!(!l.is_cut());
        // An odd maximum is reached, not overshot.
        let mut odd = BatchLimit::new(3);
        odd.cancelled(3);
        assert_eq!(odd.written(1, MS, TIMEOUT), Some(2));
        assert_eq!(odd.written(2, MS, TIMEOUT), Some(3));
    }
}
