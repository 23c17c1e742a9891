//! What goes into the sequencer: intent metadata, the opaque payload, the caller's clock and
//! what the durable idempotency store already knows about an intent.

use serde::{Deserialize, Serialize};

use super::decision::{Reason, State};

/// Highest sequence (and version) the sequencer hands out or accepts.
///
/// Sequences land in PostgreSQL `BIGINT` columns, which are signed, so anything above
/// `i64::MAX` is rejected as invalid input instead of wrapping in a store.
pub const MAX_SEQUENCE: u64 = i64::MAX as u64;

/// A point on the caller's clock, in milliseconds.
///
/// The sequencer never reads a clock: every event carries the time at which it happened, so
/// tests and replays are deterministic.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Millis(pub u64);

impl Millis {
    /// Milliseconds from `earlier` to `self`, zero if `earlier` is not earlier.
    pub fn since(self, earlier: Millis) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// `self` moved `ms` milliseconds later, saturating at the end of time.
    pub fn plus(self, ms: u64) -> Millis {
        Millis(self.0.saturating_add(ms))
    }
}

/// The sequencing-relevant fields of one consumed intent record.
///
/// `0` means "absent" for `causal_sequence` and `expected_version`, as in the protobuf.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IntentMeta {
    /// Idempotency key.
    pub intent_id: String,
    /// The contact whose causal sequence this intent joins (the record key).
    pub contact_id: String,
    /// Producer-defined commit sequence (strict mode), `0` to let the sequencer assign one.
    pub causal_sequence: u64,
    /// Contact version the producer saw, `0` for no guard.
    pub expected_version: u64,
    /// `dispatch_priority`: higher is more urgent. Orders contacts, never intents of a contact.
    pub priority: i32,
    /// Hash of the intent's content, computed by the caller; tells a redelivery (same
    /// fingerprint) from a conflicting reuse of the `intent_id` (different fingerprint).
    pub fingerprint: u64,
    /// Source offset, so the caller can match a decision to its input record.
    pub offset: i64,
    /// Set when an operator re-submits an intent that ended in manual review.
    pub resubmission: bool,
    /// Bytes the intent's payload holds in memory while it waits (the partition's bound counts
    /// them too).
    #[serde(default)]
    pub size: u32,
}

/// An intent with the caller's payload (e.g. the decoded record), carried untouched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent<T> {
    pub meta: IntentMeta,
    pub payload: T,
}

/// The outcome an `intent_id` ended in (or, in memory, is waiting in).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Outcome {
    /// The effect was released with this commit sequence and resulting contact version.
    Committed {
        commit_sequence: u64,
        contact_version: u64,
    },
    /// Held by the sequencer, waiting for its predecessor (never comes from the store: waiting
    /// intents are part of the contact state).
    Waiting { commit_sequence: u64 },
    /// Blocked by a conflict; final.
    Blocked {
        reason: Reason,
        commit_sequence: u64,
    },
    /// Sent to manual review; final unless an operator re-submits the intent.
    /// `commit_sequence` is the slot the intent held (0 if none), reclaimed on re-submission.
    ManualReview {
        reason: Reason,
        commit_sequence: u64,
    },
}

impl Outcome {
    /// The contract state this outcome is in.
    pub fn state(&self) -> State {
        match self {
            Outcome::Committed { .. } => State::CommittedCausal,
            Outcome::Waiting { .. } => State::WaitingPreviousCommit,
            Outcome::Blocked { .. } => State::BlockedConflict,
            Outcome::ManualReview { .. } => State::ManualReview,
        }
    }
}

/// What the durable idempotency store knows about an `intent_id`, looked up by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PriorOutcome {
    pub fingerprint: u64,
    pub outcome: Outcome,
}
