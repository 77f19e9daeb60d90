//! The ingest service: Meta's webhook endpoint.
//!
//! It verifies each delivery's signature on the raw bytes, splits the body into one AMQP
//! message per event and answers `200` only once the broker has confirmed all of them.
//!
//! Rooms:
//! - [`config`]: flags and environment variables ([`IngestConfig`]).
//! - [`error`]: [`IngestError`], what stops the service.
//! - [`routes`]: the HTTP handlers (`/webhook`, `/healthz`, `/readyz`) and the router with
//!   its limits, request counting and timeout; the admin listener's router (`/metrics`).
//! - [`transport`]: how connections are served: HTTP/1.1 (HTTP/2 on request) with every
//!   connection bounded from accept, and a cap on open connections.
//! - [`binding`]: app binding — a page bound to an app in the registry accepts only
//!   deliveries its app signed; the bindings kept current from the registry.
//! - [`delivery`]: what a verified webhook body becomes on the broker: one message per
//!   event, or the raw body on `messenger.unparsed` when it does not parse.
//! - [`metrics`]: the Prometheus metrics of the webhook side.
//! - [`login`]: the Login half, off unless configured: its settings, counters and routes,
//!   `POST /login-events` (opt-ins reported by the business's backend) and Meta's user data
//!   deletion callback with its status page.
//!
//! [`start`] runs the service in-process (tests use it on port 0); the binary's `main` only
//! parses the configuration and calls [`run`].

pub mod binding;
pub mod config;
pub mod delivery;
pub mod error;
pub mod login;
pub mod metrics;
pub mod routes;
pub mod transport;

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
    /// The address of the admin listener (`/metrics`, `/healthz`, `/readyz`).
    pub admin_addr: SocketAddr,
    /// The broker link it publishes through.
    pub broker: BrokerLink,
    /// Completes when the server has drained after shutdown.
    pub task: JoinHandle<Result<(), IngestError>>,
}

/// Starts ingest on `listener`, and its admin listener on `config.admin_addr`, and returns
/// once both serve HTTP (the broker connects in the background; `/readyz` says when it is
/// ready). It stops when `shutdown` fires: new connections are refused, in-flight requests
/// finish (with their confirms), then the broker connection is closed.
pub async fn start(
    config: IngestConfig,
    listener: TcpListener,
    shutdown: Shutdown,
) -> Result<RunningIngest, IngestError> {
    config.validate().map_err(IngestError::Config)?;
    let endpoint = config
        .amqp
        .endpoint()
        .map_err(|e| IngestError::Config(e.to_string()))?;
    let addr = listener.local_addr().map_err(IngestError::Serve)?;
    let admin = TcpListener::bind(config.admin_addr)
        .await
        .map_err(|source| IngestError::Bind {
            addr: config.admin_addr,
            var: "INGEST_ADMIN_ADDR",
            source,
        })?;
    let admin_addr = admin.local_addr().map_err(IngestError::Serve)?;
    let metrics = metrics::IngestMetrics::new()?;
    let broker = BrokerLink::start(endpoint, &format!("ingest@{addr}"), config.publish_channels);
    let login = login::routes(
        &config.login,
        &config.app_secrets,
        &broker,
        config.confirm_timeout(),
        &metrics.registry,
    )?;
    let connections = metrics.connections.clone();
    let bindings = match &config.login.database_url {
        Some(url) => {
            binding::watch::BindingsView::from_registry(
                url,
                config.app_secrets.clone(),
                config.secret_vars.clone(),
                config.accept_sha1,
                metrics.bindings.clone(),
                shutdown.clone(),
            )
            .await?
        }
        None => binding::watch::BindingsView::fixed(&config.app_secrets, config.accept_sha1),
    };
    let state = routes::AppState::new(&config, bindings, broker.clone(), metrics, shutdown.clone());
    let admin_app = routes::admin_router(state.clone());
    let app = routes::router(
        state,
        login,
        config.max_body_bytes,
        config.request_timeout(),
    );
    let webhook_side = transport::Transport {
        request_timeout: config.request_timeout(),
        http2: config.http2,
        max_connections: config.max_connections,
    };
    // The admin side is for one scraper and probes: HTTP/1.1, a few connections.
    let admin_side = transport::Transport {
        request_timeout: config.request_timeout(),
        http2: false,
        max_connections: ADMIN_MAX_CONNECTIONS,
    };
    let admin_task = tokio::spawn(transport::serve(
        admin,
        admin_app,
        admin_side,
        None,
        shutdown.clone(),
    ));
    let link = broker.clone();
    let task = tokio::spawn(async move {
        let served =
            transport::serve(listener, app, webhook_side, Some(connections), shutdown).await;
        if let Ok(Err(e)) = admin_task.await {
            tracing::warn!(error = %e, "the admin listener stopped with an error");
        }
        link.close().await;
        tracing::info!("ingest stopped");
        served.map_err(IngestError::Serve)
    });
    tracing::info!(%addr, %admin_addr, "ingest listening (metrics on the admin address)");
    Ok(RunningIngest {
        addr,
        admin_addr,
        broker,
        task,
    })
}

/// Connections the admin listener serves at once.
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// Binds `config.addr`, runs ingest until `shutdown` fires and the server has drained.
pub async fn run(config: IngestConfig, shutdown: Shutdown) -> Result<(), IngestError> {
    let listener = TcpListener::bind(config.addr)
        .await
        .map_err(|source| IngestError::Bind {
            addr: config.addr,
            var: "INGEST_ADDR",
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
