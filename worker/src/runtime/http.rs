//! The small HTTP server every worker runs: `/metrics`, `/healthz`, `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use lc_shared::readiness::Readiness;
use lc_shared::shutdown::Shutdown;
use lc_shared::telemetry::render_metrics;

/// Tells `/readyz` whether the worker can do its job, dependency by dependency.
pub type ReadinessCheck = Arc<dyn Fn() -> Readiness + Send + Sync>;

#[derive(Clone)]
struct HttpState {
    registry: prometheus::Registry,
    ready: ReadinessCheck,
}

/// Serves the worker's endpoints on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: prometheus::Registry,
    ready: ReadinessCheck,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(HttpState { registry, ready });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await
}

/// Binds the metrics address, naming it in the error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} for metrics: {e} (set METRICS_ADDR)"),
        )
    })
}

async fn metrics(State(s): State<HttpState>) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render_metrics(&s.registry),
    )
        .into_response()
}

/// `GET /readyz`: the checks as JSON, `200` (ready or degraded) or `503` (not ready).
async fn readyz(State(s): State<HttpState>) -> Response {
    readiness_response(&(s.ready)())
}

/// The HTTP answer of a readiness report (ingest answers the same way).
pub fn readiness_response(readiness: &Readiness) -> Response {
    let status =
        StatusCode::from_u16(readiness.http_status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        readiness.to_json(),
    )
        .into_response()
}
