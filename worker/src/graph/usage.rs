//! Graph's hints about its limits: `Retry-After`, and the usage headers (`X-App-Usage`,
//! `X-Page-Usage`, `X-Business-Use-Case-Usage`) read on every answer, with the slow-down
//! policy that keeps a caller below 100 % of them.

use std::time::Duration;

use serde_json::Value;
use time::{OffsetDateTime, PrimitiveDateTime};

/// How deep [`parse_usage`] looks into a usage header's JSON. The real shapes are at most
/// three levels deep (business id → list → entry); a hostile header gets no deeper walk.
const MAX_USAGE_DEPTH: usize = 6;
/// Upper bound for a server-suggested wait: no opt-in lives longer than 24 h.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);
/// The wait Graph asks for: `Retry-After` if present and valid (see
/// [`parse_retry_after_header`]), else the largest `estimated_time_to_regain_access` above
/// zero in the usage header `usage` (see [`parse_usage`]). Malformed values are ignored; the
/// result is capped at 24 h.
pub fn parse_retry_after(retry_after: Option<&str>, usage: Option<&str>) -> Option<Duration> {
    wait_asked(retry_after, parse_usage(usage), OffsetDateTime::now_utc())
}

/// [`parse_retry_after`] with the usage headers already parsed: `Retry-After` wins (it is
/// about this very answer), else the usage's regain time.
pub(super) fn wait_asked(
    retry_after: Option<&str>,
    usage: Option<Usage>,
    now: OffsetDateTime,
) -> Option<Duration> {
    retry_after
        .and_then(|v| parse_retry_after_header(v, now))
        .or_else(|| usage.and_then(|u| u.regain_after))
}

/// A `Retry-After` value (RFC 9110 §10.2.3) as a wait from `now`: whole seconds, or an HTTP
/// date in IMF-fixdate form (`Wed, 21 Oct 2015 07:28:00 GMT`; a date in the past is no wait).
/// `None` for anything else, including the obsolete RFC 850 and asctime date forms, which no
/// current server sends. Capped at 24 h: no opt-in lives longer.
pub fn parse_retry_after_header(value: &str, now: OffsetDateTime) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        // A negative difference (a date in the past) fails the conversion: no wait.
        Err(_) => Duration::try_from(parse_http_date(value)? - now).unwrap_or(Duration::ZERO),
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// An IMF-fixdate (`Wed, 21 Oct 2015 07:28:00 GMT`). The weekday is not checked against the
/// date: it adds nothing, and a server that gets it wrong still means the date.
fn parse_http_date(value: &str) -> Option<OffsetDateTime> {
    let (_weekday, rest) = value.split_once(", ")?;
    let format = time::macros::format_description!(
        "[day] [month repr:short case_sensitive:false] [year] [hour]:[minute]:[second] GMT"
    );
    PrimitiveDateTime::parse(rest.trim(), format)
        .ok()
        .map(PrimitiveDateTime::assume_utc)
}

/// How close Graph's throttling is, from the usage headers of one answer.
///
/// Graph throttles at 100 % of any metric of any of the headers, so only the largest value
/// matters for pacing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    /// The largest `call_count`, `total_cputime` or `total_time` (percent of the limit) in
    /// `X-App-Usage`, `X-Page-Usage` or `X-Business-Use-Case-Usage`; 0 when the headers only
    /// had a regain time. May exceed 100.
    pub percent: f64,
    /// The largest `estimated_time_to_regain_access` above zero (Graph gives minutes),
    /// capped at 24 h: Graph refuses calls until then.
    pub regain_after: Option<Duration>,
}

impl Usage {
    /// The share of the normal send rate to use after this answer: 0 while Graph says access
    /// must be regained, else [`slow_down_factor`] of [`Usage::percent`].
    pub fn rate_factor(&self) -> f64 {
        if self.regain_after.is_some() {
            0.0
        } else {
            slow_down_factor(self.percent)
        }
    }
}

/// Usage at or above which the rate starts to go down.
const SLOW_DOWN_FROM_PERCENT: f64 = 75.0;
/// Usage at or above which only [`SLOWEST_RATE_FACTOR`] of the rate is left.
const SLOWEST_FROM_PERCENT: f64 = 95.0;
/// The share of the rate used just below 100 %, so that usage can still be observed falling.
const SLOWEST_RATE_FACTOR: f64 = 0.1;
/// Usage at which Graph throttles: no calls.
const PAUSE_AT_PERCENT: f64 = 100.0;

/// The share (0..=1) of its normal send rate a caller should use at `usage_percent` of a
/// Graph limit, so that it slows down *before* Graph throttles at 100 % (throttled calls fail
/// and the penalty can last hours):
///
/// - below 75 %: full speed (1.0);
/// - 75 % to 95 %: down linearly from 1.0 to 0.1;
/// - 95 % up to 100 %: 0.1 (a trickle, so that fresh usage numbers keep coming);
/// - 100 % and above: 0.0, pause until the usage falls (or the regain time passes).
///
/// A NaN or negative usage says nothing, like no header at all: full speed.
pub fn slow_down_factor(usage_percent: f64) -> f64 {
    if usage_percent.is_nan() || usage_percent < SLOW_DOWN_FROM_PERCENT {
        1.0
    } else if usage_percent >= PAUSE_AT_PERCENT {
        0.0
    } else if usage_percent >= SLOWEST_FROM_PERCENT {
        SLOWEST_RATE_FACTOR
    } else {
        let progress = (usage_percent - SLOW_DOWN_FROM_PERCENT)
            / (SLOWEST_FROM_PERCENT - SLOW_DOWN_FROM_PERCENT);
        1.0 - progress * (1.0 - SLOWEST_RATE_FACTOR)
    }
}

/// Parses usage header values (`X-App-Usage`, `X-Page-Usage`, `X-Business-Use-Case-Usage`,
/// in any mix and number) into one [`Usage`]; `None` when none of them has a usable
/// percentage or a regain time above zero (no header is not the same as zero usage).
///
/// Liberal, because the formats are loosely documented and differ by header: each value is
/// JSON (raw bytes, so that a non-ASCII business name does not spoil a header), walked a few
/// levels deep through objects and arrays (so `X-App-Usage`'s flat object
/// and the business-id-keyed arrays of `X-Business-Use-Case-Usage` read alike); `call_count`,
/// `total_cputime`, `total_time` and `estimated_time_to_regain_access` count wherever they
/// are, as numbers or numeric strings; negative, non-finite and non-numeric values, invalid
/// JSON and everything else are ignored. Never panics.
pub fn parse_usage<I, V>(values: I) -> Option<Usage>
where
    I: IntoIterator<Item = V>,
    V: AsRef<[u8]>,
{
    let mut found = UsageScan::default();
    for value in values {
        if let Ok(json) = serde_json::from_slice::<Value>(value.as_ref()) {
            found.walk(&json, 0);
        }
    }
    let regain_after = found
        .regain_minutes
        .filter(|m| *m > 0.0)
        // Finite and positive, and capped before the conversion: cannot panic.
        .map(|m| Duration::from_secs_f64((m * 60.0).min(MAX_RETRY_AFTER.as_secs_f64())));
    if found.percent.is_none() && regain_after.is_none() {
        return None;
    }
    Some(Usage {
        percent: found.percent.unwrap_or(0.0),
        regain_after,
    })
}

/// The largest values seen so far by [`parse_usage`].
#[derive(Default)]
struct UsageScan {
    percent: Option<f64>,
    regain_minutes: Option<f64>,
}

impl UsageScan {
    fn walk(&mut self, value: &Value, depth: usize) {
        if depth > MAX_USAGE_DEPTH {
            return;
        }
        match value {
            Value::Object(map) => {
                for (key, v) in map {
                    match key.as_str() {
                        "call_count" | "total_cputime" | "total_time" => {
                            Self::raise(&mut self.percent, usage_number(v));
                        }
                        "estimated_time_to_regain_access" => {
                            Self::raise(&mut self.regain_minutes, usage_number(v));
                        }
                        _ => self.walk(v, depth + 1),
                    }
                }
            }
            Value::Array(items) => {
                for v in items {
                    self.walk(v, depth + 1);
                }
            }
            _ => {}
        }
    }

    fn raise(slot: &mut Option<f64>, value: Option<f64>) {
        if let Some(v) = value {
            *slot = Some(slot.map_or(v, |old| old.max(v)));
        }
    }
}

/// A usage number: a JSON number or a numeric string, finite and not negative.
fn usage_number(v: &Value) -> Option<f64> {
    v.as_f64()
        .or_else(|| v.as_str()?.trim().parse().ok())
        .filter(|n: &f64| n.is_finite() && *n >= 0.0)
}
