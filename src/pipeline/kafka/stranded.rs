//! A Kafka client that librdkafka left without any broker bootstraps again.
//!
//! librdkafka (2.12, bundled by rdkafka 0.39) drops ("decommissions") every broker a metadata
//! response leaves out, and a broker in controlled shutdown can answer with no broker at all.
//! That successful response also stops the re-bootstrap timer, and a client with no broker left
//! sends no metadata request that could fail and start it again: it waits forever, logging
//! "no usable brokers" (librdkafka issue 5301, unfixed upstream). The chaos test's workload
//! producer stopped that way for good after a broker restart while another producer of the same
//! process, whose timer was running, came back ten seconds later; any long-lived client of the
//! product can be the unlucky one.
//!
//! [`BrokerWatch`] reads the client's statistics (every [`STATS_INTERVAL_MS`]): when
//! [`STRANDED_REPORTS`] reports in a row list no broker but librdkafka's internal and logical
//! ones, it adds `kafka.brokers` back (`rd_kafka_brokers_add`, what librdkafka's own
//! re-bootstrap does), logs a warning and counts it in `causal_commit_kafka_rebootstraps_total`.
//! The next metadata response replaces those bootstrap entries with the brokers it lists. A
//! broker that is down, as opposed to forgotten, stays in the list: the watch does nothing then.

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::atomic::{AtomicPtr, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::bindings::{rd_kafka_brokers_add, rd_kafka_t};
use rdkafka::client::Client;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::ConsumerContext;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::ClientContext;

use crate::telemetry::metrics as m;

/// How often a watched client reports its statistics (librdkafka's `statistics.interval.ms`).
pub const STATS_INTERVAL_MS: &str = "2000";
/// Reports in a row without any broker before the bootstrap servers are added back: a client
/// is left alone 4–6 s, past a re-bootstrap that librdkafka itself has under way.
pub const STRANDED_REPORTS: u32 = 3;

/// Watches one client's statistics and bootstraps it again when it knows no broker.
#[derive(Debug, Default)]
pub struct BrokerWatch {
    /// Which client, for the log and the metric's `client` label.
    client: &'static str,
    /// `kafka.brokers`; `None`: the watch is off.
    bootstrap: Option<CString>,
    /// The client's handle, set by [`Self::attach`] once it exists.
    handle: AtomicPtr<rd_kafka_t>,
    /// Statistics reports in a row that listed no broker.
    stranded: AtomicU32,
    /// When the watch last added the bootstrap servers back.
    acted: Mutex<Option<Instant>>,
}

impl BrokerWatch {
    /// A watch for `client` (a `client` label value of the metric) that adds `bootstrap` back.
    pub fn new(client: &'static str, bootstrap: &str) -> Arc<Self> {
        Arc::new(Self {
            client,
            // Empty, or with a NUL byte (librdkafka refuses such a bootstrap.servers at
            // creation anyway): the watch is off.
            bootstrap: CString::new(bootstrap).ok().filter(|b| !b.is_empty()),
            ..Self::default()
        })
    }

    /// Enables statistics on a client configuration, at the interval the watch expects (an
    /// explicit `statistics.interval.ms` in `[kafka.client]` is applied after and wins; 0
    /// turns the watch off).
    pub fn enable(config: &mut ClientConfig) {
        config.set("statistics.interval.ms", STATS_INTERVAL_MS);
    }

    /// Binds the watch to the client it watches; call it right after creating the client.
    pub fn attach<C: ClientContext>(&self, client: &Client<C>) {
        self.handle.store(client.native_ptr(), Ordering::Release);
    }

    /// One statistics report of the watched client. Runs in the client's statistics callback,
    /// on the thread that polls it.
    pub(super) fn observe(&self, statistics: &[u8]) {
        if !knows_no_broker(statistics) {
            self.stranded.store(0, Ordering::Relaxed);
            return;
        }
        if self.stranded.fetch_add(1, Ordering::Relaxed) + 1 < STRANDED_REPORTS {
            return;
        }
        self.stranded.store(0, Ordering::Relaxed);
        let handle = self.handle.load(Ordering::Acquire);
        let Some(bootstrap) = &self.bootstrap else {
            return;
        };
        if handle.is_null() {
            return;
        }
        // Reports queued while nobody polled the client (the engine blocked in a call that
        // timed out for want of a broker) arrive in a burst: act once for it, then let the
        // client connect for as long as the watch waits before acting.
        {
            let mut acted = self.acted.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            if acted.is_some_and(|at| now.duration_since(at) < settle_time()) {
                return;
            }
            *acted = Some(now);
        }
        // SAFETY: `handle` is the native handle of the client whose statistics callback is
        // running now (`attach` stored it right after creation, and only that client's context
        // holds this watch's `observe`): librdkafka serves the callback from that client's
        // poll, so the handle is alive. `rd_kafka_brokers_add` may be called from any thread
        // and copies the NUL-terminated list it is given.
        #[allow(unsafe_code)]
        let added = unsafe { rd_kafka_brokers_add(handle, bootstrap.as_ptr()) };
        metrics::counter!(m::KAFKA_REBOOTSTRAPS, "client" => self.client).increment(1);
        tracing::warn!(
            client = self.client,
            brokers = %bootstrap.to_string_lossy(),
            added,
            "the Kafka client knew no broker any more (librdkafka dropped them after a \
             metadata response that listed none, and does not bootstrap again by itself); \
             bootstrapping again from kafka.brokers"
        );
    }
}

/// How long a client is left to connect after the bootstrap servers were added back: as long as
/// the watch waits before acting.
fn settle_time() -> Duration {
    let interval: u64 = STATS_INTERVAL_MS.parse().unwrap_or(2_000);
    Duration::from_millis(interval * u64::from(STRANDED_REPORTS))
}

/// Whether a statistics report lists no broker but librdkafka's internal and logical ones (the
/// internal broker and the coordinators' logical brokers are always there). A report that does
/// not parse says nothing.
fn knows_no_broker(statistics: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Report {
        brokers: HashMap<String, Broker>,
    }
    #[derive(serde::Deserialize)]
    struct Broker {
        source: String,
    }
    serde_json::from_slice::<Report>(statistics).is_ok_and(|r| {
        r.brokers
            .values()
            .all(|b| matches!(b.source.as_str(), "internal" | "logical"))
    })
}

/// The context of a watched producer (and of any client that needs nothing else): librdkafka's
/// logs and errors as rdkafka's default context handles them, statistics to the watch.
#[derive(Clone)]
pub struct Watched(pub Arc<BrokerWatch>);

impl ClientContext for Watched {
    fn stats_raw(&self, statistics: &[u8]) {
        self.0.observe(statistics);
    }
}

impl ConsumerContext for Watched {}

impl ProducerContext for Watched {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    // Statistics as librdkafka 2.12 reports them (trimmed to the brokers).
    const FORGOTTEN: &str = r#"{"name":"p#producer-1","brokers":{
        ":0/internal":{"name":":0/internal","nodeid":-1,"source":"internal","state":"UP"},
        "GroupCoordinator":{"name":"GroupCoordinator","nodeid":-1,"source":"logical","state":"DOWN"}}}"#;
    const DOWN: &str = r#"{"name":"p#producer-1","brokers":{
        ":0/internal":{"name":":0/internal","nodeid":-1,"source":"internal","state":"UP"},
        "127.0.0.1:9092/1":{"name":"127.0.0.1:9092/1","nodeid":1,"source":"learned","state":"DOWN"}}}"#;
    const BOOTSTRAPPING: &str = r#"{"name":"p#producer-1","brokers":{
        ":0/internal":{"name":":0/internal","nodeid":-1,"source":"internal","state":"UP"},
        "127.0.0.1:9092/bootstrap":{"name":"127.0.0.1:9092/bootstrap","nodeid":-1,"source":"configured","state":"CONNECT"}}}"#;

    #[test]
    fn only_a_client_that_knows_no_real_broker_is_stranded() {
        assert!(knows_no_broker(FORGOTTEN.as_bytes()));
        // A broker that is down is still known: librdkafka keeps trying it.
        assert!(!knows_no_broker(DOWN.as_bytes()));
        assert!(!knows_no_broker(BOOTSTRAPPING.as_bytes()));
        // Reports that do not parse, or lack the brokers, say nothing.
        assert!(!knows_no_broker(b"not json"));
        assert!(!knows_no_broker(br#"{"name":"x"}"#));
    }

    #[test]
    fn the_watch_acts_after_consecutive_reports_only_and_never_without_a_client() {
        let watch = BrokerWatch::new("test", "127.0.0.1:1");
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            // Two stranded reports, then a known broker: the count starts again.
            watch.observe(FORGOTTEN.as_bytes());
            watch.observe(FORGOTTEN.as_bytes());
            watch.observe(DOWN.as_bytes());
            watch.observe(FORGOTTEN.as_bytes());
            watch.observe(FORGOTTEN.as_bytes());
            assert_eq!(watch.stranded.load(Ordering::Relaxed), 2);
            // The third in a row would act, but no client is attached: nothing is added.
            watch.observe(FORGOTTEN.as_bytes());
            assert_eq!(watch.stranded.load(Ordering::Relaxed), 0);
        });
        assert!(!handle.render().contains(m::KAFKA_REBOOTSTRAPS));
    }

    #[test]
    fn a_burst_of_queued_reports_acts_once() {
        // A real client handle, to a broker that does not exist: adding it back is harmless.
        let mut c = ClientConfig::new();
        c.set("client.id", "stranded-unit-test");
        let watch = BrokerWatch::new("producer", "127.0.0.1:1");
        use rdkafka::producer::Producer as _;
        let producer: rdkafka::producer::BaseProducer<Watched> = c
            .create_with_context(Watched(watch.clone()))
            .expect("a producer without brokers is created");
        watch.attach(producer.client());
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            // Thirty reports served at once: ten groups of three, one act.
            for _ in 0..30 {
                watch.observe(FORGOTTEN.as_bytes());
            }
        });
        let rendered = handle.render();
        assert!(
            rendered.contains(r#"causal_commit_kafka_rebootstraps_total{client="producer"} 1"#),
            "{rendered}"
        );
    }
}
