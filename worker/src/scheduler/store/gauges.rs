//! The figures the state gauges show: opt-ins per state and the nearest pending deadline.

use deadpool_postgres::Client;
use lc_shared::optin::OptinState;

use super::StoreError;

/// How many opt-ins are in each state (states without rows are absent).
pub async fn count_by_state(client: &Client) -> Result<Vec<(OptinState, i64)>, StoreError> {
    let rows = client
        .query("SELECT state, count(*) FROM optins GROUP BY state", &[])
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Seconds until the nearest deadline of a pending opt-in (0 when none is pending).
pub async fn nearest_deadline_secs(client: &Client) -> Result<i64, StoreError> {
    let row = client
        .query_one(
            concat!(
                "SELECT COALESCE(EXTRACT(EPOCH FROM (min(deadline) - now()))::bigint, 0) \
                 FROM optins WHERE state = ",
                lc_shared::state_sql!(pending)
            ),
            &[],
        )
        .await?;
    Ok(row.get(0))
}
