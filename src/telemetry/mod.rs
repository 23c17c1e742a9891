//! Telemetry: JSON logs through `tracing`, Prometheus metrics, optional OTLP traces.
//!
//! Every metric the service exports is named in [`metrics`]; the alert rules and the Grafana
//! dashboard in `deploy/` refer to those names only. [`server`] serves them with the probes;
//! [`trace`] makes the batch and intent spans.

pub mod metrics;
pub mod server;
pub mod trace;

use std::sync::Arc;

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, TelemetryConfig};

/// Keeps the trace pipeline alive; flushes pending spans when dropped.
pub struct TelemetryGuard {
    tracer_provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.tracer_provider.take() {
            if let Err(e) = provider.shutdown() {
                eprintln!("causal-commit: flushing traces failed: {e}");
            }
        }
    }
}

/// Installs the global subscriber (logs + optional OTLP traces). Call once, inside a tokio
/// runtime when `otlp_endpoint` is set. A second call (tests) is a no-op.
pub fn init(config: &TelemetryConfig) -> anyhow::Result<TelemetryGuard> {
    let filter = || {
        EnvFilter::try_from_default_env()
            .or_else(|_| EnvFilter::try_new(&config.log_level))
            .unwrap_or_else(|_| EnvFilter::new("info"))
    };
    let fmt_layer = match config.log_format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_target(true)
            .with_writer(std::io::stdout)
            .with_filter(filter())
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter())
            .boxed(),
    };

    let mut tracer_provider = None;
    let otel_layer = if config.otlp_endpoint.is_empty() {
        None
    } else {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(&config.otlp_endpoint)
            .build()
            .with_context(|| format!("building the OTLP exporter for {}", config.otlp_endpoint))?;
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_id_generator(trace::Ids::default())
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name("causal-commit")
                    .build(),
            )
            .build();
        let tracer = provider.tracer("causal-commit");
        trace::install(tracer.clone());
        tracer_provider = Some(provider);
        Some(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(filter()),
        )
    };

    // A second init (several tests in one process) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(fmt_layer)
        .with(otel_layer)
        .try_init();
    Ok(TelemetryGuard { tracer_provider })
}

/// Starts the operations listener (`/metrics`, `/livez`, `/readyz`) on `config.metrics_listen`
/// with a freshly installed Prometheus recorder; it serves until `shutdown` fires. Nothing
/// when `metrics_listen` is empty (metrics are then recorded nowhere). Call once per process,
/// before anything records a metric.
pub async fn start_server(
    config: &TelemetryConfig,
    health: Arc<crate::pipeline::health::Health>,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<std::io::Result<()>>>> {
    if config.metrics_listen.is_empty() {
        return Ok(None);
    }
    let addr: std::net::SocketAddr = config
        .metrics_listen
        .parse()
        .with_context(|| format!("telemetry.metrics_listen {:?}", config.metrics_listen))?;
    let handle = metrics::install_recorder().context("installing the metrics recorder")?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on telemetry.metrics_listen {addr}"))?;
    tracing::info!(%addr, "serving /metrics, /livez and /readyz");
    Ok(Some(tokio::spawn(server::serve(
        listener, handle, health, shutdown,
    ))))
}
