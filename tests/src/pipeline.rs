//! A test's environment ([`TestEnv`]: its vhost, database, fake Graph and pages file) and the
//! services of loginconnect started in-process against it.
//!
//! One environment serves every kind of test, so a test names only what it is about. The
//! helpers are split by job into private files and re-exported here, so a test imports
//! everything from `lc_testkit::pipeline`: settings of the services (`config`), starting and
//! stopping them (`services`, `relay`), capturing the events they publish (`events`),
//! building and posting Meta's deliveries (`webhook`), and reading and seeding the database
//! (`rows`).

mod config;
mod events;
mod relay;
mod rows;
mod services;
mod webhook;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use crate::contract::Contract;
use crate::fake_graph::FakeGraph;
use crate::harness::{TestDb, TestVhost};

pub use config::{ingest_config, write_pages_file};
pub use events::{event_json, time_of};
pub use relay::RunningRelay;
pub use rows::{
    claim, count, expire_leases, insert_optin, insert_sent_optin, link_of, optin_replied,
    optin_state,
};
pub use services::{Pipeline, PipelineBuilder, metrics_text, start_ingest_with};
pub use webhook::{
    TRACEPARENT, body, body_at, ms, optin_item, post_signed, post_signed_traced, reply_item,
    text_reply_item,
};

/// App secret the test ingest accepts.
pub const APP_SECRET: &str = "test-app-secret";
/// The page every pipeline test configures.
pub const PAGE: &str = "1234567890";
/// Its token.
pub const PAGE_TOKEN: &str = "EAAG-test-page-token";
/// First message text of [`PAGE`].
pub const FIRST_TEXT: &str = "Thanks for signing up! What can we help you with?";
/// How long a test waits for something that should happen (an event, a call, a row) before
/// it fails: long enough for a loaded 2-core machine, short enough to fail a hung test fast.
pub const WAIT: Duration = Duration::from_secs(20);

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
    /// Compiled on first use: most tests never check an event against the schemas.
    contract: OnceLock<Contract>,
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
            contract: OnceLock::new(),
        }
    }

    /// The published JSON Schemas, to check events taken off `loginconnect.events`.
    pub fn contract(&self) -> &Contract {
        self.contract.get_or_init(Contract::load)
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
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.pages_file);
    }
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
