//! Telemetry checked live: the processor runs as a child process with its operations listener
//! on a free port, and is judged from outside, the way Prometheus, Alertmanager, Grafana and a
//! trace collector see it.
//!
//! - `/metrics`, `/livez` and `/readyz` against a scenario whose figures are known;
//! - the backlog alert, from the real rule (threshold and delay lowered), through the real
//!   Alertmanager routing, to a webhook standing in for the owner's channel; and its resolution;
//! - every query of the Grafana dashboard through a live Prometheus, every metric it names
//!   exported; every alert rule evaluated without error on live data;
//! - spans received by a real OTLP/gRPC endpoint, parented to the producer's trace.
//!
//! Prometheus and Alertmanager are started with `scripts/stack.sh` on this test's own
//! configuration and ports, and stopped at the end.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message as _;

use causal_commit::config::Config;
use causal_commit::telemetry::metrics as m;

use crate::common::http::{http_get, parse_samples, scrape, value};
use crate::common::process::Processor;
use crate::common::{self, free_port, TestEnv};

/// The tests that run Prometheus share this worktree's `.stack/prometheus`: one at a time.
static PROMETHEUS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const METRICS_TXT: &str = include_str!("../../deploy/prometheus/metrics.txt");
const DASHBOARD: &str = include_str!("../../deploy/grafana/dashboards/causal-commit.json");
const ALERTS: &str = include_str!("../../deploy/prometheus/alerts.yml");
const ALERTMANAGER: &str = include_str!("../../deploy/alertmanager/alertmanager.yml");

// ------------------------------------------------------------------------------- helpers

/// The processor as a child process with its operations listener on a free port.
fn spawn(config: &Config, name: &str, env: &[(&str, &str)]) -> (Processor, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let mut config = config.clone();
    config.telemetry.metrics_listen = addr.to_string();
    config.telemetry.log_format = causal_commit::config::LogFormat::Json;
    let log = std::env::temp_dir().join(format!("{name}.log"));
    let file = std::fs::File::create(&log).expect("log file");
    let mut cmd = common::process::command(&config);
    cmd.arg("run")
        .stdout(std::process::Stdio::from(file.try_clone().expect("log")))
        .stderr(std::process::Stdio::from(file));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn the processor");
    (Processor { child, log }, addr)
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Metric names declared by `# TYPE` lines.
fn exported_names(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Waits until `/readyz` answers 200; returns its body.
async fn wait_ready(addr: SocketAddr, p: &Processor, within: Duration) -> String {
    let deadline = Instant::now() + within;
    let mut last = None;
    while Instant::now() < deadline {
        last = http_get(addr, "/readyz").await;
        if let Some((200, body)) = &last {
            return body.clone();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!(
        "/readyz never answered 200 (last: {last:?}); log tail: {:?}",
        tail(p)
    );
}

fn tail(p: &Processor) -> Vec<serde_json::Value> {
    let lines = p.log_lines();
    lines[lines.len().saturating_sub(15)..].to_vec()
}

fn intent_bytes(id: &str, contact: &str, seq: u64) -> Vec<u8> {
    common::intent(id, contact, seq).encode_to_vec()
}

/// Runs `scripts/stack.sh ACTION SERVICE` with extra environment; panics on failure.
fn stack(action: &str, service: &str, env: &[(&str, String)]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/stack.sh");
    let out = Command::new("bash")
        .arg(script)
        .args([action, service])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run scripts/stack.sh");
    assert!(
        out.status.success(),
        "scripts/stack.sh {action} {service} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Prometheus or Alertmanager started by the stack script on a config of this test; stopped
/// when dropped.
struct Monitoring {
    service: &'static str,
    port: u16,
}

impl Monitoring {
    fn start(service: &'static str, config_text: &str) -> Self {
        let port = free_port();
        let upper = service.to_uppercase();
        let path = write_temp(&format!("{service}.yml"), config_text);
        stack(
            "start",
            service,
            &[
                (&format!("CC_{upper}_CONFIG"), path.display().to_string()),
                (&format!("CC_{upper}_PORT"), port.to_string()),
            ],
        );
        Monitoring { service, port }
    }

    fn addr(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().expect("addr")
    }
}

impl Drop for Monitoring {
    fn drop(&mut self) {
        let upper = self.service.to_uppercase();
        stack(
            "stop",
            self.service,
            &[(&format!("CC_{upper}_PORT"), self.port.to_string())],
        );
    }
}

fn write_temp(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(common::unique("cc-telemetry"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

/// An instant query: `Ok(result vector)` or `Err(Prometheus's error)`.
async fn prom_query(prometheus: SocketAddr, query: &str) -> Result<Vec<serde_json::Value>, String> {
    let path = format!("/api/v1/query?query={}", url_encode(query));
    let (status, body) = http_get(prometheus, &path)
        .await
        .ok_or("Prometheus did not answer")?;
    let json: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("HTTP {status}: {e}: {body}"))?;
    if json["status"] != "success" {
        return Err(format!("{}: {}", json["errorType"], json["error"]));
    }
    Ok(json["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// A Prometheus configuration scraping `target` every second as job `causal-commit`.
fn prometheus_config(target: SocketAddr, rules: &Path, alertmanager: Option<SocketAddr>) -> String {
    let alerting = alertmanager.map_or(String::new(), |am| {
        format!(
            "alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: [\"{am}\"]\n"
        )
    });
    format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {}\n{alerting}\
         scrape_configs:\n  - job_name: causal-commit\n    static_configs:\n      - targets: [\"{target}\"]\n",
        rules.display()
    )
}

/// Waits until Prometheus has scraped the instance (`up == 1`).
async fn wait_scraped(prometheus: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = prom_query(prometheus, r#"up{job="causal-commit"} == 1"#).await {
            if !r.is_empty() {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped the instance"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

// ------------------------------------------------------------------------------- /metrics

/// A gap of known age, a held contact, a paused partition, a lag and an invalid record: the
/// figures a running instance exports, through its own listener, with its probes.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_probes_tell_a_known_scenario() {
    let env = TestEnv::new("tele_metrics", 3).await;
    let mut config = env.config.clone();
    config.sequencer.max_pending_per_contact = 2;
    config.sequencer.max_pending_per_partition = 3;
    config.sequencer.resume_pending_per_partition = 1;
    let (p, addr) = spawn(&config, &env.name, &[]);

    // Alive at once; ready once its partitions are assigned and restored.
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(addr, "/livez").await.map(|r| r.0) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "/livez never answered: {:?}",
            tail(&p)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready = wait_ready(addr, &p, Duration::from_secs(60)).await;
    let view: serde_json::Value = serde_json::from_str(&ready).expect("readyz is JSON");
    assert_eq!(view["assigned"], 3, "{view}");
    assert_eq!(view["restored"], 3, "{view}");
    // Known series are there before anything happened.
    let before = parse_samples(&scrape(addr).await);
    assert_eq!(
        value(&before, m::TRANSACTIONS, &[("result", "abort")]),
        Some(0.0)
    );
    // A new group: Kafka has no recovery point for its partitions, so they were committed
    // (`Engine::anchor`) before they were restored, in a transaction counted with the batches'.
    let anchored =
        value(&before, m::TRANSACTIONS, &[("result", "commit")]).expect("transactions are counted");
    assert!(
        anchored >= 1.0,
        "the recovery points' transaction is counted"
    );
    assert_eq!(
        value(
            &before,
            m::CONTACT_HOLDS,
            &[("reason", "CONTACT_BACKLOG_OVERFLOW")]
        ),
        Some(0.0)
    );

    // Partition 0: a gap (sequence 1 missing) and an undecodable record.
    // Partition 1: a contact overflowing its 2 waiting intents: held, 3 to manual review.
    // Partition 2: 3 waiting intents, the partition's bound: paused (backpressure).
    let produced_at = Instant::now();
    let wall_before = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
    common::produce_traced(
        &config,
        &[
            (0, "gap-a", intent_bytes("gap-a-2", "gap-a", 2), None),
            (0, "junk", b"\xff\xff not an intent".to_vec(), None),
            (1, "held-b", intent_bytes("held-b-2", "held-b", 2), None),
            (1, "held-b", intent_bytes("held-b-3", "held-b", 3), None),
            (1, "held-b", intent_bytes("held-b-4", "held-b", 4), None),
            (2, "c1", intent_bytes("c1-2", "c1", 2), None),
            (2, "c2", intent_bytes("c2-2", "c2", 2), None),
            (2, "c3", intent_bytes("c3-2", "c3", 2), None),
        ],
    )
    .await;
    let paused = [("cause", "backpressure")];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = parse_samples(&scrape(addr).await);
        if value(&s, m::PARTITIONS_PAUSED, &paused) == Some(1.0)
            && value(&s, m::RECORDS_CONSUMED, &[]) == Some(8.0)
            && value(&s, m::CONTACTS_ON_HOLD, &[]) == Some(1.0)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the scenario never settled: {:?}",
            tail(&p)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Partition 2 at its bound is still probed (its missing predecessors may be in what it has
    // not read): three more waiting intents take it to twice its bound, where it is not read
    // at all until it drains.
    common::produce_traced(
        &config,
        &["c4", "c5", "c6"].map(|c| (2, c, intent_bytes(&format!("{c}-2"), c, 2), None)),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = parse_samples(&scrape(addr).await);
        if value(&s, m::BACKLOG_WAITING, &[("partition", "2")]) == Some(6.0)
            && value(&s, m::RECORDS_CONSUMED, &[]) == Some(11.0)
            && value(&s, m::PARTITIONS_PAUSED, &paused) == Some(1.0)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "partition 2 never reached twice its bound: {:?}",
            tail(&p)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Partition 2 is paused at twice its bound: these are not consumed, so they are its lag.
    common::produce_traced(
        &config,
        &(1..=4)
            .map(|i| (2, "d", intent_bytes(&format!("d-{i}"), "d", i), None))
            .collect::<Vec<_>>(),
    )
    .await;

    let lag = |p: &'static str| [("partition", p)];
    let deadline = Instant::now() + Duration::from_secs(30);
    let s = loop {
        let s = parse_samples(&scrape(addr).await);
        if value(&s, m::CONSUMER_LAG, &lag("2")) == Some(4.0) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "lag of the paused partition never reached 4: {:?}",
            s.iter()
                .filter(|s| s.name == m::CONSUMER_LAG)
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let scraped_at = produced_at.elapsed().as_secs_f64();
    let get = |name: &str, labels: &[(&str, &str)]| {
        value(&s, name, labels).unwrap_or_else(|| panic!("{name}{labels:?} is not exported"))
    };
    assert_eq!(get(m::CONSUMER_LAG, &lag("0")), 0.0);
    assert_eq!(get(m::CONSUMER_LAG, &lag("1")), 0.0);
    assert_eq!(get(m::BACKLOG_WAITING, &lag("0")), 1.0, "the gap");
    assert_eq!(get(m::BACKLOG_WAITING, &lag("1")), 0.0, "evicted to review");
    assert_eq!(
        get(m::BACKLOG_WAITING, &lag("2")),
        6.0,
        "at twice the bound"
    );
    let age = get(m::BACKLOG_OLDEST_AGE, &lag("0"));
    assert!(
        age > 0.0 && age <= scraped_at + 1.5,
        "the gap is {age} s old, produced {scraped_at} s ago"
    );
    assert_eq!(get(m::PARTITIONS_PAUSED, &paused), 1.0);
    assert_eq!(get(m::PARTITIONS_PAUSED, &[("cause", "store")]), 0.0);
    assert_eq!(get(m::CONTACTS_ON_HOLD, &[]), 1.0);
    assert!(get(m::HELD_OLDEST_AGE, &[]) > 0.0);
    assert_eq!(
        get(m::CONTACT_HOLDS, &[("reason", "CONTACT_BACKLOG_OVERFLOW")]),
        1.0
    );
    assert_eq!(get(m::CONTACT_HOLDS, &[("reason", "WAIT_TIMEOUT")]), 0.0);
    assert_eq!(
        get(
            m::MANUAL_REVIEW_RECORDS,
            &[("reason", "CONTACT_BACKLOG_OVERFLOW")]
        ),
        3.0
    );
    assert_eq!(
        get(m::MANUAL_REVIEW_RECORDS, &[("reason", "INVALID_INTENT")]),
        1.0
    );
    assert_eq!(get(m::INVALID_INTENTS, &[("reason", "undecodable")]), 1.0);
    assert_eq!(
        get(m::OUTCOMES, &[("state", "waiting_previous_commit")]),
        9.0,
        "gap-a 2, held-b 2 and 3, c1-c6"
    );
    assert_eq!(get(m::RECORDS_CONSUMED, &[]), 11.0);
    assert_eq!(get(m::TRANSACTIONS, &[("result", "abort")]), 0.0);
    let commits = get(m::TRANSACTIONS, &[("result", "commit")]) - anchored;
    assert!(commits >= 1.0);
    // Every committed batch timed each of its steps once; the scenario is quiet here.
    let step_count = format!("{}_count", m::BATCH_STEP);
    let step_sum = format!("{}_sum", m::BATCH_STEP);
    for step in ["poll", "lookup", "decide", "durable_write", "commit"] {
        assert_eq!(
            get(&step_count, &[("step", step)]),
            commits,
            "one {step} duration per committed batch"
        );
        assert!(
            get(&step_sum, &[("step", step)]) > 0.0,
            "{step} took no time"
        );
    }
    // The batches' input records, each once (not their transitions: 9 of them waited).
    assert_eq!(
        get(&format!("{}_sum", m::BATCH_RECORDS), &[]),
        get(m::RECORDS_CONSUMED, &[]),
        "input records per committed batch"
    );
    assert_eq!(get(&format!("{}_count", m::BATCH_RECORDS), &[]), commits);
    assert_eq!(get(m::READY, &[]), 1.0);
    assert_eq!(get(m::PARTITIONS_ASSIGNED, &[]), 3.0);
    assert_eq!(get(m::LOCK_STORE_MODE, &[("mode", "redis")]), 1.0);
    let last_commit = get(m::LAST_COMMIT_TIMESTAMP, &[]);
    let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
    assert!(
        (wall_before - 1.0..=now + 1.0).contains(&last_commit),
        "last commit at {last_commit}, scenario between {wall_before} and {now}"
    );

    // A quiet partition's gap keeps ageing (the gauges refresh without traffic).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = parse_samples(&scrape(addr).await);
    let older = value(&later, m::BACKLOG_OLDEST_AGE, &lag("0")).expect("age");
    assert!(
        older >= age + 1.5,
        "the gap's age went from {age} to {older} in 2 s"
    );

    // Everything deploy/ relies on is exported.
    let text = scrape(addr).await;
    let exported = exported_names(&text);
    for line in METRICS_TXT.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if name.starts_with("causal_commit_") {
            assert!(
                exported.iter().any(|e| e == name),
                "metrics.txt lists {name}, the running instance does not export it"
            );
        }
    }
    assert!(
        p.terminate(Duration::from_secs(30)),
        "clean exit on SIGTERM"
    );
}

// ------------------------------------------------------------------------------- alerts

/// What the webhook standing in for the owners' channels received: (receiver, payload).
type Received = Arc<Mutex<Vec<(String, serde_json::Value)>>>;

async fn webhook() -> (SocketAddr, Received, tokio_util::sync::CancellationToken) {
    use axum::extract::{Path as UrlPath, State};
    let received: Received = Arc::default();
    let app = axum::Router::new()
        .route(
            "/{receiver}",
            axum::routing::post(
                |State(r): State<Received>,
                 UrlPath(receiver): UrlPath<String>,
                 axum::Json(body): axum::Json<serde_json::Value>| async move {
                    r.lock().expect("lock").push((receiver, body));
                    "ok"
                },
            ),
        )
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = tokio_util::sync::CancellationToken::new();
    let shutdown = stop.clone().cancelled_owned();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    });
    (addr, received, stop)
}

/// deploy/alertmanager/alertmanager.yml with every receiver's URL on the test's webhook (one
/// path per receiver) and its waits shortened to a second; the routing is untouched.
fn alertmanager_config(webhook: SocketAddr) -> String {
    let mut receiver = String::new();
    let (mut urls, mut waits) = (0, 0);
    let lines: Vec<String> = ALERTMANAGER
        .lines()
        .map(|line| {
            let indent = &line[..line.len() - line.trim_start().len()];
            let t = line.trim_start();
            if let Some(name) = t.strip_prefix("- name: ") {
                receiver = name.trim().to_string();
            }
            if t.starts_with("- url: ") || t.starts_with("url: ") {
                urls += 1;
                let dash = if t.starts_with('-') { "- " } else { "" };
                return format!("{indent}{dash}url: http://{webhook}/{receiver}");
            }
            for key in ["group_wait:", "group_interval:"] {
                if t.starts_with(key) {
                    waits += 1;
                    return format!("{indent}{key} 1s");
                }
            }
            line.to_string()
        })
        .collect();
    assert_eq!(urls, 6, "alertmanager.yml has six receivers");
    assert!(
        waits >= 2,
        "alertmanager.yml sets group_wait and group_interval"
    );
    lines.join("\n") + "\n"
}

/// The real rule `alert`, from alerts.yml, with its threshold and delay replaced.
fn derived_rule(alert: &str, replacements: &[(&str, &str)]) -> String {
    let start = ALERTS
        .find(&format!("- alert: {alert}\n"))
        .unwrap_or_else(|| panic!("alerts.yml has no {alert}"));
    let line_start = ALERTS[..start].rfind('\n').map_or(0, |i| i + 1);
    let block = &ALERTS[line_start..];
    let end = block.find("\n\n").unwrap_or(block.len());
    let mut rule = block[..end].to_string();
    for (from, to) in replacements {
        assert!(rule.contains(from), "{alert} no longer has {from:?}");
        rule = rule.replacen(from, to, 1);
    }
    format!("groups:\n  - name: causal-commit.live-test\n    rules:\n{rule}\n")
}

/// The backlog alert, from the real rule and routing, reaches the backend on-call's chat
/// channel with its routing labels, and resolves when the gap is filled.
#[tokio::test(flavor = "multi_thread")]
async fn backlog_alert_reaches_its_owner_through_alertmanager_and_resolves() {
    let env = TestEnv::new("tele_alert", 1).await;
    let _one_prometheus = PROMETHEUS.lock().await;
    let config = env.config.clone();
    let (p, metrics) = spawn(&config, &env.name, &[]);
    wait_ready(metrics, &p, Duration::from_secs(60)).await;

    let (hook, received, stop_hook) = webhook().await;
    let alertmanager = Monitoring::start("alertmanager", &alertmanager_config(hook));
    let rules = write_temp(
        "rules.yml",
        &derived_rule(
            "CausalCommitBacklogOverThreshold",
            &[("> 1000", "> 0"), ("for: 5m", "for: 3s")],
        ),
    );
    let prometheus = Monitoring::start(
        "prometheus",
        &prometheus_config(metrics, &rules, Some(alertmanager.addr())),
    );
    wait_scraped(prometheus.addr()).await;

    // A strict contact misses sequence 1: its sequence 2 waits.
    common::produce_traced(
        &config,
        &[(0, "alert-c", intent_bytes("alert-c-2", "alert-c", 2), None)],
    )
    .await;
    let notification = |status: &str| {
        received
            .lock()
            .expect("lock")
            .iter()
            .find(|(_, body)| body["status"] == status)
            .cloned()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let (receiver, firing) = loop {
        if let Some(n) = notification("firing") {
            break n;
        }
        assert!(
            Instant::now() < deadline,
            "no firing notification; webhook got {:?}",
            received.lock().expect("lock")
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(
        receiver, "backend-chat",
        "a P2 of the backend goes to its chat channel"
    );
    let alert = &firing["alerts"][0];
    let labels = &alert["labels"];
    assert_eq!(labels["alertname"], "CausalCommitBacklogOverThreshold");
    assert_eq!(labels["severity"], "warning");
    assert_eq!(labels["priority"], "P2");
    assert_eq!(labels["channel"], "chat");
    assert_eq!(labels["owner"], "backend-oncall");
    assert_eq!(labels["ack_sla"], "30m");
    assert_eq!(labels["partition"], "0");
    assert_eq!(labels["job"], "causal-commit");
    assert_eq!(
        alert["annotations"]["runbook_url"],
        "docs/runbook.md#backlog-over-threshold"
    );

    // The missing sequence arrives: both commit, the backlog drains, the alert resolves.
    common::produce_traced(
        &config,
        &[(0, "alert-c", intent_bytes("alert-c-1", "alert-c", 1), None)],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let (receiver, resolved) = loop {
        if let Some(n) = notification("resolved") {
            break n;
        }
        assert!(
            Instant::now() < deadline,
            "the alert never resolved; webhook got {:?}",
            received.lock().expect("lock")
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(receiver, "backend-chat");
    assert_eq!(
        resolved["alerts"][0]["labels"]["alertname"],
        "CausalCommitBacklogOverThreshold"
    );
    let elsewhere: Vec<String> = received
        .lock()
        .expect("lock")
        .iter()
        .map(|(r, _)| r.clone())
        .filter(|r| r != "backend-chat")
        .collect();
    assert!(
        elsewhere.is_empty(),
        "a P2 pages nobody: also sent to {elsewhere:?}"
    );

    drop(prometheus);
    drop(alertmanager);
    stop_hook.cancel();
    assert!(
        p.terminate(Duration::from_secs(30)),
        "clean exit on SIGTERM"
    );
}

// ------------------------------------------------------------------------------- dashboard

/// Every PromQL query of the dashboard (panel targets and `label_values` selectors of its
/// variables), with Grafana's variables replaced: (where, query).
fn dashboard_queries() -> Vec<(String, String)> {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).expect("dashboard JSON");
    let substitute = |expr: &str| {
        let mut q = expr.to_string();
        for (var, val) in [
            ("${job}", "causal-commit"),
            ("$job", "causal-commit"),
            ("${instance}", ".*"),
            ("$instance", ".*"),
            ("$__rate_interval", "1m"),
            ("$__interval", "30s"),
            ("$__range", "1h"),
        ] {
            q = q.replace(var, val);
        }
        assert!(!q.contains('$'), "unknown Grafana variable in {expr}");
        q
    };
    let mut out = Vec::new();
    for var in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        if var["type"] != "query" {
            continue;
        }
        let query = var["query"]["query"]
            .as_str()
            .or(var["query"].as_str())
            .expect("a variable query");
        let selector = query
            .trim()
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.rsplit_once(','))
            .map(|(selector, _label)| selector)
            .unwrap_or_else(|| panic!("only label_values(selector, label) is used: {query}"));
        out.push((format!("variable {}", var["name"]), substitute(selector)));
    }
    let mut panels: Vec<&serde_json::Value> = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        panels.push(panel);
        panels.extend(panel["panels"].as_array().into_iter().flatten());
    }
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                let where_ = format!(
                    "panel {} '{}' {}",
                    panel["id"], panel["title"], target["refId"]
                );
                out.push((where_, substitute(expr)));
            }
        }
    }
    out
}

/// The causal-commit metric names an expression selects (histogram series by their metric).
fn metric_names(query: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = query;
    while let Some(i) = rest.find("causal_commit_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let mut name = &tail[..end];
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if m::ALL
                    .iter()
                    .any(|x| x.name == base && x.kind == m::Kind::Histogram)
                {
                    name = base;
                }
            }
        }
        out.push(name.to_string());
        rest = &tail[end..];
    }
    out
}

/// Grafana's view: every dashboard query is valid PromQL for a live Prometheus that scrapes a
/// running instance, and every metric it names is one the instance exports. The real alert
/// rules are loaded too: each one evaluates on the live data without error.
#[tokio::test(flavor = "multi_thread")]
async fn dashboard_queries_run_live_and_name_only_exported_metrics() {
    let env = TestEnv::new("tele_dashboard", 2).await;
    let _one_prometheus = PROMETHEUS.lock().await;
    let config = env.config.clone();
    let (p, metrics) = spawn(&config, &env.name, &[]);
    wait_ready(metrics, &p, Duration::from_secs(60)).await;
    // Some traffic, so the per-partition series and the commit timestamp exist.
    common::produce_traced(
        &config,
        &[
            (0, "dash-a", intent_bytes("dash-a-1", "dash-a", 1), None),
            (1, "dash-b", intent_bytes("dash-b-2", "dash-b", 2), None),
        ],
    )
    .await;
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts.yml");
    let prometheus = Monitoring::start("prometheus", &prometheus_config(metrics, &rules, None));
    wait_scraped(prometheus.addr()).await;

    let exported = exported_names(&scrape(metrics).await);
    let queries = dashboard_queries();
    assert!(
        queries.len() > 30,
        "the dashboard has its queries: {}",
        queries.len()
    );
    let mut problems = Vec::new();
    for (where_, query) in &queries {
        if let Err(e) = prom_query(prometheus.addr(), query).await {
            problems.push(format!("{where_}: Prometheus rejects {query}: {e}"));
        }
        for name in metric_names(query) {
            if !exported.contains(&name) {
                problems.push(format!("{where_}: {name} is not exported by the instance"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // Prometheus has the names too (what Grafana really reads).
    let deadline = Instant::now() + Duration::from_secs(30);
    let wanted: Vec<String> = queries.iter().flat_map(|(_, q)| metric_names(q)).collect();
    loop {
        let series = prom_query(
            prometheus.addr(),
            r#"count by (__name__) ({job="causal-commit", __name__=~"causal_commit_.+"})"#,
        )
        .await
        .expect("query");
        let names: Vec<&str> = series
            .iter()
            .filter_map(|s| s["metric"]["__name__"].as_str())
            .collect();
        let missing: Vec<&String> = wanted
            .iter()
            .filter(|w| {
                !names
                    .iter()
                    .any(|n| n == w || n.strip_suffix("_bucket").is_some_and(|b| b == w.as_str()))
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus has no series of {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Every alert rule evaluated, without error.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = http_get(prometheus.addr(), "/api/v1/rules")
            .await
            .expect("rules");
        let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        let rules: Vec<&serde_json::Value> = json["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        assert!(rules.len() >= 12, "alerts.yml is loaded: {body}");
        let bad: Vec<String> = rules
            .iter()
            .filter(|r| r["health"] != "ok")
            .map(|r| format!("{} {} {}", r["name"], r["health"], r["lastError"]))
            .collect();
        if bad.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rules not evaluated cleanly: {bad:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(prometheus);
    assert!(
        p.terminate(Duration::from_secs(30)),
        "clean exit on SIGTERM"
    );
}

// ------------------------------------------------------------------------------- traces

mod otlp {
    use std::sync::{Arc, Mutex};

    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService;
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use opentelemetry_proto::tonic::trace::v1::Span;

    /// An OTLP/gRPC trace endpoint that keeps every span it receives.
    #[derive(Clone, Default)]
    pub struct Collector(pub Arc<Mutex<Vec<Span>>>);

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let mut spans = self.0.lock().expect("lock");
            for rs in request.into_inner().resource_spans {
                for ss in rs.scope_spans {
                    spans.extend(ss.spans);
                }
            }
            Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }))
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A sampled producer trace continues through the processor: the intent's span is the
/// producer span's child, the effect (and a review record) carry that span's context, and the
/// batch span has its steps as children. An unsampled trace is propagated, not recorded.
#[tokio::test(flavor = "multi_thread")]
async fn spans_reach_an_otlp_endpoint_parented_to_the_producer_trace() {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;

    let env = TestEnv::new("tele_traces", 1).await;
    let collector = otlp::Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let otlp_addr = listener.local_addr().expect("addr");
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                stop.clone().cancelled_owned(),
            ),
    );
    let mut config = env.config.clone();
    config.telemetry.otlp_endpoint = format!("http://{otlp_addr}");
    let (p, metrics) = spawn(&config, &env.name, &[("OTEL_BSP_SCHEDULE_DELAY", "200")]);
    wait_ready(metrics, &p, Duration::from_secs(60)).await;

    let sampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let invalid_sampled = "00-1bf7651916cd43dd8448eb211c80319c-c7ad6b7169203331-01";
    let unsampled = "00-2cf7651916cd43dd8448eb211c80319c-d7ad6b7169203331-00";
    common::produce_traced(
        &config,
        &[
            (0, "tr-a", intent_bytes("tr-a-1", "tr-a", 1), Some(sampled)),
            (
                0,
                "tr-x",
                b"\xff not an intent".to_vec(),
                Some(invalid_sampled),
            ),
            (
                0,
                "tr-b",
                intent_bytes("tr-b-1", "tr-b", 1),
                Some(unsampled),
            ),
        ],
    )
    .await;
    let cfg = config.clone();
    let effects = tokio::task::spawn_blocking(move || {
        common::read_with_traceparent(&cfg, &cfg.kafka.side_effects_topic, &[0], 2)
    })
    .await
    .expect("reader");
    let cfg = config.clone();
    let reviews = tokio::task::spawn_blocking(move || {
        common::read_with_traceparent(&cfg, &cfg.kafka.manual_review_topic, &[0], 1)
    })
    .await
    .expect("reader");
    assert_eq!(effects.len(), 2, "two effects");
    assert_eq!(reviews.len(), 1, "one review");
    let header_of = |records: &[(Option<String>, Vec<u8>)], trace: &str| {
        records
            .iter()
            .find_map(|(tp, _)| tp.clone().filter(|tp| tp[3..35] == trace[3..35]))
            .unwrap_or_else(|| panic!("no output record in trace {trace}"))
    };
    let effect_tp = header_of(&effects, sampled);
    let review_tp = header_of(&reviews, invalid_sampled);
    let unsampled_tp = header_of(&effects, unsampled);
    for (out, input) in [
        (&effect_tp, sampled),
        (&review_tp, invalid_sampled),
        (&unsampled_tp, unsampled),
    ] {
        assert_eq!(out.len(), 55, "{out}");
        assert_ne!(
            out[36..52],
            input[36..52],
            "the output carries the processor's span, not the producer's"
        );
        assert_eq!(out[53..], input[53..], "sampling decision kept");
    }

    // The spans arrive: each intent span is the producer span's child, with the id its
    // output record carries, linked to its batch, whose steps are its children.
    let deadline = Instant::now() + Duration::from_secs(30);
    let spans = loop {
        let spans = collector.0.lock().expect("lock").clone();
        let intents = spans.iter().filter(|s| s.name == "intent").count();
        let steps = spans.iter().filter(|s| s.name == "commit").count();
        if intents >= 2 && steps >= 1 {
            break spans;
        }
        assert!(
            Instant::now() < deadline,
            "spans never arrived ({} so far): {:?}",
            spans.len(),
            tail(&p)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for (out, input, attribute) in [
        (&effect_tp, sampled, "committed_causal"),
        (&review_tp, invalid_sampled, "manual_review_record"),
    ] {
        let span = spans
            .iter()
            .find(|s| s.name == "intent" && hex(&s.span_id) == out[36..52])
            .unwrap_or_else(|| panic!("no intent span with the id of {out}"));
        assert_eq!(hex(&span.trace_id), input[3..35], "in the producer's trace");
        assert_eq!(
            hex(&span.parent_span_id),
            input[36..52],
            "child of the producer's span"
        );
        let outcome = span
            .attributes
            .iter()
            .find(|a| a.key == "outcome")
            .and_then(|a| a.value.as_ref())
            .map(|v| format!("{v:?}"))
            .unwrap_or_default();
        assert!(outcome.contains(attribute), "outcome {outcome}");
        let link = span.links.first().expect("linked to its batch");
        let batch = spans
            .iter()
            .find(|s| s.name == "batch" && s.span_id == link.span_id)
            .expect("the linked batch span arrived");
        for step in ["poll", "lookup", "decide", "durable_write", "commit"] {
            let child = spans
                .iter()
                .find(|s| s.name == step && s.parent_span_id == batch.span_id)
                .unwrap_or_else(|| panic!("the batch has no {step} span"));
            assert!(child.start_time_unix_nano >= batch.start_time_unix_nano);
            assert!(child.end_time_unix_nano <= batch.end_time_unix_nano);
        }
    }
    assert!(
        !spans.iter().any(|s| hex(&s.trace_id) == unsampled[3..35]),
        "an unsampled trace is not recorded"
    );
    stop.cancel();
    assert!(
        p.terminate(Duration::from_secs(30)),
        "clean exit on SIGTERM"
    );
}
