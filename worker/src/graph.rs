//! The Graph API client: the Send API call for the initial message, the page subscription
//! endpoints, a token check, and the classification of every answer into what the caller
//! should do next ([`FailureClass`]).
//!
//! Every answer's usage headers (`X-App-Usage`, `X-Page-Usage`, `X-Business-Use-Case-Usage`)
//! are parsed into a [`Usage`], on successes too: Graph throttles at 100 % of any metric, and
//! the caller can only slow down *before* that if it sees the numbers climb
//! ([`slow_down_factor`]).
//!
//! Tokens travel in the `Authorization: Bearer` header, never in a URL (URLs end up in logs
//! and traces). When a page has an app secret, `appsecret_proof` (an HMAC of the token, not
//! the token) goes in the query string. No error text produced here contains the token:
//! Graph can echo a token back in its error message, so messages are scrubbed.

use std::fmt;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use reqwest::{Method, Url};
use serde_json::{Value, json};
use sha2::Sha256;
use time::{OffsetDateTime, PrimitiveDateTime};

use lc_meta::pages::PageConfig;

/// How long to wait for a TCP/TLS connection to Graph; requests have their own timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bodies larger than this are not read: Graph answers are a few hundred bytes.
const MAX_BODY_BYTES: usize = 1 << 20;
/// Upper bound for a server-suggested wait: no opt-in lives longer than 24 h.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);
/// The usage headers read on every answer (any of them may be absent).
const USAGE_HEADERS: [&str; 3] = ["x-app-usage", "x-page-usage", "x-business-use-case-usage"];
/// How deep [`parse_usage`] looks into a usage header's JSON. The real shapes are at most
/// three levels deep (business id → list → entry); a hostile header gets no deeper walk.
const MAX_USAGE_DEPTH: usize = 6;

/// A Graph API client. Cheap to clone: clones share one connection pool.
#[derive(Clone)]
pub struct GraphClient {
    http: reqwest::Client,
    base: Url,
}

impl fmt::Debug for GraphClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The client never holds tokens, but say only what is useful anyway.
        f.debug_struct("GraphClient")
            .field("base_url", &self.base.as_str())
            .finish_non_exhaustive()
    }
}

/// The client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// `GRAPH_API_URL` is not an absolute http(s) URL.
    #[error(
        "invalid Graph API base URL {url:?}: {reason}; set GRAPH_API_URL to e.g. \
         https://graph.facebook.com/v25.0"
    )]
    InvalidBaseUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The HTTP client could not be built (TLS setup).
    #[error("cannot build the HTTP client for Graph: {0}")]
    Client(#[source] reqwest::Error),
}

/// A page app subscription, from `GET /{page_id}/subscribed_apps`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct SubscribedApp {
    /// The app id.
    pub id: String,
    /// The app name, when Graph gives it.
    #[serde(default)]
    pub name: Option<String>,
    /// The webhook fields the app receives for this page.
    #[serde(default)]
    pub subscribed_fields: Vec<String>,
}

/// The result of a Send API call.
#[derive(Debug, Clone, PartialEq)]
pub enum SendOutcome {
    /// Graph accepted the message.
    Sent {
        /// Graph's `message_id` (`m_...`).
        message_id: String,
        /// The PSID, when Graph returns one (it may not for `login_id` recipients).
        recipient_id: Option<String>,
        /// The usage headers of the answer, when Graph sent any: a success can already say
        /// that the next calls will be throttled.
        usage: Option<Usage>,
    },
    /// Graph, or the way to it, failed; [`GraphFailure::class`] says what to do.
    Failed(GraphFailure),
}

/// What the caller should do after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureClass {
    /// The request provably did not take effect (a refused connection, a 408) or Graph said
    /// its error is temporary (codes 2, 1200, …): retry with backoff.
    Transient,
    /// Graph's code 1, "unknown error", which missing permissions can also cause: Meta's
    /// advice is to retry once with backoff, then treat it as permanent
    /// ([`FailureClass::attempt_limit`]).
    TransientOnce,
    /// A rate limit of this page (or of its users/business): retry after `retry_after` if
    /// given, else with a longer backoff.
    RateLimited,
    /// Code 4, the app's request limit: the throttling applies to every page of the app, so
    /// the caller slows all of them down, not only this one; retry as for `RateLimited`.
    AppThrottled,
    /// Code 10/1893063, the page is temporarily restricted from sending: every send of the
    /// page would fail alike, so the caller pauses the page (and alerts) instead of failing
    /// its opt-ins one by one, until an operator who checked the Page resumes it.
    PageRestricted,
    /// Retrying cannot help (bad recipient, window closed, permission, config). Also used
    /// where the message may already have been sent, so a blind retry risks a duplicate.
    Permanent,
    /// The page token is invalid or expired: pause the page and alert, don't burn attempts.
    TokenInvalid,
    /// A code this table does not know: retry a bounded number of times.
    Unknown,
    /// The request may have reached Graph but no usable answer came back (a timeout or a
    /// connection lost after sending, a 5xx without a Graph error body from a gateway in
    /// front of Graph, a success without a message id): the message may have been sent, so
    /// a retry could message the person twice. The caller's policy decides.
    OutcomeUnknown,
}

impl FailureClass {
    /// Every class, for pre-registering metric labels.
    pub const ALL: [FailureClass; 9] = [
        Self::Transient,
        Self::TransientOnce,
        Self::RateLimited,
        Self::AppThrottled,
        Self::PageRestricted,
        Self::Permanent,
        Self::TokenInvalid,
        Self::Unknown,
        Self::OutcomeUnknown,
    ];

    /// A stable lower-case name, for metrics labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Transient => "transient",
            Self::TransientOnce => "transient_once",
            Self::RateLimited => "rate_limited",
            Self::AppThrottled => "app_throttled",
            Self::PageRestricted => "page_restricted",
            Self::Permanent => "permanent",
            Self::TokenInvalid => "token_invalid",
            Self::Unknown => "unknown",
            Self::OutcomeUnknown => "outcome_unknown",
        }
    }

    /// The most attempts of one opt-in (the first one included) that Meta's advice allows
    /// when the last failure was of this class; `None` leaves the bound to the caller's own
    /// settings. Only [`FailureClass::TransientOnce`] has one: 2, the first try and one retry.
    /// The count is of all attempts, whatever failed before, because a retry budget per error
    /// code would need a history the caller does not keep.
    pub fn attempt_limit(self) -> Option<u32> {
        match self {
            Self::TransientOnce => Some(2),
            _ => None,
        }
    }
}

impl fmt::Display for FailureClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed Graph call, with everything Graph said about it.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphFailure {
    /// What to do next.
    pub class: FailureClass,
    /// The HTTP status; `None` when no response arrived (network error, timeout).
    pub http_status: Option<u16>,
    /// Graph's `error.code`.
    pub code: Option<i64>,
    /// Graph's `error.error_subcode`.
    pub subcode: Option<i64>,
    /// Graph's `error.message`, or a description of the failure; never contains the token.
    pub message: String,
    /// Graph's `error.fbtrace_id`, for Meta support.
    pub fbtrace_id: Option<String>,
    /// How long Graph asks us to wait: `Retry-After`, else the usage headers'
    /// `estimated_time_to_regain_access`.
    pub retry_after: Option<Duration>,
    /// The usage headers of the answer, when one came with any.
    pub usage: Option<Usage>,
}

impl fmt::Display for GraphFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Graph call failed ({}", self.class)?;
        if let Some(s) = self.http_status {
            write!(f, ", HTTP {s}")?;
        }
        if let Some(c) = self.code {
            write!(f, ", code {c}")?;
            if let Some(s) = self.subcode {
                write!(f, "/{s}")?;
            }
        }
        write!(f, "): {}", self.message)?;
        if let Some(t) = &self.fbtrace_id {
            write!(f, " [fbtrace_id {t}]")?;
        }
        Ok(())
    }
}

impl std::error::Error for GraphFailure {}

impl GraphFailure {
    /// A failure without a Graph error body.
    fn local(class: FailureClass, http_status: Option<u16>, message: impl Into<String>) -> Self {
        Self {
            class,
            http_status,
            code: None,
            subcode: None,
            message: message.into(),
            fbtrace_id: None,
            retry_after: None,
            usage: None,
        }
    }
}

/// Classifies a Graph answer by Meta's Send API error reference (code, subcode and what each
/// asks of the caller), as the match below spells it out.
///
/// `code` wins over the HTTP status (Graph's advice: branch on code/subcode). Without a
/// code, by the status:
///
/// | status | class | why |
/// | --- | --- | --- |
/// | none | `Transient` | only used for "never sent" (a refused connection); `call` decides timeouts itself |
/// | 408 | `Transient` | the server gave up *waiting for* the request, so it did not process it |
/// | 429 | `RateLimited` | |
/// | 5xx | `OutcomeUnknown` | a gateway's 502/504 can come after Graph sent the message |
/// | other | `Unknown` | |
///
/// With a code (Meta's table; the match below is the reference):
///
/// | code – subcode | class |
/// | --- | --- |
/// | 1 – 1357046 | `OutcomeUnknown` (messages may have been sent) |
/// | 1 (other) | `TransientOnce` (retry once, then permanent) |
/// | 2 – 2018344 | `Permanent` |
/// | 2, 1200, 2018321 | `Transient` |
/// | 4 – 2018354 | `Permanent` |
/// | 4 – 2018022 | `RateLimited` (per page) |
/// | 4 (other) | `AppThrottled` (the app's limit, all pages) |
/// | 613 – 2018338 / 1893016 | `Permanent` |
/// | 17, 32, 341, 368, 613, 80006 | `RateLimited` |
/// | 190 | `TokenInvalid` |
/// | 10 – 1893063 | `PageRestricted` |
/// | 10, 100, 200–299, 551, 2018300, 2022 | `Permanent` |
/// | anything else | `Unknown` |
pub fn classify(http_status: Option<u16>, code: Option<i64>, subcode: Option<i64>) -> FailureClass {
    use FailureClass::*;
    let Some(code) = code else {
        return match http_status {
            // A 408 says the server timed out waiting for the request: it was not processed.
            None | Some(408) => Transient,
            Some(429) => RateLimited,
            // No Graph error body: a gateway (load balancer, proxy) answered, and a 502/504
            // can come after Graph already sent the message. A retry could send it twice.
            Some(500..=599) => OutcomeUnknown,
            Some(_) => Unknown,
        };
    };
    match (code, subcode) {
        // "Received invalid JSON reply": the message may have gone out; reconcile, don't retry.
        (1, Some(1357046)) => OutcomeUnknown,
        // Unknown error, which missing permissions also cause: one retry, then permanent.
        (1, _) => TransientOnce,
        // Custom labels terms not accepted: a configuration problem.
        (2, Some(2018344)) => Permanent,
        (2 | 1200 | 2018321, _) => Transient,
        // Marketing-message frequency: skipping is the only option.
        (4, Some(2018354)) => Permanent,
        // Sends to phone numbers of this page (legacy): a per-page limit.
        (4, Some(2018022)) => RateLimited,
        // The app's request limit: throttling every page of the app helps, one page doesn't.
        (4, _) => AppThrottled,
        // Tag abuse warning / duplicate marketing opt-in: retrying makes it worse.
        (613, Some(2018338 | 1893016)) => Permanent,
        (17 | 32 | 341 | 368 | 613 | 80006, _) => RateLimited,
        (190, _) => TokenInvalid,
        // The page may not send for a while: every opt-in of the page would fail alike.
        (10, Some(1893063)) => PageRestricted,
        (10 | 100 | 200..=299 | 551 | 2018300 | 2022, _) => Permanent,
        _ => Unknown,
    }
}

/// The wait Graph asks for: `Retry-After` if present and valid (see
/// [`parse_retry_after_header`]), else the largest `estimated_time_to_regain_access` above
/// zero in the usage header `usage` (see [`parse_usage`]). Malformed values are ignored; the
/// result is capped at 24 h.
pub fn parse_retry_after(retry_after: Option<&str>, usage: Option<&str>) -> Option<Duration> {
    wait_asked(retry_after, parse_usage(usage), OffsetDateTime::now_utc())
}

/// [`parse_retry_after`] with the usage headers already parsed: `Retry-After` wins (it is
/// about this very answer), else the usage's regain time.
fn wait_asked(
    retry_after: Option<&str>,
    usage: Option<Usage>,
    now: OffsetDateTime,
) -> Option<Duration> {
    retry_after
        .and_then(|v| parse_retry_after_header(v, now))
        .or_else(|| usage.and_then(|u| u.regain_after))
}

/// A `Retry-After` value (RFC 9110 §10.2.3) as a wait from `now`: whole seconds, or an HTTP
/// date in IMF-fixdate form (`Wed, 21 Oct 2015 07:28:00 GMT`; a date in the past is no wait).
/// `None` for anything else, including the obsolete RFC 850 and asctime date forms, which no
/// current server sends. Capped at 24 h: no opt-in lives longer.
pub fn parse_retry_after_header(value: &str, now: OffsetDateTime) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        // A negative difference (a date in the past) fails the conversion: no wait.
        Err(_) => Duration::try_from(parse_http_date(value)? - now).unwrap_or(Duration::ZERO),
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// An IMF-fixdate (`Wed, 21 Oct 2015 07:28:00 GMT`). The weekday is not checked against the
/// date: it adds nothing, and a server that gets it wrong still means the date.
fn parse_http_date(value: &str) -> Option<OffsetDateTime> {
    let (_weekday, rest) = value.split_once(", ")?;
    let format = time::macros::format_description!(
        "[day] [month repr:short case_sensitive:false] [year] [hour]:[minute]:[second] GMT"
    );
    PrimitiveDateTime::parse(rest.trim(), format)
        .ok()
        .map(PrimitiveDateTime::assume_utc)
}

/// How close Graph's throttling is, from the usage headers of one answer.
///
/// Graph throttles at 100 % of any metric of any of the headers, so only the largest value
/// matters for pacing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    /// The largest `call_count`, `total_cputime` or `total_time` (percent of the limit) in
    /// `X-App-Usage`, `X-Page-Usage` or `X-Business-Use-Case-Usage`; 0 when the headers only
    /// had a regain time. May exceed 100.
    pub percent: f64,
    /// The largest `estimated_time_to_regain_access` above zero (Graph gives minutes),
    /// capped at 24 h: Graph refuses calls until then.
    pub regain_after: Option<Duration>,
}

impl Usage {
    /// The share of the normal send rate to use after this answer: 0 while Graph says access
    /// must be regained, else [`slow_down_factor`] of [`Usage::percent`].
    pub fn rate_factor(&self) -> f64 {
        if self.regain_after.is_some() {
            0.0
        } else {
            slow_down_factor(self.percent)
        }
    }
}

/// Usage at or above which the rate starts to go down.
const SLOW_DOWN_FROM_PERCENT: f64 = 75.0;
/// Usage at or above which only [`SLOWEST_RATE_FACTOR`] of the rate is left.
const SLOWEST_FROM_PERCENT: f64 = 95.0;
/// The share of the rate used just below 100 %, so that usage can still be observed falling.
const SLOWEST_RATE_FACTOR: f64 = 0.1;
/// Usage at which Graph throttles: no calls.
const PAUSE_AT_PERCENT: f64 = 100.0;

/// The share (0..=1) of its normal send rate a caller should use at `usage_percent` of a
/// Graph limit, so that it slows down *before* Graph throttles at 100 % (throttled calls fail
/// and the penalty can last hours):
///
/// - below 75 %: full speed (1.0);
/// - 75 % to 95 %: down linearly from 1.0 to 0.1;
/// - 95 % up to 100 %: 0.1 (a trickle, so that fresh usage numbers keep coming);
/// - 100 % and above: 0.0, pause until the usage falls (or the regain time passes).
///
/// A NaN or negative usage says nothing, like no header at all: full speed.
pub fn slow_down_factor(usage_percent: f64) -> f64 {
    if usage_percent.is_nan() || usage_percent < SLOW_DOWN_FROM_PERCENT {
        1.0
    } else if usage_percent >= PAUSE_AT_PERCENT {
        0.0
    } else if usage_percent >= SLOWEST_FROM_PERCENT {
        SLOWEST_RATE_FACTOR
    } else {
        let progress = (usage_percent - SLOW_DOWN_FROM_PERCENT)
            / (SLOWEST_FROM_PERCENT - SLOW_DOWN_FROM_PERCENT);
        1.0 - progress * (1.0 - SLOWEST_RATE_FACTOR)
    }
}

/// Parses usage header values (`X-App-Usage`, `X-Page-Usage`, `X-Business-Use-Case-Usage`,
/// in any mix and number) into one [`Usage`]; `None` when none of them has a usable
/// percentage or a regain time above zero (no header is not the same as zero usage).
///
/// Liberal, because the formats are loosely documented and differ by header: each value is
/// JSON (raw bytes, so that a non-ASCII business name does not spoil a header), walked a few
/// levels deep through objects and arrays (so `X-App-Usage`'s flat object
/// and the business-id-keyed arrays of `X-Business-Use-Case-Usage` read alike); `call_count`,
/// `total_cputime`, `total_time` and `estimated_time_to_regain_access` count wherever they
/// are, as numbers or numeric strings; negative, non-finite and non-numeric values, invalid
/// JSON and everything else are ignored. Never panics.
pub fn parse_usage<I, V>(values: I) -> Option<Usage>
where
    I: IntoIterator<Item = V>,
    V: AsRef<[u8]>,
{
    let mut found = UsageScan::default();
    for value in values {
        if let Ok(json) = serde_json::from_slice::<Value>(value.as_ref()) {
            found.walk(&json, 0);
        }
    }
    let regain_after = found
        .regain_minutes
        .filter(|m| *m > 0.0)
        // Finite and positive, and capped before the conversion: cannot panic.
        .map(|m| Duration::from_secs_f64((m * 60.0).min(MAX_RETRY_AFTER.as_secs_f64())));
    if found.percent.is_none() && regain_after.is_none() {
        return None;
    }
    Some(Usage {
        percent: found.percent.unwrap_or(0.0),
        regain_after,
    })
}

/// The largest values seen so far by [`parse_usage`].
#[derive(Default)]
struct UsageScan {
    percent: Option<f64>,
    regain_minutes: Option<f64>,
}

impl UsageScan {
    fn walk(&mut self, value: &Value, depth: usize) {
        if depth > MAX_USAGE_DEPTH {
            return;
        }
        match value {
            Value::Object(map) => {
                for (key, v) in map {
                    match key.as_str() {
                        "call_count" | "total_cputime" | "total_time" => {
                            Self::raise(&mut self.percent, usage_number(v));
                        }
                        "estimated_time_to_regain_access" => {
                            Self::raise(&mut self.regain_minutes, usage_number(v));
                        }
                        _ => self.walk(v, depth + 1),
                    }
                }
            }
            Value::Array(items) => {
                for v in items {
                    self.walk(v, depth + 1);
                }
            }
            _ => {}
        }
    }

    fn raise(slot: &mut Option<f64>, value: Option<f64>) {
        if let Some(v) = value {
            *slot = Some(slot.map_or(v, |old| old.max(v)));
        }
    }
}

/// A usage number: a JSON number or a numeric string, finite and not negative.
fn usage_number(v: &Value) -> Option<f64> {
    v.as_f64()
        .or_else(|| v.as_str()?.trim().parse().ok())
        .filter(|n: &f64| n.is_finite() && *n >= 0.0)
}

/// `appsecret_proof`: hex(HMAC-SHA256(key = app secret, message = access token)).
pub fn appsecret_proof(app_secret: &str, access_token: &str) -> String {
    // HMAC accepts keys of any length, so the error branch is unreachable; an empty proof
    // would make Graph reject the call (a visible error), never send an unsigned one.
    match Hmac::<Sha256>::new_from_slice(app_secret.as_bytes()) {
        Ok(mut mac) => {
            mac.update(access_token.as_bytes());
            hex::encode(mac.finalize().into_bytes())
        }
        Err(_) => String::new(),
    }
}

/// A successful answer's parsed JSON body and usage headers.
struct Answer {
    body: Value,
    usage: Option<Usage>,
}

impl GraphClient {
    /// A client for `base_url` (with the version, e.g. `https://graph.facebook.com/v25.0`;
    /// a trailing slash is fine). Connect timeout 2 s; `request_timeout` bounds each call.
    pub fn new(base_url: &str, request_timeout: Duration) -> Result<Self, GraphError> {
        let invalid = |reason: &str| GraphError::InvalidBaseUrl {
            url: base_url.to_owned(),
            reason: reason.to_owned(),
        };
        let mut base = Url::parse(base_url.trim()).map_err(|e| invalid(&e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(invalid("the scheme must be http or https"));
        }
        if base.cannot_be_a_base() {
            return Err(invalid("not a base URL"));
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(invalid("no query string or fragment allowed"));
        }
        base.path_segments_mut()
            .map_err(|()| invalid("not a base URL"))?
            .pop_if_empty();
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(request_timeout)
            .user_agent(concat!("loginconnect/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(GraphError::Client)?;
        Ok(Self { http, base })
    }

    /// The base URL in use (with the version, without a trailing slash).
    pub fn base_url(&self) -> &str {
        self.base.as_str()
    }

    /// Sends the page's first message to `login_id`: `POST {base}/{page_id}/messages`.
    ///
    /// `traceparent` (W3C) is passed on when given, so the call joins the caller's trace.
    pub async fn send_first_message(
        &self,
        page: &PageConfig,
        login_id: &str,
        traceparent: Option<&str>,
    ) -> SendOutcome {
        let body = json!({
            "recipient": { "login_id": login_id },
            "messaging_type": "UPDATE",
            "message": page.first_message,
        });
        let url = self.url(page, &[&page.id, "messages"], &[]);
        let answer = match self
            .call(page, Method::POST, url, Some(&body), traceparent)
            .await
        {
            Ok(a) => a,
            Err(f) => return SendOutcome::Failed(f),
        };
        match answer.body.get("message_id").and_then(Value::as_str) {
            Some(id) if !id.is_empty() => SendOutcome::Sent {
                message_id: id.to_owned(),
                recipient_id: answer
                    .body
                    .get("recipient_id")
                    .and_then(id_string)
                    .map(str::to_owned),
                usage: answer.usage,
            },
            _ => SendOutcome::Failed(GraphFailure {
                usage: answer.usage,
                ..GraphFailure::local(
                    FailureClass::OutcomeUnknown,
                    Some(200),
                    "Graph answered success without a message_id; the message may or may not \
                     have been sent",
                )
            }),
        }
    }

    /// The apps subscribed to the page's webhooks: `GET {base}/{page_id}/subscribed_apps`.
    ///
    /// Only the first result page is read; a page has a handful of apps at most.
    pub async fn subscribed_apps(
        &self,
        page: &PageConfig,
    ) -> Result<Vec<SubscribedApp>, GraphFailure> {
        let url = self.url(page, &[&page.id, "subscribed_apps"], &[]);
        let answer = self.call(page, Method::GET, url, None, None).await?;
        let data = answer.body.get("data").cloned().unwrap_or(Value::Null);
        serde_json::from_value(data).map_err(|e| {
            GraphFailure::local(
                FailureClass::Unknown,
                Some(200),
                format!("unexpected subscribed_apps answer (no valid `data` list): {e}"),
            )
        })
    }

    /// Subscribes this app to the page's webhook `fields`:
    /// `POST {base}/{page_id}/subscribed_apps?subscribed_fields=a,b,c`.
    pub async fn subscribe_app(
        &self,
        page: &PageConfig,
        fields: &[&str],
    ) -> Result<(), GraphFailure> {
        let fields = fields.join(",");
        let url = self.url(
            page,
            &[&page.id, "subscribed_apps"],
            &[("subscribed_fields", &fields)],
        );
        let answer = self.call(page, Method::POST, url, None, None).await?;
        if answer.body.get("success").and_then(Value::as_bool) == Some(true) {
            Ok(())
        } else {
            Err(GraphFailure::local(
                FailureClass::Unknown,
                Some(200),
                "Graph did not answer {\"success\": true} to the subscription",
            ))
        }
    }

    /// Checks the page token works and belongs to this page: `GET {base}/me?fields=id`.
    ///
    /// A token of another page (or of a user) is reported as [`FailureClass::TokenInvalid`].
    pub async fn check_token(&self, page: &PageConfig) -> Result<(), GraphFailure> {
        let url = self.url(page, &["me"], &[("fields", "id")]);
        let answer = self.call(page, Method::GET, url, None, None).await?;
        match answer.body.get("id").and_then(id_string) {
            Some(id) if id == page.id => Ok(()),
            Some(id) => Err(GraphFailure::local(
                FailureClass::TokenInvalid,
                Some(200),
                format!(
                    "the token of page {} belongs to object {id}; configure that page's own token",
                    page.id
                ),
            )),
            None => Err(GraphFailure::local(
                FailureClass::Unknown,
                Some(200),
                "unexpected /me answer without an id",
            )),
        }
    }

    /// `{base}/{segments..}?{query}&appsecret_proof=..`; segments are percent-encoded.
    fn url(&self, page: &PageConfig, segments: &[&str], query: &[(&str, &str)]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.extend(segments);
        }
        let proof = page
            .app_secret
            .as_ref()
            .map(|s| appsecret_proof(s.expose(), page.access_token.expose()));
        if !query.is_empty() || proof.is_some() {
            let mut pairs = url.query_pairs_mut();
            pairs.extend_pairs(query);
            if let Some(proof) = &proof {
                pairs.append_pair("appsecret_proof", proof);
            }
        }
        url
    }

    /// One Graph call: 2xx with a JSON body that is not an error → `Ok`; anything else → a
    /// classified failure.
    async fn call(
        &self,
        page: &PageConfig,
        method: Method,
        url: Url,
        body: Option<&Value>,
        traceparent: Option<&str>,
    ) -> Result<Answer, GraphFailure> {
        let token = page.access_token.expose();
        let scrub = |text: &str| scrub(text, page);
        let mut auth = HeaderValue::try_from(format!("Bearer {token}")).map_err(|_| {
            GraphFailure::local(
                FailureClass::TokenInvalid,
                None,
                format!(
                    "the token of page {} has characters not allowed in an HTTP header; fix PAGES_FILE",
                    page.id
                ),
            )
        })?;
        // Keeps the value out of any Debug output of the request in reqwest/hyper.
        auth.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, auth);
        if let Some(tp) = traceparent.and_then(|t| HeaderValue::from_str(t).ok()) {
            headers.insert("traceparent", tp);
        }
        let path = url.path().to_owned();
        let mut request = self.http.request(method.clone(), url).headers(headers);
        if let Some(body) = body {
            request = request.json(body);
        }
        let mut response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                // Only a failed connection proves Graph never saw the request; after that
                // (a timeout, a reset) the message may have gone out.
                let (kind, class) = if e.is_connect() {
                    ("cannot connect", FailureClass::Transient)
                } else if e.is_timeout() {
                    ("timeout", FailureClass::OutcomeUnknown)
                } else {
                    ("network error after sending", FailureClass::OutcomeUnknown)
                };
                // `without_url`: the URL carries appsecret_proof.
                let text = scrub(&format!("{kind}: {}", error_chain(&e.without_url())));
                tracing::debug!(page_id = %page.id, %method, %path, error = %text, "Graph call failed");
                return Err(GraphFailure::local(class, None, text));
            }
        };
        let status = response.status().as_u16();
        // Read on every answer, success or not: a climbing usage is the warning before the
        // throttling.
        let usage = parse_usage(
            USAGE_HEADERS
                .iter()
                .flat_map(|name| response.headers().get_all(*name))
                .map(HeaderValue::as_bytes),
        );
        let retry_after = wait_asked(
            response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            usage,
            OffsetDateTime::now_utc(),
        );
        let bytes = match read_body(&mut response).await {
            Ok(b) => b,
            Err(e) => {
                let text = scrub(&format!(
                    "reading the answer failed: {}",
                    error_chain(&e.without_url())
                ));
                let mut f =
                    GraphFailure::local(classify(Some(status), None, None), Some(status), text);
                if (200..300).contains(&status) {
                    // A 2xx whose body was lost: the call may have worked.
                    f.class = FailureClass::OutcomeUnknown;
                }
                f.retry_after = retry_after;
                f.usage = usage;
                return Err(f);
            }
        };
        let parsed: Option<Value> = serde_json::from_slice(&bytes).ok();
        if let Some(error) = parsed
            .as_ref()
            .and_then(|v| v.get("error"))
            .filter(|e| e.is_object())
        {
            let code = error.get("code").and_then(int);
            let subcode = error.get("error_subcode").and_then(int);
            let message = error.get("message").and_then(Value::as_str).map_or_else(
                || format!("Graph error without a message (HTTP {status})"),
                scrub,
            );
            let failure = GraphFailure {
                class: classify(Some(status), code, subcode),
                http_status: Some(status),
                code,
                subcode,
                message,
                fbtrace_id: error
                    .get("fbtrace_id")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                retry_after,
                usage,
            };
            tracing::debug!(page_id = %page.id, %method, %path, error = %failure, "Graph call failed");
            return Err(failure);
        }
        match parsed {
            Some(body) if (200..300).contains(&status) => {
                tracing::debug!(page_id = %page.id, %method, %path, status, "Graph call ok");
                Ok(Answer { body, usage })
            }
            _ => {
                let snippet: String = String::from_utf8_lossy(&bytes).chars().take(200).collect();
                let class = if (200..300).contains(&status) {
                    // A 2xx we cannot read: the call may have worked.
                    FailureClass::OutcomeUnknown
                } else {
                    classify(Some(status), None, None)
                };
                let mut f = GraphFailure::local(
                    class,
                    Some(status),
                    scrub(&format!(
                        "HTTP {status} without a Graph JSON answer: {}",
                        snippet.trim()
                    )),
                );
                f.retry_after = retry_after;
                f.usage = usage;
                tracing::debug!(page_id = %page.id, %method, %path, error = %f, "Graph call failed");
                Err(f)
            }
        }
    }
}

/// Reads at most [`MAX_BODY_BYTES`]; the rest of an oversized body is dropped.
async fn read_body(response: &mut reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = MAX_BODY_BYTES.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= MAX_BODY_BYTES {
            break;
        }
    }
    Ok(out)
}

/// Graph sends codes as numbers; accept digit strings too, defensively.
fn int(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_str()?.trim().parse().ok())
}

/// Ids are strings in Graph answers; `id_string` refuses anything else.
fn id_string(v: &Value) -> Option<&str> {
    v.as_str().filter(|s| !s.is_empty())
}

/// An error and its sources, `: `-joined (reqwest's Display alone hides the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Removes the page's token and app secret from a text (Graph may echo a token back).
fn scrub(text: &str, page: &PageConfig) -> String {
    let mut out = text.to_owned();
    let secrets = std::iter::once(&page.access_token).chain(page.app_secret.as_ref());
    for secret in secrets {
        if !secret.is_empty() && out.contains(secret.expose()) {
            out = out.replace(secret.expose(), "[redacted]");
        }
    }
    out
}

#[cfg(test)]
mod tests;
