//! Recording an opt-in as it arrives: one row per (page, login_id) and window, idempotent
//! under redelivery, with the replies-first, expired and unknown-page rules, and the
//! earliest-time rule for duplicates of a pending opt-in. What outlives the row is honoured
//! too: a person ever linked gets no first message, the permanent record of a pruned sent
//! opt-in (`contacted`) stands in for its row, and an opt-in that happened before the
//! person's data deletion (`deleted_people`) recreates nothing. A duplicate of a pending
//! opt-in also brings what it knows for a personalised first message (the webhook's `ref`, a
//! login event's variables) onto the row, since the two halves arrive in either order.
//!
//! Nothing here panics on input: the deadline arithmetic is checked, stored values are read
//! with `try_get`, and an opt-in that can never be recorded comes back as a
//! [`RecordError`] whose [`RecordError::refusal`] says why, so the caller can dead-letter
//! that one delivery instead of retrying its whole batch forever.

use std::time::Duration;

use deadpool_postgres::Transaction;
use lc_meta::pages::MessageVariables;
use lc_shared::events::{FirstMessageExpired, FirstMessageFailed, PublicEvent, insert_outbox};
use lc_shared::optin::{FailureReason, OptinState};
use time::OffsetDateTime;
use tokio_postgres::types::{Json, ToSql};

use super::{EVENT_SOURCE, LOGIN_EVENT_SOURCE, StoreError, Timing};
use crate::runtime::batch_failure::{self, BatchFailure};

/// SQLSTATE classes that say the database refused this row's data rather than failed: 22
/// "data exception" (e.g. 22021, a NUL in text), 23 "integrity constraint violation", 54
/// "program limit exceeded" (e.g. an index entry too large). Retrying the same row can never
/// succeed, while retrying the rows beside it can.
const ROW_SPECIFIC_CLASSES: [&str; 3] = ["22", "23", "54"];

/// True if a statement that failed with SQLSTATE `code` failed because of the row it wrote
/// (classes 22, 23 and 54), not because of the connection, the server or a conflict with
/// another transaction (which a retry may cure).
pub fn is_row_specific_sqlstate(code: &str) -> bool {
    ROW_SPECIFIC_CLASSES
        .iter()
        .any(|class| code.len() == 5 && code.starts_with(class))
}

// The statements of recording, prepared once per pooled connection (`prepare_cached`): run
// as text, each would cost a parse-and-plan round trip of its own before it ran, doubling
// the round trips of every opt-in on the intake's hot path.

/// Everything the decision needs besides the row itself, in one round trip: the person's
/// link, the record of a pruned window, a data deletion since the opt-in, and whether a row
/// exists.
const KNOWN_SQL: &str = "SELECT (SELECT linked_at FROM links WHERE page_id = $1 AND login_id = $2), \
        (SELECT deadline FROM contacted WHERE person = person_key($1, $2)), \
        EXISTS (SELECT 1 FROM deleted_people \
                WHERE person = person_key($1, $2) AND deleted_at >= $3), \
        EXISTS (SELECT 1 FROM optins WHERE page_id = $1 AND login_id = $2)";

/// A new row; nothing (and no row returned) when one exists for the person.
const INSERT_SQL: &str = "INSERT INTO optins (page_id, login_id, source, opted_in_at, deadline, \
        send_at, state, next_attempt_at, failure_reason, replied_at, traceparent, finished_at, \
        message_ref, variables) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $6, $8, $9, $10, $11, $12, $13) \
     ON CONFLICT (page_id, login_id) DO NOTHING RETURNING cycle";

/// The existing row, locked for the decision about it.
const EXISTING_SQL: &str = "SELECT state, deadline, attempts, opted_in_at FROM optins \
     WHERE page_id = $1 AND login_id = $2 FOR UPDATE";

/// Closes a pending row whose window ended unsent, before a new window replaces it.
const EXPIRE_SQL: &str = concat!(
    "UPDATE optins SET state = ",
    lc_shared::state_sql!(expired),
    ", finished_at = $3, updated_at = $3 WHERE page_id = $1 AND login_id = $2"
);

/// Starts a new window on an existing row (the insert's $1–$13, then the time).
const NEW_WINDOW_SQL: &str = "UPDATE optins SET cycle = cycle + 1, source = $3, opted_in_at = $4, \
         deadline = $5, send_at = $6, state = $7, next_attempt_at = $6, failure_reason = $8, \
         replied_at = $9, traceparent = $10, finished_at = $11, attempts = 0, \
         fence = fence + 1, lease_owner = NULL, lease_expires_at = NULL, \
         call_started_at = NULL, message_id = NULL, sent_at = NULL, last_error_code = NULL, \
         last_error_subcode = NULL, last_error_message = NULL, last_error_fbtrace = NULL, \
         message_ref = $12, variables = $13, updated_at = $14 \
     WHERE page_id = $1 AND login_id = $2";

/// See [`merge_personalisation`].
const MERGE_SQL: &str = concat!(
    "UPDATE optins SET message_ref = COALESCE($3, message_ref), \
     variables = COALESCE($4, variables), updated_at = $5 \
     WHERE page_id = $1 AND login_id = $2 AND state = ",
    lc_shared::state_sql!(pending)
);

/// See [`advance`].
const ADVANCE_SQL: &str = concat!(
    "UPDATE optins SET opted_in_at = $3, deadline = $4, \
     next_attempt_at = CASE WHEN attempts = 0 AND next_attempt_at = send_at \
         THEN $5 ELSE next_attempt_at END, \
     send_at = $5, updated_at = $6 \
     WHERE page_id = $1 AND login_id = $2 AND opted_in_at > $3 AND state = ",
    lc_shared::state_sql!(pending),
    " RETURNING next_attempt_at"
);

/// Why an opt-in was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The database failed or refused a statement ([`RecordError::refusal`] tells which).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The opt-in can never be recorded; the text names why (e.g. its deadline is not a
    /// representable time, or the row stored for it cannot be read).
    #[error("{0}")]
    Unrecordable(String),
}

impl From<tokio_postgres::Error> for RecordError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Store(StoreError::Db(e))
    }
}

impl RecordError {
    /// The reason to give up on this one opt-in (and dead-letter it), if retrying it can
    /// never succeed: it is [`RecordError::Unrecordable`], or the database refused its data
    /// (see [`is_row_specific_sqlstate`]; the reason names the SQLSTATE and the server's
    /// message). `None` for failures a retry may cure (connection lost, serialization
    /// failure, a send in flight), which keep the whole batch for a retry.
    pub fn refusal(&self) -> Option<String> {
        match self {
            Self::Unrecordable(reason) => Some(reason.clone()),
            Self::Store(StoreError::Db(e)) => {
                let code = e.code()?.code();
                is_row_specific_sqlstate(code).then(|| {
                    let message = e
                        .as_db_error()
                        .map_or_else(|| e.to_string(), |d| d.message().to_owned());
                    format!("the database refused the opt-in (SQLSTATE {code}): {message}")
                })
            }
            Self::Store(_) => None,
        }
    }
}

impl BatchFailure for RecordError {
    fn is_row_refusal(&self) -> bool {
        self.refusal().is_some()
    }

    fn is_aborted_transaction(&self) -> bool {
        matches!(self, Self::Store(StoreError::Db(e)) if batch_failure::is_aborted_transaction(e))
    }
}

/// The times an opt-in's window runs by, all derived from its own time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowTimes {
    /// The opt-in's time plus the window (24 h).
    pub deadline: OffsetDateTime,
    /// No call starts at or after this ([`Timing::last_send`]).
    pub last_send: OffsetDateTime,
    /// When the first message is due: after the send delay, but not after `last_send`.
    pub send_at: OffsetDateTime,
}

impl WindowTimes {
    /// Computes the window of an opt-in at `opted_in_at` with checked arithmetic, naming the
    /// time when a result is not representable (the intake validates event times, so this
    /// is a second line of defence, never a panic).
    pub fn of(opted_in_at: OffsetDateTime, timing: &Timing) -> Result<Self, RecordError> {
        let out_of_range = |what: &str| {
            RecordError::Unrecordable(format!(
                "opt-in time {opted_in_at} leaves no representable {what}"
            ))
        };
        let add = |t: OffsetDateTime, d: Duration| {
            time::Duration::try_from(d)
                .ok()
                .and_then(|d| t.checked_add(d))
        };
        let deadline = add(opted_in_at, timing.window).ok_or_else(|| out_of_range("deadline"))?;
        // As `Timing::last_send`, checked.
        let last_send = time::Duration::try_from(timing.safety_margin)
            .ok()
            .and_then(|m| deadline.checked_sub(m))
            .ok_or_else(|| out_of_range("last send time"))?;
        let send_at = add(opted_in_at, timing.send_delay)
            .ok_or_else(|| out_of_range("send time"))?
            .min(last_send);
        Ok(Self {
            deadline,
            last_send,
            send_at,
        })
    }
}

/// Reads column `idx` (named `name` in the error) of a stored row without panicking: a value
/// that does not convert (e.g. `'infinity'` in a timestamp) makes this opt-in unrecordable
/// rather than crashing the consumer.
fn column<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    idx: usize,
    table: &str,
    name: &str,
) -> Result<T, RecordError> {
    row.try_get(idx).map_err(|e| {
        RecordError::Unrecordable(format!("stored {table}.{name} cannot be read: {e}"))
    })
}

/// An opt-in as it arrives from the queue.
#[derive(Debug, Clone)]
pub struct NewOptin {
    /// Page the person opted in to.
    pub page_id: String,
    /// The login_id.
    pub login_id: String,
    /// The opt-in's own time (the deadline counts from it).
    pub opted_in_at: OffsetDateTime,
    /// `webhook` or `login_event`.
    pub source: String,
    /// Trace context of the delivery.
    pub traceparent: Option<String>,
    /// The webhook's `optin.ref` (else `optin.payload`): chooses a message variant.
    pub message_ref: Option<String>,
    /// Variables a login event carried for the message's placeholders.
    pub variables: Option<MessageVariables>,
}

/// What recording an opt-in did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// A new pending opt-in; `due_now` means it should be dispatched at once.
    Pending {
        /// True when its send time has come.
        due_now: bool,
    },
    /// Inside the window of an opt-in already recorded: nothing changed.
    Duplicate,
    /// A duplicate with an earlier time than the pending opt-in recorded: its times moved
    /// earlier (the earliest known opt-in time wins); `due_now` as for `Pending`.
    Advanced {
        /// True when its (moved) next attempt time has come.
        due_now: bool,
    },
    /// The person already replied (linked): recorded as replied, nothing will be sent.
    Replied,
    /// Already past its last send time: recorded as expired with its event.
    Expired,
    /// The page is not configured: recorded as failed with its event.
    UnknownPage,
    /// The person's data was deleted after this opt-in happened (a redelivery or replay):
    /// nothing recorded.
    Deleted,
}

/// Records one opt-in inside the caller's transaction (see the module doc of the scheduler
/// for the rules: one message per window, replies first, expired and unknown pages).
///
/// Before any of that, what outlives an opt-in row: an opt-in that happened at or before a
/// data deletion of the person is [`Recorded::Deleted`]; without a row, the permanent
/// record of a pruned window makes a login event (or a webhook opt-in inside that window) a
/// [`Recorded::Duplicate`]; and a person linked at any time is [`Recorded::Replied`] — a
/// linked person may be mid-conversation, and a "first" message then would be a second one.
///
/// A duplicate of a `pending` opt-in that carries an earlier time moves its `opted_in_at`,
/// `deadline` and `send_at` earlier (never later): whichever source is recorded first — a
/// login event, whose clock may run ahead, or a webhook redelivered late — the deadline is
/// the one of the earliest known opt-in time, so the message never goes out after Meta's
/// window closed. `next_attempt_at` moves with `send_at` only while it is still the first
/// attempt's time (`attempts = 0` and equal to `send_at`): a planned retry or a release
/// (page paused) keeps its own time, and the claim and `expire_overdue` read the moved
/// deadline anyway. A row in `sending` is left alone (a call may be in flight under its
/// claim), as is any finished row. An earlier time whose own window ended before the stored
/// opt-in began is a late delivery of an older window, not the same opt-in: nothing moves.
pub async fn record_optin(
    tx: &Transaction<'_>,
    optin: &NewOptin,
    page_known: bool,
    timing: &Timing,
    now: OffsetDateTime,
) -> Result<Recorded, RecordError> {
    let WindowTimes {
        deadline,
        last_send,
        send_at,
    } = WindowTimes::of(optin.opted_in_at, timing)?;
    // One round trip for everything the decision needs besides the row itself.
    let known = tx
        .query_one(
            &tx.prepare_cached(KNOWN_SQL).await?,
            &[&optin.page_id, &optin.login_id, &optin.opted_in_at],
        )
        .await?;
    let linked_at: Option<OffsetDateTime> = column(&known, 0, "links", "linked_at")?;
    let contacted_until: Option<OffsetDateTime> = column(&known, 1, "contacted", "deadline")?;
    let deleted_since: bool = column(&known, 2, "deleted_people", "deleted_at")?;
    let has_row: bool = column(&known, 3, "optins", "page_id")?;
    if deleted_since {
        return Ok(Recorded::Deleted);
    }
    // The record of a pruned window answers as its row would have (below): a login event
    // never opens a window over it, a webhook opt-in only after its deadline.
    if let Some(until) = contacted_until
        && !has_row
        && (optin.source == LOGIN_EVENT_SOURCE || optin.opted_in_at < until)
    {
        return Ok(Recorded::Duplicate);
    }

    // Linked at any time (before or after this opt-in): never send.
    let (state, outcome, reason) = if linked_at.is_some() {
        (OptinState::Replied, Recorded::Replied, None)
    } else if !page_known {
        (
            OptinState::Failed,
            Recorded::UnknownPage,
            Some(FailureReason::UnknownPage),
        )
    } else if now >= last_send {
        (OptinState::Expired, Recorded::Expired, None)
    } else {
        (
            OptinState::Pending,
            Recorded::Pending {
                due_now: send_at <= now,
            },
            None,
        )
    };
    let finished = (state != OptinState::Pending).then_some(now);

    let variables = optin.variables.as_ref().map(Json);
    // $1–$13 of both the insert and the new-window update below.
    let row: [&(dyn ToSql + Sync); 13] = [
        &optin.page_id,
        &optin.login_id,
        &optin.source,
        &optin.opted_in_at,
        &deadline,
        &send_at,
        &state,
        &reason,
        &linked_at,
        &optin.traceparent,
        &finished,
        &optin.message_ref,
        &variables,
    ];
    let inserted = tx
        .query_opt(&tx.prepare_cached(INSERT_SQL).await?, &row)
        .await?;
    if inserted.is_none() {
        let existing = tx
            .query_one(
                &tx.prepare_cached(EXISTING_SQL).await?,
                &[&optin.page_id, &optin.login_id],
            )
            .await?;
        let existing_state: OptinState = column(&existing, 0, "optins", "state")?;
        let existing_deadline: OffsetDateTime = column(&existing, 1, "optins", "deadline")?;
        let existing_attempts: i32 = column(&existing, 2, "optins", "attempts")?;
        let existing_opted_in_at: OffsetDateTime = column(&existing, 3, "optins", "opted_in_at")?;
        // Meta sends its opt-in webhook once per person (again only after
        // `reset_messenger_state`); a business backend may report every login. So only a
        // webhook opt-in may open a new window over an existing row, or a person who logs in
        // daily would get a "first" message daily.
        if optin.opted_in_at < existing_deadline || optin.source == LOGIN_EVENT_SOURCE {
            let same_optin_earlier =
                optin.opted_in_at < existing_opted_in_at && existing_opted_in_at < deadline;
            if existing_state == OptinState::Pending {
                merge_personalisation(tx, optin, now).await?;
            }
            if existing_state != OptinState::Pending || !same_optin_earlier {
                return Ok(Recorded::Duplicate);
            }
            return advance(tx, optin, deadline, send_at, now).await;
        }
        // A new window (e.g. after `reset_messenger_state=1` in development).
        match existing_state {
            OptinState::Sending => {
                return Err(StoreError::Busy {
                    page_id: optin.page_id.clone(),
                }
                .into());
            }
            OptinState::Pending => {
                // Its window closed before any replica got to it: close it properly first.
                tx.execute(
                    &tx.prepare_cached(EXPIRE_SQL).await?,
                    &[&optin.page_id, &optin.login_id, &now],
                )
                .await?;
                let ev = PublicEvent::FirstMessageExpired(FirstMessageExpired {
                    page_id: optin.page_id.clone(),
                    login_id: optin.login_id.clone(),
                    attempts: existing_attempts,
                    deadline: existing_deadline,
                    last_error: None,
                });
                insert_outbox(tx, &ev, EVENT_SOURCE, optin.traceparent.as_deref()).await?;
            }
            _ => {}
        }
        tx.execute(
            &tx.prepare_cached(NEW_WINDOW_SQL).await?,
            &[row.as_slice(), &[&now]].concat(),
        )
        .await?;
    }
    let event = match outcome {
        Recorded::Expired => Some(PublicEvent::FirstMessageExpired(FirstMessageExpired {
            page_id: optin.page_id.clone(),
            login_id: optin.login_id.clone(),
            attempts: 0,
            deadline,
            last_error: None,
        })),
        Recorded::UnknownPage => Some(PublicEvent::FirstMessageFailed(FirstMessageFailed {
            page_id: optin.page_id.clone(),
            login_id: optin.login_id.clone(),
            attempts: 0,
            reason: FailureReason::UnknownPage.as_str().into(),
            last_error: None,
        })),
        _ => None,
    };
    if let Some(ev) = event {
        insert_outbox(tx, &ev, EVENT_SOURCE, optin.traceparent.as_deref()).await?;
    }
    Ok(outcome)
}

/// Adds what a duplicate of a pending opt-in (locked by the caller) brings for its first
/// message: the webhook's `ref`, or a login event's variables. The login event and the webhook
/// of one login arrive in either order, each with half of what the message needs, so both end
/// up on the row; a newer value replaces an older one (a later login event's variables are
/// the fresher), an absent one changes nothing. A row already claimed (`sending`) keeps what
/// its claim read: its call may be under way.
async fn merge_personalisation(
    tx: &Transaction<'_>,
    optin: &NewOptin,
    now: OffsetDateTime,
) -> Result<(), RecordError> {
    if optin.message_ref.is_none() && optin.variables.is_none() {
        return Ok(());
    }
    tx.execute(
        &tx.prepare_cached(MERGE_SQL).await?,
        &[
            &optin.page_id,
            &optin.login_id,
            &optin.message_ref,
            &optin.variables.as_ref().map(Json),
            &now,
        ],
    )
    .await?;
    Ok(())
}

/// Moves a pending opt-in (locked by the caller) to the earlier times of a duplicate (see
/// [`record_optin`] for the rule). The stored `source` and trace stay those of the first
/// record: the row is still the same opt-in.
async fn advance(
    tx: &Transaction<'_>,
    optin: &NewOptin,
    deadline: OffsetDateTime,
    send_at: OffsetDateTime,
    now: OffsetDateTime,
) -> Result<Recorded, RecordError> {
    let moved = tx
        .query_opt(
            &tx.prepare_cached(ADVANCE_SQL).await?,
            &[
                &optin.page_id,
                &optin.login_id,
                &optin.opted_in_at,
                &deadline,
                &send_at,
                &now,
            ],
        )
        .await?;
    Ok(match moved {
        Some(r) => {
            let next: OffsetDateTime = column(&r, 0, "optins", "next_attempt_at")?;
            Recorded::Advanced {
                due_now: next <= now,
            }
        }
        // Unreachable under the caller's row lock; nothing changed either way.
        None => Recorded::Duplicate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing() -> Timing {
        Timing {
            send_delay: Duration::from_secs(60),
            safety_margin: Duration::from_secs(120),
            window: Duration::from_secs(86_400),
        }
    }

    #[test]
    fn row_specific_sqlstates_are_data_integrity_and_limit_errors() {
        for code in ["22021", "22P05", "22001", "23505", "23514", "54000"] {
            assert!(is_row_specific_sqlstate(code), "{code}");
        }
        // Connection, serialization, deadlock, shutdown, syntax: not the row's fault.
        for code in [
            "08006", "40001", "40P01", "57P01", "42601", "53300", "XX000", "2", "",
        ] {
            assert!(!is_row_specific_sqlstate(code), "{code}");
        }
    }

    #[test]
    fn window_times_follow_the_opt_in_and_never_overflow() {
        let t = time::macros::datetime!(2025-06-01 12:00 UTC);
        let w = WindowTimes::of(t, &timing()).expect("window");
        assert_eq!(w.deadline, t + time::Duration::days(1));
        assert_eq!(w.last_send, w.deadline - time::Duration::minutes(2));
        assert_eq!(w.send_at, t + time::Duration::minutes(1));
        // A send delay beyond the last send time is cut to it.
        let mut long = timing();
        long.send_delay = Duration::from_secs(2 * 86_400);
        assert_eq!(
            WindowTimes::of(t, &long).expect("window").send_at,
            w.last_send
        );
        // The last day of year 9999: an error naming the time, not a panic.
        let end = time::macros::datetime!(9999-12-31 12:00 UTC);
        let e = WindowTimes::of(end, &timing()).expect_err("overflow");
        assert!(e.to_string().contains("9999-12-31"), "{e}");
        assert!(e.refusal().is_some_and(|r| r.contains("deadline")), "{e}");
        // A margin larger than any representable span.
        let mut huge = timing();
        huge.safety_margin = Duration::MAX;
        assert!(WindowTimes::of(t, &huge).is_err());
    }

    #[test]
    fn only_unrecordable_opt_ins_and_refused_data_are_refusals() {
        let busy = RecordError::Store(StoreError::Busy {
            page_id: "1".into(),
        });
        assert_eq!(busy.refusal(), None);
        let group = RecordError::Store(StoreError::Group("lost".into()));
        assert_eq!(group.refusal(), None);
        let bad = RecordError::Unrecordable("stored optins.deadline cannot be read".into());
        assert_eq!(
            bad.refusal().as_deref(),
            Some("stored optins.deadline cannot be read")
        );
    }
}
