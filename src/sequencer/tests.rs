//! One test (at least) per contract rule, plus the seed story's scenarios.

use std::time::Duration;

use super::contact::Contact;
use super::*;

type Seq = Sequencer<u32>;

fn config() -> Config {
    Config {
        wait_timeout: Duration::from_millis(1_000),
        ..Config::default()
    }
}

fn sequencer() -> Seq {
    match Sequencer::new(config()) {
        Ok(s) => s,
        Err(e) => panic!("default test config is valid: {e}"),
    }
}

fn fingerprint(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// An assigned-sequence intent with no guard; adjust with struct update syntax.
fn m(id: &str, contact: &str) -> IntentMeta {
    IntentMeta {
        intent_id: id.to_owned(),
        contact_id: contact.to_owned(),
        causal_sequence: 0,
        expected_version: 0,
        priority: 0,
        fingerprint: fingerprint(id),
        offset: 0,
        resubmission: false,
        size: 0,
    }
}

fn strict(id: &str, contact: &str, seq: u64) -> IntentMeta {
    IntentMeta {
        causal_sequence: seq,
        ..m(id, contact)
    }
}

fn drain(s: &mut Seq) -> Vec<Decision<u32>> {
    let mut out = Vec::new();
    s.drain_decisions(&mut out);
    out
}

fn feed(s: &mut Seq, meta: IntentMeta, now: u64) -> Vec<String> {
    s.on_intent(meta, 0, None, Millis(now));
    show(&drain(s))
}

fn tick(s: &mut Seq, now: u64) -> Vec<String> {
    s.on_tick(Millis(now));
    show(&drain(s))
}

/// One short line per decision, so expectations read like an audit log.
fn show(decisions: &[Decision<u32>]) -> Vec<String> {
    decisions.iter().map(line).collect()
}

fn line(d: &Decision<u32>) -> String {
    let id = |i: &Intent<u32>| format!("{}/{}", i.meta.contact_id, i.meta.intent_id);
    match d {
        Decision::Commit {
            intent,
            commit_sequence,
            contact_version,
        } => format!(
            "commit {} #{commit_sequence} v{contact_version}",
            id(intent)
        ),
        Decision::Wait {
            intent_id,
            contact_id,
            commit_sequence,
            missing,
            ..
        } => format!("wait {contact_id}/{intent_id} #{commit_sequence} missing {missing}"),
        Decision::Duplicate { intent, prior } => {
            format!("duplicate {} of {}", id(intent), prior.state())
        }
        Decision::Blocked {
            intent,
            commit_sequence,
            reason,
        } => format!(
            "blocked {} #{commit_sequence} {}",
            id(intent),
            reason.code()
        ),
        Decision::ManualReview {
            intent,
            commit_sequence,
            reason,
        } => format!("review {} #{commit_sequence} {}", id(intent), reason.code()),
        Decision::Skipped {
            contact_id,
            from,
            to,
            ..
        } => format!("skipped {contact_id} {from}..={to}"),
        Decision::ContactHeld { contact_id, reason } => {
            format!("held {contact_id} {}", reason.code())
        }
        Decision::ContactReleased {
            contact_id,
            resolved_through,
            ..
        } => format!("released {contact_id} through {resolved_through}"),
        Decision::PausePartition { waiting } => format!("pause {waiting}"),
        Decision::ResumePartition { waiting } => format!("resume {waiting}"),
    }
}

#[test]
fn states_and_reasons_have_contract_names() {
    let states: Vec<&str> = State::ALL.iter().map(|s| s.as_str()).collect();
    assert_eq!(
        states,
        [
            "committed_causal",
            "waiting_previous_commit",
            "duplicate",
            "blocked_conflict",
            "manual_review"
        ]
    );
    let reasons: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(
        reasons,
        [
            "WAIT_TIMEOUT",
            "CONTACT_ON_HOLD",
            "VERSION_CONFLICT",
            "SEQUENCE_CONFLICT",
            "IDEMPOTENCY_CONFLICT",
            "CONTACT_BACKLOG_OVERFLOW",
            "INVALID_INTENT",
            "UNPROCESSABLE"
        ]
    );
    assert_eq!(State::ManualReview.to_string(), "manual_review");
    assert!(!State::WaitingPreviousCommit.is_terminal());
}

#[test]
fn states_and_reasons_parse_back_from_their_names_and_refuse_anything_else() {
    for state in State::ALL {
        assert_eq!(state.as_str().parse::<State>(), Ok(state));
    }
    for reason in Reason::ALL {
        assert_eq!(reason.as_str().parse::<Reason>(), Ok(reason));
    }
    assert!("committed".parse::<State>().is_err());
    assert!("invalid_intent".parse::<Reason>().is_err());
    assert!("".parse::<Reason>().is_err());
}

#[test]
fn r1_commits_of_a_contact_are_gapless_strictly_increasing_and_never_repeated() {
    let mut s = sequencer();
    // Arrival order 5,3,1,4,2 with a redelivery of 3 after it committed.
    let mut all = Vec::new();
    for (n, seq) in [5u64, 3, 1, 4, 2, 3].into_iter().enumerate() {
        s.on_intent(
            strict(&format!("i{seq}"), "c", seq),
            0,
            None,
            Millis(n as u64),
        );
        all.extend(drain(&mut s));
    }
    let commits: Vec<u64> = all
        .iter()
        .filter_map(|d| match d {
            Decision::Commit {
                commit_sequence, ..
            } => Some(*commit_sequence),
            _ => None,
        })
        .collect();
    assert_eq!(commits, [1, 2, 3, 4, 5]);
}

#[test]
fn r2_causal_sequence_is_the_commit_sequence_and_gaps_wait() {
    let mut s = sequencer();
    assert_eq!(
        feed(&mut s, strict("b", "c", 2), 0),
        ["wait c/b #2 missing 1"]
    );
    assert_eq!(
        feed(&mut s, strict("a", "c", 1), 1),
        ["commit c/a #1 v1", "commit c/b #2 v2"]
    );
}

#[test]
fn r2_assigned_sequence_goes_after_everything_resolved_or_reserved() {
    let mut s = sequencer();
    assert_eq!(feed(&mut s, m("a", "c"), 0), ["commit c/a #1 v1"]);
    assert_eq!(
        feed(&mut s, strict("x", "c", 4), 0),
        ["wait c/x #4 missing 2"]
    );
    // Assigned at first sight, after the waiting strict intent.
    assert_eq!(feed(&mut s, m("y", "c"), 0), ["wait c/y #5 missing 2"]);
    assert_eq!(feed(&mut s, strict("p", "c", 2), 0), ["commit c/p #2 v2"]);
    assert_eq!(
        feed(&mut s, strict("q", "c", 3), 0),
        ["commit c/q #3 v3", "commit c/x #4 v4", "commit c/y #5 v5"]
    );
    assert_eq!(feed(&mut s, m("z", "c"), 0), ["commit c/z #6 v6"]);
}

#[test]
fn r3_a_blocked_predecessor_resolves_its_slot_and_releases_successors() {
    let mut s = sequencer();
    assert_eq!(
        feed(&mut s, strict("b", "c", 2), 0),
        ["wait c/b #2 missing 1"]
    );
    let stale = IntentMeta {
        expected_version: 7,
        ..strict("a", "c", 1)
    };
    assert_eq!(
        feed(&mut s, stale, 0),
        ["blocked c/a #1 VERSION_CONFLICT", "commit c/b #2 v1"]
    );
}

#[test]
fn r3_waiting_intents_are_data_exported_and_imported_exactly() {
    let mut s = sequencer();
    feed(&mut s, strict("w3", "c", 3), 10);
    feed(&mut s, strict("w4", "c", 4), 20);
    feed(&mut s, strict("d2", "d", 2), 30);
    let exported = s.export();
    assert_eq!(exported.contacts[0].waiting.len(), 2);
    assert_eq!(exported.contacts[0].gap_since, Some(Millis(10)));
    let Ok(mut copy) = Sequencer::import(config(), exported.clone()) else {
        panic!("import of an export")
    };
    assert_eq!(copy.export(), exported);
    assert_eq!(copy.waiting_count(), 3);
    // Same continuation, same decisions: including the timeout of contact d.
    for seq in [&mut s, &mut copy] {
        let mut out = feed(seq, strict("w2", "c", 2), 500);
        out.extend(feed(seq, strict("w1", "c", 1), 600));
        out.extend(tick(seq, 1_100));
        out.extend(tick(seq, 1_031));
        assert_eq!(
            out,
            [
                "wait c/w2 #2 missing 1",
                "commit c/w1 #1 v1",
                "commit c/w2 #2 v2",
                "commit c/w3 #3 v3",
                "commit c/w4 #4 v4",
                "held d WAIT_TIMEOUT",
                "review d/d2 #2 WAIT_TIMEOUT"
            ]
        );
    }
}

#[test]
fn r4_priority_orders_contacts_never_within_a_contact() {
    let mut s = sequencer();
    let with = |meta: IntentMeta, priority| IntentMeta { priority, ..meta };
    // One drain: low-priority contact a first in arrival, then urgent b, then a's early
    // intent that is now ready, then c with a middle priority.
    s.on_intent(with(strict("a2", "a", 2), -5), 0, None, Millis(0));
    s.on_intent(with(strict("b1", "b", 1), 9), 0, None, Millis(0));
    s.on_intent(with(strict("a1", "a", 1), 1), 0, None, Millis(0));
    s.on_intent(with(strict("c1", "c", 1), 1), 0, None, Millis(0));
    s.on_intent(with(strict("c2", "c", 2), 0), 0, None, Millis(0));
    assert_eq!(
        show(&drain(&mut s)),
        [
            "commit b/b1 #1 v1",
            // a and c both reach priority 1: a appeared first, and a's own order is kept
            // although a2 (-5) is lower than a1 (1).
            "wait a/a2 #2 missing 1",
            "commit a/a1 #1 v1",
            "commit a/a2 #2 v2",
            "commit c/c1 #1 v1",
            "commit c/c2 #2 v2",
        ]
    );
    // The same stream with priorities reversed gives the same per-contact sequences.
    let mut r = sequencer();
    r.on_intent(with(strict("a2", "a", 2), 5), 0, None, Millis(0));
    r.on_intent(with(strict("b1", "b", 1), -9), 0, None, Millis(0));
    r.on_intent(with(strict("a1", "a", 1), -1), 0, None, Millis(0));
    r.on_intent(with(strict("c1", "c", 1), -1), 0, None, Millis(0));
    r.on_intent(with(strict("c2", "c", 2), 0), 0, None, Millis(0));
    assert_eq!(
        show(&drain(&mut r)),
        [
            "wait a/a2 #2 missing 1",
            "commit a/a1 #1 v1",
            "commit a/a2 #2 v2",
            "commit c/c1 #1 v1",
            "commit c/c2 #2 v2",
            "commit b/b1 #1 v1",
        ]
    );
}

#[test]
fn r5_redelivery_is_a_duplicate_with_no_effect_whether_waiting_resolved_or_only_in_the_store() {
    let mut s = sequencer();
    assert_eq!(feed(&mut s, m("a", "c"), 0), ["commit c/a #1 v1"]);
    assert_eq!(
        feed(&mut s, m("a", "c"), 0),
        ["duplicate c/a of committed_causal"]
    );
    feed(&mut s, strict("w", "c", 5), 0);
    assert_eq!(
        feed(&mut s, strict("w", "c", 5), 0),
        ["duplicate c/w of waiting_previous_commit"]
    );
    let prior = PriorOutcome {
        fingerprint: fingerprint("old"),
        outcome: Outcome::Committed {
            commit_sequence: 9,
            contact_version: 9,
        },
    };
    s.on_intent(m("old", "c"), 0, Some(prior), Millis(0));
    assert_eq!(
        show(&drain(&mut s)),
        ["duplicate c/old of committed_causal"]
    );
    let view = s
        .contact("c")
        .map(|v| (v.resolved_through, v.version, v.next_sequence));
    assert_eq!(view, Some((1, 1, 6)), "duplicates change nothing");
}

#[test]
fn r5_same_intent_id_different_content_is_idempotency_conflict() {
    let mut s = sequencer();
    feed(&mut s, m("a", "c"), 0);
    let changed = IntentMeta {
        fingerprint: 42,
        ..m("a", "c")
    };
    assert_eq!(
        feed(&mut s, changed.clone(), 0),
        ["blocked c/a #0 IDEMPOTENCY_CONFLICT"]
    );
    // Also against a waiting intent, and against the store's prior.
    feed(&mut s, strict("w", "c", 3), 0);
    let changed_w = IntentMeta {
        fingerprint: 42,
        ..strict("w", "c", 3)
    };
    assert_eq!(
        feed(&mut s, changed_w, 0),
        ["blocked c/w #0 IDEMPOTENCY_CONFLICT"]
    );
    let prior = PriorOutcome {
        fingerprint: 7,
        outcome: Outcome::Blocked {
            reason: Reason::VersionConflict,
            commit_sequence: 1,
        },
    };
    s.on_intent(m("s", "c"), 0, Some(prior), Millis(0));
    let out = drain(&mut s);
    assert!(matches!(
        &out[..],
        [Decision::Blocked {
            reason: BlockReason::IdempotencyConflict {
                existing_fingerprint: 7,
                ..
            },
            ..
        }]
    ));
    // The original outcome stands: a redelivery of the original is still a duplicate.
    assert_eq!(
        feed(&mut s, m("a", "c"), 0),
        ["duplicate c/a of committed_causal"]
    );
}

#[test]
fn r5_manual_review_is_reopened_only_by_a_resubmission_which_reclaims_its_slot() {
    let mut s = sequencer();
    feed(&mut s, m("a", "c"), 0); // #1
    feed(&mut s, strict("x", "c", 3), 0);
    assert_eq!(feed(&mut s, m("y", "c"), 0), ["wait c/y #4 missing 2"]);
    assert_eq!(
        tick(&mut s, 1_001),
        [
            "held c WAIT_TIMEOUT",
            "review c/x #3 WAIT_TIMEOUT",
            "review c/y #4 WAIT_TIMEOUT"
        ]
    );
    assert_eq!(
        feed(&mut s, m("y", "c"), 1_002),
        ["duplicate c/y of manual_review"]
    );
    let again = IntentMeta {
        resubmission: true,
        ..m("y", "c")
    };
    // Still held: reviewed again, keeping its slot for later.
    assert_eq!(
        feed(&mut s, again.clone(), 1_003),
        ["review c/y #4 CONTACT_ON_HOLD"]
    );
    assert_eq!(s.release("c", Release::SkipTo(3), Millis(1_004)), Ok(()));
    assert_eq!(
        show(&drain(&mut s)),
        ["skipped c 2..=2", "released c through 2"]
    );
    assert_eq!(feed(&mut s, again, 1_005), ["wait c/y #4 missing 3"]);
    let x_again = IntentMeta {
        resubmission: true,
        ..strict("x", "c", 3)
    };
    assert_eq!(
        feed(&mut s, x_again.clone(), 1_006),
        ["commit c/x #3 v2", "commit c/y #4 v3"]
    );
    // Committed is final, even for a resubmission.
    assert_eq!(
        feed(&mut s, x_again, 1_007),
        ["duplicate c/x of committed_causal"]
    );
}

#[test]
fn r5_recent_window_is_bounded_and_the_store_prior_covers_what_it_forgot() {
    let mut s = match Sequencer::new(Config {
        recent_outcomes_capacity: 2,
        ..config()
    }) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    for (id, contact) in [("a", "x"), ("b", "y"), ("c", "z")] {
        feed(&mut s, m(id, contact), 0);
    }
    assert_eq!(s.recent.len(), 2);
    // "b" is still in memory: duplicate without help.
    assert_eq!(
        feed(&mut s, m("b", "y"), 0),
        ["duplicate y/b of committed_causal"]
    );
    // "a" was forgotten: the store's prior is what keeps it a duplicate.
    let prior = PriorOutcome {
        fingerprint: fingerprint("a"),
        outcome: Outcome::Committed {
            commit_sequence: 1,
            contact_version: 1,
        },
    };
    s.on_intent(m("a", "x"), 0, Some(prior), Millis(0));
    assert_eq!(show(&drain(&mut s)), ["duplicate x/a of committed_causal"]);
    assert_eq!(s.recent.len(), 2);
}

#[test]
fn r6_version_conflict_blocks_without_effect_and_frees_the_slot() {
    let mut s = sequencer();
    feed(&mut s, m("a", "c"), 0);
    let stale = IntentMeta {
        expected_version: 3,
        ..m("b", "c")
    };
    s.on_intent(stale, 0, None, Millis(0));
    let out = drain(&mut s);
    assert!(matches!(
        &out[..],
        [Decision::Blocked {
            commit_sequence: 2,
            reason: BlockReason::VersionConflict {
                expected: 3,
                actual: 1
            },
            ..
        }]
    ));
    assert_eq!(out[0].state(), Some(State::BlockedConflict));
    let view = s.contact("c").map(|v| (v.resolved_through, v.version));
    assert_eq!(view, Some((2, 1)), "slot resolved, version unchanged");
    let fresh = IntentMeta {
        expected_version: 1,
        ..m("d", "c")
    };
    assert_eq!(feed(&mut s, fresh, 0), ["commit c/d #3 v2"]);
}

#[test]
fn r6_a_second_claim_on_a_waiting_slot_is_a_sequence_conflict_and_the_owner_keeps_it() {
    let mut s = sequencer();
    feed(&mut s, strict("x", "c", 2), 0);
    s.on_intent(strict("y", "c", 2), 0, None, Millis(0));
    let out = drain(&mut s);
    assert!(matches!(
        &out[..],
        [Decision::Blocked {
            reason: BlockReason::SequenceConflict { claimed: 2, owner: Some(owner), .. },
            ..
        }] if owner == "x"
    ));
    assert_eq!(
        feed(&mut s, strict("w", "c", 1), 0),
        ["commit c/w #1 v1", "commit c/x #2 v2"]
    );
}

#[test]
fn r6_a_sequence_already_passed_is_a_sequence_conflict() {
    let mut s = sequencer();
    feed(&mut s, strict("a", "c", 1), 0);
    assert_eq!(
        feed(&mut s, strict("b", "c", 1), 0),
        ["blocked c/b #1 SEQUENCE_CONFLICT"]
    );
    assert_eq!(
        feed(&mut s, strict("b", "c", 1), 0),
        ["duplicate c/b of blocked_conflict"]
    );
    assert_eq!(s.contact("c").map(|v| v.version), Some(1));
}

#[test]
fn r7_wait_timeout_sends_waiting_to_manual_review_and_holds_contact() {
    let mut s = sequencer();
    feed(&mut s, strict("b", "c", 2), 100);
    feed(&mut s, strict("d", "c", 4), 600);
    assert_eq!(s.next_timeout_at(), Some(Millis(1_101)));
    assert!(
        tick(&mut s, 1_100).is_empty(),
        "exactly wait_timeout is not longer"
    );
    s.on_tick(Millis(1_101));
    let out = drain(&mut s);
    assert_eq!(
        show(&out),
        [
            "held c WAIT_TIMEOUT",
            "review c/b #2 WAIT_TIMEOUT",
            "review c/d #4 WAIT_TIMEOUT"
        ]
    );
    assert!(matches!(
        &out[1],
        Decision::ManualReview {
            reason: ReviewReason::WaitTimeout {
                missing: 1,
                waited_ms: 1_001
            },
            ..
        }
    ));
    assert!(matches!(
        &out[2],
        Decision::ManualReview {
            reason: ReviewReason::WaitTimeout {
                missing: 1,
                waited_ms: 501
            },
            ..
        }
    ));
    assert_eq!(s.waiting_count(), 0);
    assert_eq!(s.held_contacts().len(), 1);
    assert_eq!(s.next_timeout_at(), None);
}

#[test]
fn r7_a_held_contact_sends_later_intents_to_manual_review_until_released() {
    let mut s = sequencer();
    feed(&mut s, strict("b", "c", 2), 0);
    tick(&mut s, 2_000);
    assert_eq!(
        feed(&mut s, m("n", "c"), 2_001),
        ["review c/n #0 CONTACT_ON_HOLD"]
    );
    // Even the missing predecessor goes to review while held: nothing moves on its own.
    assert_eq!(
        feed(&mut s, strict("a", "c", 1), 2_002),
        ["review c/a #1 CONTACT_ON_HOLD"]
    );
    assert_eq!(
        feed(&mut s, m("o", "other"), 2_003),
        ["commit other/o #1 v1"]
    );
}

#[test]
fn r7_release_resume_clears_the_hold_and_leaves_slots_unresolved() {
    let mut s = sequencer();
    feed(&mut s, strict("b", "c", 2), 0);
    tick(&mut s, 2_000);
    assert_eq!(s.release("c", Release::Resume, Millis(2_001)), Ok(()));
    assert_eq!(show(&drain(&mut s)), ["released c through 0"]);
    assert!(s.held_contacts().is_empty());
    assert_eq!(
        feed(&mut s, strict("a", "c", 1), 2_002),
        ["commit c/a #1 v1"]
    );
    // Slot 2 is unresolved until "b" is re-submitted.
    assert_eq!(feed(&mut s, m("n", "c"), 2_003), ["wait c/n #3 missing 2"]);
    let again = IntentMeta {
        resubmission: true,
        ..strict("b", "c", 2)
    };
    assert_eq!(
        feed(&mut s, again, 2_004),
        ["commit c/b #2 v2", "commit c/n #3 v3"]
    );
}

#[test]
fn r7_release_skip_to_audits_every_skipped_sequence() {
    let mut s = sequencer();
    feed(&mut s, m("a", "c"), 0);
    feed(&mut s, strict("e", "c", 5), 0);
    tick(&mut s, 2_000);
    assert_eq!(s.release("c", Release::SkipTo(6), Millis(2_001)), Ok(()));
    let out = drain(&mut s);
    assert_eq!(show(&out), ["skipped c 2..=5", "released c through 5"]);
    assert!(matches!(
        &out[0],
        Decision::Skipped {
            cause: SkipCause::Operator,
            ..
        }
    ));
    assert_eq!(feed(&mut s, m("f", "c"), 2_002), ["commit c/f #6 v2"]);
}

#[test]
fn r7_release_is_refused_for_unknown_or_not_held_contacts_and_far_targets() {
    let mut s = sequencer();
    assert!(matches!(
        s.release("nobody", Release::Resume, Millis(0)),
        Err(Error::UnknownContact { .. })
    ));
    feed(&mut s, m("a", "c"), 0);
    assert!(matches!(
        s.release("c", Release::Resume, Millis(0)),
        Err(Error::NotHeld { .. })
    ));
    assert!(matches!(
        s.release("c", Release::SkipTo(u64::MAX), Millis(0)),
        Err(Error::SkipTargetOutOfRange { .. })
    ));
    assert!(drain(&mut s).is_empty());
}

#[test]
fn r7_skip_policy_advances_past_the_gap_that_timed_out() {
    let mut s = match Sequencer::new(Config {
        on_timeout: TimeoutPolicy::Skip,
        ..config()
    }) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    feed(&mut s, strict("c3", "c", 3), 0);
    feed(&mut s, strict("c5", "c", 5), 500);
    s.on_tick(Millis(1_001));
    let out = drain(&mut s);
    assert_eq!(show(&out), ["skipped c 1..=2", "commit c/c3 #3 v1"]);
    assert_eq!(out[0].reason(), Some(Reason::WaitTimeout));
    // The next gap gets its own full wait_timeout from the progress.
    assert!(tick(&mut s, 2_001).is_empty());
    assert_eq!(
        tick(&mut s, 2_002),
        ["skipped c 4..=4", "commit c/c5 #5 v2"]
    );
    assert!(s.held_contacts().is_empty());
}

#[test]
fn r7_the_gap_clock_restarts_when_the_contact_progresses() {
    let mut s = sequencer();
    feed(&mut s, strict("c2", "c", 2), 0);
    feed(&mut s, strict("c4", "c", 4), 0);
    feed(&mut s, strict("c1", "c", 1), 900); // progress: now waiting on 3 since 900
    assert!(tick(&mut s, 1_500).is_empty());
    assert_eq!(
        tick(&mut s, 1_901),
        ["held c WAIT_TIMEOUT", "review c/c4 #4 WAIT_TIMEOUT"]
    );
}

#[test]
fn r7_manual_review_does_not_resolve_the_slot() {
    let mut s = sequencer();
    feed(&mut s, strict("c2", "c", 2), 0);
    tick(&mut s, 1_001);
    assert_eq!(s.release("c", Release::Resume, Millis(1_002)), Ok(()));
    drain(&mut s);
    assert_eq!(
        feed(&mut s, strict("c1", "c", 1), 1_003),
        ["commit c/c1 #1 v1"]
    );
    let view = s
        .contact("c")
        .map(|v| (v.resolved_through, v.next_sequence));
    assert_eq!(view, Some((1, 3)), "2 is unresolved and still reserved");
    assert_eq!(feed(&mut s, m("n", "c"), 1_004), ["wait c/n #3 missing 2"]);
}

#[test]
fn bounded_contact_overflow_goes_to_manual_review_and_holds_the_contact() {
    let mut s = match Sequencer::new(Config {
        max_pending_per_contact: 2,
        ..config()
    }) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    feed(&mut s, strict("c3", "c", 3), 0);
    feed(&mut s, strict("c4", "c", 4), 0);
    assert_eq!(
        feed(&mut s, m("n", "c"), 0),
        [
            "held c CONTACT_BACKLOG_OVERFLOW",
            "review c/c3 #3 CONTACT_BACKLOG_OVERFLOW",
            "review c/c4 #4 CONTACT_BACKLOG_OVERFLOW",
            "review c/n #0 CONTACT_BACKLOG_OVERFLOW"
        ]
    );
    assert_eq!(s.waiting_count(), 0, "memory freed");
    assert_eq!(
        feed(&mut s, m("later", "c"), 0),
        ["review c/later #0 CONTACT_ON_HOLD"]
    );
    // Neighbours are not stalled.
    assert_eq!(feed(&mut s, m("o", "other"), 0), ["commit other/o #1 v1"]);
}

#[test]
fn bounded_contact_backlog_never_overflows_an_intent_that_can_commit() {
    let mut s = match Sequencer::new(Config {
        max_pending_per_contact: 1,
        ..config()
    }) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    feed(&mut s, strict("c2", "c", 2), 0);
    assert_eq!(
        feed(&mut s, strict("c1", "c", 1), 0),
        ["commit c/c1 #1 v1", "commit c/c2 #2 v2"]
    );
}

#[test]
fn bounded_partition_pauses_at_the_limit_and_resumes_below_the_mark() {
    let mut s = match Sequencer::new(Config {
        max_pending_per_partition: 3,
        resume_pending_below: 2,
        ..config()
    }) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    feed(&mut s, strict("a2", "a", 2), 0);
    feed(&mut s, strict("b2", "b", 2), 0);
    assert_eq!(
        feed(&mut s, strict("c2", "c", 2), 0),
        ["wait c/c2 #2 missing 1", "pause 3"]
    );
    assert!(s.is_paused());
    // Past the limit, intents are still decided, never dropped.
    assert_eq!(
        feed(&mut s, strict("d2", "d", 2), 0),
        ["wait d/d2 #2 missing 1"]
    );
    assert_eq!(
        feed(&mut s, strict("a1", "a", 1), 0),
        ["commit a/a1 #1 v1", "commit a/a2 #2 v2"]
    );
    assert_eq!(
        feed(&mut s, strict("b1", "b", 1), 0),
        ["commit b/b1 #1 v1", "commit b/b2 #2 v2"]
    );
    assert!(s.is_paused(), "2 waiting is not below the mark");
    // A timeout drains the rest even with no new input.
    assert_eq!(
        tick(&mut s, 1_001),
        [
            "held c WAIT_TIMEOUT",
            "review c/c2 #2 WAIT_TIMEOUT",
            "held d WAIT_TIMEOUT",
            "review d/d2 #2 WAIT_TIMEOUT",
            // Resumed as soon as c's backlog was gone; partition decisions drain last.
            "resume 1"
        ]
    );
    assert!(!s.is_paused());
}

#[test]
fn r8_every_intent_gets_exactly_one_outcome_and_every_wait_one_terminal() {
    let mut s = sequencer();
    let stream = [
        strict("a3", "a", 3),
        strict("a1", "a", 1),
        m("b1", "b"),
        strict("a3", "a", 3),
        strict("x", "a", 3),
        IntentMeta {
            expected_version: 9,
            ..strict("a2", "a", 2)
        },
        strict("c9", "c", 9),
        m("", "c"),
    ];
    let mut all = Vec::new();
    for (offset, meta) in stream.into_iter().enumerate() {
        let meta = IntentMeta {
            offset: offset as i64,
            ..meta
        };
        s.on_intent(meta, 0, None, Millis(offset as u64));
        let out = drain(&mut s);
        let about_it = out
            .iter()
            .filter(|d| d.offset() == Some(offset as i64) && d.state().is_some())
            .count();
        assert_eq!(about_it, 1, "exactly one decision for offset {offset}");
        all.extend(out);
    }
    s.on_tick(Millis(5_000));
    all.extend(drain(&mut s));
    for offset in 0..8i64 {
        let terminal = all
            .iter()
            .filter(|d| d.offset() == Some(offset))
            .filter(|d| d.state().is_some_and(State::is_terminal))
            .count();
        assert_eq!(terminal, 1, "offset {offset} ends exactly once");
    }
}

fn three_intents() -> [IntentMeta; 3] {
    // book, reschedule, cancel: produced concurrently, causal_sequence 1, 2, 3.
    [
        strict("book", "patient", 1),
        strict("reschedule", "patient", 2),
        strict("cancel", "patient", 3),
    ]
}

const PERMUTATIONS: [[usize; 3]; 6] = [
    [0, 1, 2],
    [0, 2, 1],
    [1, 0, 2],
    [1, 2, 0],
    [2, 0, 1],
    [2, 1, 0],
];

#[test]
fn seed_three_concurrent_intents_commit_in_causal_order_in_every_arrival_order() {
    for order in PERMUTATIONS {
        // Priorities rising with the sequence, falling with it, and favouring the last.
        for priorities in [[1, 2, 3], [3, 2, 1], [0, 0, 9]] {
            for one_batch in [false, true] {
                let mut s = sequencer();
                let mut out = Vec::new();
                for (t, &i) in order.iter().enumerate() {
                    let meta = IntentMeta {
                        priority: priorities[i],
                        ..three_intents()[i].clone()
                    };
                    s.on_intent(meta, i as u32, None, Millis(t as u64));
                    if !one_batch {
                        out.extend(drain(&mut s));
                    }
                }
                out.extend(drain(&mut s));
                let commits: Vec<(&str, u64, u64, u32)> = out
                    .iter()
                    .filter_map(|d| match d {
                        Decision::Commit {
                            intent,
                            commit_sequence,
                            contact_version,
                        } => Some((
                            intent.meta.intent_id.as_str(),
                            *commit_sequence,
                            *contact_version,
                            intent.payload,
                        )),
                        _ => None,
                    })
                    .collect();
                assert_eq!(
                    commits,
                    [
                        ("book", 1, 1, 0),
                        ("reschedule", 2, 2, 1),
                        ("cancel", 3, 3, 2)
                    ],
                    "order {order:?} priorities {priorities:?} batch {one_batch}"
                );
                let waits = out
                    .iter()
                    .filter(|d| d.state() == Some(State::WaitingPreviousCommit))
                    .count();
                let expected_waits = match order {
                    [0, 1, 2] => 0,
                    [1, 2, 0] | [2, 1, 0] => 2,
                    _ => 1,
                };
                assert_eq!(waits, expected_waits, "order {order:?}");
                assert_eq!(s.waiting_count(), 0);
            }
        }
    }
}

#[test]
fn seed_a_version_conflict_gives_blocked_conflict_and_an_auditable_reason() {
    let mut s = sequencer();
    assert_eq!(
        feed(&mut s, strict("book", "p", 1), 0),
        ["commit p/book #1 v1"]
    );
    // Both producers saw version 1; the cancellation lands first.
    let cancel = IntentMeta {
        expected_version: 1,
        ..strict("cancel", "p", 2)
    };
    let reschedule = IntentMeta {
        expected_version: 1,
        ..strict("reschedule", "p", 3)
    };
    assert_eq!(
        feed(&mut s, reschedule, 1),
        ["wait p/reschedule #3 missing 2"]
    );
    s.on_intent(cancel, 0, None, Millis(2));
    let out = drain(&mut s);
    assert_eq!(
        show(&out),
        [
            "commit p/cancel #2 v2",
            "blocked p/reschedule #3 VERSION_CONFLICT"
        ]
    );
    assert_eq!(out[1].state().map(State::as_str), Some("blocked_conflict"));
    assert_eq!(
        out[1].reason().map(Reason::as_str),
        Some("VERSION_CONFLICT")
    );
}

#[test]
fn malformed_input_gets_an_invalid_intent_decision_never_a_panic() {
    let mut s = sequencer();
    assert_eq!(feed(&mut s, m("", "c"), 0), ["review c/ #0 INVALID_INTENT"]);
    assert_eq!(feed(&mut s, m("i", ""), 0), ["review /i #0 INVALID_INTENT"]);
    assert_eq!(
        feed(&mut s, strict("i", "c", u64::MAX), 0),
        ["review c/i #0 INVALID_INTENT"]
    );
    assert_eq!(s.contact_count(), 0, "invalid input touches no contact");
    // A store prior carrying a slot out of range, re-submitted.
    let prior = PriorOutcome {
        fingerprint: fingerprint("r"),
        outcome: Outcome::ManualReview {
            reason: Reason::WaitTimeout,
            commit_sequence: u64::MAX,
        },
    };
    let resub = IntentMeta {
        resubmission: true,
        ..m("r", "c")
    };
    s.on_intent(resub, 0, Some(prior), Millis(0));
    assert_eq!(show(&drain(&mut s)), ["review c/r #0 INVALID_INTENT"]);
    // The largest valid sequence waits; the sequence space is then exhausted.
    assert_eq!(
        feed(&mut s, strict("max", "c", MAX_SEQUENCE), 0),
        [format!("wait c/max #{MAX_SEQUENCE} missing 1")]
    );
    assert_eq!(
        feed(&mut s, m("next", "c"), 0),
        ["review c/next #0 INVALID_INTENT"]
    );
    // A clock going backwards is ignored.
    s.on_tick(Millis(500));
    s.on_tick(Millis(100));
    assert_eq!(s.now(), Millis(500));
    // Extreme times do not overflow.
    s.on_tick(Millis(u64::MAX));
    assert_eq!(s.waiting_count(), 0);
}

#[test]
fn invalid_config_names_its_key() {
    let bad = Config {
        resume_pending_below: 20_000,
        ..Config::default()
    };
    assert!(matches!(
        Sequencer::<u32>::new(bad),
        Err(Error::InvalidConfig {
            key: "resume_pending_below",
            ..
        })
    ));
    assert!(Config::default().validate().is_ok());
}

#[test]
fn idle_contact_is_one_cache_line_whatever_the_payload() {
    assert_eq!(std::mem::size_of::<Contact<u8>>(), 64);
    assert_eq!(std::mem::align_of::<Contact<u8>>(), 64);
    assert_eq!(
        std::mem::size_of::<Contact<[u8; 4096]>>(),
        std::mem::size_of::<Contact<u8>>()
    );
}

#[test]
fn take_dirty_returns_each_touched_contact_once_and_restore_round_trips() {
    let mut s = sequencer();
    feed(&mut s, m("a", "x"), 0);
    feed(&mut s, strict("w", "y", 3), 5);
    feed(&mut s, m("b", "x"), 6);
    feed(&mut s, m("a", "x"), 7); // duplicate: no change
    let dirty = s.take_dirty();
    let ids: Vec<&str> = dirty.iter().map(|c| c.contact_id.as_str()).collect();
    assert_eq!(ids, ["x", "y"]);
    assert_eq!(dirty[1].waiting.len(), 1);
    assert_eq!(dirty[1].gap_since, Some(Millis(5)));
    assert!(s.take_dirty().is_empty());
    feed(&mut s, m("dup", "x"), 8);
    feed(&mut s, m("dup", "x"), 9);
    assert_eq!(s.take_dirty().len(), 1);

    // A fresh sequencer restored from the snapshots decides like the original.
    let mut restored = sequencer();
    let snapshots: Vec<_> = ["x", "y"]
        .iter()
        .filter_map(|c| s.contact_snapshot(c))
        .collect();
    assert_eq!(restored.restore(snapshots), Ok(()));
    assert_eq!(restored.waiting_count(), 1);
    assert!(
        restored.take_dirty().is_empty(),
        "restoring is not a change"
    );
    for seq in [&mut s, &mut restored] {
        assert_eq!(feed(seq, m("c", "x"), 10), ["commit x/c #4 v4"]);
        assert_eq!(feed(seq, m("d", "y"), 10), ["wait y/d #4 missing 1"]);
    }
}

#[test]
fn restore_contact_rejects_inconsistent_snapshots_without_changing_anything() {
    let mut s = sequencer();
    feed(&mut s, strict("w", "y", 3), 0);
    let waiting = |id: &str, contact: &str, seq| WaitingSnapshot {
        commit_sequence: seq,
        since: Millis(0),
        intent: Intent {
            meta: strict(id, contact, seq),
            payload: 0u32,
        },
    };
    let base = ContactSnapshot::new("z");
    let cases = [
        ContactSnapshot {
            version: 2,
            ..base.clone()
        },
        ContactSnapshot {
            next_sequence: 0,
            ..base.clone()
        },
        ContactSnapshot {
            waiting: vec![waiting("q", "z", 1)],
            gap_since: Some(Millis(0)),
            next_sequence: 5,
            ..base.clone()
        },
        ContactSnapshot {
            waiting: vec![waiting("q", "z", 3)],
            next_sequence: 5,
            ..base.clone()
        },
        ContactSnapshot {
            waiting: vec![waiting("q", "other", 3)],
            gap_since: Some(Millis(0)),
            next_sequence: 5,
            ..base.clone()
        },
        ContactSnapshot {
            waiting: vec![waiting("w", "z", 3)],
            gap_since: Some(Millis(0)),
            next_sequence: 5,
            ..base.clone()
        },
        ContactSnapshot {
            hold: Some(HoldState {
                since: Millis(0),
                reason: HoldReason::WaitTimeout { missing: 1 },
            }),
            waiting: vec![waiting("q", "z", 3)],
            gap_since: Some(Millis(0)),
            next_sequence: 5,
            ..base.clone()
        },
    ];
    for case in cases {
        assert!(
            matches!(
                s.restore_contact(case.clone()),
                Err(Error::InvalidSnapshot { .. })
            ),
            "{case:?}"
        );
    }
    assert!(!s.knows_contact("z"));
    assert_eq!(s.waiting_count(), 1);
}

#[test]
fn observability_reports_backlog_held_contacts_and_a_contact_view() {
    let mut s = sequencer();
    feed(&mut s, strict("a3", "a", 3), 100);
    feed(&mut s, strict("a4", "a", 4), 200);
    feed(&mut s, strict("b2", "b", 2), 50);
    feed(&mut s, m("c1", "c"), 300);
    let backlog = s.backlog();
    assert_eq!(backlog.waiting, 3);
    assert_eq!(backlog.contacts_waiting, 2);
    assert_eq!(
        backlog.oldest_waiting_since,
        Some(Millis(100)),
        "the clock never went back"
    );
    assert_eq!(s.contact_count(), 3);
    let Some(view) = s.contact("a") else {
        panic!("contact a is known")
    };
    assert_eq!(view.resolved_through, 0);
    assert_eq!(view.next_sequence, 5);
    let waiting: Vec<(u64, &str)> = view
        .waiting
        .iter()
        .map(|w| (w.commit_sequence, w.intent_id.as_str()))
        .collect();
    assert_eq!(waiting, [(3, "a3"), (4, "a4")]);
    assert_eq!(view.timeout_at, Some(Millis(1_101)));
    tick(&mut s, 1_201);
    let held: Vec<String> = s
        .held_contacts()
        .into_iter()
        .map(|h| h.contact_id)
        .collect();
    assert_eq!(held, ["a", "b"]);
    assert_eq!(s.backlog().contacts_held, 2);
    assert_eq!(s.backlog().waiting, 0);
}

#[test]
fn a_partition_snapshot_survives_serde_json() {
    let mut s = sequencer();
    feed(&mut s, m("a", "x"), 0);
    feed(&mut s, strict("w", "y", 3), 5);
    feed(&mut s, strict("h", "z", 2), 6);
    tick(&mut s, 1_007);
    let exported = s.export();
    let json = match serde_json::to_string(&exported) {
        Ok(json) => json,
        Err(e) => panic!("{e}"),
    };
    let back: PartitionSnapshot<u32> = match serde_json::from_str(&json) {
        Ok(back) => back,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(back, exported);
    let Ok(imported) = Sequencer::import(config(), back) else {
        panic!("import")
    };
    assert_eq!(imported.export(), exported);
    assert_eq!(imported.held_contacts().len(), 2);
}
