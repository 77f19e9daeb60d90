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

/// How close to its deadline an unsent opt-in must be to count as at risk: the `within`
/// label of `scheduler_optins_at_risk`. The windows nest (10 min ⊂ 1 h ⊂ 3 h), so an alert
/// can pick its horizon and a dashboard can stack them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtRiskWindow {
    /// Deadline within 10 minutes: without a send now it expires.
    TenMinutes,
    /// Deadline within an hour.
    OneHour,
    /// Deadline within three hours.
    ThreeHours,
}

impl AtRiskWindow {
    /// Every window, shortest first.
    pub const ALL: [AtRiskWindow; 3] = [Self::TenMinutes, Self::OneHour, Self::ThreeHours];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TenMinutes => "10m",
            Self::OneHour => "1h",
            Self::ThreeHours => "3h",
        }
    }

    /// The window's length in seconds.
    pub fn secs(self) -> i64 {
        match self {
            Self::TenMinutes => 600,
            Self::OneHour => 3_600,
            Self::ThreeHours => 10_800,
        }
    }
}

/// Opt-ins not yet sent (`pending` or `sending`) whose deadline is within each window of
/// [`AtRiskWindow::ALL`] from now (already past included: the expirer has not caught them
/// yet), in that order. The rows within the widest window are read once, each state through
/// its partial index (`state IN (…)` in one scan made PostgreSQL read the whole table: 0.4 s
/// against 0.04 s at 500,000 rows), then counted per window.
pub async fn at_risk(client: &impl GenericClient) -> Result<Vec<(AtRiskWindow, i64)>, StoreError> {
    let secs: Vec<i64> = AtRiskWindow::ALL.iter().map(|w| w.secs()).collect();
    let widest = secs.iter().copied().max().unwrap_or(0) as f64;
    let rows = client
        .query(
            concat!(
                "WITH near AS MATERIALIZED ( \
                 SELECT deadline FROM optins WHERE state = ",
                lc_shared::state_sql!(pending),
                " AND deadline < now() + make_interval(secs => $2) \
                 UNION ALL \
                 SELECT deadline FROM optins WHERE state = ",
                lc_shared::state_sql!(sending),
                " AND deadline < now() + make_interval(secs => $2)) \
                 SELECT w.secs, count(n.deadline) FROM unnest($1::bigint[]) AS w(secs) \
                 LEFT JOIN near n ON n.deadline < now() + make_interval(secs => w.secs::float8) \
                 GROUP BY w.secs"
            ),
            &[&secs, &widest],
        )
        .await?;
    let counts: Vec<(i64, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    Ok(AtRiskWindow::ALL
        .iter()
        .map(|w| {
            let n = counts
                .iter()
                .find(|(s, _)| *s == w.secs())
                .map_or(0, |(_, n)| *n);
            (*w, n)
        })
        .collect())
}

/// Pages whose webhook subscription the watchdog found incomplete and has not yet found
/// complete again (`page_state.unsubscribed_since` set).
pub async fn unsubscribed_pages(client: &impl GenericClient) -> Result<Vec<String>, StoreError> {
    let rows = client
        .query(
            "SELECT page_id FROM page_state WHERE unsubscribed_since IS NOT NULL",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
