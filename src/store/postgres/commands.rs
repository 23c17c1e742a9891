//! Operator commands (applied by the partition's owner inside a batch) and the admin audit.

use sqlx::PgPool;

use super::{db, Result};

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
