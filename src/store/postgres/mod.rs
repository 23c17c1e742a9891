//! PostgreSQL: the durable state, the audit and the fencing authority. This module and its
//! children own every SQL statement of the project (other modules call named functions).
//!
//! - [`partition`]: partition leases, fencing tokens, restores against the recovery point.
//! - [`batch`]: the one-round-trip write of a batch (audit rows, contact states, commands).
//! - [`outcomes`]: the durable idempotency record (terminal outcomes by intent id).
//! - [`commands`]: operator commands and the admin audit.
//! - [`lock_store`]: the lock / idempotency store's bookkeeping and what it reads for Redis.
//! - [`schema`]: migrations, the runtime role's grants, the start-up check of the schema.

pub mod batch;
pub mod commands;
pub mod lock_store;
pub mod outcomes;
pub mod partition;
pub mod schema;
pub mod sessions;

pub use batch::{
    apply_batch, contact_owners, try_batch, AppliedCommand, BatchRows, BatchWrite, ContactRow,
    Forward, OwnedElsewhere, PartitionWrite, Transition, TransitionRow,
};
pub use commands::{
    audit_admin, cancel_command, command, list_commands, pending_commands, queue_command, Command,
    CommandAction, CommandResult, CommandState, CommandView, NewCommand, NotQueued, Resubmission,
    SkipTarget, UnreadableCommand,
};
pub use outcomes::{lookup_committed_outcomes, lookup_outcomes, StoredOutcome};
pub use partition::{
    acquire_partition, batch_outputs, batch_views, mark_committed, mark_committed_if_free,
    move_resume_point, not_refusing, release_partition, resolve_recovery_point, restore_partition,
    BatchOutputs, BatchView, Resolution, RestoreBounds, RestoredPartition,
};
pub use schema::{
    check as check_schema, check_topic, effect_partitions, grant_runtime_role, migrate,
};

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
    /// The call was given up: PostgreSQL had answered nothing when its own timeouts would have
    /// answered long before (see [`answer_within`]).
    #[error(
        "PostgreSQL did not answer within {} while {what} (a hung server or disk, a paused \
         machine, a network dropping packets); the call is given up",
        humantime::format_duration(*.after)
    )]
    NoAnswer {
        what: &'static str,
        after: std::time::Duration,
    },
    #[error("partition {partition} refuses to start: {refusal}")]
    Refused {
        partition: i32,
        refusal: crate::store::recovery::Refusal,
    },
    /// `recovery-point resume-at` or `resolve` refused: the reason, for the operator.
    #[error("{0}")]
    NotMoved(String),
    #[error("PostgreSQL holds an outcome this version cannot read: {0}")]
    BadOutcome(#[from] outcomes::BadOutcome),
    #[error("applying migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(
        "PostgreSQL schema `{schema}` does not exist: run `causal-commit migrate` with the owner \
         role first"
    )]
    SchemaMissing { schema: String },
    #[error(
        "role `{role}` may not use PostgreSQL schema `{schema}`: run `causal-commit migrate` with \
         the owner role and postgres.runtime_role = \"{role}\" (it grants USAGE on the schema)"
    )]
    SchemaNotUsable { schema: String, role: String },
    #[error(
        "PostgreSQL schema `{schema}` is behind this build, migrations not applied: {missing}; \
         run `causal-commit migrate` with the owner role"
    )]
    SchemaBehind { schema: String, missing: String },
    #[error(
        "PostgreSQL schema `{schema}`: migration {version:04} failed partway; repair it, then run \
         `causal-commit migrate` with the owner role"
    )]
    SchemaDirty { schema: String, version: i64 },
    #[error(
        "PostgreSQL schema `{schema}`: migration {version:04} was applied from a different file \
         than this build's (checksum mismatch)"
    )]
    SchemaChanged { schema: String, version: i64 },
    #[error(
        "PostgreSQL schema `{schema}` holds the causal sequences of the contacts of intents \
         topic {consumed:?}, and kafka.intents_topic is {topic:?}: one schema follows one \
         intents topic (its contacts' sequences live in it). To grow, add partitions to \
         {consumed:?} (they are picked up without a restart); to start over on {topic:?}, give \
         it a postgres.schema of its own (its contacts' sequences start again at 1, which the \
         readers of the side-effects topic must expect); or set kafka.intents_topic back"
    )]
    OtherTopic {
        schema: String,
        consumed: String,
        topic: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn db(what: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |source| {
        read_only::note(&source);
        sessions::note(&source);
        Error::Db { what, source }
    }
}

/// Sessions that can no longer write. A server that refuses writes (a standby after a
/// failover, or writes frozen with `default_transaction_read_only` for maintenance) answers
/// every write with SQLSTATE 25006. Frozen with `ALTER DATABASE ... SET`, the setting is taken
/// when a session starts and kept: the pool's sessions opened during the freeze would go on
/// refusing writes after it, until they expire (30 minutes), and the partitions would stay
/// paused that long. So once a statement was refused for that, for [`RECHECK_FOR`] after it
/// each session the pool hands out is asked first whether it can write (one short round
/// trip), and one that cannot, opened over a second ago, is closed: the pool opens a new one,
/// which starts with the server's setting now. Not checked otherwise: the steady path pays
/// nothing.
mod read_only {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    /// How long after the last refusal sessions are checked before use.
    pub const RECHECK_FOR: Duration = Duration::from_secs(600);
    /// A session younger than this is used as it is (it started with the server's setting
    /// now): a server still refusing writes is not reconnected to in a loop.
    pub const FRESH: Duration = Duration::from_secs(1);
    const READ_ONLY_SQL_TRANSACTION: &str = "25006";

    /// When a statement was last refused because its session could not write (ms since the
    /// epoch; 0: never).
    static REFUSED_AT_MS: AtomicU64 = AtomicU64::new(0);

    fn now_ms() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    pub fn note(e: &sqlx::Error) {
        if let sqlx::Error::Database(d) = e {
            if d.code().as_deref() == Some(READ_ONLY_SQL_TRANSACTION) {
                REFUSED_AT_MS.store(now_ms(), Ordering::Relaxed);
            }
        }
    }

    /// Sessions are to be checked before use.
    pub fn rechecking() -> bool {
        let at = REFUSED_AT_MS.load(Ordering::Relaxed);
        at != 0 && now_ms().saturating_sub(at) < RECHECK_FOR.as_millis() as u64
    }
}

/// How the pool's sessions connect: `config.url`, `config.schema` as the search path, and a
/// statement timeout.
pub fn connect_options(config: &PostgresConfig) -> Result<PgConnectOptions> {
    if !is_identifier(&config.schema) {
        return Err(Error::Schema(config.schema.clone()));
    }
    Ok(PgConnectOptions::from_str(config.url.expose_secret())
        .map_err(Error::Url)?
        .application_name("causal-commit")
        .options([
            ("search_path", config.schema.as_str()),
            (
                "statement_timeout",
                &config.statement_timeout.as_millis().to_string(),
            ),
        ]))
}

/// A lazily connecting pool whose sessions connect with [`connect_options`].
pub fn pool(config: &PostgresConfig) -> Result<PgPool> {
    let options = connect_options(config)?;
    Ok(PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.connect_timeout)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if !read_only::rechecking() || meta.age < read_only::FRESH {
                    return Ok(true);
                }
                let read_only: bool =
                    sqlx::query_scalar("SELECT current_setting('transaction_read_only') = 'on'")
                        .fetch_one(conn)
                        .await?;
                Ok(!read_only)
            })
        })
        .connect_lazy_with(options))
}

/// How long a call to PostgreSQL whose statements run under `statement_timeout` may go
/// unanswered before it is given up ([`Error::NoAnswer`]): the pool's wait for a session
/// (`connect_timeout`), twice the statement timeout (calls of several statements: a restore,
/// a trial write), and a second for the network. PostgreSQL ends a slow statement itself
/// (SQLSTATE 57014); a call unanswered past this means a server that runs nothing at all
/// (stopped, its disk hung, its machine paused) or a network that drops the reply, and its
/// TCP connection may wait for hours. Giving it up keeps the engine's thread polling Kafka
/// (a consumer that has not polled for `max.poll.interval.ms`, 5 minutes by default, leaves
/// its group) and tells the operator (not ready, a log line).
pub fn answer_within(
    config: &PostgresConfig,
    statement_timeout: std::time::Duration,
) -> std::time::Duration {
    config.connect_timeout + statement_timeout * 2 + std::time::Duration::from_secs(1)
}

/// Why a durable write was refused.
pub const FENCED_SQLSTATE: &str = "CC001";

impl Error {
    /// The write was refused because another writer owns the partition now.
    pub fn is_fenced(&self) -> bool {
        self.sqlstate().as_deref() == Some(FENCED_SQLSTATE)
    }

    /// PostgreSQL cancelled the statement (57014): `postgres.statement_timeout` ran out (or an
    /// operator's `pg_cancel_backend`). The same statement on the same rows may well run out
    /// again; a smaller one may not.
    pub fn is_cancelled(&self) -> bool {
        self.sqlstate().as_deref() == Some("57014")
    }

    /// The SQLSTATE PostgreSQL answered with, if it answered.
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            Error::Db {
                source: sqlx::Error::Database(e),
                ..
            } => e.code().map(|c| c.into_owned()),
            _ => None,
        }
    }

    /// The contacts a batch wrote that other partitions own (SQLSTATE CC004), if that is why
    /// the write was refused.
    pub fn owned_elsewhere(&self) -> Option<Vec<batch::OwnedElsewhere>> {
        serde_json::from_str(self.refusal_detail(batch::OWNED_ELSEWHERE_SQLSTATE)?).ok()
    }

    /// The write was refused because intents of the batch have an outcome from an earlier batch
    /// (their ids): the idempotency lookup missed them (see migration 0012).
    pub fn decided_before(&self) -> Option<Vec<String>> {
        serde_json::from_str(self.refusal_detail(batch::DECIDED_BEFORE_SQLSTATE)?).ok()
    }

    /// The write was refused because intents of the batch are being decided by a batch of
    /// another partition, not committed yet (their ids, migration 0015): two decisions of one
    /// id at once, of which the first claim wins.
    pub fn decided_in_flight(&self) -> Option<Vec<String>> {
        serde_json::from_str(self.refusal_detail(batch::DECIDED_IN_FLIGHT_SQLSTATE)?).ok()
    }

    /// The DETAIL of a refusal raised by one of the schema's functions with `sqlstate`.
    fn refusal_detail(&self, sqlstate: &str) -> Option<&str> {
        let Error::Db {
            source: sqlx::Error::Database(e),
            ..
        } = self
        else {
            return None;
        };
        if e.code().as_deref() != Some(sqlstate) {
            return None;
        }
        e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
            .and_then(|pg| pg.detail())
    }

    /// PostgreSQL refused the data itself, not for an outage: a value it cannot hold (class
    /// 22), a constraint (23), a row touched twice by one statement (21), a size limit (54).
    /// The same write fails the same way every time, so it is isolated rather than retried.
    pub fn is_data_error(&self) -> bool {
        self.sqlstate().is_some_and(|code| is_data_sqlstate(&code))
    }

    /// PostgreSQL did not answer (in time: [`Error::NoAnswer`]), or answered that it cannot
    /// serve now: stopped, starting up or shutting down, out of connections, refusing writes for now (read-only), the
    /// connection lost, or a handshake cut short (a server shutting down answered a
    /// connection's SSLRequest with a byte no PostgreSQL sends: the chaos test's instance
    /// started 0.2 s before PostgreSQL stopped exited on it). Waiting may heal it; a refused
    /// login, a missing schema or a failed statement does not.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Error::Db {
                source: sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Protocol(_),
                ..
            } | Error::NoAnswer { .. }
        ) || self
            .sqlstate()
            .is_some_and(|code| is_unavailable_sqlstate(&code))
    }
}

/// See [`Error::is_unavailable`]: connection exceptions (class 08), the server shutting down
/// or starting up (57P01, 57P02, 57P03), too many connections (53300), writes refused by a
/// server that is read-only now (25006: a standby, or writes frozen for maintenance).
pub fn is_unavailable_sqlstate(code: &str) -> bool {
    code.starts_with("08") || ["57P01", "57P02", "57P03", "53300", "25006"].contains(&code)
}

/// See [`Error::is_data_error`].
pub fn is_data_sqlstate(code: &str) -> bool {
    ["21", "22", "23", "54"]
        .iter()
        .any(|class| code.starts_with(class))
}

#[cfg(test)]
mod tests {
    #[test]
    fn unavailable_is_an_outage_never_a_refusal() {
        for code in [
            "08006", "08001", "57P01", "57P02", "57P03", "53300", "25006",
        ] {
            assert!(super::is_unavailable_sqlstate(code), "{code}");
        }
        // A refused login, a missing relation or privilege, a cancelled statement, our own
        // fencing: waiting does not heal them.
        for code in [
            "28P01", "28000", "42P01", "42501", "57014", "CC001", "3D000",
        ] {
            assert!(!super::is_unavailable_sqlstate(code), "{code}");
        }
        let db = |source| super::Error::Db {
            what: "testing",
            source,
        };
        assert!(db(sqlx::Error::PoolTimedOut).is_unavailable());
        assert!(db(sqlx::Error::Io(
            std::io::ErrorKind::ConnectionRefused.into()
        ))
        .is_unavailable());
        assert!(db(sqlx::Error::Protocol(
            "unexpected response from SSLRequest: 0x00".into()
        ))
        .is_unavailable());
        assert!(!db(sqlx::Error::RowNotFound).is_unavailable());
        let no_answer = super::Error::NoAnswer {
            what: "writing a batch",
            after: std::time::Duration::from_secs(26),
        };
        assert!(no_answer.is_unavailable() && !no_answer.is_cancelled());
        assert!(no_answer
            .to_string()
            .starts_with("PostgreSQL did not answer within 26s while writing a batch"));
        assert!(!super::Error::SchemaMissing { schema: "s".into() }.is_unavailable());
    }

    #[test]
    fn a_call_is_given_up_only_after_the_servers_own_timeouts() {
        let config = crate::config::PostgresConfig::default();
        let s = std::time::Duration::from_secs;
        // The defaults: a 5 s connect timeout and a 10 s statement timeout.
        assert_eq!(
            super::answer_within(&config, config.statement_timeout),
            s(26)
        );
        // A restore's longest statement timeout (pipeline::restore's RESTORE_TIMEOUT_MAX) stays
        // within librdkafka's default max.poll.interval.ms of 5 minutes.
        assert!(super::answer_within(&config, s(120)) < s(300));
    }

    #[test]
    fn data_errors_are_the_classes_that_repeat_identically() {
        for code in ["22021", "22P05", "23514", "23505", "21000", "54000"] {
            assert!(super::is_data_sqlstate(code), "{code}");
        }
        // Outages, timeouts, fencing and our own sequence check are not data errors.
        for code in [
            "08006", "57014", "53100", "40001", "CC001", "CC003", "XX000",
        ] {
            assert!(!super::is_data_sqlstate(code), "{code}");
        }
    }
}
