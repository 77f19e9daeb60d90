//! Starting the services in-process against a test's own vhost and database.

use std::path::PathBuf;
use std::time::Duration;

use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lc_ingest::{IngestConfig, RunningIngest};
use lc_meta::secret::Secret;
use lc_meta::signature::sign_sha256;
use lc_shared::config::{AmqpArgs, DatabaseArgs, LogArgs};
use lc_shared::shutdown::Shutdown;
use lc_shared::telemetry::LogFormat;
use lc_shared::topology;
use lc_worker::runtime::config::{RelayArgs, WorkerArgs};
use lc_worker::scheduler::{RunningScheduler, SchedulerConfig};
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::fake_graph::FakeGraph;
use crate::harness::{TestDb, TestVhost};

/// App secret the test ingest accepts.
pub const APP_SECRET: &str = "test-app-secret";
/// The page every pipeline test configures.
pub const PAGE: &str = "1234567890";
/// Its token.
pub const PAGE_TOKEN: &str = "EAAG-test-page-token";
/// First message text of [`PAGE`].
pub const FIRST_TEXT: &str = "Thanks for signing up! What can we help you with?";

/// A test's services: its vhost, its database and a fake Graph.
pub struct TestEnv {
    /// The vhost.
    pub vhost: TestVhost,
    /// The database.
    pub db: TestDb,
    /// The fake Graph with [`PAGE`] configured.
    pub graph: FakeGraph,
    /// A pages file for [`PAGE`] (deleted on drop).
    pub pages_file: PathBuf,
}

impl TestEnv {
    /// Creates everything.
    pub async fn new() -> Self {
        let vhost = TestVhost::create();
        let db = TestDb::create().await;
        let graph = FakeGraph::start().await;
        graph.add_page(PAGE, PAGE_TOKEN);
        let pages_file = std::env::temp_dir().join(format!("{}.toml", db.name));
        write_pages_file(&pages_file, PAGE_TOKEN);
        Self {
            vhost,
            db,
            graph,
            pages_file,
        }
    }

    /// Worker arguments pointing at this environment.
    pub fn worker_args(&self) -> WorkerArgs {
        WorkerArgs {
            amqp: AmqpArgs {
                amqp_url: self.vhost.url(),
            },
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
            pages_file: self.pages_file.clone(),
            graph_api_url: self.graph.base_url(),
            graph_timeout_ms: 2000,
            send_delay_secs: 0,
            safety_margin_secs: 120,
            window_secs: 86_400,
            max_in_flight: 64,
            page_rate_limit: 250,
            claim_lookahead_ms: 1000,
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
            watchdog: lc_worker::watchdog::WatchdogArgs::default(),
        }
    }

    /// Starts a scheduler with `config`.
    pub async fn start_scheduler(&self, config: SchedulerConfig) -> (RunningScheduler, Shutdown) {
        self.start_scheduler_with_hook(config, None).await
    }

    /// Starts a scheduler with a hook inside the crash window.
    pub async fn start_scheduler_with_hook(
        &self,
        config: SchedulerConfig,
        hook: Option<lc_worker::scheduler::dispatch::AfterSendHook>,
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

    /// Starts ingest on this vhost with [`ingest_config`].
    pub async fn start_ingest(&self) -> (RunningIngest, Shutdown) {
        start_ingest_with(ingest_config(self.vhost.url())).await
    }

    /// A pool of `size` connections to this test's database, migrated (for tests that call
    /// the store directly or insert rows before any worker runs).
    pub async fn migrated_pool(&self, size: usize) -> deadpool_postgres::Pool {
        let pool = lc_shared::db::pool(&self.db.url(), size).expect("pool");
        lc_shared::db::migrate(&pool).await.expect("migrate");
        pool
    }

    /// A plain connection to the database.
    pub async fn sql(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.db.url(), tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        client
    }

    /// Declares a queue bound to the public exchange for `routing_keys`, before anything is
    /// published, so the test sees every event. Returns the queue name.
    pub async fn capture_events(&self, routing_keys: &[&str]) -> String {
        let conn = self.vhost.connect().await;
        let ch = conn.create_channel().await.expect("channel");
        ch.exchange_declare(
            topology::EVENTS_EXCHANGE.into(),
            lapin::ExchangeKind::Topic,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("exchange");
        let name = format!("capture-{}", uuid::Uuid::new_v4().simple());
        ch.queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue");
        for key in routing_keys {
            ch.queue_bind(
                name.as_str().into(),
                topology::EVENTS_EXCHANGE.into(),
                (*key).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
        }
        name
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.pages_file);
    }
}

/// Ingest settings for tests on the vhost at `amqp_url`: [`APP_SECRET`], a 4 MiB body limit,
/// the Login half off. Tests change the fields they are about.
pub fn ingest_config(amqp_url: String) -> IngestConfig {
    IngestConfig {
        addr: "127.0.0.1:0".parse().expect("addr"),
        app_secrets: vec![Secret::new(APP_SECRET)],
        verify_token: Secret::new("verify"),
        accept_sha1: false,
        max_body_bytes: 4 * 1024 * 1024,
        confirm_timeout_ms: 2000,
        request_timeout_ms: 10_000,
        publish_channels: 2,
        amqp: AmqpArgs { amqp_url },
        log: LogArgs {
            log_format: LogFormat::Text,
        },
        login: lc_ingest::login::LoginArgs::default(),
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

/// Unix milliseconds of a time.
pub fn ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// A Login Connect opt-in item.
pub fn optin_item(page: &str, login_id: &str, at: OffsetDateTime) -> Value {
    json!({"recipient": {"id": page}, "timestamp": ms(at), "optin": {"login_id": login_id}})
}

/// A reply item carrying `prior_message.identifier`.
pub fn reply_item(page: &str, psid: &str, mid: &str, login_id: &str, at: OffsetDateTime) -> Value {
    json!({"sender": {"id": psid}, "recipient": {"id": page}, "timestamp": ms(at),
           "message": {"mid": mid, "text": "Track my order", "quick_reply": {"payload": "TRACK"}},
           "prior_message": {"source": "login_connect", "identifier": login_id}})
}

/// A webhook body with these items for one page.
pub fn body(page: &str, items: Vec<Value>) -> Vec<u8> {
    serde_json::to_vec(&json!({"object": "page", "entry": [
        {"id": page, "time": ms(OffsetDateTime::now_utc()), "messaging": items}
    ]}))
    .expect("json")
}

/// Posts a body signed with [`APP_SECRET`] and returns the status code.
pub async fn post_signed(ingest: &RunningIngest, body: Vec<u8>) -> u16 {
    reqwest::Client::new()
        .post(format!("http://{}/webhook", ingest.addr))
        .header("x-hub-signature-256", sign_sha256(APP_SECRET, &body))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("post")
        .status()
        .as_u16()
}

/// Polls `check` (a cheap read of observable state: rows, metrics) until it returns true or
/// `timeout` passes. Used only where no event exists to await.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The state of one opt-in row.
pub async fn optin_state(sql: &tokio_postgres::Client, login_id: &str) -> Option<String> {
    sql.query_opt(
        "SELECT state FROM optins WHERE page_id = $1 AND login_id = $2",
        &[&PAGE, &login_id],
    )
    .await
    .expect("query")
    .map(|r| r.get(0))
}

/// Inserts an opt-in row directly (as the scheduler would have recorded it), for tests that
/// set up a backlog or a state before any worker runs. Its deadline is `at` + 24 h.
pub async fn insert_optin(
    sql: &tokio_postgres::Client,
    page_id: &str,
    login_id: &str,
    at: OffsetDateTime,
    state: &str,
) {
    sql.execute(
        "INSERT INTO optins (page_id, login_id, opted_in_at, deadline, send_at, state, next_attempt_at) \
         VALUES ($1, $2, $3, $3::timestamptz + interval '24 hours', $3, $4, $3)",
        &[&page_id, &login_id, &at, &state],
    )
    .await
    .expect("insert opt-in");
}
