//! Configuration: a TOML file with environment overrides, typed and validated at start-up.
//!
//! Every key, with its default, is documented in `config/default.toml`. Environment variables
//! override the file: `CAUSAL_COMMIT__KAFKA__BROKERS=host:9092` sets `kafka.brokers` (sections
//! separated by a double underscore), and any of them may be read from a file instead
//! (`CAUSAL_COMMIT__POSTGRES__URL_FILE=/run/secrets/url`, see [`env`]). Unknown keys are
//! rejected, and a bad value names its key. Secrets are redacted in `Debug` and `Serialize`
//! (what `show-config` prints), see [`secret`].

mod env;
pub mod secret;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

pub use secret::{is_secret_client_key, ClientProperties, REDACTED};

/// Prefix of the environment overrides.
pub const ENV_PREFIX: &str = "CAUSAL_COMMIT__";

/// A configuration that could not be loaded or failed validation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration could not be read: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("configuration key `{key}` has an invalid value {value:?}: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: &'static str,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Names this process in transactional ids, fencing and audit rows. Empty = host name.
    pub instance_id: String,
    pub kafka: KafkaConfig,
    pub batch: BatchConfig,
    pub sequencer: SequencerConfig,
    pub limits: LimitsConfig,
    pub postgres: PostgresConfig,
    pub redis: RedisConfig,
    pub locks: LocksConfig,
    pub telemetry: TelemetryConfig,
    pub admin: AdminConfig,
    pub bench: BenchConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    pub brokers: String,
    pub group_id: String,
    pub intents_topic: String,
    pub side_effects_topic: String,
    pub manual_review_topic: String,
    /// Must stay above the time a batch takes to commit; librdkafka's `message.timeout.ms`
    /// is derived below it.
    #[serde(with = "humantime_serde")]
    pub transaction_timeout: Duration,
    /// How long a blocking Kafka call (init, commit, offsets) may take before it is treated as
    /// an indefinite outcome and the producer is re-created.
    #[serde(with = "humantime_serde")]
    pub operation_timeout: Duration,
    /// A partition the consumer fetches nothing of this long, with records to read and the
    /// broker answering, has the consumer replaced (`pipeline::stall`); 0 turns that off.
    #[serde(with = "humantime_serde")]
    pub fetch_stall_timeout: Duration,
    /// Passed through to librdkafka for every Kafka client (SASL, TLS, tuning).
    pub client: ClientProperties,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// A transaction commits once it holds this many input records ...
    pub max_records: usize,
    /// ... or once its first record is this old, whichever comes first.
    #[serde(with = "humantime_serde")]
    pub max_linger: Duration,
}

pub use crate::sequencer::TimeoutPolicy;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SequencerConfig {
    #[serde(with = "humantime_serde")]
    pub wait_timeout: Duration,
    pub on_timeout: TimeoutPolicy,
    pub max_pending_per_contact: usize,
    pub max_pending_per_partition: usize,
    /// A paused partition resumes once its backlog is below this.
    pub resume_pending_per_partition: usize,
    /// Bytes of waiting records at which a partition is paused ...
    pub max_pending_bytes_per_partition: u64,
    /// ... and below which it resumes (with the count below its own mark).
    pub resume_pending_bytes_per_partition: u64,
    /// Resolved intent ids remembered in memory per partition (older ones are looked up in
    /// the idempotency store).
    pub recent_intents_per_partition: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Larger input records (key and value) are `INVALID_INTENT`. At most
    /// `max_output_bytes` less [`LimitsConfig::envelope_bytes`], so that every output a valid
    /// record makes (its effect, its forward, its review record) fits.
    pub max_record_bytes: usize,
    pub max_payload_bytes: usize,
    pub max_id_bytes: usize,
    /// The largest record causal-commit produces (key, value and headers): at most what the
    /// output topics accept (their `max.message.bytes`, Kafka's default 1048588, less room for
    /// the batch framing). The producer's `message.max.bytes` follows it. A manual-review
    /// record that would be larger carries the start of the original bytes and says so.
    pub max_output_bytes: usize,
}

impl LimitsConfig {
    /// What an output adds to the input record it comes from, at most: the ids repeated
    /// beside the original bytes, the review's detail, topic name and numbers, the headers.
    pub fn envelope_bytes(&self) -> usize {
        self.max_id_bytes.saturating_mul(8).saturating_add(8192)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/db`, with `?sslmode=verify-full&sslrootcert=FILE`
    /// for TLS checked against a CA.
    #[serde(serialize_with = "secret::serialize_url")]
    pub url: SecretString,
    /// Every table lives in this schema (tests use one schema each).
    pub schema: String,
    /// The role `run` connects as: `migrate` grants it USAGE on the schema and reads and writes
    /// on its tables, sequences and functions. Empty = no grants.
    pub runtime_role: String,
    pub max_connections: u32,
    /// Transactions one batch's durable write is split into, by partition, run at once (1 =
    /// one transaction). Below `max_connections`: lookups and commands need a connection too.
    pub parallel_writes: u32,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocksConfig {
    /// How long a partition's lease lasts without a write. A crashed owner's partitions can be
    /// taken over by another instance after this long (the same instance takes them back at
    /// once); every batch renews the leases it writes under.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
}

impl Default for LocksConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(15),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port` or `rediss://` for TLS.
    #[serde(serialize_with = "secret::serialize_url")]
    pub url: SecretString,
    /// PEM file of the CA(s) that sign the server's TLS certificate (`rediss://` only); empty =
    /// the Web PKI roots. When set, only these CAs are trusted.
    pub ca_file: PathBuf,
    /// Prefix of every key, so several deployments (or tests) share one Redis.
    pub key_prefix: String,
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// How long an intent's outcome stays in Redis. A Redis miss is taken as "never seen", so
    /// this must exceed the longest time after which an intent may be delivered again
    /// (producer retries, replays from the intents topic's retention).
    #[serde(with = "humantime_serde")]
    pub idempotency_ttl: Duration,
    /// Consecutive failed Redis calls that open the circuit breaker (fallback to PostgreSQL).
    pub breaker_failures: u32,
    /// How long the breaker stays open before one probe may close it again (failback).
    #[serde(with = "humantime_serde")]
    pub breaker_open_for: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    /// A tracing `EnvFilter` directive; `RUST_LOG` wins when set.
    pub log_level: String,
    /// Where `/metrics` is served; empty = no exporter.
    pub metrics_listen: String,
    /// OTLP/gRPC endpoint for traces; empty = tracing off.
    pub otlp_endpoint: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Where the admin API listens; empty = no admin API.
    pub listen: String,
    /// Bearer token for the admin API; empty = admin API refuses every call.
    #[serde(serialize_with = "secret::serialize_secret")]
    pub token: SecretString,
}

/// Benchmark switches (`make bench`); never on in production.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BenchConfig {
    /// `run` copies every intents record (key, value, headers) to the side-effects topic in
    /// transactions that carry the consumed offsets, batched like the engine, with sequencing,
    /// PostgreSQL and Redis switched off: the throughput ceiling of the Kafka path alone.
    pub passthrough: bool,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            group_id: "causal-commit".into(),
            intents_topic: "intents".into(),
            side_effects_topic: "side-effects".into(),
            manual_review_topic: "intents.manual-review".into(),
            transaction_timeout: Duration::from_secs(30),
            operation_timeout: Duration::from_secs(20),
            fetch_stall_timeout: Duration::from_secs(60),
            client: ClientProperties::default(),
        }
    }
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_records: 20000,
            max_linger: Duration::from_millis(100),
        }
    }
}

impl Default for SequencerConfig {
    fn default() -> Self {
        Self {
            wait_timeout: Duration::from_secs(300),
            on_timeout: TimeoutPolicy::Hold,
            max_pending_per_contact: 64,
            max_pending_per_partition: 10_000,
            resume_pending_per_partition: 8_000,
            max_pending_bytes_per_partition: 256 << 20,
            resume_pending_bytes_per_partition: 192 << 20,
            recent_intents_per_partition: 100_000,
        }
    }
}

/// The largest `limits.max_output_bytes`: librdkafka's `message.max.bytes` (which follows it,
/// plus room for framing) is at most 1,000,000,000.
const MAX_OUTPUT_BYTES: usize = 900_000_000;

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_record_bytes: 960 * 1024,
            max_payload_bytes: 256 * 1024,
            max_id_bytes: 256,
            max_output_bytes: 1_000_000,
        }
    }
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: "postgres://causal_commit:causal_commit@127.0.0.1:5432/causal_commit".into(),
            schema: "causal_commit".into(),
            runtime_role: String::new(),
            max_connections: 8,
            parallel_writes: 2,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(10),
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            ca_file: PathBuf::new(),
            key_prefix: "cc".into(),
            command_timeout: Duration::from_millis(250),
            idempotency_ttl: Duration::from_secs(7 * 24 * 3600),
            breaker_failures: 3,
            breaker_open_for: Duration::from_secs(5),
        }
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Json,
            log_level: "info".into(),
            metrics_listen: "127.0.0.1:9464".into(),
            otlp_endpoint: String::new(),
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            token: String::new().into(),
        }
    }
}

impl Config {
    /// Loads defaults, then `file` (when given), then `CAUSAL_COMMIT__*` environment overrides
    /// (each of them possibly `..._FILE`, see [`env`]), and validates the result.
    pub fn load(file: Option<&Path>) -> Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        let defaults =
            serde_json::to_value(Config::default()).expect("the default configuration serializes");
        Self::from_figment(figment.merge(env::Environment::from_process(&defaults)))
    }

    /// Parses a TOML document over the defaults (no environment), for tests and tools.
    pub fn from_toml(toml: &str) -> Result<Self> {
        Self::from_figment(
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(toml)),
        )
    }

    fn from_figment(figment: Figment) -> Result<Self> {
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// The instance id, falling back to the host name.
    pub fn instance_id(&self) -> String {
        if !self.instance_id.is_empty() {
            return self.instance_id.clone();
        }
        hostname::get()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "causal-commit".into())
    }

    // Long because the configuration is: one independent check per key, in file order.
    pub fn validate(&self) -> Result<()> {
        fn invalid(key: &'static str, value: impl ToString, reason: &'static str) -> Error {
            Error::Invalid {
                key,
                value: value.to_string(),
                reason,
            }
        }
        let k = &self.kafka;
        for (key, value) in [
            ("kafka.brokers", &k.brokers),
            ("kafka.group_id", &k.group_id),
            ("kafka.intents_topic", &k.intents_topic),
            ("kafka.side_effects_topic", &k.side_effects_topic),
            ("kafka.manual_review_topic", &k.manual_review_topic),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(key, value, "must not be empty"));
            }
        }
        if k.intents_topic == k.side_effects_topic || k.intents_topic == k.manual_review_topic {
            return Err(invalid(
                "kafka.intents_topic",
                &k.intents_topic,
                "must differ from the output topics",
            ));
        }
        // One topic for both would hand the effects' readers review records among the effects
        // (and `verify` would read each record as both).
        if k.side_effects_topic == k.manual_review_topic {
            return Err(invalid(
                "kafka.manual_review_topic",
                &k.manual_review_topic,
                "must differ from kafka.side_effects_topic",
            ));
        }
        if k.transaction_timeout < Duration::from_secs(2) {
            return Err(invalid(
                "kafka.transaction_timeout",
                humantime::format_duration(k.transaction_timeout),
                "must be at least 2s",
            ));
        }
        // The lag monitor reads the last stable offsets every 5 s: a shorter wait sees one or two.
        let stall = k.fetch_stall_timeout;
        if !stall.is_zero() && stall < Duration::from_secs(10) {
            return Err(invalid(
                "kafka.fetch_stall_timeout",
                humantime::format_duration(stall),
                "must be 0 (off) or at least 10s",
            ));
        }
        for reserved in [
            "bootstrap.servers",
            "group.id",
            "transactional.id",
            "enable.auto.commit",
            "enable.auto.offset.store",
            "isolation.level",
            "partition.assignment.strategy",
            "group.protocol",
            "auto.offset.reset",
            "allow.auto.create.topics",
        ] {
            if k.client.contains_key(reserved) {
                return Err(invalid(
                    "kafka.client",
                    reserved,
                    "is set by causal-commit itself and cannot be overridden",
                ));
            }
        }
        // Each contact's effects stay on one partition (R1): the partition is the one the
        // partitioner gives the contact's id (`output::EffectPlacement`), so it must place by key.
        if let Some(p) = k.client.get("partitioner") {
            if crate::pipeline::output::EffectPlacement::new(Some(p), 1).is_none() {
                return Err(invalid(
                    "kafka.client",
                    format!("partitioner={p}"),
                    "must place records by key (consistent_random, consistent, murmur2, \
                     murmur2_random, fnv1a or fnv1a_random): each contact's effects stay on one \
                     partition",
                ));
            }
        }
        if self.batch.max_records == 0 {
            return Err(invalid("batch.max_records", 0, "must be at least 1"));
        }
        if self.batch.max_linger.is_zero() || self.batch.max_linger >= k.transaction_timeout {
            return Err(invalid(
                "batch.max_linger",
                humantime::format_duration(self.batch.max_linger),
                "must be above zero and below kafka.transaction_timeout",
            ));
        }
        let s = &self.sequencer;
        if s.wait_timeout.is_zero() {
            return Err(invalid(
                "sequencer.wait_timeout",
                "0s",
                "must be above zero",
            ));
        }
        if s.max_pending_per_contact == 0 {
            return Err(invalid(
                "sequencer.max_pending_per_contact",
                0,
                "must be at least 1",
            ));
        }
        if s.max_pending_per_partition < s.max_pending_per_contact {
            return Err(invalid(
                "sequencer.max_pending_per_partition",
                s.max_pending_per_partition,
                "must be at least sequencer.max_pending_per_contact",
            ));
        }
        if s.resume_pending_per_partition >= s.max_pending_per_partition {
            return Err(invalid(
                "sequencer.resume_pending_per_partition",
                s.resume_pending_per_partition,
                "must be below sequencer.max_pending_per_partition",
            ));
        }
        if s.resume_pending_bytes_per_partition >= s.max_pending_bytes_per_partition {
            return Err(invalid(
                "sequencer.resume_pending_bytes_per_partition",
                s.resume_pending_bytes_per_partition,
                "must be below sequencer.max_pending_bytes_per_partition",
            ));
        }
        if s.max_pending_bytes_per_partition < self.limits.max_record_bytes as u64 {
            return Err(invalid(
                "sequencer.max_pending_bytes_per_partition",
                s.max_pending_bytes_per_partition,
                "must be at least limits.max_record_bytes",
            ));
        }
        let l = &self.limits;
        if l.max_payload_bytes >= l.max_record_bytes {
            return Err(invalid(
                "limits.max_payload_bytes",
                l.max_payload_bytes,
                "must be below limits.max_record_bytes",
            ));
        }
        if l.max_id_bytes == 0 {
            return Err(invalid("limits.max_id_bytes", 0, "must be at least 1"));
        }
        if l.max_output_bytes > MAX_OUTPUT_BYTES {
            return Err(invalid(
                "limits.max_output_bytes",
                l.max_output_bytes,
                "must be at most 900000000 (librdkafka's message.max.bytes is at most 1000000000)",
            ));
        }
        if l.max_record_bytes.saturating_add(l.envelope_bytes()) > l.max_output_bytes {
            return Err(invalid(
                "limits.max_record_bytes",
                l.max_record_bytes,
                "must leave room for what an output adds: at most limits.max_output_bytes less 8 x limits.max_id_bytes less 8192",
            ));
        }
        let pg = self.postgres.url.expose_secret();
        if !(pg.starts_with("postgres://") || pg.starts_with("postgresql://")) {
            // Never echo the URL: it may hold a password.
            return Err(invalid(
                "postgres.url",
                "<redacted>",
                "must start with postgres:// or postgresql://",
            ));
        }
        if !is_identifier(&self.postgres.schema) {
            return Err(invalid(
                "postgres.schema",
                &self.postgres.schema,
                "must be a lower-case SQL identifier ([a-z_][a-z0-9_]*)",
            ));
        }
        let role = &self.postgres.runtime_role;
        if !role.is_empty() && !is_identifier(role) {
            return Err(invalid(
                "postgres.runtime_role",
                role,
                "must be empty or a lower-case SQL identifier ([a-z_][a-z0-9_]*)",
            ));
        }
        if self.postgres.max_connections < 2 {
            return Err(invalid(
                "postgres.max_connections",
                self.postgres.max_connections,
                "must be at least 2",
            ));
        }
        if self.postgres.parallel_writes == 0
            || self.postgres.parallel_writes >= self.postgres.max_connections
        {
            return Err(invalid(
                "postgres.parallel_writes",
                self.postgres.parallel_writes,
                "must be at least 1 and below postgres.max_connections",
            ));
        }
        if self.locks.lease < Duration::from_secs(1) {
            return Err(invalid(
                "locks.lease",
                humantime::format_duration(self.locks.lease),
                "must be at least 1s",
            ));
        }
        let redis = self.redis.url.expose_secret();
        if !(redis.starts_with("redis://") || redis.starts_with("rediss://")) {
            return Err(invalid(
                "redis.url",
                "<redacted>",
                "must start with redis:// or rediss://",
            ));
        }
        let r = &self.redis;
        if !r.ca_file.as_os_str().is_empty() && !redis.starts_with("rediss://") {
            return Err(invalid(
                "redis.ca_file",
                r.ca_file.display(),
                "is for TLS: redis.url must start with rediss://",
            ));
        }
        if r.key_prefix.is_empty() || r.key_prefix.chars().any(|c| c.is_whitespace()) {
            return Err(invalid(
                "redis.key_prefix",
                &r.key_prefix,
                "must be non-empty and without whitespace",
            ));
        }
        if r.command_timeout.is_zero() {
            return Err(invalid("redis.command_timeout", "0s", "must be above zero"));
        }
        if r.idempotency_ttl < Duration::from_secs(60) {
            return Err(invalid(
                "redis.idempotency_ttl",
                humantime::format_duration(r.idempotency_ttl),
                "must be at least 1m",
            ));
        }
        if r.breaker_failures == 0 {
            return Err(invalid("redis.breaker_failures", 0, "must be at least 1"));
        }
        if r.breaker_open_for.is_zero() {
            return Err(invalid(
                "redis.breaker_open_for",
                "0s",
                "must be above zero",
            ));
        }
        for (key, value) in [
            ("telemetry.metrics_listen", &self.telemetry.metrics_listen),
            ("admin.listen", &self.admin.listen),
        ] {
            if !value.is_empty() && value.parse::<SocketAddr>().is_err() {
                return Err(invalid(
                    key,
                    value,
                    "must be empty or an address like 127.0.0.1:9464",
                ));
            }
        }
        if tracing_subscriber::EnvFilter::try_new(&self.telemetry.log_level).is_err() {
            return Err(invalid(
                "telemetry.log_level",
                &self.telemetry.log_level,
                "is not a valid filter directive (e.g. info, causal_commit=debug)",
            ));
        }
        Ok(())
    }
}

/// A lower-case SQL identifier that is safe to splice into DDL.
pub fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && s.len() <= 63
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_file_matches_built_in_defaults() {
        let text = include_str!("../config/default.toml");
        let from_file = Config::from_toml(text).expect("config/default.toml is valid");
        let built_in = Config::default();
        assert_eq!(
            serde_json::to_value(&from_file).unwrap(),
            serde_json::to_value(&built_in).unwrap(),
            "config/default.toml must document exactly the built-in defaults"
        );
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let err = Config::from_toml("[kafka]\nbrokerz = \"x\"\n").unwrap_err();
        assert!(err.to_string().contains("brokerz"), "{err}");
    }

    #[test]
    fn durations_take_units() {
        let c = Config::from_toml("[sequencer]\nwait_timeout = \"90s\"\n").unwrap();
        assert_eq!(c.sequencer.wait_timeout, Duration::from_secs(90));
        let err = Config::from_toml("[sequencer]\nwait_timeout = 90\n").unwrap_err();
        assert!(err.to_string().contains("wait_timeout"), "{err}");
    }

    #[test]
    fn a_fetch_stall_timeout_is_off_or_at_least_ten_seconds() {
        for ok in ["0s", "10s", "5m"] {
            Config::from_toml(&format!("[kafka]\nfetch_stall_timeout = \"{ok}\"\n")).unwrap();
        }
        let err = Config::from_toml("[kafka]\nfetch_stall_timeout = \"9s\"\n").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("kafka.fetch_stall_timeout") && msg.contains("9s"),
            "{msg}"
        );
    }

    #[test]
    fn invalid_value_names_key_and_value() {
        let err = Config::from_toml("[batch]\nmax_records = 0\n").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("batch.max_records") && msg.contains("\"0\""),
            "{msg}"
        );
        let err = Config::from_toml("[postgres]\nschema = \"Bad-Name\"\n").unwrap_err();
        assert!(err.to_string().contains("postgres.schema"), "{err}");
    }

    #[test]
    fn every_output_of_a_valid_record_fits_max_output_bytes() {
        let d = Config::default().limits;
        assert!(d.max_record_bytes + d.envelope_bytes() <= d.max_output_bytes);
        // Kafka's default max.message.bytes, less room for one record's batch framing.
        assert!(d.max_output_bytes <= 1_048_588 - 4096);
        let err = Config::from_toml("[limits]\nmax_record_bytes = 1048576\n").unwrap_err();
        assert!(
            err.to_string().contains("limits.max_record_bytes")
                && err.to_string().contains("limits.max_output_bytes"),
            "{err}"
        );
        let raised =
            Config::from_toml("[limits]\nmax_record_bytes = 4000000\nmax_output_bytes = 4200000\n")
                .unwrap();
        assert_eq!(raised.limits.max_output_bytes, 4_200_000);
        let err = Config::from_toml("[limits]\nmax_output_bytes = 2000000000\n").unwrap_err();
        assert!(err.to_string().contains("limits.max_output_bytes"), "{err}");
    }

    #[test]
    fn reserved_client_keys_are_refused() {
        for key in ["group.id", "allow.auto.create.topics"] {
            let err =
                Config::from_toml(&format!("[kafka.client]\n\"{key}\" = \"true\"\n")).unwrap_err();
            assert!(err.to_string().contains(key), "{err}");
        }
    }

    #[test]
    fn the_three_topics_must_differ() {
        for (a, b) in [
            ("intents_topic", "side_effects_topic"),
            ("intents_topic", "manual_review_topic"),
            ("side_effects_topic", "manual_review_topic"),
        ] {
            let err = Config::from_toml(&format!("[kafka]\n{a} = \"t\"\n{b} = \"t\"\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("must differ"), "{a} = {b}: {err}");
        }
    }

    #[test]
    fn a_partitioner_that_does_not_place_by_key_is_refused() {
        for bad in ["random", "roundrobin"] {
            let err = Config::from_toml(&format!("[kafka.client]\npartitioner = \"{bad}\"\n"))
                .unwrap_err();
            assert!(
                err.to_string().contains(&format!("partitioner={bad}")),
                "{err}"
            );
        }
        for keyed in ["consistent_random", "murmur2_random", "fnv1a"] {
            Config::from_toml(&format!("[kafka.client]\npartitioner = \"{keyed}\"\n"))
                .unwrap_or_else(|e| panic!("{keyed}: {e}"));
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API fixes the error type
    fn environment_overrides_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[kafka]\nbrokers = \"file:9092\"\n")?;
            jail.set_env("CAUSAL_COMMIT__KAFKA__BROKERS", "env:9092");
            jail.set_env("CAUSAL_COMMIT__BATCH__MAX_LINGER", "250ms");
            let c = Config::load(Some(Path::new("c.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(c.kafka.brokers, "env:9092");
            assert_eq!(c.batch.max_linger, Duration::from_millis(250));
            Ok(())
        });
    }

    #[test]
    fn redis_keys_have_defaults_and_are_validated_by_name() {
        let c = Config::from_toml(
            "[redis]\nidempotency_ttl = \"2d\"\nbreaker_failures = 5\nbreaker_open_for = \"750ms\"\n",
        )
        .unwrap();
        assert_eq!(c.redis.idempotency_ttl, Duration::from_secs(2 * 24 * 3600));
        assert_eq!(c.redis.breaker_failures, 5);
        assert_eq!(c.redis.breaker_open_for, Duration::from_millis(750));
        let d = Config::default().redis;
        assert_eq!(d.idempotency_ttl, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(d.breaker_failures, 3);
        assert_eq!(d.breaker_open_for, Duration::from_secs(5));
        for (toml, key) in [
            ("[redis]\nbreaker_failures = 0\n", "redis.breaker_failures"),
            (
                "[redis]\nbreaker_open_for = \"0s\"\n",
                "redis.breaker_open_for",
            ),
            (
                "[redis]\nidempotency_ttl = \"10s\"\n",
                "redis.idempotency_ttl",
            ),
            (
                "[redis]\ncommand_timeout = \"0s\"\n",
                "redis.command_timeout",
            ),
            ("[redis]\nkey_prefix = \"\"\n", "redis.key_prefix"),
            ("[redis]\nurl = \"http://x\"\n", "redis.url"),
        ] {
            let err = Config::from_toml(toml).unwrap_err();
            assert!(err.to_string().contains(key), "{toml}: {err}");
        }
    }

    #[test]
    fn parallel_writes_are_at_least_one_and_leave_the_pool_a_connection() {
        let c = Config::from_toml("[postgres]\nparallel_writes = 3\n").unwrap();
        assert_eq!(c.postgres.parallel_writes, 3);
        assert_eq!(Config::default().postgres.parallel_writes, 2);
        for toml in [
            "[postgres]\nparallel_writes = 0\n",
            "[postgres]\nparallel_writes = 8\n",
            "[postgres]\nmax_connections = 2\nparallel_writes = 2\n",
        ] {
            let err = Config::from_toml(toml).unwrap_err();
            assert!(
                err.to_string().contains("postgres.parallel_writes"),
                "{toml}: {err}"
            );
        }
        assert!(
            Config::from_toml("[postgres]\nmax_connections = 2\nparallel_writes = 1\n").is_ok()
        );
    }

    /// Every kind of secret, each with a value found nowhere else.
    const SECRETS_TOML: &str = r#"
[kafka.client]
"sasl.username" = "cc-user"
"sasl.password" = "kafka-pw-1"
"ssl.key.password" = "kafka-pw-2"
"ssl.keystore.password" = "kafka-pw-3"
"sasl.oauthbearer.client.secret" = "kafka-pw-4"
[postgres]
url = "postgres://app:pg-pw-5@db:5432/cc?sslmode=verify-full&sslrootcert=/ca.crt"
[redis]
url = "rediss://:redis-pw-6@redis:6380"
[admin]
token = "admin-token-7"
"#;

    #[test]
    fn secrets_never_reach_debug_or_serialized_output() {
        let c = Config::from_toml(SECRETS_TOML).unwrap();
        let debug = format!("{c:?}");
        let json = serde_json::to_string_pretty(&c).unwrap();
        for shown in [&debug, &json] {
            for n in 1..=7 {
                assert!(
                    !shown.contains(&format!("-{n}")),
                    "secret {n} shown: {shown}"
                );
            }
        }
        // What is not secret stays visible, so show-config still answers "what is set".
        assert!(json.contains("postgres://app:<redacted>@db:5432/cc?sslmode=verify-full"));
        assert!(json.contains("rediss://:<redacted>@redis:6380"));
        assert!(json.contains("\"cc-user\""));
        assert_eq!(c.kafka.client.get("sasl.password"), Some("kafka-pw-1"));
        assert_eq!(c.admin.token.expose_secret(), "admin-token-7");
    }

    #[test]
    fn client_properties_take_toml_numbers_and_booleans() {
        let c = Config::from_toml(
            "[kafka.client]\n\"session.timeout.ms\" = 30000\n\"enable.ssl.certificate.verification\" = true\n",
        )
        .unwrap();
        assert_eq!(c.kafka.client.get("session.timeout.ms"), Some("30000"));
        assert_eq!(
            c.kafka.client.get("enable.ssl.certificate.verification"),
            Some("true")
        );
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API fixes the error type
    fn every_key_may_come_from_a_file_and_client_properties_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("pg-url", "postgres://app:from-file@db/cc\n")?;
            jail.create_file("sasl-password", "12345\n")?;
            jail.create_file("linger", "250ms")?;
            jail.set_env("CAUSAL_COMMIT__POSTGRES__URL_FILE", "pg-url");
            jail.set_env("CAUSAL_COMMIT__BATCH__MAX_LINGER_FILE", "linger");
            jail.set_env(
                "CAUSAL_COMMIT__KAFKA__CLIENT__SASL_PASSWORD_FILE",
                "sasl-password",
            );
            jail.set_env("CAUSAL_COMMIT__KAFKA__CLIENT__SASL_USERNAME", "cc");
            jail.set_env("CAUSAL_COMMIT__KAFKA__CLIENT__SESSION_TIMEOUT_MS", "30000");
            jail.set_env("CAUSAL_COMMIT__ADMIN__TOKEN", "007");
            jail.set_env("CAUSAL_COMMIT__REDIS__URL", "rediss://:pw@redis:6380");
            jail.set_env("CAUSAL_COMMIT__REDIS__CA_FILE", "/etc/ca.crt");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(
                c.postgres.url.expose_secret(),
                "postgres://app:from-file@db/cc"
            );
            assert_eq!(c.batch.max_linger, Duration::from_millis(250));
            // Underscores become dots; a numeric password stays the string it was.
            assert_eq!(c.kafka.client.get("sasl.password"), Some("12345"));
            assert_eq!(c.kafka.client.get("sasl.username"), Some("cc"));
            assert_eq!(c.kafka.client.get("session.timeout.ms"), Some("30000"));
            assert_eq!(c.admin.token.expose_secret(), "007");
            // `redis.ca_file` is a key of its own, not a file reference to `redis.ca`.
            assert_eq!(c.redis.ca_file, PathBuf::from("/etc/ca.crt"));
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API fixes the error type
    fn file_references_fail_by_variable_name_and_never_twice() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("CAUSAL_COMMIT__ADMIN__TOKEN_FILE", "missing-file");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(
                err.contains("CAUSAL_COMMIT__ADMIN__TOKEN_FILE") && err.contains("missing-file"),
                "{err}"
            );
            jail.create_file("token", "t0k3n")?;
            jail.set_env("CAUSAL_COMMIT__ADMIN__TOKEN_FILE", "token");
            jail.set_env("CAUSAL_COMMIT__ADMIN__TOKEN", "other");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(
                err.contains("CAUSAL_COMMIT__ADMIN__TOKEN_FILE")
                    && err.contains("CAUSAL_COMMIT__ADMIN__TOKEN ")
                    && !err.contains("t0k3n")
                    && !err.contains("other"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn a_redis_ca_file_needs_a_tls_url() {
        let err = Config::from_toml("[redis]\nca_file = \"/ca.crt\"\n").unwrap_err();
        assert!(err.to_string().contains("redis.ca_file"), "{err}");
        Config::from_toml("[redis]\nurl = \"rediss://h:6380\"\nca_file = \"/ca.crt\"\n").unwrap();
    }

    #[test]
    fn the_runtime_role_is_a_plain_identifier() {
        let err = Config::from_toml("[postgres]\nruntime_role = \"App-Role\"\n").unwrap_err();
        assert!(err.to_string().contains("postgres.runtime_role"), "{err}");
        let c = Config::from_toml("[postgres]\nruntime_role = \"cc_app\"\n").unwrap();
        assert_eq!(c.postgres.runtime_role, "cc_app");
    }
}
