//! One input partition's lane: its sequencer, its fencing token and recovery point, and the
//! translation of the sequencer's decisions into output records, audit rows and log lines.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use prost::Message as _;

use super::kafka::OutRecord;
use super::output::{self, EffectFields, ReviewFields, Source};
use crate::intent::{InRecord, ValidIntent};
use crate::proto::{Intent as ProtoIntent, ReviewReason};
use crate::sequencer::{
    BlockReason, Decision, Intent, Reason, ReviewReason as SeqReview, Sequencer, SkipCause,
};
use crate::store::postgres::{ContactRow, TransitionRow};
use crate::store::snapshot::{self, Held};
use crate::telemetry::metrics as m;

/// The state of one assigned partition.
pub struct Lane {
    pub partition: i32,
    /// Fencing token of this writer for this partition.
    pub fence: u64,
    /// The last batch known committed (the recovery point).
    pub batch_no: u64,
    /// One past the last record consumed and committed.
    pub next_offset: i64,
    pub seq: Sequencer<Held>,
    /// Paused by the sequencer's backpressure.
    pub backpressure: bool,
}

/// What one batch's decisions turn into.
#[derive(Default)]
pub struct Translated {
    pub outputs: Vec<OutRecord>,
    pub transitions: Vec<TransitionRow>,
    pub contacts: Vec<ContactRow>,
    pub pause: Option<bool>,
    pub effects: usize,
}

/// Context shared by every translation in a batch.
pub struct Translator<'a> {
    pub intents_topic: &'a str,
    pub side_effects_topic: &'a Arc<str>,
    pub manual_review_topic: &'a Arc<str>,
    pub now_ms: i64,
    /// Intents fed in this batch (first sight), by (partition, offset): ids may repeat within
    /// a batch (a retry, or a conflicting reuse), records may not.
    pub fresh: &'a HashMap<(i32, i64), Arc<ValidIntent>>,
}

/// What a blocked or manual-reviewed intent turns into.
struct Rejection {
    review: ReviewReason,
    to: &'static str,
    code: &'static str,
    detail: String,
    expected: u64,
    commit_sequence: u64,
    waited_ms: u64,
}

const RECEIVED: &str = "received";
const WAITING: &str = "waiting_previous_commit";

impl Lane {
    /// Drains the sequencer and turns every decision into outputs, audit rows and log lines.
    pub fn translate(&mut self, t: &Translator<'_>, out: &mut Translated) {
        let mut decisions = Vec::new();
        self.seq.drain_decisions(&mut decisions);
        let batch_no = self.batch_no + 1;
        // Offsets of intents that started waiting in this drain.
        let mut waited_now: HashSet<i64> = HashSet::new();
        for d in decisions {
            match d {
                Decision::Commit {
                    intent,
                    commit_sequence,
                    contact_version,
                } => {
                    let from = self.previous_state(&intent, t, &waited_now);
                    let Some(decoded) = self.decoded(&intent, t) else {
                        self.undecodable_held(&intent, t, out);
                        continue;
                    };
                    out.outputs.push(output::side_effect(
                        t.side_effects_topic,
                        &decoded,
                        intent.payload.record.traceparent.as_ref(),
                        &EffectFields {
                            commit_sequence,
                            contact_version,
                            committed_at_ms: t.now_ms,
                            fencing_token: self.fence,
                            sequence_from_producer: decoded.causal_sequence > 0,
                        },
                    ));
                    out.effects += 1;
                    if decoded.created_at_ms > 0 {
                        let latency = (t.now_ms - decoded.created_at_ms).max(0) as f64 / 1000.0;
                        metrics::histogram!(m::COMMIT_LATENCY).record(latency);
                    }
                    self.row(
                        out,
                        batch_no,
                        &intent,
                        &decoded,
                        from,
                        "committed_causal",
                        "",
                        commit_sequence,
                        contact_version,
                        String::new(),
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
                    let fresh = t.fresh.get(&(self.partition, offset));
                    let detail = format!("waiting for sequence {missing}");
                    log_transition(
                        fresh.map_or("", |v| v.intent.correlation_id.as_str()),
                        &contact_id,
                        fresh.map_or("", |v| v.intent.clinic_id.as_str()),
                        &intent_id,
                        commit_sequence,
                        WAITING,
                        "",
                        &detail,
                    );
                    out.transitions.push(TransitionRow {
                        partition: self.partition,
                        batch_no,
                        source_offset: offset,
                        intent_id,
                        contact_id,
                        clinic_id: fresh
                            .map(|v| v.intent.clinic_id.clone())
                            .unwrap_or_default(),
                        correlation_id: fresh
                            .map(|v| v.intent.correlation_id.clone())
                            .unwrap_or_default(),
                        from_state: RECEIVED,
                        to_state: WAITING,
                        reason: "",
                        commit_sequence,
                        contact_version: 0,
                        fingerprint: fresh.map_or(0, |v| v.fingerprint),
                        detail,
                        fence: self.fence,
                    });
                }
                Decision::Duplicate { intent, prior } => {
                    let Some(decoded) = self.decoded(&intent, t) else {
                        continue;
                    };
                    let detail = format!("already {}", prior.state().as_str());
                    self.row(
                        out,
                        batch_no,
                        &intent,
                        &decoded,
                        RECEIVED,
                        "duplicate",
                        "",
                        0,
                        0,
                        detail,
                    );
                }
                Decision::Blocked {
                    intent,
                    commit_sequence,
                    reason,
                } => {
                    let from = self.previous_state(&intent, t, &waited_now);
                    let (review, code, detail, expected) = blocked(&reason, commit_sequence);
                    let outcome = Rejection {
                        review,
                        to: "blocked_conflict",
                        code,
                        detail,
                        expected,
                        commit_sequence,
                        waited_ms: 0,
                    };
                    self.reject(out, t, batch_no, &intent, from, outcome);
                }
                Decision::ManualReview {
                    intent,
                    commit_sequence,
                    reason,
                } => {
                    let from = self.previous_state(&intent, t, &waited_now);
                    let (review, detail, expected, waited_ms) = manual(&reason);
                    let outcome = Rejection {
                        review,
                        to: "manual_review",
                        code: reason.code().as_str(),
                        detail,
                        expected,
                        commit_sequence,
                        waited_ms,
                    };
                    self.reject(out, t, batch_no, &intent, from, outcome);
                }
                Decision::Skipped {
                    contact_id,
                    from,
                    to,
                    cause,
                } => {
                    let why = match cause {
                        SkipCause::WaitTimeout { .. } => "WAIT_TIMEOUT",
                        SkipCause::Operator => "OPERATOR",
                    };
                    let detail = serde_json::json!({ "from": from, "to": to }).to_string();
                    self.contact_row(out, batch_no, contact_id, "skipped", why, from, detail);
                }
                Decision::ContactHeld { contact_id, reason } => {
                    metrics::counter!(m::CONTACT_HOLDS, "reason" => reason.code().as_str())
                        .increment(1);
                    let detail = format!("{reason:?}");
                    self.contact_row(
                        out,
                        batch_no,
                        contact_id,
                        "held",
                        reason.code().as_str(),
                        0,
                        detail,
                    );
                }
                Decision::ContactReleased {
                    contact_id,
                    release,
                    resolved_through,
                } => {
                    let detail = format!("{release:?}");
                    self.contact_row(
                        out,
                        batch_no,
                        contact_id,
                        "released",
                        "OPERATOR",
                        resolved_through,
                        detail,
                    );
                }
                Decision::PausePartition { waiting } => {
                    tracing::warn!(
                        partition = self.partition,
                        waiting,
                        "partition paused: backlog at its bound"
                    );
                    out.pause = Some(true);
                }
                Decision::ResumePartition { waiting } => {
                    tracing::info!(
                        partition = self.partition,
                        waiting,
                        "partition resumed: backlog drained"
                    );
                    out.pause = Some(false);
                }
            }
        }
        for snapshot in self.seq.take_dirty() {
            let on_hold = snapshot.hold.is_some();
            let waiting = snapshot.waiting.len() as i32;
            let contact_id = snapshot.contact_id.clone();
            match snapshot::encode(&snapshot) {
                Ok(state) => out.contacts.push(ContactRow {
                    contact_id,
                    partition: self.partition,
                    batch_no,
                    state,
                    on_hold,
                    waiting,
                }),
                // Unreachable for these plain types; never lose state silently.
                Err(e) => tracing::error!(error = %e, contact_id, "contact state not serializable"),
            }
        }
    }

    /// The decoded intent of a decision (cached for fresh intents, decoded again for intents
    /// restored from the store), with the correlation id it was first seen with.
    fn decoded(&self, intent: &Intent<Held>, t: &Translator<'_>) -> Option<Arc<ProtoIntent>> {
        if let Some(v) = t.fresh.get(&(self.partition, intent.payload.record.offset)) {
            return Some(Arc::new(v.intent.clone()));
        }
        let value = intent.payload.record.value.as_deref()?;
        let mut decoded = ProtoIntent::decode(value).ok()?;
        decoded.correlation_id = intent.payload.correlation_id.clone();
        Some(Arc::new(decoded))
    }

    fn undecodable_held(&self, intent: &Intent<Held>, t: &Translator<'_>, out: &mut Translated) {
        // A stored intent that no longer decodes (it did when first seen): keep it for review.
        self.review(
            out,
            t,
            intent,
            None,
            ReviewReason::InvalidIntent,
            "stored intent could not be decoded again",
            0,
            0,
            0,
        );
    }

    /// A blocked or manual-reviewed intent: its manual-review record and its audit row.
    fn reject(
        &self,
        out: &mut Translated,
        t: &Translator<'_>,
        batch_no: u64,
        intent: &Intent<Held>,
        from: &'static str,
        r: Rejection,
    ) {
        let decoded = self.decoded(intent, t);
        self.review(
            out,
            t,
            intent,
            decoded.as_deref(),
            r.review,
            &r.detail,
            r.expected,
            r.commit_sequence,
            r.waited_ms,
        );
        if let Some(decoded) = decoded {
            self.row(
                out,
                batch_no,
                intent,
                &decoded,
                from,
                r.to,
                r.code,
                r.commit_sequence,
                0,
                r.detail,
            );
        }
    }

    /// An intent first seen in this batch that did not wait comes from `received`; anything
    /// else was waiting.
    fn previous_state(
        &self,
        intent: &Intent<Held>,
        t: &Translator<'_>,
        waited_now: &HashSet<i64>,
    ) -> &'static str {
        let offset = intent.payload.record.offset;
        if t.fresh.contains_key(&(self.partition, offset)) && !waited_now.contains(&offset) {
            RECEIVED
        } else {
            WAITING
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn review(
        &self,
        out: &mut Translated,
        t: &Translator<'_>,
        intent: &Intent<Held>,
        decoded: Option<&ProtoIntent>,
        reason: ReviewReason,
        detail: &str,
        expected: u64,
        received: u64,
        waited_ms: u64,
    ) {
        out.outputs.push(output::manual_review(
            t.manual_review_topic,
            &Source {
                topic: t.intents_topic,
                record: &intent.payload.record,
            },
            ReviewFields {
                reason,
                detail: detail.to_string(),
                intent: decoded,
                expected_sequence: expected,
                received_sequence: received,
                waited_ms,
                reviewed_at_ms: t.now_ms,
                fencing_token: self.fence,
            },
        ));
    }

    #[allow(clippy::too_many_arguments)]
    fn row(
        &self,
        out: &mut Translated,
        batch_no: u64,
        intent: &Intent<Held>,
        decoded: &ProtoIntent,
        from: &'static str,
        to: &'static str,
        reason: &'static str,
        commit_sequence: u64,
        contact_version: u64,
        detail: String,
    ) {
        log_transition(
            &decoded.correlation_id,
            &decoded.contact_id,
            &decoded.clinic_id,
            &decoded.intent_id,
            commit_sequence,
            to,
            reason,
            &detail,
        );
        metrics::counter!(m::OUTCOMES, "state" => to, "reason" => reason).increment(1);
        out.transitions.push(TransitionRow {
            partition: self.partition,
            batch_no,
            source_offset: intent.meta.offset,
            intent_id: decoded.intent_id.clone(),
            contact_id: decoded.contact_id.clone(),
            clinic_id: decoded.clinic_id.clone(),
            correlation_id: decoded.correlation_id.clone(),
            from_state: from,
            to_state: to,
            reason,
            commit_sequence,
            contact_version,
            fingerprint: intent.meta.fingerprint,
            detail,
            fence: self.fence,
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn contact_row(
        &self,
        out: &mut Translated,
        batch_no: u64,
        contact_id: String,
        to: &'static str,
        reason: &'static str,
        commit_sequence: u64,
        detail: String,
    ) {
        log_transition(
            "",
            &contact_id,
            "",
            "",
            commit_sequence,
            to,
            reason,
            &detail,
        );
        out.transitions.push(TransitionRow {
            partition: self.partition,
            batch_no,
            source_offset: -1,
            contact_id,
            from_state: "contact",
            to_state: to,
            reason,
            commit_sequence,
            detail,
            fence: self.fence,
            ..TransitionRow::default()
        });
    }
}

fn blocked(reason: &BlockReason, seq: u64) -> (ReviewReason, &'static str, String, u64) {
    match reason {
        BlockReason::VersionConflict { expected, actual } => (
            ReviewReason::VersionConflict,
            Reason::VersionConflict.as_str(),
            format!("expected contact version {expected}, committed version is {actual}"),
            seq,
        ),
        BlockReason::SequenceConflict {
            claimed,
            resolved_through,
            owner,
        } => (
            ReviewReason::SequenceConflict,
            Reason::SequenceConflict.as_str(),
            match owner {
                Some(o) => format!("sequence {claimed} is already claimed by intent {o}"),
                None => format!("sequence {claimed} is already resolved (through {resolved_through})"),
            },
            resolved_through + 1,
        ),
        BlockReason::IdempotencyConflict {
            existing_fingerprint,
            received_fingerprint,
            existing,
        } => (
            ReviewReason::IdempotencyConflict,
            Reason::IdempotencyConflict.as_str(),
            format!(
                "intent_id already {} with other content (fingerprint {existing_fingerprint:016x}, received {received_fingerprint:016x})",
                existing.state().as_str()
            ),
            0,
        ),
    }
}

fn manual(reason: &SeqReview) -> (ReviewReason, String, u64, u64) {
    match reason {
        SeqReview::WaitTimeout { missing, waited_ms } => (
            ReviewReason::WaitTimeout,
            format!(
                "sequence {missing} did not arrive within the wait timeout (waited {waited_ms} ms)"
            ),
            *missing,
            *waited_ms,
        ),
        SeqReview::ContactOnHold { hold, held_since } => (
            ReviewReason::ContactOnHold,
            format!(
                "contact is on hold ({}) since {} ms",
                hold.code().as_str(),
                held_since.0
            ),
            0,
            0,
        ),
        SeqReview::ContactBacklogOverflow { limit } => (
            ReviewReason::ContactBacklogOverflow,
            format!("contact has {limit} waiting intents, its bound"),
            0,
            0,
        ),
        SeqReview::InvalidIntent { kind } => {
            (ReviewReason::InvalidIntent, kind.as_str().to_string(), 0, 0)
        }
    }
}

/// The one structured line of a transition (R8).
#[allow(clippy::too_many_arguments)]
pub fn log_transition(
    correlation_id: &str,
    contact_id: &str,
    clinic_id: &str,
    intent_id: &str,
    commit_sequence: u64,
    state: &str,
    reason: &str,
    detail: &str,
) {
    tracing::info!(
        correlation_id,
        contact_id,
        clinic_id,
        intent_id,
        commit_sequence,
        state,
        reason,
        detail,
        "transition"
    );
}

/// Builds the sequencer's view of a decoded intent.
pub fn meta(
    v: &ValidIntent,
    record: &InRecord,
    resubmission: bool,
) -> crate::sequencer::IntentMeta {
    crate::sequencer::IntentMeta {
        intent_id: v.intent.intent_id.clone(),
        contact_id: v.intent.contact_id.clone(),
        causal_sequence: v.intent.causal_sequence,
        expected_version: v.intent.expected_version,
        priority: v.intent.dispatch_priority,
        fingerprint: v.fingerprint,
        offset: record.offset,
        resubmission,
    }
}
