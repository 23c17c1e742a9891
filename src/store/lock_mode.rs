//! The lock store's mode and trust state machine, and the pure planning steps of a
//! resynchronisation. No I/O, no clock: time is passed in (`now`), so every transition and guard
//! is a unit test (as in `breaker.rs`, which this machine owns). The facade
//! (`lock_store.rs`) performs the I/O, feeds the results in, and logs what the machine reports.
//!
//! # State
//!
//! - **Mode** (`redis` | `postgres`): follows the [`Breaker`]. It opens on failures (mode
//!   `postgres`) and closes only through a failback after a resynchronisation ([`Machine::fail_back`]).
//! - **Sync**: whether Redis was last seen in sync with PostgreSQL (its misses authoritative).
//!   Unknown at start; lookups try Redis and check its epoch key.
//! - **Fallback bookkeeping**: a switch to PostgreSQL (or an outcome that did not reach Redis)
//!   makes a *registration* pending; the facade registers it in PostgreSQL (epoch bump +
//!   watermark row) before any decision is written, then renews the row while in fallback.
//! - **Resynchronisation**: at most one runs (the facade serialises health checks); while it
//!   runs, outcomes are written through even in mode `postgres`, and a write-through that fails
//!   *spoils* it (it must not mark Redis in sync).
//! - **Audits** of failbacks wait in a queue until PostgreSQL takes them.

use std::time::{Duration, Instant};

use crate::store::breaker::{self, Breaker, Transition};

/// Which store serves locks and idempotency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Redis,
    Postgres,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Redis => "redis",
            Mode::Postgres => "postgres",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a failed Redis call means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A call failed or timed out: counted by the breaker.
    Call,
    /// Something PostgreSQL holds did not reach Redis (a write-through, a correction): Redis is
    /// now behind, so the breaker opens at once and the fallback is registered again.
    Write,
}

/// A mode change, with its cause (one log line, the gauge, one audit row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModeChange {
    pub from: Mode,
    pub to: Mode,
    pub cause: String,
}

/// What a failed Redis call changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureEffect {
    /// The breaker opened: mode `postgres`, registration pending.
    FellBack(ModeChange),
    /// An outcome failed to reach Redis while the breaker was already open (a write-through
    /// during a failback's resynchronisation): registration pending again.
    WriteLost,
    /// The half-open probe failed: the breaker opened for another period.
    ProbeFailed,
    /// Counted (below the threshold, or a late result while open).
    Counted { consecutive: u32 },
}

/// A change of the sync observation, for its log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncChange {
    Trusted,
    /// `known`: Redis had been seen in sync before (a warning), or this is the first check.
    Untrusted {
        known: bool,
    },
}

/// Identifies one resynchronisation: it is intact while no write-through failed and the breaker
/// did not trip since it began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncTicket {
    pub id: u64,
    trips: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Resync {
    id: u64,
    spoiled: bool,
}

/// This instance's fallback row in PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fallback {
    /// No row of this instance needs maintaining.
    Clear,
    /// Switched to PostgreSQL (or an outcome did not reach Redis) at `since`; not registered.
    Pending {
        since: Instant,
        audit: Option<ModeChange>,
    },
    /// Registered; the row's liveness was last renewed at `renewed`.
    Registered { renewed: Instant },
}

/// What the fallback bookkeeping needs done in PostgreSQL now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    Nothing,
    /// Bump the epoch and record a watermark `back` before now (the trip time minus the margin
    /// for a batch in flight); write the audit row of the mode change with it, if any.
    Register {
        since: Instant,
        back: Duration,
        audit: Option<ModeChange>,
    },
    /// Renew this instance's row; if it is gone (taken for dead), register again from `back`.
    Renew {
        back: Duration,
    },
}

/// A failback waiting for its audit row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingAudit {
    pub change: ModeChange,
    pub epoch: Option<i64>,
}

/// The machine. Owned by the facade behind a mutex; every method is synchronous and quick.
#[derive(Debug)]
pub struct Machine {
    breaker: Breaker,
    mode: Mode,
    /// The PostgreSQL epoch as last read (only grows).
    pg_epoch: Option<i64>,
    in_sync: Option<bool>,
    resync: Option<Resync>,
    resync_seq: u64,
    fallback: Fallback,
    pending_audit: Vec<PendingAudit>,
    /// How far before a trip outcomes may be missing from Redis (a batch in flight).
    margin: Duration,
    /// How often a registered fallback row is renewed.
    renew_every: Duration,
}

impl Machine {
    /// Starts in mode `redis`, sync unknown.
    pub fn new(breaker: Breaker, margin: Duration, renew_every: Duration) -> Self {
        Self {
            breaker,
            mode: Mode::Redis,
            pg_epoch: None,
            in_sync: None,
            resync: None,
            resync_seq: 0,
            fallback: Fallback::Clear,
            pending_audit: Vec::new(),
            margin,
            renew_every,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Mode `redis` and Redis last seen in sync: its misses mean "never seen".
    pub fn trusts_redis(&self) -> bool {
        self.mode == Mode::Redis && self.in_sync == Some(true)
    }

    pub fn breaker_state(&self) -> breaker::State {
        self.breaker.state()
    }

    /// Whether regular calls (locks, lookups, sync checks) may go to Redis.
    pub fn allows_calls(&self) -> bool {
        self.breaker.allows_calls()
    }

    /// Whether outcomes are written through to Redis: while the breaker is closed, and while a
    /// resynchronisation runs (so that nothing committed during the copy is missed).
    pub fn writes_through(&self) -> bool {
        self.breaker.allows_calls() || self.resync.is_some()
    }

    /// Whether a lookup may try Redis; `Some(generation)` to hand back to
    /// [`Machine::answer_stands`] once Redis answered.
    pub fn lookup_in_redis(&self) -> Option<u64> {
        (self.breaker.allows_calls() && self.in_sync != Some(false)).then(|| self.breaker.trips())
    }

    /// Whether a Redis answer obtained since [`Machine::lookup_in_redis`] returned `generation`
    /// still stands: no trip since (Redis may be behind after one).
    pub fn answer_stands(&self, generation: u64) -> bool {
        self.breaker.trips() == generation && self.breaker.allows_calls()
    }

    // -----------------------------------------------------------------------------------------
    // Epoch and sync

    /// Records a PostgreSQL epoch read; returns the newest known (the epoch never decreases, and
    /// reads may complete out of order).
    pub fn observe_epoch(&mut self, epoch: i64) -> i64 {
        let e = self.pg_epoch.map_or(epoch, |known| known.max(epoch));
        self.pg_epoch = Some(e);
        e
    }

    pub fn cached_epoch(&self) -> Option<i64> {
        self.pg_epoch
    }

    /// Records whether Redis was seen in sync; `Some` when that changed.
    pub fn observe_sync(&mut self, in_sync: bool) -> Option<SyncChange> {
        if self.in_sync == Some(in_sync) {
            return None;
        }
        let before = self.in_sync.replace(in_sync);
        Some(if in_sync {
            SyncChange::Trusted
        } else {
            SyncChange::Untrusted {
                known: before.is_some(),
            }
        })
    }

    // -----------------------------------------------------------------------------------------
    // Redis call results

    pub fn redis_ok(&mut self) {
        if self.breaker.allows_calls() {
            self.breaker.on_success();
        }
    }

    /// A Redis call failed at `now`.
    pub fn redis_failed(&mut self, now: Instant, failure: Failure, cause: &str) -> FailureEffect {
        let write = failure == Failure::Write;
        if write {
            self.spoil_resync();
        }
        let transition = if write {
            self.breaker.trip(now)
        } else {
            self.breaker.on_failure(now)
        };
        match transition {
            Some(Transition::Opened) => {
                let change = ModeChange {
                    from: self.mode,
                    to: Mode::Postgres,
                    cause: cause.to_string(),
                };
                self.mode = Mode::Postgres;
                self.in_sync = Some(false);
                self.spoil_resync();
                self.fallback = Fallback::Pending {
                    since: now,
                    audit: Some(change.clone()),
                };
                FailureEffect::FellBack(change)
            }
            _ if write => {
                // Already open: the epoch must move again, or a resynchronisation that began
                // before this loss could mark Redis in sync without it.
                if !matches!(self.fallback, Fallback::Pending { .. }) {
                    self.fallback = Fallback::Pending {
                        since: now,
                        audit: None,
                    };
                }
                FailureEffect::WriteLost
            }
            Some(Transition::Reopened) => FailureEffect::ProbeFailed,
            _ => FailureEffect::Counted {
                consecutive: self.breaker.consecutive_failures(),
            },
        }
    }

    fn spoil_resync(&mut self) {
        if let Some(r) = &mut self.resync {
            r.spoiled = true;
        }
    }

    // -----------------------------------------------------------------------------------------
    // Probe and failback

    /// Takes the one probe of a half-open breaker (mode `postgres`, open period over).
    pub fn take_probe(&mut self, now: Instant) -> bool {
        self.breaker.try_probe(now)
    }

    /// The probe could not finish (PostgreSQL trouble during the resynchronisation, or the
    /// health check was dropped): the breaker opens for another period.
    pub fn probe_abandoned(&mut self, now: Instant) {
        if self.breaker.state() == breaker::State::HalfOpen {
            self.breaker.on_failure(now);
        }
    }

    /// The probe succeeded and the resynchronisation ended: mode `redis`, trusting Redis if
    /// `in_sync` (otherwise another instance's fallback keeps it untrusted). `None` when a
    /// write-through failed meanwhile and reopened the breaker.
    pub fn fail_back(&mut self, in_sync: bool, cause: String) -> Option<ModeChange> {
        if self.breaker.on_success() != Some(Transition::Closed) {
            return None;
        }
        let change = ModeChange {
            from: self.mode,
            to: Mode::Redis,
            cause,
        };
        self.mode = Mode::Redis;
        self.in_sync = Some(in_sync);
        if in_sync {
            self.fallback = Fallback::Clear;
        }
        self.pending_audit.push(PendingAudit {
            change: change.clone(),
            epoch: self.pg_epoch,
        });
        Some(change)
    }

    pub fn take_audits(&mut self) -> Vec<PendingAudit> {
        std::mem::take(&mut self.pending_audit)
    }

    /// Puts back audits that could not be written, ahead of newer ones.
    pub fn return_audits(&mut self, unwritten: Vec<PendingAudit>) {
        let newer = std::mem::take(&mut self.pending_audit);
        self.pending_audit = unwritten.into_iter().chain(newer).collect();
    }

    // -----------------------------------------------------------------------------------------
    // Resynchronisation

    /// A resynchronisation begins: outcomes are written through until [`Machine::end_resync`].
    pub fn begin_resync(&mut self) -> ResyncTicket {
        self.resync_seq += 1;
        self.resync = Some(Resync {
            id: self.resync_seq,
            spoiled: false,
        });
        ResyncTicket {
            id: self.resync_seq,
            trips: self.breaker.trips(),
        }
    }

    /// Whether the resynchronisation may still mark Redis in sync: it is the one running, no
    /// outcome failed to reach Redis and the breaker did not trip since it began.
    pub fn resync_intact(&self, ticket: ResyncTicket) -> bool {
        self.resync
            == Some(Resync {
                id: ticket.id,
                spoiled: false,
            })
            && self.breaker.trips() == ticket.trips
    }

    pub fn end_resync(&mut self, id: u64) {
        if self.resync.is_some_and(|r| r.id == id) {
            self.resync = None;
        }
    }

    // -----------------------------------------------------------------------------------------
    // Fallback registration

    /// Whether [`Machine::registration`] has something to do at `now`.
    pub fn registration_due(&self, now: Instant) -> bool {
        match self.fallback {
            Fallback::Clear => false,
            Fallback::Pending { .. } => true,
            Fallback::Registered { renewed } => {
                self.mode == Mode::Postgres
                    && now.saturating_duration_since(renewed) >= self.renew_every
            }
        }
    }

    /// What to do in PostgreSQL now.
    pub fn registration(&self, now: Instant) -> Registration {
        match &self.fallback {
            Fallback::Pending { since, audit } => Registration::Register {
                since: *since,
                back: now.saturating_duration_since(*since) + self.margin,
                audit: audit.clone(),
            },
            Fallback::Registered { renewed } if self.registration_due(now) => Registration::Renew {
                back: now.saturating_duration_since(*renewed) + self.margin,
            },
            _ => Registration::Nothing,
        }
    }

    /// The pending registration from `since` was written at `now` with epoch `epoch`. A newer
    /// loss meanwhile stays pending.
    pub fn registered(&mut self, since: Instant, epoch: i64, now: Instant) {
        self.observe_epoch(epoch);
        if matches!(&self.fallback, Fallback::Pending { since: s, .. } if *s == since) {
            self.fallback = Fallback::Registered { renewed: now };
        }
    }

    /// The row was renewed at `at` (or registered again, with `epoch`, after it had expired).
    pub fn renewed(&mut self, at: Instant, epoch: Option<i64>) {
        if let Some(e) = epoch {
            self.observe_epoch(e);
        }
        if matches!(self.fallback, Fallback::Registered { .. }) {
            self.fallback = Fallback::Registered { renewed: at };
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Resynchronisation planning

/// Which `cc_transition` ids a resynchronisation copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// From this id on (up to the newest id read at the start).
    From { id: i64, why: &'static str },
    /// Every outcome younger than the TTL: Redis may have lost anything.
    YoungerThanTtl,
}

/// Chooses the window from the epoch the server that answers holds a whole copy of (`marked`:
/// its epoch key, if written on this server incarnation and no key was evicted since),
/// PostgreSQL's epoch, the lowest watermark of the fallback rows and the newest transition id.
pub fn resync_window(
    marked: Option<i64>,
    epoch: i64,
    lowest_watermark: Option<i64>,
    max_id: i64,
) -> Window {
    match (marked, lowest_watermark) {
        (Some(n), _) if n == epoch => Window::From {
            id: max_id + 1,
            why: "none (already synchronised)",
        },
        (Some(n), Some(since)) if n < epoch => Window::From {
            id: since + 1,
            why: "outcomes since the fallback began",
        },
        // Missing, written by another server incarnation or before keys were evicted, newer
        // than PostgreSQL (a restored database), or behind without a watermark to say since
        // when.
        _ => Window::YoungerThanTtl,
    }
}

/// What became of a batch that was not known committed when a resynchronisation began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchFate {
    /// PostgreSQL now knows it committed: its outcomes belong in Redis.
    Committed,
    /// The partition was restored below it: its rows are gone. (A replayed batch with the same
    /// number is written after the resynchronisation began, and written through after its
    /// commit.)
    RolledBack,
    /// Still the partition's last batch, not known committed.
    Undecided,
}

/// The fate of batch `batch` given the partition's `committed_batch` and `last_batch` now
/// (`None`: the partition's row is gone, which is never expected: undecided).
pub fn batch_fate(batch: u64, now: Option<(u64, u64)>) -> BatchFate {
    match now {
        Some((committed, _)) if committed >= batch => BatchFate::Committed,
        Some((_, last)) if last < batch => BatchFate::RolledBack,
        _ => BatchFate::Undecided,
    }
}

/// What PostgreSQL holds for an intent id whose Redis entry may be wrong (its latest idempotency
/// row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latest {
    /// The row belongs to a batch known committed.
    pub committed: bool,
    /// Seconds it has left to live in Redis (`redis.idempotency_ttl` after it was written).
    pub ttl_left: i64,
}

/// How an entry of Redis is made to agree with PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Correction {
    /// Write the latest outcome, with this TTL (seconds).
    Set { ttl: u64 },
    /// No outcome (or an expired one): the key must not exist.
    Delete,
    /// The latest outcome belongs to a batch not known committed (another partition's batch in
    /// flight): leave the key alone. That batch's commit writes it through; its rollback notes
    /// another correction.
    Leave,
}

pub fn correction(latest: Option<Latest>) -> Correction {
    match latest {
        None => Correction::Delete,
        Some(l) if !l.committed => Correction::Leave,
        Some(l) if l.ttl_left <= 0 => Correction::Delete,
        Some(l) => Correction::Set {
            ttl: l.ttl_left as u64,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN_FOR: Duration = Duration::from_secs(5);
    const MARGIN: Duration = Duration::from_secs(120);
    const RENEW: Duration = Duration::from_secs(12);

    fn machine() -> (Machine, Instant) {
        (
            Machine::new(Breaker::new(3, OPEN_FOR), MARGIN, RENEW),
            Instant::now(),
        )
    }

    /// A machine that fell back at `now` (a failed write-through).
    fn fallen(now: Instant) -> Machine {
        let (mut m, _) = machine();
        assert!(matches!(
            m.redis_failed(now, Failure::Write, "boom"),
            FailureEffect::FellBack(_)
        ));
        m
    }

    #[test]
    fn starts_in_redis_mode_with_sync_unknown_so_lookups_try_redis() {
        let (m, _) = machine();
        assert_eq!(m.mode(), Mode::Redis);
        assert!(!m.trusts_redis());
        assert_eq!(m.lookup_in_redis(), Some(0));
        assert!(m.writes_through());
        assert!(!m.registration_due(Instant::now()));
    }

    #[test]
    fn failed_calls_below_the_threshold_are_only_counted() {
        let (mut m, now) = machine();
        assert_eq!(
            m.redis_failed(now, Failure::Call, "x"),
            FailureEffect::Counted { consecutive: 1 }
        );
        m.redis_ok();
        assert_eq!(
            m.redis_failed(now, Failure::Call, "x"),
            FailureEffect::Counted { consecutive: 1 },
            "a success resets the count"
        );
        assert_eq!(m.mode(), Mode::Redis);
        assert!(!m.registration_due(now));
    }

    #[test]
    fn the_threshold_of_failed_calls_falls_back_and_makes_a_registration_pending() {
        let (mut m, now) = machine();
        m.observe_sync(true);
        m.redis_failed(now, Failure::Call, "a");
        m.redis_failed(now, Failure::Call, "b");
        let effect = m.redis_failed(now, Failure::Call, "c");
        let change = ModeChange {
            from: Mode::Redis,
            to: Mode::Postgres,
            cause: "c".into(),
        };
        assert_eq!(effect, FailureEffect::FellBack(change.clone()));
        assert_eq!(m.mode(), Mode::Postgres);
        assert!(!m.trusts_redis());
        assert_eq!(m.lookup_in_redis(), None);
        assert!(!m.writes_through());
        assert!(m.registration_due(now));
        assert_eq!(
            m.registration(now + Duration::from_secs(2)),
            Registration::Register {
                since: now,
                back: Duration::from_secs(2) + MARGIN,
                audit: Some(change),
            }
        );
    }

    #[test]
    fn one_lost_write_falls_back_at_once() {
        let (mut m, now) = machine();
        assert!(matches!(
            m.redis_failed(now, Failure::Write, "w"),
            FailureEffect::FellBack(ModeChange {
                from: Mode::Redis,
                to: Mode::Postgres,
                ..
            })
        ));
        assert_eq!(m.mode(), Mode::Postgres);
    }

    #[test]
    fn a_lost_write_while_open_makes_a_new_registration_pending_without_an_audit() {
        let now = Instant::now();
        let mut m = fallen(now);
        m.registered(now, 7, now);
        assert!(!m.registration_due(now));
        let later = now + Duration::from_secs(1);
        assert_eq!(
            m.redis_failed(later, Failure::Write, "w"),
            FailureEffect::WriteLost
        );
        assert_eq!(
            m.registration(later),
            Registration::Register {
                since: later,
                back: MARGIN,
                audit: None
            }
        );
    }

    #[test]
    fn a_lost_write_keeps_the_earliest_pending_registration() {
        let now = Instant::now();
        let mut m = fallen(now);
        m.redis_failed(now + Duration::from_secs(3), Failure::Write, "again");
        assert!(matches!(
            m.registration(now + Duration::from_secs(3)),
            Registration::Register { since, .. } if since == now
        ));
    }

    #[test]
    fn failed_calls_while_open_change_nothing() {
        let now = Instant::now();
        let mut m = fallen(now);
        assert_eq!(
            m.redis_failed(now, Failure::Call, "late"),
            FailureEffect::Counted { consecutive: 0 }
        );
        assert_eq!(m.mode(), Mode::Postgres);
    }

    #[test]
    fn a_registration_clears_only_the_loss_it_registered() {
        let now = Instant::now();
        let mut m = fallen(now);
        let newer = now + Duration::from_secs(1);
        // A second loss replaced nothing (the earliest stays), so registering `now` clears it.
        m.registered(now, 5, newer);
        assert!(!m.registration_due(newer));
        assert_eq!(m.cached_epoch(), Some(5));
        // A registration of an older `since` than the pending one leaves it pending.
        m.redis_failed(newer, Failure::Write, "w");
        m.registered(now, 6, newer);
        assert!(m.registration_due(newer));
    }

    #[test]
    fn a_registered_fallback_is_renewed_periodically_only_in_postgres_mode() {
        let now = Instant::now();
        let mut m = fallen(now);
        m.registered(now, 5, now);
        assert_eq!(m.registration(now + RENEW / 2), Registration::Nothing);
        assert!(m.registration_due(now + RENEW));
        assert_eq!(
            m.registration(now + RENEW),
            Registration::Renew {
                back: RENEW + MARGIN
            }
        );
        m.renewed(now + RENEW, None);
        assert!(!m.registration_due(now + RENEW));
        // After a failback that stays out of sync (another instance in fallback), the row is
        // left to expire.
        assert!(m.take_probe(now + OPEN_FOR));
        assert!(m.fail_back(false, "blocked".into()).is_some());
        assert!(!m.registration_due(now + RENEW * 10));
    }

    #[test]
    fn a_renewal_after_expiry_adopts_the_new_epoch() {
        let now = Instant::now();
        let mut m = fallen(now);
        m.registered(now, 5, now);
        m.renewed(now + RENEW, Some(9));
        assert_eq!(m.cached_epoch(), Some(9));
    }

    #[test]
    fn the_epoch_never_goes_back() {
        let (mut m, _) = machine();
        assert_eq!(m.observe_epoch(4), 4);
        assert_eq!(m.observe_epoch(3), 4);
        assert_eq!(m.observe_epoch(6), 6);
    }

    #[test]
    fn sync_changes_are_reported_once() {
        let (mut m, _) = machine();
        assert_eq!(
            m.observe_sync(false),
            Some(SyncChange::Untrusted { known: false })
        );
        assert_eq!(m.observe_sync(false), None);
        assert_eq!(m.lookup_in_redis(), None, "out of sync: PostgreSQL answers");
        assert_eq!(m.observe_sync(true), Some(SyncChange::Trusted));
        assert!(m.trusts_redis());
        assert_eq!(m.observe_sync(true), None);
        assert_eq!(
            m.observe_sync(false),
            Some(SyncChange::Untrusted { known: true })
        );
    }

    #[test]
    fn a_redis_answer_does_not_stand_after_a_trip() {
        let (mut m, now) = machine();
        let generation = m.lookup_in_redis().unwrap();
        assert!(m.answer_stands(generation));
        m.redis_failed(now, Failure::Write, "w");
        assert!(!m.answer_stands(generation));
    }

    #[test]
    fn the_probe_is_handed_out_once_after_the_open_period() {
        let now = Instant::now();
        let mut m = fallen(now);
        assert!(!m.take_probe(now));
        assert!(m.take_probe(now + OPEN_FOR));
        assert!(!m.take_probe(now + OPEN_FOR));
    }

    #[test]
    fn an_abandoned_probe_reopens_the_breaker() {
        let now = Instant::now();
        let mut m = fallen(now);
        assert!(m.take_probe(now + OPEN_FOR));
        m.probe_abandoned(now + OPEN_FOR);
        assert!(!m.take_probe(now + OPEN_FOR + OPEN_FOR / 2));
        assert!(m.take_probe(now + OPEN_FOR * 2));
        // Abandoning when no probe is out changes nothing.
        m.probe_abandoned(now + OPEN_FOR * 2);
        m.probe_abandoned(now + OPEN_FOR * 2);
        assert_eq!(
            m.breaker_state(),
            breaker::State::Open {
                until: now + OPEN_FOR * 3
            }
        );
    }

    #[test]
    fn a_failed_probe_is_reported() {
        let now = Instant::now();
        let mut m = fallen(now);
        assert!(m.take_probe(now + OPEN_FOR));
        assert_eq!(
            m.redis_failed(now + OPEN_FOR, Failure::Call, "probe"),
            FailureEffect::ProbeFailed
        );
        assert_eq!(m.mode(), Mode::Postgres);
    }

    #[test]
    fn a_failback_in_sync_trusts_redis_clears_the_fallback_and_queues_its_audit() {
        let now = Instant::now();
        let mut m = fallen(now);
        m.registered(now, 8, now);
        assert!(m.take_probe(now + OPEN_FOR));
        let change = m.fail_back(true, "healthy".into()).expect("failback");
        assert_eq!((change.from, change.to), (Mode::Postgres, Mode::Redis));
        assert!(m.trusts_redis());
        assert!(!m.registration_due(now + RENEW * 10));
        assert_eq!(
            m.take_audits(),
            vec![PendingAudit {
                change,
                epoch: Some(8)
            }]
        );
        assert!(m.take_audits().is_empty());
    }

    #[test]
    fn a_failback_out_of_sync_uses_postgres_for_lookups() {
        let now = Instant::now();
        let mut m = fallen(now);
        assert!(m.take_probe(now + OPEN_FOR));
        m.fail_back(false, "blocked".into()).expect("failback");
        assert_eq!(m.mode(), Mode::Redis);
        assert!(!m.trusts_redis());
        assert_eq!(m.lookup_in_redis(), None);
    }

    #[test]
    fn no_failback_without_a_probe_or_after_a_trip_during_it() {
        let now = Instant::now();
        let mut m = fallen(now);
        assert_eq!(m.fail_back(true, "x".into()), None, "no probe taken");
        assert!(m.take_probe(now + OPEN_FOR));
        m.redis_failed(now + OPEN_FOR, Failure::Write, "lost");
        assert_eq!(m.fail_back(true, "x".into()), None);
        assert_eq!(m.mode(), Mode::Postgres);
    }

    #[test]
    fn unwritten_audits_go_back_ahead_of_newer_ones() {
        let now = Instant::now();
        let mut m = fallen(now);
        assert!(m.take_probe(now + OPEN_FOR));
        m.fail_back(true, "first".into());
        let first = m.take_audits();
        m.redis_failed(now + OPEN_FOR, Failure::Write, "w");
        assert!(m.take_probe(now + OPEN_FOR * 2));
        m.fail_back(true, "second".into());
        m.return_audits(first);
        let causes: Vec<String> = m
            .take_audits()
            .into_iter()
            .map(|a| a.change.cause)
            .collect();
        assert_eq!(causes, ["first", "second"]);
    }

    #[test]
    fn a_resync_writes_through_even_while_the_breaker_is_open() {
        let now = Instant::now();
        let mut m = fallen(now);
        assert!(!m.writes_through());
        let t = m.begin_resync();
        assert!(m.writes_through());
        assert!(m.resync_intact(t));
        m.end_resync(t.id);
        assert!(!m.writes_through());
        assert!(!m.resync_intact(t), "ended");
    }

    #[test]
    fn a_lost_write_or_a_trip_spoils_the_running_resync() {
        let (mut m, now) = machine();
        let t = m.begin_resync();
        m.redis_failed(now, Failure::Call, "one call");
        assert!(m.resync_intact(t), "a failed call alone does not");
        m.redis_failed(now, Failure::Write, "lost");
        assert!(!m.resync_intact(t));

        let now = Instant::now();
        let mut m = fallen(now);
        assert!(m.take_probe(now + OPEN_FOR));
        let t = m.begin_resync();
        m.redis_failed(now + OPEN_FOR, Failure::Call, "probe's call");
        assert!(!m.resync_intact(t), "the breaker tripped again");
    }

    #[test]
    fn a_new_resync_supersedes_an_older_ticket() {
        let (mut m, _) = machine();
        let old = m.begin_resync();
        let new = m.begin_resync();
        assert!(!m.resync_intact(old));
        assert!(m.resync_intact(new));
        m.end_resync(old.id);
        assert!(
            m.writes_through(),
            "ending an old ticket leaves the new one running"
        );
    }

    // Planning

    #[test]
    fn window_is_empty_when_redis_is_already_synchronised() {
        assert_eq!(
            resync_window(Some(5), 5, Some(10), 99),
            Window::From {
                id: 100,
                why: "none (already synchronised)"
            }
        );
    }

    #[test]
    fn window_starts_after_the_lowest_watermark_when_the_same_server_is_behind() {
        assert_eq!(
            resync_window(Some(4), 5, Some(10), 99),
            Window::From {
                id: 11,
                why: "outcomes since the fallback began"
            }
        );
    }

    #[test]
    fn window_is_the_ttl_when_redis_may_have_lost_anything() {
        for (marked, watermark) in [(None, Some(10)), (Some(4), None), (Some(6), Some(10))] {
            assert_eq!(
                resync_window(marked, 5, watermark, 99),
                Window::YoungerThanTtl,
                "{marked:?} {watermark:?}"
            );
        }
    }

    #[test]
    fn batch_fates() {
        assert_eq!(batch_fate(7, Some((7, 7))), BatchFate::Committed);
        assert_eq!(batch_fate(7, Some((8, 9))), BatchFate::Committed);
        assert_eq!(batch_fate(7, Some((6, 6))), BatchFate::RolledBack);
        assert_eq!(batch_fate(7, Some((6, 7))), BatchFate::Undecided);
        assert_eq!(batch_fate(7, None), BatchFate::Undecided);
    }

    #[test]
    fn corrections_write_the_committed_record_delete_a_missing_one_and_leave_one_in_flight() {
        assert_eq!(correction(None), Correction::Delete);
        let latest = |committed, ttl_left| {
            Some(Latest {
                committed,
                ttl_left,
            })
        };
        assert_eq!(correction(latest(true, 60)), Correction::Set { ttl: 60 });
        assert_eq!(correction(latest(true, 0)), Correction::Delete);
        assert_eq!(correction(latest(false, 60)), Correction::Leave);
    }
}
