//! The pure translation step: one partition's sequencer decisions and invalid records become a
//! [`PartitionPlan`] — the records to produce, the audit rows and contact states to write, and
//! the transition events to report once the batch has committed. No I/O and no clock: the
//! wall time stamped on outputs is passed in.
//!
//! Every audit row has exactly one [`Note`] beside it, at the same index: the row is the
//! durable form of a transition, the note what only its log line and metrics need. Reporting
//! (after the commit) walks both together, so each transition is one row, one log line and
//! one metric increment.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use prost::Message as _;

use super::kafka::OutRecord;
use super::output::{self, EffectFields, ReviewFields, Source};
use crate::intent::{InRecord, InvalidIntent, ValidIntent};
use crate::proto::{Intent as ProtoIntent, ReviewReason};
use crate::sequencer::{
    BlockReason, Decision, Intent, IntentMeta, Reason, ReviewReason as SeqReview, SkipCause, State,
};
use crate::store::postgres::{ContactRow, Forward, Transition, TransitionRow};
use crate::store::snapshot::{self, Held, RowKey, StoredContact, WaitingRow, WaitingRows};

/// Output topic names, shared cheaply by every output record.
#[derive(Debug, Clone)]
pub struct Topics {
    pub intents: Arc<str>,
    pub side_effects: Arc<str>,
    pub manual_review: Arc<str>,
    /// Which side-effects partition each contact's effects go to.
    pub effects: output::EffectPlacement,
    /// `limits.max_output_bytes`: the largest record produced (see `output::manual_review`).
    pub max_output_bytes: usize,
}

impl Topics {
    pub fn of(config: &crate::config::Config, effects: output::EffectPlacement) -> Topics {
        Topics {
            intents: config.kafka.intents_topic.as_str().into(),
            side_effects: config.kafka.side_effects_topic.as_str().into(),
            manual_review: config.kafka.manual_review_topic.as_str().into(),
            effects,
            max_output_bytes: config.limits.max_output_bytes,
        }
    }
}

/// What a partition's translation needs to know about the batch being built.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub topics: &'a Topics,
    pub partition: i32,
    /// The writer's fencing token for the partition.
    pub fence: u64,
    /// The number of the batch being built.
    pub batch_no: u64,
    /// Wall-clock time stamped on effects and reviews (ms since the Unix epoch).
    pub now_ms: i64,
}

/// Intents first seen in this batch, by source offset (ids may repeat within a batch — a retry,
/// a conflicting reuse — offsets may not).
pub type Fresh = HashMap<i64, Arc<ValidIntent>>;

/// What only a transition's log line and metrics need beside its audit row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Note {
    /// Intent created (producer clock) → effect committed, for a commit.
    pub latency_ms: Option<i64>,
    /// The validation failure's short name, for an invalid record.
    pub invalid_kind: Option<&'static str>,
    /// The review record this transition produced, by reason.
    pub review: Option<Reason>,
}

/// One partition's part of a batch.
#[derive(Debug, Default)]
pub struct PartitionPlan {
    pub outputs: Vec<OutRecord>,
    pub transitions: Vec<TransitionRow>,
    /// `notes[i]` belongs to `transitions[i]`.
    pub notes: Vec<Note>,
    pub contacts: Vec<ContactRow>,
    /// Rows of the intents that started waiting (`cc_waiting`).
    pub waiting: Vec<WaitingRow>,
    /// Rows of the intents this batch released: deleted by the partition's next batch.
    pub released: Vec<RowKey>,
    /// Rows the partition's previous batch released, deleted by this one.
    pub deleted: Vec<RowKey>,
    /// The sequencer asked to pause (`Some(true)`) or resume (`Some(false)`) the partition.
    pub pause: Option<bool>,
    /// Effects among `outputs`.
    pub effects: usize,
    /// Records forwarded to their contacts' owners (the write checks the owners).
    pub forwards: Vec<Forward>,
}

impl PartitionPlan {
    /// Whether the batch has nothing to write or produce for this partition.
    pub fn is_empty(&self) -> bool {
        self.outputs.is_empty() && self.transitions.is_empty() && self.contacts.is_empty()
    }

    fn push(&mut self, row: TransitionRow, note: Note) {
        self.transitions.push(row);
        self.notes.push(note);
    }
}

/// The intent-level facts of an audit row.
struct RowFacts<'a> {
    offset: i64,
    intent_id: &'a str,
    contact_id: &'a str,
    clinic_id: &'a str,
    correlation_id: &'a str,
    fingerprint: u64,
}

impl<'a> RowFacts<'a> {
    fn of(intent: &'a ProtoIntent, offset: i64, fingerprint: u64) -> Self {
        RowFacts {
            offset,
            intent_id: &intent.intent_id,
            contact_id: &intent.contact_id,
            clinic_id: &intent.clinic_id,
            correlation_id: &intent.correlation_id,
            fingerprint,
        }
    }
}

/// A blocked or manual-reviewed intent: what its review record and audit row say.
struct Rejection {
    to: State,
    reason: Reason,
    detail: String,
    /// The sequence the contact was waiting for (0 if none).
    expected: u64,
    /// The slot involved (0 if none).
    commit_sequence: u64,
    waited_ms: u64,
}

/// The sequencer's view of a decoded intent (what goes in; `decisions` translates what comes
/// out). Never a re-submission: nothing in a record reopens a decision (R9); only an
/// operator's command does (`Engine::apply_commands`).
pub fn meta(v: &ValidIntent, record: &InRecord) -> IntentMeta {
    IntentMeta {
        intent_id: v.intent.intent_id.clone(),
        contact_id: v.intent.contact_id.clone(),
        causal_sequence: v.intent.causal_sequence,
        expected_version: v.intent.expected_version,
        priority: v.intent.dispatch_priority,
        fingerprint: v.fingerprint,
        offset: record.offset,
        resubmission: false,
        size: record_size(record),
    }
}

/// The bytes a record holds in memory while it waits.
fn record_size(record: &InRecord) -> u32 {
    let key = record.key.as_ref().map_or(0, Vec::len);
    let value = record.value.as_ref().map_or(0, Vec::len);
    u32::try_from(key + value).unwrap_or(u32::MAX)
}

/// Translates one partition's drained decisions, in order.
pub fn decisions(
    ctx: &Context<'_>,
    fresh: &Fresh,
    decisions: Vec<Decision<Held>>,
    plan: &mut PartitionPlan,
) {
    // Offsets of intents that started waiting in this drain: their later decision in the same
    // drain comes from `waiting_previous_commit`, not from `received`.
    let mut waited_now: HashSet<i64> = HashSet::new();
    for d in decisions {
        match d {
            Decision::Commit {
                intent,
                commit_sequence,
                contact_version,
            } => {
                let waited = waited(fresh, &waited_now, &intent);
                commit(
                    ctx,
                    fresh,
                    plan,
                    &intent,
                    waited,
                    commit_sequence,
                    contact_version,
                );
            }
            Decision::Wait {
                intent_id,
                contact_id,
                offset,
                commit_sequence,
                missing,
            } => {
                waited_now.insert(offset);
                let at = WaitAt {
                    offset,
                    intent_id: &intent_id,
                    contact_id: &contact_id,
                    commit_sequence,
                    missing,
                };
                wait(ctx, fresh, plan, &at);
            }
            Decision::Duplicate { intent, prior } => duplicate(ctx, fresh, plan, &intent, prior),
            Decision::Blocked {
                intent,
                commit_sequence,
                reason,
            } => {
                let waited = waited(fresh, &waited_now, &intent);
                let r = blocked(&reason, commit_sequence);
                reject(ctx, fresh, plan, &intent, waited, r);
            }
            Decision::ManualReview {
                intent,
                commit_sequence,
                reason,
            } => {
                let waited = waited(fresh, &waited_now, &intent);
                let r = manual(&reason, commit_sequence);
                reject(ctx, fresh, plan, &intent, waited, r);
            }
            Decision::Skipped {
                contact_id,
                from,
                to,
                cause,
            } => {
                let by_operator = matches!(cause, SkipCause::Operator);
                let detail = serde_json::json!({ "from": from, "to": to }).to_string();
                let transition = Transition::Skipped { by_operator };
                contact_row(ctx, plan, &contact_id, transition, from, detail);
            }
            Decision::ContactHeld { contact_id, reason } => {
                let detail = hold_detail(&reason);
                let transition = Transition::Held {
                    reason: reason.code(),
                };
                contact_row(ctx, plan, &contact_id, transition, 0, detail);
            }
            Decision::ContactReleased {
                contact_id,
                release,
                resolved_through,
            } => {
                let detail = format!("{release:?}");
                let transition = Transition::Released;
                contact_row(ctx, plan, &contact_id, transition, resolved_through, detail);
            }
            Decision::PausePartition { .. } => plan.pause = Some(true),
            Decision::ResumePartition { .. } => plan.pause = Some(false),
        }
    }
}

/// Where an intent starts waiting.
struct WaitAt<'a> {
    offset: i64,
    intent_id: &'a str,
    contact_id: &'a str,
    commit_sequence: u64,
    missing: u64,
}

/// The row of an intent that starts `waiting_previous_commit`.
fn wait(ctx: &Context<'_>, fresh: &Fresh, plan: &mut PartitionPlan, at: &WaitAt<'_>) {
    let v = fresh.get(&at.offset);
    let facts = RowFacts {
        offset: at.offset,
        intent_id: at.intent_id,
        contact_id: at.contact_id,
        clinic_id: v.map_or("", |v| v.intent.clinic_id.as_str()),
        correlation_id: v.map_or("", |v| v.intent.correlation_id.as_str()),
        fingerprint: v.map_or(0, |v| v.fingerprint),
    };
    let transition = Transition::Record {
        waited: false,
        to: State::WaitingPreviousCommit,
        reason: None,
    };
    let detail = format!("waiting for sequence {}", at.missing);
    let row = row(ctx, &facts, transition, at.commit_sequence, 0, detail);
    plan.push(row, Note::default());
}

/// The row of a re-delivered intent: no effect.
fn duplicate(
    ctx: &Context<'_>,
    fresh: &Fresh,
    plan: &mut PartitionPlan,
    intent: &Intent<Held>,
    prior: crate::sequencer::Outcome,
) {
    let Some(decoded) = decoded(fresh, intent) else {
        unreadable(ctx, plan, intent, true);
        return;
    };
    let facts = RowFacts::of(&decoded.intent, intent.meta.offset, intent.meta.fingerprint);
    let transition = Transition::Record {
        waited: false,
        to: State::Duplicate,
        reason: None,
    };
    let detail = format!("already {}", prior.state().as_str());
    plan.push(row(ctx, &facts, transition, 0, 0, detail), Note::default());
}

fn hold_detail(reason: &crate::sequencer::HoldReason) -> String {
    match reason {
        crate::sequencer::HoldReason::WaitTimeout { missing } => {
            format!("sequence {missing} did not arrive within the wait timeout")
        }
        crate::sequencer::HoldReason::BacklogOverflow { limit } => {
            format!("{limit} intents were already waiting")
        }
    }
}

/// An operator's re-submission of a manual-review intent (R9), applied by this batch.
#[derive(Debug, Clone)]
pub struct Resubmitted {
    pub partition: i32,
    pub command: i64,
    pub actor: String,
    /// The review record the operator named, on the manual-review topic.
    pub review_partition: i32,
    pub review_offset: i64,
    /// Where the original record was consumed.
    pub source_offset: i64,
    pub intent: Arc<ValidIntent>,
    /// The slot the intent held when it went to review (0: none), which it reclaims.
    pub slot: u64,
}

/// The audit row of a re-submission, keyed by the intent id (the verifier reads it as the
/// operator's word for the intent's second outcome). The intent's new outcome follows from the
/// sequencer's decisions, like any consumed record's.
pub fn resubmitted(ctx: &Context<'_>, r: &Resubmitted, plan: &mut PartitionPlan) {
    let facts = RowFacts::of(&r.intent.intent, r.source_offset, r.intent.fingerprint);
    let detail = serde_json::json!({
        "command": r.command,
        "actor": r.actor,
        "review": { "partition": r.review_partition, "offset": r.review_offset },
    })
    .to_string();
    let row = row(ctx, &facts, Transition::Resubmitted, r.slot, 0, detail);
    plan.push(row, Note::default());
}

/// Translates a record that failed validation: its review record (raw bytes kept) and its
/// audit row, with whatever ids can still be read from it.
pub fn invalid(
    ctx: &Context<'_>,
    record: &InRecord,
    error: &InvalidIntent,
    plan: &mut PartitionPlan,
) {
    let reason = Reason::InvalidIntent;
    let note = Note {
        invalid_kind: Some(error.kind()),
        review: Some(reason),
        ..Note::default()
    };
    reject_record(ctx, record, reason, &error.to_string(), note, plan);
}

/// A record that is not sequenced (invalid, or unprocessable): its review record with the raw
/// bytes and whatever can be read of it, and an audit row whose text is made storable: what
/// failed validation may hold anything, and the row must not fail the durable write.
fn reject_record(
    ctx: &Context<'_>,
    record: &InRecord,
    reason: Reason,
    detail: &str,
    note: Note,
    plan: &mut PartitionPlan,
) {
    let partial = record
        .value
        .as_deref()
        .and_then(|v| ProtoIntent::decode(v).ok());
    let detail = storable(detail);
    plan.outputs.push(output::manual_review(
        &ctx.topics.manual_review,
        &Source {
            topic: &ctx.topics.intents,
            record,
        },
        ReviewFields {
            reason: review_reason(reason),
            detail: detail.clone(),
            intent: partial.as_ref(),
            expected_sequence: 0,
            received_sequence: partial.as_ref().map_or(0, |i| i.causal_sequence),
            waited_ms: 0,
            reviewed_at_ms: ctx.now_ms,
            fencing_token: ctx.fence,
        },
        ctx.topics.max_output_bytes,
    ));
    let p = partial.unwrap_or_default();
    let (intent_id, contact_id) = (storable(&p.intent_id), storable(&p.contact_id));
    let (clinic_id, correlation_id) = (storable(&p.clinic_id), storable(&p.correlation_id));
    let facts = RowFacts {
        offset: record.offset,
        intent_id: &intent_id,
        contact_id: &contact_id,
        clinic_id: &clinic_id,
        correlation_id: &correlation_id,
        fingerprint: 0,
    };
    let transition = Transition::Record {
        waited: false,
        to: State::ManualReview,
        reason: Some(reason),
    };
    plan.push(row(ctx, &facts, transition, 0, 0, detail), note);
}

/// Translates a record whose durable write (or transaction) fails on its own: its review record
/// (`UNPROCESSABLE`, raw bytes kept, the store's error in `detail`) and an audit row whose ids
/// are made storable (control characters replaced) — the row must not fail the same way.
pub fn unprocessable(ctx: &Context<'_>, record: &InRecord, error: &str, plan: &mut PartitionPlan) {
    let reason = Reason::Unprocessable;
    let note = Note {
        review: Some(reason),
        ..Note::default()
    };
    let detail =
        format!("the durable write or the transaction fails for this record alone: {error}");
    reject_record(ctx, record, reason, &detail, note, plan);
}

/// Text any store can hold: control characters replaced, at most 1 KiB.
fn storable(s: &str) -> String {
    let out: String = s
        .chars()
        .map(|c| if c.is_control() { '\u{FFFD}' } else { c })
        .collect();
    output::capped(out, 1024)
}

/// Translates a valid record whose contact another partition owns: the record goes, byte for
/// byte, to the owner (which decides it), and this partition's audit row says so.
pub fn forwarded(
    ctx: &Context<'_>,
    record: &InRecord,
    v: &ValidIntent,
    owner: i32,
    plan: &mut PartitionPlan,
) {
    let source = Source {
        topic: &ctx.topics.intents,
        record,
    };
    plan.outputs
        .push(output::forwarded(&source, owner, &v.intent.correlation_id));
    let facts = RowFacts::of(&v.intent, record.offset, v.fingerprint);
    let detail = format!("forwarded to partition {owner}, which owns the contact");
    let row = row(ctx, &facts, Transition::Forwarded, 0, 0, detail);
    plan.push(row, Note::default());
    plan.forwards.push(Forward {
        partition: record.partition,
        contact_id: v.intent.contact_id.clone(),
        owner,
    });
}

/// The contact states the sequencer changed, for one batched upsert, with the rows of their
/// waiting intents that start or stop waiting.
pub fn contacts(
    ctx: &Context<'_>,
    snapshots: Vec<StoredContact>,
    rows: &mut WaitingRows,
    plan: &mut PartitionPlan,
) -> Result<(), snapshot::Unreadable> {
    plan.contacts.reserve(snapshots.len());
    for s in snapshots {
        let on_hold = s.hold.is_some();
        let waiting = i32::try_from(s.waiting.len()).unwrap_or(i32::MAX);
        let contact_id = s.contact_id.clone();
        let encoded = rows.encode(s, ctx.batch_no)?;
        plan.waiting.extend(encoded.inserted);
        plan.released.extend(encoded.released);
        plan.contacts.push(ContactRow {
            contact_id,
            partition: ctx.partition,
            batch_no: ctx.batch_no,
            state: encoded.state,
            on_hold,
            waiting,
        });
    }
    Ok(())
}

/// An intent first seen in this batch that did not start waiting in this drain comes from
/// `received`; anything else was waiting.
fn waited(fresh: &Fresh, waited_now: &HashSet<i64>, intent: &Intent<Held>) -> bool {
    let offset = intent.payload.record.offset;
    !fresh.contains_key(&offset) || waited_now.contains(&offset)
}

/// The decoded intent of a decision: the cached one for intents first seen in this batch,
/// decoded again (with the correlation id it was first seen with) for intents restored from
/// the store.
fn decoded(fresh: &Fresh, intent: &Intent<Held>) -> Option<Arc<ValidIntent>> {
    if let Some(v) = fresh.get(&intent.payload.record.offset) {
        return Some(v.clone());
    }
    let value = intent.payload.record.value.as_deref()?;
    let mut decoded = ProtoIntent::decode(value).ok()?;
    decoded.correlation_id = intent.payload.correlation_id.clone();
    Some(Arc::new(ValidIntent {
        intent: decoded,
        correlation_generated: false,
        fingerprint: intent.meta.fingerprint,
    }))
}

fn commit(
    ctx: &Context<'_>,
    fresh: &Fresh,
    plan: &mut PartitionPlan,
    intent: &Intent<Held>,
    waited: bool,
    commit_sequence: u64,
    contact_version: u64,
) {
    let Some(v) = decoded(fresh, intent) else {
        unreadable(ctx, plan, intent, waited);
        return;
    };
    let decoded = &v.intent;
    plan.outputs.push(output::side_effect(
        &ctx.topics.side_effects,
        &ctx.topics.effects,
        decoded,
        intent.payload.record.traceparent.as_ref(),
        &EffectFields {
            commit_sequence,
            contact_version,
            committed_at_ms: ctx.now_ms,
            fencing_token: ctx.fence,
            sequence_from_producer: decoded.causal_sequence > 0,
        },
    ));
    plan.effects += 1;
    let facts = RowFacts::of(decoded, intent.meta.offset, intent.meta.fingerprint);
    let transition = Transition::Record {
        waited,
        to: State::CommittedCausal,
        reason: None,
    };
    let note = Note {
        latency_ms: (decoded.created_at_ms > 0)
            .then(|| (ctx.now_ms - decoded.created_at_ms).max(0)),
        ..Note::default()
    };
    let row = row(
        ctx,
        &facts,
        transition,
        commit_sequence,
        contact_version,
        String::new(),
    );
    plan.push(row, note);
}

/// A blocked or manual-reviewed intent: its review record and its audit row.
fn reject(
    ctx: &Context<'_>,
    fresh: &Fresh,
    plan: &mut PartitionPlan,
    intent: &Intent<Held>,
    waited: bool,
    r: Rejection,
) {
    let Some(v) = decoded(fresh, intent) else {
        unreadable(ctx, plan, intent, waited);
        return;
    };
    review_record(ctx, plan, intent, Some(&v.intent), &r);
    let facts = RowFacts::of(&v.intent, intent.meta.offset, intent.meta.fingerprint);
    let transition = Transition::Record {
        waited,
        to: r.to,
        reason: Some(r.reason),
    };
    let note = Note {
        review: Some(r.reason),
        ..Note::default()
    };
    let row = row(ctx, &facts, transition, r.commit_sequence, 0, r.detail);
    plan.push(row, note);
}

/// A held intent whose stored bytes no longer decode (they did when it was first seen): it
/// goes to manual review, bytes kept, with whatever the sequencer knows of it.
fn unreadable(ctx: &Context<'_>, plan: &mut PartitionPlan, intent: &Intent<Held>, waited: bool) {
    let r = Rejection {
        to: State::ManualReview,
        reason: Reason::InvalidIntent,
        detail: "stored intent could not be decoded again".to_string(),
        expected: 0,
        commit_sequence: 0,
        waited_ms: 0,
    };
    review_record(ctx, plan, intent, None, &r);
    let m = &intent.meta;
    let facts = RowFacts {
        offset: m.offset,
        intent_id: &m.intent_id,
        contact_id: &m.contact_id,
        clinic_id: "",
        correlation_id: &intent.payload.correlation_id,
        fingerprint: m.fingerprint,
    };
    let transition = Transition::Record {
        waited,
        to: r.to,
        reason: Some(r.reason),
    };
    let note = Note {
        review: Some(r.reason),
        ..Note::default()
    };
    plan.push(row(ctx, &facts, transition, 0, 0, r.detail), note);
}

fn review_record(
    ctx: &Context<'_>,
    plan: &mut PartitionPlan,
    intent: &Intent<Held>,
    decoded: Option<&ProtoIntent>,
    r: &Rejection,
) {
    plan.outputs.push(output::manual_review(
        &ctx.topics.manual_review,
        &Source {
            topic: &ctx.topics.intents,
            record: &intent.payload.record,
        },
        ReviewFields {
            reason: review_reason(r.reason),
            detail: r.detail.clone(),
            intent: decoded,
            expected_sequence: r.expected,
            received_sequence: r.commit_sequence,
            waited_ms: r.waited_ms,
            reviewed_at_ms: ctx.now_ms,
            fencing_token: ctx.fence,
        },
        ctx.topics.max_output_bytes,
    ));
}

fn contact_row(
    ctx: &Context<'_>,
    plan: &mut PartitionPlan,
    contact_id: &str,
    transition: Transition,
    commit_sequence: u64,
    detail: String,
) {
    let facts = RowFacts {
        offset: -1,
        intent_id: "",
        contact_id,
        clinic_id: "",
        correlation_id: "",
        fingerprint: 0,
    };
    let row = row(ctx, &facts, transition, commit_sequence, 0, detail);
    plan.push(row, Note::default());
}

fn row(
    ctx: &Context<'_>,
    facts: &RowFacts<'_>,
    transition: Transition,
    commit_sequence: u64,
    contact_version: u64,
    detail: String,
) -> TransitionRow {
    TransitionRow {
        partition: ctx.partition,
        batch_no: ctx.batch_no,
        source_offset: facts.offset,
        intent_id: facts.intent_id.to_owned(),
        contact_id: facts.contact_id.to_owned(),
        clinic_id: facts.clinic_id.to_owned(),
        correlation_id: facts.correlation_id.to_owned(),
        transition,
        commit_sequence,
        contact_version,
        fingerprint: facts.fingerprint,
        detail,
        fence: ctx.fence,
    }
}

/// The wire reason of a contract reason.
pub fn review_reason(reason: Reason) -> ReviewReason {
    match reason {
        Reason::WaitTimeout => ReviewReason::WaitTimeout,
        Reason::ContactOnHold => ReviewReason::ContactOnHold,
        Reason::VersionConflict => ReviewReason::VersionConflict,
        Reason::SequenceConflict => ReviewReason::SequenceConflict,
        Reason::IdempotencyConflict => ReviewReason::IdempotencyConflict,
        Reason::ContactBacklogOverflow => ReviewReason::ContactBacklogOverflow,
        Reason::InvalidIntent => ReviewReason::InvalidIntent,
        Reason::Unprocessable => ReviewReason::Unprocessable,
    }
}

fn blocked(reason: &BlockReason, commit_sequence: u64) -> Rejection {
    let (detail, expected) = match reason {
        BlockReason::VersionConflict { expected, actual } => (
            format!("expected contact version {expected}, committed version is {actual}"),
            commit_sequence,
        ),
        BlockReason::SequenceConflict {
            claimed,
            resolved_through,
            owner,
        } => (
            match owner {
                Some(o) => format!("sequence {claimed} is already claimed by intent {o}"),
                None => {
                    format!("sequence {claimed} is already resolved (through {resolved_through})")
                }
            },
            resolved_through + 1,
        ),
        BlockReason::IdempotencyConflict {
            existing_fingerprint,
            received_fingerprint,
            existing,
        } => (
            format!(
                "intent_id already {} with other content (fingerprint {existing_fingerprint:016x}, received {received_fingerprint:016x})",
                existing.state().as_str()
            ),
            0,
        ),
    };
    Rejection {
        to: State::BlockedConflict,
        reason: reason.code(),
        detail,
        expected,
        commit_sequence,
        waited_ms: 0,
    }
}

fn manual(reason: &SeqReview, commit_sequence: u64) -> Rejection {
    let (detail, expected, waited_ms) = match reason {
        SeqReview::WaitTimeout { missing, waited_ms } => (
            format!(
                "sequence {missing} did not arrive within the wait timeout (waited {waited_ms} ms)"
            ),
            *missing,
            *waited_ms,
        ),
        SeqReview::ContactOnHold { hold, held_since } => (
            format!(
                "contact is on hold ({}) since {} ms",
                hold.code().as_str(),
                held_since.0
            ),
            0,
            0,
        ),
        SeqReview::ContactBacklogOverflow { limit } => (
            format!("contact has {limit} waiting intents, its bound"),
            0,
            0,
        ),
        SeqReview::InvalidIntent { kind } => (kind.as_str().to_string(), 0, 0),
    };
    Rejection {
        to: State::ManualReview,
        reason: reason.code(),
        detail,
        expected,
        commit_sequence,
        waited_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Action, ManualReview, SideEffect};
    use crate::sequencer::{HoldReason, Millis, Outcome, Release};

    fn topics() -> Topics {
        Topics {
            intents: "in".into(),
            side_effects: "fx".into(),
            manual_review: "mr".into(),
            effects: output::EffectPlacement::new(None, 4).expect("a keyed partitioner"),
            max_output_bytes: 1_000_000,
        }
    }

    fn ctx(topics: &Topics) -> Context<'_> {
        Context {
            topics,
            partition: 3,
            fence: 7,
            batch_no: 12,
            now_ms: 10_000,
        }
    }

    fn proto(id: &str, seq: u64) -> ProtoIntent {
        ProtoIntent {
            intent_id: id.into(),
            contact_id: "c".into(),
            clinic_id: "k".into(),
            correlation_id: format!("corr-{id}"),
            dispatch_priority: 1,
            causal_sequence: seq,
            expected_version: 0,
            action: Action::Book as i32,
            payload: b"p".to_vec().into(),
            created_at_ms: 9_000,
        }
    }

    fn record(offset: i64, value: Vec<u8>) -> InRecord {
        InRecord {
            partition: 3,
            offset,
            key: Some(b"c".to_vec()),
            value: Some(value),
            traceparent: None,
        }
    }

    /// An intent as the sequencer carries it, and its fresh decoding.
    fn intent(id: &str, seq: u64, offset: i64) -> (Intent<Held>, Arc<ValidIntent>) {
        let p = proto(id, seq);
        let v = Arc::new(ValidIntent {
            intent: p.clone(),
            correlation_generated: false,
            fingerprint: 0xf0 + offset as u64,
        });
        let meta = IntentMeta {
            intent_id: id.into(),
            contact_id: "c".into(),
            causal_sequence: seq,
            expected_version: 0,
            priority: 1,
            fingerprint: v.fingerprint,
            offset,
            resubmission: false,
            size: 0,
        };
        let held = Held {
            record: record(offset, p.encode_to_vec()),
            correlation_id: p.correlation_id.clone(),
        };
        (
            Intent {
                meta,
                payload: held,
            },
            v,
        )
    }

    fn record_transition(t: &TransitionRow) -> (bool, State, Option<Reason>) {
        match t.transition {
            Transition::Record { waited, to, reason } => (waited, to, reason),
            other => panic!("not a record transition: {other:?}"),
        }
    }

    #[test]
    fn a_fresh_commit_is_one_effect_one_row_and_its_latency() {
        let t = topics();
        let (i, v) = intent("a", 1, 40);
        let fresh = Fresh::from([(40, v)]);
        let mut plan = PartitionPlan::default();
        let d = Decision::Commit {
            intent: i,
            commit_sequence: 1,
            contact_version: 1,
        };
        decisions(&ctx(&t), &fresh, vec![d], &mut plan);
        assert_eq!(plan.outputs.len(), 1);
        assert_eq!(plan.effects, 1);
        let out = &plan.outputs[0];
        assert_eq!(&*out.topic, "fx");
        assert_eq!(out.key, b"c");
        let fx = SideEffect::decode(out.value.as_slice()).unwrap();
        assert_eq!(
            (
                fx.intent_id.as_str(),
                fx.commit_sequence,
                fx.contact_version
            ),
            ("a", 1, 1)
        );
        assert_eq!((fx.committed_at_ms, fx.fencing_token), (10_000, 7));
        assert!(fx.sequence_from_producer);
        assert_eq!(plan.transitions.len(), 1);
        let row = &plan.transitions[0];
        assert_eq!(
            record_transition(row),
            (false, State::CommittedCausal, None)
        );
        assert_eq!((row.partition, row.batch_no, row.fence), (3, 12, 7));
        assert_eq!((row.source_offset, row.fingerprint), (40, 0xf0 + 40));
        assert_eq!(row.correlation_id, "corr-a");
        assert_eq!(plan.notes[0].latency_ms, Some(1_000));
    }

    #[test]
    fn an_intent_that_waits_and_commits_in_one_drain_leaves_received_then_waiting() {
        let t = topics();
        let (i, v) = intent("b", 2, 41);
        let fresh = Fresh::from([(41, v)]);
        let mut plan = PartitionPlan::default();
        let ds = vec![
            Decision::Wait {
                intent_id: "b".into(),
                contact_id: "c".into(),
                offset: 41,
                commit_sequence: 2,
                missing: 1,
            },
            Decision::Commit {
                intent: i,
                commit_sequence: 2,
                contact_version: 2,
            },
        ];
        decisions(&ctx(&t), &fresh, ds, &mut plan);
        let rows: Vec<_> = plan.transitions.iter().map(record_transition).collect();
        assert_eq!(
            rows,
            vec![
                (false, State::WaitingPreviousCommit, None),
                (true, State::CommittedCausal, None)
            ]
        );
        assert_eq!(plan.transitions[0].detail, "waiting for sequence 1");
        assert_eq!(plan.transitions[0].clinic_id, "k");
        assert_eq!(plan.outputs.len(), 1);
    }

    #[test]
    fn a_restored_waiting_intent_commits_from_its_stored_bytes_with_its_first_correlation_id() {
        let t = topics();
        let (mut i, _) = intent("c1", 3, 5);
        // The correlation id was generated on first sight and is not in the stored bytes.
        let mut bytes = proto("c1", 3);
        bytes.correlation_id.clear();
        i.payload.record.value = Some(bytes.encode_to_vec());
        i.payload.correlation_id = "generated".into();
        let mut plan = PartitionPlan::default();
        let d = Decision::Commit {
            intent: i,
            commit_sequence: 3,
            contact_version: 3,
        };
        decisions(&ctx(&t), &Fresh::new(), vec![d], &mut plan);
        assert_eq!(
            record_transition(&plan.transitions[0]),
            (true, State::CommittedCausal, None)
        );
        assert_eq!(plan.transitions[0].correlation_id, "generated");
        let fx = SideEffect::decode(plan.outputs[0].value.as_slice()).unwrap();
        assert_eq!(fx.correlation_id, "generated");
    }

    #[test]
    fn a_duplicate_is_a_row_without_output() {
        let t = topics();
        let (i, v) = intent("d", 1, 42);
        let fresh = Fresh::from([(42, v)]);
        let mut plan = PartitionPlan::default();
        let prior = Outcome::Committed {
            commit_sequence: 1,
            contact_version: 1,
        };
        decisions(
            &ctx(&t),
            &fresh,
            vec![Decision::Duplicate { intent: i, prior }],
            &mut plan,
        );
        assert!(plan.outputs.is_empty());
        assert_eq!(
            record_transition(&plan.transitions[0]),
            (false, State::Duplicate, None)
        );
        assert_eq!(plan.transitions[0].detail, "already committed_causal");
    }

    #[test]
    fn a_version_conflict_is_a_review_record_and_a_blocked_row() {
        let t = topics();
        let (i, v) = intent("e", 4, 43);
        let fresh = Fresh::from([(43, v)]);
        let mut plan = PartitionPlan::default();
        let d = Decision::Blocked {
            intent: i,
            commit_sequence: 4,
            reason: BlockReason::VersionConflict {
                expected: 9,
                actual: 3,
            },
        };
        decisions(&ctx(&t), &fresh, vec![d], &mut plan);
        let r = ManualReview::decode(plan.outputs[0].value.as_slice()).unwrap();
        assert_eq!(r.reason, ReviewReason::VersionConflict as i32);
        assert_eq!((r.expected_sequence, r.received_sequence), (4, 4));
        assert_eq!((r.source_partition, r.source_offset), (3, 43));
        assert_eq!(&*plan.outputs[0].topic, "mr");
        assert_eq!(
            record_transition(&plan.transitions[0]),
            (false, State::BlockedConflict, Some(Reason::VersionConflict))
        );
        assert_eq!(plan.transitions[0].commit_sequence, 4);
        assert_eq!(plan.notes[0].review, Some(Reason::VersionConflict));
    }

    #[test]
    fn a_wait_timeout_review_names_the_missing_sequence_and_the_wait() {
        let t = topics();
        let (i, _) = intent("f", 5, 44);
        let mut plan = PartitionPlan::default();
        let d = Decision::ManualReview {
            intent: i,
            commit_sequence: 5,
            reason: SeqReview::WaitTimeout {
                missing: 2,
                waited_ms: 301_000,
            },
        };
        decisions(&ctx(&t), &Fresh::new(), vec![d], &mut plan);
        let r = ManualReview::decode(plan.outputs[0].value.as_slice()).unwrap();
        assert_eq!(r.reason, ReviewReason::WaitTimeout as i32);
        assert_eq!((r.expected_sequence, r.waited_ms), (2, 301_000));
        assert_eq!(
            record_transition(&plan.transitions[0]),
            (true, State::ManualReview, Some(Reason::WaitTimeout))
        );
    }

    #[test]
    fn contact_events_are_rows_without_outputs_and_pauses_are_signals() {
        let t = topics();
        let mut plan = PartitionPlan::default();
        let ds = vec![
            Decision::ContactHeld {
                contact_id: "c".into(),
                reason: HoldReason::WaitTimeout { missing: 2 },
            },
            Decision::Skipped {
                contact_id: "c".into(),
                from: 2,
                to: 4,
                cause: SkipCause::Operator,
            },
            Decision::ContactReleased {
                contact_id: "c".into(),
                release: Release::SkipTo(5),
                resolved_through: 4,
            },
            Decision::PausePartition { waiting: 10 },
            Decision::ResumePartition { waiting: 1 },
        ];
        decisions(&ctx(&t), &Fresh::new(), ds, &mut plan);
        assert!(plan.outputs.is_empty());
        let kinds: Vec<Transition> = plan.transitions.iter().map(|r| r.transition).collect();
        assert_eq!(
            kinds,
            vec![
                Transition::Held {
                    reason: Reason::WaitTimeout
                },
                Transition::Skipped { by_operator: true },
                Transition::Released
            ]
        );
        assert_eq!(plan.transitions[1].detail, r#"{"from":2,"to":4}"#);
        assert_eq!(plan.transitions[2].commit_sequence, 4);
        assert!(plan.transitions.iter().all(|r| r.source_offset == -1));
        assert_eq!(plan.pause, Some(false));
        assert_eq!(plan.notes.len(), plan.transitions.len());
    }

    #[test]
    fn an_invalid_record_keeps_its_bytes_and_what_can_be_read_of_it() {
        let t = topics();
        let mut p = proto("g", 0);
        p.action = 0;
        let rec = record(45, p.encode_to_vec());
        let mut plan = PartitionPlan::default();
        invalid(&ctx(&t), &rec, &InvalidIntent::UnspecifiedAction, &mut plan);
        let r = ManualReview::decode(plan.outputs[0].value.as_slice()).unwrap();
        assert_eq!(r.reason, ReviewReason::InvalidIntent as i32);
        assert_eq!(r.original_value, rec.value.clone().unwrap());
        assert_eq!(r.intent_id, "g");
        let row = &plan.transitions[0];
        assert_eq!(
            record_transition(row),
            (false, State::ManualReview, Some(Reason::InvalidIntent))
        );
        assert_eq!((row.intent_id.as_str(), row.source_offset), ("g", 45));
        assert_eq!(plan.notes[0].invalid_kind, Some("unspecified_action"));
        // Garbage keeps its bytes; nothing can be read of it.
        let junk = record(46, vec![0xff, 0xfe]);
        invalid(
            &ctx(&t),
            &junk,
            &InvalidIntent::Undecodable("x".into()),
            &mut plan,
        );
        assert_eq!(plan.transitions[1].intent_id, "");
        assert_eq!(plan.notes.len(), 2);
    }

    /// The whole output record as the producer counts it: key, value, headers.
    fn output_bytes(o: &crate::pipeline::kafka::OutRecord) -> usize {
        o.key.len()
            + o.value.len()
            + o.headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }

    #[test]
    fn a_review_never_exceeds_max_output_bytes_and_says_what_it_cut() {
        let t = topics();
        let limit = t.max_output_bytes;
        // Near the limit itself, as large as a topic of Kafka's defaults takes: garbage, a
        // decodable intent whose ids are huge, and a record whose key is half of it.
        let garbage: Vec<u8> = (0..1_040_000u32).map(|i| (i * 7 % 256) as u8).collect();
        let mut huge_ids = proto(&"i".repeat(300_000), 1);
        huge_ids.contact_id = "c".repeat(300_000);
        huge_ids.correlation_id = "r".repeat(300_000);
        let cases = [
            InRecord {
                key: Some(b"c".to_vec()),
                ..record(50, garbage.clone())
            },
            record(51, huge_ids.encode_to_vec()),
            InRecord {
                key: Some(vec![b'k'; 520_000]),
                ..record(52, garbage[..520_000].to_vec())
            },
        ];
        for rec in [&cases[0], &cases[2]] {
            let mut plan = PartitionPlan::default();
            invalid(
                &ctx(&t),
                rec,
                &InvalidIntent::Undecodable("x".into()),
                &mut plan,
            );
            let out = &plan.outputs[0];
            assert!(output_bytes(out) <= limit, "{} bytes", output_bytes(out));
            assert!(output_bytes(out) > limit - 4096, "as much as fits is kept");
            let r = ManualReview::decode(out.value.as_slice()).unwrap();
            let (key, value) = (rec.key.clone().unwrap(), rec.value.clone().unwrap());
            assert!(r.original_truncated);
            assert_eq!(
                (r.original_key_size, r.original_value_size),
                (key.len() as u64, value.len() as u64)
            );
            assert!(value.starts_with(&r.original_value) && key.starts_with(&r.original_key));
            assert!(
                r.original_key.is_empty() || r.original_value.len() == value.len(),
                "the value first"
            );
            assert_eq!(
                out.key,
                format!("3-{}", rec.offset).into_bytes(),
                "keyed by position"
            );
            assert!(r.intent_id.len() <= 1024 && r.correlation_id.len() <= 1024);
            assert_eq!(r.reason, ReviewReason::InvalidIntent as i32);
        }
        // Huge ids are cut in the envelope, so the record itself fits whole.
        let mut plan = PartitionPlan::default();
        invalid(
            &ctx(&t),
            &cases[1],
            &InvalidIntent::Undecodable("x".into()),
            &mut plan,
        );
        assert!(output_bytes(&plan.outputs[0]) <= limit);
        let r = ManualReview::decode(plan.outputs[0].value.as_slice()).unwrap();
        assert!(!r.original_truncated);
        assert_eq!(r.original_value, cases[1].value.clone().unwrap());
        assert_eq!(
            (
                r.intent_id.len(),
                r.contact_id.len(),
                r.correlation_id.len()
            ),
            (1024, 1024, 1024)
        );
        // A record that fits is carried whole, its sizes stated, its key kept.
        let small = record(53, vec![1, 2, 3]);
        let mut plan = PartitionPlan::default();
        invalid(
            &ctx(&t),
            &small,
            &InvalidIntent::Undecodable("x".into()),
            &mut plan,
        );
        let r = ManualReview::decode(plan.outputs[0].value.as_slice()).unwrap();
        assert!(!r.original_truncated);
        assert_eq!(
            (r.original_value.as_ref(), r.original_key.as_ref()),
            (&[1u8, 2, 3][..], &b"c"[..])
        );
        assert_eq!((r.original_key_size, r.original_value_size), (1, 3));
        assert_eq!(plan.outputs[0].key, b"c");
    }

    #[test]
    fn a_review_detail_is_at_most_a_kibibyte() {
        let t = topics();
        let mut plan = PartitionPlan::default();
        let error = "é".repeat(100_000);
        unprocessable(&ctx(&t), &record(54, vec![1]), &error, &mut plan);
        let r = ManualReview::decode(plan.outputs[0].value.as_slice()).unwrap();
        assert!(
            r.detail.len() <= crate::pipeline::output::MAX_DETAIL_BYTES,
            "{}",
            r.detail.len()
        );
        assert!(r.detail.starts_with("the durable write"));
    }

    #[test]
    fn an_unprocessable_record_keeps_its_raw_bytes_and_gets_a_storable_row() {
        let t = topics();
        let mut p = proto("bad\u{0}id", 1);
        p.contact_id = "c\u{0}".into();
        let rec = record(48, p.encode_to_vec());
        let mut plan = PartitionPlan::default();
        unprocessable(&ctx(&t), &rec, "value too long for type\u{0}", &mut plan);
        let r = ManualReview::decode(plan.outputs[0].value.as_slice()).unwrap();
        assert_eq!(r.reason, ReviewReason::Unprocessable as i32);
        assert_eq!(r.original_value, rec.value.clone().unwrap());
        assert_eq!(r.intent_id, "bad\u{0}id", "the review keeps what was read");
        let row = &plan.transitions[0];
        assert_eq!(
            record_transition(row),
            (false, State::ManualReview, Some(Reason::Unprocessable))
        );
        assert_eq!(row.intent_id, "bad\u{FFFD}id");
        assert_eq!(row.contact_id, "c\u{FFFD}");
        assert!(!row.detail.contains('\u{0}'));
        assert!(row.detail.contains("value too long"));
        assert_eq!(plan.notes[0].review, Some(Reason::Unprocessable));
    }

    #[test]
    fn storable_text_is_bounded_and_free_of_control_characters() {
        let long = "é".repeat(2_000);
        let s = storable(&long);
        assert!(s.len() <= 1024 && s.chars().all(|c| c == 'é'));
        assert_eq!(storable("a\u{1}b\nc"), "a\u{FFFD}b\u{FFFD}c");
    }

    #[test]
    fn a_stored_intent_that_no_longer_decodes_goes_to_review_with_a_row() {
        let t = topics();
        let (mut i, _) = intent("h", 2, 47);
        i.payload.record.value = Some(vec![0xff, 0xff, 0xff]);
        let mut plan = PartitionPlan::default();
        let d = Decision::Commit {
            intent: i,
            commit_sequence: 2,
            contact_version: 2,
        };
        decisions(&ctx(&t), &Fresh::new(), vec![d], &mut plan);
        assert_eq!(plan.effects, 0);
        let r = ManualReview::decode(plan.outputs[0].value.as_slice()).unwrap();
        assert_eq!(r.reason, ReviewReason::InvalidIntent as i32);
        assert_eq!(
            record_transition(&plan.transitions[0]),
            (true, State::ManualReview, Some(Reason::InvalidIntent))
        );
        assert_eq!(plan.transitions[0].intent_id, "h");
    }

    #[test]
    fn changed_contacts_become_rows_of_the_batch() {
        let t = topics();
        let mut s = StoredContact::new("c");
        s.resolved_through = 2;
        s.version = 2;
        s.next_sequence = 3;
        s.hold = Some(crate::sequencer::HoldState {
            since: Millis(5),
            reason: HoldReason::WaitTimeout { missing: 3 },
        });
        let mut plan = PartitionPlan::default();
        contacts(
            &ctx(&t),
            vec![s.clone()],
            &mut WaitingRows::default(),
            &mut plan,
        )
        .unwrap();
        let row = &plan.contacts[0];
        assert_eq!((row.partition, row.batch_no), (3, 12));
        assert!(row.on_hold);
        assert_eq!(row.waiting, 0);
        let state = serde_json::from_str(row.state.get()).unwrap();
        assert_eq!(snapshot::decode(state).unwrap(), s);
    }
}
