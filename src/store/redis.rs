//! Raw Redis operations of the lock / idempotency store: one connection, a timeout on every
//! call, Lua scripts for everything that must be atomic, one round trip per batch.
//!
//! Keys (all under `{redis.key_prefix}:{store_id}`, written `{prefix}` below: the store id is
//! the id drawn for the schema hashed with where it is (`postgres::lock_store::store_id`), so
//! deployments that share a Redis and a key prefix never share a key, a copy of a schema
//! included):
//!
//! | key | value | written by |
//! |---|---|---|
//! | `{prefix}:idem:<intent_id>` | `<state>\|<fingerprint hex>\|<commit_sequence>\|<contact_version>\|<reason>\|<stamp ms>`, with a TTL | [`RedisStore::put`] |
//! | `{prefix}:epoch` | `<epoch>:<run_id>:<evicted_keys>` of the last synchronisation | [`RedisStore::set_epoch`] |
//! | `{prefix}:resync:<instance>` | start (server ms) of the instance's resynchronisation, 1 day TTL | [`RedisStore::begin_resync`] |
//! | `{prefix}:lock:<topic>:<partition>` | owner, with a PX lease | [`RedisStore::acquire_lock`] |
//!
//! The epoch and marker keys are outside `{prefix}:idem:` so that no intent id can collide with
//! them. The marker lets the final step of a resynchronisation see that Redis lost data (a
//! FLUSHALL, a restart) while it copied: the epoch is written only if the marker is still there.
//!
//! The connection is a [`MultiplexedConnection`] that this module (re)creates itself rather than
//! a `ConnectionManager`: every new connection reads the server's `run_id` (`INFO server`), so
//! a Redis that restarted — possibly from an old snapshot that lacks recent outcomes — is never
//! mistaken for the one that was synchronised; and it checks `maxmemory_policy`, because an
//! evicting Redis could drop idempotency keys silently. The periodic epoch check looks again
//! (an operator may `CONFIG SET` the policy of a running server) and at the server's
//! `evicted_keys` count. A Redis that evicts, or evicted keys since the connection was made, is
//! refused, on connecting or at a check, and its epoch key deleted, so that it is copied in
//! full before it is trusted again. The epoch key also carries the server's `evicted_keys` count
//! when it was marked: a Redis made a cache, made to evict and set back while no instance was
//! connected (nobody there to delete the key) shows a count that moved, and its mark is not
//! taken for a copy.
//! Any failed call drops the connection; the next call connects afresh.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisResult, Script};
use secrecy::ExposeSecret;

use crate::config::RedisConfig;
use crate::sequencer::State;
use crate::store::postgres::outcomes::{is_idempotency_record, Columns};
use crate::store::postgres::StoredOutcome;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Never contains the URL itself (it may hold a password).
    #[error("redis.url is not a valid Redis URL: {0}")]
    Url(redis::RedisError),
    #[error("redis.ca_file {path:?} is not a usable CA certificate file: {reason}")]
    CaFile {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("Redis did not answer within {timeout:?} while {what}")]
    Timeout {
        what: &'static str,
        timeout: Duration,
    },
    #[error("Redis call failed while {what}: {source}")]
    Redis {
        what: &'static str,
        source: redis::RedisError,
    },
    /// The server answered, but cannot be used as it is.
    #[error("Redis is not usable: {0}")]
    Unusable(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Whether an outcome belongs in the idempotency record (the same rule as the durable
/// lookup, `postgres::outcomes`).
pub fn is_idempotency_outcome(o: &StoredOutcome) -> bool {
    is_idempotency_record(&o.prior.outcome)
}

/// The terminal states an idempotency entry can hold, and their one-letter codes.
const STATE_CODES: [(State, &str); 3] = [
    (State::CommittedCausal, "c"),
    (State::BlockedConflict, "b"),
    (State::ManualReview, "m"),
];

/// The value of an idempotency key, without the stamp the write script appends:
/// `<state code>|<fingerprint hex>|<commit_sequence>|<contact_version>|<reason>`. `None` for an
/// outcome that is not terminal.
pub fn encode_outcome(o: &StoredOutcome) -> Option<String> {
    let c = o.columns();
    let code = STATE_CODES.iter().find(|(s, _)| s.as_str() == c.state)?.1;
    Some(format!(
        "{code}|{:x}|{}|{}|{}",
        o.prior.fingerprint, c.commit_sequence, c.contact_version, c.reason
    ))
}

/// Decodes a stored value into the outcome and its write stamp (server ms). `None` for a
/// value this version cannot read (treated as a miss that PostgreSQL answers).
pub fn decode_outcome(intent_id: &str, value: &[u8]) -> Option<(StoredOutcome, u64)> {
    let value = std::str::from_utf8(value).ok()?;
    let (rest, stamp) = value.rsplit_once('|')?;
    let stamp = stamp.parse().ok()?;
    let mut parts = rest.splitn(5, '|');
    let code = parts.next()?;
    let state = STATE_CODES.iter().find(|(_, c)| *c == code)?.0.as_str();
    let fingerprint = u64::from_str_radix(parts.next()?, 16).ok()?;
    let commit_sequence = parts.next()?.parse().ok()?;
    let contact_version = parts.next()?.parse().ok()?;
    let reason = parts.next()?;
    let columns = Columns {
        state,
        reason,
        commit_sequence,
        contact_version,
    };
    let outcome = StoredOutcome::from_columns(intent_id.to_string(), fingerprint, columns).ok()?;
    Some((outcome, stamp))
}

/// The epoch key's value: the PostgreSQL epoch Redis was synchronised to, the server
/// incarnation (`run_id`) that holds the copy, and how many keys that server had evicted when
/// it was marked.
pub fn epoch_token(epoch: i64, run_id: &str, evicted_keys: u64) -> String {
    format!("{epoch}:{run_id}:{evicted_keys}")
}

/// The epoch `token` marks a copy of on the server `run_id` that has evicted `evicted_keys`
/// keys: none when the token is another incarnation's, or the server's count moved since the
/// marking (keys evicted, or the statistics reset: either way nothing says the copy is whole).
/// A token of the build before, without the count, is read by its `run_id` alone, as that build
/// did: during a rolling upgrade the older build reads this build's mark as another
/// incarnation's and copies once, writing its own, which this build then accepts (no copying
/// in turn).
pub fn marked_epoch(token: &str, run_id: &str, evicted_keys: u64) -> Option<i64> {
    let (epoch, rest) = token.split_once(':')?;
    let (run, count) = match rest.split_once(':') {
        Some((run, count)) => (run, Some(count.parse::<u64>().ok()?)),
        None => (rest, None),
    };
    let whole = run == run_id && count.is_none_or(|c| c == evicted_keys);
    whole.then(|| epoch.parse().ok()).flatten()
}

/// Key names of one store under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// The keys of the store `store_id` (`postgres::lock_store::store_id`) under `key_prefix`
    /// (`redis.key_prefix`).
    pub fn new(key_prefix: &str, store_id: &str) -> Self {
        Self {
            prefix: format!("{key_prefix}:{store_id}"),
        }
    }
    pub fn idem(&self, intent_id: &str) -> String {
        format!("{}:idem:{intent_id}", self.prefix)
    }
    pub fn epoch(&self) -> String {
        format!("{}:epoch", self.prefix)
    }
    pub fn lock(&self, topic: &str, partition: i32) -> String {
        format!("{}:lock:{topic}:{partition}", self.prefix)
    }
    pub fn resync(&self, instance: &str) -> String {
        format!("{}:resync:{instance}", self.prefix)
    }
}

/// Takes the lock when free or already held by the owner (renewing the lease); otherwise
/// reports the holder and its remaining lease.
const LOCK_LUA: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {1, ARGV[1], tonumber(ARGV[2])}
end
return {0, cur, redis.call('PTTL', KEYS[1])}
";

/// Compare-and-delete: only the owner releases its lock.
const RELEASE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Writes idempotency entries. ARGV[1]: 0 for a live write (stamped with the server time), or
/// the start T0 of a copy from PostgreSQL (stamped T0-1, and keys whose stamp is >= T0 are left
/// alone: a live write since T0 is at least as new as anything the copy read); then per key:
/// value, TTL in seconds; last, the deadline (server ms) after which nothing is written — a call
/// that timed out on the client never lands later. (The deadline comes last so that the client
/// appends it once the call is built: building is not charged to Redis's share.) An empty value
/// deletes the key (under the same rule: only copies send them).
const PUT_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now > tonumber(ARGV[#ARGV]) then return -1 end
local t0 = tonumber(ARGV[1])
local stamp = now
if t0 > 0 then stamp = t0 - 1 end
local suffix = '|' .. string.format('%.0f', stamp)
local n = 0
for i, key in ipairs(KEYS) do
  local write = true
  if t0 > 0 then
    local cur = redis.call('GET', key)
    if cur then
      local s = tonumber(string.match(cur, '|(%d+)$'))
      if s and s >= t0 then write = false end
    end
  end
  if write then
    if ARGV[2 * i] == '' then
      redis.call('DEL', key)
    else
      redis.call('SET', key, ARGV[2 * i] .. suffix, 'EX', ARGV[2 * i + 1])
    end
    n = n + 1
  end
end
return n
";

/// Starts a resynchronisation: returns the server time T0 (ms) and the epoch key, and sets the
/// instance's marker to T0. KEYS: epoch, marker.
const BEGIN_RESYNC_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[2], string.format('%.0f', now), 'EX', 86400)
return {now, redis.call('GET', KEYS[1])}
";

/// Sets the epoch key unless past the deadline (a marking that timed out on the client never
/// lands later) or unless the resynchronisation's marker is gone (Redis lost what was copied);
/// removes the marker. KEYS: epoch, marker; ARGV: deadline, token, T0. (Markings are ordered by
/// the PostgreSQL row lock they hold while writing it.)
const EPOCH_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now > tonumber(ARGV[1]) then return -1 end
if redis.call('GET', KEYS[2]) ~= ARGV[3] then return 0 end
redis.call('DEL', KEYS[2])
redis.call('SET', KEYS[1], ARGV[2])
return 1
";

/// The result of a lock attempt in Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawLock {
    Granted,
    Held { owner: String, ttl: Duration },
}

/// How a [`RedisStore::put`] stamps and overwrites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    /// A fresh outcome: always written, stamped with the server time.
    Live,
    /// A copy read from PostgreSQL after `t0` (server ms): by a resynchronisation that started
    /// then, or by a correction. Never overwrites a live write since `t0`.
    Resync { t0: u64 },
}

/// One entry to write: intent id, encoded value (see [`encode_outcome`]), TTL in seconds. An
/// empty value deletes the key ([`PutMode::Resync`] only).
pub type Entry = (String, String, u64);

/// Most keys one Redis call reads or writes. A batch's calls go in one round trip (pipelined),
/// each with `redis.command_timeout` of its own: a batch of 20,000 outcomes written in one call
/// under one timeout took longer than 250 ms on a busy two-core machine with Redis healthy, and
/// the lock store fell back to PostgreSQL for it; a thousand keys take a few milliseconds.
pub const KEYS_PER_CALL: usize = 1_000;

/// What a lookup returned: the epoch key and one value per intent id.
#[derive(Debug)]
pub struct Fetched {
    /// The epoch key every call of the lookup saw; `None` when it was missing, or when the calls
    /// saw different keys (`epoch_changed`).
    pub epoch_token: Option<String>,
    /// The epoch key changed between two calls of the lookup (a fallback or a copy ran
    /// meanwhile): the values may straddle it, so Redis must not answer.
    pub epoch_changed: bool,
    /// The epoch the token marks a copy of on the server that answered ([`Conn::marked`]).
    pub marked: Option<i64>,
    pub values: Vec<Option<Vec<u8>>>,
}

/// A verified connection to one server incarnation.
pub struct Conn {
    con: MultiplexedConnection,
    /// The server's `run_id` (changes at every restart).
    pub run_id: String,
    /// Server clock minus local clock, in ms, measured when connecting.
    offset_ms: i64,
    /// The server's `evicted_keys` count when connecting (it counts every key it evicted since
    /// it started).
    evicted_keys: u64,
}

impl Conn {
    /// The epoch an epoch key's `token` marks a copy of on this server ([`marked_epoch`]).
    pub fn marked(&self, token: Option<&str>) -> Option<i64> {
        token.and_then(|t| marked_epoch(t, &self.run_id, self.evicted_keys))
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("run_id", &self.run_id)
            .finish()
    }
}

impl Conn {
    /// The server's current time as estimated locally, in ms.
    fn server_now_ms(&self) -> u64 {
        (unix_ms() as i64 + self.offset_ms).max(0) as u64
    }
}

/// The client of `redis.url`; with `redis.ca_file`, its TLS trusts exactly the CAs of that file.
fn client(config: &RedisConfig) -> Result<Client> {
    let url = config.url.expose_secret();
    if config.ca_file.as_os_str().is_empty() {
        return Client::open(url).map_err(Error::Url);
    }
    let ca_error = |reason: String| Error::CaFile {
        path: config.ca_file.clone(),
        reason,
    };
    let pem = std::fs::read(&config.ca_file).map_err(|e| ca_error(e.to_string()))?;
    // An empty trust store would fail every handshake later, with a vaguer error.
    if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
        return Err(ca_error("no PEM certificate in it".into()));
    }
    let tls = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    };
    Client::build_with_tls(url, tls).map_err(|e| match e.kind() {
        redis::ErrorKind::InvalidClientConfig => Error::Url(e),
        _ => ca_error(e.to_string()),
    })
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The raw Redis side of the lock store.
pub struct RedisStore {
    client: Client,
    keys: Keys,
    timeout: Duration,
    conn: Mutex<Option<Arc<Conn>>>,
    calls: AtomicU64,
    lock: Script,
    release: Script,
    put: Script,
    epoch: Script,
    begin_resync: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("keys", &self.keys)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl RedisStore {
    /// Parses `redis.url` (AUTH in the URL, `rediss://` for TLS, checked against
    /// `redis.ca_file` when set), for the keys of the store `store_id`; connects lazily.
    pub fn new(config: &RedisConfig, store_id: &str) -> Result<Self> {
        let client = client(config)?;
        Ok(Self {
            client,
            keys: Keys::new(&config.key_prefix, store_id),
            timeout: config.command_timeout,
            conn: Mutex::new(None),
            calls: AtomicU64::new(0),
            lock: Script::new(LOCK_LUA),
            release: Script::new(RELEASE_LUA),
            put: Script::new(PUT_LUA),
            epoch: Script::new(EPOCH_LUA),
            begin_resync: Script::new(BEGIN_RESYNC_LUA),
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Redis calls made so far (each one round trip, bar a one-off script load).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// The current connection, or a new verified one.
    pub async fn connection(&self) -> Result<Arc<Conn>> {
        if let Some(c) = self.conn.lock().expect("redis connection lock").clone() {
            return Ok(c);
        }
        self.connect().await
    }

    /// Drops the current connection and connects afresh (the half-open probe).
    pub async fn reconnect(&self) -> Result<Arc<Conn>> {
        *self.conn.lock().expect("redis connection lock") = None;
        self.connect().await
    }

    async fn connect(&self) -> Result<Arc<Conn>> {
        // The one timeout is ours (below), around connecting and verifying together.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(None)
            .set_response_timeout(None);
        let what = "connecting";
        self.calls.fetch_add(1, Ordering::Relaxed);
        let attempt = async {
            let mut con = self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            let before = unix_ms();
            let (server, memory, stats, (secs, micros)): (String, String, String, (u64, u64)) =
                redis::pipe()
                    .cmd("INFO")
                    .arg("server")
                    .cmd("INFO")
                    .arg("memory")
                    .cmd("INFO")
                    .arg("stats")
                    .cmd("TIME")
                    .query_async(&mut con)
                    .await?;
            let after = unix_ms();
            Ok::<_, redis::RedisError>((con, server, memory, stats, secs, micros, before, after))
        };
        let (con, server, memory, stats, secs, micros, before, after) =
            match tokio::time::timeout(self.timeout, attempt).await {
                Ok(Ok(v)) => v,
                Ok(Err(source)) => return Err(Error::Redis { what, source }),
                Err(_) => {
                    return Err(Error::Timeout {
                        what,
                        timeout: self.timeout,
                    })
                }
            };
        let run_id = info_field(&server, "run_id")
            .filter(|r| !r.is_empty())
            .ok_or_else(|| Error::Unusable("INFO server has no run_id".into()))?
            .to_string();
        let evicted_keys = evicted_keys(&stats);
        if let Some(refusal) = eviction_refusal(&memory, evicted_keys, evicted_keys) {
            return Err(self.forget_epoch(con, refusal).await);
        }
        let server_ms = secs * 1000 + micros / 1000;
        let local_mid = before / 2 + after / 2;
        let conn = Arc::new(Conn {
            con,
            run_id,
            offset_ms: server_ms as i64 - local_mid as i64,
            evicted_keys,
        });
        *self.conn.lock().expect("redis connection lock") = Some(conn.clone());
        Ok(conn)
    }

    /// Forgets `conn` (if it is still the current one) so the next call connects afresh.
    fn discard(&self, conn: &Arc<Conn>) {
        let mut slot = self.conn.lock().expect("redis connection lock");
        if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            *slot = None;
        }
    }

    /// Runs one call on `conn` under the timeout; any failure drops the connection.
    async fn run<T>(
        &self,
        conn: &Arc<Conn>,
        what: &'static str,
        call: impl Future<Output = RedisResult<T>>,
    ) -> Result<T> {
        self.run_within(conn, what, self.timeout, call).await
    }

    /// [`RedisStore::run`] with a timeout of its own.
    async fn run_within<T>(
        &self,
        conn: &Arc<Conn>,
        what: &'static str,
        timeout: Duration,
        call: impl Future<Output = RedisResult<T>>,
    ) -> Result<T> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let answered = bounded(what, timeout, call).await;
        if answered.is_err() {
            self.discard(conn);
        }
        answered
    }

    /// A deadline (server ms) after which a write must not land any more.
    fn deadline(&self, conn: &Conn) -> u64 {
        conn.server_now_ms() + self.timeout.as_millis() as u64
    }

    pub async fn ping(&self, conn: &Arc<Conn>) -> Result<()> {
        let mut c = conn.con.clone();
        let pong: String = self
            .run(conn, "pinging", redis::cmd("PING").query_async(&mut c))
            .await?;
        if pong != "PONG" {
            return Err(Error::Unusable(format!("PING answered {pong:?}")));
        }
        Ok(())
    }

    /// The server's clock, in ms.
    pub async fn server_time_ms(&self, conn: &Arc<Conn>) -> Result<u64> {
        let mut c = conn.con.clone();
        let (secs, micros): (u64, u64) = self
            .run(
                conn,
                "reading the server time",
                redis::cmd("TIME").query_async(&mut c),
            )
            .await?;
        Ok(secs * 1000 + micros / 1000)
    }

    /// Takes (or renews) the lock of one input partition for `owner`.
    pub async fn acquire_lock(
        &self,
        topic: &str,
        partition: i32,
        owner: &str,
        lease: Duration,
    ) -> Result<RawLock> {
        let conn = self.connection().await?;
        let mut c = conn.con.clone();
        let mut inv = self.lock.prepare_invoke();
        inv.key(self.keys.lock(topic, partition))
            .arg(owner)
            .arg(lease.as_millis().max(1) as u64);
        let (granted, holder, ttl): (i64, String, i64) = self
            .run(&conn, "taking a partition lock", inv.invoke_async(&mut c))
            .await?;
        Ok(if granted == 1 {
            RawLock::Granted
        } else {
            RawLock::Held {
                owner: holder,
                ttl: Duration::from_millis(ttl.max(0) as u64),
            }
        })
    }

    /// Deletes the lock if `owner` holds it; true when it did.
    pub async fn release_lock(&self, topic: &str, partition: i32, owner: &str) -> Result<bool> {
        let conn = self.connection().await?;
        let mut c = conn.con.clone();
        let mut inv = self.release.prepare_invoke();
        inv.key(self.keys.lock(topic, partition)).arg(owner);
        let n: i64 = self
            .run(
                &conn,
                "releasing a partition lock",
                inv.invoke_async(&mut c),
            )
            .await?;
        Ok(n == 1)
    }

    /// The epoch key and every intent's entry: one MGET per [`KEYS_PER_CALL`] ids, each with
    /// the epoch key, all sent at once on one connection (one round trip, pipelined), each
    /// with its own share of the timeout ([`RedisStore::run_calls`]). The answer marks a copy
    /// only if every call saw the same epoch key (a key changed between two calls, by a
    /// fallback or a copy, marks none). No ids, no call (the lookup answers an empty batch
    /// without Redis).
    pub async fn fetch(&self, intent_ids: &[String]) -> Result<Fetched> {
        let conn = self.connection().await?;
        let chunks: Vec<&[String]> = intent_ids.chunks(KEYS_PER_CALL).collect();
        let calls = chunks
            .iter()
            .map(|ids| {
                let mut cmd = redis::cmd("MGET");
                cmd.arg(self.keys.epoch());
                for id in *ids {
                    cmd.arg(self.keys.idem(id));
                }
                cmd
            })
            .collect();
        let answers: Vec<Vec<Option<Vec<u8>>>> =
            self.run_calls(&conn, "looking up intents", calls).await?;
        let mut tokens: Vec<Option<String>> = Vec::new();
        let mut values = Vec::with_capacity(intent_ids.len());
        for (ids, mut answered) in chunks.iter().zip(answers) {
            if answered.len() != ids.len() + 1 {
                self.discard(&conn);
                return Err(Error::Unusable(format!(
                    "MGET of {} keys answered {} values",
                    ids.len() + 1,
                    answered.len()
                )));
            }
            let token = answered
                .remove(0)
                .map(|e| String::from_utf8_lossy(&e).into_owned());
            if !tokens.contains(&token) {
                tokens.push(token);
            }
            values.append(&mut answered);
        }
        let epoch_changed = tokens.len() > 1;
        let epoch_token = match tokens.as_slice() {
            [one] => one.clone(),
            _ => None,
        };
        Ok(Fetched {
            marked: conn.marked(epoch_token.as_deref()),
            epoch_token,
            epoch_changed,
            values,
        })
    }

    /// Sends `calls` together on `conn` (one round trip: the multiplexed connection pipelines
    /// them) and returns their answers in order. Each call has `command_timeout` of its own:
    /// call *k* must be answered within (*k* + 1) × `command_timeout` of the send, so a frozen
    /// Redis is found after one timeout whatever the size of the batch, and a big batch on a
    /// busy server is not (each call is a few milliseconds of Redis's time). The first
    /// failure fails the whole (the other answers are not waited for: only reads go this way).
    async fn run_calls<T: redis::FromRedisValue>(
        &self,
        conn: &Arc<Conn>,
        what: &'static str,
        calls: Vec<redis::Cmd>,
    ) -> Result<Vec<T>> {
        if one_by_one() {
            // Test builds: each call sent once the one before has answered, and a fail point
            // between two calls (for a test to change something in Redis between them).
            let mut answers = Vec::with_capacity(calls.len());
            for (k, cmd) in calls.into_iter().enumerate() {
                if k > 0 {
                    fail::fail_point!("redis-next-call");
                }
                let mut c = conn.con.clone();
                answers.push(self.run(conn, what, cmd.query_async(&mut c)).await?);
            }
            return Ok(answers);
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
        let pending = calls.into_iter().enumerate().map(|(k, cmd)| {
            let mut c = conn.con.clone();
            let timeout = self.timeout * (k as u32 + 1);
            async move { bounded(what, timeout, cmd.query_async(&mut c)).await }
        });
        let answered = futures::future::try_join_all(pending).await;
        if answered.is_err() {
            self.discard(conn);
        }
        answered
    }

    /// The epoch key, as seen on `conn`.
    ///
    /// With it, whether the server may have lost keys: a `maxmemory-policy` other than
    /// `noeviction` (set since the connection was made) or keys evicted since then are an
    /// [`Error::Unusable`] after [`RedisStore::forget_epoch`].
    pub async fn epoch_token(&self, conn: &Arc<Conn>) -> Result<Option<String>> {
        let mut c = conn.con.clone();
        let (token, memory, stats): (Option<String>, String, String) = self
            .run(
                conn,
                "reading the epoch",
                redis::pipe()
                    .cmd("GET")
                    .arg(self.keys.epoch())
                    .cmd("INFO")
                    .arg("memory")
                    .cmd("INFO")
                    .arg("stats")
                    .query_async(&mut c),
            )
            .await?;
        let Some(refusal) = eviction_refusal(&memory, conn.evicted_keys, evicted_keys(&stats))
        else {
            return Ok(token);
        };
        self.discard(conn);
        Err(self.forget_epoch(c, refusal).await)
    }

    /// Deletes the epoch key of a server that may have lost keys (best effort, under the
    /// timeout), so that no instance trusts it again before a full copy; returns the
    /// [`Error::Unusable`] that says so.
    async fn forget_epoch(&self, mut con: MultiplexedConnection, refusal: String) -> Error {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let deleted = tokio::time::timeout(
            self.timeout,
            redis::cmd("DEL")
                .arg(self.keys.epoch())
                .query_async::<()>(&mut con),
        )
        .await;
        Error::Unusable(match deleted {
            Ok(Ok(())) => format!("{refusal}; its epoch key was deleted"),
            Ok(Err(e)) => format!("{refusal}; its epoch key could not be deleted ({e})"),
            Err(_) => format!(
                "{refusal}; its epoch key could not be deleted (no answer within {:?})",
                self.timeout
            ),
        })
    }

    /// Starts `instance`'s resynchronisation on `conn`'s server: its start T0 (server ms) and
    /// the epoch key as it is then.
    pub async fn begin_resync(
        &self,
        conn: &Arc<Conn>,
        instance: &str,
    ) -> Result<(u64, Option<String>)> {
        let mut c = conn.con.clone();
        let mut inv = self.begin_resync.prepare_invoke();
        inv.key(self.keys.epoch()).key(self.keys.resync(instance));
        let (t0, token): (u64, Option<String>) = self
            .run(
                conn,
                "starting a resynchronisation",
                inv.invoke_async(&mut c),
            )
            .await?;
        Ok((t0, token))
    }

    /// Marks `conn`'s server as synchronised with PostgreSQL epoch `epoch`, if the marker of
    /// `instance`'s resynchronisation started at `t0` is still there; false (nothing written)
    /// when it is not: Redis lost data since `t0`.
    pub async fn set_epoch(
        &self,
        conn: &Arc<Conn>,
        epoch: i64,
        instance: &str,
        t0: u64,
    ) -> Result<bool> {
        let mut c = conn.con.clone();
        let mut inv = self.epoch.prepare_invoke();
        inv.key(self.keys.epoch())
            .key(self.keys.resync(instance))
            .arg(self.deadline(conn))
            .arg(epoch_token(epoch, &conn.run_id, conn.evicted_keys))
            .arg(t0.to_string());
        let r: i64 = self
            .run(conn, "writing the epoch", inv.invoke_async(&mut c))
            .await?;
        if r < 0 {
            self.discard(conn);
            return Err(Error::Unusable(
                "the epoch write reached Redis after its deadline".into(),
            ));
        }
        Ok(r == 1)
    }

    /// Writes idempotency entries, one script call per [`KEYS_PER_CALL`] entries, all in one
    /// pipeline (one round trip); returns how many were written (a resynchronisation skips
    /// keys written live since it started). Call *k* carries a deadline of (*k* + 1) ×
    /// `command_timeout` after the calls are built, checked by Redis, and the pipeline is waited
    /// for until the last call's deadline: a write given up on never lands later, and a big batch
    /// on a busy server gets a few milliseconds of work per call within each share. (The clock
    /// starts once the calls are built, not before: building 40 calls of 1,000 keys takes more
    /// time than Redis spends on the first of them.) A frozen Redis is therefore found after (calls × `command_timeout`), 5 s for 20,000
    /// outcomes by default. A failed pipeline may leave some calls written: Redis is then behind,
    /// as after a single call that timed out.
    pub async fn put(&self, conn: &Arc<Conn>, entries: &[Entry], mode: PutMode) -> Result<u64> {
        let t0 = match mode {
            PutMode::Live => 0,
            PutMode::Resync { t0 } => t0.max(1),
        };
        let calls: Vec<redis::Cmd> = entries
            .chunks(KEYS_PER_CALL)
            .map(|chunk| {
                let mut cmd = redis::cmd("EVALSHA");
                cmd.arg(self.put.get_hash()).arg(chunk.len());
                for (id, _, _) in chunk {
                    cmd.arg(self.keys.idem(id));
                }
                cmd.arg(t0);
                for (_, value, ttl) in chunk {
                    cmd.arg(value).arg((*ttl).max(1));
                }
                cmd
            })
            .collect();
        if calls.is_empty() {
            return Ok(0);
        }
        // Test builds: a slow build (a busy machine) that must not be charged to Redis.
        fail::fail_point!("redis-put-built");
        let first_deadline = self.deadline(conn);
        let share = self.timeout.as_millis() as u64;
        let mut pipe = redis::pipe();
        // The script, loaded in the same round trip (a Redis restarted since has lost it).
        pipe.load_script(&self.put).ignore();
        let n = calls.len() as u32;
        for (k, mut call) in calls.into_iter().enumerate() {
            call.arg(first_deadline + k as u64 * share);
            pipe.add_command(call);
        }
        let mut c = conn.con.clone();
        let answers: Vec<i64> = self
            .run_within(
                conn,
                "writing idempotency outcomes",
                self.timeout * n,
                pipe.query_async(&mut c),
            )
            .await?;
        if answers.iter().any(|n| *n < 0) {
            self.discard(conn);
            return Err(Error::Unusable(
                "the write reached Redis after its deadline".into(),
            ));
        }
        Ok(answers.iter().map(|n| *n as u64).sum())
    }
}

/// `call`, given up after `timeout`.
async fn bounded<T>(
    what: &'static str,
    timeout: Duration,
    call: impl Future<Output = RedisResult<T>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(Error::Redis { what, source }),
        Err(_) => Err(Error::Timeout { what, timeout }),
    }
}

/// Whether [`RedisStore::run_calls`] sends its calls one by one: only in test builds, when the
/// fail point `redis-calls-one-by-one` is set to `return`.
fn one_by_one() -> bool {
    fail::fail_point!("redis-calls-one-by-one", |_| true);
    false
}

/// A `field:value` line of an INFO section.
/// The server's `evicted_keys` count from `INFO stats` (0 when it does not say).
fn evicted_keys(stats: &str) -> u64 {
    info_field(stats, "evicted_keys")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Why a server that answered `memory` (`INFO memory`), and evicted `evicted_now` keys since it
/// started, `known` of them before, cannot hold the idempotency record: a missing key would be
/// taken for an intent never seen.
fn eviction_refusal(memory: &str, known: u64, evicted_now: u64) -> Option<String> {
    if let Some(policy) = info_field(memory, "maxmemory_policy") {
        if policy != "noeviction" {
            return Some(format!(
                "maxmemory-policy is {policy}: Redis could evict idempotency keys silently \
                 and a missing key would be taken for a new intent; set it to noeviction"
            ));
        }
    }
    (evicted_now > known).then(|| {
        format!(
            "Redis evicted {} keys (evicted_keys {known} -> {evicted_now}): idempotency keys \
             may be gone; set maxmemory-policy to noeviction",
            evicted_now - known
        )
    })
}

fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::sequencer::{Outcome, PriorOutcome, Reason};

    fn outcome(outcome: Outcome) -> StoredOutcome {
        StoredOutcome {
            intent_id: "i-1".into(),
            prior: PriorOutcome {
                fingerprint: u64::MAX - 7,
                outcome,
            },
        }
    }

    #[test]
    fn an_epoch_key_marks_a_copy_only_on_its_incarnation_with_no_eviction_since() {
        let token = epoch_token(7, "run-a", 3);
        assert_eq!(marked_epoch(&token, "run-a", 3), Some(7));
        assert_eq!(
            marked_epoch(&token, "run-b", 3),
            None,
            "another incarnation"
        );
        assert_eq!(
            marked_epoch(&token, "run-a", 4),
            None,
            "a key evicted since"
        );
        assert_eq!(
            marked_epoch(&token, "run-a", 0),
            None,
            "statistics reset since"
        );
        // The build before wrote no count: read by its run id, as that build did.
        assert_eq!(marked_epoch("7:run-a", "run-a", 9), Some(7));
        assert_eq!(marked_epoch("7:run-a", "run-b", 0), None);
        for bad in ["", "7", "x:run-a:3", "7:run-a:x", "7:run-a:3:4"] {
            assert_eq!(marked_epoch(bad, "run-a", 3), None, "{bad:?}");
        }
    }

    #[test]
    fn an_evicting_redis_or_one_that_evicted_keys_is_refused() {
        let keeps = "# Memory\r\nused_memory:1000\r\nmaxmemory_policy:noeviction\r\n";
        let evicts = "# Memory\r\nmaxmemory_policy:allkeys-lru\r\n";
        assert_eq!(eviction_refusal(keeps, 3, 3), None);
        assert_eq!(eviction_refusal("# Memory\r\n", 0, 0), None);
        let policy = eviction_refusal(evicts, 0, 0).unwrap();
        assert!(
            policy.contains("maxmemory-policy is allkeys-lru"),
            "{policy}"
        );
        let lost = eviction_refusal(keeps, 3, 5).unwrap();
        assert!(
            lost.contains("evicted 2 keys (evicted_keys 3 -> 5)"),
            "{lost}"
        );
        assert_eq!(
            evicted_keys("# Stats\r\nevicted_keys:17\r\nexpired_keys:2\r\n"),
            17
        );
        assert_eq!(evicted_keys("# Stats\r\n"), 0);
    }

    #[test]
    fn outcomes_round_trip_through_the_encoding() {
        for o in [
            Outcome::Committed {
                commit_sequence: 42,
                contact_version: 9,
            },
            Outcome::Blocked {
                reason: Reason::VersionConflict,
                commit_sequence: 42,
            },
            Outcome::ManualReview {
                reason: Reason::WaitTimeout,
                commit_sequence: 42,
            },
        ] {
            let o = outcome(o);
            let value = format!("{}|1700000000123", encode_outcome(&o).unwrap());
            let (back, stamp) = decode_outcome("i-1", value.as_bytes()).unwrap();
            assert_eq!(back, o);
            assert_eq!(stamp, 1_700_000_000_123);
        }
    }

    #[test]
    fn a_value_this_version_cannot_read_is_a_miss() {
        for value in [
            "x|ff|1|1||1",
            "m|ff|1|0|ODD|1",
            "m|ff|1|0||1",
            "c|zz|1|1||1",
            "garbage",
        ] {
            assert!(decode_outcome("i-1", value.as_bytes()).is_none(), "{value}");
        }
    }
}
