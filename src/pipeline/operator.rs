//! Operator commands on the owner's side: what a pending command (queued by the admin API in
//! `cc_command`) does to its partition's sequencer, inside the batch being built. The engine
//! reads the commands and writes the result with the batch (`Engine::apply_commands`); this
//! module decides, with no I/O.
//!
//! - **release** (`resume`, `skip_to N`): [`Sequencer::release`]. Resume clears the hold; the
//!   missing sequences stay unresolved, so a new intent waits behind them with a fresh wait
//!   timeout (re-submit the missing intents, or skip).
//! - **re-submit** a manual-review item: the original record goes to the sequencer as a
//!   re-submission, which reclaims the slot the intent held (R9: the only way a decision is
//!   reopened). Refused, with nothing changed, when the record is not a valid intent of the
//!   contact, when the intent's recorded decision is not `manual_review` for this content (a
//!   commit, a conflict, a waiting intent, or an earlier re-submission stand), or when the same
//!   intent is already re-submitted in this batch.

use std::sync::Arc;

use super::translate::{self, Fresh, Resubmitted};
use crate::config::LimitsConfig;
use crate::intent::InRecord;
use crate::sequencer::{Millis, Outcome, PriorOutcome, Release, Sequencer};
use crate::store::postgres::{Command, CommandAction, CommandResult, Resubmission};
use crate::store::snapshot::Held;

/// Applies one command to its partition's sequencer at `now`. A re-submission's decoded intent
/// joins the batch's `fresh` intents (for its outputs) and its audit row joins `resubmitted`.
/// `prior` is the intent's recorded outcome (for a re-submission).
pub fn apply(
    seq: &mut Sequencer<Held>,
    now: Millis,
    command: &Command,
    prior: Option<PriorOutcome>,
    limits: &LimitsConfig,
    fresh: &mut Fresh,
    resubmitted: &mut Vec<Resubmitted>,
) -> CommandResult {
    let release = match &command.action {
        CommandAction::Resume => Release::Resume,
        CommandAction::SkipTo(target) => Release::SkipTo(target.get()),
        CommandAction::Resubmit(r) => {
            let mut batch = Batch {
                seq,
                now,
                limits,
                fresh,
                resubmitted,
            };
            return match batch.resubmit(command, r, prior) {
                Ok(()) => CommandResult::Applied,
                Err(why) => CommandResult::Refused(why),
            };
        }
    };
    match seq.release(&command.contact_id, release, now) {
        Ok(()) => CommandResult::Applied,
        Err(e) => CommandResult::Refused(e.to_string()),
    }
}

/// What a re-submission changes: the partition's sequencer and the batch being built.
struct Batch<'a> {
    seq: &'a mut Sequencer<Held>,
    now: Millis,
    limits: &'a LimitsConfig,
    fresh: &'a mut Fresh,
    resubmitted: &'a mut Vec<Resubmitted>,
}

impl Batch<'_> {
    fn resubmit(
        &mut self,
        command: &Command,
        r: &Resubmission,
        prior: Option<PriorOutcome>,
    ) -> Result<(), String> {
        let record = InRecord {
            partition: r.source_partition,
            offset: r.source_offset,
            key: r.key.clone(),
            value: Some(r.value.clone()),
            traceparent: None,
        };
        let mut v =
            crate::intent::decode(record.key.as_deref(), record.value.as_deref(), self.limits)
                .map_err(|e| format!("the reviewed record is not a valid intent: {e}"))?;
        let id = v.intent.intent_id.clone();
        if id != r.intent_id || v.intent.contact_id != command.contact_id {
            return Err(format!(
                "the reviewed record is intent {id:?} of contact {:?}, not intent {:?} of contact {:?}",
                v.intent.contact_id, r.intent_id, command.contact_id
            ));
        }
        if self
            .resubmitted
            .iter()
            .any(|x| x.intent.intent.intent_id == id)
            || self.fresh.contains_key(&r.source_offset)
        {
            return Err(format!(
                "intent {id:?} is already re-submitted in this batch"
            ));
        }
        let waiting = self
            .seq
            .contact(&command.contact_id)
            .is_some_and(|c| c.waiting.iter().any(|w| w.intent_id == id));
        if waiting {
            return Err(format!(
                "intent {id:?} is waiting_previous_commit, not in manual review"
            ));
        }
        let slot = reopened_slot(&id, prior, v.fingerprint)?;
        // Keep the correlation id it was decided with (it may have been generated then).
        if !r.correlation_id.is_empty() {
            v.intent.correlation_id = r.correlation_id.clone();
        }
        let v = Arc::new(v);
        let mut meta = translate::meta(&v, &record);
        meta.resubmission = true;
        let held = Held {
            correlation_id: v.intent.correlation_id.clone(),
            record,
        };
        self.seq.on_intent(meta, held, prior, self.now);
        self.fresh.insert(r.source_offset, v.clone());
        self.resubmitted.push(Resubmitted {
            partition: command.partition,
            command: command.id,
            actor: command.actor.clone(),
            review_partition: r.review_partition,
            review_offset: r.review_offset,
            source_offset: r.source_offset,
            intent: v,
            slot,
        });
        Ok(())
    }
}

/// The slot a re-submission reclaims: only a `manual_review` decision of this very content is
/// reopened.
fn reopened_slot(id: &str, prior: Option<PriorOutcome>, fingerprint: u64) -> Result<u64, String> {
    match prior {
        Some(PriorOutcome {
            fingerprint: decided,
            outcome: Outcome::ManualReview {
                commit_sequence, ..
            },
        }) if decided == fingerprint => Ok(commit_sequence),
        Some(p) if p.fingerprint != fingerprint => Err(format!(
            "intent {id:?} was decided for other content; this review is of a conflicting record"
        )),
        Some(p) => Err(format!(
            "intent {id:?} is {}; only a manual_review decision is reopened",
            p.outcome.state().as_str()
        )),
        None => Err(format!(
            "intent {id:?} has no manual-review decision to reopen"
        )),
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;
    use crate::proto::{Action, Intent as ProtoIntent};
    use crate::sequencer::{Config, Decision, Reason, SkipCause};
    use crate::store::postgres::SkipTarget;

    fn seq() -> Sequencer<Held> {
        let config = Config {
            wait_timeout: std::time::Duration::from_secs(10),
            ..Config::default()
        };
        Sequencer::new(config).unwrap()
    }

    fn proto(id: &str, seq: u64) -> ProtoIntent {
        ProtoIntent {
            intent_id: id.into(),
            contact_id: "c".into(),
            causal_sequence: seq,
            action: Action::Book as i32,
            correlation_id: format!("corr-{id}"),
            ..ProtoIntent::default()
        }
    }

    /// Feeds a consumed intent, as the engine does.
    fn consume(s: &mut Sequencer<Held>, p: &ProtoIntent, offset: i64, now: u64) {
        let record = InRecord {
            partition: 0,
            offset,
            key: Some(p.contact_id.as_bytes().to_vec()),
            value: Some(p.encode_to_vec()),
            traceparent: None,
        };
        let v = crate::intent::decode(
            record.key.as_deref(),
            record.value.as_deref(),
            &LimitsConfig::default(),
        )
        .unwrap();
        let held = Held {
            correlation_id: v.intent.correlation_id.clone(),
            record: record.clone(),
        };
        s.on_intent(translate::meta(&v, &record), held, None, Millis(now));
    }

    fn command(id: i64, action: CommandAction) -> Command {
        Command {
            id,
            partition: 0,
            contact_id: "c".into(),
            action,
            actor: "op".into(),
        }
    }

    fn resubmit_of(p: &ProtoIntent, offset: i64) -> CommandAction {
        CommandAction::Resubmit(Box::new(Resubmission {
            intent_id: p.intent_id.clone(),
            review_partition: 0,
            review_offset: 40,
            source_partition: 0,
            source_offset: offset,
            key: Some(b"c".to_vec()),
            value: p.encode_to_vec(),
            correlation_id: p.correlation_id.clone(),
        }))
    }

    fn drain(s: &mut Sequencer<Held>) -> Vec<Decision<Held>> {
        let mut out = Vec::new();
        s.drain_decisions(&mut out);
        out
    }

    fn run(
        s: &mut Sequencer<Held>,
        c: &Command,
        prior: Option<PriorOutcome>,
        now: u64,
    ) -> (CommandResult, Fresh, Vec<Resubmitted>) {
        let mut fresh = Fresh::new();
        let mut re = Vec::new();
        let r = apply(
            s,
            Millis(now),
            c,
            prior,
            &LimitsConfig::default(),
            &mut fresh,
            &mut re,
        );
        (r, fresh, re)
    }

    /// Sequence 1 never comes: intent 2 times out, the contact is held.
    fn held_contact() -> (Sequencer<Held>, ProtoIntent, PriorOutcome) {
        let mut s = seq();
        let two = proto("i-2", 2);
        consume(&mut s, &two, 5, 1_000);
        s.on_tick(Millis(20_000));
        let fp = drain(&mut s)
            .into_iter()
            .find_map(|d| match d {
                Decision::ManualReview { intent, .. } => Some(intent.meta.fingerprint),
                _ => None,
            })
            .expect("intent 2 went to manual review");
        let prior = PriorOutcome {
            fingerprint: fp,
            outcome: Outcome::ManualReview {
                reason: Reason::WaitTimeout,
                commit_sequence: 2,
            },
        };
        (s, two, prior)
    }

    #[test]
    fn resume_clears_the_hold_and_leaves_the_missing_sequence_unresolved() {
        let (mut s, _, _) = held_contact();
        let (r, _, _) = run(&mut s, &command(1, CommandAction::Resume), None, 21_000);
        assert_eq!(r, CommandResult::Applied);
        let c = s.contact("c").unwrap();
        assert!(c.hold.is_none());
        assert_eq!(c.resolved_through, 0, "sequence 1 is still missing");
        // A new intent waits behind the gap, with a fresh wait timeout.
        consume(&mut s, &proto("i-3", 3), 6, 22_000);
        let c = s.contact("c").unwrap();
        assert_eq!(c.waiting.len(), 1);
        assert_eq!(c.timeout_at, Some(Millis(22_000 + 10_000 + 1)));
        // A second resume is refused: the contact is not held any more.
        let (r, _, _) = run(&mut s, &command(2, CommandAction::Resume), None, 23_000);
        assert!(
            matches!(r, CommandResult::Refused(ref why) if why.contains("not on hold")),
            "{r:?}"
        );
    }

    #[test]
    fn skip_to_resolves_the_gap_so_the_target_commits_next() {
        let (mut s, _, _) = held_contact();
        let target = CommandAction::SkipTo(SkipTarget::new(3).unwrap());
        let (r, _, _) = run(&mut s, &command(1, target), None, 21_000);
        assert_eq!(r, CommandResult::Applied);
        let d = drain(&mut s);
        assert!(d.iter().any(|d| matches!(
            d,
            Decision::Skipped {
                from: 1,
                to: 2,
                cause: SkipCause::Operator,
                ..
            }
        )));
        assert_eq!(s.contact("c").unwrap().resolved_through, 2);
    }

    #[test]
    fn a_resubmission_reclaims_the_reviewed_slot_and_is_audited() {
        let (mut s, two, prior) = held_contact();
        run(&mut s, &command(1, CommandAction::Resume), None, 21_000);
        consume(&mut s, &proto("i-1", 1), 7, 22_000);
        drain(&mut s);
        let (r, fresh, re) = run(
            &mut s,
            &command(2, resubmit_of(&two, 5)),
            Some(prior),
            23_000,
        );
        assert_eq!(r, CommandResult::Applied);
        assert!(fresh.contains_key(&5));
        assert_eq!(re.len(), 1);
        assert_eq!((re[0].slot, re[0].command), (2, 2));
        let commits: Vec<(String, u64)> = drain(&mut s)
            .into_iter()
            .filter_map(|d| match d {
                Decision::Commit {
                    intent,
                    commit_sequence,
                    ..
                } => Some((intent.meta.intent_id, commit_sequence)),
                _ => None,
            })
            .collect();
        assert_eq!(commits, vec![("i-2".to_string(), 2)]);
    }

    #[test]
    fn a_resubmission_is_refused_unless_the_decision_is_manual_review_of_this_content() {
        let (mut s, two, prior) = held_contact();
        let committed = PriorOutcome {
            outcome: Outcome::Committed {
                commit_sequence: 2,
                contact_version: 2,
            },
            ..prior
        };
        let other_content = PriorOutcome {
            fingerprint: prior.fingerprint ^ 1,
            ..prior
        };
        for (p, expect) in [
            (None, "no manual-review decision"),
            (Some(committed), "is committed_causal"),
            (Some(other_content), "other content"),
        ] {
            let (r, fresh, re) = run(&mut s, &command(1, resubmit_of(&two, 5)), p, 21_000);
            assert!(
                matches!(&r, CommandResult::Refused(why) if why.contains(expect)),
                "{r:?}"
            );
            assert!(fresh.is_empty() && re.is_empty());
            assert!(drain(&mut s).is_empty(), "nothing reached the sequencer");
        }
        // Not a valid intent of this contact.
        let mut garbage = resubmit_of(&two, 5);
        if let CommandAction::Resubmit(r) = &mut garbage {
            r.value = vec![0xff, 0xff];
        }
        let (r, _, _) = run(&mut s, &command(2, garbage), Some(prior), 21_000);
        assert!(matches!(&r, CommandResult::Refused(why) if why.contains("not a valid intent")));
        // Twice in one batch: the second is refused.
        let mut fresh = Fresh::new();
        let mut re = Vec::new();
        for (i, expect) in [(3, true), (4, false)] {
            let r = apply(
                &mut s,
                Millis(21_000),
                &command(i, resubmit_of(&two, 5)),
                Some(prior),
                &LimitsConfig::default(),
                &mut fresh,
                &mut re,
            );
            assert_eq!(r == CommandResult::Applied, expect, "{r:?}");
        }
    }
}
