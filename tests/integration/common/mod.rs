//! Shared harness of the integration tests: each test gets its own topics, consumer group and
//! PostgreSQL schema on the real local stack (`scripts/stack.sh up`), and an in-process engine.
//!
//! PostgreSQL has two roles, as in a deployment: the owner (`CC_DATABASE_URL`) migrates each
//! test's schema and grants the runtime role (`CC_DATABASE_RUNTIME_URL`), which is what the
//! processor of every test connects as: it can read and write rows, not change the schema.

pub mod http;
pub mod process;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, FutureProducer, FutureRecord, Producer as _};
use rdkafka::{Offset, TopicPartitionList};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use causal_commit::config::Config;
use causal_commit::proto::{Action, Intent, ManualReview, SideEffect};

pub fn brokers() -> String {
    std::env::var("CC_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// The owner role: migrations and DDL.
pub fn database_url() -> String {
    std::env::var("CC_DATABASE_URL").unwrap_or_else(|_| {
        "postgres://causal_commit:causal_commit@127.0.0.1:5440/causal_commit".into()
    })
}

/// The runtime role: reads and writes rows of the tables the owner created, no DDL.
pub fn runtime_database_url() -> String {
    std::env::var("CC_DATABASE_RUNTIME_URL").unwrap_or_else(|_| {
        "postgres://causal_commit_app:causal_commit_app@127.0.0.1:5440/causal_commit".into()
    })
}

/// Terminates every PostgreSQL session of the processors (`pg_terminate_backend`, as a DBA's
/// idle-session killer or a failover does), but `pool`'s own: how many. `pool` must connect as
/// the runtime role, whose sessions it may terminate.
pub async fn terminate_processor_sessions(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
          WHERE application_name = 'causal-commit' AND usename = current_user
            AND pid <> pg_backend_pid()",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The runtime role's name (the user of [`runtime_database_url`]).
pub fn runtime_role() -> String {
    let url = runtime_database_url();
    let rest = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
    rest.split([':', '@'])
        .next()
        .unwrap_or_default()
        .to_string()
}

/// What `causal-commit migrate` does with the owner role: creates `config`'s schema, applies
/// the migrations and grants the runtime role its rights.
pub async fn migrate_as_owner(config: &Config) {
    let mut owner = config.postgres.clone();
    owner.url = database_url().into();
    let pool = causal_commit::store::postgres::pool(&owner).expect("owner pool");
    causal_commit::store::postgres::migrate(&pool, &owner.schema)
        .await
        .expect("migrate with the owner role");
    causal_commit::store::postgres::grant_runtime_role(&pool, &owner.schema, &runtime_role())
        .await
        .expect("grant the runtime role");
    pool.close().await;
}

/// Creates `config`'s schema with the owner role and applies the migrations numbered below
/// `version`, as an older build's `migrate` would have; grants the runtime role. Returns the
/// owner's pool.
pub async fn migrate_below(config: &Config, version: i64) -> sqlx::PgPool {
    let mut owner = config.postgres.clone();
    owner.url = database_url().into();
    let pool = causal_commit::store::postgres::pool(&owner).unwrap();
    sqlx::query(&format!("CREATE SCHEMA {}", owner.schema))
        .execute(&pool)
        .await
        .unwrap();
    let all = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let older = std::env::temp_dir().join(unique("cc-older-migrations"));
    std::fs::create_dir_all(&older).unwrap();
    for f in std::fs::read_dir(&all).unwrap().map(|e| e.unwrap().path()) {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let number = name.split('_').next().and_then(|n| n.parse::<i64>().ok());
        if name.ends_with(".sql") && number.is_some_and(|n| n < version) {
            std::fs::copy(&f, older.join(&name)).unwrap();
        }
    }
    sqlx::migrate::Migrator::new(older.as_path())
        .await
        .unwrap()
        .run(&pool)
        .await
        .expect("the older migrations");
    causal_commit::store::postgres::grant_runtime_role(&pool, &owner.schema, &runtime_role())
        .await
        .unwrap();
    pool
}

/// The Redis keys of `config`'s store (`{key_prefix}:{store_id}`), the store id read from its
/// schema.
pub async fn redis_keys(config: &Config) -> causal_commit::store::redis::Keys {
    let pool = causal_commit::store::postgres::pool(&config.postgres).expect("pool");
    let store_id = causal_commit::store::postgres::lock_store::store_id(&pool)
        .await
        .expect("store id");
    pool.close().await;
    causal_commit::store::redis::Keys::new(&config.redis.key_prefix, &store_id)
}

/// The keys matching `pattern`, read with `SCAN` a page at a time: one `KEYS` over a large
/// keyspace (a backlog test's outcomes) holds Redis for everyone, and times out (the client's
/// 500 ms) for the test that sent it.
pub async fn scan_keys(con: &mut impl redis::aio::ConnectionLike, pattern: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, page): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(10_000)
            .query_async(con)
            .await
            .expect("SCAN");
        keys.extend(page);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

/// Deletes every Redis key of `config`'s deployment (its `key_prefix`), a page at a time with
/// `UNLINK` (freed off Redis's main thread): a test that leaves hundreds of thousands of
/// outcomes behind would slow down every later test's scans.
pub async fn forget_redis_keys(config: &Config) {
    let client = redis::Client::open(redis_url()).expect("redis url");
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    let keys = scan_keys(&mut con, &format!("{}:*", config.redis.key_prefix)).await;
    for page in keys.chunks(10_000) {
        let _: () = redis::cmd("UNLINK")
            .arg(page)
            .query_async(&mut con)
            .await
            .expect("UNLINK");
    }
}

pub fn redis_url() -> String {
    std::env::var("CC_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6390".into())
}

/// A local TCP port nothing listens on, for a listener the test starts. Taken below the
/// kernel's ephemeral range when there is room: a port the kernel hands out for `bind(0)` can go
/// to a concurrent test's outgoing connection (Kafka, PostgreSQL, Redis clients open many)
/// between this check and the listener's own bind, which then fails.
pub fn free_port() -> u16 {
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(0);
    const FROM: u16 = 10_000;
    if ephemeral_from > FROM + 1_000 {
        for _ in 0..100 {
            let span = u128::from(ephemeral_from - FROM);
            let port = FROM + (uuid::Uuid::new_v4().as_u128() % span) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A short random suffix for names.
pub fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{}", &id[..12])
}

/// Tests share the stack; one that disrupts it (stops, freezes or flushes a service, or loads
/// the machine heavily) holds it exclusively. Fair: a waiting exclusive holder goes before
/// later shared ones.
static STACK: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A hold on the shared stack, released when dropped.
pub enum StackGuard {
    Shared(#[allow(dead_code)] tokio::sync::RwLockReadGuard<'static, ()>),
    Exclusive(#[allow(dead_code)] tokio::sync::RwLockWriteGuard<'static, ()>),
}

/// Uses the stack alongside other tests.
pub async fn shared_stack() -> StackGuard {
    StackGuard::Shared(STACK.read().await)
}

/// Uses the stack alone (to stop, freeze or flush a service, or to load the machine).
pub async fn exclusive_stack() -> StackGuard {
    StackGuard::Exclusive(STACK.write().await)
}

/// A test's private world: topic names, group, schema, instance id — and its hold on the
/// shared stack for as long as it lives.
pub struct TestEnv {
    pub config: Config,
    pub name: String,
    _stack: StackGuard,
}

impl TestEnv {
    /// Creates fresh topics (`partitions` for intents and effects) and a config that uses them,
    /// alongside other tests.
    pub async fn new(name: &str, partitions: i32) -> Self {
        Self::with_stack(name, partitions, shared_stack().await).await
    }

    /// The same, for a test that disrupts the stack or loads the machine: it runs alone.
    pub async fn exclusive(name: &str, partitions: i32) -> Self {
        Self::with_stack(name, partitions, exclusive_stack().await).await
    }

    async fn with_stack(name: &str, partitions: i32, stack: StackGuard) -> Self {
        let id = unique(name);
        let mut config = Config {
            instance_id: format!("{id}-a"),
            ..Config::default()
        };
        config.kafka.brokers = brokers();
        config.kafka.group_id = format!("cc-{id}");
        config.kafka.intents_topic = format!("{id}.intents");
        config.kafka.side_effects_topic = format!("{id}.side-effects");
        config.kafka.manual_review_topic = format!("{id}.manual-review");
        config.kafka.transaction_timeout = Duration::from_secs(10);
        config.kafka.operation_timeout = Duration::from_secs(8);
        config.batch.max_linger = Duration::from_millis(50);
        config.postgres.url = runtime_database_url().into();
        config.postgres.schema = id.to_lowercase();
        config.redis.url = redis_url().into();
        // Redis is shared by every test: each gets its own keys.
        config.redis.key_prefix = format!("cctest:{id}");
        config.telemetry.metrics_listen = String::new();
        config.admin.listen = String::new();
        config.validate().expect("test config is valid");
        migrate_as_owner(&config).await;
        create_topics(
            &config,
            &[
                (&config.kafka.intents_topic, partitions),
                (&config.kafka.side_effects_topic, partitions),
                (&config.kafka.manual_review_topic, 1),
            ],
        )
        .await;
        Self {
            config,
            name: id,
            _stack: stack,
        }
    }

    pub fn config(&self) -> Arc<Config> {
        Arc::new(self.config.clone())
    }

    /// A pool on this world's PostgreSQL schema, migrated (for tests that call the store
    /// directly, without a processor).
    pub async fn store(&self) -> sqlx::PgPool {
        let pool = causal_commit::store::postgres::pool(&self.config.postgres).expect("pool");
        causal_commit::store::postgres::migrate(&pool, &self.config.postgres.schema)
            .await
            .expect("migrate");
        pool
    }
}

pub async fn create_topics(config: &Config, topics: &[(&String, i32)]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .create()
        .expect("admin client");
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
        .collect();
    let results = admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topics");
    for r in results {
        r.expect("topic created");
    }
}

/// The processor running in this test process.
pub struct Running {
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("engine stops within 30 s after shutdown")
            .expect("engine task joined")
            .expect("engine exits cleanly");
    }
}

pub fn start(config: Arc<Config>) -> Running {
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(causal_commit::pipeline::run(config, shutdown.clone()));
    Running { shutdown, handle }
}

pub fn producer(config: &Config) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("enable.idempotence", "true")
        // As large as a topic of Kafka's defaults takes (hostile records included).
        .set("message.max.bytes", "1048588")
        .create()
        .expect("producer")
}

/// Produces `intents` in order to one partition of the intents topic, keyed by contact id.
pub async fn produce_to_partition(config: &Config, partition: i32, intents: &[Intent]) {
    let records: Vec<(i32, Intent)> = intents.iter().map(|i| (partition, i.clone())).collect();
    produce_at(config, &records).await;
}

/// Produces each intent to the partition it names, keyed by contact id (a producer whose
/// partitioner is its own), and waits for every delivery. Records of one partition keep their
/// order (an idempotent producer).
pub async fn produce_at(config: &Config, records: &[(i32, Intent)]) {
    let p = producer(config);
    let mut deliveries = Vec::with_capacity(records.len());
    for (partition, i) in records {
        let value = i.encode_to_vec();
        let r = FutureRecord::to(&config.kafka.intents_topic)
            .partition(*partition)
            .key(i.contact_id.as_bytes())
            .payload(&value);
        deliveries.push(p.send_result(r).map_err(|(e, _)| e).expect("queued"));
    }
    for d in deliveries {
        d.await.expect("not cancelled").expect("delivered");
    }
}

/// A producer of the intents topic that writes in Kafka transactions (`transactional.id` =
/// `id`), its transactions initialised. Blocking: use it off the async runtime.
pub fn transactional_producer(config: &Config, id: &str) -> BaseProducer {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("transactional.id", id)
        .create()
        .expect("transactional producer");
    p.init_transactions(Duration::from_secs(30))
        .expect("init_transactions");
    p
}

/// Sends `intents` to `partition` of the intents topic, keyed by contact, in `p`'s open
/// transaction, and waits for their delivery (the transaction stays open). Blocking.
pub fn send_in_transaction(p: &BaseProducer, config: &Config, partition: i32, intents: &[Intent]) {
    for i in intents {
        let value = i.encode_to_vec();
        let r = BaseRecord::to(&config.kafka.intents_topic)
            .partition(partition)
            .key(i.contact_id.as_bytes())
            .payload(&value);
        p.send(r).map_err(|(e, _)| e).expect("queued");
    }
    p.flush(Duration::from_secs(30)).expect("delivered");
}

/// Takes the processor's transactional id: its producer is fenced, so the transaction of its
/// next batch (written to PostgreSQL first) aborts in Kafka. Blocking: use it off the async
/// runtime.
pub fn fence_processor(config: &Config) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set(
            "transactional.id",
            causal_commit::pipeline::kafka::transactional_id(config),
        )
        .create()
        .expect("fencing producer");
    producer
        .init_transactions(Duration::from_secs(30))
        .expect("init_transactions fences the processor");
}

/// Produces `intents` to `partition` in one Kafka transaction, so that a `read_committed`
/// consumer sees them all at once: a processor polling them takes them into one batch, where
/// records sent one by one could be cut into two.
pub async fn produce_together(config: &Config, partition: i32, intents: &[Intent]) {
    let (c, intents) = (config.clone(), intents.to_vec());
    tokio::task::spawn_blocking(move || {
        let id = format!("together-{}", uuid::Uuid::new_v4());
        let p = transactional_producer(&c, &id);
        p.begin_transaction().expect("begin");
        send_in_transaction(&p, &c, partition, &intents);
        p.commit_transaction(Duration::from_secs(30))
            .expect("commit");
    })
    .await
    .unwrap();
}

/// Produces `(partition, key, value, traceparent)` records in order and waits for every
/// delivery.
pub async fn produce_traced<K: AsRef<[u8]>>(
    config: &Config,
    records: &[(i32, K, Vec<u8>, Option<&str>)],
) {
    let producer = producer(config);
    for (partition, key, value, traceparent) in records {
        let mut headers = OwnedHeaders::new();
        if let Some(tp) = traceparent {
            headers = headers.insert(Header {
                key: "traceparent",
                value: Some(tp.as_bytes()),
            });
        }
        let r = FutureRecord::to(&config.kafka.intents_topic)
            .partition(*partition)
            .key(key.as_ref())
            .payload(value)
            .headers(headers);
        producer
            .send(r, Duration::from_secs(10))
            .await
            .expect("delivered");
    }
}

/// Produces raw records (key, value) in order and waits for every delivery.
pub async fn produce_raw(config: &Config, records: &[(Option<Vec<u8>>, Vec<u8>)]) {
    let p = producer(config);
    for (key, value) in records {
        let mut r: FutureRecord<'_, Vec<u8>, Vec<u8>> =
            FutureRecord::to(&config.kafka.intents_topic).payload(value);
        if let Some(k) = key {
            r = r.key(k);
        }
        p.send(r, Duration::from_secs(10)).await.expect("delivered");
    }
}

/// An intent's record value and its `correlation_id` header.
fn encoded(i: &Intent) -> (Vec<u8>, OwnedHeaders) {
    let headers = OwnedHeaders::new().insert(Header {
        key: "correlation_id",
        value: Some(i.correlation_id.as_bytes()),
    });
    (i.encode_to_vec(), headers)
}

/// Produces intents keyed by their contact, with a correlation_id header.
pub async fn produce_intents(config: &Config, intents: &[Intent]) {
    let p = producer(config);
    for i in intents {
        let (value, headers) = encoded(i);
        let r = FutureRecord::to(&config.kafka.intents_topic)
            .key(i.contact_id.as_bytes())
            .payload(&value)
            .headers(headers);
        p.send(r, Duration::from_secs(10)).await.expect("delivered");
    }
}

/// [`produce_intents`] for a backlog: queued a chunk at a time (well below the client's queue
/// bound), then awaited, so thousands of intents take seconds rather than a round trip each.
/// An idempotent producer keeps each partition's order.
pub async fn produce_backlog(config: &Config, intents: &[Intent]) {
    let p = producer(config);
    for chunk in intents.chunks(10_000) {
        let mut deliveries = Vec::with_capacity(chunk.len());
        for i in chunk {
            let (value, headers) = encoded(i);
            let r = FutureRecord::to(&config.kafka.intents_topic)
                .key(i.contact_id.as_bytes())
                .payload(&value)
                .headers(headers);
            deliveries.push(p.send_result(r).map_err(|(e, _)| e).expect("queued"));
        }
        for d in deliveries {
            d.await.expect("not cancelled").expect("delivered");
        }
    }
}

pub fn intent(id: &str, contact: &str, seq: u64) -> Intent {
    Intent {
        intent_id: id.into(),
        contact_id: contact.into(),
        clinic_id: "clinic-1".into(),
        correlation_id: format!("corr-{id}"),
        dispatch_priority: 0,
        causal_sequence: seq,
        expected_version: 0,
        action: Action::Book as i32,
        payload: format!("payload-{id}").into_bytes().into(),
        created_at_ms: chrono::Utc::now().timestamp_millis(),
    }
}

/// Committed (read_committed) records of a topic, with their headers.
pub fn read_all(config: &Config, topic: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    causal_commit::pipeline::read::read_topic(config, topic, |r| {
        if let Some(v) = r.value {
            out.push(v.to_vec());
        }
        Ok(())
    })
    .expect("read topic");
    out
}

/// Committed records of `topic`'s `partitions` with their traceparent header: (traceparent,
/// value), until `n` arrived or a minute passed.
pub fn read_with_traceparent(
    config: &Config,
    topic: &str,
    partitions: &[i32],
    n: usize,
) -> Vec<(Option<String>, Vec<u8>)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", unique("cc-header-reader"))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while out.len() < n && Instant::now() < deadline {
        if let Some(Ok(msg)) = consumer.poll(Duration::from_millis(200)) {
            let tp = msg.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == "traceparent")
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            });
            out.push((tp, msg.payload().unwrap_or_default().to_vec()));
        }
    }
    out
}

/// Polls `sql` (one value, one `$1` bind) every 100 ms until `done` holds for its answer
/// (`None`: no row, or an error such as a table not there yet); panics naming `what` and the
/// last answer after `within`.
pub async fn wait_for_value<T, B>(
    sql: &str,
    bind: B,
    within: Duration,
    what: &str,
    done: impl Fn(Option<&T>) -> bool,
) where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres>
        + sqlx::Type<sqlx::Postgres>
        + Send
        + Unpin
        + std::fmt::Debug,
    B: for<'q> sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Clone + Send,
{
    let pool = sqlx::PgPool::connect(&database_url()).await.unwrap();
    let deadline = Instant::now() + within;
    loop {
        let value: Option<T> = sqlx::query_scalar(sql)
            .bind(bind.clone())
            .fetch_optional(&pool)
            .await
            .unwrap_or(None);
        if done(value.as_ref()) {
            return;
        }
        assert!(Instant::now() < deadline, "{what} (last: {value:?})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `causal-commit verify` on the world's topics and audit (records of `prefix` only), off the
/// async runtime.
pub async fn verify_report(config: &Config, prefix: &str) -> causal_commit::verify::Report {
    let c = config.clone();
    let p = prefix.to_string();
    tokio::task::spawn_blocking(move || causal_commit::verify::verify(&c, &p))
        .await
        .expect("verifier thread")
        .expect("verify runs")
}

/// [`verify_report`] of the whole world, with pending work allowed (`--allow-waiting`):
/// intents still waiting, slots left in manual review and held contacts are not failures.
pub async fn verify_allowing_waiting(config: &Config) -> causal_commit::verify::Report {
    let c = config.clone();
    tokio::task::spawn_blocking(move || {
        causal_commit::verify::run(
            &c,
            &causal_commit::verify::Options {
                prefix: String::new(),
                allow_waiting: true,
            },
        )
    })
    .await
    .expect("verifier thread")
    .expect("verify runs")
}

/// Waits, at most `within`, until the processor's group has committed offsets at the end of
/// every partition of the intents topic (`demo::wait_caught_up`); panics otherwise.
pub async fn caught_up(config: &Config, within: Duration) {
    let c = config.clone();
    tokio::task::spawn_blocking(move || causal_commit::demo::wait_caught_up(&c, within))
        .await
        .expect("the catch-up waiter")
        .expect("the processor catches up");
}

/// Waits until `topic` holds at least `n` committed records, then returns them all.
pub async fn wait_for(config: &Config, topic: &str, n: usize, within: Duration) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + within;
    loop {
        let c = config.clone();
        let t = topic.to_string();
        let got = tokio::task::spawn_blocking(move || read_all(&c, &t))
            .await
            .expect("reader");
        if got.len() >= n || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Waits for `n_effects` committed effects, then for `n_reviews` review records (each wait
/// bounded), and returns what the two topics hold.
pub async fn wait_for_outputs(
    config: &Config,
    n_effects: usize,
    n_reviews: usize,
    within: Duration,
) -> (Vec<SideEffect>, Vec<ManualReview>) {
    let k = &config.kafka;
    let fx = effects(&wait_for(config, &k.side_effects_topic, n_effects, within).await);
    let rv = reviews(&wait_for(config, &k.manual_review_topic, n_reviews, within).await);
    (fx, rv)
}

pub fn effects(values: &[Vec<u8>]) -> Vec<SideEffect> {
    values
        .iter()
        .map(|v| SideEffect::decode(v.as_slice()).expect("a SideEffect"))
        .collect()
}

pub fn reviews(values: &[Vec<u8>]) -> Vec<ManualReview> {
    values
        .iter()
        .map(|v| ManualReview::decode(v.as_slice()).expect("a ManualReview"))
        .collect()
}

/// `contact`'s effects among `effects`, as (intent id, commit sequence), in topic order.
pub fn sequences_of<'a>(effects: &'a [SideEffect], contact: &str) -> Vec<(&'a str, u64)> {
    effects
        .iter()
        .filter(|e| e.contact_id == contact)
        .map(|e| (e.intent_id.as_str(), e.commit_sequence))
        .collect()
}

/// Effects grouped per contact, in topic order.
pub fn by_contact(effects: &[SideEffect]) -> HashMap<String, Vec<&SideEffect>> {
    let mut m: HashMap<String, Vec<&SideEffect>> = HashMap::new();
    for e in effects {
        m.entry(e.contact_id.clone()).or_default().push(e);
    }
    m
}

/// The consumer group `config.kafka.group_id` as the broker describes it.
fn described_group(config: &Config) -> rdkafka::error::KafkaResult<rdkafka::groups::GroupList> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("consumer");
    consumer.fetch_group_list(Some(&config.kafka.group_id), Duration::from_secs(10))
}

/// The members of the consumer group `config.kafka.group_id` as the broker sees them.
pub fn group_members(config: &Config) -> usize {
    let groups = described_group(config).expect("group list");
    groups.groups().iter().map(|g| g.members().len()).sum()
}

/// Whether the consumer group `config.kafka.group_id` is stable with a member assigned some
/// topic's partitions, as the coordinator sees it. A member's assignment is Kafka's consumer
/// protocol: an i16 version, then an i32 count of topics.
pub fn group_member_assigned(config: &Config) -> bool {
    let Ok(groups) = described_group(config) else {
        return false;
    };
    groups.groups().iter().any(|g| {
        g.state() == "Stable"
            && g.members().iter().any(|m| {
                (m.assignment().and_then(|a| a.get(2..6)))
                    .is_some_and(|n| i32::from_be_bytes([n[0], n[1], n[2], n[3]]) > 0)
            })
    })
}

/// Sets one configuration key of a topic with the admin API, as an operator would with
/// `kafka-configs --alter`.
pub async fn alter_topic_config(config: &Config, topic: &str, key: &str, value: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .create()
        .expect("admin client");
    let alter = AlterConfig::new(ResourceSpecifier::Topic(topic)).set(key, value);
    let done = admin
        .alter_configs(
            &[alter],
            &AdminOptions::new().operation_timeout(Some(std::time::Duration::from_secs(10))),
        )
        .await
        .expect("alter_configs");
    assert!(
        done.iter().all(|r| r.is_ok()),
        "{topic} {key}={value}: {done:?}"
    );
}

/// Takes the lock `VACUUM FULL` or `ALTER TABLE` takes on `table` of `cfg`'s schema (a DBA's
/// maintenance), over `pool` (the owner's), until the returned transaction ends.
pub async fn locked_exclusively(
    pool: &sqlx::PgPool,
    cfg: &Config,
    table: &str,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut lock = pool.begin().await.unwrap();
    sqlx::query(&format!(
        "LOCK TABLE {}.{table} IN ACCESS EXCLUSIVE MODE",
        cfg.postgres.schema
    ))
    .execute(&mut *lock)
    .await
    .unwrap();
    lock
}
