//! PostgreSQL: connection, migrations, durable state and audit.

use std::str::FromStr;

use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::config::{is_identifier, PostgresConfig};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("postgres.url is not a valid PostgreSQL URL: {0}")]
    Url(sqlx::Error),
    #[error("postgres.schema {0:?} is not a plain identifier")]
    Schema(String),
    #[error("PostgreSQL call failed while {what}: {source}")]
    Db {
        what: &'static str,
        source: sqlx::Error,
    },
    #[error("applying migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn db(what: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |source| Error::Db { what, source }
}

/// A lazily connecting pool whose sessions use `config.schema` and a statement timeout.
pub fn pool(config: &PostgresConfig) -> Result<PgPool> {
    if !is_identifier(&config.schema) {
        return Err(Error::Schema(config.schema.clone()));
    }
    let options = PgConnectOptions::from_str(config.url.expose_secret())
        .map_err(Error::Url)?
        .application_name("causal-commit")
        .options([
            ("search_path", config.schema.as_str()),
            (
                "statement_timeout",
                &config.statement_timeout.as_millis().to_string(),
            ),
        ]);
    Ok(PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.connect_timeout)
        .connect_lazy_with(options))
}

/// Creates the schema when missing and applies every migration in `migrations/`.
pub async fn migrate(pool: &PgPool, schema: &str) -> Result<()> {
    if !is_identifier(schema) {
        return Err(Error::Schema(schema.to_string()));
    }
    // The identifier was checked above, so splicing it is safe.
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
        .execute(pool)
        .await
        .map_err(db("creating the schema"))?;
    sqlx::migrate!("./migrations").run(pool).await?;
    Ok(())
}

/// Why a durable write was refused.
pub const FENCED_SQLSTATE: &str = "CC001";

impl Error {
    /// The write was refused because another writer owns the partition now.
    pub fn is_fenced(&self) -> bool {
        matches!(self, Error::Db { source: sqlx::Error::Database(e), .. }
            if e.code().as_deref() == Some(FENCED_SQLSTATE))
    }
}

/// Takes the lease of one input partition for `owner` and returns a new fencing token, or
/// `None` while another owner holds a live lease. The same owner (a restarted instance) takes
/// its own lease back at once.
pub async fn acquire_partition(
    pool: &PgPool,
    topic: &str,
    partition: i32,
    owner: &str,
    lease: std::time::Duration,
) -> Result<Option<u64>> {
    let fence: Option<i64> = sqlx::query_scalar(
        "INSERT INTO cc_partition (topic, partition, fence, owner, lease_until)
         VALUES ($1, $2, nextval('cc_fence_seq'), $3, now() + make_interval(secs => $4))
         ON CONFLICT (topic, partition) DO UPDATE
            SET fence = nextval('cc_fence_seq'), owner = EXCLUDED.owner,
                lease_until = EXCLUDED.lease_until, updated_at = now()
          WHERE cc_partition.owner = EXCLUDED.owner OR cc_partition.lease_until < now()
         RETURNING fence",
    )
    .bind(topic)
    .bind(partition)
    .bind(owner)
    .bind(lease.as_secs_f64())
    .fetch_optional(pool)
    .await
    .map_err(db("acquiring a partition lease"))?;
    Ok(fence.map(|f| f as u64))
}

/// Gives a partition's lease up (on revocation or shutdown) so the next owner starts at once.
pub async fn release_partition(
    pool: &PgPool,
    topic: &str,
    partition: i32,
    fence: u64,
) -> Result<()> {
    sqlx::query(
        "UPDATE cc_partition SET lease_until = now() WHERE topic = $1 AND partition = $2 AND fence = $3",
    )
    .bind(topic)
    .bind(partition)
    .bind(fence as i64)
    .execute(pool)
    .await
    .map_err(db("releasing a partition lease"))?;
    Ok(())
}

/// Brings a partition's durable state back to its last committed batch (`committed_batch`, read
/// from the Kafka committed offset's metadata): rows of later batches were written before a Kafka
/// transaction that never committed, so they are removed (contacts get their previous version
/// back). Returns the contact states of the partition. Fails with a fenced error when `fence`
/// is no longer the partition's token.
pub async fn restore_partition(
    pool: &PgPool,
    topic: &str,
    partition: i32,
    fence: u64,
    committed_batch: u64,
) -> Result<RestoredPartition> {
    let mut tx = pool.begin().await.map_err(db("starting a restore"))?;
    let current: Option<i64> = sqlx::query_scalar(
        "SELECT fence FROM cc_partition WHERE topic = $1 AND partition = $2 FOR UPDATE",
    )
    .bind(topic)
    .bind(partition)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db("locking a partition"))?;
    if current != Some(fence as i64) {
        return Err(Error::Db {
            what: "restoring a partition",
            source: sqlx::Error::Protocol(format!(
                "fenced: partition {partition} has token {current:?}, not {fence}"
            )),
        });
    }
    let b = committed_batch as i64;
    let dropped_transitions = sqlx::query(
        "DELETE FROM cc_transition WHERE topic = $1 AND partition = $2 AND batch_no > $3",
    )
    .bind(topic)
    .bind(partition)
    .bind(b)
    .execute(&mut *tx)
    .await
    .map_err(db("dropping uncommitted transitions"))?
    .rows_affected();
    let reverted = sqlx::query(
        "UPDATE cc_contact
            SET state = prev_state, batch_no = prev_batch_no,
                on_hold = jsonb_typeof(prev_state -> 'hold') = 'object',
                waiting = coalesce(jsonb_array_length(prev_state -> 'waiting'), 0),
                prev_state = NULL, prev_batch_no = NULL, updated_at = now()
          WHERE topic = $1 AND partition = $2 AND batch_no > $3
            AND prev_batch_no IS NOT NULL AND prev_batch_no <= $3",
    )
    .bind(topic)
    .bind(partition)
    .bind(b)
    .execute(&mut *tx)
    .await
    .map_err(db("reverting uncommitted contact states"))?
    .rows_affected();
    let dropped_contacts =
        sqlx::query("DELETE FROM cc_contact WHERE topic = $1 AND partition = $2 AND batch_no > $3")
            .bind(topic)
            .bind(partition)
            .bind(b)
            .execute(&mut *tx)
            .await
            .map_err(db("dropping uncommitted contacts"))?
            .rows_affected();
    sqlx::query(
        "UPDATE cc_command SET applied_batch = NULL, result = NULL
          WHERE topic = $1 AND partition = $2 AND applied_batch > $3",
    )
    .bind(topic)
    .bind(partition)
    .bind(b)
    .execute(&mut *tx)
    .await
    .map_err(db("reverting uncommitted commands"))?;
    sqlx::query("UPDATE cc_partition SET last_batch = $3 WHERE topic = $1 AND partition = $2")
        .bind(topic)
        .bind(partition)
        .bind(b)
        .execute(&mut *tx)
        .await
        .map_err(db("recording the restored batch"))?;
    let states: Vec<serde_json::Value> = sqlx::query_scalar(
        "SELECT state FROM cc_contact WHERE topic = $1 AND partition = $2 ORDER BY contact_id",
    )
    .bind(topic)
    .bind(partition)
    .fetch_all(&mut *tx)
    .await
    .map_err(db("loading contact states"))?;
    tx.commit().await.map_err(db("committing a restore"))?;
    Ok(RestoredPartition {
        states,
        dropped_transitions,
        reverted_contacts: reverted + dropped_contacts,
    })
}

#[derive(Debug)]
pub struct RestoredPartition {
    pub states: Vec<serde_json::Value>,
    /// Uncommitted rows removed: evidence of a transaction that did not commit.
    pub dropped_transitions: u64,
    pub reverted_contacts: u64,
}

/// A terminal outcome the durable store holds for an intent_id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredOutcome {
    pub intent_id: String,
    pub fingerprint: u64,
    pub state: String,
    pub reason: String,
    pub commit_sequence: u64,
    pub contact_version: u64,
}

/// The terminal outcomes known for `intent_ids`, in one round trip. Invalid input is not an
/// outcome of the intent (a valid record with the same id is still processed).
pub async fn lookup_outcomes(pool: &PgPool, intent_ids: &[String]) -> Result<Vec<StoredOutcome>> {
    if intent_ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<OutcomeRow> = sqlx::query_as(
        "SELECT DISTINCT ON (intent_id) intent_id, fingerprint, to_state, reason,
                commit_sequence, contact_version
           FROM cc_transition
          WHERE intent_id = ANY($1)
            AND to_state IN ('committed_causal', 'blocked_conflict', 'manual_review')
            AND reason <> 'INVALID_INTENT'
          ORDER BY intent_id, id DESC",
    )
    .bind(intent_ids)
    .fetch_all(pool)
    .await
    .map_err(db("looking up idempotency outcomes"))?;
    Ok(rows.into_iter().map(StoredOutcome::from).collect())
}

/// `(intent_id, fingerprint, to_state, reason, commit_sequence, contact_version)` as selected
/// from `cc_transition`.
pub type OutcomeRow = (String, i64, String, String, i64, i64);

impl From<OutcomeRow> for StoredOutcome {
    fn from((intent_id, fp, state, reason, seq, version): OutcomeRow) -> Self {
        StoredOutcome {
            intent_id,
            fingerprint: fp as u64,
            state,
            reason,
            commit_sequence: seq as u64,
            contact_version: version as u64,
        }
    }
}

/// One audit row: a transition of one consumed record.
#[derive(Debug, Clone, Default)]
pub struct TransitionRow {
    pub partition: i32,
    pub batch_no: u64,
    pub source_offset: i64,
    pub intent_id: String,
    pub contact_id: String,
    pub clinic_id: String,
    pub correlation_id: String,
    pub from_state: &'static str,
    pub to_state: &'static str,
    pub reason: &'static str,
    pub commit_sequence: u64,
    pub contact_version: u64,
    pub fingerprint: u64,
    pub detail: String,
    pub fence: u64,
}

/// One contact's state as of a batch.
#[derive(Debug, Clone)]
pub struct ContactRow {
    pub contact_id: String,
    pub partition: i32,
    pub batch_no: u64,
    pub state: serde_json::Value,
    pub on_hold: bool,
    pub waiting: i32,
}

/// An operator command applied in a batch.
#[derive(Debug, Clone)]
pub struct AppliedCommand {
    pub id: i64,
    pub batch_no: u64,
    pub result: String,
}

/// Everything one batch writes, per writer.
#[derive(Debug, Default)]
pub struct BatchWrite {
    /// (partition, fencing token, batch number) of every partition the batch touches.
    pub partitions: Vec<(i32, u64, u64)>,
    pub transitions: Vec<TransitionRow>,
    pub contacts: Vec<ContactRow>,
    pub commands: Vec<AppliedCommand>,
}

impl BatchWrite {
    pub fn is_empty(&self) -> bool {
        self.transitions.is_empty() && self.contacts.is_empty() && self.commands.is_empty()
    }
}

/// Writes a batch in one round trip (`cc_apply_batch`); fails fenced when any partition's
/// token moved on.
pub async fn apply_batch(
    pool: &PgPool,
    topic: &str,
    writer: &str,
    lease: std::time::Duration,
    w: &BatchWrite,
) -> Result<()> {
    let mut partitions = w.partitions.clone();
    // A fixed lock order: two writers never deadlock on cc_partition rows.
    partitions.sort_unstable();
    let t = &w.transitions;
    let c = &w.contacts;
    let m = &w.commands;
    sqlx::query(
        "SELECT cc_apply_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
                               $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28,
                               $29, $30)",
    )
    .bind(topic)
    .bind(writer)
    .bind(lease.as_millis().min(i32::MAX as u128) as i32)
    .bind(partitions.iter().map(|p| p.0).collect::<Vec<_>>())
    .bind(partitions.iter().map(|p| p.1 as i64).collect::<Vec<_>>())
    .bind(partitions.iter().map(|p| p.2 as i64).collect::<Vec<_>>())
    .bind(t.iter().map(|r| r.partition).collect::<Vec<_>>())
    .bind(t.iter().map(|r| r.batch_no as i64).collect::<Vec<_>>())
    .bind(t.iter().map(|r| r.source_offset).collect::<Vec<_>>())
    .bind(t.iter().map(|r| r.intent_id.as_str()).collect::<Vec<_>>())
    .bind(t.iter().map(|r| r.contact_id.as_str()).collect::<Vec<_>>())
    .bind(t.iter().map(|r| r.clinic_id.as_str()).collect::<Vec<_>>())
    .bind(
        t.iter()
            .map(|r| r.correlation_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(t.iter().map(|r| r.from_state).collect::<Vec<_>>())
    .bind(t.iter().map(|r| r.to_state).collect::<Vec<_>>())
    .bind(t.iter().map(|r| r.reason).collect::<Vec<_>>())
    .bind(
        t.iter()
            .map(|r| r.commit_sequence as i64)
            .collect::<Vec<_>>(),
    )
    .bind(
        t.iter()
            .map(|r| r.contact_version as i64)
            .collect::<Vec<_>>(),
    )
    .bind(t.iter().map(|r| r.fingerprint as i64).collect::<Vec<_>>())
    .bind(t.iter().map(|r| r.detail.as_str()).collect::<Vec<_>>())
    .bind(t.iter().map(|r| r.fence as i64).collect::<Vec<_>>())
    .bind(c.iter().map(|r| r.contact_id.as_str()).collect::<Vec<_>>())
    .bind(c.iter().map(|r| r.partition).collect::<Vec<_>>())
    .bind(c.iter().map(|r| r.batch_no as i64).collect::<Vec<_>>())
    .bind(c.iter().map(|r| &r.state).collect::<Vec<_>>())
    .bind(c.iter().map(|r| r.on_hold).collect::<Vec<_>>())
    .bind(c.iter().map(|r| r.waiting).collect::<Vec<_>>())
    .bind(m.iter().map(|r| r.id).collect::<Vec<_>>())
    .bind(m.iter().map(|r| r.batch_no as i64).collect::<Vec<_>>())
    .bind(m.iter().map(|r| r.result.as_str()).collect::<Vec<_>>())
    .execute(pool)
    .await
    .map_err(db("writing a batch"))?;
    Ok(())
}

/// An operator's release of a held contact, waiting for the partition's owner.
#[derive(Debug, Clone)]
pub struct Command {
    pub id: i64,
    pub partition: i32,
    pub contact_id: String,
    /// `resume` or `skip_to`.
    pub action: String,
    pub skip_to: u64,
    pub actor: String,
}

/// Commands not yet applied for the given partitions.
pub async fn pending_commands(
    pool: &PgPool,
    topic: &str,
    partitions: &[i32],
) -> Result<Vec<Command>> {
    let rows: Vec<(i64, i32, String, String, i64, String)> = sqlx::query_as(
        "SELECT id, partition, contact_id, action, skip_to, actor FROM cc_command
          WHERE topic = $1 AND partition = ANY($2) AND applied_batch IS NULL ORDER BY id",
    )
    .bind(topic)
    .bind(partitions)
    .fetch_all(pool)
    .await
    .map_err(db("reading operator commands"))?;
    Ok(rows
        .into_iter()
        .map(
            |(id, partition, contact_id, action, skip_to, actor)| Command {
                id,
                partition,
                contact_id,
                action,
                skip_to: skip_to.max(0) as u64,
                actor,
            },
        )
        .collect())
}

/// Queues a release of a held contact for the instance that owns it, and audits the request.
/// Fails when the contact is unknown.
pub async fn submit_release(
    pool: &PgPool,
    contact_id: &str,
    skip_to: Option<u64>,
    actor: &str,
) -> Result<Option<i64>> {
    let mut tx = pool.begin().await.map_err(db("starting a release"))?;
    let at: Option<(String, i32)> =
        sqlx::query_as("SELECT topic, partition FROM cc_contact WHERE contact_id = $1")
            .bind(contact_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db("finding the contact"))?;
    let Some((topic, partition)) = at else {
        return Ok(None);
    };
    let action = if skip_to.is_some() {
        "skip_to"
    } else {
        "resume"
    };
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO cc_command (topic, partition, contact_id, action, skip_to, actor)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
    )
    .bind(&topic)
    .bind(partition)
    .bind(contact_id)
    .bind(action)
    .bind(skip_to.unwrap_or(0) as i64)
    .bind(actor)
    .fetch_one(&mut *tx)
    .await
    .map_err(db("queueing a release"))?;
    audit_admin(
        &mut *tx,
        actor,
        "release_requested",
        contact_id,
        serde_json::json!({ "command": id, "action": action, "skip_to": skip_to }),
    )
    .await?;
    tx.commit().await.map_err(db("committing a release"))?;
    Ok(Some(id))
}

/// The result of a command once applied (None while pending).
pub async fn command_result(pool: &PgPool, id: i64) -> Result<Option<String>> {
    let r: Option<Option<String>> =
        sqlx::query_scalar("SELECT result FROM cc_command WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await
            .map_err(db("reading a command"))?;
    Ok(r.flatten())
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
