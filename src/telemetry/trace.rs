//! Traces, when `telemetry.otlp_endpoint` is set: one span per batch, one span per intent.
//!
//! - **batch** (a root span) with one child per step: `poll`, `lookup` (decoding and the
//!   idempotency lookup), `decide` (sequencing, operator commands, translation),
//!   `durable_write` and `commit` (the Kafka transaction). Polls that return nothing make no
//!   span: they run every `batch.max_linger` when idle.
//! - **intent**: one per effect or manual-review record produced from an input record that
//!   carries a sampled W3C `traceparent`, parented to the producer's span (so it is in the
//!   producer's trace) and linked to its batch. The output record carries this span's context
//!   in its own `traceparent`, so whoever consumes `side-effects` continues the trace under the
//!   processor's span, not beside it.
//!
//! The same timestamps give every committed batch's step durations to the
//! `causal_commit_batch_step_seconds` histogram, traces on or off.
//!
//! The spans are built after the batch has committed, from timestamps taken at each step
//! ([`BatchTrace`]): nothing is exported for a batch that aborts and is replayed except the
//! failed batch span itself, and the engine holds no span guard across its blocking calls.
//! An intent span's id is chosen when its output record is built (the id must be in the header
//! before the record is produced): it is derived from the producer's context and the record's
//! identity ([`TraceParent::child`]), so the pure translation step stays pure and a replayed
//! batch writes the same header. [`Ids`] hands that id to the SDK when the span is built.
//!
//! Sampling follows the producer: an intent span exists only when the producer's `traceparent`
//! says sampled; batch spans follow the SDK's sampler (`OTEL_TRACES_SAMPLER`, default always
//! on). With traces off, `traceparent` is forwarded unchanged (the processor takes no part in
//! the trace), and the per-record cost is one `Option` check.

use std::cell::Cell;
use std::sync::OnceLock;
use std::time::SystemTime;

use opentelemetry::trace::{
    Link, Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags,
    TraceId, TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracer};

use super::metrics as m;

static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// Makes `tracer` the one the pipeline's spans go to (once per process; `init` does it, the
/// trace benchmark too). Its provider must use [`Ids`].
pub fn install(tracer: SdkTracer) {
    let _ = TRACER.set(tracer);
}

/// Whether spans are exported (an OTLP endpoint is configured).
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

thread_local! {
    /// The id the next span built on this thread takes (see [`Ids`]).
    static NEXT_SPAN_ID: Cell<Option<SpanId>> = const { Cell::new(None) };
}

/// The SDK's id generator, except that a span built right after [`with_span_id`] takes the id
/// given there: the SDK has no other way to build a span whose id was chosen beforehand.
#[derive(Debug, Default)]
pub struct Ids(RandomIdGenerator);

impl IdGenerator for Ids {
    fn new_trace_id(&self) -> TraceId {
        self.0.new_trace_id()
    }

    fn new_span_id(&self) -> SpanId {
        NEXT_SPAN_ID
            .with(Cell::take)
            .unwrap_or_else(|| self.0.new_span_id())
    }
}

/// Builds one span with `id` (on this thread, through [`Ids`]).
fn with_span_id<T>(id: SpanId, build: impl FnOnce() -> T) -> T {
    NEXT_SPAN_ID.with(|c| c.set(Some(id)));
    let out = build();
    // Left set if the SDK built nothing (provider shut down): never leak it to another span.
    NEXT_SPAN_ID.with(|c| c.set(None));
    out
}

/// A W3C trace context (`traceparent` header, version 00).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

const SAMPLED: u8 = 0x01;

impl TraceParent {
    /// Parses a `traceparent` value: `00-<32 hex>-<16 hex>-<2 hex>` (a later version may append
    /// fields after a dash). `None` for anything else, all-zero ids and version `ff`.
    pub fn parse(value: &[u8]) -> Option<Self> {
        if value.len() < 55 || (value.len() > 55 && value[55] != b'-') {
            return None;
        }
        let version = hex::<1>(&value[0..2])?[0];
        if version == 0xff || (version == 0 && value.len() != 55) {
            return None;
        }
        if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return None;
        }
        let trace_id = hex::<16>(&value[3..35])?;
        let span_id = hex::<8>(&value[36..52])?;
        let flags = hex::<1>(&value[53..55])?[0];
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The header value (version 00).
    pub fn to_header(&self) -> Vec<u8> {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = Vec::with_capacity(55);
        out.extend_from_slice(b"00-");
        for (i, bytes) in [&self.trace_id[..], &self.span_id[..], &[self.flags][..]]
            .into_iter()
            .enumerate()
        {
            if i > 0 {
                out.push(b'-');
            }
            for b in bytes {
                out.push(DIGITS[usize::from(b >> 4)]);
                out.push(DIGITS[usize::from(b & 0x0f)]);
            }
        }
        out
    }

    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    /// A child context in the same trace, with the same flags, whose span id is derived from
    /// this context and `salt` (what makes the child unique: the output record's identity).
    pub fn child(&self, salt: &[&[u8]]) -> TraceParent {
        use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};
        // Chained one-shot hashes (each part seeds the next): a few ns per part, where a
        // streaming hasher's set-up alone costs more.
        let mut h = xxh3_64(&self.trace_id) ^ u64::from_le_bytes(self.span_id);
        for part in salt {
            h = xxh3_64_with_seed(part, h);
        }
        // Never the invalid all-zero id.
        let id = h.max(1);
        TraceParent {
            span_id: id.to_be_bytes(),
            ..*self
        }
    }

    fn span_context(&self, remote: bool) -> SpanContext {
        SpanContext::new(
            TraceId::from_bytes(self.trace_id),
            SpanId::from_bytes(self.span_id),
            TraceFlags::new(self.flags),
            remote,
            TraceState::default(),
        )
    }
}

fn hex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// The processor's span for one output record, emitted once its transaction committed.
#[derive(Debug, Clone, PartialEq)]
pub struct IntentSpan {
    /// The producer's context (the span's parent).
    pub parent: TraceParent,
    /// The span's id, as written in the output record's `traceparent`.
    pub span_id: [u8; 8],
    pub attributes: Vec<KeyValue>,
}

/// The `traceparent` an output record carries, and the span to emit for it once committed.
///
/// `producer` is the input record's header; `salt` identifies the output record. With traces
/// off, or a header that is not a valid trace context, the header is forwarded as it is. With
/// traces on, the record carries the processor's child context; its span is recorded only
/// when the producer sampled the trace (`attributes` is not called otherwise).
pub fn child_of(
    producer: Option<&Vec<u8>>,
    salt: &[&[u8]],
    attributes: impl FnOnce() -> Vec<KeyValue>,
) -> (Option<Vec<u8>>, Option<Box<IntentSpan>>) {
    let Some(value) = producer else {
        return (None, None);
    };
    if !enabled() {
        return (Some(value.clone()), None);
    }
    let Some(parent) = TraceParent::parse(value) else {
        return (Some(value.clone()), None);
    };
    let child = parent.child(salt);
    let span = parent.sampled().then(|| {
        Box::new(IntentSpan {
            parent,
            span_id: child.span_id,
            attributes: attributes(),
        })
    });
    (Some(child.to_header()), span)
}

/// A step of the batch, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Poll,
    Lookup,
    Decide,
    DurableWrite,
    Commit,
}

impl Step {
    pub const ALL: [Step; 5] = [
        Step::Poll,
        Step::Lookup,
        Step::Decide,
        Step::DurableWrite,
        Step::Commit,
    ];

    /// Each step's span name and `step` label of [`metrics::BATCH_STEP`], in [`Step::ALL`]
    /// order.
    pub const NAMES: [&'static str; 5] = ["poll", "lookup", "decide", "durable_write", "commit"];

    /// The span's name and the histogram's `step` label.
    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }
}

/// The timestamps of one batch's steps: the step durations of a committed batch go to
/// [`metrics::BATCH_STEP`], and the spans to the tracer when traces are on (see the module
/// documentation).
#[derive(Debug, Default)]
pub struct BatchTrace {
    started: Option<SystemTime>,
    /// When each step ended.
    ended: [Option<SystemTime>; 5],
    records: usize,
}

impl BatchTrace {
    /// A batch starts polling.
    pub fn start(&mut self) {
        *self = BatchTrace {
            started: Some(SystemTime::now()),
            ..BatchTrace::default()
        };
    }

    /// The poll returned `records`.
    pub fn polled(&mut self, records: usize) {
        self.records = records;
        self.done(Step::Poll);
    }

    /// `step` ended now.
    pub fn done(&mut self, step: Step) {
        if self.started.is_some() {
            self.ended[step as usize] = Some(SystemTime::now());
        }
    }

    /// The batch committed with these output records (each with its intent span, if sampled):
    /// the batch's spans, and the intent spans.
    pub fn committed<'a>(&mut self, outputs: impl Iterator<Item = Option<&'a IntentSpan>>) {
        let Some(started) = self.started else {
            return;
        };
        let mut ms = [0u64; 5];
        for (step, from, to) in self.steps(started) {
            let took = to.duration_since(from).unwrap_or_default();
            metrics::histogram!(m::BATCH_STEP, "step" => step.name()).record(took.as_secs_f64());
            ms[step as usize] = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
        }
        tracing::debug!(
            records = self.records,
            poll_ms = ms[0],
            lookup_ms = ms[1],
            decide_ms = ms[2],
            durable_write_ms = ms[3],
            commit_ms = ms[4],
            "batch committed"
        );
        if !enabled() {
            self.started = None;
            return;
        }
        let mut count = 0;
        let spans: Vec<&IntentSpan> = outputs.inspect(|_| count += 1).flatten().collect();
        self.finish(Ok(count), spans.into_iter());
    }

    /// Each step that ended, from the end of the step before it to its own; a step without an
    /// end (the batch failed before it ended) counts in the next one.
    fn steps(&self, started: SystemTime) -> Vec<(Step, SystemTime, SystemTime)> {
        let mut from = started;
        let mut out = Vec::with_capacity(Step::ALL.len());
        for step in Step::ALL {
            let Some(to) = self.ended[step as usize] else {
                continue;
            };
            out.push((step, from, to));
            from = to;
        }
        out
    }

    /// The batch did not commit (`why`): its span, marked as an error, and its steps so far.
    pub fn failed(&mut self, why: &str) {
        self.finish(Err(why), std::iter::empty());
    }

    fn finish<'a>(
        &mut self,
        result: Result<usize, &str>,
        intents: impl Iterator<Item = &'a IntentSpan>,
    ) {
        let (Some(started), Some(tracer)) = (self.started.take(), TRACER.get()) else {
            return;
        };
        let end = SystemTime::now();
        let mut attributes = vec![KeyValue::new("records", self.records as i64)];
        if let Ok(outputs) = result {
            attributes.push(KeyValue::new("outputs", outputs as i64));
        }
        let batch = tracer
            .span_builder("batch")
            .with_start_time(started)
            .with_attributes(attributes)
            .start_with_context(tracer, &Context::new());
        let cx = Context::new().with_span(batch);
        for (step, from, to) in self.steps(started) {
            tracer
                .span_builder(step.name())
                .with_start_time(from)
                .start_with_context(tracer, &cx)
                .end_with_timestamp(to);
        }
        let batch_context = cx.span().span_context().clone();
        for intent in intents {
            let parent = Context::new().with_remote_span_context(intent.parent.span_context(true));
            let mut span = with_span_id(SpanId::from_bytes(intent.span_id), || {
                tracer
                    .span_builder("intent")
                    .with_kind(SpanKind::Consumer)
                    .with_start_time(started)
                    .with_attributes(intent.attributes.clone())
                    .with_links(vec![Link::with_context(batch_context.clone())])
                    .start_with_context(tracer, &parent)
            });
            span.end_with_timestamp(end);
        }
        if let Err(why) = result {
            cx.span().set_status(Status::error(why.to_string()));
        }
        cx.span().end_with_timestamp(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_step_without_an_end_counts_in_the_next_one() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let at = |ms: u64| Some(t0 + Duration::from_millis(ms));
        let mut trace = BatchTrace {
            started: Some(t0),
            ..BatchTrace::default()
        };
        trace.ended[Step::Poll as usize] = at(100);
        trace.ended[Step::Lookup as usize] = at(130);
        trace.ended[Step::Decide as usize] = at(200);
        // No durable_write end: its time counts in the next step.
        trace.ended[Step::Commit as usize] = at(650);
        let ms = |from: SystemTime, to: SystemTime| to.duration_since(from).unwrap().as_millis();
        let got: Vec<(&str, u128)> = trace
            .steps(t0)
            .into_iter()
            .map(|(s, from, to)| (s.name(), ms(from, to)))
            .collect();
        assert_eq!(
            got,
            [
                ("poll", 100),
                ("lookup", 30),
                ("decide", 70),
                ("commit", 450)
            ]
        );
    }

    const HEADER: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_round_trips_and_rejects_what_w3c_rejects() {
        let tp = TraceParent::parse(HEADER).expect("valid");
        assert_eq!(tp.span_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert!(tp.sampled());
        assert_eq!(tp.to_header(), HEADER);
        for bad in [
            &b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0"[..],
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            b"00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"",
        ] {
            assert_eq!(
                TraceParent::parse(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // A later version may carry more fields.
        let future = b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra";
        assert!(TraceParent::parse(future).is_some());
    }

    #[test]
    fn a_child_keeps_the_trace_and_flags_and_its_id_depends_on_the_salt_only() {
        let tp = TraceParent::parse(HEADER).expect("valid");
        let a = tp.child(&[b"intent-1", &7u64.to_le_bytes()]);
        let b = tp.child(&[b"intent-1", &8u64.to_le_bytes()]);
        assert_eq!(a.trace_id, tp.trace_id);
        assert_eq!(a.flags, tp.flags);
        assert_ne!(a.span_id, tp.span_id);
        assert_ne!(a.span_id, b.span_id);
        assert_eq!(
            a,
            tp.child(&[b"intent-1", &7u64.to_le_bytes()]),
            "deterministic"
        );
        // Parts are hashed one after the other: ("ab","c") and ("a","bc") differ.
        assert_ne!(tp.child(&[b"ab", b"c"]), tp.child(&[b"a", b"bc"]));
    }

    #[test]
    fn with_traces_off_the_producer_header_is_forwarded_and_no_span_is_made() {
        // No tracer is installed in unit tests.
        let header = HEADER.to_vec();
        let mut asked = false;
        let (out, span) = child_of(Some(&header), &[b"x"], || {
            asked = true;
            Vec::new()
        });
        assert_eq!(out.as_deref(), Some(HEADER));
        assert!(span.is_none() && !asked);
        assert_eq!(child_of(None, &[b"x"], Vec::new), (None, None));
    }

    #[test]
    fn a_preset_span_id_is_taken_by_the_next_span_only() {
        let ids = Ids::default();
        let id = SpanId::from_bytes([1, 2, 3, 4, 5, 6, 7, 8]);
        let got = with_span_id(id, || ids.new_span_id());
        assert_eq!(got, id);
        assert_ne!(ids.new_span_id(), id);
    }
}
