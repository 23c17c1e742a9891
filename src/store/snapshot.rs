//! The stored form of the sequencer's per-contact state (`cc_contact.state`) and of its waiting
//! intents (`cc_waiting`, migration 0009).
//!
//! A contact's state is the sequencer's [`ContactSnapshot`], whose waiting intents carry a
//! [`Held`] payload: the original input record, byte for byte (so a waiting intent can be
//! emitted, or sent to manual review, after a restart), and the correlation id it was first
//! seen with (generated on first sight when the producer gave none, so it must stay the same).
//!
//! A waiting intent is stored once, in a `cc_waiting` row written by the batch in which it
//! starts waiting; the contact's state names it by `{"commit_sequence", "row"}` (`row`: that
//! batch). The batch that releases it drops the name; the partition's next batch deletes the
//! row (the releasing batch has then committed, so no rollback can bring the name back).
//! Readers get the state with its rows put back (`cc_resolved_state`), each entry still naming
//! its row. States written before migration 0009 hold their waiting intents inline; they are
//! read as they are and move to rows the next time their contact is written.
//! This module is the one place that encodes and decodes it.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::value::{to_raw_value, RawValue};

use crate::intent::InRecord;
use crate::sequencer::{ContactSnapshot, HoldState, Millis, WaitingSnapshot};

/// What the sequencer carries with every intent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub record: InRecord,
    pub correlation_id: String,
}

/// One contact's stored state.
pub type StoredContact = ContactSnapshot<Held>;

/// A stored contact state that does not decode.
#[derive(Debug, thiserror::Error)]
#[error("a stored contact state is unreadable: {0}")]
pub struct Unreadable(#[from] serde_json::Error);

/// A waiting intent's row in `cc_waiting`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RowKey {
    pub contact_id: String,
    pub commit_sequence: u64,
    /// The batch that wrote the row.
    pub batch_no: u64,
}

/// A row to insert: a waiting intent as the sequencer exports it, serialized (JSON text, the
/// write sends it as it is).
#[derive(Debug, Clone)]
pub struct WaitingRow {
    pub key: RowKey,
    pub entry: Box<RawValue>,
}

/// A contact's state encoded for one batch: the state (JSON text), the rows of the intents that
/// started waiting, and the rows of the intents no longer waiting.
///
/// Serialized straight from the snapshot, with no `serde_json::Value` tree in between: building
/// and dropping one per touched contact, then serializing it into the write's arguments, was a
/// fifth of the engine's CPU on a backlog (perf).
#[derive(Debug)]
pub struct Encoded {
    pub state: Box<RawValue>,
    pub inserted: Vec<WaitingRow>,
    pub released: Vec<RowKey>,
}

/// How a state names a waiting intent's row.
#[derive(Serialize)]
struct RowName {
    commit_sequence: u64,
    row: u64,
}

/// A contact's stored state: its snapshot, each waiting intent replaced by its row's name.
/// Written field by field from the snapshot ([`WaitingRows::encode`] destructures it whole, so
/// a field added to [`ContactSnapshot`] does not compile until it is written here too).
#[derive(Serialize)]
struct NamedState<'a> {
    contact_id: &'a str,
    resolved_through: u64,
    version: u64,
    next_sequence: u64,
    hold: Option<HoldState>,
    gap_since: Option<Millis>,
    waiting: &'a [RowName],
}

/// A waiting intent that has its row: what tells it from another intent waiting on the same
/// sequence later (an operator's re-submission).
#[derive(Debug)]
struct Stored {
    commit_sequence: u64,
    intent_id: String,
    since: Millis,
    batch_no: u64,
}

impl Stored {
    fn is(&self, w: &WaitingSnapshot<Held>) -> bool {
        self.commit_sequence == w.commit_sequence
            && self.since == w.since
            && self.intent_id == w.intent.meta.intent_id
    }
}

/// Which waiting intents of one partition's contacts have their row, as of the lane's last
/// encoded state, and the rows its last committed batch released (the next batch deletes
/// them). Rebuilt from the store by every restore.
#[derive(Debug, Default)]
pub struct WaitingRows {
    stored: HashMap<String, Vec<Stored>>,
    releasable: Vec<RowKey>,
}

impl WaitingRows {
    /// Encodes `contact` as written by batch `batch_no`: its intents without a row get one
    /// (written by this batch), rows of intents no longer waiting are released.
    pub fn encode(&mut self, contact: StoredContact, batch_no: u64) -> Result<Encoded, Unreadable> {
        let ContactSnapshot {
            contact_id,
            resolved_through,
            version,
            next_sequence,
            hold,
            gap_since,
            waiting,
        } = contact;
        // The rows known before, by sequence: a contact may hold up to
        // `sequencer.max_pending_per_contact` waiting intents, so no search over all of them
        // per intent. Each row found is taken; those left over are released.
        let mut before: HashMap<u64, Vec<Stored>> = HashMap::new();
        for s in self.stored.remove(&contact_id).unwrap_or_default() {
            before.entry(s.commit_sequence).or_default().push(s);
        }
        let mut now = Vec::with_capacity(waiting.len());
        let mut names = Vec::with_capacity(waiting.len());
        let mut inserted = Vec::new();
        for w in waiting {
            let found = before.get_mut(&w.commit_sequence).and_then(|same| {
                let i = same.iter().position(|s| s.is(&w))?;
                Some(same.swap_remove(i))
            });
            let stored = match found {
                Some(s) => s,
                None => {
                    let s = Stored {
                        commit_sequence: w.commit_sequence,
                        intent_id: w.intent.meta.intent_id.clone(),
                        since: w.since,
                        batch_no,
                    };
                    inserted.push(WaitingRow {
                        key: RowKey {
                            contact_id: contact_id.clone(),
                            commit_sequence: w.commit_sequence,
                            batch_no,
                        },
                        entry: to_raw_value(&w)?,
                    });
                    s
                }
            };
            names.push(RowName {
                commit_sequence: stored.commit_sequence,
                row: stored.batch_no,
            });
            now.push(stored);
        }
        let released = before
            .into_values()
            .flatten()
            .map(|b| RowKey {
                contact_id: contact_id.clone(),
                commit_sequence: b.commit_sequence,
                batch_no: b.batch_no,
            })
            .collect();
        let state = to_raw_value(&NamedState {
            contact_id: &contact_id,
            resolved_through,
            version,
            next_sequence,
            hold,
            gap_since,
            waiting: &names,
        })?;
        if !now.is_empty() {
            self.stored.insert(contact_id, now);
        }
        Ok(Encoded {
            state,
            inserted,
            released,
        })
    }

    /// Decodes a state read with its rows put back (`cc_resolved_state`), and remembers which
    /// of its waiting intents have a row. Inline entries (written before migration 0009) have
    /// none: the contact's next write gives them one.
    pub fn decode(&mut self, state: serde_json::Value) -> Result<StoredContact, Unreadable> {
        let rows: Vec<Option<u64>> = state["waiting"]
            .as_array()
            .map(|ws| ws.iter().map(|w| w["row"].as_u64()).collect())
            .unwrap_or_default();
        let contact = decode(state)?;
        let stored: Vec<Stored> = contact
            .waiting
            .iter()
            .zip(rows)
            .filter_map(|(w, row)| {
                Some(Stored {
                    commit_sequence: w.commit_sequence,
                    intent_id: w.intent.meta.intent_id.clone(),
                    since: w.since,
                    batch_no: row?,
                })
            })
            .collect();
        if !stored.is_empty() {
            self.stored.insert(contact.contact_id.clone(), stored);
        }
        Ok(contact)
    }

    /// The lane's batch committed: the rows it released are deleted by the next one.
    pub fn committed(&mut self, released: impl IntoIterator<Item = RowKey>) {
        self.releasable.extend(released);
    }

    /// The rows the next batch deletes.
    pub fn take_releasable(&mut self) -> Vec<RowKey> {
        std::mem::take(&mut self.releasable)
    }
}

/// Encodes a contact's state whole, its waiting intents inline (the form before migration
/// 0009, still read; tests write it).
pub fn encode(contact: &StoredContact) -> Result<serde_json::Value, Unreadable> {
    Ok(serde_json::to_value(contact)?)
}

/// Decodes a contact's state with its waiting intents in place (inline, or put back from
/// their rows by `cc_resolved_state`).
pub fn decode(state: serde_json::Value) -> Result<StoredContact, Unreadable> {
    Ok(serde_json::from_value(state)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sequencer::{Intent, IntentMeta};

    fn waiting(seq: u64, id: &str, since: u64) -> WaitingSnapshot<Held> {
        WaitingSnapshot {
            commit_sequence: seq,
            since: Millis(since),
            intent: Intent {
                meta: IntentMeta {
                    intent_id: id.into(),
                    contact_id: "c".into(),
                    causal_sequence: seq,
                    expected_version: 0,
                    priority: 1,
                    fingerprint: 7,
                    offset: seq as i64,
                    resubmission: false,
                    size: 3,
                },
                payload: Held {
                    record: InRecord {
                        partition: 0,
                        offset: seq as i64,
                        key: Some(b"c".to_vec()),
                        value: Some(vec![1, 2, 3]),
                        traceparent: None,
                    },
                    correlation_id: format!("corr-{id}"),
                },
            },
        }
    }

    fn contact(waits: Vec<WaitingSnapshot<Held>>) -> StoredContact {
        let mut c = StoredContact::new("c");
        c.next_sequence = 10;
        c.gap_since = waits.first().map(|w| w.since);
        c.waiting = waits;
        c
    }

    fn key(seq: u64, batch_no: u64) -> RowKey {
        RowKey {
            contact_id: "c".into(),
            commit_sequence: seq,
            batch_no,
        }
    }

    fn json(raw: &RawValue) -> serde_json::Value {
        serde_json::from_str(raw.get()).unwrap()
    }

    /// What `cc_resolved_state` returns: each name replaced by its row's entry, plus `row`.
    fn resolve(state: &RawValue, rows: &[WaitingRow]) -> serde_json::Value {
        let mut state = json(state);
        for w in state["waiting"].as_array_mut().unwrap() {
            let (seq, row) = (w["commit_sequence"].as_u64(), w["row"].as_u64());
            let r = rows
                .iter()
                .find(|r| Some(r.key.commit_sequence) == seq && Some(r.key.batch_no) == row)
                .expect("a row for every name");
            let mut entry = json(&r.entry);
            entry["row"] = serde_json::json!(r.key.batch_no);
            *w = entry;
        }
        state
    }

    #[test]
    fn a_waiting_intent_is_written_once_named_by_the_state_and_released_when_it_leaves() {
        let mut rows = WaitingRows::default();
        let first = rows
            .encode(contact(vec![waiting(3, "i3", 100)]), 5)
            .unwrap();
        assert_eq!(first.inserted.len(), 1);
        assert_eq!(first.inserted[0].key, key(3, 5));
        assert!(first.released.is_empty());
        assert_eq!(
            json(&first.state)["waiting"],
            serde_json::json!([{"commit_sequence": 3, "row": 5}]),
            "the state names the row, without the intent"
        );
        // Touched again with one more waiting: only the new one gets a row.
        let second = rows
            .encode(
                contact(vec![waiting(3, "i3", 100), waiting(5, "i5", 120)]),
                6,
            )
            .unwrap();
        assert_eq!(
            second.inserted.iter().map(|r| &r.key).collect::<Vec<_>>(),
            [&key(5, 6)]
        );
        assert!(second.released.is_empty());
        // 3 released (its predecessors came), 5 still waits.
        let third = rows
            .encode(contact(vec![waiting(5, "i5", 120)]), 7)
            .unwrap();
        assert!(third.inserted.is_empty());
        assert_eq!(third.released, [key(3, 5)]);
        assert_eq!(
            json(&third.state)["waiting"],
            serde_json::json!([{"commit_sequence": 5, "row": 6}])
        );
        // Released rows are deleted by the batch after the one that committed the release.
        assert!(rows.take_releasable().is_empty());
        rows.committed(third.released);
        assert_eq!(rows.take_releasable(), [key(3, 5)]);
        assert!(rows.take_releasable().is_empty());
    }

    #[test]
    fn the_same_sequence_waiting_again_later_gets_a_row_of_its_own() {
        let mut rows = WaitingRows::default();
        rows.encode(contact(vec![waiting(3, "i3", 100)]), 5)
            .unwrap();
        // Released to manual review, then re-submitted by an operator: it waits again, since
        // a later time, in the same batch as far as the rows can tell.
        let again = rows
            .encode(contact(vec![waiting(3, "i3", 900)]), 9)
            .unwrap();
        assert_eq!(again.released, [key(3, 5)]);
        assert_eq!(
            again.inserted.iter().map(|r| &r.key).collect::<Vec<_>>(),
            [&key(3, 9)]
        );
    }

    #[test]
    fn a_resolved_state_decodes_whole_and_its_rows_are_not_written_again() {
        let mut rows = WaitingRows::default();
        let c = contact(vec![waiting(3, "i3", 100), waiting(5, "i5", 120)]);
        let written = rows.encode(c.clone(), 5).unwrap();
        let resolved = resolve(&written.state, &written.inserted);
        let mut restored = WaitingRows::default();
        assert_eq!(restored.decode(resolved).unwrap(), c);
        let next = restored.encode(c, 6).unwrap();
        assert!(next.inserted.is_empty() && next.released.is_empty());
        assert_eq!(json(&next.state), json(&written.state));
    }

    #[test]
    fn every_field_of_the_snapshot_is_stored() {
        // A held contact (no waiting intents) and one with a gap: each decodes to itself, and
        // its stored state has the snapshot's fields, `waiting` aside.
        let mut held = contact(Vec::new());
        held.resolved_through = 4;
        held.version = 3;
        held.hold = Some(HoldState {
            since: Millis(77),
            reason: crate::sequencer::HoldReason::WaitTimeout { missing: 5 },
        });
        let waiting = contact(vec![waiting(6, "i6", 100)]);
        for c in [held, waiting] {
            let written = WaitingRows::default().encode(c.clone(), 5).unwrap();
            let mut stored = json(&written.state);
            let mut whole = serde_json::to_value(&c).unwrap();
            stored.as_object_mut().unwrap().remove("waiting");
            whole.as_object_mut().unwrap().remove("waiting");
            assert_eq!(stored, whole);
            let resolved = resolve(&written.state, &written.inserted);
            assert_eq!(WaitingRows::default().decode(resolved).unwrap(), c);
        }
    }

    #[test]
    fn an_inline_state_from_before_the_rows_reads_and_moves_to_rows_at_its_next_write() {
        let c = contact(vec![waiting(3, "i3", 100)]);
        let inline = encode(&c).unwrap();
        let mut rows = WaitingRows::default();
        assert_eq!(rows.decode(inline).unwrap(), c);
        let next = rows.encode(c, 8).unwrap();
        assert_eq!(next.inserted.len(), 1);
        assert_eq!(next.inserted[0].key, key(3, 8));
        assert!(next.released.is_empty());
    }

    #[test]
    fn a_name_without_its_row_is_unreadable() {
        let mut rows = WaitingRows::default();
        let written = rows
            .encode(contact(vec![waiting(3, "i3", 100)]), 5)
            .unwrap();
        assert!(WaitingRows::default().decode(json(&written.state)).is_err());
    }
}
