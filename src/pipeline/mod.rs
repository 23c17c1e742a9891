//! The Kafka pipeline: consume `intents`, sequence, produce effects and manual-review records,
//! all inside Kafka transactions that carry the consumed offsets.

pub mod engine;
pub mod kafka;
pub mod lane;
pub mod output;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// Runs the processor until `shutdown` fires, then drains: the batch in hand is committed and
/// the consumer leaves its group. The engine runs on a dedicated thread because librdkafka's
/// transactional calls block.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let pool = crate::store::postgres::pool(&config.postgres)?;
    crate::store::postgres::migrate(&pool, &config.postgres.schema).await?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let engine_shutdown = shutdown.clone();
    let rt = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name("causal-commit-engine".into())
        .spawn(move || {
            let result =
                engine::Engine::new(config, pool, rt, engine_shutdown).and_then(|e| e.run());
            let _ = tx.send(result);
        })?;
    match rx.await {
        Ok(result) => Ok(result?),
        Err(_) => anyhow::bail!("the engine thread ended without a result (it panicked)"),
    }
}
