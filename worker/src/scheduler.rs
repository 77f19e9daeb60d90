//! The scheduler: every opt-in gets its first message before its deadline, at most once.
//!
//! - [`intake`] consumes `scheduler.optins` and records opt-ins idempotently;
//! - [`dispatch`] claims due rows earliest deadline first under fenced leases and calls the
//!   Send API, classifying answers into sent / retry / failed / expired;
//! - [`store`] holds all of the scheduler's SQL (with [`store::record`], recording opt-ins;
//!   [`store::call_start`], the last checks and the "call started" mark before each call;
//!   [`store::rescue`], expired leases and pruning; [`store::gauges`], the state gauges;
//!   [`store::claim`], claims with their send slots; [`store::pages`], the shared page state);
//!   [`group_commit`] commits many send tasks' writes together; [`retry`] the backoff;
//!   [`pacing`] this replica's view of the cluster's page pauses and throttles (the send
//!   budget itself is taken in the claim, [`store::claim`]); [`metrics`] the metrics.
//! - [`config`] the binary's settings; [`housekeeping`] state gauges and pruning;
//!   [`reload`] the pages (the registry, with the pages file imported into it, and stored
//!   tokens) kept current, and the shared page state synced; [`tokens`] page tokens encrypted at rest.
//!
//! Beside the scheduler's own work its process runs the webhook-subscription
//! [`crate::watchdog`], the data [`crate::deletion`] consumer and the refresh of the
//! [`crate::funnel`] gauges.
//!
//! Rules: the deadline is the opt-in's own timestamp + 24 h; no call starts at or after the
//! deadline minus a safety margin; opt-ins for the same (page, login_id) inside an existing
//! window are the same opt-in; a reply processed first (a link exists) means nothing is sent.

pub mod config;
pub mod dispatch;
pub mod group_commit;
pub mod housekeeping;
pub mod intake;
pub mod metrics;
pub mod pacing;
pub mod reload;
pub mod retry;
pub mod store;
pub mod tokens;

use std::net::SocketAddr;
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

use crate::runtime::config::StartError;
use crate::runtime::consumer::{self, ConsumerSettings};
use crate::runtime::db_probe::DbProbe;
use crate::runtime::process::{self, ExtraChecks};
use crate::{deletion, watchdog};
pub use config::SchedulerConfig;
use dispatch::{AfterSendHook, DispatchSettings, Dispatcher};
use metrics::SchedulerMetrics;
use pacing::PageHolds;
use reload::PageSource;
use retry::RetryPolicy;

/// A running scheduler.
pub struct RunningScheduler {
    /// Address of its metrics endpoint.
    pub metrics_addr: SocketAddr,
    /// Its database pool.
    pub pool: Pool,
    /// The pages it sends for now (its view of the registry).
    pub pages: Arc<RwLock<Arc<PagesConfig>>>,
    /// Completes when it has stopped. Aborting it stops every task at once (like a crash).
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts the scheduler: returns once the pages file (if any) is valid and imported, and the
/// database is migrated;
/// the consumer, dispatcher, relay and metrics server run in the background until `shutdown`.
pub async fn start(
    config: SchedulerConfig,
    metrics_listener: TcpListener,
    shutdown: Shutdown,
    after_send: Option<AfterSendHook>,
) -> Result<RunningScheduler, StartError> {
    config.validate()?;
    let keys = tokens::TokenKeys::parse(&config.page_token_keys)
        .map_err(|e| StartError::Config(e.to_string()))?;
    // The file is checked before anything else starts, so a bad one stops the process at once.
    if let Some(file) = &config.pages_file {
        PagesConfig::load(file).map_err(|e| StartError::Config(e.to_string()))?;
    }
    let graph = GraphClient::new(
        &config.graph_api_url,
        Duration::from_millis(config.graph_timeout_ms),
    )
    .map_err(|e| StartError::Config(e.to_string()))?;
    let watchdog_graph = graph.clone();
    let graph_reach = graph.reach();
    let worker_id = config.worker.worker_id("scheduler");
    let pool = config.worker.prepare_database().await?;
    let link = config.worker.broker(&worker_id)?;
    let registry = prometheus::Registry::new();
    let metrics = SchedulerMetrics::new(&registry)?;
    let relay_metrics = crate::relay::RelayMetrics::new(&registry)?;
    let watchdog_metrics = watchdog::WatchdogMetrics::new(&registry)?;
    let deletion_metrics = deletion::DeletionMetrics::new(&registry)?;
    let funnel_metrics = crate::funnel::metrics::FunnelMetrics::new(&registry)?;
    let metrics_addr = metrics_listener.local_addr()?;
    let source = PageSource {
        path: config.pages_file.clone(),
        keys,
        rate_limit: config.page_rate_limit,
    };
    let pages = source.load(&pool).await.map_err(StartError::Config)?;
    if let Some((Some(app_id), _)) = config.watchdog.enabled() {
        // Shared through the database, so the correlator's events carry the same `appid`.
        let client = pool
            .get()
            .await
            .map_err(|e| StartError::Config(e.to_string()))?;
        store::pages::set_meta_app_id(&client, &app_id)
            .await
            .map_err(|e| StartError::Config(format!("cannot record META_APP_ID: {e}")))?;
    }

    for page in &pages.pages {
        metrics
            .paused_pages
            .with_label_values(&[page.id.as_str()])
            .set(0);
        // Zero series per page too, so the "subscription lost" alert sees the change to 1.
        metrics
            .unsubscribed_pages
            .with_label_values(&[page.id.as_str()]);
    }
    let pages = Arc::new(RwLock::new(Arc::new(pages)));
    let holds = Arc::new(PageHolds::default());
    let wake = Arc::new(Notify::new());
    let timing = config.timing();
    let dispatcher = Dispatcher::new(
        pool.clone(),
        graph,
        pages.clone(),
        holds.clone(),
        metrics.clone(),
        DispatchSettings {
            owner: worker_id.clone(),
            lease: Duration::from_secs(config.lease_secs),
            graph_timeout: Duration::from_millis(config.graph_timeout_ms),
            lookahead: config.lookahead(),
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
        consumer::spawn_supervised(
            &mut tasks,
            &registry,
            &link,
            settings,
            &shutdown,
            move |batch| {
                let (pool, pages, metrics, wake) =
                    (pool.clone(), pages.clone(), metrics.clone(), wake.clone());
                async move { intake::record_batch(&pool, &pages, &timing, &metrics, &wake, batch).await }
            },
        )?;
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
    deletion::spawn(
        &mut tasks,
        &registry,
        pool.clone(),
        &link,
        deletion_metrics,
        &worker_id,
        &shutdown,
    )?;
    process::spawn_relay(
        &mut tasks,
        &pool,
        &config.worker,
        &link,
        relay_metrics,
        &shutdown,
    )?;
    tasks.spawn(housekeeping::run(
        pool.clone(),
        link.clone(),
        metrics.clone(),
        config.retention(),
        shutdown.clone(),
    ));
    tasks.spawn(crate::funnel::metrics::run(
        pool.clone(),
        funnel_metrics,
        shutdown.clone(),
    ));
    tasks.spawn(pacing::refresh(
        pool.clone(),
        holds,
        metrics.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(reload::watch(
        source,
        pool.clone(),
        pages.clone(),
        metrics,
        shutdown.clone(),
    ));
    let database = DbProbe::spawn(
        &mut tasks,
        pool.clone(),
        &config.worker.database.database_url,
        &shutdown,
    );
    // Graph is an advisory check: when Graph is down every replica sees it alike, and taking
    // the scheduler out of service (or restarting it) would not bring Graph back — it would
    // only stop the work that needs no Graph: intake, expiring what can no longer be sent,
    // data deletions, the relay. So `/readyz` stays 200, says `degraded` and
    // why, and sends are retried with backoff until their deadline meanwhile.
    let checks = ExtraChecks {
        database: Some(database),
        graph: Some(graph_reach),
    };
    process::spawn_http_with(
        &mut tasks,
        metrics_listener,
        registry,
        &link,
        &shutdown,
        checks,
    );
    tracing::info!(worker_id, %metrics_addr, "scheduler started");
    let task = process::supervise(tasks, link, "scheduler");
    Ok(RunningScheduler {
        metrics_addr,
        pool,
        pages,
        task,
    })
}

/// Binds the metrics address and runs until `shutdown` has drained everything.
pub async fn run(config: SchedulerConfig, shutdown: Shutdown) -> Result<(), StartError> {
    let listener = crate::runtime::http::bind(config.metrics_addr).await?;
    let running = start(config, listener, shutdown, None).await?;
    let _ = running.task.await;
    Ok(())
}
