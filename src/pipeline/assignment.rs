//! The engine's bookkeeping of its assignment: which partitions it was given, which of them
//! have no lane yet (new, or voided after a failure) and must be restored before their next
//! record, whether their consumer position must be rewound first, and why each one is paused.
//! Pure: the engine feeds it the rebalance callbacks and its own failures, and applies what
//! it says to librdkafka.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// The first and the longest wait between two restore attempts of one partition.
const FIRST_RETRY: Duration = Duration::from_secs(1);
pub const MAX_RETRY: Duration = Duration::from_secs(10);

/// Why a partition is paused (the `cause` label of `causal_commit_partitions_paused`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PauseCause {
    /// Newly assigned, not restored from the durable store yet.
    Restoring,
    /// Its in-memory state was voided after a store or broker failure; restored when the
    /// stores answer again.
    Store,
    /// Its committed recovery point does not match the durable store: refused until an
    /// operator resolves it (see docs/exactly-once.md).
    RecoveryPoint,
    /// The sequencer's backlog reached the partition's bound.
    Backpressure,
}

impl PauseCause {
    pub const ALL: [PauseCause; 4] = [
        PauseCause::Restoring,
        PauseCause::Store,
        PauseCause::RecoveryPoint,
        PauseCause::Backpressure,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PauseCause::Restoring => "restoring",
            PauseCause::Store => "store",
            PauseCause::RecoveryPoint => "recovery_point",
            PauseCause::Backpressure => "backpressure",
        }
    }
}

/// An assigned partition without a lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Missing {
    /// Records past the committed offset may have been consumed (and dropped): the consumer
    /// must seek back to the committed offset after the restore.
    rewind: bool,
    cause: PauseCause,
    /// Failed restore attempts since the lane was lost.
    attempts: u32,
    /// No attempt before this.
    retry_at: Option<Instant>,
}

impl Missing {
    fn new(rewind: bool, cause: PauseCause) -> Self {
        Missing {
            rewind,
            cause,
            attempts: 0,
            retry_at: None,
        }
    }
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct Assignment {
    assigned: BTreeSet<i32>,
    missing: BTreeMap<i32, Missing>,
}

impl Assignment {
    /// The rebalance callbacks reported `assigned` (the whole current assignment); with the
    /// eager assignor a revocation revokes everything, so every lane is void. Returns the
    /// partitions whose lanes must be dropped (their leases released).
    pub fn rebalanced(
        &mut self,
        revoked: bool,
        assigned: BTreeSet<i32>,
        lanes: &BTreeSet<i32>,
    ) -> Vec<i32> {
        let dropped: Vec<i32> = if revoked {
            lanes.iter().copied().collect()
        } else {
            lanes.difference(&assigned).copied().collect()
        };
        if revoked {
            self.missing.clear();
        }
        for p in &assigned {
            if revoked || !lanes.contains(p) {
                self.missing
                    .entry(*p)
                    .or_insert(Missing::new(false, PauseCause::Restoring));
            }
        }
        self.missing.retain(|p, _| assigned.contains(p));
        self.assigned = assigned;
        dropped
    }

    /// A lane's in-memory state can no longer be trusted: restore it, and rewind.
    pub fn voided(&mut self, partition: i32, cause: PauseCause) {
        if self.assigned.contains(&partition) {
            let m = self
                .missing
                .entry(partition)
                .or_insert(Missing::new(true, cause));
            m.rewind = true;
            m.cause = cause;
        }
    }

    /// No restore attempt of `partition` before `until` (a failure that repeats backs off).
    pub fn delay(&mut self, partition: i32, until: Instant) {
        if let Some(m) = self.missing.get_mut(&partition) {
            m.retry_at = Some(m.retry_at.map_or(until, |t| t.max(until)));
        }
    }

    /// A record of a partition without a lane was consumed (and dropped): rewind after the
    /// restore so it is read again.
    pub fn consumed_without_lane(&mut self, partition: i32) {
        if let Some(m) = self.missing.get_mut(&partition) {
            m.rewind = true;
        }
    }

    /// A restore failed: the partition stays without a lane, paused for `cause`, and is tried
    /// again after a wait that doubles with each failure, up to [`MAX_RETRY`]. Returns the
    /// number of failed attempts so far.
    pub fn restore_failed(&mut self, partition: i32, cause: PauseCause, now: Instant) -> u32 {
        let Some(m) = self.missing.get_mut(&partition) else {
            return 0;
        };
        m.cause = cause;
        m.attempts = m.attempts.saturating_add(1);
        let wait = FIRST_RETRY
            .saturating_mul(1 << (m.attempts - 1).min(16))
            .min(MAX_RETRY);
        m.retry_at = Some(now + wait);
        m.attempts
    }

    /// The partition has a lane again.
    pub fn restored(&mut self, partition: i32) {
        self.missing.remove(&partition);
    }

    /// Assigned partitions without a lane whose restore is due at `now`, each with whether to
    /// rewind, in partition order.
    pub fn to_restore(&self, now: Instant) -> Vec<(i32, bool)> {
        self.missing
            .iter()
            .filter(|(_, m)| m.retry_at.is_none_or(|t| t <= now))
            .map(|(p, m)| (*p, m.rewind))
            .collect()
    }

    pub fn is_assigned(&self, partition: i32) -> bool {
        self.assigned.contains(&partition)
    }

    pub fn assigned(&self) -> &BTreeSet<i32> {
        &self.assigned
    }

    /// Why an assigned partition without a lane is paused (`None` if it has a lane or is not
    /// assigned).
    pub fn missing_cause(&self, partition: i32) -> Option<PauseCause> {
        self.missing.get(&partition).map(|m| m.cause)
    }

    pub fn has_missing(&self) -> bool {
        !self.missing.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ps: &[i32]) -> BTreeSet<i32> {
        ps.iter().copied().collect()
    }

    #[test]
    fn a_new_assignment_is_restored_without_rewinding() {
        let mut a = Assignment::default();
        let dropped = a.rebalanced(false, set(&[0, 1]), &set(&[]));
        assert!(dropped.is_empty());
        assert_eq!(a.to_restore(Instant::now()), vec![(0, false), (1, false)]);
        assert_eq!(a.missing_cause(0), Some(PauseCause::Restoring));
        a.restored(0);
        assert_eq!(a.to_restore(Instant::now()), vec![(1, false)]);
        assert_eq!(a.missing_cause(0), None);
    }

    #[test]
    fn a_revocation_drops_every_lane_and_restores_the_new_assignment() {
        let mut a = Assignment::default();
        a.rebalanced(false, set(&[0, 1, 2]), &set(&[]));
        for p in [0, 1, 2] {
            a.restored(p);
        }
        let dropped = a.rebalanced(true, set(&[1, 3]), &set(&[0, 1, 2]));
        assert_eq!(dropped, vec![0, 1, 2]);
        assert_eq!(a.to_restore(Instant::now()), vec![(1, false), (3, false)]);
        assert!(!a.is_assigned(0));
    }

    #[test]
    fn an_incremental_assignment_keeps_existing_lanes() {
        let mut a = Assignment::default();
        a.rebalanced(false, set(&[0]), &set(&[]));
        a.restored(0);
        let dropped = a.rebalanced(false, set(&[0, 5]), &set(&[0]));
        assert!(dropped.is_empty());
        assert_eq!(a.to_restore(Instant::now()), vec![(5, false)]);
    }

    #[test]
    fn a_voided_lane_is_restored_with_a_rewind_and_paused_for_its_cause() {
        let mut a = Assignment::default();
        a.rebalanced(false, set(&[0, 1]), &set(&[]));
        a.restored(0);
        a.restored(1);
        a.voided(1, PauseCause::Store);
        assert_eq!(a.to_restore(Instant::now()), vec![(1, true)]);
        assert_eq!(a.missing_cause(1), Some(PauseCause::Store));
        let now = Instant::now();
        assert_eq!(a.restore_failed(1, PauseCause::RecoveryPoint, now), 1);
        assert_eq!(a.missing_cause(1), Some(PauseCause::RecoveryPoint));
        assert!(a.to_restore(now).is_empty(), "not before its retry time");
        assert_eq!(a.to_restore(now + FIRST_RETRY), vec![(1, true)]);
    }

    #[test]
    fn repeated_restore_failures_back_off_to_a_bound() {
        let mut a = Assignment::default();
        a.rebalanced(false, set(&[0]), &set(&[]));
        let now = Instant::now();
        let mut waits = Vec::new();
        for attempt in 1..=8 {
            assert_eq!(a.restore_failed(0, PauseCause::Store, now), attempt);
            let due = (1..=120)
                .map(|s| now + Duration::from_secs(s))
                .find(|t| !a.to_restore(*t).is_empty())
                .unwrap();
            waits.push(due - now);
        }
        assert_eq!(waits[0], Duration::from_secs(1));
        assert_eq!(waits[1], Duration::from_secs(2));
        assert_eq!(*waits.last().unwrap(), MAX_RETRY);
        // A new loss of the lane starts over.
        a.restored(0);
        a.voided(0, PauseCause::Store);
        assert_eq!(a.to_restore(now), vec![(0, true)]);
    }

    #[test]
    fn a_delayed_partition_waits_for_its_time() {
        let mut a = Assignment::default();
        a.rebalanced(false, set(&[0, 1]), &set(&[]));
        let now = Instant::now();
        a.delay(1, now + Duration::from_secs(30));
        assert_eq!(a.to_restore(now), vec![(0, false)]);
        assert_eq!(
            a.to_restore(now + Duration::from_secs(30)),
            vec![(0, false), (1, false)]
        );
    }

    #[test]
    fn voiding_an_unassigned_partition_does_nothing() {
        let mut a = Assignment::default();
        a.rebalanced(false, set(&[0]), &set(&[]));
        a.voided(7, PauseCause::Store);
        assert_eq!(a.to_restore(Instant::now()), vec![(0, false)]);
    }

    #[test]
    fn a_record_consumed_before_the_restore_forces_a_rewind() {
        let mut a = Assignment::default();
        a.rebalanced(false, set(&[2]), &set(&[]));
        a.consumed_without_lane(2);
        a.consumed_without_lane(9);
        assert_eq!(a.to_restore(Instant::now()), vec![(2, true)]);
    }

    #[test]
    fn revoked_partitions_leave_the_restore_list() {
        let mut a = Assignment::default();
        a.rebalanced(false, set(&[0, 1]), &set(&[]));
        a.rebalanced(true, set(&[1]), &set(&[]));
        assert_eq!(a.to_restore(Instant::now()), vec![(1, false)]);
        assert!(a.has_missing());
        a.restored(1);
        assert!(!a.has_missing());
    }
}
