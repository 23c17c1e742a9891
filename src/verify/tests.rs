//! The check on hand-built worlds: a clean one passes, and each violation kind is reported,
//! alone and exactly, on the smallest run that commits it.

use std::collections::BTreeMap;

use prost::Message as _;

use super::*;
use crate::config::LimitsConfig;
use crate::proto::{Action, Intent, ManualReview, ReviewReason, SideEffect};
use crate::sequencer::{TimeoutPolicy, MAX_SEQUENCE};

use ReviewReason::{
    ContactBacklogOverflow as Overflow, ContactOnHold as OnHold, IdempotencyConflict as Idem,
    InvalidIntent as Invalid, SequenceConflict as SeqConflict, VersionConflict as VerConflict,
    WaitTimeout as Timeout,
};

const T0: i64 = 1_700_000_000_000;
const TIMEOUT: u64 = 300_000;
const GARBAGE: [u8; 4] = [0xff, 0xff, 0xff, 0x01];

fn intent(id: &str, contact: &str, seq: u64) -> Intent {
    Intent {
        intent_id: id.into(),
        contact_id: contact.into(),
        clinic_id: "clinic-1".into(),
        correlation_id: format!("corr-{id}"),
        dispatch_priority: 3,
        causal_sequence: seq,
        expected_version: 0,
        action: Action::Book as i32,
        payload: format!("payload-{id}").into_bytes().into(),
        created_at_ms: T0,
    }
}

/// A world under construction: records are produced and decided at `now`.
#[derive(Clone)]
struct W {
    o: Observed,
    /// The audit's clock (PostgreSQL's: the time of each batch's rows).
    now: i64,
    /// How far the deciding instance's clock (`committed_at_ms`, `reviewed_at_ms`) is ahead
    /// of the audit's.
    skew: i64,
}

impl W {
    fn new() -> W {
        W {
            o: Observed {
                settings: Settings {
                    wait_timeout_ms: TIMEOUT,
                    on_timeout: TimeoutPolicy::Hold,
                    max_pending_per_contact: 2,
                    limits: LimitsConfig::default(),
                },
                intents_topic: "intents".into(),
                ..Observed::default()
            },
            now: T0,
            skew: 0,
        }
    }

    fn later(&mut self, ms: u64) {
        self.now += ms as i64;
    }

    fn produce_raw(
        &mut self,
        partition: i32,
        key: Option<&[u8]>,
        value: Option<Vec<u8>>,
    ) -> Position {
        let offset = self
            .o
            .intents
            .iter()
            .filter(|r| r.partition == partition)
            .count() as i64;
        self.o.intents.push(InputRecord {
            partition,
            offset,
            timestamp_ms: Some(self.now),
            key: key.map(<[u8]>::to_vec),
            value,
            forwarded_from: None,
        });
        (partition, offset)
    }

    fn produce(&mut self, i: &Intent) -> Position {
        self.produce_on(0, i)
    }

    fn produce_on(&mut self, partition: i32, i: &Intent) -> Position {
        self.produce_raw(
            partition,
            Some(i.contact_id.as_bytes()),
            Some(i.encode_to_vec()),
        )
    }

    /// A record of partition `to` carrying a `cc-forwarded-from` header that names `from`.
    fn with_header(&mut self, to: i32, i: &Intent, from: Position) -> Position {
        let pos = self.produce_on(to, i);
        self.o.intents.last_mut().expect("produced").forwarded_from = Some(from);
        pos
    }

    /// The processor's forwarded copy of the record at `from`, on partition `to`.
    fn forward(&mut self, from: Position, to: i32) -> Position {
        let value = self.record(from).value.clone().expect("a value");
        let i = Intent::decode(value.as_slice()).expect("an intent");
        self.with_header(to, &i, from)
    }

    fn record(&self, pos: Position) -> &InputRecord {
        self.o
            .intents
            .iter()
            .find(|r| (r.partition, r.offset) == pos)
            .expect("a produced record")
    }

    /// The effect the processor should emit for the intent at `pos`.
    fn effect(&self, pos: Position, seq: u64, version: u64) -> SideEffect {
        let i = Intent::decode(self.record(pos).value.as_deref().unwrap()).unwrap();
        SideEffect {
            intent_id: i.intent_id,
            contact_id: i.contact_id,
            clinic_id: i.clinic_id,
            correlation_id: i.correlation_id,
            dispatch_priority: i.dispatch_priority,
            action: i.action,
            payload: i.payload,
            created_at_ms: i.created_at_ms,
            commit_sequence: seq,
            contact_version: version,
            committed_at_ms: self.now + self.skew,
            fencing_token: 1,
            sequence_from_producer: i.causal_sequence > 0,
        }
    }

    /// Emits an effect on side-effects `partition`, without its audit row.
    fn emit(&mut self, partition: i32, e: &SideEffect) {
        let offset = self
            .o
            .effects
            .iter()
            .filter(|r| r.partition == partition)
            .count() as i64;
        self.o.effects.push(OutputRecord {
            partition,
            offset,
            value: Some(e.encode_to_vec()),
        });
    }

    fn audit_effect(&mut self, pos: Position, e: &SideEffect) {
        self.o.audit.push(AuditRecord {
            source: pos,
            intent_id: e.intent_id.clone(),
            contact_id: e.contact_id.clone(),
            outcome: AuditOutcome::Committed,
            reason: String::new(),
            commit_sequence: e.commit_sequence,
            before_outputs: true,
            at_ms: self.now,
        });
    }

    /// Commits the intent at `pos` as `seq`, its contact's effect number `version`, audited.
    fn commit_v(&mut self, pos: Position, seq: u64, version: u64) -> SideEffect {
        let e = self.effect(pos, seq, version);
        self.audit_effect(pos, &e);
        self.emit(0, &e);
        e
    }

    /// Commits the intent at `pos` as `seq`, with no resolution below it but effects.
    fn commit(&mut self, pos: Position, seq: u64) -> SideEffect {
        self.commit_v(pos, seq, seq)
    }

    /// The manual-review record the processor should emit for the record at `pos`.
    fn review_of(
        &self,
        pos: Position,
        reason: ReviewReason,
        expected: u64,
        received: u64,
    ) -> ManualReview {
        let rec = self.record(pos);
        let partial = rec.value.as_deref().and_then(|v| Intent::decode(v).ok());
        ManualReview {
            original_value: rec.value.clone().unwrap_or_default().into(),
            original_key: rec.key.clone().unwrap_or_default().into(),
            reason: reason as i32,
            detail: "why".into(),
            intent_id: partial
                .as_ref()
                .map(|i| i.intent_id.clone())
                .unwrap_or_default(),
            contact_id: partial
                .as_ref()
                .map(|i| i.contact_id.clone())
                .unwrap_or_default(),
            expected_sequence: expected,
            received_sequence: received,
            source_topic: "intents".into(),
            source_partition: pos.0,
            source_offset: pos.1,
            reviewed_at_ms: self.now + self.skew,
            fencing_token: 1,
            ..ManualReview::default()
        }
    }

    /// Emits a manual-review record, without its audit row.
    fn emit_review(&mut self, r: &ManualReview) {
        let offset = self.o.reviews.len() as i64;
        self.o.reviews.push(OutputRecord {
            partition: 0,
            offset,
            value: Some(r.encode_to_vec()),
        });
    }

    /// Sends the record at `pos` to manual review, audited.
    fn review(&mut self, pos: Position, reason: ReviewReason, expected: u64, received: u64) {
        let r = self.review_of(pos, reason, expected, received);
        self.o.audit.push(AuditRecord {
            source: pos,
            intent_id: r.intent_id.clone(),
            contact_id: r.contact_id.clone(),
            outcome: AuditOutcome::Reviewed,
            reason: reason.as_str_name().into(),
            commit_sequence: received,
            before_outputs: true,
            at_ms: self.now,
        });
        self.emit_review(&r);
    }

    /// The record at `pos` starts waiting for its predecessor, audited in the batch of `now`.
    fn start_waiting(&mut self, pos: Position) {
        let value = self.record(pos).value.clone().expect("a value");
        let i = Intent::decode(value.as_slice()).expect("an intent");
        self.o.wait_starts.push(WaitStart {
            source: pos,
            intent_id: i.intent_id,
            at_ms: self.now,
        });
    }

    fn skip(&mut self, contact: &str, from: u64, to: u64, cause: SkipCause) {
        self.o.skips.push(Skip {
            contact_id: contact.into(),
            from,
            to,
            cause,
            at_ms: self.now,
        });
    }

    /// An operator's release, as the admin path and the processor record it: the request
    /// (audited) and the release row, in a batch of its own.
    fn release(&mut self, contact: &str, skip_to: Option<u64>) {
        let batch = self.operator_batch(
            contact,
            skip_to.map_or(RequestedAction::Resume, RequestedAction::SkipTo),
        );
        self.o.releases.push(Release {
            contact_id: contact.into(),
            skip_to,
            at_ms: self.now,
            batch,
        });
    }

    /// An operator's re-submission of `id`, as [`Self::release`].
    fn resubmit(&mut self, id: &str, contact: &str) {
        let batch = self.operator_batch(contact, RequestedAction::Resubmit(id.into()));
        self.o.resubmissions.push(Resubmission {
            intent_id: id.into(),
            contact_id: contact.into(),
            at_ms: self.now,
            batch,
        });
    }

    /// An audited operator request applied by a batch of its own: that batch.
    fn operator_batch(&mut self, contact: &str, action: RequestedAction) -> BatchRef {
        let command = self.o.requests.len() as i64 + 1;
        let batch = (0, 1_000 + command);
        self.o.requests.push(OperatorRequest {
            command,
            contact_id: contact.into(),
            action,
            applied: Some(batch),
            audited: true,
        });
        batch
    }

    fn contact(&mut self, contact: &str) -> &mut ContactState {
        if let Some(i) = self.o.contacts.iter().position(|c| c.contact_id == contact) {
            return &mut self.o.contacts[i];
        }
        self.o.contacts.push(ContactState {
            contact_id: contact.into(),
            ..ContactState::default()
        });
        self.o.contacts.last_mut().unwrap()
    }

    /// The intent at `pos` waits in slot `seq`.
    fn wait(&mut self, pos: Position, seq: u64) {
        let i = Intent::decode(self.record(pos).value.as_deref().unwrap()).unwrap();
        self.contact(&i.contact_id).waiting.push(WaitingIntent {
            intent_id: i.intent_id,
            commit_sequence: seq,
            source: pos,
        });
    }

    fn check(&self) -> Report {
        check(&self.o, &Options::default())
    }

    fn check_allowing_waiting(&self) -> Report {
        check(
            &self.o,
            &Options {
                prefix: String::new(),
                allow_waiting: true,
            },
        )
    }
}

/// Exactly `n` violations of `kind` and none of any other kind; every example is of `kind`.
#[track_caller]
fn assert_only(r: &Report, kind: Kind, n: usize) {
    for k in Kind::ALL {
        let expected = if k == kind { n } else { 0 };
        assert_eq!(r.count(k), expected, "{}: {:#?}", k.field(), r);
    }
    assert!(!r.ok);
    let tag = format!("({})", kind.tag());
    assert!(
        !r.violations.is_empty() && r.violations.iter().all(|v| v.ends_with(&tag)),
        "{:#?}",
        r.violations
    );
}

#[track_caller]
fn assert_clean(r: &Report) {
    assert_eq!(r.violation_counts(), vec![], "{:#?}", r.violations);
    assert!(r.violations.is_empty(), "{:#?}", r.violations);
}

#[track_caller]
fn assert_ok(r: &Report) {
    assert_clean(r);
    assert!(r.ok, "{r:#?}");
}

#[track_caller]
fn has(r: &Report, needle: &str) {
    assert!(
        r.violations.iter().any(|v| v.contains(needle)),
        "no violation like {needle:?} in {:#?}",
        r.violations
    );
}

/// Strict contact c1 produced out of order with a retry; assigned contact c2; an invalid
/// record; a version conflict; an id reused with other content; a sequence conflict.
fn clean_world() -> W {
    let mut w = W::new();
    let a2 = w.produce(&intent("a2", "c1", 2));
    let a1 = w.produce(&intent("a1", "c1", 1));
    w.produce(&intent("a1", "c1", 1));
    let a3 = w.produce(&intent("a3", "c1", 3));
    w.commit(a1, 1);
    w.commit(a2, 2);
    w.commit(a3, 3);

    let b1 = w.produce(&intent("b1", "c2", 0));
    let b2 = w.produce(&intent("b2", "c2", 0));
    w.commit(b1, 1);
    w.commit(b2, 2);

    let g = w.produce_raw(0, Some(b"g1"), Some(GARBAGE.to_vec()));
    w.review(g, Invalid, 0, 0);

    let mut guarded = intent("d1", "c3", 1);
    guarded.expected_version = 5;
    let d1 = w.produce(&guarded);
    w.review(d1, VerConflict, 1, 1);
    let d2 = w.produce(&intent("d2", "c3", 2));
    w.commit_v(d2, 2, 1);

    let e1 = w.produce(&intent("e1", "c4", 0));
    w.commit(e1, 1);
    let mut other = intent("e1", "c4", 0);
    other.payload = b"something else".to_vec().into();
    let e1b = w.produce(&other);
    w.review(e1b, Idem, 0, 0);

    let f1 = w.produce(&intent("f1", "c5", 1));
    w.commit(f1, 1);
    let f2 = w.produce(&intent("f2", "c5", 1));
    w.review(f2, SeqConflict, 2, 1);
    w
}

#[test]
fn a_clean_world_is_ok_with_exact_counts() {
    let w = clean_world();
    let r = w.check();
    assert_ok(&r);
    assert_eq!(
        (
            r.intents,
            r.records,
            r.invalid_records,
            r.committed,
            r.blocked
        ),
        (10, 13, 1, 8, 3)
    );
    assert_eq!(
        r.manual_review,
        BTreeMap::from([
            ("IDEMPOTENCY_CONFLICT".to_string(), 1),
            ("INVALID_INTENT".to_string(), 1),
            ("SEQUENCE_CONFLICT".to_string(), 1),
            ("VERSION_CONFLICT".to_string(), 1),
        ])
    );
    assert_eq!(r.pending(), (0, 0, 0));
    assert_eq!(r.summary(), "the contract holds");
}

#[test]
fn reorders_within_a_partition_and_across_partitions() {
    let mut w = W::new();
    let a1 = w.produce(&intent("a1", "c1", 1));
    let a2 = w.produce(&intent("a2", "c1", 2));
    let a3 = w.produce(&intent("a3", "c1", 3));
    w.commit(a1, 1);
    w.commit(a3, 3);
    w.commit(a2, 2);
    let r = w.check();
    assert_only(&r, Kind::Reorder, 1);
    has(&r, "contact c1: sequence 2 after 3");

    let mut w = W::new();
    let a1 = w.produce(&intent("a1", "c1", 1));
    let a2 = w.produce(&intent("a2", "c1", 2));
    let a3 = w.produce(&intent("a3", "c1", 3));
    w.commit(a1, 1);
    let e = w.effect(a2, 2, 2);
    w.audit_effect(a2, &e);
    w.emit(1, &e);
    w.commit(a3, 3);
    let r = w.check();
    assert_only(&r, Kind::Reorder, 1);
    has(&r, "sequence 2 on side-effects partition 1");
}

#[test]
fn duplicate_effects_of_one_intent_or_one_sequence() {
    let mut w = W::new();
    let a1 = w.produce(&intent("a1", "c1", 1));
    let e = w.commit(a1, 1);
    w.emit(0, &e);
    let r = w.check();
    assert_only(&r, Kind::Duplicate, 1);
    has(&r, "intent a1: 2 effects");

    let mut w = W::new();
    let b1 = w.produce(&intent("b1", "c2", 0));
    let b2 = w.produce(&intent("b2", "c2", 0));
    w.commit(b1, 1);
    w.commit_v(b2, 1, 1);
    let r = w.check();
    assert_only(&r, Kind::Duplicate, 1);
    has(&r, "contact c2: sequence 1 committed by 2 intents (b1, b2)");
}

#[test]
fn a_gap_below_an_effect_is_reported_even_when_its_slot_went_to_manual_review() {
    let mut w = W::new();
    let a1 = w.produce(&intent("a1", "c1", 1));
    let a3 = w.produce(&intent("a3", "c1", 3));
    w.commit(a1, 1);
    w.commit_v(a3, 3, 2);
    let r = w.check();
    assert_only(&r, Kind::Gap, 1);
    has(&r, "contact c1: sequence 2 is unresolved");

    // R3: sequence 3 timed out (slot unresolved), yet 4 was released past it.
    let mut w = W::new();
    let s1 = w.produce(&intent("s1", "c1", 1));
    w.commit(s1, 1);
    let s3 = w.produce(&intent("s3", "c1", 3));
    w.later(TIMEOUT + 1);
    w.review(s3, Timeout, 2, 3);
    let s4 = w.produce(&intent("s4", "c1", 4));
    w.commit_v(s4, 4, 2);
    let r = w.check();
    assert_only(&r, Kind::Gap, 2);
    has(&r, "sequences 2..=3 are unresolved");
    has(
        &r,
        "sequence 3 went to manual review (WAIT_TIMEOUT) and was never resolved",
    );

    // The same slot resolved by an operator's skip is no gap.
    w.release("c1", Some(4));
    w.skip("c1", 2, 3, SkipCause::Operator);
    assert_clean(&w.check());
}

#[test]
fn a_sequence_commits_only_once_every_sequence_below_it_is_resolved() {
    // R3: 2 committed, and 1 was resolved (blocked by its version guard) in a later batch.
    let blocked_after = |ms: u64| {
        let mut w = W::new();
        let a2 = w.produce(&intent("a2", "c1", 2));
        w.commit_v(a2, 2, 1);
        w.later(ms);
        let mut stale = intent("a1", "c1", 1);
        stale.expected_version = 3;
        let a1 = w.produce(&stale);
        w.review(a1, VerConflict, 1, 1);
        w
    };
    let r = blocked_after(10).check();
    assert_only(&r, Kind::CommittedBeforePredecessor, 1);
    has(&r, "contact c1: intent a2 committed as sequence 2 while sequence 1 was unresolved (resolved 10 ms later, in a later batch)");
    // Blocked in the same batch, before it: no violation.
    assert_ok(&blocked_after(0).check());

    // The same with an operator's skip of 1; 3, committed after the skip, is no violation.
    let skipped_after = |ms: u64| {
        let mut w = W::new();
        let a2 = w.produce(&intent("a2", "c1", 2));
        w.commit_v(a2, 2, 1);
        w.later(ms);
        w.release("c1", Some(2));
        w.skip("c1", 1, 1, SkipCause::Operator);
        w.later(5);
        let a3 = w.produce(&intent("a3", "c1", 3));
        w.commit_v(a3, 3, 2);
        w
    };
    let r = skipped_after(10).check();
    assert_only(&r, Kind::CommittedBeforePredecessor, 1);
    has(
        &r,
        "intent a2 committed as sequence 2 while sequence 1 was unresolved (resolved 10 ms later",
    );
    assert_ok(&skipped_after(0).check());
}

#[test]
fn strict_sequences_must_be_the_producers() {
    let mut w = W::new();
    let a1 = w.produce(&intent("a1", "c1", 1));
    let mut e = w.effect(a1, 1, 1);
    e.sequence_from_producer = false;
    w.audit_effect(a1, &e);
    w.emit(0, &e);
    let r = w.check();
    assert_only(&r, Kind::SequenceMismatch, 1);

    // Two effects swapped but labelled consistently.
    let mut w = W::new();
    let a1 = w.produce(&intent("a1", "c1", 1));
    let a2 = w.produce(&intent("a2", "c1", 2));
    w.commit(a2, 1);
    w.commit(a1, 2);
    let r = w.check();
    assert_only(&r, Kind::SequenceMismatch, 2);
    has(&r, "intent a2: causal_sequence 2, committed as sequence 1");

    let mut w = W::new();
    let b1 = w.produce(&intent("b1", "c2", 0));
    let mut e = w.effect(b1, 1, 1);
    e.sequence_from_producer = true;
    w.audit_effect(b1, &e);
    w.emit(0, &e);
    assert_only(&w.check(), Kind::SequenceMismatch, 1);
}

#[test]
fn assigned_sequences_follow_the_input_partitions_order() {
    let mut w = W::new();
    let b1 = w.produce(&intent("b1", "c2", 0));
    let b2 = w.produce(&intent("b2", "c2", 0));
    w.commit(b2, 1);
    w.commit(b1, 2);
    let r = w.check();
    assert_only(&r, Kind::AssignedOrder, 1);
    has(
        &r,
        "intent b2 (intents 0/1) committed as sequence 1, below sequence 2 of intent b1",
    );

    // From two input partitions (the topic grew, or another partitioner): no order between them.
    let mut w = W::new();
    let b1 = w.produce_on(0, &intent("b1", "c2", 0));
    let b2 = w.produce_on(1, &intent("b2", "c2", 0));
    w.commit(b2, 1);
    w.commit(b1, 2);
    assert_ok(&w.check());
}

/// A producer sends an assigned intent twice, through two partitions (a retry by another
/// route). The copy on partition 1 is seen first and numbered 1; the one on partition 0,
/// behind another intent of the contact, is a duplicate. R2 holds: each intent got its number
/// where it was first seen, in that partition's order.
#[test]
fn an_assigned_intent_sent_through_two_partitions_is_ordered_where_it_was_first_seen() {
    let mut w = W::new();
    let b1 = w.produce_on(0, &intent("b1", "c2", 0));
    let b2 = intent("b2", "c2", 0);
    w.produce_on(0, &b2);
    let b2_on_1 = w.produce_on(1, &b2);
    w.commit(b2_on_1, 1);
    w.commit(b1, 2);
    assert_ok(&w.check());

    // Numbered before b1 on neither partition's order: b2 is behind b1 on both.
    let mut w = W::new();
    let b1 = w.produce_on(0, &intent("b1", "c2", 0));
    w.produce_on(1, &intent("b1", "c2", 0));
    let b2 = intent("b2", "c2", 0);
    let b2_on_0 = w.produce_on(0, &b2);
    w.produce_on(1, &b2);
    w.commit(b2_on_0, 1);
    w.commit(b1, 2);
    assert_only(&w.check(), Kind::AssignedOrder, 1);
}

/// The processor's forwarded copies are not places the producer sent an intent to: copies
/// forwarded out of order do not excuse numbers out of the producer's partition order. A
/// header that names a record of other content is no copy (a producer may set any header).
#[test]
fn forwarded_copies_do_not_count_as_partitions_an_intent_was_sent_to() {
    // b1 then b2 on partition 0, forwarded to partition 1 (in order or not), numbered in the
    // copies' order.
    let forwarded = |in_order: bool| {
        let mut w = W::new();
        let b1 = w.produce_on(0, &intent("b1", "c2", 0));
        let b2 = w.produce_on(0, &intent("b2", "c2", 0));
        let (first, second) = if in_order { (b1, b2) } else { (b2, b1) };
        let first = w.forward(first, 1);
        let second = w.forward(second, 1);
        w.commit(first, 1);
        w.commit(second, 2);
        w.check()
    };
    let r = forwarded(false);
    assert_only(&r, Kind::AssignedOrder, 1);
    has(&r, "intent b2 (intents 0/1) committed as sequence 1");
    assert_ok(&forwarded(true));

    // b2 sent to partition 1 too, with a header naming b1's record: seen there first.
    let mut w = W::new();
    let b1 = w.produce_on(0, &intent("b1", "c2", 0));
    let b2 = intent("b2", "c2", 0);
    w.produce_on(0, &b2);
    let forged = w.with_header(1, &b2, b1);
    w.commit(forged, 1);
    w.commit(b1, 2);
    assert_ok(&w.check());
}

#[test]
fn effects_and_reviews_carry_their_intents_content() {
    let mut w = W::new();
    let a1 = w.produce(&intent("a1", "c1", 1));
    let mut e = w.effect(a1, 1, 1);
    e.payload = b"tampered".to_vec().into();
    w.audit_effect(a1, &e);
    w.emit(0, &e);
    let r = w.check();
    assert_only(&r, Kind::ContentMismatch, 1);
    has(
        &r,
        "intent a1: effect 0/0 differs from the intent in payload",
    );

    // The effect carries the content of a record that reused the id, not the original's.
    let mut w = W::new();
    let a1 = w.produce(&intent("a1", "c1", 1));
    let mut other = intent("a1", "c1", 1);
    other.action = Action::Cancel as i32;
    let a1b = w.produce(&other);
    w.review(a1b, Idem, 0, 0);
    let e = w.effect(a1b, 1, 1);
    w.audit_effect(a1, &e);
    w.emit(0, &e);
    let r = w.check();
    assert_only(&r, Kind::ContentMismatch, 1);
    has(&r, "differs from the intent in action");

    // The producer's correlation_id is carried on; one is generated when it gave none (§3).
    for (given, carried, ok) in [
        ("corr-1", "corr-1", true),
        ("corr-1", "corr-2", false),
        ("", "generated", true),
        ("", "", false),
    ] {
        let mut w = W::new();
        let mut i = intent("a1", "c1", 1);
        i.correlation_id = given.into();
        let a1 = w.produce(&i);
        let mut e = w.effect(a1, 1, 1);
        e.correlation_id = carried.into();
        w.audit_effect(a1, &e);
        w.emit(0, &e);
        let r = w.check();
        if ok {
            assert_ok(&r);
        } else {
            assert_only(&r, Kind::ContentMismatch, 1);
            has(&r, "differs from the intent in correlation_id");
        }
    }

    let mut w = W::new();
    let g = w.produce_raw(0, Some(b"g1"), Some(GARBAGE.to_vec()));
    let mut r = w.review_of(g, Invalid, 0, 0);
    r.original_value = Default::default();
    audit_invalid(&mut w, g);
    w.emit_review(&r);
    let r = w.check();
    assert_only(&r, Kind::ContentMismatch, 1);
    has(&r, "does not carry the original record");
}

/// The audit row of an invalid record sent to review.
fn audit_invalid(w: &mut W, source: Position) {
    w.o.audit.push(AuditRecord {
        source,
        intent_id: String::new(),
        contact_id: String::new(),
        outcome: AuditOutcome::Reviewed,
        reason: "INVALID_INTENT".into(),
        commit_sequence: 0,
        before_outputs: true,
        at_ms: w.now,
    });
}

/// An invalid record too large for a review record beside its envelope: the review says it
/// was cut, and carries the record's first bytes with its true sizes.
fn cut_review(w: &mut W, value_part: usize, key_part: usize) -> (ManualReview, Position) {
    let big: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let g = w.produce_raw(0, Some(b"k-big"), Some(big.clone()));
    let mut r = w.review_of(g, ReviewReason::InvalidIntent, 0, 0);
    r.original_truncated = true;
    r.original_value_size = big.len() as u64;
    r.original_key_size = 5;
    r.original_value = big[..value_part].to_vec().into();
    r.original_key = b"k-big"[..key_part].to_vec().into();
    audit_invalid(w, g);
    (r, g)
}

#[test]
fn a_review_cut_to_fit_carries_the_first_bytes_and_the_true_sizes() {
    // The value's first 4,000 bytes, no key: carried.
    let mut w = W::new();
    let (r, _) = cut_review(&mut w, 4000, 0);
    w.emit_review(&r);
    assert!(w.check().ok, "{:?}", w.check().violations);
    // The whole value and part of the key: carried.
    let mut w = W::new();
    let (r, _) = cut_review(&mut w, 5000, 2);
    w.emit_review(&r);
    assert!(w.check().ok, "{:?}", w.check().violations);

    // Each lie is a content mismatch: sizes, bytes that are not the record's first, a key
    // before the whole value, a cut that cut nothing.
    for lie in 0..4 {
        let mut w = W::new();
        let (mut r, _) = cut_review(&mut w, 4000, 0);
        match lie {
            0 => r.original_value_size = 4000,
            1 => r.original_value = vec![7u8; 4000].into(),
            2 => r.original_key = b"k".to_vec().into(),
            _ => {
                r.original_value = r
                    .original_value
                    .iter()
                    .copied()
                    .chain((4000..5000u32).map(|i| (i % 251) as u8))
                    .collect::<Vec<u8>>()
                    .into();
                r.original_key = b"k-big".to_vec().into();
            }
        }
        w.emit_review(&r);
        let report = w.check();
        assert_only(&report, Kind::ContentMismatch, 1);
        has(&report, "does not carry the original record");
    }
}

#[test]
fn contact_version_counts_the_contacts_effects() {
    let mut w = W::new();
    let a1 = w.produce(&intent("a1", "c1", 1));
    let a2 = w.produce(&intent("a2", "c1", 2));
    w.commit(a1, 1);
    w.commit_v(a2, 2, 3);
    let r = w.check();
    assert_only(&r, Kind::VersionMismatch, 1);
    has(
        &r,
        "intent a2: contact c1 version 3 after sequence 2, which is its effect number 2",
    );
}

#[test]
fn every_intent_and_record_needs_an_outcome() {
    let mut w = W::new();
    w.produce(&intent("u1", "c1", 0));
    let r = w.check();
    assert_only(&r, Kind::Lost, 1);
    assert_eq!(
        r.violations,
        vec!["intent u1 (intents 0/0): no outcome; the processor group has committed nothing on this partition (lost)"]
    );
    w.o.committed.insert(
        0,
        CommittedOffset {
            offset: 1,
            batch: 1,
        },
    );
    let r = w.check();
    assert_eq!(
        r.violations,
        vec!["intent u1 (intents 0/0): no outcome (lost)"]
    );

    let mut w = W::new();
    w.produce_raw(0, Some(b"g1"), Some(GARBAGE.to_vec()));
    w.produce_raw(0, Some(b"g2"), None);
    let r = w.check();
    assert_only(&r, Kind::Lost, 2);
    has(&r, "invalid record intents 0/1 (key \"g2\", the record has no value): no INVALID_INTENT review");

    // A record reusing an id with other content needs its own review.
    let mut w = W::new();
    let a1 = w.produce(&intent("a1", "c1", 1));
    w.commit(a1, 1);
    let mut other = intent("a1", "c1", 1);
    other.payload = b"other".to_vec().into();
    w.produce(&other);
    let r = w.check();
    assert_only(&r, Kind::Lost, 1);
    has(&r, "intent a1 (intents 0/1): reuses the id with other content and has no IDEMPOTENCY_CONFLICT review");

    // The conflicting record's review names the id, but is not the original's outcome.
    let mut w = W::new();
    w.produce(&intent("a1", "c1", 1));
    let a1b = w.produce(&other);
    w.review(a1b, Idem, 0, 0);
    let r = w.check();
    assert_only(&r, Kind::Lost, 1);
    has(&r, "intent a1 (intents 0/0): no outcome");
}

#[test]
fn an_effect_of_an_intent_never_read_is_a_phantom() {
    let mut w = W::new();
    let e = SideEffect {
        intent_id: "ghost".into(),
        contact_id: "c9".into(),
        commit_sequence: 1,
        contact_version: 1,
        ..SideEffect::default()
    };
    w.audit_effect((0, 99), &e);
    w.emit(0, &e);
    let r = w.check();
    assert_only(&r, Kind::EffectWithoutIntent, 1);
    has(
        &r,
        "intent ghost: effect (contact c9, sequence 1) for an intent never consumed",
    );
}

#[test]
fn outputs_that_are_not_usable_records_are_malformed() {
    let bad_effects: [Option<Vec<u8>>; 3] = [
        None,
        Some(GARBAGE.to_vec()),
        Some(
            SideEffect {
                intent_id: "i".into(),
                contact_id: "c".into(),
                ..SideEffect::default()
            }
            .encode_to_vec(),
        ),
    ];
    for value in bad_effects {
        let mut w = W::new();
        w.o.effects.push(OutputRecord {
            partition: 0,
            offset: 0,
            value,
        });
        assert_only(&w.check(), Kind::Malformed, 1);
    }
    for value in [None, Some(GARBAGE.to_vec())] {
        let mut w = W::new();
        w.o.reviews.push(OutputRecord {
            partition: 0,
            offset: 0,
            value,
        });
        assert_only(&w.check(), Kind::Malformed, 1);
    }
    // A review pointing at no input record, and one without a reason.
    let mut w = W::new();
    let g = w.produce_raw(0, Some(b"g1"), Some(GARBAGE.to_vec()));
    w.review(g, Invalid, 0, 0);
    let mut nowhere = w.review_of(g, Invalid, 0, 0);
    nowhere.source_offset = 7;
    w.emit_review(&nowhere);
    let r = w.check();
    assert_only(&r, Kind::Malformed, 1);
    has(
        &r,
        "points at intents 0/7, which is no record of the intents topic",
    );
    let mut w = W::new();
    let g = w.produce_raw(0, Some(b"g1"), Some(GARBAGE.to_vec()));
    w.review(g, Invalid, 0, 0);
    let mut unspecified = w.review_of(g, Invalid, 0, 0);
    unspecified.reason = 0;
    w.emit_review(&unspecified);
    assert_only(&w.check(), Kind::Malformed, 1);
}

#[test]
fn a_record_reviewed_twice_is_duplicate_output() {
    let mut w = W::new();
    let g = w.produce_raw(0, Some(b"g1"), Some(GARBAGE.to_vec()));
    w.review(g, Invalid, 0, 0);
    let again = w.review_of(g, Invalid, 0, 0);
    w.emit_review(&again);
    let r = w.check();
    assert_only(&r, Kind::DuplicateReview, 1);
    has(
        &r,
        "intents 0/0: 2 manual-review records (INVALID_INTENT, INVALID_INTENT)",
    );
}

/// c1: s2 waits for 1 from T0; the timeout sends it (and s3, produced later) to review; the
/// contact is held, so s4 goes to review too.
fn timed_out_world() -> (W, Position) {
    let mut w = W::new();
    let s2 = w.produce(&intent("s2", "c1", 2));
    w.later(TIMEOUT - 10);
    let s3 = w.produce(&intent("s3", "c1", 3));
    w.later(11);
    w.review(s2, Timeout, 1, 2);
    w.review(s3, Timeout, 1, 3);
    w.contact("c1").on_hold = true;
    w.later(5);
    let s4 = w.produce(&intent("s4", "c1", 4));
    w.review(s4, OnHold, 0, 4);
    (w, s4)
}

#[test]
fn a_justified_wait_timeout_and_hold_are_pending_work_not_violations() {
    let (w, _) = timed_out_world();
    let r = w.check();
    assert_clean(&r);
    assert_eq!(r.pending(), (0, 3, 1));
    assert!(!r.ok, "a held contact is unfinished work");
    assert!(r
        .summary()
        .starts_with("work is still pending: 3 unresolved_slots, 1 held_contacts"));
    assert!(w.check_allowing_waiting().ok);
}

/// Whether the missing sequence was resolved before a timeout, or every sequence below an
/// overflow, is judged on batch times (the audit's one clock), not on the deciding instances'
/// clocks: an instance a minute ahead does not condemn a timeout or an overflow whose gap was
/// closed in a later batch.
#[test]
fn reviews_are_justified_on_batch_times_whatever_the_instances_clocks() {
    const MINUTE: i64 = 60_000;
    // (A timeout of a sequence committed a batch before, on a clock behind: in
    // wait_timeout_reviews_must_be_justified.)
    // An operator skips c1's missing sequences below `to` a batch after the review.
    let closed_later = |mut w: W, to: u64| {
        w.skew = 0;
        w.later(10);
        w.release("c1", Some(to));
        w.skip("c1", to - 1, to - 1, SkipCause::Operator);
        let r = w.check_allowing_waiting();
        assert_clean(&r);
    };
    // s2 times out (missing 1) on an instance a minute ahead.
    let mut w = W::new();
    let s2 = w.produce(&intent("s2", "c1", 2));
    w.later(TIMEOUT + 1);
    w.skew = MINUTE;
    w.review(s2, Timeout, 1, 2);
    closed_later(w, 2);
    // c1 overflows (missing 2) on an instance a minute ahead.
    closed_later(overflowed_world_skewed(MINUTE).0, 3);
}

/// The `WAIT_TIMEOUT` lower bound reads two clocks: batch times from the oldest reviewed
/// intent's audited wait start, and its record's timestamp. One that shows a wait longer than
/// `wait_timeout` is enough: a producer whose clock runs half an hour ahead does not condemn a
/// timeout, nor does a batch that took 2 s to write its wait start; a timeout both clocks put
/// a minute after the wait began is caught.
#[test]
fn a_timeout_is_judged_on_the_audited_wait_start_and_the_records_timestamp() {
    const HALF_AN_HOUR: i64 = 30 * 60_000;
    // `produced`: the record's timestamp relative to the batch that starts its wait; the
    // review comes `after` ms after that batch.
    let world = |produced: i64, after: u64| {
        let mut w = W::new();
        let s2 = w.produce(&intent("s2", "c1", 2));
        w.o.intents[0].timestamp_ms = Some(w.now + produced);
        w.start_waiting(s2);
        w.later(after);
        w.review(s2, Timeout, 1, 2);
        w.check_allowing_waiting()
    };
    assert_clean(&world(HALF_AN_HOUR, TIMEOUT + 1));
    assert_clean(&world(-2_000, TIMEOUT - 1_500));
    // Within what a batch takes from its clock reading to its write.
    assert_clean(&world(HALF_AN_HOUR, TIMEOUT - 900));
    let r = world(0, 60_000);
    assert_only(&r, Kind::ManualReviewUnjustified, 1);
    has(&r, "the contact's oldest intent in this timeout started waiting 60000 ms before it (batch times, 1000 ms allowed for its batch's write) and was produced 60000 ms before it: not more than wait_timeout (300000 ms)");
}

#[test]
fn wait_timeout_reviews_must_be_justified() {
    // Not more than wait_timeout after the oldest intent it sent to review was produced.
    let mut w = W::new();
    let s2 = w.produce(&intent("s2", "c1", 2));
    w.later(TIMEOUT);
    w.review(s2, Timeout, 1, 2);
    let r = w.check_allowing_waiting();
    assert_only(&r, Kind::ManualReviewUnjustified, 1);
    has(
        &r,
        "was produced 300000 ms before it: not more than wait_timeout",
    );

    // The missing sequence had committed a batch before, whatever the clock of the instance
    // that timed it out (a minute behind: on its own clock the review came first).
    for skew in [0, -60_000] {
        let mut w = W::new();
        let s2 = w.produce(&intent("s2", "c1", 2));
        let s1 = w.produce(&intent("s1", "c1", 1));
        w.later(TIMEOUT + 1);
        w.commit(s1, 1);
        w.later(10);
        w.skew = skew;
        w.review(s2, Timeout, 1, 2);
        let r = w.check_allowing_waiting();
        assert_only(&r, Kind::ManualReviewUnjustified, 1);
        has(&r, "sequence 1 was resolved before the review");
    }

    // A missing sequence that is not below the intent's own slot.
    let mut w = W::new();
    let s2 = w.produce(&intent("s2", "c1", 2));
    w.later(TIMEOUT + 1);
    w.review(s2, Timeout, 2, 2);
    assert_only(
        &w.check_allowing_waiting(),
        Kind::ManualReviewUnjustified,
        1,
    );

    // Under the skip policy timeouts skip, they do not review, and they hold nothing: the
    // contact's later CONTACT_ON_HOLD has no hold behind it.
    let (mut w, _) = timed_out_world();
    w.o.settings.on_timeout = TimeoutPolicy::Skip;
    let r = w.check_allowing_waiting();
    assert_only(&r, Kind::ManualReviewUnjustified, 3);
    has(&r, "the timeout policy is skip");
    has(&r, "contact c1 was never put on hold before it");
}

#[test]
fn contact_on_hold_reviews_need_an_unreleased_hold() {
    let mut w = W::new();
    let s1 = w.produce(&intent("s1", "c1", 1));
    w.review(s1, OnHold, 0, 1);
    let r = w.check_allowing_waiting();
    assert_only(&r, Kind::ManualReviewUnjustified, 1);
    has(&r, "contact c1 was never put on hold before it");

    // Released between the hold and the review.
    let mut w = W::new();
    let s2 = w.produce(&intent("s2", "c1", 2));
    w.later(TIMEOUT + 1);
    w.review(s2, Timeout, 1, 2);
    w.later(1);
    w.release("c1", None);
    w.later(1);
    let s3 = w.produce(&intent("s3", "c1", 3));
    w.review(s3, OnHold, 0, 3);
    let r = w.check_allowing_waiting();
    assert_only(&r, Kind::ManualReviewUnjustified, 1);
    has(
        &r,
        "contact c1 was released after its hold and before the review",
    );
}

/// c1: s2 times out (the contact is held), the operator releases c1 (or not) 100 ms later, and
/// s3 goes to review as CONTACT_ON_HOLD 100 ms after that, from an instance whose clock runs
/// 10 s behind: its reviewed_at_ms is before the release and the hold, its batch after them.
fn skewed_hold_world(released: bool) -> W {
    let mut w = W::new();
    let s2 = w.produce(&intent("s2", "c1", 2));
    w.later(TIMEOUT + 1);
    w.review(s2, Timeout, 1, 2);
    w.later(100);
    if released {
        w.release("c1", None);
    }
    w.later(100);
    let s3 = w.produce(&intent("s3", "c1", 3));
    w.review(s3, OnHold, 0, 3);
    let mut r = ManualReview::decode(w.o.reviews[1].value.as_deref().unwrap()).unwrap();
    r.reviewed_at_ms -= 10_000;
    w.o.reviews[1].value = Some(r.encode_to_vec());
    w
}

#[test]
fn contact_on_hold_reviews_are_timed_by_their_batch_not_their_instance_clock() {
    // Released before the review's batch: unjustified.
    let r = skewed_hold_world(true).check_allowing_waiting();
    assert_only(&r, Kind::ManualReviewUnjustified, 1);
    has(
        &r,
        "contact c1 was released after its hold and before the review",
    );

    // Without the release, the same skewed review is justified by the hold's batch.
    assert_clean(&skewed_hold_world(false).check_allowing_waiting());
}

/// c1: s2 waits for 1 and times out (the contact is held); s1 arrives later.
fn held_world() -> (W, Position) {
    let mut w = W::new();
    let s2 = w.produce(&intent("s2", "c1", 2));
    w.later(TIMEOUT + 1);
    w.review(s2, Timeout, 1, 2);
    w.later(10);
    let s1 = w.produce(&intent("s1", "c1", 1));
    (w, s1)
}

#[test]
fn a_held_contact_commits_nothing_until_an_operator_releases_it() {
    // R7: its predecessor arriving while the contact is held goes to review, not out.
    let (mut w, s1) = held_world();
    w.commit(s1, 1);
    let r = w.check_allowing_waiting();
    assert_only(&r, Kind::CommittedWhileHeld, 1);
    has(&r, "contact c1: intent s1 committed as sequence 1 in a batch after the contact's hold (WAIT_TIMEOUT of intents 0/0) and before any operator release");

    // Released first (in an earlier batch, or in the effect's own): it may commit.
    for gap in [5, 0] {
        let (mut w, s1) = held_world();
        w.release("c1", None);
        w.later(gap);
        w.commit(s1, 1);
        assert_clean(&w.check_allowing_waiting());
    }

    // A release before the hold does not count.
    let mut w = W::new();
    w.release("c1", None);
    w.later(1);
    let s2 = w.produce(&intent("s2", "c1", 2));
    w.later(TIMEOUT + 1);
    w.review(s2, Timeout, 1, 2);
    w.later(1);
    let s1 = w.produce(&intent("s1", "c1", 1));
    w.commit(s1, 1);
    assert_only(&w.check_allowing_waiting(), Kind::CommittedWhileHeld, 1);

    // Under the skip policy a timeout holds nothing (its review is unjustified already).
    let (mut w, s1) = held_world();
    w.o.settings.on_timeout = TimeoutPolicy::Skip;
    w.commit(s1, 1);
    assert_only(
        &w.check_allowing_waiting(),
        Kind::ManualReviewUnjustified,
        1,
    );
}

#[test]
fn a_timed_out_sequence_resolved_in_the_timeouts_own_batch_is_caught() {
    // The batch that times c1 out naming 1 missing also commits s1 as sequence 1: before the
    // timeout, 1 was not missing; after it, c1 was held. Either way a violation.
    let (mut w, s1) = held_world();
    w.now -= 10;
    w.commit(s1, 1);
    let r = w.check_allowing_waiting();
    assert_only(&r, Kind::ManualReviewUnjustified, 1);
    has(
        &r,
        "sequence 1 was resolved in the review's own batch, which released nothing",
    );

    // The same, with an operator release applied in that batch: the release came between.
    let (mut w, s1) = held_world();
    w.now -= 10;
    w.release("c1", None);
    w.commit(s1, 1);
    assert_clean(&w.check_allowing_waiting());
}

#[test]
fn a_backlog_overflow_holds_its_contact_from_the_next_batch_on() {
    // max_pending_per_contact 2: s3 and s4 wait for 2, s5 overflows with them; s0's effect
    // (sequence 1) in the same batch (before the overflow) is not after the hold, s1's in the
    // next one is.
    let (mut w, _) = overflowed_world();
    assert_clean(&w.check_allowing_waiting());
    w.later(20);
    let s1 = w.produce(&intent("s1", "c1", 0));
    w.commit(s1, 2);
    let r = w.check_allowing_waiting();
    assert_only(&r, Kind::CommittedWhileHeld, 1);
    has(&r, "intent s1 committed as sequence 2 in a batch after the contact's hold (CONTACT_BACKLOG_OVERFLOW");
}

/// c1: s0 commits as sequence 1; s3 and s4 wait for 2; s5 overflows with them (max 2 waiting),
/// all in one batch. Returns the world and the overflow's batch time.
fn overflowed_world() -> (W, i64) {
    overflowed_world_skewed(0)
}

/// [`overflowed_world`] decided by an instance whose clock is `skew` ahead of the audit's.
fn overflowed_world_skewed(skew: i64) -> (W, i64) {
    let mut w = W::new();
    w.skew = skew;
    let s0 = w.produce(&intent("s0", "c1", 0));
    let pending: Vec<(Position, u64)> = [3, 4, 5]
        .into_iter()
        .map(|seq| (w.produce(&intent(&format!("s{seq}"), "c1", seq)), seq))
        .collect();
    w.commit(s0, 1);
    for (p, seq) in &pending {
        w.review(*p, Overflow, 0, *seq);
    }
    let at = w.now;
    (w, at)
}

#[test]
fn a_gap_below_an_overflow_resolved_in_the_overflows_own_batch_is_caught() {
    // Sequence 2 commits in the overflow's batch: before the overflow, 3 and 4 had no gap to
    // wait for; after it, c1 was held. Each of the three reviews is unjustified.
    let (mut w, at) = overflowed_world();
    let s1 = w.produce(&intent("s1", "c1", 0));
    w.now = at;
    w.commit(s1, 2);
    let r = w.check_allowing_waiting();
    assert_only(&r, Kind::ManualReviewUnjustified, 3);
    has(&r, "every sequence below 3 was resolved by the end of the overflow's own batch, which released nothing");

    // An operator release in that batch came between: nothing to report.
    let (mut w, at) = overflowed_world();
    let s1 = w.produce(&intent("s1", "c1", 0));
    w.now = at;
    w.release("c1", None);
    w.commit(s1, 2);
    assert_clean(&w.check_allowing_waiting());
}

#[test]
fn version_conflicts_need_a_stale_expected_version() {
    for expected in [0, 1] {
        let mut w = W::new();
        let a1 = w.produce(&intent("a1", "c1", 1));
        w.commit(a1, 1);
        let mut guarded = intent("a2", "c1", 2);
        guarded.expected_version = expected;
        let a2 = w.produce(&guarded);
        w.review(a2, VerConflict, 2, 2);
        let r = w.check();
        assert_only(&r, Kind::ManualReviewUnjustified, 1);
    }
}

#[test]
fn an_effect_commits_only_on_the_version_its_intent_expects() {
    // a2 expects version 1 (a1's effect): committed as version 2, it passed its guard.
    let guarded = |expected| {
        let mut w = W::new();
        let a1 = w.produce(&intent("a1", "c1", 1));
        w.commit(a1, 1);
        let mut a2 = intent("a2", "c1", 2);
        a2.expected_version = expected;
        let a2 = w.produce(&a2);
        w.commit(a2, 2);
        w
    };
    assert_ok(&guarded(1).check());
    // R6: a stale guard (0 or 5 effects before it, or its own version) must block, not commit.
    for expected in [2, 5] {
        let r = guarded(expected).check();
        assert_only(&r, Kind::VersionGuard, 1);
        has(
            &r,
            &format!("intent a2: expected_version {expected}, yet committed as sequence 2 on the contact's version 1"),
        );
    }
    // A guard on the contact's first intent expects a version it never had.
    let mut w = W::new();
    let mut first = intent("a1", "c1", 0);
    first.expected_version = 1;
    let a1 = w.produce(&first);
    w.commit(a1, 1);
    assert_only(&w.check(), Kind::VersionGuard, 1);
}

#[test]
fn sequence_conflicts_need_a_resolved_or_owned_slot() {
    let mut w = W::new();
    let a5 = w.produce(&intent("a5", "c1", 5));
    w.review(a5, SeqConflict, 1, 5);
    let r = w.check();
    assert_only(&r, Kind::ManualReviewUnjustified, 1);
    has(
        &r,
        "sequence 5 was neither resolved nor claimed by another intent",
    );

    // Owned by another waiting intent: justified.
    let mut w = W::new();
    let a5 = w.produce(&intent("a5", "c1", 5));
    w.wait(a5, 5);
    let b5 = w.produce(&intent("b5", "c1", 5));
    w.review(b5, SeqConflict, 1, 5);
    assert_ok(&w.check_allowing_waiting());
}

#[test]
fn idempotency_and_invalid_intent_reviews_must_hold() {
    // A retry with the same content is a duplicate, not a conflict.
    let mut w = W::new();
    let a1 = w.produce(&intent("a1", "c1", 1));
    w.commit(a1, 1);
    let retry = w.produce(&intent("a1", "c1", 1));
    w.review(retry, Idem, 0, 0);
    let r = w.check();
    assert_only(&r, Kind::ManualReviewUnjustified, 1);
    has(&r, "no record of intent a1 has other content before it");

    // A valid intent is not invalid.
    let mut w = W::new();
    let a1 = w.produce(&intent("a1", "c1", 1));
    w.commit(a1, 1);
    let retry = w.produce(&intent("a1", "c1", 1));
    w.review(retry, Invalid, 0, 0);
    let r = w.check();
    assert_only(&r, Kind::ManualReviewUnjustified, 1);
    has(&r, "intent a1 is valid");

    // A sequence the stores cannot hold is invalid, though it decodes.
    let mut w = W::new();
    let huge = w.produce(&intent("h1", "c1", MAX_SEQUENCE + 1));
    w.review(huge, Invalid, 0, MAX_SEQUENCE + 1);
    assert_ok(&w.check());

    // Any reason but INVALID_INTENT for a record that is no intent.
    let mut w = W::new();
    let g = w.produce_raw(0, Some(b"g1"), Some(GARBAGE.to_vec()));
    w.review(g, Invalid, 0, 0);
    w.review(g, Timeout, 1, 2);
    let r = w.check();
    assert_eq!(r.manual_review_unjustified, 1, "{r:#?}");
    has(
        &r,
        "the record is not a valid intent (manual review unjustified)",
    );
}

#[test]
fn backlog_overflows_need_a_full_backlog_behind_a_gap() {
    // max_pending_per_contact = 2: two waiting behind the missing 1, and the newcomer.
    let overflow = |resolved_first: bool, evicted: &[(&str, u64)]| {
        let mut w = W::new();
        if resolved_first {
            let s1 = w.produce(&intent("s1", "c1", 1));
            let s2 = w.produce(&intent("s2", "c1", 2));
            w.commit(s1, 1);
            w.commit(s2, 2);
            w.later(1);
        }
        for (id, seq) in evicted {
            let p = w.produce(&intent(id, "c1", *seq));
            w.review(p, Overflow, 0, *seq);
        }
        w
    };
    let all = [("o3", 3), ("o4", 4), ("o5", 5)];
    let w = overflow(false, &all);
    let r = w.check_allowing_waiting();
    assert_ok(&r);
    assert_eq!(r.unresolved_slots, 3);

    let r = overflow(false, &all[1..]).check_allowing_waiting();
    assert_only(&r, Kind::ManualReviewUnjustified, 2);
    has(
        &r,
        "2 intents overflowed together, not max_pending_per_contact (2) waiting plus one",
    );

    let r = overflow(true, &all).check_allowing_waiting();
    assert_only(&r, Kind::ManualReviewUnjustified, 3);
    has(
        &r,
        "every sequence below 3 was resolved: the contact had no gap",
    );
}

#[test]
fn a_reason_the_verifier_does_not_know_is_unjustified() {
    let mut w = W::new();
    let a1 = w.produce(&intent("a1", "c1", 1));
    let mut r = w.review_of(a1, Timeout, 0, 1);
    r.reason = 99;
    w.emit_review(&r);
    w.o.audit.push(AuditRecord {
        source: a1,
        intent_id: "a1".into(),
        contact_id: "c1".into(),
        outcome: AuditOutcome::Reviewed,
        reason: "99".into(),
        commit_sequence: 1,
        before_outputs: true,
        at_ms: w.now,
    });
    let r = w.check();
    assert_only(&r, Kind::ManualReviewUnjustified, 1);
    has(&r, "reason 99 is unknown to the verifier");
}

/// s2 timed out waiting for 1; an operator skipped 1; s2 committed in slot 2.
fn reopened_world() -> W {
    let mut w = W::new();
    let s2 = w.produce(&intent("s2", "c1", 2));
    w.later(TIMEOUT + 1);
    w.review(s2, Timeout, 1, 2);
    w.later(10);
    w.release("c1", Some(2));
    w.skip("c1", 1, 1, SkipCause::Operator);
    w.later(10);
    let again = w.produce(&intent("s2", "c1", 2));
    w.commit_v(again, 2, 1);
    w
}

#[test]
fn a_decided_intent_is_reopened_only_by_an_operator() {
    let mut w = reopened_world();
    let r = w.check();
    assert_only(&r, Kind::ReopenedWithoutOperator, 1);
    has(&r, "intent s2: 2 outcomes (1 effect, 1 manual-review decisions, 0 waiting) with 0 operator re-submissions");

    w.resubmit("s2", "c1");
    assert_ok(&w.check());
}

/// s2 timed out waiting for 1; an operator resumed c1 and re-submitted s2, which waited again
/// and timed out again; resumed and re-submitted once more, s2 committed after s1. With
/// `resubmitted` false the second review and the commit had no re-submission before them.
fn reviewed_again_world(resubmitted: bool) -> W {
    let mut w = W::new();
    let s2 = w.produce(&intent("s2", "c1", 2));
    w.start_waiting(s2);
    w.later(TIMEOUT + 1);
    w.review(s2, Timeout, 1, 2);
    for _ in 0..2 {
        w.later(10);
        w.release("c1", None);
        if resubmitted {
            w.resubmit("s2", "c1");
        }
        w.start_waiting(s2);
        w.later(TIMEOUT + 1);
        if w.o.reviews.len() < 2 {
            w.review(s2, Timeout, 1, 2);
        }
    }
    let s1 = w.produce(&intent("s1", "c1", 1));
    w.commit(s1, 1);
    w.commit(s2, 2);
    w
}

/// R8 with R9: an intent an operator re-submits may be reviewed again (it waited again and
/// timed out again): each review of one record beyond the first answers a re-submission of
/// its intent, and each has its own audit row.
#[test]
fn a_record_reviewed_again_after_a_resubmission_is_not_a_duplicate() {
    let w = reviewed_again_world(true);
    assert_ok(&w.check());

    let w = reviewed_again_world(false);
    let r = w.check();
    has(
        &r,
        "intents 0/0: 2 manual-review records (WAIT_TIMEOUT, WAIT_TIMEOUT)",
    );
    assert_eq!(r.duplicate_reviews, 1, "{r:?}");
    assert_eq!(r.reopened_without_operator, 1, "{r:?}");

    // The second review without its audit row.
    let mut w = reviewed_again_world(true);
    let second =
        w.o.audit
            .iter()
            .rposition(|a| a.outcome == AuditOutcome::Reviewed)
            .unwrap();
    w.o.audit.remove(second);
    let r = w.check();
    assert_only(&r, Kind::AuditMismatch, 1);
    has(
        &r,
        "intents 0/0: 2 manual-review records with 1 blocked_conflict/manual_review audit rows",
    );
}

/// R9: each release and re-submission answers an operator's request, recorded by the admin
/// audit and applied in the same batch, one request each. One the processor applied on any
/// other ground (a producer's record, a bug) is a reopening without operator.
#[test]
fn a_reopening_answers_an_audited_operator_request_applied_in_its_batch() {
    let mut w = reopened_world();
    w.resubmit("s2", "c1");
    assert_ok(&w.check());
    let release = "contact c1: release, skip to 2 applied in batch 1001 of partition 0 with no operator request for it (admin API or CLI, audited) applied there";
    let resubmission = "contact c1: re-submission of s2 applied in batch 1002 of partition 0 with no operator request for it (admin API or CLI, audited) applied there";
    // What is changed, how, and the finding.
    type Case = (&'static str, fn(&mut W), &'static str);
    let cases: [Case; 7] = [
        (
            "no request",
            |w| {
                w.o.requests.remove(0);
            },
            release,
        ),
        (
            "a request the admin audit does not know",
            |w| {
                w.o.requests[1].audited = false;
            },
            resubmission,
        ),
        (
            "applied by another batch",
            |w| {
                w.o.requests[0].applied = Some((0, 7));
            },
            release,
        ),
        (
            "applied on another partition",
            |w| {
                w.o.requests[1].applied = Some((1, 1002));
            },
            resubmission,
        ),
        (
            "refused or cancelled, so never applied",
            |w| {
                w.o.requests[0].applied = None;
            },
            release,
        ),
        (
            "asking for something else",
            |w| {
                w.o.requests[0].action = RequestedAction::SkipTo(3);
            },
            release,
        ),
        (
            "for another contact",
            |w| {
                w.o.requests[1].contact_id = "c2".into();
            },
            resubmission,
        ),
    ];
    for (what, change, finding) in cases {
        let mut v = w.clone();
        change(&mut v);
        let r = v.check();
        assert_eq!(r.reopened_without_operator, 1, "{what}: {:?}", r.violations);
        has(&r, finding);
    }
    // One request, two releases.
    let mut twice = w.clone();
    let again = twice.o.releases[0].clone();
    twice.o.releases.push(again);
    let r = twice.check();
    assert_eq!(r.reopened_without_operator, 1, "{:?}", r.violations);
    has(&r, release);
}

#[test]
fn skips_need_their_policy_or_their_operator() {
    let mut w = W::new();
    let s2 = w.produce(&intent("s2", "c1", 2));
    w.later(TIMEOUT + 1);
    w.skip("c1", 1, 1, SkipCause::WaitTimeout);
    w.commit_v(s2, 2, 1);
    let r = w.check();
    assert_only(&r, Kind::SkipUnjustified, 1);
    has(
        &r,
        "contact c1: sequences 1..=1 skipped by the wait timeout, but the timeout policy is hold",
    );
    w.o.settings.on_timeout = TimeoutPolicy::Skip;
    assert_ok(&w.check());

    let mut w = reopened_world();
    w.resubmit("s2", "c1");
    // The operator resumed the contact: no release asked to skip anything.
    w.o.releases[0].skip_to = None;
    w.o.requests[0].action = RequestedAction::Resume;
    let r = w.check();
    assert_only(&r, Kind::SkipUnjustified, 1);
    has(
        &r,
        "skipped for an operator, but no release asked to skip to the next one",
    );
}

#[test]
fn outputs_and_the_audit_agree() {
    // An effect without its row.
    let mut w = W::new();
    let a1 = w.produce(&intent("a1", "c1", 1));
    let e = w.effect(a1, 1, 1);
    w.emit(0, &e);
    let r = w.check();
    assert_only(&r, Kind::AuditMismatch, 1);
    has(
        &r,
        "intent a1: effect with sequence 1 has 0 committed_causal audit rows, not one",
    );

    // An effect audited twice.
    w.audit_effect(a1, &e);
    w.audit_effect(a1, &e);
    assert_only(&w.check(), Kind::AuditMismatch, 1);

    // A committed row, settled before the outputs were read, without its effect; the same
    // row of a batch that committed while they were read is not evidence.
    let mut w = W::new();
    let a1 = w.produce(&intent("a1", "c1", 1));
    w.wait(a1, 1);
    let e = w.effect(a1, 1, 1);
    w.audit_effect(a1, &e);
    let r = w.check_allowing_waiting();
    assert_only(&r, Kind::AuditMismatch, 1);
    has(
        &r,
        "intent a1: audited as committed with sequence 1, but no such effect exists",
    );
    w.o.audit[0].before_outputs = false;
    assert_ok(&w.check_allowing_waiting());

    // A review without its row.
    let mut w = W::new();
    let g = w.produce_raw(0, Some(b"g1"), Some(GARBAGE.to_vec()));
    let r = w.review_of(g, Invalid, 0, 0);
    w.emit_review(&r);
    let r = w.check();
    assert_only(&r, Kind::AuditMismatch, 1);
    has(
        &r,
        "intents 0/0: 1 manual-review records with 0 blocked_conflict/manual_review audit rows",
    );
}

#[test]
fn what_the_reading_could_not_interpret_fails_the_check() {
    let mut w = W::new();
    w.o.unreadable.push("contact c1: unreadable state".into());
    let r = w.check();
    assert_only(&r, Kind::UnreadableAudit, 1);
    has(&r, "contact c1: unreadable state");
}

#[test]
fn waiting_intents_are_outcomes_but_unfinished_work() {
    let mut w = W::new();
    let s2 = w.produce(&intent("s2", "c1", 2));
    w.wait(s2, 2);
    let r = w.check();
    assert_clean(&r);
    assert_eq!(r.pending(), (1, 0, 0));
    assert!(!r.ok);
    assert_eq!(
        r.summary(),
        "work is still pending: 1 waiting (verify a quiet system, or pass --allow-waiting)"
    );
    let r = w.check_allowing_waiting();
    assert!(r.ok);
    assert_eq!(
        r.summary(),
        "the contract holds (1 waiting pending, allowed)"
    );

    // A waiting intent below an effect is a gap: the effect passed it.
    let s3 = w.produce(&intent("s3", "c1", 3));
    w.commit_v(s3, 3, 1);
    let r = w.check_allowing_waiting();
    assert_only(&r, Kind::Gap, 2);
    has(&r, "sequence 2 is still waiting");
}

#[test]
fn a_prefix_checks_one_runs_records_only() {
    let mut w = W::new();
    let a = w.produce(&intent("p1-a", "p1-c", 1));
    w.commit(a, 1);
    w.produce_raw(0, Some(b"p1-garbage"), Some(GARBAGE.to_vec()));
    w.produce(&intent("p2-b", "p2-c", 1));
    let opts = |prefix: &str| Options {
        prefix: prefix.into(),
        allow_waiting: false,
    };
    let p1 = check(&w.o, &opts("p1-"));
    assert_only(&p1, Kind::Lost, 1);
    has(&p1, "invalid record intents 0/1 (key \"p1-garbage\"");
    assert_eq!((p1.intents, p1.records, p1.committed), (1, 2, 1));
    let p2 = check(&w.o, &opts("p2-"));
    assert_only(&p2, Kind::Lost, 1);
    has(&p2, "intent p2-b (intents 0/2): no outcome");
    let none = check(&w.o, &opts("nobody-"));
    assert_eq!(
        none,
        Report {
            ok: true,
            ..Report::default()
        }
    );
}

#[test]
fn an_audit_row_of_a_recreated_topics_old_log_is_judged_by_its_own_intent() {
    // Offset 0 of the topic held w-1 (committed, audited, its effect emitted), then the topic
    // was deleted and created again, and offset 0 now holds n-1.
    let mut w = W::new();
    let old = w.produce(&intent("w-1", "w-c", 1));
    let e = w.effect(old, 1, 1);
    w.audit_effect(old, &e);
    w.emit(0, &e);
    w.o.intents.clear();
    let new = w.produce(&intent("n-1", "n-c", 1));
    assert_eq!(new, old, "the same position in the new log");
    w.commit(new, 1);
    let opts = Options {
        prefix: "n-".into(),
        allow_waiting: false,
    };
    let report = check(&w.o, &opts);
    assert!(report.ok, "{:?}", report.violations);
    assert_eq!(report.committed, 1);
}

#[test]
fn the_original_content_of_an_id_spread_over_partitions_is_the_one_decided() {
    // Either partition's record may be consumed first: the one that committed is the
    // original, the other the conflict.
    let mut w = W::new();
    let a = w.produce_on(0, &intent("x", "c1", 0));
    let mut other = intent("x", "c1", 0);
    other.payload = b"other".to_vec().into();
    w.later(5);
    let b = w.produce_on(1, &other);
    w.commit(b, 1);
    w.review(a, Idem, 0, 0);
    assert_ok(&w.check());
}

#[test]
fn examples_are_capped_and_shared_between_kinds() {
    let mut w = W::new();
    for i in 0..30 {
        w.produce(&intent(&format!("u{i}"), &format!("c{i}"), 0));
    }
    let a1 = w.produce(&intent("a1", "k", 1));
    let a3 = w.produce(&intent("a3", "k", 3));
    w.commit(a1, 1);
    w.commit_v(a3, 3, 2);
    let r = w.check();
    assert_eq!((r.lost, r.gaps), (30, 1));
    assert_eq!(r.violations.len(), MAX_EXAMPLES);
    assert!(r.violations[0].ends_with("(gap)"), "{:?}", r.violations);
    assert_eq!(r.summary(), "the contract is violated: 1 gaps, 30 lost");
}
