//! The opt-in funnel (README "The funnel"): of the people who opted in, how many were sent
//! their first message, replied and were linked, how many expired or failed and why, and how
//! long the first message and the reply took — per page and per UTC day of `opted_in_at`.
//!
//! - [`query`]: the one SQL reading of the funnel, used by the admin API (`GET /funnel`), the
//!   CLI (`loginconnect funnel`) and the gauges;
//! - [`metrics`]: the `funnel_*_24h` gauges, refreshed by one scheduler replica at a time.
//!
//! The funnel counts the opt-ins still stored: finished ones are pruned after
//! `OPTIN_RETENTION_DAYS`, so older days shrink and then vanish.

pub mod metrics;
pub mod query;

use time::format_description::BorrowedFormatItem;
use time::macros::format_description;
use time::{Date, Duration, OffsetDateTime};

/// The widest range one request may ask for, in days.
pub const MAX_DAYS: i64 = 92;
/// The range when none is given: the last seven UTC days, today included.
pub const DEFAULT_DAYS: i64 = 7;

/// What the funnel says about how much it covers (in every answer).
pub const COVERAGE: &str = "counts the opt-ins still stored: finished opt-ins are pruned after \
     OPTIN_RETENTION_DAYS (default 30), so days older than that are partial or absent; \
     retained_since is the oldest opt-in stored";

const DAY_FORMAT: &[BorrowedFormatItem<'static>] = format_description!("[year]-[month]-[day]");

/// Why a funnel cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum FunnelError {
    /// A request parameter is wrong; the text names it and says what is expected.
    #[error("{parameter}: {message}")]
    Invalid {
        /// The parameter (`from`, `to`, `page_id`).
        parameter: &'static str,
        /// What is wrong and what to give instead.
        message: String,
    },
    /// The database refused or failed the query.
    #[error("database error while reading the funnel: {}", lc_shared::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    /// The query ran into its time limit (seconds): the range is too wide for the table.
    #[error(
        "the funnel query took longer than {0} s and was cancelled; ask for fewer days or one page"
    )]
    TooSlow(u64),
    /// No database connection could be had.
    #[error("no database connection for the funnel: {0} (check DATABASE_URL)")]
    Pool(#[from] deadpool_postgres::PoolError),
}

/// A range of whole UTC days, `[from, to)`, of `opted_in_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DayRange {
    /// The first day counted.
    pub from: Date,
    /// The first day not counted.
    pub to: Date,
}

impl DayRange {
    /// The range of the optional `from` and `to` (`YYYY-MM-DD`, `to` exclusive) of a request,
    /// `today` (UTC) filling what is missing: `to` defaults to tomorrow, `from` to
    /// [`DEFAULT_DAYS`] before `to`. At most [`MAX_DAYS`] long.
    pub fn parse(from: Option<&str>, to: Option<&str>, today: Date) -> Result<Self, FunnelError> {
        let to = match to {
            Some(text) => day("to", text)?,
            None => today.next_day().unwrap_or(today),
        };
        let from = match from {
            Some(text) => day("from", text)?,
            None => to
                .checked_sub(Duration::days(DEFAULT_DAYS))
                .unwrap_or(Date::MIN),
        };
        if from >= to {
            return Err(FunnelError::Invalid {
                parameter: "from",
                message: format!(
                    "{from} is not before `to` ({to}); `to` is exclusive: from=2026-11-30&to=2026-12-01 is one day"
                ),
            });
        }
        let days = (to - from).whole_days();
        if days > MAX_DAYS {
            return Err(FunnelError::Invalid {
                parameter: "to",
                message: format!("the range is {days} days; ask for at most {MAX_DAYS} at a time"),
            });
        }
        Ok(Self { from, to })
    }

    /// The range as instants: midnight UTC of `from` and of `to`.
    pub fn instants(self) -> (OffsetDateTime, OffsetDateTime) {
        (
            self.from.midnight().assume_utc(),
            self.to.midnight().assume_utc(),
        )
    }
}

/// Formats a day as `YYYY-MM-DD`.
pub fn format_day(day: Date) -> String {
    day.format(DAY_FORMAT).unwrap_or_else(|_| day.to_string())
}

fn day(parameter: &'static str, text: &str) -> Result<Date, FunnelError> {
    let day = Date::parse(text, DAY_FORMAT).map_err(|_| FunnelError::Invalid {
        parameter,
        message: format!("{text:?} is not a date; give it as YYYY-MM-DD (a UTC day)"),
    })?;
    // Far outside any opt-in, and PostgreSQL's timestamps end short of time's years.
    if !(2000..=9998).contains(&day.year()) {
        return Err(FunnelError::Invalid {
            parameter,
            message: format!("{text} is out of range; give a day from 2000 to 9998"),
        });
    }
    Ok(day)
}

/// Checks the optional page filter: a page id is digits (as the registry requires).
pub fn page_filter(page: Option<&str>) -> Result<Option<&str>, FunnelError> {
    match page {
        None => Ok(None),
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => Ok(Some(p)),
        Some(p) => Err(FunnelError::Invalid {
            parameter: "page_id",
            message: format!("{p:?} is not a page id; page ids are digits"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    #[test]
    fn the_default_range_is_the_last_seven_days_with_today() {
        let r = DayRange::parse(None, None, date!(2026 - 12 - 01)).expect("range");
        assert_eq!(r.from, date!(2026 - 11 - 25));
        assert_eq!(r.to, date!(2026 - 12 - 02));
        let (a, b) = r.instants();
        assert_eq!((b - a).whole_days(), 7);
    }

    #[test]
    fn bad_ranges_name_the_parameter() {
        let today = date!(2026 - 12 - 01);
        let bad = [
            (Some("2026-13-01"), None, "from"),
            (None, Some("yesterday"), "to"),
            (Some("2026-12-01"), Some("2026-12-01"), "from"),
            (Some("2026-01-01"), Some("2026-12-01"), "to"),
            (Some("-9999-01-01"), None, "from"),
            (None, Some("1999-12-31"), "to"),
        ];
        for (from, to, parameter) in bad {
            match DayRange::parse(from, to, today) {
                Err(FunnelError::Invalid { parameter: p, .. }) => assert_eq!(p, parameter),
                other => panic!("{from:?}..{to:?}: {other:?}"),
            }
        }
        assert!(DayRange::parse(Some("2026-09-01"), Some("2026-12-01"), today).is_ok());
    }

    #[test]
    fn a_page_filter_is_digits() {
        assert_eq!(page_filter(Some("123")).expect("ok"), Some("123"));
        assert!(page_filter(Some("12a")).is_err());
        assert!(page_filter(Some("")).is_err());
    }
}
