//! End-to-end throughput with every guarantee on (Kafka transactions, durable state, fencing,
//! idempotency): the same workload, in the same run, with Redis healthy and with Redis
//! unreachable (the PostgreSQL fallback). Needs the local stack (`make up`).
//!
//! `cargo bench --bench pipeline` (BENCH_INTENTS, BENCH_CONTACTS to size it). Under
//! `cargo test` it only says it was skipped: figures come from benchmark runs, not tests.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::time::{Duration, Instant};

use causal_commit::demo::{self, ProduceOptions};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("pipeline bench skipped: run `cargo bench --bench pipeline` with the stack up");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}

async fn run() {
    let intents = env_usize("BENCH_INTENTS", 30_000);
    let contacts = env_usize("BENCH_CONTACTS", 3_000);
    let mut results = Vec::new();
    for (label, redis_url) in [
        ("redis healthy", None),
        // Nothing listens on port 1: every Redis call fails at once and the breaker keeps the
        // lock store on PostgreSQL for the whole run.
        ("postgres fallback", Some("redis://127.0.0.1:1")),
    ] {
        let mut env = common::TestEnv::new("bench", 6).await;
        env.config.batch.max_linger = Duration::from_millis(100);
        if let Some(url) = redis_url {
            env.config.redis.url = url.to_string().into();
        }
        let opts = ProduceOptions {
            count: intents,
            contacts,
            clinics: 20,
            producers: 4,
            rate: 0,
            strict_fraction: 0.8,
            duplicate_fraction: 0.02,
            invalid: 0,
            seed: 11,
            prefix: "bench".into(),
        };
        // The backlog is produced first, so the figure is the processor's own rate.
        demo::produce(&env.config, &opts)
            .await
            .expect("workload produced");
        let cfg = env.config();
        let started = Instant::now();
        let running = common::start(cfg.clone());
        let c = env.config.clone();
        tokio::task::spawn_blocking(move || demo::wait_caught_up(&c, Duration::from_secs(600)))
            .await
            .expect("join")
            .expect("caught up");
        let elapsed = started.elapsed();
        running.stop().await;
        let c = env.config.clone();
        let report = tokio::task::spawn_blocking(move || causal_commit::verify::verify(&c, ""))
            .await
            .expect("join")
            .expect("verify");
        let rate = intents as f64 / elapsed.as_secs_f64();
        println!(
            "{label:>18}: {intents} intents in {:.2} s = {rate:.0} intents/s (verify ok: {}, committed {})",
            elapsed.as_secs_f64(),
            report.ok,
            report.committed
        );
        results.push((label, rate));
    }
    if let [(_, healthy), (_, fallback)] = results[..] {
        println!(
            "fallback / healthy throughput ratio: {:.2} (start-up and group join included)",
            fallback / healthy
        );
    }
}
