//! What the verifier reads, as a plain value: no I/O, no decoding, no judgement.
//!
//! [`super::observe`] fills an [`Observed`] from Kafka and PostgreSQL; [`super::check`] judges
//! it. Unit tests build one by hand. Topic records stay raw bytes (decoding them is part of
//! the judgement: a record that does not decode is a finding, not a reading error); what
//! PostgreSQL holds is already mapped to facts (a skip, a release, a waiting intent), so a
//! schema change touches the reading part only.

use std::collections::BTreeMap;

use crate::config::LimitsConfig;
use crate::sequencer::TimeoutPolicy;

/// A record position: (partition, offset).
pub type Position = (i32, i64);

/// Everything `verify` looked at.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// The configuration the processor runs with (as far as the verifier knows it: its own).
    pub settings: Settings,
    /// Name of the intents topic: manual-review records name it as their source.
    pub intents_topic: String,
    /// Every record of the intents topic (read first).
    pub intents: Vec<InputRecord>,
    /// Every record of the side-effects topic.
    pub effects: Vec<OutputRecord>,
    /// Every record of the manual-review topic.
    pub reviews: Vec<OutputRecord>,
    /// The processor group's committed position per intents partition.
    pub committed: BTreeMap<i32, CommittedOffset>,
    /// Outcome rows of the audit (`cc_transition`), committed batches only.
    pub audit: Vec<AuditRecord>,
    /// Contacts with waiting intents or on hold, as of their last committed batch.
    pub contacts: Vec<ContactState>,
    /// When records started waiting for their predecessor (`waiting_previous_commit` rows),
    /// committed batches only.
    pub wait_starts: Vec<WaitStart>,
    /// Audited skips of unresolved sequences.
    pub skips: Vec<Skip>,
    /// Operator releases of held contacts, as applied by the processor.
    pub releases: Vec<Release>,
    /// Operator re-submissions of manual-review or blocked intents (contract R9).
    pub resubmissions: Vec<Resubmission>,
    /// What operators asked for through the admin API or the CLI (R9): the only requests a
    /// release or a re-submission may answer.
    pub requests: Vec<OperatorRequest>,
    /// What the reading found but could not interpret (an unreadable stored state, offset
    /// metadata that is not a recovery point): the check cannot vouch for what it hides.
    pub unreadable: Vec<String>,
}

/// The processor settings the contract's rules depend on.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `sequencer.wait_timeout`, in milliseconds (R7).
    pub wait_timeout_ms: u64,
    /// `sequencer.on_timeout`: hold (manual review) or skip (R7).
    pub on_timeout: TimeoutPolicy,
    /// `sequencer.max_pending_per_contact` (bounded memory, §5).
    pub max_pending_per_contact: usize,
    /// Input validation limits (`limits.*`), as the verifier reads input records (§5).
    pub limits: LimitsConfig,
}

impl Default for Settings {
    fn default() -> Self {
        let s = crate::config::Config::default();
        Settings {
            wait_timeout_ms: u64::try_from(s.sequencer.wait_timeout.as_millis())
                .unwrap_or(u64::MAX),
            on_timeout: s.sequencer.on_timeout,
            max_pending_per_contact: s.sequencer.max_pending_per_contact,
            limits: s.limits,
        }
    }
}

/// A record of the intents topic, as produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InputRecord {
    pub partition: i32,
    pub offset: i64,
    /// The record's Kafka timestamp (milliseconds), when it has one.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    /// `None` for a tombstone.
    pub value: Option<Vec<u8>>,
    /// The record the processor says this one is a forwarded copy of (its
    /// `cc-forwarded-from` header, naming a record of the same topic).
    pub forwarded_from: Option<Position>,
}

/// A record of an output topic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputRecord {
    pub partition: i32,
    pub offset: i64,
    /// `None` for a record without a value.
    pub value: Option<Vec<u8>>,
}

/// A partition's committed position in the processor's group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommittedOffset {
    /// The next offset to consume; -1 when the group has committed nothing.
    pub offset: i64,
    /// The last batch whose Kafka transaction committed (its recovery point; 0 when none).
    pub batch: u64,
}

/// What an audit row says happened to one input record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AuditOutcome {
    /// `committed_causal`: an effect.
    Committed,
    /// `blocked_conflict` or `manual_review`: a manual-review record.
    Reviewed,
}

/// One outcome row of the audit, of a batch committed in Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// The input record it is about.
    pub source: Position,
    pub intent_id: String,
    pub contact_id: String,
    pub outcome: AuditOutcome,
    /// The review reason (empty for a commit).
    pub reason: String,
    pub commit_sequence: u64,
    /// Its batch had committed in Kafka before the output topics were read, so its output
    /// must be among what was read.
    pub before_outputs: bool,
    /// When its batch was written (milliseconds, PostgreSQL's clock: the rows of one batch
    /// share it, a later batch's are later).
    pub at_ms: i64,
}

/// A contact's stored state as of its last committed batch, where it matters: waiting intents
/// or a hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContactState {
    pub contact_id: String,
    pub on_hold: bool,
    pub waiting: Vec<WaitingIntent>,
}

/// An intent waiting for its predecessor (`waiting_previous_commit`, R3).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WaitingIntent {
    pub intent_id: String,
    pub commit_sequence: u64,
    /// The input record it came from.
    pub source: Position,
}

/// A record that started waiting for its predecessor (R3), from its audit row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitStart {
    /// The input record.
    pub source: Position,
    pub intent_id: String,
    /// Its batch's time (milliseconds, PostgreSQL's clock).
    pub at_ms: i64,
}

/// Who skipped a contact's unresolved sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipCause {
    /// An operator's release with `skip_to` (R7).
    Operator,
    /// The `skip` timeout policy (R7).
    WaitTimeout,
}

/// Sequences `from ..= to` of a contact, skipped and audited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    pub contact_id: String,
    pub from: u64,
    pub to: u64,
    pub cause: SkipCause,
    /// When the skip was written (milliseconds).
    pub at_ms: i64,
}

/// A batch of the processor: its input partition and number (`cc_transition.batch_no`).
pub type BatchRef = (i32, i64);

/// An operator released a held contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub contact_id: String,
    /// `Some(n)`: the unresolved sequences below `n` were skipped; `None`: resumed.
    pub skip_to: Option<u64>,
    /// When the release was applied (milliseconds, PostgreSQL's clock: the time of its
    /// batch's audit rows).
    pub at_ms: i64,
    /// The batch that applied it.
    pub batch: BatchRef,
}

/// An operator re-submitted a manual-review or blocked intent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resubmission {
    pub intent_id: String,
    pub contact_id: String,
    /// When it was recorded (milliseconds).
    pub at_ms: i64,
    /// The batch that applied it.
    pub batch: BatchRef,
}

/// An operator's request through the admin API or the CLI (a `cc_command` row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorRequest {
    /// The command's id.
    pub command: i64,
    pub contact_id: String,
    pub action: RequestedAction,
    /// The batch that applied it, when one did (not refused, not cancelled).
    pub applied: Option<BatchRef>,
    /// Whether the admin audit (`cc_admin_audit`) recorded the request: the operator path
    /// writes both in one transaction.
    pub audited: bool,
}

/// What an operator asked for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RequestedAction {
    /// Release a held contact where it stands.
    Resume,
    /// Release a held contact, skipping its unresolved sequences below this one.
    SkipTo(u64),
    /// Re-submit this manual-review or blocked intent.
    Resubmit(String),
}

impl std::fmt::Display for RequestedAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Resume => write!(f, "release, resume"),
            Self::SkipTo(n) => write!(f, "release, skip to {n}"),
            Self::Resubmit(id) => write!(f, "re-submission of {id}"),
        }
    }
}
