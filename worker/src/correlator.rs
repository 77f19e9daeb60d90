//! The correlator: joins a person's login_id to their PSID when they reply.
//!
//! It consumes `correlator.replies` (messages and postbacks routed by ingest, from `messaging`
//! and — when they carry `prior_message` — from `standby`). A reply that carries
//! `prior_message` with a login_id from an allowed source (`CORRELATOR_LINK_SOURCES`, default
//! `login_connect`) creates the link `(page_id, login_id) → psid`,
//! moves a still-`pending` opt-in to `replied` (so the scheduler never sends it) and writes one
//! `identity.linked` event to the outbox, all in the batch's transaction; the delivery is
//! acked only after the commit. Redeliveries and repeated `prior_message`s find the link and do
//! nothing (invariant 9). A second PSID for a linked login_id keeps the first link and is
//! recorded in `link_conflicts`. A process runs `CONSUMER_CONCURRENCY` consumer loops, each on
//! its own channel, whose batches commit concurrently as those of several replicas do: the
//! `links` primary key still admits one link per login_id; within a batch the earliest reply
//! of a login_id links, across batches the one committed first. A `prior_message` of any other source (a checkbox plugin's
//! `user_ref` is chosen client-side, so it can name anyone's login_id) never links: it is
//! counted (`correlator_replies_total{result="foreign_source"}`), logged and kept in
//! `foreign_prior_messages`. A reply of a person deleted by a data deletion request that
//! happened before the deletion (a redelivery) recreates nothing. The outbox relay in the
//! same process publishes the events.
//!
//! - [`replies`]: decoding and the per-batch transaction;
//! - [`link`]: what one reply does in the database;
//! - [`metrics`]: the Prometheus metrics.

pub mod link;
pub mod metrics;
pub mod replies;

use std::net::SocketAddr;

use deadpool_postgres::Pool;
use lc_shared::amqp::BrokerLink;
use lc_shared::shutdown::Shutdown;
use lc_shared::topology;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use crate::relay::RelayMetrics;
use crate::runtime::config::{StartError, WorkerArgs};
use crate::runtime::consumer::{self, ConsumerSettings};
use crate::runtime::db_probe::DbProbe;
use crate::runtime::process::{self, ExtraChecks};
use metrics::CorrelatorMetrics;

/// Settings of the `correlator` binary.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "correlator",
    version,
    about = "Joins login_ids to PSIDs when people reply, and announces each link (identity.linked)."
)]
pub struct CorrelatorConfig {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub worker: WorkerArgs,

    /// Address of the `/metrics`, `/healthz`, `/readyz` endpoints.
    #[arg(
        long = "metrics-addr",
        env = "METRICS_ADDR",
        default_value = "0.0.0.0:9102"
    )]
    pub metrics_addr: SocketAddr,

    /// `prior_message.source` values that may link a login_id, comma-separated (compared
    /// exactly, after trimming spaces). Replies naming a login_id with any other source, or
    /// with none, are never linked: counted, logged and kept in `foreign_prior_messages`.
    #[arg(
        long = "link-sources",
        env = "CORRELATOR_LINK_SOURCES",
        value_delimiter = ',',
        default_value = link::DEFAULT_LINK_SOURCE,
        value_parser = link::parse_link_source,
    )]
    pub link_sources: Vec<String>,

    /// Consumer loops of `correlator.replies` in this process (1 to 64), each on its own AMQP
    /// channel with its own prefetch (`CONSUMER_PREFETCH` each), committing its batches on a
    /// pooled database connection of its own: batches commit concurrently, as they do across
    /// replicas. Must stay below `DATABASE_POOL_SIZE` (the relay and `/readyz` need one too).
    /// Unset: [`DEFAULT_CONSUMER_CONCURRENCY`], lowered to fit the pool (see
    /// [`CorrelatorConfig::consumer_loops`]).
    #[arg(
        long = "consumer-concurrency",
        env = "CONSUMER_CONCURRENCY",
        value_parser = clap::value_parser!(u16).range(1..=64),
    )]
    pub consumer_concurrency: Option<u16>,
}

/// Consumer loops per correlator process unless `CONSUMER_CONCURRENCY` says otherwise: one
/// loop spends most of its time waiting for its commit, so a few keep the database busy.
pub const DEFAULT_CONSUMER_CONCURRENCY: u16 = 4;

impl CorrelatorConfig {
    /// The consumer loops this process runs: `CONSUMER_CONCURRENCY` when set; otherwise
    /// [`DEFAULT_CONSUMER_CONCURRENCY`] lowered to leave one pooled connection to the relay
    /// (at least one loop), so a deployment that set a small `DATABASE_POOL_SIZE` before
    /// the setting existed still starts.
    pub fn consumer_loops(&self) -> usize {
        let pool = self.worker.database.database_pool_size;
        match self.consumer_concurrency {
            Some(n) => usize::from(n),
            None => usize::from(DEFAULT_CONSUMER_CONCURRENCY).min(pool.saturating_sub(1).max(1)),
        }
    }

    /// Refuses a concurrency set explicitly that the database pool cannot serve: each loop
    /// holds a connection while it commits, and the relay and the database probe need one
    /// too, so loops beyond that would only wait for connections (and starve the relay).
    pub fn validate(&self) -> Result<(), StartError> {
        let loops = self.consumer_loops();
        let pool = self.worker.database.database_pool_size;
        if self.consumer_concurrency.is_some() && loops >= pool {
            return Err(StartError::Config(format!(
                "CONSUMER_CONCURRENCY ({loops}) must be below DATABASE_POOL_SIZE ({pool}): each \
                 consumer loop holds a database connection while it commits and the outbox \
                 relay needs one too; raise DATABASE_POOL_SIZE or lower CONSUMER_CONCURRENCY"
            )));
        }
        Ok(())
    }
}

/// A running correlator.
pub struct RunningCorrelator {
    /// Completes when everything has stopped after `shutdown`.
    pub task: JoinHandle<()>,
    /// Address of its metrics endpoint (useful with port 0).
    pub metrics_addr: SocketAddr,
    /// Its database pool.
    pub pool: Pool,
    /// Its broker link (tests wait for it to be ready before publishing).
    pub broker: BrokerLink,
    /// Its metrics.
    pub metrics: CorrelatorMetrics,
}

/// Starts the correlator: returns once the database is ready and migrated; the consumer loops,
/// the outbox relay and the metrics server run in the background until `shutdown`, when the
/// consumer stops taking deliveries, the batch in hand and the relay's round finish, and the
/// broker connection closes.
pub async fn start(
    config: CorrelatorConfig,
    metrics_listener: TcpListener,
    shutdown: Shutdown,
) -> Result<RunningCorrelator, StartError> {
    config.validate()?;
    let worker_id = config.worker.worker_id("correlator");
    let pool = config.worker.prepare_database().await?;
    let link = config.worker.broker(&worker_id)?;
    let registry = prometheus::Registry::new();
    let metrics = CorrelatorMetrics::new(&registry)?;
    let relay_metrics = RelayMetrics::new(&registry)?;
    let metrics_addr = metrics_listener.local_addr()?;
    let sources = link::LinkSources::new(&config.link_sources);
    tracing::info!(link_sources = ?config.link_sources, consumer_loops = config.consumer_loops(), "prior_message sources that may link");

    let mut tasks = JoinSet::new();
    {
        let settings = ConsumerSettings {
            queue: topology::CORRELATOR_QUEUE,
            prefetch: config.worker.prefetch,
            max_batch: config.worker.consumer_batch,
            tag: worker_id.clone(),
        };
        let (pool, metrics) = (pool.clone(), metrics.clone());
        let sources = sources.clone();
        consumer::spawn_supervised_loops(
            &mut tasks,
            &registry,
            &link,
            settings,
            config.consumer_loops(),
            &shutdown,
            move |batch| {
                let (pool, metrics, sources) = (pool.clone(), metrics.clone(), sources.clone());
                async move { replies::handle_batch(&pool, &metrics, &sources, &batch).await }
            },
        )?;
    }
    process::spawn_relay(
        &mut tasks,
        &pool,
        &config.worker,
        &link,
        relay_metrics,
        &shutdown,
    )?;
    let database = DbProbe::spawn(
        &mut tasks,
        pool.clone(),
        &config.worker.database.database_url,
        &shutdown,
    );
    let checks = ExtraChecks {
        database: Some(database),
        graph: None,
    };
    process::spawn_http_with(
        &mut tasks,
        metrics_listener,
        registry,
        &link,
        &shutdown,
        checks,
    );
    tracing::info!(worker_id, %metrics_addr, "correlator started");
    let task = process::supervise(tasks, link.clone(), "correlator");
    Ok(RunningCorrelator {
        task,
        metrics_addr,
        pool,
        broker: link,
        metrics,
    })
}

/// Binds `config.metrics_addr` and runs until `shutdown` has drained everything.
pub async fn run(config: CorrelatorConfig, shutdown: Shutdown) -> Result<(), StartError> {
    let listener = crate::runtime::http::bind(config.metrics_addr).await?;
    let running = start(config, listener, shutdown).await?;
    let _ = running.task.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn config(args: &[&str]) -> CorrelatorConfig {
        let mut argv = vec!["correlator", "--database-url", "postgres://x@127.0.0.1/x"];
        argv.extend_from_slice(args);
        CorrelatorConfig::try_parse_from(argv).expect("parses")
    }

    /// A deployment that set a small pool before `CONSUMER_CONCURRENCY` existed still
    /// starts (the default fits the pool); only an explicit value is refused.
    #[test]
    fn the_default_loops_fit_the_pool_and_only_an_explicit_value_is_refused() {
        let small = config(&["--database-pool-size", "4"]);
        assert_eq!(small.consumer_loops(), 3);
        assert!(small.validate().is_ok());
        let tiny = config(&["--database-pool-size", "1"]);
        assert_eq!(tiny.consumer_loops(), 1);
        assert!(tiny.validate().is_ok());
        let default = config(&[]);
        assert_eq!(
            default.consumer_loops(),
            usize::from(DEFAULT_CONSUMER_CONCURRENCY)
        );
        let explicit = config(&["--database-pool-size", "4", "--consumer-concurrency", "4"]);
        let err = explicit.validate().expect_err("refused").to_string();
        assert!(err.contains("CONSUMER_CONCURRENCY (4)"), "{err}");
    }
}
