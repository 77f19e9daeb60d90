//! Validation of the ids and times of an event before anything is stored.
//!
//! Ids and times arrive from the outside (Meta's webhook, a business backend, anyone who can
//! publish to the exchange). A value the database refuses — a NUL in text, an index entry
//! beyond PostgreSQL's limit — or a time whose deadline cannot be computed would fail the
//! whole batch it arrives in, on every retry. So such values are refused here, one event at a
//! time, with a reason that names what was wrong, and the event is dead-lettered alone.

use time::OffsetDateTime;
use time::macros::datetime;

/// Longest id accepted, in bytes. Meta's ids are far shorter (a login_id is 64 hex
/// characters, a page id or PSID under 20 digits); the bound stays well under PostgreSQL's
/// btree entry limit (about 2.7 kB) even for a primary key of two ids.
pub const MAX_ID_BYTES: usize = 1024;

/// Earliest event time accepted: the start of 2004, before Facebook (and so any opt-in)
/// existed. Anything earlier is a unit mistake or a forgery, not an old opt-in.
pub const EARLIEST_EVENT_TIME: OffsetDateTime = datetime!(2004-01-01 00:00 UTC);

/// How far an event time may lie ahead of our clock: the skew a login event may have
/// (ingest accepts up to 300 s). Bounding the future also keeps `time + 24 h` and every other
/// deadline computation far inside the representable range.
pub const MAX_FUTURE_SKEW: time::Duration = time::Duration::minutes(5);

/// Why an id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The id is the empty string.
    #[error("{what} is empty")]
    Empty {
        /// Which id, e.g. `login_id`.
        what: String,
    },
    /// The id is longer than [`MAX_ID_BYTES`].
    #[error("{what} is {len} bytes long (at most {MAX_ID_BYTES})")]
    TooLong {
        /// Which id.
        what: String,
        /// Its length in bytes.
        len: usize,
    },
    /// The id holds a NUL character, which PostgreSQL text cannot store.
    #[error("{what} contains a NUL character at byte {at}")]
    Nul {
        /// Which id.
        what: String,
        /// Byte offset of the first NUL.
        at: usize,
    },
    /// The id holds another control character (no id of Meta's has one; logs and headers
    /// would carry it as is).
    #[error("{what} contains the control character U+{code:04X} at byte {at}")]
    Control {
        /// Which id.
        what: String,
        /// The character's code point.
        code: u32,
        /// Byte offset of the first control character.
        at: usize,
    },
}

/// Why an event time was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    /// Before [`EARLIEST_EVENT_TIME`].
    #[error("event time {time} is before {EARLIEST_EVENT_TIME}, earlier than any opt-in")]
    TooEarly {
        /// The refused time.
        time: OffsetDateTime,
    },
    /// More than [`MAX_FUTURE_SKEW`] ahead of our clock.
    #[error("event time {time} is in the future (now is {now}; at most {MAX_FUTURE_SKEW} ahead)")]
    InFuture {
        /// The refused time.
        time: OffsetDateTime,
        /// Our clock when it was checked.
        now: OffsetDateTime,
    },
}

/// Checks an id (`what` names it in the error): non-empty, at most [`MAX_ID_BYTES`] bytes, no
/// NUL and no control characters.
pub fn check_id(what: &str, value: &str) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { what: what.into() });
    }
    if value.len() > MAX_ID_BYTES {
        return Err(IdError::TooLong {
            what: what.into(),
            len: value.len(),
        });
    }
    match value.char_indices().find(|(_, c)| c.is_control()) {
        Some((at, '\0')) => Err(IdError::Nul {
            what: what.into(),
            at,
        }),
        Some((at, c)) => Err(IdError::Control {
            what: what.into(),
            code: u32::from(c),
            at,
        }),
        None => Ok(()),
    }
}

/// Checks an event's time against our clock `now`: not before [`EARLIEST_EVENT_TIME`], not
/// more than [`MAX_FUTURE_SKEW`] ahead.
pub fn check_event_time(t: OffsetDateTime, now: OffsetDateTime) -> Result<(), TimeError> {
    if t < EARLIEST_EVENT_TIME {
        return Err(TimeError::TooEarly { time: t });
    }
    // `now` is a clock reading, so `now + 5 min` does not overflow; were it the end of time,
    // every representable `t` would be within the skew.
    match now.checked_add(MAX_FUTURE_SKEW) {
        Some(latest) if t > latest => Err(TimeError::InFuture { time: t, now }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_ids_pass() {
        assert_eq!(check_id("login_id", &"a1".repeat(32)), Ok(()));
        assert_eq!(check_id("page id", "1234567890"), Ok(()));
        // Non-ASCII text is not a control character.
        assert_eq!(check_id("mid", "m_é–😀"), Ok(()));
        assert_eq!(check_id("login_id", &"x".repeat(MAX_ID_BYTES)), Ok(()));
    }

    #[test]
    fn empty_long_nul_and_control_ids_are_refused_by_name() {
        let e = check_id("login_id", "").expect_err("empty");
        assert_eq!(e.to_string(), "login_id is empty");
        let e = check_id("page id", &"x".repeat(MAX_ID_BYTES + 1)).expect_err("long");
        assert_eq!(e.to_string(), "page id is 1025 bytes long (at most 1024)");
        // Bytes, not characters: 342 three-byte characters are 1026 bytes.
        assert!(matches!(
            check_id("login_id", &"€".repeat(342)),
            Err(IdError::TooLong { len: 1026, .. })
        ));
        let e = check_id("login_id", "ab\0cd").expect_err("nul");
        assert_eq!(e.to_string(), "login_id contains a NUL character at byte 2");
        let e = check_id("login_id", "ab\ncd").expect_err("newline");
        assert_eq!(
            e.to_string(),
            "login_id contains the control character U+000A at byte 2"
        );
        assert!(matches!(
            check_id("psid", "a\u{7f}"),
            Err(IdError::Control { code: 0x7f, .. })
        ));
        assert!(matches!(
            check_id("psid", "a\u{85}"),
            Err(IdError::Control { code: 0x85, .. })
        ));
    }

    #[test]
    fn event_times_from_2004_to_five_minutes_ahead_pass() {
        let now = datetime!(2025-06-01 12:00 UTC);
        for t in [
            EARLIEST_EVENT_TIME,
            datetime!(2023-11-14 22:13:20 UTC),
            now,
            now + time::Duration::minutes(5),
        ] {
            assert_eq!(check_event_time(t, now), Ok(()), "{t}");
        }
    }

    #[test]
    fn too_early_and_future_times_are_refused_with_the_time() {
        let now = datetime!(2025-06-01 12:00 UTC);
        let e = check_event_time(datetime!(1970-01-01 00:00 UTC), now).expect_err("epoch");
        assert!(e.to_string().contains("1970-01-01"), "{e}");
        assert!(matches!(
            check_event_time(EARLIEST_EVENT_TIME - time::Duration::nanoseconds(1), now),
            Err(TimeError::TooEarly { .. })
        ));
        let e = check_event_time(now + time::Duration::seconds(301), now).expect_err("skew");
        assert!(e.to_string().contains("in the future"), "{e}");
        // The last day of year 9999: its deadline would overflow.
        let e = check_event_time(datetime!(9999-12-31 12:00 UTC), now).expect_err("9999");
        assert!(
            e.to_string().contains("9999") && e.to_string().contains("future"),
            "{e}"
        );
    }
}
