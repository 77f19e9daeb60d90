//! `funnel [--page P] [--from D] [--to D] [--json]`: the opt-in funnel per page and UTC day,
//! read by the same [`crate::funnel::query::report`] as the admin API's `GET /funnel`.

use std::io::Write;

use lc_shared::config::DatabaseArgs;
use time::OffsetDateTime;

use super::CliError;
use crate::funnel::query::{Quantiles, Report};
use crate::funnel::{DayRange, FunnelError, page_filter, query};

impl From<FunnelError> for CliError {
    fn from(e: FunnelError) -> Self {
        match e {
            // Name the flag, not the API's parameter.
            FunnelError::Invalid { parameter, message } => {
                let flag = if parameter == "page_id" {
                    "page"
                } else {
                    parameter
                };
                CliError::Other(format!("--{flag}: {message}"))
            }
            other => CliError::Other(other.to_string()),
        }
    }
}

/// `funnel`: a table (or the API's JSON with `--json`).
pub async fn funnel(
    out: &mut dyn Write,
    db: &DatabaseArgs,
    page: Option<&str>,
    from: Option<&str>,
    to: Option<&str>,
    as_json: bool,
) -> Result<(), CliError> {
    let range = DayRange::parse(from, to, OffsetDateTime::now_utc().date())?;
    let page = page_filter(page)?;
    let pool = lc_shared::db::pool(&db.database_url, 1)?;
    let mut client = pool.get().await?;
    let report = query::report(&mut client, range, page).await?;
    if as_json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| CliError::Other(format!("cannot encode the funnel: {e}")))?;
        writeln!(out, "{text}")?;
    } else {
        table(out, &report)?;
    }
    Ok(())
}

fn secs(q: Quantiles) -> String {
    let one = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |s| format!("{s:.0}"));
    format!("{}/{}", one(q.p50), one(q.p90))
}

fn table(out: &mut dyn Write, report: &Report) -> Result<(), CliError> {
    writeln!(
        out,
        "funnel of opt-ins from {} to {} (exclusive, UTC days of opted_in_at)",
        report.from, report.to
    )?;
    writeln!(
        out,
        "{:<16} {:<10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}  {:>16}  {:>16}",
        "PAGE",
        "DAY",
        "OPTED_IN",
        "SENT",
        "REPLIED",
        "LINKED",
        "EXPIRED",
        "FAILED",
        "TO_SEND p50/p90",
        "TO_REPLY p50/p90"
    )?;
    for row in &report.rows {
        let s = row.stages;
        let day = row.day.map(crate::funnel::format_day).unwrap_or_default();
        writeln!(
            out,
            "{:<16} {:<10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}  {:>16}  {:>16}",
            row.page_id,
            day,
            s.opted_in,
            s.sent,
            s.replied,
            s.linked,
            s.expired,
            s.failed,
            secs(row.time_to_first_message_seconds),
            secs(row.time_to_reply_seconds)
        )?;
        let reasons: Vec<String> = row
            .failures
            .0
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        if !reasons.is_empty() {
            writeln!(out, "{:<27}failed: {}", "", reasons.join(", "))?;
        }
    }
    if report.rows.is_empty() {
        writeln!(out, "(no opt-ins in this range)")?;
    }
    writeln!(
        out,
        "times in seconds; the funnel {}{}",
        report.coverage,
        report
            .retained_since
            .as_deref()
            .map(|t| format!(" ({t})"))
            .unwrap_or_default()
    )?;
    Ok(())
}
