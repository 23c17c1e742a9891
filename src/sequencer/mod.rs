//! The pure per-partition causal sequencer and commit gate.
//!
//! One [`Sequencer`] owns one Kafka partition's per-contact state and makes every sequencing
//! decision. It does no I/O and reads no clock: the pipeline feeds it events, each stamped
//! with the caller's time ([`Millis`]), and drains [`Decision`]s.
//!
//! Events: [`Sequencer::on_intent`] (an intent was consumed, with what the durable store
//! already knows about its `intent_id`), [`Sequencer::on_tick`] (time passed),
//! [`Sequencer::release`] (an operator released a held contact), and restore/import of state.
//! Every event first advances the clock, which fires due wait timeouts, so decisions do not
//! depend on how often the caller ticks. A clock that goes backwards is ignored (time never
//! decreases inside the sequencer).
//!
//! # Contact state
//!
//! Per contact: the resolved high-water mark `resolved` (every sequence up to it is committed,
//! blocked or skipped; resolutions only ever happen at `resolved + 1`, so one number describes
//! them all), the `version` (number of committed effects), `next` (the next sequence to
//! assign: one above everything resolved or reserved), an optional hold, and the sorted list
//! of waiting intents with their payloads.
//!
//! # Rules and where they are enforced
//!
//! - **R1 causal order** follows from R3: the only place that emits `Commit` is
//!   `Sequencer::settle`, which only ever resolves `resolved + 1` and advances the mark by one.
//!   Gaps in commit sequences are always explained by a `Blocked` (version conflict) or
//!   `Skipped` decision for the missing sequences.
//! - **R2 sequence source** (`Sequencer::on_intent`): `causal_sequence > 0` is the commit
//!   sequence (strict: gaps wait). Otherwise the contact's `next` is assigned at first sight,
//!   in partition order; `next` is one above every sequence resolved or claimed by an intent
//!   that got a slot, so an assigned intent goes after waiting strict intents.
//! - **R3 commit gate** (`settle`, `release_ready`): sequence N is settled only when
//!   `resolved == N - 1`; otherwise the intent waits (`Decision::Wait`, state
//!   `waiting_previous_commit`) and is kept, payload included, in exported and dirty
//!   snapshots. Each resolution releases the now-ready waiting successors, in sequence order.
//! - **R4 priority** (`output::Output::drain_into`): a drain stable-sorts the decisions made
//!   since the previous drain by their contact's priority (the highest `dispatch_priority`
//!   among that contact's intents in the drain), highest first; partition decisions go last.
//!   All decisions of a contact share one key, so their order is never changed. Priority has
//!   no other effect: it never changes which sequence an intent gets or when it commits.
//! - **R5 idempotency** (`known_outcome`, `recent::RecentOutcomes`): an `intent_id` that is
//!   waiting, in the bounded recent-outcome window, or has a `prior` from the store gets
//!   `Duplicate` (same fingerprint) or `Blocked(IdempotencyConflict)` (different fingerprint),
//!   with no effect and no state change. In-memory knowledge wins over `prior` (it is newer).
//!   Only a `manual_review` outcome is re-opened, and only by a record with
//!   `resubmission = true` and the same fingerprint.
//! - **R6 guards** (`settle` for versions, `on_intent` for sequences): `expected_version > 0`
//!   and not equal to the version when the intent's turn comes → `Blocked(VersionConflict)`,
//!   which resolves the slot. A claimed sequence `<= resolved`, or one owned by a different
//!   waiting intent → `Blocked(SequenceConflict)` for the later claimer; the owner keeps its
//!   slot and nothing else changes.
//! - **R7 wait timeout** (`advance`, `expire`, `release`): see "Timeouts" below.
//! - **R8 outcomes**: each `on_intent` emits exactly one of Commit/Wait/Duplicate/Blocked/
//!   ManualReview for that intent (every branch of `on_intent` ends in exactly one emit). A
//!   waiting intent leaves the waiting list only through `settle` (Commit or Blocked) or
//!   `evict_waiting` (ManualReview), each emitting exactly one decision.
//! - **Bounded memory** (`overflow`, `backpressure`, `RecentOutcomes`): see below.
//!
//! # Decisions where the contract is silent
//!
//! - **The gap clock.** A contact's gap starts when its first intent starts waiting and
//!   restarts whenever the contact makes progress (its resolved mark advances) while intents
//!   still wait. The timeout fires when `now - gap_since > wait_timeout` (strictly longer).
//!   `WaitTimeout.waited_ms` is how long each intent itself waited.
//! - **Timeout, policy `Hold`:** `ContactHeld`, then every waiting intent in sequence order
//!   → `ManualReview(WaitTimeout { missing: resolved + 1 })`. Their slots stay unresolved
//!   and reserved (`next` is unchanged), so a re-submission of an assigned intent reclaims its
//!   old slot (carried in the outcome's `commit_sequence`).
//! - **Timeout, policy `Skip`:** only the first gap (the one that timed out) is skipped with
//!   one `Skipped { from, to }` decision, then ready intents are settled; later gaps get a
//!   fresh clock, because nothing shows they have been missing for `wait_timeout`.
//! - **Skipped decisions are ranges** (`from..=to`): one decision per contiguous run, so a
//!   far-away sequence (strict mode lets a producer send 10^12) cannot explode into billions
//!   of decisions; the audit row still names every skipped sequence.
//! - **Holds.** While held, a contact has no waiting intents (they all went to manual review)
//!   and every new intent for it (after the R5 check) → `ManualReview(ContactOnHold)`,
//!   keeping the sequence it claimed. Only a held contact can be released: `Resume` clears the
//!   hold and leaves unresolved slots unresolved (re-submit their intents or skip them later;
//!   new work waits behind them and may time out again); `SkipTo(n)` also emits `Skipped` for
//!   `resolved + 1 ..= n - 1` (if any) so `n` commits next. Order: `Skipped`, then
//!   `ContactReleased`.
//! - **Manual-reviewed slots** are unresolved but not owned: the first intent to claim one
//!   (its re-submission, or another strict intent) takes it. A re-submission whose slot was
//!   meanwhile resolved (e.g. skipped) is a `SequenceConflict`.
//! - **Overflow.** An intent that would wait while its contact already has
//!   `max_pending_per_contact` waiting → `ContactHeld(BacklogOverflow)`, the waiting intents
//!   (in sequence order), then the new intent, all `ManualReview(ContactBacklogOverflow)`.
//!   An intent that can commit right away never overflows.
//! - **Partition backpressure is a signal, not a cap.** Reaching `max_pending_per_partition`
//!   waiting intents, or `max_pending_bytes_per_partition` bytes of them (`IntentMeta::size`),
//!   emits `PausePartition`; intents still arriving (the caller's in-flight batch) are decided
//!   normally, never dropped. Falling below both `resume_pending_below` and
//!   `resume_pending_bytes_below` emits `ResumePartition`. How a paused partition is read is
//!   the caller's business (the pipeline reads it while caught up and probes it otherwise).
//! - **Recent-outcome window.** Remembers the last `recent_outcomes_capacity` outcomes
//!   (FIFO; a re-recorded id moves to the back). Correct only if the caller flushes outcomes
//!   to its store, and looks `prior` up again, within that many outcomes.
//! - **Invalid input** (empty `intent_id` or `contact_id`, a sequence above `2^63 - 1`)
//!   → `ManualReview(InvalidIntent)`, recorded nowhere, touching no contact.
//! - **Sequences are capped at [`MAX_SEQUENCE`]** (`i64::MAX`, the PostgreSQL `BIGINT`
//!   range), so arithmetic on them never overflows.
//!
//! # Durable state
//!
//! [`Sequencer::take_dirty`] returns a [`ContactSnapshot`] of every contact changed since the
//! last call (first-touched first; a contact's first sight counts as a change) for one
//! batched upsert; [`Sequencer::restore_contact`] / [`Sequencer::restore`] load them back. The
//! caller must load a contact before its first intent after an assignment or restart (else it
//! is taken for a new contact); [`Sequencer::knows_contact`] tells whether it is loaded. The
//! recent-outcome window and the pause state are not part of contact snapshots: after a
//! restart the store's `prior` covers idempotency, and restore re-evaluates backpressure
//! (emitting `PausePartition` if the restored backlog is at the limit). [`Sequencer::export`] /
//! [`Sequencer::import`] move a whole partition (serde); after an import the sequencer makes
//! exactly the decisions the exported one would have. Drain decisions before exporting: the
//! undrained output buffer is not state and is not exported.

#![forbid(unsafe_code)]

mod config;
mod contact;
mod decision;
mod intent;
mod output;
mod recent;
mod snapshot;
mod view;

#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::hash::BuildHasher;

use hashbrown::{DefaultHashBuilder, HashTable};

pub use config::{Config, TimeoutPolicy};
pub use decision::{
    BlockReason, Decision, HoldReason, InvalidKind, Reason, Release, ReviewReason, SkipCause,
    State, UnknownName,
};
pub use intent::{Intent, IntentMeta, Millis, Outcome, PriorOutcome, MAX_SEQUENCE};
pub use snapshot::{ContactSnapshot, HoldState, PartitionSnapshot, RecentOutcome, WaitingSnapshot};
pub use view::{Backlog, ContactView, HeldContact, WaitingView};

use contact::{ContactTable, Hold, Pending, Waiting, NO_GROUP};
use output::Output;
use recent::RecentOutcomes;

/// Errors of the sequencer's fallible operations (configuration, operator actions, restore).
/// Intents never fail: every input gets a decision.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("invalid sequencer config `{key}`: {detail}")]
    InvalidConfig {
        key: &'static str,
        detail: &'static str,
    },
    #[error("contact {contact_id:?} is unknown to this partition")]
    UnknownContact { contact_id: String },
    #[error("contact {contact_id:?} is not on hold")]
    NotHeld { contact_id: String },
    #[error("cannot skip contact {contact_id:?} to sequence {target}: above 2^63-1")]
    SkipTargetOutOfRange { contact_id: String, target: u64 },
    #[error("invalid snapshot of contact {contact_id:?}: {detail}")]
    InvalidSnapshot {
        contact_id: String,
        detail: &'static str,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where a waiting intent is, indexed by the hash of its `intent_id` (the id itself lives once,
/// in the waiting intent).
#[derive(Clone, Copy)]
struct IdSlot {
    hash: u64,
    contact: u32,
    seq: u64,
}

/// One partition's causal sequencer. See the [module documentation](self) for the rules.
pub struct Sequencer<T> {
    config: Config,
    timeout_ms: u64,
    now: Millis,
    contacts: ContactTable<T>,
    /// Waiting intents by `intent_id`, for R5.
    waiting_ids: HashTable<IdSlot>,
    id_hasher: DefaultHashBuilder,
    recent: RecentOutcomes,
    /// `(gap_since + wait_timeout, contact)` for every contact with waiting intents.
    deadlines: BTreeSet<(Millis, u32)>,
    held: BTreeSet<u32>,
    waiting_total: usize,
    /// Sum of the waiting intents' sizes.
    waiting_bytes: u64,
    paused: bool,
    /// Contacts touched since the last `take_dirty`, first-touched first.
    dirty: Vec<u32>,
    output: Output<T>,
}

impl<T> Sequencer<T> {
    pub fn new(config: Config) -> Result<Self> {
        config.validate()?;
        Ok(Sequencer {
            timeout_ms: config.wait_timeout_ms(),
            recent: RecentOutcomes::new(config.recent_outcomes_capacity),
            config,
            now: Millis(0),
            contacts: ContactTable::new(),
            waiting_ids: HashTable::new(),
            id_hasher: DefaultHashBuilder::default(),
            deadlines: BTreeSet::new(),
            held: BTreeSet::new(),
            waiting_total: 0,
            waiting_bytes: 0,
            paused: false,
            dirty: Vec::new(),
            output: Output::new(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The sequencer's clock: the latest time any event carried.
    pub fn now(&self) -> Millis {
        self.now
    }

    /// An intent was consumed. `prior` is what the durable idempotency store knows about its
    /// `intent_id` (looked up by the caller, typically for the whole batch at once). Exactly
    /// one decision about this intent is appended, possibly after decisions for wait timeouts
    /// that were due at `now`, and possibly followed by commits it unblocked.
    // Kept in one piece (over 80 lines) on purpose: the R-rules apply in this order, read top
    // to bottom, and the model test drives every branch.
    pub fn on_intent(
        &mut self,
        meta: IntentMeta,
        payload: T,
        prior: Option<PriorOutcome>,
        now: Millis,
    ) {
        self.advance(now);
        let intent = Intent { meta, payload };
        let m = &intent.meta;
        let invalid = if m.intent_id.is_empty() {
            Some(InvalidKind::EmptyIntentId)
        } else if m.contact_id.is_empty() {
            Some(InvalidKind::EmptyContactId)
        } else if m.causal_sequence > MAX_SEQUENCE {
            Some(InvalidKind::SequenceOutOfRange)
        } else {
            None
        };
        if let Some(kind) = invalid {
            return self.reject_loose(intent, kind);
        }
        let known_contacts = self.contacts.len();
        let Some(idx) = self.contacts.find_or_insert(&intent.meta.contact_id) else {
            return self.reject_loose(intent, InvalidKind::TooManyContacts);
        };
        if self.contacts.len() > known_contacts {
            // First sight is a change: the store learns every contact the sequencer holds,
            // so a restore rebuilds the same set, in the same order.
            self.touch(idx);
        }

        // R5: an intent_id with an outcome gets no second one.
        let id_hash = self.id_hasher.hash_one(intent.meta.intent_id.as_str());
        let mut reclaim = 0;
        if let Some(known) = self
            .known_outcome(id_hash, &intent.meta.intent_id)
            .or(prior)
        {
            if known.fingerprint != intent.meta.fingerprint {
                let reason = BlockReason::IdempotencyConflict {
                    existing_fingerprint: known.fingerprint,
                    received_fingerprint: intent.meta.fingerprint,
                    existing: known.outcome,
                };
                let decision = Decision::Blocked {
                    intent,
                    commit_sequence: 0,
                    reason,
                };
                return self.emit_about(idx, decision);
            }
            match known.outcome {
                Outcome::ManualReview {
                    commit_sequence, ..
                } if intent.meta.resubmission => reclaim = commit_sequence,
                prior => return self.emit_about(idx, Decision::Duplicate { intent, prior }),
            }
        }
        let claimed = if intent.meta.causal_sequence > 0 {
            intent.meta.causal_sequence
        } else {
            reclaim
        };

        let contact = &self.contacts[idx];
        if let Some(hold) = contact.hold() {
            let reason = ReviewReason::ContactOnHold {
                hold: hold.reason,
                held_since: hold.since,
            };
            return self.review(idx, intent, claimed, reason, id_hash);
        }

        // R2: where the sequence comes from; R6: claims on passed or owned slots.
        let seq = if claimed > 0 {
            if claimed > MAX_SEQUENCE {
                return self.reject(idx, intent, InvalidKind::SequenceOutOfRange);
            }
            let owner = if claimed <= contact.resolved {
                Some(None)
            } else {
                contact
                    .waiting(claimed)
                    .map(|w| Some(w.intent.meta.intent_id.clone()))
            };
            if let Some(owner) = owner {
                let reason = BlockReason::SequenceConflict {
                    claimed,
                    resolved_through: contact.resolved,
                    owner,
                };
                return self.block(idx, intent, claimed, reason, id_hash);
            }
            claimed
        } else if contact.next > MAX_SEQUENCE {
            return self.reject(idx, intent, InvalidKind::SequenceSpaceExhausted);
        } else {
            contact.next
        };

        // R3: commit now, or wait (bounded per contact).
        if seq == contact.resolved + 1 {
            self.settle(idx, intent, id_hash);
            self.release_ready(idx, true);
            self.backpressure();
        } else if contact.waiting_len() >= self.config.max_pending_per_contact as usize {
            self.overflow(idx, intent, claimed, id_hash);
        } else {
            self.enqueue(idx, seq, intent, id_hash);
        }
    }

    /// Time advanced to `now`: fires every wait timeout due by then.
    pub fn on_tick(&mut self, now: Millis) {
        self.advance(now);
    }

    /// When the next wait timeout fires (a tick at or after this time fires it), if any
    /// contact is waiting. Lets the caller schedule its ticks.
    pub fn next_timeout_at(&self) -> Option<Millis> {
        self.deadlines
            .first()
            .map(|&(deadline, _)| deadline.plus(1))
    }

    /// An operator releases a held contact (R7). Errors, with no state change except the
    /// clock, if the contact is unknown or not on hold, or the target is out of range.
    pub fn release(&mut self, contact_id: &str, release: Release, now: Millis) -> Result<()> {
        self.advance(now);
        let Some(idx) = self.contacts.find(contact_id) else {
            return Err(Error::UnknownContact {
                contact_id: contact_id.to_owned(),
            });
        };
        if let Release::SkipTo(target) = release {
            if target > MAX_SEQUENCE {
                return Err(Error::SkipTargetOutOfRange {
                    contact_id: contact_id.to_owned(),
                    target,
                });
            }
        }
        let contact = &mut self.contacts[idx];
        if contact.take_hold().is_none() {
            return Err(Error::NotHeld {
                contact_id: contact_id.to_owned(),
            });
        }
        self.held.remove(&idx);
        if let Release::SkipTo(target) = release {
            if target > contact.resolved + 1 {
                let from = contact.resolved + 1;
                contact.resolved = target - 1;
                contact.next = contact.next.max(target);
                let skipped = Decision::Skipped {
                    contact_id: contact_id.to_owned(),
                    from,
                    to: target - 1,
                    cause: SkipCause::Operator,
                };
                self.emit(idx, None, skipped);
            }
        }
        let released = Decision::ContactReleased {
            contact_id: contact_id.to_owned(),
            release,
            resolved_through: self.contacts[idx].resolved,
        };
        self.emit(idx, None, released);
        self.touch(idx);
        Ok(())
    }

    /// Moves the decisions made since the last drain to `out`, in drain order (R4).
    pub fn drain_decisions(&mut self, out: &mut Vec<Decision<T>>) {
        let contacts = &mut self.contacts;
        self.output
            .drain_into(out, |idx| contacts[idx].group = NO_GROUP);
    }

    /// Decisions waiting to be drained.
    pub fn pending_decisions(&self) -> usize {
        self.output.len()
    }

    pub fn has_decisions(&self) -> bool {
        !self.output.is_empty()
    }

    /// Whether the partition is paused for backpressure.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Intents waiting in the whole partition.
    pub fn waiting_count(&self) -> usize {
        self.waiting_total
    }

    /// Bytes of the intents waiting in the whole partition.
    pub fn waiting_bytes(&self) -> u64 {
        self.waiting_bytes
    }

    // ----- internals -----

    /// Moves the clock forward (never back) and fires due timeouts in deadline order
    /// (ties: contact first-seen order).
    fn advance(&mut self, now: Millis) {
        self.now = self.now.max(now);
        while let Some(&(deadline, idx)) = self.deadlines.first() {
            if deadline >= self.now {
                break;
            }
            self.deadlines.pop_first();
            self.expire(idx);
        }
    }

    /// R7: the contact's gap outlived `wait_timeout`; its deadline is already removed.
    fn expire(&mut self, idx: u32) {
        let now = self.now;
        let contact = &self.contacts[idx];
        let Some(pending) = contact.pending() else {
            return;
        };
        let missing = contact.resolved + 1;
        match self.config.on_timeout {
            TimeoutPolicy::Hold => {
                self.hold(idx, HoldReason::WaitTimeout { missing });
                self.evict_waiting(idx, |w| ReviewReason::WaitTimeout {
                    missing,
                    waited_ms: now.since(w.since),
                });
            }
            TimeoutPolicy::Skip => {
                let waited_ms = now.since(pending.gap_since);
                let first = pending.waiting.first().map_or(missing, |w| w.seq);
                if first > missing {
                    let contact = &mut self.contacts[idx];
                    contact.resolved = first - 1;
                    let skipped = Decision::Skipped {
                        contact_id: contact.id.to_string(),
                        from: missing,
                        to: first - 1,
                        cause: SkipCause::WaitTimeout { waited_ms },
                    };
                    self.emit(idx, None, skipped);
                    self.touch(idx);
                }
                self.release_ready(idx, true);
            }
        }
        self.backpressure();
    }

    /// R5: what memory knows about `intent_id`: waiting, or in the recent window.
    fn known_outcome(&self, hash: u64, intent_id: &str) -> Option<PriorOutcome> {
        if self.waiting_total > 0 {
            let contacts = &self.contacts;
            let waiting = |s: &IdSlot| contacts.get(s.contact).and_then(|c| c.waiting(s.seq));
            let found = self.waiting_ids.find(hash, |s| {
                waiting(s).is_some_and(|w| w.intent.meta.intent_id == intent_id)
            });
            if let Some((slot, w)) = found.and_then(|s| waiting(s).map(|w| (s, w))) {
                return Some(PriorOutcome {
                    fingerprint: w.intent.meta.fingerprint,
                    outcome: Outcome::Waiting {
                        commit_sequence: slot.seq,
                    },
                });
            }
        }
        self.recent.get(hash, intent_id)
    }

    fn remember(&mut self, hash: u64, meta: &IntentMeta, outcome: Outcome) {
        let prior = PriorOutcome {
            fingerprint: meta.fingerprint,
            outcome,
        };
        self.recent.record(hash, &meta.intent_id, prior);
    }

    /// R3/R6: resolves slot `resolved + 1` with `intent`: its commit, or a version conflict.
    fn settle(&mut self, idx: u32, intent: Intent<T>, id_hash: u64) {
        let contact = &mut self.contacts[idx];
        let seq = contact.resolved + 1;
        contact.resolved = seq;
        contact.next = contact.next.max(seq + 1);
        let expected = intent.meta.expected_version;
        let actual = contact.version;
        if expected != 0 && expected != actual {
            let outcome = Outcome::Blocked {
                reason: Reason::VersionConflict,
                commit_sequence: seq,
            };
            self.remember(id_hash, &intent.meta, outcome);
            let reason = BlockReason::VersionConflict { expected, actual };
            let decision = Decision::Blocked {
                intent,
                commit_sequence: seq,
                reason,
            };
            self.emit_about(idx, decision);
        } else {
            contact.version = actual + 1;
            let outcome = Outcome::Committed {
                commit_sequence: seq,
                contact_version: actual + 1,
            };
            self.remember(id_hash, &intent.meta, outcome);
            let decision = Decision::Commit {
                intent,
                commit_sequence: seq,
                contact_version: actual + 1,
            };
            self.emit_about(idx, decision);
        }
        self.touch(idx);
    }

    /// Settles every waiting intent that became ready, in sequence order, then restarts the
    /// gap clock if the contact progressed (or drops its waiting list if empty).
    fn release_ready(&mut self, idx: u32, mut progressed: bool) {
        loop {
            let contact = &mut self.contacts[idx];
            let ready = contact.resolved + 1;
            let Some(pending) = contact.pending_mut() else {
                break;
            };
            if pending.waiting.first().map(|w| w.seq) != Some(ready) {
                break;
            }
            let waiting = pending.waiting.remove(0);
            let hash = self.forget_waiting(idx, waiting.seq, &waiting.intent.meta);
            self.settle(idx, waiting.intent, hash);
            progressed = true;
        }
        let (now, timeout_ms) = (self.now, self.timeout_ms);
        let contact = &mut self.contacts[idx];
        let Some(pending) = contact.pending_mut() else {
            return;
        };
        if pending.waiting.is_empty() {
            self.deadlines
                .remove(&(pending.gap_since.plus(timeout_ms), idx));
            contact.take_pending();
        } else if progressed {
            self.deadlines
                .remove(&(pending.gap_since.plus(timeout_ms), idx));
            pending.gap_since = now;
            self.deadlines.insert((now.plus(timeout_ms), idx));
        }
    }

    /// R3: the intent waits for its predecessor.
    fn enqueue(&mut self, idx: u32, seq: u64, intent: Intent<T>, id_hash: u64) {
        let (now, timeout_ms) = (self.now, self.timeout_ms);
        let contact = &mut self.contacts[idx];
        contact.next = contact.next.max(seq + 1);
        let priority = intent.meta.priority;
        let size = intent.meta.size;
        let wait = Decision::Wait {
            intent_id: intent.meta.intent_id.clone(),
            contact_id: intent.meta.contact_id.clone(),
            offset: intent.meta.offset,
            commit_sequence: seq,
            missing: contact.resolved + 1,
        };
        let pending = contact.pending_or_insert_with(|| {
            self.deadlines.insert((now.plus(timeout_ms), idx));
            Pending {
                gap_since: now,
                waiting: Vec::new(),
            }
        });
        let at = pending.waiting.partition_point(|w| w.seq < seq);
        pending.waiting.insert(
            at,
            Waiting {
                seq,
                since: now,
                intent,
            },
        );
        let slot = IdSlot {
            hash: id_hash,
            contact: idx,
            seq,
        };
        self.waiting_ids.insert_unique(id_hash, slot, |s| s.hash);
        self.waiting_total += 1;
        self.waiting_bytes += u64::from(size);
        self.touch(idx);
        self.emit(idx, Some(priority), wait);
        self.backpressure();
    }

    /// Bounded memory: the contact's backlog is full, hold it and free its memory.
    fn overflow(&mut self, idx: u32, intent: Intent<T>, claimed: u64, id_hash: u64) {
        let limit = self.config.max_pending_per_contact;
        let reason = ReviewReason::ContactBacklogOverflow { limit };
        self.hold(idx, HoldReason::BacklogOverflow { limit });
        self.evict_waiting(idx, |_| reason.clone());
        self.review(idx, intent, claimed, reason, id_hash);
        self.backpressure();
    }

    fn hold(&mut self, idx: u32, reason: HoldReason) {
        let since = self.now;
        let contact = &mut self.contacts[idx];
        contact.set_hold(Hold { since, reason });
        let held = Decision::ContactHeld {
            contact_id: contact.id.to_string(),
            reason,
        };
        self.held.insert(idx);
        self.emit(idx, None, held);
        self.touch(idx);
    }

    /// Sends every waiting intent of the contact to manual review, in sequence order.
    /// Their slots stay unresolved.
    fn evict_waiting(&mut self, idx: u32, reason: impl Fn(&Waiting<T>) -> ReviewReason) {
        let Some(pending) = self.contacts[idx].take_pending() else {
            return;
        };
        self.deadlines
            .remove(&(pending.gap_since.plus(self.timeout_ms), idx));
        for waiting in pending.waiting {
            let hash = self.forget_waiting(idx, waiting.seq, &waiting.intent.meta);
            let why = reason(&waiting);
            self.review(idx, waiting.intent, waiting.seq, why, hash);
        }
        self.touch(idx);
    }

    /// Drops a waiting intent from the id index and the backlog count; returns its id hash.
    fn forget_waiting(&mut self, idx: u32, seq: u64, meta: &IntentMeta) -> u64 {
        let hash = self.id_hasher.hash_one(meta.intent_id.as_str());
        self.waiting_bytes = self.waiting_bytes.saturating_sub(u64::from(meta.size));
        if let Ok(entry) = self
            .waiting_ids
            .find_entry(hash, |s| s.contact == idx && s.seq == seq)
        {
            entry.remove();
        }
        self.waiting_total = self.waiting_total.saturating_sub(1);
        hash
    }

    /// Emits `PausePartition` / `ResumePartition` when the backlog crosses its marks (in
    /// intents or in bytes: either mark pauses, both must be passed to resume).
    fn backpressure(&mut self) {
        let (waiting, bytes) = (self.waiting_total, self.waiting_bytes);
        let c = &self.config;
        let over =
            waiting >= c.max_pending_per_partition || bytes >= c.max_pending_bytes_per_partition;
        let under = waiting < c.resume_pending_below && bytes < c.resume_pending_bytes_below;
        if !self.paused && over {
            self.paused = true;
            self.output
                .push_partition(Decision::PausePartition { waiting });
        } else if self.paused && under {
            self.paused = false;
            self.output
                .push_partition(Decision::ResumePartition { waiting });
        }
    }

    fn review(
        &mut self,
        idx: u32,
        intent: Intent<T>,
        commit_sequence: u64,
        reason: ReviewReason,
        id_hash: u64,
    ) {
        let outcome = Outcome::ManualReview {
            reason: reason.code(),
            commit_sequence,
        };
        self.remember(id_hash, &intent.meta, outcome);
        let decision = Decision::ManualReview {
            intent,
            commit_sequence,
            reason,
        };
        self.emit_about(idx, decision);
    }

    fn block(
        &mut self,
        idx: u32,
        intent: Intent<T>,
        commit_sequence: u64,
        reason: BlockReason,
        id_hash: u64,
    ) {
        let outcome = Outcome::Blocked {
            reason: reason.code(),
            commit_sequence,
        };
        self.remember(id_hash, &intent.meta, outcome);
        let decision = Decision::Blocked {
            intent,
            commit_sequence,
            reason,
        };
        self.emit_about(idx, decision);
    }

    /// Invalid input for a known contact: manual review, remembered nowhere.
    fn reject(&mut self, idx: u32, intent: Intent<T>, kind: InvalidKind) {
        let decision = Decision::ManualReview {
            intent,
            commit_sequence: 0,
            reason: ReviewReason::InvalidIntent { kind },
        };
        self.emit_about(idx, decision);
    }

    /// Invalid input that names no usable contact.
    fn reject_loose(&mut self, intent: Intent<T>, kind: InvalidKind) {
        let priority = intent.meta.priority;
        let decision = Decision::ManualReview {
            intent,
            commit_sequence: 0,
            reason: ReviewReason::InvalidIntent { kind },
        };
        self.output.push_loose(priority, decision);
    }

    /// Emits a decision that carries its intent (its priority counts for R4).
    fn emit_about(&mut self, idx: u32, decision: Decision<T>) {
        let priority = decision.intent_meta().map(|m| m.priority);
        self.emit(idx, priority, decision);
    }

    fn emit(&mut self, idx: u32, priority: Option<i32>, decision: Decision<T>) {
        let contact = &mut self.contacts[idx];
        self.output
            .push_contact(&mut contact.group, idx, priority, decision);
    }

    fn touch(&mut self, idx: u32) {
        let contact = &mut self.contacts[idx];
        if !contact.dirty {
            contact.dirty = true;
            self.dirty.push(idx);
        }
    }
}
