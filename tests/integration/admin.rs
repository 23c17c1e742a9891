//! The admin API and the CLI's operator commands on the real stack: the bearer token, validated
//! input, the life of an operator command (applied only once its batch is committed in Kafka,
//! cancellable while pending, a timed-out CLI call that cancels or reports), `resume`
//! semantics, re-submission only through the audited operator path (R9), and schemathesis
//! against a live instance.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message as _;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use tokio_util::sync::CancellationToken;

use crate::common::process::{cli, read_log, Processor};
use crate::common::*;
use causal_commit::admin::client::{Client, Reply};
use causal_commit::config::Config;
use causal_commit::pipeline::health::Health;
use causal_commit::proto::{ManualReview, ReviewReason};
use causal_commit::store::postgres::{
    self as pg, AppliedCommand, BatchWrite, CommandResult, CommandState, PartitionWrite,
    Transition, TransitionRow,
};
use causal_commit::store::recovery::{KafkaCommitted, RecoveryPoint};

pub const TOKEN: &str = "test-admin-token";

/// Gives `config` an admin API on a free local port, with [`TOKEN`].
pub fn with_admin(config: &mut Config) {
    config.admin.listen = format!("127.0.0.1:{}", free_port());
    config.admin.token = TOKEN.to_string().into();
}

pub fn url(config: &Config) -> String {
    format!("http://{}", config.admin.listen)
}

pub fn api(config: &Config) -> Client {
    Client::new(&url(config), TOKEN.to_string().into()).expect("an admin client")
}

/// Waits until the instance answers ready (partitions assigned and restored, stores up). Fails
/// with the instance's own error if it ends first, or with its last answer after 60 s.
pub async fn wait_ready(api: &Client, running: &mut Running) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let last = match api.get("/v1/ready").await {
            Ok(r) if r.status == 200 => return,
            answer => format!("{answer:?}"),
        };
        if running.handle.is_finished() {
            let ended = (&mut running.handle).await;
            panic!("the instance ended before it got ready: {ended:?}");
        }
        assert!(
            Instant::now() < deadline,
            "the instance never got ready; its last answer: {last}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn get(api: &Client, path: &str) -> serde_json::Value {
    let r = api.get(path).await.expect("the admin API answers");
    assert_eq!(r.status, 200, "GET {path}: {r:?}");
    r.body
}

async fn post(api: &Client, path: &str, body: serde_json::Value) -> Reply {
    api.post(path, &body).await.expect("the admin API answers")
}

/// Polls `f` until it gives `Some`, for at most `within`.
async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(t) = f().await {
            return t;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One instance with the admin API and a short `wait_timeout` (a missing sequence holds its
/// contact quickly), ready: the world of the tests that hold a contact and work it.
async fn held_world(name: &str, wait_timeout: Duration) -> (TestEnv, Running, Client) {
    let mut env = TestEnv::new(name, 1).await;
    env.config.sequencer.wait_timeout = wait_timeout;
    with_admin(&mut env.config);
    let mut running = start(env.config());
    let api = api(&env.config);
    wait_ready(&api, &mut running).await;
    (env, running, api)
}

/// Waits until `contact` is on hold, and returns its entry of `GET /v1/held`.
pub async fn wait_held(api: &Client, contact: &str) -> serde_json::Value {
    eventually(Duration::from_secs(60), "the contact's hold", || async {
        let held = get(api, "/v1/held").await;
        held["contacts"]
            .as_array()?
            .iter()
            .find(|c| c["contact_id"] == contact)
            .cloned()
    })
    .await
}

/// The manual-review records committed so far: (partition, offset, record).
pub async fn reviews_at(config: &Config) -> Vec<(i32, i64, ManualReview)> {
    let c = config.clone();
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        causal_commit::pipeline::read::read_topic(&c, &c.kafka.manual_review_topic, |r| {
            let review = ManualReview::decode(r.value.unwrap_or_default())?;
            out.push((r.partition, r.offset, review));
            Ok(())
        })
        .expect("read the manual-review topic");
        out
    })
    .await
    .expect("reader")
}

/// Waits for the review record of `intent_id` with `reason`.
pub async fn wait_review(
    config: &Config,
    intent_id: &str,
    reason: ReviewReason,
) -> (i32, i64, ManualReview) {
    eventually(Duration::from_secs(60), "a review record", || async {
        reviews_at(config)
            .await
            .into_iter()
            .find(|(_, _, r)| r.intent_id == intent_id && r.reason == reason as i32)
    })
    .await
}

/// (intent id, commit sequence) of the committed effects, in topic order.
async fn effects_of(config: &Config, n: usize) -> Vec<(String, u64)> {
    let got = wait_for(
        config,
        &config.kafka.side_effects_topic,
        n,
        Duration::from_secs(30),
    )
    .await;
    effects(&got)
        .into_iter()
        .map(|e| (e.intent_id, e.commit_sequence))
        .collect()
}

async fn audit(config: &Config, contact: &str) -> Vec<(String, String, String)> {
    let pool = pg::pool(&config.postgres).unwrap();
    sqlx::query_as(
        "SELECT intent_id, to_state, reason FROM cc_transition WHERE contact_id = $1 ORDER BY id",
    )
    .bind(contact)
    .fetch_all(&pool)
    .await
    .unwrap()
}

async fn verify_ok(config: &Config, allow_waiting: bool) {
    let report = if allow_waiting {
        verify_allowing_waiting(config).await
    } else {
        verify_report(config, "").await
    };
    assert!(
        report.ok,
        "verify: {}",
        serde_json::to_string_pretty(&report).unwrap()
    );
}

/// The CLI on `config`'s world, off the async workers.
async fn run_cli(config: &Config, args: &[&str]) -> (bool, String, String) {
    let c = config.clone();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli(&c, &args)
    })
    .await
    .expect("cli thread")
}

/// An admin API without an engine (no partition owner), on `config`'s world.
async fn serve_alone(config: &Config) -> (causal_commit::admin::Server, CancellationToken) {
    let pool = pg::pool(&config.postgres).unwrap();
    pg::migrate(&pool, &config.postgres.schema).await.unwrap();
    let shutdown = CancellationToken::new();
    let server = causal_commit::admin::serve(
        Arc::new(config.clone()),
        pool,
        Arc::new(Health::default()),
        shutdown.clone(),
    )
    .await
    .expect("the admin API starts");
    (server, shutdown)
}

/// The status line of a raw request, with or without an Authorization header.
async fn raw_status(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    auth: Option<&str>,
) -> u16 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\n{auth}Content-Type: application/json\r\nContent-Length: 15\r\nConnection: close\r\n\r\n{{\"actor\":\"x\"}}\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    text.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_needs_the_configured_bearer_token_and_without_one_every_call_is_refused() {
    let mut env = TestEnv::new("adminauth", 1).await;
    with_admin(&mut env.config);
    env.config.admin.listen = "127.0.0.1:0".into();
    let (server, stop) = serve_alone(&env.config).await;
    let addr = server.addr;
    for (method, path) in [
        ("GET", "/v1/health"),
        ("GET", "/v1/ready"),
        ("GET", "/v1/backlog"),
        ("GET", "/v1/held"),
        ("GET", "/v1/contacts/c/reviews"),
        ("GET", "/v1/commands"),
        ("GET", "/v1/openapi.json"),
        ("POST", "/v1/contacts/c/release"),
        ("POST", "/v1/commands/1/cancel"),
    ] {
        assert_eq!(
            raw_status(addr, method, path, None).await,
            401,
            "{method} {path}"
        );
        for wrong in [
            "Bearer nope",
            "Bearer test-admin-toke",
            "Basic dGVzdC1hZG1pbi10b2tlbg==",
        ] {
            assert_eq!(
                raw_status(addr, method, path, Some(wrong)).await,
                401,
                "{method} {path} {wrong}"
            );
        }
        let ok = raw_status(addr, method, path, Some("Bearer test-admin-token")).await;
        assert!(ok != 401 && ok != 403, "{method} {path}: {ok}");
    }
    // Refused calls change nothing and write no audit row.
    let pool = pg::pool(&env.config.postgres).unwrap();
    let audited: i64 = sqlx::query_scalar("SELECT count(*) FROM cc_admin_audit WHERE actor = 'x'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(audited, 2, "only the two authenticated POSTs are audited");
    stop.cancel();
    server.task.await.unwrap();

    // No token configured: every call is refused, whatever the caller sends.
    env.config.admin.token = String::new().into();
    let (server, stop) = serve_alone(&env.config).await;
    for auth in [None, Some("Bearer "), Some("Bearer test-admin-token")] {
        assert_eq!(
            raw_status(server.addr, "GET", "/v1/health", auth).await,
            403
        );
        assert_eq!(
            raw_status(server.addr, "POST", "/v1/contacts/c/release", auth).await,
            403
        );
    }
    stop.cancel();
    server.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_to_above_2_pow_63_minus_1_is_refused_by_the_cli_and_the_api_and_nothing_is_queued() {
    let mut env = TestEnv::new("adminskip", 1).await;
    with_admin(&mut env.config);
    let (server, stop) = serve_alone(&env.config).await;
    let url = url(&env.config);
    for n in [
        "9223372036854775808",
        "18446744073709551615",
        "18446744073709551616",
        "0",
    ] {
        let (ok, _, stderr) = run_cli(
            &env.config,
            &[
                "release",
                "--contact",
                "c",
                "--skip-to",
                n,
                "--admin-url",
                &url,
            ],
        )
        .await;
        assert!(!ok, "--skip-to {n} accepted");
        assert!(
            stderr.contains("skip_to must be a whole number from 1 to 9223372036854775807"),
            "--skip-to {n}: {stderr}"
        );
    }
    let api = api(&env.config);
    for n in [
        "9223372036854775808",
        "18446744073709551616",
        "0",
        "-1",
        "2.5",
    ] {
        let body: serde_json::Value =
            serde_json::from_str(&format!(r#"{{"actor":"op","skip_to":{n}}}"#)).unwrap();
        let r = post(&api, "/v1/contacts/c/release", body).await;
        assert_eq!(r.status, 400, "skip_to {n}: {r:?}");
        assert!(
            r.error().contains("from 1 to 9223372036854775807"),
            "skip_to {n}: {}",
            r.error()
        );
    }
    // A malformed call is refused and audited too, under no actor's name.
    let r = post(
        &api,
        "/v1/contacts/c/release",
        serde_json::json!({ "actor": "op", "skip_to": 1, "force": true }),
    )
    .await;
    assert_eq!(r.status, 400, "{r:?}");
    let pool = pg::pool(&env.config.postgres).unwrap();
    let unnamed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM cc_admin_audit
          WHERE actor LIKE '(unnamed%' AND action = 'release'
            AND detail ->> 'result' LIKE 'refused (400)%unknown field%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(unnamed, 1);
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM cc_command")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(queued, 0, "nothing queued");
    let refused: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM cc_admin_audit
          WHERE actor = 'op' AND action = 'skip_to' AND detail ->> 'result' LIKE 'refused (400)%'
            AND detail ->> 'auth' = 'bearer token valid'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(refused, 5, "each refused call is audited with its result");
    stop.cancel();
    server.task.await.unwrap();
}

/// The store's side of a command's life, step by step, with batches written as the engine
/// writes them: applied only once the batch is committed; a batch that never commits leaves
/// the command pending (the restore) and a later batch applies it again; a cancelled command
/// fails the batch that would apply it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_is_applied_only_once_its_batch_commits_and_an_aborted_batch_leaves_it_pending() {
    let env = TestEnv::new("admincmd", 1).await;
    let topic = env.config.kafka.intents_topic.clone();
    let pool = env.store().await;
    sqlx::query(
        "INSERT INTO cc_contact (contact_id, topic, partition, batch_no, state, on_hold)
         VALUES ('c', $1, 0, 0, '{}', true)",
    )
    .bind(&topic)
    .execute(&pool)
    .await
    .unwrap();
    let lease = Duration::from_secs(30);
    let fence = pg::acquire_partition(&pool, &topic, 0, "w", lease)
        .await
        .unwrap()
        .unwrap();
    let queue = || async {
        pg::queue_command(
            &pool,
            &pg::NewCommand {
                topic: &topic,
                contact_id: "c",
                action: pg::CommandAction::Resume,
                actor: "op",
                auth: "test",
            },
        )
        .await
        .unwrap()
        .expect("queued")
        .id
    };
    let write = |batch_no: u64, id: i64| BatchWrite {
        partitions: vec![PartitionWrite {
            partition: 0,
            fence,
            batch_no,
            next_offset: batch_no as i64,
            clock_ms: 0,
        }],
        commands: vec![AppliedCommand {
            id,
            partition: 0,
            batch_no,
            result: CommandResult::Applied,
        }],
        ..BatchWrite::default()
    };
    let state = |id: i64| {
        let pool = pool.clone();
        async move { pg::command(&pool, id).await.unwrap().unwrap().state }
    };
    let unfinished = || async {
        pg::list_commands(&pool, &topic, true, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.id)
            .collect::<Vec<_>>()
    };

    let first = queue().await;
    assert_eq!(state(first).await, CommandState::Pending);
    pg::apply_batch(&pool, &topic, "w", lease, &write(1, first))
        .await
        .unwrap();
    assert_eq!(
        state(first).await,
        CommandState::Applying { batch: 1 },
        "written, but its Kafka transaction has not committed"
    );
    assert_eq!(unfinished().await, vec![first]);
    pg::mark_committed(&pool, &topic, &[(0, fence, 1)])
        .await
        .unwrap();
    assert_eq!(state(first).await, CommandState::Applied { batch: 1 });
    assert!(unfinished().await.is_empty());

    // Batch 2 applies the second command, and its Kafka transaction never commits: the
    // restore (Kafka's recovery point is batch 1) makes the command pending again.
    let second = queue().await;
    pg::apply_batch(&pool, &topic, "w", lease, &write(2, second))
        .await
        .unwrap();
    assert_eq!(state(second).await, CommandState::Applying { batch: 2 });
    let committed = KafkaCommitted::Point {
        offset: 1,
        point: RecoveryPoint {
            batch: 1,
            fence,
            clock_ms: 0,
        },
    };
    pg::restore_partition(&pool, &topic, 0, fence, "g", &committed, Default::default())
        .await
        .unwrap();
    assert_eq!(state(second).await, CommandState::Pending);
    assert_eq!(state(first).await, CommandState::Applied { batch: 1 });
    // Applied again by the replayed batch 2, which commits this time.
    pg::apply_batch(&pool, &topic, "w", lease, &write(2, second))
        .await
        .unwrap();
    pg::mark_committed(&pool, &topic, &[(0, fence, 2)])
        .await
        .unwrap();
    assert_eq!(state(second).await, CommandState::Applied { batch: 2 });

    // Cancelled while the owner was building the batch that applies it: the batch fails as a
    // whole (CC004) and the command stays cancelled; cancelling an applied command does
    // nothing.
    let third = queue().await;
    let (cancelled, view) = pg::cancel_command(&pool, third, "op", "test")
        .await
        .unwrap()
        .unwrap();
    assert!(cancelled);
    assert!(matches!(view.state, CommandState::Cancelled { ref by, .. } if by == "op"));
    let e = pg::apply_batch(&pool, &topic, "w", lease, &write(3, third))
        .await
        .unwrap_err();
    assert_eq!(e.sqlstate().as_deref(), Some("CC004"), "{e}");
    assert!(matches!(state(third).await, CommandState::Cancelled { .. }));
    let (cancelled, view) = pg::cancel_command(&pool, first, "op", "test")
        .await
        .unwrap()
        .unwrap();
    assert!(!cancelled);
    assert_eq!(view.state, CommandState::Applied { batch: 1 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_cli_release_cancels_its_pending_command_or_reports_it_pending_and_is_never_applied_after_cancelling(
) {
    let (env, running, api) = held_world("admintimeout", Duration::from_secs(2)).await;
    produce_intents(&env.config, &[intent("t-2", "late", 2)]).await;
    wait_held(&api, "late").await;
    running.stop().await;

    // No instance owns the partition now: the commands stay pending.
    let (server, stop) = serve_alone(&env.config).await;
    let (ok, out, err) = run_cli(
        &env.config,
        &["release", "--contact", "late", "--wait", "2s"],
    )
    .await;
    assert!(!ok, "{out}");
    assert!(err.contains("is still pending after 2s"), "{err}");
    assert!(err.contains("causal-commit commands cancel"), "{err}");
    let reported: i64 = serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"]
        .as_i64()
        .unwrap();
    let (ok, out, _) = run_cli(&env.config, &["commands", "list"]).await;
    assert!(ok);
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed["commands"][0]["id"], reported);
    assert_eq!(listed["commands"][0]["state"], "pending");

    let (ok, _, err) = run_cli(
        &env.config,
        &[
            "release",
            "--contact",
            "late",
            "--skip-to",
            "2",
            "--wait",
            "1s",
            "--cancel-on-timeout",
        ],
    )
    .await;
    assert!(!ok);
    assert!(err.contains("cancelled, nothing was changed"), "{err}");
    let (ok, _, err) = run_cli(&env.config, &["commands", "cancel", &reported.to_string()]).await;
    assert!(ok, "{err}");
    let (ok, out, _) = run_cli(&env.config, &["commands", "list"]).await;
    assert!(ok);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["commands"],
        serde_json::json!([]),
        "nothing is left pending"
    );
    stop.cancel();
    server.task.await.unwrap();

    // The owner comes back: the cancelled commands are never applied, the contact stays held.
    let mut running = start(env.config());
    wait_ready(&api, &mut running).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let held = wait_held(&api, "late").await;
    assert_eq!(held["missing_sequence"], 1);
    let rows = audit(&env.config, "late").await;
    assert!(
        !rows
            .iter()
            .any(|(_, s, _)| s == "released" || s == "skipped"),
        "{rows:?}"
    );
    // A release that is waited for is applied, and reads so only once committed.
    let (ok, out, err) = run_cli(
        &env.config,
        &["release", "--contact", "late", "--wait", "30s"],
    )
    .await;
    assert!(ok, "{out} {err}");
    let applied: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(applied["state"], "applied");
    let backlog = get(&api, "/v1/backlog").await;
    assert_eq!(backlog["partitions"][0]["contacts_held"], 0);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_clears_the_hold_but_not_the_gap_so_a_new_intent_waits_with_a_fresh_wait_timeout() {
    let mut env = TestEnv::new("adminresume", 1).await;
    env.config.sequencer.wait_timeout = Duration::from_secs(3);
    with_admin(&mut env.config);
    let mut running = start(env.config());
    let api = api(&env.config);
    wait_ready(&api, &mut running).await;
    produce_intents(&env.config, &[intent("r-2", "gap", 2)]).await;
    let held = wait_held(&api, "gap").await;
    assert_eq!(held["reason"], "WAIT_TIMEOUT");
    assert_eq!(held["missing_sequence"], 1);
    assert!(held["held_since_ms"].as_i64().unwrap() > 0);

    let (ok, out, err) = run_cli(&env.config, &["release", "--contact", "gap"]).await;
    assert!(ok, "{out} {err}");
    let contact = get(&api, "/v1/contacts/gap").await;
    assert_eq!(
        contact["state"]["hold"],
        serde_json::Value::Null,
        "hold cleared"
    );
    assert_eq!(
        contact["state"]["resolved_through"], 0,
        "sequence 1 still missing"
    );

    // A new intent is not CONTACT_ON_HOLD: it waits behind the gap ...
    let sent = Instant::now();
    produce_intents(&env.config, &[intent("r-3", "gap", 3)]).await;
    let waiting = eventually(Duration::from_secs(30), "r-3 waiting", || async {
        let c = get(&api, "/v1/contacts/gap").await;
        let w = c["state"]["waiting"].as_array()?.first()?.clone();
        (w["intent_id"] == "r-3").then_some(w)
    })
    .await;
    assert_eq!(waiting["commit_sequence"], 3);
    assert!(waiting["waiting_since_ms"].as_i64().is_some());
    let backlog = get(&api, "/v1/backlog").await;
    assert_eq!(backlog["partitions"][0]["waiting"], 1);
    assert!(
        backlog["partitions"][0]["oldest_waiting_age_ms"]
            .as_i64()
            .unwrap()
            >= 0
    );
    // ... and times out after a fresh wait_timeout, holding the contact again.
    let (_, _, review) = wait_review(&env.config, "r-3", ReviewReason::WaitTimeout).await;
    assert!(sent.elapsed() >= Duration::from_secs(3));
    assert!(review.waited_ms >= 3000, "waited {} ms", review.waited_ms);
    assert_eq!(review.expected_sequence, 1);
    let held = wait_held(&api, "gap").await;
    assert_eq!(held["missing_sequence"], 1);
    running.stop().await;
    let rows = audit(&env.config, "gap").await;
    assert!(
        !rows
            .iter()
            .any(|(i, _, r)| i == "r-3" && r == "CONTACT_ON_HOLD"),
        "{rows:?}"
    );
    verify_ok(&env.config, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_resubmission_releases_the_intents_effect_in_order_and_is_audited() {
    let (env, running, api) = held_world("adminresub", Duration::from_secs(2)).await;
    produce_intents(&env.config, &[intent("s-2", "late", 2)]).await;
    let (p, offset, _) = wait_review(&env.config, "s-2", ReviewReason::WaitTimeout).await;
    wait_held(&api, "late").await;
    let (ok, out, err) = run_cli(&env.config, &["release", "--contact", "late"]).await;
    assert!(ok, "{out} {err}");
    produce_intents(&env.config, &[intent("s-1", "late", 1)]).await;
    assert_eq!(
        effects_of(&env.config, 1).await,
        vec![("s-1".to_string(), 1)]
    );

    let (ok, out, err) = run_cli(
        &env.config,
        &[
            "resubmit",
            "--partition",
            &p.to_string(),
            "--offset",
            &offset.to_string(),
            "--actor",
            "alice",
        ],
    )
    .await;
    assert!(ok, "{out} {err}");
    let applied: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(applied["state"], "applied");
    assert_eq!(applied["intent_id"], "s-2");
    produce_intents(&env.config, &[intent("s-3", "late", 3)]).await;
    let got = effects_of(&env.config, 3).await;
    assert_eq!(
        got,
        vec![
            ("s-1".to_string(), 1),
            ("s-2".to_string(), 2),
            ("s-3".to_string(), 3)
        ]
    );
    // A second re-submission of the same item is refused: the intent is committed now.
    let r = post(
        &api,
        "/v1/resubmissions",
        serde_json::json!({ "actor": "alice", "partition": p, "offset": offset }),
    )
    .await;
    assert_eq!(r.status, 409, "{r:?}");
    running.stop().await;

    let rows = audit(&env.config, "late").await;
    let s2: Vec<(&str, &str)> = rows
        .iter()
        .filter(|(i, _, _)| i == "s-2")
        .map(|(_, s, r)| (s.as_str(), r.as_str()))
        .collect();
    assert_eq!(
        s2,
        vec![
            ("waiting_previous_commit", ""),
            ("manual_review", "WAIT_TIMEOUT"),
            ("resubmitted", "OPERATOR"),
            ("committed_causal", "")
        ]
    );
    let pool = pg::pool(&env.config.postgres).unwrap();
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM cc_admin_audit
          WHERE actor = 'alice' AND action = 'resubmit' AND detail ->> 'intent_id' = 's-2'
            AND detail ->> 'auth' = 'bearer token valid' AND detail ->> 'result' = 'queued'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(audited, 1);
    verify_ok(&env.config, false).await;
}

/// Posts `bodies` to `path` within a second, as operators who click together: the k-th after
/// k × 450 ms, so that they fall in one command poll (1 s) or in two, and waits for each queued
/// command's final state. Returns how many were applied, and the answers of the rest (refused
/// commands' reasons, or the API's refusals).
async fn post_at_once(
    api: &Client,
    path: &str,
    bodies: Vec<serde_json::Value>,
) -> (usize, Vec<String>) {
    let posts = bodies.into_iter().enumerate().map(|(k, b)| async move {
        tokio::time::sleep(Duration::from_millis(450) * k as u32).await;
        post(api, path, b).await
    });
    let mut applied = 0;
    let mut others = Vec::new();
    for r in futures::future::join_all(posts).await {
        if r.status != 202 {
            assert_eq!(r.status, 409, "queued, or refused as done already: {r:?}");
            others.push(r.body.to_string());
            continue;
        }
        let id = r.body["id"].as_i64().expect("the command's id");
        let done = eventually(Duration::from_secs(30), "the command's result", || async {
            let c = get(api, &format!("/v1/commands/{id}")).await;
            matches!(c["state"].as_str(), Some("applied" | "refused")).then_some(c)
        })
        .await;
        if done["state"] == "applied" {
            applied += 1;
        } else {
            others.push(done["reason"].to_string());
        }
    }
    (applied, others)
}

/// Three operators' re-submissions of the review at `partition`/`offset`, within a second.
async fn resubmit_at_once(api: &Client, partition: i32, offset: i64) -> (usize, Vec<String>) {
    let bodies = (0..3)
        .map(|k| {
            serde_json::json!({ "actor": format!("op{k}"), "partition": partition, "offset": offset })
        })
        .collect();
    post_at_once(api, "/v1/resubmissions", bodies).await
}

/// Three operators release one held contact within a second, then three re-submit one review
/// item within a second, twice: once for an intent whose predecessor has committed (it
/// commits at once), once for one whose predecessor is still missing (it waits). Each time
/// exactly one command is applied, the others are refused (by the API, or as commands), and
/// the intent's effect comes out once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_releasing_or_resubmitting_together_apply_it_once() {
    // Long enough for b-2, re-submitted while b-1 is missing, to wait for b-1 without timing
    // out again.
    let (env, running, api) = held_world("admindouble", Duration::from_secs(15)).await;
    produce_intents(&env.config, &[intent("a-2", "a", 2), intent("b-2", "b", 2)]).await;
    let (pa, oa, _) = wait_review(&env.config, "a-2", ReviewReason::WaitTimeout).await;
    let (pb, ob, _) = wait_review(&env.config, "b-2", ReviewReason::WaitTimeout).await;
    for contact in ["a", "b"] {
        wait_held(&api, contact).await;
        let bodies = (0..3)
            .map(|k| serde_json::json!({ "actor": format!("op{k}") }))
            .collect();
        let (applied, others) =
            post_at_once(&api, &format!("/v1/contacts/{contact}/release"), bodies).await;
        println!("{contact} released; the others: {others:?}");
        assert_eq!(
            applied, 1,
            "{contact} released once; the others: {others:?}"
        );
        assert_eq!(others.len(), 2);
    }
    produce_intents(&env.config, &[intent("a-1", "a", 1)]).await;
    assert_eq!(
        effects_of(&env.config, 1).await,
        vec![("a-1".to_string(), 1)]
    );

    let (applied, others) = resubmit_at_once(&api, pa, oa).await;
    println!("a-2 re-submitted; the others: {others:?}");
    assert_eq!(applied, 1, "a-2 reopened once; the others: {others:?}");
    assert_eq!(others.len(), 2);
    assert_eq!(
        effects_of(&env.config, 2).await,
        vec![("a-1".to_string(), 1), ("a-2".to_string(), 2)]
    );

    let (applied, others) = resubmit_at_once(&api, pb, ob).await;
    println!("b-2 re-submitted; the others: {others:?}");
    assert_eq!(applied, 1, "b-2 reopened once; the others: {others:?}");
    assert_eq!(others.len(), 2);
    // While b-2 waits, its item reads re-submitted, not re-submittable, and a fourth operator
    // is told why.
    let items = get(&api, "/v1/contacts/b/reviews").await;
    let item = items["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|i| i["intent_id"] == "b-2")
        .unwrap_or_else(|| panic!("b-2's item listed: {items}"));
    assert_eq!(item["outcome"], "resubmitted", "{item}");
    assert_eq!(item["resubmittable"], false, "{item}");
    let r = post(
        &api,
        "/v1/resubmissions",
        serde_json::json!({ "actor": "op3", "partition": pb, "offset": ob }),
    )
    .await;
    assert_eq!(r.status, 409, "{r:?}");
    assert!(
        r.body["message"]
            .as_str()
            .is_some_and(|m| m.contains("re-submitted already")),
        "{r:?}"
    );
    produce_intents(&env.config, &[intent("b-1", "b", 1)]).await;
    let got = effects_of(&env.config, 4).await;
    assert_eq!(
        got[2..],
        [("b-1".to_string(), 1), ("b-2".to_string(), 2)],
        "b's effects once each, in order: {got:?}"
    );
    running.stop().await;
    let rows = audit(&env.config, "b").await;
    assert_eq!(
        rows.iter()
            .filter(|(i, s, _)| i == "b-2" && s == "resubmitted")
            .count(),
        1,
        "one re-submission of b-2 audited: {rows:?}"
    );
    // Each of the thirteen requests, taken or refused, has its row in the admin audit.
    let pool = pg::pool(&env.config.postgres).unwrap();
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM cc_admin_audit WHERE actor IN ('op0', 'op1', 'op2', 'op3')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(audited, 13);
    verify_ok(&env.config, false).await;
}

/// The listing's items as (partition, offset, reason, resubmittable).
fn listed(body: &serde_json::Value) -> Vec<(i64, i64, String, bool)> {
    body["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| {
            (
                i["partition"].as_i64().unwrap(),
                i["offset"].as_i64().unwrap(),
                i["reason"].as_str().unwrap_or_default().to_string(),
                i["resubmittable"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// The last JSON document a CLI command printed (operator commands print one per command).
fn last_json(out: &str) -> serde_json::Value {
    serde_json::Deserializer::from_str(out)
        .into_iter::<serde_json::Value>()
        .filter_map(Result::ok)
        .last()
        .unwrap_or_else(|| panic!("no JSON printed: {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contacts_review_items_are_listed_with_where_they_are_and_whether_a_resubmission_takes_them(
) {
    let (env, running, api) = held_world("adminreviews", Duration::from_secs(2)).await;
    // Nothing reviewed for the contact yet: nothing listed, the topic not read.
    let none = get(&api, "/v1/contacts/late/reviews").await;
    assert_eq!(none["items"], serde_json::json!([]), "{none}");
    assert!(none["read_from_ms"].is_null(), "{none}");

    // late: s-2 times out and holds it, s-3 then goes to review behind the hold, and a record
    // keyed late that is no intent at all is invalid. Another held contact's item sits on the
    // same partition of the review topic.
    produce_intents(
        &env.config,
        &[intent("s-2", "late", 2), intent("o-2", "other", 2)],
    )
    .await;
    wait_review(&env.config, "s-2", ReviewReason::WaitTimeout).await;
    wait_review(&env.config, "o-2", ReviewReason::WaitTimeout).await;
    wait_held(&api, "late").await;
    produce_intents(&env.config, &[intent("s-3", "late", 3)]).await;
    produce_raw(
        &env.config,
        &[(Some(b"late".to_vec()), b"\xff\xfe not an intent".to_vec())],
    )
    .await;
    wait_review(&env.config, "s-3", ReviewReason::ContactOnHold).await;
    let truth = eventually(
        Duration::from_secs(60),
        "the invalid record's review",
        || async {
            let of_late: Vec<(i64, i64, String, bool)> = reviews_at(&env.config)
                .await
                .into_iter()
                .filter(|(_, _, r)| r.original_key.as_ref() == b"late")
                .map(|(p, o, r)| {
                    let reason = ReviewReason::try_from(r.reason).unwrap();
                    let reopenable = matches!(
                        reason,
                        ReviewReason::WaitTimeout | ReviewReason::ContactOnHold
                    );
                    (
                        i64::from(p),
                        o,
                        reason.as_str_name().to_string(),
                        reopenable,
                    )
                })
                .collect();
            (of_late.len() == 3).then_some(of_late)
        },
    )
    .await;
    assert_eq!(
        truth.iter().map(|t| t.2.as_str()).collect::<Vec<_>>(),
        ["WAIT_TIMEOUT", "CONTACT_ON_HOLD", "INVALID_INTENT"]
    );

    // Exactly the contact's items (not the other contact's), by offset, each with where it is
    // and whether a re-submission would be taken.
    let body = get(&api, "/v1/contacts/late/reviews").await;
    assert_eq!(listed(&body), truth, "{body}");
    assert_eq!(body["more"], false);
    let items = body["items"].as_array().unwrap();
    assert_eq!(items[0]["intent_id"], "s-2");
    assert_eq!(items[0]["received_sequence"], 2);
    assert_eq!(items[0]["outcome"], "manual_review");
    assert!(items[0]["why_not"].is_null());
    assert_eq!(items[1]["intent_id"], "s-3");
    assert!(
        items[2]["why_not"]
            .as_str()
            .is_some_and(|w| w.contains("INVALID_INTENT")),
        "{body}"
    );
    let first = get(&api, "/v1/contacts/late/reviews?limit=1").await;
    assert_eq!(listed(&first), truth[..1].to_vec(), "{first}");
    assert_eq!(first["more"], true);
    // The CLI prints the same listing.
    let (ok, out, err) = run_cli(&env.config, &["reviews", "late"]).await;
    assert!(ok, "{out} {err}");
    let printed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(printed, body);

    // The operator works the list. A contact still on hold is refused (its items would go
    // straight back to review), nothing queued.
    let (ok, out, err) = run_cli(&env.config, &["resubmit", "--contact", "other"]).await;
    assert!(!ok && err.contains("on hold"), "{out} {err}");
    // Skip past the lost sequence 1, then re-submit every item a re-submission takes, in the
    // order they were reviewed: s-2, then s-3; the invalid record is left, with why.
    let (ok, out, err) = run_cli(
        &env.config,
        &["release", "--contact", "late", "--skip-to", "2"],
    )
    .await;
    assert!(ok, "{out} {err}");
    let (ok, out, err) = run_cli(&env.config, &["resubmit", "--contact", "late"]).await;
    assert!(ok, "{out} {err}");
    let summary = last_json(&out);
    let resubmitted: Vec<(i64, i64)> = summary["resubmitted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["partition"].as_i64().unwrap(),
                i["offset"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        resubmitted,
        vec![(truth[0].0, truth[0].1), (truth[1].0, truth[1].1)],
        "{out}"
    );
    assert_eq!(summary["not_resubmitted"][0]["offset"], truth[2].1, "{out}");
    assert_eq!(
        effects_of(&env.config, 2).await,
        vec![("s-2".to_string(), 2), ("s-3".to_string(), 3)]
    );
    // The items are decided now: listed as committed, not re-submittable, and a second run
    // re-submits nothing.
    let after = get(&api, "/v1/contacts/late/reviews").await;
    for item in &after["items"].as_array().unwrap()[..2] {
        assert_eq!(item["outcome"], "committed_causal", "{after}");
        assert_eq!(item["resubmittable"], false, "{after}");
        assert!(
            item["why_not"]
                .as_str()
                .is_some_and(|w| w.contains("committed_causal")),
            "{after}"
        );
    }
    let (ok, out, err) = run_cli(&env.config, &["resubmit", "--contact", "late"]).await;
    assert!(ok, "{out} {err}");
    assert_eq!(
        last_json(&out)["resubmitted"],
        serde_json::json!([]),
        "{out}"
    );
    running.stop().await;
    // `other` is still held with its item in review.
    verify_ok(&env.config, true).await;
}

/// The review item of `intent_id` with `reason`, the `nth` such record (0: the first).
async fn nth_review(
    config: &Config,
    intent_id: &str,
    reason: ReviewReason,
    nth: usize,
) -> (i32, i64) {
    eventually(Duration::from_secs(60), "a review record", || async {
        reviews_at(config)
            .await
            .into_iter()
            .filter(|(_, _, r)| r.intent_id == intent_id && r.reason == reason as i32)
            .nth(nth)
            .map(|(p, o, _)| (p, o))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resubmitted_intent_that_waits_again_times_out_again_and_commits_once_its_predecessor_comes(
) {
    let (env, running, api) = held_world("adminrewait", Duration::from_secs(5)).await;
    let resubmit = |(p, o): (i32, i64)| {
        let config = env.config.clone();
        async move {
            let (ok, out, err) = run_cli(
                &config,
                &[
                    "resubmit",
                    "--partition",
                    &p.to_string(),
                    "--offset",
                    &o.to_string(),
                ],
            )
            .await;
            assert!(ok, "{out} {err}");
        }
    };
    let resume = || {
        let config = env.config.clone();
        async move {
            let (ok, out, err) = run_cli(&config, &["release", "--contact", "w"]).await;
            assert!(ok, "{out} {err}");
        }
    };
    produce_intents(&env.config, &[intent("w-2", "w", 2)]).await;
    let first = nth_review(&env.config, "w-2", ReviewReason::WaitTimeout, 0).await;
    wait_held(&api, "w").await;
    // Re-submitted while sequence 1 is still missing, w-2 waits again, with a fresh wait
    // timeout, and times out again: a second review, the contact held again.
    resume().await;
    resubmit(first).await;
    let second = nth_review(&env.config, "w-2", ReviewReason::WaitTimeout, 1).await;
    wait_held(&api, "w").await;
    // Re-submitted again, it waits, across a restart of the instance (its reopening is read
    // back from PostgreSQL); sequence 1 comes: both commit, in order, and the partition goes on
    // (another contact's intent after them commits too).
    resume().await;
    resubmit(second).await;
    running.stop().await;
    let mut running = start(env.config());
    wait_ready(&api, &mut running).await;
    produce_intents(&env.config, &[intent("w-1", "w", 1), intent("x-1", "x", 1)]).await;
    assert_eq!(
        effects_of(&env.config, 3).await,
        vec![
            ("w-1".to_string(), 1),
            ("w-2".to_string(), 2),
            ("x-1".to_string(), 1)
        ]
    );
    running.stop().await;
    verify_ok(&env.config, false).await;
}

/// The batch that finally decides a re-submitted intent that waited is written to PostgreSQL
/// and aborts in Kafka (the instance's producer is fenced while it sits idle). Its restore must
/// roll back what that batch wrote of the intent (its idempotency row above all: the claim
/// reopens an id only while no decision follows its re-submission), so that the replay finds
/// the intent still reopened and commits it once, in order, instead of refusing the batch as
/// deciding it a second time and stalling the partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resubmitted_waiting_intent_whose_deciding_batch_aborts_commits_once_on_the_replay() {
    let mut env = TestEnv::new("adminreabort", 1).await;
    // Long enough for the fence and the predecessor to come before the re-submitted intent
    // times out again.
    env.config.sequencer.wait_timeout = Duration::from_secs(15);
    with_admin(&mut env.config);
    let cfg = env.config.clone();
    let log = crate::failures::log_path(&env, "run");
    let proc = Processor::spawn(&cfg, log.clone());
    let api = api(&cfg);
    eventually(Duration::from_secs(90), "the instance ready", || async {
        matches!(api.get("/v1/ready").await, Ok(r) if r.status == 200).then_some(())
    })
    .await;

    produce_intents(&cfg, &[intent("w-2", "w", 2)]).await;
    let (p, o, _) = wait_review(&cfg, "w-2", ReviewReason::WaitTimeout).await;
    wait_held(&api, "w").await;
    for args in [
        vec!["release", "--contact", "w"],
        vec![
            "resubmit",
            "--partition",
            &p.to_string(),
            "--offset",
            &o.to_string(),
        ],
    ] {
        let (ok, out, err) = run_cli(&cfg, &args).await;
        assert!(ok, "{args:?}: {out} {err}");
    }
    // The re-submission's batch committed: w-2 waits again, reopened.
    eventually(Duration::from_secs(30), "w-2's resubmitted row", || async {
        audit(&cfg, "w")
            .await
            .iter()
            .any(|(i, s, _)| i == "w-2" && s == "resubmitted")
            .then_some(())
    })
    .await;
    caught_up(&cfg, Duration::from_secs(30)).await;

    crate::failures::aborted_release_replays(
        &cfg,
        &log,
        &[intent("w-1", "w", 1), intent("x-1", "x", 1)],
        3,
        "w-1 and x-1 committed, w-2 released: rolled back, then replayed",
    )
    .await;
    assert!(proc.terminate(Duration::from_secs(30)));
    assert_eq!(
        effects_of(&cfg, 3).await,
        vec![
            ("w-1".to_string(), 1),
            ("w-2".to_string(), 2),
            ("x-1".to_string(), 1)
        ],
        "each effect once, in order"
    );
    let w = audit(&cfg, "w").await;
    assert_eq!(
        w.iter()
            .filter(|(i, s, _)| i == "w-2" && s.starts_with("committed"))
            .count(),
        1,
        "one committed decision of w-2 stays in the audit: {w:?}"
    );
    verify_ok(&cfg, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_carrying_the_old_resubmission_header_reopens_nothing() {
    let (env, running, api) = held_world("adminheader", Duration::from_secs(2)).await;
    let two = intent("h-2", "c", 2);
    produce_intents(&env.config, std::slice::from_ref(&two)).await;
    wait_review(&env.config, "h-2", ReviewReason::WaitTimeout).await;
    wait_held(&api, "c").await;
    let (ok, out, err) = run_cli(&env.config, &["release", "--contact", "c"]).await;
    assert!(ok, "{out} {err}");
    produce_intents(&env.config, &[intent("h-1", "c", 1)]).await;
    assert_eq!(effects_of(&env.config, 1).await.len(), 1);

    // A producer sends the reviewed intent again, claiming to be a re-submission.
    let value = two.encode_to_vec();
    producer(&env.config)
        .send(
            FutureRecord::to(&env.config.kafka.intents_topic)
                .key("c")
                .payload(&value)
                .headers(OwnedHeaders::new().insert(Header {
                    key: "cc-resubmission",
                    value: Some("1"),
                })),
            Duration::from_secs(10),
        )
        .await
        .expect("delivered");
    let rows = eventually(Duration::from_secs(30), "the duplicate's row", || async {
        let rows = audit(&env.config, "c").await;
        rows.iter()
            .any(|(i, s, _)| i == "h-2" && s == "duplicate")
            .then_some(rows)
    })
    .await;
    running.stop().await;
    assert!(!rows.iter().any(|(_, s, _)| s == "resubmitted"), "{rows:?}");
    let got = effects_of(&env.config, 1).await;
    assert_eq!(got, vec![("h-1".to_string(), 1)], "the decision stands");
    // Slot 2 stays unresolved (in review): allowed as pending work, nothing else.
    verify_ok(&env.config, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_audit_transition_is_accepted_by_the_databases_check_constraints() {
    let env = TestEnv::new("admintransitions", 1).await;
    let pool = env.store().await;
    let topic = &env.config.kafka.intents_topic;
    let fence = pg::acquire_partition(&pool, topic, 0, "w", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    let transitions: Vec<TransitionRow> = Transition::all()
        .into_iter()
        .map(|transition| TransitionRow {
            partition: 0,
            batch_no: 1,
            source_offset: 0,
            intent_id: "i".into(),
            contact_id: "c".into(),
            clinic_id: String::new(),
            correlation_id: String::new(),
            transition,
            commit_sequence: 1,
            contact_version: 0,
            fingerprint: 0,
            detail: String::new(),
            fence,
        })
        .collect();
    let n = transitions.len();
    let w = BatchWrite {
        partitions: vec![PartitionWrite {
            partition: 0,
            fence,
            batch_no: 1,
            next_offset: 1,
            clock_ms: 0,
        }],
        transitions,
        ..BatchWrite::default()
    };
    pg::apply_batch(&pool, topic, "w", Duration::from_secs(30), &w)
        .await
        .expect("every transition is storable");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM cc_transition")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored as usize, n);
    // And the constraint still refuses what is not in the vocabulary.
    let bad = sqlx::query(
        "INSERT INTO cc_transition (topic, partition, batch_no, source_offset, intent_id, contact_id,
                                    clinic_id, correlation_id, from_state, to_state, writer, fence)
         VALUES ($1, 0, 1, 0, 'i', 'c', '', '', 'received', 'reopened', 'w', 1)",
    )
    .bind(topic)
    .execute(&pool)
    .await;
    assert!(bad.is_err());
}

/// The venv of `scripts/stack.sh` (`CC_VENV`, else `.stack/venv` of the checkout).
fn schemathesis() -> std::path::PathBuf {
    let venv = std::env::var("CC_VENV").map_or_else(
        |_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".stack/venv"),
        std::path::PathBuf::from,
    );
    venv.join("bin/schemathesis")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_undocumented_response() {
    let (env, running, api) = held_world("adminfuzz", Duration::from_secs(2)).await;
    // Something to read: a held contact, a review, a command.
    produce_intents(
        &env.config,
        &[intent("f-2", "fuzz", 2), intent("f-9", "other", 1)],
    )
    .await;
    wait_held(&api, "fuzz").await;
    let schema = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/admin/openapi.json");
    let url = url(&env.config);
    let out = tokio::process::Command::new(schemathesis())
        .arg("run")
        .arg(&schema)
        .args(["--url", &url])
        .args(["--header", &format!("Authorization: Bearer {TOKEN}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance,negative_data_rejection,unsupported_method,ignored_auth",
        ])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", "25", "--workers", "1", "--seed", "7"])
        .args(["--suppress-health-check", "all"])
        .env("SCHEMATHESIS_HOOKS", "")
        .env("NO_COLOR", "1")
        .output()
        .await
        .expect("schemathesis runs (scripts/stack.sh installs it in .stack/venv)");
    running.stop().await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{stdout}\n{stderr}"
    );
    // It ran: every documented operation was tested.
    let operations = serde_json::from_str::<serde_json::Value>(causal_commit::admin::OPENAPI)
        .unwrap()["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| p.as_object().unwrap().len())
        .sum::<usize>();
    assert!(
        stdout.contains(&format!("Tested: {operations}")),
        "schemathesis did not test all {operations} operations:\n{stdout}"
    );
}

/// A re-submission the store refuses: w-2 timed out, and since then a DBA added a limit its
/// waiting row breaks, so once re-submitted (sequence 1 still missing) its batch cannot be
/// written. The command is refused with the store's error, the partition flows on, and no
/// record is blamed: not when the command's batch holds it alone, not when it holds records of
/// the partition too. w-2's item stays in manual review, re-submittable; once the limit is gone
/// the operator re-submits it, w-1 comes, and both commit once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resubmission_the_store_refuses_is_refused_and_never_stalls_or_blames_a_record() {
    let (env, running, api) = held_world("adminunproc", Duration::from_secs(3)).await;
    let cfg = env.config.clone();
    let resubmit_args = |(p, o): (i32, i64)| {
        vec![
            "resubmit".to_string(),
            "--partition".into(),
            p.to_string(),
            "--offset".into(),
            o.to_string(),
        ]
    };
    let cli_run = |args: Vec<String>| {
        let config = cfg.clone();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_cli(&config, &args).await
        }
    };
    let mut w2 = intent("w-2", "w", 2);
    w2.payload = vec![b'x'; 3_000].into();
    produce_intents(&cfg, &[w2]).await;
    let first = nth_review(&cfg, "w-2", ReviewReason::WaitTimeout, 0).await;
    wait_held(&api, "w").await;

    let pool = sqlx::PgPool::connect(&database_url()).await.unwrap();
    let limit = |sql: &str| {
        let pool = pool.clone();
        let sql = format!("ALTER TABLE {}.cc_waiting {sql}", cfg.postgres.schema);
        async move { sqlx::query(&sql).execute(&pool).await.unwrap() }
    };
    limit("ADD CONSTRAINT test_small_entry CHECK (octet_length(entry::text) < 2000) NOT VALID")
        .await;
    let (ok, out, err) = cli_run(vec!["release".into(), "--contact".into(), "w".into()]).await;
    assert!(ok, "release: {out} {err}");

    // The command alone in its batch.
    let (ok, out, err) = cli_run(resubmit_args(first)).await;
    assert!(!ok, "refused: {out} {err}");
    assert!(
        format!("{out} {err}").contains("the durable store refuses what this command writes"),
        "the refusal names its cause: {out} {err}"
    );
    produce_intents(&cfg, &[intent("x-1", "x", 1)]).await;
    assert_eq!(
        effects_of(&cfg, 1).await,
        vec![("x-1".to_string(), 1)],
        "the partition flows on"
    );
    let items = get(&api, "/v1/contacts/w/reviews").await;
    let listed = items["items"].as_array().expect("items");
    assert_eq!(listed.len(), 1, "no other review of w: {items}");
    assert_eq!(listed[0]["outcome"], "manual_review", "{items}");
    assert_eq!(listed[0]["resubmittable"], true, "{items}");

    // The command with records of its partition in one batch: the instance stopped, the
    // command queued through an admin API of its own, records produced, the instance started.
    running.stop().await;
    let mut alone = cfg.clone();
    alone.admin.listen = "127.0.0.1:0".into();
    let (server, stop) = serve_alone(&alone).await;
    let side_api = Client::new(&format!("http://{}", server.addr), TOKEN.to_string().into())
        .expect("an admin client");
    let r = post(
        &side_api,
        "/v1/resubmissions",
        serde_json::json!({ "actor": "op", "partition": first.0, "offset": first.1 }),
    )
    .await;
    assert_eq!(r.status, 202, "{r:?}");
    let id = r.body["id"].as_i64().expect("the command's id");
    stop.cancel();
    let others: Vec<_> = (1..=5)
        .map(|k| intent(&format!("y{k}-1"), &format!("y{k}"), 1))
        .collect();
    produce_intents(&cfg, &others).await;
    let log = crate::failures::log_path(&env, "run");
    let proc = Processor::spawn(&cfg, log.clone());
    eventually(Duration::from_secs(90), "the instance ready", || async {
        matches!(api.get("/v1/ready").await, Ok(r) if r.status == 200).then_some(())
    })
    .await;
    let done = eventually(Duration::from_secs(60), "the command's result", || async {
        let c = get(&api, &format!("/v1/commands/{id}")).await;
        matches!(c["state"].as_str(), Some("applied" | "refused")).then_some(c)
    })
    .await;
    assert_eq!(done["state"], "refused", "{done}");
    assert_eq!(effects_of(&cfg, 6).await.len(), 6, "the records commit");
    let unprocessable = reviews_at(&cfg)
        .await
        .into_iter()
        .filter(|(_, _, r)| r.reason == ReviewReason::Unprocessable as i32)
        .count();
    assert_eq!(unprocessable, 0, "no record blamed for the command");
    let verdicts: Vec<String> = read_log(&log)
        .iter()
        .filter(|l| l["message"] == "isolating a record or command the durable store refuses")
        .map(|l| l["verdict"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        verdicts,
        [
            format!("CommandsFirst {{ commands: [{id}] }}"),
            format!("RefuseCommand {{ id: {id} }}")
        ],
        "the command met the records in one batch, then failed alone"
    );

    limit("DROP CONSTRAINT test_small_entry").await;
    let (ok, out, err) = cli_run(resubmit_args(first)).await;
    assert!(ok, "applied once the cause is gone: {out} {err}");
    produce_intents(&cfg, &[intent("w-1", "w", 1)]).await;
    let got = effects_of(&cfg, 8).await;
    assert_eq!(
        got[6..],
        [("w-1".to_string(), 1), ("w-2".to_string(), 2)],
        "each effect once, in order: {got:?}"
    );
    assert!(proc.terminate(Duration::from_secs(30)));
    verify_ok(&cfg, false).await;
}
