//! Arguments every worker binary shares, and the start-up steps they share.

use std::time::Duration;

use deadpool_postgres::Pool;
use lc_shared::amqp::BrokerLink;
use lc_shared::config::{AmqpArgs, DatabaseArgs, LogArgs};
use lc_shared::db;

/// Settings common to the scheduler and the correlator.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub amqp: AmqpArgs,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub log: LogArgs,

    /// Apply database migrations at start-up (under a lock, so replicas may start together).
    #[arg(long = "migrate-on-start", env = "MIGRATE_ON_START", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate_on_start: bool,

    /// Name of this replica in leases, logs and the broker UI (default: host-pid-random).
    #[arg(long = "worker-id", env = "WORKER_ID")]
    pub worker_id: Option<String>,

    /// AMQP prefetch of the work-queue consumer.
    #[arg(long, env = "CONSUMER_PREFETCH", default_value_t = 200)]
    pub prefetch: u16,

    /// Most deliveries committed in one database transaction.
    #[arg(long = "consumer-batch", env = "CONSUMER_BATCH", default_value_t = 100)]
    pub consumer_batch: usize,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub relay: RelayArgs,
}

/// Settings of the outbox relay that runs inside every worker.
#[derive(Debug, Clone, clap::Args)]
pub struct RelayArgs {
    /// Outbox rows claimed and published per round.
    #[arg(long = "relay-batch", env = "RELAY_BATCH", default_value_t = 200)]
    pub relay_batch: i64,

    /// Polling interval when no notification arrives (milliseconds).
    #[arg(long = "relay-poll-ms", env = "RELAY_POLL_MS", default_value_t = 1000)]
    pub relay_poll_ms: u64,

    /// Bound on waiting for the broker's confirms of one round (milliseconds).
    #[arg(
        long = "relay-confirm-timeout-ms",
        env = "RELAY_CONFIRM_TIMEOUT_MS",
        default_value_t = 5000
    )]
    pub relay_confirm_timeout_ms: u64,

    /// Delete published rows older than this many hours (0 keeps them).
    #[arg(
        long = "outbox-retention-hours",
        env = "OUTBOX_RETENTION_HOURS",
        default_value_t = 72
    )]
    pub outbox_retention_hours: u64,
}

impl RelayArgs {
    /// Polling interval as a duration.
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.relay_poll_ms)
    }

    /// Confirm bound as a duration.
    pub fn confirm_timeout(&self) -> Duration {
        Duration::from_millis(self.relay_confirm_timeout_ms)
    }
}

/// How long a worker's start waits for a database that does not answer yet before it gives
/// up (managed PostgreSQL failovers take from seconds to about two minutes).
pub const DATABASE_START_WAIT: Duration = Duration::from_secs(120);

/// Errors of the start-up steps shared by the workers.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The database could not be prepared.
    #[error(transparent)]
    Db(#[from] db::DbError),
    /// The metrics listener could not be bound.
    #[error("{0}")]
    Listen(#[from] std::io::Error),
    /// Metrics could not be registered.
    #[error("metrics registry error: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl WorkerArgs {
    /// This replica's id.
    pub fn worker_id(&self, role: &str) -> String {
        self.worker_id.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
            format!(
                "{role}-{host}-{}-{}",
                std::process::id(),
                &uuid::Uuid::new_v4().simple().to_string()[..6]
            )
        })
    }

    /// Creates the database if needed, builds the pool and applies migrations (if enabled).
    ///
    /// A database that is not reachable yet is waited for, up to [`DATABASE_START_WAIT`]:
    /// a replica restarted during a failover or while the server restarts (the fault suite's
    /// database failover restarted a correlator 0.5 s after the primary was killed, and it
    /// exited six times before the standby was promoted) comes up once the database does,
    /// instead of exiting. Errors only a change of configuration cures end the start at once.
    pub async fn prepare_database(&self) -> Result<Pool, StartError> {
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(200);
        loop {
            match self.prepare_database_once().await {
                Err(StartError::Db(e))
                    if e.is_transient() && started.elapsed() + pause < DATABASE_START_WAIT =>
                {
                    tracing::warn!(
                        error = %e,
                        retry_in_ms = pause.as_millis() as u64,
                        waited_s = started.elapsed().as_secs(),
                        limit_s = DATABASE_START_WAIT.as_secs(),
                        "the database is not reachable yet; retrying (a failover or a server still starting?)"
                    );
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                other => return other,
            }
        }
    }

    async fn prepare_database_once(&self) -> Result<Pool, StartError> {
        db::ensure_database(&self.database.database_url).await?;
        db::refuse_transaction_pooling(&self.database.database_url).await?;
        let pool = db::pool(
            &self.database.database_url,
            self.database.database_pool_size,
        )?;
        if self.migrate_on_start {
            let applied = db::migrate(&pool).await?;
            if !applied.is_empty() {
                tracing::info!(?applied, "database migrations applied");
            }
        }
        Ok(pool)
    }

    /// Starts the supervised broker link; a TLS setting that cannot be used stops the
    /// start-up here.
    pub fn broker(&self, worker_id: &str) -> Result<BrokerLink, StartError> {
        let endpoint = self
            .amqp
            .endpoint()
            .map_err(|e| StartError::Config(e.to_string()))?;
        Ok(BrokerLink::start(endpoint, worker_id, 8))
    }
}
