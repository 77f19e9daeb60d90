//! HTTP routes of ingest: the webhook handshake and deliveries, health and readiness on the
//! main listener; metrics (with health and readiness again) on the admin listener
//! ([`admin_router`]), so a load balancer in front of the main one exposes no metrics.
//!
//! The handlers here only speak HTTP: they check signatures, publish what
//! [`crate::delivery`] makes of a body, count, and choose the status code. The Login half's
//! routes come in ready-made (see [`router`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, MatchedPath, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use lc_meta::secret::Secret;
use lc_meta::signature::{
    SIGNATURE_256_HEADER, SIGNATURE_SHA1_HEADER, SignatureError, constant_time_eq,
};
use lc_shared::amqp::BrokerLink;
use lc_shared::outgoing;
use lc_shared::readiness::{self, Check, CheckName, Readiness};
use lc_shared::shutdown::Shutdown;
use lc_shared::telemetry::{TraceParent, continue_trace, render_metrics};
use lc_shared::topology;
use tower_http::timeout::TimeoutLayer;
use tracing::Instrument;

use crate::binding::watch::{BindingsView, Source};
use crate::binding::{self, Screened};
use crate::config::IngestConfig;
use crate::delivery::{self, DeliveryMessages, Refused};
use crate::metrics::{IngestMetrics, method_label};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<StateInner>,
}

struct StateInner {
    bindings: BindingsView,
    verify_token: Secret,
    link: BrokerLink,
    metrics: IngestMetrics,
    confirm_timeout: Duration,
    shutdown: Shutdown,
}

impl AppState {
    /// Bundles the handlers' dependencies: the handshake token comes from `config`, the
    /// signature check from `bindings` (built from the same `META_APP_SECRETS`).
    pub fn new(
        config: &IngestConfig,
        bindings: BindingsView,
        link: BrokerLink,
        metrics: IngestMetrics,
        shutdown: Shutdown,
    ) -> Self {
        Self {
            inner: Arc::new(StateInner {
                bindings,
                verify_token: config.verify_token.clone(),
                link,
                metrics,
                confirm_timeout: config.confirm_timeout(),
                shutdown,
            }),
        }
    }
}

/// The whole HTTP surface of ingest: the routes here plus `login`, the Login half's routes
/// ([`crate::login::routes`]), merged inside the limits, counting and timeout so they apply
/// to every route alike.
pub fn router(
    state: AppState,
    login: Router<AppState>,
    max_body_bytes: usize,
    request_timeout: Duration,
) -> Router {
    Router::new()
        .route("/webhook", get(handshake).post(receive_delivery))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .merge(login)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        // Refuses a declared Content-Length over the limit with 413 before reading any of the
        // body (the limit above only trips once that much has arrived, so a client that
        // declares 100 MB and sends a trickle would hold the request until the timeout).
        // Inside the counting layer, so these 413s are counted like every other answer.
        .layer(tower_http::limit::RequestBodyLimitLayer::new(
            max_body_bytes,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            request_timeout,
        ))
        .with_state(state)
}

/// The admin listener's routes: `/metrics`, `/healthz`, `/readyz`.
pub fn admin_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn count_requests(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = method_label(req.method());
    let response = next.run(req).await;
    let label = format!("{method} {route}");
    state
        .inner
        .metrics
        .requests
        .with_label_values(&[label.as_str(), response.status().as_str()])
        .inc();
    response
}

/// `GET /webhook`: Meta's subscription handshake.
async fn handshake(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let mode = params.get("hub.mode").map(String::as_str);
    let token = params.get("hub.verify_token").map(String::as_str);
    let challenge = params.get("hub.challenge");
    match (mode, token, challenge) {
        (Some("subscribe"), Some(token), Some(challenge))
            if constant_time_eq(
                token.as_bytes(),
                state.inner.verify_token.expose().as_bytes(),
            ) =>
        {
            tracing::info!("webhook subscription handshake accepted");
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                challenge.clone(),
            )
                .into_response()
        }
        _ => {
            tracing::warn!(
                mode = mode.unwrap_or(""),
                "webhook handshake refused: wrong mode or verify token"
            );
            (StatusCode::FORBIDDEN, "verification failed\n").into_response()
        }
    }
}

fn signature_reason(e: &SignatureError) -> &'static str {
    match e {
        SignatureError::Missing => "missing",
        SignatureError::WrongPrefix { .. } => "wrong_prefix",
        SignatureError::Malformed { .. } => "malformed",
        SignatureError::Mismatch => "mismatch",
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// `POST /webhook`: verify, split into events, publish with confirms, then answer.
async fn receive_delivery(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let incoming = header_str(&headers, "traceparent").and_then(TraceParent::parse);
    let span = tracing::info_span!(
        "webhook_delivery",
        trace_id = tracing::field::Empty,
        bytes = body.len()
    );
    let trace = continue_trace(&span, incoming.as_ref());
    span.record("trace_id", trace.trace_id_hex());
    handle_delivery(&state, &headers, &body, trace)
        .instrument(span)
        .await
}

async fn handle_delivery(
    state: &AppState,
    headers: &HeaderMap,
    body: &Bytes,
    trace: TraceParent,
) -> Response {
    let s = &state.inner;

    let (source, keys) = s.bindings.keys();
    if source == Source::NotYetRead {
        tracing::warn!(
            "delivery answered 503: the page registry's app bindings are not read yet (DATABASE_URL); Meta redelivers"
        );
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "app bindings not loaded yet; retry later\n",
        )
            .into_response();
    }
    let verified = match keys.verify(
        header_str(headers, SIGNATURE_256_HEADER),
        header_str(headers, SIGNATURE_SHA1_HEADER),
        body,
    ) {
        Ok(v) => v,
        Err(e) => {
            let reason = signature_reason(&e);
            s.metrics
                .signature_failures
                .with_label_values(&[reason])
                .inc();
            tracing::warn!(reason, "webhook delivery refused: {e}");
            return (StatusCode::UNAUTHORIZED, format!("{e}\n")).into_response();
        }
    };

    // Entries for pages whose app did not sign are set aside; the rest goes on.
    let traceparent = trace.to_string();
    let Screened {
        kept,
        set_aside,
        reasons: refused,
    } = binding::screen(&keys, &verified, body, &traceparent);
    let body: &[u8] = kept.as_deref().unwrap_or(body);

    let DeliveryMessages {
        mut messages,
        tally,
    } = match delivery::messages(body, &traceparent) {
        Ok(m) => m,
        Err(e @ Refused::NotAJsonObject(_)) => {
            s.metrics.not_json_object.inc();
            tracing::warn!(error = %e, "signed webhook body refused: not a JSON object");
            return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response();
        }
    };
    messages.extend(set_aside);
    if messages.is_empty() {
        return (StatusCode::OK, "EVENT_RECEIVED\n").into_response();
    }
    // What each message is, for counting once the broker confirmed them all.
    let counted: Vec<(&'static str, usize)> =
        messages.iter().map(|m| (m.kind, m.body.len())).collect();
    match outgoing::publish_all(&s.link, messages, s.confirm_timeout).await {
        Ok(latency) => {
            s.metrics.confirm_latency.observe(latency.as_secs_f64());
            count_stored(&s.metrics, &counted, &tally);
            for reason in &refused {
                s.metrics
                    .bindings
                    .refused
                    .with_label_values(&[reason])
                    .inc();
            }
            tracing::debug!(
                latency_ms = latency.as_millis(),
                unparsed = tally.unparsed_body,
                set_aside = tally.unparsed_parts,
                "delivery stored"
            );
            (StatusCode::OK, "EVENT_RECEIVED\n").into_response()
        }
        Err(e) => {
            s.metrics.broker_failures.inc();
            tracing::error!(error = %e, "delivery not stored; answering 503 so Meta redelivers");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "events could not be stored; retry later\n",
            )
                .into_response()
        }
    }
}

/// Counts a stored body: events by kind, what went to the bounded inspection queues (by
/// queue, messages and bytes), unparsed bodies and parts.
fn count_stored(
    metrics: &IngestMetrics,
    messages: &[(&'static str, usize)],
    tally: &delivery::Tally,
) {
    for (kind, bytes) in messages {
        let queue = match *kind {
            "unparsed" => Some(topology::UNPARSED_QUEUE),
            "other" => Some(topology::OTHER_QUEUE),
            _ => None,
        };
        if let Some(queue) = queue {
            metrics
                .inspection_messages
                .with_label_values(&[queue])
                .inc();
            metrics
                .inspection_bytes
                .with_label_values(&[queue])
                .inc_by(u64::try_from(*bytes).unwrap_or(u64::MAX));
        }
        if *kind != "unparsed" {
            metrics.events_published.with_label_values(&[kind]).inc();
        }
    }
    if tally.unparsed_body {
        metrics.unparsed_bodies.inc();
    }
    metrics
        .unparsed_parts
        .inc_by(u64::try_from(tally.unparsed_parts).unwrap_or(u64::MAX));
}

/// `GET /readyz`: the checks as JSON (see [`lc_shared::readiness`]) — `broker` (the link is
/// up), `app_bindings` (with `DATABASE_URL`: read at least once) and `shutdown` (not
/// draining) — answered `200` or `503`. Bindings that could not be read again since keep the
/// instance ready (the last ones are in use): the check passes with a note.
async fn readyz(State(state): State<AppState>) -> Response {
    let s = &state.inner;
    let broker = readiness::broker(&s.link);
    s.metrics.broker_ready.set(i64::from(broker.ok));
    let mut report = Readiness::default();
    report
        .add(CheckName::Broker, broker)
        .add(CheckName::Shutdown, readiness::shutdown(&s.shutdown));
    let (source, _) = s.bindings.keys();
    let bindings = match source {
        Source::Fixed => None,
        Source::NotYetRead => Some(Check::fail(
            "the page registry's app bindings are not read yet (is DATABASE_URL reachable?); \
             deliveries are answered 503 meanwhile",
        )),
        Source::Registry if s.metrics.bindings.stale.get() == 1 => Some(Check::pass().noting(
            "app bindings may be stale: the page registry cannot be read; the last ones are in use",
        )),
        Source::Registry => Some(Check::pass()),
    };
    if let Some(check) = bindings {
        report.add(CheckName::AppBindings, check);
    }
    let status =
        StatusCode::from_u16(report.http_status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        report.to_json(),
    )
        .into_response()
}

/// `GET /metrics`: Prometheus text format.
async fn metrics(State(state): State<AppState>) -> Response {
    let ready = state.inner.link.is_ready();
    state.inner.metrics.broker_ready.set(i64::from(ready));
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render_metrics(&state.inner.metrics.registry),
    )
        .into_response()
}
