//! The admin API's operator routes over [`crate::operate`]: opt-ins at risk, recent
//! failures, one opt-in's timeline, retrying a failed opt-in, and the dead letters (listed,
//! replayed). Thin like [`super::handlers`]: parse, call one function, answer JSON.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::json;

use super::AdminState;
use super::auth::Caller;
use super::handlers::{Answer, ApiError, client, ok};
use crate::operate::dead_letters::{self, DeadLetterError};
use crate::operate::{self, OperateError, RetryOutcome};

/// Rows a list returns when the query gives no `limit`.
const DEFAULT_LIST_LIMIT: i64 = 50;
/// Messages shown per queue by default (as `loginconnect dead-letters list`).
const DEFAULT_DEAD_LETTERS_SHOWN: usize = 20;
/// Messages a replay takes (or looks through for one `message_id`) by default, as the CLI.
const DEFAULT_REPLAY_LIMIT: usize = 1000;
/// The connection name the broker's UI shows for the admin API.
const CLIENT: &str = "loginconnect-admin";

impl From<OperateError> for ApiError {
    fn from(e: OperateError) -> Self {
        tracing::warn!(error = %e, "admin API: database error");
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "database", e.to_string())
    }
}

impl From<DeadLetterError> for ApiError {
    fn from(e: DeadLetterError) -> Self {
        match &e {
            DeadLetterError::UnknownQueue { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            DeadLetterError::Amqp(_) | DeadLetterError::Lapin(_) => {
                tracing::warn!(error = %e, "admin API: broker error");
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "broker", e.to_string())
            }
        }
    }
}

/// The broker, or 503 saying what to configure.
fn broker(s: &AdminState) -> Result<&lc_shared::amqp::AmqpEndpoint, ApiError> {
    s.amqp.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "broker_not_configured",
            "this admin API runs without RabbitMQ: start it with AMQP_URL (and the AMQP_TLS_* \
             files if the broker needs them) to see and replay dead letters",
        )
    })
}

/// Query of `GET /optins/at-risk`.
#[derive(Deserialize)]
pub struct LimitQuery {
    limit: Option<i64>,
}

/// `GET /optins/at-risk?limit=`.
pub async fn at_risk(
    _: Caller,
    State(s): State<AdminState>,
    Query(q): Query<LimitQuery>,
) -> Answer {
    let c = client(&s).await?;
    let rows = operate::at_risk(&c, q.limit.unwrap_or(DEFAULT_LIST_LIMIT)).await?;
    ok(StatusCode::OK, json!({"optins": rows}))
}

/// Query of `GET /failures`.
#[derive(Deserialize)]
pub struct FailuresQuery {
    page_id: Option<String>,
    limit: Option<i64>,
}

/// `GET /failures?page_id=&limit=`.
pub async fn failures(
    _: Caller,
    State(s): State<AdminState>,
    Query(q): Query<FailuresQuery>,
) -> Answer {
    let c = client(&s).await?;
    let page = q.page_id.as_deref().filter(|p| !p.is_empty());
    let rows = operate::failures(&c, page, q.limit.unwrap_or(DEFAULT_LIST_LIMIT)).await?;
    ok(StatusCode::OK, json!({"failures": rows}))
}

fn no_optin(page: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no opt-in of that login_id on page {page} (finished opt-ins are pruned after \
             OPTIN_RETENTION_DAYS)"
        ),
    )
}

/// `GET /pages/{page_id}/optins/{login_id}/timeline`.
pub async fn timeline(
    _: Caller,
    State(s): State<AdminState>,
    Path((page, login_id)): Path<(String, String)>,
) -> Answer {
    let c = client(&s).await?;
    match operate::timeline(&c, &page, &login_id).await? {
        Some(t) => ok(StatusCode::OK, t),
        None => Err(no_optin(&page)),
    }
}

/// `POST /pages/{page_id}/optins/{login_id}/retry`: 200 when retried, 409 with the refusal
/// (its `reason` and what it means) when not.
pub async fn retry(
    who: Caller,
    State(s): State<AdminState>,
    Path((page, login_id)): Path<(String, String)>,
) -> Answer {
    let c = client(&s).await?;
    match operate::retry(&c, &who.name, &page, &login_id, s.retry_margin).await? {
        RetryOutcome::Retried => ok(
            StatusCode::OK,
            json!({"result": "retried", "page_id": page, "login_id": login_id}),
        ),
        RetryOutcome::NotFound => Err(no_optin(&page)),
        RetryOutcome::Refused(refusal) => {
            let body = json!({"error": {
                "code": "retry_refused",
                "message": refusal.explain(),
                "refusal": refusal,
            }});
            Ok((StatusCode::CONFLICT, axum::Json(body)).into_response())
        }
    }
}

/// Query of `GET /dead-letters`.
#[derive(Deserialize)]
pub struct DeadLettersQuery {
    queue: Option<String>,
    limit: Option<usize>,
}

/// `GET /dead-letters?queue=&limit=`: every inspectable queue (or one), nothing removed.
pub async fn list_dead_letters(
    _: Caller,
    State(s): State<AdminState>,
    Query(q): Query<DeadLettersQuery>,
) -> Answer {
    let endpoint = broker(&s)?;
    let queue = q.queue.as_deref().filter(|q| !q.is_empty());
    let limit = q.limit.unwrap_or(DEFAULT_DEAD_LETTERS_SHOWN);
    let queues = dead_letters::list(endpoint, CLIENT, queue, limit).await?;
    ok(StatusCode::OK, json!({"queues": queues}))
}

/// The optional body of `POST /dead-letters/{queue}/replay`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayInput {
    message_id: Option<String>,
    limit: Option<usize>,
}

/// `POST /dead-letters/{queue}/replay`: the queue from its head up to `limit`, or the one
/// message `message_id` (404 when it is not among the first `limit`).
pub async fn replay_dead_letters(
    who: Caller,
    State(s): State<AdminState>,
    Path(queue): Path<String>,
    body: Bytes,
) -> Answer {
    let input: ReplayInput = if body.iter().all(u8::is_ascii_whitespace) {
        ReplayInput::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!("the body must be empty or {{\"message_id\": ..., \"limit\": ...}}: {e}"),
            )
        })?
    };
    dead_letters::known_queue(&queue)?;
    let endpoint = broker(&s)?;
    let limit = input.limit.unwrap_or(DEFAULT_REPLAY_LIMIT);
    let report = match input.message_id.as_deref().filter(|m| !m.is_empty()) {
        Some(id) => {
            let report = dead_letters::replay_one(endpoint, CLIENT, &queue, id, limit).await?;
            if report.found == Some(false) {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!(
                        "no message with that message_id among the first {limit} of {queue}; \
                         list them with GET /dead-letters?queue={queue}, or give a larger limit"
                    ),
                ));
            }
            report
        }
        None => dead_letters::replay(endpoint, CLIENT, &queue, limit).await?,
    };
    tracing::info!(
        actor = %who.name,
        queue,
        replayed = report.replayed,
        kept = report.kept,
        "admin API: dead letters replayed"
    );
    Ok(axum::Json(report).into_response())
}
