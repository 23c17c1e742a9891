//! Why the pool gave no session. sqlx's pool retries a connection PostgreSQL refuses for now
//! (nothing listening, `too many connections` 53300, starting up 57P03) until its acquire
//! timeout, then answers only `pool timed out while waiting for an open connection`, the same
//! words as when its own sessions are all busy (sqlx issue 3808). The operator cannot tell a
//! stopped server from a full one from a pool too small. So after a call timed out waiting for
//! a session, [`explain_timeouts`] opens one connection of its own with the pool's options,
//! and logs what PostgreSQL answered it, and what that means, at most once every
//! [`EXPLAIN_EVERY`]. The steady path pays nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::PostgresConfig;

/// The message of the line [`explain_timeouts`] logs (its `cause` field says why).
pub const GOT_NO_SESSION: &str = "a PostgreSQL call got no session from the pool within \
     postgres.connect_timeout; a connection opened to ask PostgreSQL why found the cause";

/// At most one explanation this often, however many calls time out.
pub const EXPLAIN_EVERY: Duration = Duration::from_secs(10);

/// A call timed out waiting for a session.
static TIMED_OUT: Notify = Notify::const_new();
/// When a call last timed out waiting for a session (ms since the epoch).
static TIMED_OUT_AT_MS: AtomicU64 = AtomicU64::new(0);
/// A timeout older than this when [`explain_timeouts`] is free to look at it is not looked
/// into: it was noted while the last explanation's pause ran, and what a connection finds now
/// (an outage over) would be a wrong cause for it. A timeout that goes on recurs.
const STALE_AFTER: Duration = Duration::from_secs(2);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Whether a timeout noted at `at_ms` is still worth a look at `now_ms`.
fn fresh(at_ms: u64, now_ms: u64) -> bool {
    now_ms.saturating_sub(at_ms) <= STALE_AFTER.as_millis() as u64
}

/// Notes a call that timed out waiting for a session (from [`super::db`]).
pub(super) fn note(e: &sqlx::Error) {
    if matches!(e, sqlx::Error::PoolTimedOut) {
        TIMED_OUT_AT_MS.store(now_ms(), Ordering::Relaxed);
        TIMED_OUT.notify_one();
    }
}

/// What one connection of our own, opened with the pool's options, found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// PostgreSQL opened it: the server has room, the pool's own sessions were all busy.
    Opened,
    /// PostgreSQL (or the network) refused it.
    Refused {
        /// The SQLSTATE, when PostgreSQL answered with one.
        sqlstate: Option<String>,
        message: String,
    },
    /// Nothing answered within the connect timeout.
    NoAnswer,
}

impl Probe {
    /// What the probe means for the operator.
    pub fn meaning(&self, max_connections: u32) -> String {
        match self {
            Probe::Opened => format!(
                "PostgreSQL opens sessions now: the pool's {max_connections} \
                 (postgres.max_connections) were all busy for postgres.connect_timeout \
                 (statements slower than usual: locks, a loaded server; or a pool too small), \
                 or PostgreSQL has just come back"
            ),
            Probe::NoAnswer => "PostgreSQL did not answer a new connection within \
                 postgres.connect_timeout: a hung server or host, or a network dropping packets"
                .to_string(),
            Probe::Refused { sqlstate, message } => match sqlstate.as_deref() {
                Some("53300") => format!(
                    "PostgreSQL refuses new sessions, too many connections ({message}): its \
                     max_connections, or the CONNECTION LIMIT of the role or the database, is \
                     reached; raise it, or lower postgres.max_connections across the instances"
                ),
                Some("57P03") => {
                    format!(
                        "PostgreSQL is starting up or shutting down, or recovering from a \
                         crash ({message}): it opens sessions again by itself once it is ready"
                    )
                }
                Some(code) => format!("PostgreSQL refused a new session ({code}: {message})"),
                None => format!(
                    "no PostgreSQL session could be opened at postgres.url ({message}): a \
                     stopped server, or a wrong host or port"
                ),
            },
        }
    }
}

/// Opens one connection with `options`, closes it, and says how that went.
pub async fn probe(options: &PgConnectOptions, within: Duration) -> Probe {
    match tokio::time::timeout(within, options.connect()).await {
        Err(_) => Probe::NoAnswer,
        Ok(Ok(conn)) => {
            let _ = tokio::time::timeout(within, conn.close()).await;
            Probe::Opened
        }
        Ok(Err(e)) => Probe::Refused {
            sqlstate: match &e {
                sqlx::Error::Database(d) => d.code().map(|c| c.into_owned()),
                _ => None,
            },
            message: match &e {
                sqlx::Error::Database(d) => d.message().to_string(),
                e => e.to_string(),
            },
        },
    }
}

/// Whether `error` (or an error it wraps) is a call that got no session from the pool.
pub fn got_no_session(error: &anyhow::Error) -> bool {
    error.chain().any(|e| {
        matches!(
            e.downcast_ref::<super::Error>(),
            Some(super::Error::Db {
                source: sqlx::Error::PoolTimedOut,
                ..
            })
        ) || matches!(
            e.downcast_ref::<sqlx::Error>(),
            Some(sqlx::Error::PoolTimedOut)
        )
    })
}

/// What one [`probe`] with `config`'s options finds, for the operator.
pub async fn cause(config: &PostgresConfig) -> String {
    match super::connect_options(config) {
        Ok(options) => probe(&options, config.connect_timeout)
            .await
            .meaning(config.max_connections),
        Err(e) => e.to_string(),
    }
}

/// Until `shutdown`: after each call that timed out waiting for a session, one [`probe`] with
/// the pool's options (`config`'s) and one WARN line saying what it found (at most once every
/// [`EXPLAIN_EVERY`]).
pub async fn explain_timeouts(config: PostgresConfig, shutdown: CancellationToken) {
    // The pool was built from the same options, so this fails only if they changed since;
    // the task is spawned and nobody reads its result, so the failure is said here.
    let options = match super::connect_options(&config) {
        Ok(options) => options,
        Err(e) => {
            tracing::warn!(error = %e, "pool timeouts will not be explained: postgres.url does not parse");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = TIMED_OUT.notified() => {}
        }
        if !fresh(TIMED_OUT_AT_MS.load(Ordering::Relaxed), now_ms()) {
            continue;
        }
        let found = probe(&options, config.connect_timeout).await;
        let sqlstate = match &found {
            Probe::Refused { sqlstate, .. } => sqlstate.clone(),
            _ => None,
        };
        tracing::warn!(
            cause = %found.meaning(config.max_connections),
            sqlstate = sqlstate.as_deref().unwrap_or(""),
            "{GOT_NO_SESSION}"
        );
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(EXPLAIN_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_probe_names_its_cause() {
        let refused = |code: Option<&str>, message: &str| Probe::Refused {
            sqlstate: code.map(str::to_string),
            message: message.to_string(),
        };
        let full = refused(Some("53300"), "too many connections for database \"x\"");
        assert!(full
            .meaning(4)
            .contains("too many connections for database"));
        assert!(full.meaning(4).contains("CONNECTION LIMIT"));
        assert!(refused(Some("57P03"), "the database system is starting up")
            .meaning(4)
            .contains("starting up"));
        assert!(
            refused(Some("57P03"), "the database system is in recovery mode")
                .meaning(4)
                .contains("recovering from a crash")
        );
        assert!(refused(None, "Connection refused (os error 111)")
            .meaning(4)
            .contains("a stopped server"));
        assert!(refused(Some("28000"), "no pg_hba.conf entry")
            .meaning(4)
            .contains("28000: no pg_hba.conf entry"));
        assert!(Probe::Opened.meaning(7).contains("pool's 7"));
        assert!(Probe::NoAnswer.meaning(4).contains("did not answer"));
    }

    #[test]
    fn a_timeout_noted_during_the_pause_is_not_explained_once_stale() {
        assert!(fresh(10_000, 10_000));
        assert!(fresh(10_000, 12_000));
        assert!(!fresh(10_000, 12_001));
        assert!(fresh(10_000, 9_000), "a clock step back is not stale");
    }

    #[tokio::test]
    async fn a_closed_port_is_refused_without_a_sqlstate() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let options = PgConnectOptions::new().host("127.0.0.1").port(port);
        match probe(&options, Duration::from_secs(5)).await {
            Probe::Refused { sqlstate, message } => {
                assert_eq!(sqlstate, None);
                assert!(!message.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }
}
