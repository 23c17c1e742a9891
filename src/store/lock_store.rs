//! The lock / idempotency store: Redis as the fast path, PostgreSQL as the fallback and the
//! authority. One facade, [`LockStore`], for the engine.
//!
//! # What each store decides
//!
//! - **Fencing tokens** come from PostgreSQL only (`postgres::acquire_partition`, sequence
//!   `cc_fence_seq`), and every durable write checks them. The Redis partition lock in front of it
//!   ([`LockStore::acquire_lock`]) is a fast, advisory mutual-exclusion lease: losing it (Redis
//!   down, lease expired) never lets a zombie write, because the durable store rejects stale
//!   tokens. In PostgreSQL mode the lock call answers "granted" and the PostgreSQL lease decides.
//! - **Idempotency**: PostgreSQL's `cc_transition` holds every terminal outcome forever; Redis
//!   holds a copy of the recent ones (`redis.idempotency_ttl`). A batch's lookup is one MGET
//!   (the epoch key plus every intent id); a committed batch's outcomes are written through in one
//!   script call ([`LockStore::record`]).
//!
//! # When is a Redis miss "never seen"?
//!
//! Only while Redis is **in sync**: its epoch key (`{prefix}:epoch` = `<epoch>:<run_id>`) names the
//! PostgreSQL epoch (`cc_store_state.epoch`) *and* the server incarnation this process is talking
//! to. Otherwise PostgreSQL answers the whole lookup — Redis hits are not used either, because an
//! outcome can change while Redis is behind (a manual-review item re-submitted and committed
//! during a fallback).
//!
//! - Every switch to PostgreSQL **registers the fallback** in PostgreSQL before any decision of the
//!   fallback period is written: the epoch is bumped (so every Redis is out of sync) and a row in
//!   `cc_store_fallback` records from which `cc_transition.id` outcomes may be missing from Redis
//!   (computed from the time of the trip minus a margin that covers a batch in flight).
//! - **Failback** (the half-open probe succeeded) resynchronises before Redis is trusted: every
//!   terminal outcome since the lowest watermark of `cc_store_fallback` is copied — or, when the
//!   epoch key is missing or names another server incarnation (FLUSHALL, restart, restore of an
//!   old snapshot), every terminal outcome younger than the TTL — in id order, so newer outcomes
//!   overwrite older ones; then, under a row lock on `cc_store_state` (epoch unchanged, no other
//!   instance still in fallback), the epoch key is set and the rows are deleted.
//! - While a resynchronisation runs, outcomes are written through live (stamped with the server
//!   time); the copy never overwrites a key written live after it started, and a write that timed
//!   out on the client can never land later (a deadline checked by the write script).
//! - The last committed batch of a partition may have been committed in Kafka without reaching
//!   Redis (a crash between the Kafka commit and [`LockStore::record`]):
//!   [`LockStore::partition_restored`], called after every restore, writes it again and refreshes
//!   the cached epoch (so a partition taken over from an instance in fallback is never served
//!   from a stale Redis).
//!
//! # Health
//!
//! Every Redis call has a timeout (`redis.command_timeout`). A [`Breaker`] opens after
//! `redis.breaker_failures` consecutive failures (a failed write-through opens it at once, since
//! Redis is then behind), stays open `redis.breaker_open_for`, then [`LockStore::health_check`]
//! probes (fresh connection, PING) and resynchronises. Each mode change is one log line, the
//! gauge `causal_commit_lock_store_mode{mode}` and one `cc_admin_audit` row (`lock_store_mode`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::PgPool;

use crate::config::Config;
use crate::store::breaker::{Breaker, Transition};
use crate::store::postgres::{self as pg, db, StoredOutcome};
use crate::store::redis::{self as r, Conn, PutMode, RawLock, RedisStore};
use crate::telemetry::metrics as m;

/// Which store serves locks and idempotency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Redis,
    Postgres,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Redis => "redis",
            Mode::Postgres => "postgres",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The answer to [`LockStore::acquire_lock`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockResult {
    /// Go on and take the partition's fencing token from PostgreSQL (`acquire_partition`, which
    /// has the last word). `store` says who granted: Redis, or nobody because the lock store is
    /// in PostgreSQL mode (or Redis failed during the call).
    Granted { store: Mode },
    /// Another owner holds the Redis lock for `ttl` more.
    Held { owner: String, ttl: Duration },
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// PostgreSQL was needed (fallback, out-of-sync Redis, bookkeeping) and failed.
    #[error(transparent)]
    Postgres(#[from] pg::Error),
    /// Only from [`LockStore::new`]: `redis.url` does not parse.
    #[error(transparent)]
    Redis(#[from] r::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Counters for tests and diagnostics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Lookups answered by Redis alone (one round trip).
    pub lookups_redis: u64,
    /// Lookups answered by PostgreSQL (fallback or out-of-sync Redis).
    pub lookups_postgres: u64,
    /// Redis calls made (each one round trip, bar a one-off script load).
    pub redis_calls: u64,
    /// Failed Redis calls (errors and timeouts).
    pub redis_failures: u64,
    /// Completed resynchronisations.
    pub resyncs: u64,
    /// Outcomes copied to Redis by resynchronisations.
    pub resynced_outcomes: u64,
}

/// Ids of `cc_transition` read per query when copying outcomes to Redis.
const ID_CHUNK: i64 = 5_000;
/// Keys per Redis write while copying.
const KEYS_PER_WRITE: usize = 1_000;

use crate::store::postgres::outcomes::IDEMPOTENCY_ROWS as TERMINAL_FILTER;

#[derive(Debug, Clone)]
enum Fallback {
    /// No fallback row of this instance needs maintaining.
    Clear,
    /// Switched to PostgreSQL (or a write-through failed) at `since`; not yet registered.
    Pending {
        since: Instant,
        /// The audit row of the mode change, written with the registration.
        audit: Option<(Mode, String)>,
    },
    /// Registered; the row's liveness was last renewed at `renewed`.
    Registered { renewed: Instant },
}

#[derive(Debug)]
struct State {
    breaker: Breaker,
    mode: Mode,
    /// The PostgreSQL epoch as last read (only grows).
    pg_epoch: Option<i64>,
    /// Last observation of Redis against PostgreSQL (None: not checked yet).
    in_sync: Option<bool>,
    /// The resynchronisation in progress: outcomes are written through while it runs.
    resync: Option<u64>,
    resync_seq: u64,
    /// A write-through failed during the resynchronisation in progress.
    spoiled: bool,
    fallback: Fallback,
    /// Mode changes to Redis whose audit row is not written yet.
    pending_audit: Vec<serde_json::Value>,
}

/// The lock / idempotency store facade (see the module documentation). Share it behind an
/// `Arc`; every method takes `&self`. Use it from one multi-threaded tokio runtime (its Redis
/// connection's driver task lives there).
pub struct LockStore {
    redis: RedisStore,
    pool: PgPool,
    instance: String,
    ttl: Duration,
    /// How far before a trip outcomes may be missing from Redis (a batch in flight).
    fallback_margin: Duration,
    /// How long a fallback row stays alive without renewal.
    alive_for: Duration,
    state: Mutex<State>,
    /// Serialises health checks (probe, resynchronisation).
    health: tokio::sync::Mutex<()>,
    /// Serialises fallback registrations.
    registration: tokio::sync::Mutex<()>,
    lookups_redis: AtomicU64,
    lookups_postgres: AtomicU64,
    redis_failures: AtomicU64,
    resyncs: AtomicU64,
    resynced_outcomes: AtomicU64,
}

impl std::fmt::Debug for LockStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockStore")
            .field("redis", &self.redis)
            .field("instance", &self.instance)
            .field("mode", &self.mode())
            .finish()
    }
}

enum Resynced {
    InSync { copied: u64 },
    Blocked { by: Vec<String> },
}

enum ResyncError {
    Redis(r::Error),
    Postgres(pg::Error),
    Interrupted(&'static str),
}

impl std::fmt::Display for ResyncError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResyncError::Redis(e) => write!(f, "{e}"),
            ResyncError::Postgres(e) => write!(f, "{e}"),
            ResyncError::Interrupted(why) => write!(f, "interrupted: {why}"),
        }
    }
}

impl From<pg::Error> for ResyncError {
    fn from(e: pg::Error) -> Self {
        ResyncError::Postgres(e)
    }
}

impl From<r::Error> for ResyncError {
    fn from(e: r::Error) -> Self {
        ResyncError::Redis(e)
    }
}

fn set_mode_gauge(mode: Mode) {
    for m_ in [Mode::Redis, Mode::Postgres] {
        let v = if m_ == mode { 1.0 } else { 0.0 };
        metrics::gauge!(m::LOCK_STORE_MODE, "mode" => m_.as_str()).set(v);
    }
}

impl LockStore {
    /// Builds the store from `config.redis` (AUTH and TLS through the URL) and the PostgreSQL
    /// pool (migrated, including `0002_lock_store.sql`). Connects lazily; starts in Redis mode.
    pub fn new(config: &Config, pool: PgPool) -> Result<Self> {
        let redis = RedisStore::new(&config.redis)?;
        let rc = &config.redis;
        let fallback_margin = 2
            * (config.kafka.transaction_timeout + config.postgres.statement_timeout)
            + Duration::from_secs(60);
        let alive_for = (2 * (config.locks.lease + config.postgres.statement_timeout))
            .max(Duration::from_secs(10));
        set_mode_gauge(Mode::Redis);
        Ok(Self {
            redis,
            pool,
            instance: config.instance_id(),
            ttl: rc.idempotency_ttl,
            fallback_margin,
            alive_for,
            state: Mutex::new(State {
                breaker: Breaker::new(rc.breaker_failures, rc.breaker_open_for),
                mode: Mode::Redis,
                pg_epoch: None,
                in_sync: None,
                resync: None,
                resync_seq: 0,
                spoiled: false,
                fallback: Fallback::Clear,
                pending_audit: Vec::new(),
            }),
            health: tokio::sync::Mutex::new(()),
            registration: tokio::sync::Mutex::new(()),
            lookups_redis: AtomicU64::new(0),
            lookups_postgres: AtomicU64::new(0),
            redis_failures: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
            resynced_outcomes: AtomicU64::new(0),
        })
    }

    fn st(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("lock store state")
    }

    /// The store serving locks and idempotency now.
    pub fn mode(&self) -> Mode {
        self.st().mode
    }

    /// Whether Redis was last seen in sync with PostgreSQL (its misses authoritative).
    pub fn redis_in_sync(&self) -> bool {
        let st = self.st();
        st.mode == Mode::Redis && st.in_sync == Some(true)
    }

    pub fn stats(&self) -> Stats {
        Stats {
            lookups_redis: self.lookups_redis.load(Ordering::Relaxed),
            lookups_postgres: self.lookups_postgres.load(Ordering::Relaxed),
            redis_calls: self.redis.calls(),
            redis_failures: self.redis_failures.load(Ordering::Relaxed),
            resyncs: self.resyncs.load(Ordering::Relaxed),
            resynced_outcomes: self.resynced_outcomes.load(Ordering::Relaxed),
        }
    }

    // ---------------------------------------------------------------------------------------
    // The engine's calls

    /// Takes (or renews: same owner) the Redis lock of an input partition, before the engine
    /// takes its fencing token from PostgreSQL. Never fails because of Redis: in PostgreSQL mode,
    /// or when Redis fails during the call, the answer is `Granted { store: Postgres }` and the
    /// PostgreSQL lease decides.
    pub async fn acquire_lock(
        &self,
        topic: &str,
        partition: i32,
        owner: &str,
        lease: Duration,
    ) -> Result<LockResult> {
        if !self.st().breaker.allows_calls() {
            return Ok(LockResult::Granted {
                store: Mode::Postgres,
            });
        }
        match self
            .redis
            .acquire_lock(topic, partition, owner, lease)
            .await
        {
            Ok(RawLock::Granted) => {
                self.redis_ok();
                Ok(LockResult::Granted { store: Mode::Redis })
            }
            Ok(RawLock::Held { owner, ttl }) => {
                self.redis_ok();
                Ok(LockResult::Held { owner, ttl })
            }
            Err(e) => {
                self.redis_failed("taking a partition lock", &e, false);
                self.register_quietly().await;
                Ok(LockResult::Granted {
                    store: Mode::Postgres,
                })
            }
        }
    }

    /// Releases the Redis lock if `owner` holds it (true when it did). Best effort: false in
    /// PostgreSQL mode or when Redis fails (the lease then simply expires).
    pub async fn release_lock(&self, topic: &str, partition: i32, owner: &str) -> Result<bool> {
        if !self.st().breaker.allows_calls() {
            return Ok(false);
        }
        match self.redis.release_lock(topic, partition, owner).await {
            Ok(released) => {
                self.redis_ok();
                Ok(released)
            }
            Err(e) => {
                self.redis_failed("releasing a partition lock", &e, false);
                self.register_quietly().await;
                Ok(false)
            }
        }
    }

    /// The terminal outcomes known for `intent_ids` (same answer as
    /// `postgres::lookup_outcomes`). One Redis round trip while Redis is healthy and in sync;
    /// otherwise PostgreSQL answers within the call (a Redis failure is counted by the breaker,
    /// never returned). Fails only when PostgreSQL is needed and fails.
    pub async fn lookup(&self, intent_ids: &[String]) -> Result<Vec<StoredOutcome>> {
        if let Some(found) = self.lookup_in_redis(intent_ids).await {
            return Ok(found);
        }
        // Decisions are written after this lookup: the fallback must be registered first.
        self.ensure_registered().await?;
        if intent_ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = pg::lookup_outcomes(&self.pool, intent_ids).await?;
        self.lookups_postgres.fetch_add(1, Ordering::Relaxed);
        Ok(rows)
    }

    /// Writes a committed batch's outcomes through to Redis (one round trip), after the Kafka
    /// commit. Only terminal outcomes are kept (as in `lookup_outcomes`). In PostgreSQL mode it
    /// writes nothing. A Redis failure opens the breaker at once (Redis is now behind) and
    /// registers the fallback; `Err` only when that registration could not reach PostgreSQL (it
    /// is retried before the next lookup) — the batch itself is committed either way.
    pub async fn record(&self, outcomes: &[StoredOutcome]) -> Result<()> {
        let write = {
            let st = self.st();
            st.breaker.allows_calls() || st.resync.is_some()
        };
        if !write {
            self.ensure_registered().await?;
            return Ok(());
        }
        let ttl = self.ttl.as_secs().max(1);
        let entries: Vec<r::Entry> = outcomes
            .iter()
            .filter(|o| r::is_idempotency_outcome(o))
            .filter_map(|o| r::encode_outcome(o).map(|v| (o.intent_id.clone(), v, ttl)))
            .collect();
        if entries.is_empty() {
            return Ok(());
        }
        self.write_live(&entries, "recording outcomes").await
    }

    /// Call after every restore of a partition (assignment or recovery), once its rows are back
    /// at `committed_batch`: refreshes the cached PostgreSQL epoch (a partition taken over from
    /// an instance in fallback must not be served from a Redis that lacks that instance's
    /// decisions) and writes that batch's outcomes to Redis again (its Kafka commit may have
    /// happened without the write-through: a crash in between).
    pub async fn partition_restored(
        &self,
        topic: &str,
        partition: i32,
        committed_batch: u64,
    ) -> Result<()> {
        let epoch = load_epoch(&self.pool).await?;
        let write = {
            let mut st = self.st();
            st.pg_epoch = Some(st.pg_epoch.map_or(epoch, |e| e.max(epoch)));
            st.breaker.allows_calls() || st.resync.is_some()
        };
        if !write {
            self.ensure_registered().await?;
            return Ok(());
        }
        if committed_batch == 0 {
            return Ok(());
        }
        let rows: Vec<(String, i64, String, String, i64, i64, i64)> = sqlx::query_as(&format!(
            "SELECT intent_id, fingerprint, to_state, reason, commit_sequence, contact_version,
                    greatest(1, ceil($4 - extract(epoch FROM now() - at)))::bigint
               FROM cc_transition
              WHERE topic = $1 AND partition = $2 AND batch_no = $3 AND {TERMINAL_FILTER}
                AND at > now() - make_interval(secs => $4)
              ORDER BY id"
        ))
        .bind(topic)
        .bind(partition)
        .bind(committed_batch as i64)
        .bind(self.ttl.as_secs_f64())
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading a restored batch's outcomes"))?;
        let entries: Vec<r::Entry> = rows.into_iter().filter_map(row_entry).collect();
        if entries.is_empty() {
            return Ok(());
        }
        self.write_live(&entries, "re-recording a restored batch")
            .await
    }

    /// Runs about once a second, batches or not. In PostgreSQL mode: keeps the fallback
    /// registered, and once the breaker's open period is over probes Redis (fresh connection,
    /// PING) and fails back after a resynchronisation. In Redis mode: checks that Redis is
    /// reachable and in sync with PostgreSQL, and resynchronises it when it is not (FLUSHALL,
    /// restart, another instance's fallback). Returns the mode afterwards; problems are logged
    /// (and counted by the breaker), never returned.
    pub async fn health_check(&self) -> Mode {
        let Ok(_serial) = self.health.try_lock() else {
            return self.mode();
        };
        self.flush_audits().await;
        let mode = self.mode();
        match mode {
            Mode::Postgres => {
                if let Err(e) = self.ensure_registered().await {
                    tracing::warn!(error = %e, "lock store: cannot register the fallback in PostgreSQL; Redis is not probed until it is");
                    return self.mode();
                }
                let probe = self.st().breaker.try_probe(Instant::now());
                if probe {
                    let mut guard = ProbeGuard {
                        store: self,
                        done: false,
                    };
                    self.probe_and_fail_back().await;
                    guard.done = true;
                }
            }
            Mode::Redis => {
                if self.st().breaker.allows_calls() {
                    self.check_sync().await;
                }
            }
        }
        self.flush_audits().await;
        self.mode()
    }

    // ---------------------------------------------------------------------------------------
    // Redis paths

    async fn lookup_in_redis(&self, intent_ids: &[String]) -> Option<Vec<StoredOutcome>> {
        let trips = {
            let st = self.st();
            if !st.breaker.allows_calls() || st.in_sync == Some(false) {
                return None;
            }
            st.breaker.trips()
        };
        if intent_ids.is_empty() {
            return Some(Vec::new());
        }
        let epoch = self.pg_epoch().await.ok()?;
        let fetched = match self.redis.fetch(intent_ids).await {
            Ok(f) => f,
            Err(e) => {
                self.redis_failed("looking up intents", &e, false);
                return None;
            }
        };
        self.redis_ok();
        let expected = r::epoch_token(epoch, &fetched.run_id);
        if fetched.epoch_token.as_deref() != Some(expected.as_str()) {
            let why = match &fetched.epoch_token {
                None => "epoch key missing (flushed or restarted Redis)".to_string(),
                Some(t) => format!("epoch key is {t:?}, expected {expected:?}"),
            };
            self.observe_sync(false, &why);
            return None;
        }
        let mut seen = HashSet::with_capacity(intent_ids.len());
        let mut found = Vec::new();
        for (id, value) in intent_ids.iter().zip(&fetched.values) {
            let Some(value) = value else { continue };
            if !seen.insert(id.as_str()) {
                continue;
            }
            match r::decode_outcome(id, value) {
                Some((outcome, _stamp)) => found.push(outcome),
                None => {
                    tracing::warn!(intent_id = %id, "lock store: undecodable idempotency entry in Redis; PostgreSQL answers this lookup");
                    return None;
                }
            }
        }
        {
            let st = self.st();
            // A trip since the call started: Redis may be behind; let PostgreSQL answer.
            if st.breaker.trips() != trips || !st.breaker.allows_calls() {
                return None;
            }
        }
        self.observe_sync(true, "epoch key matches");
        self.lookups_redis.fetch_add(1, Ordering::Relaxed);
        Some(found)
    }

    async fn write_live(&self, entries: &[r::Entry], what: &'static str) -> Result<()> {
        let written = async {
            let conn = self.redis.connection().await?;
            self.redis.put(&conn, entries, PutMode::Live).await
        }
        .await;
        match written {
            Ok(_) => {
                self.redis_ok();
                Ok(())
            }
            Err(e) => {
                // Redis is now behind PostgreSQL: stop trusting it at once.
                self.redis_failed(what, &e, true);
                self.ensure_registered().await?;
                Ok(())
            }
        }
    }

    fn redis_ok(&self) {
        let mut st = self.st();
        if st.breaker.allows_calls() {
            st.breaker.on_success();
        }
    }

    /// Counts a failed Redis call. `write`: an outcome did not reach Redis, so the breaker
    /// opens at once and the fallback is (re-)registered even if already in PostgreSQL mode.
    fn redis_failed(&self, what: &str, e: &r::Error, write: bool) {
        self.redis_failures.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::STORE_ERRORS, "store" => "redis").increment(1);
        let now = Instant::now();
        let mut st = self.st();
        if write && st.resync.is_some() {
            st.spoiled = true;
        }
        let transition = if write {
            st.breaker.trip(now)
        } else {
            st.breaker.on_failure(now)
        };
        let cause = format!("{what}: {e}");
        match transition {
            Some(Transition::Opened) => {
                let from = st.mode;
                st.mode = Mode::Postgres;
                st.in_sync = Some(false);
                if st.resync.is_some() {
                    st.spoiled = true;
                }
                st.fallback = Fallback::Pending {
                    since: now,
                    audit: Some((from, cause.clone())),
                };
                drop(st);
                set_mode_gauge(Mode::Postgres);
                tracing::warn!(
                    from = from.as_str(),
                    to = "postgres",
                    cause = %cause,
                    "lock store mode changed: Redis failed, PostgreSQL serves locks and idempotency"
                );
            }
            _ if write => {
                // Already in PostgreSQL mode (a write-through during a resynchronisation): the
                // epoch must move again, or the copy could be marked in sync without it.
                if !matches!(st.fallback, Fallback::Pending { .. }) {
                    st.fallback = Fallback::Pending {
                        since: now,
                        audit: None,
                    };
                }
                drop(st);
                tracing::warn!(cause = %cause, "lock store: a write-through to Redis failed during failback; Redis stays out of sync");
            }
            Some(Transition::Reopened) => {
                drop(st);
                tracing::info!(cause = %cause, "lock store: Redis probe failed; staying on PostgreSQL");
            }
            _ => {
                let failures = st.breaker.consecutive_failures();
                drop(st);
                tracing::debug!(cause = %cause, failures, "lock store: Redis call failed");
            }
        }
    }

    fn observe_sync(&self, in_sync: bool, why: &str) {
        let mut st = self.st();
        if st.in_sync == Some(in_sync) {
            return;
        }
        let before = st.in_sync;
        st.in_sync = Some(in_sync);
        drop(st);
        if in_sync {
            tracing::info!(
                why,
                "lock store: Redis is in sync with PostgreSQL; lookups use Redis"
            );
        } else if before.is_some() || why.contains("missing") {
            tracing::warn!(why, "lock store: Redis is out of sync with PostgreSQL; lookups use PostgreSQL until it is resynchronised");
        } else {
            tracing::info!(why, "lock store: Redis not in sync yet; lookups use PostgreSQL until it is resynchronised");
        }
    }

    /// The PostgreSQL epoch, read once and then refreshed by health checks and restores.
    async fn pg_epoch(&self) -> Result<i64, pg::Error> {
        if let Some(e) = self.st().pg_epoch {
            return Ok(e);
        }
        let e = load_epoch(&self.pool).await?;
        let mut st = self.st();
        let e = st.pg_epoch.map_or(e, |c| c.max(e));
        st.pg_epoch = Some(e);
        Ok(e)
    }

    // ---------------------------------------------------------------------------------------
    // Fallback registration

    async fn register_quietly(&self) {
        if let Err(e) = self.ensure_registered().await {
            tracing::warn!(error = %e, "lock store: cannot register the fallback in PostgreSQL yet; retried before the next lookup");
        }
    }

    /// Registers a pending fallback (epoch bump + watermark row + audit row) or renews this
    /// instance's fallback row; a no-op otherwise.
    async fn ensure_registered(&self) -> Result<(), pg::Error> {
        if !self.registration_due() {
            return Ok(());
        }
        let _serial = self.registration.lock().await;
        let todo = {
            let st = self.st();
            st.fallback.clone()
        };
        match todo {
            Fallback::Clear => Ok(()),
            Fallback::Pending { since, audit } => {
                let back = since.elapsed() + self.fallback_margin;
                let epoch = register_fallback(
                    &self.pool,
                    &self.instance,
                    back,
                    self.alive_for,
                    audit.as_ref().map(|(from, cause)| (*from, cause.as_str())),
                )
                .await?;
                let mut st = self.st();
                st.pg_epoch = Some(st.pg_epoch.map_or(epoch, |e| e.max(epoch)));
                // A newer trip may have happened meanwhile: only clear what was registered.
                if matches!(&st.fallback, Fallback::Pending { since: s, .. } if *s == since) {
                    st.fallback = Fallback::Registered {
                        renewed: Instant::now(),
                    };
                }
                drop(st);
                tracing::info!(epoch, "lock store: fallback registered in PostgreSQL; every Redis is out of sync until resynchronised");
                Ok(())
            }
            Fallback::Registered { renewed } => {
                if self.st().mode != Mode::Postgres || renewed.elapsed() < self.alive_for / 4 {
                    return Ok(());
                }
                let at = Instant::now();
                let kept = renew_fallback(&self.pool, &self.instance, self.alive_for).await?;
                if kept {
                    let mut st = self.st();
                    if matches!(st.fallback, Fallback::Registered { .. }) {
                        st.fallback = Fallback::Registered { renewed: at };
                    }
                    return Ok(());
                }
                // The row was taken for dead (not renewed in time) and removed: outcomes since
                // the last renewal may be missing from Redis. Register again from there.
                let back = renewed.elapsed() + self.fallback_margin;
                let epoch =
                    register_fallback(&self.pool, &self.instance, back, self.alive_for, None)
                        .await?;
                let mut st = self.st();
                st.pg_epoch = Some(st.pg_epoch.map_or(epoch, |e| e.max(epoch)));
                st.fallback = Fallback::Registered { renewed: at };
                drop(st);
                tracing::warn!(
                    epoch,
                    "lock store: this instance's fallback row had expired; registered again"
                );
                Ok(())
            }
        }
    }

    fn registration_due(&self) -> bool {
        let st = self.st();
        match st.fallback {
            Fallback::Clear => false,
            Fallback::Pending { .. } => true,
            Fallback::Registered { renewed } => {
                st.mode == Mode::Postgres && renewed.elapsed() >= self.alive_for / 4
            }
        }
    }

    async fn flush_audits(&self) {
        let pending = std::mem::take(&mut self.st().pending_audit);
        for (i, detail) in pending.iter().enumerate() {
            if let Err(e) =
                pg::audit_admin(&self.pool, "system", "lock_store_mode", "", detail.clone()).await
            {
                tracing::warn!(error = %e, "lock store: cannot write the mode change's audit row yet");
                let mut st = self.st();
                let rest = pending[i..].iter().cloned();
                let newer = std::mem::take(&mut st.pending_audit);
                st.pending_audit = rest.chain(newer).collect();
                return;
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // Failback and resynchronisation

    async fn probe_and_fail_back(&self) {
        let probe = async {
            let conn = self.redis.reconnect().await?;
            self.redis.ping(&conn).await?;
            Ok::<_, r::Error>(conn)
        }
        .await;
        let conn = match probe {
            Ok(conn) => conn,
            Err(e) => {
                self.redis_failed("probing Redis", &e, false);
                return;
            }
        };
        tracing::info!(run_id = %conn.run_id, "lock store: Redis probe succeeded; resynchronising before failback");
        match self.resync(&conn, "failback").await {
            Ok(Resynced::InSync { copied }) => self.fail_back(true, copied, None),
            Ok(Resynced::Blocked { by }) => self.fail_back(false, 0, Some(by)),
            Err(ResyncError::Redis(e)) => self.redis_failed("resynchronising Redis", &e, false),
            Err(e) => {
                // PostgreSQL trouble or a concurrent trip: try again after another open period.
                let now = Instant::now();
                self.st().breaker.on_failure(now);
                tracing::info!(error = %e, "lock store: failback postponed");
            }
        }
    }

    fn fail_back(&self, in_sync: bool, copied: u64, blocked_by: Option<Vec<String>>) {
        let mut st = self.st();
        if st.breaker.on_success() != Some(Transition::Closed) {
            // A write-through failed meanwhile and reopened the breaker.
            return;
        }
        let from = st.mode;
        st.mode = Mode::Redis;
        st.in_sync = Some(in_sync);
        if in_sync {
            st.fallback = Fallback::Clear;
        }
        let cause = match &blocked_by {
            None => format!("Redis healthy again; resynchronised ({copied} outcomes copied)"),
            Some(by) => format!(
                "Redis healthy again; lookups use PostgreSQL until instances {by:?} leave their fallback"
            ),
        };
        let epoch = st.pg_epoch;
        st.pending_audit.push(json!({
            "from": from.as_str(),
            "to": "redis",
            "cause": cause,
            "instance": self.instance,
            "epoch": epoch,
        }));
        drop(st);
        set_mode_gauge(Mode::Redis);
        tracing::info!(
            from = from.as_str(),
            to = "redis",
            cause = %cause,
            "lock store mode changed: failback to Redis"
        );
    }

    /// Redis mode: is Redis still in sync? Resynchronises when it is not.
    async fn check_sync(&self) {
        let epoch = match load_epoch(&self.pool).await {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(error = %e, "lock store: cannot read the epoch");
                return;
            }
        };
        let epoch = {
            let mut st = self.st();
            let e = st.pg_epoch.map_or(epoch, |c| c.max(epoch));
            st.pg_epoch = Some(e);
            e
        };
        let checked = async {
            let conn = self.redis.connection().await?;
            let token = self.redis.epoch_token(&conn).await?;
            Ok::<_, r::Error>((conn, token))
        }
        .await;
        let (conn, token) = match checked {
            Ok(v) => v,
            Err(e) => {
                self.redis_failed("checking the epoch", &e, false);
                return;
            }
        };
        self.redis_ok();
        if token.as_deref() == Some(r::epoch_token(epoch, &conn.run_id).as_str()) {
            self.observe_sync(true, "epoch key matches");
            return;
        }
        let why = match &token {
            None => "epoch key missing (flushed or restarted Redis)".to_string(),
            Some(t) => format!("epoch key is {t:?}, PostgreSQL epoch is {epoch}"),
        };
        self.observe_sync(false, &why);
        match self.resync(&conn, "out of sync").await {
            Ok(Resynced::InSync { .. }) => self.observe_sync(true, "resynchronised"),
            Ok(Resynced::Blocked { by }) => {
                tracing::debug!(
                    ?by,
                    "lock store: resynchronisation waits for other instances' fallback"
                )
            }
            Err(ResyncError::Redis(e)) => self.redis_failed("resynchronising Redis", &e, false),
            Err(e) => tracing::info!(error = %e, "lock store: resynchronisation postponed"),
        }
    }

    /// Copies what Redis may lack and marks it in sync (see the module documentation).
    async fn resync(&self, conn: &Arc<Conn>, cause: &str) -> Result<Resynced, ResyncError> {
        let (id, trips) = {
            let mut st = self.st();
            st.resync_seq += 1;
            st.resync = Some(st.resync_seq);
            st.spoiled = false;
            (st.resync_seq, st.breaker.trips())
        };
        let _flag = ResyncFlag { store: self, id };
        let started = Instant::now();
        // From here on outcomes are written through; T0 orders them against the copy.
        let t0 = self.redis.server_time_ms(conn).await?;
        let token = self.redis.epoch_token(conn).await?;
        let view = read_sync_view(&self.pool).await?;
        let blockers: Vec<String> = view
            .rows
            .iter()
            .filter(|row| row.alive && row.instance != self.instance)
            .map(|row| row.instance.clone())
            .collect();
        if !blockers.is_empty() {
            return Ok(Resynced::Blocked { by: blockers });
        }
        let parsed = token.as_deref().and_then(r::parse_epoch_token);
        let (start, window) = match parsed {
            Some((n, run)) if run == conn.run_id && n == view.epoch => {
                (view.max_id + 1, "none (already synchronised)")
            }
            Some((n, run)) if run == conn.run_id && n < view.epoch && !view.rows.is_empty() => {
                let since = view.rows.iter().map(|r| r.since_id).min().unwrap_or(0);
                (since + 1, "outcomes since the fallback began")
            }
            _ => {
                let start: i64 = sqlx::query_scalar(
                    "SELECT cc_transition_id_at(now() - make_interval(secs => $1))",
                )
                .bind(self.ttl.as_secs_f64() + 60.0)
                .fetch_one(&self.pool)
                .await
                .map_err(db("finding the oldest outcome to resynchronise"))?;
                (start, "every outcome younger than the TTL")
            }
        };
        tracing::info!(
            cause,
            window,
            from_id = start,
            to_id = view.max_id,
            epoch = view.epoch,
            "lock store: resynchronising Redis from PostgreSQL"
        );
        let copied = self
            .copy_outcomes(conn, start, view.max_id, t0, trips)
            .await?;
        self.check_not_spoiled(trips)?;

        // Mark: under the state row's lock, so no fallback registers between the check and
        // the epoch write (a registration waits, then bumps the epoch past the mark).
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db("starting the resynchronisation mark"))?;
        let now_epoch: Option<i64> =
            sqlx::query_scalar("SELECT epoch FROM cc_store_state WHERE id = 1 FOR UPDATE")
                .fetch_optional(&mut *tx)
                .await
                .map_err(db("locking the lock-store state"))?;
        if now_epoch != Some(view.epoch) {
            return Err(ResyncError::Interrupted(
                "another instance fell back meanwhile",
            ));
        }
        let blockers: Vec<String> = sqlx::query_scalar(
            "SELECT instance FROM cc_store_fallback WHERE instance <> $1 AND alive_until > now()",
        )
        .bind(&self.instance)
        .fetch_all(&mut *tx)
        .await
        .map_err(db("reading fallback rows"))?;
        if !blockers.is_empty() {
            return Ok(Resynced::Blocked { by: blockers });
        }
        self.check_not_spoiled(trips)?;
        self.redis.set_epoch(conn, view.epoch).await?;
        sqlx::query("DELETE FROM cc_store_fallback WHERE instance = $1 OR alive_until <= now()")
            .bind(&self.instance)
            .execute(&mut *tx)
            .await
            .map_err(db("clearing fallback rows"))?;
        sqlx::query(
            "UPDATE cc_store_state SET mode = 'redis', changed_by = $1, updated_at = now() WHERE id = 1",
        )
        .bind(&self.instance)
        .execute(&mut *tx)
        .await
        .map_err(db("recording the synchronisation"))?;
        tx.commit()
            .await
            .map_err(db("committing the resynchronisation mark"))?;
        {
            let mut st = self.st();
            st.pg_epoch = Some(st.pg_epoch.map_or(view.epoch, |e| e.max(view.epoch)));
        }
        self.resyncs.fetch_add(1, Ordering::Relaxed);
        self.resynced_outcomes.fetch_add(copied, Ordering::Relaxed);
        tracing::info!(
            copied,
            epoch = view.epoch,
            took_ms = started.elapsed().as_millis() as u64,
            "lock store: Redis resynchronised"
        );
        Ok(Resynced::InSync { copied })
    }

    fn check_not_spoiled(&self, trips: u64) -> Result<(), ResyncError> {
        let st = self.st();
        if st.spoiled || st.breaker.trips() != trips {
            return Err(ResyncError::Interrupted(
                "a write-through failed during the resynchronisation",
            ));
        }
        Ok(())
    }

    /// Copies the terminal outcomes with ids in `[start, end]` (younger than the TTL), in id
    /// order, in chunks; returns how many keys were written.
    async fn copy_outcomes(
        &self,
        conn: &Arc<Conn>,
        start: i64,
        end: i64,
        t0: u64,
        trips: u64,
    ) -> Result<u64, ResyncError> {
        let mut copied = 0;
        let mut lo = start.max(1);
        let query = format!(
            "SELECT intent_id, fingerprint, to_state, reason, commit_sequence, contact_version,
                    greatest(1, ceil($3 - extract(epoch FROM now() - at)))::bigint
               FROM cc_transition
              WHERE id >= $1 AND id < $2 AND {TERMINAL_FILTER}
                AND at > now() - make_interval(secs => $3)
              ORDER BY id"
        );
        while lo <= end {
            let hi = lo.saturating_add(ID_CHUNK).min(end + 1);
            let rows: Vec<(String, i64, String, String, i64, i64, i64)> = sqlx::query_as(&query)
                .bind(lo)
                .bind(hi)
                .bind(self.ttl.as_secs_f64())
                .fetch_all(&self.pool)
                .await
                .map_err(db("reading outcomes to resynchronise"))?;
            let entries: Vec<r::Entry> = rows.into_iter().filter_map(row_entry).collect();
            for chunk in entries.chunks(KEYS_PER_WRITE) {
                copied += self.redis.put(conn, chunk, PutMode::Resync { t0 }).await?;
            }
            self.check_not_spoiled(trips)?;
            lo = hi;
        }
        Ok(copied)
    }
}

/// Clears the resynchronisation flag when the resynchronisation ends, however it ends.
struct ResyncFlag<'a> {
    store: &'a LockStore,
    id: u64,
}

impl Drop for ResyncFlag<'_> {
    fn drop(&mut self) {
        let mut st = self.store.st();
        if st.resync == Some(self.id) {
            st.resync = None;
            st.spoiled = false;
        }
    }
}

/// A probe abandoned half-way (the health check's future dropped) counts as failed, so the
/// breaker never stays half-open forever.
struct ProbeGuard<'a> {
    store: &'a LockStore,
    done: bool,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut st = self.store.st();
            if st.breaker.state() == crate::store::breaker::State::HalfOpen {
                st.breaker.on_failure(Instant::now());
            }
        }
    }
}

fn row_entry(row: (String, i64, String, String, i64, i64, i64)) -> Option<r::Entry> {
    let (intent_id, fp, state, reason, seq, version, ttl) = row;
    let outcome = match StoredOutcome::try_from((intent_id, fp, state, reason, seq, version)) {
        Ok(o) => o,
        Err(e) => {
            // Never expected (the CHECK constraints hold the vocabulary); PostgreSQL still
            // answers lookups of this id when Redis misses it.
            tracing::warn!(error = %e, "lock store: an audit row is not an outcome; not copied");
            return None;
        }
    };
    let value = r::encode_outcome(&outcome)?;
    Some((outcome.intent_id, value, ttl.max(1) as u64))
}

// -------------------------------------------------------------------------------------------
// PostgreSQL bookkeeping (tables of migrations/0002_lock_store.sql)

async fn load_epoch(pool: &PgPool) -> Result<i64, pg::Error> {
    let e: Option<i64> = sqlx::query_scalar("SELECT epoch FROM cc_store_state WHERE id = 1")
        .fetch_optional(pool)
        .await
        .map_err(db("reading the lock-store epoch"))?;
    // A missing row (never expected: the migration inserts it) matches no Redis epoch.
    Ok(e.unwrap_or(0))
}

/// Bumps the epoch, records (or lowers) this instance's watermark and writes the audit row of
/// the mode change, in one transaction. Returns the new epoch.
async fn register_fallback(
    pool: &PgPool,
    instance: &str,
    back: Duration,
    alive_for: Duration,
    audit: Option<(Mode, &str)>,
) -> Result<i64, pg::Error> {
    let mut tx = pool
        .begin()
        .await
        .map_err(db("starting the fallback registration"))?;
    let epoch: i64 = sqlx::query_scalar(
        "INSERT INTO cc_store_state (id, epoch, mode, changed_by) VALUES (1, 2, 'postgres', $1)
         ON CONFLICT (id) DO UPDATE
            SET epoch = cc_store_state.epoch + 1, mode = 'postgres',
                changed_by = EXCLUDED.changed_by, updated_at = now()
         RETURNING epoch",
    )
    .bind(instance)
    .fetch_one(&mut *tx)
    .await
    .map_err(db("bumping the lock-store epoch"))?;
    sqlx::query(
        "INSERT INTO cc_store_fallback (instance, since_id, since, alive_until)
         SELECT $1, cc_transition_id_at(now() - make_interval(secs => $2)) - 1,
                now() - make_interval(secs => $2), now() + make_interval(secs => $3)
         ON CONFLICT (instance) DO UPDATE
            SET since_id = least(cc_store_fallback.since_id, EXCLUDED.since_id),
                since = least(cc_store_fallback.since, EXCLUDED.since),
                alive_until = EXCLUDED.alive_until",
    )
    .bind(instance)
    .bind(back.as_secs_f64())
    .bind(alive_for.as_secs_f64())
    .execute(&mut *tx)
    .await
    .map_err(db("recording the fallback watermark"))?;
    if let Some((from, cause)) = audit {
        pg::audit_admin(
            &mut *tx,
            "system",
            "lock_store_mode",
            "",
            json!({
                "from": from.as_str(),
                "to": "postgres",
                "cause": cause,
                "instance": instance,
                "epoch": epoch,
            }),
        )
        .await?;
    }
    tx.commit()
        .await
        .map_err(db("committing the fallback registration"))?;
    Ok(epoch)
}

/// Keeps this instance's fallback row alive; false when it is gone.
async fn renew_fallback(
    pool: &PgPool,
    instance: &str,
    alive_for: Duration,
) -> Result<bool, pg::Error> {
    let n = sqlx::query(
        "UPDATE cc_store_fallback SET alive_until = now() + make_interval(secs => $2)
          WHERE instance = $1",
    )
    .bind(instance)
    .bind(alive_for.as_secs_f64())
    .execute(pool)
    .await
    .map_err(db("renewing the fallback row"))?
    .rows_affected();
    Ok(n > 0)
}

struct FallbackRow {
    instance: String,
    since_id: i64,
    alive: bool,
}

struct SyncView {
    epoch: i64,
    rows: Vec<FallbackRow>,
    max_id: i64,
}

async fn read_sync_view(pool: &PgPool) -> Result<SyncView, pg::Error> {
    let mut tx = pool.begin().await.map_err(db("starting a state read"))?;
    let epoch: Option<i64> = sqlx::query_scalar("SELECT epoch FROM cc_store_state WHERE id = 1")
        .fetch_optional(&mut *tx)
        .await
        .map_err(db("reading the lock-store epoch"))?;
    let rows: Vec<(String, i64, bool)> = sqlx::query_as(
        "SELECT instance, since_id, alive_until > now() FROM cc_store_fallback ORDER BY instance",
    )
    .fetch_all(&mut *tx)
    .await
    .map_err(db("reading fallback rows"))?;
    let max_id: i64 = sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM cc_transition")
        .fetch_one(&mut *tx)
        .await
        .map_err(db("reading the newest transition"))?;
    tx.commit().await.map_err(db("ending a state read"))?;
    Ok(SyncView {
        epoch: epoch.unwrap_or(0),
        rows: rows
            .into_iter()
            .map(|(instance, since_id, alive)| FallbackRow {
                instance,
                since_id,
                alive,
            })
            .collect(),
        max_id,
    })
}
