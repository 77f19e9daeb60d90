//! The admin API started in-process against a [`TestEnv`], with a read and a write token,
//! and a small client that returns each answer's status and JSON body.

use lc_shared::config::AmqpArgs;
use lc_shared::shutdown::Shutdown;
use lc_worker::admin::auth::AdminTokens;
use lc_worker::admin::{AdminSettings, RunningAdmin};
use lc_worker::scheduler::tokens::TokenKeys;
use serde_json::Value;

use crate::pipeline::TestEnv;

/// A token with scope `read` (name `crm`).
pub const READ_TOKEN: &str = "read-token-0123456789abcdefghij";
/// A token with scope `write` (name `ops`).
pub const WRITE_TOKEN: &str = "write-token-0123456789abcdefghij";
/// The page-token keys the admin API (and the schedulers of a test) use.
pub const KEYS: &str = "k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// A running admin API and a client for it.
pub struct Admin {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    http: reqwest::Client,
    stop: Shutdown,
    running: RunningAdmin,
}

/// One answer: status and body (`Null` when empty).
#[derive(Debug, Clone)]
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// The JSON body.
    pub body: Value,
    /// The raw body text (to check that no secret is in it).
    pub text: String,
}

impl TestEnv {
    /// Starts the admin API on a free port with [`READ_TOKEN`], [`WRITE_TOKEN`], [`KEYS`],
    /// this test's vhost for the dead letters and the default retry margin.
    pub async fn start_admin(&self) -> Admin {
        self.start_admin_with(Some(self.vhost.url())).await
    }

    /// [`TestEnv::start_admin`] with the broker at `amqp_url` (`None`: without one).
    pub async fn start_admin_with(&self, amqp_url: Option<String>) -> Admin {
        let pool = self.migrated_pool(4).await;
        let settings = AdminSettings {
            tokens: AdminTokens::parse(&format!("crm:read:{READ_TOKEN},ops:write:{WRITE_TOKEN}"))
                .expect("tokens"),
            keys: TokenKeys::parse(KEYS).expect("keys"),
            amqp: amqp_url.map(|u| AmqpArgs::new(u).endpoint().expect("endpoint")),
            retry_margin: lc_worker::operate::retry::DEFAULT_RETRY_MARGIN,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let stop = Shutdown::new();
        let running =
            lc_worker::admin::start(pool, settings, listener, stop.clone()).expect("admin API");
        Admin {
            base: format!("http://{}", running.addr),
            http: reqwest::Client::new(),
            stop,
            running,
        }
    }
}

impl Admin {
    /// Calls `method path` with `token` (none: no `Authorization`) and a JSON `body`.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Answer {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("admin API answers");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).expect("a JSON body")
        };
        Answer { status, body, text }
    }

    /// `call` with the write token.
    pub async fn write(&self, method: &str, path: &str, body: Option<Value>) -> Answer {
        self.call(method, path, Some(WRITE_TOKEN), body).await
    }

    /// `GET path` with the read token.
    pub async fn read(&self, path: &str) -> Answer {
        self.call("GET", path, Some(READ_TOKEN), None).await
    }

    /// Stops it.
    pub async fn stop(self) {
        self.stop.trigger();
        self.running.task.await.expect("admin API stopped");
    }
}
