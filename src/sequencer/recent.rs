//! Bounded in-memory window of recent outcomes by `intent_id` (contract R5).
//!
//! The durable store is the idempotency source of truth, but the caller looks it up once per
//! batch, before the batch is decided; this window covers what was decided since. It is a FIFO
//! ring: an outcome is remembered for the next `capacity` recorded outcomes, then forgotten
//! (by then the caller has flushed it to the store). Re-recording an `intent_id` (a
//! re-submission's new outcome) moves it to the back, so a fresh outcome always gets the full
//! window.
//!
//! Eviction is lazy: popping the front of the ring does not touch the index (that would be a
//! random memory access per outcome, the most expensive step here). Index entries pointing
//! before the ring's head simply stop matching, and are swept in one sequential pass once the
//! index holds twice `capacity` entries. Index entries are 8 bytes: 32 bits of the id's hash
//! (enough to rehash on growth, see [`table_hash`]) and the slot's position modulo 2^32 (a
//! stale entry is swept long before positions wrap, since `capacity` is at most 2^30).

use std::collections::VecDeque;

use compact_str::CompactString;
use hashbrown::HashTable;

use super::intent::PriorOutcome;

/// Upper bound for `capacity`, keeping wrapped 32-bit positions unambiguous.
pub(crate) const MAX_CAPACITY: usize = 1 << 30;

struct Slot {
    intent_id: CompactString,
    prior: PriorOutcome,
    /// False once the same id was recorded again further back.
    live: bool,
}

#[derive(Clone, Copy)]
struct Entry {
    hash: u32,
    position: u32,
}

/// The table's hash, rebuilt from the 32 bits an entry keeps: hashbrown takes bucket
/// positions from the low bits and its control tag from the top 7 bits, so both halves carry
/// the same 32 bits.
fn table_hash(hash: u32) -> u64 {
    (u64::from(hash) << 32) | u64::from(hash)
}

pub(crate) struct RecentOutcomes {
    capacity: usize,
    ring: VecDeque<Slot>,
    /// Position (mod 2^32) of `ring[0]`.
    head: u32,
    index: HashTable<Entry>,
}

impl RecentOutcomes {
    pub fn new(capacity: usize) -> Self {
        RecentOutcomes {
            capacity: capacity.min(MAX_CAPACITY),
            ring: VecDeque::new(),
            head: 0,
            index: HashTable::new(),
        }
    }

    /// The slot an entry points to, `None` if it was evicted.
    fn slot(ring: &VecDeque<Slot>, head: u32, position: u32) -> Option<&Slot> {
        ring.get(position.wrapping_sub(head) as usize)
    }

    pub fn get(&self, hash: u64, intent_id: &str) -> Option<PriorOutcome> {
        let (ring, head) = (&self.ring, self.head);
        let hash = hash as u32;
        self.index
            .find(table_hash(hash), |e| {
                e.hash == hash
                    && Self::slot(ring, head, e.position).is_some_and(|s| s.intent_id == intent_id)
            })
            .and_then(|e| Self::slot(ring, head, e.position))
            .map(|s| s.prior)
    }

    pub fn record(&mut self, hash: u64, intent_id: &str, prior: PriorOutcome) {
        let Self {
            capacity,
            ring,
            head,
            index,
        } = self;
        let hash = hash as u32;
        let position = head.wrapping_add(ring.len() as u32);
        let found = index.entry(
            table_hash(hash),
            |e| {
                e.hash == hash
                    && Self::slot(ring, *head, e.position).is_some_and(|s| s.intent_id == intent_id)
            },
            |e| table_hash(e.hash),
        );
        match found {
            hashbrown::hash_table::Entry::Occupied(mut entry) => {
                // Re-recorded: the old slot dies, the entry points to the new one.
                let old = std::mem::replace(&mut entry.get_mut().position, position);
                if let Some(slot) = ring.get_mut(old.wrapping_sub(*head) as usize) {
                    slot.live = false;
                }
            }
            hashbrown::hash_table::Entry::Vacant(entry) => {
                entry.insert(Entry { hash, position });
            }
        }
        ring.push_back(Slot {
            intent_id: CompactString::new(intent_id),
            prior,
            live: true,
        });
        while ring.len() > *capacity {
            ring.pop_front();
            *head = head.wrapping_add(1);
        }
        if index.len() > capacity.saturating_mul(2) {
            let (head, len) = (*head, ring.len());
            index.retain(|e| (e.position.wrapping_sub(head) as usize) < len);
        }
    }

    /// Live entries, oldest first (for export).
    pub fn iter(&self) -> impl Iterator<Item = (&str, PriorOutcome)> {
        self.ring
            .iter()
            .filter(|s| s.live)
            .map(|s| (s.intent_id.as_str(), s.prior))
    }

    /// Outcomes remembered (live entries).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.ring.iter().filter(|s| s.live).count()
    }
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use hashbrown::DefaultHashBuilder;

    use super::*;
    use crate::sequencer::intent::Outcome;

    fn prior(n: u64) -> PriorOutcome {
        PriorOutcome {
            fingerprint: n,
            outcome: Outcome::Committed {
                commit_sequence: n,
                contact_version: n,
            },
        }
    }

    #[test]
    fn remembers_exactly_the_last_capacity_outcomes_and_sweeps_stale_index_entries() {
        let hasher = DefaultHashBuilder::default();
        let mut recent = RecentOutcomes::new(10);
        for n in 0..1_000u64 {
            let id = format!("i{n}");
            recent.record(hasher.hash_one(id.as_str()), &id, prior(n));
            assert!(recent.index.len() <= 21, "stale entries are swept");
        }
        for n in 0..1_000u64 {
            let id = format!("i{n}");
            let found = recent.get(hasher.hash_one(id.as_str()), &id);
            assert_eq!(found, (n >= 990).then(|| prior(n)), "{id}");
        }
    }

    #[test]
    fn re_recording_an_id_moves_it_to_the_back_with_its_new_outcome() {
        let hasher = DefaultHashBuilder::default();
        let h = |id: &str| hasher.hash_one(id);
        let mut recent = RecentOutcomes::new(3);
        recent.record(h("a"), "a", prior(1));
        recent.record(h("b"), "b", prior(2));
        recent.record(h("a"), "a", prior(3));
        recent.record(h("c"), "c", prior(4));
        recent.record(h("d"), "d", prior(5));
        // Recorded after b, the new outcome of a outlives b.
        assert_eq!(recent.get(h("a"), "a"), Some(prior(3)));
        assert_eq!(recent.get(h("b"), "b"), None);
        let ids: Vec<&str> = recent.iter().map(|(id, _)| id).collect();
        assert_eq!(ids, ["a", "c", "d"]);

        // While the old slot is still in the ring, it is dead: exported once, newest outcome.
        let mut recent = RecentOutcomes::new(4);
        recent.record(h("a"), "a", prior(1));
        recent.record(h("b"), "b", prior(2));
        recent.record(h("a"), "a", prior(3));
        let entries: Vec<(&str, PriorOutcome)> = recent.iter().collect();
        assert_eq!(entries, [("b", prior(2)), ("a", prior(3))]);
        assert_eq!(recent.len(), 2);
    }
}
