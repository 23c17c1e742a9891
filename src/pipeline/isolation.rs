//! Poison records: isolating the record that makes a partition's durable write (or its Kafka
//! transaction) fail deterministically, so it goes to manual review as `UNPROCESSABLE` and its
//! partition keeps flowing — without foreseeing which values a store refuses.
//!
//! When a batch fails for its data, the engine finds the partitions that cause it (their other
//! partitions commit). Such a partition is then replayed **one record per batch** up to the end
//! of the failed batch: the record whose write fails on its own is *quarantined* and, on the
//! next replay, translated as `UNPROCESSABLE` instead of being sequenced.
//!
//! An operator command (a re-submitted record, a release) can make the write fail as well as a
//! record can. A failed part that applied commands makes them *suspects*: the partition then
//! takes none of its records, and applies one suspect per batch, alone; a command whose batch
//! fails alone is *refused* (with the store's error) the next time it is applied, never retried
//! with records, so it can neither stall its partition nor get an innocent record quarantined.
//!
//! Wait timeouts have no offset to blame, and the store may refuse what they write (their audit
//! rows, the contact's hold). A failed part that fired wait timeouts blames nothing else first:
//! its partition's timeouts are *held* (its clock stops, as in a store's outage: R7 counts no
//! time then) and the part is written again without them; the hold ends after a backoff from
//! 1 s, doubling to [`MAX_BACKOFF`] while the timeouts keep failing, and a batch that commits
//! fired timeouts ends it. So a refused timeout never gets the record or command beside it
//! quarantined or refused, and the partition's records keep flowing meanwhile.
//! A failure with nothing at all to blame backs off, with a bound.
//! Pure bookkeeping: the engine feeds it failures and positions, time passed in.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// Longest pause between two attempts of a partition whose failure has no record to blame.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// One partition's isolation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Partition {
    /// One past the last record of the failed batch: below it, one record per batch.
    until: i64,
    /// Records that fail on their own, by offset, with the store's error.
    quarantined: BTreeMap<i64, String>,
    /// Commands of a failed part, each to be applied alone before any record of the partition.
    suspects: BTreeSet<i64>,
    /// Commands whose batch failed with them alone, by id, with the store's error.
    refused: BTreeMap<i64, String>,
    /// Consecutive failures with no record to blame.
    blameless: u32,
}

/// A partition whose wait timeouts the store refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TimeoutHold {
    /// Consecutive failures of parts that fired timeouts.
    refused: u32,
    /// No timeout fires (the partition's clock stops) before this.
    until: Instant,
}

/// The pause after `attempt` consecutive failures: 1 s, doubling to [`MAX_BACKOFF`].
fn backoff(attempt: u32) -> Duration {
    let factor = 1u32 << attempt.saturating_sub(1).min(16);
    FIRST_BACKOFF.saturating_mul(factor).min(MAX_BACKOFF)
}

/// What the engine does with a failed partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Replay the partition one record per batch up to `until`.
    Isolate { until: i64 },
    /// The record at `offset` failed alone: it is quarantined.
    Quarantine { offset: i64 },
    /// The part applied commands: each is applied alone next, before any record.
    CommandsFirst { commands: Vec<i64> },
    /// The command `id` failed alone: it is refused next time.
    RefuseCommand { id: i64 },
    /// The part fired wait timeouts: it is written again without them, and the partition's
    /// clock stops (no timeout fires) until `retry_at`.
    HoldTimeouts { retry_at: Instant, attempt: u32 },
    /// Nothing to blame: retry the partition no earlier than `retry_at`.
    BackOff { retry_at: Instant, attempt: u32 },
}

/// A failed partition's part of a batch, as [`Isolation::failed`] weighs it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Part<'a> {
    /// The input records of the part, in order.
    pub offsets: &'a [i64],
    /// One past the last of them.
    pub next_offset: i64,
    /// The ids of the operator commands it applied.
    pub commands: &'a [i64],
    /// Whether it fired wait timeouts.
    pub timeouts: bool,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct Isolation {
    partitions: BTreeMap<i32, Partition>,
    timeouts: BTreeMap<i32, TimeoutHold>,
}

impl Isolation {
    /// A partition's part of a batch failed for its data. `offsets` are the input records of
    /// that part (in order), `next_offset` one past the last of them, `commands` the ids of the
    /// operator commands it applied, `timeouts` whether it fired wait timeouts.
    pub fn failed(&mut self, partition: i32, part: Part<'_>, error: &str, now: Instant) -> Verdict {
        let Part {
            offsets,
            next_offset,
            commands,
            timeouts,
        } = part;
        if timeouts {
            let hold = self.timeouts.entry(partition).or_insert(TimeoutHold {
                refused: 0,
                until: now,
            });
            hold.refused = hold.refused.saturating_add(1);
            hold.until = now + backoff(hold.refused);
            return Verdict::HoldTimeouts {
                retry_at: hold.until,
                attempt: hold.refused,
            };
        }
        let p = self.partitions.entry(partition).or_default();
        match (commands, offsets) {
            ([], _) => {}
            ([id], []) => {
                p.suspects.remove(id);
                p.refused.insert(*id, error.to_owned());
                p.blameless = 0;
                return Verdict::RefuseCommand { id: *id };
            }
            (ids, _) => {
                p.suspects.extend(ids);
                p.blameless = 0;
                return Verdict::CommandsFirst {
                    commands: ids.to_vec(),
                };
            }
        }
        match offsets {
            [offset] => {
                p.quarantined.insert(*offset, error.to_owned());
                p.blameless = 0;
                Verdict::Quarantine { offset: *offset }
            }
            [] => {
                p.blameless = p.blameless.saturating_add(1);
                Verdict::BackOff {
                    retry_at: now + backoff(p.blameless),
                    attempt: p.blameless,
                }
            }
            _ => {
                p.until = p.until.max(next_offset);
                p.blameless = 0;
                Verdict::Isolate { until: p.until }
            }
        }
    }

    /// Whether the partition's wait timeouts are held at `now`: its clock does not count.
    pub fn timeouts_held(&self, partition: i32, now: Instant) -> bool {
        self.timeouts.get(&partition).is_some_and(|h| now < h.until)
    }

    /// A batch that fired the partition's wait timeouts committed: the store takes them again.
    /// Returns true when that ends a hold of its timeouts.
    pub fn timeouts_committed(&mut self, partition: i32) -> bool {
        self.timeouts.remove(&partition).is_some()
    }

    /// Whether the partition's record at `offset` must be the only one of its partition in a
    /// batch.
    pub fn one_at_a_time(&self, partition: i32, offset: i64) -> bool {
        self.partitions
            .get(&partition)
            .is_some_and(|p| offset < p.until)
    }

    /// Whether the partition's records wait for its suspect commands to be tried alone.
    pub fn commands_first(&self, partition: i32) -> bool {
        self.partitions
            .get(&partition)
            .is_some_and(|p| !p.suspects.is_empty())
    }

    /// Which of the partition's pending commands (ids, ascending) a batch applies: all of them,
    /// or, while it has suspects, the first suspect alone.
    pub fn commands_to_apply(&self, partition: i32, pending: &[i64]) -> Vec<i64> {
        match self.partitions.get(&partition).map(|p| &p.suspects) {
            Some(suspects) if !suspects.is_empty() => pending
                .iter()
                .copied()
                .filter(|id| suspects.contains(id))
                .take(1)
                .collect(),
            _ => pending.to_vec(),
        }
    }

    /// The partition's pending commands are `pending` (ids): suspects and refusals of commands
    /// no longer pending (cancelled, or settled elsewhere) are forgotten.
    pub fn pending_commands(&mut self, partition: i32, pending: &[i64]) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            p.suspects.retain(|id| pending.contains(id));
            p.refused.retain(|id, _| pending.contains(id));
        }
    }

    /// The store's error for a command refused after its batch failed with it alone.
    pub fn refused_command(&self, partition: i32, id: i64) -> Option<&str> {
        self.partitions
            .get(&partition)
            .and_then(|p| p.refused.get(&id))
            .map(String::as_str)
    }

    /// The store's error for a quarantined record.
    pub fn quarantined(&self, partition: i32, offset: i64) -> Option<&str> {
        self.partitions
            .get(&partition)
            .and_then(|p| p.quarantined.get(&offset))
            .map(String::as_str)
    }

    /// The partition committed up to `next_offset`, with the commands `commands`: what lies
    /// before it is resolved. Returns true when the partition's isolation just ended.
    pub fn committed(&mut self, partition: i32, next_offset: i64, commands: &[i64]) -> bool {
        let Some(p) = self.partitions.get_mut(&partition) else {
            return false;
        };
        p.blameless = 0;
        p.quarantined.retain(|offset, _| *offset >= next_offset);
        p.suspects.retain(|id| !commands.contains(id));
        p.refused.retain(|id, _| !commands.contains(id));
        if next_offset >= p.until
            && p.quarantined.is_empty()
            && p.suspects.is_empty()
            && p.refused.is_empty()
        {
            self.partitions.remove(&partition);
            return true;
        }
        false
    }

    /// The partition was revoked: another owner starts afresh.
    pub fn forget(&mut self, partition: i32) {
        self.partitions.remove(&partition);
        self.timeouts.remove(&partition);
    }

    pub fn is_isolating(&self, partition: i32) -> bool {
        self.partitions.contains_key(&partition)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part<'a>(offsets: &'a [i64], next_offset: i64, commands: &'a [i64]) -> Part<'a> {
        Part {
            offsets,
            next_offset,
            commands,
            timeouts: false,
        }
    }

    /// `part`, having fired wait timeouts too.
    fn firing(part: Part<'_>) -> Part<'_> {
        Part {
            timeouts: true,
            ..part
        }
    }

    #[test]
    fn a_failed_batch_of_many_records_is_replayed_one_at_a_time_up_to_its_end() {
        let mut iso = Isolation::default();
        let v = iso.failed(2, part(&[10, 11, 12], 13, &[]), "boom", Instant::now());
        assert_eq!(v, Verdict::Isolate { until: 13 });
        assert!(iso.one_at_a_time(2, 10) && iso.one_at_a_time(2, 12));
        assert!(!iso.one_at_a_time(2, 13));
        assert!(!iso.one_at_a_time(3, 10), "other partitions are untouched");
    }

    #[test]
    fn a_record_that_fails_alone_is_quarantined_with_its_error() {
        let mut iso = Isolation::default();
        iso.failed(2, part(&[10, 11, 12], 13, &[]), "boom", Instant::now());
        let v = iso.failed(2, part(&[11], 12, &[]), "value too long", Instant::now());
        assert_eq!(v, Verdict::Quarantine { offset: 11 });
        assert_eq!(iso.quarantined(2, 11), Some("value too long"));
        assert_eq!(iso.quarantined(2, 10), None);
    }

    #[test]
    fn isolation_ends_once_the_failed_batch_and_its_quarantined_records_are_committed() {
        let mut iso = Isolation::default();
        iso.failed(2, part(&[10, 11, 12], 13, &[]), "boom", Instant::now());
        iso.failed(2, part(&[11], 12, &[]), "bad", Instant::now());
        assert!(!iso.committed(2, 11, &[]));
        assert!(iso.quarantined(2, 11).is_some());
        assert!(
            !iso.committed(2, 12, &[]),
            "still below the failed batch's end"
        );
        assert!(
            iso.quarantined(2, 11).is_none(),
            "committed as UNPROCESSABLE"
        );
        assert!(iso.committed(2, 13, &[]));
        assert!(!iso.is_isolating(2));
        assert!(!iso.committed(2, 14, &[]), "nothing left to end");
    }

    #[test]
    fn failures_with_nothing_to_blame_back_off_exponentially_to_a_bound() {
        let mut iso = Isolation::default();
        let now = Instant::now();
        let mut waits = Vec::new();
        for _ in 0..10 {
            match iso.failed(4, part(&[], 0, &[]), "nothing to blame", now) {
                Verdict::BackOff { retry_at, .. } => waits.push(retry_at - now),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(waits[0], Duration::from_secs(1));
        assert_eq!(waits[1], Duration::from_secs(2));
        assert_eq!(waits[2], Duration::from_secs(4));
        assert_eq!(*waits.last().unwrap(), MAX_BACKOFF);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
        // A commit resets the backoff.
        iso.committed(4, 0, &[]);
        match iso.failed(4, part(&[], 0, &[]), "again", now) {
            Verdict::BackOff { attempt, .. } => assert_eq!(attempt, 1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_revoked_partition_forgets_its_isolation() {
        let mut iso = Isolation::default();
        iso.failed(1, part(&[5], 6, &[]), "bad", Instant::now());
        iso.forget(1);
        assert!(iso.quarantined(1, 5).is_none());
    }

    #[test]
    fn a_failed_part_with_commands_tries_each_command_alone_before_any_record() {
        let mut iso = Isolation::default();
        let v = iso.failed(
            3,
            part(&[20, 21], 22, &[7, 9]),
            "check violated",
            Instant::now(),
        );
        assert_eq!(
            v,
            Verdict::CommandsFirst {
                commands: vec![7, 9]
            }
        );
        assert!(
            iso.commands_first(3),
            "no record of the partition before the suspects"
        );
        assert!(!iso.commands_first(2), "other partitions are untouched");
        assert_eq!(
            iso.commands_to_apply(3, &[7, 8, 9]),
            vec![7],
            "one suspect per batch"
        );
        assert_eq!(iso.commands_to_apply(2, &[5, 6]), vec![5, 6]);
        assert!(
            iso.quarantined(3, 20).is_none() && !iso.one_at_a_time(3, 20),
            "no record is blamed for a part that applied commands"
        );
        // 7 alone commits: it was innocent. 9 alone fails: refused next time, with the error.
        assert!(!iso.committed(3, 20, &[7]));
        assert_eq!(iso.commands_to_apply(3, &[8, 9]), vec![9]);
        let v = iso.failed(3, part(&[], 20, &[9]), "check violated", Instant::now());
        assert_eq!(v, Verdict::RefuseCommand { id: 9 });
        assert!(!iso.commands_first(3), "the records flow again");
        assert_eq!(iso.commands_to_apply(3, &[8, 9]), vec![8, 9]);
        assert_eq!(iso.refused_command(3, 9), Some("check violated"));
        assert_eq!(iso.refused_command(3, 8), None);
        // Its refusal commits: nothing is left of the isolation.
        assert!(iso.committed(3, 22, &[8, 9]));
        assert!(!iso.is_isolating(3));
    }

    #[test]
    fn a_suspect_command_no_longer_pending_is_forgotten() {
        let mut iso = Isolation::default();
        iso.failed(1, part(&[], 4, &[3, 4]), "boom", Instant::now());
        iso.failed(1, part(&[], 4, &[3]), "boom", Instant::now());
        assert!(iso.commands_first(1) && iso.refused_command(1, 3).is_some());
        // Both cancelled by the operator while pending.
        iso.pending_commands(1, &[]);
        assert!(
            !iso.commands_first(1),
            "the partition's records are not held for them"
        );
        assert!(iso.refused_command(1, 3).is_none());
        assert!(iso.committed(1, 4, &[]));
    }

    #[test]
    fn a_failed_part_that_fired_wait_timeouts_holds_them_and_blames_no_record_or_command() {
        let mut iso = Isolation::default();
        let now = Instant::now();
        let v = iso.failed(2, firing(part(&[10], 11, &[7])), "check violated", now);
        assert_eq!(
            v,
            Verdict::HoldTimeouts {
                retry_at: now + Duration::from_secs(1),
                attempt: 1
            }
        );
        assert!(iso.quarantined(2, 10).is_none() && !iso.one_at_a_time(2, 10));
        assert!(!iso.commands_first(2) && iso.refused_command(2, 7).is_none());
        assert!(iso.timeouts_held(2, now), "its clock stops");
        assert!(!iso.timeouts_held(2, now + Duration::from_secs(1)));
        assert!(!iso.timeouts_held(3, now), "other partitions are untouched");
        // Written again without its timeouts, the record fails alone: it is to blame after all.
        let v = iso.failed(2, part(&[10], 11, &[]), "value too long", now);
        assert_eq!(v, Verdict::Quarantine { offset: 10 });
        assert!(iso.timeouts_held(2, now), "the hold stays");
    }

    #[test]
    fn refused_wait_timeouts_are_tried_again_after_a_backoff_that_doubles_until_they_commit() {
        let mut iso = Isolation::default();
        let now = Instant::now();
        let timeouts = firing(Part::default());
        let mut waits = Vec::new();
        for k in 0..9 {
            // Records commit between attempts: that does not start the backoff over.
            assert!(!iso.committed(5, 100 + k, &[]));
            match iso.failed(5, timeouts, "check violated", now) {
                Verdict::HoldTimeouts { retry_at, .. } => waits.push(retry_at - now),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(waits[..3], [1, 2, 4].map(Duration::from_secs));
        assert_eq!(*waits.last().unwrap(), MAX_BACKOFF);
        // A batch that fires them commits: the hold is over, and the next failure starts at 1 s.
        assert!(iso.timeouts_committed(5));
        assert!(!iso.timeouts_held(5, now));
        assert!(!iso.timeouts_committed(5), "nothing left to end");
        match iso.failed(5, timeouts, "again", now) {
            Verdict::HoldTimeouts { attempt, .. } => assert_eq!(attempt, 1),
            other => panic!("{other:?}"),
        }
        iso.forget(5);
        assert!(
            !iso.timeouts_held(5, now),
            "a revoked partition forgets its hold"
        );
    }
}
