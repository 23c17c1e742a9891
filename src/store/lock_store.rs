//! The lock / idempotency store: Redis as the fast path, PostgreSQL as the fallback and the
//! authority. One facade, [`LockStore`], for the engine. The decisions (mode, trust, fallback
//! bookkeeping, what a resynchronisation copies) are the pure machine of `lock_mode.rs`; the SQL
//! is `postgres::lock_store`; the Redis calls are `redis.rs`. This file performs the I/O in the
//! right order. Operators' view: docs/redis-fallback.md.
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
//!   script call ([`LockStore::record`]). `IDEMPOTENCY_CONFLICT` rows are never the record
//!   (`postgres::outcomes::is_idempotency_record`): never written, copied or returned.
//!
//! # Redis holds only outcomes of committed batches
//!
//! Written through after the Kafka commit ([`LockStore::record`]), re-written for the batch a
//! restore found committed ([`LockStore::partition_restored`]), copied by a resynchronisation
//! only from batches PostgreSQL knows committed (`batch_no <= cc_partition.committed_batch`).
//! A batch past that mark when a resynchronisation starts (at most one per partition) is waited
//! for: copied once known committed, skipped once rolled back; Redis is not marked in sync while
//! one is undecided, since its outcomes may be committed and missing (a miss means "never
//! seen"). Every rollback notes its intent ids in PostgreSQL (migration 0004's trigger, in the
//! restore's transaction) and bumps a counter; [`LockStore::outcomes_rolled_back`] makes Redis
//! agree with PostgreSQL for them, and a resynchronisation applies every pending note and
//! refuses to mark Redis if the counter moved after it read them.
//!
//! # When is a Redis miss "never seen"?
//!
//! Only while Redis is **in sync**: its epoch key (`{prefix}:epoch` =
//! `<epoch>:<run_id>:<evicted_keys>`) names the PostgreSQL epoch (`cc_store_state.epoch`) *and*
//! the server incarnation this process is talking to, with no key evicted since it was marked.
//! Otherwise PostgreSQL answers the whole lookup — Redis hits are not used either, because an
//! outcome can change while Redis is behind (a manual-review item re-submitted and committed
//! during a fallback). `{prefix}` is `{redis.key_prefix}:{store_id}`, the store id drawn per
//! PostgreSQL schema (`cc_store_state.store_id`) hashed with the schema's place (cluster,
//! database, schema: `postgres::lock_store::store_id`): every store starts at epoch 1, and a
//! copy of a schema made with its rows carries the original's id and epoch, so two deployments
//! sharing one Redis and one key prefix would otherwise each be "in sync" with the other's
//! outcomes.
//!
//! - Every switch to PostgreSQL **registers the fallback** in PostgreSQL before any decision of the
//!   fallback period is written: the epoch is bumped (so every Redis is out of sync) and a row in
//!   `cc_store_fallback` records from which `cc_transition.id` outcomes may be missing from Redis.
//! - **Resynchronisation** before Redis is trusted: outcomes since the lowest fallback watermark
//!   (or, when the epoch key is missing or names another server incarnation, every outcome
//!   younger than the TTL) are copied in id order; pending rollback notes are applied; batches
//!   undecided at the start are waited for; then, under a row lock on `cc_store_state` (epoch
//!   and rollback counter unchanged, no other instance still in fallback), the epoch key is set
//!   — only if the resynchronisation's marker key is still in Redis (no flush or restart since
//!   it began) — and the covered rows are deleted.
//! - While a resynchronisation runs, outcomes are written through live (stamped with the server
//!   time); a copy never overwrites a key written live after it started, and a write that timed
//!   out on the client never lands later (a deadline checked by the write script).
//!
//! # Health
//!
//! Every Redis call has a timeout (`redis.command_timeout`). The breaker opens after
//! `redis.breaker_failures` consecutive failures (anything PostgreSQL holds that fails to reach
//! Redis opens it at once, since Redis is then behind), stays open `redis.breaker_open_for`,
//! then [`LockStore::health_check`] probes (fresh connection, PING) and resynchronises. Each mode
//! change is one log line, the gauge `causal_commit_lock_store_mode{mode}` and one
//! `cc_admin_audit` row (`lock_store_mode`).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::PgPool;

use crate::config::Config;
use crate::store::breaker::Breaker;
use crate::store::lock_mode::{
    self as lm, BatchFate, Correction, Failure, FailureEffect, Machine, ModeChange, Registration,
    ResyncTicket, SyncChange, Window,
};
use crate::store::postgres::lock_store::{self as sql, OpenBatch, TimedRow};
use crate::store::postgres::outcomes::BadOutcome;
use crate::store::postgres::{self as pg, StoredOutcome};
use crate::store::redis::{self as r, Conn, PutMode, RawLock, RedisStore};
use crate::telemetry::metrics as m;

pub use crate::store::lock_mode::Mode;

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
    /// Redis entries of rolled-back intents made to agree with PostgreSQL.
    pub corrected_outcomes: u64,
}

/// Ids of `cc_transition` read per query when copying outcomes to Redis.
const ID_CHUNK: i64 = 5_000;
/// How long a resynchronisation waits for the batches not known committed at its start to be
/// decided (committed and marked, or rolled back) before it gives up until the next health
/// check. A healthy batch is decided within its Kafka transaction.
const UNDECIDED_WAIT: Duration = Duration::from_secs(3);
const UNDECIDED_POLL: Duration = Duration::from_millis(50);

/// The lock / idempotency store facade (see the module documentation). Share it behind an
/// `Arc`; every method takes `&self`. Use it from one multi-threaded tokio runtime (its Redis
/// connection's driver task lives there).
pub struct LockStore {
    redis: RedisStore,
    pool: PgPool,
    instance: String,
    ttl: Duration,
    /// How long a fallback row stays alive without renewal.
    alive_for: Duration,
    machine: Mutex<Machine>,
    /// Serialises health checks (probe, resynchronisation).
    health: tokio::sync::Mutex<()>,
    /// Serialises fallback registrations.
    registration: tokio::sync::Mutex<()>,
    lookups_redis: AtomicU64,
    lookups_postgres: AtomicU64,
    redis_failures: AtomicU64,
    resyncs: AtomicU64,
    resynced_outcomes: AtomicU64,
    corrected_outcomes: AtomicU64,
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

/// Why a resynchronisation (or a correction) did not complete.
enum SyncError {
    Redis(r::Error),
    Postgres(pg::Error),
    /// PostgreSQL holds a row that is not an outcome: Redis cannot be made to agree with it.
    Unreadable(BadOutcome),
    /// Nothing failed, but Redis cannot be marked now; the next health check tries again.
    Interrupted(String),
}

impl Display for SyncError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SyncError::Redis(e) => write!(f, "{e}"),
            SyncError::Postgres(e) => write!(f, "{e}"),
            SyncError::Unreadable(e) => write!(f, "an audit row is not an outcome: {e}"),
            SyncError::Interrupted(why) => write!(f, "interrupted: {why}"),
        }
    }
}

impl From<pg::Error> for SyncError {
    fn from(e: pg::Error) -> Self {
        SyncError::Postgres(e)
    }
}

impl From<r::Error> for SyncError {
    fn from(e: r::Error) -> Self {
        SyncError::Redis(e)
    }
}

impl From<BadOutcome> for SyncError {
    fn from(e: BadOutcome) -> Self {
        SyncError::Unreadable(e)
    }
}

fn set_mode_gauge(mode: Mode) {
    for m_ in [Mode::Redis, Mode::Postgres] {
        let v = if m_ == mode { 1.0 } else { 0.0 };
        metrics::gauge!(m::LOCK_STORE_MODE, "mode" => m_.as_str()).set(v);
    }
}

fn audit_detail(change: &ModeChange, instance: &str, epoch: Option<i64>) -> serde_json::Value {
    json!({
        "from": change.from.as_str(),
        "to": change.to.as_str(),
        "cause": change.cause,
        "instance": instance,
        "epoch": epoch,
    })
}

/// Why Redis is not in sync with PostgreSQL's `epoch`, given its epoch key (`token`) and the
/// epoch it marks a whole copy of on the server that answered (`marked`).
fn out_of_sync(token: Option<&str>, marked: Option<i64>, epoch: i64) -> String {
    match (token, marked) {
        (None, _) => "epoch key missing (flushed or restarted Redis)".to_string(),
        (Some(t), None) => format!(
            "epoch key is {t:?}: written on another Redis incarnation, or the server evicted \
             keys since"
        ),
        (Some(t), Some(n)) => {
            format!("epoch key is {t:?} (epoch {n}), PostgreSQL epoch is {epoch}")
        }
    }
}

/// Redis entries for outcome rows read from PostgreSQL; an unreadable row is an error (skipping
/// it would leave a miss that means "never seen").
fn entries(rows: Vec<TimedRow>) -> Result<Vec<r::Entry>, BadOutcome> {
    let mut out = Vec::with_capacity(rows.len());
    for (row, ttl) in rows {
        let outcome = StoredOutcome::try_from(row)?;
        let value = r::encode_outcome(&outcome).ok_or_else(|| BadOutcome::NotTerminal {
            state: outcome.columns().state.to_owned(),
        })?;
        out.push((outcome.intent_id, value, ttl.max(1) as u64));
    }
    Ok(out)
}

/// The Redis writes that make `intent_ids` agree with their latest rows in PostgreSQL (see
/// [`lm::correction`]); an empty value deletes.
fn correction_entries(
    intent_ids: &[String],
    latest: Vec<(TimedRow, bool)>,
) -> Result<Vec<r::Entry>, BadOutcome> {
    let mut by_id: HashMap<String, (TimedRow, bool)> = latest
        .into_iter()
        .map(|(row, committed)| (row.0 .0.clone(), (row, committed)))
        .collect();
    let mut out = Vec::with_capacity(intent_ids.len());
    for id in intent_ids {
        let found = by_id.remove(id);
        let latest = found.as_ref().map(|((_, ttl_left), committed)| lm::Latest {
            committed: *committed,
            ttl_left: *ttl_left,
        });
        match (lm::correction(latest), found) {
            (Correction::Set { ttl }, Some(((row, _), _))) => {
                out.extend(entries(vec![(row, ttl as i64)])?);
            }
            (Correction::Delete, _) => out.push((id.clone(), String::new(), 1)),
            _ => {}
        }
    }
    Ok(out)
}

impl LockStore {
    /// Builds the store from `config.redis` (AUTH and TLS through the URL) and the PostgreSQL
    /// pool (migrated), whose store id (`postgres::lock_store::store_id`, read by the caller)
    /// names its Redis keys. Connects to Redis lazily; starts in Redis mode. Makes no call to
    /// either; fails only when `redis.url` does not parse.
    pub fn new(config: &Config, pool: PgPool, store_id: &str) -> Result<Self> {
        let redis = RedisStore::new(&config.redis, store_id)?;
        tracing::info!(
            keys = %format!("{}:{store_id}:", config.redis.key_prefix),
            "lock store: this store's Redis keys"
        );
        let rc = &config.redis;
        // Outcomes of a batch in flight at a trip may reach PostgreSQL up to this long after it.
        let fallback_margin = 2
            * (config.kafka.transaction_timeout + config.postgres.statement_timeout)
            + Duration::from_secs(60);
        let alive_for = (2 * (config.locks.lease + config.postgres.statement_timeout))
            .max(Duration::from_secs(10));
        let breaker = Breaker::new(rc.breaker_failures, rc.breaker_open_for);
        set_mode_gauge(Mode::Redis);
        Ok(Self {
            redis,
            pool,
            instance: config.instance_id(),
            ttl: rc.idempotency_ttl,
            alive_for,
            machine: Mutex::new(Machine::new(breaker, fallback_margin, alive_for / 4)),
            health: tokio::sync::Mutex::new(()),
            registration: tokio::sync::Mutex::new(()),
            lookups_redis: AtomicU64::new(0),
            lookups_postgres: AtomicU64::new(0),
            redis_failures: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
            resynced_outcomes: AtomicU64::new(0),
            corrected_outcomes: AtomicU64::new(0),
        })
    }

    fn m(&self) -> MutexGuard<'_, Machine> {
        self.machine.lock().expect("lock store state")
    }

    /// The store serving locks and idempotency now.
    pub fn mode(&self) -> Mode {
        self.m().mode()
    }

    /// Whether Redis was last seen in sync with PostgreSQL (its misses authoritative).
    pub fn redis_in_sync(&self) -> bool {
        self.m().trusts_redis()
    }

    pub fn stats(&self) -> Stats {
        Stats {
            lookups_redis: self.lookups_redis.load(Ordering::Relaxed),
            lookups_postgres: self.lookups_postgres.load(Ordering::Relaxed),
            redis_calls: self.redis.calls(),
            redis_failures: self.redis_failures.load(Ordering::Relaxed),
            resyncs: self.resyncs.load(Ordering::Relaxed),
            resynced_outcomes: self.resynced_outcomes.load(Ordering::Relaxed),
            corrected_outcomes: self.corrected_outcomes.load(Ordering::Relaxed),
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
        let by_postgres = LockResult::Granted {
            store: Mode::Postgres,
        };
        if !self.m().allows_calls() {
            return Ok(by_postgres);
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
                self.redis_failed("taking a partition lock", &e, Failure::Call);
                self.register_quietly().await;
                Ok(by_postgres)
            }
        }
    }

    /// Releases the Redis lock if `owner` holds it (true when it did). Best effort: false in
    /// PostgreSQL mode or when Redis fails (the lease then simply expires).
    pub async fn release_lock(&self, topic: &str, partition: i32, owner: &str) -> Result<bool> {
        if !self.m().allows_calls() {
            return Ok(false);
        }
        match self.redis.release_lock(topic, partition, owner).await {
            Ok(released) => {
                self.redis_ok();
                Ok(released)
            }
            Err(e) => {
                self.redis_failed("releasing a partition lock", &e, Failure::Call);
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
    /// commit. Only idempotency records are kept (as in `lookup_outcomes`). In PostgreSQL mode it
    /// writes nothing. A Redis failure opens the breaker at once (Redis is now behind) and
    /// registers the fallback; `Err` only when that registration could not reach PostgreSQL (it
    /// is retried before the next lookup) — the batch itself is committed either way.
    pub async fn record(&self, outcomes: &[StoredOutcome]) -> Result<()> {
        if !self.m().writes_through() {
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
        let epoch = sql::load_epoch(&self.pool).await?;
        let write = {
            let mut m = self.m();
            m.observe_epoch(epoch);
            m.writes_through()
        };
        if !write {
            self.ensure_registered().await?;
            return Ok(());
        }
        if committed_batch == 0 {
            return Ok(());
        }
        let rows =
            sql::committed_batch_outcomes(&self.pool, topic, partition, committed_batch, self.ttl)
                .await?;
        match entries(rows) {
            Ok(entries) if entries.is_empty() => Ok(()),
            Ok(entries) => {
                self.write_live(&entries, "re-recording a restored batch")
                    .await
            }
            Err(e) => {
                // Redis cannot get this batch: it must not be trusted (a miss would mean "never
                // seen"); resynchronisations refuse to mark it while the row is unreadable.
                self.redis_failed("re-recording a restored batch", &e, Failure::Write);
                self.ensure_registered().await?;
                Ok(())
            }
        }
    }

    /// Call right after every restore of a partition (after [`LockStore::partition_restored`]),
    /// with the intent ids whose uncommitted outcome rows it deleted: makes Redis agree with
    /// PostgreSQL for them — and for any rollback of this partition noted earlier and not yet
    /// applied (a crash between a restore and this call) — before the partition replays: the
    /// latest committed outcome is written back, a key without one is deleted, a key written
    /// live since is left alone. When Redis cannot be reached (or is not trusted now), the notes
    /// stay in PostgreSQL and Redis is not trusted again before a resynchronisation applied them.
    /// `Err` only when PostgreSQL fails.
    pub async fn outcomes_rolled_back(
        &self,
        topic: &str,
        partition: i32,
        intent_ids: &[String],
    ) -> Result<()> {
        let noted = sql::pending_corrections(&self.pool, Some((topic, partition))).await?;
        let mut todo: BTreeSet<String> = intent_ids.iter().cloned().collect();
        todo.extend(noted.noted.iter().map(|n| n.intent_id.clone()));
        if todo.is_empty() {
            return Ok(());
        }
        if !self.m().writes_through() {
            self.ensure_registered().await?;
            return Ok(());
        }
        let todo: Vec<String> = todo.into_iter().collect();
        let corrected = async {
            let conn = self.redis.connection().await?;
            let t0 = self.redis.server_time_ms(&conn).await?;
            self.correct(&conn, t0, &todo).await
        }
        .await;
        match corrected {
            Ok(n) => {
                self.redis_ok();
                self.corrected_outcomes.fetch_add(n, Ordering::Relaxed);
                let applied: Vec<i64> = noted.noted.iter().map(|n| n.id).collect();
                sql::forget_corrections(&self.pool, &applied).await?;
                tracing::info!(
                    partition,
                    intents = todo.len(),
                    corrected = n,
                    "lock store: Redis agrees with PostgreSQL on the rolled-back intents"
                );
                Ok(())
            }
            Err(SyncError::Postgres(e)) => Err(e.into()),
            Err(e) => {
                self.redis_failed("correcting rolled-back outcomes", &e, Failure::Write);
                self.ensure_registered().await?;
                Ok(())
            }
        }
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
        match self.mode() {
            Mode::Postgres => {
                if let Err(e) = self.ensure_registered().await {
                    tracing::warn!(error = %e, "lock store: cannot register the fallback in PostgreSQL; Redis is not probed until it is");
                    return self.mode();
                }
                if self.m().take_probe(Instant::now()) {
                    let mut guard = ProbeGuard {
                        store: self,
                        done: false,
                    };
                    self.probe_and_fail_back().await;
                    guard.done = true;
                }
            }
            Mode::Redis => {
                if self.m().allows_calls() {
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
        let generation = self.m().lookup_in_redis()?;
        if intent_ids.is_empty() {
            return Some(Vec::new());
        }
        let epoch = self.pg_epoch().await.ok()?;
        let fetched = match self.redis.fetch(intent_ids).await {
            Ok(f) => f,
            Err(e) => {
                self.redis_failed("looking up intents", &e, Failure::Call);
                return None;
            }
        };
        self.redis_ok();
        if fetched.marked != Some(epoch) {
            let why = if fetched.epoch_changed {
                "epoch key changed between two calls of one lookup (a fallback or a copy ran \
                 meanwhile)"
                    .to_string()
            } else {
                out_of_sync(fetched.epoch_token.as_deref(), fetched.marked, epoch)
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
                Some((outcome, _stamp)) if r::is_idempotency_outcome(&outcome) => {
                    found.push(outcome)
                }
                _ => {
                    tracing::warn!(intent_id = %id, "lock store: an idempotency entry in Redis is unreadable or not an idempotency record; PostgreSQL answers this lookup");
                    return None;
                }
            }
        }
        // A trip since the call started: Redis may be behind; let PostgreSQL answer.
        if !self.m().answer_stands(generation) {
            return None;
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
                self.redis_failed(what, &e, Failure::Write);
                self.ensure_registered().await?;
                Ok(())
            }
        }
    }

    /// Makes Redis agree with PostgreSQL for `intent_ids` (see [`lm::correction`]), as a copy
    /// read after `t0`; returns how many keys were written or deleted.
    async fn correct(
        &self,
        conn: &Arc<Conn>,
        t0: u64,
        intent_ids: &[String],
    ) -> Result<u64, SyncError> {
        let mut n = 0;
        for chunk in intent_ids.chunks(r::KEYS_PER_CALL) {
            let latest = sql::latest_outcomes(&self.pool, chunk, self.ttl).await?;
            let entries = correction_entries(chunk, latest)?;
            n += self
                .redis
                .put(conn, &entries, PutMode::Resync { t0 })
                .await?;
        }
        Ok(n)
    }

    fn redis_ok(&self) {
        self.m().redis_ok();
    }

    /// Counts a failed Redis call (`Failure::Write`: something PostgreSQL holds did not reach
    /// Redis, so the breaker opens at once and the fallback is registered again even if already
    /// in PostgreSQL mode), and logs what it changed.
    fn redis_failed(&self, what: &str, e: &dyn Display, failure: Failure) {
        self.redis_failures.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::STORE_ERRORS, "store" => "redis").increment(1);
        let cause = format!("{what}: {e}");
        let effect = self.m().redis_failed(Instant::now(), failure, &cause);
        match effect {
            FailureEffect::FellBack(change) => {
                set_mode_gauge(Mode::Postgres);
                tracing::warn!(
                    from = change.from.as_str(),
                    to = "postgres",
                    cause = %cause,
                    "lock store mode changed: Redis failed, PostgreSQL serves locks and idempotency"
                );
            }
            FailureEffect::WriteLost => {
                tracing::warn!(cause = %cause, "lock store: an outcome did not reach Redis during failback; Redis stays out of sync");
            }
            FailureEffect::ProbeFailed => {
                tracing::info!(cause = %cause, "lock store: Redis probe failed; staying on PostgreSQL");
            }
            FailureEffect::Counted { consecutive } => {
                tracing::debug!(cause = %cause, failures = consecutive, "lock store: Redis call failed");
            }
        }
    }

    fn observe_sync(&self, in_sync: bool, why: &str) {
        let change = self.m().observe_sync(in_sync);
        match change {
            None => {}
            Some(SyncChange::Trusted) => tracing::info!(
                why,
                "lock store: Redis is in sync with PostgreSQL; lookups use Redis"
            ),
            Some(SyncChange::Untrusted { known }) if known || why.contains("missing") => {
                tracing::warn!(why, "lock store: Redis is out of sync with PostgreSQL; lookups use PostgreSQL until it is resynchronised")
            }
            Some(SyncChange::Untrusted { .. }) => {
                tracing::info!(why, "lock store: Redis not in sync yet; lookups use PostgreSQL until it is resynchronised")
            }
        }
    }

    /// The PostgreSQL epoch, read once and then refreshed by health checks and restores.
    async fn pg_epoch(&self) -> Result<i64, pg::Error> {
        if let Some(e) = self.m().cached_epoch() {
            return Ok(e);
        }
        let e = sql::load_epoch(&self.pool).await?;
        Ok(self.m().observe_epoch(e))
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
        if !self.m().registration_due(Instant::now()) {
            return Ok(());
        }
        let _serial = self.registration.lock().await;
        let now = Instant::now();
        let todo = self.m().registration(now);
        match todo {
            Registration::Nothing => Ok(()),
            Registration::Register { since, back, audit } => {
                let detail = audit.map(|c| audit_detail(&c, &self.instance, None));
                let epoch = self.register(back, detail).await?;
                self.m().registered(since, epoch, now);
                tracing::info!(epoch, "lock store: fallback registered in PostgreSQL; every Redis is out of sync until resynchronised");
                Ok(())
            }
            Registration::Renew { back } => {
                if sql::renew_fallback(&self.pool, &self.instance, self.alive_for).await? {
                    self.m().renewed(now, None);
                    return Ok(());
                }
                // The row was taken for dead (not renewed in time) and removed: outcomes since
                // the last renewal may be missing from Redis. Register again from there.
                let epoch = self.register(back, None).await?;
                self.m().renewed(now, Some(epoch));
                tracing::warn!(
                    epoch,
                    "lock store: this instance's fallback row had expired; registered again"
                );
                Ok(())
            }
        }
    }

    async fn register(
        &self,
        back: Duration,
        audit: Option<serde_json::Value>,
    ) -> Result<i64, pg::Error> {
        sql::register_fallback(&self.pool, &self.instance, back, self.alive_for, audit).await
    }

    async fn flush_audits(&self) {
        let pending = self.m().take_audits();
        for (i, audit) in pending.iter().enumerate() {
            let detail = audit_detail(&audit.change, &self.instance, audit.epoch);
            if let Err(e) = sql::audit_mode_change(&self.pool, detail).await {
                tracing::warn!(error = %e, "lock store: cannot write the mode change's audit row yet");
                self.m().return_audits(pending[i..].to_vec());
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
                self.redis_failed("probing Redis", &e, Failure::Call);
                return;
            }
        };
        tracing::info!(run_id = %conn.run_id, "lock store: Redis probe succeeded; resynchronising before failback");
        let cause = match self.resync(&conn, "failback").await {
            Ok(Resynced::InSync { copied }) => {
                Ok(format!("Redis healthy again; resynchronised ({copied} outcomes copied)"))
            }
            Ok(Resynced::Blocked { by }) => Err(format!(
                "Redis healthy again; lookups use PostgreSQL until instances {by:?} leave their fallback"
            )),
            Err(SyncError::Redis(e)) => {
                self.redis_failed("resynchronising Redis", &e, Failure::Call);
                return;
            }
            Err(e) => {
                // PostgreSQL trouble, an unreadable row, or a batch not decided yet: try again
                // after another open period.
                self.m().probe_abandoned(Instant::now());
                tracing::info!(error = %e, "lock store: failback postponed");
                return;
            }
        };
        let in_sync = cause.is_ok();
        let cause = cause.unwrap_or_else(|blocked| blocked);
        // None: a write-through failed meanwhile and reopened the breaker.
        if let Some(change) = self.m().fail_back(in_sync, cause) {
            set_mode_gauge(Mode::Redis);
            tracing::info!(
                from = change.from.as_str(),
                to = "redis",
                cause = %change.cause,
                "lock store mode changed: failback to Redis"
            );
        }
    }

    /// Redis mode: is Redis still in sync? Resynchronises when it is not.
    async fn check_sync(&self) {
        let epoch = match sql::load_epoch(&self.pool).await {
            Ok(e) => self.m().observe_epoch(e),
            Err(e) => {
                tracing::debug!(error = %e, "lock store: cannot read the epoch");
                return;
            }
        };
        let checked = async {
            let conn = self.redis.connection().await?;
            let token = self.redis.epoch_token(&conn).await?;
            Ok::<_, r::Error>((conn, token))
        }
        .await;
        let (conn, token) = match checked {
            Ok(v) => v,
            // A Redis that may have lost keys (it evicts) is left at once, as after a lost
            // write: its epoch key is gone, so it is copied in full before it is trusted again.
            Err(e @ r::Error::Unusable(_)) => {
                self.redis_failed("checking the epoch", &e, Failure::Write);
                if let Err(e) = self.ensure_registered().await {
                    tracing::warn!(error = %e, "lock store: cannot register the fallback in PostgreSQL yet");
                }
                return;
            }
            Err(e) => {
                self.redis_failed("checking the epoch", &e, Failure::Call);
                return;
            }
        };
        self.redis_ok();
        let marked = conn.marked(token.as_deref());
        if marked == Some(epoch) {
            self.observe_sync(true, "epoch key matches");
            return;
        }
        self.observe_sync(false, &out_of_sync(token.as_deref(), marked, epoch));
        match self.resync(&conn, "out of sync").await {
            Ok(Resynced::InSync { .. }) => self.observe_sync(true, "resynchronised"),
            Ok(Resynced::Blocked { by }) => tracing::debug!(
                ?by,
                "lock store: resynchronisation waits for other instances' fallback"
            ),
            Err(SyncError::Redis(e)) => {
                self.redis_failed("resynchronising Redis", &e, Failure::Call)
            }
            Err(e @ SyncError::Unreadable(_)) => {
                tracing::warn!(error = %e, "lock store: Redis stays out of sync until the row is readable")
            }
            Err(e) => tracing::info!(error = %e, "lock store: resynchronisation postponed"),
        }
    }

    /// Copies what Redis may lack and marks it in sync (see the module documentation): the
    /// window, the pending corrections, the batches undecided at the start, then the mark.
    async fn resync(&self, conn: &Arc<Conn>, cause: &str) -> Result<Resynced, SyncError> {
        let ticket = self.m().begin_resync();
        let _flag = ResyncFlag {
            store: self,
            id: ticket.id,
        };
        let started = Instant::now();
        // From here on outcomes are written through; T0 orders them against the copy, and the
        // marker set with it tells the mark whether Redis lost data meanwhile.
        let (t0, token) = self.redis.begin_resync(conn, &self.instance).await?;
        let view = sql::read_sync_view(&self.pool).await?;
        let blockers = view.live_fallbacks_except(&self.instance);
        if !blockers.is_empty() {
            return Ok(Resynced::Blocked { by: blockers });
        }
        let start = self
            .window_start(conn, token.as_deref(), &view, cause)
            .await?;
        let mut copied = self
            .copy_outcomes(conn, start, view.max_id, t0, ticket)
            .await?;
        let corrections = self.apply_corrections(conn, t0, ticket).await?;
        copied += self
            .copy_decided_batches(conn, &view.open, t0, ticket)
            .await?;
        let marked = self
            .mark_in_sync(conn, view.epoch, &corrections, t0, ticket)
            .await?;
        if let Resynced::Blocked { .. } = marked {
            return Ok(marked);
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

    /// The first `cc_transition` id to copy (see [`lm::resync_window`]).
    async fn window_start(
        &self,
        conn: &Conn,
        token: Option<&str>,
        view: &sql::SyncView,
        cause: &str,
    ) -> Result<i64, SyncError> {
        let window = lm::resync_window(
            conn.marked(token),
            view.epoch,
            view.lowest_watermark(),
            view.max_id,
        );
        let (start, why) = match window {
            Window::From { id, why } => (id, why),
            Window::YoungerThanTtl => {
                let age = self.ttl + Duration::from_secs(60);
                let id = sql::transition_id_since(&self.pool, age).await?;
                (id, "every outcome younger than the TTL")
            }
        };
        tracing::info!(
            cause,
            window = why,
            from_id = start,
            to_id = view.max_id,
            epoch = view.epoch,
            undecided_batches = view.open.len(),
            "lock store: resynchronising Redis from PostgreSQL"
        );
        Ok(start)
    }

    fn check_intact(&self, ticket: ResyncTicket) -> Result<(), SyncError> {
        if self.m().resync_intact(ticket) {
            return Ok(());
        }
        Err(SyncError::Interrupted(
            "an outcome failed to reach Redis during the resynchronisation".into(),
        ))
    }

    /// Copies the committed outcomes with ids in `[start, end]` (younger than the TTL), in id
    /// order, in chunks; returns how many keys were written.
    async fn copy_outcomes(
        &self,
        conn: &Arc<Conn>,
        start: i64,
        end: i64,
        t0: u64,
        ticket: ResyncTicket,
    ) -> Result<u64, SyncError> {
        let mut copied = 0;
        let mut lo = start.max(1);
        while lo <= end {
            let hi = lo.saturating_add(ID_CHUNK).min(end + 1);
            let rows = sql::committed_outcomes_between(&self.pool, lo, hi, self.ttl).await?;
            copied += self
                .redis
                .put(conn, &entries(rows)?, PutMode::Resync { t0 })
                .await?;
            self.check_intact(ticket)?;
            lo = hi;
        }
        Ok(copied)
    }

    /// Applies every pending rollback note; returns the notes with the rollback counter read in
    /// the same snapshot.
    async fn apply_corrections(
        &self,
        conn: &Arc<Conn>,
        t0: u64,
        ticket: ResyncTicket,
    ) -> Result<sql::Corrections, SyncError> {
        let pending = sql::pending_corrections(&self.pool, None).await?;
        let ids: BTreeSet<String> = pending.noted.iter().map(|n| n.intent_id.clone()).collect();
        if !ids.is_empty() {
            let ids: Vec<String> = ids.into_iter().collect();
            let n = self.correct(conn, t0, &ids).await?;
            self.check_intact(ticket)?;
            self.corrected_outcomes.fetch_add(n, Ordering::Relaxed);
            tracing::info!(
                intents = ids.len(),
                corrected = n,
                "lock store: rolled-back intents corrected in Redis"
            );
        }
        Ok(pending)
    }

    /// Waits (a bounded time) for the batches that were not known committed when the
    /// resynchronisation began to be decided, and copies those that committed. Redis cannot be
    /// marked while one is undecided: it may have committed, and its outcomes may be missing.
    async fn copy_decided_batches(
        &self,
        conn: &Arc<Conn>,
        open: &[OpenBatch],
        t0: u64,
        ticket: ResyncTicket,
    ) -> Result<u64, SyncError> {
        let deadline = Instant::now() + UNDECIDED_WAIT;
        let mut waiting = open.to_vec();
        let mut copied = 0;
        while !waiting.is_empty() {
            let keys: Vec<(String, i32)> = waiting
                .iter()
                .map(|b| (b.topic.clone(), b.partition))
                .collect();
            let now: HashMap<(String, i32), (u64, u64)> = sql::partition_batches(&self.pool, &keys)
                .await?
                .into_iter()
                .collect();
            let mut undecided = Vec::new();
            for b in waiting {
                let state = now.get(&(b.topic.clone(), b.partition)).copied();
                match lm::batch_fate(b.batch, state) {
                    BatchFate::Committed => {
                        let rows = sql::committed_batch_outcomes(
                            &self.pool,
                            &b.topic,
                            b.partition,
                            b.batch,
                            self.ttl,
                        )
                        .await?;
                        let entries = entries(rows)?;
                        copied += self
                            .redis
                            .put(conn, &entries, PutMode::Resync { t0 })
                            .await?;
                    }
                    BatchFate::RolledBack => {}
                    BatchFate::Undecided => undecided.push(b),
                }
            }
            self.check_intact(ticket)?;
            if let Some(b) = undecided.first().filter(|_| Instant::now() >= deadline) {
                return Err(SyncError::Interrupted(format!(
                    "batch {} of partition {} of {} is not known committed or rolled back yet",
                    b.batch, b.partition, b.topic
                )));
            }
            if !undecided.is_empty() {
                tokio::time::sleep(UNDECIDED_POLL).await;
            }
            waiting = undecided;
        }
        Ok(copied)
    }

    /// The final step: under the state row's lock (no fallback registers and no rollback
    /// commits meanwhile), checks that nothing moved since the copy began and sets the epoch key.
    async fn mark_in_sync(
        &self,
        conn: &Arc<Conn>,
        epoch: i64,
        corrections: &sql::Corrections,
        t0: u64,
        ticket: ResyncTicket,
    ) -> Result<Resynced, SyncError> {
        let mut tx = sql::MarkTx::begin(&self.pool).await?;
        let locked = tx.lock_state().await?;
        if locked.epoch != epoch {
            return Err(SyncError::Interrupted(
                "another instance fell back meanwhile".into(),
            ));
        }
        if locked.rollbacks != corrections.rollbacks {
            return Err(SyncError::Interrupted(
                "a partition was rolled back after the corrections were read".into(),
            ));
        }
        let blockers = tx.live_fallbacks_except(&self.instance).await?;
        if !blockers.is_empty() {
            return Ok(Resynced::Blocked { by: blockers });
        }
        self.check_intact(ticket)?;
        if !self
            .redis
            .set_epoch(conn, epoch, &self.instance, t0)
            .await?
        {
            return Err(SyncError::Interrupted(
                "Redis lost data during the copy (flushed or restarted)".into(),
            ));
        }
        let applied: Vec<i64> = corrections.noted.iter().map(|n| n.id).collect();
        tx.finish(&self.instance, &applied).await?;
        self.m().observe_epoch(epoch);
        Ok(Resynced::InSync { copied: 0 })
    }
}

/// Ends the resynchronisation when it ends, however it ends.
struct ResyncFlag<'a> {
    store: &'a LockStore,
    id: u64,
}

impl Drop for ResyncFlag<'_> {
    fn drop(&mut self) {
        self.store.m().end_resync(self.id);
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
            self.store.m().probe_abandoned(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sequencer::{Outcome, PriorOutcome, Reason};

    fn row(id: &str, state: &str, reason: &str) -> pg::outcomes::OutcomeRow {
        (id.into(), 7, state.into(), reason.into(), 3, 2)
    }

    #[test]
    fn rows_become_entries_with_their_remaining_ttl() {
        let e = entries(vec![(row("a", "committed_causal", ""), 90)]).unwrap();
        let expected = StoredOutcome {
            intent_id: "a".into(),
            prior: PriorOutcome {
                fingerprint: 7,
                outcome: Outcome::Committed {
                    commit_sequence: 3,
                    contact_version: 2,
                },
            },
        };
        assert_eq!(
            e,
            vec![("a".into(), r::encode_outcome(&expected).unwrap(), 90)]
        );
        assert_eq!(
            entries(vec![(row("a", "committed_causal", ""), 0)]).unwrap()[0].2,
            1
        );
    }

    #[test]
    fn an_unreadable_row_is_an_error_not_a_skipped_entry() {
        let rows = vec![
            (row("a", "committed_causal", ""), 90),
            (row("b", "blocked_conflict", ""), 90),
        ];
        assert!(entries(rows).is_err());
    }

    #[test]
    fn corrections_set_delete_or_leave_each_key() {
        let ids: Vec<String> = ["kept", "gone", "in-flight", "expired"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let latest = vec![
            ((row("kept", "manual_review", "WAIT_TIMEOUT"), 60), true),
            ((row("in-flight", "committed_causal", ""), 60), false),
            ((row("expired", "committed_causal", ""), -5), true),
        ];
        let e = correction_entries(&ids, latest).unwrap();
        let review = StoredOutcome {
            intent_id: "kept".into(),
            prior: PriorOutcome {
                fingerprint: 7,
                outcome: Outcome::ManualReview {
                    reason: Reason::WaitTimeout,
                    commit_sequence: 3,
                },
            },
        };
        assert_eq!(
            e,
            vec![
                ("kept".into(), r::encode_outcome(&review).unwrap(), 60),
                ("gone".into(), String::new(), 1),
                ("expired".into(), String::new(), 1),
            ]
        );
    }
}
