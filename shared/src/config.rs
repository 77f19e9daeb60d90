//! Command-line/environment arguments that several binaries share.
//!
//! Every option can be given as an environment variable (the README's configuration table
//! lists them); defaults point at the local services so a bare `cargo run` works.

use std::path::PathBuf;

use crate::amqp::{AmqpEndpoint, TlsFiles, TlsSettingsError};
use crate::telemetry::LogFormat;

/// Default `AMQP_URL`.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Default `DATABASE_URL`.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/loginconnect";
/// Default `GRAPH_API_URL`.
pub const DEFAULT_GRAPH_API_URL: &str = "https://graph.facebook.com/v25.0";

/// RabbitMQ connection. Its `Debug` hides the URL's password.
#[derive(Clone, clap::Args)]
pub struct AmqpArgs {
    /// RabbitMQ URL, including the vhost (`%2f` is the default vhost).
    #[arg(long = "amqp-url", env = "AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true)]
    pub amqp_url: String,
    /// PEM file of the CA that signed the broker's certificate (`amqps://` only); without it
    /// the system's trust store is used.
    #[arg(long = "amqp-tls-ca-file", env = "AMQP_TLS_CA_FILE")]
    pub amqp_tls_ca_file: Option<PathBuf>,
    /// PEM file of a client certificate, for brokers that require one (`amqps://` only).
    #[arg(long = "amqp-tls-cert-file", env = "AMQP_TLS_CERT_FILE")]
    pub amqp_tls_cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    #[arg(long = "amqp-tls-key-file", env = "AMQP_TLS_KEY_FILE")]
    pub amqp_tls_key_file: Option<PathBuf>,
}

impl AmqpArgs {
    /// `url` without TLS files (plain AMQP, or `amqps://` trusting the system's roots).
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            amqp_url: url.into(),
            amqp_tls_ca_file: None,
            amqp_tls_cert_file: None,
            amqp_tls_key_file: None,
        }
    }

    /// The broker to connect to, its TLS files checked (see [`AmqpEndpoint::new`]): call it
    /// at start-up, so a wrong setting stops the process with an error naming it.
    pub fn endpoint(&self) -> Result<AmqpEndpoint, TlsSettingsError> {
        let tls = TlsFiles {
            ca_file: self.amqp_tls_ca_file.clone(),
            cert_file: self.amqp_tls_cert_file.clone(),
            key_file: self.amqp_tls_key_file.clone(),
        };
        AmqpEndpoint::new(&self.amqp_url, tls)
    }
}

/// PostgreSQL connection. Its `Debug` hides the URL's password.
#[derive(Clone, clap::Args)]
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

impl std::fmt::Debug for AmqpArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpArgs")
            .field("amqp_url", &redact_url(&self.amqp_url))
            .field("amqp_tls_ca_file", &self.amqp_tls_ca_file)
            .field("amqp_tls_cert_file", &self.amqp_tls_cert_file)
            .field("amqp_tls_key_file", &self.amqp_tls_key_file)
            .finish()
    }
}

impl std::fmt::Debug for DatabaseArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseArgs")
            .field("database_url", &redact_url(&self.database_url))
            .field("database_pool_size", &self.database_pool_size)
            .finish()
    }
}

/// `url` with every password replaced by `***`: the `user:password@` of each URL in it (a
/// comma-separated list included) and a `password=` item of the key=value form. For logs and
/// `Debug`; a derived `Debug` of the arguments would print the secret.
pub fn redact_url(url: &str) -> String {
    if !url.contains("://") {
        return url
            .split(' ')
            .map(|item| match item.split_once('=') {
                Some(("password", _)) => "password=***".to_owned(),
                _ => item.to_owned(),
            })
            .collect::<Vec<_>>()
            .join(" ");
    }
    url.split(',')
        .map(|one| {
            let Some((scheme, rest)) = one.split_once("://") else {
                return one.to_owned();
            };
            let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => match rest[..at].split_once(':') {
                    Some((user, _)) => format!("{scheme}://{user}:***{}", &rest[at..]),
                    None => one.to_owned(),
                },
                None => one.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Logging.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log line format (`RUST_LOG` sets the filter).
    #[arg(long = "log-format", env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_debug_output() {
        let amqp = AmqpArgs::new(
            "amqps://app:s3cret@rabbit-1:5671/%2f,amqps://app:s3cret@rabbit-2:5671/%2f",
        );
        let db = DatabaseArgs {
            database_url: "postgres://app:pa%40ss@db:5432/lc?sslmode=verify-full".into(),
            database_pool_size: 8,
        };
        let text = format!("{amqp:?} {db:?}");
        assert!(
            !text.contains("s3cret") && !text.contains("pa%40ss"),
            "{text}"
        );
        assert!(text.contains("app:***@rabbit-2:5671"), "{text}");
        assert!(
            text.contains("postgres://app:***@db:5432/lc?sslmode"),
            "{text}"
        );
        assert_eq!(
            redact_url("host=db user=app password=hunter2 dbname=lc"),
            "host=db user=app password=*** dbname=lc"
        );
        assert_eq!(redact_url("postgres://app@db/lc"), "postgres://app@db/lc");
    }
}
