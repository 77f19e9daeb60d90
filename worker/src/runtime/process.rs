//! What every worker process runs beside its own work, started the same way by the scheduler
//! and the correlator: the health and metrics server, the outbox relay, and the supervisor
//! task that ends when everything has stopped.

use std::sync::Arc;

use deadpool_postgres::Pool;
use lc_shared::amqp::BrokerLink;
use lc_shared::shutdown::Shutdown;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use crate::relay::{self, OutboxDb, RelayMetrics};
use crate::runtime::config::{StartError, WorkerArgs};

/// Spawns the `/metrics`, `/healthz`, `/readyz` server into `tasks`; ready while the broker
/// link is connected and no shutdown has begun (so a load balancer stops sending first).
pub fn spawn_http(
    tasks: &mut JoinSet<()>,
    listener: TcpListener,
    registry: prometheus::Registry,
    link: &BrokerLink,
    shutdown: &Shutdown,
) {
    let (link, stop) = (link.clone(), shutdown.clone());
    let ready: crate::runtime::http::ReadinessCheck =
        Arc::new(move || link.is_ready() && !stop.is_triggered());
    let shutdown = shutdown.clone();
    tasks.spawn(async move {
        if let Err(e) = crate::runtime::http::serve(listener, registry, ready, shutdown).await {
            tracing::error!(error = %e, "metrics server failed");
        }
    });
}

/// Spawns the outbox relay into `tasks`, with a LISTEN connection of its own (pooled
/// connections would drop the notifications).
pub fn spawn_relay(
    tasks: &mut JoinSet<()>,
    pool: &Pool,
    worker: &WorkerArgs,
    link: &BrokerLink,
    metrics: RelayMetrics,
    shutdown: &Shutdown,
) -> Result<(), StartError> {
    let outbox = OutboxDb::new(pool.clone(), &worker.database.database_url)
        .map_err(|e| StartError::Config(format!("DATABASE_URL: {e}")))?;
    tasks.spawn(relay::run(
        outbox,
        link.clone(),
        worker.relay.clone(),
        metrics,
        shutdown.clone(),
    ));
    Ok(())
}

/// The process's own task: waits for every task in `tasks` (logging any that panicked),
/// then closes the broker connection.
pub fn supervise(mut tasks: JoinSet<()>, link: BrokerLink, name: &'static str) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(joined) = tasks.join_next().await {
            if let Err(e) = joined {
                tracing::error!(error = %e, "a {name} task panicked");
            }
        }
        link.close().await;
        tracing::info!("{name} stopped");
    })
}
