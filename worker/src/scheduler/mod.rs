//! The scheduler: every opt-in gets its first message before its deadline, at most once.
//!
//! - [`intake`] consumes `scheduler.optins` and records opt-ins idempotently;
//! - [`dispatch`] claims due rows earliest deadline first under fenced leases and calls the
//!   Send API, classifying answers into sent / retry / failed / expired;
//! - [`store`] holds the SQL; [`call_start`] the last checks and the "call started" mark
//!   before each call; [`group_commit`] commits many send tasks' writes together;
//!   [`rescue`] resolves expired leases; [`retry`] the backoff;
//!   [`pacing`] per-page rate limits and
//!   pauses; [`metrics`] the Prometheus metrics.
//! - [`watchdog`] re-subscribes pages whose webhook subscription Meta dropped (one active
//!   replica at a time); [`deletion`] carries out user data deletion requests.
//!
//! Rules: the deadline is the opt-in's own timestamp + 24 h; no call starts at or after the
//! deadline minus a safety margin; opt-ins for the same (page, login_id) inside an existing
//! window are the same opt-in; a reply processed first (a link exists) means nothing is sent.

pub mod call_start;
pub mod deletion;
pub mod dispatch;
pub mod group_commit;
pub mod intake;
pub mod metrics;
pub mod pacing;
pub mod rescue;
pub mod retry;
pub mod store;
pub mod watchdog;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::graph::GraphClient;
use deadpool_postgres::Pool;
use lc_meta::pages::PagesConfig;
use lc_shared::shutdown::Shutdown;
use lc_shared::topology;
use tokio::net::TcpListener;
use tokio::sync::{Notify, RwLock};
use tokio::task::JoinSet;

use crate::config::{StartError, WorkerArgs};
use crate::consumer::{self, ConsumerSettings};
use dispatch::{AfterSendHook, DispatchSettings, Dispatcher};
use metrics::SchedulerMetrics;
use pacing::PagePauses;
use retry::RetryPolicy;
use store::{Timing, UnknownOutcome};

/// Settings of the `scheduler` binary.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "scheduler",
    version,
    about = "Sends every opted-in person one first message before the 24-hour deadline."
)]
pub struct SchedulerConfig {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub worker: WorkerArgs,

    /// Address of the `/metrics`, `/healthz`, `/readyz` endpoints.
    #[arg(
        long = "metrics-addr",
        env = "METRICS_ADDR",
        default_value = "0.0.0.0:9101"
    )]
    pub metrics_addr: SocketAddr,

    /// TOML file of the pages this deployment messages for (see the README).
    #[arg(long = "pages-file", env = "PAGES_FILE")]
    pub pages_file: PathBuf,

    /// Graph API base URL including the version.
    #[arg(long = "graph-api-url", env = "GRAPH_API_URL", default_value = lc_shared::config::DEFAULT_GRAPH_API_URL)]
    pub graph_api_url: String,

    /// Timeout of one Send API call (milliseconds).
    #[arg(
        long = "graph-timeout-ms",
        env = "GRAPH_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub graph_timeout_ms: u64,

    /// Delay between the opt-in and the first message (seconds).
    #[arg(long = "send-delay-secs", env = "SEND_DELAY_SECS", default_value_t = 0)]
    pub send_delay_secs: u64,

    /// No Send API call starts this close to the deadline (seconds).
    #[arg(
        long = "safety-margin-secs",
        env = "SAFETY_MARGIN_SECS",
        default_value_t = 120
    )]
    pub safety_margin_secs: u64,

    /// Length of the first-message window (seconds); Meta's rule is 24 hours.
    #[arg(
        long = "window-secs",
        env = "WINDOW_SECS",
        default_value_t = 86_400,
        hide = true
    )]
    pub window_secs: u64,

    /// Most Send API calls in flight in this replica.
    #[arg(
        long = "max-in-flight",
        env = "MAX_IN_FLIGHT_SENDS",
        default_value_t = 256
    )]
    pub max_in_flight: usize,

    /// Send API calls per second per page (Meta allows 300).
    #[arg(
        long = "page-rate-limit",
        env = "PAGE_RATE_LIMIT",
        default_value_t = 250
    )]
    pub page_rate_limit: u32,

    /// Lease of a claimed opt-in (seconds); must exceed the Graph timeout.
    #[arg(long = "lease-secs", env = "LEASE_SECS", default_value_t = 60)]
    pub lease_secs: u64,

    /// Rows claimed per query.
    #[arg(long = "claim-batch", env = "CLAIM_BATCH", default_value_t = 100)]
    pub claim_batch: i64,

    /// Poll interval for later sends and lease rescue (milliseconds).
    #[arg(long = "poll-ms", env = "SCHEDULER_POLL_MS", default_value_t = 1000)]
    pub poll_ms: u64,

    /// First retry delay ceiling (milliseconds); doubles per attempt, fully jittered.
    #[arg(long = "retry-base-ms", env = "RETRY_BASE_MS", default_value_t = 2000)]
    pub retry_base_ms: u64,

    /// Largest retry delay ceiling (seconds).
    #[arg(long = "retry-cap-secs", env = "RETRY_CAP_SECS", default_value_t = 900)]
    pub retry_cap_secs: u64,

    /// Draw retry delays uniformly below the ceiling (full jitter). Tests turn it off to see
    /// the exponential ceilings themselves.
    #[arg(long = "retry-jitter", env = "RETRY_JITTER", default_value_t = true, action = clap::ArgAction::Set, hide = true)]
    pub retry_jitter: bool,

    /// Attempts after which unknown Graph error codes stop being retried.
    #[arg(
        long = "max-unknown-attempts",
        env = "MAX_UNKNOWN_ATTEMPTS",
        default_value_t = 5
    )]
    pub max_unknown_attempts: i32,

    /// Attempts after which any opt-in gives up.
    #[arg(long = "max-attempts", env = "MAX_ATTEMPTS", default_value_t = 50)]
    pub max_attempts: i32,

    /// What a claim whose lease expired becomes: `fail` (never twice; default) or `retry`.
    #[arg(long = "unknown-outcome", env = "UNKNOWN_OUTCOME", value_enum, default_value_t = UnknownOutcome::Fail)]
    pub unknown_outcome: UnknownOutcome,

    /// Delete finished opt-ins after this many days (0 keeps them).
    #[arg(
        long = "retention-days",
        env = "OPTIN_RETENTION_DAYS",
        default_value_t = 30
    )]
    pub retention_days: u64,

    /// The webhook subscription watchdog (off until `META_APP_ID` is set).
    #[command(flatten)]
    pub watchdog: watchdog::WatchdogArgs,
}

impl SchedulerConfig {
    fn timing(&self) -> Timing {
        Timing {
            send_delay: Duration::from_secs(self.send_delay_secs),
            safety_margin: Duration::from_secs(self.safety_margin_secs),
            window: Duration::from_secs(self.window_secs),
        }
    }

    fn validate(&self) -> Result<(), StartError> {
        if self.lease_secs * 1000 <= self.graph_timeout_ms {
            return Err(StartError::Config(format!(
                "LEASE_SECS ({}) must be longer than GRAPH_TIMEOUT_MS ({} ms), or a slow call would look like a dead worker",
                self.lease_secs, self.graph_timeout_ms
            )));
        }
        if self.safety_margin_secs >= self.window_secs {
            return Err(StartError::Config(
                "SAFETY_MARGIN_SECS must be shorter than the 24-hour window".into(),
            ));
        }
        Ok(())
    }
}

/// A running scheduler.
pub struct RunningScheduler {
    /// Address of its metrics endpoint.
    pub metrics_addr: SocketAddr,
    /// Its database pool.
    pub pool: Pool,
    /// Completes when it has stopped. Aborting it stops every task at once (like a crash).
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts the scheduler: returns once the pages file is valid and the database is migrated;
/// the consumer, dispatcher, relay and metrics server run in the background until `shutdown`.
pub async fn start(
    config: SchedulerConfig,
    metrics_listener: TcpListener,
    shutdown: Shutdown,
    after_send: Option<AfterSendHook>,
) -> Result<RunningScheduler, StartError> {
    config.validate()?;
    let pages =
        PagesConfig::load(&config.pages_file).map_err(|e| StartError::Config(e.to_string()))?;
    let graph = GraphClient::new(
        &config.graph_api_url,
        Duration::from_millis(config.graph_timeout_ms),
    )
    .map_err(|e| StartError::Config(e.to_string()))?;
    let watchdog_graph = graph.clone();
    let worker_id = config.worker.worker_id("scheduler");
    let pool = config.worker.prepare_database().await?;
    let link = config.worker.broker(&worker_id);
    let registry = prometheus::Registry::new();
    let metrics = SchedulerMetrics::new(&registry)?;
    let relay_metrics = crate::relay::RelayMetrics::new(&registry)?;
    let watchdog_metrics = watchdog::WatchdogMetrics::new(&registry)?;
    let deletion_metrics = deletion::DeletionMetrics::new(&registry)?;
    let metrics_addr = metrics_listener.local_addr()?;

    for page in &pages.pages {
        metrics
            .paused_pages
            .with_label_values(&[page.id.as_str()])
            .set(0);
    }
    let pages = Arc::new(RwLock::new(Arc::new(pages)));
    let pauses = Arc::new(PagePauses::default());
    let wake = Arc::new(Notify::new());
    let timing = config.timing();
    let dispatcher = Dispatcher::new(
        pool.clone(),
        graph,
        pages.clone(),
        config.page_rate_limit,
        pauses.clone(),
        metrics.clone(),
        DispatchSettings {
            owner: worker_id.clone(),
            lease: Duration::from_secs(config.lease_secs),
            claim_batch: config.claim_batch.max(1),
            max_in_flight: config.max_in_flight,
            poll_interval: Duration::from_millis(config.poll_ms),
            timing,
            retry: RetryPolicy {
                base: Duration::from_millis(config.retry_base_ms),
                cap: Duration::from_secs(config.retry_cap_secs),
            },
            jitter: config.retry_jitter,
            max_unknown_attempts: config.max_unknown_attempts,
            max_attempts: config.max_attempts,
            unknown_outcome: config.unknown_outcome,
            after_send,
        },
    );

    let mut tasks = JoinSet::new();
    {
        let (pool, pages, metrics, wake) =
            (pool.clone(), pages.clone(), metrics.clone(), wake.clone());
        let settings = ConsumerSettings {
            queue: topology::SCHEDULER_QUEUE,
            prefetch: config.worker.prefetch,
            max_batch: config.worker.consumer_batch,
            tag: worker_id.clone(),
        };
        tasks.spawn(consumer::run(link.clone(), settings, shutdown.clone(), move |batch| {
            let (pool, pages, metrics, wake) = (pool.clone(), pages.clone(), metrics.clone(), wake.clone());
            async move { intake::record_batch(&pool, &pages, &timing, &metrics, &wake, batch).await }
        }));
    }
    tasks.spawn(dispatcher.run(wake, shutdown.clone()));
    tasks.spawn(watchdog::run(
        pool.clone(),
        watchdog_graph,
        pages.clone(),
        config.watchdog.clone(),
        watchdog_metrics,
        shutdown.clone(),
    ));
    tasks.spawn(deletion::run(
        pool.clone(),
        link.clone(),
        deletion_metrics,
        worker_id.clone(),
        shutdown.clone(),
    ));
    crate::process::spawn_relay(
        &mut tasks,
        &pool,
        &config.worker,
        &link,
        relay_metrics,
        &shutdown,
    )?;
    tasks.spawn(housekeeping(
        pool.clone(),
        link.clone(),
        metrics.clone(),
        Duration::from_secs(config.retention_days * 86_400),
        shutdown.clone(),
    ));
    tasks.spawn(reload_on_sighup(
        config.pages_file.clone(),
        pages,
        pauses,
        metrics,
        shutdown.clone(),
    ));
    crate::process::spawn_http(&mut tasks, metrics_listener, registry, &link, &shutdown);
    tracing::info!(worker_id, %metrics_addr, "scheduler started");
    let task = crate::process::supervise(tasks, link, "scheduler");
    Ok(RunningScheduler {
        metrics_addr,
        pool,
        task,
    })
}

/// Binds the metrics address and runs until `shutdown` has drained everything.
pub async fn run(config: SchedulerConfig, shutdown: Shutdown) -> Result<(), StartError> {
    let listener = crate::http::bind(config.metrics_addr).await?;
    let running = start(config, listener, shutdown, None).await?;
    let _ = running.task.await;
    Ok(())
}

/// Refreshes the state gauges and prunes old finished rows.
async fn housekeeping(
    pool: Pool,
    link: lc_shared::amqp::BrokerLink,
    metrics: SchedulerMetrics,
    retention: Duration,
    shutdown: Shutdown,
) {
    // Queue depths need the broker; the first round waits for it (bounded) so the gauges
    // exist soon after start.
    tokio::select! {
        _ = link.wait_ready(Duration::from_secs(30)) => {}
        () = shutdown.wait() => return,
    }
    let mut tick = tokio::time::interval(Duration::from_secs(15));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.wait() => return,
        }
        queue_depths(&link, &metrics).await;
        let Ok(client) = pool.get().await else {
            continue;
        };
        if let Ok(rows) = client
            .query("SELECT state, count(*) FROM optins GROUP BY state", &[])
            .await
        {
            for state in ["pending", "sending", "sent", "replied", "failed", "expired"] {
                metrics.optins_by_state.with_label_values(&[state]).set(0);
            }
            for r in rows {
                let state: String = r.get(0);
                let n: i64 = r.get(1);
                metrics
                    .optins_by_state
                    .with_label_values(&[state.as_str()])
                    .set(n);
            }
        }
        if let Ok(row) = client
            .query_one(
                "SELECT COALESCE(EXTRACT(EPOCH FROM (min(deadline) - now()))::bigint, 0) \
                 FROM optins WHERE state = 'pending'",
                &[],
            )
            .await
        {
            metrics.nearest_deadline.set(row.get::<_, i64>(0));
        }
        if !retention.is_zero() {
            match store::prune_finished(&client, retention, 1000).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "pruned finished opt-ins"),
                Err(e) => tracing::warn!(error = %e, "pruning finished opt-ins failed"),
            }
        }
    }
}

/// Reads queue depths with passive declares (cheap; no consumer needed).
async fn queue_depths(link: &lc_shared::amqp::BrokerLink, metrics: &SchedulerMetrics) {
    let Ok(channel) = link.open_channel().await else {
        return;
    };
    let dlq = topology::dead_letter_queue(topology::SCHEDULER_QUEUE);
    for queue in [topology::SCHEDULER_QUEUE, dlq.as_str()] {
        let declared = channel
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await;
        match declared {
            Ok(q) => metrics
                .queue_ready
                .with_label_values(&[queue])
                .set(i64::from(q.message_count())),
            // A failed passive declare closes the channel; the next round opens another.
            Err(_) => return,
        }
    }
    let _ = channel.close(200, "done".into()).await;
}

/// Re-reads the pages file on SIGHUP; pages whose token changed are resumed.
async fn reload_on_sighup(
    path: PathBuf,
    pages: Arc<RwLock<Arc<PagesConfig>>>,
    pauses: Arc<PagePauses>,
    metrics: SchedulerMetrics,
    shutdown: Shutdown,
) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; page configuration reload disabled");
            return;
        };
        loop {
            tokio::select! {
                _ = hup.recv() => {}
                () = shutdown.wait() => return,
            }
            match PagesConfig::load(&path) {
                Ok(new) => {
                    let old = pages.read().await.clone();
                    for page in &new.pages {
                        let changed = old
                            .get(&page.id)
                            .is_none_or(|o| o.access_token != page.access_token);
                        if changed && pauses.resume(&page.id) {
                            metrics
                                .paused_pages
                                .with_label_values(&[page.id.as_str()])
                                .set(0);
                            tracing::info!(page_id = %page.id, "page token changed; sends resumed");
                        }
                    }
                    *pages.write().await = Arc::new(new);
                    tracing::info!(path = %path.display(), "pages file reloaded");
                }
                Err(e) => {
                    tracing::error!(error = %e, "pages file reload failed; keeping the previous configuration")
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (path, pages, pauses, metrics);
        shutdown.wait().await;
    }
}
