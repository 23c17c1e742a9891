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
//! A failure with nothing to blame (wait timeouts alone) backs off, with a bound.
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
    /// Nothing to blame: retry the partition no earlier than `retry_at`.
    BackOff { retry_at: Instant, attempt: u32 },
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct Isolation {
    partitions: BTreeMap<i32, Partition>,
}

impl Isolation {
    /// A partition's part of a batch failed for its data. `offsets` are the input records of
    /// that part (in order), `next_offset` one past the last of them, `commands` the ids of the
    /// operator commands it applied.
    pub fn failed(
        &mut self,
        partition: i32,
        offsets: &[i64],
        next_offset: i64,
        commands: &[i64],
        error: &str,
        now: Instant,
    ) -> Verdict {
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
                let factor = 1u32 << (p.blameless - 1).min(16);
                let wait = FIRST_BACKOFF.saturating_mul(factor).min(MAX_BACKOFF);
                Verdict::BackOff {
                    retry_at: now + wait,
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
    }

    pub fn is_isolating(&self, partition: i32) -> bool {
        self.partitions.contains_key(&partition)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_batch_of_many_records_is_replayed_one_at_a_time_up_to_its_end() {
        let mut iso = Isolation::default();
        let v = iso.failed(2, &[10, 11, 12], 13, &[], "boom", Instant::now());
        assert_eq!(v, Verdict::Isolate { until: 13 });
        assert!(iso.one_at_a_time(2, 10) && iso.one_at_a_time(2, 12));
        assert!(!iso.one_at_a_time(2, 13));
        assert!(!iso.one_at_a_time(3, 10), "other partitions are untouched");
    }

    #[test]
    fn a_record_that_fails_alone_is_quarantined_with_its_error() {
        let mut iso = Isolation::default();
        iso.failed(2, &[10, 11, 12], 13, &[], "boom", Instant::now());
        let v = iso.failed(2, &[11], 12, &[], "value too long", Instant::now());
        assert_eq!(v, Verdict::Quarantine { offset: 11 });
        assert_eq!(iso.quarantined(2, 11), Some("value too long"));
        assert_eq!(iso.quarantined(2, 10), None);
    }

    #[test]
    fn isolation_ends_once_the_failed_batch_and_its_quarantined_records_are_committed() {
        let mut iso = Isolation::default();
        iso.failed(2, &[10, 11, 12], 13, &[], "boom", Instant::now());
        iso.failed(2, &[11], 12, &[], "bad", Instant::now());
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
            match iso.failed(4, &[], 0, &[], "timeouts only", now) {
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
        match iso.failed(4, &[], 0, &[], "again", now) {
            Verdict::BackOff { attempt, .. } => assert_eq!(attempt, 1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_revoked_partition_forgets_its_isolation() {
        let mut iso = Isolation::default();
        iso.failed(1, &[5], 6, &[], "bad", Instant::now());
        iso.forget(1);
        assert!(iso.quarantined(1, 5).is_none());
    }

    #[test]
    fn a_failed_part_with_commands_tries_each_command_alone_before_any_record() {
        let mut iso = Isolation::default();
        let v = iso.failed(3, &[20, 21], 22, &[7, 9], "check violated", Instant::now());
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
        let v = iso.failed(3, &[], 20, &[9], "check violated", Instant::now());
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
        iso.failed(1, &[], 4, &[3, 4], "boom", Instant::now());
        iso.failed(1, &[], 4, &[3], "boom", Instant::now());
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
}
