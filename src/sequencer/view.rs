//! Read-only views for metrics and the admin API.

use super::intent::Millis;
use super::snapshot::HoldState;
use super::Sequencer;

/// The partition's `waiting_previous_commit` backlog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backlog {
    /// Waiting intents.
    pub waiting: usize,
    /// Contacts with at least one waiting intent.
    pub contacts_waiting: usize,
    /// When the longest-waiting intent started waiting.
    pub oldest_waiting_since: Option<Millis>,
    pub contacts_held: usize,
    pub paused: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldContact {
    pub contact_id: String,
    pub hold: HoldState,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaitingView {
    pub commit_sequence: u64,
    pub intent_id: String,
    pub offset: i64,
    pub priority: i32,
    pub since: Millis,
}

/// One contact's state, without payloads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContactView {
    pub contact_id: String,
    pub resolved_through: u64,
    pub version: u64,
    pub next_sequence: u64,
    pub hold: Option<HoldState>,
    pub gap_since: Option<Millis>,
    /// When the gap times out (a tick at or after this time fires it).
    pub timeout_at: Option<Millis>,
    pub waiting: Vec<WaitingView>,
}

impl<T> Sequencer<T> {
    /// The backlog. Cost: one step per contact with waiting intents.
    pub fn backlog(&self) -> Backlog {
        let oldest_waiting_since = self
            .deadlines
            .iter()
            .filter_map(|&(_, idx)| self.contacts.get(idx))
            .filter_map(|c| c.pending())
            .flat_map(|p| p.waiting.iter().map(|w| w.since))
            .min();
        Backlog {
            waiting: self.waiting_total,
            contacts_waiting: self.deadlines.len(),
            oldest_waiting_since,
            contacts_held: self.held.len(),
            paused: self.paused,
        }
    }

    /// Contacts on hold, sorted by contact id.
    pub fn held_contacts(&self) -> Vec<HeldContact> {
        let mut held: Vec<HeldContact> = self
            .held
            .iter()
            .filter_map(|&idx| self.contacts.get(idx))
            .filter_map(|c| {
                c.hold().map(|h| HeldContact {
                    contact_id: c.id.to_string(),
                    hold: HoldState {
                        since: h.since,
                        reason: h.reason,
                    },
                })
            })
            .collect();
        held.sort_by(|a, b| a.contact_id.cmp(&b.contact_id));
        held
    }

    /// One contact's state; `None` if the sequencer does not hold it.
    pub fn contact(&self, contact_id: &str) -> Option<ContactView> {
        let c = self
            .contacts
            .find(contact_id)
            .and_then(|i| self.contacts.get(i))?;
        let pending = c.pending();
        Some(ContactView {
            contact_id: c.id.to_string(),
            resolved_through: c.resolved,
            version: c.version,
            next_sequence: c.next,
            hold: c.hold().map(|h| HoldState {
                since: h.since,
                reason: h.reason,
            }),
            gap_since: pending.map(|p| p.gap_since),
            timeout_at: pending.map(|p| p.gap_since.plus(self.timeout_ms).plus(1)),
            waiting: pending
                .iter()
                .flat_map(|p| p.waiting.iter())
                .map(|w| WaitingView {
                    commit_sequence: w.seq,
                    intent_id: w.intent.meta.intent_id.clone(),
                    offset: w.intent.meta.offset,
                    priority: w.intent.meta.priority,
                    since: w.since,
                })
                .collect(),
        })
    }

    /// Contacts the sequencer holds (idle ones included).
    pub fn contact_count(&self) -> usize {
        self.contacts.len()
    }

    /// Whether the contact's state is loaded (the caller restores it from the store first
    /// otherwise).
    pub fn knows_contact(&self, contact_id: &str) -> bool {
        self.contacts.find(contact_id).is_some()
    }
}
