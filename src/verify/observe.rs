//! Reading the world into an [`Observed`]: the only part of the verifier that talks to Kafka
//! and PostgreSQL, one function per source. See the [module documentation](super) for the
//! order of the reads and why.

use std::collections::BTreeMap;

use anyhow::Context as _;
use futures::TryStreamExt as _;
use serde::Deserialize;

use super::observed::*;
use crate::config::Config;
use crate::pipeline::preflight::Checked;
use crate::pipeline::read::read_topic;

/// Reads everything the check needs. Blocking: call it from a blocking thread (it drives
/// PostgreSQL on the current tokio runtime when there is one, else on a private one).
pub fn observe(config: &Config) -> anyhow::Result<Observed> {
    let k = &config.kafka;
    // What compaction deleted is not there to be checked: no verdict on such topics.
    match crate::pipeline::preflight::compaction(config, std::time::Duration::from_secs(10)) {
        Checked::Refused(e) => return Err(e.into()),
        Checked::Unknown(reason) => tracing::warn!(
            reason = %reason,
            "could not read the topics' cleanup.policy; records a compaction deleted would not be seen"
        ),
        Checked::Fine => {}
    }
    // Inputs before outputs: an intent whose outcome is produced while the verifier runs is
    // not reported lost.
    let intents = read_intents(config)?;
    // Recovery points before and after the outputs: rows of a batch committed before the
    // outputs were read must have their outputs among them; rows up to the second read are
    // committed.
    let driver = Driver::new()?;
    let pool = driver.block_on(async { crate::store::postgres::pool(&config.postgres) })?;
    let writers = driver.block_on(read_writer_groups(&pool, config))?;
    let (before_outputs, _) = read_committed(config, &writers)?;
    let effects = read_outputs(config, &k.side_effects_topic)?;
    let reviews = read_outputs(config, &k.manual_review_topic)?;
    let (committed, mut unreadable) = read_committed(config, &writers)?;
    let store = driver.block_on(async {
        let store = read_store(&pool, config, &before_outputs, &committed).await;
        pool.close().await;
        store
    })?;
    unreadable.extend(store.unreadable);
    let s = &config.sequencer;
    Ok(Observed {
        settings: Settings {
            wait_timeout_ms: u64::try_from(s.wait_timeout.as_millis()).unwrap_or(u64::MAX),
            on_timeout: s.on_timeout,
            max_pending_per_contact: s.max_pending_per_contact,
            limits: config.limits.clone(),
        },
        intents_topic: k.intents_topic.clone(),
        intents,
        effects,
        reviews,
        committed,
        audit: store.audit,
        contacts: store.contacts,
        wait_starts: store.wait_starts,
        skips: store.skips,
        releases: store.releases,
        resubmissions: store.resubmissions,
        requests: store.requests,
        unreadable,
    })
}

/// The intents topic, with each record's timestamp.
fn read_intents(config: &Config) -> anyhow::Result<Vec<InputRecord>> {
    let topic = &config.kafka.intents_topic;
    let mut out = Vec::new();
    read_topic(config, topic, |m| {
        out.push(InputRecord {
            partition: m.partition,
            offset: m.offset,
            timestamp_ms: m.timestamp_ms,
            key: m.key.map(<[u8]>::to_vec),
            value: m.value.map(<[u8]>::to_vec),
            forwarded_from: m.forwarded_from.and_then(|v| forwarded_from(topic, v)),
        });
        Ok(())
    })
    .with_context(|| format!("reading {topic}"))?;
    Ok(out)
}

/// The record a `cc-forwarded-from` header names (`<topic>/<partition>/<offset>`), when it is
/// one of `topic` (Kafka's topic names have no `/`).
fn forwarded_from(topic: &str, header: &[u8]) -> Option<(i32, i64)> {
    let text = std::str::from_utf8(header).ok()?;
    let mut parts = text.rsplitn(3, '/');
    let offset = parts.next()?.parse().ok()?;
    let partition = parts.next()?.parse().ok()?;
    (parts.next()? == topic).then_some((partition, offset))
}

/// An output topic (side effects or manual review).
fn read_outputs(config: &Config, topic: &str) -> anyhow::Result<Vec<OutputRecord>> {
    let mut out = Vec::new();
    read_topic(config, topic, |m| {
        out.push(OutputRecord {
            partition: m.partition,
            offset: m.offset,
            value: m.value.map(<[u8]>::to_vec),
        });
        Ok(())
    })
    .with_context(|| format!("reading {topic}"))?;
    Ok(out)
}

/// The consumer group that last wrote each partition of the intents topic, where PostgreSQL
/// knows it and it is not the configured group (another deployment over the same store).
async fn read_writer_groups(
    pool: &sqlx::PgPool,
    config: &Config,
) -> anyhow::Result<BTreeMap<i32, String>> {
    let views = crate::store::postgres::batch_views(pool, &config.kafka.intents_topic)
        .await
        .with_context(|| {
            format!(
                "reading {}.cc_partition (has `causal-commit migrate` run?)",
                config.postgres.schema
            )
        })?;
    Ok(views
        .into_iter()
        .filter_map(|v| Some((v.partition, v.writer_group?)))
        .filter(|(_, g)| *g != config.kafka.group_id)
        .collect())
}

/// Each partition's committed offset and recovery point, in the group that last wrote it (the
/// configured one unless `writers` names another: a group's points speak only for the batches
/// its own instances wrote), with a note for each partition whose committed offset carries no
/// usable recovery point (its audit rows cannot be told committed, so all are ignored).
fn read_committed(
    config: &Config,
    writers: &BTreeMap<i32, String>,
) -> anyhow::Result<(BTreeMap<i32, CommittedOffset>, Vec<String>)> {
    let mut points = crate::pipeline::read::committed_points(config)?;
    let others: std::collections::BTreeSet<&String> = writers.values().collect();
    for group in others {
        let mut theirs = config.clone();
        theirs.kafka.group_id.clone_from(group);
        let mut their_points = crate::pipeline::read::committed_points(&theirs)?;
        for (p, _) in writers.iter().filter(|(_, g)| *g == group) {
            if let Some(c) = their_points.remove(p) {
                points.insert(*p, c);
            }
        }
    }
    let mut notes = Vec::new();
    let mut out = BTreeMap::new();
    for (p, c) in points {
        let batch = match c.recovery {
            Ok(Some(r)) => r.batch,
            Ok(None) if c.offset < 0 => 0,
            Ok(None) => {
                notes.push(format!(
                    "intents partition {p}: committed offset {} has no recovery point; its audit rows are ignored",
                    c.offset
                ));
                0
            }
            Err(e) => {
                notes.push(format!(
                    "intents partition {p}: {e}; its audit rows are ignored"
                ));
                0
            }
        };
        out.insert(
            p,
            CommittedOffset {
                offset: c.offset,
                batch,
            },
        );
    }
    Ok((out, notes))
}

/// What PostgreSQL holds, committed batches only.
#[derive(Default)]
struct Store {
    audit: Vec<AuditRecord>,
    contacts: Vec<ContactState>,
    wait_starts: Vec<WaitStart>,
    skips: Vec<Skip>,
    releases: Vec<Release>,
    resubmissions: Vec<Resubmission>,
    requests: Vec<OperatorRequest>,
    unreadable: Vec<String>,
}

/// Whether a row of `batch` on `partition` belongs to a batch committed in Kafka.
fn is_committed(points: &BTreeMap<i32, CommittedOffset>, partition: i32, batch: i64) -> bool {
    batch >= 0 && batch as u64 <= points.get(&partition).map_or(0, |c| c.batch)
}

/// Reads the audit and the contact states in one read-only snapshot.
async fn read_store(
    pool: &sqlx::PgPool,
    config: &Config,
    before_outputs: &BTreeMap<i32, CommittedOffset>,
    committed: &BTreeMap<i32, CommittedOffset>,
) -> anyhow::Result<Store> {
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
    let mut store = Store::default();
    let topic = config.kafka.intents_topic.as_str();
    let schema = &config.postgres.schema;
    read_transitions(&mut tx, topic, before_outputs, committed, &mut store)
        .await
        .with_context(|| {
            format!("reading {schema}.cc_transition (has `causal-commit migrate` run?)")
        })?;
    read_contacts(&mut tx, topic, committed, &mut store)
        .await
        .with_context(|| {
            format!("reading {schema}.cc_contact (has `causal-commit migrate` run?)")
        })?;
    read_requests(&mut tx, topic, &mut store)
        .await
        .with_context(|| {
            format!("reading {schema}.cc_command (has `causal-commit migrate` run?)")
        })?;
    tx.commit().await.context("ending the read-only snapshot")?;
    Ok(store)
}

/// A `cc_transition` row as selected by [`read_transitions`].
#[derive(Debug, Clone, sqlx::FromRow)]
struct TransitionRow {
    partition: i32,
    batch_no: i64,
    source_offset: i64,
    intent_id: String,
    contact_id: String,
    to_state: String,
    reason: String,
    commit_sequence: i64,
    detail: String,
    at_ms: i64,
}

/// What one audit row means to the verifier.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fact {
    Outcome(AuditRecord),
    WaitStart(WaitStart),
    Skip(Skip),
    Release(Release),
    Resubmission(Resubmission),
}

/// The transitions of committed batches that the check uses: outcomes, wait starts, skips,
/// releases and re-submissions.
async fn read_transitions(
    tx: &mut sqlx::PgConnection,
    topic: &str,
    before_outputs: &BTreeMap<i32, CommittedOffset>,
    committed: &BTreeMap<i32, CommittedOffset>,
    store: &mut Store,
) -> anyhow::Result<()> {
    let mut rows = sqlx::query_as::<_, TransitionRow>(
        "SELECT partition, batch_no, source_offset, intent_id, contact_id, to_state, reason,
                commit_sequence, detail, floor(extract(epoch FROM at) * 1000)::bigint AS at_ms
           FROM cc_transition
          WHERE topic = $1
            AND to_state IN ('committed_causal', 'blocked_conflict', 'manual_review', 'skipped',
                             'released', 'resubmitted', 'waiting_previous_commit')
          ORDER BY id",
    )
    .bind(topic)
    .fetch(&mut *tx);
    while let Some(row) = rows.try_next().await? {
        if !is_committed(committed, row.partition, row.batch_no) {
            continue;
        }
        let before = is_committed(before_outputs, row.partition, row.batch_no);
        match fact(row, before) {
            Ok(Fact::Outcome(a)) => store.audit.push(a),
            Ok(Fact::WaitStart(w)) => store.wait_starts.push(w),
            Ok(Fact::Skip(s)) => store.skips.push(s),
            Ok(Fact::Release(r)) => store.releases.push(r),
            Ok(Fact::Resubmission(r)) => store.resubmissions.push(r),
            Err(why) => store.unreadable.push(why),
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct SkipDetail {
    from: u64,
    to: u64,
}

/// Maps one audit row to a fact. The one place that knows how each state is recorded: a new
/// kind of row (an audited `resubmitted` record, an `UNPROCESSABLE` outcome) is one arm here.
fn fact(row: TransitionRow, before_outputs: bool) -> Result<Fact, String> {
    let seq = row.commit_sequence.max(0) as u64;
    let outcome = |outcome| {
        Fact::Outcome(AuditRecord {
            source: (row.partition, row.source_offset),
            intent_id: row.intent_id.clone(),
            contact_id: row.contact_id.clone(),
            outcome,
            reason: row.reason.clone(),
            commit_sequence: seq,
            before_outputs,
            at_ms: row.at_ms,
        })
    };
    match row.to_state.as_str() {
        "committed_causal" => Ok(outcome(AuditOutcome::Committed)),
        "blocked_conflict" | "manual_review" => Ok(outcome(AuditOutcome::Reviewed)),
        "waiting_previous_commit" => Ok(Fact::WaitStart(WaitStart {
            source: (row.partition, row.source_offset),
            intent_id: row.intent_id,
            at_ms: row.at_ms,
        })),
        "skipped" => {
            let cause = match row.reason.as_str() {
                "OPERATOR" => SkipCause::Operator,
                "WAIT_TIMEOUT" => SkipCause::WaitTimeout,
                other => {
                    return Err(format!(
                        "contact {}: skipped row with unknown cause {other:?}",
                        row.contact_id
                    ))
                }
            };
            match serde_json::from_str::<SkipDetail>(&row.detail) {
                Ok(s) if s.from >= 1 && s.from <= s.to => Ok(Fact::Skip(Skip {
                    contact_id: row.contact_id,
                    from: s.from,
                    to: s.to,
                    cause,
                    at_ms: row.at_ms,
                })),
                _ => Err(format!(
                    "contact {}: skipped row with unreadable detail {:?}",
                    row.contact_id, row.detail
                )),
            }
        }
        "released" => {
            // The sequencer's `Release` in Debug form: `Resume` or `SkipTo(n)`.
            let skip_to = match row.detail.as_str() {
                "Resume" => None,
                d => match d
                    .strip_prefix("SkipTo(")
                    .and_then(|r| r.strip_suffix(')'))
                    .and_then(|n| n.parse().ok())
                {
                    Some(n) => Some(n),
                    None => {
                        return Err(format!(
                            "contact {}: released row with unreadable detail {d:?}",
                            row.contact_id
                        ))
                    }
                },
            };
            Ok(Fact::Release(Release {
                contact_id: row.contact_id,
                skip_to,
                at_ms: row.at_ms,
                batch: (row.partition, row.batch_no),
            }))
        }
        "resubmitted" => Ok(Fact::Resubmission(Resubmission {
            intent_id: row.intent_id,
            contact_id: row.contact_id,
            at_ms: row.at_ms,
            batch: (row.partition, row.batch_no),
        })),
        other => Err(format!("audit row with unexpected state {other:?}")),
    }
}

/// A `cc_command` row as selected by [`read_requests`].
#[derive(Debug, Clone, sqlx::FromRow)]
struct RequestRow {
    id: i64,
    contact_id: String,
    action: String,
    skip_to: i64,
    intent_id: String,
    partition: i32,
    applied_batch: Option<i64>,
    audited: bool,
}

/// The operators' requests (R9): every `cc_command` row of the topic, whether a batch applied
/// it, and whether the admin audit recorded it.
async fn read_requests(
    tx: &mut sqlx::PgConnection,
    topic: &str,
    store: &mut Store,
) -> anyhow::Result<()> {
    let rows = sqlx::query_as::<_, RequestRow>(
        "SELECT m.id, m.contact_id, m.action, m.skip_to, m.intent_id, m.partition,
                CASE WHEN m.result = 'applied' AND m.cancelled_at IS NULL
                     THEN m.applied_batch END AS applied_batch,
                EXISTS (SELECT 1 FROM cc_admin_audit a
                         WHERE a.action = m.action AND a.contact_id = m.contact_id
                           AND a.detail ->> 'command' = m.id::text) AS audited
           FROM cc_command m
          WHERE m.topic = $1
          ORDER BY m.id",
    )
    .bind(topic)
    .fetch_all(&mut *tx)
    .await?;
    for row in rows {
        match request(row) {
            Ok(r) => store.requests.push(r),
            Err(why) => store.unreadable.push(why),
        }
    }
    Ok(())
}

/// Maps one `cc_command` row to an operator's request.
fn request(row: RequestRow) -> Result<OperatorRequest, String> {
    let action = match (row.action.as_str(), u64::try_from(row.skip_to)) {
        ("resume", _) => RequestedAction::Resume,
        ("skip_to", Ok(n)) if n > 0 => RequestedAction::SkipTo(n),
        ("resubmit", _) if !row.intent_id.is_empty() => RequestedAction::Resubmit(row.intent_id),
        (action, _) => {
            return Err(format!(
                "operator command {} for contact {}: unreadable action {action:?} (skip_to {})",
                row.id, row.contact_id, row.skip_to
            ))
        }
    };
    Ok(OperatorRequest {
        command: row.id,
        contact_id: row.contact_id,
        action,
        applied: row.applied_batch.map(|b| (row.partition, b)),
        audited: row.audited,
    })
}

/// A `cc_contact` row as selected by [`read_contacts`].
#[derive(Debug, Clone, sqlx::FromRow)]
struct ContactRow {
    contact_id: String,
    partition: i32,
    batch_no: i64,
    state: serde_json::Value,
    prev_batch_no: Option<i64>,
    prev_state: Option<serde_json::Value>,
}

/// Contacts with waiting intents or a hold, as of their last committed batch (what a restore
/// would load).
async fn read_contacts(
    tx: &mut sqlx::PgConnection,
    topic: &str,
    committed: &BTreeMap<i32, CommittedOffset>,
    store: &mut Store,
) -> anyhow::Result<()> {
    let mut rows = sqlx::query_as::<_, ContactRow>(
        "SELECT contact_id, partition, batch_no, cc_resolved_state(contact_id, state) AS state,
                prev_batch_no, cc_resolved_state(contact_id, prev_state) AS prev_state
           FROM cc_contact
          WHERE topic = $1
            AND (waiting > 0 OR on_hold
                 OR coalesce(jsonb_array_length(prev_state -> 'waiting'), 0) > 0
                 OR jsonb_typeof(prev_state -> 'hold') = 'object')",
    )
    .bind(topic)
    .fetch(&mut *tx);
    while let Some(row) = rows.try_next().await? {
        let state = if is_committed(committed, row.partition, row.batch_no) {
            row.state
        } else {
            match (row.prev_batch_no, row.prev_state) {
                (Some(b), Some(s)) if is_committed(committed, row.partition, b) => s,
                // First written by a batch that has not committed: not there yet.
                _ => continue,
            }
        };
        match crate::store::snapshot::decode(state) {
            Ok(s) if s.hold.is_some() || !s.waiting.is_empty() => {
                store.contacts.push(ContactState {
                    on_hold: s.hold.is_some(),
                    waiting: s
                        .waiting
                        .into_iter()
                        .map(|w| WaitingIntent {
                            source: (
                                w.intent.payload.record.partition,
                                w.intent.payload.record.offset,
                            ),
                            intent_id: w.intent.meta.intent_id,
                            commit_sequence: w.commit_sequence,
                        })
                        .collect(),
                    contact_id: s.contact_id,
                })
            }
            Ok(_) => {}
            Err(e) => store.unreadable.push(format!(
                "contact {}: {e}; its waiting intents are unknown",
                row.contact_id
            )),
        }
    }
    Ok(())
}

/// Where the verifier drives PostgreSQL: the current tokio runtime when there is one (the
/// caller is on one of its blocking threads), else a private one kept for the whole
/// observation, so that one pool serves every read.
enum Driver {
    Current(tokio::runtime::Handle),
    Own(tokio::runtime::Runtime),
}

impl Driver {
    fn new() -> anyhow::Result<Self> {
        Ok(match tokio::runtime::Handle::try_current() {
            Ok(handle) => Driver::Current(handle),
            Err(_) => Driver::Own(
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("starting a runtime for PostgreSQL")?,
            ),
        })
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        match self {
            Driver::Current(handle) => handle.block_on(f),
            Driver::Own(runtime) => runtime.block_on(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(to_state: &str, reason: &str, detail: &str) -> TransitionRow {
        TransitionRow {
            partition: 1,
            batch_no: 3,
            source_offset: 7,
            intent_id: "i".into(),
            contact_id: "c".into(),
            to_state: to_state.into(),
            reason: reason.into(),
            commit_sequence: 4,
            detail: detail.into(),
            at_ms: 99,
        }
    }

    #[test]
    fn audit_rows_map_to_facts() {
        assert_eq!(
            fact(row("committed_causal", "", ""), true),
            Ok(Fact::Outcome(AuditRecord {
                source: (1, 7),
                intent_id: "i".into(),
                contact_id: "c".into(),
                outcome: AuditOutcome::Committed,
                reason: String::new(),
                commit_sequence: 4,
                before_outputs: true,
                at_ms: 99,
            }))
        );
        assert!(matches!(
            fact(row("blocked_conflict", "VERSION_CONFLICT", ""), false),
            Ok(Fact::Outcome(AuditRecord {
                outcome: AuditOutcome::Reviewed,
                before_outputs: false,
                ..
            }))
        ));
        assert_eq!(
            fact(row("skipped", "OPERATOR", r#"{"from":2,"to":5}"#), true),
            Ok(Fact::Skip(Skip {
                contact_id: "c".into(),
                from: 2,
                to: 5,
                cause: SkipCause::Operator,
                at_ms: 99
            }))
        );
        assert_eq!(
            fact(row("waiting_previous_commit", "", ""), true),
            Ok(Fact::WaitStart(WaitStart {
                source: (1, 7),
                intent_id: "i".into(),
                at_ms: 99,
            }))
        );
        assert_eq!(
            fact(row("released", "OPERATOR", "SkipTo(6)"), true),
            Ok(Fact::Release(Release {
                contact_id: "c".into(),
                skip_to: Some(6),
                at_ms: 99,
                batch: (1, 3),
            }))
        );
        assert_eq!(
            fact(row("released", "OPERATOR", "Resume"), true),
            Ok(Fact::Release(Release {
                contact_id: "c".into(),
                skip_to: None,
                at_ms: 99,
                batch: (1, 3),
            }))
        );
        assert_eq!(
            fact(row("resubmitted", "OPERATOR", ""), true),
            Ok(Fact::Resubmission(Resubmission {
                intent_id: "i".into(),
                contact_id: "c".into(),
                at_ms: 99,
                batch: (1, 3),
            }))
        );
    }

    #[test]
    fn operator_commands_map_to_requests() {
        let row = |action: &str, skip_to: i64, intent_id: &str| RequestRow {
            id: 5,
            contact_id: "c".into(),
            action: action.into(),
            skip_to,
            intent_id: intent_id.into(),
            partition: 2,
            applied_batch: Some(9),
            audited: true,
        };
        let of = |r: RequestRow| request(r).map(|q| (q.action, q.applied, q.audited));
        assert_eq!(
            of(row("resume", 0, "")),
            Ok((RequestedAction::Resume, Some((2, 9)), true))
        );
        assert_eq!(
            of(row("skip_to", 4, "")),
            Ok((RequestedAction::SkipTo(4), Some((2, 9)), true))
        );
        assert_eq!(
            of(row("resubmit", 0, "i")),
            Ok((RequestedAction::Resubmit("i".into()), Some((2, 9)), true))
        );
        let pending = RequestRow {
            applied_batch: None,
            audited: false,
            ..row("resume", 0, "")
        };
        assert_eq!(of(pending), Ok((RequestedAction::Resume, None, false)));
        for bad in [
            row("skip_to", 0, ""),
            row("resubmit", 0, ""),
            row("reset", 0, ""),
        ] {
            let why = request(bad).expect_err("not guessed");
            assert!(
                why.starts_with("operator command 5 for contact c: unreadable action"),
                "{why}"
            );
        }
    }

    #[test]
    fn unreadable_audit_rows_are_reported_not_guessed() {
        for bad in [
            row("skipped", "WAIT_TIMEOUT", "{}"),
            row("skipped", "WAIT_TIMEOUT", r#"{"from":5,"to":2}"#),
            row("skipped", "SOMETHING", r#"{"from":1,"to":2}"#),
            row("released", "OPERATOR", "SkipTo(x)"),
        ] {
            assert!(fact(bad.clone(), true).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn only_rows_of_batches_up_to_the_recovery_point_are_committed() {
        let points = BTreeMap::from([(
            0,
            CommittedOffset {
                offset: 10,
                batch: 4,
            },
        )]);
        assert!(is_committed(&points, 0, 4));
        assert!(!is_committed(&points, 0, 5));
        assert!(
            !is_committed(&points, 1, 1),
            "no recovery point: nothing committed"
        );
    }

    #[test]
    fn a_forwarded_from_header_names_a_record_of_the_intents_topic_or_nothing() {
        let read = |h: &str| forwarded_from("cc.intents-v2", h.as_bytes());
        assert_eq!(read("cc.intents-v2/3/42"), Some((3, 42)));
        assert_eq!(read("other/3/42"), None, "another topic");
        for junk in [
            "",
            "3/42",
            "cc.intents-v2/x/42",
            "cc.intents-v2/3/",
            "a/cc.intents-v2/3/4",
        ] {
            assert_eq!(read(junk), None, "{junk:?}");
        }
        assert_eq!(forwarded_from("t", &[0xff, b'/', b'1', b'/', b'2']), None);
    }
}
