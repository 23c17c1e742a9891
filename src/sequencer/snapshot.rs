//! Durable state: per-contact snapshots (dirty tracking and restore) and whole-partition
//! export/import.

use std::collections::HashSet;
use std::hash::BuildHasher;

use serde::{Deserialize, Serialize};

use super::contact::{Contact, Hold, Pending, Waiting};
use super::decision::HoldReason;
use super::intent::{Intent, Millis, PriorOutcome, MAX_SEQUENCE};
use super::{Config, Error, IdSlot, Result, Sequencer};

/// Why and since when a contact is on hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HoldState {
    pub since: Millis,
    pub reason: HoldReason,
}

/// A waiting intent, payload included: waiting intents are data (R3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitingSnapshot<T> {
    pub commit_sequence: u64,
    /// When it started waiting.
    pub since: Millis,
    pub intent: Intent<T>,
}

/// Everything the sequencer knows about one contact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactSnapshot<T> {
    pub contact_id: String,
    /// Every sequence up to this one is resolved.
    pub resolved_through: u64,
    /// Committed effects so far.
    pub version: u64,
    /// Next sequence the sequencer would assign.
    pub next_sequence: u64,
    pub hold: Option<HoldState>,
    /// Start of the current gap; `Some` exactly when `waiting` is not empty.
    pub gap_since: Option<Millis>,
    /// Sorted by `commit_sequence`.
    pub waiting: Vec<WaitingSnapshot<T>>,
}

/// One entry of the recent-outcome window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentOutcome {
    pub intent_id: String,
    pub prior: PriorOutcome,
}

/// A whole partition's sequencer state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionSnapshot<T> {
    pub now: Millis,
    pub paused: bool,
    /// In the sequencer's internal order, which import preserves (it breaks timeout ties).
    pub contacts: Vec<ContactSnapshot<T>>,
    /// Oldest first.
    pub recent: Vec<RecentOutcome>,
}

impl<T> ContactSnapshot<T> {
    /// The state of a contact never seen: what the store has when it has no row.
    pub fn new(contact_id: impl Into<String>) -> Self {
        ContactSnapshot {
            contact_id: contact_id.into(),
            resolved_through: 0,
            version: 0,
            next_sequence: 1,
            hold: None,
            gap_since: None,
            waiting: Vec::new(),
        }
    }

    /// Checks the invariants the sequencer relies on.
    fn check(&self) -> Result<()> {
        let bad = |detail: &'static str| {
            Err(Error::InvalidSnapshot {
                contact_id: self.contact_id.clone(),
                detail,
            })
        };
        if self.contact_id.is_empty() {
            return bad("contact_id is empty");
        }
        if self.resolved_through > MAX_SEQUENCE {
            return bad("resolved_through is above 2^63-1");
        }
        if self.version > self.resolved_through {
            return bad("version is above resolved_through");
        }
        if self.next_sequence <= self.resolved_through || self.next_sequence > MAX_SEQUENCE + 1 {
            return bad("next_sequence must be in resolved_through+1 ..= 2^63");
        }
        if self.hold.is_some() && !self.waiting.is_empty() {
            return bad("a held contact has no waiting intents");
        }
        if self.waiting.is_empty() != self.gap_since.is_none() {
            return bad("gap_since must be set exactly when intents wait");
        }
        let mut previous = self.resolved_through + 1;
        let mut ids = HashSet::with_capacity(self.waiting.len());
        for w in &self.waiting {
            if w.commit_sequence <= previous {
                return bad("waiting sequences must increase and wait on a gap");
            }
            if w.commit_sequence >= self.next_sequence {
                return bad("waiting sequence at or above next_sequence");
            }
            if w.intent.meta.contact_id != self.contact_id {
                return bad("waiting intent belongs to another contact");
            }
            if w.intent.meta.intent_id.is_empty() {
                return bad("waiting intent has an empty intent_id");
            }
            if !ids.insert(w.intent.meta.intent_id.as_str()) {
                return bad("intent_id waits twice");
            }
            previous = w.commit_sequence;
        }
        Ok(())
    }
}

impl<T: Clone> Contact<T> {
    fn snapshot(&self) -> ContactSnapshot<T> {
        ContactSnapshot {
            contact_id: self.id.to_string(),
            resolved_through: self.resolved,
            version: self.version,
            next_sequence: self.next,
            hold: self.hold().map(|h| HoldState {
                since: h.since,
                reason: h.reason,
            }),
            gap_since: self.pending().map(|p| p.gap_since),
            waiting: self
                .pending()
                .into_iter()
                .flat_map(|p| p.waiting.iter())
                .map(|w| WaitingSnapshot {
                    commit_sequence: w.seq,
                    since: w.since,
                    intent: w.intent.clone(),
                })
                .collect(),
        }
    }
}

impl<T: Clone> Sequencer<T> {
    /// Snapshots of every contact changed since the last call, first-touched first, for one
    /// batched upsert. Payloads of waiting intents are cloned (use a cheaply clonable `T`,
    /// e.g. `Arc` or `Bytes`, for large records).
    pub fn take_dirty(&mut self) -> Vec<ContactSnapshot<T>> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty
            .into_iter()
            .map(|idx| {
                let contact = &mut self.contacts[idx];
                contact.dirty = false;
                contact.snapshot()
            })
            .collect()
    }

    /// The whole partition's state (drain decisions first: the output buffer is not state).
    pub fn export(&self) -> PartitionSnapshot<T> {
        PartitionSnapshot {
            now: self.now,
            paused: self.paused,
            contacts: self.contacts.iter().map(Contact::snapshot).collect(),
            recent: self
                .recent
                .iter()
                .map(|(intent_id, prior)| RecentOutcome {
                    intent_id: intent_id.to_owned(),
                    prior,
                })
                .collect(),
        }
    }
}

impl<T> Sequencer<T> {
    /// One contact's snapshot. `None` if the contact is unknown.
    pub fn contact_snapshot(&self, contact_id: &str) -> Option<ContactSnapshot<T>>
    where
        T: Clone,
    {
        self.contacts
            .find(contact_id)
            .and_then(|idx| self.contacts.get(idx))
            .map(Contact::snapshot)
    }

    /// Loads one contact's durable state, replacing what the sequencer holds for it.
    /// Rejects an inconsistent snapshot (and one whose waiting intent ids already wait in
    /// another contact) without changing anything.
    pub fn restore_contact(&mut self, snapshot: ContactSnapshot<T>) -> Result<()> {
        self.install(snapshot)?;
        self.backpressure();
        Ok(())
    }

    /// [`Sequencer::restore_contact`] for many contacts; stops at the first invalid one
    /// (the ones before it stay restored).
    pub fn restore(
        &mut self,
        snapshots: impl IntoIterator<Item = ContactSnapshot<T>>,
    ) -> Result<()> {
        let snapshots = snapshots.into_iter();
        self.contacts.reserve(snapshots.size_hint().0);
        for snapshot in snapshots {
            self.install(snapshot)?;
        }
        self.backpressure();
        Ok(())
    }

    /// A sequencer holding an exported partition state, deciding exactly as the exported one.
    pub fn import(config: Config, snapshot: PartitionSnapshot<T>) -> Result<Self> {
        let mut sequencer = Sequencer::new(config)?;
        sequencer.now = snapshot.now;
        sequencer.contacts.reserve(snapshot.contacts.len());
        for contact in snapshot.contacts {
            if sequencer.contacts.find(&contact.contact_id).is_some() {
                return Err(Error::InvalidSnapshot {
                    contact_id: contact.contact_id,
                    detail: "contact appears twice in the partition snapshot",
                });
            }
            sequencer.install(contact)?;
        }
        for entry in snapshot.recent {
            let hash = sequencer.id_hasher.hash_one(entry.intent_id.as_str());
            sequencer.recent.record(hash, &entry.intent_id, entry.prior);
        }
        sequencer.paused = snapshot.paused;
        Ok(sequencer)
    }

    fn install(&mut self, snapshot: ContactSnapshot<T>) -> Result<u32> {
        snapshot.check()?;
        let existing = self.contacts.find(&snapshot.contact_id);
        let mut hashes = Vec::with_capacity(snapshot.waiting.len());
        for w in &snapshot.waiting {
            let id = w.intent.meta.intent_id.as_str();
            let hash = self.id_hasher.hash_one(id);
            let contacts = &self.contacts;
            let elsewhere = self.waiting_ids.find(hash, |s| {
                Some(s.contact) != existing
                    && contacts
                        .get(s.contact)
                        .and_then(|c| c.waiting(s.seq))
                        .is_some_and(|o| o.intent.meta.intent_id == id)
            });
            if elsewhere.is_some() {
                return Err(Error::InvalidSnapshot {
                    contact_id: snapshot.contact_id,
                    detail: "a waiting intent already waits in another contact",
                });
            }
            hashes.push(hash);
        }
        let idx = match existing {
            Some(idx) => idx,
            None => self
                .contacts
                .find_or_insert(&snapshot.contact_id)
                .ok_or_else(|| Error::InvalidSnapshot {
                    contact_id: snapshot.contact_id.clone(),
                    detail: "partition contact table is full",
                })?,
        };
        self.clear_contact(idx);

        let timeout_ms = self.timeout_ms;
        let contact = &mut self.contacts[idx];
        contact.resolved = snapshot.resolved_through;
        contact.version = snapshot.version;
        contact.next = snapshot.next_sequence;
        if let Some(hold) = snapshot.hold {
            contact.set_hold(Hold {
                since: hold.since,
                reason: hold.reason,
            });
            self.held.insert(idx);
        }
        if let Some(gap_since) = snapshot.gap_since {
            let waiting: Vec<Waiting<T>> = snapshot
                .waiting
                .into_iter()
                .map(|w| Waiting {
                    seq: w.commit_sequence,
                    since: w.since,
                    intent: w.intent,
                })
                .collect();
            for (w, &hash) in waiting.iter().zip(&hashes) {
                let slot = IdSlot {
                    hash,
                    contact: idx,
                    seq: w.seq,
                };
                self.waiting_ids.insert_unique(hash, slot, |s| s.hash);
            }
            self.waiting_total += waiting.len();
            self.waiting_bytes += waiting
                .iter()
                .map(|w| u64::from(w.intent.meta.size))
                .sum::<u64>();
            self.deadlines.insert((gap_since.plus(timeout_ms), idx));
            contact.set_pending(Pending { gap_since, waiting });
        }
        Ok(idx)
    }

    /// Forgets a contact's hold and waiting intents (before overwriting it).
    fn clear_contact(&mut self, idx: u32) {
        let timeout_ms = self.timeout_ms;
        let contact = &mut self.contacts[idx];
        if contact.take_hold().is_some() {
            self.held.remove(&idx);
        }
        if let Some(pending) = contact.take_pending() {
            self.deadlines
                .remove(&(pending.gap_since.plus(timeout_ms), idx));
            for w in &pending.waiting {
                self.forget_waiting(idx, w.seq, &w.intent.meta);
            }
        }
    }
}
