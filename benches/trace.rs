//! What tracing costs per intent on the data path (`cargo bench --bench trace`), printed as
//! nanoseconds per output record, one core, for:
//!
//! - **off**: no OTLP endpoint; the producer's `traceparent` is copied to the output (what the
//!   processor did before it took part in traces);
//! - **on, unsampled**: the producer's context parsed, a child span id derived, the header
//!   written; no span is recorded;
//! - **on, sampled**: the same, plus the intent span built through the SDK after the commit
//!   and handed to a batch span processor (its exporter discards, so the network is not
//!   measured; its queue is large enough that no span is dropped), in batches of 1,000
//!   outputs with their batch and step spans.
//!
//! The baseline does the same work with the header copied and no trace code at all.

use std::hint::black_box;
use std::time::{Duration, Instant};

use causal_commit::telemetry::trace::{self, BatchTrace, Ids, Step};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, SpanData, SpanExporter,
};

const SAMPLED: &[u8] = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
const UNSAMPLED: &[u8] = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
const BATCH: usize = 1_000;
const RUN: Duration = Duration::from_secs(2);

#[derive(Debug)]
struct Discard;

impl SpanExporter for Discard {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        black_box(batch);
        Ok(())
    }
}

/// One output record's share of the work, as output.rs and the engine do it.
fn outputs(header: &[u8], batch_no: u64) -> Vec<Option<Box<trace::IntentSpan>>> {
    let header = header.to_vec();
    (0..BATCH as u64)
        .map(|i| {
            let id = format!("intent-{batch_no}-{i}");
            let seq = i.to_le_bytes();
            let (tp, span) =
                trace::child_of(Some(&header), &[b"effect", id.as_bytes(), &seq], || {
                    vec![
                        KeyValue::new("outcome", "committed_causal"),
                        KeyValue::new("intent_id", id.clone()),
                        KeyValue::new("correlation_id", "corr"),
                        KeyValue::new("commit_sequence", i as i64),
                    ]
                });
            black_box(tp);
            span
        })
        .collect()
}

/// ns per output record: building `BATCH` outputs and reporting the batch, repeated for RUN.
fn measure(header: &[u8]) -> f64 {
    let started = Instant::now();
    let mut records = 0u64;
    let mut batch_no = 0;
    let mut batch = BatchTrace::default();
    while started.elapsed() < RUN {
        batch.start();
        batch.polled(BATCH);
        let spans = outputs(header, batch_no);
        batch.done(Step::Decide);
        batch.done(Step::DurableWrite);
        batch.done(Step::Commit);
        batch.committed(spans.iter().map(|s| s.as_deref()));
        records += BATCH as u64;
        batch_no += 1;
    }
    started.elapsed().as_nanos() as f64 / records as f64
}

/// The same work without any trace code: the producer's header copied, as before.
fn baseline() -> f64 {
    let started = Instant::now();
    let mut records = 0u64;
    let header = SAMPLED.to_vec();
    let mut batch_no = 0;
    while started.elapsed() < RUN {
        let spans: Vec<Option<Box<trace::IntentSpan>>> = (0..BATCH)
            .map(|i| {
                black_box(format!("intent-{batch_no}-{i}"));
                black_box(header.clone());
                None
            })
            .collect();
        black_box(spans);
        records += BATCH as u64;
        batch_no += 1;
    }
    started.elapsed().as_nanos() as f64 / records as f64
}

fn main() {
    let base = baseline();
    let off = measure(SAMPLED);
    let processor = BatchSpanProcessor::builder(Discard)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(1 << 22)
                .build(),
        )
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_id_generator(Ids::default())
        .build();
    trace::install(provider.tracer("causal-commit"));
    let unsampled = measure(UNSAMPLED);
    let sampled = measure(SAMPLED);
    println!("tracing cost per output record (ns, one core, batches of {BATCH}):");
    println!("  header copied, no trace code   {base:8.0}");
    println!("  traces off                     {off:8.0}");
    println!("  traces on, producer unsampled  {unsampled:8.0}");
    println!("  traces on, producer sampled    {sampled:8.0}");
    let _ = provider.shutdown();
}
