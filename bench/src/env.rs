//! A scratch environment per suite: a RabbitMQ vhost and a PostgreSQL database from
//! `lc_testkit::harness` (removed on drop), the fake Graph, a pages file with several pages
//! (one page is capped at `PAGE_RATE_LIMIT` calls/s, so throughput runs spread over many), and
//! the services started in-process with their production defaults.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use deadpool_postgres::Pool;
use lapin::options::QueuePurgeOptions;
use lc_ingest::{IngestConfig, RunningIngest};
use lc_shared::shutdown::Shutdown;
use lc_testkit::fake_graph::FakeGraph;
use lc_testkit::harness::{TestDb, TestVhost};
use lc_worker::correlator::{CorrelatorConfig, RunningCorrelator};
use lc_worker::scheduler::{RunningScheduler, SchedulerConfig};

/// App secret the bench's ingest accepts.
pub const APP_SECRET: &str = "bench-app-secret";

/// A running service and the handle that stops it.
pub struct Running<T> {
    /// The service.
    pub service: T,
    /// Fires its graceful shutdown.
    pub shutdown: Shutdown,
}

/// One suite's services and scratch resources.
pub struct BenchEnv {
    /// The vhost (deleted on drop).
    pub vhost: TestVhost,
    /// The database (dropped on drop).
    pub db: TestDb,
    /// The fake Graph, with every page of [`BenchEnv::pages`] configured.
    pub graph: FakeGraph,
    /// Page ids configured in the pages file and the fake Graph.
    pub pages: Vec<String>,
    /// The pages file (deleted on drop).
    pub pages_file: PathBuf,
}

impl BenchEnv {
    /// Creates a vhost, a database, the fake Graph and a pages file with `pages` pages.
    pub async fn new(pages: usize) -> anyhow::Result<Self> {
        let vhost = TestVhost::create();
        let db = TestDb::create().await;
        let graph = FakeGraph::start().await;
        let pages: Vec<String> = (0..pages.max(1))
            .map(|i| format!("{}", 900_000_000_000_000u64 + i as u64))
            .collect();
        let mut text = String::new();
        for page in &pages {
            graph.add_page(page, &token(page));
            text.push_str(&format!(
                "[[pages]]\nid = \"{page}\"\naccess_token = \"{}\"\n[pages.first_message]\n\
                 text = \"Thanks for signing up! What can we help you with?\"\n\
                 quick_replies = [\n  {{ title = \"Track my order\", payload = \"TRACK\" }},\n  \
                 {{ title = \"Talk to an agent\", payload = \"AGENT\" }},\n]\n\n",
                token(page)
            ));
        }
        let pages_file = std::env::temp_dir().join(format!("{}-pages.toml", db.name));
        std::fs::write(&pages_file, text).context("writing the pages file")?;
        Ok(Self {
            vhost,
            db,
            graph,
            pages,
            pages_file,
        })
    }

    /// A pool on the scratch database with the schema migrated.
    pub async fn migrated_pool(&self, size: usize) -> anyhow::Result<Pool> {
        let pool = lc_shared::db::pool(&self.db.url(), size)?;
        lc_shared::db::migrate(&pool).await?;
        Ok(pool)
    }

    /// A plain connection to the scratch database.
    pub async fn sql(&self) -> anyhow::Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.db.url(), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// Scheduler settings: the production defaults (as the binary parses them) pointed at
    /// this environment. Callers adjust fields for a run.
    pub fn scheduler_config(&self) -> anyhow::Result<SchedulerConfig> {
        let pages = self.pages_file.display().to_string();
        let graph = self.graph.base_url();
        let amqp = self.vhost.url();
        let db = self.db.url();
        Ok(SchedulerConfig::try_parse_from([
            "scheduler",
            "--pages-file",
            pages.as_str(),
            "--graph-api-url",
            graph.as_str(),
            "--metrics-addr",
            "127.0.0.1:0",
            "--amqp-url",
            amqp.as_str(),
            "--database-url",
            db.as_str(),
        ])?)
    }

    /// Ingest settings: production defaults, on port 0 of this vhost.
    pub fn ingest_config(&self) -> anyhow::Result<IngestConfig> {
        let amqp = self.vhost.url();
        Ok(IngestConfig::try_parse_from([
            "ingest",
            "--addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--app-secrets",
            APP_SECRET,
            "--verify-token",
            "bench-verify",
            "--amqp-url",
            amqp.as_str(),
        ])?)
    }

    /// Correlator settings: production defaults pointed at this environment.
    pub fn correlator_config(&self) -> anyhow::Result<CorrelatorConfig> {
        let amqp = self.vhost.url();
        let db = self.db.url();
        Ok(CorrelatorConfig::try_parse_from([
            "correlator",
            "--metrics-addr",
            "127.0.0.1:0",
            "--amqp-url",
            amqp.as_str(),
            "--database-url",
            db.as_str(),
        ])?)
    }

    /// Starts ingest and waits until it is connected to the broker.
    pub async fn start_ingest(
        &self,
        config: IngestConfig,
    ) -> anyhow::Result<Running<RunningIngest>> {
        let shutdown = Shutdown::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let service = lc_ingest::start(config, listener, shutdown.clone()).await?;
        service
            .broker
            .wait_ready(Duration::from_secs(20))
            .await
            .context("ingest did not connect to RabbitMQ")?;
        Ok(Running { service, shutdown })
    }

    /// Starts the scheduler.
    pub async fn start_scheduler(
        &self,
        config: SchedulerConfig,
    ) -> anyhow::Result<Running<RunningScheduler>> {
        let shutdown = Shutdown::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let service = lc_worker::scheduler::start(config, listener, shutdown.clone(), None).await?;
        Ok(Running { service, shutdown })
    }

    /// Starts the correlator.
    pub async fn start_correlator(
        &self,
        config: CorrelatorConfig,
    ) -> anyhow::Result<Running<RunningCorrelator>> {
        let shutdown = Shutdown::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let service = lc_worker::correlator::start(config, listener, shutdown.clone()).await?;
        Ok(Running { service, shutdown })
    }

    /// A connection to the vhost with the topology declared.
    pub async fn broker(&self) -> anyhow::Result<lapin::Connection> {
        let conn = lc_shared::amqp::connect(&self.vhost.url(), "bench").await?;
        let channel = conn.create_channel().await?;
        lc_shared::topology::declare(&channel).await?;
        let _ = channel.close(200, "declared".into()).await;
        Ok(conn)
    }

    /// Empties the work queues (between load levels, so the broker is measured in the same
    /// state each time).
    pub async fn purge_work_queues(&self, conn: &lapin::Connection) -> anyhow::Result<()> {
        let channel = conn.create_channel().await?;
        for (queue, _) in lc_shared::topology::WORK_QUEUES {
            channel
                .queue_purge(queue.into(), QueuePurgeOptions::default())
                .await?;
        }
        let _ = channel.close(200, "purged".into()).await;
        Ok(())
    }
}

impl Drop for BenchEnv {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.pages_file);
    }
}

/// The access token of a bench page.
pub fn token(page: &str) -> String {
    format!("EAAG-bench-{page}")
}

/// Stops a service: fires its shutdown and waits (bounded) for its task.
pub async fn stop<T>(shutdown: &Shutdown, task: tokio::task::JoinHandle<T>) {
    shutdown.trigger();
    let abort = task.abort_handle();
    if tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .is_err()
    {
        abort.abort();
    }
}

/// Gives `pages` a state row with an unlimited send budget (rows already there keep theirs:
/// a scheduler started by the suite writes its own `PAGE_RATE_LIMIT`).
pub async fn unlimited_pages(sql: &tokio_postgres::Client, pages: &[String]) -> anyhow::Result<()> {
    sql.execute(
        "INSERT INTO page_state (page_id, rate_limit) SELECT unnest($1::text[]), 0 \
         ON CONFLICT (page_id) DO NOTHING",
        &[&pages],
    )
    .await
    .map_err(|e| anyhow::anyhow!("page state: {e}"))?;
    Ok(())
}
