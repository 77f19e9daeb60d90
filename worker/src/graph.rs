//! The Graph API client: the Send API call for the initial message, the page subscription
//! endpoints and a token check. Its rooms: [`mod@classify`], what a failure asks of the caller
//! ([`FailureClass`]); [`usage`], Graph's hints about its limits; [`reach`], whether the
//! calls reach Graph (for `/readyz`).
//!
//! Every answer's usage headers (`X-App-Usage`, `X-Page-Usage`, `X-Business-Use-Case-Usage`)
//! are parsed into a [`usage::Usage`], on successes too: Graph throttles at 100 % of any
//! metric, and the caller can only slow down *before* that if it sees the numbers climb
//! ([`usage::slow_down_factor`]).
//!
//! Tokens travel in the `Authorization: Bearer` header, never in a URL (URLs end up in logs
//! and traces). When a page has an app secret, `appsecret_proof` (an HMAC of the token, not
//! the token) goes in the query string. No error text produced here contains the token:
//! Graph can echo a token back in its error message, so messages are scrubbed.

pub mod classify;
pub mod reach;
pub mod usage;

use std::fmt;
use std::time::Duration;

pub use classify::{FailureClass, GraphFailure, classify};
use hmac::{Hmac, KeyInit, Mac};
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use reqwest::{Method, Url};
use serde_json::{Value, json};
use sha2::Sha256;
use time::OffsetDateTime;
use usage::{Usage, parse_usage, wait_asked};

use lc_meta::pages::{OutgoingMessage, PageConfig};

/// How long to wait for a TCP/TLS connection to Graph; requests have their own timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bodies larger than this are not read: Graph answers are a few hundred bytes.
const MAX_BODY_BYTES: usize = 1 << 20;
/// The usage headers read on every answer (any of them may be absent).
const USAGE_HEADERS: [&str; 3] = ["x-app-usage", "x-page-usage", "x-business-use-case-usage"];

/// A Graph API client. Cheap to clone: clones share one connection pool.
#[derive(Clone)]
pub struct GraphClient {
    http: reqwest::Client,
    base: Url,
    reach: reach::GraphReach,
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
        Ok(Self {
            http,
            base,
            reach: reach::GraphReach::default(),
        })
    }

    /// Whether this client's calls (and its clones') reach Graph, for `/readyz`.
    pub fn reach(&self) -> reach::GraphReach {
        self.reach.clone()
    }

    /// The base URL in use (with the version, without a trailing slash).
    pub fn base_url(&self) -> &str {
        self.base.as_str()
    }

    /// Sends the page's own first message (no variant) to `login_id`; see
    /// [`GraphClient::send_message`].
    pub async fn send_first_message(
        &self,
        page: &PageConfig,
        login_id: &str,
        traceparent: Option<&str>,
    ) -> SendOutcome {
        let message = page.first_message.default_message();
        self.send_message(page, &message, login_id, traceparent)
            .await
    }

    /// Sends `message` (already rendered and within Meta's limits) to `login_id`:
    /// `POST {base}/{page_id}/messages`.
    ///
    /// `traceparent` (W3C) is passed on when given, so the call joins the caller's trace.
    pub async fn send_message(
        &self,
        page: &PageConfig,
        message: &OutgoingMessage,
        login_id: &str,
        traceparent: Option<&str>,
    ) -> SendOutcome {
        let body = json!({
            "recipient": { "login_id": login_id },
            "messaging_type": "UPDATE",
            "message": message,
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
    /// classified failure. Whether it reached Graph is recorded ([`reach`]).
    async fn call(
        &self,
        page: &PageConfig,
        method: Method,
        url: Url,
        body: Option<&Value>,
        traceparent: Option<&str>,
    ) -> Result<Answer, GraphFailure> {
        let result = self.call_once(page, method, url, body, traceparent).await;
        self.reach.record(result.as_ref().err());
        result
    }

    /// [`GraphClient::call`] without the recording.
    async fn call_once(
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
