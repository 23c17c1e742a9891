//! The processor as a child process (what crash tests kill), configured for a test's world.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use causal_commit::config::Config;
use secrecy::ExposeSecret;

/// Environment overrides that point the binary at `config`'s world.
pub fn env_for(config: &Config) -> Vec<(String, String)> {
    let k = &config.kafka;
    let env = vec![
        ("INSTANCE_ID", config.instance_id.clone()),
        ("KAFKA__BROKERS", k.brokers.clone()),
        ("KAFKA__GROUP_ID", k.group_id.clone()),
        ("KAFKA__INTENTS_TOPIC", k.intents_topic.clone()),
        ("KAFKA__SIDE_EFFECTS_TOPIC", k.side_effects_topic.clone()),
        ("KAFKA__MANUAL_REVIEW_TOPIC", k.manual_review_topic.clone()),
        (
            "KAFKA__TRANSACTION_TIMEOUT",
            humantime::format_duration(k.transaction_timeout).to_string(),
        ),
        (
            "KAFKA__OPERATION_TIMEOUT",
            humantime::format_duration(k.operation_timeout).to_string(),
        ),
        (
            "BATCH__MAX_LINGER",
            humantime::format_duration(config.batch.max_linger).to_string(),
        ),
        ("BATCH__MAX_RECORDS", config.batch.max_records.to_string()),
        (
            "SEQUENCER__WAIT_TIMEOUT",
            humantime::format_duration(config.sequencer.wait_timeout).to_string(),
        ),
        (
            "LOCKS__LEASE",
            humantime::format_duration(config.locks.lease).to_string(),
        ),
        (
            "POSTGRES__URL",
            config.postgres.url.expose_secret().to_string(),
        ),
        ("POSTGRES__SCHEMA", config.postgres.schema.clone()),
        ("REDIS__URL", config.redis.url.expose_secret().to_string()),
        ("REDIS__KEY_PREFIX", config.redis.key_prefix.clone()),
        (
            "REDIS__COMMAND_TIMEOUT",
            humantime::format_duration(config.redis.command_timeout).to_string(),
        ),
        (
            "REDIS__BREAKER_OPEN_FOR",
            humantime::format_duration(config.redis.breaker_open_for).to_string(),
        ),
        (
            "TELEMETRY__METRICS_LISTEN",
            config.telemetry.metrics_listen.clone(),
        ),
        ("TELEMETRY__LOG_FORMAT", "json".into()),
        ("ADMIN__LISTEN", config.admin.listen.clone()),
    ];
    assert!(
        k.client.is_empty(),
        "kafka.client cannot travel through the environment"
    );
    env.into_iter()
        .map(|(k, v)| (format!("{}{k}", causal_commit::config::ENV_PREFIX), v))
        .collect()
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_causal-commit"))
}

/// Runs a CLI subcommand against `config`'s world and returns (success, stdout, stderr).
pub fn cli(config: &Config, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(binary())
        .args(args)
        .envs(env_for(config))
        .env("RUST_LOG", "warn")
        .output()
        .expect("run the causal-commit binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running `causal-commit run` child whose JSON logs go to `log`.
pub struct Processor {
    pub child: Child,
    pub log: PathBuf,
}

impl Processor {
    pub fn spawn(config: &Config, log: PathBuf) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let child = Command::new(binary())
            .arg("run")
            .envs(env_for(config))
            .stdout(Stdio::from(file.try_clone().expect("log file")))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("spawn the processor");
        Self { child, log }
    }

    /// SIGKILL: no drain, no goodbye.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(mut self, within: Duration) -> bool {
        self.signal("TERM");
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The JSON log lines written so far.
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        read_log(&self.log)
    }
}

pub fn read_log(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Stops or starts a local service through the project's stack script.
pub fn stack(action: &str, service: &str) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/stack.sh");
    let status = Command::new("bash")
        .arg(script)
        .args([action, service])
        .status()
        .expect("run scripts/stack.sh");
    assert!(
        status.success(),
        "scripts/stack.sh {action} {service} failed"
    );
}

/// A Redis that stops answering: a busy script keeps the server frozen (the way `DEBUG SLEEP`
/// would; that command is disabled in this Redis's configuration). The guard waits for the
/// freeze to end, even when the test failed.
pub struct Freeze(std::process::Child);

impl Drop for Freeze {
    fn drop(&mut self) {
        let _ = self.0.wait();
    }
}

const FREEZE_LUA: &str = "local function now() local t = redis.call('TIME') \
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) end \
    local s = now() while now() - s < tonumber(ARGV[1]) do end return 1";

/// Freezes Redis for `ms` (from about now on).
pub async fn freeze_redis(ms: u64) -> Freeze {
    let child = Command::new("redis-cli")
        .args([
            "-u",
            &super::redis_url(),
            "EVAL",
            FREEZE_LUA,
            "0",
            &ms.to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-cli");
    // Wait until the server is really frozen: a PING gets no answer within 100 ms.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = Command::new("timeout")
            .args(["0.1", "redis-cli", "-u", &super::redis_url(), "PING"])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("timeout redis-cli PING");
        if status.code() == Some(124) {
            break;
        }
        assert!(Instant::now() < deadline, "Redis never froze");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Freeze(child)
}
