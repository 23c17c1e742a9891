//! The write of one batch, in one round trip (`cc_apply_batch`, after
//! `cc_claim_decisions`).

use std::collections::HashMap;

use sqlx::types::Json;
use sqlx::PgPool;

use super::commands::CommandResult;
use super::{db, Result};
use crate::sequencer::{Reason, State, UnknownName};
use crate::store::snapshot::{RowKey, WaitingRow};

/// What one audit row records. Stored as `(from_state, to_state, reason)`; [`Transition::columns`]
/// and [`Transition::from_columns`] are the only translation, and the CHECK constraints of
/// migrations 0003 and 0005 list exactly these values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transition {
    /// A consumed record reached `to`, from `received` (first sight) or from
    /// `waiting_previous_commit` (`waited`).
    Record {
        waited: bool,
        to: State,
        reason: Option<Reason>,
    },
    /// A contact's sequences were resolved without an effect: by the `skip` timeout policy, or
    /// by an operator's `skip_to`.
    Skipped { by_operator: bool },
    /// The contact went on hold (`WAIT_TIMEOUT` or `CONTACT_BACKLOG_OVERFLOW`).
    Held { reason: Reason },
    /// An operator released the held contact.
    Released,
    /// An operator re-submitted an intent that ended in manual review: its decision is reopened
    /// and the original record goes to the sequencer again, reclaiming its slot (R9). The row
    /// names the intent; the intent's new outcome follows in its own row.
    Resubmitted,
    /// The record's contact is owned by another partition: the record was forwarded to it
    /// (the partition is in the row's detail), which decides it.
    Forwarded,
}

const RECEIVED: &str = "received";
const CONTACT: &str = "contact";
const SKIPPED: &str = "skipped";
const HELD: &str = "held";
const RELEASED: &str = "released";
const RESUBMITTED: &str = "resubmitted";
const OPERATOR: &str = "OPERATOR";
const FORWARDED: &str = "forwarded";

impl Transition {
    /// `(from_state, to_state, reason)`.
    pub fn columns(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Transition::Record { waited, to, reason } => (
                if waited {
                    State::WaitingPreviousCommit.as_str()
                } else {
                    RECEIVED
                },
                to.as_str(),
                reason.map_or("", Reason::as_str),
            ),
            Transition::Skipped { by_operator } => (
                CONTACT,
                SKIPPED,
                if by_operator {
                    OPERATOR
                } else {
                    Reason::WaitTimeout.as_str()
                },
            ),
            Transition::Held { reason } => (CONTACT, HELD, reason.as_str()),
            Transition::Released => (CONTACT, RELEASED, OPERATOR),
            Transition::Resubmitted => (State::ManualReview.as_str(), RESUBMITTED, OPERATOR),
            Transition::Forwarded => (RECEIVED, FORWARDED, ""),
        }
    }

    /// The transition stored in these columns; anything else is an error.
    pub fn from_columns(from: &str, to: &str, reason: &str) -> Result<Self, UnknownName> {
        let unknown = || UnknownName {
            what: "audit transition",
            value: format!("{from} -> {to} ({reason})"),
        };
        let t = match (from, to) {
            (CONTACT, SKIPPED) => Transition::Skipped {
                by_operator: match reason {
                    OPERATOR => true,
                    r if r == Reason::WaitTimeout.as_str() => false,
                    _ => return Err(unknown()),
                },
            },
            (CONTACT, HELD) => Transition::Held {
                reason: reason.parse()?,
            },
            (CONTACT, RELEASED) if reason == OPERATOR => Transition::Released,
            (CONTACT, _) => return Err(unknown()),
            (_, RESUBMITTED) if reason == OPERATOR => Transition::Resubmitted,
            (_, RESUBMITTED) => return Err(unknown()),
            (RECEIVED, FORWARDED) => Transition::Forwarded,
            (from, to) => {
                let waited = match from {
                    RECEIVED => false,
                    f if f == State::WaitingPreviousCommit.as_str() => true,
                    _ => return Err(unknown()),
                };
                let reason = match reason {
                    "" => None,
                    r => Some(r.parse()?),
                };
                Transition::Record {
                    waited,
                    to: to.parse()?,
                    reason,
                }
            }
        };
        // Only what `columns` writes is valid.
        if t.columns() != (from, to, reason) {
            return Err(unknown());
        }
        Ok(t)
    }

    /// Every value of the vocabulary (for tests and the CHECK constraints).
    pub fn all() -> Vec<Transition> {
        let mut all = Vec::new();
        let reasons = std::iter::once(None).chain(Reason::ALL.into_iter().map(Some));
        for waited in [false, true] {
            for to in State::ALL {
                for reason in reasons.clone() {
                    all.push(Transition::Record { waited, to, reason });
                }
            }
        }
        all.push(Transition::Skipped { by_operator: true });
        all.push(Transition::Skipped { by_operator: false });
        for reason in [Reason::WaitTimeout, Reason::ContactBacklogOverflow] {
            all.push(Transition::Held { reason });
        }
        all.push(Transition::Released);
        all.push(Transition::Resubmitted);
        all.push(Transition::Forwarded);
        all
    }
}

/// One audit row: a transition of one consumed record, or of a contact.
#[derive(Debug, Clone)]
pub struct TransitionRow {
    pub partition: i32,
    pub batch_no: u64,
    pub source_offset: i64,
    pub intent_id: String,
    pub contact_id: String,
    pub clinic_id: String,
    pub correlation_id: String,
    pub transition: Transition,
    pub commit_sequence: u64,
    pub contact_version: u64,
    pub fingerprint: u64,
    pub detail: String,
    pub fence: u64,
}

/// One contact's state as of a batch.
#[derive(Debug, Clone)]
pub struct ContactRow {
    pub contact_id: String,
    pub partition: i32,
    pub batch_no: u64,
    /// JSON text (`snapshot::WaitingRows::encode`).
    pub state: Box<serde_json::value::RawValue>,
    pub on_hold: bool,
    pub waiting: i32,
}

/// An operator command applied in a batch (or refused there: not applicable).
#[derive(Debug, Clone)]
pub struct AppliedCommand {
    pub id: i64,
    pub partition: i32,
    pub batch_no: u64,
    pub result: CommandResult,
}

/// A partition's part of a batch: checked against its fencing token, and recorded as its last
/// batch (its previous last batch becomes its committed one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PartitionWrite {
    pub partition: i32,
    pub fence: u64,
    pub batch_no: u64,
    /// One past the last record consumed by the end of the batch.
    pub next_offset: i64,
    /// The partition's consumed-time clock at the end of the batch.
    pub clock_ms: u64,
}

/// Why a batch write was refused.
pub const OUT_OF_SEQUENCE_SQLSTATE: &str = "CC003";
/// A batch wrote contacts another partition owns (the list is in the error's detail).
pub const OWNED_ELSEWHERE_SQLSTATE: &str = "CC004";

/// Why a durable write was refused: intents of the batch have an outcome from an earlier batch
/// (migrations 0012, 0015); the detail lists their ids.
pub const DECIDED_BEFORE_SQLSTATE: &str = "CC005";

/// Why a durable write was refused: intents of the batch are claimed by a batch of another
/// partition that has not committed yet (migration 0015); the detail lists their ids.
pub const DECIDED_IN_FLIGHT_SQLSTATE: &str = "CC006";

/// A contact a batch wrote (or forwarded a record of) from `partition` that `owner` owns;
/// `owner == partition` when a forward found that no other partition owns it (migration 0017).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct OwnedElsewhere {
    pub partition: i32,
    pub contact: String,
    pub owner: i32,
}

/// A record of `partition` forwarded to `owner`, the partition its contact's owner was learnt
/// to be: the write checks that `owner` still owns the contact (migration 0017).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub partition: i32,
    pub contact_id: String,
    pub owner: i32,
}

/// Everything one batch writes, per writer.
#[derive(Debug, Default)]
pub struct BatchWrite {
    /// Every partition the batch touches.
    pub partitions: Vec<PartitionWrite>,
    pub transitions: Vec<TransitionRow>,
    pub contacts: Vec<ContactRow>,
    pub commands: Vec<AppliedCommand>,
    /// `cc_waiting` rows of intents that started waiting.
    pub waiting: Vec<WaitingRow>,
    /// `cc_waiting` rows released by the partitions' previous (now committed) batch.
    pub deleted: Vec<RowKey>,
    /// Records forwarded to their contacts' owners.
    pub forwards: Vec<Forward>,
    /// The writer's wall clock (ms since the Unix epoch) when it decided the batch, before it
    /// queued the batch's outputs: their records' timestamps are at or after it. Recorded per
    /// partition (`cc_partition.last_decided_ms`, migration 0021) for `recovery-point
    /// resolve`, which looks for the outputs from there ([`batch_outputs`]).
    pub decided_at_ms: Option<i64>,
}

/// The rows of one write, borrowed: what [`apply_batch`] binds. The engine gathers each
/// group's rows from its batch plan without copying them (a copy of a large batch's rows, their
/// contact states included, cost tens of milliseconds on the engine thread, and as much again
/// to free).
#[derive(Debug, Default)]
pub struct BatchRows<'a> {
    pub partitions: Vec<PartitionWrite>,
    pub transitions: Vec<&'a TransitionRow>,
    pub contacts: Vec<&'a ContactRow>,
    pub commands: Vec<&'a AppliedCommand>,
    pub waiting: Vec<&'a WaitingRow>,
    pub deleted: Vec<&'a RowKey>,
    pub forwards: Vec<&'a Forward>,
    /// As [`BatchWrite::decided_at_ms`].
    pub decided_at_ms: Option<i64>,
}

impl<'a> From<&'a BatchWrite> for BatchRows<'a> {
    fn from(w: &'a BatchWrite) -> Self {
        Self {
            partitions: w.partitions.clone(),
            transitions: w.transitions.iter().collect(),
            contacts: w.contacts.iter().collect(),
            commands: w.commands.iter().collect(),
            waiting: w.waiting.iter().collect(),
            deleted: w.deleted.iter().collect(),
            forwards: w.forwards.iter().collect(),
            decided_at_ms: w.decided_at_ms,
        }
    }
}

/// The partitions that own `contacts` (`cc_contact.partition`), for those that have a row.
pub async fn contact_owners(pool: &PgPool, contacts: &[&str]) -> Result<HashMap<String, i32>> {
    let rows: Vec<(String, i32)> =
        sqlx::query_as("SELECT contact_id, partition FROM cc_contact WHERE contact_id = ANY($1)")
            .bind(contacts)
            .fetch_all(pool)
            .await
            .map_err(db("reading the owners of contacts"))?;
    Ok(rows.into_iter().collect())
}

/// Writes a batch in one round trip (`cc_apply_batch`); fails fenced when any partition's
/// token moved on.
pub async fn apply_batch<'a>(
    pool: &PgPool,
    topic: &str,
    writer: &str,
    lease: std::time::Duration,
    w: impl Into<BatchRows<'a>>,
) -> Result<()> {
    batch_query(topic, writer, lease, &w.into())
        .execute(pool)
        .await
        .map_err(db("writing a batch"))?;
    Ok(())
}

/// Runs a batch's write and rolls it back: whether PostgreSQL would accept it. Used only after
/// a write failed for its data, to find the partitions that cause it.
pub async fn try_batch<'a>(
    pool: &PgPool,
    topic: &str,
    writer: &str,
    lease: std::time::Duration,
    w: impl Into<BatchRows<'a>>,
) -> Result<()> {
    let w = w.into();
    let mut tx = pool.begin().await.map_err(db("starting a trial write"))?;
    let result = batch_query(topic, writer, lease, &w)
        .execute(&mut *tx)
        .await
        .map_err(db("trying a batch write"));
    tx.rollback()
        .await
        .map_err(db("rolling a trial write back"))?;
    result.map(|_| ())
}

// Long because `cc_apply_batch` takes one array per column (39 binds, 3 for the forwards'
// check, 1 for the writer's clock): one line per bind.
fn batch_query<'q>(
    topic: &'q str,
    writer: &'q str,
    lease: std::time::Duration,
    w: &'q BatchRows<'q>,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let mut partitions = w.partitions.clone();
    // A fixed lock order: two writers never deadlock on cc_partition rows.
    partitions.sort_unstable();
    let t = &w.transitions;
    let c = &w.contacts;
    let m = &w.commands;
    let g = &w.deleted;
    sqlx::query(
        // R5 against PostgreSQL's record, in the same statement: each new outcome claims its
        // intent id (migration 0015), before the batch's rows are written. The writer's clock
        // is noted on the partitions' rows cc_apply_batch holds (migration 0021). The forwards
        // are checked after them, so a contact this batch creates counts (migration 0017).
        "SELECT cc_claim_decisions($1, $4, $9, $10, $12, $17, $18),
                cc_apply_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
                               $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28,
                               $29, $30, $31, $32, $33, $34, $35, $36, $37, $38, $39),
                cc_note_decided_at($1, $4, $43),
                cc_check_forwards($40, $41, $42)",
    )
    .bind(topic)
    .bind(writer)
    .bind(lease.as_millis().min(i32::MAX as u128) as i32)
    .bind(partitions.iter().map(|p| p.partition).collect::<Vec<_>>())
    .bind(
        partitions
            .iter()
            .map(|p| p.fence as i64)
            .collect::<Vec<_>>(),
    )
    .bind(
        partitions
            .iter()
            .map(|p| p.batch_no as i64)
            .collect::<Vec<_>>(),
    )
    .bind(partitions.iter().map(|p| p.next_offset).collect::<Vec<_>>())
    .bind(
        partitions
            .iter()
            .map(|p| p.clock_ms as i64)
            .collect::<Vec<_>>(),
    )
    .bind(t.iter().map(|r| r.partition).collect::<Vec<_>>())
    .bind(t.iter().map(|r| r.batch_no as i64).collect::<Vec<_>>())
    .bind(t.iter().map(|r| r.source_offset).collect::<Vec<_>>())
    .bind(t.iter().map(|r| r.intent_id.as_str()).collect::<Vec<_>>())
    .bind(t.iter().map(|r| r.contact_id.as_str()).collect::<Vec<_>>())
    .bind(t.iter().map(|r| r.clinic_id.as_str()).collect::<Vec<_>>())
    .bind(
        t.iter()
            .map(|r| r.correlation_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        t.iter()
            .map(|r| r.transition.columns().0)
            .collect::<Vec<_>>(),
    )
    .bind(
        t.iter()
            .map(|r| r.transition.columns().1)
            .collect::<Vec<_>>(),
    )
    .bind(
        t.iter()
            .map(|r| r.transition.columns().2)
            .collect::<Vec<_>>(),
    )
    .bind(
        t.iter()
            .map(|r| r.commit_sequence as i64)
            .collect::<Vec<_>>(),
    )
    .bind(
        t.iter()
            .map(|r| r.contact_version as i64)
            .collect::<Vec<_>>(),
    )
    .bind(t.iter().map(|r| r.fingerprint as i64).collect::<Vec<_>>())
    .bind(t.iter().map(|r| r.detail.as_str()).collect::<Vec<_>>())
    .bind(t.iter().map(|r| r.fence as i64).collect::<Vec<_>>())
    .bind(c.iter().map(|r| r.contact_id.as_str()).collect::<Vec<_>>())
    .bind(c.iter().map(|r| r.partition).collect::<Vec<_>>())
    .bind(c.iter().map(|r| r.batch_no as i64).collect::<Vec<_>>())
    .bind(c.iter().map(|r| Json(&*r.state)).collect::<Vec<_>>())
    .bind(c.iter().map(|r| r.on_hold).collect::<Vec<_>>())
    .bind(c.iter().map(|r| r.waiting).collect::<Vec<_>>())
    .bind(m.iter().map(|r| r.id).collect::<Vec<_>>())
    .bind(m.iter().map(|r| r.batch_no as i64).collect::<Vec<_>>())
    .bind(m.iter().map(|r| r.result.to_column()).collect::<Vec<_>>())
    .bind(
        w.waiting
            .iter()
            .map(|r| r.key.contact_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        w.waiting
            .iter()
            .map(|r| r.key.commit_sequence as i64)
            .collect::<Vec<_>>(),
    )
    .bind(
        w.waiting
            .iter()
            .map(|r| r.key.batch_no as i64)
            .collect::<Vec<_>>(),
    )
    .bind(
        w.waiting
            .iter()
            .map(|r| Json(&*r.entry))
            .collect::<Vec<_>>(),
    )
    .bind(g.iter().map(|k| k.contact_id.as_str()).collect::<Vec<_>>())
    .bind(
        g.iter()
            .map(|k| k.commit_sequence as i64)
            .collect::<Vec<_>>(),
    )
    .bind(g.iter().map(|k| k.batch_no as i64).collect::<Vec<_>>())
    .bind(w.forwards.iter().map(|f| f.partition).collect::<Vec<_>>())
    .bind(
        w.forwards
            .iter()
            .map(|f| f.contact_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(w.forwards.iter().map(|f| f.owner).collect::<Vec<_>>())
    .bind(w.decided_at_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_transition_round_trips_through_its_columns() {
        for t in Transition::all() {
            let (from, to, reason) = t.columns();
            assert_eq!(Transition::from_columns(from, to, reason), Ok(t), "{t:?}");
        }
    }

    #[test]
    fn unknown_columns_are_errors() {
        for (from, to, reason) in [
            ("received", "committed", ""),
            ("nowhere", "committed_causal", ""),
            ("received", "manual_review", "NOT_A_REASON"),
            ("contact", "skipped", ""),
            ("contact", "released", "WAIT_TIMEOUT"),
            ("contact", "held", "OPERATOR"),
            ("contact", "committed_causal", ""),
            ("manual_review", "resubmitted", ""),
            ("received", "resubmitted", "OPERATOR"),
            ("contact", "resubmitted", "OPERATOR"),
        ] {
            assert!(
                Transition::from_columns(from, to, reason).is_err(),
                "{from} {to} {reason}"
            );
        }
    }
}
