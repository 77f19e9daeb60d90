//! The admin API: the page registry over JSON/HTTP for technology providers, on its own
//! listener (`ADMIN_ADDR`, never the webhook port), described by `docs/openapi.yaml`.
//!
//! - [`auth`]: bearer tokens with scopes `read` and `write`, compared in constant time;
//! - [`routes`]: the one list of routes the router, the scopes and the OpenAPI test use;
//! - [`handlers`]: thin handlers over [`crate::registry::ops`] (the CLI calls the same);
//! - [`operations`]: the operator routes over [`crate::operate`] (opt-ins at risk, failures,
//!   timelines, retries, dead letters), which the console calls too.
//! - [`funnel`]: `GET /funnel` over [`crate::funnel::query`] (so does `loginconnect funnel`);
//! - [`console`]: the web console under `/console`, same listener, same tokens.
//!
//! It runs as `loginconnect admin` (the operator CLI's binary: it already ships in the image
//! with the database settings, and the API is the CLI's page operations over HTTP); tests
//! call [`start`] on port 0.

pub mod auth;
pub mod console;
pub mod funnel;
pub mod handlers;
pub mod operations;
pub mod routes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use lc_shared::amqp::AmqpEndpoint;
use lc_shared::shutdown::Shutdown;
use tokio::net::TcpListener;

use crate::scheduler::tokens::{TokenKeyError, TokenKeys};
use auth::{AdminTokens, TokenListError};
use console::ConsoleSettings;

/// Settings of `loginconnect admin`.
#[derive(Debug, Clone, clap::Args)]
pub struct AdminArgs {
    /// Address of the admin API (keep it private: it is not the webhook listener).
    #[arg(
        long = "admin-addr",
        env = "ADMIN_ADDR",
        default_value = "127.0.0.1:9470"
    )]
    pub admin_addr: SocketAddr,
    /// Bearer tokens, `name:scope:token` comma-separated (scope `read` or `write`).
    #[arg(
        long = "admin-tokens",
        env = "ADMIN_TOKENS",
        default_value = "",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub admin_tokens: String,
    /// A file of `name:scope:token` lines (a mounted secret), added to `ADMIN_TOKENS`.
    #[arg(long = "admin-tokens-file", env = "ADMIN_TOKENS_FILE")]
    pub admin_tokens_file: Option<PathBuf>,
    /// Keys of page tokens stored in the database (the schedulers' `PAGE_TOKEN_KEYS`).
    #[arg(
        long = "page-token-keys",
        env = "PAGE_TOKEN_KEYS",
        default_value = "",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub page_token_keys: String,
    /// A failed opt-in is retried only while its deadline is more than this many seconds
    /// away (keep it above the schedulers' `SAFETY_MARGIN_SECS`).
    #[arg(
        long = "retry-margin-secs",
        env = "RETRY_MARGIN_SECS",
        default_value_t = crate::operate::retry::DEFAULT_RETRY_MARGIN.as_secs()
    )]
    pub retry_margin_secs: u64,
    /// The web console shows and accepts no write, whatever the token.
    #[arg(
        long = "admin-console-read-only",
        env = "ADMIN_CONSOLE_READ_ONLY",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub console_read_only: bool,
    /// The console is reached over HTTPS (a TLS-terminating proxy): its cookie is `Secure`.
    #[arg(
        long = "admin-console-https",
        env = "ADMIN_CONSOLE_HTTPS",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub console_https: bool,
}

/// Why the admin API cannot start; each names the setting to fix.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The token list is unusable.
    #[error(transparent)]
    Tokens(#[from] TokenListError),
    /// The token file cannot be read.
    #[error("cannot read ADMIN_TOKENS_FILE {path}: {source}")]
    TokensFile {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `PAGE_TOKEN_KEYS` is unusable.
    #[error(transparent)]
    Keys(#[from] TokenKeyError),
    /// The listener failed.
    #[error("admin API listener: {0} (set ADMIN_ADDR)")]
    Listen(#[from] std::io::Error),
}

/// What every handler shares.
#[derive(Clone)]
pub struct AdminState {
    pool: Pool,
    tokens: Arc<AdminTokens>,
    keys: TokenKeys,
    /// The broker for the dead-letter routes (`None`: they answer 503 saying what to set).
    amqp: Option<AmqpEndpoint>,
    retry_margin: Duration,
    console: ConsoleSettings,
}

/// The tokens and keys the API runs with.
pub struct AdminSettings {
    /// Bearer tokens.
    pub tokens: AdminTokens,
    /// Page token keys (empty: `PUT /pages/{id}/token` answers what to configure).
    pub keys: TokenKeys,
    /// The broker, for the dead-letter routes (`None`: they answer 503 naming `AMQP_URL`).
    pub amqp: Option<AmqpEndpoint>,
    /// How far from its deadline a failed opt-in may still be retried.
    pub retry_margin: Duration,
    /// The web console's settings.
    pub console: ConsoleSettings,
}

impl AdminArgs {
    /// Reads the token list (and file), the keys and the retry margin; the broker is added by
    /// the caller (`loginconnect admin` gives the CLI's `AMQP_URL`).
    pub fn settings(&self) -> Result<AdminSettings, AdminError> {
        let mut list = self.admin_tokens.clone();
        if let Some(path) = &self.admin_tokens_file {
            let text = std::fs::read_to_string(path).map_err(|source| AdminError::TokensFile {
                path: path.display().to_string(),
                source,
            })?;
            list.push('\n');
            list.push_str(&text);
        }
        Ok(AdminSettings {
            tokens: AdminTokens::parse(&list)?,
            keys: TokenKeys::parse(&self.page_token_keys)?,
            amqp: None,
            retry_margin: Duration::from_secs(self.retry_margin_secs),
            console: ConsoleSettings {
                read_only: self.console_read_only,
                https: self.console_https,
            },
        })
    }
}

/// A running admin API.
pub struct RunningAdmin {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Completes when it has stopped.
    pub task: tokio::task::JoinHandle<()>,
}

/// Serves the admin API on `listener` until `shutdown`.
pub fn start(
    pool: Pool,
    settings: AdminSettings,
    listener: TcpListener,
    shutdown: Shutdown,
) -> Result<RunningAdmin, AdminError> {
    let addr = listener.local_addr()?;
    let app = routes::router(AdminState {
        pool,
        tokens: Arc::new(settings.tokens),
        keys: settings.keys,
        amqp: settings.amqp,
        retry_margin: settings.retry_margin,
        console: settings.console,
    });
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin API stopped");
        }
    });
    tracing::info!(%addr, "admin API listening");
    Ok(RunningAdmin { addr, task })
}
