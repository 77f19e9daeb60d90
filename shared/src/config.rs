//! Command-line/environment arguments that several binaries share.
//!
//! Every option can be given as an environment variable (the README's configuration table
//! lists them); defaults point at the local services so a bare `cargo run` works.

use crate::telemetry::LogFormat;

/// Default `AMQP_URL`.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Default `DATABASE_URL`.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/loginconnect";
/// Default `GRAPH_API_URL`.
pub const DEFAULT_GRAPH_API_URL: &str = "https://graph.facebook.com/v25.0";

/// RabbitMQ connection.
#[derive(Debug, Clone, clap::Args)]
pub struct AmqpArgs {
    /// RabbitMQ URL, including the vhost (`%2f` is the default vhost).
    #[arg(long = "amqp-url", env = "AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true)]
    pub amqp_url: String,
}

/// PostgreSQL connection.
#[derive(Debug, Clone, clap::Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL; the database is created if missing.
    #[arg(long = "database-url", env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: String,
    /// Most connections this process opens.
    #[arg(
        long = "database-pool-size",
        env = "DATABASE_POOL_SIZE",
        default_value_t = 8
    )]
    pub database_pool_size: usize,
}

/// Logging.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log line format (`RUST_LOG` sets the filter).
    #[arg(long = "log-format", env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}
