//! What comes out of the sequencer: decisions, with the contract's state and reason names.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::intent::{Intent, IntentMeta, Millis, Outcome};

/// The contract's outcome states (`state` in logs, metrics and audit rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum State {
    CommittedCausal,
    WaitingPreviousCommit,
    Duplicate,
    BlockedConflict,
    ManualReview,
}

impl State {
    pub const ALL: [State; 5] = [
        State::CommittedCausal,
        State::WaitingPreviousCommit,
        State::Duplicate,
        State::BlockedConflict,
        State::ManualReview,
    ];

    /// Stable name, as written in the contract.
    pub fn as_str(self) -> &'static str {
        match self {
            State::CommittedCausal => "committed_causal",
            State::WaitingPreviousCommit => "waiting_previous_commit",
            State::Duplicate => "duplicate",
            State::BlockedConflict => "blocked_conflict",
            State::ManualReview => "manual_review",
        }
    }

    /// Whether a record in this state is done (everything but waiting).
    pub fn is_terminal(self) -> bool {
        self != State::WaitingPreviousCommit
    }
}

/// A stored or received name that is not one of the contract's states or reasons.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?}")]
pub struct UnknownName {
    pub what: &'static str,
    pub value: String,
}

impl std::str::FromStr for State {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        State::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| UnknownName {
                what: "state",
                value: s.to_owned(),
            })
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The contract's reason codes (`reason` in manual-review records, logs and metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Reason {
    WaitTimeout,
    ContactOnHold,
    VersionConflict,
    SequenceConflict,
    IdempotencyConflict,
    ContactBacklogOverflow,
    InvalidIntent,
    /// The durable write or the Kafka transaction failed deterministically for this record.
    Unprocessable,
}

impl Reason {
    pub const ALL: [Reason; 8] = [
        Reason::WaitTimeout,
        Reason::ContactOnHold,
        Reason::VersionConflict,
        Reason::SequenceConflict,
        Reason::IdempotencyConflict,
        Reason::ContactBacklogOverflow,
        Reason::InvalidIntent,
        Reason::Unprocessable,
    ];

    /// Stable name, as written in the contract.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::WaitTimeout => "WAIT_TIMEOUT",
            Reason::ContactOnHold => "CONTACT_ON_HOLD",
            Reason::VersionConflict => "VERSION_CONFLICT",
            Reason::SequenceConflict => "SEQUENCE_CONFLICT",
            Reason::IdempotencyConflict => "IDEMPOTENCY_CONFLICT",
            Reason::ContactBacklogOverflow => "CONTACT_BACKLOG_OVERFLOW",
            Reason::InvalidIntent => "INVALID_INTENT",
            Reason::Unprocessable => "UNPROCESSABLE",
        }
    }
}

impl std::str::FromStr for Reason {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reason::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| UnknownName {
                what: "reason",
                value: s.to_owned(),
            })
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an intent is `blocked_conflict`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum BlockReason {
    /// `expected_version` differed from the contact's committed version when its turn came.
    /// The slot is resolved: successors go on.
    VersionConflict { expected: u64, actual: u64 },
    /// The claimed sequence is already passed (`owner` is `None`) or owned by another waiting
    /// intent (`owner` names it). The slot and its owner are untouched.
    SequenceConflict {
        claimed: u64,
        resolved_through: u64,
        owner: Option<String>,
    },
    /// The `intent_id` already has an outcome for different content.
    IdempotencyConflict {
        existing_fingerprint: u64,
        received_fingerprint: u64,
        existing: Outcome,
    },
}

impl BlockReason {
    pub fn code(&self) -> Reason {
        match self {
            BlockReason::VersionConflict { .. } => Reason::VersionConflict,
            BlockReason::SequenceConflict { .. } => Reason::SequenceConflict,
            BlockReason::IdempotencyConflict { .. } => Reason::IdempotencyConflict,
        }
    }
}

/// What is wrong with an intent the sequencer cannot place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InvalidKind {
    EmptyIntentId,
    EmptyContactId,
    /// `causal_sequence` (or a re-submitted slot) above [`super::MAX_SEQUENCE`].
    SequenceOutOfRange,
    /// The contact's assigned sequences reached [`super::MAX_SEQUENCE`].
    SequenceSpaceExhausted,
    /// The partition already tracks `u32::MAX` contacts.
    TooManyContacts,
}

impl InvalidKind {
    pub fn as_str(self) -> &'static str {
        match self {
            InvalidKind::EmptyIntentId => "intent_id is empty",
            InvalidKind::EmptyContactId => "contact_id is empty",
            InvalidKind::SequenceOutOfRange => "causal_sequence is above 2^63-1",
            InvalidKind::SequenceSpaceExhausted => "contact sequence space exhausted",
            InvalidKind::TooManyContacts => "partition contact table is full",
        }
    }
}

/// Why an intent goes to manual review.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ReviewReason {
    /// The contact's gap outlived `wait_timeout`: `missing` is the lowest unresolved sequence,
    /// `waited_ms` how long this intent had been waiting.
    WaitTimeout { missing: u64, waited_ms: u64 },
    /// The contact is on hold until an operator releases it.
    ContactOnHold {
        hold: HoldReason,
        held_since: Millis,
    },
    /// The contact had `limit` waiting intents already.
    ContactBacklogOverflow { limit: u32 },
    /// Input the sequencer cannot place.
    InvalidIntent { kind: InvalidKind },
}

impl ReviewReason {
    pub fn code(&self) -> Reason {
        match self {
            ReviewReason::WaitTimeout { .. } => Reason::WaitTimeout,
            ReviewReason::ContactOnHold { .. } => Reason::ContactOnHold,
            ReviewReason::ContactBacklogOverflow { .. } => Reason::ContactBacklogOverflow,
            ReviewReason::InvalidIntent { .. } => Reason::InvalidIntent,
        }
    }
}

/// Why a contact is on hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HoldReason {
    /// Its gap at `missing` outlived `wait_timeout` (policy `Hold`).
    WaitTimeout { missing: u64 },
    /// It had `limit` waiting intents and another one had to wait.
    BacklogOverflow { limit: u32 },
}

impl HoldReason {
    pub fn code(&self) -> Reason {
        match self {
            HoldReason::WaitTimeout { .. } => Reason::WaitTimeout,
            HoldReason::BacklogOverflow { .. } => Reason::ContactBacklogOverflow,
        }
    }
}

/// Why sequences were skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SkipCause {
    /// Policy `Skip`: the gap lasted `waited_ms` (more than `wait_timeout`).
    WaitTimeout { waited_ms: u64 },
    /// An operator released the contact with [`Release::SkipTo`].
    Operator,
}

/// How an operator releases a held contact.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Release {
    /// Clear the hold; unresolved sequences stay unresolved (re-submit their intents).
    Resume,
    /// Clear the hold and skip every unresolved sequence below `n`: `n` commits next.
    SkipTo(u64),
}

/// One decision. Drained in order by [`super::Sequencer::drain_decisions`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision<T> {
    /// `committed_causal`: release the effect. `contact_version` is the version after it.
    Commit {
        intent: Intent<T>,
        commit_sequence: u64,
        contact_version: u64,
    },
    /// `waiting_previous_commit`: the sequencer keeps the intent (and payload) until
    /// `missing`, the lowest unresolved predecessor, is resolved. Exactly one terminal
    /// decision for this intent follows later.
    Wait {
        intent_id: String,
        contact_id: String,
        offset: i64,
        commit_sequence: u64,
        missing: u64,
    },
    /// `duplicate`: the `intent_id` already has `prior`; no effect.
    Duplicate { intent: Intent<T>, prior: Outcome },
    /// `blocked_conflict`: no effect. `commit_sequence` is the slot involved (0 if none).
    Blocked {
        intent: Intent<T>,
        commit_sequence: u64,
        reason: BlockReason,
    },
    /// `manual_review`: no effect, the slot (`commit_sequence`, 0 if none) stays unresolved.
    ManualReview {
        intent: Intent<T>,
        commit_sequence: u64,
        reason: ReviewReason,
    },
    /// Sequences `from..=to` of the contact were resolved without an effect. One decision per
    /// contiguous run, so one audit row can name every skipped sequence without an unbounded
    /// burst of decisions for a far-away sequence.
    Skipped {
        contact_id: String,
        from: u64,
        to: u64,
        cause: SkipCause,
    },
    /// The contact went on hold.
    ContactHeld {
        contact_id: String,
        reason: HoldReason,
    },
    /// An operator released the contact; `resolved_through` is its high-water mark afterwards.
    ContactReleased {
        contact_id: String,
        release: Release,
        resolved_through: u64,
    },
    /// Backpressure: stop fetching this partition (`waiting` intents are held).
    PausePartition { waiting: usize },
    /// The backlog drained below the resume mark: fetch again.
    ResumePartition { waiting: usize },
}

impl<T> Decision<T> {
    /// The contract state of the intent this decision is about, if it is about one.
    pub fn state(&self) -> Option<State> {
        match self {
            Decision::Commit { .. } => Some(State::CommittedCausal),
            Decision::Wait { .. } => Some(State::WaitingPreviousCommit),
            Decision::Duplicate { .. } => Some(State::Duplicate),
            Decision::Blocked { .. } => Some(State::BlockedConflict),
            Decision::ManualReview { .. } => Some(State::ManualReview),
            _ => None,
        }
    }

    /// The contract reason code, where there is one.
    pub fn reason(&self) -> Option<Reason> {
        match self {
            Decision::Blocked { reason, .. } => Some(reason.code()),
            Decision::ManualReview { reason, .. } => Some(reason.code()),
            Decision::ContactHeld { reason, .. } => Some(reason.code()),
            Decision::Skipped {
                cause: SkipCause::WaitTimeout { .. },
                ..
            } => Some(Reason::WaitTimeout),
            _ => None,
        }
    }

    /// The contact concerned; `None` for partition-level decisions.
    pub fn contact_id(&self) -> Option<&str> {
        match self {
            Decision::Commit { intent, .. }
            | Decision::Duplicate { intent, .. }
            | Decision::Blocked { intent, .. }
            | Decision::ManualReview { intent, .. } => Some(&intent.meta.contact_id),
            Decision::Wait { contact_id, .. }
            | Decision::Skipped { contact_id, .. }
            | Decision::ContactHeld { contact_id, .. }
            | Decision::ContactReleased { contact_id, .. } => Some(contact_id),
            Decision::PausePartition { .. } | Decision::ResumePartition { .. } => None,
        }
    }

    /// The intent carried back to the caller (terminal decisions about an intent).
    pub fn intent(&self) -> Option<&Intent<T>> {
        match self {
            Decision::Commit { intent, .. }
            | Decision::Duplicate { intent, .. }
            | Decision::Blocked { intent, .. }
            | Decision::ManualReview { intent, .. } => Some(intent),
            _ => None,
        }
    }

    /// Metadata of the intent carried back, if any.
    pub fn intent_meta(&self) -> Option<&IntentMeta> {
        self.intent().map(|i| &i.meta)
    }

    /// The source offset of the intent this decision is about, if any.
    pub fn offset(&self) -> Option<i64> {
        match self {
            Decision::Wait { offset, .. } => Some(*offset),
            _ => self.intent_meta().map(|m| m.offset),
        }
    }
}
