//! Settings of the services for a test: every one points at the test's own vhost, database
//! and fake Graph, with polls and leases short enough for tests to finish in seconds.

use lc_ingest::IngestConfig;
use lc_meta::secret::Secret;
use lc_shared::config::{AmqpArgs, DatabaseArgs, LogArgs};
use lc_shared::telemetry::LogFormat;
use lc_worker::correlator::CorrelatorConfig;
use lc_worker::runtime::config::{RelayArgs, WorkerArgs};
use lc_worker::scheduler::SchedulerConfig;

use super::{APP_SECRET, FIRST_TEXT, PAGE, TestEnv};

impl TestEnv {
    /// Worker arguments pointing at this environment.
    pub fn worker_args(&self) -> WorkerArgs {
        WorkerArgs {
            amqp: AmqpArgs::new(self.vhost.url()),
            database: DatabaseArgs {
                database_url: self.db.url(),
                database_pool_size: 8,
            },
            log: LogArgs {
                log_format: LogFormat::Text,
            },
            migrate_on_start: true,
            worker_id: None,
            prefetch: 200,
            consumer_batch: 100,
            relay: RelayArgs {
                relay_batch: 200,
                relay_poll_ms: 200,
                relay_confirm_timeout_ms: 5000,
                outbox_retention_hours: 72,
            },
        }
    }

    /// Scheduler settings for this environment (fast polls, short leases).
    pub fn scheduler_config(&self) -> SchedulerConfig {
        SchedulerConfig {
            worker: self.worker_args(),
            metrics_addr: "127.0.0.1:0".parse().expect("addr"),
            pages_file: Some(self.pages_file.clone()),
            graph_api_url: self.graph.base_url(),
            graph_timeout_ms: 2000,
            send_delay_secs: 0,
            safety_margin_secs: 120,
            window_secs: 86_400,
            max_in_flight: 64,
            page_rate_limit: 250,
            claim_lookahead_ms: 250,
            page_token_keys: String::new(),
            lease_secs: 5,
            claim_batch: 100,
            poll_ms: 200,
            retry_base_ms: 100,
            retry_cap_secs: 2,
            retry_jitter: true,
            max_unknown_attempts: 5,
            max_attempts: 50,
            unknown_outcome: lc_worker::scheduler::store::rescue::UnknownOutcome::Fail,
            retention_days: 30,
            retention_secs: None,
            watchdog: lc_worker::watchdog::WatchdogArgs::default(),
        }
    }

    /// Correlator settings for this environment (the metrics server on a free port).
    pub fn correlator_config(&self) -> CorrelatorConfig {
        CorrelatorConfig {
            worker: self.worker_args(),
            metrics_addr: "127.0.0.1:0".parse().expect("addr"),
            link_sources: vec![lc_worker::correlator::link::DEFAULT_LINK_SOURCE.to_owned()],
            // One loop, so a test that posts replies in order sees them handled in that
            // order; tests of concurrent loops set more (tests/tests/correlator_loops.rs).
            consumer_concurrency: Some(1),
        }
    }
}

/// Ingest settings for tests on the vhost at `amqp_url`: [`APP_SECRET`], a 4 MiB body limit,
/// the Login half off. Tests change the fields they are about.
pub fn ingest_config(amqp_url: String) -> IngestConfig {
    IngestConfig {
        addr: "127.0.0.1:0".parse().expect("addr"),
        admin_addr: "127.0.0.1:0".parse().expect("addr"),
        app_secrets: vec![Secret::new(APP_SECRET)],
        verify_token: Secret::new("verify"),
        accept_sha1: false,
        max_body_bytes: 4 * 1024 * 1024,
        confirm_timeout_ms: 2000,
        request_timeout_ms: 10_000,
        http2: false,
        max_connections: 4096,
        publish_channels: 2,
        amqp: AmqpArgs::new(amqp_url),
        log: LogArgs {
            log_format: LogFormat::Text,
        },
        login: lc_ingest::login::LoginArgs::default(),
        secret_vars: Default::default(),
    }
}

/// Writes a pages file for [`PAGE`] with `token` and two quick replies.
pub fn write_pages_file(path: &std::path::Path, token: &str) {
    let text = format!(
        r#"[[pages]]
id = "{PAGE}"
access_token = "{token}"
[pages.first_message]
text = "{FIRST_TEXT}"
quick_replies = [
  {{ title = "Track my order", payload = "TRACK" }},
  {{ title = "Talk to an agent", payload = "AGENT" }},
]
"#
    );
    std::fs::write(path, text).expect("write pages file");
}
