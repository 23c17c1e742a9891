//! The operations listener on `telemetry.metrics_listen`, unauthenticated (what Prometheus and
//! the orchestrator's probes call; the admin API, with its token, listens elsewhere):
//!
//! - `GET /metrics`: every metric, in the Prometheus text format;
//! - `GET /livez`: 200 while the process serves requests;
//! - `GET /readyz`: 200 while [`Health::view`] says ready (partitions assigned and restored,
//!   the stores answering, not draining), 503 otherwise; the body is the view, as JSON.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::pipeline::health::Health;

/// How often histogram samples are folded into their buckets when nobody scrapes (bounds the
/// memory recorded samples take between scrapes).
const UPKEEP: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct Probes {
    metrics: PrometheusHandle,
    health: Arc<Health>,
}

/// The routes, for [`serve`] (and for tests that call them without a socket).
pub fn router(metrics: PrometheusHandle, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(render))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(Probes { metrics, health })
}

async fn render(State(p): State<Probes>) -> impl IntoResponse {
    p.metrics.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        p.metrics.render(),
    )
}

async fn ready(State(p): State<Probes>) -> impl IntoResponse {
    let view = p.health.view();
    let status = if view.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(view))
}

/// Serves [`router`] on `listener` until `shutdown` fires, and keeps the recorder's upkeep
/// going.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: PrometheusHandle,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let upkeep = tokio::spawn({
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        async move {
            let mut tick = tokio::time::interval(UPKEEP);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => metrics.run_upkeep(),
                }
            }
        }
    });
    let result = axum::serve(listener, router(metrics, health))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    upkeep.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_exporter_prometheus::PrometheusBuilder;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        let status = out[9..12].parse().expect("a status code");
        let body = out
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_string();
        (status, body)
    }

    #[tokio::test]
    async fn readyz_follows_health_livez_always_answers_and_metrics_renders_the_recorder() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!("causal_commit_test_total").increment(3);
        });
        let health = Arc::new(Health::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, handle, health.clone(), shutdown.clone()));

        assert_eq!(get(addr, "/livez").await.0, 200);
        let (status, body) = get(addr, "/readyz").await;
        assert_eq!(status, 503, "nothing assigned yet: {body}");
        assert!(body.contains("\"ready\":false"), "{body}");
        health.set_partitions(2, 2);
        health.set_stores_ok(true);
        let (status, body) = get(addr, "/readyz").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"ready\":true"), "{body}");
        health.set_stopping();
        assert_eq!(get(addr, "/readyz").await.0, 503, "draining");

        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("causal_commit_test_total 3"), "{body}");
        assert_eq!(get(addr, "/nothing").await.0, 404);

        shutdown.cancel();
        server.await.expect("joined").expect("served");
    }
}
