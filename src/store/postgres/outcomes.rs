//! The durable idempotency record: the outcome an intent id ended in (R5).
//!
//! It is read from the audit (`cc_transition`): the latest terminal row of the id, among the
//! rows that may stand for the intent. Excluded: invalid input and unprocessable records (their
//! ids may be anything, even unstorable, and a valid record with the same id is still
//! processed) and `IDEMPOTENCY_CONFLICT` rows (they carry the *conflicting* content's
//! fingerprint: the first outcome of an id stays its record). A later row of the same id can
//! only come from an operator re-submission of a manual-review item, whose new outcome
//! replaces the review.

use sqlx::PgPool;

use super::{db, Result};
use crate::sequencer::{Outcome, PriorOutcome, Reason, State, UnknownName};

/// The SQL condition on `cc_transition` rows that make up the idempotency record, defined
/// once in migration 0013 (`cc_is_idempotency_row`, inlined by the planner: the intent index
/// is still probed).
pub const IDEMPOTENCY_ROWS: &str = "cc_is_idempotency_row(to_state, reason, intent_id)";

/// Whether an outcome with this reason is part of the idempotency record (see the module doc).
pub fn is_idempotency_record(outcome: &Outcome) -> bool {
    match outcome {
        Outcome::Committed { .. } => true,
        Outcome::Waiting { .. } => false,
        Outcome::Blocked { reason, .. } | Outcome::ManualReview { reason, .. } => !matches!(
            reason,
            Reason::InvalidIntent | Reason::Unprocessable | Reason::IdempotencyConflict
        ),
    }
}

/// The audit columns of an outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Columns<'a> {
    pub state: &'a str,
    pub reason: &'a str,
    pub commit_sequence: u64,
    pub contact_version: u64,
}

/// The outcome an intent id ended in, with its content fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredOutcome {
    pub intent_id: String,
    pub prior: PriorOutcome,
}

/// A stored outcome that does not name a terminal state and reason of the contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadOutcome {
    #[error(transparent)]
    Unknown(#[from] UnknownName),
    #[error("stored outcome {state:?} is not terminal")]
    NotTerminal { state: String },
    #[error("stored outcome {state:?} has no reason")]
    NoReason { state: String },
}

impl StoredOutcome {
    /// The columns this outcome is stored in (state, reason, sequence, version).
    pub fn columns(&self) -> Columns<'static> {
        let (state, reason, commit_sequence, contact_version) = match self.prior.outcome {
            Outcome::Committed {
                commit_sequence,
                contact_version,
            } => (
                State::CommittedCausal,
                None,
                commit_sequence,
                contact_version,
            ),
            Outcome::Waiting { commit_sequence } => {
                (State::WaitingPreviousCommit, None, commit_sequence, 0)
            }
            Outcome::Blocked {
                reason,
                commit_sequence,
            } => (State::BlockedConflict, Some(reason), commit_sequence, 0),
            Outcome::ManualReview {
                reason,
                commit_sequence,
            } => (State::ManualReview, Some(reason), commit_sequence, 0),
        };
        Columns {
            state: state.as_str(),
            reason: reason.map_or("", Reason::as_str),
            commit_sequence,
            contact_version,
        }
    }

    /// The outcome stored in these columns. Unknown names are an error, never a guess.
    pub fn from_columns(
        intent_id: String,
        fingerprint: u64,
        c: Columns<'_>,
    ) -> Result<Self, BadOutcome> {
        let state: State = c.state.parse()?;
        let reason = || -> Result<Reason, BadOutcome> {
            if c.reason.is_empty() {
                return Err(BadOutcome::NoReason {
                    state: c.state.to_owned(),
                });
            }
            Ok(c.reason.parse()?)
        };
        let outcome = match state {
            State::CommittedCausal => Outcome::Committed {
                commit_sequence: c.commit_sequence,
                contact_version: c.contact_version,
            },
            State::BlockedConflict => Outcome::Blocked {
                reason: reason()?,
                commit_sequence: c.commit_sequence,
            },
            State::ManualReview => Outcome::ManualReview {
                reason: reason()?,
                commit_sequence: c.commit_sequence,
            },
            State::WaitingPreviousCommit | State::Duplicate => {
                return Err(BadOutcome::NotTerminal {
                    state: c.state.to_owned(),
                })
            }
        };
        Ok(StoredOutcome {
            intent_id,
            prior: PriorOutcome {
                fingerprint,
                outcome,
            },
        })
    }
}

/// `(intent_id, fingerprint, to_state, reason, commit_sequence, contact_version)` as selected
/// from `cc_transition`.
pub type OutcomeRow = (String, i64, String, String, i64, i64);

impl TryFrom<OutcomeRow> for StoredOutcome {
    type Error = BadOutcome;

    fn try_from(
        (intent_id, fp, state, reason, seq, version): OutcomeRow,
    ) -> Result<Self, BadOutcome> {
        StoredOutcome::from_columns(
            intent_id,
            fp as u64,
            Columns {
                state: &state,
                reason: &reason,
                commit_sequence: seq as u64,
                contact_version: version as u64,
            },
        )
    }
}

/// Rows read from the audit as outcomes; an unreadable row is an error naming the store.
pub fn outcomes_from_rows(rows: Vec<OutcomeRow>) -> Result<Vec<StoredOutcome>> {
    rows.into_iter()
        .map(|row| StoredOutcome::try_from(row).map_err(super::Error::BadOutcome))
        .collect()
}

/// The idempotency record of `intent_ids`, in one round trip.
pub async fn lookup_outcomes(pool: &PgPool, intent_ids: &[String]) -> Result<Vec<StoredOutcome>> {
    if intent_ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<OutcomeRow> = sqlx::query_as(&format!(
        "SELECT DISTINCT ON (intent_id) intent_id, fingerprint, to_state, reason,
                commit_sequence, contact_version
           FROM cc_transition
          WHERE intent_id = ANY($1) AND {IDEMPOTENCY_ROWS}
          ORDER BY intent_id, id DESC"
    ))
    .bind(intent_ids)
    .fetch_all(pool)
    .await
    .map_err(db("looking up idempotency outcomes"))?;
    outcomes_from_rows(rows)
}

/// The idempotency record of `intent_ids` from committed batches only (`cc_is_committed`,
/// migration 0013): what may be copied into Redis (see migration 0012).
pub async fn lookup_committed_outcomes(
    pool: &PgPool,
    intent_ids: &[String],
) -> Result<Vec<StoredOutcome>> {
    let rows: Vec<OutcomeRow> = sqlx::query_as(&format!(
        "SELECT DISTINCT ON (intent_id) intent_id, fingerprint, to_state, reason,
                commit_sequence, contact_version
           FROM cc_transition t
           JOIN cc_partition p ON p.topic = t.topic AND p.partition = t.partition
          WHERE intent_id = ANY($1) AND {IDEMPOTENCY_ROWS}
            AND cc_is_committed(t.batch_no, p.committed_batch, p.last_batch)
          ORDER BY intent_id, t.id DESC"
    ))
    .bind(intent_ids)
    .fetch_all(pool)
    .await
    .map_err(db("looking up committed idempotency outcomes"))?;
    outcomes_from_rows(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(outcome: Outcome) -> StoredOutcome {
        StoredOutcome {
            intent_id: "i".into(),
            prior: PriorOutcome {
                fingerprint: 9,
                outcome,
            },
        }
    }

    #[test]
    fn every_terminal_outcome_round_trips_through_its_columns() {
        let mut outcomes = vec![Outcome::Committed {
            commit_sequence: 3,
            contact_version: 2,
        }];
        for reason in Reason::ALL {
            outcomes.push(Outcome::Blocked {
                reason,
                commit_sequence: 4,
            });
            outcomes.push(Outcome::ManualReview {
                reason,
                commit_sequence: 5,
            });
        }
        for outcome in outcomes {
            let s = stored(outcome);
            let back = StoredOutcome::from_columns("i".into(), 9, s.columns()).unwrap();
            assert_eq!(back, s);
        }
    }

    #[test]
    fn unknown_or_non_terminal_stored_values_are_errors_not_guesses() {
        let c = |state, reason| Columns {
            state,
            reason,
            commit_sequence: 1,
            contact_version: 1,
        };
        for (state, reason) in [
            ("committed", ""),
            ("manual_review", "SOMETHING_NEW"),
            ("manual_review", ""),
            ("blocked_conflict", ""),
            ("waiting_previous_commit", ""),
            ("duplicate", ""),
        ] {
            assert!(
                StoredOutcome::from_columns("i".into(), 1, c(state, reason)).is_err(),
                "{state} {reason}"
            );
        }
    }

    #[test]
    fn conflicts_invalid_and_unprocessable_records_are_not_the_idempotency_record() {
        for reason in [
            Reason::IdempotencyConflict,
            Reason::InvalidIntent,
            Reason::Unprocessable,
        ] {
            assert!(!is_idempotency_record(&Outcome::Blocked {
                reason,
                commit_sequence: 0
            }));
            assert!(!is_idempotency_record(&Outcome::ManualReview {
                reason,
                commit_sequence: 0
            }));
        }
        assert!(is_idempotency_record(&Outcome::Blocked {
            reason: Reason::VersionConflict,
            commit_sequence: 2
        }));
        assert!(is_idempotency_record(&Outcome::ManualReview {
            reason: Reason::WaitTimeout,
            commit_sequence: 2
        }));
    }
}
