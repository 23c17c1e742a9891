//! The Kafka pipeline: consume `intents`, sequence, produce effects and manual-review records,
//! all inside Kafka transactions that carry the consumed offsets.

pub mod assignment;
pub mod engine;
pub mod gather;
pub mod health;
pub mod isolation;
pub mod kafka;
pub mod lag;
pub mod lane;
pub mod operator;
pub mod output;
pub mod passthrough;
pub mod preflight;
pub mod read;
pub mod report;
pub mod restore;
pub mod stall;
pub mod translate;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::store::lock_store::LockStore;

/// How long the start-up check waits for the brokers before leaving them to the engine.
const PREFLIGHT_WAIT: Duration = Duration::from_secs(10);

/// Longest pause between two start-up checks of a PostgreSQL that does not answer.
const START_RETRY_MAX: Duration = Duration::from_secs(5);

/// A consumer that librdkafka declares unusable is replaced in place (a broker restart can
/// fence a static member by its own retried join, once per restart). One that fails fatally
/// again this soon after is fenced by another process with the same `instance_id`, and the
/// process stops: two such processes fence each other about every second, while broker
/// restarts (each taking seconds) fenced the same consumer 24 s apart in a test. A window of
/// 30 s stopped a process that way.
const REFENCED_WITHIN: Duration = Duration::from_secs(10);

/// The start-up check of the schema, and the read of the store's id (its Redis keys' part),
/// repeated while PostgreSQL does not answer (stopped, restarting, out of connections): a
/// processor started during an outage starts processing by itself when PostgreSQL is back, as
/// one running through it does, instead of exiting into its orchestrator's restart back-off.
/// Not ready meanwhile; a wrong schema, role or migration state fails at once. Nothing else
/// asks PostgreSQL before the engine, which pauses through an outage. The store id; `None`
/// when `shutdown` fired first.
async fn store_checked(
    pool: &sqlx::PgPool,
    config: &Config,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<String>> {
    use crate::store::postgres::{check_schema, check_topic, lock_store::store_id};
    let (schema, topic) = (&config.postgres.schema, &config.kafka.intents_topic);
    while_postgres_unavailable(shutdown, "schema", || async {
        check_schema(pool, schema).await?;
        check_topic(pool, schema, topic).await?;
        store_id(pool).await
    })
    .await
}

/// `ask`, asked again while PostgreSQL does not answer (see [`store_checked`]), logging each
/// attempt with the start-up `step` asking; `None` when `shutdown` fired first.
async fn while_postgres_unavailable<T, F, Fut>(
    shutdown: &CancellationToken,
    step: &str,
    mut ask: F,
) -> anyhow::Result<Option<T>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = crate::store::postgres::Result<T>>,
{
    let mut wait = Duration::from_millis(250);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match ask().await {
            Ok(found) => return Ok(Some(found)),
            Err(e) if e.is_unavailable() => {
                tracing::warn!(
                    error = %e,
                    step,
                    attempt,
                    retry_in_ms = wait.as_millis() as u64,
                    "PostgreSQL does not answer at start-up; waiting for it (not ready)"
                );
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(START_RETRY_MAX);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Where the effects go (`output::EffectPlacement`): over the partition count the store
/// recorded for the side-effects topic, recorded now from the topic at its first start. A
/// topic with fewer partitions than recorded is refused; one with more is used as recorded,
/// its added partitions left empty, with a warning. It runs the Kafka start-up check
/// ([`preflight::Checker`]) first. With nothing recorded and no count from the brokers (a
/// first start with the brokers down), nothing can be placed: the check is asked again,
/// quietly, on the same client, until the brokers answer it (one WARN says so, an INFO when
/// they answer); a later start has the count recorded and starts at once, as before. Returns
/// the placement and the topics for the topic watch to start from; `None` when `shutdown`
/// fired first (served within a second, also during a check).
async fn effect_placement(
    pool: &sqlx::PgPool,
    config: &Arc<Config>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<(output::EffectPlacement, preflight::Topics)>> {
    let checker = Arc::new(preflight::Checker::new(config.clone())?);
    let placed = placed_after_check(pool, config, &checker, shutdown).await;
    // Dropping the client joins its threads: not on a runtime worker.
    let _ = tokio::task::spawn_blocking(move || drop(checker)).await;
    placed
}

/// [`effect_placement`] with its client.
async fn placed_after_check(
    pool: &sqlx::PgPool,
    config: &Arc<Config>,
    checker: &Arc<preflight::Checker>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<(output::EffectPlacement, preflight::Topics)>> {
    let topic = &config.kafka.side_effects_topic;
    let within = config.kafka.operation_timeout.min(PREFLIGHT_WAIT);
    let mut waited = false;
    loop {
        let (asked, stop) = (checker.clone(), shutdown.clone());
        let checked = tokio::task::spawn_blocking(move || asked.check(within, &stop)).await??;
        if shutdown.is_cancelled() {
            return Ok(None);
        }
        let seen = checked.as_ref().and_then(|t| t.side_effects_partitions());
        let Some(recorded) =
            while_postgres_unavailable(shutdown, "side-effects partitions", || {
                crate::store::postgres::effect_partitions(pool, topic, seen)
            })
            .await?
        else {
            return Ok(None);
        };
        let Some(recorded) = recorded else {
            if !waited {
                tracing::warn!(
                    topic = %topic,
                    brokers = %config.kafka.brokers,
                    "the side-effects topic's partition count is not recorded yet (a first \
                     start) and the brokers have not said it: waiting for them before anything \
                     is consumed (not ready)"
                );
                waited = true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        };
        if waited {
            tracing::info!(
                topic = %topic,
                partitions = recorded,
                "the brokers answered: the side-effects topic's partition count is recorded"
            );
        }
        match seen {
            Some(partitions) if partitions < recorded => {
                return Err(preflight::Error::FewerEffectPartitions {
                    topic: topic.clone(),
                    partitions,
                    recorded,
                }
                .into())
            }
            Some(partitions) => preflight::effect_partitions(topic, None, partitions, recorded),
            None => {}
        }
        let partitioner = config.kafka.client.get("partitioner");
        let Some(placement) = output::EffectPlacement::new(partitioner, recorded) else {
            anyhow::bail!("kafka.client partitioner {partitioner:?} does not place records by key")
        };
        let topics = checked.unwrap_or_else(|| {
            tracing::warn!(
                brokers = %config.kafka.brokers,
                "Kafka did not answer the start-up check in {within:?}; starting anyway (the \
                 consumer and producer keep trying)"
            );
            preflight::Topics::default()
        });
        return Ok(Some((placement, topics)));
    }
}

/// Runs engines, one after the other, until one ends for good. A consumer librdkafka declares
/// unusable ends its engine and the next starts with a new one (restoring its partitions from
/// the committed state), unless the previous replacement failed so within [`REFENCED_WITHIN`].
fn run_engines(
    config: &Arc<Config>,
    pool: &sqlx::PgPool,
    locks: &Arc<LockStore>,
    rt: &tokio::runtime::Handle,
    shutdown: &CancellationToken,
    health: &Arc<health::Health>,
    effects: output::EffectPlacement,
) -> engine::Result<()> {
    let mut replaced: Option<std::time::Instant> = None;
    loop {
        let engine = engine::Engine::new(
            config.clone(),
            pool.clone(),
            locks.clone(),
            rt.clone(),
            shutdown.clone(),
            health.clone(),
            effects,
        )?;
        // The consumer lag, from the positions the engine hands over (see `lag`).
        let _lag = lag::Monitor::spawn(config, engine.ctx.lag.clone(), shutdown);
        let error = match engine.run() {
            Err(engine::Error::ConsumerFatal(e)) if !shutdown.is_cancelled() => e,
            Err(e @ engine::Error::StaleAssignment { .. }) if !shutdown.is_cancelled() => {
                // The coordinator hands a rejoining static member its old assignment back
                // until its session has expired; then the member joins afresh.
                let wait = kafka::session_timeout(config) + Duration::from_secs(2);
                tracing::error!(
                    error = %e,
                    wait_ms = wait.as_millis() as u64,
                    "the consumer is replaced once the group coordinator has forgotten it (its \
                     session timeout), so that the group assigns the intents topic's partitions"
                );
                rt.block_on(async {
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                });
                continue;
            }
            Err(e @ engine::Error::ConsumerStalled { .. }) if !shutdown.is_cancelled() => {
                // Not a sign of another process on this instance id: no `REFENCED_WITHIN`.
                tracing::warn!(
                    error = %e,
                    "the engine starts again with a new consumer and restores its partitions \
                     from the committed state"
                );
                continue;
            }
            other => return other,
        };
        if replaced.is_some_and(|at| at.elapsed() < REFENCED_WITHIN) {
            return Err(engine::Error::ConsumerFatalAgain {
                error,
                within: REFENCED_WITHIN,
                instance_id: config.instance_id(),
            });
        }
        tracing::warn!(
            error = %error,
            "the Kafka consumer failed fatally; the engine starts again with a new consumer and \
             restores its partitions from the committed state"
        );
        replaced = Some(std::time::Instant::now());
    }
}

/// Runs the processor until `shutdown` fires, then drains: the batch in hand is committed and
/// the consumer leaves its group. The engine runs on a dedicated thread because librdkafka's
/// transactional calls block.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> anyhow::Result<()> {
    run_with(config, shutdown, Arc::new(health::Health::default())).await
}

/// [`run`], reporting to `health` (what the probes and the admin API read).
///
/// Before the engine starts: the PostgreSQL schema must have every migration of this build
/// applied (`causal-commit migrate`, with the owner role: `run` never changes the schema, so it
/// can connect with a role that only reads and writes rows), and Kafka must accept the
/// configured credentials and TLS settings. Either failing ends `run` with an error naming it.
/// A PostgreSQL or broker that does not answer yet is waited for.
pub async fn run_with(
    config: Arc<Config>,
    shutdown: CancellationToken,
    health: Arc<health::Health>,
) -> anyhow::Result<()> {
    // Benchmark ceiling: no store is touched in that mode.
    if config.bench.passthrough {
        return passthrough::run(config, shutdown).await;
    }
    let pool = crate::store::postgres::pool(&config.postgres)?;
    // Says why, when a call gets no session from the pool; stops when `run_with` returns.
    let explaining = shutdown.child_token();
    tokio::spawn(crate::store::postgres::sessions::explain_timeouts(
        config.postgres.clone(),
        explaining.clone(),
    ));
    let _explaining = explaining.drop_guard();
    let Some(store_id) = store_checked(&pool, &config, &shutdown).await? else {
        tracing::info!("stopped while waiting for PostgreSQL; nothing was consumed");
        return Ok(());
    };
    // (A test holds the start here while it stops PostgreSQL.)
    fail::fail_point!("start-checked");
    let Some((effects, topics)) = effect_placement(&pool, &config, &shutdown).await? else {
        tracing::info!("stopped while waiting for the store or the brokers; nothing was consumed");
        return Ok(());
    };
    let locks = Arc::new(LockStore::new(&config, pool.clone(), &store_id)?);
    let admin = match config.admin.listen.is_empty() {
        true => None,
        false => Some(
            crate::admin::serve(
                config.clone(),
                pool.clone(),
                health.clone(),
                shutdown.clone(),
            )
            .await?,
        ),
    };
    // Probes a tripped breaker and re-synchronises Redis even when no batch arrives.
    let checks = tokio::spawn({
        let locks = locks.clone();
        let shutdown = shutdown.clone();
        async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => { locks.health_check().await; }
                }
            }
        }
    });
    // A topic set to compact, or deleted, under the running processor.
    let compaction = tokio::spawn(preflight::watch_topics(
        config.clone(),
        topics,
        effects.partitions(),
        shutdown.clone(),
    ));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let rt = tokio::runtime::Handle::current();
    let engine_shutdown = shutdown.clone();
    std::thread::Builder::new()
        .name("causal-commit-engine".into())
        .spawn(move || {
            let _ = tx.send(run_engines(
                &config,
                &pool,
                &locks,
                &rt,
                &engine_shutdown,
                &health,
                effects,
            ));
        })?;
    let result = rx.await;
    shutdown.cancel();
    let _ = checks.await;
    let _ = compaction.await;
    if let Some(admin) = admin {
        let _ = admin.task.await;
    }
    match result {
        Ok(result) => Ok(result?),
        Err(_) => anyhow::bail!("the engine thread ended without a result (it panicked)"),
    }
}
