//! The processor as a child process (what crash tests kill), configured for a test's world.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use causal_commit::config::Config;
use secrecy::ExposeSecret;

/// Writes `config` as a TOML file the binary reads with `--config` (every key travels, so a
/// new configuration key reaches child processes without anything to update here). Secrets
/// are redacted in it, as in any serialized configuration: [`command`] passes them as files.
pub fn config_file(config: &Config) -> PathBuf {
    let path = std::env::temp_dir().join(format!("cc-test-{}.toml", uuid::Uuid::new_v4().simple()));
    let toml = toml::to_string(config).expect("the config serializes to TOML");
    std::fs::write(&path, toml).expect("write the config file");
    path
}

/// Every secret of `config`, as the `..._FILE` variable and the value the file must hold (the
/// way deployments pass them).
pub fn secret_variables(config: &Config) -> Vec<(String, String)> {
    let prefix = causal_commit::config::ENV_PREFIX;
    let mut out = vec![
        (
            format!("{prefix}POSTGRES__URL_FILE"),
            config.postgres.url.expose_secret().to_string(),
        ),
        (
            format!("{prefix}REDIS__URL_FILE"),
            config.redis.url.expose_secret().to_string(),
        ),
    ];
    if !config.admin.token.expose_secret().is_empty() {
        out.push((
            format!("{prefix}ADMIN__TOKEN_FILE"),
            config.admin.token.expose_secret().to_string(),
        ));
    }
    for (key, value) in &config.kafka.client {
        if causal_commit::config::is_secret_client_key(key) {
            let name = key.replace('.', "_").to_ascii_uppercase();
            out.push((format!("{prefix}KAFKA__CLIENT__{name}_FILE"), value.clone()));
        }
    }
    out
}

/// A command running the binary on `config`'s world: `--config FILE`, each secret in a file of
/// its own named by a `..._FILE` variable, and none of this process's own `CAUSAL_COMMIT__*`
/// overrides.
pub fn command(config: &Config) -> Command {
    let mut c = Command::new(binary());
    c.arg("--config").arg(config_file(config));
    for (k, _) in std::env::vars() {
        if k.starts_with(causal_commit::config::ENV_PREFIX) || k == "CAUSAL_COMMIT_CONFIG" {
            c.env_remove(k);
        }
    }
    for (var, value) in secret_variables(config) {
        let path =
            std::env::temp_dir().join(format!("cc-test-secret-{}", uuid::Uuid::new_v4().simple()));
        // Readable by this user only, as a mounted secret would be.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .expect("create a secret file");
        writeln!(file, "{value}").expect("write a secret file");
        c.env(var, path);
    }
    c
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_causal-commit"))
}

/// Runs a CLI subcommand against `config`'s world and returns (success, stdout, stderr).
pub fn cli(config: &Config, args: &[&str]) -> (bool, String, String) {
    let out = command(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run the causal-commit binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running `causal-commit run` child whose JSON logs go to `log`. Dropping it kills and
/// reaps the child, so a failed test never leaves a processor consuming in the background.
pub struct Processor {
    pub child: Child,
    pub log: PathBuf,
}

impl Drop for Processor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Processor {
    pub fn spawn(config: &Config, log: PathBuf) -> Self {
        Self::spawn_with_env(config, log, &[])
    }

    /// [`Self::spawn`] with extra environment variables (the fail points of a test build).
    pub fn spawn_with_env(config: &Config, log: PathBuf, vars: &[(&str, &str)]) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let mut config = config.clone();
        config.telemetry.log_format = causal_commit::config::LogFormat::Json;
        let child = command(&config)
            .envs(vars.iter().copied())
            .arg("run")
            .stdout(Stdio::from(file.try_clone().expect("log file")))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("spawn the processor");
        Self { child, log }
    }

    /// SIGKILL: no drain, no goodbye.
    pub fn kill9(self) {
        drop(self);
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(self, within: Duration) -> bool {
        self.stop(within).is_some_and(|status| status.success())
    }

    /// Waits for the child to exit by itself; its exit status, or `None` after `within` (its
    /// threads' stacks dumped, see [`Self::dump_stacks`]).
    pub fn exit_within(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("wait for the child") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.dump_stacks();
        None
    }

    /// SIGTERM and wait for the exit: its status, or `None` (then SIGKILL) when the process
    /// still runs after `within`.
    pub fn stop(mut self, within: Duration) -> Option<std::process::ExitStatus> {
        self.signal("TERM");
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                self.dump_stacks();
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Where a process that did not stop spent its time: every thread's stack (gdb, when it is
    /// installed) into `<log>.stacks`, named on stdout. What makes a hang seen once in CI
    /// readable afterwards.
    fn dump_stacks(&self) {
        let path = self.log.with_extension("stacks");
        let Ok(out) = std::fs::File::create(&path) else {
            return;
        };
        let dumped = Command::new("gdb")
            .args(["-p", &self.child.id().to_string(), "-batch", "-nx"])
            .args(["-ex", "thread apply all bt"])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::null())
            .status();
        if dumped.is_ok_and(|s| s.success()) {
            println!(
                "process {} did not stop: stacks in {}",
                self.child.id(),
                path.display()
            );
        }
    }

    /// The JSON log lines written so far.
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        read_log(&self.log)
    }
}

/// Waits until `a` and `b` each hold one partition of a two-partition topic (their last
/// "partitions assigned" lines), and returns `a`'s and `b`'s partition.
pub async fn split_two_partitions(a: &Processor, b: &Processor) -> (i32, i32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let last_assignment = |p: &Processor| {
        p.log_lines()
            .into_iter()
            .rfind(|l| l["message"] == "partitions assigned")
            .map(|l| l["partitions"].as_str().unwrap_or_default().to_owned())
    };
    loop {
        let (x, y) = (last_assignment(a), last_assignment(b));
        match (x.as_deref(), y.as_deref()) {
            (Some("[0]"), Some("[1]")) => return (0, 1),
            (Some("[1]"), Some("[0]")) => return (1, 0),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "the two instances never split the partitions: {x:?} {y:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn read_log(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Polls the JSON log at `path` until `found` picks something out of its lines, and returns
/// it; fails the test with `what` if nothing is found `within`.
pub async fn wait_for_log<T>(
    path: &std::path::Path,
    within: Duration,
    what: &str,
    found: impl Fn(&[serde_json::Value]) -> Option<T>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(t) = found(&read_log(path)) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "{what} (not in {} within {within:?})",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Audit rows the restores logged in `lines` rolled back, over the "partition restored" lines
/// that `which` keeps.
pub fn rolled_back_transitions(
    lines: &[serde_json::Value],
    which: impl Fn(&serde_json::Value) -> bool,
) -> u64 {
    lines
        .iter()
        .filter(|l| l["message"] == "partition restored" && which(l))
        .filter_map(|l| l["rolled_back_transitions"].as_u64())
        .sum()
}

/// Stops or starts a local service through the project's stack script.
pub fn stack(action: &str, service: &str) {
    let status = stack_command(action, service)
        .status()
        .expect("run scripts/stack.sh");
    assert!(
        status.success(),
        "scripts/stack.sh {action} {service} failed"
    );
}

/// `scripts/stack.sh ACTION SERVICE`, to run.
fn stack_command(action: &str, service: &str) -> Command {
    let mut command = Command::new("bash");
    command
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/stack.sh"))
        .args([action, service]);
    command
}

/// A service whose processes are stopped (SIGSTOP, `scripts/stack.sh freeze`): up, its
/// connections open, answering nothing, as on a hung disk or a paused VM. Thawed when the
/// guard drops, even when the test failed.
pub struct Frozen(&'static str);

impl Frozen {
    pub fn service(service: &'static str) -> Self {
        stack("freeze", service);
        Frozen(service)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // Not `stack`: a failed thaw must not panic while a failed test unwinds.
        let _ = stack_command("thaw", self.0).status();
    }
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
