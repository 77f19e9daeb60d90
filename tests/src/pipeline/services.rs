//! Starting and stopping ingest, the scheduler and the correlator in-process against a
//! [`TestEnv`], one at a time or as a [`Pipeline`].

use std::net::SocketAddr;
use std::time::Duration;

use lc_ingest::login::LoginArgs;
use lc_ingest::{IngestConfig, RunningIngest};
use lc_shared::shutdown::Shutdown;
use lc_worker::correlator::RunningCorrelator;
use lc_worker::scheduler::dispatch::AfterSendHook;
use lc_worker::scheduler::{RunningScheduler, SchedulerConfig};
use serde_json::Value;

use super::webhook::{TRACEPARENT, body_at, post_signed_traced};
use super::{PAGE, TestEnv, WAIT, eventually, ingest_config};

/// Entry time of the deliveries [`Pipeline::deliver`] posts. Fixed, so a delivery posted
/// twice is the same bytes, as Meta's redeliveries are.
const DELIVERY_TIME_MS: i64 = 1_700_000_999_000;

impl TestEnv {
    /// Starts ingest on this vhost with [`ingest_config`].
    pub async fn start_ingest(&self) -> (RunningIngest, Shutdown) {
        start_ingest_with(ingest_config(self.vhost.url())).await
    }

    /// Starts a scheduler with `config`.
    pub async fn start_scheduler(&self, config: SchedulerConfig) -> (RunningScheduler, Shutdown) {
        self.start_scheduler_with_hook(config, None).await
    }

    /// Starts a scheduler with a hook inside the crash window.
    pub async fn start_scheduler_with_hook(
        &self,
        config: SchedulerConfig,
        hook: Option<AfterSendHook>,
    ) -> (RunningScheduler, Shutdown) {
        let shutdown = Shutdown::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let running = lc_worker::scheduler::start(config, listener, shutdown.clone(), hook)
            .await
            .expect("start scheduler");
        (running, shutdown)
    }

    /// Starts a correlator with [`TestEnv::correlator_config`] and waits until it is
    /// connected to the broker, so what a test posts next is consumed.
    pub async fn start_correlator(&self) -> (RunningCorrelator, Shutdown) {
        let shutdown = Shutdown::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let running =
            lc_worker::correlator::start(self.correlator_config(), listener, shutdown.clone())
                .await
                .expect("start correlator");
        running
            .broker
            .wait_ready(WAIT)
            .await
            .expect("correlator ready");
        (running, shutdown)
    }

    /// Chooses the services a test runs: ingest always, a scheduler and a correlator on
    /// request. Capture events ([`TestEnv::capture_events`]) before starting, so that none
    /// is missed.
    pub fn pipeline(&self) -> PipelineBuilder<'_> {
        PipelineBuilder {
            env: self,
            ingest: ingest_config(self.vhost.url()),
            scheduler: None,
            correlator: false,
        }
    }

    /// Ingest and a scheduler with `config`: what most scheduler tests run.
    pub async fn start_pipeline(&self, config: SchedulerConfig) -> Pipeline {
        self.pipeline().scheduler(config).start().await
    }
}

/// Starts ingest with `config` on a free port and waits until it is connected to the broker.
pub async fn start_ingest_with(config: IngestConfig) -> (RunningIngest, Shutdown) {
    let shutdown = Shutdown::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let running = lc_ingest::start(config, listener, shutdown.clone())
        .await
        .expect("start ingest");
    running
        .broker
        .wait_ready(Duration::from_secs(10))
        .await
        .expect("ingest connected");
    (running, shutdown)
}

/// The services a test asked for, before they start (see [`TestEnv::pipeline`]).
#[must_use = "nothing runs until `start`"]
pub struct PipelineBuilder<'env> {
    env: &'env TestEnv,
    ingest: IngestConfig,
    scheduler: Option<SchedulerConfig>,
    correlator: bool,
}

impl PipelineBuilder<'_> {
    /// Ingest with the Login half configured as `login`.
    pub fn login(mut self, login: LoginArgs) -> Self {
        self.ingest.login = login;
        self
    }

    /// A scheduler with `config` too.
    pub fn scheduler(mut self, config: SchedulerConfig) -> Self {
        self.scheduler = Some(config);
        self
    }

    /// A correlator too.
    pub fn correlator(mut self) -> Self {
        self.correlator = true;
        self
    }

    /// Starts ingest, then the scheduler, then the correlator (the order the data flows
    /// through them); returns once each has started, ingest and the correlator connected.
    pub async fn start(self) -> Pipeline {
        let ingest = start_ingest_with(self.ingest).await;
        let scheduler = match self.scheduler {
            Some(config) => Some(self.env.start_scheduler(config).await),
            None => None,
        };
        let mut pipeline = Pipeline {
            ingest: ingest.0,
            ingest_stop: ingest.1,
            scheduler,
            correlator: None,
        };
        if self.correlator {
            pipeline.start_correlator(self.env).await;
        }
        pipeline
    }
}

/// Ingest and the workers a test started with [`TestEnv::pipeline`]. Dropping it leaves the
/// services running until the test's runtime ends, as a test that never stops them expects.
pub struct Pipeline {
    /// The running ingest (always part of a pipeline: it is how deliveries come in).
    pub ingest: RunningIngest,
    ingest_stop: Shutdown,
    scheduler: Option<(RunningScheduler, Shutdown)>,
    correlator: Option<(RunningCorrelator, Shutdown)>,
}

impl Pipeline {
    /// The running scheduler (panics if the pipeline has none).
    pub fn scheduler(&self) -> &RunningScheduler {
        &self.scheduler.as_ref().expect("scheduler started").0
    }

    /// The running correlator (panics if the pipeline has none).
    pub fn correlator(&self) -> &RunningCorrelator {
        &self.correlator.as_ref().expect("correlator started").0
    }

    /// Starts the correlator now: tests that post first start it after, so the queued
    /// replies reach it together in one batch.
    pub async fn start_correlator(&mut self, env: &TestEnv) {
        self.correlator = Some(env.start_correlator().await);
    }

    /// Stops the scheduler and waits for it (it must stop cleanly on its own).
    pub async fn stop_scheduler(&mut self) {
        let (scheduler, stop) = self.scheduler.take().expect("scheduler started");
        stop.trigger();
        scheduler.task.await.expect("stopped");
    }

    /// Stops every service, each bounded by [`WAIT`]: the workers must stop in time, ingest's
    /// result is not checked (its tests are elsewhere). The vhost and database stay.
    pub async fn stop(&mut self) {
        if let Some((running, shutdown)) = self.correlator.take() {
            shutdown.trigger();
            tokio::time::timeout(WAIT, running.task)
                .await
                .expect("correlator stops in time")
                .expect("join");
        }
        if let Some((running, shutdown)) = self.scheduler.take() {
            shutdown.trigger();
            tokio::time::timeout(WAIT, running.task)
                .await
                .expect("scheduler stops in time")
                .expect("join");
        }
        self.ingest_stop.trigger();
        let _ = tokio::time::timeout(WAIT, &mut self.ingest.task).await;
    }

    /// Posts one signed delivery for [`PAGE`] with these `messaging` items, in the trace
    /// [`TRACEPARENT`]; asserts ingest answered 200.
    pub async fn deliver(&self, items: Vec<Value>) {
        let status = post_signed_traced(
            &self.ingest,
            body_at(PAGE, items, DELIVERY_TIME_MS),
            TRACEPARENT,
        )
        .await;
        assert_eq!(status, 200, "ingest accepted the delivery");
    }

    /// Waits until the correlator has committed `n` replies in total (any result).
    pub async fn wait_processed(&self, n: u64) {
        let metrics = self.correlator().metrics.clone();
        eventually(WAIT, &format!("{n} replies processed"), || {
            let metrics = metrics.clone();
            async move {
                [
                    "linked",
                    "duplicate",
                    "conflict",
                    "no_prior_message",
                    "foreign_source",
                    "deleted",
                ]
                .iter()
                .map(|r| metrics.replies.with_label_values(&[*r]).get())
                .sum::<u64>()
                    >= n
            }
        })
        .await;
    }

    /// `correlator_replies_total` for one result.
    pub fn replies(&self, result: &str) -> u64 {
        self.correlator()
            .metrics
            .replies
            .with_label_values(&[result])
            .get()
    }
}

/// The text of the `/metrics` page served at `addr`.
pub async fn metrics_text(addr: SocketAddr) -> String {
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}
