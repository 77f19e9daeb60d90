//! The Graph API client: the Send API call for the initial message, the page subscription
//! endpoints, a token check, and the classification of every answer into what the caller
//! should do next ([`FailureClass`]).
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

use lc_meta::pages::PageConfig;

/// How long to wait for a TCP/TLS connection to Graph; requests have their own timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bodies larger than this are not read: Graph answers are a few hundred bytes.
const MAX_BODY_BYTES: usize = 1 << 20;
/// Upper bound for a server-suggested wait: no opt-in lives longer than 24 h.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

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
    },
    /// Graph, or the way to it, failed; [`GraphFailure::class`] says what to do.
    Failed(GraphFailure),
}

/// What the caller should do after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureClass {
    /// Network trouble, timeout, 5xx, Graph's "temporary" codes: retry with backoff.
    Transient,
    /// A rate limit: retry after `retry_after` if given, else with a longer backoff.
    RateLimited,
    /// Retrying cannot help (bad recipient, window closed, permission, config). Also used
    /// where the message may already have been sent, so a blind retry risks a duplicate.
    Permanent,
    /// The page token is invalid or expired: pause the page and alert, don't burn attempts.
    TokenInvalid,
    /// A code this table does not know: retry a bounded number of times.
    Unknown,
    /// The request may have reached Graph but no usable answer came back (a timeout or a
    /// connection lost after sending, a success without a message id): the message may have
    /// been sent, so a retry could message the person twice. The caller's policy decides.
    OutcomeUnknown,
}

impl FailureClass {
    /// A stable lower-case name, for metrics labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Transient => "transient",
            Self::RateLimited => "rate_limited",
            Self::Permanent => "permanent",
            Self::TokenInvalid => "token_invalid",
            Self::Unknown => "unknown",
            Self::OutcomeUnknown => "outcome_unknown",
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
    /// How long Graph asks us to wait (`Retry-After` or `X-Business-Use-Case-Usage`).
    pub retry_after: Option<Duration>,
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
        }
    }
}

/// Classifies a Graph answer by Meta's Send API error reference (code, subcode and what each
/// asks of the caller), as the match below spells it out.
///
/// `code` wins over the HTTP status (Graph's advice: branch on code/subcode). Without a
/// code: no response or a 5xx/408 is transient, 429 rate-limited, anything else unknown.
pub fn classify(http_status: Option<u16>, code: Option<i64>, subcode: Option<i64>) -> FailureClass {
    use FailureClass::*;
    let Some(code) = code else {
        return match http_status {
            None | Some(408) | Some(500..=599) => Transient,
            Some(429) => RateLimited,
            Some(_) => Unknown,
        };
    };
    match (code, subcode) {
        // "Received invalid JSON reply": the message may have gone out; reconcile, don't retry.
        // "Received invalid JSON reply": messages may have been sent.
        (1, Some(1357046)) => OutcomeUnknown,
        // Custom labels terms not accepted: a configuration problem.
        (2, Some(2018344)) => Permanent,
        (1 | 2 | 1200 | 2018321, _) => Transient,
        // Marketing-message frequency: skipping is the only option.
        (4, Some(2018354)) => Permanent,
        // Tag abuse warning / duplicate marketing opt-in: retrying makes it worse.
        (613, Some(2018338 | 1893016)) => Permanent,
        (4 | 17 | 32 | 341 | 368 | 613 | 80006, _) => RateLimited,
        (190, _) => TokenInvalid,
        (10 | 100 | 200..=299 | 551 | 2018300 | 2022, _) => Permanent,
        _ => Unknown,
    }
}

/// The wait Graph asks for: `Retry-After` (whole seconds) if present and valid, else the
/// largest `estimated_time_to_regain_access` (minutes) in `X-Business-Use-Case-Usage` when
/// above zero. Malformed values are ignored; the result is capped at 24 h.
pub fn parse_retry_after(retry_after: Option<&str>, buc_usage: Option<&str>) -> Option<Duration> {
    if let Some(secs) = retry_after.and_then(|v| v.trim().parse::<u64>().ok()) {
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    let usage: Value = serde_json::from_str(buc_usage?).ok()?;
    let minutes = usage
        .as_object()?
        .values()
        .filter_map(Value::as_array)
        .flatten()
        .filter_map(|entry| entry.get("estimated_time_to_regain_access"))
        .filter_map(|v| v.as_f64().or_else(|| v.as_str()?.trim().parse().ok()))
        .filter(|m| m.is_finite())
        .fold(0.0_f64, f64::max);
    (minutes > 0.0)
        .then(|| Duration::from_secs_f64((minutes * 60.0).min(MAX_RETRY_AFTER.as_secs_f64())))
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

/// A successful answer's parsed JSON body.
struct Answer {
    body: Value,
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
            },
            _ => SendOutcome::Failed(GraphFailure::local(
                FailureClass::OutcomeUnknown,
                Some(200),
                "Graph answered success without a message_id; the message may or may not \
                 have been sent",
            )),
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
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let retry_after = parse_retry_after(
            header("retry-after").as_deref(),
            header("x-business-use-case-usage").as_deref(),
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
            };
            tracing::debug!(page_id = %page.id, %method, %path, error = %failure, "Graph call failed");
            return Err(failure);
        }
        match parsed {
            Some(body) if (200..300).contains(&status) => {
                tracing::debug!(page_id = %page.id, %method, %path, status, "Graph call ok");
                Ok(Answer { body })
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
