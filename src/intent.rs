//! Decoding and validation of input records: the one place that turns raw Kafka bytes into an
//! [`Intent`] the rest of the pipeline can trust, or into a typed [`InvalidIntent`] that becomes
//! a manual-review record (reason `INVALID_INTENT`) with the raw bytes kept.

use prost::Message;
use xxhash_rust::xxh3::Xxh3;

use crate::config::LimitsConfig;
use crate::proto::{Action, Intent};

/// An input record, copied out of librdkafka's buffer (it may outlive the poll: waiting intents
/// are kept until their turn). Stored in the contact state of its waiting intents, its bytes as
/// base64 strings (see [`stored_bytes`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InRecord {
    pub partition: i32,
    pub offset: i64,
    #[serde(with = "stored_bytes")]
    pub key: Option<Vec<u8>>,
    #[serde(with = "stored_bytes")]
    pub value: Option<Vec<u8>>,
    /// W3C trace context of the producer, forwarded to the outputs.
    #[serde(with = "stored_bytes")]
    pub traceparent: Option<Vec<u8>>,
}

/// The JSON form of a record's bytes: one base64 string. serde's default, an array of numbers,
/// made every byte a jsonb number (about ten times the bytes, and the bulk of the parsing of a
/// batch's contact states); states written that way before are still read.
mod stored_bytes {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => s.serialize_str(&STANDARD.encode(b)),
            None => s.serialize_none(),
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Stored {
        Base64(String),
        Numbers(Vec<u8>),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        match Option::<Stored>::deserialize(d)? {
            None => Ok(None),
            Some(Stored::Numbers(b)) => Ok(Some(b)),
            Some(Stored::Base64(s)) => STANDARD
                .decode(s)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// Why a record is not a valid intent. The message names the field and the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidIntent {
    #[error("record has no value (tombstone)")]
    NoValue,
    #[error("record is {size} bytes, above limits.max_record_bytes ({max})")]
    RecordTooLarge { size: usize, max: usize },
    #[error("value is not a protobuf Intent: {0}")]
    Undecodable(String),
    #[error("required field `{0}` is missing or empty")]
    MissingField(&'static str),
    #[error("field `{field}` is {len} bytes, above limits.max_id_bytes ({max})")]
    FieldTooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("field `{field}` holds control character U+{code:04X} at byte {at}; ids must be printable text")]
    ControlCharacter {
        field: &'static str,
        code: u32,
        at: usize,
    },
    #[error("payload is {len} bytes, above limits.max_payload_bytes ({max})")]
    PayloadTooLarge { len: usize, max: usize },
    #[error("record key is missing; it must equal contact_id {contact_id:?}")]
    MissingKey { contact_id: String },
    #[error("record key {key:?} does not equal contact_id {contact_id:?}")]
    KeyMismatch { key: String, contact_id: String },
    #[error("action {0} is not a known Action value")]
    UnknownAction(i32),
    #[error("action is ACTION_UNSPECIFIED")]
    UnspecifiedAction,
}

impl InvalidIntent {
    /// A short, low-cardinality name for the failure (a metric label).
    pub fn kind(&self) -> &'static str {
        match self {
            InvalidIntent::NoValue => "no_value",
            InvalidIntent::RecordTooLarge { .. } => "record_too_large",
            InvalidIntent::Undecodable(_) => "undecodable",
            InvalidIntent::MissingField(_) => "missing_field",
            InvalidIntent::FieldTooLong { .. } => "field_too_long",
            InvalidIntent::ControlCharacter { .. } => "control_character",
            InvalidIntent::PayloadTooLarge { .. } => "payload_too_large",
            InvalidIntent::MissingKey { .. } => "missing_key",
            InvalidIntent::KeyMismatch { .. } => "key_mismatch",
            InvalidIntent::UnknownAction(_) => "unknown_action",
            InvalidIntent::UnspecifiedAction => "unspecified_action",
        }
    }
}

/// An intent that passed validation, with what the pipeline derives from it once.
#[derive(Debug, Clone)]
pub struct ValidIntent {
    pub intent: Intent,
    /// The `correlation_id` was absent and has been generated here.
    pub correlation_generated: bool,
    /// Hash of the intent's content (everything but `correlation_id` and `created_at_ms`):
    /// the same `intent_id` with another fingerprint is an `IDEMPOTENCY_CONFLICT`.
    pub fingerprint: u64,
}

/// Decodes and validates one record. Never panics, whatever the bytes.
pub fn decode(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    limits: &LimitsConfig,
) -> Result<ValidIntent, InvalidIntent> {
    let value = value.ok_or(InvalidIntent::NoValue)?;
    let size = value.len() + key.map_or(0, <[u8]>::len);
    if size > limits.max_record_bytes {
        return Err(InvalidIntent::RecordTooLarge {
            size,
            max: limits.max_record_bytes,
        });
    }
    let mut intent =
        Intent::decode(value).map_err(|e| InvalidIntent::Undecodable(e.to_string()))?;
    validate(&intent, key, limits)?;
    let correlation_generated = intent.correlation_id.is_empty();
    if correlation_generated {
        intent.correlation_id = uuid::Uuid::new_v4().to_string();
    }
    let fingerprint = fingerprint(&intent);
    Ok(ValidIntent {
        intent,
        correlation_generated,
        fingerprint,
    })
}

fn validate(
    intent: &Intent,
    key: Option<&[u8]>,
    limits: &LimitsConfig,
) -> Result<(), InvalidIntent> {
    for (field, value, required) in [
        ("intent_id", &intent.intent_id, true),
        ("contact_id", &intent.contact_id, true),
        ("clinic_id", &intent.clinic_id, false),
        ("correlation_id", &intent.correlation_id, false),
    ] {
        if required && value.trim().is_empty() {
            return Err(InvalidIntent::MissingField(field));
        }
        if value.len() > limits.max_id_bytes {
            return Err(InvalidIntent::FieldTooLong {
                field,
                len: value.len(),
                max: limits.max_id_bytes,
            });
        }
        // PostgreSQL refuses U+0000 in text and jsonb, and other control characters in ids
        // only ever come from a broken producer: refuse them here, not in the durable write.
        if let Some((at, c)) = value.char_indices().find(|(_, c)| c.is_control()) {
            return Err(InvalidIntent::ControlCharacter {
                field,
                code: c as u32,
                at,
            });
        }
    }
    if intent.payload.len() > limits.max_payload_bytes {
        return Err(InvalidIntent::PayloadTooLarge {
            len: intent.payload.len(),
            max: limits.max_payload_bytes,
        });
    }
    match Action::try_from(intent.action) {
        Ok(Action::Unspecified) => return Err(InvalidIntent::UnspecifiedAction),
        Ok(_) => {}
        Err(_) => return Err(InvalidIntent::UnknownAction(intent.action)),
    }
    match key {
        None => {
            return Err(InvalidIntent::MissingKey {
                contact_id: intent.contact_id.clone(),
            })
        }
        Some(key) if key != intent.contact_id.as_bytes() => {
            return Err(InvalidIntent::KeyMismatch {
                key: String::from_utf8_lossy(key).into_owned(),
                contact_id: intent.contact_id.clone(),
            })
        }
        Some(_) => {}
    }
    Ok(())
}

/// Content hash used for idempotency conflicts. Fields are length-prefixed so that moving bytes
/// between adjacent fields changes the hash.
pub fn fingerprint(intent: &Intent) -> u64 {
    let mut h = Xxh3::new();
    for s in [&intent.intent_id, &intent.contact_id, &intent.clinic_id] {
        h.update(&(s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    }
    h.update(&intent.dispatch_priority.to_le_bytes());
    h.update(&intent.causal_sequence.to_le_bytes());
    h.update(&intent.expected_version.to_le_bytes());
    h.update(&intent.action.to_le_bytes());
    h.update(&(intent.payload.len() as u64).to_le_bytes());
    h.update(&intent.payload);
    h.digest()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> LimitsConfig {
        LimitsConfig::default()
    }

    #[test]
    fn stored_record_bytes_are_base64_strings_and_round_trip() {
        let record = InRecord {
            partition: 3,
            offset: 42,
            key: Some(b"c-1".to_vec()),
            value: Some(vec![0, 1, 254, 255, 10]),
            traceparent: None,
        };
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(json["key"], "Yy0x");
        assert_eq!(json["value"], "AAH+/wo=");
        assert!(json["traceparent"].is_null());
        assert_eq!(serde_json::from_value::<InRecord>(json).unwrap(), record);
    }

    #[test]
    fn states_stored_with_byte_arrays_are_still_read() {
        let old = serde_json::json!({
            "partition": 1, "offset": 7, "key": [99, 45, 49], "value": [0, 255],
            "traceparent": null
        });
        let record: InRecord = serde_json::from_value(old).unwrap();
        assert_eq!(record.key.as_deref(), Some(&b"c-1"[..]));
        assert_eq!(record.value.as_deref(), Some(&[0u8, 255][..]));
        assert_eq!(record.traceparent, None);
    }

    #[test]
    fn stored_record_bytes_that_are_neither_form_are_refused() {
        for bad in [
            serde_json::json!("not base64!"),
            serde_json::json!([256]),
            serde_json::json!(7),
        ] {
            let json = serde_json::json!({
                "partition": 1, "offset": 7, "key": null, "value": bad, "traceparent": null
            });
            assert!(serde_json::from_value::<InRecord>(json).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn any_record_bytes_round_trip_through_the_stored_form(
            key in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
            value in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..512)),
        ) {
            let record = InRecord { partition: 0, offset: 0, key, value, traceparent: None };
            let back: InRecord =
                serde_json::from_str(&serde_json::to_string(&record).unwrap()).unwrap();
            prop_assert_eq!(back, record);
        }
    }

    fn sample() -> Intent {
        Intent {
            intent_id: "i-1".into(),
            contact_id: "c-1".into(),
            clinic_id: "clinic-9".into(),
            correlation_id: "corr-1".into(),
            dispatch_priority: 3,
            causal_sequence: 1,
            expected_version: 0,
            action: Action::Book as i32,
            payload: b"{}".to_vec().into(),
            created_at_ms: 1,
        }
    }

    #[test]
    fn valid_intent_decodes_with_its_fields() {
        let bytes = sample().encode_to_vec();
        let v = decode(Some(b"c-1"), Some(&bytes), &limits()).unwrap();
        assert_eq!(v.intent, sample());
        assert!(!v.correlation_generated);
    }

    #[test]
    fn missing_correlation_id_is_generated() {
        let mut i = sample();
        i.correlation_id.clear();
        let v = decode(Some(b"c-1"), Some(&i.encode_to_vec()), &limits()).unwrap();
        assert!(v.correlation_generated);
        assert_eq!(v.intent.correlation_id.len(), 36);
    }

    #[test]
    fn garbage_bytes_are_undecodable() {
        let err = decode(Some(b"c-1"), Some(&[0xff, 0xff, 0xff, 0x01]), &limits()).unwrap_err();
        assert!(matches!(err, InvalidIntent::Undecodable(_)), "{err}");
    }

    #[test]
    fn key_must_equal_contact_id() {
        let bytes = sample().encode_to_vec();
        let err = decode(Some(b"c-2"), Some(&bytes), &limits()).unwrap_err();
        assert_eq!(
            err,
            InvalidIntent::KeyMismatch {
                key: "c-2".into(),
                contact_id: "c-1".into()
            }
        );
        let err = decode(None, Some(&bytes), &limits()).unwrap_err();
        assert!(matches!(err, InvalidIntent::MissingKey { .. }));
    }

    #[test]
    fn required_fields_are_checked() {
        let mut i = sample();
        i.intent_id = " ".into();
        let err = decode(Some(b"c-1"), Some(&i.encode_to_vec()), &limits()).unwrap_err();
        assert_eq!(err, InvalidIntent::MissingField("intent_id"));
        let mut i = sample();
        i.contact_id.clear();
        let err = decode(Some(b""), Some(&i.encode_to_vec()), &limits()).unwrap_err();
        assert_eq!(err, InvalidIntent::MissingField("contact_id"));
    }

    #[test]
    fn unknown_and_unspecified_actions_are_invalid() {
        let mut i = sample();
        i.action = 99;
        let err = decode(Some(b"c-1"), Some(&i.encode_to_vec()), &limits()).unwrap_err();
        assert_eq!(err, InvalidIntent::UnknownAction(99));
        i.action = 0;
        let err = decode(Some(b"c-1"), Some(&i.encode_to_vec()), &limits()).unwrap_err();
        assert_eq!(err, InvalidIntent::UnspecifiedAction);
    }

    #[test]
    fn control_characters_in_ids_are_invalid_and_named() {
        for (field, bad) in [
            ("intent_id", "i-\u{0}1"),
            ("contact_id", "c\u{7}"),
            ("clinic_id", "\u{1b}[31m"),
            ("correlation_id", "corr\u{85}"),
        ] {
            let mut i = sample();
            match field {
                "intent_id" => i.intent_id = bad.into(),
                "contact_id" => i.contact_id = bad.into(),
                "clinic_id" => i.clinic_id = bad.into(),
                _ => i.correlation_id = bad.into(),
            }
            let key = i.contact_id.clone();
            let err =
                decode(Some(key.as_bytes()), Some(&i.encode_to_vec()), &limits()).unwrap_err();
            assert!(
                matches!(err, InvalidIntent::ControlCharacter { field: f, .. } if f == field),
                "{field}: {err}"
            );
        }
        // Printable text of any script is fine.
        let mut i = sample();
        i.contact_id = "paciente-ção-日本".into();
        let key = i.contact_id.clone();
        assert!(decode(Some(key.as_bytes()), Some(&i.encode_to_vec()), &limits()).is_ok());
    }

    #[test]
    fn size_limits_are_enforced() {
        let mut l = limits();
        l.max_payload_bytes = 4;
        let mut i = sample();
        i.payload = vec![0u8; 5].into();
        let err = decode(Some(b"c-1"), Some(&i.encode_to_vec()), &l).unwrap_err();
        assert_eq!(err, InvalidIntent::PayloadTooLarge { len: 5, max: 4 });
        l.max_record_bytes = 8;
        let err = decode(Some(b"c-1"), Some(&i.encode_to_vec()), &l).unwrap_err();
        assert!(matches!(err, InvalidIntent::RecordTooLarge { .. }));
        let err = decode(Some(b"c-1"), None, &limits()).unwrap_err();
        assert_eq!(err, InvalidIntent::NoValue);
    }

    #[test]
    fn fingerprint_ignores_correlation_and_creation_time_only() {
        let a = sample();
        let mut b = sample();
        b.correlation_id = "other".into();
        b.created_at_ms = 99;
        assert_eq!(fingerprint(&a), fingerprint(&b));
        b.payload = b"{ }".to_vec().into();
        assert_ne!(fingerprint(&a), fingerprint(&b));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(key in proptest::collection::vec(any::<u8>(), 0..16),
                                       value in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(Some(&key), Some(&value), &limits());
        }
    }
}
