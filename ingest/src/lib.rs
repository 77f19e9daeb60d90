//! The ingest service: Meta's webhook endpoint.
//!
//! It verifies each delivery's signature on the raw bytes, splits the body into one AMQP
//! message per event and answers `200` only once the broker has confirmed all of them.
//!
//! Rooms:
//! - [`config`]: flags and environment variables ([`IngestConfig`]).
//! - [`error`]: [`IngestError`], what stops the service.
//! - [`routes`]: the HTTP handlers (`/webhook`, `/healthz`, `/readyz`, `/metrics`) and the
//!   router with its limits, request counting and timeout.
//! - [`delivery`]: what a verified webhook body becomes on the broker: one message per
//!   event, or the raw body on `messenger.unparsed` when it does not parse.
//! - [`metrics`]: the Prometheus metrics of the webhook side.
//! - [`login`]: the Login half, off unless configured: its settings, counters and routes,
//!   `POST /login-events` (opt-ins reported by the business's backend) and Meta's user data
//!   deletion callback with its status page.
//!
//! [`start`] runs the service in-process (tests use it on port 0); the binary's `main` only
//! parses the configuration and calls [`run`].

pub mod config;
pub mod delivery;
pub mod error;
pub mod login;
pub mod metrics;
pub mod routes;

use std::net::SocketAddr;
use std::time::Duration;

use lc_shared::amqp::BrokerLink;
use lc_shared::shutdown::Shutdown;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use config::IngestConfig;
pub use error::IngestError;

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
    let login = login::routes(
        &config.login,
        &config.app_secrets,
        &broker,
        config.confirm_timeout(),
        &metrics.registry,
    )?;
    let state = routes::AppState::new(&config, broker.clone(), metrics, shutdown.clone());
    let app = routes::router(
        state,
        login,
        config.max_body_bytes,
        config.request_timeout(),
    );
    let link = broker.clone();
    let header_timeout = config.request_timeout();
    let task = tokio::spawn(async move {
        let served = serve(listener, app, header_timeout, shutdown).await;
        link.close().await;
        tracing::info!("ingest stopped");
        served.map_err(IngestError::Serve)
    });
    tracing::info!(%addr, "ingest listening");
    Ok(RunningIngest { addr, broker, task })
}

/// Serves `app` on `listener` until `shutdown` fires, then stops accepting and waits until
/// every open connection has finished its request (idle ones are closed at once).
///
/// Not `axum::serve`, because it sets no bound on reading request headers: a client sending
/// one header byte at a time would hold its connection and task for ever (slow loris).
/// Here hyper closes a connection whose request headers are not complete within
/// `header_timeout` (`INGEST_REQUEST_TIMEOUT_MS`, which also bounds the body through the
/// router's timeout layer). The timer also runs while a kept-alive connection waits for its
/// next request, so idle connections are closed after the same time.
async fn serve(
    listener: TcpListener,
    app: axum::Router,
    header_timeout: Duration,
    shutdown: Shutdown,
) -> Result<(), std::io::Error> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    let mut http = Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was accepted:
                    // not fatal. A short pause lets a flood drain instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.wait() => break,
        };
        // Small answers (200/503) must not wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let connection = http
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection closed with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
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
    if running
        .broker
        .wait_ready(Duration::from_secs(30))
        .await
        .is_err()
    {
        tracing::warn!(
            "RabbitMQ not reachable yet; answering 503 until it is (retrying in the background)"
        );
    }
    match running.task.await {
        Ok(result) => result,
        Err(join) => Err(IngestError::Serve(std::io::Error::other(join))),
    }
}
