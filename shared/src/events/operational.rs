//! Operational events: a page's sending paused or resumed, its webhook subscription lost or
//! restored. They go through the same outbox and onto the same exchange as the public events
//! (routing key `<kind>.<page_id>`), so a technology provider can tell its client at once
//! instead of reading a log line. Each is written in the transaction of the state change it
//! announces and only when that change really happened, so it is emitted once per change
//! however many replicas saw the cause.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Every operational event kind (the routing key without its page).
pub const OPERATIONAL_KINDS: [&str; 4] = [
    "page.paused",
    "page.resumed",
    "subscription.lost",
    "subscription.restored",
];

/// Why a page stopped sending first messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PausedReason {
    /// Graph refused the page token (code 190): paused until a new token or an operator's
    /// resume.
    TokenInvalid,
    /// Graph says the page is restricted from sending: paused until an operator's resume.
    Restricted,
    /// Graph throttled the page (rate limits, usage headers): resumes by itself at the end.
    Throttled,
    /// An operator paused the page (admin API, `loginconnect pages pause`): paused until an
    /// operator's resume.
    Operator,
}

/// What lifted a pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResumedBy {
    /// A new page token was stored (CLI, admin API) or configured (pages file).
    NewToken,
    /// An operator resumed the page (`loginconnect pages resume`).
    Operator,
    /// The throttle's time ran out.
    ThrottleEnded,
}

/// `data` of `page.paused`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PagePaused {
    /// The page.
    pub page_id: String,
    /// The app the page belongs to (see [`super::app_of_page_sql`]); set by the outbox.
    pub app_id: String,
    /// Why it is paused.
    pub reason: PausedReason,
    /// When the pause started.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    /// What Graph said (never a token), or until when a throttle runs.
    pub detail: Option<String>,
}

/// `data` of `page.resumed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PageResumed {
    /// The page.
    pub page_id: String,
    /// The app the page belongs to; set by the outbox.
    pub app_id: String,
    /// The reason of the pause that ended.
    pub reason: PausedReason,
    /// What ended it.
    pub resumed_by: ResumedBy,
    /// When it ended.
    #[serde(with = "time::serde::rfc3339")]
    pub resumed_at: OffsetDateTime,
}

/// `data` of `subscription.lost`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubscriptionLost {
    /// The page.
    pub page_id: String,
    /// The app whose subscription is missing; set by the outbox.
    pub app_id: String,
    /// What was missing: `app` (the app was not subscribed at all) or webhook field names.
    pub missing: Vec<String>,
    /// When the watchdog found it missing.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
}

/// `data` of `subscription.restored`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubscriptionRestored {
    /// The page.
    pub page_id: String,
    /// The app subscribed again; set by the outbox.
    pub app_id: String,
    /// Since when it had been missing.
    #[serde(with = "time::serde::rfc3339")]
    pub lost_since: OffsetDateTime,
    /// When the watchdog found it complete again (or subscribed it again).
    #[serde(with = "time::serde::rfc3339")]
    pub restored_at: OffsetDateTime,
}

/// One operational event, before it is wrapped in a CloudEvent.
#[derive(Debug, Clone, PartialEq)]
pub enum OperationalEvent {
    /// A page stopped sending.
    PagePaused(PagePaused),
    /// A page sends again.
    PageResumed(PageResumed),
    /// The app's webhook subscription of a page is missing (or lacks a field).
    SubscriptionLost(SubscriptionLost),
    /// It is complete again.
    SubscriptionRestored(SubscriptionRestored),
}

impl OperationalEvent {
    /// The event kind: the routing key without its page, and the last part of the `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::PagePaused(_) => "page.paused",
            Self::PageResumed(_) => "page.resumed",
            Self::SubscriptionLost(_) => "subscription.lost",
            Self::SubscriptionRestored(_) => "subscription.restored",
        }
    }

    /// The page the event is about.
    pub fn page_id(&self) -> &str {
        match self {
            Self::PagePaused(d) => &d.page_id,
            Self::PageResumed(d) => &d.page_id,
            Self::SubscriptionLost(d) => &d.page_id,
            Self::SubscriptionRestored(d) => &d.page_id,
        }
    }

    /// The `data` member as JSON.
    pub fn data(&self) -> serde_json::Value {
        let v = match self {
            Self::PagePaused(d) => serde_json::to_value(d),
            Self::PageResumed(d) => serde_json::to_value(d),
            Self::SubscriptionLost(d) => serde_json::to_value(d),
            Self::SubscriptionRestored(d) => serde_json::to_value(d),
        };
        // Strings, enums, lists of strings and formatted times: serialising cannot fail.
        v.unwrap_or(serde_json::Value::Null)
    }
}
