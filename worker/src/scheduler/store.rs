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

use deadpool_postgres::Client;
use lc_shared::events::{FirstMessageExpired, GraphErrorData, PublicEvent, insert_outbox};
use time::OffsetDateTime;

/// `QueuedEvent.source` of opt-ins reported by the business backend at login time.
pub const LOGIN_EVENT_SOURCE: &str = "login_event";

/// CloudEvent `source` of events the scheduler writes.
pub const EVENT_SOURCE: &str = "/loginconnect/scheduler";

/// Errors of the scheduler's storage.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A statement failed.
    #[error("database error: {}", lc_shared::db::describe(.0))]
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
    /// Saturating, never panicking: a margin too large to subtract leaves the earliest
    /// representable time, so nothing is sent rather than something late.
    pub fn last_send(&self, deadline: OffsetDateTime) -> OffsetDateTime {
        let margin = time::Duration::try_from(self.safety_margin).unwrap_or(time::Duration::MAX);
        deadline.saturating_sub(margin)
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

// After `fenced!`, which it uses (a macro is visible only below its definition).
pub mod finish;

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
    // Issued together, the statements are pipelined on the one connection, people in the
    // one lock order (`runtime::lock_order`).
    let order = crate::runtime::lock_order::positions(records, |r| {
        let c = match r {
            Requeue::Release { claim, .. } | Requeue::Retry { claim, .. } => claim,
        };
        (c.login_id.as_str(), c.page_id.as_str())
    });
    let written = futures_util::future::try_join_all(order.iter().map(|&k| async move {
        let n = match &records[k] {
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
    Ok(crate::runtime::lock_order::scatter(&order, written))
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
