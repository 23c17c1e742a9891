//! Pure sequencer benchmarks (contract §7: >= 2,000,000 decisions/s on one core, <= 128 bytes
//! per idle contact).
//!
//! `cargo bench --bench sequencer` runs the criterion groups and prints, before them, a plain
//! summary: decisions/s for in-order traffic over 100k contacts (assigned and strict
//! sequences) and for strict traffic with 10% out-of-order arrivals, and the heap bytes per
//! idle contact with 1M contacts held, measured by a counting global allocator.
//! `cargo bench --bench sequencer -- --quick` keeps the criterion part short.

use std::alloc::System;
use std::hint::black_box;
use std::time::{Duration, Instant};

use causal_commit::sequencer::{Config, ContactSnapshot, Decision, IntentMeta, Millis, Sequencer};
use criterion::{BatchSize, Criterion, Throughput};
use stats_alloc::{StatsAlloc, INSTRUMENTED_SYSTEM};

/// Counts the heap bytes of the whole bench process (requested sizes).
#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Live heap bytes right now.
fn live_bytes() -> usize {
    // stats_alloc already folds reallocations into these two counters.
    let s = GLOBAL.stats();
    s.bytes_allocated.saturating_sub(s.bytes_deallocated)
}

const CONTACTS: usize = 100_000;
/// Decisions are drained every this many intents, as a pipeline batch would.
const DRAIN_EVERY: usize = 1_000;

fn contact_id(c: usize) -> String {
    format!("contact-{c:07}")
}

/// Generates traffic: intents spread over `CONTACTS` contacts in a scrambled order, with
/// unique ids across the whole run (so nothing is a duplicate).
struct Traffic {
    next_id: u64,
    /// Next causal sequence per contact (strict mode).
    next_seq: Vec<u64>,
    cursor: usize,
    strict: bool,
    /// Per mille of intents that arrive swapped with their contact's next intent.
    out_of_order_permille: u64,
    rng: u64,
}

impl Traffic {
    fn new(strict: bool, out_of_order_permille: u64) -> Self {
        Traffic {
            next_id: 0,
            next_seq: vec![1; CONTACTS],
            cursor: 0,
            strict,
            out_of_order_permille,
            rng: 0x9E37_79B9_7F4A_7C15,
        }
    }

    fn random(&mut self) -> u64 {
        // xorshift64*: deterministic and dependency-free.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn meta(&mut self, contact: usize, seq: u64) -> IntentMeta {
        let id = self.next_id;
        self.next_id += 1;
        IntentMeta {
            intent_id: format!("intent-{id:010}"),
            contact_id: contact_id(contact),
            causal_sequence: if self.strict { seq } else { 0 },
            expected_version: 0,
            priority: (id % 3) as i32,
            fingerprint: id.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            offset: id as i64,
            resubmission: false,
            size: 120,
        }
    }

    /// The next `n` intents (a few more when a swapped pair straddles the end).
    fn batch(&mut self, n: usize) -> Vec<IntentMeta> {
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            // A large odd stride walks all contacts in a cache-unfriendly order.
            self.cursor = (self.cursor + 7_919) % CONTACTS;
            let c = self.cursor;
            let seq = self.next_seq[c];
            let swap = self.random() % 1_000 < self.out_of_order_permille;
            if swap {
                // seq + 1 arrives before seq: one Wait, then two commits.
                let later = self.meta(c, seq + 1);
                let earlier = self.meta(c, seq);
                out.push(later);
                out.push(earlier);
                self.next_seq[c] = seq + 2;
            } else {
                out.push(self.meta(c, seq));
                self.next_seq[c] = seq + 1;
            }
        }
        out
    }
}

/// A sequencer that already holds every contact once (steady state, not first sight).
fn warmed(traffic: &mut Traffic) -> Sequencer<u64> {
    let mut s = match Sequencer::new(Config::default()) {
        Ok(s) => s,
        Err(e) => panic!("default config: {e}"),
    };
    let mut sink = Vec::new();
    for chunk in traffic.batch(CONTACTS).chunks(DRAIN_EVERY) {
        feed(&mut s, chunk.to_vec(), &mut sink);
    }
    s
}

/// Feeds intents, draining every `DRAIN_EVERY`; returns the number of decisions drained.
fn feed(s: &mut Sequencer<u64>, intents: Vec<IntentMeta>, sink: &mut Vec<Decision<u64>>) -> usize {
    let mut decisions = 0;
    for (i, meta) in intents.into_iter().enumerate() {
        let offset = meta.offset as u64;
        s.on_intent(meta, offset, None, Millis(offset / 1_000));
        if i % DRAIN_EVERY == DRAIN_EVERY - 1 {
            s.drain_decisions(sink);
            decisions += sink.len();
            sink.clear();
        }
    }
    s.drain_decisions(sink);
    decisions += sink.len();
    sink.clear();
    decisions
}

/// Nanoseconds this thread has spent on a CPU (Linux schedstat), so figures stay "per core"
/// when other processes compete for the machine; `None` elsewhere.
fn thread_cpu_ns() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    stat.split_whitespace().next()?.parse().ok()
}

/// Plain figures, independent of criterion's statistics: per second of CPU time given to
/// this thread (and of wall time, which is lower when the machine is shared).
fn summary(name: &str, strict: bool, out_of_order_permille: u64) {
    let mut traffic = Traffic::new(strict, out_of_order_permille);
    let mut s = warmed(&mut traffic);
    let mut sink = Vec::with_capacity(DRAIN_EVERY * 2);
    let (mut intents, mut decisions, mut busy, mut cpu_ns) = (0usize, 0usize, Duration::ZERO, 0u64);
    let mut rounds = 0;
    while busy < Duration::from_secs(3) || rounds < 50 {
        // Batches small enough to stay in cache, like a pipeline's freshly decoded records.
        let batch = traffic.batch(10_000);
        intents += batch.len();
        let cpu_start = thread_cpu_ns();
        let start = Instant::now();
        decisions += feed(&mut s, batch, &mut sink);
        let wall = start.elapsed();
        busy += wall;
        cpu_ns += match (cpu_start, thread_cpu_ns()) {
            (Some(a), Some(b)) => b.saturating_sub(a),
            _ => wall.as_nanos() as u64,
        };
        rounds += 1;
    }
    let cpu = cpu_ns as f64 / 1e9;
    println!(
        "{name:<30} {:>5.2} M intents/s  {:>5.2} M decisions/s per CPU-second  (wall: {:>5.2} M decisions/s; {intents} intents, {decisions} decisions)",
        intents as f64 / cpu / 1e6,
        decisions as f64 / cpu / 1e6,
        decisions as f64 / busy.as_secs_f64() / 1e6,
    );
    black_box(s);
}

/// Heap bytes per idle contact with 1M contacts held.
fn memory(name: &str, id: impl Fn(usize) -> String) {
    const N: usize = 1_000_000;
    let before = live_bytes();
    let mut s: Sequencer<u64> = match Sequencer::new(Config::default()) {
        Ok(s) => s,
        Err(e) => panic!("default config: {e}"),
    };
    // Snapshots are made and consumed one at a time, so only the sequencer's memory remains.
    let snapshots = (0..N).map(|c| ContactSnapshot {
        resolved_through: 12,
        version: 11,
        next_sequence: 13,
        ..ContactSnapshot::new(id(c))
    });
    if let Err(e) = s.restore(snapshots) {
        panic!("restore: {e}");
    }
    let after = live_bytes();
    println!(
        "{name:<34} {:>6.1} bytes/contact  ({} contacts, {:.1} MiB)",
        (after - before) as f64 / N as f64,
        s.contact_count(),
        (after - before) as f64 / (1 << 20) as f64
    );
    black_box(s);
}

/// The same, reaching 1M contacts the way the pipeline does: one intent each, through
/// `on_intent`, with the recent-outcome window cut to 1 so only contacts are counted.
fn memory_through_intents() {
    const N: usize = 1_000_000;
    let mut traffic = Traffic::new(false, 0);
    let metas: Vec<IntentMeta> = (0..N).map(|c| traffic.meta(c, 0)).collect();
    let config = Config {
        recent_outcomes_capacity: 1,
        ..Config::default()
    };
    let before = live_bytes();
    let mut s: Sequencer<u64> = match Sequencer::new(config) {
        Ok(s) => s,
        Err(e) => panic!("config: {e}"),
    };
    let mut sink = Vec::new();
    for chunk in metas.chunks(DRAIN_EVERY) {
        for meta in chunk {
            s.on_intent(meta.clone(), 0, None, Millis(0));
        }
        s.drain_decisions(&mut sink);
        sink.clear();
    }
    drop(sink);
    let after = live_bytes();
    println!(
        "{:<34} {:>6.1} bytes/contact  ({} contacts)",
        "idle contact, via on_intent",
        (after - before) as f64 / N as f64,
        s.contact_count()
    );
    black_box(s);
}

fn throughput(c: &mut Criterion) {
    let mut group = c.benchmark_group("sequencer_100k_contacts");
    const BATCH: usize = 10_000;
    group.throughput(Throughput::Elements(BATCH as u64));
    for (name, strict, permille) in [
        ("in_order_assigned", false, 0),
        ("in_order_strict", true, 0),
        ("out_of_order_10pct_strict", true, 100),
    ] {
        let mut traffic = Traffic::new(strict, permille);
        let mut s = warmed(&mut traffic);
        let mut sink = Vec::with_capacity(DRAIN_EVERY * 2);
        group.bench_function(name, |b| {
            b.iter_batched(
                || traffic.batch(BATCH),
                |batch| feed(&mut s, batch, &mut sink),
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

fn main() {
    println!("== causal-commit pure sequencer, one thread, 100k contacts ==");
    summary("in order, assigned sequences", false, 0);
    summary("in order, strict sequences", true, 0);
    summary("10% out of order, strict", true, 100);
    memory("idle contact, 15-byte ids", contact_id);
    memory("idle contact, 36-byte (uuid) ids", |c| {
        format!("00000000-0000-4000-8000-{c:012}")
    });
    memory_through_intents();
    println!("(target: >= 2.00 M decisions/s in order, <= 128 bytes per idle contact)");
    println!();

    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
        .configure_from_args();
    throughput(&mut criterion);
    criterion.final_summary();
}
