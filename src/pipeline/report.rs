//! Reporting, after the commit that makes a batch real: each transition's one log line and its
//! metrics (emitted together, from its audit row), the outcomes for the idempotency cache,
//! and the backlog gauges.

use std::collections::{BTreeMap, HashMap};

use rdkafka::consumer::Consumer as _;
use rdkafka::Offset;

use super::assignment::{Assignment, PauseCause};
use super::kafka::EngineConsumer;
use super::lag::{Position, Positions};
use super::lane::Lane;
use super::translate::Note;
use crate::sequencer::{Outcome, PriorOutcome, State};
use crate::store::postgres::outcomes::is_idempotency_record;
use crate::store::postgres::{StoredOutcome, Transition, TransitionRow};
use crate::telemetry::metrics as m;

/// One transition: its structured log line (R8) and its metrics.
pub fn transition(row: &TransitionRow, note: &Note) {
    let (_, state, reason) = row.transition.columns();
    tracing::info!(
        correlation_id = %row.correlation_id,
        contact_id = %row.contact_id,
        clinic_id = %row.clinic_id,
        intent_id = %row.intent_id,
        commit_sequence = row.commit_sequence,
        state,
        reason,
        detail = %row.detail,
        partition = row.partition,
        offset = row.source_offset,
        "transition"
    );
    match row.transition {
        Transition::Record { to, .. } => {
            metrics::counter!(m::OUTCOMES, "state" => to.as_str(), "reason" => reason).increment(1);
        }
        Transition::Forwarded => {
            metrics::counter!(m::FORWARDED).increment(1);
        }
        Transition::Held { .. } => {
            metrics::counter!(m::CONTACT_HOLDS, "reason" => reason).increment(1);
        }
        Transition::Skipped { .. } | Transition::Released | Transition::Resubmitted => {
            metrics::counter!(m::CONTACT_EVENTS, "event" => state, "reason" => reason).increment(1);
        }
    }
    if let Some(ms) = note.latency_ms {
        metrics::histogram!(m::COMMIT_LATENCY).record(ms as f64 / 1000.0);
    }
    if let Some(kind) = note.invalid_kind {
        metrics::counter!(m::INVALID_INTENTS, "reason" => kind).increment(1);
    }
    if let Some(review) = note.review {
        metrics::counter!(m::MANUAL_REVIEW_RECORDS, "reason" => review.as_str()).increment(1);
    }
}

/// The batch's outcomes that make up the idempotency record, for the cache's write-through.
pub fn idempotency_outcomes(rows: &[TransitionRow]) -> impl Iterator<Item = StoredOutcome> + '_ {
    rows.iter().filter_map(|r| {
        let Transition::Record { to, reason, .. } = r.transition else {
            return None;
        };
        let outcome = match (to, reason) {
            (State::CommittedCausal, _) => Outcome::Committed {
                commit_sequence: r.commit_sequence,
                contact_version: r.contact_version,
            },
            (State::BlockedConflict, Some(reason)) => Outcome::Blocked {
                reason,
                commit_sequence: r.commit_sequence,
            },
            (State::ManualReview, Some(reason)) => Outcome::ManualReview {
                reason,
                commit_sequence: r.commit_sequence,
            },
            _ => return None,
        };
        (!r.intent_id.is_empty() && is_idempotency_record(&outcome)).then(|| StoredOutcome {
            intent_id: r.intent_id.clone(),
            prior: PriorOutcome {
                fingerprint: r.fingerprint,
                outcome,
            },
        })
    })
}

/// Backlog, holds, pauses and partitions held back, from the lanes' in-memory state
/// (wall-clock ages).
pub fn gauges(lanes: &BTreeMap<i32, Lane>, assignment: &Assignment, now_ms: i64) {
    let now = now_ms.max(0) as u64;
    let mut held = 0;
    let mut held_oldest: Option<u64> = None;
    let mut paused: BTreeMap<PauseCause, usize> = BTreeMap::new();
    let mut held_back = 0;
    for p in assignment.assigned() {
        let Some(lane) = lanes.get(p) else {
            if let Some(cause) = assignment.missing_cause(*p) {
                *paused.entry(cause).or_default() += 1;
            }
            clear_partition(*p);
            continue;
        };
        if lane.backpressure {
            *paused.entry(PauseCause::Backpressure).or_default() += 1;
        }
        held_back += usize::from(lane.at_end && lane.held_back.is_held());
        let b = lane.seq.backlog();
        held += b.contacts_held;
        for h in lane.seq.held_contacts() {
            held_oldest = Some(held_oldest.map_or(h.hold.since.0, |o| o.min(h.hold.since.0)));
        }
        let label = p.to_string();
        metrics::gauge!(m::BACKLOG_WAITING, "partition" => label.clone()).set(b.waiting as f64);
        let age = b
            .oldest_waiting_since
            .map_or(0.0, |since| now.saturating_sub(since.0) as f64 / 1000.0);
        metrics::gauge!(m::BACKLOG_OLDEST_AGE, "partition" => label).set(age);
    }
    metrics::gauge!(m::CONTACTS_ON_HOLD).set(held as f64);
    metrics::gauge!(m::PARTITIONS_HELD_BACK).set(held_back as f64);
    let held_age = held_oldest.map_or(0.0, |since| now.saturating_sub(since) as f64 / 1000.0);
    metrics::gauge!(m::HELD_OLDEST_AGE).set(held_age);
    for cause in PauseCause::ALL {
        let n = paused.get(&cause).copied().unwrap_or(0);
        metrics::gauge!(m::PARTITIONS_PAUSED, "cause" => cause.as_str()).set(n as f64);
    }
}

/// Zeroes a partition's gauges (revoked, or without a lane).
pub fn clear_partition(p: i32) {
    metrics::gauge!(m::BACKLOG_WAITING, "partition" => p.to_string()).set(0.0);
    metrics::gauge!(m::BACKLOG_OLDEST_AGE, "partition" => p.to_string()).set(0.0);
}

/// The lag hand-off (see `super::lag`): each assigned partition's next offset to consume.
/// librdkafka's application position when it has one (it moves past transaction markers,
/// which a committed offset never does); right after a seek (a restore rewinds) it has none,
/// and the lane's committed offset is where consumption resumes, or the log's start for a lane
/// that never committed. A partition without a lane (restoring) has no position yet.
pub fn positions(
    board: &Positions,
    consumer: &EngineConsumer,
    lanes: &BTreeMap<i32, Lane>,
    assignment: &Assignment,
) {
    let app: HashMap<i32, i64> = match consumer.position() {
        Ok(tpl) => tpl
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) if o >= 0 => Some((e.partition(), o)),
                _ => None,
            })
            .collect(),
        Err(e) => {
            tracing::debug!(error = %e, "reading the consumer's positions failed");
            HashMap::new()
        }
    };
    let now: BTreeMap<i32, Option<Position>> = (assignment.assigned().iter())
        .map(|p| {
            let position = lanes.get(p).map(|lane| match app.get(p) {
                Some(o) => Position::At(*o),
                None if lane.next_offset >= 0 => Position::At(lane.next_offset),
                None => Position::LogStart,
            });
            (*p, position)
        })
        .collect();
    board.publish(now);
}
