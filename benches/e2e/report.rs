//! Figures from raw samples, the JSON report and the Markdown table. Pure functions.

use serde::Serialize;

use super::kafka_io::{OutputCounts, Produced};
use super::stores::PgCounters;

/// One look at a consumer while it works through the preloaded backlog.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Seconds since the consumer process was started.
    pub t: f64,
    /// Input records committed by its group.
    pub committed: i64,
    /// CPU seconds used by the consumer process(es).
    pub cpu: f64,
    /// Busy CPU seconds of the whole machine.
    pub machine_cpu: f64,
}

/// Throughput figures of one backlog run.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Throughput {
    /// Records in the backlog.
    pub intents: i64,
    /// Process start -> first committed offset (JVM, group join, restore, first batch).
    pub startup_s: f64,
    /// Process start -> every record committed.
    pub catch_up_s: f64,
    /// Steady state: records committed per second within `window`.
    pub intents_per_s: f64,
    /// First committed offset -> every record committed.
    pub overall_per_s: f64,
    /// CPU seconds of the consumer process(es) per 1,000 intents within `window`.
    pub cpu_s_per_1k: f64,
    /// Busy CPU seconds of the whole machine per 1,000 intents within `window`: the consumer
    /// plus what it drives (broker, PostgreSQL, Redis) plus the harness and any other load.
    pub machine_cpu_s_per_1k: f64,
    /// The samples the steady state is measured between: "10%-90%" of the backlog; or, for a
    /// backlog too small to resolve, "first-last commit", or "start-last commit" (a lower bound).
    pub window: &'static str,
}

pub fn throughput(samples: &[Sample], total: i64) -> Throughput {
    let first = samples.iter().position(|s| s.committed > 0);
    let done = samples.iter().position(|s| s.committed >= total);
    let at = |fraction: f64| {
        let mark = ((total as f64 * fraction).ceil() as i64).max(1);
        samples.iter().position(|s| s.committed >= mark)
    };
    let mut out = Throughput {
        intents: total,
        startup_s: first.map_or(0.0, |i| samples[i].t),
        catch_up_s: done.map_or(0.0, |i| samples[i].t),
        ..Throughput::default()
    };
    let (Some(first), Some(done)) = (first, done) else {
        return out;
    };
    let rate = |a: usize, b: usize| {
        let (a, b) = (samples[a], samples[b]);
        (b.committed - a.committed) as f64 / (b.t - a.t)
    };
    if done > first {
        out.overall_per_s = rate(first, done);
    }
    let window = match (at(0.1), at(0.9)) {
        (Some(a), Some(b)) if b > a => Some((a, b, "10%-90%")),
        _ if done > first => Some((first, done, "first-last commit")),
        // Everything committed between two samples: from the last one without a commit.
        _ => first.checked_sub(1).map(|a| (a, done, "start-last commit")),
    };
    if let Some((a, b, name)) = window {
        let records = (samples[b].committed - samples[a].committed).max(1) as f64;
        out.intents_per_s = rate(a, b);
        out.cpu_s_per_1k = (samples[b].cpu - samples[a].cpu) / records * 1000.0;
        out.machine_cpu_s_per_1k =
            (samples[b].machine_cpu - samples[a].machine_cpu) / records * 1000.0;
        out.window = name;
    }
    out
}

/// Latency of one fixed-rate phase: intent created -> effect received by the observer.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Intents per second produced while the consumer ran.
    pub offered_per_s: f64,
    pub intents: usize,
    /// Effects of those intents the observer received (should equal `intents`).
    pub observed: usize,
    pub p50_ms: i64,
    pub p99_ms: i64,
    pub max_ms: i64,
    pub produced: Produced,
    /// The same by the second of the phase the intents were created in: whether a tail is the
    /// phase's start (clients connecting) or spread over it.
    pub by_second: Vec<SecondOfPhase>,
}

/// The latencies of the intents created in one second of a latency phase (0 = its first).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SecondOfPhase {
    pub second: i64,
    pub intents: usize,
    pub p99_ms: i64,
    pub max_ms: i64,
}

/// The `q` quantile of sorted `ms` (nearest rank); 0 when empty.
fn quantile(ms: &[i64], q: f64) -> i64 {
    if ms.is_empty() {
        return 0;
    }
    let rank = ((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len());
    ms[rank - 1]
}

/// `seen`: each observed intent's `created_at_ms` and latency.
pub fn latency(offered: f64, produced: Produced, seen: Vec<(i64, i64)>) -> Latency {
    let first = seen.iter().map(|(c, _)| *c).min().unwrap_or(0);
    let mut by_second: std::collections::BTreeMap<i64, Vec<i64>> = Default::default();
    for (created, ms) in &seen {
        by_second
            .entry((created - first).div_euclid(1000))
            .or_default()
            .push(*ms);
    }
    let by_second = by_second
        .into_iter()
        .map(|(second, mut ms)| {
            ms.sort_unstable();
            SecondOfPhase {
                second,
                intents: ms.len(),
                p99_ms: quantile(&ms, 0.99),
                max_ms: ms.last().copied().unwrap_or(0),
            }
        })
        .collect();
    let mut ms: Vec<i64> = seen.into_iter().map(|(_, ms)| ms).collect();
    ms.sort_unstable();
    Latency {
        offered_per_s: offered,
        intents: produced.records,
        observed: ms.len(),
        p50_ms: quantile(&ms, 0.50),
        p99_ms: quantile(&ms, 0.99),
        max_ms: ms.last().copied().unwrap_or(0),
        produced,
        by_second,
    }
}

/// "p99/max" of each second of a phase, for the run's log.
pub fn describe_seconds(l: &Latency) -> String {
    l.by_second
        .iter()
        .map(|s| format!("{}s {}/{}", s.second, s.p99_ms, s.max_ms))
        .collect::<Vec<_>>()
        .join(", ")
}

/// PostgreSQL writes per intent over a whole consumer run (backlog and latency phases).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PgPerIntent {
    /// Intents the run processed (the divisor).
    pub intents: i64,
    /// `pg_stat_database` rows inserted + updated + deleted (database wide).
    pub rows_per_intent: f64,
    /// The same, counted on the run's own schema only (`pg_stat_user_tables`).
    pub schema_rows_per_intent: f64,
    /// `pg_current_wal_lsn()` delta (cluster wide).
    pub wal_bytes_per_intent: f64,
    pub raw: PgCounters,
}

pub fn pg_per_intent(delta: PgCounters, intents: i64) -> PgPerIntent {
    let n = intents.max(1) as f64;
    PgPerIntent {
        intents,
        rows_per_intent: delta.db_rows as f64 / n,
        schema_rows_per_intent: delta.schema_rows as f64 / n,
        wal_bytes_per_intent: delta.wal_bytes as f64 / n,
        raw: delta,
    }
}

/// The steps of a batch, as `causal_commit_batch_step_seconds` labels them.
pub const STEPS: [&str; 5] = causal_commit::telemetry::trace::Step::NAMES;

/// Where the product's batches spent their time on the backlog: its own
/// `causal_commit_batch_step_seconds` and `causal_commit_batch_records`, summed over instances.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BatchSteps {
    /// Committed batches.
    pub batches: f64,
    pub records_per_batch: f64,
    /// Mean milliseconds per committed batch, in [`STEPS`] order.
    pub mean_ms: Vec<(String, f64)>,
}

/// The breakdown from `/metrics` texts (one per instance); `None` when no batch committed.
pub fn batch_steps(scrapes: &[String]) -> Option<BatchSteps> {
    batch_steps_since(&[], scrapes)
}

/// The breakdown of the batches committed between two sets of `/metrics` texts (`before`
/// empty: since start-up); `None` when none committed in between.
pub fn batch_steps_since(before: &[String], after: &[String]) -> Option<BatchSteps> {
    let sum = |scrapes: &[String], name: &str, step: Option<&str>| -> f64 {
        scrapes
            .iter()
            .flat_map(|text| text.lines())
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let (metric, labels) = series.split_once('{').unwrap_or((series, ""));
                let wanted = match step {
                    Some(step) => labels.contains(&format!("step=\"{step}\"")),
                    None => true,
                };
                (metric == name && wanted).then(|| value.parse::<f64>().ok())?
            })
            .sum()
    };
    let total = |name: &str, step: Option<&str>| sum(after, name, step) - sum(before, name, step);
    let batches = total("causal_commit_batch_records_count", None);
    let timed = total("causal_commit_batch_step_seconds_count", Some("commit"));
    // The passthrough counts its batches but runs no steps.
    if batches <= 0.0 || timed <= 0.0 {
        return None;
    }
    let mean_ms = STEPS
        .iter()
        .map(|step| {
            let sum = total("causal_commit_batch_step_seconds_sum", Some(step));
            let count = total("causal_commit_batch_step_seconds_count", Some(step));
            let mean = if count > 0.0 {
                sum / count * 1000.0
            } else {
                0.0
            };
            (step.to_string(), mean)
        })
        .collect();
    Some(BatchSteps {
        batches,
        records_per_batch: total("causal_commit_batch_records_sum", None) / batches,
        mean_ms,
    })
}

/// One line: `N batches of R records, mean ms: poll P, lookup L, ...`.
pub fn describe_steps(b: &BatchSteps) -> String {
    let steps: Vec<String> = b
        .mean_ms
        .iter()
        .map(|(step, ms)| format!("{step} {ms:.0}"))
        .collect();
    format!(
        "{:.0} batches of {:.0} records, mean ms: {}",
        b.batches,
        b.records_per_batch,
        steps.join(", ")
    )
}

/// Everything measured about one consumer.
#[derive(Debug, Clone, Serialize)]
pub struct ConsumerReport {
    pub name: String,
    pub instances: usize,
    pub throughput: Throughput,
    pub latency_full_speed: Option<Latency>,
    pub latency_half_speed: Option<Latency>,
    /// The product's batch cycle during each latency phase (full, then half speed).
    pub latency_batch_steps: [Option<BatchSteps>; 2],
    pub cpu_s_total: f64,
    /// Highest VmHWM of the consumer process(es), MiB.
    pub peak_rss_mib: f64,
    /// Zero for the consumers that do not use PostgreSQL.
    pub pg: PgPerIntent,
    pub outputs: OutputCounts,
    /// The product's batch cycle on the backlog (none for the Kafka Streams peer).
    pub batch_steps: Option<BatchSteps>,
    pub expected_effects: i64,
    /// Every intent has exactly one effect and nothing went to review.
    pub outputs_ok: bool,
    pub log: String,
    /// (seconds since start, records committed) on the backlog, at most 300 points.
    pub progress: Vec<(f64, i64)>,
}

/// The backlog's progress curve, thinned to at most `max` points (first and last kept).
pub fn progress(samples: &[Sample], max: usize) -> Vec<(f64, i64)> {
    let step = samples.len().div_ceil(max.max(2)).max(1);
    let mut out: Vec<(f64, i64)> = samples
        .iter()
        .step_by(step)
        .map(|s| ((s.t * 1000.0).round() / 1000.0, s.committed))
        .collect();
    if let Some(last) = samples.last() {
        if out.last().map(|p| p.0) != Some((last.t * 1000.0).round() / 1000.0) {
            out.push(((last.t * 1000.0).round() / 1000.0, last.committed));
        }
    }
    out
}

/// One ratio of two consumers' steady-state rates: the median of the rounds' own ratios (each
/// round runs every consumer once, one after the other), and each round's.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub median: f64,
    pub by_round: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    /// Contract: at least 2.
    pub full_over_kafka_streams: Option<Ratio>,
    /// Contract: at least 0.5.
    pub full_over_passthrough: Option<Ratio>,
    pub fallback_over_full: Option<Ratio>,
    /// Two instances of the group on the box (one run), over the median rate of one.
    pub full_two_instances_over_one: Option<f64>,
}

/// The median of some figures (the mean of the middle two for an even count); `None` if empty.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// A consumer's steady-state rate in one round, if it ran and committed anything.
fn rate(round: &[ConsumerReport], name: &str) -> Option<f64> {
    round
        .iter()
        .find(|c| c.name == name)
        .map(|c| c.throughput.intents_per_s)
        .filter(|r| *r > 0.0)
}

/// A consumer's steady-state rates, one per round it ran in.
pub fn rates(rounds: &[Vec<ConsumerReport>], name: &str) -> Vec<f64> {
    rounds.iter().filter_map(|r| rate(r, name)).collect()
}

pub fn ratios(rounds: &[Vec<ConsumerReport>], two: Option<&ConsumerReport>) -> Ratios {
    let ratio = |a: &str, b: &str| {
        let by_round: Vec<f64> = rounds
            .iter()
            .filter_map(|r| rate(r, a).zip(rate(r, b)).map(|(a, b)| a / b))
            .collect();
        median(by_round.clone()).map(|median| Ratio { median, by_round })
    };
    let full = median(rates(rounds, "full"));
    Ratios {
        full_over_kafka_streams: ratio("full", "kafka-streams"),
        full_over_passthrough: ratio("full", "passthrough"),
        fallback_over_full: ratio("fallback", "full"),
        full_two_instances_over_one: two
            .map(|c| c.throughput.intents_per_s)
            .zip(full)
            .map(|(two, one)| two / one),
    }
}

/// Peak RSS of one instance that knows many contacts.
#[derive(Debug, Clone, Serialize)]
pub struct ManyContacts {
    pub contacts: usize,
    pub peak_rss_mib: f64,
    pub throughput: Throughput,
    pub outputs_ok: bool,
}

fn lat(l: &Option<Latency>) -> String {
    match l {
        Some(l) if l.observed == l.intents => format!(
            "{} / {} / {} @ {:.0}/s",
            l.p50_ms, l.p99_ms, l.max_ms, l.offered_per_s
        ),
        Some(l) => format!(
            "{} / {} / {} @ {:.0}/s ({} of {} seen)",
            l.p50_ms, l.p99_ms, l.max_ms, l.offered_per_s, l.observed, l.intents
        ),
        None => "-".into(),
    }
}

/// The table: every column from the first round, intents/s the median over the rounds; then
/// each round's rates and the ratios.
pub fn markdown(
    rounds: &[Vec<ConsumerReport>],
    two: Option<&ConsumerReport>,
    r: &Ratios,
) -> String {
    let first: &[ConsumerReport] = rounds.first().map_or(&[], Vec::as_slice);
    let n = rounds.len();
    let mut s = String::new();
    s.push_str(&format!(
        "| consumer | start-up s | intents/s{} | latency ms p50 / p99 / max, full speed | \
         latency ms p50 / p99 / max, half speed | CPU s / 1k intents (process, machine) | \
         peak RSS MiB | PG rows / intent (schema, db) | PG WAL bytes / intent | outputs |\n",
        if n > 1 {
            format!(" (median of {n} rounds)")
        } else {
            String::new()
        }
    ));
    s.push_str("|---|---:|---:|---|---|---:|---:|---:|---:|---|\n");
    for c in first.iter().chain(two) {
        let pg = if c.pg.intents > 0 {
            (
                format!(
                    "{:.2}, {:.2}",
                    c.pg.schema_rows_per_intent, c.pg.rows_per_intent
                ),
                format!("{:.0}", c.pg.wal_bytes_per_intent),
            )
        } else {
            ("0".into(), "0".into())
        };
        let (name, per_s) = if c.instances > 1 {
            (
                format!("{} ×{}", c.name, c.instances),
                c.throughput.intents_per_s,
            )
        } else {
            (
                c.name.clone(),
                median(rates(rounds, &c.name)).unwrap_or(0.0),
            )
        };
        let outputs_ok = c.outputs_ok
            && (c.instances > 1
                || rounds
                    .iter()
                    .flatten()
                    .filter(|o| o.name == c.name)
                    .all(|o| o.outputs_ok));
        s.push_str(&format!(
            "| {name} | {:.2} | {per_s:.0} | {} | {} | {:.3}, {:.3} | {:.0} | {} | {} | {} |\n",
            c.throughput.startup_s,
            lat(&c.latency_full_speed),
            lat(&c.latency_half_speed),
            c.throughput.cpu_s_per_1k,
            c.throughput.machine_cpu_s_per_1k,
            c.peak_rss_mib,
            pg.0,
            pg.1,
            if outputs_ok { "ok" } else { "MISMATCH" },
        ));
    }
    if n > 1 {
        let by_round: Vec<String> = first
            .iter()
            .map(|c| {
                let v: Vec<String> = rates(rounds, &c.name)
                    .iter()
                    .map(|r| format!("{r:.0}"))
                    .collect();
                format!("{} {}", c.name, v.join(" / "))
            })
            .collect();
        s.push_str(&format!("\nintents/s by round: {}\n", by_round.join(" · ")));
    }
    let f = |v: &Option<Ratio>| match v {
        None => "-".to_string(),
        Some(r) if r.by_round.len() > 1 => {
            let each: Vec<String> = r.by_round.iter().map(|v| format!("{v:.2}")).collect();
            format!("{:.2} (rounds: {})", r.median, each.join(" / "))
        }
        Some(r) => format!("{:.2}", r.median),
    };
    s.push_str(&format!(
        "\nfull / kafka-streams = {} (contract: >= 2) · full / passthrough = {} (contract: >= 0.5) \
         · fallback / full = {}",
        f(&r.full_over_kafka_streams),
        f(&r.full_over_passthrough),
        f(&r.fallback_over_full)
    ));
    if let Some(v) = r.full_two_instances_over_one {
        s.push_str(&format!(" · full ×2 instances / ×1 (median) = {v:.2}"));
    }
    s.push('\n');
    // The backlog's batches, then those of each latency phase.
    let with_steps: Vec<(String, &BatchSteps)> = first
        .iter()
        .chain(two)
        .flat_map(|c| {
            let name = if c.instances > 1 {
                format!("{} ×{}", c.name, c.instances)
            } else {
                c.name.clone()
            };
            let [full, half] = &c.latency_batch_steps;
            [
                (name.clone(), c.batch_steps.as_ref()),
                (format!("{name}, latency at full speed"), full.as_ref()),
                (format!("{name}, latency at half speed"), half.as_ref()),
            ]
        })
        .filter_map(|(name, b)| b.map(|b| (name, b)))
        .collect();
    if !with_steps.is_empty() {
        s.push_str(&format!(
            "\nBatch cycle on the backlog and in the latency phases, first round (mean ms per \
             committed batch, from causal_commit_batch_step_seconds):\n\n| consumer | batches | \
             records / batch | {} |\n|---|---:|---:|{}\n",
            STEPS.join(" | "),
            "---:|".repeat(STEPS.len())
        ));
        for (name, b) in with_steps {
            let steps: Vec<String> = b.mean_ms.iter().map(|(_, ms)| format!("{ms:.0}")).collect();
            s.push_str(&format!(
                "| {name} | {:.0} | {:.0} | {} |\n",
                b.batches,
                b.records_per_batch,
                steps.join(" | ")
            ));
        }
    }
    s
}
