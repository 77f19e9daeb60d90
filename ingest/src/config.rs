//! Configuration of the ingest service, from flags or environment variables.

use std::net::SocketAddr;
use std::time::Duration;

use lc_meta::secret::Secret;
use lc_shared::config::{AmqpArgs, LogArgs};

/// Settings of the `ingest` binary; `--help` lists each with its environment variable.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "ingest",
    version,
    about = "Receives Meta's signed Messenger webhooks and puts each event durably on RabbitMQ."
)]
pub struct IngestConfig {
    /// Address to listen on.
    #[arg(long, env = "INGEST_ADDR", default_value = "0.0.0.0:8080")]
    pub addr: SocketAddr,

    /// Meta app secrets, comma-separated; a delivery signed with any one of them is accepted
    /// (secret rotation, or one deployment serving two apps).
    #[arg(
        long = "app-secrets",
        env = "META_APP_SECRETS",
        value_delimiter = ',',
        required = true,
        hide_env_values = true
    )]
    pub app_secrets: Vec<Secret>,

    /// Token Meta echoes in the `GET /webhook` subscription handshake.
    #[arg(
        long = "verify-token",
        env = "META_VERIFY_TOKEN",
        hide_env_values = true
    )]
    pub verify_token: Secret,

    /// Also accept the legacy `X-Hub-Signature: sha1=…` header when the SHA-256 one is absent.
    #[arg(
        long = "accept-sha1-signature",
        env = "ACCEPT_SHA1_SIGNATURE",
        default_value_t = false
    )]
    pub accept_sha1: bool,

    /// Largest accepted webhook body in bytes (Meta batches up to 1000 events).
    #[arg(long = "max-body-bytes", env = "INGEST_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// How long to wait for the broker to confirm a body's messages before answering 503
    /// (Meta gives up after about 5 s and redelivers).
    #[arg(
        long = "confirm-timeout-ms",
        env = "INGEST_CONFIRM_TIMEOUT_MS",
        default_value_t = 2000
    )]
    pub confirm_timeout_ms: u64,

    /// Bound on reading and handling one request, so a slow client cannot hold a connection.
    #[arg(
        long = "request-timeout-ms",
        env = "INGEST_REQUEST_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub request_timeout_ms: u64,

    /// Most confirm-mode channels open for publishing at once: each body in flight holds one
    /// alone (so a returned message counts against its own body); bodies beyond wait for one.
    #[arg(
        long = "publish-channels",
        env = "INGEST_PUBLISH_CHANNELS",
        default_value_t = 64
    )]
    pub publish_channels: usize,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub amqp: AmqpArgs,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub log: LogArgs,

    /// The Login half: `POST /login-events` and data deletion (all off unless configured).
    #[command(flatten)]
    pub login: crate::login::LoginArgs,
}

impl IngestConfig {
    /// [`Self::confirm_timeout_ms`] as a duration.
    pub fn confirm_timeout(&self) -> Duration {
        Duration::from_millis(self.confirm_timeout_ms)
    }

    /// [`Self::request_timeout_ms`] as a duration.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// Checks what clap cannot: no empty secret, a non-empty verify token.
    pub fn validate(&self) -> Result<(), String> {
        if self.app_secrets.is_empty() || self.app_secrets.iter().any(Secret::is_empty) {
            return Err("META_APP_SECRETS must list at least one non-empty app secret (comma-separated, no empty items)".into());
        }
        if self.verify_token.is_empty() {
            return Err("META_VERIFY_TOKEN must not be empty".into());
        }
        if self.max_body_bytes < 1024 {
            return Err("INGEST_MAX_BODY_BYTES must be at least 1024".into());
        }
        Ok(())
    }
}
