//! The schema and its two roles. `causal-commit migrate` runs with the owner role: it creates the
//! schema, applies `migrations/` and grants the runtime role what `run` needs (USAGE on the
//! schema; reads and writes on its tables, sequences and functions; reading, not writing, the
//! migration history). `run` connects with the runtime role, which cannot change the schema,
//! and checks first that every migration of this build is applied ([`check`]).

use sqlx::migrate::Migrator;
use sqlx::PgPool;

use super::{db, Error, Result};
use crate::config::is_identifier;

/// The migrations of this build (`migrations/`, embedded at compile time).
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// sqlx's migration history table, in the schema.
const HISTORY: &str = "_sqlx_migrations";

/// Creates the schema when missing and applies every migration in `migrations/`. Needs the
/// owner role (DDL), unless the schema is up to date already: then there is nothing to do.
///
/// Concurrent runs are safe (an operator's second terminal, a retried pipeline, a migrate
/// Job's pod replaced while the first still runs): the schema's creation and the grants
/// ([`grant_runtime_role`]) each take [`lock_schema_changes`], and sqlx serialises the
/// migrations with an advisory lock of its own. Without the first two, PostgreSQL refused
/// runs at once: `tuple concurrently updated` from the grants, and a unique violation on
/// `pg_namespace` from `CREATE SCHEMA IF NOT EXISTS` (the test
/// `secure::migrate_run_several_times_at_once_succeeds_every_time`).
pub async fn migrate(pool: &PgPool, schema: &str) -> Result<()> {
    if !is_identifier(schema) {
        return Err(Error::Schema(schema.to_string()));
    }
    if applied(pool, schema).await.is_ok() {
        return Ok(());
    }
    let mut tx = pool.begin().await.map_err(db("creating the schema"))?;
    lock_schema_changes(&mut tx, schema, "creating the schema").await?;
    // The identifier was checked above, so splicing it is safe.
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
        .execute(&mut *tx)
        .await
        .map_err(db("creating the schema"))?;
    tx.commit().await.map_err(db("creating the schema"))?;
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Waits for, and holds until `tx` ends, the lock that serialises the schema changes of
/// concurrent `migrate` runs on `schema` (a transaction-level advisory lock keyed by the
/// schema's name, so runs on other schemas do not wait). Concurrent `GRANT`s on one object
/// fail in PostgreSQL (`tuple concurrently updated`), and so may two `CREATE SCHEMA IF NOT
/// EXISTS` of one name.
async fn lock_schema_changes(
    tx: &mut sqlx::PgConnection,
    schema: &str,
    what: &'static str,
) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("causal-commit migrate {schema}"))
        .execute(tx)
        .await
        .map_err(db(what))?;
    Ok(())
}

/// Grants `role` what `run` needs in `schema`, and nothing more: USAGE on the schema (not
/// CREATE), SELECT/INSERT/UPDATE/DELETE on its tables, USAGE/SELECT on its sequences, EXECUTE
/// on its functions, and only SELECT on the migration history. Idempotent; run by `migrate`
/// after the migrations, so it covers the objects they created.
pub async fn grant_runtime_role(pool: &PgPool, schema: &str, role: &str) -> Result<()> {
    for name in [schema, role] {
        if !is_identifier(name) {
            return Err(Error::Schema(name.to_string()));
        }
    }
    // Both identifiers were checked above, so splicing them is safe.
    let statements = [
        format!("GRANT USAGE ON SCHEMA {schema} TO {role}"),
        format!("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role}"),
        format!("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO {role}"),
        format!("GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {schema} TO {role}"),
        format!("REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON {schema}.{HISTORY} FROM {role}"),
    ];
    let mut tx = pool
        .begin()
        .await
        .map_err(db("granting the runtime role its rights"))?;
    lock_schema_changes(&mut tx, schema, "granting the runtime role its rights").await?;
    for statement in &statements {
        sqlx::query(statement)
            .execute(&mut *tx)
            .await
            .map_err(db("granting the runtime role its rights"))?;
    }
    tx.commit()
        .await
        .map_err(db("granting the runtime role its rights"))
}

/// What the connected role finds of the schema.
#[derive(Debug, sqlx::FromRow)]
struct Found {
    role: String,
    schema_exists: bool,
    can_use: bool,
    can_create: bool,
    tracked: bool,
}

/// One row of the migration history.
#[derive(Debug, sqlx::FromRow)]
struct Applied {
    version: i64,
    success: bool,
    checksum: Vec<u8>,
}

/// Checks, with the role `run` uses, that `schema` exists, is usable, and has every migration
/// of this build applied (later ones, from a newer build, are fine: migrations keep the
/// previous release working). The error names what is missing and the command to run.
/// Warns when the role could change the schema: `run` needs only the runtime role's rights.
pub async fn check(pool: &PgPool, schema: &str) -> Result<()> {
    let found = applied(pool, schema).await?;
    if found.can_create {
        tracing::warn!(
            role = %found.role,
            schema = %schema,
            "run connects with a role that may change the schema (CREATE on it): give it the \
             runtime role, which only reads and writes rows (README, Deploying)"
        );
    }
    Ok(())
}

/// Fails with [`Error::OtherTopic`] when `schema` holds batches consumed from another intents
/// topic than `topic`: its contacts' states and ownership belong to that topic's partitions,
/// and this topic's partitions would be refused every write of those contacts.
pub async fn check_topic(pool: &PgPool, schema: &str, topic: &str) -> Result<()> {
    let other: Option<String> = sqlx::query_scalar(
        "SELECT topic FROM cc_partition WHERE topic <> $1 AND last_batch > 0
          ORDER BY topic LIMIT 1",
    )
    .bind(topic)
    .fetch_optional(pool)
    .await
    .map_err(db("checking the schema's intents topic"))?;
    match other {
        None => Ok(()),
        Some(consumed) => Err(Error::OtherTopic {
            schema: schema.to_owned(),
            consumed,
            topic: topic.to_owned(),
        }),
    }
}

/// The partition count the effects of side-effects topic `topic` are spread over (migration
/// 0016): the count recorded, else `seen` (the topic's count now), recorded first. `None` when
/// nothing is recorded and `seen` is `None` (the brokers did not say). Concurrent first starts
/// agree: the first insert wins and every one reads it.
pub async fn effect_partitions(
    pool: &PgPool,
    topic: &str,
    seen: Option<i32>,
) -> Result<Option<i32>> {
    if let Some(partitions) = seen {
        sqlx::query(
            "INSERT INTO cc_effect_partitions (topic, partitions) VALUES ($1, $2)
             ON CONFLICT (topic) DO NOTHING",
        )
        .bind(topic)
        .bind(partitions)
        .execute(pool)
        .await
        .map_err(db("recording the side-effects topic's partition count"))?;
    }
    sqlx::query_scalar("SELECT partitions FROM cc_effect_partitions WHERE topic = $1")
        .bind(topic)
        .fetch_optional(pool)
        .await
        .map_err(db("reading the side-effects topic's partition count"))
}

/// What the connected role finds of `schema`, once every migration of this build is known to
/// be applied to it.
async fn applied(pool: &PgPool, schema: &str) -> Result<Found> {
    if !is_identifier(schema) {
        return Err(Error::Schema(schema.to_string()));
    }
    let found: Found = sqlx::query_as(
        "SELECT current_user::text AS role,
                n.oid IS NOT NULL AS schema_exists,
                coalesce(has_schema_privilege(n.oid, 'USAGE'), false) AS can_use,
                coalesce(has_schema_privilege(n.oid, 'CREATE'), false) AS can_create,
                EXISTS (SELECT 1 FROM pg_class c
                         WHERE c.relnamespace = n.oid AND c.relname = $2) AS tracked
           FROM (SELECT 1) AS one LEFT JOIN pg_namespace n ON n.nspname = $1",
    )
    .bind(schema)
    .bind(HISTORY)
    .fetch_one(pool)
    .await
    .map_err(db("checking the schema"))?;
    let schema = schema.to_string();
    if !found.schema_exists {
        return Err(Error::SchemaMissing { schema });
    }
    if !found.can_use {
        return Err(Error::SchemaNotUsable {
            schema,
            role: found.role,
        });
    }
    let applied: Vec<Applied> = if found.tracked {
        // The identifier was checked above, so splicing it is safe.
        sqlx::query_as(&format!(
            "SELECT version, success, checksum FROM {schema}.{HISTORY}"
        ))
        .fetch_all(pool)
        .await
        .map_err(db("reading the applied migrations"))?
    } else {
        Vec::new()
    };
    verdict(&schema, &applied)?;
    Ok(found)
}

/// The pure part of [`check`]: every migration of this build applied, none failed or changed.
fn verdict(schema: &str, applied: &[Applied]) -> Result<()> {
    let mut missing = Vec::new();
    for m in MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
    {
        match applied.iter().find(|a| a.version == m.version) {
            None => missing.push(format!("{:04} ({})", m.version, m.description)),
            Some(a) if !a.success => {
                return Err(Error::SchemaDirty {
                    schema: schema.to_string(),
                    version: m.version,
                })
            }
            Some(a) if a.checksum != *m.checksum => {
                return Err(Error::SchemaChanged {
                    schema: schema.to_string(),
                    version: m.version,
                })
            }
            Some(_) => {}
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::SchemaBehind {
            schema: schema.to_string(),
            missing: missing.join(", "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_applied() -> Vec<Applied> {
        MIGRATOR
            .iter()
            .map(|m| Applied {
                version: m.version,
                success: true,
                checksum: m.checksum.to_vec(),
            })
            .collect()
    }

    #[test]
    fn a_schema_with_every_migration_passes_and_later_ones_are_fine() {
        let mut applied = all_applied();
        assert!(verdict("s", &applied).is_ok());
        applied.push(Applied {
            version: 9999,
            success: true,
            checksum: vec![1],
        });
        assert!(verdict("s", &applied).is_ok());
    }

    #[test]
    fn a_schema_behind_names_the_missing_version_and_the_command() {
        let mut applied = all_applied();
        let last = applied.pop().expect("at least one migration");
        let msg = verdict("s", &applied).unwrap_err().to_string();
        assert!(
            msg.contains(&format!("{:04}", last.version)) && msg.contains("causal-commit migrate"),
            "{msg}"
        );
        let msg = verdict("s", &[]).unwrap_err().to_string();
        assert!(msg.contains("0001 (state and audit)"), "{msg}");
    }

    #[test]
    fn a_failed_or_changed_migration_is_refused() {
        let mut applied = all_applied();
        applied[0].success = false;
        assert!(matches!(
            verdict("s", &applied),
            Err(Error::SchemaDirty { version: 1, .. })
        ));
        let mut applied = all_applied();
        applied[0].checksum = vec![0];
        assert!(matches!(
            verdict("s", &applied),
            Err(Error::SchemaChanged { version: 1, .. })
        ));
    }
}
