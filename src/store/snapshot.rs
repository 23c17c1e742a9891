//! The stored form of the sequencer's per-contact state (`cc_contact.state`).
//!
//! A contact's state is the sequencer's [`ContactSnapshot`], whose waiting intents carry a
//! [`Held`] payload: the original input record, byte for byte (so a waiting intent can be
//! emitted, or sent to manual review, after a restart), and the correlation id it was first
//! seen with (generated on first sight when the producer gave none, so it must stay the same).
//! This module is the one place that encodes and decodes it.

use serde::{Deserialize, Serialize};

use crate::intent::InRecord;
use crate::sequencer::ContactSnapshot;

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

/// Encodes a contact's state for `cc_contact.state`.
pub fn encode(contact: &StoredContact) -> Result<serde_json::Value, Unreadable> {
    Ok(serde_json::to_value(contact)?)
}

/// Decodes a contact's state from `cc_contact.state`.
pub fn decode(state: serde_json::Value) -> Result<StoredContact, Unreadable> {
    Ok(serde_json::from_value(state)?)
}
