//! The contract's reading of an input record (§3, §5 bad input), written apart from the
//! processor's [`crate::intent::decode`]: the referee reads the record itself, so a processor
//! that accepts an invalid record, refuses a valid one, or takes two contents for one (R5) is
//! judged by the contract, not by its own reading. A unit test holds the two readings to the
//! same answers on arbitrary records.

use std::hash::{Hash as _, Hasher as _};

use prost::Message as _;

use crate::config::LimitsConfig;
use crate::proto::{Action, Intent};
use crate::sequencer::MAX_SEQUENCE;

/// A valid intent as the contract reads it.
pub(super) struct Read {
    /// As decoded: a `correlation_id` the producer left empty stays empty (the processor
    /// generates one for its outputs).
    pub intent: Intent,
    /// Its content (R5): every field but `correlation_id` and `created_at_ms`, which a
    /// producer's retry may regenerate (the README's reading of "different content").
    pub content: u64,
}

/// Reads one input record: `Err` says why it is not a valid intent.
pub(super) fn read(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    limits: &LimitsConfig,
) -> Result<Read, String> {
    let Some(value) = value else {
        return Err("the record has no value".into());
    };
    let size = value.len() + key.map_or(0, <[u8]>::len);
    if size > limits.max_record_bytes {
        return Err(format!(
            "the record is {size} bytes, above max_record_bytes ({})",
            limits.max_record_bytes
        ));
    }
    let intent = Intent::decode(value).map_err(|e| format!("not a protobuf Intent: {e}"))?;
    for (field, text) in [
        ("intent_id", &intent.intent_id),
        ("contact_id", &intent.contact_id),
    ] {
        if text.trim().is_empty() {
            return Err(format!("required field {field} is empty"));
        }
    }
    for (field, text) in [
        ("intent_id", &intent.intent_id),
        ("contact_id", &intent.contact_id),
        ("clinic_id", &intent.clinic_id),
        ("correlation_id", &intent.correlation_id),
    ] {
        if text.len() > limits.max_id_bytes {
            return Err(format!(
                "{field} is {} bytes, above max_id_bytes ({})",
                text.len(),
                limits.max_id_bytes
            ));
        }
        if text.chars().any(char::is_control) {
            return Err(format!("{field} holds a control character"));
        }
    }
    if intent.payload.len() > limits.max_payload_bytes {
        return Err(format!(
            "the payload is {} bytes, above max_payload_bytes ({})",
            intent.payload.len(),
            limits.max_payload_bytes
        ));
    }
    if !matches!(Action::try_from(intent.action), Ok(a) if a != Action::Unspecified) {
        return Err(format!("action {} is no known action", intent.action));
    }
    if key != Some(intent.contact_id.as_bytes()) {
        return Err("the record's key is not its contact_id".into());
    }
    if intent.causal_sequence > MAX_SEQUENCE {
        return Err(format!(
            "causal_sequence {} is above 2^63-1",
            intent.causal_sequence
        ));
    }
    let content = content(&intent);
    Ok(Read { intent, content })
}

/// The content of an intent (R5): its encoding without `correlation_id` and `created_at_ms`.
fn content(intent: &Intent) -> u64 {
    let bare = Intent {
        correlation_id: String::new(),
        created_at_ms: 0,
        ..intent.clone()
    };
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bare.encode_to_vec().hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn limits() -> LimitsConfig {
        LimitsConfig {
            max_record_bytes: 400,
            max_payload_bytes: 64,
            max_id_bytes: 16,
            ..LimitsConfig::default()
        }
    }

    /// Intents near every limit and rule: ids empty, blank, long or with control characters,
    /// any action number, the key equal or not, sequences around 2^63.
    fn intents() -> impl Strategy<Value = (Intent, bool)> {
        let id = prop_oneof![
            1 => Just(String::new()),
            1 => Just(" ".to_string()),
            8 => "[a-c]{1,3}",
            1 => "[a-c]{15,18}",
            1 => "[a-c\u{0}\u{7f}\n]{1,4}",
        ];
        (
            (id.clone(), id.clone(), id.clone(), id),
            (-1i32..8, 0usize..70, any::<bool>()),
            (
                prop_oneof![
                    Just(0u64),
                    Just(MAX_SEQUENCE),
                    Just(MAX_SEQUENCE + 1),
                    1u64..5
                ],
                0u64..3,
                any::<i64>(),
            ),
        )
            .prop_map(
                |((intent_id, contact_id, clinic_id, correlation_id), (action, len, keyed), s)| {
                    let intent = Intent {
                        intent_id,
                        contact_id,
                        clinic_id,
                        correlation_id,
                        action,
                        payload: vec![7; len].into(),
                        causal_sequence: s.0,
                        expected_version: s.1,
                        created_at_ms: s.2,
                        ..Intent::default()
                    };
                    (intent, keyed)
                },
            )
    }

    /// Valid intents, with few values per field so that two of them often agree.
    fn valid() -> impl Strategy<Value = Intent> {
        (
            ("[ab]{1,2}", "[ab]{1,2}", "[ab]{0,1}", "[ab]{0,1}"),
            (1i32..=5, 0usize..3, 0u64..3, 0u64..3, 0i64..2, -1i32..2),
        )
            .prop_map(
                |((intent_id, contact_id, clinic_id, correlation_id), n)| Intent {
                    intent_id,
                    contact_id,
                    clinic_id,
                    correlation_id,
                    action: n.0,
                    payload: vec![7; n.1].into(),
                    causal_sequence: n.2,
                    expected_version: n.3,
                    created_at_ms: n.4,
                    dispatch_priority: n.5,
                },
            )
    }

    fn processor(key: Option<&[u8]>, value: Option<&[u8]>) -> Result<u64, ()> {
        match crate::intent::decode(key, value, &limits()) {
            Ok(v) if v.intent.causal_sequence <= MAX_SEQUENCE => Ok(v.fingerprint),
            _ => Err(()),
        }
    }

    proptest! {
        #[test]
        fn the_referee_and_the_processor_agree_on_which_records_are_valid(
            (intent, keyed) in intents(),
            raw in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let value = intent.encode_to_vec();
            let key = if keyed { intent.contact_id.as_bytes().to_vec() } else { b"k".to_vec() };
            for (k, v) in [
                (Some(&key[..]), Some(&value[..])),
                (None, Some(&value[..])),
                (Some(&key[..]), None),
                (Some(&key[..]), Some(&raw[..])),
            ] {
                prop_assert_eq!(
                    read(k, v, &limits()).is_ok(),
                    processor(k, v).is_ok(),
                    "{:?} / {:?}", k, v
                );
            }
        }

        #[test]
        fn the_referee_and_the_processor_agree_on_which_contents_are_the_same(
            a in valid(),
            b in valid(),
            field in 0usize..10,
        ) {
            // b2 differs from a in one field at most (7 and 8 are not content).
            let mut b2 = a.clone();
            match field {
                0 => b2.intent_id = b.intent_id,
                1 => b2.contact_id = b.contact_id,
                2 => b2.clinic_id = b.clinic_id,
                3 => b2.action = b.action,
                4 => b2.payload = b.payload,
                5 => b2.causal_sequence = b.causal_sequence,
                6 => b2.expected_version = b.expected_version,
                7 => b2.correlation_id = b.correlation_id,
                8 => b2.created_at_ms = b.created_at_ms,
                _ => b2.dispatch_priority = b.dispatch_priority,
            }
            let (ka, kb) = (a.contact_id.clone(), b2.contact_id.clone());
            let ours = (
                read(Some(ka.as_bytes()), Some(&a.encode_to_vec()), &limits()),
                read(Some(kb.as_bytes()), Some(&b2.encode_to_vec()), &limits()),
            );
            let theirs = (
                processor(Some(ka.as_bytes()), Some(&a.encode_to_vec())),
                processor(Some(kb.as_bytes()), Some(&b2.encode_to_vec())),
            );
            let ((Ok(x), Ok(y)), (Ok(p), Ok(q))) = (ours, theirs) else {
                return Err(TestCaseError::fail("valid intents read as invalid"));
            };
            prop_assert_eq!(x.content == y.content, p == q);
        }
    }

    #[test]
    fn a_retry_with_a_new_correlation_id_and_time_has_the_same_content() {
        let a = Intent {
            intent_id: "i".into(),
            contact_id: "c".into(),
            action: Action::Book as i32,
            correlation_id: "x".into(),
            created_at_ms: 1,
            ..Intent::default()
        };
        let b = Intent {
            correlation_id: String::new(),
            created_at_ms: 2,
            ..a.clone()
        };
        let c = Intent {
            dispatch_priority: 1,
            ..a.clone()
        };
        let r = |i: &Intent| read(Some(b"c"), Some(&i.encode_to_vec()), &limits()).unwrap();
        assert_eq!(r(&a).content, r(&b).content);
        assert_ne!(r(&a).content, r(&c).content);
        assert_eq!(
            r(&b).intent.correlation_id,
            "",
            "the referee generates nothing"
        );
    }
}
