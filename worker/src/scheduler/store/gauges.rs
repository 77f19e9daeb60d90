//! The figures the state gauges show (opt-ins per state, the nearest pending deadline) and
//! the lead of each housekeeping round.

use deadpool_postgres::GenericClient;
use lc_shared::optin::OptinState;

use super::StoreError;

/// Takes this round's housekeeping lead (a transaction-level advisory lock, so it works
/// through poolers too and ends with the transaction). False: another replica has it.
pub async fn lead_housekeeping(client: &impl GenericClient) -> Result<bool, StoreError> {
    let row = client
        .query_one(
            "SELECT pg_try_advisory_xact_lock(hashtextextended('loginconnect.housekeeping', 0))",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// How many opt-ins are in each state (states without rows are absent).
pub async fn count_by_state(
    client: &impl GenericClient,
) -> Result<Vec<(OptinState, i64)>, StoreError> {
    let rows = client
        .query("SELECT state, count(*) FROM optins GROUP BY state", &[])
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Seconds until the nearest deadline of a pending opt-in (0 when none is pending).
pub async fn nearest_deadline_secs(client: &impl GenericClient) -> Result<i64, StoreError> {
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
