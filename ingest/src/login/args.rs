//! The settings of the Login half of ingest ([`LoginArgs`]) and their validation.

use lc_meta::login::login_id::{AppClientToken, is_facebook_id};
use lc_meta::secret::Secret;

/// Settings of the Login half of ingest (login events and data deletion); all optional.
#[derive(Debug, Clone, clap::Args)]
pub struct LoginArgs {
    /// Shared secrets of `POST /login-events` signatures, comma-separated (rotation: any may
    /// sign). Separate from Meta's app secret. Setting it enables the endpoint.
    #[arg(
        long = "login-events-secrets",
        env = "LOGIN_EVENTS_SECRETS",
        value_delimiter = ',',
        value_parser = crate::config::trimmed_secret,
        hide_env_values = true
    )]
    pub login_events_secrets: Vec<Secret>,

    /// Largest allowed distance between a login event's signed timestamp and now (seconds).
    #[arg(
        long = "login-events-max-skew-secs",
        env = "LOGIN_EVENTS_MAX_SKEW_SECS",
        default_value_t = 300
    )]
    pub login_events_max_skew_secs: u64,

    /// Client tokens of the Login apps as `app_id=token`, comma-separated; used to compute
    /// login_ids (login events and data deletion).
    #[arg(
        long = "login-events-client-tokens",
        env = "LOGIN_EVENTS_CLIENT_TOKENS",
        value_delimiter = ',',
        value_parser = crate::config::ClientTokenParser,
        hide_env_values = true
    )]
    pub client_tokens: Vec<AppClientToken>,

    /// Page ids the Login half serves, comma-separated. Login events for other pages are
    /// refused (when set); data deletion derives login_ids for these pages (required there).
    #[arg(long = "login-page-ids", env = "LOGIN_PAGE_IDS", value_delimiter = ',')]
    pub page_ids: Vec<String>,

    /// Public base URL of this ingest (e.g. `https://hooks.example.com`) used in the status
    /// URL of data deletion answers. Setting it enables `POST /data-deletion`.
    #[arg(
        long = "data-deletion-status-base-url",
        env = "DATA_DELETION_STATUS_BASE_URL"
    )]
    pub data_deletion_base_url: Option<String>,

    /// Oldest `issued_at` a data deletion callback may carry (seconds before now); older
    /// ones are refused as replays. A request seen again within it is the same request.
    #[arg(
        long = "data-deletion-max-age-secs",
        env = "DATA_DELETION_MAX_AGE_SECS",
        default_value_t = 3600
    )]
    pub data_deletion_max_age_secs: u64,

    /// PostgreSQL URL, read (never written): by `GET /data-deletion/{code}` (required with
    /// data deletion), and for the page registry's app bindings — with it, a page bound to
    /// an app accepts only deliveries signed by that app's secret.
    #[arg(long = "database-url", env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<Secret>,
}

impl Default for LoginArgs {
    /// Everything off, as when no variable is set.
    fn default() -> Self {
        Self {
            login_events_secrets: Vec::new(),
            login_events_max_skew_secs: 300,
            client_tokens: Vec::new(),
            page_ids: Vec::new(),
            data_deletion_base_url: None,
            data_deletion_max_age_secs: 3600,
            database_url: None,
        }
    }
}

impl LoginArgs {
    /// True when `POST /login-events` is configured.
    pub fn login_events_enabled(&self) -> bool {
        !self.login_events_secrets.is_empty()
    }

    /// True when `POST /data-deletion` is configured.
    pub fn data_deletion_enabled(&self) -> bool {
        self.data_deletion_base_url.is_some()
    }

    /// Checks what clap cannot; messages name the variable to fix, never a value.
    pub fn validate(&self) -> Result<(), String> {
        let mut apps: Vec<&str> = self
            .client_tokens
            .iter()
            .map(|t| t.app_id.as_str())
            .collect();
        apps.sort_unstable();
        if apps.windows(2).any(|w| w[0] == w[1]) {
            return Err("LOGIN_EVENTS_CLIENT_TOKENS lists an app id twice".into());
        }
        if let Some(bad) = self.page_ids.iter().find(|p| !is_facebook_id(p.trim())) {
            return Err(format!("LOGIN_PAGE_IDS: {bad:?} is not a page id (digits)"));
        }
        if self.login_events_enabled() {
            if self.login_events_secrets.iter().any(Secret::is_empty) {
                return Err("LOGIN_EVENTS_SECRETS must not contain empty secrets".into());
            }
            if self.client_tokens.is_empty() {
                return Err(
                    "LOGIN_EVENTS_SECRETS is set but LOGIN_EVENTS_CLIENT_TOKENS is empty: \
                     login events need app_id=client_token pairs to compute login_ids"
                        .into(),
                );
            }
            if !(1..=86_400).contains(&self.login_events_max_skew_secs) {
                return Err("LOGIN_EVENTS_MAX_SKEW_SECS must be between 1 and 86400".into());
            }
        }
        if let Some(base) = &self.data_deletion_base_url {
            let ok = (base.starts_with("https://") || base.starts_with("http://"))
                && !base.contains(['?', '#', ' ']);
            if !ok {
                return Err(
                    "DATA_DELETION_STATUS_BASE_URL must be an absolute http(s) URL \
                     without query or fragment, e.g. https://hooks.example.com"
                        .into(),
                );
            }
            if self.client_tokens.is_empty() || self.page_ids.is_empty() {
                return Err("data deletion (DATA_DELETION_STATUS_BASE_URL) needs \
                     LOGIN_EVENTS_CLIENT_TOKENS and LOGIN_PAGE_IDS to derive the person's \
                     login_ids"
                    .into());
            }
            if !(60..=7 * 86_400).contains(&self.data_deletion_max_age_secs) {
                return Err("DATA_DELETION_MAX_AGE_SECS must be between 60 and 604800".into());
            }
            if self.database_url.is_none() {
                return Err(
                    "data deletion (DATA_DELETION_STATUS_BASE_URL) needs DATABASE_URL \
                     for its status endpoint"
                        .into(),
                );
            }
        }
        Ok(())
    }

    /// The configured page ids, trimmed.
    pub fn pages(&self) -> Vec<String> {
        self.page_ids.iter().map(|p| p.trim().to_owned()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_variable() {
        let mut args = LoginArgs {
            login_events_secrets: vec![Secret::new("s")],
            ..LoginArgs::default()
        };
        assert!(
            args.validate()
                .expect_err("no tokens")
                .contains("LOGIN_EVENTS_CLIENT_TOKENS")
        );
        args.client_tokens = vec!["1=t".parse().expect("token")];
        assert_eq!(args.validate(), Ok(()));
        args.data_deletion_base_url = Some("https://hooks.example.com".into());
        assert!(
            args.validate()
                .expect_err("no pages")
                .contains("LOGIN_PAGE_IDS")
        );
        args.page_ids = vec!["3".into()];
        assert!(args.validate().expect_err("no db").contains("DATABASE_URL"));
        args.database_url = Some(Secret::new("postgres://x"));
        assert_eq!(args.validate(), Ok(()));
        args.data_deletion_base_url = Some("hooks.example.com".into());
        assert!(args.validate().is_err());
    }
}
