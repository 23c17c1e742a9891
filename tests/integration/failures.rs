//! Exactly-once under failure, against the real Kafka and PostgreSQL: the processor is killed
//! with SIGKILL mid-stream, a second instance joins and leaves, PostgreSQL stops for 20 s. After
//! each, `verify` must find no duplicate, gap, reorder or lost intent.
//!
//! These tests stop shared services, so they run one at a time (a process-wide lock).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::http;
use crate::common::process::{
    read_log, rolled_back_transitions, stack, wait_for_log, Frozen, Processor,
};
use crate::common::*;

use causal_commit::config::Config;
use causal_commit::demo::{self, ProduceOptions};
use causal_commit::proto::Intent;
use causal_commit::verify::Report;
use secrecy::ExposeSecret as _;

pub(crate) fn workload(count: usize, contacts: usize, rate: u32, prefix: &str) -> ProduceOptions {
    ProduceOptions {
        count,
        contacts,
        clinics: 20,
        producers: 4,
        rate,
        strict_fraction: 0.8,
        duplicate_fraction: 0.03,
        invalid: 5,
        seed: 7,
        prefix: prefix.to_string(),
    }
}

/// Produces the workload in the background (it arrives over time while failures happen).
pub(crate) fn produce_in_background(
    config: &Config,
    opts: ProduceOptions,
) -> tokio::task::JoinHandle<()> {
    let config = config.clone();
    tokio::spawn(async move {
        demo::produce(&config, &opts)
            .await
            .expect("workload produced");
    })
}

pub(crate) async fn verified(config: &Config) -> Report {
    let report = verify_report(config, "").await;
    println!("verify: {}", serde_json::to_string(&report).unwrap());
    report
}

pub(crate) fn assert_clean(report: &Report, expected_intents: usize) {
    assert_eq!(
        report.duplicates_emitted, 0,
        "duplicates: {:?}",
        report.violations
    );
    assert_eq!(report.gaps, 0, "gaps: {:?}", report.violations);
    assert_eq!(report.reorders, 0, "reorders: {:?}", report.violations);
    assert_eq!(report.lost, 0, "lost: {:?}", report.violations);
    assert!(report.ok);
    assert_eq!(
        report.intents, expected_intents,
        "every produced intent was consumed"
    );
    assert_eq!(
        report.committed, expected_intents,
        "every intent committed exactly once"
    );
    assert_eq!(report.waiting, 0);
}

/// Stops `proc` with SIGTERM (a clean exit within 30 s) and checks with `verify` that every one
/// of `intents` committed exactly once, in order; its report.
async fn stopped_clean(proc: Processor, cfg: &Config, intents: usize) -> Report {
    assert!(proc.terminate(Duration::from_secs(30)));
    let report = verified(cfg).await;
    assert_clean(&report, intents);
    report
}

pub(crate) fn log_path(env: &TestEnv, what: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("{}-{what}.log", env.name))
}

/// Seconds from a process start to its first committed transition (its recovery time).
fn first_transition_after(log: &std::path::Path, started: Instant, within: Duration) -> f64 {
    let deadline = started + within;
    while Instant::now() < deadline {
        if read_log(log).iter().any(|l| l["message"] == "transition") {
            return started.elapsed().as_secs_f64();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f64::NAN
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_recovery_kill_9_mid_stream_loses_and_duplicates_nothing() {
    let env = TestEnv::exclusive("crash", 6).await;
    let cfg = env.config.clone();
    // 50,000 intents over 5,000 contacts, arriving over ~40 s from 4 concurrent producers.
    let producing = produce_in_background(&cfg, workload(50_000, 5_000, 1_250, "k"));
    let mut proc = Processor::spawn(&cfg, log_path(&env, "run0"));
    let mut recoveries = Vec::new();
    for kill in 1..=6 {
        tokio::time::sleep(Duration::from_millis(4_000 + 1_300 * (kill % 3))).await;
        proc.kill9();
        let log = log_path(&env, &format!("run{kill}"));
        let started = Instant::now();
        proc = Processor::spawn(&cfg, log.clone());
        let secs = tokio::task::spawn_blocking(move || {
            first_transition_after(&log, started, Duration::from_secs(60))
        })
        .await
        .unwrap();
        recoveries.push(secs);
    }
    println!("recovery after kill -9 (start to first transition), seconds: {recoveries:?}");
    producing.await.unwrap();
    caught_up(&cfg, Duration::from_secs(300)).await;
    assert!(
        proc.terminate(Duration::from_secs(30)),
        "clean exit on SIGTERM"
    );
    let report = verified(&cfg).await;
    assert_clean(&report, 50_000);
    assert_eq!(report.invalid_records, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_second_instance_joins_and_leaves_mid_stream() {
    let env = TestEnv::exclusive("rebalance", 6).await;
    let cfg = env.config.clone();
    let producing = produce_in_background(&cfg, workload(20_000, 2_000, 1_000, "r"));
    let a = Processor::spawn(&cfg, log_path(&env, "a"));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut cfg_b = cfg.clone();
    cfg_b.instance_id = format!("{}-b", env.name);
    let b = Processor::spawn(&cfg_b, log_path(&env, "b"));
    tokio::time::sleep(Duration::from_secs(8)).await;
    let b_log = b.log.clone();
    assert!(b.terminate(Duration::from_secs(30)), "b leaves cleanly");
    let b_transitions = read_log(&b_log)
        .iter()
        .filter(|l| l["message"] == "transition")
        .count();
    assert!(b_transitions > 0, "the second instance took part");
    producing.await.unwrap();
    caught_up(&cfg, Duration::from_secs(180)).await;
    stopped_clean(a, &cfg, 20_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_20s_pauses_then_resumes_with_no_effect_without_record() {
    let env = TestEnv::exclusive("pgdown", 4).await;
    let cfg = env.config.clone();
    let producing = produce_in_background(&cfg, workload(15_000, 1_500, 500, "p"));
    let proc = Processor::spawn(&cfg, log_path(&env, "run"));
    tokio::time::sleep(Duration::from_secs(8)).await;
    stack("stop", "postgres");
    let down_at = Instant::now();
    let effects_before = wait_for(
        &Arc::new(cfg.clone()),
        &cfg.kafka.side_effects_topic,
        0,
        Duration::ZERO,
    )
    .await
    .len();
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(down_at.elapsed())).await;
    let effects_during = wait_for(
        &Arc::new(cfg.clone()),
        &cfg.kafka.side_effects_topic,
        0,
        Duration::ZERO,
    )
    .await
    .len();
    stack("start", "postgres");
    assert_eq!(
        effects_before, effects_during,
        "no effect is emitted while PostgreSQL is down"
    );
    producing.await.unwrap();
    caught_up(&cfg, Duration::from_secs(180)).await;
    let report = stopped_clean(proc, &cfg, 15_000).await;

    // Every effect has exactly one durable committed record.
    let pool = causal_commit::store::postgres::pool(&cfg.postgres).unwrap();
    let committed_rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM cc_transition WHERE to_state = 'committed_causal'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(committed_rows as usize, report.committed);
}

/// Log lines of the lock store's mode changes, as (to, message).
fn mode_changes(log: &std::path::Path) -> Vec<String> {
    read_log(log)
        .iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("lock store mode changed"))
        })
        .map(|l| l["to"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Waits until the log's lock-store mode changes are `expected`, failing after `within`.
async fn wait_for_modes(log: &std::path::Path, expected: &[&str], within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    while mode_changes(log) != expected {
        assert!(
            Instant::now() < deadline,
            "{what}: mode changes {:?}",
            mode_changes(log)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn effects_now(cfg: &Config) -> usize {
    wait_for(
        &Arc::new(cfg.clone()),
        &cfg.kafka.side_effects_topic,
        0,
        Duration::ZERO,
    )
    .await
    .len()
}

/// Starts a stopped service again when dropped (also when the test failed: later tests need it).
struct StartedAgain(&'static str);
impl Drop for StartedAgain {
    fn drop(&mut self) {
        stack("start", self.0);
    }
}

/// A DBA's session killer (or a pooler restarting) terminates every connection of the
/// processor, again and again, under traffic: writes, lookups, restores and command polls die
/// mid-call at any point. No effect without its record, none twice, none lost, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_terminated_again_and_again_under_traffic_lose_and_duplicate_nothing() {
    let env = TestEnv::exclusive("pgkill", 4).await;
    let cfg = env.config.clone();
    let producing = produce_in_background(&cfg, workload(10_000, 1_000, 800, "t"));
    let proc = Processor::spawn(&cfg, log_path(&env, "run"));
    // As the runtime role, whose backends it may terminate.
    let pool = sqlx::PgPool::connect(&runtime_database_url())
        .await
        .unwrap();
    let mut terminated = 0i64;
    let until = Instant::now() + Duration::from_secs(15);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(150)).await;
        terminated += terminate_processor_sessions(&pool).await;
    }
    println!("connections terminated: {terminated}");
    assert!(
        terminated >= 10,
        "the processor's connections were terminated: {terminated}"
    );
    producing.await.unwrap();
    caught_up(&cfg, Duration::from_secs(180)).await;
    let log = proc.log.clone();
    let report = stopped_clean(proc, &cfg, 10_000).await;
    assert_eq!(report.invalid_records, 5);
    let writes_cut = read_log(&log)
        .iter()
        .filter(|l| l["message"] == "durable write failed; nothing is emitted")
        .count();
    println!("durable writes cut: {writes_cut}");
    assert!(writes_cut >= 1, "durable writes were cut mid-call");
}

/// PostgreSQL crashing under traffic: one of the processor's backends killed with SIGKILL (an
/// OOM killer, a segfault) makes the postmaster end every session of the server, replay its
/// WAL and open again; connections opened meanwhile are refused (`57P03`, "in recovery
/// mode"), those open are cut (`57P02`). Six crashes, every second one of a backend in the
/// middle of a batch's durable write: no effect without its record, none twice, none lost, in
/// order, and the processor never exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crashing_under_traffic_loses_and_duplicates_nothing() {
    let env = TestEnv::exclusive("pgcrash", 4).await;
    let cfg = env.config.clone();
    let producing = produce_in_background(&cfg, workload(10_000, 1_000, 500, "c"));
    let mut proc = Processor::spawn(&cfg, log_path(&env, "run"));
    let mut writes_killed = 0;
    let mut flowing_after = chrono::Utc::now();
    for crash in 1..=6 {
        // Each crash once a batch committed after the last one's recovery (its transitions
        // logged a second after it: a batch committed before the crash logs within ms).
        wait_for_log(&proc.log, Duration::from_secs(60), "a commit", |lines| {
            lines
                .iter()
                .any(|l| {
                    l["message"] == "transition"
                        && l["state"] == "committed_causal"
                        && l["timestamp"]
                            .as_str()
                            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                            .is_some_and(|t| t > flowing_after)
                })
                .then_some(())
        })
        .await;
        let hold = (crash % 2 == 0).then_some(cfg.postgres.schema.as_str());
        let c = crash_postgres(hold)
            .await
            .expect("a session of the processor");
        println!(
            "crash {crash}: killed {}, reconnecting met {:?}",
            if c.killed_write {
                "a durable write"
            } else {
                "a session"
            },
            c.refusals
        );
        writes_killed += usize::from(c.killed_write);
        flowing_after = chrono::Utc::now() + chrono::Duration::seconds(1);
        assert!(
            proc.child.try_wait().unwrap().is_none(),
            "the processor exited after PostgreSQL's crash {crash}"
        );
    }
    producing.await.unwrap();
    caught_up(&cfg, Duration::from_secs(180)).await;
    let log = proc.log.clone();
    stopped_clean(proc, &cfg, 10_000).await;
    let writes_cut = read_log(&log)
        .iter()
        .filter(|l| l["message"] == "durable write failed; nothing is emitted")
        .count();
    println!("durable writes killed: {writes_killed}, failed in the log: {writes_cut}");
    // The three held there could not have finished; one killed at random may just have.
    assert!(
        writes_cut >= 3,
        "each durable write a crash cut failed, and emitted nothing"
    );
}

/// What [`crash_postgres`] did.
pub(crate) struct Crash {
    /// The backend killed was running a batch's durable write (`cc_apply_batch`).
    pub killed_write: bool,
    /// The SQLSTATEs (or errors) that new connections met until the server opened again.
    pub refusals: Vec<String>,
}

/// Kills one of the processor's PostgreSQL backends with SIGKILL, checks that the server went
/// through crash recovery (a session of its own, open before, is ended too: only the
/// postmaster's reset does that), and waits until it opens sessions again. With `hold_write`
/// (the processor's schema), the backend killed is one in the middle of a batch's durable
/// write, held there by a lock on the schema's `cc_partition` (a write takes a few ms, so a
/// crash at a random instant rarely falls in one); without it, a session running a write at
/// that instant if there is one, else the oldest. `None` when no processor had a session.
pub(crate) async fn crash_postgres(hold_write: Option<&str>) -> Option<Crash> {
    use sqlx::Connection as _;
    let mut witness = sqlx::PgConnection::connect(&database_url()).await.unwrap();
    // As the processor's role: only it (or a superuser) sees what its sessions run.
    let mut observer = sqlx::PgConnection::connect(&runtime_database_url())
        .await
        .unwrap();
    if let Some(schema) = hold_write {
        sqlx::query("BEGIN").execute(&mut witness).await.unwrap();
        sqlx::query(&format!(
            "LOCK TABLE \"{schema}\".cc_partition IN EXCLUSIVE MODE"
        ))
        .execute(&mut witness)
        .await
        .unwrap();
    }
    let look_until = Instant::now() + Duration::from_secs(10);
    let (pid, killed_write) = loop {
        // Its own transaction: one that holds the lock would see one snapshot of the activity.
        let found: Option<(i32, bool)> = sqlx::query_as(
            "SELECT pid, state = 'active' AND query LIKE '%cc_apply_batch(%'
               FROM pg_stat_activity WHERE application_name = 'causal-commit'
              ORDER BY 2 DESC, backend_start LIMIT 1",
        )
        .fetch_optional(&mut observer)
        .await
        .unwrap();
        match found {
            Some((pid, true)) => break (pid, true),
            Some((pid, false)) if hold_write.is_none() => break (pid, false),
            _ if Instant::now() < look_until => tokio::time::sleep(Duration::from_millis(20)).await,
            None if hold_write.is_none() => return None,
            _ => {
                let seen: Vec<(String, String)> = sqlx::query_as(
                    "SELECT coalesce(state, ''), left(query, 300)
                       FROM pg_stat_activity WHERE application_name = 'causal-commit'",
                )
                .fetch_all(&mut observer)
                .await
                .unwrap();
                panic!("no durable write held by the lock within 10 s: {seen:?}")
            }
        }
    };
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success(), "kill -KILL {pid}");
    let reset_by = Instant::now() + Duration::from_secs(10);
    while sqlx::query("SELECT 1").execute(&mut witness).await.is_ok() {
        assert!(
            Instant::now() < reset_by,
            "a session open before the backend was killed is ended by the crash's reset"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut refusals = Vec::new();
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < until, "PostgreSQL back within 60 s");
        match sqlx::PgConnection::connect(&database_url()).await {
            Ok(mut conn) => {
                if sqlx::query("SELECT 1").execute(&mut conn).await.is_ok() {
                    break;
                }
            }
            Err(sqlx::Error::Database(e)) => {
                refusals.push(e.code().map_or_else(|| e.to_string(), |c| c.into_owned()))
            }
            Err(e) => refusals.push(e.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Some(Crash {
        killed_write,
        refusals,
    })
}

/// An operator's deploy that creates the topics while the processor starts, or a broker that
/// learns of a topic a moment after its creation returned (the project's CI met that: a test's
/// processor stopped on a topic created just before it): a missing topic is asked for again
/// for a few seconds before the start stops on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intents_topic_created_just_after_the_processor_starts_is_waited_for() {
    let env = TestEnv::new("latetopic", 2).await;
    let mut cfg = env.config.clone();
    cfg.kafka.intents_topic.push_str("-late");
    let log = log_path(&env, "run");
    let mut proc = Processor::spawn(&cfg, log.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        proc.child.try_wait().unwrap().is_none(),
        "stopped before the topic was created:\n{}",
        read_log(&log)
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    create_topics(&cfg, &[(&cfg.kafka.intents_topic, 2)]).await;
    demo::produce(&cfg, &workload(500, 50, 0, "l"))
        .await
        .unwrap();
    caught_up(&cfg, Duration::from_secs(120)).await;
    stopped_clean(proc, &cfg, 500).await;
}

/// CONTRACT §5, PostgreSQL down: processing resumes by itself when PostgreSQL is back, also for
/// a processor (re)started during the outage: it waits, alive and not ready, instead of exiting
/// into its orchestrator's restart back-off; a stop while it waits is a clean exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_started_while_postgres_is_down_waits_and_processes_when_it_is_back() {
    let env = TestEnv::exclusive("pgstart", 2).await;
    let mut cfg = env.config.clone();
    let probes = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    cfg.telemetry.metrics_listen = probes.to_string();
    let back = StartedAgain("postgres");
    stack("stop", "postgres");
    let log = log_path(&env, "run");
    let mut proc = Processor::spawn(&cfg, log.clone());
    let mut cfg_b = env.config.clone();
    cfg_b.instance_id = format!("{}-b", env.name);
    let stopped_early = Processor::spawn(&cfg_b, log_path(&env, "b"));
    produce_in_background(&cfg, workload(2_000, 200, 1_000, "s"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(12)).await;

    assert!(
        proc.child.try_wait().unwrap().is_none(),
        "still running while PostgreSQL is down: {:?}",
        read_log(&log)
    );
    let waits = read_log(&log)
        .iter()
        .filter(|l| {
            l["message"] == "PostgreSQL does not answer at start-up; waiting for it (not ready)"
        })
        .count();
    assert!(waits >= 2, "the wait is logged at each attempt: {waits}");
    // sqlx's pool says only "pool timed out"; the log says why.
    assert!(
        no_session_causes(&log).iter().any(|(cause, sqlstate)| {
            cause.starts_with("no PostgreSQL session could be opened at postgres.url")
                && cause.contains("a stopped server")
                && sqlstate.is_empty()
        }),
        "the cause named: {:?}",
        no_session_causes(&log)
    );
    assert_eq!(
        http::http_get(probes, "/livez").await.map(|r| r.0),
        Some(200)
    );
    assert_eq!(
        http::http_get(probes, "/readyz").await.map(|r| r.0),
        Some(503)
    );
    let stop = stopped_early.stop(Duration::from_secs(10));
    assert!(
        stop.is_some_and(|s| s.success()),
        "SIGTERM while waiting: a clean exit within seconds ({stop:?})"
    );

    drop(back);
    caught_up(&cfg, Duration::from_secs(120)).await;
    assert_eq!(
        http::http_get(probes, "/readyz").await.map(|r| r.0),
        Some(200)
    );
    stopped_clean(proc, &cfg, 2_000).await;
}

/// The `(cause, sqlstate)` of each line saying why a call got no PostgreSQL session.
pub(crate) fn no_session_causes(log: &std::path::Path) -> Vec<(String, String)> {
    read_log(log)
        .iter()
        .filter(|l| l["message"] == causal_commit::store::postgres::sessions::GOT_NO_SESSION)
        .map(|l| {
            let field = |f: &str| l[f].as_str().unwrap_or_default().to_string();
            (field("cause"), field("sqlstate"))
        })
        .collect()
}

/// The tests' database refusing every new session but a superuser's (`CONNECTION LIMIT 0`,
/// set over a session of the database's owner opened before), and accepting them again when
/// lifted or dropped (also when the test failed: later tests need sessions).
struct ConnectionsLimited {
    owner: sqlx::PgConnection,
    limited: bool,
}
impl ConnectionsLimited {
    async fn new() -> Self {
        use sqlx::Connection as _;
        let owner = sqlx::PgConnection::connect(&database_url())
            .await
            .expect("owner session");
        ConnectionsLimited {
            owner,
            limited: false,
        }
    }
    async fn set(&mut self, limit: i32) {
        sqlx::query(&format!(
            "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I CONNECTION LIMIT {limit}', \
             current_database()); END $$"
        ))
        .execute(&mut self.owner)
        .await
        .expect("ALTER DATABASE ... CONNECTION LIMIT");
        self.limited = limit >= 0;
    }
    async fn limit(&mut self) {
        self.set(0).await;
    }
    async fn lift(&mut self) {
        self.set(-1).await;
    }
}
impl Drop for ConnectionsLimited {
    fn drop(&mut self) {
        if self.limited {
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(self.lift());
            });
        }
    }
}

/// Waits for a line saying why a call got no session with SQLSTATE `code`, past the first
/// `seen` such lines; its cause.
async fn refusal_named(log: &std::path::Path, code: &str, seen: usize, what: &str) -> String {
    wait_for_log(log, Duration::from_secs(40), what, |_| {
        no_session_causes(log)
            .into_iter()
            .filter(|(_, sqlstate)| sqlstate == code)
            .nth(seen)
            .map(|(cause, _)| cause)
    })
    .await
}

/// Under a running processor whose new sessions PostgreSQL refuses with SQLSTATE `code`: its
/// sessions are terminated (over `runtime`, opened before) and 300 intents produced; waits
/// for the log to name the refusal and checks that nothing was emitted meanwhile. The cause.
async fn refused_while_running(
    cfg: &Config,
    log: &std::path::Path,
    runtime: &sqlx::PgPool,
    code: &str,
    prefix: &str,
) -> String {
    let effects = effects_now(cfg).await;
    let seen = no_session_causes(log)
        .iter()
        .filter(|(_, sqlstate)| sqlstate == code)
        .count();
    let terminated = terminate_processor_sessions(runtime).await;
    assert!(terminated >= 1, "the processor's sessions terminated");
    produce_in_background(cfg, workload(300, 30, 1_000, prefix))
        .await
        .unwrap();
    let what = format!("{code} named under the running processor");
    let cause = refusal_named(log, code, seen, &what).await;
    assert_eq!(
        effects_now(cfg).await,
        effects,
        "nothing emitted without its record"
    );
    cause
}

/// Asks the PostgreSQL server `pool` is connected to for a smart shutdown, as `pg_ctl stop -m
/// smart` does (SIGTERM to the postmaster, the parent of `pool`'s backend): it refuses every
/// new session with 57P03 and stops once the sessions open have ended.
async fn smart_shutdown(pool: &sqlx::PgPool) {
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(pool)
        .await
        .unwrap();
    let status = std::fs::read_to_string(format!("/proc/{backend}/status")).unwrap();
    let postmaster = status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .expect("the backend's parent")
        .trim()
        .to_owned();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &postmaster])
        .status()
        .unwrap();
    assert!(sent.success(), "kill -TERM {postmaster}");
}

/// Stops PostgreSQL (fast: this ends a smart shutdown still waiting for sessions) and starts
/// it again when dropped, also when the test failed: later tests need it.
struct RestartedAfterShutdown;
impl Drop for RestartedAfterShutdown {
    fn drop(&mut self) {
        stack("stop", "postgres");
        stack("start", "postgres");
    }
}

/// PostgreSQL refusing new sessions for too many connections (SQLSTATE 53300: a server at its
/// `max_connections`, or, here, a database whose `CONNECTION LIMIT` a DBA set to 0). sqlx's
/// pool retries such a refusal until its acquire timeout and then says only "pool timed out
/// while waiting for an open connection", as for a stopped server or a pool too small. The
/// log names the refusal, its SQLSTATE and what to change, at a start and under a running
/// processor whose sessions were terminated; an operator's command says so too; nothing is
/// emitted meanwhile; once sessions open again every intent commits once, in order. The same
/// for a server in a smart shutdown (57P03), restarted after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_refusing_new_sessions_is_named_in_the_log_and_waited_out() {
    use causal_commit::store::postgres::{connect_options, sessions};
    let env = TestEnv::exclusive("nosessions", 2).await;
    let mut cfg = env.config.clone();
    cfg.postgres.connect_timeout = Duration::from_secs(1);
    // As the runtime role, whose backends it may terminate; opened before the limit.
    let runtime = sqlx::postgres::PgPoolOptions::new()
        .min_connections(1)
        .max_connections(1)
        .connect(&runtime_database_url())
        .await
        .unwrap();
    let mut database = ConnectionsLimited::new().await;
    database.limit().await;
    // What the processor's own probe meets.
    let options = connect_options(&cfg.postgres).unwrap();
    let probed = sessions::probe(&options, Duration::from_secs(5)).await;
    assert!(
        matches!(&probed, sessions::Probe::Refused { sqlstate: Some(code), message }
            if code == "53300" && message.contains("too many connections")),
        "{probed:?}"
    );

    // 1. A start.
    let log = log_path(&env, "run");
    let proc = Processor::spawn(&cfg, log.clone());
    produce_in_background(&cfg, workload(500, 50, 1_000, "n"))
        .await
        .unwrap();
    let cause = refusal_named(&log, "53300", 0, "the refusal named at the start").await;
    assert!(
        cause.starts_with("PostgreSQL refuses new sessions, too many connections")
            && cause.contains("CONNECTION LIMIT"),
        "{cause}"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let explained = no_session_causes(&log).len();
    assert!(
        (1..=2).contains(&explained),
        "at most one explanation every {:?} ({explained} in about 6 s)",
        sessions::EXPLAIN_EVERY
    );
    assert_eq!(
        effects_now(&cfg).await,
        0,
        "nothing emitted without its record"
    );
    // An operator's command meets the same refusal, and says so.
    let (ok, _, err) = crate::common::process::cli(&cfg, &["recovery-point", "show"]);
    assert!(
        !ok && err.contains("pool timed out") && err.contains("too many connections for database"),
        "{err}"
    );
    database.lift().await;
    // Sessions open again (the probe of the library says so too), and everything commits.
    assert_eq!(
        sessions::probe(&options, Duration::from_secs(5)).await,
        sessions::Probe::Opened
    );
    caught_up(&cfg, Duration::from_secs(120)).await;

    // 2. Under the running processor: its sessions terminated while none may open.
    database.limit().await;
    let cause = refused_while_running(&cfg, &log, &runtime, "53300", "m").await;
    assert!(cause.contains("too many connections"), "{cause}");
    database.lift().await;
    caught_up(&cfg, Duration::from_secs(120)).await;

    // 3. A DBA's smart shutdown under the running processor (maintenance that lets the sessions
    // open finish): PostgreSQL refuses new sessions with 57P03; the processor's sessions are
    // terminated meanwhile, so its calls get none. Then PostgreSQL is stopped and started.
    let restarted = RestartedAfterShutdown;
    smart_shutdown(&runtime).await;
    let cause = refused_while_running(&cfg, &log, &runtime, "57P03", "k").await;
    assert!(
        cause.starts_with("PostgreSQL is starting up or shutting down")
            && cause.contains("the database system is shutting down"),
        "{cause}"
    );
    drop(restarted);
    caught_up(&cfg, Duration::from_secs(120)).await;
    stopped_clean(proc, &cfg, 1_100).await;
}

/// A pool whose sessions are all busy: a DBA's lock on `cc_partition` (maintenance, an
/// `ALTER TABLE` waiting) holds the statements of two admin requests, the whole pool of an
/// instance with `postgres.max_connections` 2, and a third request gets no session. sqlx says
/// `pool timed out` as when PostgreSQL refuses; the log says PostgreSQL opens sessions and the
/// pool's 2 were all busy. Once the lock is gone every request has answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_whose_sessions_are_all_busy_is_named_as_such() {
    let env = TestEnv::new("busypool", 1).await;
    let mut cfg = env.config.clone();
    cfg.postgres.max_connections = 2;
    cfg.postgres.parallel_writes = 1;
    cfg.postgres.connect_timeout = Duration::from_secs(1);
    crate::admin::with_admin(&mut cfg);
    let log = log_path(&env, "run");
    let _proc = Processor::spawn(&cfg, log.clone());
    let api = crate::admin::api(&cfg);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !api.get("/v1/ready").await.is_ok_and(|r| r.status == 200) {
        assert!(
            Instant::now() < deadline,
            "never ready: {:?}",
            read_log(&log)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let owner = sqlx::PgPool::connect(&database_url()).await.unwrap();
    let lock = locked_exclusively(&owner, &cfg, "cc_partition").await;
    let asks: Vec<_> = (0..3)
        .map(|_| {
            let api = crate::admin::api(&cfg);
            tokio::spawn(async move { api.get("/v1/backlog").await.map(|r| r.status) })
        })
        .collect();
    let (cause, sqlstate) =
        wait_for_log(&log, Duration::from_secs(20), "busy sessions named", |_| {
            no_session_causes(&log).into_iter().next()
        })
        .await;
    lock.rollback().await.unwrap();
    assert!(
        cause.starts_with(
            "PostgreSQL opens sessions now: the pool's 2 (postgres.max_connections) were all busy"
        ),
        "{cause}"
    );
    assert_eq!(sqlstate, "");
    let mut statuses = Vec::new();
    for ask in asks {
        statuses.push(ask.await.unwrap().expect("answered"));
    }
    assert!(
        statuses.contains(&200),
        "the requests held by the lock answer: {statuses:?}"
    );
    assert_eq!(
        api.get("/v1/backlog").await.map(|r| r.status).ok(),
        Some(200)
    );
}

/// PostgreSQL stopped just after the start-up check passed, before the engine starts (the
/// window of the Kafka check): the process stays up and processes once it is back. Found by
/// the chaos test: the store id (its Redis keys' part) was read after the check, outside its
/// wait, and the process exited ("PostgreSQL call failed while reading the store id"). A fail
/// point holds the start in that window for 10 s.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_right_after_the_start_up_check_is_waited_for() {
    let env = TestEnv::exclusive("pgwindow", 2).await;
    let cfg = env.config.clone();
    let log = log_path(&env, "run");
    let mut proc = Processor::spawn_with_env(
        &cfg,
        log.clone(),
        &[("FAILPOINTS", "start-checked=sleep(10000)")],
    );
    // The check takes well under a second: 4 s in, the start is held at the fail point.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let back = StartedAgain("postgres");
    stack("stop", "postgres");
    produce_in_background(&cfg, workload(1_000, 100, 1_000, "w"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(
        proc.child.try_wait().unwrap().is_none(),
        "still running with PostgreSQL stopped after the check: {:?}",
        read_log(&log)
    );
    let waited = |step: &str| {
        read_log(&log).iter().any(|l| {
            l["message"] == "PostgreSQL does not answer at start-up; waiting for it (not ready)"
                && l["step"] == step
        })
    };
    assert!(
        !waited("schema"),
        "PostgreSQL was stopped after the check passed, not before"
    );
    // The next start-up step that asks PostgreSQL (the side-effects topic's recorded
    // partition count) waits for it too.
    assert!(waited("side-effects partitions"), "{:?}", read_log(&log));
    drop(back);
    caught_up(&cfg, Duration::from_secs(120)).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    assert_clean(&verified(&cfg).await, 1_000);
}

/// The flaky network meets a new deployment: its first start with the brokers down. No
/// side-effects partition count is recorded yet and the brokers cannot say it, so no effect
/// can be placed: the processor stays up (alive, not ready), consumes nothing, records nothing
/// and says once that it waits for the brokers (before, it said each round that it was
/// "starting anyway", which it was not); when they are back it records the topic's count, says
/// so, and processes everything once. And the tired operator stopping it meanwhile: a SIGTERM
/// during the wait is a clean exit within a second or two, also in the middle of a round of
/// the check (before, the round ran out first: up to its 8-s timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_start_with_the_brokers_down_waits_for_them_before_it_consumes() {
    use causal_commit::store::postgres::effect_partitions;
    let env = TestEnv::exclusive("firstdown", 3).await;
    let mut cfg = env.config.clone();
    demo::produce(&cfg, &workload(600, 60, 0, "f"))
        .await
        .unwrap();
    let pool = env.store().await;
    let topic = &cfg.kafka.side_effects_topic;
    let back = StartedAgain("kafka");
    stack("stop", "kafka");
    let probes = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    cfg.telemetry.metrics_listen = probes.to_string();
    let log = log_path(&env, "run");
    let mut proc = Processor::spawn(&cfg, log.clone());
    let mut cfg_b = env.config.clone();
    cfg_b.instance_id = format!("{}-b", env.name);
    let log_b = log_path(&env, "b");
    let stopped_early = Processor::spawn(&cfg_b, log_b.clone());
    let waiting = "partition count is not recorded yet (a first start) and the brokers have not \
                   said it: waiting for them before anything is consumed";
    wait_for_log(
        &log_b,
        Duration::from_secs(30),
        "the wait is said",
        |lines| {
            lines
                .iter()
                .any(|l| l["message"].as_str().is_some_and(|m| m.contains(waiting)))
                .then_some(())
        },
    )
    .await;
    // Into the next round of the check (it starts 1 s after the wait is said, and gives up
    // after the tests' operation timeout, 8 s).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let asked = Instant::now();
    let stop = stopped_early.stop(Duration::from_secs(15));
    let took = asked.elapsed();
    println!("SIGTERM during the first-start wait: exited in {took:?} ({stop:?})");
    assert!(
        stop.is_some_and(|s| s.success()),
        "SIGTERM while waiting: a clean exit ({stop:?}): {:?}",
        read_log(&log_b)
    );
    assert!(
        took < Duration::from_secs(4),
        "SIGTERM in the middle of a round of the check is served within seconds, not when the \
         round gives up: {took:?}"
    );
    assert!(
        read_log(&log_b).iter().any(|l| l["message"]
            == "stopped while waiting for the store or the brokers; nothing was consumed"),
        "{:?}",
        read_log(&log_b)
    );
    // Three rounds of the check in all.
    tokio::time::sleep(Duration::from_secs(22)).await;
    assert_eq!(
        http::http_get(probes, "/livez").await.map(|r| r.0),
        Some(200)
    );
    assert_eq!(
        http::http_get(probes, "/readyz").await.map(|r| r.0),
        Some(503),
        "not ready while it waits"
    );
    let lines = read_log(&log);
    assert!(
        proc.child.try_wait().unwrap().is_none(),
        "still running with the brokers down at its first start: {lines:?}"
    );
    let said = |lines: &[serde_json::Value], text: &str| {
        lines
            .iter()
            .filter(|l| l["message"].as_str().is_some_and(|m| m.contains(text)))
            .count()
    };
    assert_eq!(said(&lines, waiting), 1, "the wait is said once: {lines:?}");
    assert_eq!(
        said(&lines, "starting anyway"),
        0,
        "it does not start: {lines:?}"
    );
    assert!(
        !lines.iter().any(|l| l["message"] == "transition"),
        "nothing consumed"
    );
    assert_eq!(
        effect_partitions(&pool, topic, None).await.unwrap(),
        None,
        "nothing recorded while the brokers are down"
    );
    drop(back);
    let answered = wait_for_log(
        &log,
        Duration::from_secs(60),
        "the brokers' answer is said",
        |lines| {
            lines
                .iter()
                .find(|l| {
                    l["message"]
                        == "the brokers answered: the side-effects topic's partition count is \
                            recorded"
                })
                .cloned()
        },
    )
    .await;
    assert_eq!(answered["partitions"], 3, "{answered}");
    assert_eq!(
        effect_partitions(&pool, topic, None).await.unwrap(),
        Some(3)
    );
    caught_up(&cfg, Duration::from_secs(120)).await;
    assert_eq!(
        http::http_get(probes, "/readyz").await.map(|r| r.0),
        Some(200)
    );
    stopped_clean(proc, &cfg, 600).await;
}

/// A tired operator starts a second process with the instance_id of a running one (a shared
/// config file): their consumers fence each other's static membership and their producers
/// each other's transactions. A consumer fenced once is replaced in place (what a broker
/// restart calls for); fenced again soon after, its process stops naming the cause. One of the
/// two must stop so, within a minute; the other goes on; nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_with_the_same_instance_id_stops_one_of_them_naming_it() {
    let env = TestEnv::exclusive("sameid", 4).await;
    let cfg = env.config.clone();
    let producing = produce_in_background(&cfg, workload(6_000, 600, 300, "i"));
    let first = Processor::spawn(&cfg, log_path(&env, "first"));
    tokio::time::sleep(Duration::from_secs(6)).await;
    let second = Processor::spawn(&cfg, log_path(&env, "second"));
    let mut both = [Some(first), Some(second)];
    let deadline = Instant::now() + Duration::from_secs(60);
    let stopped = loop {
        let exited: Vec<usize> = (0..2)
            .filter(|&i| {
                both[i]
                    .as_mut()
                    .is_some_and(|p| matches!(p.child.try_wait(), Ok(Some(_))))
            })
            .collect();
        if let [i] = exited[..] {
            break i;
        }
        assert!(exited.is_empty(), "both processes stopped");
        assert!(
            Instant::now() < deadline,
            "neither process stopped within 60 s of the second one's start"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut gone = both[stopped].take().expect("the stopped one");
    let status = gone.child.wait().unwrap();
    assert!(!status.success(), "it stops with an error: {status}");
    let failed: Vec<String> = read_log(&gone.log)
        .iter()
        .filter(|l| l["message"] == "causal-commit failed")
        .map(|l| l["error"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(failed.len(), 1, "{}", gone.log.display());
    assert!(
        failed[0].contains("another process is probably running with instance_id")
            && failed[0].contains(&cfg.instance_id()),
        "{}",
        failed[0]
    );
    println!("stopped: {}", failed[0]);

    let survivor = both[1 - stopped].take().expect("the other one");
    producing.await.unwrap();
    caught_up(&cfg, Duration::from_secs(120)).await;
    let clean = tokio::task::spawn_blocking(move || survivor.terminate(Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(clean, "the other process runs on and exits cleanly");
    assert_clean(&verified(&cfg).await, 6_000);
}

/// Neither instance exited by itself, and each stops cleanly on SIGTERM.
async fn still_running_then_stopped(mut instances: [Processor; 2]) {
    for p in &mut instances {
        assert!(
            matches!(p.child.try_wait(), Ok(None)),
            "{} exited: {:?}",
            p.log.display(),
            p.child.try_wait()
        );
    }
    for p in instances {
        let log = p.log.clone();
        let clean = tokio::task::spawn_blocking(move || p.terminate(Duration::from_secs(60)))
            .await
            .unwrap();
        assert!(clean, "{} exits cleanly", log.display());
    }
}

/// A stop must end the process, whatever the group does meanwhile. librdkafka can hang for
/// good in the rebalance callback's `assign()` when the group's assignment is handed over
/// while its consumer closes (librdkafka issue 4884), and the consumer closes when the engine
/// is dropped. Seen in CI: a processor stopping 40 ms after it subscribed (its producer
/// refused: a fatal error at start) had the assignment arrive in its close, and never exited.
/// First case: the fail point holds the engine 6 s where it stops, and the test sees the
/// coordinator hand this member its partition meanwhile (the group stable, the member's
/// assignment not empty) with none served before the stop: the assignment waits for the close.
/// The process ends with its error. The hang is a race inside librdkafka this set-up does not
/// force (the case passes without the cure too); what ends the process when it happens is the
/// bound on the close, the second case: a close that never ends (a fail point) is abandoned
/// after 5 s, and SIGTERM still ends the process cleanly, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_with_the_groups_assignment_waiting_to_be_served_still_ends_the_process() {
    let env = TestEnv::new("stop_while_assigned", 1).await;
    let held = [("FAILPOINTS", "engine-stopping=sleep(6000)")];

    // No transactional producer can start: the brokers refuse its timeout.
    let mut cfg = env.config.clone();
    cfg.kafka.transaction_timeout = Duration::from_secs(20 * 60);
    let log = std::env::temp_dir().join(format!("{}-fatal.log", env.name));
    let mut proc = Processor::spawn_with_env(&cfg, log.clone(), &held);
    let message = |l: &serde_json::Value| l["message"].as_str().unwrap_or_default().to_owned();
    let before_stop = wait_for_log(&log, Duration::from_secs(30), "engine stopping", |lines| {
        let at = lines
            .iter()
            .position(|l| message(l).starts_with("engine stopping"))?;
        Some(lines[..at].to_vec())
    })
    .await;
    assert!(
        before_stop
            .iter()
            .all(|l| message(l) != "partitions assigned"),
        "{}: assigned before the stop; not the case named",
        log.display()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !group_member_assigned(&cfg) {
        assert!(
            Instant::now() < deadline,
            "{}: the coordinator assigned nothing while the engine stopped",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = tokio::task::spawn_blocking(move || proc.exit_within(Duration::from_secs(40)))
        .await
        .unwrap();
    assert!(
        status.is_some_and(|s| !s.success()),
        "{}: the refused producer ends the process: {status:?}",
        log.display()
    );
    let failed: Vec<_> = (read_log(&log).into_iter())
        .filter(|l| l["message"] == "causal-commit failed")
        .collect();
    assert_eq!(failed.len(), 1, "{}", log.display());
    assert!(
        failed[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("transaction.max.timeout.ms")),
        "{}",
        failed[0]
    );

    // A close that never ends, on SIGTERM once the partition is restored.
    let log = std::env::temp_dir().join(format!("{}-close.log", env.name));
    let hung = [("FAILPOINTS", "engine-close=sleep(600000)")];
    let proc = Processor::spawn_with_env(&env.config, log.clone(), &hung);
    wait_for_log(
        &log,
        Duration::from_secs(60),
        "partition restored",
        |lines| {
            (lines.iter())
                .find(|l| l["message"] == "partition restored")
                .map(|_| ())
        },
    )
    .await;
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || proc.stop(Duration::from_secs(40)))
        .await
        .unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "{}: SIGTERM ends the process cleanly: {status:?}",
        log.display()
    );
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "{}: the close was waited for 5 s",
        log.display()
    );
    let abandoned = (read_log(&log).into_iter())
        .filter(|l| {
            (l["message"].as_str()).is_some_and(|m| m.starts_with("closing the Kafka clients"))
        })
        .count();
    assert_eq!(
        abandoned,
        1,
        "{}: the abandoned close is logged",
        log.display()
    );
}

/// CONTRACT §3: a broker restart at any instant produces no duplicate, gap or loss, and
/// processing resumes by itself. The only broker stops twice while two instances consume and
/// four producers send, and once more while `wait-caught-up` reads the group's progress;
/// neither instance may exit (a consumer fenced by the restart is replaced in place), the wait
/// must not end on the outage, and everything is committed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restarts_mid_stream_lose_and_duplicate_nothing() {
    let env = TestEnv::exclusive("brokerdown", 4).await;
    let cfg = env.config.clone();
    let mut cfg_b = cfg.clone();
    cfg_b.instance_id = format!("{}-b", env.name);
    let producing = produce_in_background(&cfg, workload(12_000, 1_200, 400, "k"));
    let instances = [
        Processor::spawn(&cfg, log_path(&env, "a")),
        Processor::spawn(&cfg_b, log_path(&env, "b")),
    ];
    for (after, down) in [(8, 3), (8, 1)] {
        tokio::time::sleep(Duration::from_secs(after)).await;
        let back = StartedAgain("kafka");
        stack("stop", "kafka");
        tokio::time::sleep(Duration::from_secs(down)).await;
        drop(back);
    }
    producing.await.unwrap();
    // A third restart while `wait-caught-up` reads the group's progress: it asks again.
    let back = StartedAgain("kafka");
    stack("stop", "kafka");
    let waiting = tokio::spawn({
        let cfg = cfg.clone();
        async move { caught_up(&cfg, Duration::from_secs(180)).await }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(back);
    waiting.await.unwrap();
    let replaced: usize = instances
        .iter()
        .map(|p| {
            read_log(&p.log)
                .iter()
                .filter(|l| {
                    l["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("the engine starts again"))
                })
                .count()
        })
        .sum();
    println!("consumers replaced in place: {replaced}");
    still_running_then_stopped(instances).await;
    assert_clean(&verified(&cfg).await, 12_000);
}

/// CONTRACT §3: the only broker stops answering without closing anything (a paused VM, a
/// JVM in a long pause, a network dropping packets; here SIGSTOP, controller included) for
/// longer than the transaction timeout (10 s here), the operation timeout (8 s) and the
/// consumers' session timeout (45 s), while two instances consume and four producers send.
/// Neither instance exits, nothing is emitted twice or lost, and processing resumes by itself
/// once the broker answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_stops_answering_loses_and_duplicates_nothing() {
    let env = TestEnv::exclusive("brokerfrozen", 4).await;
    let cfg = env.config.clone();
    let mut cfg_b = cfg.clone();
    cfg_b.instance_id = format!("{}-b", env.name);
    let producing = produce_in_background(&cfg, workload(8_000, 800, 400, "k"));
    let instances = [
        Processor::spawn(&cfg, log_path(&env, "a")),
        Processor::spawn(&cfg_b, log_path(&env, "b")),
    ];
    tokio::time::sleep(Duration::from_secs(8)).await;
    let frozen = Frozen::service("kafka");
    tokio::time::sleep(Duration::from_secs(50)).await;
    drop(frozen);
    producing.await.unwrap();
    // A consumer that fetches nothing after the broker came back is replaced within
    // kafka.fetch_stall_timeout (60 s; see stalls.rs): seen once in about twenty runs.
    caught_up(&cfg, Duration::from_secs(180)).await;
    let logs = instances.each_ref().map(|i| read_log(&i.log));
    still_running_then_stopped(instances).await;
    let replaced: Vec<usize> = logs
        .iter()
        .map(|l| {
            l.iter()
                .filter(|l| {
                    l["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("fetched nothing"))
                })
                .count()
        })
        .collect();
    println!("consumers replaced for fetching nothing: {replaced:?}");
    assert_clean(&verified(&cfg).await, 8_000);
}

/// CONTRACT §3 and §6: the processor's own stall. librdkafka's `send_offsets_to_transaction`
/// can wait for good, past its timeout (librdkafka issues 5456 and 5511); the CI saw an
/// instance sit in it after a broker restart, deciding nothing and deaf to SIGTERM. Here a fail
/// point holds the fourth such call forever: the engine gives that producer up after the
/// operation timeout plus the grace, re-creates it (fencing the held one), restores its
/// partitions and commits everything exactly once, and SIGTERM still stops it cleanly while the
/// held call never returns.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_call_that_never_returns_is_given_up_and_nothing_is_lost() {
    let env = TestEnv::new("stuckcall", 4).await;
    let mut cfg = env.config.clone();
    cfg.kafka.operation_timeout = Duration::from_secs(2);
    let producing = produce_in_background(&cfg, workload(3_000, 300, 300, "s"));
    let proc = Processor::spawn_with_env(
        &cfg,
        log_path(&env, "run"),
        &[("FAILPOINTS", "kafka-send-offsets=3*off->1*pause")],
    );
    producing.await.unwrap();
    caught_up(&cfg, Duration::from_secs(120)).await;
    let lines = proc.log_lines();
    let stuck = lines
        .iter()
        .position(|l| {
            l["error"].as_str().is_some_and(|e| {
                e.contains("send_offsets_to_transaction did not return within 12s")
            })
        })
        .expect("the held call is reported, naming the call and the wait");
    assert!(
        lines[stuck + 1..]
            .iter()
            .any(|l| l["message"] == "transition" && l["state"] == "committed_causal"),
        "intents commit after the held call was given up"
    );
    assert!(
        proc.terminate(Duration::from_secs(30)),
        "SIGTERM stops it cleanly while the held call still blocks its thread"
    );
    assert_clean(&verified(&cfg).await, 3_000);
}

/// CONTRACT §5, the dual-write hazard's ambiguous case: PostgreSQL commits a batch's durable
/// write and the reply is lost (fail point `durable-write-reply-lost`, once, on the third
/// write, while intents arrive out of order). The processor can only take the write as failed:
/// it aborts the staged transaction and restores, which rolls back the rows PostgreSQL did
/// commit (their batch never committed in Kafka), and the replay decides them again: every
/// intent committed once, in order, no claim of the lost batch refusing the replay.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_durable_write_whose_reply_is_lost_is_rolled_back_and_replayed_once() {
    let env = TestEnv::new("replylost", 4).await;
    let cfg = env.config.clone();
    let producing = produce_in_background(&cfg, workload(3_000, 300, 600, "l"));
    let log = log_path(&env, "run");
    let proc = Processor::spawn_with_env(
        &cfg,
        log.clone(),
        &[("FAILPOINTS", "durable-write-reply-lost=2*off->1*return")],
    );
    producing.await.unwrap();
    caught_up(&cfg, Duration::from_secs(120)).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    let lines = read_log(&log);
    let lost = lines
        .iter()
        .position(|l| {
            l["message"] == "durable write failed; nothing is emitted"
                && l["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("durable-write-reply-lost"))
        })
        .expect("the lost reply is taken as a failed write");
    let rolled_back = rolled_back_transitions(&lines[lost..], |_| true);
    assert!(
        rolled_back > 0,
        "the restore rolled back what PostgreSQL committed of the lost batch"
    );
    println!("rolled back after the lost reply: {rolled_back} transitions");
    assert_clean(&verified(&cfg).await, 3_000);
}

/// The durable write fails while the broker is down too: the batch's records, queued in its
/// Kafka transaction, are never acknowledged. The abort is not tried (it would wait out its
/// timeout and fail): after `ABORT_DRAIN` the producer is re-created, and once both services
/// are back every intent commits once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_fails_while_the_broker_is_down_recreates_the_producer_without_aborting() {
    let env = TestEnv::exclusive("abortdown", 1).await;
    let cfg = env.config.clone();
    let log = log_path(&env, "run");
    // The second batch with records is held 15 s: meanwhile both services stop.
    let proc = Processor::spawn_with_env(
        &cfg,
        log.clone(),
        &[("FAILPOINTS", "engine-process=1*off->1*sleep(15000)")],
    );
    produce_to_partition(&cfg, 0, &[intent("a-1", "a", 1)]).await;
    caught_up(&cfg, Duration::from_secs(60)).await;
    produce_to_partition(&cfg, 0, &[intent("a-2", "a", 2), intent("b-1", "b", 1)]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = Instant::now();
    stack("stop", "kafka");
    let kafka_back = StartedAgain("kafka");
    stack("stop", "postgres");
    let postgres_back = StartedAgain("postgres");
    assert!(
        held.elapsed() < Duration::from_secs(12),
        "both stopped while the batch was held"
    );
    let aborted = wait_for_log(
        &log,
        Duration::from_secs(60),
        "the abort given up",
        |lines| {
            (lines.iter())
                .find(|l| l["message"] == "abort failed; re-creating the producer")
                .cloned()
        },
    )
    .await;
    assert!(
        aborted["error"]
            .as_str()
            .is_some_and(|e| e.contains("unacknowledged")),
        "given up on the unacknowledged records, not on a failed abort: {aborted}"
    );
    drop(postgres_back);
    drop(kafka_back);
    caught_up(&cfg, Duration::from_secs(180)).await;
    stopped_clean(proc, &cfg, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_evidence_3_redis_failure_falls_back_to_db() {
    let env = TestEnv::exclusive("seed3", 4).await;
    let cfg = env.config.clone();
    let log = log_path(&env, "run");
    let proc = Processor::spawn(&cfg, log.clone());

    // Phase 1: Redis stops mid-stream; processing goes on with PostgreSQL.
    let producing = produce_in_background(&cfg, workload(8_000, 1_000, 800, "a"));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let back = StartedAgain("redis");
    stack("stop", "redis");
    let before = effects_now(&cfg).await;
    producing.await.unwrap();
    caught_up(&cfg, Duration::from_secs(180)).await;
    assert!(
        effects_now(&cfg).await > before,
        "processing continued without Redis"
    );
    assert_eq!(
        mode_changes(&log),
        vec!["postgres"],
        "the fallback is logged once"
    );
    let report = verified(&cfg).await;
    assert_clean(&report, 8_000);

    // Phase 2: Redis is back: failback, and the same intents again are still duplicates.
    drop(back);
    wait_for_modes(
        &log,
        &["postgres", "redis"],
        Duration::from_secs(60),
        "no failback",
    )
    .await;
    demo::produce(&cfg, &workload(8_000, 1_000, 0, "a"))
        .await
        .unwrap();
    demo::produce(&cfg, &workload(4_000, 500, 0, "b"))
        .await
        .unwrap();
    caught_up(&cfg, Duration::from_secs(180)).await;
    stopped_clean(proc, &cfg, 12_000).await;

    let pool = causal_commit::store::postgres::pool(&cfg.postgres).unwrap();
    let audited: Vec<String> = sqlx::query_scalar(
        "SELECT detail->>'to' FROM cc_admin_audit WHERE action = 'lock_store_mode' ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        audited,
        vec!["postgres", "redis"],
        "each mode change has one audit row"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_flushall_mid_stream_produces_no_duplicate_effect() {
    let env = TestEnv::exclusive("flush", 4).await;
    let cfg = env.config.clone();
    let proc = Processor::spawn(&cfg, log_path(&env, "run"));
    demo::produce(&cfg, &workload(6_000, 600, 0, "f"))
        .await
        .unwrap();
    caught_up(&cfg, Duration::from_secs(180)).await;
    redis_cli(&cfg, &["FLUSHALL"]);
    // The very same intents again (a replay): every one must be a duplicate.
    demo::produce(&cfg, &workload(6_000, 600, 0, "f"))
        .await
        .unwrap();
    caught_up(&cfg, Duration::from_secs(180)).await;
    stopped_clean(proc, &cfg, 6_000).await;
}

/// The engine's record of a committed batch (sent off its thread after the Kafka commit) is
/// lost, and the partition then goes quiet, so no next write records it either: PostgreSQL
/// would go on calling that batch undecided while the processor runs, and a Redis that lost
/// its data would never be trusted again (its resynchronisation waits for every such batch's
/// fate). The engine records it again a moment later; Redis is then resynchronised and used.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_record_of_a_quiet_partitions_commit_is_sent_again_and_redis_is_trusted_again() {
    let env = TestEnv::new("remark", 1).await;
    let cfg = env.config.clone();
    let log = log_path(&env, "run");
    let proc = Processor::spawn_with_env(
        &cfg,
        log.clone(),
        &[("FAILPOINTS", "record-committed=1*return")],
    );
    produce_at(&cfg, &[(0, intent("q-1", "q", 1))]).await;
    caught_up(&cfg, Duration::from_secs(60)).await;

    let pool = env.store().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (committed, last): (i64, i64) = sqlx::query_as(
            "SELECT committed_batch, last_batch FROM cc_partition
              WHERE topic = $1 AND partition = 0",
        )
        .bind(&cfg.kafka.intents_topic)
        .fetch_one(&pool)
        .await
        .unwrap();
        if last >= 1 && committed == last {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the quiet partition's last batch {last} is still not recorded committed \
             ({committed})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Redis loses this store's keys while the partition stays quiet: the resynchronisation
    // finds no batch of undecided fate and Redis is trusted again.
    let resynced = |lines: &[serde_json::Value]| {
        lines
            .iter()
            .filter(|l| l["message"] == "lock store: Redis resynchronised")
            .count()
    };
    let before = resynced(&read_log(&log));
    let epoch_key = redis_keys(&cfg).await.epoch();
    assert_eq!(redis_cli(&cfg, &["DEL", &epoch_key]), "1");
    wait_for_log(
        &log,
        Duration::from_secs(30),
        "Redis is never resynchronised while the quiet partition's batch waits",
        |lines| (resynced(lines) > before).then_some(()),
    )
    .await;
    // The same intent again: a duplicate, found in Redis.
    produce_at(&cfg, &[(0, intent("q-1", "q", 1))]).await;
    caught_up(&cfg, Duration::from_secs(60)).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    let effects = effects(&read_all(&cfg, &cfg.kafka.side_effects_topic));
    assert_eq!(effects.len(), 1, "one effect for the intent and its replay");
    assert_clean(&verified(&cfg).await, 1);
}

/// Runs `redis-cli` against the test's Redis; its answer, trimmed.
fn redis_cli(cfg: &Config, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-u", cfg.redis.url.expose_secret()])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "redis-cli {args:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Sets one of the shared Redis's settings back to the stack's value when dropped (a failed
/// test included).
struct RedisSettingAgain(Config, &'static str, &'static str);

impl Drop for RedisSettingAgain {
    fn drop(&mut self) {
        redis_cli(&self.0, &["CONFIG", "SET", self.1, self.2]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_made_evicting_under_a_running_processor_is_left_at_once_and_copied_in_full_before_it_is_trusted(
) {
    let env = TestEnv::exclusive("evict", 4).await;
    let cfg = env.config.clone();
    let log = log_path(&env, "run");
    let proc = Processor::spawn(&cfg, log.clone());
    demo::produce(&cfg, &workload(3_000, 300, 0, "e"))
        .await
        .unwrap();
    caught_up(&cfg, Duration::from_secs(180)).await;
    assert!(mode_changes(&log).is_empty(), "Redis served throughout");
    let epoch_key = redis_keys(&cfg).await.epoch();
    assert_eq!(
        redis_cli(&cfg, &["EXISTS", &epoch_key]),
        "1",
        "Redis was marked in sync"
    );

    // A tired operator turns the running Redis into a cache.
    let restore = RedisSettingAgain(cfg.clone(), "maxmemory-policy", "noeviction");
    redis_cli(&cfg, &["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]);
    wait_for_modes(
        &log,
        &["postgres"],
        Duration::from_secs(10),
        "the processor kept trusting an evicting Redis",
    )
    .await;
    assert_eq!(
        redis_cli(&cfg, &["EXISTS", &epoch_key]),
        "0",
        "the epoch key of a Redis that may lose keys is deleted"
    );
    // The same intents again, served by PostgreSQL: every one a duplicate.
    demo::produce(&cfg, &workload(3_000, 300, 0, "e"))
        .await
        .unwrap();
    caught_up(&cfg, Duration::from_secs(180)).await;
    assert_eq!(
        mode_changes(&log),
        ["postgres"],
        "no failback while Redis evicts"
    );

    // Fixed: the processor fails back after copying the whole record, not just the outcomes
    // decided during its fallback (none here).
    drop(restore);
    let failback = wait_for_log(
        &log,
        Duration::from_secs(30),
        "no failback once Redis keeps its keys again",
        |lines| {
            lines
                .iter()
                .find(|l| {
                    l["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("lock store mode changed: failback"))
                })
                .cloned()
        },
    )
    .await;
    let cause = failback["cause"].as_str().unwrap_or_default();
    let copied: u64 = cause
        .split_once("resynchronised (")
        .and_then(|(_, rest)| rest.split_once(' '))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("failback cause {cause:?}"));
    assert!(
        copied >= 2_500,
        "a full copy of the idempotency record ({copied} outcomes copied)"
    );
    stopped_clean(proc, &cfg, 3_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_started_on_an_evicting_redis_deletes_its_epoch_key_and_serves_from_postgres() {
    let env = TestEnv::exclusive("evictstart", 4).await;
    let cfg = env.config.clone();
    let epoch_key = redis_keys(&cfg).await.epoch();
    // Redis was marked in sync once (by an earlier run), then made a cache while no instance
    // was connected to it: keys may have been evicted since.
    redis_cli(&cfg, &["SET", &epoch_key, "1:an-earlier-run"]);
    let restore = RedisSettingAgain(cfg.clone(), "maxmemory-policy", "noeviction");
    redis_cli(&cfg, &["CONFIG", "SET", "maxmemory-policy", "volatile-lru"]);
    let log = log_path(&env, "run");
    let proc = Processor::spawn(&cfg, log.clone());
    demo::produce(&cfg, &workload(1_000, 100, 0, "s"))
        .await
        .unwrap();
    caught_up(&cfg, Duration::from_secs(180)).await;
    assert_eq!(
        redis_cli(&cfg, &["EXISTS", &epoch_key]),
        "0",
        "the epoch key of an evicting Redis is deleted on connecting"
    );
    assert_eq!(
        mode_changes(&log),
        ["postgres"],
        "PostgreSQL serves while Redis evicts"
    );
    drop(restore);
    stopped_clean(proc, &cfg, 1_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_evicted_keys_while_no_instance_was_connected_is_copied_in_full_before_it_is_trusted(
) {
    let env = TestEnv::exclusive("evictedoff", 4).await;
    let cfg = env.config.clone();
    let keys = redis_keys(&cfg).await;
    let epoch_key = keys.epoch();
    let idem_pattern = keys.idem("*");
    let held = || {
        redis_cli(&cfg, &["--scan", "--pattern", &idem_pattern])
            .lines()
            .filter(|l| !l.is_empty())
            .count()
    };
    let first = Processor::spawn(&cfg, log_path(&env, "first"));
    demo::produce(&cfg, &workload(2_000, 200, 0, "o"))
        .await
        .unwrap();
    caught_up(&cfg, Duration::from_secs(180)).await;
    stopped_clean(first, &cfg, 2_000).await;
    assert_eq!(
        redis_cli(&cfg, &["EXISTS", &epoch_key]),
        "1",
        "Redis was marked in sync"
    );
    assert_eq!(held(), 2_000, "Redis holds every outcome");

    // No instance is connected: a tired operator makes Redis a cache with too little memory, it
    // evicts every key with a TTL (the idempotency keys; the epoch key has none), and the
    // settings are put back. Only the server's eviction count tells.
    {
        let _policy = RedisSettingAgain(cfg.clone(), "maxmemory-policy", "noeviction");
        let _memory = RedisSettingAgain(cfg.clone(), "maxmemory", "0");
        redis_cli(
            &cfg,
            &["CONFIG", "SET", "maxmemory-policy", "volatile-random"],
        );
        redis_cli(&cfg, &["CONFIG", "SET", "maxmemory", "1"]);
        // Redis evicts in slices of time, the rest in its background cycle, until the settings
        // are put back (at the end of this block).
        let deadline = Instant::now() + Duration::from_secs(20);
        while held() > 0 {
            assert!(
                Instant::now() < deadline,
                "the idempotency keys were not evicted: {} left",
                held()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(
        redis_cli(&cfg, &["EXISTS", &epoch_key]),
        "1",
        "the epoch key outlived the eviction"
    );

    // The next instance does not take the mark for a copy: it copies the record in full.
    let log = log_path(&env, "second");
    let second = Processor::spawn(&cfg, log.clone());
    let copied = wait_for_log(
        &log,
        Duration::from_secs(60),
        "the mark of a Redis that evicted keys was trusted: no copy",
        |lines| {
            lines
                .iter()
                .find(|l| l["message"] == "lock store: Redis resynchronised")
                .map(|l| l["copied"].as_u64().unwrap_or_default())
        },
    )
    .await;
    assert!(copied >= 2_000, "a full copy ({copied} outcomes copied)");
    assert_eq!(held(), 2_000, "every outcome is back in Redis");
    // The same intents again, served by Redis: every one a duplicate.
    demo::produce(&cfg, &workload(2_000, 200, 0, "o"))
        .await
        .unwrap();
    caught_up(&cfg, Duration::from_secs(180)).await;
    assert!(
        mode_changes(&log).is_empty(),
        "Redis served throughout: {:?}",
        mode_changes(&log)
    );
    stopped_clean(second, &cfg, 2_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_out_of_memory_under_a_running_processor_falls_back_and_fails_back_once_it_has_room()
{
    let env = TestEnv::exclusive("redisfull", 4).await;
    let cfg = env.config.clone();
    let log = log_path(&env, "run");
    let proc = Processor::spawn(&cfg, log.clone());
    demo::produce(&cfg, &workload(3_000, 300, 0, "m"))
        .await
        .unwrap();
    caught_up(&cfg, Duration::from_secs(180)).await;
    assert!(mode_changes(&log).is_empty(), "Redis served throughout");

    // A tired operator gives the running Redis (noeviction) less memory than it holds: every
    // write is refused with OOM, reads still answer.
    let used: u64 = redis_cli(&cfg, &["INFO", "memory"])
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("INFO memory names used_memory");
    let restore = RedisSettingAgain(cfg.clone(), "maxmemory", "0");
    redis_cli(
        &cfg,
        &["CONFIG", "SET", "maxmemory", &(used / 2).to_string()],
    );
    // New intents, and the first ones again (duplicates whose outcomes Redis still holds).
    demo::produce(&cfg, &workload(3_000, 300, 0, "n"))
        .await
        .unwrap();
    demo::produce(&cfg, &workload(3_000, 300, 0, "m"))
        .await
        .unwrap();
    caught_up(&cfg, Duration::from_secs(180)).await;
    assert_eq!(
        mode_changes(&log),
        ["postgres"],
        "a Redis refusing writes is left for PostgreSQL"
    );
    let left = read_log(&log)
        .into_iter()
        .find(|l| l["to"] == "postgres")
        .unwrap();
    assert!(
        left["cause"].as_str().is_some_and(|c| c.contains("OOM")),
        "left because Redis refused a write for memory: {left}"
    );

    drop(restore);
    wait_for_modes(
        &log,
        &["postgres", "redis"],
        Duration::from_secs(30),
        "no failback once Redis has room again",
    )
    .await;
    // Served by Redis again: the same intents once more, all duplicates.
    demo::produce(&cfg, &workload(3_000, 300, 0, "n"))
        .await
        .unwrap();
    caught_up(&cfg, Duration::from_secs(180)).await;
    stopped_clean(proc, &cfg, 6_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_slow_opens_the_breaker_and_processing_goes_on() {
    let env = TestEnv::exclusive("slow", 4).await;
    let cfg = env.config.clone();
    let log = log_path(&env, "run");
    let proc = Processor::spawn(&cfg, log.clone());
    let producing = produce_in_background(&cfg, workload(6_000, 600, 600, "s"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = effects_now(&cfg).await;
    let freeze_started = Instant::now();
    {
        let _frozen = crate::common::process::freeze_redis(4_000).await;
        // Commands time out after 250 ms; three failures open the breaker.
        let deadline = Instant::now() + Duration::from_secs(3);
        while !mode_changes(&log).contains(&"postgres".to_string()) {
            assert!(
                Instant::now() < deadline,
                "the breaker did not open within its window"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!(
            "breaker opened {:.2} s after Redis froze",
            freeze_started.elapsed().as_secs_f64()
        );
    }
    let during = effects_now(&cfg).await;
    assert!(
        during > before,
        "throughput stayed above zero while Redis was slow"
    );
    producing.await.unwrap();
    caught_up(&cfg, Duration::from_secs(180)).await;
    stopped_clean(proc, &cfg, 6_000).await;
}

/// Redis stops answering altogether (SIGSTOP: connections open, nothing answered, unlike a
/// busy script, after which Redis answers BUSY) for 30 s under traffic: the lock store leaves
/// it for PostgreSQL, processing goes on, and once Redis answers again the lock store fails
/// back to it, then serves a replay of everything from it, all duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_that_stops_answering_is_left_and_failed_back_to() {
    let env = TestEnv::exclusive("redisfrozen", 4).await;
    let cfg = env.config.clone();
    let log = log_path(&env, "run");
    let proc = Processor::spawn(&cfg, log.clone());
    let producing = produce_in_background(&cfg, workload(6_000, 600, 300, "f"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let frozen = Frozen::service("redis");
    wait_for_modes(
        &log,
        &["postgres"],
        Duration::from_secs(10),
        "Redis left for PostgreSQL",
    )
    .await;
    let left = effects_now(&cfg).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let during = effects_now(&cfg).await;
    drop(frozen);
    assert!(during > left, "processing went on while Redis was frozen");
    producing.await.unwrap();
    caught_up(&cfg, Duration::from_secs(180)).await;
    wait_for_modes(
        &log,
        &["postgres", "redis"],
        Duration::from_secs(60),
        "failback once Redis answers again",
    )
    .await;
    // Served by Redis again: the same intents once more, all duplicates.
    demo::produce(&cfg, &workload(6_000, 600, 0, "f"))
        .await
        .unwrap();
    caught_up(&cfg, Duration::from_secs(180)).await;
    assert_eq!(
        mode_changes(&log),
        ["postgres", "redis"],
        "Redis kept after the failback"
    );
    stopped_clean(proc, &cfg, 6_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zombie_paused_past_its_lease_cannot_write_after_it_resumes() {
    let env = TestEnv::exclusive("zombie", 4).await;
    let cfg = env.config.clone();
    let producing = produce_in_background(&cfg, workload(12_000, 1_200, 300, "z"));
    let a = Processor::spawn(&cfg, log_path(&env, "a"));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut cfg_b = cfg.clone();
    cfg_b.instance_id = format!("{}-b", env.name);
    let b = Processor::spawn(&cfg_b, log_path(&env, "b"));
    tokio::time::sleep(Duration::from_secs(6)).await;

    let pool = causal_commit::store::postgres::pool(&cfg.postgres).unwrap();
    a.signal("STOP");
    let a_fences: Vec<i64> = sqlx::query_scalar("SELECT fence FROM cc_partition WHERE owner = $1")
        .bind(&cfg.instance_id)
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(
        !a_fences.is_empty(),
        "a owned partitions before it was paused"
    );
    // Past the session timeout (10 s) and the lease (15 s): b takes a's partitions.
    tokio::time::sleep(Duration::from_secs(22)).await;
    let taken: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM cc_partition WHERE owner = $1 AND fence <> ALL($2)",
    )
    .bind(&cfg_b.instance_id)
    .bind(&a_fences)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(taken, 4, "b owns every partition while a is paused");
    let resumed_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&pool)
        .await
        .unwrap();
    a.signal("CONT");

    producing.await.unwrap();
    caught_up(&cfg, Duration::from_secs(180)).await;
    assert!(a.terminate(Duration::from_secs(30)));
    assert!(b.terminate(Duration::from_secs(30)));
    let stale_writes: i64 =
        sqlx::query_scalar("SELECT count(*) FROM cc_transition WHERE fence = ANY($1) AND at >= $2")
            .bind(&a_fences)
            .bind(resumed_at)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        stale_writes, 0,
        "no write with the zombie's tokens was accepted"
    );
    let report = verified(&cfg).await;
    assert_clean(&report, 12_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_batches_log_and_count_each_transition_once_after_its_commit() {
    let env = TestEnv::exclusive("r8", 4).await;
    let mut cfg = env.config.clone();
    let port = free_port();
    cfg.telemetry.metrics_listen = format!("127.0.0.1:{port}");
    let log = log_path(&env, "run");
    let proc = Processor::spawn(&cfg, log.clone());
    let mut opts = workload(4_000, 400, 500, "r");
    opts.duplicate_fraction = 0.0;
    let producing = produce_in_background(&cfg, opts);
    // Once batches flow (a fence during the start-up only delays the start: a slow group join
    // once took all five), five times while intents flow, the processor's producer is fenced:
    // the batch in flight, already in PostgreSQL, aborts in Kafka, is rolled back and replayed.
    wait_for_log(
        &log,
        Duration::from_secs(60),
        "no batch within a minute",
        |lines| {
            lines
                .iter()
                .any(|l| l["message"] == "transition")
                .then_some(())
        },
    )
    .await;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        let c = cfg.clone();
        tokio::task::spawn_blocking(move || fence_processor(&c))
            .await
            .unwrap();
    }
    producing.await.unwrap();
    caught_up(&cfg, Duration::from_secs(180)).await;
    let page = http::parse_samples(&http::scrape(([127, 0, 0, 1], port).into()).await);
    assert!(proc.terminate(Duration::from_secs(30)));

    let lines = read_log(&log);
    let aborts = lines
        .iter()
        .filter(|l| l["message"] == "transaction failed; restoring")
        .count();
    assert!(aborts >= 1, "the fencing aborted at least one transaction");
    let effects = effects(&read_all(&cfg, &cfg.kafka.side_effects_topic));
    assert_eq!(effects.len(), 4_000, "every intent committed once");
    let mut committed: HashMap<String, usize> = HashMap::new();
    for l in &lines {
        if l["message"] == "transition" && l["state"] == "committed_causal" {
            let id = l["intent_id"].as_str().unwrap_or_default().to_string();
            *committed.entry(id).or_default() += 1;
        }
    }
    let twice: Vec<_> = committed.iter().filter(|(_, n)| **n != 1).take(5).collect();
    assert!(
        twice.is_empty(),
        "committed_causal logged more than once: {twice:?}"
    );
    assert_eq!(committed.len(), effects.len(), "one log line per effect");
    let counted = http::value(
        &page,
        causal_commit::telemetry::metrics::OUTCOMES,
        &[("state", "committed_causal"), ("reason", "")],
    );
    assert_eq!(
        counted,
        Some(effects.len() as f64),
        "one increment per effect"
    );
    let report = verified(&cfg).await;
    assert!(report.ok, "{:?}", report.violations);
}

/// A new group's first batch is written to PostgreSQL and then aborts in Kafka: nothing in Kafka
/// ever named a batch for these partitions, so without the recovery point committed at the
/// start PostgreSQL could not tell whether batch 1 committed and every partition would refuse
/// to start. Deterministic: the producer is fenced while the processor sits idle, before its
/// first batch, so that batch is the one that aborts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_groups_first_batch_that_aborts_rolls_back_and_replays_without_an_operator() {
    let env = TestEnv::new("first_abort", 3).await;
    let cfg = env.config.clone();
    let log = log_path(&env, "run");
    let proc = Processor::spawn(&cfg, log.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let anchored = read_log(&log)
            .iter()
            .filter(|l| {
                l["message"] == "recovery point committed to Kafka (it had none for this partition)"
                    && l["batch_no"] == 0
            })
            .count();
        if anchored == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the recovery points of a new group were not committed ({anchored} of 3)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let points = causal_commit::pipeline::read::committed_points(&cfg).unwrap();
    assert_eq!(points.len(), 3);
    for (p, c) in &points {
        let point = c.recovery.clone().unwrap().expect("a recovery point");
        assert_eq!((point.batch, c.offset), (0, 0), "partition {p}");
    }

    let c = cfg.clone();
    tokio::task::spawn_blocking(move || fence_processor(&c))
        .await
        .unwrap();
    let mut opts = workload(300, 30, 0, "fa");
    opts.duplicate_fraction = 0.0;
    opts.invalid = 0;
    demo::produce(&cfg, &opts).await.unwrap();
    caught_up(&cfg, Duration::from_secs(90)).await;
    assert!(proc.terminate(Duration::from_secs(30)));

    let lines = read_log(&log);
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "transaction failed; restoring"),
        "the first batch aborted"
    );
    let rolled_back = rolled_back_transitions(&lines, |l| l["batch_no"] == 0);
    assert!(rolled_back > 0, "the aborted batch's rows were rolled back");
    let refused = lines
        .iter()
        .filter(|l| l["message"] == "partition not restored yet; paused")
        .map(|l| l["error"].to_string())
        .collect::<Vec<_>>();
    assert!(refused.is_empty(), "no partition refused: {refused:?}");
    assert_clean(&verified(&cfg).await, 300);
}

/// The log lines of durable writes that failed after some of their groups committed.
fn partly_written(lines: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    lines
        .iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("part of a durable write failed"))
        })
        .collect()
}

/// A batch's durable write runs as `postgres.parallel_writes` transactions at once, by
/// partition. When one is refused and another commits, the part that committed in PostgreSQL
/// (but not in Kafka) is rolled back by its partition's restore and replayed, and the refused
/// part is handled on its own: nothing is lost, doubled or reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_write_refused_in_part_rolls_the_written_part_back_and_replays_it() {
    let env = TestEnv::new("part_write", 3).await;
    let mut cfg = env.config.clone();
    // The restarted processor's first batch holds what both partitions have waiting.
    cfg.batch.max_linger = Duration::from_millis(1_000);
    assert_eq!(
        cfg.postgres.parallel_writes, 2,
        "the default splits batches"
    );

    // Partition 0 writes contact x first: it owns x.
    let proc = Processor::spawn(&cfg, log_path(&env, "run0"));
    produce_at(&cfg, &[(0, intent("x-1", "x", 1))]).await;
    caught_up(&cfg, Duration::from_secs(60)).await;
    assert!(proc.terminate(Duration::from_secs(30)));

    // While it is down, x's next intent arrives on partition 1 (a producer's partitioner
    // changed), and ordinary traffic on partition 2.
    let mut records = vec![(1, intent("x-2", "x", 2))];
    for c in 1..=20 {
        for seq in 1..=2 {
            let contact = format!("y{c}");
            records.push((2, intent(&format!("{contact}-{seq}"), &contact, seq)));
        }
    }
    produce_at(&cfg, &records).await;
    let log = log_path(&env, "run1");
    let proc = Processor::spawn(&cfg, log.clone());
    caught_up(&cfg, Duration::from_secs(90)).await;
    assert!(proc.terminate(Duration::from_secs(30)));

    let lines = read_log(&log);
    let partly = partly_written(&lines);
    assert_eq!(partly.len(), 1, "one batch was refused in part: {partly:?}");
    assert_eq!(
        partly[0]["partitions"], "{2}",
        "partition 2's part was written"
    );
    let rolled_back = rolled_back_transitions(&lines, |l| l["partition"] == 2);
    assert_eq!(
        rolled_back, 40,
        "partition 2's written part was rolled back"
    );
    assert!(
        lines.iter().any(|l| {
            l["message"] == "contact owned by another partition: its records are forwarded there"
                && l["contact_id"] == "x"
                && l["owner"] == 0
        }),
        "partition 1 learnt that partition 0 owns x"
    );
    let report = verified(&cfg).await;
    assert_clean(&report, 42);
    let effects = effects(&read_all(&cfg, &cfg.kafka.side_effects_topic));
    let per_contact = by_contact(&effects);
    let x: Vec<u64> = per_contact["x"].iter().map(|e| e.commit_sequence).collect();
    assert_eq!(x, [1, 2], "x's effects once each, in order");
    assert_eq!(effects.len(), 42, "one effect per intent");
}

/// The recovery point of a partition Kafka has none for is committed before the partition
/// decides anything (`Engine::anchor`). When that commit fails (here: the producer was fenced
/// while the instance was idle, and partitions added to the topic are the first thing it
/// commits for), the partitions stay paused, the producer is re-created, and the next restore
/// commits their points: they then flow, nothing lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_point_commit_that_fails_is_retried_and_the_new_partitions_flow() {
    let env = TestEnv::new("anchor_fail", 2).await;
    let mut cfg = env.config.clone();
    let port = free_port();
    cfg.telemetry.metrics_listen = format!("127.0.0.1:{port}");
    let log = log_path(&env, "run");
    let proc = Processor::spawn(&cfg, log.clone());
    let first: Vec<_> = (0..20)
        .map(|k| intent(&format!("a{k}-1"), &format!("a{k}"), 1))
        .collect();
    produce_intents(&cfg, &first).await;
    caught_up(&cfg, Duration::from_secs(60)).await;

    // Idle: nothing uses the producer until the new partitions' recovery points.
    let c = cfg.clone();
    tokio::task::spawn_blocking(move || fence_processor(&c))
        .await
        .unwrap();
    crate::growth::grow(&cfg, 4).await;
    let anchored = |lines: &[serde_json::Value], p: i64| {
        lines.iter().position(|l| {
            l["message"] == "recovery point committed to Kafka (it had none for this partition)"
                && l["partition"] == p
        })
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    let lines = loop {
        let lines = read_log(&log);
        if anchored(&lines, 2).is_some() && anchored(&lines, 3).is_some() {
            break lines;
        }
        assert!(
            Instant::now() < deadline,
            "the new partitions' recovery points were never committed"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    for p in [2, 3] {
        let failed = lines.iter().position(|l| {
            l["message"] == "partition not restored yet; paused"
                && l["partition"] == p
                && l["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("committing the partition's recovery point"))
        });
        let failed = failed.unwrap_or_else(|| panic!("partition {p}: the first commit failed"));
        assert!(
            anchored(&lines, p).unwrap() > failed,
            "partition {p}: committed after the failure"
        );
    }

    let second: Vec<_> = (0..20)
        .map(|k| intent(&format!("a{k}-2"), &format!("a{k}"), 2))
        .collect();
    produce_intents(&cfg, &second).await;
    caught_up(&cfg, Duration::from_secs(60)).await;
    let page = http::parse_samples(&http::scrape(([127, 0, 0, 1], port).into()).await);
    assert!(proc.terminate(Duration::from_secs(30)));
    // The recovery points' transaction is a Kafka transaction like a batch's: the one that
    // failed is counted (no batch failed here: the producer was fenced while idle).
    let aborted = http::value(
        &page,
        causal_commit::telemetry::metrics::TRANSACTIONS,
        &[("result", "abort")],
    );
    assert!(
        aborted.is_some_and(|n| n >= 1.0),
        "the failed recovery-point commit is counted as an aborted transaction: {aborted:?}"
    );
    let fx = effects(&read_all(&cfg, &cfg.kafka.side_effects_topic));
    for (contact, seqs) in by_contact(&fx) {
        let seqs: Vec<u64> = seqs.iter().map(|e| e.commit_sequence).collect();
        assert_eq!(seqs, [1, 2], "contact {contact}");
    }
    assert_eq!(fx.len(), 40);
    assert_clean(&verified(&cfg).await, 40);
}

/// Fences the idle processor's producer and produces `records`, which release waiting intents:
/// the batch that releases them is written to PostgreSQL and aborts in Kafka. Asserts that it
/// aborted, that its restore rolled back `rolled_back` transitions, and that every partition's
/// restore read its states (none stayed paused); the replay has caught up.
pub(crate) async fn aborted_release_replays(
    cfg: &Config,
    log: &std::path::Path,
    records: &[Intent],
    rolled_back: u64,
    which: &str,
) {
    let c = cfg.clone();
    tokio::task::spawn_blocking(move || fence_processor(&c))
        .await
        .unwrap();
    if records.len() > 1 {
        // Sent one by one, they could make two batches; in one Kafka transaction they make
        // one (whose commit marker then takes one more batch, with no record, to pass).
        produce_together(cfg, 0, records).await;
    } else {
        produce_intents(cfg, records).await;
    }
    caught_up(cfg, Duration::from_secs(90)).await;
    let lines = read_log(log);
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "transaction failed; restoring"),
        "the releasing batch aborted"
    );
    assert_eq!(
        rolled_back_transitions(&lines, |_| true),
        rolled_back,
        "{which}"
    );
    let refused: Vec<_> = lines
        .iter()
        .filter(|l| l["message"] == "partition not restored yet; paused")
        .map(|l| l["error"].to_string())
        .collect();
    assert!(
        refused.is_empty(),
        "the restore read every state: {refused:?}"
    );
}

/// Waiting intents live in `cc_waiting` rows the contact's state names (migration 0009). The
/// batch that releases them drops the names; the rows stay until the partition's next batch.
/// Here the releasing batch is written to PostgreSQL and aborts in Kafka (the producer was
/// fenced while the processor sat idle, so that batch is the one that aborts): the restore
/// puts the names back and must find the rows, and the replay releases them once, in order.
/// Then one more batch deletes the released rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_releases_waiting_intents_and_aborts_finds_their_rows_again() {
    let env = TestEnv::new("wait_rows", 1).await;
    let cfg = env.config.clone();
    let log = log_path(&env, "run");
    let proc = Processor::spawn(&cfg, log.clone());
    produce_intents(&cfg, &[intent("x-3", "x", 3), intent("x-2", "x", 2)]).await;
    caught_up(&cfg, Duration::from_secs(60)).await;
    let pool = sqlx::PgPool::connect(&database_url()).await.unwrap();
    let schema = cfg.postgres.schema.clone();
    let rows = |contact: &'static str| {
        let (pool, schema) = (pool.clone(), schema.clone());
        async move {
            sqlx::query_scalar::<_, i64>(&format!(
                "SELECT count(*) FROM {schema}.cc_waiting WHERE contact_id = $1"
            ))
            .bind(contact)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(rows("x").await, 2, "each waiting intent has its row");
    let named: serde_json::Value = sqlx::query_scalar(&format!(
        "SELECT state -> 'waiting' FROM {schema}.cc_contact WHERE contact_id = 'x'"
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        named
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["row"].is_u64() && w.get("intent").is_none()),
        "the state names its rows instead of holding the intents: {named}"
    );

    aborted_release_replays(
        &cfg,
        &log,
        &[intent("x-1", "x", 1)],
        3,
        "x-1 committed, x-2 and x-3 released: rolled back, then replayed",
    )
    .await;
    let effects = effects(&read_all(&cfg, &cfg.kafka.side_effects_topic));
    let x: Vec<u64> = by_contact(&effects)["x"]
        .iter()
        .map(|e| e.commit_sequence)
        .collect();
    assert_eq!(x, [1, 2, 3], "x's effects once each, in order");
    assert_eq!(
        rows("x").await,
        2,
        "released rows stay until the next batch"
    );

    produce_intents(&cfg, &[intent("y-1", "y", 1)]).await;
    caught_up(&cfg, Duration::from_secs(60)).await;
    assert!(proc.terminate(Duration::from_secs(30)));
    assert_eq!(
        rows("x").await,
        0,
        "the next batch deleted the released rows"
    );
    assert_clean(&verified(&cfg).await, 4);
}

/// A deployment upgraded past migration 0009 still has states that hold their waiting intents
/// inline (the form before `cc_waiting`). This test makes such states from real ones (the
/// processor stopped; each name replaced by its row's intent, the rows deleted, as the states
/// were before the upgrade) and starts the processor on them. Contact y is then written while
/// one intent still waits: its state must name a row for it from then on. Then the batch that
/// releases x (still inline) and y (now a row) is written and aborts in Kafka (producer fenced
/// while idle): the restore must read x's inline previous state and y's named one, and the
/// replay must release both once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn states_from_before_the_waiting_rows_restore_replay_and_move_to_rows() {
    let env = TestEnv::new("inline_up", 1).await;
    let cfg = env.config.clone();
    let log = log_path(&env, "run");
    let proc = Processor::spawn(&cfg, log.clone());
    produce_intents(
        &cfg,
        &[
            intent("x-3", "x", 3),
            intent("x-2", "x", 2),
            intent("y-3", "y", 3),
        ],
    )
    .await;
    caught_up(&cfg, Duration::from_secs(60)).await;
    assert!(proc.terminate(Duration::from_secs(30)));

    let pool = sqlx::PgPool::connect(&database_url()).await.unwrap();
    let schema = cfg.postgres.schema.clone();
    let inline = |column: &str| {
        format!(
            "{column} = CASE WHEN {column} IS NULL THEN NULL ELSE jsonb_set({column}, '{{waiting}}', (
                 SELECT coalesce(jsonb_agg(x - 'row' ORDER BY n), '[]'::jsonb)
                   FROM jsonb_array_elements(cc_resolved_state(contact_id, {column})
                                             -> 'waiting') WITH ORDINALITY AS e(x, n))) END"
        )
    };
    // cc_resolved_state reads cc_waiting through the search path, as the processor sets it.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(&format!("SET LOCAL search_path TO {schema}"))
        .execute(&mut *tx)
        .await
        .unwrap();
    let made = sqlx::query(&format!(
        "UPDATE cc_contact SET {}, {} WHERE contact_id IN ('x', 'y')",
        inline("state"),
        inline("prev_state")
    ))
    .execute(&mut *tx)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(made, 2);
    sqlx::query("DELETE FROM cc_waiting")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let waiting = |contact: &'static str| {
        let (pool, schema) = (pool.clone(), schema.clone());
        async move {
            let w: serde_json::Value = sqlx::query_scalar(&format!(
                "SELECT state -> 'waiting' FROM {schema}.cc_contact WHERE contact_id = $1"
            ))
            .bind(contact)
            .fetch_one(&pool)
            .await
            .unwrap();
            let rows: i64 = sqlx::query_scalar(&format!(
                "SELECT count(*) FROM {schema}.cc_waiting WHERE contact_id = $1"
            ))
            .bind(contact)
            .fetch_one(&pool)
            .await
            .unwrap();
            (w.as_array().unwrap().clone(), rows)
        }
    };
    let (x, rows) = waiting("x").await;
    assert_eq!(rows, 0);
    assert_eq!(x.len(), 2);
    assert!(
        x.iter()
            .all(|w| w.get("row").is_none() && w["intent"]["payload"]["record"].is_object()),
        "x's state holds its intents inline, as before migration 0009: {x:?}"
    );

    let proc = Processor::spawn(&cfg, log.clone());
    produce_intents(&cfg, &[intent("y-1", "y", 1)]).await;
    caught_up(&cfg, Duration::from_secs(60)).await;
    let (y, rows) = waiting("y").await;
    assert_eq!(
        rows, 1,
        "y-3, still waiting, got its row at y's first write"
    );
    assert!(
        y.len() == 1 && y[0]["commit_sequence"] == 3 && y[0]["row"].is_u64(),
        "y's state names the row: {y:?}"
    );
    assert!(
        y[0].get("intent").is_none(),
        "and no longer holds it: {y:?}"
    );
    let (x, _) = waiting("x").await;
    assert!(
        x.iter().all(|w| w.get("row").is_none()),
        "x not written yet"
    );

    aborted_release_replays(
        &cfg,
        &log,
        &[intent("x-1", "x", 1), intent("y-2", "y", 2)],
        5,
        "x-1 and y-2 committed, x-2, x-3 and y-3 released: rolled back, then replayed",
    )
    .await;
    assert!(proc.terminate(Duration::from_secs(30)));
    let effects = effects(&read_all(&cfg, &cfg.kafka.side_effects_topic));
    for contact in ["x", "y"] {
        let seqs: Vec<u64> = by_contact(&effects)[contact]
            .iter()
            .map(|e| e.commit_sequence)
            .collect();
        assert_eq!(seqs, [1, 2, 3], "{contact}'s effects once each, in order");
    }
    assert!(waiting("x").await.0.is_empty() && waiting("y").await.0.is_empty());
    assert_clean(&verified(&cfg).await, 6);
}

/// The outage between the two halves of a parallel durable write: partition 1's group commits
/// in PostgreSQL while partition 0's is held on a row lock (this test's transaction holds
/// partition 0's lease row), then partition 0's connection is terminated, as when PostgreSQL
/// goes away in the middle. Not a data error: every lane is voided; partition 1's written part,
/// never committed in Kafka, is rolled back by its restore, and both partitions replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_between_the_two_groups_of_a_parallel_write_rolls_the_committed_group_back() {
    let env = TestEnv::new("group_outage", 2).await;
    let mut cfg = env.config.clone();
    // The records of both partitions make one batch.
    cfg.batch.max_linger = Duration::from_millis(1_000);
    assert_eq!(cfg.postgres.parallel_writes, 2);
    let log = log_path(&env, "run");
    let proc = Processor::spawn(&cfg, log.clone());
    produce_at(
        &cfg,
        &[(0, intent("a0-1", "a0", 1)), (1, intent("b0-1", "b0", 1))],
    )
    .await;
    caught_up(&cfg, Duration::from_secs(60)).await;

    // As the runtime role, whose backends it may see and terminate.
    let pool = sqlx::PgPool::connect(&runtime_database_url())
        .await
        .unwrap();
    let schema = cfg.postgres.schema.clone();
    let mut holder = pool.begin().await.unwrap();
    sqlx::query(&format!(
        "SELECT 1 FROM {schema}.cc_partition WHERE partition = 0 FOR UPDATE"
    ))
    .execute(&mut *holder)
    .await
    .unwrap();
    let mut records = Vec::new();
    for k in 1..=20 {
        records.push((0, intent(&format!("a{k}-1"), &format!("a{k}"), 1)));
        records.push((1, intent(&format!("b{k}-1"), &format!("b{k}"), 1)));
    }
    produce_at(&cfg, &records).await;
    // Partition 1's group has committed; partition 0's waits for the lock.
    let deadline = Instant::now() + Duration::from_secs(60);
    let blocked = loop {
        let p1: i64 = sqlx::query_scalar(&format!(
            "SELECT last_batch FROM {schema}.cc_partition WHERE partition = 1"
        ))
        .fetch_one(&pool)
        .await
        .unwrap();
        let waiting: Option<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity
              WHERE wait_event_type = 'Lock' AND query LIKE 'SELECT cc_claim_decisions(%cc_apply_batch(%'",
        )
        .fetch_optional(&pool)
        .await
        .unwrap();
        if let (2, Some(pid)) = (p1, waiting) {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "partition 1's group committed ({p1}) while partition 0's waits ({waiting:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(blocked)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(terminated);
    holder.rollback().await.unwrap();
    caught_up(&cfg, Duration::from_secs(90)).await;
    assert!(proc.terminate(Duration::from_secs(30)));

    let lines = read_log(&log);
    let partly = partly_written(&lines);
    assert_eq!(partly.len(), 1, "one write failed in part: {partly:?}");
    assert_eq!(
        partly[0]["partitions"], "{1}",
        "partition 1's part was written"
    );
    assert!(
        partly[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("terminating connection")),
        "the other part lost its connection: {}",
        partly[0]
    );
    assert_eq!(
        rolled_back_transitions(&lines, |l| l["partition"] == 1),
        20,
        "partition 1's written part was rolled back"
    );
    assert_eq!(
        rolled_back_transitions(&lines, |l| l["partition"] == 0),
        0,
        "partition 0's part was never written"
    );
    let effects = effects(&read_all(&cfg, &cfg.kafka.side_effects_topic));
    assert_eq!(effects.len(), 42, "one effect per intent");
    assert_clean(&verified(&cfg).await, 42);
}
