//! The JSON error answers of the Login half, so both endpoints refuse in the same shape:
//! `{"error": "…"}`, which the business's backend and Meta's tooling can show as is.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// A JSON error answer.
pub(super) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

/// The answer of a route whose feature is not configured: `404`, as if the route did not
/// exist, but naming the variables that enable it so an operator can tell why.
pub(super) fn not_enabled(what: &str, variables: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("{what} is not enabled on this ingest (configure {variables})"),
    )
}
