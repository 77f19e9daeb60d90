//! Recent failures: `failed` and `expired` opt-ins, newest first, with why (the failure
//! reason) and what Graph said.

use deadpool_postgres::GenericClient;
use lc_shared::optin::{FailureReason, OptinState};
use serde::Serialize;
use time::OffsetDateTime;

use super::{OperateError, clamp_limit};

/// Graph's last error as the row stores it (ours for a network error: no code).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GraphError {
    /// Graph's `error.code`.
    pub code: Option<i64>,
    /// Graph's `error.error_subcode`.
    pub subcode: Option<i64>,
    /// The message.
    pub message: Option<String>,
    /// Graph's `fbtrace_id`, what Meta's support asks for.
    pub fbtrace_id: Option<String>,
}

/// The error in columns `at..at + 4` (code, subcode, message, fbtrace), `None` when empty.
pub(super) fn graph_error(
    r: &tokio_postgres::Row,
    at: usize,
) -> Result<Option<GraphError>, tokio_postgres::Error> {
    let e = GraphError {
        code: r.try_get(at)?,
        subcode: r.try_get(at + 1)?,
        message: r.try_get(at + 2)?,
        fbtrace_id: r.try_get(at + 3)?,
    };
    let empty = e.code.is_none() && e.subcode.is_none() && e.message.is_none();
    Ok((!empty).then_some(e))
}

/// One opt-in that ended without a first message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Failure {
    /// The page.
    pub page_id: String,
    /// The login_id.
    pub login_id: String,
    /// The opt-in's window on this row.
    pub cycle: i32,
    /// `failed` or `expired`.
    pub state: OptinState,
    /// Why it failed (`None` for `expired`: the window closed).
    pub failure_reason: Option<FailureReason>,
    /// Send API calls made.
    pub attempts: i32,
    /// The window's deadline.
    #[serde(with = "time::serde::rfc3339")]
    pub deadline: OffsetDateTime,
    /// When it ended.
    #[serde(with = "time::serde::rfc3339")]
    pub finished_at: OffsetDateTime,
    /// Graph's last error, if a call failed.
    pub last_error: Option<GraphError>,
}

/// `state IN ('failed', 'expired')` spelled as in `optins_failed_by_finished_at` (V12), so the
/// planner walks that small index backwards instead of every finished row.
const FAILURES_SQL: &str = "SELECT page_id, login_id, cycle, state, failure_reason, attempts, \
         deadline, finished_at, last_error_code, last_error_subcode, last_error_message, \
         last_error_fbtrace \
     FROM optins \
     WHERE state IN ('failed', 'expired') AND finished_at IS NOT NULL \
       AND ($1::text IS NULL OR page_id = $1) \
     ORDER BY finished_at DESC, page_id, login_id LIMIT $2";

/// The `limit` (at most [`super::MAX_LIMIT`]) latest failed or expired opt-ins, of one page
/// when `page_id` is given. Rows are pruned after `OPTIN_RETENTION_DAYS`.
pub async fn failures(
    c: &impl GenericClient,
    page_id: Option<&str>,
    limit: i64,
) -> Result<Vec<Failure>, OperateError> {
    let rows = c
        .query(FAILURES_SQL, &[&page_id, &clamp_limit(limit)])
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Failure {
                page_id: r.try_get(0)?,
                login_id: r.try_get(1)?,
                cycle: r.try_get(2)?,
                state: r.try_get(3)?,
                failure_reason: r.try_get(4)?,
                attempts: r.try_get(5)?,
                deadline: r.try_get(6)?,
                finished_at: r.try_get(7)?,
                last_error: graph_error(r, 8)?,
            })
        })
        .collect()
}
