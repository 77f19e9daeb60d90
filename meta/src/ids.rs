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

/// Longest page id accepted, in bytes. A page id becomes the last word of AMQP routing keys
/// (`optin.<page_id>` on the webhook exchange, `first_message.sent.<page_id>` on the events
/// exchange), which are at most 255 bytes; Meta's page ids are under 20 digits.
pub const MAX_PAGE_ID_BYTES: usize = 100;

/// Why a page id was refused.
///
/// A page id is one word of a topic routing key, so it must not hold the word separator
/// `.`, the binding wildcards `*` and `#`, whitespace, or anything else outside
/// `[A-Za-z0-9_-]`: a dotted id makes a key no binding routes (ingest would answer 503 for
/// ever), and a wildcard could not be bound to as a literal page by a consumer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageIdError {
    /// The page id is the empty string.
    #[error("page id is empty")]
    Empty,
    /// Longer than [`MAX_PAGE_ID_BYTES`].
    #[error("page id is {len} bytes long (at most {MAX_PAGE_ID_BYTES})")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// A character that cannot be one word of a routing key.
    #[error(
        "page id {shown} contains {found} at byte {at}; a page id may hold only letters, \
         digits, '_' and '-' (it is a word of the AMQP routing keys; a Facebook Page id is \
         digits)"
    )]
    BadCharacter {
        /// The id, escaped and cut to 64 characters (it may hold control characters).
        shown: String,
        /// The character, described (`'.'`, `U+000A`, …).
        found: String,
        /// Byte offset of the first such character.
        at: usize,
    },
}

/// Checks a page id: non-empty, at most [`MAX_PAGE_ID_BYTES`] bytes, only ASCII letters,
/// digits, `_` and `-` (see [`PageIdError`] for why). Every place a page id enters — the
/// webhook parser, the login event endpoint, the pages file, the workers' intake — refuses
/// one that fails this, so it never reaches a publisher.
pub fn check_page_id(value: &str) -> Result<(), PageIdError> {
    if value.is_empty() {
        return Err(PageIdError::Empty);
    }
    if value.len() > MAX_PAGE_ID_BYTES {
        return Err(PageIdError::TooLong { len: value.len() });
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    match value.char_indices().find(|(_, c)| !allowed(*c)) {
        None => Ok(()),
        Some((at, c)) => {
            let found = if c.is_control() || c.is_whitespace() {
                format!("U+{:04X}", u32::from(c))
            } else {
                format!("{c:?}")
            };
            let shown: String = value.escape_debug().to_string().chars().take(64).collect();
            Err(PageIdError::BadCharacter {
                shown: format!("\"{shown}\""),
                found,
                at,
            })
        }
    }
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
    fn page_ids_that_cannot_be_a_routing_key_word_are_refused() {
        for ok in [
            "1234567890",
            "page-a",
            "P_1",
            &"9".repeat(MAX_PAGE_ID_BYTES),
        ] {
            assert_eq!(check_page_id(ok), Ok(()), "{ok}");
        }
        assert_eq!(check_page_id(""), Err(PageIdError::Empty));
        assert_eq!(
            check_page_id(&"9".repeat(MAX_PAGE_ID_BYTES + 1)),
            Err(PageIdError::TooLong {
                len: MAX_PAGE_ID_BYTES + 1
            })
        );
        let e = check_page_id("12.34").expect_err("dot");
        assert_eq!(
            e.to_string(),
            "page id \"12.34\" contains '.' at byte 2; a page id may hold only letters, \
             digits, '_' and '-' (it is a word of the AMQP routing keys; a Facebook Page id \
             is digits)"
        );
        for (bad, at) in [
            ("12*", 2),
            ("#", 0),
            ("1 2", 1),
            ("1\n", 1),
            ("é", 0),
            ("a/b", 1),
        ] {
            assert!(
                matches!(check_page_id(bad), Err(PageIdError::BadCharacter { at: a, .. }) if a == at),
                "{bad:?}"
            );
        }
        let e = check_page_id("1\t2").expect_err("tab");
        assert!(e.to_string().contains("U+0009"), "{e}");
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
