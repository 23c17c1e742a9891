//! Builds the records causal-commit produces: effects and manual-review records.

use std::sync::Arc;

use prost::Message as _;

use opentelemetry::KeyValue;

use super::kafka::OutRecord;
use crate::intent::InRecord;
use crate::proto::{Intent, ManualReview, ReviewReason, SideEffect};
use crate::telemetry::trace;

pub const CORRELATION_HEADER: &str = "correlation_id";
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// On a record forwarded to its contact's owner partition: where it was first consumed
/// (`<topic>/<partition>/<offset>`), for the audit only.
pub const FORWARDED_FROM_HEADER: &str = "cc-forwarded-from";

/// Where an output record came from.
#[derive(Debug, Clone)]
pub struct Source<'a> {
    pub topic: &'a str,
    pub record: &'a InRecord,
}

/// The output's headers: the correlation id, and the trace context — the processor's span for
/// this record when traces are on (see `telemetry::trace`), the producer's as it came otherwise.
fn headers(correlation_id: &str, traceparent: Option<Vec<u8>>) -> Vec<(&'static str, Vec<u8>)> {
    let mut h = Vec::with_capacity(2);
    if !correlation_id.is_empty() {
        h.push((CORRELATION_HEADER, correlation_id.as_bytes().to_vec()));
    }
    if let Some(tp) = traceparent {
        h.push((TRACEPARENT_HEADER, tp));
    }
    h
}

/// The effect of a committed intent, keyed by contact so one contact's effects stay in one
/// partition of the side-effects topic, in commit order.
pub struct EffectFields {
    pub commit_sequence: u64,
    pub contact_version: u64,
    pub committed_at_ms: i64,
    pub fencing_token: u64,
    pub sequence_from_producer: bool,
}

pub fn side_effect(
    topic: &Arc<str>,
    intent: &Intent,
    traceparent: Option<&Vec<u8>>,
    f: &EffectFields,
) -> OutRecord {
    let effect = SideEffect {
        intent_id: intent.intent_id.clone(),
        contact_id: intent.contact_id.clone(),
        clinic_id: intent.clinic_id.clone(),
        correlation_id: intent.correlation_id.clone(),
        dispatch_priority: intent.dispatch_priority,
        action: intent.action,
        payload: intent.payload.clone(),
        created_at_ms: intent.created_at_ms,
        commit_sequence: f.commit_sequence,
        contact_version: f.contact_version,
        committed_at_ms: f.committed_at_ms,
        fencing_token: f.fencing_token,
        sequence_from_producer: f.sequence_from_producer,
    };
    let seq = f.commit_sequence.to_le_bytes();
    let (traceparent, span) = trace::child_of(
        traceparent,
        &[b"effect", intent.intent_id.as_bytes(), &seq],
        || {
            vec![
                KeyValue::new("outcome", "committed_causal"),
                KeyValue::new("intent_id", intent.intent_id.clone()),
                KeyValue::new("correlation_id", intent.correlation_id.clone()),
                KeyValue::new("commit_sequence", f.commit_sequence as i64),
            ]
        },
    );
    OutRecord {
        topic: topic.clone(),
        partition: None,
        key: intent.contact_id.as_bytes().to_vec(),
        value: effect.encode_to_vec(),
        headers: headers(&intent.correlation_id, traceparent),
        span,
    }
}

/// What a manual-review record says beyond the original record.
pub struct ReviewFields<'a> {
    pub reason: ReviewReason,
    pub detail: String,
    pub intent: Option<&'a Intent>,
    pub expected_sequence: u64,
    pub received_sequence: u64,
    pub waited_ms: u64,
    pub reviewed_at_ms: i64,
    pub fencing_token: u64,
}

/// The longest `detail` a manual-review record carries (a store's error message can quote the
/// value it refused).
pub const MAX_DETAIL_BYTES: usize = 1024;

/// A manual-review record: the original bytes, byte for byte, plus why. Keyed like the input
/// (or by partition/offset when the input had no key) so re-submission keeps the contact's key.
///
/// The record never exceeds `max_bytes` (key, value and headers): a producer may write to the
/// intents topic a record as large as that topic takes, and its review record adds an envelope,
/// so it could not be produced whole, and the partition would stall on it. Such a record keeps
/// the first bytes of the original (the value first), with `original_truncated` set; the whole
/// record stays on the intents topic at its partition and offset. Valid records always fit
/// (`limits.max_record_bytes`, checked with the configuration).
pub fn manual_review(
    topic: &Arc<str>,
    source: &Source<'_>,
    f: ReviewFields<'_>,
    max_bytes: usize,
) -> OutRecord {
    let rec = source.record;
    let empty = Intent::default();
    let intent = f.intent.unwrap_or(&empty);
    let original_value = rec.value.as_deref().unwrap_or_default();
    let original_key = rec.key.as_deref().unwrap_or_default();
    let mut review = ManualReview {
        original_value: Default::default(),
        original_key: Default::default(),
        reason: f.reason as i32,
        detail: capped(f.detail, MAX_DETAIL_BYTES),
        intent_id: intent.intent_id.clone(),
        contact_id: intent.contact_id.clone(),
        clinic_id: intent.clinic_id.clone(),
        correlation_id: intent.correlation_id.clone(),
        expected_sequence: f.expected_sequence,
        received_sequence: f.received_sequence,
        waited_ms: f.waited_ms,
        source_topic: source.topic.to_string(),
        source_partition: rec.partition,
        source_offset: rec.offset,
        reviewed_at_ms: f.reviewed_at_ms,
        fencing_token: f.fencing_token,
        original_key_size: original_key.len() as u64,
        original_value_size: original_value.len() as u64,
        original_truncated: false,
    };
    let reason = f.reason.as_str_name();
    let (traceparent, span) = trace::child_of(
        rec.traceparent.as_ref(),
        &[
            b"review",
            &rec.partition.to_le_bytes(),
            &rec.offset.to_le_bytes(),
            reason.as_bytes(),
        ],
        || {
            vec![
                KeyValue::new("outcome", "manual_review_record"),
                KeyValue::new("reason", reason),
                KeyValue::new("intent_id", intent.intent_id.clone()),
                KeyValue::new("correlation_id", intent.correlation_id.clone()),
                KeyValue::new("source_partition", i64::from(rec.partition)),
                KeyValue::new("source_offset", rec.offset),
            ]
        },
    );
    let tp_len = traceparent
        .as_ref()
        .map_or(0, |t| TRACEPARENT_HEADER.len() + t.len());
    let headers_len = |correlation_id: &str| match correlation_id {
        "" => tp_len,
        c => tp_len + CORRELATION_HEADER.len() + c.len(),
    };
    // Room for the original bytes: the limit less everything else (each of the two fields adds
    // a tag and a length of at most 5 bytes once present).
    let room = |key: &[u8], review: &ManualReview| {
        max_bytes.saturating_sub(
            review.encoded_len() + key.len() + headers_len(&review.correlation_id) + 12,
        )
    };
    let by_position = || format!("{}-{}", rec.partition, rec.offset).into_bytes();
    let mut key = if original_key.is_empty() {
        by_position()
    } else {
        original_key.to_vec()
    };
    // The original key is in the value too (room counts the record's key already).
    let whole = original_value.len() + original_key.len();
    if whole > room(&key, &review) {
        // Whatever an invalid record's ids hold, the envelope stays small.
        for id in [
            &mut review.intent_id,
            &mut review.contact_id,
            &mut review.clinic_id,
            &mut review.correlation_id,
        ] {
            *id = capped(std::mem::take(id), MAX_DETAIL_BYTES);
        }
    }
    if whole <= room(&key, &review) {
        review.original_value = original_value.to_vec().into();
        review.original_key = original_key.to_vec().into();
    } else {
        review.original_truncated = true;
        key = by_position();
        let room = room(&key, &review);
        let value_part = original_value.len().min(room);
        let key_part = original_key.len().min(room - value_part);
        review.original_value = original_value[..value_part].to_vec().into();
        review.original_key = original_key[..key_part].to_vec().into();
    }
    OutRecord {
        topic: topic.clone(),
        partition: None,
        key,
        headers: headers(&review.correlation_id, traceparent),
        value: review.encode_to_vec(),
        span,
    }
}

/// `text` cut to at most `max` bytes, on a character boundary.
pub fn capped(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A record forwarded, byte for byte, to the partition that owns its contact, inside the same
/// transaction as the consumed offsets (so exactly once).
pub fn forwarded(source: &Source<'_>, owner: i32, correlation_id: &str) -> OutRecord {
    let rec = source.record;
    // The producer's trace context travels on unchanged: the owner's spans join its trace.
    let mut h = headers(correlation_id, rec.traceparent.clone());
    h.push((
        FORWARDED_FROM_HEADER,
        format!("{}/{}/{}", source.topic, rec.partition, rec.offset).into_bytes(),
    ));
    OutRecord {
        topic: source.topic.into(),
        partition: Some(owner),
        key: rec.key.clone().unwrap_or_default(),
        value: rec.value.clone().unwrap_or_default(),
        headers: h,
        span: None,
    }
}
