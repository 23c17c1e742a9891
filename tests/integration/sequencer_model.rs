//! Model-based property test of the sequencer.
//!
//! Random streams over a handful of contacts (out-of-order strict sequences, assigned
//! sequences, redeliveries, conflicting reuse of an `intent_id`, re-submissions, version
//! guards, priorities, clock jumps past the timeout, operator releases, export/import and
//! crash-and-restore from `take_dirty` snapshots at random points) are applied to the real [`Sequencer`] and to [`Model`], a deliberately naive
//! reference written from the rules alone: a `Vec` of contacts scanned linearly, an unbounded
//! outcome map instead of the bounded window plus store, timeouts found by brute force. Their
//! decisions must be identical after every operation, and every case also asserts R1, R4, R5
//! and R8 directly on the decision log.
//!
//! Like the pipeline, the harness looks the durable store up once per batch (before the
//! batch) and flushes outcomes to it after the batch, so the real sequencer's bounded window
//! (capacity 24, evicting constantly) and `prior` must together behave like the model's
//! perfect memory.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use causal_commit::sequencer::{
    BlockReason, Config, ContactSnapshot, Decision, Error, HoldReason, Intent, IntentMeta,
    InvalidKind, Millis, Outcome, PartitionSnapshot, PriorOutcome, Reason, Release, ReviewReason,
    Sequencer, SkipCause, State, TimeoutPolicy, MAX_SEQUENCE,
};
use proptest::prelude::*;
use proptest::sample::Index;

const TIMEOUT_MS: u64 = 1_000;
/// The window must cover every outcome decided between two store flushes. The most one
/// operation can decide: 4 records of its own plus every waiting intent leaving (at most
/// 5 contacts x 4 waiting) = 24, so the window is exactly that, and evicts constantly.
const WINDOW: usize = 24;

type D = Decision<u64>;

// ---------------------------------------------------------------------------------------------
// The reference model.
// ---------------------------------------------------------------------------------------------

struct MWait {
    seq: u64,
    since: u64,
    intent: Intent<u64>,
}

struct MContact {
    id: String,
    resolved: u64,
    version: u64,
    next: u64,
    hold: Option<(u64, HoldReason)>,
    /// Kept sorted by `seq`.
    waiting: Vec<MWait>,
    gap_since: u64,
}

#[derive(Clone, Copy)]
enum Group {
    Contact(usize),
    Loose(i32),
    Partition,
}

struct Model {
    cfg: Config,
    now: u64,
    contacts: Vec<MContact>,
    outcomes: HashMap<String, PriorOutcome>,
    paused: bool,
    out: Vec<(Group, Option<i32>, D)>,
}

impl Model {
    fn new(cfg: Config) -> Self {
        Model {
            cfg,
            now: 0,
            contacts: Vec::new(),
            outcomes: HashMap::new(),
            paused: false,
            out: Vec::new(),
        }
    }

    fn waiting(&self) -> usize {
        self.contacts.iter().map(|c| c.waiting.len()).sum()
    }

    fn waiting_bytes(&self) -> u64 {
        self.contacts
            .iter()
            .flat_map(|c| c.waiting.iter())
            .map(|w| u64::from(w.intent.meta.size))
            .sum()
    }

    fn find(&self, id: &str) -> Option<usize> {
        self.contacts.iter().position(|c| c.id == id)
    }

    fn push(&mut self, c: usize, d: D) {
        let p = d.intent_meta().map(|m| m.priority);
        self.out.push((Group::Contact(c), p, d));
    }

    fn record(&mut self, meta: &IntentMeta, outcome: Outcome) {
        let prior = PriorOutcome {
            fingerprint: meta.fingerprint,
            outcome,
        };
        self.outcomes.insert(meta.intent_id.clone(), prior);
    }

    fn advance(&mut self, now: u64) {
        self.now = self.now.max(now);
        loop {
            let due = self
                .contacts
                .iter()
                .enumerate()
                .filter(|(_, c)| !c.waiting.is_empty() && c.gap_since + TIMEOUT_MS < self.now)
                .min_by_key(|(i, c)| (c.gap_since + TIMEOUT_MS, *i))
                .map(|(i, _)| i);
            match due {
                Some(i) => self.expire(i),
                None => break,
            }
        }
    }

    fn expire(&mut self, i: usize) {
        let now = self.now;
        let missing = self.contacts[i].resolved + 1;
        match self.cfg.on_timeout {
            TimeoutPolicy::Hold => {
                self.hold(i, HoldReason::WaitTimeout { missing });
                let waiting = std::mem::take(&mut self.contacts[i].waiting);
                for w in waiting {
                    let reason = ReviewReason::WaitTimeout {
                        missing,
                        waited_ms: now - w.since,
                    };
                    self.review(i, w.intent, w.seq, reason);
                }
            }
            TimeoutPolicy::Skip => {
                let c = &mut self.contacts[i];
                let first = c.waiting[0].seq;
                let waited_ms = now - c.gap_since;
                c.resolved = first - 1;
                let d = D::Skipped {
                    contact_id: c.id.clone(),
                    from: missing,
                    to: first - 1,
                    cause: SkipCause::WaitTimeout { waited_ms },
                };
                self.out.push((Group::Contact(i), None, d));
                self.drain_ready(i, true);
            }
        }
        self.backpressure();
    }

    fn hold(&mut self, i: usize, reason: HoldReason) {
        self.contacts[i].hold = Some((self.now, reason));
        let d = D::ContactHeld {
            contact_id: self.contacts[i].id.clone(),
            reason,
        };
        self.out.push((Group::Contact(i), None, d));
    }

    fn review(&mut self, i: usize, intent: Intent<u64>, seq: u64, reason: ReviewReason) {
        self.record(
            &intent.meta,
            Outcome::ManualReview {
                reason: reason.code(),
                commit_sequence: seq,
            },
        );
        self.push(
            i,
            D::ManualReview {
                intent,
                commit_sequence: seq,
                reason,
            },
        );
    }

    fn block(&mut self, i: usize, intent: Intent<u64>, seq: u64, reason: BlockReason) {
        self.record(
            &intent.meta,
            Outcome::Blocked {
                reason: reason.code(),
                commit_sequence: seq,
            },
        );
        self.push(
            i,
            D::Blocked {
                intent,
                commit_sequence: seq,
                reason,
            },
        );
    }

    /// Resolves `resolved + 1` with this intent.
    fn resolve(&mut self, i: usize, intent: Intent<u64>) {
        let c = &mut self.contacts[i];
        c.resolved += 1;
        let seq = c.resolved;
        c.next = c.next.max(seq + 1);
        let ev = intent.meta.expected_version;
        if ev > 0 && ev != c.version {
            let actual = c.version;
            self.block(
                i,
                intent,
                seq,
                BlockReason::VersionConflict {
                    expected: ev,
                    actual,
                },
            );
        } else {
            c.version += 1;
            let v = c.version;
            self.record(
                &intent.meta,
                Outcome::Committed {
                    commit_sequence: seq,
                    contact_version: v,
                },
            );
            self.push(
                i,
                D::Commit {
                    intent,
                    commit_sequence: seq,
                    contact_version: v,
                },
            );
        }
    }

    fn drain_ready(&mut self, i: usize, mut progressed: bool) {
        while self.contacts[i]
            .waiting
            .first()
            .is_some_and(|w| w.seq == self.contacts[i].resolved + 1)
        {
            let w = self.contacts[i].waiting.remove(0);
            self.resolve(i, w.intent);
            progressed = true;
        }
        if progressed {
            self.contacts[i].gap_since = self.now;
        }
    }

    fn backpressure(&mut self) {
        let (waiting, bytes) = (self.waiting(), self.waiting_bytes());
        let over = waiting >= self.cfg.max_pending_per_partition
            || bytes >= self.cfg.max_pending_bytes_per_partition;
        let under =
            waiting < self.cfg.resume_pending_below && bytes < self.cfg.resume_pending_bytes_below;
        if !self.paused && over {
            self.paused = true;
            self.out
                .push((Group::Partition, None, D::PausePartition { waiting }));
        } else if self.paused && under {
            self.paused = false;
            self.out
                .push((Group::Partition, None, D::ResumePartition { waiting }));
        }
    }

    fn on_intent(&mut self, meta: IntentMeta, payload: u64, prior: Option<PriorOutcome>, now: u64) {
        self.advance(now);
        let invalid = if meta.intent_id.is_empty() {
            Some(InvalidKind::EmptyIntentId)
        } else if meta.contact_id.is_empty() {
            Some(InvalidKind::EmptyContactId)
        } else if meta.causal_sequence > MAX_SEQUENCE {
            Some(InvalidKind::SequenceOutOfRange)
        } else {
            None
        };
        let intent = Intent { meta, payload };
        if let Some(kind) = invalid {
            let p = intent.meta.priority;
            let d = D::ManualReview {
                intent,
                commit_sequence: 0,
                reason: ReviewReason::InvalidIntent { kind },
            };
            self.out.push((Group::Loose(p), Some(p), d));
            return;
        }
        let i = match self.find(&intent.meta.contact_id) {
            Some(i) => i,
            None => {
                self.contacts.push(MContact {
                    id: intent.meta.contact_id.clone(),
                    resolved: 0,
                    version: 0,
                    next: 1,
                    hold: None,
                    waiting: Vec::new(),
                    gap_since: 0,
                });
                self.contacts.len() - 1
            }
        };
        let id = intent.meta.intent_id.clone();
        let waiting_known = self.contacts.iter().find_map(|c| {
            c.waiting
                .iter()
                .find(|w| w.intent.meta.intent_id == id)
                .map(|w| PriorOutcome {
                    fingerprint: w.intent.meta.fingerprint,
                    outcome: Outcome::Waiting {
                        commit_sequence: w.seq,
                    },
                })
        });
        let known = waiting_known
            .or_else(|| self.outcomes.get(&id).copied())
            .or(prior);
        let mut reclaim = 0;
        if let Some(k) = known {
            if k.fingerprint != intent.meta.fingerprint {
                let reason = BlockReason::IdempotencyConflict {
                    existing_fingerprint: k.fingerprint,
                    received_fingerprint: intent.meta.fingerprint,
                    existing: k.outcome,
                };
                self.push(
                    i,
                    D::Blocked {
                        intent,
                        commit_sequence: 0,
                        reason,
                    },
                );
                return;
            }
            match k.outcome {
                Outcome::ManualReview {
                    commit_sequence, ..
                } if intent.meta.resubmission => reclaim = commit_sequence,
                outcome => {
                    self.push(
                        i,
                        D::Duplicate {
                            intent,
                            prior: outcome,
                        },
                    );
                    return;
                }
            }
        }
        let claimed = if intent.meta.causal_sequence > 0 {
            intent.meta.causal_sequence
        } else {
            reclaim
        };
        if let Some((since, hold)) = self.contacts[i].hold {
            let reason = ReviewReason::ContactOnHold {
                hold,
                held_since: Millis(since),
            };
            self.review(i, intent, claimed, reason);
            return;
        }
        let c = &self.contacts[i];
        let seq = if claimed > 0 {
            if claimed > MAX_SEQUENCE {
                let d = D::ManualReview {
                    intent,
                    commit_sequence: 0,
                    reason: ReviewReason::InvalidIntent {
                        kind: InvalidKind::SequenceOutOfRange,
                    },
                };
                self.push(i, d);
                return;
            }
            let owner = c
                .waiting
                .iter()
                .find(|w| w.seq == claimed)
                .map(|w| w.intent.meta.intent_id.clone());
            if claimed <= c.resolved || owner.is_some() {
                let reason = BlockReason::SequenceConflict {
                    claimed,
                    resolved_through: c.resolved,
                    owner,
                };
                self.block(i, intent, claimed, reason);
                return;
            }
            claimed
        } else {
            c.next
        };
        if seq == c.resolved + 1 {
            self.resolve(i, intent);
            self.drain_ready(i, true);
            self.backpressure();
        } else if c.waiting.len() >= self.cfg.max_pending_per_contact as usize {
            let limit = self.cfg.max_pending_per_contact;
            self.hold(i, HoldReason::BacklogOverflow { limit });
            let waiting = std::mem::take(&mut self.contacts[i].waiting);
            for w in waiting {
                self.review(
                    i,
                    w.intent,
                    w.seq,
                    ReviewReason::ContactBacklogOverflow { limit },
                );
            }
            self.review(
                i,
                intent,
                claimed,
                ReviewReason::ContactBacklogOverflow { limit },
            );
            self.backpressure();
        } else {
            let now = self.now;
            let c = &mut self.contacts[i];
            c.next = c.next.max(seq + 1);
            if c.waiting.is_empty() {
                c.gap_since = now;
            }
            let d = D::Wait {
                intent_id: intent.meta.intent_id.clone(),
                contact_id: intent.meta.contact_id.clone(),
                offset: intent.meta.offset,
                commit_sequence: seq,
                missing: c.resolved + 1,
            };
            let p = intent.meta.priority;
            c.waiting.push(MWait {
                seq,
                since: now,
                intent,
            });
            c.waiting.sort_by_key(|w| w.seq);
            self.out.push((Group::Contact(i), Some(p), d));
            self.backpressure();
        }
    }

    fn on_tick(&mut self, now: u64) {
        self.advance(now);
    }

    /// A restarted sequencer starts unpaused and re-evaluates backpressure on restore.
    fn crash(&mut self) {
        self.paused = false;
        self.backpressure();
    }

    fn release(&mut self, contact: &str, release: Release, now: u64) -> Result<(), Error> {
        self.advance(now);
        let Some(i) = self.find(contact) else {
            return Err(Error::UnknownContact {
                contact_id: contact.to_owned(),
            });
        };
        if let Release::SkipTo(n) = release {
            if n > MAX_SEQUENCE {
                return Err(Error::SkipTargetOutOfRange {
                    contact_id: contact.to_owned(),
                    target: n,
                });
            }
        }
        if self.contacts[i].hold.is_none() {
            return Err(Error::NotHeld {
                contact_id: contact.to_owned(),
            });
        }
        let c = &mut self.contacts[i];
        c.hold = None;
        if let Release::SkipTo(n) = release {
            if n > c.resolved + 1 {
                let d = D::Skipped {
                    contact_id: c.id.clone(),
                    from: c.resolved + 1,
                    to: n - 1,
                    cause: SkipCause::Operator,
                };
                c.resolved = n - 1;
                c.next = c.next.max(n);
                self.out.push((Group::Contact(i), None, d));
            }
        }
        let d = D::ContactReleased {
            contact_id: contact.to_owned(),
            release,
            resolved_through: self.contacts[i].resolved,
        };
        self.out.push((Group::Contact(i), None, d));
        Ok(())
    }

    /// R4 as the contract states it: a contact's priority in a drain is the highest priority
    /// among its intents' decisions; stable, highest first; partition decisions last.
    fn drain(&mut self) -> Vec<D> {
        let mut best: HashMap<usize, i32> = HashMap::new();
        for (g, p, _) in &self.out {
            if let (Group::Contact(c), Some(p)) = (g, p) {
                let e = best.entry(*c).or_insert(i32::MIN);
                *e = (*e).max(*p);
            }
        }
        let key = |g: &Group| -> i64 {
            match g {
                Group::Contact(c) => i64::from(best.get(c).copied().unwrap_or(i32::MIN)),
                Group::Loose(p) => i64::from(*p),
                Group::Partition => i64::MIN,
            }
        };
        let mut all: Vec<(i64, D)> = self.out.drain(..).map(|(g, _, d)| (key(&g), d)).collect();
        all.sort_by_key(|(k, _)| Reverse(*k));
        all.into_iter().map(|(_, d)| d).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Streams.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Send {
    /// A fresh intent: `seq` 0 means assigned.
    New {
        contact: usize,
        seq: u64,
        expected_version: u64,
        priority: i32,
    },
    /// The same record content again (Kafka redelivery, producer retry), or an operator's
    /// re-submission of it.
    Redeliver { pick: Index, resubmission: bool },
    /// An operator re-submits an intent that is in manual review (per the store).
    Resubmit { pick: Index },
    /// The same `intent_id` with different content.
    Reuse { pick: Index },
    /// Malformed input.
    Invalid { empty_id: bool },
}

#[derive(Clone, Debug)]
enum Op {
    Batch(Vec<(Send, u64)>),
    Tick {
        dt: u64,
        backwards: bool,
    },
    Release {
        contact: usize,
        skip_to: Option<u64>,
    },
    ExportImport,
    /// The process dies: a new sequencer is rebuilt from the contact snapshots the store got
    /// from `take_dirty` (the recent-outcome window and the pause state are lost).
    Crash,
}

#[derive(Clone, Debug)]
struct Case {
    contacts: usize,
    policy: TimeoutPolicy,
    per_contact: u32,
    per_partition: usize,
    ops: Vec<Op>,
}

fn send() -> impl Strategy<Value = Send> {
    let seq = prop_oneof![2 => Just(0u64), 3 => 1u64..=8];
    let version = prop_oneof![4 => Just(0u64), 1 => 1u64..=4];
    prop_oneof![
        12 => (0usize..5, seq, version, -2i32..=2).prop_map(|(contact, seq, expected_version, priority)| {
            Send::New { contact, seq, expected_version, priority }
        }),
        5 => (any::<Index>(), prop::bool::weighted(0.4))
            .prop_map(|(pick, resubmission)| Send::Redeliver { pick, resubmission }),
        3 => any::<Index>().prop_map(|pick| Send::Resubmit { pick }),
        1 => any::<Index>().prop_map(|pick| Send::Reuse { pick }),
        1 => prop::bool::ANY.prop_map(|empty_id| Send::Invalid { empty_id }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let dt = prop_oneof![6 => 0u64..40, 1 => 200u64..700];
    let tick = prop_oneof![3 => 0u64..400, 2 => 900u64..1_300, 1 => Just(3_000u64)];
    prop_oneof![
        8 => prop::collection::vec((send(), dt), 1..=4).prop_map(Op::Batch),
        3 => (tick, prop::bool::weighted(0.05)).prop_map(|(dt, backwards)| Op::Tick { dt, backwards }),
        2 => (0usize..5, prop::option::weighted(0.6, 0u64..=10))
            .prop_map(|(contact, skip_to)| Op::Release { contact, skip_to }),
        1 => Just(Op::ExportImport),
        1 => Just(Op::Crash),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        3usize..=5,
        prop_oneof![Just(TimeoutPolicy::Hold), Just(TimeoutPolicy::Skip)],
        2u32..=4,
        4usize..=8,
        prop::collection::vec(op(), 1..=30),
    )
        .prop_map(|(contacts, policy, per_contact, per_partition, ops)| Case {
            contacts,
            policy,
            per_contact,
            per_partition,
            ops,
        })
}

impl Case {
    fn config(&self) -> Config {
        Config {
            wait_timeout: Duration::from_millis(TIMEOUT_MS),
            on_timeout: self.policy,
            max_pending_per_contact: self.per_contact,
            max_pending_per_partition: self.per_partition,
            resume_pending_below: (self.per_partition / 2).max(1),
            // About as many bytes as intents (sizes are 0..200): either bound may pause first.
            max_pending_bytes_per_partition: self.per_partition as u64 * 100,
            resume_pending_bytes_below: (self.per_partition as u64 * 50).max(1),
            recent_outcomes_capacity: WINDOW,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The harness.
// ---------------------------------------------------------------------------------------------

/// A record's size, varied but reproducible (0 to 199 bytes).
fn size_of(offset: i64) -> u32 {
    (offset.unsigned_abs() * 37 % 200) as u32
}

/// What one run over a stream leaves behind.
struct Run {
    /// Every decision, in drain order.
    log: Vec<D>,
    /// Offsets of the records fed, in order.
    offsets: Vec<i64>,
    final_state: PartitionSnapshot<u64>,
    backlog_waiting: usize,
}

/// Applies `case` to a real sequencer (and, if `model` is set, to the model, comparing after
/// every operation). `priority` rewrites each record's priority (for the R4 comparison).
fn run(
    case: &Case,
    model: bool,
    priority: impl Fn(&IntentMeta) -> i32,
) -> Result<Run, TestCaseError> {
    let cfg = case.config();
    let mut real: Sequencer<u64> =
        Sequencer::new(cfg.clone()).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut reference = model.then(|| Model::new(cfg.clone()));
    let mut store: HashMap<String, PriorOutcome> = HashMap::new();
    // Contact rows, upserted from `take_dirty`, in first-insertion order.
    let mut rows: Vec<ContactSnapshot<u64>> = Vec::new();
    let mut row_of: HashMap<String, usize> = HashMap::new();
    let mut sent: Vec<IntentMeta> = Vec::new();
    let mut clock = 0u64;
    let mut next_offset = 0i64;
    let mut log = Vec::new();
    let mut offsets = Vec::new();
    let contact = |c: usize| format!("c{}", c % case.contacts);

    for op in &case.ops {
        match op {
            Op::Batch(sends) => {
                // Like the pipeline: one store lookup for the batch, before deciding it.
                let snapshot_of_store = store.clone();
                // What an operator sees in the manual-review queue.
                let in_review: Vec<IntentMeta> = sent
                    .iter()
                    .filter(|m| {
                        store.get(&m.intent_id).is_some_and(|p| {
                            p.fingerprint == m.fingerprint
                                && matches!(p.outcome, Outcome::ManualReview { .. })
                        })
                    })
                    .cloned()
                    .collect();
                for (send, dt) in sends {
                    clock += dt;
                    let offset = next_offset;
                    next_offset += 1;
                    let mut meta = match send {
                        Send::New {
                            contact: c,
                            seq,
                            expected_version,
                            priority,
                        } => IntentMeta {
                            intent_id: format!("i{offset}"),
                            contact_id: contact(*c),
                            causal_sequence: *seq,
                            expected_version: *expected_version,
                            priority: *priority,
                            fingerprint: offset as u64 * 1_000,
                            offset,
                            resubmission: false,
                            size: size_of(offset),
                        },
                        Send::Redeliver { pick, resubmission } if !sent.is_empty() => IntentMeta {
                            resubmission: *resubmission,
                            ..sent[pick.index(sent.len())].clone()
                        },
                        Send::Resubmit { pick } if !in_review.is_empty() => IntentMeta {
                            resubmission: true,
                            ..in_review[pick.index(in_review.len())].clone()
                        },
                        Send::Reuse { pick } if !sent.is_empty() => {
                            let original = &sent[pick.index(sent.len())];
                            IntentMeta {
                                fingerprint: original.fingerprint + 1 + offset as u64,
                                causal_sequence: 0,
                                ..original.clone()
                            }
                        }
                        Send::Redeliver { .. } | Send::Resubmit { .. } | Send::Reuse { .. } => {
                            IntentMeta {
                                intent_id: format!("i{offset}"),
                                contact_id: contact(0),
                                causal_sequence: 0,
                                expected_version: 0,
                                priority: 0,
                                fingerprint: offset as u64 * 1_000,
                                offset,
                                resubmission: false,
                                size: size_of(offset),
                            }
                        }
                        Send::Invalid { empty_id } => IntentMeta {
                            intent_id: if *empty_id {
                                String::new()
                            } else {
                                format!("i{offset}")
                            },
                            contact_id: contact(1),
                            causal_sequence: if *empty_id { 1 } else { u64::MAX },
                            expected_version: 0,
                            priority: 1,
                            fingerprint: 7,
                            offset,
                            resubmission: false,
                            size: 0,
                        },
                    };
                    meta.offset = offset;
                    if !matches!(send, Send::Invalid { .. }) {
                        sent.push(meta.clone());
                    }
                    meta.priority = priority(&meta);
                    let prior = snapshot_of_store.get(&meta.intent_id).copied();
                    offsets.push(offset);
                    real.on_intent(meta.clone(), offset as u64, prior, Millis(clock));
                    if let Some(m) = reference.as_mut() {
                        m.on_intent(meta, offset as u64, prior, clock);
                    }
                }
            }
            Op::Tick { dt, backwards } => {
                let at = if *backwards {
                    clock.saturating_sub(*dt)
                } else {
                    clock += dt;
                    clock
                };
                real.on_tick(Millis(at));
                if let Some(m) = reference.as_mut() {
                    m.on_tick(at);
                }
            }
            Op::Release {
                contact: c,
                skip_to,
            } => {
                let release = skip_to.map_or(Release::Resume, Release::SkipTo);
                let got = real.release(&contact(*c), release, Millis(clock));
                if let Some(m) = reference.as_mut() {
                    let want = m.release(&contact(*c), release, clock);
                    prop_assert_eq!(got, want);
                }
            }
            Op::ExportImport => {
                // Through serde, as a store or a handover would do it.
                let exported = real.export();
                let json = serde_json::to_string(&exported)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let back: PartitionSnapshot<u64> =
                    serde_json::from_str(&json).map_err(|e| TestCaseError::fail(e.to_string()))?;
                real = Sequencer::import(cfg.clone(), back)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(real.export(), exported);
            }
            Op::Crash => {
                real =
                    Sequencer::new(cfg.clone()).map_err(|e| TestCaseError::fail(e.to_string()))?;
                real.restore(rows.clone())
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                if let Some(m) = reference.as_mut() {
                    m.crash();
                }
            }
        }
        let mut decisions = Vec::new();
        real.drain_decisions(&mut decisions);
        if let Some(m) = reference.as_mut() {
            let expected = m.drain();
            prop_assert_eq!(&decisions, &expected, "decisions differ after {:?}", op);
            prop_assert_eq!(real.waiting_count(), m.waiting());
            prop_assert_eq!(real.is_paused(), m.paused);
            for c in &m.contacts {
                let view = real.contact(&c.id);
                let got = view.map(|v| {
                    (
                        v.resolved_through,
                        v.version,
                        v.next_sequence,
                        v.hold.map(|h| (h.since.0, h.reason)),
                    )
                });
                prop_assert_eq!(got, Some((c.resolved, c.version, c.next, c.hold)));
            }
            prop_assert_eq!(real.contact_count(), m.contacts.len());
        }
        // Flush outcomes to the store, as the pipeline does after each batch.
        for d in &decisions {
            let (meta, outcome) = match d {
                D::Commit {
                    intent,
                    commit_sequence,
                    contact_version,
                } => (
                    &intent.meta,
                    Outcome::Committed {
                        commit_sequence: *commit_sequence,
                        contact_version: *contact_version,
                    },
                ),
                D::Blocked {
                    intent,
                    commit_sequence,
                    reason,
                } if reason.code() != Reason::IdempotencyConflict => (
                    &intent.meta,
                    Outcome::Blocked {
                        reason: reason.code(),
                        commit_sequence: *commit_sequence,
                    },
                ),
                D::ManualReview {
                    intent,
                    commit_sequence,
                    reason,
                } if reason.code() != Reason::InvalidIntent => (
                    &intent.meta,
                    Outcome::ManualReview {
                        reason: reason.code(),
                        commit_sequence: *commit_sequence,
                    },
                ),
                _ => continue,
            };
            let prior = PriorOutcome {
                fingerprint: meta.fingerprint,
                outcome,
            };
            store.insert(meta.intent_id.clone(), prior);
        }
        log.extend(decisions);
        for row in real.take_dirty() {
            match row_of.get(&row.contact_id) {
                Some(&i) => rows[i] = row,
                None => {
                    row_of.insert(row.contact_id.clone(), rows.len());
                    rows.push(row);
                }
            }
        }
    }
    Ok(Run {
        log,
        offsets,
        backlog_waiting: real.backlog().waiting,
        final_state: real.export(),
    })
}

// ---------------------------------------------------------------------------------------------
// Properties checked on every case.
// ---------------------------------------------------------------------------------------------

/// R1: per contact, every commit is at `resolved + 1` of the resolutions seen so far (commits,
/// version-conflict blocks and skips), so commit sequences strictly increase, never repeat,
/// and every gap is explained by a Blocked or Skipped decision. Versions count commits.
fn check_r1(run: &Run) -> Result<(), TestCaseError> {
    let mut resolved: HashMap<&str, (u64, u64)> = HashMap::new();
    for d in &run.log {
        let Some(contact) = d.contact_id() else {
            continue;
        };
        let (mark, version) = resolved.entry(contact).or_insert((0, 0));
        match d {
            D::Commit {
                commit_sequence,
                contact_version,
                ..
            } => {
                prop_assert_eq!(
                    *commit_sequence,
                    *mark + 1,
                    "commit out of causal order: {:?}",
                    d
                );
                prop_assert_eq!(*contact_version, *version + 1);
                *mark = *commit_sequence;
                *version = *contact_version;
            }
            D::Blocked {
                commit_sequence,
                reason: BlockReason::VersionConflict { .. },
                ..
            } => {
                prop_assert_eq!(*commit_sequence, *mark + 1);
                *mark = *commit_sequence;
            }
            D::Skipped { from, to, .. } => {
                prop_assert_eq!(*from, *mark + 1);
                prop_assert!(to >= from);
                *mark = *to;
            }
            _ => {}
        }
    }
    for c in &run.final_state.contacts {
        let (mark, version) = resolved
            .get(c.contact_id.as_str())
            .copied()
            .unwrap_or((0, 0));
        prop_assert_eq!((c.resolved_through, c.version), (mark, version));
    }
    Ok(())
}

/// R5: no `intent_id` commits twice.
fn check_r5(run: &Run) -> Result<(), TestCaseError> {
    let mut committed = HashMap::new();
    for d in &run.log {
        if let D::Commit { intent, .. } = d {
            let n = committed.entry(intent.meta.intent_id.as_str()).or_insert(0);
            *n += 1;
            prop_assert_eq!(*n, 1, "{} committed twice", intent.meta.intent_id);
        }
    }
    Ok(())
}

/// R8: each record gets exactly one outcome, or a Wait followed by exactly one terminal outcome,
/// or is still waiting at the end, and the backlog counts exactly those.
fn check_r8(run: &Run) -> Result<(), TestCaseError> {
    let mut states: BTreeMap<i64, Vec<State>> = BTreeMap::new();
    for d in &run.log {
        if let (Some(offset), Some(state)) = (d.offset(), d.state()) {
            states.entry(offset).or_default().push(state);
        }
    }
    let still_waiting: Vec<i64> = run
        .final_state
        .contacts
        .iter()
        .flat_map(|c| c.waiting.iter().map(|w| w.intent.meta.offset))
        .collect();
    prop_assert_eq!(
        states.len(),
        run.offsets.len(),
        "some record got no decision"
    );
    let mut open = Vec::new();
    for offset in &run.offsets {
        let seen = states.get(offset).map(Vec::as_slice).unwrap_or_default();
        match seen {
            [s] if s.is_terminal() => {}
            [State::WaitingPreviousCommit, s] if s.is_terminal() => {}
            [State::WaitingPreviousCommit] => open.push(*offset),
            other => prop_assert!(false, "offset {} got {:?}", offset, other),
        }
    }
    let mut still = still_waiting.clone();
    still.sort_unstable();
    prop_assert_eq!(&open, &still);
    prop_assert_eq!(run.backlog_waiting, open.len());
    Ok(())
}

/// R4: the per-contact decision sequences do not depend on priorities.
fn per_contact(log: &[D]) -> BTreeMap<String, Vec<D>> {
    let mut by_contact: BTreeMap<String, Vec<D>> = BTreeMap::new();
    for d in log {
        let invalid = matches!(
            d,
            D::ManualReview {
                reason: ReviewReason::InvalidIntent { .. },
                ..
            }
        );
        let Some(contact) = d.contact_id().filter(|_| !invalid) else {
            continue;
        };
        let mut d = d.clone();
        if let D::Commit { intent, .. }
        | D::Duplicate { intent, .. }
        | D::Blocked { intent, .. }
        | D::ManualReview { intent, .. } = &mut d
        {
            intent.meta.priority = 0;
        }
        by_contact.entry(contact.to_owned()).or_default().push(d);
    }
    by_contact
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 10_000,
        max_shrink_iters: 20_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn sequencer_matches_the_model_and_keeps_r1_r4_r5_r8(case in case()) {
        let run_a = run(&case, true, |m| m.priority)?;
        check_r1(&run_a)?;
        check_r5(&run_a)?;
        check_r8(&run_a)?;
        // R4: the same stream with unrelated priorities gives the same per-contact story.
        let run_b = run(&case, false, |m| ((m.offset * 7_919) % 11) as i32 - 5)?;
        prop_assert_eq!(per_contact(&run_a.log), per_contact(&run_b.log));
        check_r1(&run_b)?;
    }
}
