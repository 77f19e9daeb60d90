//! The terminal transitions of a claimed row — sent, failed or expired, replied — and their
//! public events, committed for many claims in one transaction.
//!
//! Each commit waits for a WAL flush, so one transaction per finished opt-in bounded the
//! scheduler's drain (BENCHMARKS.md). The dispatcher hands every ending to one group commit
//! ([`super::super::group_commit`]), which calls [`finish_group`] with whatever ended while the
//! previous group committed; the single-row functions below are the same code with a group
//! of one. Every statement is fenced: a claim that was taken over writes nothing.

use deadpool_postgres::Client;
use lc_shared::events::{
    FirstMessageExpired, FirstMessageFailed, FirstMessageSent, GraphErrorData, PublicEvent,
    insert_outbox,
};
use lc_shared::optin::{FailureReason, OptinState};
use time::OffsetDateTime;

use super::claim::Claimed;
use super::{EVENT_SOURCE, StoreError, StoredError};
use crate::runtime::lock_order;

/// `$1`–`$3` the fence, `$4` Graph's `message_id`, `$5` when it was accepted, `$6` attempts.
const SENT_SQL: &str = concat!(
    "UPDATE optins SET state = ",
    lc_shared::state_sql!(sent),
    ", message_id = $4, sent_at = $5, attempts = $6, \
     lease_owner = NULL, lease_expires_at = NULL, finished_at = $5, updated_at = now() \
     WHERE ",
    fenced!()
);

/// `$1`–`$3` the fence, `$4` the state, `$5` the failure reason, `$6` attempts, `$7`–`$10`
/// Graph's error (kept from the row where none is given). Returns the error the row holds
/// afterwards, which the event carries: the new one, or the last retry's.
const UNSENT_SQL: &str = concat!(
    "UPDATE optins SET state = $4, failure_reason = $5, attempts = $6, \
     last_error_code = COALESCE($7, last_error_code), \
     last_error_subcode = COALESCE($8, last_error_subcode), \
     last_error_message = COALESCE($9, last_error_message), \
     last_error_fbtrace = COALESCE($10, last_error_fbtrace), \
     lease_owner = NULL, lease_expires_at = NULL, finished_at = now(), \
     updated_at = now() WHERE ",
    fenced!(),
    " RETURNING last_error_code, last_error_subcode, last_error_message"
);

/// `$1`–`$3` the fence, `$4` when the person replied (kept if the row already has it).
const REPLIED_SQL: &str = concat!(
    "UPDATE optins SET state = ",
    lc_shared::state_sql!(replied),
    ", replied_at = COALESCE(replied_at, $4), \
     lease_owner = NULL, lease_expires_at = NULL, finished_at = now(), \
     updated_at = now() WHERE ",
    fenced!()
);

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

/// How a claimed row ends without success.
#[derive(Debug, Clone)]
pub enum Ending {
    /// Permanently failed, with the reason announced in `first_message.failed`.
    Failed(FailureReason),
    /// The window closed (or no retry fits before it).
    Expired,
}

impl Ending {
    /// The state the row ends in.
    pub fn state(&self) -> OptinState {
        match self {
            Self::Failed(_) => OptinState::Failed,
            Self::Expired => OptinState::Expired,
        }
    }
}

/// One claimed row's terminal transition, as one of a group committed together.
#[derive(Debug, Clone)]
pub enum Finish {
    /// Graph accepted the first message (`first_message.sent`).
    Sent(SentRecord),
    /// Failed or expired (`first_message.failed` / `first_message.expired`).
    Unsent {
        /// The claim.
        claim: Claimed,
        /// How it ends.
        ending: Ending,
        /// Whether a Send API call was made under this claim (it counts as an attempt).
        called: bool,
        /// Graph's error, if this ending has one (else the row's last error is announced).
        error: Option<StoredError>,
    },
    /// The person replied first: no call, no event of ours (the correlator's
    /// `identity.linked` announces it).
    Replied {
        /// The claim.
        claim: Claimed,
        /// When the person replied.
        replied_at: OffsetDateTime,
    },
}

impl Finish {
    fn claim(&self) -> &Claimed {
        match self {
            Self::Sent(r) => &r.claim,
            Self::Unsent { claim, .. } | Self::Replied { claim, .. } => claim,
        }
    }

    /// The attempts the row records: one more than the claim's when a call was made.
    fn attempts(&self) -> i32 {
        let c = self.claim();
        match self {
            Self::Sent(_) => c.attempts + 1,
            Self::Unsent { called, .. } => c.attempts + i32::from(*called),
            Self::Replied { .. } => c.attempts,
        }
    }

    /// The state the row ends in.
    pub fn state(&self) -> OptinState {
        match self {
            Self::Sent(_) => OptinState::Sent,
            Self::Unsent { ending, .. } => ending.state(),
            Self::Replied { .. } => OptinState::Replied,
        }
    }

    /// The public event of this ending, given the error the row holds after the update.
    fn event(&self, last_error: Option<GraphErrorData>) -> Option<PublicEvent> {
        let c = self.claim();
        let (page_id, login_id, attempts) =
            (c.page_id.clone(), c.login_id.clone(), self.attempts());
        match self {
            Self::Sent(r) => Some(PublicEvent::FirstMessageSent(FirstMessageSent {
                page_id,
                login_id,
                message_id: r.message_id.clone(),
                sent_at: r.sent_at,
                attempts,
            })),
            Self::Unsent {
                ending: Ending::Failed(reason),
                ..
            } => Some(PublicEvent::FirstMessageFailed(FirstMessageFailed {
                page_id,
                login_id,
                attempts,
                reason: reason.as_str().into(),
                last_error,
            })),
            Self::Unsent {
                ending: Ending::Expired,
                ..
            } => Some(PublicEvent::FirstMessageExpired(FirstMessageExpired {
                page_id,
                login_id,
                attempts,
                deadline: c.deadline,
                last_error,
            })),
            Self::Replied { .. } => None,
        }
    }
}

/// Applies every ending in one transaction (one commit) with its event, and returns, per
/// ending, whether it was written (false: the claim was taken over, nothing written).
pub async fn finish_group(
    client: &mut Client,
    finishes: &[Finish],
) -> Result<Vec<bool>, StoreError> {
    let tx = client.transaction().await?;
    let sent = tx.prepare_cached(SENT_SQL).await?;
    let unsent = tx.prepare_cached(UNSENT_SQL).await?;
    let replied = tx.prepare_cached(REPLIED_SQL).await?;
    let (tx_ref, sent, unsent, replied) = (&tx, &sent, &unsent, &replied);
    // Issued together, the statements are pipelined on the one connection: one round trip
    // for the group instead of one per ending (the server still runs them in order), people
    // in the one lock order (`runtime::lock_order`). Each yields `None` when the fence no
    // longer matched, else the error the row now holds.
    let order = lock_order::positions(finishes, |f| {
        (f.claim().login_id.as_str(), f.claim().page_id.as_str())
    });
    let outcomes = futures_util::future::try_join_all(order.iter().map(|&k| async move {
        let f = &finishes[k];
        let c = f.claim();
        let attempts = f.attempts();
        let outcome = match f {
            Finish::Sent(r) => {
                let n = tx_ref
                    .execute(
                        sent,
                        &[
                            &c.page_id,
                            &c.login_id,
                            &c.fence,
                            &r.message_id,
                            &r.sent_at,
                            &attempts,
                        ],
                    )
                    .await?;
                (n == 1).then_some(None)
            }
            Finish::Replied { replied_at, .. } => {
                let n = tx_ref
                    .execute(replied, &[&c.page_id, &c.login_id, &c.fence, replied_at])
                    .await?;
                (n == 1).then_some(None)
            }
            Finish::Unsent { ending, error, .. } => {
                let reason = match ending {
                    Ending::Failed(r) => Some(*r),
                    Ending::Expired => None,
                };
                let state = ending.state();
                let e = error.as_ref();
                let row = tx_ref
                    .query_opt(
                        unsent,
                        &[
                            &c.page_id,
                            &c.login_id,
                            &c.fence,
                            &state,
                            &reason,
                            &attempts,
                            &e.and_then(|e| e.code),
                            &e.and_then(|e| e.subcode),
                            &e.map(|e| e.message.as_str()),
                            &e.and_then(|e| e.fbtrace_id.as_deref()),
                        ],
                    )
                    .await?;
                match row {
                    None => None,
                    Some(row) => {
                        let message: Option<String> = row.try_get(2)?;
                        Some(match message {
                            Some(message) => Some(GraphErrorData {
                                code: row.try_get(0)?,
                                subcode: row.try_get(1)?,
                                message,
                            }),
                            None => None,
                        })
                    }
                }
            }
        };
        Ok::<_, tokio_postgres::Error>(outcome)
    }))
    .await?;
    // Events in the same order: the outbox insert locks the person's sequence row.
    let events: Vec<(PublicEvent, Option<&str>)> = order
        .iter()
        .zip(&outcomes)
        .filter_map(|(&k, outcome)| {
            let f = &finishes[k];
            let last_error = outcome.clone()?;
            let ev = f.event(last_error)?;
            Some((ev, f.claim().traceparent.as_deref()))
        })
        .collect();
    let outcomes = lock_order::scatter(&order, outcomes);
    futures_util::future::try_join_all(
        events
            .iter()
            .map(|(ev, traceparent)| insert_outbox(&tx, ev, EVENT_SOURCE, *traceparent)),
    )
    .await?;
    tx.commit().await?;
    Ok(outcomes.iter().map(Option::is_some).collect())
}

/// Applies one ending on its own (see [`finish_group`]).
async fn finish_one(client: &mut Client, finish: Finish) -> Result<bool, StoreError> {
    let written = finish_group(client, std::slice::from_ref(&finish)).await?;
    Ok(written.first().copied().unwrap_or(false))
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
    finish_one(client, Finish::Sent(record)).await
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
    let finish = Finish::Unsent {
        claim: c.clone(),
        ending,
        called,
        error: error.cloned(),
    };
    finish_one(client, finish).await
}

/// Ends a claimed opt-in as `replied` without a call (its `identity.linked` event, written by
/// the correlator, announces it).
pub async fn finish_replied(
    client: &mut Client,
    c: &Claimed,
    replied_at: OffsetDateTime,
) -> Result<bool, StoreError> {
    let finish = Finish::Replied {
        claim: c.clone(),
        replied_at,
    };
    finish_one(client, finish).await
}
