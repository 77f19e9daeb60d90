//! The registry's records and the inputs of its operations (JSON as the admin API speaks it).

use lc_meta::pages::FirstMessage;
use serde::{Deserialize, Deserializer, Serialize};
use time::OffsetDateTime;

/// Who created a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PageOrigin {
    /// Imported from `PAGES_FILE`.
    File,
    /// Created through the admin API or the CLI.
    Api,
}

impl PageOrigin {
    /// The value stored in `pages.source`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Api => "api",
        }
    }

    /// The origin stored as `s`.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::File, Self::Api]
            .into_iter()
            .find(|o| o.as_str() == s)
    }
}

/// A Meta app pages belong to. Secrets are named by environment variable, never held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct App {
    /// The Meta app id.
    pub app_id: String,
    /// The environment variable holding the app secret on every replica.
    pub app_secret_env: String,
    /// A separate Facebook Login app, if any.
    pub login_app_id: Option<String>,
    /// The environment variable holding the Login app's client token, if any.
    pub client_token_env: Option<String>,
    /// When it was created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it last changed.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// A new app.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewApp {
    /// The Meta app id (digits).
    pub app_id: String,
    /// The environment variable holding the app secret.
    pub app_secret_env: String,
    /// A separate Facebook Login app, if any.
    #[serde(default)]
    pub login_app_id: Option<String>,
    /// The environment variable holding the Login app's client token.
    #[serde(default)]
    pub client_token_env: Option<String>,
}

/// A page as the registry holds it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page {
    /// The Facebook Page id.
    pub page_id: String,
    /// The app it belongs to (`None`: the deployment's own app).
    pub app_id: Option<String>,
    /// A name for people.
    pub name: Option<String>,
    /// The first message, the JSON of [`FirstMessage`] as stored.
    pub first_message: serde_json::Value,
    /// Send API calls per second; `None`: the schedulers' `PAGE_RATE_LIMIT`.
    pub rate_limit: Option<u32>,
    /// Who created it.
    pub source: PageOrigin,
    /// Whether the pages file, as last imported, has it.
    pub in_pages_file: bool,
    /// When it was created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it last changed.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// A new page (admin API `POST /pages`, `loginconnect pages create`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewPage {
    /// The Facebook Page id (digits).
    pub page_id: String,
    /// The app it belongs to (must exist), if any.
    #[serde(default)]
    pub app_id: Option<String>,
    /// A name for people.
    #[serde(default)]
    pub name: Option<String>,
    /// The first message.
    pub first_message: FirstMessage,
    /// Send API calls per second (default: `PAGE_RATE_LIMIT`).
    #[serde(default)]
    pub rate_limit: Option<u32>,
}

/// A change of a page: only the fields given change (`rate_limit: null` clears the page's
/// own limit, back to `PAGE_RATE_LIMIT`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageUpdate {
    /// A new first message.
    #[serde(default)]
    pub first_message: Option<FirstMessage>,
    /// A new limit (`Some(None)`: clear it).
    #[serde(default, deserialize_with = "present")]
    pub rate_limit: Option<Option<u32>>,
    /// A new name (`Some(None)`: clear it).
    #[serde(default, deserialize_with = "present")]
    pub name: Option<Option<String>>,
}

/// A field that is present (even as `null`) becomes `Some`, so `null` can clear a value.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// Where a replica gets a page's token from, as far as the registry can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenOrigin {
    /// Stored encrypted in the database (API or `pages set-token`); wins over the file.
    Stored,
    /// Given by the pages file (`access_token` / `access_token_env`).
    PagesFile,
    /// None: no replica can send for the page until a token is set.
    Missing,
}

/// What a page is doing now, as every replica sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PageCondition {
    /// Sending.
    Active,
    /// Paused until a resume (or, for `token_invalid`, a new token).
    Paused,
    /// Meta's webhook subscription is lost: no opt-in arrives.
    Unsubscribed,
    /// Graph throttled it for a while.
    Throttled,
    /// No token: nothing can be sent for it.
    NoToken,
}

/// A pause as shown to operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PauseInfo {
    /// `token_invalid`, `restricted` or `operator`.
    pub reason: String,
    /// Since when.
    #[serde(with = "time::serde::rfc3339::option")]
    pub since: Option<OffsetDateTime>,
    /// What Graph (or the operator's tool) said.
    pub detail: Option<String>,
}

/// One page's status (admin API `GET /pages/{page_id}/status`, `loginconnect pages list`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PageStatus {
    /// The page.
    pub page_id: String,
    /// The summary: paused first, then unsubscribed, throttled, no token, active.
    pub state: PageCondition,
    /// The pause, if any.
    pub paused: Option<PauseInfo>,
    /// Since when the webhook subscription is lost, if it is.
    #[serde(with = "time::serde::rfc3339::option")]
    pub unsubscribed_since: Option<OffsetDateTime>,
    /// Throttled until then, if in the future.
    #[serde(with = "time::serde::rfc3339::option")]
    pub throttled_until: Option<OffsetDateTime>,
    /// The rate in force (`None` until a scheduler has recorded the page).
    pub rate_limit: Option<i32>,
    /// The usage-header slow-down in force (1 = full speed).
    pub rate_factor: Option<f32>,
    /// Where the token comes from.
    pub token: TokenOrigin,
    /// Whether the pages file has the page.
    pub in_pages_file: bool,
}
