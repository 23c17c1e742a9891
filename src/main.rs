//! The causal-commit CLI: the processor and its operator tools.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use causal_commit::config::Config;
use causal_commit::{demo, pipeline, store, telemetry, verify};

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
    /// Release a held contact: resume it, or skip its missing sequences up to --skip-to.
    /// The instance that owns the contact applies it in its next batch; audited.
    Release {
        /// The held contact.
        #[arg(long)]
        contact: String,
        /// Skip every unresolved sequence below this one, so it commits next.
        #[arg(long)]
        skip_to: Option<u64>,
        /// Who asks (recorded in the audit).
        #[arg(long, default_value = "cli")]
        actor: String,
        /// How long to wait for the owning instance to apply it.
        #[arg(long, default_value = "30s")]
        wait: humantime::Duration,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
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
            tracing::error!(error = format!("{e:#}"), "causal-commit failed");
            eprintln!("causal-commit: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = Config::load(cli.config.as_deref()).context("loading the configuration")?;
    match cli.command {
        Command::Run => {
            let _telemetry = telemetry::init(&config.telemetry)?;
            let listen = (!config.telemetry.metrics_listen.is_empty())
                .then(|| config.telemetry.metrics_listen.parse())
                .transpose()
                .context("telemetry.metrics_listen")?;
            telemetry::metrics::install_exporter(listen).context("starting /metrics")?;
            let shutdown = CancellationToken::new();
            tokio::spawn(signal_shutdown(shutdown.clone()));
            pipeline::run(Arc::new(config), shutdown).await
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
        Command::Release {
            contact,
            skip_to,
            actor,
            wait,
        } => {
            let pool = store::postgres::pool(&config.postgres)?;
            let id = store::postgres::submit_release(&pool, &contact, skip_to, &actor)
                .await?
                .with_context(|| format!("contact {contact:?} is unknown"))?;
            let deadline = std::time::Instant::now() + std::time::Duration::from(wait);
            loop {
                if let Some(result) = store::postgres::command_result(&pool, id).await? {
                    println!("command {id} for contact {contact}: {result}");
                    anyhow::ensure!(result == "applied", "the release was refused: {result}");
                    return Ok(());
                }
                anyhow::ensure!(
                    std::time::Instant::now() < deadline,
                    "command {id} is queued but no running instance applied it within {wait}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
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
        Command::ShowConfig => {
            println!("{}", serde_json::to_string_pretty(&config)?);
            Ok(())
        }
    }
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
