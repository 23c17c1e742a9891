//! Locked down: Kafka over SASL_SSL with SCRAM-SHA-512, Redis with AUTH over TLS checked against
//! a private CA, PostgreSQL with `sslmode=verify-full` and a runtime role that cannot change the
//! schema, and no secret in any log line or in `show-config`. Against the local stack's secure
//! endpoints (`scripts/stack.sh env`: `CC_KAFKA_SASL_*`, `CC_KAFKA_CA_FILE`, `CC_REDIS_TLS_URL`,
//! `CC_REDIS_CA_FILE`, `CC_PG_CA_FILE`, `CC_DATABASE_RUNTIME_URL`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::http;
use crate::common::process::{cli, command, read_log, Processor};
use crate::common::*;

use causal_commit::config::Config;
use secrecy::ExposeSecret as _;

fn stack_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: load the stack's endpoints with eval \"$(scripts/stack.sh env)\""
        )
    })
}

/// `config` talking to the broker's SASL_SSL listener, with the stack's SCRAM credentials and CA.
fn over_sasl_ssl(config: &Config) -> Config {
    let mut c = config.clone();
    c.kafka.brokers = stack_env("CC_KAFKA_SASL_BROKERS");
    for (k, v) in [
        ("security.protocol", "SASL_SSL".to_string()),
        ("sasl.mechanism", stack_env("CC_KAFKA_SASL_MECHANISM")),
        ("sasl.username", stack_env("CC_KAFKA_SASL_USER")),
        ("sasl.password", stack_env("CC_KAFKA_SASL_PASSWORD")),
        ("ssl.ca.location", stack_env("CC_KAFKA_CA_FILE")),
    ] {
        c.kafka.client.insert(k, v);
    }
    c
}

/// `config` on the TLS-only Redis with AUTH, checked against the stack's CA.
fn over_redis_tls(config: &Config) -> Config {
    let mut c = config.clone();
    c.redis.url = stack_env("CC_REDIS_TLS_URL").into();
    c.redis.ca_file = stack_env("CC_REDIS_CA_FILE").into();
    // A TLS handshake on a busy 2-core machine can take longer than the default 250 ms.
    c.redis.command_timeout = Duration::from_secs(2);
    c
}

/// The runtime role's URL with the server certificate checked against the stack's CA.
fn verify_full_url(ca_file: &str) -> String {
    format!(
        "{}?sslmode=verify-full&sslrootcert={ca_file}",
        runtime_database_url()
    )
}

/// A CA certificate that signed none of the stack's servers.
fn foreign_ca() -> PathBuf {
    let dir = std::env::temp_dir().join(unique("cc-foreign-ca"));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = dir.join("ca.crt");
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=causal-commit foreign test CA", "-keyout"])
        .arg(dir.join("ca.key"))
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success(), "openssl made no CA");
    cert
}

fn log_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn messages(path: &Path, needle: &str) -> Vec<serde_json::Value> {
    read_log(path)
        .into_iter()
        .filter(|l| l["message"].as_str().is_some_and(|m| m.contains(needle)))
        .collect()
}

fn run_cli(config: &Config, args: &[&str]) -> String {
    let (ok, out, err) = cli(config, args);
    assert!(ok, "causal-commit {args:?} failed: {err}\n{out}");
    out
}

/// Idempotency keys under the config's prefix (of any store), read from the TLS Redis.
fn tls_redis_idem_keys(config: &Config) -> usize {
    let pem = std::fs::read(&config.redis.ca_file).unwrap();
    let client = redis::Client::build_with_tls(
        config.redis.url.expose_secret(),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        },
    )
    .unwrap();
    let mut con = client.get_connection().expect("TLS Redis connection");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*:idem:*", config.redis.key_prefix))
        .query(&mut con)
        .unwrap();
    keys.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_down_kafka_redis_and_postgres_carry_the_processor_produce_and_verify() {
    let env = TestEnv::new("secure_all", 3).await;
    let mut cfg = over_redis_tls(&over_sasl_ssl(&env.config));
    cfg.postgres.url = verify_full_url(&stack_env("CC_PG_CA_FILE")).into();

    // The URL's TLS parameters hold: this very URL gives a verified TLS session.
    let pool = causal_commit::store::postgres::pool(&cfg.postgres).unwrap();
    let (ssl,): (bool,) =
        sqlx::query_as("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .expect("a verify-full connection");
    assert!(ssl, "the session is TLS");

    let log = std::env::temp_dir().join(format!("{}-run.log", env.name));
    let proc = Processor::spawn(&cfg, log.clone());
    // Every Kafka client of the binary goes through the SASL_SSL listener only (the plaintext
    // one is named nowhere): the demo producer, the offsets reader, the verifier's readers.
    let c = cfg.clone();
    tokio::task::spawn_blocking(move || {
        run_cli(
            &c,
            &[
                "produce",
                "--count",
                "300",
                "--contacts",
                "40",
                "--producers",
                "3",
                "--invalid",
                "2",
                "--prefix",
                "sec",
            ],
        );
        run_cli(&c, &["wait-caught-up", "--timeout", "150s"]);
        let report = run_cli(&c, &["verify", "--prefix", "sec"]);
        assert!(report.contains("\"ok\": true"), "{report}");
    })
    .await
    .unwrap();
    assert!(proc.terminate(Duration::from_secs(40)), "clean exit");

    // Redis over TLS served the lock store the whole run: it was trusted for lookups, never
    // left for PostgreSQL, and holds the outcomes the processor wrote to it.
    assert!(
        !messages(&log, "lookups use Redis").is_empty(),
        "{}",
        log_text(&log)
    );
    assert!(
        messages(&log, "lock store mode changed").is_empty(),
        "{}",
        log_text(&log)
    );
    let c = cfg.clone();
    let keys = tokio::task::spawn_blocking(move || tls_redis_idem_keys(&c))
        .await
        .unwrap();
    assert!(keys >= 300, "{keys} idempotency keys in the TLS Redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_kafka_password_or_ca_stops_run_within_seconds_naming_it() {
    let env = TestEnv::new("secure_kafka_refused", 1).await;
    let good = over_sasl_ssl(&env.config);
    let mut wrong_password = good.clone();
    wrong_password
        .kafka
        .client
        .insert("sasl.password", "not-the-password-5c1f");
    let mut wrong_ca = good.clone();
    wrong_ca
        .kafka
        .client
        .insert("ssl.ca.location", foreign_ca().display().to_string());
    for (cfg, named, case) in [
        (&wrong_password, "Kafka authentication failed", "password"),
        (&wrong_ca, "the TLS handshake with Kafka failed", "ca"),
    ] {
        let log = std::env::temp_dir().join(format!("{}-{case}.log", env.name));
        let started = Instant::now();
        let error = refused_at_start(cfg, &log, named, "not-the-password-5c1f");
        // No retry storm: a handful of connection attempts, then the exit.
        let attempts = read_log(&log)
            .iter()
            .filter(|l| l["target"] == "librdkafka")
            .count();
        assert!(attempts <= 10, "{case}: {attempts} librdkafka lines");
        println!("{case}: exited after {:?}: {error}", started.elapsed());
    }
}

/// A refused login is not an outage: `run` does not wait for PostgreSQL to "come back" (it is
/// up), it stops at once naming the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_postgres_password_stops_run_within_seconds_naming_it() {
    let env = TestEnv::new("secure_pg_refused", 1).await;
    let mut cfg = env.config.clone();
    let url = cfg.postgres.url.expose_secret().to_string();
    let (credentials, host) = url.split_once('@').expect("a URL with credentials");
    let (user, _) = credentials.rsplit_once(':').expect("a URL with a password");
    cfg.postgres.url = format!("{user}:not-the-password-7d2e@{host}").into();
    let log = std::env::temp_dir().join(format!("{}.log", env.name));
    refused_at_start(
        &cfg,
        &log,
        "password authentication failed",
        "not-the-password-7d2e",
    );
    assert!(
        messages(&log, "waiting for it").is_empty(),
        "a refused login is not waited for: {}",
        log_text(&log)
    );
}

/// A tired operator's typo in a topic name: `run` waited for an intents topic that never came
/// (alive, not ready, two warnings), or aborted every transaction on a missing output topic.
/// It now stops at once naming the setting and the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mistyped_topic_name_stops_run_within_seconds_naming_it() {
    let env = TestEnv::new("secure_topic_typo", 1).await;
    migrate_as_owner(&env.config).await;
    for (case, key) in [
        ("intents", "kafka.intents_topic"),
        ("effects", "kafka.side_effects_topic"),
        ("review", "kafka.manual_review_topic"),
    ] {
        let mut cfg = env.config.clone();
        let k = &mut cfg.kafka;
        let topic = match case {
            "intents" => &mut k.intents_topic,
            "effects" => &mut k.side_effects_topic,
            _ => &mut k.manual_review_topic,
        };
        topic.push_str("-typo");
        let named = format!("{key} {topic:?} cannot be used");
        let log = std::env::temp_dir().join(format!("{}-{case}.log", env.name));
        let error = refused_at_start(&cfg, &log, &named, "no-secret-in-this-case-3b9a");
        assert!(error.contains("Unknown topic or partition"), "{error}");
    }
}

/// A tired operator's `kafka.transaction_timeout` above the brokers' `transaction.max.timeout.ms`
/// (15 minutes by default): no transactional producer can start. Found by hand: `run` stayed
/// up, not ready, consuming nothing, logging "transactional producer unavailable; retrying"
/// every 1.5 s (99 ERROR lines in two minutes), as if the brokers would come round. It now
/// stops within seconds naming the setting and the brokers' limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_timeout_above_the_brokers_limit_stops_run_within_seconds_naming_it() {
    let env = TestEnv::new("secure_txn_timeout", 1).await;
    migrate_as_owner(&env.config).await;
    let mut cfg = env.config.clone();
    cfg.kafka.transaction_timeout = Duration::from_secs(20 * 60);
    let log = std::env::temp_dir().join(format!("{}.log", env.name));
    let error = refused_at_start(
        &cfg,
        &log,
        "kafka.transaction_timeout (20m) is above the brokers' transaction.max.timeout.ms",
        "no-secret-in-this-case-8c4e",
    );
    assert!(error.contains("Transaction timeout is larger"), "{error}");
    assert!(
        messages(&log, "transactional producer unavailable; retrying").is_empty(),
        "not retried: {}",
        log_text(&log)
    );
}

/// A tired operator's topic setting: `cleanup.policy=compact` keeps the last record of each key
/// and deletes the others (the intents topic is keyed by contact: every intent of a contact
/// but its last, before the processor reads them), and `verify`, reading the same topics,
/// would not see what is gone. Found by hand: `run` and `verify` took a compacted intents
/// topic without a word. Each of the three topics compacted stops `run` at start and fails
/// `verify`, naming the setting, the topic and the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_topic_stops_run_and_fails_verify_naming_it() {
    let env = TestEnv::new("secure_compacted", 1).await;
    migrate_as_owner(&env.config).await;
    let cfg = env.config.clone();
    let k = &cfg.kafka;
    for (case, key, topic, policy) in [
        (
            "intents",
            "kafka.intents_topic",
            &k.intents_topic,
            "compact",
        ),
        (
            "effects",
            "kafka.side_effects_topic",
            &k.side_effects_topic,
            "compact,delete",
        ),
        (
            "review",
            "kafka.manual_review_topic",
            &k.manual_review_topic,
            "compact",
        ),
    ] {
        alter_topic_config(&cfg, topic, "cleanup.policy", policy).await;
        let named = format!("{key} {topic:?} has cleanup.policy={policy}");
        let log = std::env::temp_dir().join(format!("{}-{case}.log", env.name));
        let error = refused_at_start(&cfg, &log, &named, "no-secret-in-this-case-5c1e");
        assert!(error.contains("set cleanup.policy=delete"), "{error}");
        let (ok, out, err) = cli(&cfg, &["verify"]);
        assert!(!ok, "verify over a compacted {case} topic passed: {out}");
        assert!(err.contains(&named), "verify names it: {err}");
        alter_topic_config(&cfg, topic, "cleanup.policy", "delete").await;
    }
    let (ok, out, err) = cli(&cfg, &["verify"]);
    assert!(
        ok,
        "with every topic back to delete, verify runs: {out} {err}"
    );
}

/// The same setting made while the processor runs (found by reading the code: the policy was
/// read at start only, so a topic set to compact under a running processor went unseen until
/// its next start, while the cleaner could delete intents not consumed yet). Within the 30-s
/// check `causal_commit_topic_compacts` is 1 for that topic (what `CausalCommitTopicCompacts`
/// pages on) and an ERROR names the topic and the fix; processing goes on; once reverted the
/// gauge is 0 again and the change is logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_set_to_compact_under_a_running_processor_is_reported_and_processing_goes_on() {
    let env = TestEnv::new("compact_live", 2).await;
    migrate_as_owner(&env.config).await;
    let mut cfg = env.config.clone();
    let port = free_port();
    cfg.telemetry.metrics_listen = format!("127.0.0.1:{port}");
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let log = std::env::temp_dir().join(format!("{}-run.log", env.name));
    let proc = Processor::spawn(&cfg, log.clone());
    let k = cfg.kafka.clone();
    for topic in [
        &k.intents_topic,
        &k.side_effects_topic,
        &k.manual_review_topic,
    ] {
        compacts_gauge(addr, topic, 0.0, &log).await;
    }
    alter_topic_config(&cfg, &k.side_effects_topic, "cleanup.policy", "compact").await;
    compacts_gauge(addr, &k.side_effects_topic, 1.0, &log).await;
    let named = format!(
        "kafka.side_effects_topic {:?} has cleanup.policy=compact",
        k.side_effects_topic
    );
    let errors = messages(&log, &named);
    assert_eq!(
        errors.len(),
        1,
        "one ERROR for the change: {}",
        log_text(&log)
    );
    assert_eq!(errors[0]["level"], "ERROR", "{}", errors[0]);
    assert_eq!(
        errors[0]["topic"],
        k.side_effects_topic.as_str(),
        "{}",
        errors[0]
    );
    assert!(
        errors[0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("set cleanup.policy=delete"),
        "{}",
        errors[0]
    );
    // Processing goes on.
    let intents: Vec<_> = (1..=20)
        .map(|n| intent(&format!("live-{n}"), &format!("c{}", n % 4), 0))
        .collect();
    produce_intents(&cfg, &intents).await;
    let (fx, _) = wait_for_outputs(&cfg, 20, 0, Duration::from_secs(60)).await;
    assert_eq!(
        fx.len(),
        20,
        "every intent committed while the topic compacts"
    );
    alter_topic_config(&cfg, &k.side_effects_topic, "cleanup.policy", "delete").await;
    compacts_gauge(addr, &k.side_effects_topic, 0.0, &log).await;
    assert_eq!(
        messages(&log, "the topic no longer compacts").len(),
        1,
        "{}",
        log_text(&log)
    );
    assert!(proc.terminate(Duration::from_secs(30)));
}

/// One `DescribeConfigs` of three topics, one of them unknown to the brokers, over the plain
/// and the SASL_SSL listener: the two that exist come with their `cleanup.policy` (one set to
/// compact, so the value is the topic's own), the unknown one with the brokers' own error for
/// it, `UnknownTopicOrPartition` (the Rust client's `describe_configs` drops that error and
/// returns a topic without settings).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_setting_comes_with_each_topics_own_error() {
    use causal_commit::pipeline::kafka::{topic_setting, Setting};
    use rdkafka::error::RDKafkaErrorCode;
    let env = TestEnv::new("topic_setting", 1).await;
    let k = env.config.kafka.clone();
    alter_topic_config(
        &env.config,
        &k.side_effects_topic,
        "cleanup.policy",
        "compact",
    )
    .await;
    let unknown = format!("{}-never-created", k.intents_topic);
    for cfg in [env.config.clone(), over_sasl_ssl(&env.config)] {
        let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
            causal_commit::pipeline::kafka::client_config(&cfg, &[])
                .create()
                .expect("admin client");
        let topics = [
            k.intents_topic.clone(),
            unknown.clone(),
            k.side_effects_topic.clone(),
        ];
        let got = tokio::task::spawn_blocking(move || {
            let topics = topics.each_ref().map(String::as_str);
            topic_setting(
                admin.inner(),
                &topics,
                "cleanup.policy",
                Duration::from_secs(10),
            )
        })
        .await
        .unwrap()
        .expect("DescribeConfigs answered");
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0], Setting::Value(Some("delete".into())), "{got:?}");
        assert!(
            matches!(
                got[1],
                Setting::Refused(RDKafkaErrorCode::UnknownTopicOrPartition, _)
            ),
            "{got:?}"
        );
        assert_eq!(got[2], Setting::Value(Some("compact".into())), "{got:?}");
    }
}

/// Waits (up to two checks, 65 s) for the processor at `addr` to report `value` as the
/// `causal_commit_topic_compacts` of `topic`.
async fn compacts_gauge(addr: std::net::SocketAddr, topic: &str, want: f64, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(65);
    loop {
        // Not listening yet at start: no value yet.
        let got = match http::http_get(addr, "/metrics").await {
            Some((200, page)) => http::value(
                &http::parse_samples(&page),
                "causal_commit_topic_compacts",
                &[("topic", topic)],
            ),
            _ => None,
        };
        if got == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "causal_commit_topic_compacts{{topic={topic:?}}} is {got:?}, not {want}: {}",
            log_text(log)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Runs `run` with `cfg` and checks that it stops within 15 s, non-zero, with one
/// `causal-commit failed` line whose error names the cause (`named`), and that `secret` is
/// nowhere in its log. Returns that error.
fn refused_at_start(cfg: &Config, log: &Path, named: &str, secret: &str) -> String {
    let mut proc = Processor::spawn(cfg, log.to_path_buf());
    let at = log.display();
    let status = proc
        .exit_within(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("{at}: still running after 15 s\n{}", log_text(log)));
    assert!(!status.success(), "{at}: exits non-zero");
    let failed = messages(log, "causal-commit failed");
    assert_eq!(failed.len(), 1, "{at}: {}", log_text(log));
    let error = failed[0]["error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains(named), "{at}: {error}");
    assert!(!log_text(log).contains(secret), "{at} shows the secret");
    error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_with_a_wrong_ca_or_password_falls_back_to_postgres_with_a_clear_log_line() {
    for (case, cause) in [("ca", "certificate"), ("password", "authentication failed")] {
        let env = TestEnv::new(&format!("secure_redis_{case}"), 1).await;
        let mut cfg = over_redis_tls(&env.config);
        if case == "ca" {
            cfg.redis.ca_file = foreign_ca();
        } else {
            let url = cfg.redis.url.expose_secret().to_string();
            let (_, host) = url.rsplit_once('@').expect("the TLS URL has a password");
            cfg.redis.url = format!("rediss://:not-the-password-77a1@{host}").into();
        }
        let log = std::env::temp_dir().join(format!("{}-run.log", env.name));
        let proc = Processor::spawn(&cfg, log.clone());
        // One intent a second until the lock store has switched (it takes
        // redis.breaker_failures failed calls), each of them processed all the same.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut sent = 0;
        while messages(&log, "lock store mode changed").is_empty() {
            assert!(Instant::now() < deadline, "{case}: {}", log_text(&log));
            sent += 1;
            let id = format!("{case}-{sent}");
            produce_intents(&cfg, &[intent(&id, &format!("c-{id}"), 1)]).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let got = wait_for(
            &cfg,
            &cfg.kafka.side_effects_topic,
            sent,
            Duration::from_secs(60),
        )
        .await;
        assert_eq!(got.len(), sent, "{case}: processing goes on without Redis");
        assert!(
            proc.terminate(Duration::from_secs(40)),
            "{case}: clean exit"
        );
        let changed = messages(&log, "lock store mode changed");
        let why = changed[0]["cause"].as_str().unwrap_or_default();
        assert!(why.to_lowercase().contains(cause), "{case}: {why}");
        assert_eq!(changed[0]["to"], "postgres", "{case}");
        println!("{case}: lock store mode changed, cause: {why}");
        assert!(!log_text(&log).contains("not-the-password-77a1"), "{case}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_verify_full_accepts_the_stack_ca_and_refuses_a_foreign_one() {
    let _stack = shared_stack().await;
    let mut pg = Config::default().postgres;
    pg.url = verify_full_url(&stack_env("CC_PG_CA_FILE")).into();
    let pool = causal_commit::store::postgres::pool(&pg).unwrap();
    let (ssl, user): (bool, String) = sqlx::query_as(
        "SELECT s.ssl, current_user::text FROM pg_stat_ssl s WHERE s.pid = pg_backend_pid()",
    )
    .fetch_one(&pool)
    .await
    .expect("verified TLS with the stack's CA");
    assert!(ssl);
    assert_eq!(user, runtime_role());

    pg.url = verify_full_url(&foreign_ca().display().to_string()).into();
    let pool = causal_commit::store::postgres::pool(&pg).unwrap();
    let err = sqlx::query("SELECT 1")
        .execute(&pool)
        .await
        .expect_err("a server certificate no configured CA signed");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_logs_or_show_config() {
    let env = TestEnv::new("secure_secrets", 1).await;
    let mut cfg = over_redis_tls(&over_sasl_ssl(&env.config));
    let admin_token = format!("admin-{}", uuid::Uuid::new_v4().simple());
    cfg.admin.token = admin_token.clone().into();
    let sasl_password = stack_env("CC_KAFKA_SASL_PASSWORD");
    let redis_password = stack_env("CC_REDIS_TLS_PASSWORD");
    // The stack's runtime role has its own name as password: the URL form is what could leak.
    let db_password = runtime_database_url()
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, pw)| pw.to_string())
        .expect("the runtime URL has a password");
    let db_userinfo = format!(":{db_password}@");

    // The processor, with every log line on (debug), passing an intent through Kafka, Redis and
    // PostgreSQL; the secrets reach it as ..._FILE variables, as in a deployment.
    let log = std::env::temp_dir().join(format!("{}-run.log", env.name));
    let file = std::fs::File::create(&log).unwrap();
    let mut child = command(&cfg)
        .arg("run")
        .env("RUST_LOG", "debug")
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .spawn()
        .expect("spawn the processor");
    // The test's own producer and reader use the plaintext listener of the same broker.
    let plain = &env.config;
    produce_intents(plain, &[intent("secret-1", "c-secret", 1)]).await;
    let got = wait_for(
        plain,
        &plain.kafka.side_effects_topic,
        1,
        Duration::from_secs(60),
    )
    .await;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    assert_eq!(got.len(), 1, "{}", log_text(&log));

    // show-config with those, and a made-up value for every other kind of secret.
    let mut shown = cfg.clone();
    for key in [
        "ssl.key.password",
        "ssl.keystore.password",
        "sasl.oauthbearer.client.secret",
    ] {
        shown.kafka.client.insert(key, format!("made-up-{key}"));
    }
    let (ok, show, err) = cli(&shown, &["show-config"]);
    assert!(ok, "{err}");
    assert!(show.contains("<redacted>"), "{show}");

    let logs = log_text(&log);
    assert!(logs.len() > 1000, "the run logged: {logs}");
    for (what, text) in [("logs", &logs), ("show-config", &show), ("stderr", &err)] {
        for secret in [&sasl_password, &redis_password, &admin_token, &db_userinfo] {
            assert!(!text.contains(secret.as_str()), "{what} shows a secret");
        }
        assert!(!text.contains("made-up-"), "{what} shows a secret");
        // A Debug of connection options (sqlx's, for one) would show it so.
        assert!(!text.contains("password: Some("), "{what} shows a secret");
        assert!(
            !text.contains(&format!("password={db_password}")),
            "{what} shows a secret"
        );
    }
}

/// Creates `config`'s schema with the owner role and applies every migration but the last,
/// as an older build's `migrate` would have; grants the runtime role. Returns the last version.
async fn migrate_all_but_the_last(config: &Config) -> i64 {
    let last = causal_commit::store::postgres::schema::MIGRATOR
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap();
    migrate_below(config, last).await;
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_with_the_runtime_role_refuses_a_schema_that_is_not_migrated() {
    let env = TestEnv::new("secure_unmigrated", 1).await;
    // A schema nobody created.
    let mut missing = env.config.clone();
    missing.postgres.schema = unique("secure_none").to_lowercase();
    // A schema one migration behind this build.
    let mut behind = env.config.clone();
    behind.postgres.schema = unique("secure_behind").to_lowercase();
    let last = migrate_all_but_the_last(&behind).await;

    for (cfg, named) in [
        (&missing, "does not exist".to_string()),
        (&behind, format!("migrations not applied: {last:04}")),
    ] {
        let started = Instant::now();
        let (ok, _, err) = tokio::task::spawn_blocking({
            let cfg = cfg.clone();
            move || cli(&cfg, &["run"])
        })
        .await
        .unwrap();
        assert!(!ok, "run refuses");
        assert!(started.elapsed() < Duration::from_secs(20));
        assert!(
            err.contains(&named)
                && err.contains(&cfg.postgres.schema)
                && err.contains("run `causal-commit migrate` with the owner role"),
            "{err}"
        );
    }
    // `migrate` with the owner role brings it up to date for the runtime role.
    let mut migrating = behind.clone();
    migrating.postgres.url = database_url().into();
    migrating.postgres.runtime_role = runtime_role();
    let out = tokio::task::spawn_blocking(move || run_cli(&migrating, &["migrate"]))
        .await
        .unwrap();
    assert!(out.contains(&runtime_role()), "{out}");
    let pool = causal_commit::store::postgres::pool(&behind.postgres).unwrap();
    causal_commit::store::postgres::check_schema(&pool, &behind.postgres.schema)
        .await
        .expect("up to date for the runtime role");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_role_reads_and_writes_rows_but_cannot_change_the_schema() {
    let env = TestEnv::new("secure_ddl", 1).await;
    let schema = &env.config.postgres.schema;
    let pool = causal_commit::store::postgres::pool(&env.config.postgres).unwrap();
    let (user,): (String,) = sqlx::query_as("SELECT current_user::text")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(user, runtime_role());
    // Rows: yes.
    sqlx::query("INSERT INTO cc_admin_audit (actor, action) VALUES ('test', 'probe')")
        .execute(&pool)
        .await
        .expect("the runtime role writes rows");
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .expect("the runtime role reads the migration history");
    assert!(n > 0);
    // The schema and the migration history: no.
    for statement in [
        format!("CREATE TABLE {schema}.intruder (x integer)"),
        format!("ALTER TABLE {schema}.cc_contact ADD COLUMN intruder integer"),
        format!("DROP TABLE {schema}.cc_admin_audit"),
        format!("CREATE SCHEMA {schema}_intruder"),
        "DELETE FROM _sqlx_migrations".to_string(),
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (99999, 'x', true, '\\x00', 0)"
            .to_string(),
    ] {
        let err = sqlx::query(&statement)
            .execute(&pool)
            .await
            .expect_err(&statement);
        let code = err
            .as_database_error()
            .and_then(|e| e.code())
            .map(|c| c.into_owned());
        // 42501: insufficient privilege (ownership of the table, for ALTER and DROP).
        assert_eq!(code.as_deref(), Some("42501"), "{statement}: {err}");
    }
}

/// A tired operator's `migrate` run twice at once (a second terminal, a retried pipeline, a
/// migrate Job's pod replaced while the first still runs), on a new schema and on one a
/// migration behind: every run succeeds, and the runtime role finds the schema up to date.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_run_several_times_at_once_succeeds_every_time() {
    let env = TestEnv::new("secure_migrate_race", 1).await;
    for round in 0..3 {
        let mut fresh = env.config.clone();
        fresh.postgres.schema = unique("secure_race_new").to_lowercase();
        let mut behind = env.config.clone();
        behind.postgres.schema = unique("secure_race_behind").to_lowercase();
        migrate_all_but_the_last(&behind).await;
        for cfg in [fresh, behind] {
            let mut migrating = cfg.clone();
            migrating.postgres.url = database_url().into();
            migrating.postgres.runtime_role = runtime_role();
            let start = std::sync::Arc::new(std::sync::Barrier::new(4));
            let runs: Vec<_> = (0..4)
                .map(|_| {
                    let (cfg, start) = (migrating.clone(), start.clone());
                    std::thread::spawn(move || {
                        let mut migrate = command(&cfg);
                        migrate.arg("migrate").env("RUST_LOG", "warn");
                        start.wait();
                        migrate.output().expect("run the causal-commit binary")
                    })
                })
                .collect();
            for run in runs {
                let out = run.join().unwrap();
                assert!(
                    out.status.success(),
                    "round {round}, schema {}: a concurrent migrate failed: {}",
                    cfg.postgres.schema,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let pool = causal_commit::store::postgres::pool(&cfg.postgres).unwrap();
            causal_commit::store::postgres::check_schema(&pool, &cfg.postgres.schema)
                .await
                .expect("the runtime role finds the schema up to date");
            pool.close().await;
        }
    }
}
