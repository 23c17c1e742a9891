//! The contract verifier (`causal-commit verify`): reads what the processor consumed and
//! produced, and what it audited, and checks the sequencing contract (CONTRACT.md §4-§5)
//! contact by contact.
//!
//! # What is read
//!
//! 1. The intents topic, from the beginning to its current end (read_committed): every record's
//!    partition, offset, key and value, decoded with [`crate::intent::decode`].
//! 2. The side-effects topic ([`SideEffect`]) and the manual-review topic ([`ManualReview`]),
//!    the same way. Inputs are read before outputs, so an intent whose outcome is produced
//!    while the verifier runs is not reported lost.
//! 3. The processor group's committed offsets on the intents topic and their metadata (the
//!    recovery point: the last batch number committed in Kafka per partition).
//! 4. PostgreSQL, in one read-only repeatable-read transaction: the `cc_transition` rows of the
//!    intents topic (`blocked_conflict`, `manual_review`, `skipped`) and the `cc_contact` states
//!    (their waiting lists). Rows written by a batch past the partition's recovery point belong to
//!    a Kafka transaction that has not committed (in flight, or aborted and not yet rolled back
//!    by a restore) and are ignored, exactly as a restore would drop them; for a contact whose
//!    latest state is such a row, its previous state is used.
//!
//! # Checks
//!
//! - **reorders**: per contact, in topic order, every effect's `commit_sequence` must be above
//!   every earlier one of that contact. Each effect that is not counts once. A contact whose
//!   effects are spread over several side-effects partitions has no single order: each effect on
//!   another partition than the contact's first one counts as a reorder too.
//! - **duplicates_emitted**: the intent ids with more than one effect, plus the
//!   (contact, commit_sequence) pairs with more than one effect.
//! - **gaps**: per contact, every sequence in `1 ..= highest effect sequence` must be resolved
//!   by an effect, a `blocked_conflict` row with reason `VERSION_CONFLICT` (the only block that
//!   resolves a slot; sequence conflicts name a slot that is owned by another intent or already
//!   resolved) or a `skipped` row (`{"from":a,"to":b}`), or be the slot of a manual-reviewed
//!   intent (a `manual_review` row with that sequence). Every other sequence is a gap.
//! - **unresolved_manual_review_slots**: the distinct (contact, sequence) slots of
//!   manual-reviewed intents that nothing resolved (no effect, version-conflict block or skip),
//!   wherever they are: below the contact's highest effect (where they would otherwise be gaps)
//!   or above it (the usual case: a contact on hold after a wait timeout).
//! - **lost**: every distinct valid intent id read from the intents topic needs an outcome: an
//!   effect, a manual-review record naming it (or pointing at one of its records by source
//!   partition/offset), a `blocked_conflict` or `manual_review` row for it, or a place in a
//!   contact's waiting list. Every invalid record needs a manual-review record whose source
//!   partition/offset is its own. Anything else is lost.
//! - **effects_without_intent**: effects whose intent id was never read from the intents topic
//!   (a phantom effect; also what retention deleting old intents would look like: the verifier
//!   assumes the topics still hold everything since the start).
//! - **malformed_outputs**: output records that are not a usable [`SideEffect`] /
//!   [`ManualReview`]: no value, bytes that do not decode, or an effect without intent id,
//!   contact id or commit sequence (sequences start at 1). One that names an intent id is
//!   counted under the prefix of that id; the others cannot be attributed to any prefix and
//!   always count.
//!
//! `ok` is true when duplicates, gaps, reorders, lost, effects without intent and malformed
//! outputs are all zero.
//!
//! # Prefix
//!
//! A non-empty prefix restricts everything to intents whose intent_id starts with it, and to
//! invalid input records whose key (or whatever intent_id can still be read from them) starts
//! with it, so runs sharing the default topics are checked separately. Per-contact checks then
//! see only that prefix's effects: runs must not share contacts.
//!
//! Verify a quiet system (`causal-commit wait-caught-up` first): an intent the processor has not
//! consumed yet has no outcome and is reported lost (its example says it is past the group's
//! committed offset).

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::Context as _;
use futures::TryStreamExt as _;
use prost::Message as _;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::pipeline::read::{read_topic, TopicRecord};
use crate::proto::{ManualReview, ReviewReason, SideEffect};
use crate::sequencer::ContactSnapshot;
use crate::store::snapshot::Held;

/// How many violation examples the report carries.
pub const MAX_EXAMPLES: usize = 20;

/// What `verify` found. Serialized as the JSON printed by `causal-commit verify`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Distinct valid intent ids read from the intents topic.
    pub intents: usize,
    /// Input records read (valid, duplicates and invalid).
    pub records: usize,
    /// Input records that are not a valid intent.
    pub invalid_records: usize,
    /// Effects on the side-effects topic.
    pub committed: usize,
    /// Intent ids with more than one effect, plus (contact, sequence) pairs with more than one.
    pub duplicates_emitted: usize,
    /// Sequences below a contact's highest effect that nothing explains.
    pub gaps: usize,
    /// Effects that came after an effect of the same contact with an equal or higher sequence.
    pub reorders: usize,
    /// Intents and invalid records without any outcome.
    pub lost: usize,
    /// Manual-review records by reason name.
    pub manual_review: BTreeMap<String, usize>,
    /// `blocked_conflict` audit rows.
    pub blocked: usize,
    /// Intents still waiting for their predecessor.
    pub waiting: usize,
    /// Slots of manual-reviewed intents that nothing resolved.
    pub unresolved_manual_review_slots: usize,
    /// Effects whose intent id never appeared on the intents topic.
    pub effects_without_intent: usize,
    /// Output records that could not be decoded.
    pub malformed_outputs: usize,
    /// No duplicate, gap, reorder, lost intent, phantom effect or malformed output.
    pub ok: bool,
    /// Up to [`MAX_EXAMPLES`] human-readable examples, taken in turn from each kind.
    pub violations: Vec<String>,
}

/// Violation examples, kept per kind so one abundant kind does not hide the others.
#[derive(Default)]
struct Examples {
    kinds: Vec<(&'static str, Vec<String>)>,
}

impl Examples {
    fn add(&mut self, kind: &'static str, example: impl FnOnce() -> String) {
        let idx = match self.kinds.iter().position(|(k, _)| *k == kind) {
            Some(i) => i,
            None => {
                self.kinds.push((kind, Vec::new()));
                self.kinds.len() - 1
            }
        };
        let list = &mut self.kinds[idx].1;
        if list.len() < MAX_EXAMPLES {
            list.push(example());
        }
    }

    /// Round-robin over the kinds, in the order they were first seen.
    fn take(self) -> Vec<String> {
        let mut iters: Vec<_> = self.kinds.into_iter().map(|(_, v)| v.into_iter()).collect();
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

/// A record position on the intents topic.
type Position = (i32, i64);

/// One contact's effects, in topic order.
struct ContactEffects {
    partition: i32,
    highest: u64,
    sequences: Vec<u64>,
}

/// An invalid input record.
struct InvalidRecord {
    position: Position,
    key: String,
    error: String,
}

/// A partition's committed position on the intents topic (the processor group's).
#[derive(Debug, Clone, Copy, Default)]
struct CommittedPoint {
    /// Next offset to consume; -1 when the group has committed nothing.
    offset: i64,
    /// Last batch committed in Kafka (0 when none).
    batch: u64,
}

/// What PostgreSQL holds, committed batches only.
#[derive(Default)]
struct Audit {
    /// Intent ids with a `blocked_conflict` or (non-`INVALID_INTENT`) `manual_review` row.
    outcome_ids: HashSet<String>,
    /// Positions of every `blocked_conflict` / `manual_review` row.
    outcome_positions: HashSet<Position>,
    blocked: usize,
    /// Per contact: slots resolved without an effect (version conflicts, skips), inclusive.
    resolved: HashMap<String, Vec<(u64, u64)>>,
    /// Per contact: slots of manual-reviewed intents.
    manual_slots: HashMap<String, Vec<u64>>,
    waiting_ids: HashSet<String>,
}

/// Reads the topics and the audit and checks the contract; see the module documentation.
/// Blocking: call it from a blocking thread (it drives PostgreSQL on the current tokio runtime
/// when there is one, else on a private one).
pub fn verify(config: &Config, prefix: &str) -> anyhow::Result<Report> {
    let mut report = Report::default();
    let mut examples = Examples::default();
    let intents_topic = config.kafka.intents_topic.as_str();

    // 1. Inputs.
    let mut intents: HashMap<String, Vec<Position>> = HashMap::new();
    let mut invalid: Vec<InvalidRecord> = Vec::new();
    read_topic(config, intents_topic, |r| {
        match crate::intent::decode(r.key, r.value, &config.limits) {
            Ok(v) => {
                if v.intent.intent_id.starts_with(prefix) {
                    report.records += 1;
                    intents
                        .entry(v.intent.intent_id)
                        .or_default()
                        .push((r.partition, r.offset));
                }
            }
            Err(e) => {
                if invalid_in_scope(&r, prefix) {
                    report.records += 1;
                    invalid.push(InvalidRecord {
                        position: (r.partition, r.offset),
                        key: r.key.map_or_else(
                            || "<none>".into(),
                            |k| short(&String::from_utf8_lossy(k)),
                        ),
                        error: e.to_string(),
                    });
                }
            }
        }
        Ok(())
    })
    .with_context(|| format!("reading {intents_topic}"))?;
    report.intents = intents.len();
    report.invalid_records = invalid.len();

    // 2. Effects.
    let mut effects_per_intent: HashMap<String, u32> = HashMap::new();
    let mut contacts: HashMap<String, ContactEffects> = HashMap::new();
    let side_effects_topic = config.kafka.side_effects_topic.as_str();
    read_topic(config, side_effects_topic, |r| {
        let effect = match decode_effect(r.value) {
            Ok(e) => e,
            Err((intent_id, why)) => {
                if intent_id.is_some_and(|id| !id.starts_with(prefix)) {
                    return Ok(());
                }
                report.malformed_outputs += 1;
                examples.add("malformed", || {
                    format!(
                        "{side_effects_topic} {}/{}: {why} (malformed)",
                        r.partition, r.offset
                    )
                });
                return Ok(());
            }
        };
        if !effect.intent_id.starts_with(prefix) {
            return Ok(());
        }
        report.committed += 1;
        let seq = effect.commit_sequence;
        let contact = contacts
            .entry(effect.contact_id.clone())
            .or_insert_with(|| ContactEffects {
                partition: r.partition,
                highest: 0,
                sequences: Vec::new(),
            });
        if r.partition != contact.partition {
            report.reorders += 1;
            examples.add("reorder", || {
                format!(
                    "contact {}: sequence {seq} on side-effects partition {}, earlier effects on partition {} (reorder: no single order)",
                    effect.contact_id, r.partition, contact.partition
                )
            });
        } else if seq <= contact.highest {
            report.reorders += 1;
            examples.add("reorder", || {
                format!(
                    "contact {}: sequence {seq} after {} (reorder)",
                    effect.contact_id, contact.highest
                )
            });
        }
        contact.highest = contact.highest.max(seq);
        contact.sequences.push(seq);
        if !intents.contains_key(&effect.intent_id) {
            report.effects_without_intent += 1;
            examples.add("phantom", || {
                format!(
                    "intent {}: effect (contact {}, sequence {seq}) for an intent never consumed (effect without intent)",
                    effect.intent_id, effect.contact_id
                )
            });
        }
        *effects_per_intent.entry(effect.intent_id).or_default() += 1;
        Ok(())
    })
    .with_context(|| format!("reading {side_effects_topic}"))?;

    // 3. Manual-review records.
    let mut review_ids: HashSet<String> = HashSet::new();
    let mut review_positions: HashSet<Position> = HashSet::new();
    let review_topic = config.kafka.manual_review_topic.as_str();
    read_topic(config, review_topic, |r| {
        let review = match r.value.map(ManualReview::decode) {
            Some(Ok(review)) => review,
            Some(Err(e)) => {
                report.malformed_outputs += 1;
                examples.add("malformed", || {
                    format!(
                        "{review_topic} {}/{}: not a ManualReview: {e} (malformed)",
                        r.partition, r.offset
                    )
                });
                return Ok(());
            }
            None => {
                report.malformed_outputs += 1;
                examples.add("malformed", || {
                    format!(
                        "{review_topic} {}/{}: record without a value (malformed)",
                        r.partition, r.offset
                    )
                });
                return Ok(());
            }
        };
        if review.source_topic == intents_topic {
            review_positions.insert((review.source_partition, review.source_offset));
        }
        let key_in_scope = review.original_key.starts_with(prefix.as_bytes());
        if !(review.intent_id.starts_with(prefix) || key_in_scope) {
            return Ok(());
        }
        let reason = ReviewReason::try_from(review.reason)
            .map(|r| r.as_str_name().to_string())
            .unwrap_or_else(|_| review.reason.to_string());
        // An INVALID_INTENT review is about a record, not about the intent id it may name
        // (a valid record with the same id is still processed): it counts by position only.
        if reason != ReviewReason::InvalidIntent.as_str_name() && !review.intent_id.is_empty() {
            review_ids.insert(review.intent_id);
        }
        *report.manual_review.entry(reason).or_default() += 1;
        Ok(())
    })
    .with_context(|| format!("reading {review_topic}"))?;

    // 4. The processor group's recovery points, then 5. the audit of committed batches.
    let committed = committed_points(config)?;
    let audit = block_on(read_audit(config, prefix, &committed, &mut examples))??;
    report.blocked = audit.blocked;
    report.waiting = audit.waiting_ids.len();

    // Duplicates.
    let mut duplicated_ids: Vec<(&String, u32)> = effects_per_intent
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, n)| (id, *n))
        .collect();
    duplicated_ids.sort_unstable();
    for (id, n) in duplicated_ids {
        report.duplicates_emitted += 1;
        examples.add("duplicate", || {
            format!("intent {id}: {n} effects (duplicate)")
        });
    }
    // Topic order is no longer needed: sequences sorted from here on.
    for c in contacts.values_mut() {
        c.sequences.sort_unstable();
    }
    let mut contact_ids: Vec<&String> = contacts.keys().chain(audit.manual_slots.keys()).collect();
    contact_ids.sort_unstable();
    contact_ids.dedup();
    for contact_id in &contact_ids {
        let Some(c) = contacts.get(*contact_id) else {
            continue;
        };
        for run in c.sequences.chunk_by(|a, b| a == b).filter(|r| r.len() > 1) {
            report.duplicates_emitted += 1;
            examples.add("duplicate", || {
                format!(
                    "contact {contact_id}: sequence {} emitted {} times (duplicate)",
                    run[0],
                    run.len()
                )
            });
        }
    }

    // Gaps and unresolved manual-review slots.
    let no_slots = Vec::new();
    for contact_id in &contact_ids {
        let effects = contacts.get(*contact_id);
        let highest = effects.map_or(0, |c| c.highest);
        let mut resolved: Vec<(u64, u64)> =
            audit.resolved.get(*contact_id).cloned().unwrap_or_default();
        if let Some(c) = effects {
            resolved.extend(c.sequences.iter().map(|s| (*s, *s)));
        }
        let resolved = merge(resolved);
        let mut slots = audit
            .manual_slots
            .get(*contact_id)
            .unwrap_or(&no_slots)
            .clone();
        slots.sort_unstable();
        slots.dedup();
        report.unresolved_manual_review_slots +=
            slots.iter().filter(|s| !covered(&resolved, **s)).count();
        for (from, to) in uncovered(&resolved, highest) {
            let reviewed =
                slots.partition_point(|s| *s <= to) - slots.partition_point(|s| *s < from);
            let missing = to - from + 1 - reviewed as u64;
            if missing == 0 {
                continue;
            }
            report.gaps = report
                .gaps
                .saturating_add(usize::try_from(missing).unwrap_or(usize::MAX));
            examples.add("gap", || {
                let what = if from == to {
                    format!("sequence {from} has")
                } else {
                    format!("{missing} of sequences {from}..={to} have")
                };
                format!(
                    "contact {contact_id}: {what} no effect, version-conflict block, skip or manual review below the highest effect {highest} (gap)"
                )
            });
        }
    }

    // Lost.
    let mut lost_ids: Vec<(&String, &Vec<Position>)> = intents
        .iter()
        .filter(|(id, positions)| {
            !(effects_per_intent.contains_key(*id)
                || review_ids.contains(*id)
                || audit.outcome_ids.contains(*id)
                || audit.waiting_ids.contains(*id)
                || positions
                    .iter()
                    .any(|p| review_positions.contains(p) || audit.outcome_positions.contains(p)))
        })
        .collect();
    lost_ids.sort_unstable();
    for (id, positions) in lost_ids {
        report.lost += 1;
        examples.add("lost", || {
            let (p, o) = positions[0];
            format!(
                "intent {id} (intents {p}/{o}): no outcome (lost){}",
                behind(&committed, p, o)
            )
        });
    }
    for r in &invalid {
        if review_positions.contains(&r.position) {
            continue;
        }
        report.lost += 1;
        let (p, o) = r.position;
        examples.add("lost", || {
            format!(
                "invalid record intents {p}/{o} (key {:?}, {}): no manual-review record (lost){}",
                r.key,
                r.error,
                behind(&committed, p, o)
            )
        });
    }

    report.ok = report.duplicates_emitted == 0
        && report.gaps == 0
        && report.reorders == 0
        && report.lost == 0
        && report.effects_without_intent == 0
        && report.malformed_outputs == 0;
    report.violations = examples.take();
    Ok(report)
}

/// Whether an invalid input record belongs to `prefix`: its key, or the intent_id that can still
/// be read from it, starts with it.
fn invalid_in_scope(r: &TopicRecord<'_>, prefix: &str) -> bool {
    if prefix.is_empty() || r.key.is_some_and(|k| k.starts_with(prefix.as_bytes())) {
        return true;
    }
    r.value
        .and_then(|v| crate::proto::Intent::decode(v).ok())
        .is_some_and(|i| i.intent_id.starts_with(prefix))
}

/// A side-effects record as a usable effect, or why it is not one.
fn decode_effect(value: Option<&[u8]>) -> Result<SideEffect, (Option<String>, String)> {
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

/// A note for a lost example whose record the processor group has not consumed yet.
fn behind(committed: &HashMap<i32, CommittedPoint>, partition: i32, offset: i64) -> String {
    let at = committed.get(&partition).map_or(-1, |c| c.offset);
    if offset >= at {
        if at < 0 {
            "; the processor group has committed nothing on this partition".to_string()
        } else {
            format!("; the processor group has committed only up to offset {at}: not consumed yet")
        }
    } else {
        String::new()
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

/// The processor group's committed offset and last committed batch per partition.
fn committed_points(config: &Config) -> anyhow::Result<HashMap<i32, CommittedPoint>> {
    Ok(crate::pipeline::read::committed_points(config)?
        .into_iter()
        .map(|(p, c)| {
            let batch = c.recovery.ok().flatten().map_or(0, |r| r.batch);
            (
                p,
                CommittedPoint {
                    offset: c.offset,
                    batch,
                },
            )
        })
        .collect())
}

/// Runs a future to completion from blocking code.
fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => Ok(handle.block_on(f)),
        Err(_) => Ok(tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a runtime for PostgreSQL")?
            .block_on(f)),
    }
}

type AuditRow = (i32, i64, i64, String, String, String, String, i64, String);
type StateRow = (
    String,
    i32,
    i64,
    serde_json::Value,
    Option<i64>,
    Option<serde_json::Value>,
);

/// Reads the audit rows and contact states of committed batches (see the module docs).
async fn read_audit(
    config: &Config,
    prefix: &str,
    committed: &HashMap<i32, CommittedPoint>,
    examples: &mut Examples,
) -> anyhow::Result<Audit> {
    let topic = config.kafka.intents_topic.as_str();
    let schema = &config.postgres.schema;
    let is_committed = |partition: i32, batch: i64| {
        batch >= 0 && batch as u64 <= committed.get(&partition).map_or(0, |c| c.batch)
    };
    let pool = crate::store::postgres::pool(&config.postgres)?;
    let mut tx = pool.begin().await.context("connecting to PostgreSQL")?;
    // One snapshot for both tables, and no statement timeout cut for a large audit.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await
        .context("starting a read-only snapshot")?;
    sqlx::query("SET LOCAL statement_timeout = 0")
        .execute(&mut *tx)
        .await
        .context("lifting the statement timeout")?;

    let mut audit = Audit::default();
    {
        let mut rows = sqlx::query_as::<_, AuditRow>(
            "SELECT partition, batch_no, source_offset, intent_id, contact_id, to_state, reason,
                    commit_sequence, detail
               FROM cc_transition
              WHERE topic = $1 AND to_state IN ('blocked_conflict', 'manual_review', 'skipped')
              ORDER BY id",
        )
        .bind(topic)
        .fetch(&mut *tx);
        while let Some((partition, batch, offset, intent_id, contact_id, to, reason, seq, detail)) =
            rows.try_next().await.with_context(|| {
                format!("reading {schema}.cc_transition (has `causal-commit migrate` run?)")
            })?
        {
            if !is_committed(partition, batch) {
                continue;
            }
            let seq = seq.max(0) as u64;
            match to.as_str() {
                "skipped" => match serde_json::from_str::<SkipDetail>(&detail) {
                    Ok(s) if s.from >= 1 && s.from <= s.to => audit
                        .resolved
                        .entry(contact_id)
                        .or_default()
                        .push((s.from, s.to)),
                    _ => examples.add("audit", || {
                        format!(
                            "contact {contact_id}: skipped row with unreadable detail {:?} (ignored)",
                            short(&detail)
                        )
                    }),
                },
                state => {
                    audit.outcome_positions.insert((partition, offset));
                    if !intent_id.starts_with(prefix) {
                        continue;
                    }
                    if reason != "INVALID_INTENT" && !intent_id.is_empty() {
                        audit.outcome_ids.insert(intent_id);
                    }
                    if state == "blocked_conflict" {
                        audit.blocked += 1;
                        if reason == "VERSION_CONFLICT" && seq > 0 {
                            audit.resolved.entry(contact_id).or_default().push((seq, seq));
                        }
                    } else if seq > 0 && !contact_id.is_empty() {
                        audit.manual_slots.entry(contact_id).or_default().push(seq);
                    }
                }
            }
        }
    }
    {
        let mut rows = sqlx::query_as::<_, StateRow>(
            "SELECT contact_id, partition, batch_no, state, prev_batch_no, prev_state
               FROM cc_contact
              WHERE topic = $1
                AND (waiting > 0
                     OR coalesce(jsonb_array_length(prev_state -> 'waiting'), 0) > 0)",
        )
        .bind(topic)
        .fetch(&mut *tx);
        while let Some((contact_id, partition, batch, state, prev_batch, prev_state)) =
            rows.try_next().await.with_context(|| {
                format!("reading {schema}.cc_contact (has `causal-commit migrate` run?)")
            })?
        {
            // The state as of the last batch committed in Kafka (what a restore would load).
            let state = if is_committed(partition, batch) {
                state
            } else {
                match (prev_batch, prev_state) {
                    (Some(b), Some(s)) if is_committed(partition, b) => s,
                    _ => continue,
                }
            };
            match serde_json::from_value::<ContactSnapshot<Held>>(state) {
                Ok(snapshot) => {
                    for w in snapshot.waiting {
                        if w.intent.meta.intent_id.starts_with(prefix) {
                            audit.waiting_ids.insert(w.intent.meta.intent_id);
                        }
                    }
                }
                Err(e) => examples.add("audit", || {
                    format!("contact {contact_id}: unreadable cc_contact state ({e}); its waiting intents are unknown")
                }),
            }
        }
    }
    tx.commit().await.context("ending the read-only snapshot")?;
    pool.close().await;
    Ok(audit)
}

#[derive(Deserialize)]
struct SkipDetail {
    from: u64,
    to: u64,
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
    fn examples_take_turns_between_kinds() {
        let mut e = Examples::default();
        for i in 0..30 {
            e.add("reorder", || format!("r{i}"));
        }
        e.add("lost", || "l0".into());
        let out = e.take();
        assert_eq!(out.len(), MAX_EXAMPLES);
        assert_eq!(out[0], "r0");
        assert_eq!(out[1], "l0");
        assert_eq!(out[2], "r1");
    }

    #[test]
    fn malformed_effects_are_refused() {
        assert_eq!(decode_effect(None).unwrap_err().0, None);
        assert_eq!(
            decode_effect(Some(&[0xff, 0xfe, 0xfd])).unwrap_err().0,
            None
        );
        assert_eq!(decode_effect(Some(&[])).unwrap_err().0, None);
        let unsequenced = SideEffect {
            intent_id: "i".into(),
            contact_id: "c".into(),
            ..SideEffect::default()
        };
        assert_eq!(
            decode_effect(Some(&unsequenced.encode_to_vec())).unwrap_err(),
            (
                Some("i".into()),
                "effect of intent i without commit_sequence".into()
            )
        );
        let ok = SideEffect {
            intent_id: "i".into(),
            contact_id: "c".into(),
            commit_sequence: 1,
            ..SideEffect::default()
        };
        assert_eq!(decode_effect(Some(&ok.encode_to_vec())), Ok(ok));
    }
}
