//! Opt-ins at risk: every `pending` or `sending` opt-in, nearest deadline first, with what
//! might hold it back (retries, its last error, a paused page).

use deadpool_postgres::GenericClient;
use lc_shared::optin::OptinState;
use serde::Serialize;
use time::OffsetDateTime;

use super::failures::{GraphError, graph_error};
use super::{OperateError, clamp_limit};

/// One opt-in still waiting for its first message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AtRisk {
    /// The page.
    pub page_id: String,
    /// The login_id.
    pub login_id: String,
    /// `pending` or `sending`.
    pub state: OptinState,
    /// The opt-in's window on this row (1, 2, … after `reset_messenger_state`).
    pub cycle: i32,
    /// No first message may be sent after this.
    #[serde(with = "time::serde::rfc3339")]
    pub deadline: OffsetDateTime,
    /// Seconds from now to the deadline (the scheduler stops `SAFETY_MARGIN_SECS` earlier).
    pub slack_secs: i64,
    /// Send API calls made so far.
    pub attempts: i32,
    /// When the next attempt may start.
    #[serde(with = "time::serde::rfc3339")]
    pub next_attempt_at: OffsetDateTime,
    /// Graph's last error (or ours, for a network error), if an attempt failed.
    pub last_error: Option<GraphError>,
    /// Whether the page is paused: nothing is sent for it until it is resumed.
    pub page_paused: bool,
    /// Why (`token_invalid`, `restricted`, `operator`), when paused.
    pub paused_reason: Option<String>,
}

/// Two walks, each through its own partial index (pending rows by deadline; the few rows in
/// flight by lease), merged: one `state IN (…)` scan would read and sort every pending row.
const AT_RISK_SQL: &str = concat!(
    "WITH waiting AS ( \
         (SELECT * FROM optins WHERE state = ",
    lc_shared::state_sql!(pending),
    " ORDER BY deadline LIMIT $1) \
         UNION ALL \
         (SELECT * FROM optins WHERE state = ",
    lc_shared::state_sql!(sending),
    " ORDER BY deadline LIMIT $1)) \
     SELECT w.page_id, w.login_id, w.state, w.cycle, w.deadline, \
            floor(EXTRACT(EPOCH FROM w.deadline - now()))::bigint, w.attempts, \
            w.next_attempt_at, w.last_error_code, w.last_error_subcode, w.last_error_message, \
            w.last_error_fbtrace, s.paused_reason \
     FROM waiting w LEFT JOIN page_state s USING (page_id) \
     ORDER BY w.deadline, w.page_id, w.login_id LIMIT $1"
);

/// The `limit` (at most [`super::MAX_LIMIT`]) waiting opt-ins nearest their deadline.
pub async fn at_risk(c: &impl GenericClient, limit: i64) -> Result<Vec<AtRisk>, OperateError> {
    let rows = c.query(AT_RISK_SQL, &[&clamp_limit(limit)]).await?;
    rows.iter()
        .map(|r| {
            let paused_reason: Option<String> = r.try_get(12)?;
            Ok(AtRisk {
                page_id: r.try_get(0)?,
                login_id: r.try_get(1)?,
                state: r.try_get(2)?,
                cycle: r.try_get(3)?,
                deadline: r.try_get(4)?,
                slack_secs: r.try_get(5)?,
                attempts: r.try_get(6)?,
                next_attempt_at: r.try_get(7)?,
                last_error: graph_error(r, 8)?,
                page_paused: paused_reason.is_some(),
                paused_reason,
            })
        })
        .collect()
}
