//! The scheduler's SQL: recording opt-ins, claiming due work, and fenced state transitions.
//!
//! Every transition of a claimed row is conditioned on `state = 'sending'` and the fence
//! number handed out by the claim, so a worker whose lease was taken over (paused, partitioned,
//! killed and restarted) can never overwrite the result of a newer attempt. Every terminal
//! transition writes its public event to the outbox in the same transaction.

pub mod call_start;
pub mod claim;
pub mod gauges;
pub mod pages;
pub mod record;
pub mod rescue;

use claim::Claimed;

use std::time::Duration;

use deadpool_postgres::{Client, Transaction};
use lc_shared::events::{
    FirstMessageExpired, FirstMessageFailed, FirstMessageSent, GraphErrorData, PublicEvent,
    insert_outbox,
};
use lc_shared::optin::{FailureReason, OptinState};
use time::OffsetDateTime;

/// `QueuedEvent.source` of opt-ins reported by the business backend at login time.
pub const LOGIN_EVENT_SOURCE: &str = "login_event";

/// CloudEvent `source` of events the scheduler writes.
pub const EVENT_SOURCE: &str = "/loginconnect/scheduler";

/// Errors of the scheduler's storage.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A statement failed.
    #[error("database error: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// A connection could not be taken from the pool.
    #[error("database pool error: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// A group of writes failed (see [`super::group_commit`]); the text names the cause.
    #[error("{0}")]
    Group(String),
    /// An opt-in arrived for a new window while the previous one is still being sent; the
    /// batch is retried shortly, once that send has finished.
    #[error("opt-in for page {page_id} starts a new window while the previous send is in flight")]
    Busy {
        /// The page.
        page_id: String,
    },
}

/// The timing rules of first messages.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Delay between the opt-in and the first message.
    pub send_delay: Duration,
    /// No call starts at or after `deadline - safety_margin`.
    pub safety_margin: Duration,
    /// Length of the window (24 h; shorter only in tests).
    pub window: Duration,
}

impl Timing {
    /// The last moment a call may start for an opt-in with this deadline.
    pub fn last_send(&self, deadline: OffsetDateTime) -> OffsetDateTime {
        deadline - self.safety_margin
    }
}

/// Graph's last error as stored on the row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoredError {
    /// Graph `code`.
    pub code: Option<i64>,
    /// Graph `error_subcode`.
    pub subcode: Option<i64>,
    /// Message (ours for network errors).
    pub message: String,
    /// Graph `fbtrace_id`.
    pub fbtrace_id: Option<String>,
}

impl StoredError {
    fn data(&self) -> GraphErrorData {
        GraphErrorData {
            code: self.code,
            subcode: self.subcode,
            message: self.message.clone(),
        }
    }
}

/// Expires up to `limit` pending opt-ins whose last send time has passed, with their
/// `first_message.expired` events, in one transaction. Returns how many.
pub async fn expire_overdue(
    client: &mut Client,
    safety_margin: Duration,
    limit: i64,
) -> Result<usize, StoreError> {
    let margin_secs = safety_margin.as_secs_f64();
    let tx = client.transaction().await?;
    let rows = tx
        .query(
            concat!(
                "WITH dead AS ( \
                 SELECT page_id, login_id FROM optins \
                 WHERE state = ",
                lc_shared::state_sql!(pending),
                " AND deadline <= now() + make_interval(secs => $1) \
                 ORDER BY deadline LIMIT $2 FOR UPDATE SKIP LOCKED) \
             UPDATE optins o SET state = ",
                lc_shared::state_sql!(expired),
                ", finished_at = now(), updated_at = now(), \
                 fence = o.fence + 1 \
             FROM dead WHERE o.page_id = dead.page_id AND o.login_id = dead.login_id \
             RETURNING o.page_id, o.login_id, o.attempts, o.deadline, o.traceparent, \
                 o.last_error_code, o.last_error_subcode, o.last_error_message"
            ),
            &[&margin_secs, &limit],
        )
        .await?;
    for r in &rows {
        let message: Option<String> = r.get(7);
        let traceparent: Option<String> = r.get(4);
        let ev = PublicEvent::FirstMessageExpired(FirstMessageExpired {
            page_id: r.get(0),
            login_id: r.get(1),
            attempts: r.get(2),
            deadline: r.get(3),
            last_error: message.map(|message| GraphErrorData {
                code: r.get(5),
                subcode: r.get(6),
                message,
            }),
        });
        insert_outbox(&*tx, &ev, EVENT_SOURCE, traceparent.as_deref()).await?;
    }
    tx.commit().await?;
    Ok(rows.len())
}

/// The condition of every fenced transition: the row is still `sending` under our claim.
/// (A macro, so it joins each query's text at compile time; `$1`–`$3` are page, login, fence.)
macro_rules! fenced {
    () => {
        concat!(
            "page_id = $1 AND login_id = $2 AND fence = $3 AND state = ",
            lc_shared::state_sql!(sending)
        )
    };
}

/// The statement of [`release`]: `$1`–`$3` the fence, `$4` when it is due again.
const RELEASE_SQL: &str = concat!(
    "UPDATE optins SET state = ",
    lc_shared::state_sql!(pending),
    ", next_attempt_at = $4, lease_owner = NULL, \
                 lease_expires_at = NULL, call_started_at = NULL, updated_at = now() WHERE ",
    fenced!()
);

/// The statement of [`reschedule`]: `$1`–`$3` the fence, `$4` the next attempt, `$5` the
/// attempts, `$6`–`$9` Graph's error.
const RESCHEDULE_SQL: &str = concat!(
    "UPDATE optins SET state = ",
    lc_shared::state_sql!(pending),
    ", next_attempt_at = $4, attempts = $5, \
                 last_error_code = $6, last_error_subcode = $7, last_error_message = $8, \
                 last_error_fbtrace = $9, lease_owner = NULL, lease_expires_at = NULL, \
                 updated_at = now() WHERE ",
    fenced!()
);

/// Gives a claimed row back without a call having been made (page paused, shutdown).
/// Returns false if the claim was no longer ours.
pub async fn release(
    client: &Client,
    c: &Claimed,
    next_attempt_at: OffsetDateTime,
) -> Result<bool, StoreError> {
    let n = client
        .execute(
            RELEASE_SQL,
            &[&c.page_id, &c.login_id, &c.fence, &next_attempt_at],
        )
        .await?;
    Ok(n == 1)
}

/// A successful send to record.
#[derive(Debug, Clone)]
pub struct SentRecord {
    /// The claim it was made under.
    pub claim: Claimed,
    /// Graph's `message_id`.
    pub message_id: String,
    /// When Graph accepted it.
    pub sent_at: OffsetDateTime,
}

/// Records a successful send and its `first_message.sent` event. Returns false (and writes
/// nothing) if the claim was taken over.
pub async fn finish_sent(
    client: &mut Client,
    c: &Claimed,
    message_id: &str,
    sent_at: OffsetDateTime,
) -> Result<bool, StoreError> {
    let record = SentRecord {
        claim: c.clone(),
        message_id: message_id.to_owned(),
        sent_at,
    };
    let done = finish_sent_group(client, std::slice::from_ref(&record)).await?;
    Ok(done.first().copied().unwrap_or(false))
}

/// [`finish_sent`] for several sends in one transaction (one commit), as the dispatcher's
/// group commit uses it. Returns, per record, whether it was written.
pub async fn finish_sent_group(
    client: &mut Client,
    records: &[SentRecord],
) -> Result<Vec<bool>, StoreError> {
    let tx = client.transaction().await?;
    let update = tx
        .prepare_cached(concat!(
            "UPDATE optins SET state = ",
            lc_shared::state_sql!(sent),
            ", message_id = $4, sent_at = $5, attempts = $6, \
             lease_owner = NULL, lease_expires_at = NULL, finished_at = $5, updated_at = now() \
             WHERE ",
            fenced!()
        ))
        .await?;
    let attempts: Vec<i32> = records.iter().map(|r| r.claim.attempts + 1).collect();
    // Issued together, the statements are pipelined on the one connection: one round trip
    // for the group instead of one per record (the server still runs them in order).
    let (tx_ref, update) = (&tx, &update);
    let updated = futures_util::future::try_join_all(records.iter().zip(&attempts).map(
        |(r, attempts)| async move {
            let c = &r.claim;
            tx_ref
                .execute(
                    update,
                    &[
                        &c.page_id,
                        &c.login_id,
                        &c.fence,
                        &r.message_id,
                        &r.sent_at,
                        attempts,
                    ],
                )
                .await
        },
    ))
    .await?;
    let written: Vec<bool> = updated.iter().map(|n| *n == 1).collect();
    let events: Vec<(PublicEvent, Option<&str>)> = records
        .iter()
        .zip(&attempts)
        .zip(&written)
        .filter(|(_, written)| **written)
        .map(|((r, attempts), _)| {
            let ev = PublicEvent::FirstMessageSent(FirstMessageSent {
                page_id: r.claim.page_id.clone(),
                login_id: r.claim.login_id.clone(),
                message_id: r.message_id.clone(),
                sent_at: r.sent_at,
                attempts: *attempts,
            });
            (ev, r.claim.traceparent.as_deref())
        })
        .collect();
    futures_util::future::try_join_all(
        events
            .iter()
            .map(|(ev, traceparent)| insert_outbox(&*tx, ev, EVENT_SOURCE, *traceparent)),
    )
    .await?;
    tx.commit().await?;
    Ok(written)
}

/// A claimed row going back to `pending`, as one of a group committed together.
#[derive(Debug, Clone)]
pub enum Requeue {
    /// Given back without a call (paused page, missed slot, shutdown): due again at `at`.
    Release {
        /// The claim.
        claim: Claimed,
        /// When it is due again.
        at: OffsetDateTime,
    },
    /// A call failed and is retried at `at`; the call counts as an attempt.
    Retry {
        /// The claim.
        claim: Claimed,
        /// When to try again.
        at: OffsetDateTime,
        /// Graph's error.
        error: StoredError,
    },
}

/// [`release`] and [`reschedule`] for several claims in one transaction (one commit), as the
/// dispatcher's group commit uses it. Returns, per record, whether it was written (false:
/// the claim was taken over).
pub async fn requeue_group(
    client: &mut Client,
    records: &[Requeue],
) -> Result<Vec<bool>, StoreError> {
    let tx = client.transaction().await?;
    let release = tx.prepare_cached(RELEASE_SQL).await?;
    let retry = tx.prepare_cached(RESCHEDULE_SQL).await?;
    let (tx_ref, release, retry) = (&tx, &release, &retry);
    // Issued together, the statements are pipelined on the one connection.
    let written = futures_util::future::try_join_all(records.iter().map(|r| async move {
        let n = match r {
            Requeue::Release { claim: c, at } => {
                tx_ref
                    .execute(release, &[&c.page_id, &c.login_id, &c.fence, at])
                    .await?
            }
            Requeue::Retry {
                claim: c,
                at,
                error,
            } => {
                tx_ref
                    .execute(
                        retry,
                        &[
                            &c.page_id,
                            &c.login_id,
                            &c.fence,
                            at,
                            &(c.attempts + 1),
                            &error.code,
                            &error.subcode,
                            &error.message,
                            &error.fbtrace_id,
                        ],
                    )
                    .await?
            }
        };
        Ok::<bool, tokio_postgres::Error>(n == 1)
    }))
    .await?;
    tx.commit().await?;
    Ok(written)
}

/// How a claimed row ends without success.
#[derive(Debug, Clone)]
pub enum Ending {
    /// Permanently failed, with the reason announced in `first_message.failed`.
    Failed(FailureReason),
    /// The window closed (or no retry fits before it).
    Expired,
}

/// Records a terminal failure or expiry and its event. `called` says whether a Send API call
/// was made in this claim (it counts as an attempt).
pub async fn finish_unsent(
    client: &mut Client,
    c: &Claimed,
    ending: Ending,
    called: bool,
    error: Option<&StoredError>,
) -> Result<bool, StoreError> {
    let attempts = c.attempts + i32::from(called);
    let (state, reason) = match &ending {
        Ending::Failed(r) => (OptinState::Failed, Some(*r)),
        Ending::Expired => (OptinState::Expired, None),
    };
    let tx = client.transaction().await?;
    let n = tx
        .execute(
            concat!(
                "UPDATE optins SET state = $4, failure_reason = $5, attempts = $6, \
                 last_error_code = COALESCE($7, last_error_code), \
                 last_error_subcode = COALESCE($8, last_error_subcode), \
                 last_error_message = COALESCE($9, last_error_message), \
                 last_error_fbtrace = COALESCE($10, last_error_fbtrace), \
                 lease_owner = NULL, lease_expires_at = NULL, finished_at = now(), \
                 updated_at = now() WHERE ",
                fenced!(),
                " \
                 RETURNING last_error_code, last_error_subcode, last_error_message"
            ),
            &[
                &c.page_id,
                &c.login_id,
                &c.fence,
                &state,
                &reason,
                &attempts,
                &error.and_then(|e| e.code),
                &error.and_then(|e| e.subcode),
                &error.map(|e| e.message.as_str()),
                &error.and_then(|e| e.fbtrace_id.as_deref()),
            ],
        )
        .await?;
    if n == 0 {
        return Ok(false);
    }
    let last_error = match error {
        Some(e) => Some(e.data()),
        None => last_stored_error(&tx, &c.page_id, &c.login_id)
            .await?
            .map(|e| e.data()),
    };
    let ev = match ending {
        Ending::Failed(reason) => PublicEvent::FirstMessageFailed(FirstMessageFailed {
            page_id: c.page_id.clone(),
            login_id: c.login_id.clone(),
            attempts,
            reason: reason.as_str().into(),
            last_error,
        }),
        Ending::Expired => PublicEvent::FirstMessageExpired(FirstMessageExpired {
            page_id: c.page_id.clone(),
            login_id: c.login_id.clone(),
            attempts,
            deadline: c.deadline,
            last_error,
        }),
    };
    insert_outbox(&*tx, &ev, EVENT_SOURCE, c.traceparent.as_deref()).await?;
    tx.commit().await?;
    Ok(true)
}

async fn last_stored_error(
    tx: &Transaction<'_>,
    page_id: &str,
    login_id: &str,
) -> Result<Option<StoredError>, StoreError> {
    let row = tx
        .query_one(
            "SELECT last_error_code, last_error_subcode, last_error_message, last_error_fbtrace \
             FROM optins WHERE page_id = $1 AND login_id = $2",
            &[&page_id, &login_id],
        )
        .await?;
    let message: Option<String> = row.get(2);
    Ok(message.map(|message| StoredError {
        code: row.get(0),
        subcode: row.get(1),
        message,
        fbtrace_id: row.get(3),
    }))
}

/// Puts a row back to pending for a retry at `next_attempt_at`, recording the error.
pub async fn reschedule(
    client: &Client,
    c: &Claimed,
    next_attempt_at: OffsetDateTime,
    error: &StoredError,
) -> Result<bool, StoreError> {
    let n = client
        .execute(
            RESCHEDULE_SQL,
            &[
                &c.page_id,
                &c.login_id,
                &c.fence,
                &next_attempt_at,
                &(c.attempts + 1),
                &error.code,
                &error.subcode,
                &error.message,
                &error.fbtrace_id,
            ],
        )
        .await?;
    Ok(n == 1)
}

/// Ends a claimed opt-in as `replied` without a call (its `identity.linked` event, written by
/// the correlator, announces it).
pub async fn finish_replied(
    client: &Client,
    c: &Claimed,
    replied_at: OffsetDateTime,
) -> Result<bool, StoreError> {
    let n = client
        .execute(
            concat!(
                "UPDATE optins SET state = ",
                lc_shared::state_sql!(replied),
                ", replied_at = COALESCE(replied_at, $4), \
                 lease_owner = NULL, lease_expires_at = NULL, finished_at = now(), \
                 updated_at = now() WHERE ",
                fenced!()
            ),
            &[&c.page_id, &c.login_id, &c.fence, &replied_at],
        )
        .await?;
    Ok(n == 1)
}
