//! The contract verifier (`causal-commit verify`): the project's referee. It reads what the
//! processor consumed, produced and audited ([`observe`] fills an [`Observed`]), then judges it
//! with a pure function ([`check`] returns a [`Report`]). It checks what the contract says,
//! never what the code happens to do: every rule below cites the contract.
//!
//! # What is read ([`observe`])
//!
//! In this order, so that a run still in progress is never reported broken by the verifier's
//! own timing (verify a quiet system anyway: see "Pending work" below):
//!
//! 1. the intents topic, from the beginning to its current end (read_committed): every
//!    record's partition, offset, timestamp, key and value, undecoded;
//! 2. the processor group's recovery points (the last batch committed in Kafka per input
//!    partition, from the committed offsets' metadata);
//! 3. the side-effects and manual-review topics, the same way;
//! 4. the recovery points again, with the committed offsets;
//! 5. PostgreSQL, in one read-only repeatable-read snapshot: the outcome, wait-start
//!    (`waiting_previous_commit`), skip, release and re-submission rows of `cc_transition`, the `cc_contact` states with waiting intents or
//!    a hold, and the operators' requests (`cc_command`, each with whether `cc_admin_audit`
//!    recorded it). Rows of a batch past its partition's recovery point (4) belong to a Kafka
//!    transaction that has not committed (in flight, or aborted and not yet rolled back by a
//!    restore) and are ignored, as a restore would drop them; a contact whose latest state is
//!    such a row is taken at its previous state. Rows of a batch committed by (2) must have
//!    their outputs among (3).
//!
//! plus the settings the rules depend on: `sequencer.wait_timeout`, `sequencer.on_timeout`,
//! `sequencer.max_pending_per_contact` and the input limits (the verifier's configuration must
//! be the processor's). A row or state the reading cannot interpret is kept as a note and
//! counted (`unreadable_audit`): what it hides cannot be vouched for.
//!
//! # Scope
//!
//! A non-empty `--prefix` restricts everything to intents whose `intent_id` starts with it,
//! invalid input records whose key (or whatever `intent_id` can still be read from them) starts
//! with it, and the outputs, audit rows and contacts of those. Runs sharing topics must not
//! share contacts. Output records that do not decode belong to no prefix and always count.
//!
//! # What is checked ([`check`])
//!
//! The verifier reads input records itself (`input.rs`), not with the processor's
//! `intent::decode`, so that it does not share that reading's mistakes (a unit test holds the
//! two to the same answers on arbitrary records). An input record is a *valid intent* when it
//! has a value that decodes as an `Intent` and, with the configured limits, is at most
//! `max_record_bytes` with its key, has a non-blank `intent_id` and `contact_id`, ids of at
//! most `max_id_bytes` without control characters (what the stores cannot hold), a payload
//! of at most `max_payload_bytes`, a known action other than `ACTION_UNSPECIFIED`, a key equal
//! to its `contact_id` and a `causal_sequence` the stores can hold (at most 2^63-1); anything
//! else is an *invalid record* (§5 bad input). An intent's *content* (R5) is every field but
//! `correlation_id` and `created_at_ms`, which a producer's retry may regenerate. An intent
//! id's *original content* is the content of its first record; when its records span input
//! partitions whose first records differ (either may have been consumed first), the one of
//! those contents that got an outcome, else the earliest produced. Each check is one counter
//! of the report:
//!
//! - `reorders` (the contract, R1): per contact, all effects on one side-effects partition
//!   (each effect elsewhere counts), and there in strictly increasing `commit_sequence` (each
//!   effect below an earlier one counts; an equal one is a duplicate).
//! - `duplicates_emitted` (R1, R5, §5 exactly-once): each intent id with more than one effect,
//!   and each (contact, sequence) committed by more than one intent.
//! - `gaps` (R1, R3): per contact, every sequence from 1 to its highest effect is resolved by
//!   an effect, a `VERSION_CONFLICT` review (a version conflict resolves its slot, R6) or an
//!   audited skip (an operator's `skip_to` or the `skip` timeout policy, R7). Each missing
//!   sequence counts. A slot sent to manual review, or still waiting, below an effect is a gap:
//!   the effect passed an unresolved predecessor.
//! - `committed_before_predecessor` (R3): an effect whose lower sequences were all resolved,
//!   but some only in a batch after its own (a block or a skip that came too late). Times
//!   here are the audit rows' (PostgreSQL's clock, one time per batch), so a resolution in
//!   the effect's own batch is in time; a resolution without its audit row counts from the
//!   start, and an effect without one is not judged (both are `audit_mismatches` findings).
//! - `sequence_mismatches` (R2): an effect of an intent with `causal_sequence > 0` has exactly
//!   that `commit_sequence` and `sequence_from_producer = true`; one without, `false`.
//! - `assigned_order_violations` (R2): among a contact's intents without `causal_sequence` read
//!   from one input partition, commit order is that partition's order (each effect below an
//!   earlier-read one counts). Re-submitted intents reclaim their old slot and are left out.
//!   Intents of one contact from different partitions (the topic grew, or any partitioner)
//!   have no order between them. An intent the producer sent to several partitions was first
//!   seen on one of them: it must keep the order of at least one. The processor's forwarded
//!   copies (a `cc-forwarded-from` header naming a record with the same key and value) are
//!   not places an intent was sent to, so copies forwarded out of order excuse nothing; a
//!   header naming any other record makes no copy.
//! - `content_mismatches` (§3): an effect carries its intent's original content (intent,
//!   contact and clinic ids, action, payload, `created_at_ms`, `dispatch_priority`) and a
//!   `correlation_id`: the producer's, or a generated one when the producer gave none; a
//!   manual-review record carries its source record's raw key and value, and a valid record's
//!   intent and contact ids.
//! - `version_mismatches` (§3): an effect's `contact_version` is the number of its contact's
//!   effects up to and including it.
//! - `version_guard_violations` (R6): an effect of an intent with `expected_version` > 0 has
//!   `contact_version` = `expected_version` + 1: the contact's committed version when it
//!   committed was the one it expected (otherwise it must be blocked, with no effect).
//! - `lost` (R8, §5 bad input): every valid intent id has an outcome for its original content:
//!   an effect, a decision (a manual-review record other than `IDEMPOTENCY_CONFLICT` or
//!   `INVALID_INTENT`) pointing at one of its records with that content, or a place in a
//!   waiting list. Every record reusing the id with other content has its own
//!   `IDEMPOTENCY_CONFLICT` review (R5), which is never the original's outcome. Every invalid
//!   record has an `INVALID_INTENT` review. `UNPROCESSABLE` is an outcome for any record. An
//!   example for a record the group has not consumed yet says so.
//! - `effects_without_intent`: effects whose intent id is no valid intent read (a phantom;
//!   also what retention deleting old intents would look like: the topics must still hold
//!   everything since the start).
//! - `malformed_outputs` (§3): output records that are not a usable `SideEffect` (no value,
//!   undecodable, no intent id, contact id or `commit_sequence`) or `ManualReview` (no value,
//!   undecodable, no reason, or a source that is no record of the intents topic).
//! - `duplicate_reviews` (R8): an input record with more than one manual-review record, plus
//!   one for each operator re-submission of its intent (R9: a re-submitted intent that waits
//!   again may time out again).
//! - `manual_review_unjustified` (R5-R8, §5): a review whose stated reason does not hold in
//!   what was observed. Whether something was resolved before a review (or by its batch's
//!   end) is judged on batch times: the audit rows' (PostgreSQL's clock, one time per batch;
//!   a contact's batches follow one another at its owner), so instances' clocks need not
//!   agree; on the processor's `reviewed_at_ms` / `committed_at_ms` only for a review without
//!   its audit row (an `audit_mismatches` finding). The `WAIT_TIMEOUT` lower bound reads
//!   two clocks and condemns only when neither shows a long enough wait (below).
//!   - `INVALID_INTENT`: the record is a valid intent.
//!   - `IDEMPOTENCY_CONFLICT`: the record has its id's original content.
//!   - `WAIT_TIMEOUT` (R7): the policy is `skip`; the named missing sequence is not below the
//!     intent's slot, or was resolved in a batch before the review's, or in its own batch with no
//!     operator release of the contact in that batch (before the timeout it was not missing,
//!     after it the contact was held); or the oldest intent the same timeout sent to review
//!     (same contact, time and missing sequence) had waited no more than `wait_timeout` by
//!     both clocks the verifier can read: from its latest audited wait start to the review,
//!     in batch times, plus 1 s for what a batch takes from its clock reading to its write;
//!     and from its record's timestamp to the review's `reviewed_at_ms` (the gap cannot have
//!     lasted longer than its oldest waiting intent, and waiting time counts at most wall
//!     time). One clock is enough to justify: a producer's clock running ahead does not
//!     condemn a timeout, nor does a batch slow to write its wait start; the price is that a
//!     producer's clock running far enough behind excuses an early timeout. A
//!     same-millisecond tie is read in the processor's favour.
//!   - `CONTACT_ON_HOLD` (R7): no hold of the contact in the review's batch or an earlier one
//!     (a `WAIT_TIMEOUT` review under the `hold` policy, or a `CONTACT_BACKLOG_OVERFLOW`
//!     review), or an operator release in the latest hold's batch or a later one and before
//!     the review's. This one is timed on the audit's clock alone (the one releases have), so
//!     instances' clocks need not agree; a review without its audit row is an
//!     `audit_mismatches` finding instead.
//!   - `VERSION_CONFLICT` (R6): `expected_version` is 0, or equals the number of the
//!     contact's effects below the slot (the committed version when the slot's turn came).
//!   - `SEQUENCE_CONFLICT` (R6): the claimed sequence was neither resolved by the end of the
//!     review's batch nor held by another intent of the contact (committed, claimed, waiting
//!     or kept in manual review).
//!   - `CONTACT_BACKLOG_OVERFLOW` (§5 bounded memory): fewer than
//!     `max_pending_per_contact + 1` intents of the contact overflowed together (the waiting
//!     ones and the newcomer), or every sequence below the lowest of them was resolved in a
//!     batch before the overflow's (no gap, so nothing could wait), or by the end of the overflow's own batch with no
//!     operator release of the contact in it (before the overflow there was no gap, after it
//!     the contact was held).
//!   - `UNPROCESSABLE` (§5 bad input): its detail states no error. That the durable write or
//!     the transaction really failed, and deterministically, leaves no trace the verifier can
//!     read; it needs no audit row either (that write is what failed).
//!   - any reason the verifier does not know.
//! - `reopened_without_operator` (R5, R9): an intent id has at most one outcome (an effect, a
//!   decision, a place in a waiting list), plus one per operator re-submission recorded for it:
//!   a manual-reviewed or blocked intent that later commits, waits or is decided again was
//!   reopened, which only an operator may do. And each release and re-submission row answers
//!   an operator's request for that contact and action (resume, skip to n, re-submit that
//!   intent) that the admin audit recorded and a batch applied, on the row's own partition and
//!   batch: one request per row. A release or re-submission on any other ground (a record, a
//!   bug) counts, whatever it then allowed.
//! - `skips_unjustified` (R7): a skip by the wait timeout while the policy is `hold`, or an
//!   operator skip without the operator release that asked to skip to the next sequence.
//! - `committed_while_held` (R7, R9): an effect of a contact put on hold (a `WAIT_TIMEOUT`
//!   review under the `hold` policy, or a `CONTACT_BACKLOG_OVERFLOW` review) in a batch after
//!   the hold's, with no operator release of the contact between the two. Times here are the
//!   audit rows' (PostgreSQL's clock, one time per batch), so an effect of the hold's own
//!   batch (decided before the hold) and one of the release's batch are not violations; an
//!   effect or a hold without its audit row is an `audit_mismatches` finding instead.
//! - `audit_mismatches` (R8): every effect has exactly one `committed_causal` row, and every
//!   reviewed record exactly one `blocked_conflict`/`manual_review` row per review it may have
//!   (one, plus one per re-submission of its intent), in committed batches; every such row of a batch committed before the outputs were read has its
//!   output (the audit never counts what did not happen).
//! - `unreadable_audit`: each note of the reading.
//!
//! # Pending work
//!
//! `waiting` (intents in waiting lists), `unresolved_slots` (manual-reviewed slots above their
//! contact's highest effect that nothing resolved: the usual state of a contact on hold) and
//! `held_contacts` are not violations, but a run is only finished when they are zero: `ok`
//! requires it unless [`Options::allow_waiting`] (`--allow-waiting`).
//!
//! # Report (the JSON printed by `causal-commit verify`)
//!
//! What was read, in scope: `intents` (distinct valid intent ids), `records` (input records),
//! `invalid_records`, `committed` (effects), `manual_review` (reviews by reason name),
//! `blocked` (reviews with a conflict reason), `waiting`, `unresolved_slots`,
//! `held_contacts`. Then one counter per check above, `ok` (no violation, and no pending work
//! unless allowed) and `violations`: up to [`MAX_EXAMPLES`] examples, taken in turn from each
//! kind, each ending with its kind in parentheses. `causal-commit verify` exits 1 when `ok` is
//! false, with a one-line summary on stderr.
//!
//! # Not checked
//!
//! - R4 (priority across contacts) leaves no order the topics could show: priorities only
//!   order contacts within one batch.
//! - Structured log lines and metrics of R8; fencing tokens of outputs (§5).
//! - Whether a skip by the `skip` policy waited `wait_timeout`: the stored state does not say
//!   when the skipped gap began.
//! - Outcomes of producer retries (`duplicate`): they leave no output to check.
//! - Who the operator was: a request in `cc_command` with its `cc_admin_audit` row is taken as
//!   an operator's (the admin path checks the token and writes both in one transaction).

mod check;
mod input;
mod observe;
mod observed;

#[cfg(test)]
mod tests;

pub use check::{check, Kind, Options, Report, MAX_EXAMPLES};
pub use observe::observe;
pub use observed::*;

use crate::config::Config;

/// Reads the world and checks it; see the module documentation. Blocking: call it from a
/// blocking thread.
pub fn run(config: &Config, options: &Options) -> anyhow::Result<Report> {
    Ok(check(&observe(config)?, options))
}

/// [`run`] with a prefix and no pending work allowed.
pub fn verify(config: &Config, prefix: &str) -> anyhow::Result<Report> {
    run(
        config,
        &Options {
            prefix: prefix.to_string(),
            allow_waiting: false,
        },
    )
}
