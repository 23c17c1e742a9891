//! The causal-commit CLI: the processor and its operator tools.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use secrecy::ExposeSecret as _;
use tokio_util::sync::CancellationToken;

use causal_commit::admin::client::{segment, Client, Reply};
use causal_commit::config::Config;
use causal_commit::store::postgres::SkipTarget;
use causal_commit::{demo, pipeline, store, telemetry, verify};

// The engine allocates and frees a batch's worth of decoded intents, states and rows every
// cycle; glibc's allocator spent about two thirds of the engine thread's CPU doing it (perf, in
// the README's throughput section). mimalloc's thread-local free lists do the same work in a
// fraction of the time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "causal-commit", version, about)]
struct Cli {
    /// Configuration file (TOML); CAUSAL_COMMIT__* environment variables override it.
    #[arg(long, short, global = true, env = "CAUSAL_COMMIT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the processor until SIGTERM or Ctrl-C.
    Run,
    /// Produce demo intents (many contacts, concurrent producers, priorities).
    Produce(demo::ProduceOptions),
    /// Create the PostgreSQL schema, apply the migrations and grant postgres.runtime_role what
    /// `run` needs. Run it with the owner role's URL; `run` does not migrate.
    Migrate,
    /// Read the output topics (read_committed) and print what they hold, as JSON.
    Summary {
        /// Count only intents whose id (or review key) starts with this prefix.
        #[arg(long, default_value = "")]
        prefix: String,
    },
    /// Wait until the processor's group has committed every intent produced so far.
    WaitCaughtUp {
        /// Give up after this long (e.g. 90s, 5m).
        #[arg(long, default_value = "5m")]
        timeout: humantime::Duration,
    },
    /// Check the contract on what the topics and the audit hold (read_committed): per contact
    /// order, gaps, duplicates, lost intents, effect content, justified manual reviews and
    /// more (see `causal_commit::verify`). Prints a JSON report; exits 1 on a violation, or on
    /// work still pending (waiting intents, unresolved slots, held contacts) unless allowed.
    Verify {
        /// Check only intents whose id (or invalid records whose key) starts with this prefix.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Accept waiting intents, unresolved manual-review slots and held contacts.
        #[arg(long)]
        allow_waiting: bool,
    },
    /// Print the effective configuration as JSON, secrets redacted.
    ShowConfig,
    /// Operator: the backlog per partition (admin API).
    Backlog {
        /// Exit 1 unless the causal queue is drained with no active conflict: nothing waiting,
        /// no contact on hold, no operator command unfinished (the runbook's return to normal).
        #[arg(long)]
        check_drained: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Operator: contacts on hold, why, since when, and the sequence they miss (admin API).
    Held(AdminArgs),
    /// Operator: one contact's state and audit history (admin API).
    Contact {
        /// The contact.
        contact: String,
        /// Return history rows after this row id (a previous page's `next_after`).
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// History rows per page.
        #[arg(long, default_value_t = 1000)]
        limit: i64,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Operator: one contact's items on the manual-review topic, where each one is (partition,
    /// offset: what `resubmit` takes), its reason and sequences, its intent's outcome now, and
    /// whether it can be re-submitted (admin API).
    Reviews {
        /// The contact.
        contact: String,
        /// Items to list (the first ones, by partition and offset).
        #[arg(long, default_value_t = 100)]
        limit: i64,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Operator: release a held contact, resuming it or skipping its missing sequences below
    /// --skip-to. The owning instance applies it in a batch; audited. Waits until the command
    /// is applied (its batch committed), refused, or --wait passes.
    Release {
        /// The held contact.
        #[arg(long)]
        contact: String,
        /// Skip every unresolved sequence below this one (1 to 2^63-1), so it commits next.
        #[arg(long)]
        skip_to: Option<SkipTarget>,
        #[command(flatten)]
        op: OperatorArgs,
    },
    /// Operator: re-submit a manual-review item, named by its review record's partition and
    /// offset on the manual-review topic; or, with --contact, every item of a released contact
    /// that a re-submission takes (as `reviews` lists them), one after the other in the order
    /// they were reviewed. Audited; each waits like `release`.
    Resubmit {
        /// The manual-review topic (default: the instance's).
        #[arg(long, conflicts_with = "contact")]
        topic: Option<String>,
        /// The review record's partition.
        #[arg(long, required_unless_present = "contact", conflicts_with = "contact")]
        partition: Option<i32>,
        /// The review record's offset.
        #[arg(long, required_unless_present = "contact", conflicts_with = "contact")]
        offset: Option<i64>,
        /// Every re-submittable item of this contact (it must not be on hold: release it first).
        #[arg(long)]
        contact: Option<String>,
        #[command(flatten)]
        op: OperatorArgs,
    },
    /// Operator: list, show or cancel operator commands (admin API).
    Commands {
        #[command(subcommand)]
        command: CommandsCommand,
    },
    /// Operator: the instance's readiness (admin API); exits 1 when not ready.
    Ready(AdminArgs),
    /// Recovery points: what Kafka's committed offsets and PostgreSQL say about each partition,
    /// and the way out when a partition refuses to start (docs/exactly-once.md).
    #[command(subcommand)]
    RecoveryPoint(RecoveryPointCommand),
}

/// How the operator commands reach the admin API. No database credentials are needed.
#[derive(clap::Args, Clone)]
struct AdminArgs {
    /// The admin API's base URL (default: http:// + the configuration's admin.listen).
    #[arg(long, env = "CAUSAL_COMMIT_ADMIN_URL")]
    admin_url: Option<String>,
    /// A file holding the admin token (else the CAUSAL_COMMIT_ADMIN_TOKEN variable, else the
    /// configuration's admin.token).
    #[arg(long)]
    token_file: Option<PathBuf>,
}

/// A state-changing operator command: who asks, and how long to wait for it.
#[derive(clap::Args, Clone)]
struct OperatorArgs {
    /// Who asks (recorded in the audit).
    #[arg(long, env = "CAUSAL_COMMIT_ACTOR", default_value = "cli")]
    actor: String,
    /// How long to wait for the owning instance to apply it (0s: queue and return).
    #[arg(long, default_value = "30s")]
    wait: humantime::Duration,
    /// When --wait passes with the command still pending, cancel it (else it stays queued and
    /// is reported).
    #[arg(long)]
    cancel_on_timeout: bool,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(Subcommand)]
enum CommandsCommand {
    /// Unfinished commands (pending, or applied in a batch not yet committed); --all for all.
    List {
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// One command and its state.
    Show {
        id: i64,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Cancel a pending command (audited).
    Cancel {
        id: i64,
        #[arg(long, env = "CAUSAL_COMMIT_ACTOR", default_value = "cli")]
        actor: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
enum RecoveryPointCommand {
    /// Per partition: the committed offset and its recovery point, and PostgreSQL's last and
    /// last committed batches. JSON.
    Show,
    /// Tells a partition that refuses to start (its committed offset has no recovery point and
    /// PostgreSQL cannot tell whether its last batch committed) what happened to that batch.
    /// Without --committed or --aborted, looks for the batch's outputs on the output topics.
    /// Refused, changing nothing, for a partition whose owner does not refuse it (a running
    /// owner settles its last batch itself).
    Resolve {
        #[arg(long)]
        partition: i32,
        /// The batch's outputs are on the output topics: keep it.
        #[arg(long, conflicts_with = "aborted")]
        committed: bool,
        /// The batch never committed: roll it back and replay its records.
        #[arg(long)]
        aborted: bool,
        /// Who decides (recorded in the audit).
        #[arg(long, default_value = "cli")]
        actor: String,
    },
    /// Tells a partition refused because its log no longer holds where it resumes (the topic
    /// deleted and recreated, or records deleted before they were consumed) where to resume
    /// instead: the log's first offset now, or a given offset in it. Audited; refused for a
    /// partition whose log still holds its resume point (nothing is ever skipped by this).
    ResumeAt {
        #[arg(long)]
        partition: i32,
        /// The partition's first offset now.
        #[arg(long, conflicts_with = "offset", required_unless_present = "offset")]
        earliest: bool,
        /// An offset in the partition's log now.
        #[arg(long)]
        offset: Option<i64>,
        /// Who decides (recorded in the audit).
        #[arg(long, default_value = "cli")]
        actor: String,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Test builds only: the fail points named in `FAILPOINTS` (see Cargo.toml's features).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("causal-commit: starting the runtime failed: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let error = described(&e);
            tracing::error!(error, "causal-commit failed");
            eprintln!("causal-commit: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `error` and its causes, outermost first, as `{:#}` writes them, but a cause its wrapper's
/// text already ends with (this crate's errors include their source) is written once.
fn described(error: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = Config::load(cli.config.as_deref()).context("loading the configuration")?;
    let postgres = config.postgres.clone();
    let result = dispatch(cli.command, config).await;
    // sqlx's "pool timed out" alone does not say why: ask PostgreSQL (see `sessions`).
    match result {
        Err(e) if store::postgres::sessions::got_no_session(&e) => {
            let cause = store::postgres::sessions::cause(&postgres).await;
            Err(e.context(format!(
                "no PostgreSQL session within postgres.connect_timeout; a connection opened to \
                 ask why found: {cause}"
            )))
        }
        result => result,
    }
}

// Long only because the CLI is wide: one short arm per subcommand, a flat dispatch.
async fn dispatch(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Run => {
            let _telemetry = telemetry::init(&config.telemetry)?;
            let health = Arc::new(pipeline::health::Health::default());
            // The probes outlive the engine's drain: /livez answers and /readyz says 503 while
            // the batch in hand commits.
            let probes_stop = CancellationToken::new();
            let probes =
                telemetry::start_server(&config.telemetry, health.clone(), probes_stop.clone())
                    .await?;
            let shutdown = CancellationToken::new();
            tokio::spawn(signal_shutdown(shutdown.clone()));
            let result = pipeline::run_with(Arc::new(config), shutdown, health).await;
            probes_stop.cancel();
            if let Some(probes) = probes {
                if let Ok(Err(e)) = probes.await {
                    tracing::warn!(error = %e, "the metrics and probes listener failed");
                }
            }
            result
        }
        Command::Produce(opts) => {
            let report = demo::produce(&config, &opts).await?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Command::Migrate => {
            let pg = &config.postgres;
            let pool = store::postgres::pool(pg)?;
            store::postgres::migrate(&pool, &pg.schema).await?;
            println!("migrations applied to schema {}", pg.schema);
            if !pg.runtime_role.is_empty() {
                store::postgres::grant_runtime_role(&pool, &pg.schema, &pg.runtime_role)
                    .await
                    .with_context(|| format!("granting role {}", pg.runtime_role))?;
                println!(
                    "role {} may read and write the tables of schema {}",
                    pg.runtime_role, pg.schema
                );
            }
            Ok(())
        }
        Command::WaitCaughtUp { timeout } => {
            tokio::task::spawn_blocking(move || demo::wait_caught_up(&config, timeout.into()))
                .await??;
            Ok(())
        }
        Command::Summary { prefix } => {
            let summary =
                tokio::task::spawn_blocking(move || demo::summarize(&config, &prefix)).await??;
            println!("{}", serde_json::to_string_pretty(&summary)?);
            Ok(())
        }
        Command::Backlog {
            check_drained,
            admin,
        } => {
            let api = client(&config, &admin)?;
            let backlog = api.get("/v1/backlog").await?;
            if !check_drained || !backlog.ok() {
                return print_reply(backlog);
            }
            check_drained_now(&api, backlog).await
        }
        Command::Held(admin) => print_reply(client(&config, &admin)?.get("/v1/held").await?),
        Command::Contact {
            contact,
            after,
            limit,
            admin,
        } => {
            let path = format!(
                "/v1/contacts/{}?after={after}&limit={limit}",
                segment(&contact)
            );
            print_reply(client(&config, &admin)?.get(&path).await?)
        }
        Command::Reviews {
            contact,
            limit,
            admin,
        } => {
            let path = format!("/v1/contacts/{}/reviews?limit={limit}", segment(&contact));
            print_reply(client(&config, &admin)?.get(&path).await?)
        }
        Command::Ready(admin) => print_reply(client(&config, &admin)?.get("/v1/ready").await?),
        Command::Release {
            contact,
            skip_to,
            op,
        } => {
            let mut body = serde_json::json!({ "actor": op.actor });
            if let Some(n) = skip_to {
                body["skip_to"] = n.get().into();
            }
            let path = format!("/v1/contacts/{}/release", segment(&contact));
            operator_command(&config, &op, &path, &body).await
        }
        Command::Resubmit {
            topic,
            partition,
            offset,
            contact,
            op,
        } => match (contact, partition, offset) {
            (Some(contact), _, _) => resubmit_contact(&config, &op, &contact).await,
            (None, Some(partition), Some(offset)) => {
                let mut body = serde_json::json!({ "actor": op.actor, "partition": partition, "offset": offset });
                if let Some(t) = topic {
                    body["topic"] = t.into();
                }
                operator_command(&config, &op, "/v1/resubmissions", &body).await
            }
            _ => anyhow::bail!("resubmit needs --partition and --offset, or --contact"),
        },
        Command::Commands { command } => match command {
            CommandsCommand::List { all, admin } => {
                let state = if all { "all" } else { "unfinished" };
                print_reply(
                    client(&config, &admin)?
                        .get(&format!("/v1/commands?state={state}"))
                        .await?,
                )
            }
            CommandsCommand::Show { id, admin } => print_reply(
                client(&config, &admin)?
                    .get(&format!("/v1/commands/{id}"))
                    .await?,
            ),
            CommandsCommand::Cancel { id, actor, admin } => {
                let body = serde_json::json!({ "actor": actor });
                print_reply(
                    client(&config, &admin)?
                        .post(&format!("/v1/commands/{id}/cancel"), &body)
                        .await?,
                )
            }
        },
        Command::Verify {
            prefix,
            allow_waiting,
        } => {
            let options = verify::Options {
                prefix,
                allow_waiting,
            };
            let report =
                tokio::task::spawn_blocking(move || verify::run(&config, &options)).await??;
            println!("{}", serde_json::to_string_pretty(&report)?);
            anyhow::ensure!(report.ok, "{} (see the report)", report.summary());
            Ok(())
        }
        Command::RecoveryPoint(c) => recovery_point(config, c).await,
        Command::ShowConfig => {
            println!("{}", serde_json::to_string_pretty(&config)?);
            Ok(())
        }
    }
}

/// The admin API client of an operator command: its URL (given, or from `admin.listen`) and
/// its token (`--token-file`, else `CAUSAL_COMMIT_ADMIN_TOKEN`, else the configuration's
/// `admin.token`).
fn client(config: &Config, args: &AdminArgs) -> anyhow::Result<Client> {
    let url = match &args.admin_url {
        Some(u) => u.clone(),
        None => {
            anyhow::ensure!(
                !config.admin.listen.is_empty(),
                "no --admin-url, and admin.listen is empty"
            );
            format!(
                "http://{}",
                config.admin.listen.replace("0.0.0.0", "127.0.0.1")
            )
        }
    };
    let token = match &args.token_file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("reading --token-file {}", f.display()))?
            .trim()
            .to_string(),
        None => std::env::var("CAUSAL_COMMIT_ADMIN_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            // On the instance's own host, its configuration's token will do.
            .unwrap_or_else(|| config.admin.token.expose_secret().to_string()),
    };
    Client::new(&url, token.into())
}

/// The runbook's return to normal: prints the backlog, then fails unless nothing waits, no
/// contact is on hold and no operator command is unfinished.
async fn check_drained_now(api: &Client, backlog: Reply) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(&backlog.body)?);
    let held = api.get("/v1/held").await?;
    anyhow::ensure!(held.ok(), "the admin API refused: {}", held.error());
    let commands = api.get("/v1/commands?state=unfinished").await?;
    anyhow::ensure!(commands.ok(), "the admin API refused: {}", commands.error());
    let none = Vec::new();
    let parts = backlog.body["partitions"].as_array().unwrap_or(&none);
    let waiting: Vec<String> = parts
        .iter()
        .filter(|p| p["waiting"].as_i64().unwrap_or(0) > 0)
        .map(|p| format!("partition {}: {} waiting", p["partition"], p["waiting"]))
        .collect();
    let held = held.body["contacts"].as_array().map_or(0, Vec::len);
    let unfinished = commands.body["commands"].as_array().map_or(0, Vec::len);
    anyhow::ensure!(
        waiting.is_empty() && held == 0 && unfinished == 0,
        "not drained: {} intents waiting ({}), {held} contacts on hold, {unfinished} operator commands unfinished",
        parts.iter().map(|p| p["waiting"].as_i64().unwrap_or(0)).sum::<i64>(),
        if waiting.is_empty() { "none".to_string() } else { waiting.join(", ") }
    );
    eprintln!("drained: nothing waiting, no contact on hold, no operator command unfinished");
    Ok(())
}

/// Prints an answer's JSON; an error answer fails the command with its message.
fn print_reply(reply: Reply) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(&reply.body)?);
    anyhow::ensure!(reply.ok(), "the admin API refused: {}", reply.error());
    Ok(())
}

/// How long `recovery-point resolve` may read each output topic: it stops at the batch's
/// first output, but a batch that never committed is only known so at the topics' end, which
/// a busy deployment may have moved far past it.
const RESOLVE_READ_WITHIN: std::time::Duration = std::time::Duration::from_secs(600);

/// How a refused partition's last batch `batch` ended, judged from its outputs on the output
/// topics: committed when one of them is there, aborted when none is.
async fn resolution_from_outputs(
    config: &Config,
    outputs: store::postgres::BatchOutputs,
    batch: u64,
) -> anyhow::Result<store::postgres::Resolution> {
    use store::postgres::Resolution;
    let partition = outputs.partition;
    if outputs.effects.is_empty() && outputs.reviews.is_empty() {
        // Nothing of it is visible: replaying its records decides them again.
        return Ok(Resolution::Aborted);
    }
    eprintln!(
        "looking for batch {batch}'s {} effects and {} reviews on {} and {} (read_committed, \
         for up to {} each)",
        outputs.effects.len(),
        outputs.reviews.len(),
        config.kafka.side_effects_topic,
        config.kafka.manual_review_topic,
        humantime::format_duration(RESOLVE_READ_WITHIN)
    );
    let c = config.clone();
    let found = tokio::task::spawn_blocking(move || {
        pipeline::read::first_output_committed(&c, &outputs, RESOLVE_READ_WITHIN)
    })
    .await?
    .with_context(|| {
        format!(
            "the output topics could not tell whether batch {batch} of partition {partition} \
             committed; nothing was changed: once you know, give --committed or --aborted \
             (docs/exactly-once.md, \"When a partition refuses to start\")"
        )
    })?;
    Ok(match found {
        Some(f) => {
            println!(
                "partition {partition}: batch {batch} committed: {} is at {} partition {} offset \
                 {} (found after reading {} records)",
                f.what, f.topic, f.partition, f.offset, f.read
            );
            Resolution::Committed
        }
        None => {
            println!(
                "partition {partition}: batch {batch} never committed: none of its outputs is on \
                 the output topics"
            );
            Resolution::Aborted
        }
    })
}

/// The most items `resubmit --contact` lists at once (the API's largest page).
const RESUBMIT_PAGE: usize = 10_000;

/// `resubmit --contact`: every item of the contact's listing that a re-submission takes, the
/// latest of each intent, in the order they were reviewed (an assigned-mode intent takes its
/// sequence in the order it is re-submitted), one after the other, each waited for like a single
/// `resubmit`. Refuses a contact on hold (its items would go straight back to review). Stops at
/// the first item that is not applied, naming it; prints each command, then what it did.
async fn resubmit_contact(config: &Config, op: &OperatorArgs, contact: &str) -> anyhow::Result<()> {
    let api = client(config, &op.admin)?;
    // The contact's state (one history row is enough); a contact PostgreSQL does not know
    // (404) is not held.
    let detail = api
        .get(&format!("/v1/contacts/{}?limit=1", segment(contact)))
        .await?;
    anyhow::ensure!(
        detail.ok() || detail.status == 404,
        "the admin API refused: {}",
        detail.error()
    );
    let is_held = detail.body["state"]["hold"].is_object();
    anyhow::ensure!(
        !is_held,
        "contact {contact:?} is on hold: release it first (`causal-commit release --contact ...`), or its items go straight back to manual review as CONTACT_ON_HOLD"
    );
    let path = format!(
        "/v1/contacts/{}/reviews?limit={RESUBMIT_PAGE}",
        segment(contact)
    );
    let listing = api.get(&path).await?;
    anyhow::ensure!(listing.ok(), "the admin API refused: {}", listing.error());
    let items = listing.body["items"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let chosen = to_resubmit(&items);
    let mut done = Vec::new();
    for (n, &i) in chosen.iter().enumerate() {
        let item = &items[i];
        let body = serde_json::json!({
            "actor": op.actor, "partition": item["partition"], "offset": item["offset"],
        });
        operator_command(config, op, "/v1/resubmissions", &body)
            .await
            .with_context(|| {
                format!(
                    "re-submitting item {}/{} (intent {}); {n} of {} re-submitted before it",
                    item["partition"],
                    item["offset"],
                    item["intent_id"],
                    chosen.len()
                )
            })?;
        done.push(serde_json::json!({
            "partition": item["partition"], "offset": item["offset"], "intent_id": item["intent_id"],
        }));
    }
    let chosen: std::collections::HashSet<usize> = chosen.into_iter().collect();
    let left: Vec<&serde_json::Value> = items
        .iter()
        .enumerate()
        .filter(|(i, _)| !chosen.contains(i))
        .map(|(_, item)| item)
        .collect();
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "contact_id": contact, "resubmitted": done, "not_resubmitted": left,
        }))?
    );
    anyhow::ensure!(
        listing.body["more"] != true,
        "the contact has more than {RESUBMIT_PAGE} review items: run it again for the next ones"
    );
    Ok(())
}

/// Which items of a contact's review listing `resubmit --contact` re-submits, as indexes in
/// listing order (the order they were reviewed): the re-submittable ones, the latest of each
/// intent (an intent reviewed again after an earlier re-submission has two items).
fn to_resubmit(items: &[serde_json::Value]) -> Vec<usize> {
    let mut latest: std::collections::HashMap<&str, usize> = Default::default();
    for (i, item) in items.iter().enumerate() {
        if let (true, Some(id)) = (item["resubmittable"] == true, item["intent_id"].as_str()) {
            latest.insert(id, i);
        }
    }
    let mut chosen: Vec<usize> = latest.into_values().collect();
    chosen.sort_unstable();
    chosen
}

/// Queues an operator command, then waits until it is final (applied in a batch committed in
/// Kafka, refused, or cancelled). When `--wait` passes first: cancels it if asked and it is
/// still pending, else reports it still pending; either way the command fails.
async fn operator_command(
    config: &Config,
    op: &OperatorArgs,
    path: &str,
    body: &serde_json::Value,
) -> anyhow::Result<()> {
    let api = client(config, &op.admin)?;
    let queued = api.post(path, body).await?;
    anyhow::ensure!(queued.ok(), "the admin API refused: {}", queued.error());
    let id = queued.body["id"]
        .as_i64()
        .context("the admin API answered without a command id")?;
    eprintln!("command {id} queued");
    let deadline = std::time::Instant::now() + std::time::Duration::from(op.wait);
    let mut last = queued;
    while std::time::Instant::now() < deadline {
        last = api.get(&format!("/v1/commands/{id}")).await?;
        anyhow::ensure!(last.ok(), "reading command {id}: {}", last.error());
        match last.body["state"].as_str() {
            Some("applied") => {
                println!("{}", serde_json::to_string_pretty(&last.body)?);
                return Ok(());
            }
            Some("refused") | Some("cancelled") => {
                println!("{}", serde_json::to_string_pretty(&last.body)?);
                anyhow::bail!(
                    "command {id} was {}: {}",
                    last.body["state"].as_str().unwrap_or_default(),
                    last.body["reason"]
                        .as_str()
                        .unwrap_or("cancelled by an operator")
                );
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
        }
    }
    let state = last.body["state"].as_str().unwrap_or("pending").to_string();
    if op.cancel_on_timeout && state == "pending" {
        let cancel = api
            .post(
                &format!("/v1/commands/{id}/cancel"),
                &serde_json::json!({ "actor": op.actor }),
            )
            .await?;
        println!("{}", serde_json::to_string_pretty(&cancel.body)?);
        if cancel.ok() {
            anyhow::bail!(
                "command {id} was not applied within {}: cancelled, nothing was changed",
                op.wait
            );
        }
        anyhow::bail!(
            "command {id} was not applied within {} and could not be cancelled: {} (see `causal-commit commands show {id}`)",
            op.wait,
            cancel.error()
        );
    }
    println!("{}", serde_json::to_string_pretty(&last.body)?);
    anyhow::bail!(
        "command {id} is still {state} after {}: no running instance has applied it (and committed its batch) yet. It stays queued; `causal-commit commands show {id}` follows it, `causal-commit commands cancel {id}` cancels it while pending",
        op.wait
    )
}

/// Cancels `token` on SIGTERM or Ctrl-C; a second signal exits at once.
async fn signal_shutdown(token: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "installing the SIGTERM handler failed");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutdown requested: draining the batch in hand");
    token.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::warn!("second signal: exiting without draining");
    std::process::exit(130);
}

async fn recovery_point(config: Config, command: RecoveryPointCommand) -> anyhow::Result<()> {
    use store::postgres::{self as pg, Resolution};
    let pool = pg::pool(&config.postgres)?;
    let topic = config.kafka.intents_topic.clone();
    match command {
        RecoveryPointCommand::Show => {
            let c = config.clone();
            let (kafka, logs) = tokio::task::spawn_blocking(move || {
                anyhow::Ok((
                    pipeline::read::committed_points(&c)?,
                    pipeline::read::log_ranges(&c)?,
                ))
            })
            .await??;
            let views = pg::batch_views(&pool, &topic).await?;
            let mut out = Vec::new();
            for v in views {
                let k = kafka.get(&v.partition);
                out.push(serde_json::json!({
                    "partition": v.partition,
                    "committed_offset": k.map(|k| k.offset),
                    "recovery_point": k.and_then(|k| k.recovery.as_ref().ok().cloned().flatten())
                        .map(|p| p.to_string()),
                    "store_last_batch": v.last_batch,
                    "store_committed_batch": v.committed_batch,
                    "store_next_offset": v.last_next_offset,
                    "refused_by_owner": v.refused,
                    "writer_group": v.writer_group,
                    "consumed_topic_id": v.topic_id,
                    "topic_id": logs.get(&v.partition).and_then(|l| l.topic_id)
                        .map(|t| t.to_string()),
                    "log_start": logs.get(&v.partition).map(|l| l.low),
                    "log_end": logs.get(&v.partition).map(|l| l.high),
                }));
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        RecoveryPointCommand::Resolve {
            partition,
            committed,
            aborted,
            actor,
        } => {
            let views = pg::batch_views(&pool, &topic).await?;
            let view = views
                .iter()
                .find(|v| v.partition == partition)
                .with_context(|| format!("partition {partition} has no durable state"))?;
            if view.last_batch == view.committed_batch {
                println!(
                    "partition {partition}: batch {} is known committed; nothing to resolve",
                    view.last_batch
                );
                return Ok(());
            }
            // Checked again under the partition's lock; here before reading the topics.
            if !view.refused {
                return Err(pg::not_refusing(view).into());
            }
            let resolution = if committed {
                Resolution::Committed
            } else if aborted {
                Resolution::Aborted
            } else {
                let outputs = pg::batch_outputs(&pool, &topic, partition, view.last_batch).await?;
                resolution_from_outputs(&config, outputs, view.last_batch).await?
            };
            pg::resolve_recovery_point(&pool, &topic, partition, resolution, &actor).await?;
            println!(
                "partition {partition}: batch {} resolved as {resolution:?}; the owning instance \
                 restores the partition at its next attempt",
                view.last_batch
            );
            Ok(())
        }
        RecoveryPointCommand::ResumeAt {
            partition,
            earliest,
            offset,
            actor,
        } => {
            let c = config.clone();
            let logs =
                tokio::task::spawn_blocking(move || pipeline::read::log_ranges(&c)).await??;
            let log = logs
                .get(&partition)
                .with_context(|| format!("{topic} has no partition {partition}"))?;
            let to = match (earliest, offset) {
                (true, _) => log.low,
                (false, Some(o)) => o,
                (false, None) => anyhow::bail!("give --earliest or --offset"),
            };
            anyhow::ensure!(
                (log.low..=log.high).contains(&to),
                "offset {to} is not in partition {partition}'s log ({} to {})",
                log.low,
                log.high
            );
            let from = pg::move_resume_point(&pool, &topic, partition, *log, to, &actor).await?;
            println!(
                "partition {partition}: resumes at offset {to} instead of {from}; the owning \
                 instance restores the partition at its next attempt"
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{described, to_resubmit};

    #[test]
    fn a_cause_its_wrapper_already_states_is_written_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("call failed: {source}")]
        struct Wrapper {
            source: std::io::Error,
        }
        let e = anyhow::Error::new(Wrapper {
            source: std::io::Error::other("refused"),
        })
        .context("reading partitions");
        assert_eq!(described(&e), "reading partitions: call failed: refused");
        let plain = anyhow::anyhow!("refused").context("reading partitions");
        assert_eq!(described(&plain), format!("{plain:#}"));
    }

    /// In review order, the re-submittable items only, and of an intent with two such items
    /// the later one.
    #[test]
    fn resubmit_contact_takes_the_latest_resubmittable_item_of_each_intent_in_review_order() {
        let item = |id: &str, resubmittable: bool| serde_json::json!({ "intent_id": id, "resubmittable": resubmittable });
        let items = [
            item("a", true),
            item("b", false),
            item("c", true),
            item("a", true),
            serde_json::json!({ "partition": 0, "offset": 9, "resubmittable": false }),
            item("d", true),
        ];
        assert_eq!(to_resubmit(&items), vec![2, 3, 5]);
        assert!(to_resubmit(&[]).is_empty());
    }
}
