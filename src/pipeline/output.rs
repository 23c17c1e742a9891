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

/// Where a contact's effects go: the partition librdkafka's own partitioner (the one
/// `kafka.client` `partitioner` names, `consistent_random` by default) gives the contact's id
/// for the side-effects topic's partition count recorded in the store (migration 0016), not for
/// the topic's count now. Partitions an operator adds to the topic would otherwise move
/// contacts' later effects to other partitions, where a reader meets them in no order with the
/// earlier ones (R1: one partition per contact, in commit order). For the count the store
/// recorded from the topic, the partition is the one the producer chose before: the same
/// function, on the same count.
#[derive(Debug, Clone, Copy)]
pub struct EffectPlacement {
    partitions: i32,
    hash: KeyHash,
}

/// librdkafka's keyed partitioners; the `_random` variants differ only for an empty
/// (`consistent_random`) or missing (`murmur2_random`, `fnv1a_random`) key, and a contact id is
/// never empty (validation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyHash {
    Crc32,
    Murmur2,
    Fnv1a,
}

impl EffectPlacement {
    /// For `partitioner` (a librdkafka `partitioner` name; `None`: its default) over
    /// `partitions` (at least 1). `None` for a partitioner that does not place by key
    /// (`random`), or an unknown name: the configuration's check refuses both.
    pub fn new(partitioner: Option<&str>, partitions: i32) -> Option<Self> {
        let hash = match partitioner.unwrap_or("consistent_random") {
            "consistent" | "consistent_random" => KeyHash::Crc32,
            "murmur2" | "murmur2_random" => KeyHash::Murmur2,
            "fnv1a" | "fnv1a_random" => KeyHash::Fnv1a,
            _ => return None,
        };
        (partitions > 0).then_some(Self { partitions, hash })
    }

    /// The partition count the effects are spread over.
    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    /// The partition of `key`'s effects.
    pub fn partition(&self, key: &[u8]) -> i32 {
        use rdkafka::bindings as rd;
        let f = match self.hash {
            KeyHash::Crc32 => rd::rd_kafka_msg_partitioner_consistent,
            KeyHash::Murmur2 => rd::rd_kafka_msg_partitioner_murmur2,
            KeyHash::Fnv1a => rd::rd_kafka_msg_partitioner_fnv1a,
        };
        // SAFETY: these three partitioners read `keylen` bytes from `key` (a live slice) and
        // use neither the topic handle nor the opaques (librdkafka's rdkafka_msg.c): each is a
        // hash of the key modulo `partition_cnt`, which is above zero (`new`).
        #[allow(unsafe_code)]
        unsafe {
            f(
                std::ptr::null(),
                key.as_ptr().cast(),
                key.len(),
                self.partitions,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        }
    }
}

/// The effect of a committed intent, keyed by contact and placed by [`EffectPlacement`], so
/// one contact's effects stay in one partition of the side-effects topic, in commit order.
pub struct EffectFields {
    pub commit_sequence: u64,
    pub contact_version: u64,
    pub committed_at_ms: i64,
    pub fencing_token: u64,
    pub sequence_from_producer: bool,
}

pub fn side_effect(
    topic: &Arc<str>,
    placement: &EffectPlacement,
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
        partition: Some(placement.partition(intent.contact_id.as_bytes())),
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

#[cfg(test)]
mod tests {
    use super::EffectPlacement;

    /// A contact's partition depends on its id and the recorded count only, never on the
    /// topic's count now; each partitioner spreads contacts over every recorded partition.
    #[test]
    fn a_contacts_partition_is_its_hash_over_the_recorded_count() {
        for partitioner in [
            None,
            Some("consistent"),
            Some("murmur2_random"),
            Some("fnv1a"),
        ] {
            let three = EffectPlacement::new(partitioner, 3).expect("keyed");
            let eight = EffectPlacement::new(partitioner, 8).expect("keyed");
            let mut seen = [0usize; 3];
            let mut moved = 0;
            for k in 0..300 {
                let contact = format!("contact-{k}");
                let p = three.partition(contact.as_bytes());
                assert!((0..3).contains(&p), "{partitioner:?}: {p}");
                assert_eq!(p, three.partition(contact.as_bytes()), "deterministic");
                seen[p as usize] += 1;
                moved += usize::from(eight.partition(contact.as_bytes()) != p);
            }
            assert!(seen.iter().all(|&n| n > 50), "{partitioner:?}: {seen:?}");
            // What recording the count prevents: over 8 partitions most contacts land elsewhere.
            assert!(moved > 150, "{partitioner:?}: {moved} of 300 moved");
        }
        // librdkafka's CRC-32 partitioner, as documented: zlib's CRC-32 of the key modulo the count.
        let crc = EffectPlacement::new(None, 1000).expect("keyed");
        assert_eq!(crc.partition(b"123456789"), (0xCBF4_3926u32 % 1000) as i32);
        assert!(EffectPlacement::new(Some("random"), 3).is_none());
        assert!(EffectPlacement::new(None, 0).is_none());
    }
}
