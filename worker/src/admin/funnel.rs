//! `GET /funnel?from=&to=&page_id=`: the opt-in funnel per page and UTC day
//! ([`crate::funnel::query::report`], the same reading as `loginconnect funnel --json`).

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use time::OffsetDateTime;

use super::AdminState;
use super::auth::Caller;
use super::handlers::{Answer, ApiError, client, ok};
use crate::funnel::{DayRange, FunnelError, page_filter, query};

/// Query of `GET /funnel`; any other parameter is refused by name.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunnelQuery {
    from: Option<String>,
    to: Option<String>,
    page_id: Option<String>,
}

impl From<FunnelError> for ApiError {
    fn from(e: FunnelError) -> Self {
        match &e {
            FunnelError::Invalid { .. } => ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!("{e}; see docs/openapi.yaml for GET /funnel"),
            ),
            FunnelError::TooSlow(_) | FunnelError::Db(_) | FunnelError::Pool(_) => {
                tracing::warn!(error = %e, "admin API: funnel query failed");
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "database", e.to_string())
            }
        }
    }
}

/// `GET /funnel`.
pub async fn funnel(
    _: Caller,
    State(s): State<AdminState>,
    q: Result<Query<FunnelQuery>, QueryRejection>,
) -> Answer {
    let Query(q) = q.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!(
                "{}; GET /funnel takes from, to (YYYY-MM-DD) and page_id",
                e.body_text()
            ),
        )
    })?;
    let today = OffsetDateTime::now_utc().date();
    let range = DayRange::parse(q.from.as_deref(), q.to.as_deref(), today)?;
    let page = page_filter(q.page_id.as_deref())?;
    let mut c = client(&s).await?;
    ok(StatusCode::OK, query::report(&mut c, range, page).await?)
}
