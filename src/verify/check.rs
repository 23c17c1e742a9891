//! The pure check: an [`Observed`] in, a [`Report`] out. No I/O and no clock; see the
//! [module documentation](super) for what is checked and why.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use prost::Message as _;
use serde::{Deserialize, Serialize};

use super::observed::*;
use crate::proto::{Intent, ManualReview, ReviewReason, SideEffect};
use crate::sequencer::TimeoutPolicy;

/// How many violation examples the report carries.
pub const MAX_EXAMPLES: usize = 20;

/// What a batch may take from its clock reading (when its intents start waiting) to its
/// write (its audit rows' time): the slack of the `WAIT_TIMEOUT` lower bound on batch times.
const WAIT_START_SLACK_MS: i64 = 1_000;

/// What to check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// Only intents whose id starts with this (and invalid records whose key does).
    pub prefix: String,
    /// Waiting intents, unresolved manual-review slots and held contacts do not make the
    /// report fail (a run checked while work is legitimately pending).
    pub allow_waiting: bool,
}

/// What `verify` found. Serialized as the JSON printed by `causal-commit verify`; the
/// [module documentation](super) describes every field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub intents: usize,
    pub records: usize,
    pub invalid_records: usize,
    pub committed: usize,
    pub manual_review: BTreeMap<String, usize>,
    pub blocked: usize,
    pub waiting: usize,
    pub unresolved_slots: usize,
    pub held_contacts: usize,
    pub reorders: usize,
    pub duplicates_emitted: usize,
    pub duplicate_reviews: usize,
    pub gaps: usize,
    pub committed_before_predecessor: usize,
    pub sequence_mismatches: usize,
    pub assigned_order_violations: usize,
    pub content_mismatches: usize,
    pub version_mismatches: usize,
    pub version_guard_violations: usize,
    pub lost: usize,
    pub effects_without_intent: usize,
    pub malformed_outputs: usize,
    pub manual_review_unjustified: usize,
    pub skips_unjustified: usize,
    pub committed_while_held: usize,
    pub reopened_without_operator: usize,
    pub audit_mismatches: usize,
    pub unreadable_audit: usize,
    pub ok: bool,
    pub violations: Vec<String>,
}

/// A kind of violation: one counter of the [`Report`] each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Reorder,
    Duplicate,
    DuplicateReview,
    Gap,
    CommittedBeforePredecessor,
    SequenceMismatch,
    AssignedOrder,
    ContentMismatch,
    VersionMismatch,
    VersionGuard,
    Lost,
    EffectWithoutIntent,
    Malformed,
    ManualReviewUnjustified,
    SkipUnjustified,
    CommittedWhileHeld,
    ReopenedWithoutOperator,
    AuditMismatch,
    UnreadableAudit,
}

impl Kind {
    pub const ALL: [Kind; 19] = [
        Kind::Reorder,
        Kind::Duplicate,
        Kind::DuplicateReview,
        Kind::Gap,
        Kind::CommittedBeforePredecessor,
        Kind::SequenceMismatch,
        Kind::AssignedOrder,
        Kind::ContentMismatch,
        Kind::VersionMismatch,
        Kind::VersionGuard,
        Kind::Lost,
        Kind::EffectWithoutIntent,
        Kind::Malformed,
        Kind::ManualReviewUnjustified,
        Kind::SkipUnjustified,
        Kind::CommittedWhileHeld,
        Kind::ReopenedWithoutOperator,
        Kind::AuditMismatch,
        Kind::UnreadableAudit,
    ];

    /// The report field that counts it.
    pub fn field(self) -> &'static str {
        match self {
            Kind::Reorder => "reorders",
            Kind::Duplicate => "duplicates_emitted",
            Kind::DuplicateReview => "duplicate_reviews",
            Kind::Gap => "gaps",
            Kind::CommittedBeforePredecessor => "committed_before_predecessor",
            Kind::SequenceMismatch => "sequence_mismatches",
            Kind::AssignedOrder => "assigned_order_violations",
            Kind::ContentMismatch => "content_mismatches",
            Kind::VersionMismatch => "version_mismatches",
            Kind::VersionGuard => "version_guard_violations",
            Kind::Lost => "lost",
            Kind::EffectWithoutIntent => "effects_without_intent",
            Kind::Malformed => "malformed_outputs",
            Kind::ManualReviewUnjustified => "manual_review_unjustified",
            Kind::SkipUnjustified => "skips_unjustified",
            Kind::CommittedWhileHeld => "committed_while_held",
            Kind::ReopenedWithoutOperator => "reopened_without_operator",
            Kind::AuditMismatch => "audit_mismatches",
            Kind::UnreadableAudit => "unreadable_audit",
        }
    }

    /// The tag that ends each example of this kind, in parentheses.
    pub fn tag(self) -> &'static str {
        match self {
            Kind::Reorder => "reorder",
            Kind::Duplicate => "duplicate",
            Kind::DuplicateReview => "duplicate review",
            Kind::Gap => "gap",
            Kind::CommittedBeforePredecessor => "committed before predecessor",
            Kind::SequenceMismatch => "sequence mismatch",
            Kind::AssignedOrder => "assigned order",
            Kind::ContentMismatch => "content mismatch",
            Kind::VersionMismatch => "version mismatch",
            Kind::VersionGuard => "version guard",
            Kind::Lost => "lost",
            Kind::EffectWithoutIntent => "effect without intent",
            Kind::Malformed => "malformed",
            Kind::ManualReviewUnjustified => "manual review unjustified",
            Kind::SkipUnjustified => "skip unjustified",
            Kind::CommittedWhileHeld => "committed while held",
            Kind::ReopenedWithoutOperator => "reopened without operator",
            Kind::AuditMismatch => "audit mismatch",
            Kind::UnreadableAudit => "unreadable audit",
        }
    }
}

impl Report {
    /// The counter of `kind`.
    pub fn count(&self, kind: Kind) -> usize {
        let r = self;
        match kind {
            Kind::Reorder => r.reorders,
            Kind::Duplicate => r.duplicates_emitted,
            Kind::DuplicateReview => r.duplicate_reviews,
            Kind::Gap => r.gaps,
            Kind::CommittedBeforePredecessor => r.committed_before_predecessor,
            Kind::SequenceMismatch => r.sequence_mismatches,
            Kind::AssignedOrder => r.assigned_order_violations,
            Kind::ContentMismatch => r.content_mismatches,
            Kind::VersionMismatch => r.version_mismatches,
            Kind::VersionGuard => r.version_guard_violations,
            Kind::Lost => r.lost,
            Kind::EffectWithoutIntent => r.effects_without_intent,
            Kind::Malformed => r.malformed_outputs,
            Kind::ManualReviewUnjustified => r.manual_review_unjustified,
            Kind::SkipUnjustified => r.skips_unjustified,
            Kind::CommittedWhileHeld => r.committed_while_held,
            Kind::ReopenedWithoutOperator => r.reopened_without_operator,
            Kind::AuditMismatch => r.audit_mismatches,
            Kind::UnreadableAudit => r.unreadable_audit,
        }
    }

    fn count_mut(&mut self, kind: Kind) -> &mut usize {
        let r = self;
        match kind {
            Kind::Reorder => &mut r.reorders,
            Kind::Duplicate => &mut r.duplicates_emitted,
            Kind::DuplicateReview => &mut r.duplicate_reviews,
            Kind::Gap => &mut r.gaps,
            Kind::CommittedBeforePredecessor => &mut r.committed_before_predecessor,
            Kind::SequenceMismatch => &mut r.sequence_mismatches,
            Kind::AssignedOrder => &mut r.assigned_order_violations,
            Kind::ContentMismatch => &mut r.content_mismatches,
            Kind::VersionMismatch => &mut r.version_mismatches,
            Kind::VersionGuard => &mut r.version_guard_violations,
            Kind::Lost => &mut r.lost,
            Kind::EffectWithoutIntent => &mut r.effects_without_intent,
            Kind::Malformed => &mut r.malformed_outputs,
            Kind::ManualReviewUnjustified => &mut r.manual_review_unjustified,
            Kind::SkipUnjustified => &mut r.skips_unjustified,
            Kind::CommittedWhileHeld => &mut r.committed_while_held,
            Kind::ReopenedWithoutOperator => &mut r.reopened_without_operator,
            Kind::AuditMismatch => &mut r.audit_mismatches,
            Kind::UnreadableAudit => &mut r.unreadable_audit,
        }
    }

    /// Every violation kind with a non-zero count, as (report field, count).
    pub fn violation_counts(&self) -> Vec<(&'static str, usize)> {
        Kind::ALL
            .iter()
            .map(|k| (k.field(), self.count(*k)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Work still pending: (waiting intents, unresolved slots, held contacts).
    pub fn pending(&self) -> (usize, usize, usize) {
        (self.waiting, self.unresolved_slots, self.held_contacts)
    }

    /// One line for a terminal: what is wrong, or "ok".
    pub fn summary(&self) -> String {
        let counts = self.violation_counts();
        let (waiting, slots, held) = self.pending();
        let mut parts: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
        for (n, what) in [
            (waiting, "waiting"),
            (slots, "unresolved_slots"),
            (held, "held_contacts"),
        ] {
            if n > 0 {
                parts.push(format!("{n} {what}"));
            }
        }
        match (self.ok, counts.is_empty()) {
            (true, _) if parts.is_empty() => "the contract holds".to_string(),
            (true, _) => format!("the contract holds ({} pending, allowed)", parts.join(", ")),
            (false, true) => format!(
                "work is still pending: {} (verify a quiet system, or pass --allow-waiting)",
                parts.join(", ")
            ),
            (false, false) => format!("the contract is violated: {}", parts.join(", ")),
        }
    }
}

/// Violation examples, kept per kind so one abundant kind does not hide the others.
#[derive(Default)]
struct Examples {
    kinds: BTreeMap<Kind, Vec<String>>,
}

impl Examples {
    /// Round-robin over the kinds, in report order.
    fn take(self) -> Vec<String> {
        let mut iters: Vec<_> = self.kinds.into_values().map(Vec::into_iter).collect();
        let mut out = Vec::new();
        while out.len() < MAX_EXAMPLES {
            let before = out.len();
            for it in &mut iters {
                if out.len() == MAX_EXAMPLES {
                    break;
                }
                if let Some(e) = it.next() {
                    out.push(e);
                }
            }
            if out.len() == before {
                break;
            }
        }
        out
    }
}

/// The report being filled.
#[derive(Default)]
struct Findings {
    report: Report,
    examples: Examples,
}

impl Findings {
    /// Counts `n` violations of `kind`, with an example (built only while examples are kept).
    fn add(&mut self, kind: Kind, n: usize, example: impl FnOnce() -> String) {
        let count = self.report.count_mut(kind);
        *count = count.saturating_add(n);
        let list = self.examples.kinds.entry(kind).or_default();
        if list.len() < MAX_EXAMPLES {
            list.push(format!("{} ({})", example(), kind.tag()));
        }
    }
}

/// Checks the contract on what was observed; see the [module documentation](super).
pub fn check(observed: &Observed, options: &Options) -> Report {
    let mut f = Findings::default();
    let w = World::build(observed, options, &mut f);
    judge(&w, f)
}

/// Runs every check on a built world.
fn judge(w: &World<'_>, mut f: Findings) -> Report {
    let (observed, options) = (w.o, w.options);
    w.count_what_was_read(&mut f);
    w.check_effect_order(&mut f);
    w.check_duplicates(&mut f);
    w.check_effects_against_intents(&mut f);
    w.check_assigned_order(&mut f);
    w.check_gaps_and_slots(&mut f);
    w.check_lost(&mut f);
    w.check_reviews(&mut f);
    w.check_reopened(&mut f);
    w.check_requested(&mut f);
    w.check_skips(&mut f);
    w.check_gate(&mut f);
    w.check_holds(&mut f);
    w.check_audit(&mut f);
    for note in &observed.unreadable {
        f.add(Kind::UnreadableAudit, 1, || note.clone());
    }
    let mut report = f.report;
    let violations: usize = Kind::ALL.iter().map(|k| report.count(*k)).sum();
    let (waiting, slots, held) = report.pending();
    report.ok = violations == 0 && (options.allow_waiting || waiting + slots + held == 0);
    report.violations = f.examples.take();
    report
}

/// Why a manual-review record says it exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    WaitTimeout,
    ContactOnHold,
    VersionConflict,
    SequenceConflict,
    IdempotencyConflict,
    InvalidIntent,
    BacklogOverflow,
    Unprocessable,
    Unknown,
}

impl Why {
    /// By name, so a reason added to the proto (`UNPROCESSABLE`) is known as soon as it exists.
    fn of(code: i32) -> (Why, String) {
        match ReviewReason::try_from(code) {
            Ok(reason) => (
                Why::named(reason.as_str_name()),
                reason.as_str_name().to_string(),
            ),
            Err(_) => (Why::Unknown, code.to_string()),
        }
    }

    fn named(name: &str) -> Why {
        match name {
            "WAIT_TIMEOUT" => Why::WaitTimeout,
            "CONTACT_ON_HOLD" => Why::ContactOnHold,
            "VERSION_CONFLICT" => Why::VersionConflict,
            "SEQUENCE_CONFLICT" => Why::SequenceConflict,
            "IDEMPOTENCY_CONFLICT" => Why::IdempotencyConflict,
            "INVALID_INTENT" => Why::InvalidIntent,
            "CONTACT_BACKLOG_OVERFLOW" => Why::BacklogOverflow,
            "UNPROCESSABLE" => Why::Unprocessable,
            _ => Why::Unknown,
        }
    }

    /// A decision about the intent itself (not about one record of it): it is the intent's
    /// outcome.
    fn decides_intent(self) -> bool {
        !matches!(self, Why::IdempotencyConflict | Why::InvalidIntent)
    }

    /// The intent keeps the slot it claimed, unresolved (R7, bounded memory).
    fn keeps_slot(self) -> bool {
        matches!(
            self,
            Why::WaitTimeout | Why::ContactOnHold | Why::BacklogOverflow
        )
    }

    fn is_conflict(self) -> bool {
        matches!(
            self,
            Why::VersionConflict | Why::SequenceConflict | Why::IdempotencyConflict
        )
    }
}

/// One input record.
struct Rec {
    pos: Position,
    timestamp_ms: Option<i64>,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    /// The intent and its content fingerprint, when the record is a valid intent.
    valid: Option<(Intent, u64)>,
    /// Why it is not, otherwise.
    invalid: String,
    in_scope: bool,
    /// Whether it is a forwarded copy: the record its `cc-forwarded-from` header names exists
    /// (and is another record) and has the same key and value. A copy is the processor's
    /// transport, not a place where the producer sent the intent (a forged header, naming
    /// another record, makes no copy).
    copy: bool,
}

impl Rec {
    fn intent(&self) -> Option<&Intent> {
        self.valid.as_ref().map(|v| &v.0)
    }

    fn fingerprint(&self) -> Option<u64> {
        self.valid.as_ref().map(|v| v.1)
    }

    fn key_text(&self) -> String {
        self.key
            .as_deref()
            .map_or_else(|| "<none>".into(), |k| short(&String::from_utf8_lossy(k)))
    }
}

/// One valid intent id: its records and its original content.
struct Id {
    /// Indexes into `World::recs`, in (partition, offset) order.
    records: Vec<usize>,
    /// The fingerprint of its original content.
    original: u64,
    /// Its first record with the original content.
    first: usize,
}

struct Eff {
    pos: Position,
    e: SideEffect,
}

struct Rev {
    pos: Position,
    r: ManualReview,
    why: Why,
    name: String,
    /// Index into `World::recs`.
    source: usize,
}

/// A slot range resolved without waiting: by an effect, a version-conflict block or a skip.
#[derive(Clone, Copy)]
struct Resolution {
    from: u64,
    to: u64,
    /// The processor's time of the decision (a skip has only its batch's).
    at_ms: i64,
    /// Its batch's time in the audit; `i64::MIN` without an audit row (it counts from the
    /// start: the missing row is an `audit_mismatches` finding).
    batch_ms: i64,
}

/// Everything observed, decoded and indexed, restricted to the prefix.
struct World<'a> {
    o: &'a Observed,
    options: &'a Options,
    recs: Vec<Rec>,
    by_pos: HashMap<Position, usize>,
    ids: BTreeMap<String, Id>,
    /// In (partition, offset) order.
    effects: Vec<Eff>,
    /// Reviews that point at an input record.
    reviews: Vec<Rev>,
    effects_by_id: HashMap<String, Vec<usize>>,
    effects_by_contact: BTreeMap<String, Vec<usize>>,
    reviews_by_source: BTreeMap<usize, Vec<usize>>,
    /// Per contact, sorted distinct sequences of its effects.
    sequences: HashMap<String, Vec<u64>>,
    resolutions: HashMap<String, Vec<Resolution>>,
    /// When each outcome's batch was written (the audit's clock).
    times: AuditTimes<'a>,
    /// Per contact, (batch time, index into `reviews`) of each review that put it on hold,
    /// sorted: a wait timeout under the `hold` policy, or a backlog overflow. A review without
    /// its audit row is left out (it is an audit mismatch already).
    holds: HashMap<String, Vec<(i64, usize)>>,
    /// Per contact, the sorted batch times of its operator releases.
    releases: HashMap<&'a str, Vec<i64>>,
    /// Per (input record, intent id), the batch times at which it started waiting.
    wait_starts: HashMap<(Position, &'a str), Vec<i64>>,
    contacts: BTreeSet<String>,
    waiting: Vec<(&'a str, &'a WaitingIntent)>,
    waiting_by_id: HashMap<&'a str, Vec<&'a WaitingIntent>>,
    /// (contact, sequence) -> the intent ids that hold it: committed with it, claim it as
    /// their causal_sequence, wait in it, or keep it in manual review.
    owners: HashMap<(String, u64), BTreeSet<String>>,
    resubmissions: HashMap<&'a str, usize>,
}

impl<'a> World<'a> {
    // Over 80 lines: one pass per output topic and the audit, each classifying its records;
    // they share the findings being built.
    fn build(o: &'a Observed, options: &'a Options, f: &mut Findings) -> World<'a> {
        let prefix = options.prefix.as_str();
        let at: HashMap<Position, &InputRecord> = o
            .intents
            .iter()
            .map(|r| ((r.partition, r.offset), r))
            .collect();
        let mut recs: Vec<Rec> = o
            .intents
            .iter()
            .map(|r| {
                let mut rec = decode_input(r, &o.settings, prefix);
                let source = r.forwarded_from.filter(|p| *p != rec.pos);
                rec.copy = source
                    .and_then(|p| at.get(&p))
                    .is_some_and(|s| s.key == r.key && s.value == r.value);
                rec
            })
            .collect();
        recs.sort_by_key(|r| r.pos);
        let by_pos: HashMap<Position, usize> =
            recs.iter().enumerate().map(|(i, r)| (r.pos, i)).collect();

        let mut effects = Vec::new();
        let mut sorted: Vec<&OutputRecord> = o.effects.iter().collect();
        sorted.sort_by_key(|r| (r.partition, r.offset));
        for r in sorted {
            match decode_effect(r.value.as_deref()) {
                Ok(e) if e.intent_id.starts_with(prefix) => effects.push(Eff {
                    pos: (r.partition, r.offset),
                    e,
                }),
                Ok(_) => {}
                Err((id, why)) => {
                    if id.is_none_or(|id| id.starts_with(prefix)) {
                        f.add(Kind::Malformed, 1, || {
                            format!("side-effects {}/{}: {why}", r.partition, r.offset)
                        });
                    }
                }
            }
        }

        let mut reviews = Vec::new();
        let mut sorted: Vec<&OutputRecord> = o.reviews.iter().collect();
        sorted.sort_by_key(|r| (r.partition, r.offset));
        for r in sorted {
            let at = format!("manual-review {}/{}", r.partition, r.offset);
            let review = match r.value.as_deref().map(ManualReview::decode) {
                Some(Ok(review)) => review,
                Some(Err(e)) => {
                    f.add(Kind::Malformed, 1, || {
                        format!("{at}: not a ManualReview: {e}")
                    });
                    continue;
                }
                None => {
                    f.add(Kind::Malformed, 1, || {
                        format!("{at}: record without a value")
                    });
                    continue;
                }
            };
            let source = (review.source_topic == o.intents_topic)
                .then(|| by_pos.get(&(review.source_partition, review.source_offset)))
                .flatten()
                .copied();
            let in_scope = match source {
                Some(i) => recs[i].in_scope,
                None => {
                    review.intent_id.starts_with(prefix)
                        || review.original_key.starts_with(prefix.as_bytes())
                }
            };
            if !in_scope {
                continue;
            }
            let (why, name) = Why::of(review.reason);
            let Some(source) = source else {
                f.add(Kind::Malformed, 1, || {
                    format!(
                        "{at}: points at {} {}/{}, which is no record of the intents topic",
                        review.source_topic, review.source_partition, review.source_offset
                    )
                });
                continue;
            };
            if review.reason == ReviewReason::Unspecified as i32 {
                f.add(Kind::Malformed, 1, || format!("{at}: no reason"));
                continue;
            }
            reviews.push(Rev {
                pos: (r.partition, r.offset),
                r: review,
                why,
                name,
                source,
            });
        }

        let mut w = World {
            o,
            options,
            recs,
            by_pos,
            ids: BTreeMap::new(),
            effects,
            reviews,
            effects_by_id: HashMap::new(),
            effects_by_contact: BTreeMap::new(),
            reviews_by_source: BTreeMap::new(),
            sequences: HashMap::new(),
            resolutions: HashMap::new(),
            times: AuditTimes::of(&o.audit),
            holds: HashMap::new(),
            releases: HashMap::new(),
            wait_starts: HashMap::new(),
            contacts: BTreeSet::new(),
            waiting: Vec::new(),
            waiting_by_id: HashMap::new(),
            owners: HashMap::new(),
            resubmissions: HashMap::new(),
        };
        w.index();
        w
    }

    // Over 80 lines: one indexing pass per kind of record (effects, reviews, audit rows), in
    // the order the checks read them.
    fn index(&mut self) {
        let prefix = self.options.prefix.as_str();
        for (i, e) in self.effects.iter().enumerate() {
            self.effects_by_id
                .entry(e.e.intent_id.clone())
                .or_default()
                .push(i);
            self.effects_by_contact
                .entry(e.e.contact_id.clone())
                .or_default()
                .push(i);
        }
        for (c, list) in &self.effects_by_contact {
            let mut seqs: Vec<u64> = list
                .iter()
                .map(|i| self.effects[*i].e.commit_sequence)
                .collect();
            seqs.sort_unstable();
            seqs.dedup();
            self.sequences.insert(c.clone(), seqs);
        }
        for (i, r) in self.reviews.iter().enumerate() {
            self.reviews_by_source.entry(r.source).or_default().push(i);
        }
        let mut by_id: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, r) in self.recs.iter().enumerate() {
            if let (true, Some(intent)) = (r.in_scope, r.intent()) {
                by_id.entry(intent.intent_id.clone()).or_default().push(i);
                self.contacts.insert(intent.contact_id.clone());
            }
        }
        self.contacts
            .extend(self.effects_by_contact.keys().cloned());
        for c in &self.o.contacts {
            for wi in &c.waiting {
                if wi.intent_id.starts_with(prefix) {
                    self.waiting.push((c.contact_id.as_str(), wi));
                    self.waiting_by_id
                        .entry(wi.intent_id.as_str())
                        .or_default()
                        .push(wi);
                }
            }
        }
        for w in &self.o.wait_starts {
            self.wait_starts
                .entry((w.source, w.intent_id.as_str()))
                .or_default()
                .push(w.at_ms);
        }
        for r in &self.o.resubmissions {
            if r.intent_id.starts_with(prefix) {
                *self.resubmissions.entry(r.intent_id.as_str()).or_default() += 1;
            }
        }
        for (id, records) in by_id {
            let original = self.original_content(&id, &records);
            let first = records
                .iter()
                .copied()
                .find(|i| self.recs[*i].fingerprint() == Some(original))
                .unwrap_or(records[0]);
            self.ids.insert(
                id,
                Id {
                    records,
                    original,
                    first,
                },
            );
        }
        let mut resolutions: HashMap<String, Vec<Resolution>> = HashMap::new();
        for e in &self.effects {
            resolutions
                .entry(e.e.contact_id.clone())
                .or_default()
                .push(Resolution {
                    from: e.e.commit_sequence,
                    to: e.e.commit_sequence,
                    at_ms: e.e.committed_at_ms,
                    batch_ms: self.times.effect(&e.e).unwrap_or(i64::MIN),
                });
        }
        for r in &self.reviews {
            // R6: a version conflict resolves its slot.
            if r.why == Why::VersionConflict && r.r.received_sequence > 0 {
                resolutions
                    .entry(self.review_contact(r).to_string())
                    .or_default()
                    .push(Resolution {
                        from: r.r.received_sequence,
                        to: r.r.received_sequence,
                        at_ms: r.r.reviewed_at_ms,
                        batch_ms: self.review_batch(r).unwrap_or(i64::MIN),
                    });
            }
        }
        for s in &self.o.skips {
            if self.contacts.contains(&s.contact_id) {
                resolutions
                    .entry(s.contact_id.clone())
                    .or_default()
                    .push(Resolution {
                        from: s.from,
                        to: s.to,
                        at_ms: s.at_ms,
                        batch_ms: s.at_ms,
                    });
            }
        }
        self.resolutions = resolutions;
        self.owners = self.slot_owners();
        self.index_holds();
    }

    /// R7's facts on the audit's clock: the reviews that put a contact on hold, and the
    /// operator releases.
    fn index_holds(&mut self) {
        let mut holds: HashMap<String, Vec<(i64, usize)>> = HashMap::new();
        for (i, r) in self.reviews.iter().enumerate() {
            let puts_on_hold = match r.why {
                Why::WaitTimeout => self.o.settings.on_timeout == TimeoutPolicy::Hold,
                Why::BacklogOverflow => true,
                _ => false,
            };
            if let (true, Some(at)) = (puts_on_hold, self.review_batch(r)) {
                holds
                    .entry(self.review_contact(r).to_string())
                    .or_default()
                    .push((at, i));
            }
        }
        for h in holds.values_mut() {
            h.sort_unstable();
        }
        let mut releases: HashMap<&'a str, Vec<i64>> = HashMap::new();
        for l in &self.o.releases {
            releases
                .entry(l.contact_id.as_str())
                .or_default()
                .push(l.at_ms);
        }
        for l in releases.values_mut() {
            l.sort_unstable();
        }
        self.holds = holds;
        self.releases = releases;
    }

    /// The batch time of a review's audit row.
    fn review_batch(&self, r: &Rev) -> Option<i64> {
        self.times.review(self.recs[r.source].pos, &r.r.intent_id)
    }

    /// When a reviewed record last started waiting before its review, on batch times: its
    /// latest audited wait start at or before the review's batch (a re-submitted intent waits
    /// afresh).
    fn wait_started(&self, r: &Rev) -> Option<i64> {
        let batch = self.review_batch(r)?;
        let pos = self.recs[r.source].pos;
        self.wait_starts
            .get(&(pos, r.r.intent_id.as_str()))?
            .iter()
            .copied()
            .filter(|at| *at <= batch)
            .max()
    }

    /// The latest hold of `contact` in a batch before `at` (or in `at`'s own, when
    /// `same_batch`): its batch time and review.
    fn hold_before(&self, contact: &str, at: i64, same_batch: bool) -> Option<(i64, usize)> {
        let holds = self.holds.get(contact)?;
        let n = holds.partition_point(|(h, _)| *h < at || same_batch && *h == at);
        holds[..n].last().copied()
    }

    /// Whether an operator released `contact` in the batch of `held` or a later one, and
    /// before `at` (or in `at`'s own batch, when `same_batch`).
    fn released_between(&self, contact: &str, held: i64, at: i64, same_batch: bool) -> bool {
        let Some(list) = self.releases.get(contact) else {
            return false;
        };
        list.get(list.partition_point(|l| *l < held))
            .is_some_and(|l| *l < at || same_batch && *l == at)
    }

    fn slot_owners(&self) -> HashMap<(String, u64), BTreeSet<String>> {
        let mut owners: HashMap<(String, u64), BTreeSet<String>> = HashMap::new();
        let mut own = |contact: &str, seq: u64, id: &str| {
            if seq > 0 {
                owners
                    .entry((contact.to_string(), seq))
                    .or_default()
                    .insert(id.to_string());
            }
        };
        for e in &self.effects {
            own(&e.e.contact_id, e.e.commit_sequence, &e.e.intent_id);
        }
        for info in self.ids.values() {
            for i in &info.records {
                if let Some(x) = self.recs[*i].intent() {
                    own(&x.contact_id, x.causal_sequence, &x.intent_id);
                }
            }
        }
        for (c, wi) in &self.waiting {
            own(c, wi.commit_sequence, &wi.intent_id);
        }
        for r in &self.reviews {
            if r.why.keeps_slot() {
                own(
                    self.review_contact(r),
                    r.r.received_sequence,
                    &r.r.intent_id,
                );
            }
        }
        owners
    }

    /// The fingerprint of an id's original content: its first record's. When its records
    /// span input partitions whose first records differ (any of them may have been consumed
    /// first), the one content that got an outcome, else the earliest produced.
    fn original_content(&self, id: &str, records: &[usize]) -> u64 {
        let mut firsts: Vec<usize> = Vec::new();
        for i in records {
            if !firsts
                .iter()
                .any(|f| self.recs[*f].pos.0 == self.recs[*i].pos.0)
            {
                firsts.push(*i);
            }
        }
        let mut candidates: Vec<u64> = firsts
            .iter()
            .filter_map(|i| self.recs[*i].fingerprint())
            .collect();
        candidates.sort_unstable();
        candidates.dedup();
        if let [only] = candidates[..] {
            return only;
        }
        let with_outcome: Vec<u64> = candidates
            .iter()
            .copied()
            .filter(|fp| self.has_outcome(id, records, *fp))
            .collect();
        if let [only] = with_outcome[..] {
            return only;
        }
        let earliest = firsts
            .iter()
            .min_by_key(|i| (self.recs[**i].timestamp_ms, self.recs[**i].pos))
            .copied()
            .unwrap_or(records[0]);
        self.recs[earliest].fingerprint().unwrap_or_default()
    }

    /// Whether the content `fp` of intent `id` has an outcome: an effect with that content, a
    /// decision about one of its records, or a place in a waiting list.
    fn has_outcome(&self, id: &str, records: &[usize], fp: u64) -> bool {
        let with_fp = || {
            records
                .iter()
                .filter(move |i| self.recs[**i].fingerprint() == Some(fp))
        };
        let effect = self.effects_by_id.get(id).is_some_and(|list| {
            list.iter().any(|e| {
                with_fp().any(|i| {
                    self.recs[*i].intent().is_some_and(|intent| {
                        differing_field(&self.effects[*e].e, intent).is_none()
                    })
                })
            })
        });
        let decided = with_fp().any(|i| {
            self.reviews_by_source
                .get(i)
                .is_some_and(|l| l.iter().any(|r| self.reviews[*r].why.decides_intent()))
        });
        effect || decided || self.waits_with(id, fp)
    }

    /// The contact a review is about: its record's, else the one it names.
    fn review_contact<'r>(&'r self, r: &'r Rev) -> &'r str {
        self.recs[r.source]
            .intent()
            .map_or(r.r.contact_id.as_str(), |i| i.contact_id.as_str())
    }

    fn resolutions_of(&self, contact: &str) -> &[Resolution] {
        self.resolutions.get(contact).map_or(&[], Vec::as_slice)
    }

    /// A note for an example about a record the processor group has not consumed yet.
    fn behind(&self, (partition, offset): Position) -> String {
        let at = self.o.committed.get(&partition).map_or(-1, |c| c.offset);
        if offset < at {
            String::new()
        } else if at < 0 {
            "; the processor group has committed nothing on this partition".to_string()
        } else {
            format!("; the processor group has committed only up to offset {at}: not consumed yet")
        }
    }

    fn count_what_was_read(&self, f: &mut Findings) {
        let r = &mut f.report;
        r.records = self.recs.iter().filter(|r| r.in_scope).count();
        r.invalid_records = self
            .recs
            .iter()
            .filter(|r| r.in_scope && r.valid.is_none())
            .count();
        r.intents = self.ids.len();
        r.committed = self.effects.len();
        for rev in &self.reviews {
            *r.manual_review.entry(rev.name.clone()).or_default() += 1;
        }
        r.blocked = self.reviews.iter().filter(|r| r.why.is_conflict()).count();
        r.waiting = self.waiting.len();
        r.held_contacts = self
            .o
            .contacts
            .iter()
            .filter(|c| c.on_hold && self.contacts.contains(&c.contact_id))
            .count();
    }

    /// R1: one side-effects partition per contact, strictly increasing sequences in it.
    fn check_effect_order(&self, f: &mut Findings) {
        for (contact, list) in &self.effects_by_contact {
            let mut per_partition: BTreeMap<i32, usize> = BTreeMap::new();
            for i in list {
                *per_partition.entry(self.effects[*i].pos.0).or_default() += 1;
            }
            // The partition holding most of the contact's effects (ties: the lowest).
            let main = per_partition
                .iter()
                .max_by_key(|(p, n)| (**n, std::cmp::Reverse(**p)))
                .map_or(0, |(p, _)| *p);
            let mut highest = 0;
            for i in list {
                let e = &self.effects[*i];
                let seq = e.e.commit_sequence;
                if e.pos.0 != main {
                    f.add(Kind::Reorder, 1, || {
                        format!(
                            "contact {contact}: sequence {seq} on side-effects partition {}, its other effects on partition {main}: no single order",
                            e.pos.0
                        )
                    });
                    continue;
                }
                if seq < highest {
                    f.add(Kind::Reorder, 1, || {
                        format!("contact {contact}: sequence {seq} after {highest}")
                    });
                }
                highest = highest.max(seq);
            }
        }
    }

    /// R1/R5: no two effects for one intent id, nor for one (contact, sequence).
    fn check_duplicates(&self, f: &mut Findings) {
        let mut ids: Vec<(&String, usize)> = self
            .effects_by_id
            .iter()
            .filter(|(_, l)| l.len() > 1)
            .map(|(id, l)| (id, l.len()))
            .collect();
        ids.sort_unstable();
        for (id, n) in ids {
            f.add(Kind::Duplicate, 1, || format!("intent {id}: {n} effects"));
        }
        for (contact, list) in &self.effects_by_contact {
            let mut per_seq: BTreeMap<u64, BTreeSet<&str>> = BTreeMap::new();
            for i in list {
                let e = &self.effects[*i].e;
                per_seq
                    .entry(e.commit_sequence)
                    .or_default()
                    .insert(e.intent_id.as_str());
            }
            for (seq, intents) in per_seq {
                if intents.len() > 1 {
                    f.add(Kind::Duplicate, 1, || {
                        format!(
                            "contact {contact}: sequence {seq} committed by {} intents ({})",
                            intents.len(),
                            intents.into_iter().collect::<Vec<_>>().join(", ")
                        )
                    });
                }
            }
        }
    }

    /// Each effect against its intent: it exists (no phantom), carries its content (§3),
    /// its sequence (R2) and its contact's version after it (§3).
    fn check_effects_against_intents(&self, f: &mut Findings) {
        for eff in &self.effects {
            let e = &eff.e;
            let seq = e.commit_sequence;
            let Some(id) = self.ids.get(&e.intent_id) else {
                f.add(Kind::EffectWithoutIntent, 1, || {
                    format!(
                        "intent {}: effect (contact {}, sequence {seq}) for an intent never consumed",
                        e.intent_id, e.contact_id
                    )
                });
                continue;
            };
            let originals = id
                .records
                .iter()
                .filter(|i| self.recs[**i].fingerprint() == Some(id.original))
                .filter_map(|i| self.recs[*i].intent());
            if originals.clone().all(|i| differing_field(e, i).is_some()) {
                let first = self.recs[id.first].intent();
                let field = first
                    .and_then(|i| differing_field(e, i))
                    .unwrap_or("content");
                f.add(Kind::ContentMismatch, 1, || {
                    format!(
                        "intent {}: effect {}/{} differs from the intent in {field}",
                        e.intent_id, eff.pos.0, eff.pos.1
                    )
                });
            }
            if let Some(intent) = self.recs[id.first].intent() {
                let strict = intent.causal_sequence > 0;
                if strict && (seq != intent.causal_sequence || !e.sequence_from_producer) {
                    f.add(Kind::SequenceMismatch, 1, || {
                        format!(
                            "intent {}: causal_sequence {}, committed as sequence {seq} (sequence_from_producer {})",
                            e.intent_id, intent.causal_sequence, e.sequence_from_producer
                        )
                    });
                } else if !strict && e.sequence_from_producer {
                    f.add(Kind::SequenceMismatch, 1, || {
                        format!(
                            "intent {}: no causal_sequence, yet its effect says the producer gave sequence {seq}",
                            e.intent_id
                        )
                    });
                }
                // R6: it commits only if the contact's committed version is the one it expects,
                // so its effect is that version's successor.
                let expected = intent.expected_version;
                if expected > 0 && e.contact_version != expected.saturating_add(1) {
                    f.add(Kind::VersionGuard, 1, || {
                        format!(
                            "intent {}: expected_version {expected}, yet committed as sequence {seq} on the contact's version {} (its effect says version {} after it)",
                            e.intent_id,
                            e.contact_version.saturating_sub(1),
                            e.contact_version
                        )
                    });
                }
            }
            let seqs = self
                .sequences
                .get(&e.contact_id)
                .map_or(&[][..], Vec::as_slice);
            let version = seqs.partition_point(|s| *s <= seq) as u64;
            if e.contact_version != version {
                f.add(Kind::VersionMismatch, 1, || {
                    format!(
                        "intent {}: contact {} version {} after sequence {seq}, which is its effect number {version}",
                        e.intent_id, e.contact_id, e.contact_version
                    )
                });
            }
        }
    }

    /// R2: an assigned intent is numbered when the processor first sees it, in partition
    /// order. Where the producer sent an intent to several partitions, it was first seen on
    /// one of them, so its number must keep the order of at least one; a forwarded copy is
    /// the processor's transport, not a place it was sent to. (Re-submitted intents reclaim
    /// their old slot and are left out.)
    fn check_assigned_order(&self, f: &mut Findings) {
        // (input offset, commit sequence, intent id) of an assigned intent where it was sent.
        type Assigned<'s> = (i64, u64, &'s str);
        let mut lanes: BTreeMap<(&str, i32), Vec<Assigned<'_>>> = BTreeMap::new();
        let mut sent_to: HashMap<&str, usize> = HashMap::new();
        for (id, info) in &self.ids {
            let rec = &self.recs[info.first];
            let (Some(intent), Some(effects)) = (rec.intent(), self.effects_by_id.get(id)) else {
                continue;
            };
            if intent.causal_sequence > 0 || self.resubmissions.contains_key(id.as_str()) {
                continue;
            }
            let seq = self.effects[effects[0]].e.commit_sequence;
            let mut partitions = BTreeSet::new();
            for &i in &info.records {
                let r = &self.recs[i];
                // In (partition, offset) order: the first record on each partition.
                if !r.copy && r.fingerprint() == Some(info.original) && partitions.insert(r.pos.0) {
                    lanes
                        .entry((intent.contact_id.as_str(), r.pos.0))
                        .or_default()
                        .push((r.pos.1, seq, id.as_str()));
                }
            }
            sent_to.insert(id.as_str(), partitions.len());
        }
        // Per intent, the partitions whose order its number breaks, and the first one's text.
        let mut broken: BTreeMap<&str, (usize, String)> = BTreeMap::new();
        for ((contact, partition), mut list) in lanes {
            list.sort_unstable();
            let mut before: Option<Assigned<'_>> = None;
            for (offset, seq, id) in list {
                if let Some((o, s, other)) = before.filter(|b| b.1 > seq) {
                    broken
                        .entry(id)
                        .or_insert_with(|| {
                            (0, format!(
                                "contact {contact}: intent {id} (intents {partition}/{offset}) committed as sequence {seq}, below sequence {s} of intent {other} read before it at {partition}/{o}"
                            ))
                        })
                        .0 += 1;
                } else {
                    before = Some((offset, seq, id));
                }
            }
        }
        for (id, (partitions, text)) in broken {
            if partitions == sent_to[id] {
                f.add(Kind::AssignedOrder, 1, || text);
            }
        }
    }

    /// R3: every sequence up to a contact's highest effect is resolved by an effect, a
    /// version-conflict block or an audited skip. Manual-reviewed slots above it are
    /// unresolved (pending, not a violation).
    fn check_gaps_and_slots(&self, f: &mut Findings) {
        let mut reviewed: HashMap<&str, BTreeMap<u64, &str>> = HashMap::new();
        for r in &self.reviews {
            if r.why.keeps_slot() && r.r.received_sequence > 0 {
                reviewed
                    .entry(self.review_contact(r))
                    .or_default()
                    .insert(r.r.received_sequence, r.name.as_str());
            }
        }
        let mut waiting: HashMap<&str, BTreeSet<u64>> = HashMap::new();
        for (c, wi) in &self.waiting {
            waiting.entry(c).or_default().insert(wi.commit_sequence);
        }
        for contact in &self.contacts {
            let highest = self
                .sequences
                .get(contact)
                .and_then(|s| s.last().copied())
                .unwrap_or(0);
            let merged = merge(
                self.resolutions_of(contact)
                    .iter()
                    .map(|r| (r.from, r.to))
                    .collect(),
            );
            let slots = reviewed.get(contact.as_str());
            for (from, to) in uncovered(&merged, highest) {
                let missing = usize::try_from(to - from + 1).unwrap_or(usize::MAX);
                f.add(Kind::Gap, missing, || {
                    let what = if from == to {
                        format!("sequence {from} is")
                    } else {
                        format!("sequences {from}..={to} are")
                    };
                    let mut why = String::new();
                    if let Some((s, reason)) = slots.and_then(|m| m.range(from..=to).next()) {
                        why = format!("; sequence {s} went to manual review ({reason}) and was never resolved");
                    } else if let Some(s) = waiting
                        .get(contact.as_str())
                        .and_then(|w| w.range(from..=to).next())
                    {
                        why = format!("; sequence {s} is still waiting");
                    }
                    format!(
                        "contact {contact}: {what} unresolved (no effect, version-conflict block or audited skip) below its effect {highest}{why}"
                    )
                });
            }
            if let Some(slots) = slots {
                f.report.unresolved_slots += slots
                    .range(highest.saturating_add(1)..)
                    .filter(|(s, _)| !covered(&merged, **s))
                    .count();
            }
        }
    }

    /// R8: every valid intent id has an outcome for its original content; every record that
    /// reuses the id with other content has its own `IDEMPOTENCY_CONFLICT` review (R5); every
    /// invalid record has its `INVALID_INTENT` review (§5). `UNPROCESSABLE` (§5) is an
    /// outcome for any record.
    fn check_lost(&self, f: &mut Findings) {
        let reviewed_as = |i: usize, ok: &dyn Fn(Why) -> bool| {
            self.reviews_by_source
                .get(&i)
                .is_some_and(|l| l.iter().any(|r| ok(self.reviews[*r].why)))
        };
        for (id, info) in &self.ids {
            let originals = || {
                info.records
                    .iter()
                    .copied()
                    .filter(|i| self.recs[*i].fingerprint() == Some(info.original))
            };
            let has_outcome = self.effects_by_id.contains_key(id)
                || originals().any(|i| reviewed_as(i, &|w| w.decides_intent()))
                || self.waits_with(id, info.original);
            if !has_outcome {
                let pos = self.recs[info.first].pos;
                f.add(Kind::Lost, 1, || {
                    format!(
                        "intent {id} (intents {}/{}): no outcome{}",
                        pos.0,
                        pos.1,
                        self.behind(pos)
                    )
                });
            }
            for i in info.records.iter().copied() {
                if self.recs[i].fingerprint() == Some(info.original)
                    || reviewed_as(i, &|w| {
                        matches!(w, Why::IdempotencyConflict | Why::Unprocessable)
                    })
                {
                    continue;
                }
                let pos = self.recs[i].pos;
                f.add(Kind::Lost, 1, || {
                    format!(
                        "intent {id} (intents {}/{}): reuses the id with other content and has no IDEMPOTENCY_CONFLICT review{}",
                        pos.0,
                        pos.1,
                        self.behind(pos)
                    )
                });
            }
        }
        for (i, r) in self.recs.iter().enumerate() {
            if !r.in_scope
                || r.valid.is_some()
                || reviewed_as(i, &|w| matches!(w, Why::InvalidIntent | Why::Unprocessable))
            {
                continue;
            }
            f.add(Kind::Lost, 1, || {
                format!(
                    "invalid record intents {}/{} (key {:?}, {}): no INVALID_INTENT review{}",
                    r.pos.0,
                    r.pos.1,
                    r.key_text(),
                    r.invalid,
                    self.behind(r.pos)
                )
            });
        }
    }

    /// Manual-review records: at most one per input record (R8), plus one for each operator
    /// re-submission of its intent (R9: a re-submitted intent may wait again and time out
    /// again), carrying the original record (§3), and each for a reason that holds in what was
    /// observed.
    fn check_reviews(&self, f: &mut Findings) {
        for (source, list) in &self.reviews_by_source {
            if list.len() > 1 + self.resubmissions_of(*source) {
                let pos = self.recs[*source].pos;
                let names: Vec<&str> = list
                    .iter()
                    .map(|r| self.reviews[*r].name.as_str())
                    .collect();
                f.add(Kind::DuplicateReview, 1, || {
                    format!(
                        "intents {}/{}: {} manual-review records ({})",
                        pos.0,
                        pos.1,
                        list.len(),
                        names.join(", ")
                    )
                });
            }
        }
        let groups = self.review_groups();
        for r in &self.reviews {
            let rec = &self.recs[r.source];
            let carried = carries(&r.r, rec.key.as_deref(), rec.value.as_deref());
            let names_it = rec
                .intent()
                .is_none_or(|i| r.r.intent_id == i.intent_id && r.r.contact_id == i.contact_id);
            if !(carried && names_it) {
                let what = if carried {
                    "names another intent"
                } else {
                    "does not carry the original record"
                };
                f.add(Kind::ContentMismatch, 1, || {
                    format!(
                        "manual-review {}/{} ({}) of intents {}/{}: {what}",
                        r.pos.0, r.pos.1, r.name, rec.pos.0, rec.pos.1
                    )
                });
            }
            if let Err(why) = self.justify(r, &groups) {
                f.add(Kind::ManualReviewUnjustified, 1, || {
                    format!(
                        "manual-review {}/{} {} of intents {}/{}: {why}",
                        r.pos.0, r.pos.1, r.name, rec.pos.0, rec.pos.1
                    )
                });
            }
        }
    }

    /// Reviews decided together: one contact's timeout or overflow evicts its waiting intents
    /// in one batch, which gives them one `reviewed_at_ms`.
    fn review_groups(&self) -> Groups {
        let mut g = Groups::default();
        for r in &self.reviews {
            let contact = self.review_contact(r).to_string();
            let at = r.r.reviewed_at_ms;
            match r.why {
                Why::WaitTimeout => {
                    let produced = self.recs[r.source].timestamp_ms.unwrap_or(i64::MAX);
                    let started = self.wait_started(r).unwrap_or(i64::MAX);
                    let e = g
                        .timeouts
                        .entry((contact.clone(), at, r.r.expected_sequence))
                        .or_insert((i64::MAX, i64::MAX));
                    *e = (e.0.min(started), e.1.min(produced));
                }
                Why::BacklogOverflow => {
                    let e = g
                        .overflows
                        .entry((contact.clone(), at))
                        .or_insert((0, u64::MAX));
                    e.0 += 1;
                    if r.r.received_sequence > 0 {
                        e.1 = e.1.min(r.r.received_sequence);
                    }
                }
                _ => {}
            }
        }
        g
    }

    /// Whether a review's stated reason holds in what was observed, and if not, why.
    fn justify(&self, r: &Rev, g: &Groups) -> Result<(), String> {
        let rec = &self.recs[r.source];
        let at = r.r.reviewed_at_ms;
        let Some(intent) = rec.intent() else {
            return match r.why {
                Why::InvalidIntent | Why::Unprocessable | Why::Unknown => self.justify_any(r),
                _ => Err("the record is not a valid intent".into()),
            };
        };
        let contact = intent.contact_id.as_str();
        let resolutions = self.resolutions_of(contact);
        let s = &self.o.settings;
        // Whether a resolution came before the review (or by its batch's end): on batch times,
        // the audit's one clock (a contact's batches follow one another at its owner, whatever
        // the instances' clocks); on the processor's times only for a review without its
        // audit row (an `audit_mismatches` finding already).
        let batch = self.review_batch(r);
        let before = |x: &Resolution| batch.map_or(x.at_ms < at, |b| x.batch_ms < b);
        let by = |x: &Resolution| batch.map_or(x.at_ms <= at, |b| x.batch_ms <= b);
        let covers = |x: &Resolution, seq: u64| x.from <= seq && seq <= x.to;
        match r.why {
            Why::InvalidIntent => Err(format!("intent {} is valid", intent.intent_id)),
            Why::IdempotencyConflict => {
                let original = self.ids.get(&intent.intent_id).map(|i| i.original);
                if original == rec.fingerprint() {
                    Err(format!(
                        "no record of intent {} has other content before it",
                        intent.intent_id
                    ))
                } else {
                    Ok(())
                }
            }
            Why::WaitTimeout => {
                let missing = r.r.expected_sequence;
                let slot = r.r.received_sequence;
                if s.on_timeout != TimeoutPolicy::Hold {
                    return Err("the timeout policy is skip".into());
                }
                if missing == 0 || missing >= slot {
                    return Err(format!(
                        "missing sequence {missing} is not below its slot {slot}"
                    ));
                }
                if resolutions.iter().any(|x| covers(x, missing) && before(x)) {
                    return Err(format!("sequence {missing} was resolved before the review"));
                }
                // Resolved in the review's own batch: before the timeout it was not missing,
                // after it the contact was held (its predecessor is CONTACT_ON_HOLD then),
                // unless an operator released the contact in that batch too.
                if let Some(batch) = batch {
                    let same_batch = resolutions
                        .iter()
                        .any(|x| covers(x, missing) && x.batch_ms == batch);
                    if same_batch && !self.released_between(contact, batch, batch, true) {
                        return Err(format!(
                            "sequence {missing} was resolved in the review's own batch, which released nothing"
                        ));
                    }
                }
                let (started, produced) = g
                    .timeouts
                    .get(&(contact.to_string(), at, missing))
                    .copied()
                    .unwrap_or((i64::MAX, i64::MAX));
                let timeout = s.wait_timeout_ms.min(i64::MAX as u64) as i64;
                // How long the oldest intent of this timeout had waited, by each clock the
                // verifier can read: batch times (the audit's clock) from its audited wait
                // start, less what a batch takes from its clock reading to its write; and its
                // record's timestamp (the producer's clock) to the processor's review time.
                // One clock that shows more than wait_timeout is enough: neither producers'
                // nor instances' clocks are trusted to condemn alone.
                let by_batches = batch
                    .filter(|_| started != i64::MAX)
                    .map(|b| b.saturating_sub(started));
                let by_timestamp = (produced != i64::MAX).then(|| at.saturating_sub(produced));
                let long_enough = by_batches
                    .is_some_and(|w| w.saturating_add(WAIT_START_SLACK_MS) > timeout)
                    || by_timestamp.is_some_and(|w| w > timeout);
                if !long_enough && (by_batches.is_some() || by_timestamp.is_some()) {
                    let mut clocks = Vec::new();
                    if let Some(w) = by_batches {
                        clocks.push(format!(
                            "started waiting {w} ms before it (batch times, {WAIT_START_SLACK_MS} ms allowed for its batch's write)"
                        ));
                    }
                    if let Some(w) = by_timestamp {
                        clocks.push(format!("was produced {w} ms before it"));
                    }
                    return Err(format!(
                        "the contact's oldest intent in this timeout {}: not more than wait_timeout ({} ms)",
                        clocks.join(" and "),
                        s.wait_timeout_ms
                    ));
                }
                Ok(())
            }
            Why::ContactOnHold => {
                // Batch times (the audit's clock, the one releases have). A review without
                // its audit row is an audit mismatch already.
                let Some(at) = self.review_batch(r) else {
                    return Ok(());
                };
                let Some((held, _)) = self.hold_before(contact, at, true) else {
                    return Err(format!("contact {contact} was never put on hold before it"));
                };
                if self.released_between(contact, held, at, false) {
                    Err(format!(
                        "contact {contact} was released after its hold and before the review"
                    ))
                } else {
                    Ok(())
                }
            }
            Why::VersionConflict => {
                let expected = intent.expected_version;
                let slot = r.r.received_sequence;
                let below =
                    self.sequences
                        .get(contact)
                        .map_or(0, |s| s.partition_point(|x| *x < slot)) as u64;
                if expected == 0 {
                    Err("the intent has no expected_version".into())
                } else if slot == 0 {
                    Err("the review names no slot".into())
                } else if expected == below {
                    Err(format!(
                        "expected_version {expected} equals the contact's {below} effects below slot {slot}"
                    ))
                } else {
                    Ok(())
                }
            }
            Why::SequenceConflict => {
                let claimed = if r.r.received_sequence > 0 {
                    r.r.received_sequence
                } else {
                    intent.causal_sequence
                };
                let owned = || self.slot_owned_by_other(contact, claimed, &intent.intent_id);
                if claimed == 0 {
                    Err("the intent claims no sequence".into())
                } else if resolutions.iter().any(|x| covers(x, claimed) && by(x)) || owned() {
                    Ok(())
                } else {
                    Err(format!(
                        "sequence {claimed} was neither resolved nor claimed by another intent"
                    ))
                }
            }
            Why::BacklogOverflow => {
                let (count, lowest) = g
                    .overflows
                    .get(&(contact.to_string(), at))
                    .copied()
                    .unwrap_or((1, u64::MAX));
                if count < s.max_pending_per_contact.saturating_add(1) {
                    return Err(format!(
                        "{count} intents overflowed together, not max_pending_per_contact ({}) waiting plus one",
                        s.max_pending_per_contact
                    ));
                }
                if lowest == u64::MAX {
                    return Ok(());
                }
                if prefix_resolved(resolutions, lowest - 1, before) {
                    return Err(format!(
                        "every sequence below {lowest} was resolved: the contact had no gap"
                    ));
                }
                // Resolved by the end of the overflow's own batch: before the overflow the
                // contact had no gap, after it the contact was held, unless an operator
                // released it in that batch too.
                if let Some(batch) = batch {
                    if prefix_resolved(resolutions, lowest - 1, |x| x.batch_ms <= batch)
                        && !self.released_between(contact, batch, batch, true)
                    {
                        return Err(format!(
                            "every sequence below {lowest} was resolved by the end of the overflow's own batch, which released nothing"
                        ));
                    }
                }
                Ok(())
            }
            Why::Unprocessable | Why::Unknown => self.justify_any(r),
        }
    }

    /// `UNPROCESSABLE` must say what failed; an unknown reason cannot be justified.
    fn justify_any(&self, r: &Rev) -> Result<(), String> {
        match r.why {
            Why::InvalidIntent => Ok(()),
            Why::Unprocessable if !r.r.detail.trim().is_empty() => Ok(()),
            Why::Unprocessable => Err("no error in its detail".into()),
            _ => Err(format!("reason {} is unknown to the verifier", r.name)),
        }
    }

    /// Whether another intent of the contact holds `seq`.
    fn slot_owned_by_other(&self, contact: &str, seq: u64, intent_id: &str) -> bool {
        self.owners
            .get(&(contact.to_string(), seq))
            .is_some_and(|ids| ids.iter().any(|id| id != intent_id))
    }

    /// Whether intent `id` waits in a record with content `fp` (or one not read).
    fn waits_with(&self, id: &str, fp: u64) -> bool {
        self.waiting_by_id.get(id).is_some_and(|list| {
            list.iter().any(|wi| {
                self.by_pos
                    .get(&wi.source)
                    .is_none_or(|i| self.recs[*i].fingerprint() == Some(fp))
            })
        })
    }

    /// How many operator re-submissions the intent of the record at index `source` had (0 for
    /// a record that is not a valid intent).
    fn resubmissions_of(&self, source: usize) -> usize {
        self.recs[source].intent().map_or(0, |i| {
            self.resubmissions
                .get(i.intent_id.as_str())
                .copied()
                .unwrap_or(0)
        })
    }

    /// R5/R9: an intent id has one outcome (an effect, a decision, a place in a waiting list),
    /// plus one more for each operator re-submission.
    fn check_reopened(&self, f: &mut Findings) {
        for (id, info) in &self.ids {
            let effects = usize::from(self.effects_by_id.contains_key(id));
            let decisions = info
                .records
                .iter()
                .filter(|i| self.recs[**i].fingerprint() == Some(info.original))
                .flat_map(|i| self.reviews_by_source.get(i).into_iter().flatten())
                .filter(|r| self.reviews[**r].why.decides_intent())
                .count();
            let waits = self.waiting_by_id.get(id.as_str()).map_or(0, Vec::len);
            let resubmitted = self.resubmissions.get(id.as_str()).copied().unwrap_or(0);
            let outcomes = effects + decisions + waits;
            if outcomes > 1 + resubmitted {
                f.add(Kind::ReopenedWithoutOperator, 1, || {
                    format!(
                        "intent {id}: {outcomes} outcomes ({effects} effect, {decisions} manual-review decisions, {waits} waiting) with {resubmitted} operator re-submissions"
                    )
                });
            }
        }
    }

    /// R9: every release and re-submission the processor applied answers its own operator's
    /// request, recorded by the admin audit and applied in the same batch (one request, one
    /// reopening).
    fn check_requested(&self, f: &mut Findings) {
        let mut open: HashMap<(String, RequestedAction, BatchRef), usize> = HashMap::new();
        for q in &self.o.requests {
            if let (Some(batch), true) = (q.applied, q.audited) {
                *open
                    .entry((q.contact_id.clone(), q.action.clone(), batch))
                    .or_default() += 1;
            }
        }
        let mut answer = |contact: &str, action: RequestedAction, batch: BatchRef| {
            let key = (contact.to_string(), action, batch);
            match open.get_mut(&key) {
                Some(n) if *n > 0 => *n -= 1,
                _ => f.add(Kind::ReopenedWithoutOperator, 1, || {
                    let (contact, action, batch) = &key;
                    format!(
                        "contact {contact}: {action} applied in batch {} of partition {} with no operator request for it (admin API or CLI, audited) applied there",
                        batch.1, batch.0
                    )
                }),
            }
        };
        for l in &self.o.releases {
            if self.contacts.contains(&l.contact_id) {
                let action = l
                    .skip_to
                    .map_or(RequestedAction::Resume, RequestedAction::SkipTo);
                answer(&l.contact_id, action, l.batch);
            }
        }
        for r in &self.o.resubmissions {
            if r.intent_id.starts_with(self.options.prefix.as_str()) {
                let action = RequestedAction::Resubmit(r.intent_id.clone());
                answer(&r.contact_id, action, r.batch);
            }
        }
    }

    /// R7: a timeout skip only under the `skip` policy, an operator skip only with the
    /// operator's release that asked for it.
    fn check_skips(&self, f: &mut Findings) {
        for s in &self.o.skips {
            if !self.contacts.contains(&s.contact_id) {
                continue;
            }
            let why = match s.cause {
                SkipCause::WaitTimeout if self.o.settings.on_timeout != TimeoutPolicy::Skip => {
                    "by the wait timeout, but the timeout policy is hold"
                }
                SkipCause::Operator
                    if !self.o.releases.iter().any(|l| {
                        l.contact_id == s.contact_id && l.skip_to == Some(s.to.saturating_add(1))
                    }) =>
                {
                    "for an operator, but no release asked to skip to the next one"
                }
                _ => continue,
            };
            f.add(Kind::SkipUnjustified, 1, || {
                format!(
                    "contact {}: sequences {}..={} skipped {why}",
                    s.contact_id, s.from, s.to
                )
            });
        }
    }

    /// R3: a sequence commits only once every sequence below it is resolved (by an effect, a
    /// version-conflict block or an audited skip) in its own batch or an earlier one. Times are
    /// the audit rows' (one PostgreSQL clock, one time per batch). A resolution without its
    /// audit row counts from the start, and an effect without one is not judged: the missing
    /// row is an `audit_mismatches` finding. A sequence never resolved is a gap, not this.
    fn check_gate(&self, f: &mut Findings) {
        for (contact, list) in &self.effects_by_contact {
            let milestones = prefix_milestones(self.resolutions_of(contact));
            for eff in list {
                let e = &self.effects[*eff].e;
                let (below, Some(at)) = (e.commit_sequence.saturating_sub(1), self.times.effect(e))
                else {
                    continue;
                };
                let i = milestones.partition_point(|(_, prefix)| *prefix < below);
                let Some((resolved_at, _)) = milestones.get(i) else {
                    continue;
                };
                if *resolved_at > at {
                    let then = milestones[..milestones.partition_point(|(t, _)| *t <= at)]
                        .last()
                        .map_or(0, |(_, prefix)| *prefix);
                    f.add(Kind::CommittedBeforePredecessor, 1, || {
                        format!(
                            "contact {contact}: intent {} committed as sequence {} while sequence {} was unresolved (resolved {} ms later, in a later batch)",
                            e.intent_id,
                            e.commit_sequence,
                            then + 1,
                            resolved_at.saturating_sub(at)
                        )
                    });
                }
            }
        }
    }

    /// R7: a contact put on hold (by a wait timeout under the `hold` policy, or by a backlog
    /// overflow) commits nothing until an operator releases it. Times are the audit rows' (one
    /// PostgreSQL clock, one time per batch): an effect of the hold's own batch is not after
    /// the hold, and one of the release's batch is not before the release.
    fn check_holds(&self, f: &mut Findings) {
        for eff in &self.effects {
            let e = &eff.e;
            let contact = e.contact_id.as_str();
            let Some(at) = self.times.effect(e) else {
                continue;
            };
            let Some((held, review)) = self.hold_before(contact, at, false) else {
                continue;
            };
            if !self.released_between(contact, held, at, true) {
                let r = &self.reviews[review];
                let source = self.recs[r.source].pos;
                f.add(Kind::CommittedWhileHeld, 1, || {
                    format!(
                        "contact {contact}: intent {} committed as sequence {} in a batch after the contact's hold ({} of intents {}/{}) and before any operator release",
                        e.intent_id, e.commit_sequence, r.name, source.0, source.1
                    )
                });
            }
        }
    }

    /// R8: every output has one audit row of a committed batch, and every row of a batch
    /// committed before the outputs were read has its output.
    fn check_audit(&self, f: &mut Findings) {
        let prefix = self.options.prefix.as_str();
        let mut commits: BTreeMap<(&str, u64), (usize, bool)> = BTreeMap::new();
        let mut reviewed: BTreeMap<Position, (usize, bool)> = BTreeMap::new();
        for a in &self.o.audit {
            // A row's position holds its own record, unless the topic was deleted and created
            // again since (the operator's `recovery-point resume-at`): a row of the old log is
            // judged by its own intent id.
            let in_scope = match self.by_pos.get(&a.source).map(|i| &self.recs[*i]) {
                Some(rec) if rec.intent().is_none_or(|r| r.intent_id == a.intent_id) => {
                    rec.in_scope
                }
                _ => a.intent_id.starts_with(prefix),
            };
            if !in_scope {
                continue;
            }
            let e = match a.outcome {
                AuditOutcome::Committed => commits
                    .entry((a.intent_id.as_str(), a.commit_sequence))
                    .or_default(),
                AuditOutcome::Reviewed => reviewed.entry(a.source).or_default(),
            };
            e.0 += 1;
            e.1 |= a.before_outputs;
        }
        let mut effects: BTreeSet<(&str, u64)> = BTreeSet::new();
        for eff in &self.effects {
            effects.insert((eff.e.intent_id.as_str(), eff.e.commit_sequence));
        }
        for key in &effects {
            let rows = commits.get(key).map_or(0, |c| c.0);
            if rows != 1 {
                f.add(Kind::AuditMismatch, 1, || {
                    format!(
                        "intent {}: effect with sequence {} has {rows} committed_causal audit rows, not one",
                        key.0, key.1
                    )
                });
            }
        }
        for ((id, seq), (_, before)) in &commits {
            if *before && !effects.contains(&(*id, *seq)) {
                f.add(Kind::AuditMismatch, 1, || {
                    format!("intent {id}: audited as committed with sequence {seq}, but no such effect exists")
                });
            }
        }
        let mut sources: BTreeSet<Position> = BTreeSet::new();
        for (source, list) in &self.reviews_by_source {
            let pos = self.recs[*source].pos;
            sources.insert(pos);
            // An UNPROCESSABLE record is one whose durable write failed: it may have no row.
            let unprocessable = list
                .iter()
                .all(|r| self.reviews[*r].why == Why::Unprocessable);
            // One row per review a record may have (a re-submitted intent reviewed again has
            // two); reviews beyond those are duplicates, found with the reviews.
            let expected = list.len().min(1 + self.resubmissions_of(*source));
            let rows = reviewed.get(&pos).map_or(0, |c| c.0);
            if !(rows == expected || rows == 0 && unprocessable) {
                f.add(Kind::AuditMismatch, 1, || {
                    format!(
                        "intents {}/{}: {} manual-review records with {rows} blocked_conflict/manual_review audit rows, not {expected}",
                        pos.0,
                        pos.1,
                        list.len()
                    )
                });
            }
        }
        for (pos, (_, before)) in &reviewed {
            if *before && !sources.contains(pos) {
                f.add(Kind::AuditMismatch, 1, || {
                    format!(
                        "intents {}/{}: audited as blocked or manual review, but it has no manual-review record",
                        pos.0, pos.1
                    )
                });
            }
        }
    }
}

/// Reviews grouped by the decision that made them.
#[derive(Default)]
struct Groups {
    /// (contact, reviewed_at_ms, missing sequence) of a wait timeout -> when the intents it
    /// sent to review started waiting: the earliest batch time of their audited wait starts
    /// (`i64::MAX` when none has one), and the earliest of their records' timestamps.
    timeouts: HashMap<(String, i64, u64), (i64, i64)>,
    /// (contact, reviewed_at_ms) of an overflow -> (intents it sent to review, their lowest
    /// sequence).
    overflows: HashMap<(String, i64), (usize, u64)>,
}

/// When each outcome's batch was written, from its audit row (the earliest, if several).
struct AuditTimes<'a> {
    /// (input record, intent id) of a review row -> its time.
    reviewed: HashMap<(Position, &'a str), i64>,
    /// (intent id, sequence) of a commit row -> its time.
    committed: HashMap<(&'a str, u64), i64>,
}

impl<'a> AuditTimes<'a> {
    fn of(audit: &'a [AuditRecord]) -> Self {
        let mut t = AuditTimes {
            reviewed: HashMap::new(),
            committed: HashMap::new(),
        };
        for a in audit {
            let at = match a.outcome {
                AuditOutcome::Reviewed => t
                    .reviewed
                    .entry((a.source, a.intent_id.as_str()))
                    .or_insert(a.at_ms),
                AuditOutcome::Committed => t
                    .committed
                    .entry((a.intent_id.as_str(), a.commit_sequence))
                    .or_insert(a.at_ms),
            };
            *at = (*at).min(a.at_ms);
        }
        t
    }

    fn effect(&self, e: &SideEffect) -> Option<i64> {
        self.committed
            .get(&(e.intent_id.as_str(), e.commit_sequence))
            .copied()
    }

    fn review(&self, source: Position, intent_id: &str) -> Option<i64> {
        self.reviewed.get(&(source, intent_id)).copied()
    }
}

/// From a contact's resolutions, each batch time at which its resolved prefix `1 ..= n` of
/// sequences grew, with its new `n`: both increase along the list.
fn prefix_milestones(resolutions: &[Resolution]) -> Vec<(i64, u64)> {
    let mut resolutions: Vec<(u64, u64, i64)> = resolutions
        .iter()
        .map(|r| (r.from, r.to, r.batch_ms))
        .collect();
    resolutions.sort_unstable_by_key(|r| r.2);
    let mut ahead: BTreeMap<u64, u64> = BTreeMap::new();
    let mut prefix = 0u64;
    let mut out: Vec<(i64, u64)> = Vec::new();
    for (from, to, at) in resolutions {
        let top = ahead.entry(from).or_insert(to);
        *top = (*top).max(to);
        let before = prefix;
        while let Some(entry) = ahead.first_entry() {
            if *entry.key() > prefix.saturating_add(1) {
                break;
            }
            prefix = prefix.max(entry.remove());
        }
        if prefix > before {
            match out.last_mut() {
                Some(last) if last.0 == at => last.1 = prefix,
                _ => out.push((at, prefix)),
            }
        }
    }
    out
}

/// Decodes one input record the way the processor must: [`crate::intent::decode`], and a
/// sequence the stores can hold.
fn decode_input(r: &InputRecord, s: &Settings, prefix: &str) -> Rec {
    let decoded = super::input::read(r.key.as_deref(), r.value.as_deref(), &s.limits)
        .map(|v| (v.intent, v.content));
    let in_scope = match &decoded {
        Ok((intent, _)) => intent.intent_id.starts_with(prefix),
        // An invalid record belongs to the prefix by its key, or by whatever intent_id can
        // still be read from it.
        Err(_) => {
            prefix.is_empty()
                || r.key
                    .as_deref()
                    .is_some_and(|k| k.starts_with(prefix.as_bytes()))
                || r.value
                    .as_deref()
                    .and_then(|v| Intent::decode(v).ok())
                    .is_some_and(|i| i.intent_id.starts_with(prefix))
        }
    };
    let (valid, invalid) = match decoded {
        Ok(v) => (Some(v), String::new()),
        Err(e) => (None, e),
    };
    Rec {
        pos: (r.partition, r.offset),
        timestamp_ms: r.timestamp_ms,
        key: r.key.clone(),
        value: r.value.clone(),
        valid,
        invalid,
        in_scope,
        copy: false,
    }
}

/// A side-effects record as a usable effect, or why it is not one (with the intent id it
/// names, when it names one).
pub(super) fn decode_effect(value: Option<&[u8]>) -> Result<SideEffect, (Option<String>, String)> {
    let value = value.ok_or((None, "record without a value".to_string()))?;
    let e = SideEffect::decode(value).map_err(|e| (None, format!("not a SideEffect: {e}")))?;
    let missing = if e.intent_id.is_empty() {
        return Err((None, "effect without intent_id".into()));
    } else if e.contact_id.is_empty() {
        "contact_id"
    } else if e.commit_sequence == 0 {
        "commit_sequence"
    } else {
        return Ok(e);
    };
    let why = format!("effect of intent {} without {missing}", e.intent_id);
    Err((Some(e.intent_id), why))
}

/// The first field in which an effect differs from the intent it carries, if any.
fn differing_field(e: &SideEffect, i: &Intent) -> Option<&'static str> {
    if e.intent_id != i.intent_id {
        Some("intent_id")
    } else if e.contact_id != i.contact_id {
        Some("contact_id")
    } else if e.clinic_id != i.clinic_id {
        Some("clinic_id")
    } else if e.action != i.action {
        Some("action")
    } else if e.payload != i.payload {
        Some("payload")
    } else if e.created_at_ms != i.created_at_ms {
        Some("created_at_ms")
    } else if e.dispatch_priority != i.dispatch_priority {
        Some("dispatch_priority")
    } else if e.correlation_id.is_empty()
        || !i.correlation_id.is_empty() && e.correlation_id != i.correlation_id
    {
        // The producer's, or one generated when it gave none (§3).
        Some("correlation_id")
    } else {
        None
    }
}

/// Whether every sequence in `1 ..= upto` was resolved by the resolutions that `count`.
fn prefix_resolved(res: &[Resolution], upto: u64, count: impl Fn(&Resolution) -> bool) -> bool {
    if upto == 0 {
        return true;
    }
    let merged = merge(
        res.iter()
            .filter(|r| count(r))
            .map(|r| (r.from, r.to))
            .collect(),
    );
    merged.first().is_some_and(|r| r.0 <= 1 && r.1 >= upto)
}

fn short(s: &str) -> String {
    const MAX: usize = 64;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(MAX).collect();
        out.push('…');
        out
    }
}

/// Sorts and merges inclusive ranges (adjacent ones too).
fn merge(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (from, to) in ranges {
        match out.last_mut() {
            Some(last) if from <= last.1.saturating_add(1) => last.1 = last.1.max(to),
            _ => out.push((from, to)),
        }
    }
    out
}

/// Whether `seq` is in one of the merged ranges.
fn covered(merged: &[(u64, u64)], seq: u64) -> bool {
    let i = merged.partition_point(|r| r.1 < seq);
    merged.get(i).is_some_and(|r| r.0 <= seq)
}

/// The inclusive ranges of `1 ..= highest` outside the merged ranges.
fn uncovered(merged: &[(u64, u64)], highest: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut next = 1u64;
    for &(from, to) in merged {
        if next > highest {
            break;
        }
        if from > next {
            out.push((next, (from - 1).min(highest)));
        }
        next = next.max(to.saturating_add(1));
    }
    if next <= highest {
        out.push((next, highest));
    }
    out
}

/// Whether a review record carries its original record: byte for byte, or, when it says it
/// was cut to fit the largest output record (`original_truncated`), the record's first bytes
/// (the value first, then the key) with its true sizes, and something really cut. (How much
/// fitted depends on `limits.max_output_bytes`, which the topics do not tell.)
fn carries(review: &ManualReview, key: Option<&[u8]>, value: Option<&[u8]>) -> bool {
    let (key, value) = (key.unwrap_or_default(), value.unwrap_or_default());
    let sizes = review.original_key_size == key.len() as u64
        && review.original_value_size == value.len() as u64;
    if !review.original_truncated {
        return review.original_value.as_ref() == value && review.original_key.as_ref() == key;
    }
    let (carried_value, carried_key) =
        (review.original_value.as_ref(), review.original_key.as_ref());
    sizes
        && value.starts_with(carried_value)
        && key.starts_with(carried_key)
        && (carried_key.is_empty() || carried_value.len() == value.len())
        && carried_value.len() + carried_key.len() < value.len() + key.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_joins_overlapping_and_adjacent_ranges() {
        assert_eq!(
            merge(vec![(5, 5), (1, 2), (3, 3), (7, 9), (8, 8)]),
            vec![(1, 3), (5, 5), (7, 9)]
        );
        assert_eq!(merge(vec![]), vec![]);
        assert_eq!(merge(vec![(1, u64::MAX), (2, 3)]), vec![(1, u64::MAX)]);
    }

    #[test]
    fn uncovered_lists_the_holes_below_the_highest() {
        let m = merge(vec![(1, 1), (3, 3), (6, 10)]);
        assert_eq!(uncovered(&m, 10), vec![(2, 2), (4, 5)]);
        assert_eq!(uncovered(&m, 4), vec![(2, 2), (4, 4)]);
        assert_eq!(uncovered(&m, 0), vec![]);
        assert_eq!(uncovered(&merge(vec![(2, 2)]), 2), vec![(1, 1)]);
        assert_eq!(uncovered(&[], 3), vec![(1, 3)]);
        assert!(covered(&m, 7) && covered(&m, 1) && !covered(&m, 2) && !covered(&m, 11));
    }

    #[test]
    fn resolutions_count_by_time() {
        let res = [resolved(1, 2, 10, 0), resolved(3, 3, 20, 0)];
        let before = |at: i64| move |r: &Resolution| r.at_ms < at;
        assert!(prefix_resolved(&res, 3, before(21)));
        assert!(!prefix_resolved(&res, 3, before(20)));
        assert!(prefix_resolved(&res, 0, before(0)));
    }

    #[test]
    fn the_resolved_prefix_grows_when_its_next_sequence_is_resolved() {
        // In batch time: 4..=9 and 3 are resolved first, 1 next (the prefix is 1), 2 last (it
        // jumps to 9). The processor's times play no part.
        let batches = |list: &[(u64, u64, i64)]| -> Vec<Resolution> {
            list.iter()
                .map(|(from, to, batch)| resolved(*from, *to, -batch, *batch))
                .collect()
        };
        let res = batches(&[(3, 3, 5), (1, 1, 10), (2, 2, 20), (4, 9, 1), (12, 12, 30)]);
        assert_eq!(prefix_milestones(&res), vec![(10, 1), (20, 9)]);
        // Two resolutions of one batch make one milestone; overlapping ranges merge.
        let res = batches(&[(1, 2, 7), (2, 5, 7), (6, 6, 8)]);
        assert_eq!(prefix_milestones(&res), vec![(7, 5), (8, 6)]);
        assert!(prefix_milestones(&batches(&[(2, 3, 1)])).is_empty());
    }

    fn resolved(from: u64, to: u64, at_ms: i64, batch_ms: i64) -> Resolution {
        Resolution {
            from,
            to,
            at_ms,
            batch_ms,
        }
    }

    #[test]
    fn unprocessable_is_known_by_name_before_the_proto_has_it() {
        assert_eq!(Why::named("UNPROCESSABLE"), Why::Unprocessable);
        assert_eq!(Why::named("SOMETHING_NEW"), Why::Unknown);
        assert_eq!(
            Why::of(ReviewReason::WaitTimeout as i32).0,
            Why::WaitTimeout
        );
        assert_eq!(Why::of(99), (Why::Unknown, "99".to_string()));
    }

    /// An UNPROCESSABLE review of `value` with `detail`, as the only outcome of its record.
    /// (The proto has no code for it yet: the review is read as unknown, then renamed.)
    fn unprocessable(value: Vec<u8>, key: &[u8], detail: &str) -> Report {
        let o = Observed {
            intents_topic: "intents".into(),
            intents: vec![InputRecord {
                partition: 0,
                offset: 0,
                timestamp_ms: Some(1),
                key: Some(key.to_vec()),
                value: Some(value.clone()),
                forwarded_from: None,
            }],
            reviews: vec![OutputRecord {
                partition: 0,
                offset: 0,
                value: Some(
                    ManualReview {
                        original_value: value.clone().into(),
                        original_key: key.to_vec().into(),
                        reason: 99,
                        detail: detail.into(),
                        intent_id: Intent::decode(value.as_slice())
                            .map(|i| i.intent_id)
                            .unwrap_or_default(),
                        contact_id: Intent::decode(value.as_slice())
                            .map(|i| i.contact_id)
                            .unwrap_or_default(),
                        source_topic: "intents".into(),
                        ..ManualReview::default()
                    }
                    .encode_to_vec(),
                ),
            }],
            ..Observed::default()
        };
        let options = Options::default();
        let mut f = Findings::default();
        let mut w = World::build(&o, &options, &mut f);
        for r in &mut w.reviews {
            (r.why, r.name) = (Why::Unprocessable, "UNPROCESSABLE".into());
        }
        judge(&w, f)
    }

    #[test]
    fn unprocessable_is_an_outcome_without_audit_row_that_must_say_what_failed() {
        let valid = Intent {
            intent_id: "i".into(),
            contact_id: "c".into(),
            action: crate::proto::Action::Book as i32,
            ..Intent::default()
        }
        .encode_to_vec();
        for value in [valid.clone(), vec![0xff, 0xff, 0xff, 0x01]] {
            let r = unprocessable(value.clone(), b"c", "write failed: invalid byte sequence");
            assert_eq!(r.violation_counts(), vec![], "{r:#?}");
            assert!(r.ok);
            let r = unprocessable(value, b"c", " ");
            assert_eq!(
                r.violation_counts(),
                vec![("manual_review_unjustified", 1)],
                "{r:#?}"
            );
            assert!(r.violations[0].contains("no error in its detail"));
        }
    }
}
