//! `POST /data-deletion` (Meta's user data deletion callback) and
//! `GET /data-deletion/{code}` (the status page Meta links the person to).
//!
//! Design: ingest stays free of database writes. The callback is verified (Meta's
//! `signed_request`, HMAC-SHA256 with the app secret), the person's `login_id`s are derived
//! for every configured (Login app, page), and one deletion request is put on the durable
//! queue `scheduler.deletions` with publisher confirms — the same guarantee as a webhook:
//! `200` means the request is stored. The scheduler consumes it and, in one transaction,
//! deletes the opt-ins and links, writes one `identity.deleted` event per `login_id` to the
//! outbox and records a receipt (counts only) under the confirmation code. The status
//! endpoint reads that receipt through a small read-only pool: no receipt yet means
//! `pending`; the code itself is MAC-authenticated, so unknown codes are `404`.
//!
//! Only Meta's callback is accepted, not any `signed_request` of the app: Facebook Login
//! gives every visitor who logs in one with the same key and format, which carries `code` or
//! `oauth_token` (refused), and `issued_at` must be fresh (`DATA_DELETION_MAX_AGE_SECS`). The
//! confirmation code is derived from (user_id, issued_at), so the same callback posted again
//! is the same request: the same answer, one receipt, one set of `identity.deleted` events.
//!
//! Answers: `400` malformed request or a Login `signed_request`, `401` bad signature or a
//! stale `issued_at`, `503` broker unavailable, `200 {"url": …, "confirmation_code": …}`
//! otherwise (Meta's documented answer).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::FormRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use deadpool_postgres::Pool;
use lapin::types::ShortString;
use lc_meta::login::deletion::{
    ConfirmationCodes, DELETION_QUEUE, DeletionIdentity, DeletionRequest,
};
use lc_meta::login::login_id::{AppClientToken, compute_login_id};
use lc_meta::login::signed_request::{SignedRequestError, parse_deletion_callback};
use lc_meta::secret::Secret;
use lc_shared::amqp::{self, BrokerLink};
use lc_shared::outgoing::{self as publish, Outgoing};
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::answer::{error, not_enabled};
use super::args::LoginArgs;
use super::metrics::LoginMetrics;
use crate::error::IngestError;

/// Bound on the status query, so a database outage answers 503 quickly.
const STATUS_QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// What enables both routes, named in their `404` answer when they are off.
const ENABLED_BY: &str =
    "DATA_DELETION_STATUS_BASE_URL, LOGIN_EVENTS_CLIENT_TOKENS, LOGIN_PAGE_IDS and DATABASE_URL";

/// The router state of both data deletion routes: everything their handlers need.
pub(super) struct DataDeletion {
    app_secrets: Vec<Secret>,
    tokens: Vec<AppClientToken>,
    pages: Vec<String>,
    codes: ConfirmationCodes,
    status_base: String,
    max_age_secs: u64,
    pool: Pool,
    link: BrokerLink,
    confirm_timeout: Duration,
    metrics: LoginMetrics,
}

impl DataDeletion {
    /// The state from validated [`LoginArgs`], or `None` when data deletion is not
    /// configured; the pool connects lazily.
    pub(super) fn configured(
        args: &LoginArgs,
        app_secrets: &[Secret],
        link: &BrokerLink,
        confirm_timeout: Duration,
        metrics: &LoginMetrics,
    ) -> Result<Option<Arc<Self>>, IngestError> {
        let Some(status_base) = &args.data_deletion_base_url else {
            return Ok(None);
        };
        let url = args.database_url.as_ref().ok_or_else(|| {
            IngestError::Config("data deletion needs DATABASE_URL for its status endpoint".into())
        })?;
        // The status endpoint runs one short query at a time; two connections are plenty.
        let pool = lc_shared::db::pool(url.expose(), 2)
            .map_err(|e| IngestError::Config(format!("DATABASE_URL: {e}")))?;
        tracing::info!(pages = args.page_ids.len(), "POST /data-deletion enabled");
        Ok(Some(Arc::new(Self {
            app_secrets: app_secrets.to_vec(),
            tokens: args.client_tokens.clone(),
            pages: args.pages(),
            codes: ConfirmationCodes::new(app_secrets),
            status_base: status_base.trim_end_matches('/').to_owned(),
            max_age_secs: args.data_deletion_max_age_secs,
            pool,
            link: link.clone(),
            confirm_timeout,
            metrics: metrics.clone(),
        })))
    }
}

/// The routes `POST /data-deletion` and `GET /data-deletion/{code}`, answering `404` when
/// `deletion` is `None`. Generic over the outer router's state because they carry their own.
pub(super) fn routes<S: Clone + Send + Sync + 'static>(
    deletion: Option<Arc<DataDeletion>>,
) -> Router<S> {
    Router::new()
        .route("/data-deletion", post(request_deletion))
        .route("/data-deletion/{code}", get(deletion_status))
        .with_state(deletion)
}

/// Every (page, login_id) the person with app-scoped id `asid` may have: one per configured
/// Login app and page. An app-scoped id belongs to one app, but the callback does not say
/// which, so every app is tried; deleting a login_id nobody has is harmless.
pub fn derive_identities(
    asid: &str,
    tokens: &[AppClientToken],
    pages: &[String],
) -> Vec<DeletionIdentity> {
    let mut out = Vec::with_capacity(tokens.len() * pages.len());
    for app in tokens {
        for page in pages {
            out.push(DeletionIdentity {
                page_id: page.clone(),
                login_id: compute_login_id(&app.token, asid, &app.app_id, page),
            });
        }
    }
    out
}

/// The form Meta posts.
#[derive(Debug, serde::Deserialize)]
struct DeletionForm {
    signed_request: String,
}

/// `POST /data-deletion`.
async fn request_deletion(
    State(deletion): State<Option<Arc<DataDeletion>>>,
    form: Result<Form<DeletionForm>, FormRejection>,
) -> Response {
    let Some(d) = deletion.as_deref() else {
        return not_enabled("POST /data-deletion", ENABLED_BY);
    };
    let (result, response) = handle_request(d, form).await;
    d.metrics
        .deletion_requests
        .with_label_values(&[result])
        .inc();
    response
}

async fn handle_request(
    d: &DataDeletion,
    form: Result<Form<DeletionForm>, FormRejection>,
) -> (&'static str, Response) {
    let form = match form {
        Ok(Form(form)) => form,
        Err(e) => {
            return (
                "bad_request",
                error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "expected a form with a signed_request field: {}",
                        e.body_text()
                    ),
                ),
            );
        }
    };
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let signed =
        match parse_deletion_callback(&form.signed_request, &d.app_secrets, now, d.max_age_secs) {
            Ok(s) => s,
            Err(
                e @ (SignedRequestError::Malformed(_)
                | SignedRequestError::NotADeletionCallback { .. }),
            ) => {
                tracing::warn!(error = %e, "data deletion request refused");
                return ("bad_request", error(StatusCode::BAD_REQUEST, e.to_string()));
            }
            Err(e @ (SignedRequestError::BadSignature | SignedRequestError::Stale { .. })) => {
                tracing::warn!(error = %e, "data deletion request refused");
                return (
                    "unauthorized",
                    error(StatusCode::UNAUTHORIZED, e.to_string()),
                );
            }
        };
    // parse_deletion_callback guarantees issued_at; 0 is never reached.
    let issued_at = signed.issued_at.unwrap_or_default();
    let Some(code) = d.codes.for_request(&signed.user_id, issued_at) else {
        // new() is only reached with META_APP_SECRETS validated non-empty.
        return (
            "unavailable",
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "no app secret configured",
            ),
        );
    };
    let request = DeletionRequest {
        confirmation_code: code.clone(),
        requested_at: OffsetDateTime::now_utc(),
        identities: derive_identities(&signed.user_id, &d.tokens, &d.pages),
    };
    match enqueue(d, &request).await {
        Ok(()) => {
            tracing::info!(
                confirmation_code = %code,
                identities = request.identities.len(),
                "data deletion request accepted"
            );
            let url = format!("{}/data-deletion/{code}", d.status_base);
            (
                "accepted",
                (
                    StatusCode::OK,
                    axum::Json(json!({ "url": url, "confirmation_code": code })),
                )
                    .into_response(),
            )
        }
        Err(e) => {
            tracing::error!(error = %e, "data deletion request not stored; answering 503");
            (
                "unavailable",
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the request could not be stored; retry later",
                ),
            )
        }
    }
}

/// Why a deletion request could not be queued.
#[derive(Debug, thiserror::Error)]
enum EnqueueError {
    #[error(transparent)]
    Amqp(#[from] amqp::AmqpError),
    #[error("cannot encode the request: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Publishes with confirms. The queue is part of the topology the broker link declares on
/// every connect, and the publish is mandatory, so a missing queue is an error, not a loss.
async fn enqueue(d: &DataDeletion, request: &DeletionRequest) -> Result<(), EnqueueError> {
    let seconds = u64::try_from(request.requested_at.unix_timestamp()).unwrap_or(0);
    let message = Outgoing {
        exchange: "",
        routing_key: DELETION_QUEUE.to_owned(),
        body: serde_json::to_vec(request)?,
        properties: amqp::persistent_properties(&request.confirmation_code, "application/json")
            .with_timestamp(seconds)
            .with_type(ShortString::from("data_deletion")),
        kind: "data_deletion",
    };
    publish::publish_all(&d.link, vec![message], d.confirm_timeout).await?;
    Ok(())
}

/// `GET /data-deletion/{code}`.
async fn deletion_status(
    State(deletion): State<Option<Arc<DataDeletion>>>,
    Path(code): Path<String>,
) -> Response {
    let Some(d) = deletion.as_deref() else {
        return not_enabled("GET /data-deletion/{code}", ENABLED_BY);
    };
    if !d.codes.is_valid(&code) {
        return error(StatusCode::NOT_FOUND, "unknown confirmation code");
    }
    let query = async {
        let client = d.pool.get().await.map_err(|e| e.to_string())?;
        client
            .query_opt(
                "SELECT completed_at, identities, deleted_optins, deleted_links, \
                        matched_identities, deleted_link_conflicts, deleted_foreign_replies, \
                        deleted_contact_records, deleted_outbox_events \
                 FROM data_deletions WHERE confirmation_code = $1",
                &[&code],
            )
            .await
            .map_err(|e| e.to_string())
    };
    let row = match tokio::time::timeout(STATUS_QUERY_TIMEOUT, query).await {
        Ok(Ok(row)) => row,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "data deletion status query failed");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "status unavailable; retry later",
            );
        }
        Err(_) => {
            tracing::error!("data deletion status query timed out");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "status unavailable; retry later",
            );
        }
    };
    let body = match row {
        None => json!({ "confirmation_code": code, "status": "pending" }),
        Some(r) => {
            let completed_at: OffsetDateTime = r.get(0);
            let optins: i32 = r.get(2);
            let links: i32 = r.get(3);
            // NULL in receipts written before these counts existed: reported as null.
            let more: [Option<i32>; 5] = std::array::from_fn(|i| r.get(4 + i));
            let [matched, conflicts, foreign, contacted, outbox] = more;
            let deleted = [optins, links]
                .into_iter()
                .chain(more.into_iter().skip(1).flatten())
                .sum::<i32>();
            json!({
                "confirmation_code": code,
                "status": "completed",
                "completed_at": completed_at.format(&Rfc3339).ok(),
                "identities": r.get::<_, i32>(1),
                "matched_identities": matched,
                "deleted": deleted,
                "deleted_optins": optins,
                "deleted_links": links,
                "deleted_link_conflicts": conflicts,
                "deleted_foreign_replies": foreign,
                "deleted_contact_records": contacted,
                "deleted_outbox_events": outbox,
            })
        }
    };
    (StatusCode::OK, axum::Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derives_one_login_id_per_app_and_page() {
        let tokens: Vec<AppClientToken> = vec![
            "111111111111111=test_client_token".parse().expect("token"),
            "333=other".parse().expect("token"),
        ];
        let pages = vec!["222222222222222".to_owned(), "444".to_owned()];
        let ids = derive_identities("1234567890", &tokens, &pages);
        assert_eq!(ids.len(), 4);
        assert_eq!(ids[0].page_id, "222222222222222");
        assert_eq!(
            ids[0].login_id,
            "0bab772ca416ba5a9bfce7cd8442a14fa7c5a1a4c940b68106a3cf4671e5d551"
        );
        let mut unique: Vec<&str> = ids.iter().map(|i| i.login_id.as_str()).collect();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), 4);
    }
}
