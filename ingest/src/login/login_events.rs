//! `POST /login-events`: opt-ins reported by the business's own backend right after a
//! successful Facebook Login in which the person granted `user_messenger_contact`.
//!
//! Meta's FAQ says the `login_id` exists as soon as the login succeeds, before the webhook
//! arrives; Meta's official sample computes it from the person's app-scoped id with the
//! app's client token ([`lc_meta::login::login_id`]). That formula comes from the sample,
//! not from Meta's reference documentation, so this path is optional: the route answers `404`
//! unless `LOGIN_EVENTS_SECRETS` and `LOGIN_EVENTS_CLIENT_TOKENS` are configured.
//!
//! An accepted login event becomes exactly what a webhook opt-in becomes: a [`QueuedEvent`]
//! of kind `optin` (source `login_event`) on `messenger.webhook`, acknowledged `200` only
//! after the broker confirmed it. The scheduler keys opt-ins by (page, login_id), so the
//! webhook opt-in for the same login, before or after, is a duplicate: one message.
//!
//! A login event may carry `variables` for the page's personalised first message; they are
//! bounded here ([`MessageVariables`]) and refused with `400` naming what was wrong, before
//! anything is published.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use lc_meta::login::event_signature::{EventSignatureVerifier, LOGIN_SIGNATURE_HEADER};
use lc_meta::login::login_id::{compute_login_id, is_facebook_id};
use lc_meta::pages::MessageVariables;
use lc_meta::secret::Secret;
use lc_meta::webhook::{EventKind, QueuedEvent};
use lc_shared::amqp::BrokerLink;
use lc_shared::outgoing as publish;
use lc_shared::telemetry::{TraceParent, login_id_label};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tracing::Instrument;

use super::answer::{error, not_enabled};
use super::args::LoginArgs;
use super::metrics::LoginMetrics;

/// Unix milliseconds below this are 1973 or earlier: almost surely seconds sent by mistake
/// (and the webhook parser would read them as seconds).
const MIN_PLAUSIBLE_MS: i64 = 100_000_000_000;

/// The router state of `POST /login-events`: everything its handler needs.
pub(super) struct LoginEvents {
    verifier: EventSignatureVerifier,
    tokens: HashMap<String, Secret>,
    /// Empty: any page.
    pages: Vec<String>,
    max_skew: Duration,
    link: BrokerLink,
    confirm_timeout: Duration,
    metrics: LoginMetrics,
}

impl LoginEvents {
    /// The state from validated [`LoginArgs`], or `None` when the endpoint is not configured.
    pub(super) fn configured(
        args: &LoginArgs,
        link: &BrokerLink,
        confirm_timeout: Duration,
        metrics: &LoginMetrics,
    ) -> Option<Arc<Self>> {
        if !args.login_events_enabled() {
            return None;
        }
        let max_skew = Duration::from_secs(args.login_events_max_skew_secs);
        tracing::info!(
            apps = args.client_tokens.len(),
            "POST /login-events enabled"
        );
        Some(Arc::new(Self {
            verifier: EventSignatureVerifier::new(&args.login_events_secrets, max_skew),
            tokens: args
                .client_tokens
                .iter()
                .map(|t| (t.app_id.clone(), t.token.clone()))
                .collect(),
            pages: args.pages(),
            max_skew,
            link: link.clone(),
            confirm_timeout,
            metrics: metrics.clone(),
        }))
    }
}

/// The route `POST /login-events`, answering `404` when `events` is `None`. Generic over the
/// outer router's state because it carries its own.
pub(super) fn routes<S: Clone + Send + Sync + 'static>(
    events: Option<Arc<LoginEvents>>,
) -> Router<S> {
    Router::new()
        .route("/login-events", post(login_event))
        .with_state(events)
}

/// `POST /login-events`.
async fn login_event(
    State(events): State<Option<Arc<LoginEvents>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(events) = events.as_deref() else {
        return not_enabled(
            "POST /login-events",
            "LOGIN_EVENTS_SECRETS and LOGIN_EVENTS_CLIENT_TOKENS",
        );
    };
    let trace = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse)
        .map_or_else(TraceParent::new_root, |t| t.child());
    let span = tracing::info_span!("login_event", trace_id = %trace.trace_id_hex());
    let (result, response) = handle(events, &headers, &body, &trace)
        .instrument(span)
        .await;
    events
        .metrics
        .login_events
        .with_label_values(&[result])
        .inc();
    response
}

/// The fields of a login event, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginEvent {
    /// The person's app-scoped user id.
    pub asid: String,
    /// The Login app.
    pub app_id: String,
    /// The Page the person opted in to.
    pub page_id: String,
    /// When the login succeeded, unix milliseconds.
    pub logged_in_at_ms: i64,
    /// Variables for the page's personalised first message (`variables`, optional).
    pub variables: MessageVariables,
}

/// Why a body is not a usable login event: `BadRequest` → 400, `Unprocessable` → 422.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginEventError {
    /// Not JSON, or a field missing or of the wrong type.
    #[error("{0}")]
    BadRequest(String),
    /// Well-formed, but a value cannot be accepted.
    #[error("{0}")]
    Unprocessable(String),
}

fn id_field(obj: &serde_json::Map<String, Value>, name: &str) -> Result<String, LoginEventError> {
    let id = match obj.get(name) {
        Some(Value::String(s)) => s.trim().to_owned(),
        Some(Value::Number(n)) if n.is_u64() => n.to_string(),
        None | Some(Value::Null) => {
            return Err(LoginEventError::BadRequest(format!(
                "missing field `{name}`"
            )));
        }
        Some(_) => {
            return Err(LoginEventError::BadRequest(format!(
                "field `{name}` must be a string of digits"
            )));
        }
    };
    if !is_facebook_id(&id) {
        return Err(LoginEventError::Unprocessable(format!(
            "field `{name}` must be a Facebook id (digits only)"
        )));
    }
    Ok(id)
}

/// Parses a login event body: `{asid, app_id, page_id, logged_in_at}` where ids are strings
/// of digits (or JSON integers) and `logged_in_at` is RFC 3339 text or unix milliseconds.
pub fn parse_login_event(body: &[u8]) -> Result<LoginEvent, LoginEventError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| LoginEventError::BadRequest(format!("body is not valid JSON: {e}")))?;
    let obj = value.as_object().ok_or_else(|| {
        LoginEventError::BadRequest(
            "body must be a JSON object {asid, app_id, page_id, logged_in_at}".into(),
        )
    })?;
    let asid = id_field(obj, "asid")?;
    let app_id = id_field(obj, "app_id")?;
    let page_id = id_field(obj, "page_id")?;
    let logged_in_at_ms = match obj.get("logged_in_at") {
        Some(Value::String(s)) => {
            let t = OffsetDateTime::parse(s.trim(), &Rfc3339).map_err(|_| {
                LoginEventError::BadRequest(
                    "field `logged_in_at` must be RFC 3339 (e.g. 2024-05-01T12:00:00Z) or \
                     unix milliseconds"
                        .into(),
                )
            })?;
            i64::try_from(t.unix_timestamp_nanos() / 1_000_000).map_err(|_| {
                LoginEventError::Unprocessable("field `logged_in_at` is out of range".into())
            })?
        }
        Some(Value::Number(n)) => n.as_i64().ok_or_else(|| {
            LoginEventError::BadRequest(
                "field `logged_in_at` must be an integer of unix milliseconds".into(),
            )
        })?,
        None | Some(Value::Null) => {
            return Err(LoginEventError::BadRequest(
                "missing field `logged_in_at`".into(),
            ));
        }
        Some(_) => {
            return Err(LoginEventError::BadRequest(
                "field `logged_in_at` must be RFC 3339 text or unix milliseconds".into(),
            ));
        }
    };
    if logged_in_at_ms < MIN_PLAUSIBLE_MS {
        return Err(LoginEventError::Unprocessable(
            "field `logged_in_at` is before 1973: send unix milliseconds, not seconds".into(),
        ));
    }
    // Bounded here, before anything is published: they are stored with the opt-in.
    let variables = match obj.get("variables") {
        None | Some(Value::Null) => MessageVariables::default(),
        Some(v) => MessageVariables::from_json(v)
            .map_err(|e| LoginEventError::BadRequest(e.to_string()))?,
    };
    Ok(LoginEvent {
        asid,
        app_id,
        page_id,
        logged_in_at_ms,
        variables,
    })
}

/// The queued opt-in for `login_id`: the same shape a webhook opt-in has, so the scheduler
/// cannot tell them apart except by `source`. Variables, when there are any, travel as
/// `optin.variables` (read by the scheduler only from `source: "login_event"`).
pub fn queued_optin(
    page_id: &str,
    login_id: &str,
    timestamp_ms: i64,
    variables: &MessageVariables,
) -> Result<QueuedEvent, serde_json::Error> {
    let mut optin = json!({ "login_id": login_id });
    if !variables.is_empty() {
        optin["variables"] = serde_json::to_value(variables)?;
    }
    let item = json!({
        "recipient": { "id": page_id },
        "timestamp": timestamp_ms,
        "optin": optin,
    });
    Ok(QueuedEvent {
        page_id: page_id.to_owned(),
        kind: EventKind::Optin,
        source: "login_event".to_owned(),
        timestamp_ms,
        idempotency_key: format!("optin:{page_id}:{login_id}:{timestamp_ms}"),
        event: serde_json::value::to_raw_value(&item)?,
    })
}

/// Verifies, validates, publishes. Returns the metrics label and the answer.
async fn handle(
    ev: &LoginEvents,
    headers: &HeaderMap,
    body: &Bytes,
    trace: &TraceParent,
) -> (&'static str, Response) {
    let now = OffsetDateTime::now_utc();
    let header = headers
        .get(LOGIN_SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok());
    if let Err(e) = ev.verifier.verify(header, body, now.unix_timestamp()) {
        tracing::warn!(reason = e.reason(), "login event refused: {e}");
        return (
            "unauthorized",
            error(StatusCode::UNAUTHORIZED, e.to_string()),
        );
    }
    let event = match parse_login_event(body) {
        Ok(event) => event,
        Err(LoginEventError::BadRequest(m)) => {
            return ("bad_request", error(StatusCode::BAD_REQUEST, m));
        }
        Err(LoginEventError::Unprocessable(m)) => {
            return ("unprocessable", error(StatusCode::UNPROCESSABLE_ENTITY, m));
        }
    };
    let unprocessable = |m: String| ("unprocessable", error(StatusCode::UNPROCESSABLE_ENTITY, m));
    let Some(token) = ev.tokens.get(&event.app_id) else {
        return unprocessable(format!(
            "unknown app_id {}: no client token is configured for it (LOGIN_EVENTS_CLIENT_TOKENS)",
            event.app_id
        ));
    };
    if !ev.pages.is_empty() && !ev.pages.contains(&event.page_id) {
        return unprocessable(format!(
            "page_id {} is not one of this deployment's pages (LOGIN_PAGE_IDS)",
            event.page_id
        ));
    }
    let now_ms = i64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
    let skew_ms = i64::try_from(ev.max_skew.as_millis()).unwrap_or(i64::MAX);
    if event.logged_in_at_ms > now_ms.saturating_add(skew_ms) {
        return unprocessable("field `logged_in_at` is in the future".into());
    }
    let login_id = compute_login_id(token, &event.asid, &event.app_id, &event.page_id);
    let message = queued_optin(
        &event.page_id,
        &login_id,
        event.logged_in_at_ms,
        &event.variables,
    )
    .and_then(|q| publish::event_message_from_queued(&q, &trace.to_string()));
    let message = match message {
        Ok(m) => m,
        Err(e) => {
            // Serialising our own JSON of strings and numbers cannot fail.
            tracing::error!(error = %e, "cannot encode a login event");
            return (
                "unavailable",
                error(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode the event"),
            );
        }
    };
    match publish::publish_all(&ev.link, vec![message], ev.confirm_timeout).await {
        Ok(_) => {
            tracing::info!(
                page_id = %event.page_id,
                app_id = %event.app_id,
                login_id = %login_id_label(&login_id),
                "login event accepted as an opt-in"
            );
            let opted_in_at = OffsetDateTime::from_unix_timestamp_nanos(
                i128::from(event.logged_in_at_ms) * 1_000_000,
            )
            .ok()
            .and_then(|t| t.format(&Rfc3339).ok());
            (
                "accepted",
                (
                    StatusCode::OK,
                    axum::Json(json!({
                        "login_id": login_id,
                        "page_id": event.page_id,
                        "opted_in_at": opted_in_at,
                    })),
                )
                    .into_response(),
            )
        }
        Err(e) => {
            tracing::error!(error = %e, "login event not stored; answering 503");
            (
                "unavailable",
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the event could not be stored; retry later",
                ),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use lc_meta::webhook::EventDetails;

    use super::*;

    #[test]
    fn parses_both_time_forms() {
        let a = parse_login_event(
            br#"{"asid":"1","app_id":"2","page_id":"3","logged_in_at":"2023-11-14T22:13:20Z"}"#,
        )
        .expect("rfc3339");
        let b = parse_login_event(
            br#"{"asid":1,"app_id":2,"page_id":3,"logged_in_at":1700000000000,"extra":true}"#,
        )
        .expect("ms");
        assert_eq!(a, b);
        assert_eq!(a.logged_in_at_ms, 1_700_000_000_000);
    }

    #[test]
    fn classifies_bad_bodies() {
        let bad_request =
            |b: &[u8]| matches!(parse_login_event(b), Err(LoginEventError::BadRequest(_)));
        let unprocessable =
            |b: &[u8]| matches!(parse_login_event(b), Err(LoginEventError::Unprocessable(_)));
        assert!(bad_request(b"not json"));
        assert!(bad_request(b"[]"));
        assert!(bad_request(br#"{"asid":"1","app_id":"2","page_id":"3"}"#));
        assert!(bad_request(
            br#"{"asid":true,"app_id":"2","page_id":"3","logged_in_at":1}"#
        ));
        assert!(bad_request(
            br#"{"asid":"1","app_id":"2","page_id":"3","logged_in_at":"yesterday"}"#
        ));
        assert!(unprocessable(
            br#"{"asid":"1_2","app_id":"2","page_id":"3","logged_in_at":1700000000000}"#
        ));
        assert!(unprocessable(
            br#"{"asid":"1","app_id":"2","page_id":"3","logged_in_at":1700000000}"#
        ));
        // Variables: an object of bounded strings, or a 400 naming what was wrong.
        let with = |v: &str| {
            parse_login_event(
                format!(
                    r#"{{"asid":"1","app_id":"2","page_id":"3","logged_in_at":1700000000000,"variables":{v}}}"#
                )
                .as_bytes(),
            )
        };
        assert_eq!(
            with(r#"{"first_name":"Ada"}"#)
                .expect("valid")
                .variables
                .as_map()
                .get("first_name")
                .map(String::as_str),
            Some("Ada")
        );
        assert!(with("null").expect("null is none").variables.is_empty());
        for bad in [r#""Ada""#, r#"{"n":1}"#, r#"{"first name":"x"}"#] {
            assert!(
                matches!(with(bad), Err(LoginEventError::BadRequest(m)) if m.contains("variable")),
                "{bad}"
            );
        }
    }

    #[test]
    fn queued_optin_parses_like_a_webhook_optin() {
        let q = queued_optin(
            "222",
            "abc",
            1_700_000_000_123,
            &MessageVariables::default(),
        )
        .expect("queued");
        assert_eq!(q.idempotency_key, "optin:222:abc:1700000000123");
        let ev = q.parse().expect("parses");
        assert_eq!(ev.kind, EventKind::Optin);
        assert_eq!(ev.page_id, "222");
        assert_eq!(ev.idempotency_key, q.idempotency_key);
        let EventDetails::Optin(optin) = ev.details else {
            panic!("not an opt-in");
        };
        assert_eq!(optin.login_id, "abc");
        assert_eq!(
            ev.timestamp.unix_timestamp_nanos(),
            1_700_000_000_123_000_000
        );
    }
}
