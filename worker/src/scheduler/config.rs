//! Settings of the `scheduler` binary, from flags and environment variables, and their
//! checks at start-up.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::store::Timing;
use super::store::rescue::UnknownOutcome;
use crate::runtime::config::{StartError, WorkerArgs};
use crate::watchdog;

/// Settings of the `scheduler` binary.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "scheduler",
    version,
    about = "Sends every opted-in person one first message before the 24-hour deadline."
)]
pub struct SchedulerConfig {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub worker: WorkerArgs,

    /// Address of the `/metrics`, `/healthz`, `/readyz` endpoints.
    #[arg(
        long = "metrics-addr",
        env = "METRICS_ADDR",
        default_value = "0.0.0.0:9101"
    )]
    pub metrics_addr: SocketAddr,

    /// TOML file of the pages this deployment messages for (see the README), imported into
    /// the page registry at start and whenever it changes. Optional when pages are managed
    /// through the admin API.
    #[arg(long = "pages-file", env = "PAGES_FILE")]
    pub pages_file: Option<PathBuf>,

    /// Graph API base URL including the version.
    #[arg(long = "graph-api-url", env = "GRAPH_API_URL", default_value = lc_shared::config::DEFAULT_GRAPH_API_URL)]
    pub graph_api_url: String,

    /// Timeout of one Send API call (milliseconds).
    #[arg(
        long = "graph-timeout-ms",
        env = "GRAPH_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub graph_timeout_ms: u64,

    /// Delay between the opt-in and the first message (seconds).
    #[arg(long = "send-delay-secs", env = "SEND_DELAY_SECS", default_value_t = 0)]
    pub send_delay_secs: u64,

    /// No Send API call starts this close to the deadline (seconds).
    #[arg(
        long = "safety-margin-secs",
        env = "SAFETY_MARGIN_SECS",
        default_value_t = 120
    )]
    pub safety_margin_secs: u64,

    /// Length of the first-message window (seconds); Meta's rule is 24 hours.
    #[arg(
        long = "window-secs",
        env = "WINDOW_SECS",
        default_value_t = 86_400,
        hide = true
    )]
    pub window_secs: u64,

    /// Most Send API calls in flight in this replica (twice as many rows may be claimed: a row
    /// waiting for its page's send slot holds no call's place).
    #[arg(
        long = "max-in-flight",
        env = "MAX_IN_FLIGHT_SENDS",
        default_value_t = 256
    )]
    pub max_in_flight: usize,

    /// How far ahead (milliseconds) a replica claims a page's send slots; at most half the
    /// lease is used. A row waiting for its slot holds an in-flight place: shorter lets other
    /// pages in sooner and keeps places for calls; the dispatcher claims again every half
    /// look-ahead while busy, so a page's slots do not run out between claims.
    #[arg(
        long = "claim-lookahead-ms",
        env = "CLAIM_LOOKAHEAD_MS",
        default_value_t = 250
    )]
    pub claim_lookahead_ms: u64,

    /// Keys of page tokens stored in the database (`loginconnect pages set-token`):
    /// comma-separated `id:base64-of-32-bytes`, the first one encrypts.
    #[arg(
        long = "page-token-keys",
        env = "PAGE_TOKEN_KEYS",
        default_value = "",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub page_token_keys: String,

    /// Send API calls per second per page (Meta allows 300).
    #[arg(
        long = "page-rate-limit",
        env = "PAGE_RATE_LIMIT",
        default_value_t = 250
    )]
    pub page_rate_limit: u32,

    /// Lease of a claimed opt-in (seconds); must exceed the Graph timeout.
    #[arg(long = "lease-secs", env = "LEASE_SECS", default_value_t = 60)]
    pub lease_secs: u64,

    /// Rows claimed per query.
    #[arg(long = "claim-batch", env = "CLAIM_BATCH", default_value_t = 100)]
    pub claim_batch: i64,

    /// Poll interval for later sends and lease rescue (milliseconds).
    #[arg(long = "poll-ms", env = "SCHEDULER_POLL_MS", default_value_t = 1000)]
    pub poll_ms: u64,

    /// First retry delay ceiling (milliseconds); doubles per attempt, fully jittered.
    #[arg(long = "retry-base-ms", env = "RETRY_BASE_MS", default_value_t = 2000)]
    pub retry_base_ms: u64,

    /// Largest retry delay ceiling (seconds).
    #[arg(long = "retry-cap-secs", env = "RETRY_CAP_SECS", default_value_t = 900)]
    pub retry_cap_secs: u64,

    /// Draw retry delays uniformly below the ceiling (full jitter). Tests turn it off to see
    /// the exponential ceilings themselves.
    #[arg(long = "retry-jitter", env = "RETRY_JITTER", default_value_t = true, action = clap::ArgAction::Set, hide = true)]
    pub retry_jitter: bool,

    /// Attempts after which unknown Graph error codes stop being retried.
    #[arg(
        long = "max-unknown-attempts",
        env = "MAX_UNKNOWN_ATTEMPTS",
        default_value_t = 5
    )]
    pub max_unknown_attempts: i32,

    /// Attempts after which any opt-in gives up.
    #[arg(long = "max-attempts", env = "MAX_ATTEMPTS", default_value_t = 50)]
    pub max_attempts: i32,

    /// What a claim whose lease expired becomes: `fail` (never twice; default) or `retry`.
    #[arg(long = "unknown-outcome", env = "UNKNOWN_OUTCOME", value_enum, default_value_t = UnknownOutcome::Fail)]
    pub unknown_outcome: UnknownOutcome,

    /// Delete finished opt-ins after this many days (0 keeps them).
    #[arg(
        long = "retention-days",
        env = "OPTIN_RETENTION_DAYS",
        default_value_t = 30
    )]
    pub retention_days: u64,

    /// Retention in seconds, overriding `OPTIN_RETENTION_DAYS` (benchmarks and tests prune
    /// rows finished moments ago; not for production).
    #[arg(long = "retention-secs", env = "OPTIN_RETENTION_SECS", hide = true)]
    pub retention_secs: Option<u64>,

    /// The webhook subscription watchdog (off until `META_APP_ID` is set).
    #[command(flatten)]
    pub watchdog: watchdog::WatchdogArgs,
}

impl SchedulerConfig {
    /// The deadline arithmetic these settings ask for.
    pub fn timing(&self) -> Timing {
        Timing {
            send_delay: Duration::from_secs(self.send_delay_secs),
            safety_margin: Duration::from_secs(self.safety_margin_secs),
            window: Duration::from_secs(self.window_secs),
        }
    }

    /// How long finished opt-ins are kept (zero: forever).
    pub fn retention(&self) -> Duration {
        Duration::from_secs(
            self.retention_secs
                .unwrap_or_else(|| self.retention_days.saturating_mul(86_400)),
        )
    }

    /// How far ahead send slots are claimed: `CLAIM_LOOKAHEAD_MS`, at most half the lease (a
    /// claim must not run out before its slot comes).
    pub fn lookahead(&self) -> Duration {
        Duration::from_millis(self.claim_lookahead_ms).min(Duration::from_secs(self.lease_secs) / 2)
    }

    /// Refuses settings that contradict each other, naming the variables to change.
    pub fn validate(&self) -> Result<(), StartError> {
        if self.lease_secs * 1000 <= self.graph_timeout_ms {
            return Err(StartError::Config(format!(
                "LEASE_SECS ({}) must be longer than GRAPH_TIMEOUT_MS ({} ms), or a slow call would look like a dead worker",
                self.lease_secs, self.graph_timeout_ms
            )));
        }
        if self.safety_margin_secs >= self.window_secs {
            return Err(StartError::Config(
                "SAFETY_MARGIN_SECS must be shorter than the 24-hour window".into(),
            ));
        }
        Ok(())
    }
}
