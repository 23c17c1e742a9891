//! End-to-end benchmark, side by side in one run on one broker (CONTRACT.md §7):
//!
//! - `passthrough`: `causal-commit run` with `[bench] passthrough = true` (the same consumer,
//!   producer, batching and transactions; no sequencing, no stores): the ceiling;
//! - `full`: every guarantee on, Redis healthy;
//! - `fallback`: every guarantee on, `redis.url` pointing at a closed port, so PostgreSQL serves
//!   locks and idempotency lookups (the shared Redis is never touched);
//! - `kafka-streams`: the Kafka Streams peer (`bench/peers/kafka-streams`), exactly-once v2.
//!
//! Each consumer gets its own topics, consumer group, PostgreSQL schema and Redis prefix, and the
//! same preloaded input (`causal-commit produce`, same seed). One consumer runs at a time, as a
//! child process: the release binary with a TOML file written here (`--config FILE`), or the
//! peer's jar. Measured:
//!
//! - throughput on the preloaded backlog, from the group's committed offsets: start-up (process
//!   start -> first committed offset) apart, steady state = the records committed between 10%
//!   and 90% of the backlog per second;
//! - latency at full speed (the consumer's own steady-state rate) and at half of it: intents
//!   produced at a fixed rate while the consumer runs, latency = when one read_committed
//!   observer (the same for every consumer) receives the effect - the intent's `created_at_ms`;
//! - CPU seconds per 1,000 intents (steady-state window, /proc/<pid>/stat) and peak RSS (VmHWM);
//! - PostgreSQL rows and WAL bytes per intent (`pg_stat_database`, `pg_current_wal_lsn()`,
//!   plus the run's own schema from `pg_stat_user_tables`); 0 for consumers without PostgreSQL.
//!
//! Optional: `--scale-out` (the `full` backlog with two instances of the group on the box) and
//! `--rss-contacts N` (peak RSS of one `full` instance that has seen N contacts).
//!
//! `make bench` builds the release binary and the peer, then runs this. Figures are printed and
//! written to `target/bench/report.json` (and `.md`); nothing is asserted. Under `cargo test` it
//! only says it was skipped.

#[path = "e2e/children.rs"]
mod children;
#[path = "e2e/kafka_io.rs"]
mod kafka_io;
#[path = "e2e/report.rs"]
mod report;
#[path = "e2e/stores.rs"]
mod stores;

use std::cell::RefCell;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use prost::Message as _;
use secrecy::ExposeSecret;
use serde::Serialize;

use causal_commit::config::Config;
use causal_commit::demo::{self, ArrivalOrder, ProduceOptions};
use causal_commit::proto::{Action, Intent};

use children::ChildProc;
use kafka_io::{Carried, Progress};
use report::{ConsumerReport, ManyContacts, Sample};

const USAGE: &str = "\
cargo bench --bench e2e -- [flags]      (make bench BENCH_ARGS=\"[flags]\")
  --intents N              preloaded backlog per consumer (400000)
  --per-contact N          intents per contact (10)
  --strict-fraction F      contacts whose producer gives the sequence (0.8, as the demo)
  --producers N            concurrent producers of the preload (4)
  --partitions N           partitions of intents and side-effects (12)
  --consumers LIST         comma-separated, in order (passthrough,full,fallback,kafka-streams)
  --latency-seconds S      length of each fixed-rate latency phase (10)
  --latency-max N          at most this many intents per latency phase (50000)
  --no-latency             skip the latency phases
  --rounds N               backlog runs per consumer, interleaved (passthrough, full, ..., then
                           again); the latency phases run in the first round only; the table
                           gives each consumer's median intents/s and each ratio the median of
                           the rounds' own ratios (3)
  --max-records N          batch.max_records of the Rust consumers (config default)
  --max-linger MS          batch.max_linger in ms (config default)
  --ks-threads N           Kafka Streams stream threads (2)
  --java-opts \"OPTS\"       JVM options of the peer, space-separated (none)
  --log-level L            telemetry.log_level of the Rust consumers (info)
  --scale-out              also: the full backlog with two instances of the group
  --rss-contacts N         also: peak RSS of one full instance after N contacts (0 = off)
  --catch-up-timeout S     give up on a backlog after S seconds (900)
  --seed N                 workload seed (42)
  --out DIR                where report.json, report.md and the logs go (target/bench)
  --keep                   keep the topics, schemas and Redis keys of the run (and the
                           preload's source topic, whose name the run prints)
  --source TOPIC           copy the preload from TOPIC, a source topic kept by an earlier
                           run, instead of producing one: runs compared on one input
Environment: CC_KAFKA_BROKERS, CC_DATABASE_URL, CC_REDIS_URL (the local stack's by default).";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Kind {
    Passthrough,
    Full,
    Fallback,
    KafkaStreams,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Passthrough => "passthrough",
            Kind::Full => "full",
            Kind::Fallback => "fallback",
            Kind::KafkaStreams => "kafka-streams",
        }
    }

    fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "passthrough" => Kind::Passthrough,
            "full" => Kind::Full,
            "fallback" => Kind::Fallback,
            "kafka-streams" | "kstreams" => Kind::KafkaStreams,
            other => {
                bail!("unknown consumer {other:?} (passthrough, full, fallback, kafka-streams)")
            }
        })
    }

    fn uses_postgres(self) -> bool {
        matches!(self, Kind::Full | Kind::Fallback)
    }

    fn carried(self) -> Carried {
        match self {
            Kind::Passthrough => Carried::Intents,
            _ => Carried::Effects,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
struct Args {
    intents: usize,
    per_contact: usize,
    strict_fraction: f64,
    producers: usize,
    partitions: i32,
    consumers: Vec<Kind>,
    latency_seconds: f64,
    latency_max: usize,
    latency: bool,
    rounds: usize,
    max_records: Option<usize>,
    max_linger_ms: Option<u64>,
    ks_threads: usize,
    java_opts: Vec<String>,
    log_level: String,
    scale_out: bool,
    rss_contacts: usize,
    catch_up_timeout_s: u64,
    seed: u64,
    out: PathBuf,
    keep: bool,
    source: Option<String>,
    brokers: String,
    #[serde(skip)]
    postgres_url: String,
    #[serde(skip)]
    redis_url: String,
    binary: PathBuf,
    peer_jar: PathBuf,
}

impl Args {
    fn parse(raw: impl Iterator<Item = String>) -> anyhow::Result<Self> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
        let mut a = Args {
            intents: 400_000,
            per_contact: 10,
            strict_fraction: 0.8,
            producers: 4,
            partitions: 12,
            consumers: vec![
                Kind::Passthrough,
                Kind::Full,
                Kind::Fallback,
                Kind::KafkaStreams,
            ],
            latency_seconds: 10.0,
            latency_max: 50_000,
            latency: true,
            rounds: 3,
            max_records: None,
            max_linger_ms: None,
            ks_threads: 2,
            java_opts: Vec::new(),
            log_level: "info".into(),
            scale_out: false,
            rss_contacts: 0,
            catch_up_timeout_s: 900,
            seed: 42,
            out: root.join("target/bench"),
            keep: false,
            source: None,
            brokers: env("CC_KAFKA_BROKERS", "127.0.0.1:9092"),
            postgres_url: env(
                "CC_DATABASE_URL",
                "postgres://causal_commit:causal_commit@127.0.0.1:5432/causal_commit",
            ),
            redis_url: env("CC_REDIS_URL", "redis://127.0.0.1:6379"),
            binary: root.join("target/release/causal-commit"),
            peer_jar: root.join("bench/peers/kafka-streams/target/causal-commit-kstreams.jar"),
        };
        let mut it = raw;
        while let Some(flag) = it.next() {
            let mut value = || {
                it.next()
                    .with_context(|| format!("{flag} needs a value\n{USAGE}"))
            };
            match flag.as_str() {
                "--intents" => a.intents = num(&flag, &value()?)?,
                "--per-contact" => a.per_contact = num(&flag, &value()?)?,
                "--strict-fraction" => a.strict_fraction = num(&flag, &value()?)?,
                "--producers" => a.producers = num(&flag, &value()?)?,
                "--partitions" => a.partitions = num(&flag, &value()?)?,
                "--consumers" => {
                    a.consumers = value()?
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(Kind::parse)
                        .collect::<anyhow::Result<_>>()?
                }
                "--latency-seconds" => a.latency_seconds = num(&flag, &value()?)?,
                "--latency-max" => a.latency_max = num(&flag, &value()?)?,
                "--no-latency" => a.latency = false,
                "--rounds" => a.rounds = num(&flag, &value()?)?,
                "--max-records" => a.max_records = Some(num(&flag, &value()?)?),
                "--max-linger" => a.max_linger_ms = Some(num(&flag, &value()?)?),
                "--ks-threads" => a.ks_threads = num(&flag, &value()?)?,
                "--java-opts" => {
                    a.java_opts = value()?.split_whitespace().map(String::from).collect()
                }
                "--log-level" => a.log_level = value()?,
                "--scale-out" => a.scale_out = true,
                "--rss-contacts" => a.rss_contacts = num(&flag, &value()?)?,
                "--catch-up-timeout" => a.catch_up_timeout_s = num(&flag, &value()?)?,
                "--seed" => a.seed = num(&flag, &value()?)?,
                "--out" => a.out = PathBuf::from(value()?),
                "--keep" => a.keep = true,
                "--source" => a.source = Some(value()?),
                "--help" | "-h" => bail!("{USAGE}"),
                other => bail!("unknown flag {other:?}\n{USAGE}"),
            }
        }
        anyhow::ensure!(a.intents > 0, "--intents must be above 0");
        anyhow::ensure!(a.per_contact > 0, "--per-contact must be above 0");
        anyhow::ensure!(a.partitions > 0, "--partitions must be above 0");
        anyhow::ensure!(a.rounds > 0, "--rounds must be above 0");
        anyhow::ensure!(
            (0.0..=1.0).contains(&a.strict_fraction),
            "--strict-fraction must be within 0..1"
        );
        anyhow::ensure!(a.latency_seconds > 0.0, "--latency-seconds must be above 0");
        Ok(a)
    }

    fn contacts(&self) -> usize {
        (self.intents / self.per_contact).max(1)
    }
}

fn num<T: std::str::FromStr>(flag: &str, v: &str) -> anyhow::Result<T> {
    v.parse()
        .map_err(|_| anyhow::anyhow!("{flag} takes a number, got {v:?}"))
}

fn main() -> ExitCode {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    if !raw.iter().any(|a| a == "--bench") {
        println!(
            "e2e bench skipped: run `make bench` (or `cargo bench --bench e2e`) with the stack up"
        );
        return ExitCode::SUCCESS;
    }
    let args = match Args::parse(raw.into_iter().filter(|a| a != "--bench")) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e:#}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: starting the runtime failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    match run(&args, &rt) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The whole benchmark report, as written to `report.json`.
#[derive(Serialize)]
struct Report {
    measured_at: String,
    machine: Machine,
    params: Args,
    /// The first round: backlog and latency phases.
    consumers: Vec<ConsumerReport>,
    /// Rounds 2.. (`--rounds`): backlog runs only.
    later_rounds: Vec<Vec<ConsumerReport>>,
    full_two_instances: Option<ConsumerReport>,
    many_contacts: Option<ManyContacts>,
    /// How out of order the preload arrives (the same for every consumer).
    input: Option<ArrivalOrder>,
    ratios: report::Ratios,
    errors: Vec<String>,
}

#[derive(Serialize)]
struct Machine {
    cpus: usize,
    loadavg_1m_start: f64,
    loadavg_1m_end: f64,
}

/// What the runs of one benchmark share.
struct Bench<'a> {
    args: &'a Args,
    rt: &'a tokio::runtime::Runtime,
    run_id: String,
    dir: PathBuf,
    clk_tck: f64,
    /// The intents topic the preload is produced to once (or `--source`), then copied to
    /// each world's.
    source: RefCell<Option<String>>,
    /// The source's arrival order, measured once.
    input: RefCell<Option<ArrivalOrder>>,
}

/// What every run id starts with: its topics, schemas and `run-<id>` directory are named by it.
const RUN_ID_PREFIX: &str = "ccb";

/// Deletes the `run-<id>` directories (consumer logs and configs) of earlier runs in `out`.
fn remove_earlier_runs(out: &std::path::Path) -> anyhow::Result<usize> {
    let Ok(entries) = std::fs::read_dir(out) else {
        return Ok(0); // no earlier run
    };
    let earlier = format!("run-{RUN_ID_PREFIX}");
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let earlier_run = entry.file_name().to_string_lossy().starts_with(&earlier)
            && entry.file_type()?.is_dir();
        if earlier_run {
            let path = entry.path();
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing {}", path.display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

fn run(args: &Args, rt: &tokio::runtime::Runtime) -> anyhow::Result<bool> {
    anyhow::ensure!(
        args.binary.exists(),
        "{} is missing: build it with `make release` (make bench does)",
        args.binary.display()
    );
    if args.consumers.contains(&Kind::KafkaStreams) {
        anyhow::ensure!(
            args.peer_jar.exists(),
            "{} is missing: build it with `make kstreams-peer` (make bench does)",
            args.peer_jar.display()
        );
    }
    let run_id = format!(
        "{RUN_ID_PREFIX}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    // The consumers log every transition (R8): a default run leaves over a gigabyte of logs.
    // Those of the run before this one go; this run's stay for a look until the next one.
    let removed = remove_earlier_runs(&args.out)?;
    if removed > 0 {
        println!(
            "bench: removed the logs of {removed} earlier run(s) in {}",
            args.out.display()
        );
    }
    let dir = args.out.join(format!("run-{run_id}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let loadavg_start = children::loadavg();
    println!(
        "bench {run_id}: {} intents per consumer ({} contacts, {} per contact, strict {:.0}%), \
         {} partitions, consumers {:?}; {cpus} CPUs, load average {loadavg_start:.2}; logs in {}",
        args.intents,
        args.contacts(),
        args.per_contact,
        args.strict_fraction * 100.0,
        args.partitions,
        args.consumers.iter().map(|k| k.name()).collect::<Vec<_>>(),
        dir.display()
    );
    if loadavg_start > cpus as f64 / 2.0 {
        println!("bench: the machine is busy (load {loadavg_start:.2} on {cpus} CPUs): figures will be noisy");
    }
    let bench = Bench {
        args,
        rt,
        run_id,
        dir,
        clk_tck: children::clk_tck(),
        source: RefCell::new(None),
        input: RefCell::new(None),
    };
    // Interleaved rounds: the machine's drift over minutes (measured: the same consumer alone
    // 13,000 to 23,000 intents/s run to run) falls on every consumer of a round alike, so each
    // round's ratios are side by side and their median is the figure.
    let mut rounds: Vec<Vec<ConsumerReport>> = Vec::new();
    let mut errors = Vec::new();
    for round in 1..=args.rounds {
        let mut this = Vec::new();
        for kind in &args.consumers {
            let spec = Spec {
                kind: *kind,
                label: match round {
                    1 => kind.name().into(),
                    n => format!("{}-r{n}", kind.name()),
                },
                instances: 1,
                latency: args.latency && round == 1,
                preload: Preload::Demo,
            };
            match bench.run_world(&spec) {
                Ok(r) => this.push(r),
                Err(e) => {
                    eprintln!("bench: {} failed: {e:#}", spec.label);
                    errors.push(format!("{}: {e:#}", spec.label));
                }
            }
        }
        rounds.push(this);
    }
    let mut two = None;
    if args.scale_out {
        let spec = Spec {
            kind: Kind::Full,
            label: "full-x2".into(),
            instances: 2,
            latency: false,
            preload: Preload::Demo,
        };
        match bench.run_world(&spec) {
            Ok(r) => two = Some(r),
            Err(e) => errors.push(format!("full x2: {e:#}")),
        }
    }
    let mut many = None;
    if args.rss_contacts > 0 {
        let spec = Spec {
            kind: Kind::Full,
            label: "full-many-contacts".into(),
            instances: 1,
            latency: false,
            preload: Preload::OnePerContact(args.rss_contacts),
        };
        match bench.run_world(&spec) {
            Ok(r) => {
                many = Some(ManyContacts {
                    contacts: args.rss_contacts,
                    peak_rss_mib: r.peak_rss_mib,
                    throughput: r.throughput,
                    outputs_ok: r.outputs_ok,
                })
            }
            Err(e) => errors.push(format!("many contacts: {e:#}")),
        }
    }
    let produced = bench
        .source
        .borrow()
        .clone()
        .filter(|_| args.source.is_none());
    if let (Some(topic), false) = (produced, args.keep) {
        if let Err(e) = rt.block_on(kafka_io::delete_world(&args.brokers, &topic, &[])) {
            eprintln!("bench: deleting the preload's source topic {topic} failed: {e:#}");
        }
    }
    let ratios = report::ratios(&rounds, two.as_ref());
    let input = *bench.input.borrow();
    let mut table = report::markdown(&rounds, two.as_ref(), &ratios);
    if let Some(o) = &input {
        table = format!("Input: {o}.\n\n{table}");
    }
    let mut rounds = rounds.into_iter();
    let consumers = rounds.next().unwrap_or_default();
    let later_rounds: Vec<_> = rounds.collect();
    let loadavg_end = children::loadavg();
    let full = Report {
        measured_at: chrono::Utc::now().to_rfc3339(),
        machine: Machine {
            cpus,
            loadavg_1m_start: loadavg_start,
            loadavg_1m_end: loadavg_end,
        },
        params: args.clone(),
        consumers,
        later_rounds,
        full_two_instances: two,
        many_contacts: many,
        input,
        ratios,
        errors,
    };
    let json = serde_json::to_string_pretty(&full)?;
    std::fs::write(args.out.join("report.json"), &json)?;
    std::fs::write(args.out.join("report.md"), &table)?;
    println!("\n{table}");
    if let Some(m) = &full.many_contacts {
        println!(
            "one full instance after {} contacts: peak RSS {:.0} MiB ({:.0} intents/s)",
            m.contacts, m.peak_rss_mib, m.throughput.intents_per_s
        );
    }
    println!(
        "load average {loadavg_start:.2} -> {loadavg_end:.2} on {cpus} CPUs; report: {}",
        args.out.join("report.json").display()
    );
    for e in &full.errors {
        eprintln!("bench: FAILED {e}");
    }
    Ok(full.errors.is_empty())
}

/// Where a world's backlog comes from.
#[derive(Clone, Copy)]
enum Preload {
    /// `causal-commit produce` with the run's sizes and seed, produced once per invocation and
    /// copied record for record to each world (see `Bench::source`): the same input for
    /// every consumer and every round.
    Demo,
    /// One intent for each of N contacts (the many-contacts RSS run).
    OnePerContact(usize),
}

/// One consumer's run.
struct Spec {
    kind: Kind,
    label: String,
    instances: usize,
    latency: bool,
    preload: Preload,
}

/// A run's private names: topics, group, schema, Redis prefix (all start with `id`).
struct World {
    id: String,
    config: Config,
}

impl Bench<'_> {
    fn world(&self, spec: &Spec) -> World {
        let id = format!("{}_{}", self.run_id, spec.label.replace('-', "_"));
        let a = self.args;
        let mut c = Config {
            instance_id: format!("{id}-a"),
            ..Config::default()
        };
        c.kafka.brokers = a.brokers.clone();
        c.kafka.group_id = match spec.kind {
            Kind::KafkaStreams => format!("{id}-ks"),
            _ => format!("{id}-group"),
        };
        c.kafka.intents_topic = format!("{id}.intents");
        c.kafka.side_effects_topic = format!("{id}.side-effects");
        c.kafka.manual_review_topic = format!("{id}.manual-review");
        if let Some(n) = a.max_records {
            c.batch.max_records = n;
        }
        if let Some(ms) = a.max_linger_ms {
            c.batch.max_linger = Duration::from_millis(ms);
        }
        c.postgres.url = a.postgres_url.clone().into();
        c.postgres.schema = id.clone();
        c.redis.url = match spec.kind {
            // Nothing listens on port 1: every Redis call fails at once, the breaker opens and
            // stays open, and PostgreSQL serves locks and lookups for the whole run.
            Kind::Fallback => "redis://127.0.0.1:1".to_string().into(),
            _ => a.redis_url.clone().into(),
        };
        c.redis.key_prefix = id.clone();
        c.telemetry.metrics_listen = String::new();
        c.telemetry.log_level = a.log_level.clone();
        c.admin.listen = String::new();
        c.bench.passthrough = spec.kind == Kind::Passthrough;
        World { id, config: c }
    }

    /// The preload's source topic, produced on first use: `causal-commit produce` with the
    /// run's sizes and seed, its producers concurrent as in production. Every world copies it
    /// (`kafka_io::copy_topic`), so every consumer of every round reads the same records in
    /// the same order: the interleaving of concurrent producers, which sets how many intents
    /// wait for a predecessor, varies from one production to the next.
    fn source(&self) -> anyhow::Result<String> {
        if let Some(topic) = self.source.borrow().as_ref() {
            return Ok(topic.clone());
        }
        let a = self.args;
        if let Some(topic) = &a.source {
            let held = kafka_io::partition_count(&a.brokers, topic)?;
            anyhow::ensure!(
                held == a.partitions as usize,
                "--source {topic} has {held} partitions, the run uses {} (--partitions)",
                a.partitions
            );
            *self.source.borrow_mut() = Some(topic.clone());
            self.measure_input(topic)?;
            return Ok(topic.clone());
        }
        let world = self.scratch_world("source");
        let topic = world.config.kafka.intents_topic.clone();
        self.rt.block_on(kafka_io::create_topics(
            &world.config.kafka.brokers,
            &[(&topic, a.partitions)],
        ))?;
        let started = Instant::now();
        let mut cmd = Command::new(&a.binary);
        cmd.arg("--config")
            .arg(self.config_file(&world, "source")?)
            .arg("produce")
            .args([
                "--count",
                &a.intents.to_string(),
                "--contacts",
                &a.contacts().to_string(),
                "--producers",
                &a.producers.to_string(),
                "--strict-fraction",
                &a.strict_fraction.to_string(),
                "--duplicate-fraction",
                "0",
                "--invalid",
                "0",
                "--seed",
                &a.seed.to_string(),
                "--prefix",
                "pre",
            ]);
        children::run_to_end(
            "causal-commit produce",
            cmd,
            &self.dir.join(format!("{}-produce.log", world.id)),
        )?;
        println!(
            "bench: produced the preload to {topic} in {:.1} s{}",
            started.elapsed().as_secs_f64(),
            if a.keep {
                " (kept: --source reuses it)"
            } else {
                ""
            }
        );
        *self.source.borrow_mut() = Some(topic.clone());
        self.measure_input(&topic)?;
        Ok(topic)
    }

    /// Reads the source once and records how out of order it arrives: the interleaving of the
    /// preload's concurrent producers decides how many intents wait, hence much of the work
    /// (PostgreSQL rows and contact-state bytes), so the figures are read beside it.
    fn measure_input(&self, topic: &str) -> anyhow::Result<()> {
        let world = self.scratch_world("input");
        let started = Instant::now();
        let order = ArrivalOrder::of_topic(&world.config, topic)
            .with_context(|| format!("reading {topic} for its arrival order"))?;
        println!(
            "bench: input {topic}: {order} (read in {:.1} s)",
            started.elapsed().as_secs_f64()
        );
        *self.input.borrow_mut() = Some(order);
        Ok(())
    }

    /// A world that runs no consumer: its configuration reaches the run's brokers and names
    /// the topics of the preload's source.
    fn scratch_world(&self, label: &str) -> World {
        self.world(&Spec {
            kind: Kind::Full,
            label: label.into(),
            instances: 1,
            latency: false,
            preload: Preload::Demo,
        })
    }

    /// Runs one world end to end and always cleans it up (unless `--keep`).
    fn run_world(&self, spec: &Spec) -> anyhow::Result<ConsumerReport> {
        let world = self.world(spec);
        println!(
            "\n[{}] world {} ({} instance{})",
            spec.label,
            world.id,
            spec.instances,
            if spec.instances > 1 { "s" } else { "" }
        );
        let result = self.measure(spec, &world);
        if !self.args.keep {
            if let Err(e) = self.clean(spec, &world) {
                eprintln!("[{}] clean-up incomplete: {e:#}", spec.label);
            }
        }
        result
    }

    fn clean(&self, spec: &Spec, world: &World) -> anyhow::Result<()> {
        let c = &world.config;
        let groups = vec![c.kafka.group_id.clone()];
        self.rt
            .block_on(kafka_io::delete_world(&c.kafka.brokers, &world.id, &groups))?;
        if spec.kind.uses_postgres() {
            self.rt.block_on(async {
                let pool = stores::pool(&self.args.postgres_url).await?;
                stores::drop_schema(&pool, &c.postgres.schema).await?;
                stores::delete_redis_keys(&self.args.redis_url, &c.redis.key_prefix).await?;
                anyhow::Ok(())
            })?;
        }
        let state = self.dir.join(format!("ks-state-{}", world.id));
        if state.exists() {
            std::fs::remove_dir_all(&state)?;
        }
        Ok(())
    }

    fn config_file(&self, world: &World, instance: &str) -> anyhow::Result<PathBuf> {
        self.config_file_with(world, instance, None)
    }

    /// The instance's configuration file; with `metrics`, its `/metrics` listens there.
    fn config_file_with(
        &self,
        world: &World,
        instance: &str,
        metrics: Option<SocketAddr>,
    ) -> anyhow::Result<PathBuf> {
        let mut c = world.config.clone();
        c.instance_id = format!("{}-{instance}", world.id);
        if let Some(addr) = metrics {
            c.telemetry.metrics_listen = addr.to_string();
        }
        let path = self.dir.join(format!("{}-{instance}.toml", world.id));
        std::fs::write(&path, toml(&c)).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    fn measure(&self, spec: &Spec, world: &World) -> anyhow::Result<ConsumerReport> {
        let a = self.args;
        let c = &world.config;
        let label = spec.label.as_str();
        self.rt.block_on(kafka_io::create_topics(
            &c.kafka.brokers,
            &[
                (&c.kafka.intents_topic, a.partitions),
                (&c.kafka.side_effects_topic, a.partitions),
                (&c.kafka.manual_review_topic, 3),
            ],
        ))?;
        let cfg_a = self.config_file(world, "a")?;

        // The backlog.
        let started = Instant::now();
        match spec.preload {
            Preload::Demo => {
                let source = self.source()?;
                let copied =
                    kafka_io::copy_topic(&c.kafka.brokers, &source, &c.kafka.intents_topic)?;
                println!("[{label}] copied the preload ({copied} records) from {source}");
            }
            Preload::OnePerContact(n) => {
                let intents = one_per_contact(n, a.strict_fraction, a.seed);
                let producer = kafka_io::producer(&c.kafka.brokers, &c.kafka.intents_topic)?;
                kafka_io::produce_at_rate(&producer, &c.kafka.intents_topic, intents, 0.0)?;
            }
        }
        let progress = Progress::new(c)?;
        let total = progress.end()?;
        println!(
            "[{label}] preloaded {total} intents in {:.1} s",
            started.elapsed().as_secs_f64()
        );

        // PostgreSQL: schema first, so the counters see only the run.
        let pg = if spec.kind.uses_postgres() {
            let mut cmd = Command::new(&a.binary);
            cmd.arg("--config").arg(&cfg_a).arg("migrate");
            children::run_to_end(
                "causal-commit migrate",
                cmd,
                &self.dir.join(format!("{}-migrate.log", world.id)),
            )?;
            let pool = self.rt.block_on(stores::pool(&a.postgres_url))?;
            let before = self
                .rt
                .block_on(stores::counters(&pool, &c.postgres.schema))?;
            Some((pool, before))
        } else {
            None
        };

        // The consumer(s), on the backlog.
        let mut procs = Vec::new();
        let mut metrics = Vec::new();
        for n in 0..spec.instances {
            let instance = ["a", "b", "c", "d"].get(n).copied().unwrap_or("x");
            let (proc, addr) = self.spawn(spec, world, instance)?;
            procs.push(proc);
            metrics.extend(addr);
        }
        let spawned = Instant::now();
        let samples = self.watch(&mut procs, &progress, total, spawned, label)?;
        let throughput = report::throughput(&samples, total);
        // The batch cycle of the backlog alone (before the latency phases add small batches).
        let scrapes: Vec<String> = metrics.iter().filter_map(|a| scrape(*a)).collect();
        let batch_steps = report::batch_steps(&scrapes);
        if let Some(b) = &batch_steps {
            println!("[{label}] {}", report::describe_steps(b));
        }
        println!(
            "[{label}] start-up {:.2} s, {:.0} intents/s steady ({}; {:.0} overall), {:.3} CPU s / 1k",
            throughput.startup_s,
            throughput.intents_per_s,
            throughput.window,
            throughput.overall_per_s,
            throughput.cpu_s_per_1k
        );

        // Latency at full and half speed.
        let mut lat = [None, None];
        let mut lat_steps = [None, None];
        if spec.latency && throughput.intents_per_s > 0.0 {
            for (i, (name, factor)) in [("full", 1.0), ("half", 0.5)].into_iter().enumerate() {
                let rate = throughput.intents_per_s * factor;
                let before: Vec<String> = metrics.iter().filter_map(|a| scrape(*a)).collect();
                let l = self.latency_phase(spec, world, name, rate, &mut procs, &progress)?;
                println!(
                    "[{label}] latency at {name} speed ({rate:.0}/s, {} intents): p50 {} ms, p99 {} ms, max {} ms ({} seen)",
                    l.intents, l.p50_ms, l.p99_ms, l.max_ms, l.observed
                );
                println!(
                    "[{label}] at {name} speed, p99/max ms by second of creation: {}",
                    report::describe_seconds(&l)
                );
                let after: Vec<String> = metrics.iter().filter_map(|a| scrape(*a)).collect();
                lat_steps[i] = report::batch_steps_since(&before, &after);
                if let Some(b) = &lat_steps[i] {
                    println!("[{label}] at {name} speed: {}", report::describe_steps(b));
                }
                lat[i] = Some(l);
            }
        }
        let processed = progress.end()?;
        wait_caught_up(&mut procs, &progress, Duration::from_secs(120))?;
        let cpu_total: f64 = procs.iter().filter_map(ChildProc::cpu_seconds).sum();
        let peak_rss_kib = procs
            .iter()
            .filter_map(ChildProc::peak_rss_kib)
            .max()
            .unwrap_or(0);
        let logs: Vec<String> = procs.iter().map(|p| p.log.display().to_string()).collect();
        for p in procs {
            let name = p.name.clone();
            match p.terminate(Duration::from_secs(60)) {
                // The JVM exits with 128 + SIGTERM once its shutdown hook (a clean close) ran.
                Ok(status) if spec.kind == Kind::KafkaStreams && status.code() == Some(143) => {}
                Ok(status) if !status.success() => {
                    eprintln!("[{label}] {name} exited with {status} after SIGTERM")
                }
                Ok(_) => {}
                Err(e) => eprintln!("[{label}] {e:#}"),
            }
        }
        let pg = match pg {
            Some((pool, before)) => {
                // Backends flush their statistics when they end; give them a moment.
                std::thread::sleep(Duration::from_millis(1500));
                let after = self
                    .rt
                    .block_on(stores::counters(&pool, &c.postgres.schema))?;
                report::pg_per_intent(after.since(before), processed)
            }
            None => report::PgPerIntent::default(),
        };
        let outputs = kafka_io::count_outputs(c, spec.kind.carried())?;
        let expected = processed;
        let outputs_ok = outputs.effects as i64 == expected
            && outputs.distinct_effects as i64 == expected
            && outputs.reviews == 0;
        if !outputs_ok {
            eprintln!(
                "[{label}] outputs differ from the input: {outputs:?}, expected {expected} effects"
            );
        }
        let [full_speed, half_speed] = lat;
        Ok(ConsumerReport {
            name: spec.kind.name().into(),
            instances: spec.instances,
            throughput,
            latency_full_speed: full_speed,
            latency_half_speed: half_speed,
            cpu_s_total: cpu_total,
            peak_rss_mib: peak_rss_kib as f64 / 1024.0,
            pg,
            outputs,
            batch_steps,
            latency_batch_steps: lat_steps,
            expected_effects: expected,
            outputs_ok,
            log: logs.join(" "),
            progress: report::progress(&samples, 300),
        })
    }

    /// Starts one consumer process; for the product, also where its `/metrics` listens.
    fn spawn(
        &self,
        spec: &Spec,
        world: &World,
        instance: &str,
    ) -> anyhow::Result<(ChildProc, Option<SocketAddr>)> {
        let a = self.args;
        let c = &world.config;
        let log = self.dir.join(format!("{}-{instance}.log", world.id));
        let mut metrics = None;
        let cmd = match spec.kind {
            Kind::KafkaStreams => {
                let mut cmd = Command::new("java");
                cmd.args(&a.java_opts)
                    .arg("-jar")
                    .arg(&a.peer_jar)
                    .args(["--bootstrap-servers", &c.kafka.brokers])
                    .args(["--application-id", &c.kafka.group_id])
                    .args(["--intents-topic", &c.kafka.intents_topic])
                    .args(["--side-effects-topic", &c.kafka.side_effects_topic])
                    .args(["--review-topic", &c.kafka.manual_review_topic])
                    .args(["--threads", &a.ks_threads.to_string()])
                    .args(["--commit-interval-ms", "100"])
                    .arg("--state-dir")
                    .arg(self.dir.join(format!("ks-state-{}", world.id)));
                cmd
            }
            _ => {
                metrics = Some(free_local_addr()?);
                let mut cmd = Command::new(&a.binary);
                cmd.arg("--config")
                    .arg(self.config_file_with(world, instance, metrics)?)
                    .arg("run")
                    // The file decides the log level, not the caller's environment.
                    .env_remove("RUST_LOG");
                cmd
            }
        };
        let proc = ChildProc::spawn(
            &format!("{} {instance}", spec.kind.name()),
            cmd,
            &log,
            self.clk_tck,
        )?;
        Ok((proc, metrics))
    }

    /// Samples the group's progress and the processes' CPU until the backlog is committed.
    fn watch(
        &self,
        procs: &mut [ChildProc],
        progress: &Progress,
        total: i64,
        spawned: Instant,
        label: &str,
    ) -> anyhow::Result<Vec<Sample>> {
        let deadline = spawned + Duration::from_secs(self.args.catch_up_timeout_s);
        let mut samples = Vec::new();
        let mut last_print = Instant::now();
        loop {
            for p in procs.iter_mut() {
                p.ensure_running()?;
            }
            let committed = progress.committed()?;
            let cpu = procs.iter().filter_map(ChildProc::cpu_seconds).sum();
            samples.push(Sample {
                t: spawned.elapsed().as_secs_f64(),
                committed,
                cpu,
                machine_cpu: children::machine_cpu_seconds(self.clk_tck),
            });
            if committed >= total {
                return Ok(samples);
            }
            if Instant::now() > deadline {
                bail!(
                    "only {committed} of {total} intents committed after {:?}",
                    deadline - spawned
                );
            }
            if last_print.elapsed() > Duration::from_secs(10) {
                println!("[{label}] {committed} / {total} committed");
                last_print = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn latency_phase(
        &self,
        spec: &Spec,
        world: &World,
        name: &str,
        rate: f64,
        procs: &mut [ChildProc],
        progress: &Progress,
    ) -> anyhow::Result<report::Latency> {
        let a = self.args;
        let c = &world.config;
        let producer = kafka_io::producer(&c.kafka.brokers, &c.kafka.intents_topic)?;
        wait_caught_up(procs, progress, Duration::from_secs(300))?;
        let n = ((rate * a.latency_seconds) as usize).clamp(100, a.latency_max.max(100));
        let prefix = format!("lat-{name}");
        let intents = live_intents(n, a.per_contact, a.strict_fraction, a.seed, &prefix)?;
        let observer = kafka_io::observer(&c.kafka.brokers, &c.kafka.side_effects_topic)?;
        let carried = spec.kind.carried();
        // Generous: the phase itself, then time for a saturated consumer to drain.
        let within = Duration::from_secs_f64(n as f64 / rate * 3.0 + 120.0);
        let id_prefix = format!("{prefix}-intent-");
        let (produced, seen) = std::thread::scope(|s| {
            let watcher = s.spawn(|| kafka_io::observe(&observer, carried, &id_prefix, n, within));
            let produced =
                kafka_io::produce_at_rate(&producer, &c.kafka.intents_topic, intents, rate);
            let seen = watcher.join();
            (produced, seen)
        });
        let produced = produced?;
        let seen = seen.map_err(|_| anyhow::anyhow!("the observer thread panicked"))?;
        for p in procs.iter_mut() {
            p.ensure_running()?;
        }
        Ok(report::latency(rate, produced, seen))
    }
}

/// A loopback address nothing listens on now (the OS picks the port).
fn free_local_addr() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?)
}

/// The instance's `/metrics` text; `None` (with a note) when it does not answer.
fn scrape(addr: SocketAddr) -> Option<String> {
    let get = || -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response
            .split_once("\r\n\r\n")
            .map_or(String::new(), |(_, body)| body.to_string()))
    };
    get()
        .inspect_err(|e| eprintln!("bench: scraping {addr}/metrics failed: {e}"))
        .ok()
}

/// Waits until the group has committed everything produced so far.
fn wait_caught_up(
    procs: &mut [ChildProc],
    progress: &Progress,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        for p in procs.iter_mut() {
            p.ensure_running()?;
        }
        let (committed, end) = (progress.committed()?, progress.end()?);
        if committed >= end {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the consumer is {} records behind after {within:?}",
                end - committed
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The latency phase's intents: the demo generator's (same strict fraction, contacts of
/// `per_contact` intents), in one producer's order.
fn live_intents(
    n: usize,
    per_contact: usize,
    strict_fraction: f64,
    seed: u64,
    prefix: &str,
) -> anyhow::Result<Vec<Intent>> {
    let opts = ProduceOptions {
        count: n,
        contacts: (n / per_contact).max(1),
        clinics: 20,
        producers: 1,
        rate: 0,
        strict_fraction,
        duplicate_fraction: 0.0,
        invalid: 0,
        seed: seed.wrapping_add(1),
        prefix: prefix.to_string(),
    };
    demo::generate(&opts)
        .0
        .into_iter()
        .map(|(_, value)| Intent::decode(value.as_slice()).context("decoding a generated intent"))
        .collect()
}

/// One intent for each of `n` contacts.
fn one_per_contact(n: usize, strict_fraction: f64, seed: u64) -> Vec<Intent> {
    let strict_every = if strict_fraction > 0.0 {
        (1.0 / strict_fraction).round().max(1.0) as usize
    } else {
        usize::MAX
    };
    (0..n)
        .map(|i| Intent {
            intent_id: format!("many-intent-{i}"),
            contact_id: format!("many-contact-{i}"),
            clinic_id: format!("clinic-{}", i % 20),
            correlation_id: format!("many-corr-{i}"),
            dispatch_priority: ((i as u64 ^ seed) % 10) as i32,
            causal_sequence: u64::from(i.is_multiple_of(strict_every)),
            expected_version: 0,
            action: Action::Book as i32,
            payload: format!("{{\"n\":{i}}}").into_bytes().into(),
            created_at_ms: 0,
        })
        .collect()
}

/// The TOML file a consumer runs with: the keys the benchmark sets, defaults for the rest.
fn toml(c: &Config) -> String {
    let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    format!(
        "# Written by benches/e2e.rs for one benchmark run.\n\
         instance_id = {}\n\n\
         [kafka]\nbrokers = {}\ngroup_id = {}\nintents_topic = {}\nside_effects_topic = {}\n\
         manual_review_topic = {}\n\n\
         [batch]\nmax_records = {}\nmax_linger = \"{}ms\"\n\n\
         [postgres]\nurl = {}\nschema = {}\n\n\
         [redis]\nurl = {}\nkey_prefix = {}\n\n\
         [telemetry]\nlog_level = {}\nmetrics_listen = {}\n\n\
         [admin]\nlisten = \"\"\n\n\
         [bench]\npassthrough = {}\n",
        q(&c.instance_id),
        q(&c.kafka.brokers),
        q(&c.kafka.group_id),
        q(&c.kafka.intents_topic),
        q(&c.kafka.side_effects_topic),
        q(&c.kafka.manual_review_topic),
        c.batch.max_records,
        c.batch.max_linger.as_millis(),
        q(c.postgres.url.expose_secret()),
        q(&c.postgres.schema),
        q(c.redis.url.expose_secret()),
        q(&c.redis.key_prefix),
        q(&c.telemetry.log_level),
        q(&c.telemetry.metrics_listen),
        c.bench.passthrough,
    )
}
