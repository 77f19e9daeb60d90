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
    /// Address to listen on (the webhook and the Login half; put this behind the load
    /// balancer).
    #[arg(long, env = "INGEST_ADDR", default_value = "0.0.0.0:8080")]
    pub addr: SocketAddr,

    /// Address of the admin listener: `/metrics`, `/healthz`, `/readyz`. Keep it off the load
    /// balancer (the default is reachable from this host only).
    #[arg(
        long = "admin-addr",
        env = "INGEST_ADMIN_ADDR",
        default_value = "127.0.0.1:9465"
    )]
    pub admin_addr: SocketAddr,

    /// Meta app secrets, comma-separated; a delivery signed with any one of them is accepted
    /// (secret rotation, or one deployment serving two apps).
    /// Items are trimmed: `"a, b"` is the secrets `a` and `b`.
    #[arg(
        long = "app-secrets",
        env = "META_APP_SECRETS",
        value_delimiter = ',',
        value_parser = trimmed_secret,
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

    /// Also serve HTTP/2 (h2c, prior knowledge). Off by default: Meta posts HTTP/1.1, and
    /// with HTTP/2 every connection is bounded by an idle watch instead of hyper's header
    /// timeout.
    #[arg(long = "http2", env = "INGEST_HTTP2", default_value_t = false)]
    pub http2: bool,

    /// Most connections open at once (both listeners' webhook side); a connection beyond it
    /// is answered 503 at once and closed. Keep it below the process's file-descriptor limit.
    #[arg(
        long = "max-connections",
        env = "INGEST_MAX_CONNECTIONS",
        default_value_t = 4096
    )]
    pub max_connections: usize,

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

    /// Where the secrets of the registry's apps are read (`apps.app_secret_env` names the
    /// variable): the process environment, unless given here first (tests, embedding).
    #[arg(skip)]
    pub secret_vars: crate::binding::SecretVars,
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
        if !(1..=1_000_000).contains(&self.max_connections) {
            return Err("INGEST_MAX_CONNECTIONS must be between 1 and 1000000".into());
        }
        if self.admin_addr == self.addr && self.addr.port() != 0 {
            return Err("INGEST_ADMIN_ADDR must differ from INGEST_ADDR".into());
        }
        Ok(())
    }
}

/// Parses one item of a comma-separated secret list: surrounding whitespace is never part of
/// a secret (`"a, b"` would otherwise hold `" b"`, which never verifies), so it is trimmed;
/// an item that is empty after trimming is refused by validation. Never fails, so clap never
/// has a reason to echo the value.
pub(crate) fn trimmed_secret(item: &str) -> Result<Secret, std::convert::Infallible> {
    Ok(Secret::new(item.trim()))
}

/// A clap parser for `app_id=client_token` items whose error never contains the value: clap
/// puts a rejected value into its message ("invalid value '…'"), which would print a client
/// token to the terminal and the logs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientTokenParser;

impl clap::builder::TypedValueParser for ClientTokenParser {
    type Value = lc_meta::login::login_id::AppClientToken;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Self::Value, clap::Error> {
        let refuse = |why: String| {
            let name = arg.and_then(clap::Arg::get_env).map_or_else(
                || "LOGIN_EVENTS_CLIENT_TOKENS".to_owned(),
                |e| e.to_string_lossy().into_owned(),
            );
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid item in {name} (value not shown): {why}\n"),
            )
            .with_cmd(cmd)
        };
        let text = value
            .to_str()
            .ok_or_else(|| refuse("not UTF-8".to_owned()))?;
        text.parse().map_err(|e| refuse(format!("{e}")))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn parse(extra: &[&str]) -> Result<IngestConfig, clap::Error> {
        let mut args = vec!["ingest", "--app-secrets", "a, b ,c", "--verify-token", "v"];
        args.extend_from_slice(extra);
        IngestConfig::try_parse_from(args)
    }

    #[test]
    fn secret_items_are_trimmed() {
        let config = parse(&[]).expect("parses");
        let secrets: Vec<&str> = config.app_secrets.iter().map(Secret::expose).collect();
        assert_eq!(secrets, ["a", "b", "c"]);
        let config = parse(&["--login-events-secrets", " x ,y"]).expect("parses");
        let secrets: Vec<&str> = config
            .login
            .login_events_secrets
            .iter()
            .map(Secret::expose)
            .collect();
        assert_eq!(secrets, ["x", "y"]);
        let config =
            IngestConfig::try_parse_from(["ingest", "--app-secrets", "a, ", "--verify-token", "v"])
                .expect("parses");
        assert!(config.validate().is_err(), "an empty item is refused");
    }

    #[test]
    fn a_rejected_client_token_is_not_echoed() {
        for bad in ["123:super-secret-token", "abc=super-secret-token", "123="] {
            let err = parse(&["--login-events-client-tokens", bad]).expect_err("refused");
            let text = err.to_string();
            assert!(!text.contains("super-secret-token"), "{text}");
            assert!(!text.contains(bad), "{text}");
            assert!(text.contains("LOGIN_EVENTS_CLIENT_TOKENS"), "{text}");
        }
        let ok = parse(&["--login-events-client-tokens", "1=t, 2=u"]).expect("parses");
        assert_eq!(ok.login.client_tokens.len(), 2);
    }
}
