//! PostgreSQL counters (what a run wrote) and the clean-up of a run's schema and Redis keys.

use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

/// Cumulative PostgreSQL counters. `db_rows` and `wal_bytes` are database / cluster wide (what
/// the brief asks for: `pg_stat_database` and `pg_current_wal_lsn()`), so anything else writing
/// at the same time counts too; `schema_rows` counts only the run's own schema.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct PgCounters {
    pub db_rows: i64,
    pub wal_bytes: i64,
    pub schema_rows: i64,
}

impl PgCounters {
    pub fn since(self, before: PgCounters) -> PgCounters {
        PgCounters {
            db_rows: self.db_rows - before.db_rows,
            wal_bytes: self.wal_bytes - before.wal_bytes,
            schema_rows: self.schema_rows - before.schema_rows,
        }
    }
}

pub async fn pool(url: &str) -> anyhow::Result<PgPool> {
    Ok(PgPoolOptions::new().max_connections(2).connect(url).await?)
}

pub async fn counters(pool: &PgPool, schema: &str) -> anyhow::Result<PgCounters> {
    let (db_rows,): (i64,) = sqlx::query_as(
        "SELECT (tup_inserted + tup_updated + tup_deleted)::bigint \
         FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await?;
    let (wal_bytes,): (i64,) =
        sqlx::query_as("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint")
            .fetch_one(pool)
            .await?;
    let (schema_rows,): (i64,) = sqlx::query_as(
        "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0)::bigint \
         FROM pg_stat_user_tables WHERE schemaname = $1",
    )
    .bind(schema)
    .fetch_one(pool)
    .await?;
    Ok(PgCounters {
        db_rows,
        wal_bytes,
        schema_rows,
    })
}

pub async fn drop_schema(pool: &PgPool, schema: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        causal_commit::config::is_identifier(schema),
        "refusing to drop {schema:?}: not a plain identifier"
    );
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .execute(pool)
        .await?;
    Ok(())
}

/// Removes every Redis key under `prefix:` (the run's idempotency records and locks).
pub async fn delete_redis_keys(url: &str, prefix: &str) -> anyhow::Result<u64> {
    let client = redis::Client::open(url)?;
    let mut con = client.get_multiplexed_async_connection().await?;
    let pattern = format!("{prefix}:*");
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut con)
            .await?;
        if !keys.is_empty() {
            let n: u64 = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(&mut con)
                .await?;
            deleted += n;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}
