//! The correlator tests' environment: ingest and the correlator in-process on a vhost and a
//! database of their own, a queue capturing `loginconnect.events`, and small SQL helpers.

use std::future::Future;
use std::time::Duration;

use lapin::Connection;
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lc_ingest::{IngestConfig, RunningIngest};
use lc_meta::secret::Secret;
use lc_meta::signature::sign_sha256;
use lc_shared::config::{AmqpArgs, DatabaseArgs, LogArgs};
use lc_shared::shutdown::Shutdown;
use lc_shared::telemetry::LogFormat;
use lc_shared::topology;
use lc_testkit::contract::Contract;
use lc_testkit::harness::{TestDb, TestVhost, take_all};
use lc_worker::correlator::{CorrelatorConfig, RunningCorrelator};
use lc_worker::runtime::config::{RelayArgs, WorkerArgs};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// App secret ingest accepts.
pub(crate) const SECRET: &str = "correlator-test-secret";
/// The Page every test uses.
pub(crate) const PAGE: &str = "106283175398765";
/// The test queue bound to `loginconnect.events` with `#`.
pub(crate) const CAPTURE: &str = "test.events";
/// Bound of every wait.
pub(crate) const WAIT: Duration = Duration::from_secs(20);
/// The traceparent every delivery is posted with.
pub(crate) const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// One test's services and observers.
pub(crate) struct Env {
    /// The test's vhost.
    pub(crate) vhost: TestVhost,
    /// The test's database.
    pub(crate) db: TestDb,
    ingest: RunningIngest,
    ingest_stop: Shutdown,
    correlator: Option<(RunningCorrelator, Shutdown)>,
    /// The test's own connection; [`CAPTURE`] is bound to every public event on it.
    pub(crate) events: Connection,
    /// The schemas every captured event is checked against.
    pub(crate) contract: Contract,
    http: reqwest::Client,
}

impl Env {
    /// Ingest and the capture queue; the correlator is started by [`Env::start_correlator`]
    /// (after posting, when a test wants the replies to wait for it in one batch).
    pub(crate) async fn new() -> Self {
        let vhost = TestVhost::create();
        let db = TestDb::create().await;
        let ingest_stop = Shutdown::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let ingest = lc_ingest::start(ingest_config(&vhost.url()), listener, ingest_stop.clone())
            .await
            .expect("start ingest");
        ingest.broker.wait_ready(WAIT).await.expect("ingest ready");
        // Bound before anything is posted: events are not mandatory, an unbound one is dropped.
        let events = vhost.connect().await;
        let ch = events.create_channel().await.expect("channel");
        ch.queue_declare(
            CAPTURE.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare capture queue");
        ch.queue_bind(
            CAPTURE.into(),
            topology::EVENTS_EXCHANGE.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind capture queue");
        let env = Self {
            vhost,
            db,
            ingest,
            ingest_stop,
            correlator: None,
            events,
            contract: Contract::load(),
            http: reqwest::Client::new(),
        };
        // The tables exist before a test inserts opt-ins, whether or not the correlator runs.
        let pool = lc_shared::db::pool(&env.db.url(), 1).expect("pool");
        lc_shared::db::migrate(&pool).await.expect("migrate");
        env
    }

    pub(crate) async fn start_correlator(&mut self) {
        let config = CorrelatorConfig {
            worker: WorkerArgs {
                amqp: AmqpArgs {
                    amqp_url: self.vhost.url(),
                },
                database: DatabaseArgs {
                    database_url: self.db.url(),
                    database_pool_size: 4,
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
            },
            metrics_addr: "127.0.0.1:0".parse().expect("addr"),
        };
        let shutdown = Shutdown::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let running = lc_worker::correlator::start(config, listener, shutdown.clone())
            .await
            .expect("start correlator");
        running
            .broker
            .wait_ready(WAIT)
            .await
            .expect("correlator ready");
        self.correlator = Some((running, shutdown));
    }

    /// The running correlator (panics if not started).
    pub(crate) fn correlator(&self) -> &RunningCorrelator {
        &self.correlator.as_ref().expect("correlator started").0
    }

    /// A fresh SQL connection to the test's database.
    pub(crate) async fn db(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.db.url(), tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        client
    }

    /// Posts one signed delivery for [`PAGE`] with these `messaging` items, carrying
    /// [`TRACE`]; asserts ingest answered 200.
    pub(crate) async fn post(&self, items: Vec<Value>) {
        let body = serde_json::to_vec(&json!({"object": "page", "entry": [
            {"id": PAGE, "time": 1_700_000_999_000_i64, "messaging": items}
        ]}))
        .expect("json");
        let resp = self
            .http
            .post(format!("http://{}/webhook", self.ingest.addr))
            .header("content-type", "application/json")
            .header("x-hub-signature-256", sign_sha256(SECRET, &body))
            .header("traceparent", TRACE)
            .body(body)
            .send()
            .await
            .expect("post");
        assert_eq!(resp.status(), 200, "ingest accepted the delivery");
    }

    /// Waits until the correlator has committed `n` replies in total (any result).
    pub(crate) async fn wait_processed(&self, n: u64) {
        let metrics = self.correlator().metrics.clone();
        eventually(&format!("{n} replies processed"), || {
            let metrics = metrics.clone();
            async move {
                ["linked", "duplicate", "conflict", "no_prior_message"]
                    .iter()
                    .map(|r| metrics.replies.with_label_values(&[*r]).get())
                    .sum::<u64>()
                    >= n
            }
        })
        .await;
    }

    /// `correlator_replies_total` for one result.
    pub(crate) fn replies(&self, result: &str) -> u64 {
        self.correlator()
            .metrics
            .replies
            .with_label_values(&[result])
            .get()
    }

    /// Waits until every outbox row is published; from then on everything the relay sent is
    /// confirmed, so taking the capture queue empty sees all events.
    pub(crate) async fn all_events(&self) -> Vec<Value> {
        let db = self.db().await;
        eventually("outbox fully published", || async {
            let n: i64 = db
                .query_one(
                    "SELECT count(*) FROM outbox WHERE published_at IS NULL",
                    &[],
                )
                .await
                .expect("count")
                .get(0);
            n == 0
        })
        .await;
        take_all(&self.events, CAPTURE)
            .await
            .iter()
            .map(|d| {
                assert_eq!(d.routing_key.as_str(), "identity.linked");
                self.contract.check_delivery(d)
            })
            .collect()
    }

    /// The correlator's `/metrics` page, over HTTP.
    pub(crate) async fn metrics_text(&self) -> String {
        self.http
            .get(format!("http://{}/metrics", self.correlator().metrics_addr))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics body")
    }

    /// Stops the correlator and ingest (the vhost and database stay until drop).
    pub(crate) async fn stop(&mut self) {
        if let Some((running, shutdown)) = self.correlator.take() {
            shutdown.trigger();
            tokio::time::timeout(WAIT, running.task)
                .await
                .expect("correlator stops in time")
                .expect("join");
        }
        self.ingest_stop.trigger();
        let _ = tokio::time::timeout(WAIT, &mut self.ingest.task).await;
    }
}

/// Ingest settings for this vhost, accepting [`SECRET`].
pub(crate) fn ingest_config(amqp_url: &str) -> IngestConfig {
    IngestConfig {
        addr: "127.0.0.1:0".parse().expect("addr"),
        app_secrets: vec![Secret::new(SECRET)],
        verify_token: Secret::new("verify"),
        accept_sha1: false,
        max_body_bytes: 1024 * 1024,
        confirm_timeout_ms: 2000,
        request_timeout_ms: 10_000,
        publish_channels: 2,
        amqp: AmqpArgs {
            amqp_url: amqp_url.to_owned(),
        },
        log: LogArgs {
            log_format: LogFormat::Text,
        },
        login: lc_ingest::login::LoginArgs::default(),
    }
}

/// Polls `check` every 25 ms until it holds; panics after [`WAIT`]. Only for state that has
/// no event to await (counters, rows).
pub(crate) async fn eventually<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Unix milliseconds, as webhook timestamps are written.
pub(crate) fn ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).expect("ms")
}

/// A text reply carrying `prior_message` with the documented `identifier` key.
pub(crate) fn reply(psid: &str, mid: &str, login_id: &str, at: OffsetDateTime) -> Value {
    json!({"sender": {"id": psid}, "recipient": {"id": PAGE}, "timestamp": ms(at),
           "message": {"mid": mid, "text": "Track my order"},
           "prior_message": {"source": "login_connect", "identifier": login_id}})
}

/// Parses an RFC 3339 string from event data (`None` for JSON null).
pub(crate) fn time_of(v: &Value) -> Option<OffsetDateTime> {
    v.as_str()
        .map(|s| OffsetDateTime::parse(s, &Rfc3339).expect("RFC 3339"))
}

/// Inserts an opt-in row directly (the scheduler records them in production).
pub(crate) async fn insert_optin(
    db: &tokio_postgres::Client,
    login_id: &str,
    state: &str,
    at: OffsetDateTime,
) {
    let deadline = at + Duration::from_secs(86_400);
    db.execute(
        "INSERT INTO optins (page_id, login_id, opted_in_at, deadline, send_at, state, \
         next_attempt_at, message_id, sent_at, attempts) \
         VALUES ($1, $2, $3, $4, $3, $5, $3, $6, $7, $8)",
        &[
            &PAGE,
            &login_id,
            &at,
            &deadline,
            &state,
            &(state == "sent").then_some("m_first_message"),
            &(state == "sent").then_some(at + Duration::from_secs(1)),
            &i32::from(state == "sent"),
        ],
    )
    .await
    .expect("insert opt-in");
}

/// State and `replied_at` of an opt-in of [`PAGE`].
pub(crate) async fn optin_state(
    db: &tokio_postgres::Client,
    login_id: &str,
) -> (String, Option<OffsetDateTime>) {
    let row = db
        .query_one(
            "SELECT state, replied_at FROM optins WHERE page_id = $1 AND login_id = $2",
            &[&PAGE, &login_id],
        )
        .await
        .expect("opt-in row");
    (row.get(0), row.get(1))
}

/// PSID, `linked_at` and `first_reply_mid` of a link of [`PAGE`].
pub(crate) async fn link_of(
    db: &tokio_postgres::Client,
    login_id: &str,
) -> (String, OffsetDateTime, Option<String>) {
    let row = db
        .query_one(
            "SELECT psid, linked_at, first_reply_mid FROM links WHERE page_id = $1 AND login_id = $2",
            &[&PAGE, &login_id],
        )
        .await
        .expect("link row");
    (row.get(0), row.get(1), row.get(2))
}

/// Runs a `SELECT count(*)`.
pub(crate) async fn count(db: &tokio_postgres::Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).await.expect("count").get(0)
}
