//! The ingest service: Meta's webhook endpoint.
//!
//! It verifies each delivery's signature on the raw bytes, splits the body into one AMQP
//! message per event and answers `200` only once the broker has confirmed all of them.
//!
//! Layout:
//! - [`config`]: flags and environment variables.
//! - [`routes`]: the HTTP handlers (`/webhook`, `/healthz`, `/readyz`, `/metrics`).
//! - [`publish`]: building messages and publishing them with confirms.
//! - [`metrics`]: the Prometheus metrics.
//!
//! [`start`] runs the service in-process (tests use it on port 0); the binary's `main` only
//! parses the configuration and calls [`run`].

pub mod config;
pub mod metrics;
pub mod publish;
pub mod routes;

use std::net::SocketAddr;
use std::time::Duration;

use lc_shared::amqp::BrokerLink;
use lc_shared::shutdown::Shutdown;
use lc_shared::signature::SignatureVerifier;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use config::IngestConfig;

/// Errors that stop the ingest service.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source} (is another process using the port? set INGEST_ADDR)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("HTTP server error: {0}")]
    Serve(std::io::Error),
    /// Metrics could not be registered.
    #[error("metrics registry error: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// A running ingest service.
pub struct RunningIngest {
    /// The address it listens on (useful with port 0).
    pub addr: SocketAddr,
    /// The broker link it publishes through.
    pub broker: BrokerLink,
    /// Completes when the server has drained after shutdown.
    pub task: JoinHandle<Result<(), IngestError>>,
}

/// Starts ingest on `listener` and returns once it serves HTTP (the broker connects in the
/// background; `/readyz` says when it is ready). It stops when `shutdown` fires: new
/// connections are refused, in-flight requests finish (with their confirms), then the broker
/// connection is closed.
pub async fn start(
    config: IngestConfig,
    listener: TcpListener,
    shutdown: Shutdown,
) -> Result<RunningIngest, IngestError> {
    config.validate().map_err(IngestError::Config)?;
    let addr = listener.local_addr().map_err(IngestError::Serve)?;
    let metrics = metrics::IngestMetrics::new()?;
    let broker = BrokerLink::start(
        &config.amqp.amqp_url,
        &format!("ingest@{addr}"),
        config.publish_channels,
    );
    let state = routes::AppState::new(
        SignatureVerifier::new(&config.app_secrets, config.accept_sha1),
        config.verify_token.clone(),
        broker.clone(),
        metrics,
        config.confirm_timeout(),
        shutdown.clone(),
    );
    let app = routes::router(state, config.max_body_bytes, config.request_timeout());
    let link = broker.clone();
    let task = tokio::spawn(async move {
        let stop = shutdown.clone();
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.wait().await })
            .await;
        link.close().await;
        tracing::info!("ingest stopped");
        served.map_err(IngestError::Serve)
    });
    tracing::info!(%addr, "ingest listening");
    Ok(RunningIngest { addr, broker, task })
}

/// Binds `config.addr`, runs ingest until `shutdown` fires and the server has drained.
pub async fn run(config: IngestConfig, shutdown: Shutdown) -> Result<(), IngestError> {
    let listener = TcpListener::bind(config.addr)
        .await
        .map_err(|source| IngestError::Bind {
            addr: config.addr,
            source,
        })?;
    let running = start(config, listener, shutdown).await?;
    if running.broker.wait_ready(Duration::from_secs(30)).await.is_err() {
        tracing::warn!("RabbitMQ not reachable yet; answering 503 until it is (retrying in the background)");
    }
    match running.task.await {
        Ok(result) => result,
        Err(join) => Err(IngestError::Serve(std::io::Error::other(join))),
    }
}
