//! A pure, synchronous circuit breaker for the Redis fast path.
//!
//! - **Closed**: calls go to Redis. Each failure counts; a success resets the count. After
//!   `failures` consecutive failures the breaker opens.
//! - **Open**: no call goes to Redis until `open_for` has passed.
//! - **HalfOpen**: once `open_for` has passed, exactly one probe is allowed ([`Breaker::try_probe`]
//!   hands it out once). A successful probe closes the breaker; a failed one opens it again for
//!   another `open_for`.
//!
//! Time is passed in (`now`), so every transition is unit-tested without sleeping. The breaker
//! never reads a clock and does no I/O; the lock store (`lock_store.rs`) owns it and reacts to
//! the [`Transition`]s it returns.

use std::time::{Duration, Instant};

/// The breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    /// Open until the instant; then a probe may be taken.
    Open {
        until: Instant,
    },
    /// A probe has been handed out and its result is awaited.
    HalfOpen,
}

/// A change of state worth reacting to (a mode change of the lock store).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Closed -> Open: the failure threshold was reached (or the breaker was tripped).
    Opened,
    /// HalfOpen -> Open: the probe failed.
    Reopened,
    /// HalfOpen -> Closed: the probe succeeded.
    Closed,
}

#[derive(Debug, Clone)]
pub struct Breaker {
    failures_to_open: u32,
    open_for: Duration,
    state: State,
    consecutive_failures: u32,
    /// How many times the breaker went from Closed/HalfOpen to Open (a generation counter:
    /// work started before a trip can tell that one happened since).
    trips: u64,
}

impl Breaker {
    /// `failures_to_open` is at least 1 (0 is treated as 1).
    pub fn new(failures_to_open: u32, open_for: Duration) -> Self {
        Self {
            failures_to_open: failures_to_open.max(1),
            open_for,
            state: State::Closed,
            consecutive_failures: 0,
            trips: 0,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Consecutive failures counted while closed.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// How many times the breaker has opened so far.
    pub fn trips(&self) -> u64 {
        self.trips
    }

    /// Whether a regular call may go to Redis (only while closed: an open breaker sends calls
    /// elsewhere, and while half-open only the probe talks to Redis).
    pub fn allows_calls(&self) -> bool {
        self.state == State::Closed
    }

    /// Whether the open period is over, so [`Breaker::try_probe`] would hand out a probe.
    pub fn probe_due(&self, now: Instant) -> bool {
        matches!(self.state, State::Open { until } if now >= until)
    }

    /// Takes the one probe of a half-open period: true (and the breaker becomes HalfOpen) when
    /// the breaker is open and its open period is over; false otherwise, including while
    /// another probe is in flight.
    pub fn try_probe(&mut self, now: Instant) -> bool {
        if self.probe_due(now) {
            self.state = State::HalfOpen;
            true
        } else {
            false
        }
    }

    /// A call (or the probe) succeeded.
    pub fn on_success(&mut self) -> Option<Transition> {
        match self.state {
            State::Closed => {
                self.consecutive_failures = 0;
                None
            }
            State::HalfOpen => {
                self.state = State::Closed;
                self.consecutive_failures = 0;
                Some(Transition::Closed)
            }
            // A late success of a call issued before the breaker opened changes nothing: the
            // open period is what lets Redis settle.
            State::Open { .. } => None,
        }
    }

    /// A call (or the probe) failed.
    pub fn on_failure(&mut self, now: Instant) -> Option<Transition> {
        match self.state {
            State::Closed => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                if self.consecutive_failures >= self.failures_to_open {
                    self.open(now);
                    Some(Transition::Opened)
                } else {
                    None
                }
            }
            State::HalfOpen => {
                self.open(now);
                Some(Transition::Reopened)
            }
            // Late failures of calls issued before the breaker opened do not extend the open
            // period.
            State::Open { .. } => None,
        }
    }

    /// Opens the breaker at once, whatever the count (a failure that leaves Redis behind the
    /// durable store, e.g. a failed write-through, must stop the fast path immediately).
    pub fn trip(&mut self, now: Instant) -> Option<Transition> {
        match self.state {
            State::Closed => {
                self.open(now);
                Some(Transition::Opened)
            }
            State::HalfOpen => {
                self.open(now);
                Some(Transition::Reopened)
            }
            State::Open { .. } => None,
        }
    }

    fn open(&mut self, now: Instant) {
        self.state = State::Open {
            until: now + self.open_for,
        };
        self.consecutive_failures = 0;
        self.trips += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN_FOR: Duration = Duration::from_secs(5);

    fn breaker() -> (Breaker, Instant) {
        (Breaker::new(3, OPEN_FOR), Instant::now())
    }

    #[test]
    fn starts_closed_and_allows_calls() {
        let (b, now) = breaker();
        assert_eq!(b.state(), State::Closed);
        assert!(b.allows_calls());
        assert!(!b.probe_due(now));
        assert_eq!(b.trips(), 0);
    }

    #[test]
    fn closed_opens_after_threshold_consecutive_failures() {
        let (mut b, now) = breaker();
        assert_eq!(b.on_failure(now), None);
        assert_eq!(b.on_failure(now), None);
        assert_eq!(b.consecutive_failures(), 2);
        assert!(b.allows_calls());
        assert_eq!(b.on_failure(now), Some(Transition::Opened));
        assert_eq!(
            b.state(),
            State::Open {
                until: now + OPEN_FOR
            }
        );
        assert!(!b.allows_calls());
        assert_eq!(b.trips(), 1);
    }

    #[test]
    fn success_resets_the_count_while_closed() {
        let (mut b, now) = breaker();
        b.on_failure(now);
        b.on_failure(now);
        assert_eq!(b.on_success(), None);
        assert_eq!(b.consecutive_failures(), 0);
        // Two more failures are not enough: the count restarted.
        assert_eq!(b.on_failure(now), None);
        assert_eq!(b.on_failure(now), None);
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.on_failure(now), Some(Transition::Opened));
    }

    #[test]
    fn threshold_of_one_opens_on_first_failure_and_zero_means_one() {
        let now = Instant::now();
        let mut b = Breaker::new(1, OPEN_FOR);
        assert_eq!(b.on_failure(now), Some(Transition::Opened));
        let mut b = Breaker::new(0, OPEN_FOR);
        assert_eq!(b.on_failure(now), Some(Transition::Opened));
    }

    #[test]
    fn open_refuses_probes_until_the_period_is_over() {
        let (mut b, now) = breaker();
        b.trip(now);
        assert!(!b.try_probe(now));
        assert!(!b.try_probe(now + OPEN_FOR - Duration::from_millis(1)));
        assert!(matches!(b.state(), State::Open { .. }));
        assert!(b.probe_due(now + OPEN_FOR));
        assert!(b.try_probe(now + OPEN_FOR));
        assert_eq!(b.state(), State::HalfOpen);
        assert!(
            !b.allows_calls(),
            "only the probe talks to Redis while half-open"
        );
    }

    #[test]
    fn half_open_hands_out_exactly_one_probe() {
        let (mut b, now) = breaker();
        b.trip(now);
        let later = now + OPEN_FOR;
        assert!(b.try_probe(later));
        assert!(!b.try_probe(later));
        assert!(!b.try_probe(later + OPEN_FOR * 10));
        assert_eq!(b.state(), State::HalfOpen);
    }

    #[test]
    fn successful_probe_closes() {
        let (mut b, now) = breaker();
        b.trip(now);
        assert!(b.try_probe(now + OPEN_FOR));
        assert_eq!(b.on_success(), Some(Transition::Closed));
        assert_eq!(b.state(), State::Closed);
        assert!(b.allows_calls());
        assert_eq!(b.consecutive_failures(), 0);
        // Closed again: the full threshold applies.
        let t = now + OPEN_FOR;
        assert_eq!(b.on_failure(t), None);
        assert_eq!(b.on_failure(t), None);
        assert_eq!(b.on_failure(t), Some(Transition::Opened));
    }

    #[test]
    fn failed_probe_reopens_for_a_new_period() {
        let (mut b, now) = breaker();
        b.trip(now);
        let t = now + OPEN_FOR;
        assert!(b.try_probe(t));
        assert_eq!(b.on_failure(t), Some(Transition::Reopened));
        assert_eq!(
            b.state(),
            State::Open {
                until: t + OPEN_FOR
            }
        );
        assert!(!b.try_probe(t + OPEN_FOR - Duration::from_millis(1)));
        assert!(b.try_probe(t + OPEN_FOR));
        assert_eq!(b.trips(), 2);
    }

    #[test]
    fn late_results_while_open_change_nothing() {
        let (mut b, now) = breaker();
        b.trip(now);
        let open = b.state();
        assert_eq!(b.on_success(), None);
        assert_eq!(b.on_failure(now + Duration::from_secs(1)), None);
        assert_eq!(b.trip(now + Duration::from_secs(2)), None);
        assert_eq!(
            b.state(),
            open,
            "the open period is neither cut nor extended"
        );
        assert_eq!(b.trips(), 1);
    }

    #[test]
    fn trip_opens_at_once_from_closed_and_from_half_open() {
        let (mut b, now) = breaker();
        b.on_failure(now);
        assert_eq!(b.trip(now), Some(Transition::Opened));
        assert_eq!(
            b.state(),
            State::Open {
                until: now + OPEN_FOR
            }
        );
        let t = now + OPEN_FOR;
        assert!(b.try_probe(t));
        assert_eq!(b.trip(t), Some(Transition::Reopened));
        assert_eq!(
            b.state(),
            State::Open {
                until: t + OPEN_FOR
            }
        );
        assert_eq!(b.trips(), 2);
    }
}
