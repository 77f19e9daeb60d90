//! The funnel's SQL: one pass over the opt-ins of a range of `opted_in_at` (the index of
//! migration V11), grouped by page and, for reports, by UTC day.

use deadpool_postgres::GenericClient;
use lc_shared::optin::FailureReason;
use lc_shared::state_sql;
use serde::Serialize;
use serde::ser::SerializeMap;
use time::format_description::well_known::Rfc3339;
use time::{Date, OffsetDateTime};
use tokio_postgres::error::SqlState;

/// Longest a report's query may run (seconds) before the database cancels it.
pub const REPORT_TIMEOUT_SECS: u64 = 60;

use super::{COVERAGE, DayRange, FunnelError, format_day};

/// How many people reached each stage (each counted once, in every stage they reached).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stages {
    /// Opt-ins recorded (by `opted_in_at` in the range).
    pub opted_in: i64,
    /// A first message was accepted by the Send API (`sent_at` set).
    pub sent: i64,
    /// The person replied (`replied_at` set), with or without a first message.
    pub replied: i64,
    /// A link login_id → PSID exists for the person.
    pub linked: i64,
    /// The window closed before a message could be sent.
    pub expired: i64,
    /// Given up for good; [`Failures`] says why.
    pub failed: i64,
}

/// Failed opt-ins by [`FailureReason`], every reason present (zero when none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failures(pub Vec<(FailureReason, i64)>);

impl Failures {
    /// The count of one reason.
    pub fn of(&self, reason: FailureReason) -> i64 {
        self.0
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }
}

impl Serialize for Failures {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (reason, n) in &self.0 {
            map.serialize_entry(reason.as_str(), n)?;
        }
        map.end()
    }
}

/// The median and 90th percentile of a duration, in seconds (`None`: nothing to measure).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Quantiles {
    /// The median (`percentile_cont(0.5)`).
    pub p50: Option<f64>,
    /// The 90th percentile (`percentile_cont(0.9)`).
    pub p90: Option<f64>,
}

/// The funnel of one page over one day (or over the whole range, for the gauges).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunnelRow {
    /// The page.
    pub page_id: String,
    /// The UTC day of `opted_in_at` (absent when not grouped by day).
    #[serde(serialize_with = "ser_day", skip_serializing_if = "Option::is_none")]
    pub day: Option<Date>,
    /// The stage counts.
    #[serde(flatten)]
    pub stages: Stages,
    /// Failed opt-ins by reason.
    pub failures: Failures,
    /// `sent_at - opted_in_at` of the opt-ins sent.
    pub time_to_first_message_seconds: Quantiles,
    /// `replied_at - sent_at` of the opt-ins sent and replied to.
    pub time_to_reply_seconds: Quantiles,
}

fn ser_day<S: serde::Serializer>(day: &Option<Date>, s: S) -> Result<S::Ok, S::Error> {
    match day {
        Some(d) => s.serialize_str(&format_day(*d)),
        None => s.serialize_none(),
    }
}

/// Whether rows are split by UTC day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    /// One row per page and day.
    ByDay,
    /// One row per page for the whole range.
    Whole,
}

/// The SQL of [`funnel`]; the failure columns follow [`FailureReason::ALL`] (`$4`).
fn sql(grouping: Grouping) -> String {
    let day = match grouping {
        Grouping::ByDay => "(o.opted_in_at AT TIME ZONE 'UTC')::date",
        Grouping::Whole => "NULL::date",
    };
    let failures: String = (1..=FailureReason::ALL.len())
        .map(|i| {
            format!(
                "count(*) FILTER (WHERE o.state = {} AND o.failure_reason = ($4::text[])[{i}]), ",
                state_sql!(failed)
            )
        })
        .collect();
    // The link is probed per opt-in (its primary key) rather than joined: `links` is never
    // pruned, so a hash join would read all of it on every refresh.
    format!(
        "SELECT o.page_id, {day} AS day, count(*), count(o.sent_at), count(o.replied_at), \
         count(*) FILTER (WHERE EXISTS (SELECT 1 FROM links l \
             WHERE l.page_id = o.page_id AND l.login_id = o.login_id)), \
         count(*) FILTER (WHERE o.state = {expired}), \
         count(*) FILTER (WHERE o.state = {failed}), \
         {failures}\
         percentile_cont(ARRAY[0.5, 0.9]::float8[]) WITHIN GROUP \
             (ORDER BY EXTRACT(EPOCH FROM o.sent_at - o.opted_in_at)::float8), \
         percentile_cont(ARRAY[0.5, 0.9]::float8[]) WITHIN GROUP \
             (ORDER BY EXTRACT(EPOCH FROM o.replied_at - o.sent_at)::float8) \
         FROM optins o \
         WHERE o.opted_in_at >= $1 AND o.opted_in_at < $2 \
           AND ($3::text IS NULL OR o.page_id = $3) \
         GROUP BY 1, 2 ORDER BY 1, 2",
        expired = state_sql!(expired),
        failed = state_sql!(failed),
    )
}

fn quantiles(v: Option<Vec<Option<f64>>>) -> Quantiles {
    let v = v.unwrap_or_default();
    Quantiles {
        p50: v.first().copied().flatten(),
        p90: v.get(1).copied().flatten(),
    }
}

/// The funnel of the opt-ins with `opted_in_at` in `[from, to)`, of `page` or of every page,
/// ordered by page and day. Pages (and days) without opt-ins are absent.
pub async fn funnel(
    client: &impl GenericClient,
    from: OffsetDateTime,
    to: OffsetDateTime,
    page: Option<&str>,
    grouping: Grouping,
) -> Result<Vec<FunnelRow>, FunnelError> {
    let reasons: Vec<FailureReason> = FailureReason::ALL.to_vec();
    let rows = client
        .query(&sql(grouping), &[&from, &to, &page, &reasons])
        .await?;
    let n = FailureReason::ALL.len();
    Ok(rows
        .iter()
        .map(|r| FunnelRow {
            page_id: r.get(0),
            day: r.get(1),
            stages: Stages {
                opted_in: r.get(2),
                sent: r.get(3),
                replied: r.get(4),
                linked: r.get(5),
                expired: r.get(6),
                failed: r.get(7),
            },
            failures: Failures(
                FailureReason::ALL
                    .iter()
                    .enumerate()
                    .map(|(i, reason)| (*reason, r.get(8 + i)))
                    .collect(),
            ),
            time_to_first_message_seconds: quantiles(r.get(8 + n)),
            time_to_reply_seconds: quantiles(r.get(9 + n)),
        })
        .collect())
}

/// The answer of `GET /funnel` and of `loginconnect funnel --json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The first day counted (`YYYY-MM-DD`).
    pub from: String,
    /// The first day not counted.
    pub to: String,
    /// The page asked for (absent: every page).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page_id: Option<String>,
    /// When the oldest opt-in still stored opted in (RFC 3339; `None`: no opt-in stored).
    pub retained_since: Option<String>,
    /// What the funnel covers ([`COVERAGE`]).
    pub coverage: &'static str,
    /// One row per page and day with opt-ins.
    pub rows: Vec<FunnelRow>,
}

/// The per-day report of `range` for `page` (or every page), in a read-only transaction
/// bounded by [`REPORT_TIMEOUT_SECS`] (a wide range of a big table must not run for ever on an
/// operator's request).
pub async fn report(
    client: &mut deadpool_postgres::Client,
    range: DayRange,
    page: Option<&str>,
) -> Result<Report, FunnelError> {
    let (from, to) = range.instants();
    let tx = client.build_transaction().read_only(true).start().await?;
    tx.batch_execute(&format!(
        "SET LOCAL statement_timeout = '{REPORT_TIMEOUT_SECS}s'"
    ))
    .await?;
    let rows = funnel(&tx, from, to, page, Grouping::ByDay)
        .await
        .map_err(|e| match e {
            FunnelError::Db(db) if db.code() == Some(&SqlState::QUERY_CANCELED) => {
                FunnelError::TooSlow(REPORT_TIMEOUT_SECS)
            }
            other => other,
        })?;
    let oldest: Option<OffsetDateTime> = tx
        .query_one("SELECT min(opted_in_at) FROM optins", &[])
        .await?
        .get(0);
    tx.commit().await?;
    Ok(Report {
        from: format_day(range.from),
        to: format_day(range.to),
        page_id: page.map(str::to_owned),
        retained_since: oldest.and_then(|t| t.format(&Rfc3339).ok()),
        coverage: COVERAGE,
        rows,
    })
}
