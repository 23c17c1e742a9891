//! Operator commands, the admin audit, and what operators read (backlog, held contacts, one
//! contact's state and history), all from PostgreSQL, so any instance answers for every
//! partition.
//!
//! A command (release a held contact, re-submit a manual-review item) is queued by the admin API
//! and applied by the instance that owns the contact's partition, inside one of its batches. Its
//! life, as [`CommandState`] tells it:
//!
//! ```text
//!   pending ──(owner applies it in batch b: cc_apply_batch)──> applying(b)
//!      │  ^                                                       │
//!      │  └──(batch b never committed in Kafka: the restore)──────┤
//!      │                                                          └─(b committed)─> applied(b) | refused(b)
//!      └──(operator cancels)──> cancelled
//! ```
//!
//! `applying` and `applied` differ only by `cc_partition.committed_batch`: a command's batch
//! wrote its rows to PostgreSQL before its Kafka transaction, and only the commit makes them
//! real. A cancellation races the owner safely: the trigger of migration 0005 fails a batch
//! that would apply a cancelled command, and the cancellation changes nothing once the command
//! is applied.

use sqlx::PgPool;

use super::{db, Result};
use crate::sequencer::MAX_SEQUENCE;

/// A sequence an operator skips to: `1 ..= 2^63-1`, the range the sequencer and PostgreSQL's
/// `BIGINT` hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct SkipTarget(u64);

/// Why a skip target is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("skip_to must be a whole number from 1 to {MAX_SEQUENCE} (2^63-1), got {0}")]
pub struct BadSkipTarget(pub String);

impl SkipTarget {
    pub fn new(n: u64) -> Result<Self, BadSkipTarget> {
        if (1..=MAX_SEQUENCE).contains(&n) {
            Ok(SkipTarget(n))
        } else {
            Err(BadSkipTarget(n.to_string()))
        }
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

impl std::str::FromStr for SkipTarget {
    type Err = BadSkipTarget;

    /// Any text: digits beyond `u64` are refused with the same message, never wrapped.
    fn from_str(s: &str) -> Result<Self, BadSkipTarget> {
        let t = s.trim();
        t.parse::<u64>()
            .map_err(|_| BadSkipTarget(t.to_string()))
            .and_then(SkipTarget::new)
    }
}

/// What a command asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandAction {
    /// Clear the contact's hold; its unresolved sequences stay unresolved.
    Resume,
    /// Clear the hold and skip every unresolved sequence below the target.
    SkipTo(SkipTarget),
    /// Feed a manual-review item's original record to the sequencer again.
    Resubmit(Box<Resubmission>),
}

/// A manual-review item to re-submit: where its review record is, and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resubmission {
    pub intent_id: String,
    pub review_partition: i32,
    pub review_offset: i64,
    /// Where the original record was consumed.
    pub source_partition: i32,
    pub source_offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    /// The correlation id the intent was decided with (kept: it may have been generated).
    pub correlation_id: String,
}

impl CommandAction {
    /// The `cc_command.action` value.
    pub fn as_str(&self) -> &'static str {
        match self {
            CommandAction::Resume => "resume",
            CommandAction::SkipTo(_) => "skip_to",
            CommandAction::Resubmit(_) => "resubmit",
        }
    }
}

/// The result the owner records when it applies a command (`cc_command.result`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandResult {
    Applied,
    /// Not applicable (the contact is not held, the item is no longer in manual review ...).
    Refused(String),
}

impl CommandResult {
    const REFUSED: &'static str = "refused: ";

    pub fn to_column(&self) -> String {
        match self {
            CommandResult::Applied => "applied".into(),
            CommandResult::Refused(why) => format!("{}{why}", Self::REFUSED),
        }
    }

    pub fn from_column(s: &str) -> Self {
        match s.strip_prefix(Self::REFUSED) {
            Some(why) => CommandResult::Refused(why.to_string()),
            None => CommandResult::Applied,
        }
    }
}

/// A pending command, as the owning engine reads it.
#[derive(Debug, Clone)]
pub struct Command {
    pub id: i64,
    pub partition: i32,
    pub contact_id: String,
    pub action: CommandAction,
    pub actor: String,
}

/// Where a command is in its life (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum CommandState {
    Pending,
    /// Applied in `batch`, whose Kafka transaction has not been seen committed yet.
    Applying {
        batch: u64,
    },
    Applied {
        batch: u64,
    },
    Refused {
        batch: u64,
        reason: String,
    },
    Cancelled {
        at_ms: i64,
        by: String,
    },
}

impl CommandState {
    /// Applied, refused or cancelled: it will not change again.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            CommandState::Applied { .. }
                | CommandState::Refused { .. }
                | CommandState::Cancelled { .. }
        )
    }

    pub fn name(&self) -> &'static str {
        match self {
            CommandState::Pending => "pending",
            CommandState::Applying { .. } => "applying",
            CommandState::Applied { .. } => "applied",
            CommandState::Refused { .. } => "refused",
            CommandState::Cancelled { .. } => "cancelled",
        }
    }
}

/// A command as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CommandView {
    pub id: i64,
    pub partition: i32,
    pub contact_id: String,
    pub action: String,
    /// For `skip_to`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip_to: Option<u64>,
    /// For `resubmit`: the intent, and its review record on the manual-review topic.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intent_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub review: Option<ReviewRef>,
    pub actor: String,
    pub created_at_ms: i64,
    #[serde(flatten)]
    pub state: CommandState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ReviewRef {
    pub partition: i32,
    pub offset: i64,
}

/// A command to queue, with who asked and how they proved it (for the audit row).
#[derive(Debug, Clone)]
pub struct NewCommand<'a> {
    pub topic: &'a str,
    pub contact_id: &'a str,
    pub action: CommandAction,
    pub actor: &'a str,
    /// Written into the audit row as `auth` (e.g. "bearer token valid").
    pub auth: &'a str,
}

/// Why a command was not queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotQueued {
    UnknownContact,
    NotHeld,
}

const VIEW_SELECT: &str = "
    SELECT m.id, m.partition, m.contact_id, m.action, m.skip_to, m.intent_id,
           m.review_partition, m.review_offset, m.actor,
           floor(extract(epoch FROM m.created_at) * 1000)::bigint AS created_at_ms,
           m.applied_batch, m.result,
           floor(extract(epoch FROM m.cancelled_at) * 1000)::bigint AS cancelled_at_ms,
           m.cancelled_by, coalesce(p.committed_batch, 0) AS committed_batch
      FROM cc_command m
      LEFT JOIN cc_partition p ON p.topic = m.topic AND p.partition = m.partition";

#[derive(sqlx::FromRow)]
struct ViewRow {
    id: i64,
    partition: i32,
    contact_id: String,
    action: String,
    skip_to: i64,
    intent_id: String,
    review_partition: Option<i32>,
    review_offset: Option<i64>,
    actor: String,
    created_at_ms: i64,
    applied_batch: Option<i64>,
    result: Option<String>,
    cancelled_at_ms: Option<i64>,
    cancelled_by: Option<String>,
    committed_batch: i64,
}

impl ViewRow {
    fn view(self) -> CommandView {
        let state = match (self.cancelled_at_ms, self.applied_batch) {
            (Some(at_ms), _) => CommandState::Cancelled {
                at_ms,
                by: self.cancelled_by.unwrap_or_default(),
            },
            (None, None) => CommandState::Pending,
            (None, Some(b)) if b > self.committed_batch => CommandState::Applying {
                batch: b.max(0) as u64,
            },
            (None, Some(b)) => {
                let batch = b.max(0) as u64;
                match CommandResult::from_column(self.result.as_deref().unwrap_or("")) {
                    CommandResult::Applied => CommandState::Applied { batch },
                    CommandResult::Refused(reason) => CommandState::Refused { batch, reason },
                }
            }
        };
        let review = match (self.review_partition, self.review_offset) {
            (Some(partition), Some(offset)) => Some(ReviewRef { partition, offset }),
            _ => None,
        };
        CommandView {
            id: self.id,
            partition: self.partition,
            contact_id: self.contact_id,
            skip_to: (self.action == "skip_to").then_some(self.skip_to.max(0) as u64),
            intent_id: (!self.intent_id.is_empty()).then_some(self.intent_id),
            review,
            action: self.action,
            actor: self.actor,
            created_at_ms: self.created_at_ms,
            state,
        }
    }
}

#[derive(sqlx::FromRow)]
struct PendingRow {
    id: i64,
    partition: i32,
    contact_id: String,
    action: String,
    skip_to: i64,
    actor: String,
    intent_id: String,
    review_partition: Option<i32>,
    review_offset: Option<i64>,
    source_partition: Option<i32>,
    source_offset: Option<i64>,
    record_key: Option<Vec<u8>>,
    record_value: Option<Vec<u8>>,
    correlation_id: String,
}

/// Commands not yet applied (nor cancelled) for the given partitions, oldest first. A row the
/// constraints of migration 0005 would refuse (written before it) comes back as a refusal to
/// record, never as a guess.
pub async fn pending_commands(
    pool: &PgPool,
    topic: &str,
    partitions: &[i32],
) -> Result<Vec<Result<Command, UnreadableCommand>>> {
    let rows: Vec<PendingRow> = sqlx::query_as(
        "SELECT id, partition, contact_id, action, skip_to, actor, intent_id, review_partition,
                review_offset, source_partition, source_offset, record_key, record_value,
                correlation_id
           FROM cc_command
          WHERE topic = $1 AND partition = ANY($2) AND applied_batch IS NULL
            AND cancelled_at IS NULL
          ORDER BY id",
    )
    .bind(topic)
    .bind(partitions)
    .fetch_all(pool)
    .await
    .map_err(db("reading operator commands"))?;
    Ok(rows.into_iter().map(pending).collect())
}

/// A pending command row this version cannot apply; the owner records it as refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreadableCommand {
    pub id: i64,
    pub partition: i32,
    pub why: String,
}

fn pending(r: PendingRow) -> Result<Command, UnreadableCommand> {
    let unreadable = |why: String| UnreadableCommand {
        id: r.id,
        partition: r.partition,
        why,
    };
    let action = match r.action.as_str() {
        "resume" => CommandAction::Resume,
        "skip_to" => match u64::try_from(r.skip_to).map(SkipTarget::new) {
            Ok(Ok(t)) => CommandAction::SkipTo(t),
            _ => return Err(unreadable(BadSkipTarget(r.skip_to.to_string()).to_string())),
        },
        "resubmit" => match (
            r.review_partition,
            r.review_offset,
            r.source_partition,
            r.source_offset,
            r.record_value,
        ) {
            (Some(rp), Some(ro), Some(sp), Some(so), Some(value)) => {
                CommandAction::Resubmit(Box::new(Resubmission {
                    intent_id: r.intent_id,
                    review_partition: rp,
                    review_offset: ro,
                    source_partition: sp,
                    source_offset: so,
                    key: r.record_key,
                    value,
                    correlation_id: r.correlation_id,
                }))
            }
            _ => return Err(unreadable("incomplete re-submission".into())),
        },
        other => return Err(unreadable(format!("unknown action {other:?}"))),
    };
    Ok(Command {
        id: r.id,
        partition: r.partition,
        contact_id: r.contact_id,
        action,
        actor: r.actor,
    })
}

/// Queues a command for the instance that owns the contact, with its audit row, in one
/// transaction. A release needs a held contact; a re-submission a known one.
pub async fn queue_command(
    pool: &PgPool,
    c: &NewCommand<'_>,
) -> Result<Result<CommandView, NotQueued>> {
    let mut tx = pool
        .begin()
        .await
        .map_err(db("starting to queue a command"))?;
    let at: Option<(i32, bool)> = sqlx::query_as(
        "SELECT partition, on_hold FROM cc_contact
          WHERE topic = $1 AND contact_id = $2 AND state IS NOT NULL",
    )
    .bind(c.topic)
    .bind(c.contact_id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db("finding the contact"))?;
    let Some((partition, on_hold)) = at else {
        return Ok(Err(NotQueued::UnknownContact));
    };
    let (skip_to, re) = match &c.action {
        CommandAction::Resume => (0, None),
        CommandAction::SkipTo(t) => (t.get() as i64, None),
        CommandAction::Resubmit(r) => (0, Some(r.as_ref())),
    };
    if re.is_none() && !on_hold {
        return Ok(Err(NotQueued::NotHeld));
    }
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO cc_command (topic, partition, contact_id, action, skip_to, actor, intent_id,
                                 review_partition, review_offset, source_partition,
                                 source_offset, record_key, record_value, correlation_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) RETURNING id",
    )
    .bind(c.topic)
    .bind(partition)
    .bind(c.contact_id)
    .bind(c.action.as_str())
    .bind(skip_to)
    .bind(c.actor)
    .bind(re.map_or("", |r| r.intent_id.as_str()))
    .bind(re.map(|r| r.review_partition))
    .bind(re.map(|r| r.review_offset))
    .bind(re.map(|r| r.source_partition))
    .bind(re.map(|r| r.source_offset))
    .bind(re.and_then(|r| r.key.as_deref()))
    .bind(re.map(|r| r.value.as_slice()))
    .bind(re.map_or("", |r| r.correlation_id.as_str()))
    .fetch_one(&mut *tx)
    .await
    .map_err(db("queueing a command"))?;
    let mut detail = serde_json::json!({
        "auth": c.auth,
        "command": id,
        "partition": partition,
        "result": "queued",
    });
    match &c.action {
        CommandAction::Resume => {}
        CommandAction::SkipTo(t) => detail["skip_to"] = t.get().into(),
        CommandAction::Resubmit(r) => {
            detail["intent_id"] = r.intent_id.clone().into();
            detail["review"] =
                serde_json::json!({ "partition": r.review_partition, "offset": r.review_offset });
        }
    }
    audit_admin(&mut *tx, c.actor, c.action.as_str(), c.contact_id, detail).await?;
    let view = view_in(&mut tx, id).await?;
    tx.commit().await.map_err(db("committing a command"))?;
    Ok(view.ok_or(NotQueued::UnknownContact))
}

async fn view_in(tx: &mut sqlx::PgConnection, id: i64) -> Result<Option<CommandView>> {
    let row: Option<ViewRow> = sqlx::query_as(&format!("{VIEW_SELECT} WHERE m.id = $1"))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db("reading a command"))?;
    Ok(row.map(ViewRow::view))
}

/// One command, with its state.
pub async fn command(pool: &PgPool, id: i64) -> Result<Option<CommandView>> {
    let mut conn = pool.acquire().await.map_err(db("reading a command"))?;
    view_in(&mut conn, id).await
}

/// Commands of `topic`, newest first: the unfinished ones (pending or applying), or all.
pub async fn list_commands(
    pool: &PgPool,
    topic: &str,
    unfinished_only: bool,
    limit: i64,
) -> Result<Vec<CommandView>> {
    let rows: Vec<ViewRow> = sqlx::query_as(&format!(
        "{VIEW_SELECT}
          WHERE m.topic = $1
            AND (NOT $2 OR (m.cancelled_at IS NULL
                            AND (m.applied_batch IS NULL
                                 OR m.applied_batch > coalesce(p.committed_batch, 0))))
          ORDER BY m.id DESC LIMIT $3"
    ))
    .bind(topic)
    .bind(unfinished_only)
    .bind(limit)
    .fetch_all(pool)
    .await
    .map_err(db("listing commands"))?;
    Ok(rows.into_iter().map(ViewRow::view).collect())
}

/// Cancels a pending command, with its audit row. Returns whether this call cancelled it and
/// the command as it is afterwards (`None`: no such command).
pub async fn cancel_command(
    pool: &PgPool,
    id: i64,
    actor: &str,
    auth: &str,
) -> Result<Option<(bool, CommandView)>> {
    let mut tx = pool.begin().await.map_err(db("starting a cancellation"))?;
    let cancelled: Option<String> = sqlx::query_scalar(
        "UPDATE cc_command SET cancelled_at = now(), cancelled_by = $2
          WHERE id = $1 AND applied_batch IS NULL AND cancelled_at IS NULL
         RETURNING contact_id",
    )
    .bind(id)
    .bind(actor)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db("cancelling a command"))?;
    let Some(view) = view_in(&mut tx, id).await? else {
        return Ok(None);
    };
    let result = match &cancelled {
        Some(_) => "cancelled".to_string(),
        None => format!("not cancelled: the command is {}", view.state.name()),
    };
    audit_admin(
        &mut *tx,
        actor,
        "cancel_command",
        &view.contact_id,
        serde_json::json!({ "auth": auth, "command": id, "result": result }),
    )
    .await?;
    tx.commit().await.map_err(db("committing a cancellation"))?;
    Ok(Some((cancelled.is_some(), view)))
}

// ---------------------------------------------------------------------------------------------
// What operators read. Contact states are read as of their partition's last committed batch
// (the previous version while a newer one waits for its Kafka commit), like a restore would.

/// The contact rows of `topic` as of their committed batch; `$2`: only contacts with waiting
/// intents or a hold.
const EFFECTIVE: &str = "
    SELECT c.partition, c.contact_id,
           cc_resolved_state(c.contact_id,
               CASE WHEN c.batch_no <= coalesce(p.committed_batch, 0) THEN c.state
                    WHEN c.prev_batch_no <= coalesce(p.committed_batch, 0) THEN c.prev_state
               END) AS state
      FROM cc_contact c
      LEFT JOIN cc_partition p ON p.topic = c.topic AND p.partition = c.partition
     WHERE c.topic = $1
       AND (NOT $2 OR c.waiting > 0 OR c.on_hold
            OR coalesce(jsonb_array_length(c.prev_state -> 'waiting'), 0) > 0
            OR jsonb_typeof(c.prev_state -> 'hold') = 'object')";

/// One partition's `waiting_previous_commit` backlog and holds, with wall-clock times from the
/// audit (when each waiting intent's `waiting_previous_commit` row was written).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct PartitionBacklog {
    pub partition: i32,
    /// The instance holding the partition's lease (the last one, if it expired).
    pub owner: String,
    pub lease_until_ms: i64,
    pub waiting: i64,
    pub contacts_waiting: i64,
    pub contacts_held: i64,
    pub oldest_waiting_since_ms: Option<i64>,
    pub oldest_waiting_age_ms: Option<i64>,
}

/// The backlog of every partition of `topic` PostgreSQL knows.
pub async fn backlog(pool: &PgPool, topic: &str) -> Result<Vec<PartitionBacklog>> {
    sqlx::query_as(&format!(
        "WITH eff AS ({EFFECTIVE}),
         w AS (
            SELECT e.partition,
                   e.contact_id,
                   (SELECT max(t.at) FROM cc_transition t
                     WHERE t.intent_id = x #>> '{{intent,meta,intent_id}}'
                       AND t.contact_id = e.contact_id
                       AND t.to_state = 'waiting_previous_commit') AS since
              FROM eff e, jsonb_array_elements(coalesce(e.state -> 'waiting', '[]'::jsonb)) x
         ),
         s AS (
            SELECT partition, count(*) AS waiting, count(DISTINCT contact_id) AS contacts_waiting,
                   min(since) AS oldest
              FROM w GROUP BY partition
         ),
         h AS (
            SELECT partition, count(*) AS held FROM eff
             WHERE jsonb_typeof(state -> 'hold') = 'object' GROUP BY partition
         )
         SELECT p.partition, p.owner,
                floor(extract(epoch FROM p.lease_until) * 1000)::bigint AS lease_until_ms,
                coalesce(s.waiting, 0) AS waiting,
                coalesce(s.contacts_waiting, 0) AS contacts_waiting,
                coalesce(h.held, 0) AS contacts_held,
                floor(extract(epoch FROM s.oldest) * 1000)::bigint AS oldest_waiting_since_ms,
                floor(extract(epoch FROM now() - s.oldest) * 1000)::bigint AS oldest_waiting_age_ms
           FROM cc_partition p
           LEFT JOIN s ON s.partition = p.partition
           LEFT JOIN h ON h.partition = p.partition
          WHERE p.topic = $1
          ORDER BY p.partition"
    ))
    .bind(topic)
    .bind(true)
    .fetch_all(pool)
    .await
    .map_err(db("reading the backlog"))
}

/// A contact on hold.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HeldView {
    pub contact_id: String,
    pub partition: i32,
    /// `WAIT_TIMEOUT` or `CONTACT_BACKLOG_OVERFLOW`.
    pub reason: &'static str,
    /// The lowest unresolved sequence: what the contact waits for.
    pub missing_sequence: u64,
    /// Wall-clock time of the contact's latest `held` audit row.
    pub held_since_ms: Option<i64>,
    pub held_for_ms: Option<i64>,
}

#[derive(sqlx::FromRow)]
struct HeldRow {
    partition: i32,
    contact_id: String,
    state: Option<serde_json::Value>,
    held_at_ms: Option<i64>,
    now_ms: i64,
}

/// Contacts of `topic` on hold, by contact id. Unreadable states are skipped and logged.
pub async fn held_contacts(pool: &PgPool, topic: &str) -> Result<Vec<HeldView>> {
    let rows: Vec<HeldRow> = sqlx::query_as(&format!(
        "SELECT e.partition, e.contact_id, e.state,
                (SELECT floor(extract(epoch FROM max(t.at)) * 1000)::bigint FROM cc_transition t
                  WHERE t.contact_id = e.contact_id AND t.to_state = 'held') AS held_at_ms,
                floor(extract(epoch FROM now()) * 1000)::bigint AS now_ms
           FROM ({EFFECTIVE}) e
          WHERE jsonb_typeof(e.state -> 'hold') = 'object'
          ORDER BY e.contact_id"
    ))
    .bind(topic)
    .bind(true)
    .fetch_all(pool)
    .await
    .map_err(db("reading held contacts"))?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let s = decode_state(&r.contact_id, r.state?)?;
            let hold = s.hold?;
            Some(HeldView {
                reason: hold.reason.code().as_str(),
                missing_sequence: missing(&s),
                held_since_ms: r.held_at_ms,
                held_for_ms: r.held_at_ms.map(|at| r.now_ms - at),
                contact_id: r.contact_id,
                partition: r.partition,
            })
        })
        .collect())
}

fn decode_state(
    contact_id: &str,
    state: serde_json::Value,
) -> Option<crate::store::snapshot::StoredContact> {
    match crate::store::snapshot::decode(state) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(contact_id, error = %e, "unreadable contact state");
            None
        }
    }
}

/// The sequence a contact waits for: the one its hold names, else the lowest unresolved one.
fn missing(s: &crate::store::snapshot::StoredContact) -> u64 {
    match s.hold.map(|h| h.reason) {
        Some(crate::sequencer::HoldReason::WaitTimeout { missing }) => missing,
        _ => s.resolved_through + 1,
    }
}

/// One contact's committed state and its audit history.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ContactDetail {
    pub contact_id: String,
    /// `None`: the contact has audit rows but no committed state yet.
    pub state: Option<ContactStateView>,
    pub history: Vec<HistoryRow>,
    /// Pass as `after` for the next page of history (`None`: this is the last page).
    pub next_after: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ContactStateView {
    pub partition: i32,
    /// Every sequence up to this one is resolved (committed, blocked or skipped).
    pub resolved_through: u64,
    /// Committed effects so far.
    pub version: u64,
    pub next_sequence: u64,
    pub hold: Option<HoldView>,
    pub waiting: Vec<WaitingView>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HoldView {
    pub reason: &'static str,
    pub missing_sequence: u64,
    pub held_since_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WaitingView {
    pub commit_sequence: u64,
    pub intent_id: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub waiting_since_ms: Option<i64>,
}

/// One audit row of a contact.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct HistoryRow {
    pub id: i64,
    pub partition: i32,
    pub batch_no: i64,
    /// The batch is committed in Kafka (otherwise the row may still be rolled back).
    pub committed: bool,
    pub source_offset: i64,
    pub intent_id: String,
    pub correlation_id: String,
    pub from_state: String,
    pub to_state: String,
    pub reason: String,
    pub commit_sequence: i64,
    pub contact_version: i64,
    pub detail: String,
    pub writer: String,
    pub at_ms: i64,
}

/// One contact: its committed state and up to `limit` audit rows after row `after`. `None`
/// when PostgreSQL knows nothing of it.
pub async fn contact_detail(
    pool: &PgPool,
    topic: &str,
    contact_id: &str,
    after: i64,
    limit: i64,
) -> Result<Option<ContactDetail>> {
    let row: Option<(i32, Option<serde_json::Value>)> = sqlx::query_as(&format!(
        "SELECT e.partition, e.state FROM ({EFFECTIVE}) e WHERE e.contact_id = $3"
    ))
    .bind(topic)
    .bind(false)
    .bind(contact_id)
    .fetch_optional(pool)
    .await
    .map_err(db("reading a contact"))?;
    let mut history: Vec<HistoryRow> = sqlx::query_as(
        "SELECT t.id, t.partition, t.batch_no, t.batch_no <= coalesce(p.committed_batch, 0)
                AS committed, t.source_offset, t.intent_id, t.correlation_id, t.from_state,
                t.to_state, t.reason, t.commit_sequence, t.contact_version, t.detail, t.writer,
                floor(extract(epoch FROM t.at) * 1000)::bigint AS at_ms
           FROM cc_transition t
           LEFT JOIN cc_partition p ON p.topic = t.topic AND p.partition = t.partition
          WHERE t.topic = $1 AND t.contact_id = $2 AND t.id > $3
          ORDER BY t.id LIMIT $4",
    )
    .bind(topic)
    .bind(contact_id)
    .bind(after)
    .bind(limit + 1)
    .fetch_all(pool)
    .await
    .map_err(db("reading a contact's history"))?;
    let next_after = (history.len() as i64 > limit).then(|| {
        history.truncate(limit.max(0) as usize);
        history.last().map_or(after, |h| h.id)
    });
    if row.is_none() && history.is_empty() && after == 0 {
        return Ok(None);
    }
    let state = match row.and_then(|(p, s)| Some((p, decode_state(contact_id, s?)?))) {
        None => None,
        Some((partition, s)) => Some(contact_state(pool, contact_id, partition, s).await?),
    };
    Ok(Some(ContactDetail {
        contact_id: contact_id.to_string(),
        state,
        history,
        next_after,
    }))
}

async fn contact_state(
    pool: &PgPool,
    contact_id: &str,
    partition: i32,
    s: crate::store::snapshot::StoredContact,
) -> Result<ContactStateView> {
    let ids: Vec<&str> = s
        .waiting
        .iter()
        .map(|w| w.intent.meta.intent_id.as_str())
        .collect();
    let since: Vec<(String, String, Option<i64>)> = sqlx::query_as(
        "SELECT to_state, intent_id, floor(extract(epoch FROM max(at)) * 1000)::bigint
           FROM cc_transition
          WHERE contact_id = $1
            AND ((to_state = 'waiting_previous_commit' AND intent_id = ANY($2))
                 OR to_state = 'held')
          GROUP BY to_state, intent_id",
    )
    .bind(contact_id)
    .bind(&ids)
    .fetch_all(pool)
    .await
    .map_err(db("reading when a contact's intents started waiting"))?;
    let at = |state: &str, id: &str| {
        since
            .iter()
            .find(|(s, i, _)| s == state && (state == "held" || i == id))
            .and_then(|(_, _, at)| *at)
    };
    Ok(ContactStateView {
        partition,
        resolved_through: s.resolved_through,
        version: s.version,
        next_sequence: s.next_sequence,
        hold: s.hold.map(|h| HoldView {
            reason: h.reason.code().as_str(),
            missing_sequence: missing(&s),
            held_since_ms: at("held", ""),
        }),
        waiting: s
            .waiting
            .iter()
            .map(|w| WaitingView {
                commit_sequence: w.commit_sequence,
                intent_id: w.intent.meta.intent_id.clone(),
                source_partition: w.intent.payload.record.partition,
                source_offset: w.intent.payload.record.offset,
                waiting_since_ms: at("waiting_previous_commit", &w.intent.meta.intent_id),
            })
            .collect(),
    })
}

/// The latest decision the idempotency record holds (`to_state`) of each of `intent_ids` that
/// has one, or `resubmitted` when an operator re-submitted it since and it is not decided again
/// yet (it waits for its predecessor, or the batch deciding it is in flight): what a
/// re-submission would reopen, and what a listing of review items says of each.
pub async fn latest_outcomes(
    pool: &PgPool,
    intent_ids: &[String],
) -> Result<std::collections::HashMap<String, String>> {
    let rows: Vec<(String, String)> = sqlx::query_as(&format!(
        "SELECT DISTINCT ON (intent_id) intent_id, to_state FROM cc_transition
          WHERE intent_id = ANY($1) AND ({} OR to_state = 'resubmitted')
          ORDER BY intent_id, id DESC",
        super::outcomes::IDEMPOTENCY_ROWS
    ))
    .bind(intent_ids)
    .fetch_all(pool)
    .await
    .map_err(db("reading intents' outcomes"))?;
    Ok(rows.into_iter().collect())
}

/// When the contact's first `manual_review` audit row was written (PostgreSQL's clock, ms), or
/// `None` when it has none: where a listing of its review items starts.
pub async fn first_review_ms(pool: &PgPool, contact_id: &str) -> Result<Option<i64>> {
    sqlx::query_scalar(
        "SELECT floor(extract(epoch FROM min(at)) * 1000)::bigint FROM cc_transition
          WHERE contact_id = $1 AND to_state = 'manual_review'",
    )
    .bind(contact_id)
    .fetch_one(pool)
    .await
    .map_err(db("reading the contact's first review"))
}

/// Appends one row to the operator audit.
pub async fn audit_admin<'e, E: sqlx::PgExecutor<'e>>(
    executor: E,
    actor: &str,
    action: &str,
    contact_id: &str,
    detail: serde_json::Value,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO cc_admin_audit (actor, action, contact_id, detail) VALUES ($1, $2, $3, $4)",
    )
    .bind(actor)
    .bind(action)
    .bind(contact_id)
    .bind(detail)
    .execute(executor)
    .await
    .map_err(db("writing the admin audit"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_targets_are_refused_outside_1_to_2_pow_63_minus_1() {
        assert_eq!("1".parse::<SkipTarget>().map(SkipTarget::get), Ok(1));
        assert_eq!(
            "9223372036854775807"
                .parse::<SkipTarget>()
                .map(SkipTarget::get),
            Ok(i64::MAX as u64)
        );
        for bad in [
            "0",
            "9223372036854775808",
            "18446744073709551615",
            "18446744073709551616",
            "-1",
            "x",
        ] {
            let e = bad.parse::<SkipTarget>().unwrap_err();
            assert!(
                e.to_string().contains("from 1 to 9223372036854775807") && e.0 == bad,
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn results_round_trip_through_their_column() {
        for r in [
            CommandResult::Applied,
            CommandResult::Refused("contact \"c\" is not on hold".into()),
        ] {
            assert_eq!(CommandResult::from_column(&r.to_column()), r);
        }
    }

    fn row(applied_batch: Option<i64>, committed_batch: i64, cancelled: bool) -> ViewRow {
        ViewRow {
            id: 1,
            partition: 0,
            contact_id: "c".into(),
            action: "resume".into(),
            skip_to: 0,
            intent_id: String::new(),
            review_partition: None,
            review_offset: None,
            actor: "a".into(),
            created_at_ms: 0,
            applied_batch,
            result: applied_batch.map(|_| "applied".into()),
            cancelled_at_ms: cancelled.then_some(5),
            cancelled_by: cancelled.then(|| "b".into()),
            committed_batch,
        }
    }

    #[test]
    fn a_command_is_applied_only_once_its_batch_is_committed() {
        assert_eq!(row(None, 3, false).view().state, CommandState::Pending);
        assert_eq!(
            row(Some(4), 3, false).view().state,
            CommandState::Applying { batch: 4 }
        );
        assert_eq!(
            row(Some(4), 4, false).view().state,
            CommandState::Applied { batch: 4 }
        );
        let mut refused = row(Some(2), 4, false);
        refused.result = Some("refused: contact \"c\" is not on hold".into());
        assert_eq!(
            refused.view().state,
            CommandState::Refused {
                batch: 2,
                reason: "contact \"c\" is not on hold".into()
            }
        );
        assert!(matches!(
            row(None, 0, true).view().state,
            CommandState::Cancelled { at_ms: 5, .. }
        ));
    }
}
