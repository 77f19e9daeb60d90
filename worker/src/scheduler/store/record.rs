//! Recording an opt-in as it arrives: one row per (page, login_id) and window, idempotent
//! under redelivery, with the replies-first, expired and unknown-page rules.

use std::time::Duration;

use deadpool_postgres::Transaction;
use lc_shared::events::{FirstMessageExpired, FirstMessageFailed, PublicEvent, insert_outbox};
use lc_shared::optin::{FailureReason, OptinState};
use time::OffsetDateTime;
use tokio_postgres::types::ToSql;

use super::{EVENT_SOURCE, LOGIN_EVENT_SOURCE, StoreError, Timing};

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
    /// The person already replied (linked): recorded as replied, nothing will be sent.
    Replied,
    /// Already past its last send time: recorded as expired with its event.
    Expired,
    /// The page is not configured: recorded as failed with its event.
    UnknownPage,
}

/// Records one opt-in inside the caller's transaction (see the module doc of the scheduler
/// for the rules: one message per window, replies first, expired and unknown pages).
pub async fn record_optin(
    tx: &Transaction<'_>,
    optin: &NewOptin,
    page_known: bool,
    timing: &Timing,
    now: OffsetDateTime,
) -> Result<Recorded, StoreError> {
    let deadline = optin.opted_in_at + timing.window;
    let last_send = timing.last_send(deadline);
    let send_at = (optin.opted_in_at + timing.send_delay).min(last_send);
    let link = tx
        .query_opt(
            "SELECT linked_at FROM links WHERE page_id = $1 AND login_id = $2",
            &[&optin.page_id, &optin.login_id],
        )
        .await?;
    // A link made by a reply at (or just before, allowing for clock skew between the two
    // sources) this opt-in means the reply was processed first: never send.
    let linked_at: Option<OffsetDateTime> = link
        .map(|r| r.get::<_, OffsetDateTime>(0))
        .filter(|at| *at >= optin.opted_in_at - Duration::from_secs(300));

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

    // $1–$11 of both the insert and the new-window update below.
    let row: [&(dyn ToSql + Sync); 11] = [
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
    ];
    let inserted = tx
        .query_opt(
            "INSERT INTO optins (page_id, login_id, source, opted_in_at, deadline, send_at, state, \
                 next_attempt_at, failure_reason, replied_at, traceparent, finished_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $6, $8, $9, $10, $11) \
             ON CONFLICT (page_id, login_id) DO NOTHING RETURNING cycle",
            &row,
        )
        .await?;
    if inserted.is_none() {
        let existing = tx
            .query_one(
                "SELECT state, deadline, attempts FROM optins \
                 WHERE page_id = $1 AND login_id = $2 FOR UPDATE",
                &[&optin.page_id, &optin.login_id],
            )
            .await?;
        let existing_state: OptinState = existing.get(0);
        let existing_deadline: OffsetDateTime = existing.get(1);
        let existing_attempts: i32 = existing.get(2);
        // Meta sends its opt-in webhook once per person (again only after
        // `reset_messenger_state`); a business backend may report every login. So only a
        // webhook opt-in may open a new window over an existing row, or a person who logs in
        // daily would get a "first" message daily.
        if optin.opted_in_at < existing_deadline || optin.source == LOGIN_EVENT_SOURCE {
            return Ok(Recorded::Duplicate);
        }
        // A new window (e.g. after `reset_messenger_state=1` in development).
        match existing_state {
            OptinState::Sending => {
                return Err(StoreError::Busy {
                    page_id: optin.page_id.clone(),
                });
            }
            OptinState::Pending => {
                // Its window closed before any replica got to it: close it properly first.
                tx.execute(
                    concat!(
                        "UPDATE optins SET state = ",
                        lc_shared::state_sql!(expired),
                        ", finished_at = $3, updated_at = $3 \
                     WHERE page_id = $1 AND login_id = $2"
                    ),
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
                insert_outbox(&**tx, &ev, EVENT_SOURCE, optin.traceparent.as_deref()).await?;
            }
            _ => {}
        }
        tx.execute(
            "UPDATE optins SET cycle = cycle + 1, source = $3, opted_in_at = $4, deadline = $5, \
                 send_at = $6, state = $7, next_attempt_at = $6, failure_reason = $8, \
                 replied_at = $9, traceparent = $10, finished_at = $11, attempts = 0, \
                 fence = fence + 1, lease_owner = NULL, lease_expires_at = NULL, \
                 call_started_at = NULL, message_id = NULL, sent_at = NULL, last_error_code = NULL, \
                 last_error_subcode = NULL, last_error_message = NULL, last_error_fbtrace = NULL, \
                 updated_at = $12 \
             WHERE page_id = $1 AND login_id = $2",
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
        insert_outbox(&**tx, &ev, EVENT_SOURCE, optin.traceparent.as_deref()).await?;
    }
    Ok(outcome)
}
