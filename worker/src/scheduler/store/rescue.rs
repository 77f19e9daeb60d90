//! Resolving claims whose worker died or stalled, and pruning finished rows.
//!
//! A lease that expires with the row still `sending` and marked `call_started_at` means a
//! Send API call may or may not have been made; [`UnknownOutcome`] decides what the row
//! becomes. Without the mark no call was made (the worker died between claim and call), so
//! the row simply goes back to `pending`. The fence is bumped either way, so the stalled
//! worker's late result is refused.

use std::time::Duration;

use deadpool_postgres::Client;
use lc_shared::events::{FirstMessageFailed, GraphErrorData, PublicEvent, insert_outbox};
use lc_shared::optin::{FailureReason, OptinState};

use super::{EVENT_SOURCE, StoreError};

/// What to do with a row whose lease expired while a call may have been in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UnknownOutcome {
    /// At most once: mark it failed (`outcome_unknown`); the person may get no message.
    Fail,
    /// At least once: try again; the person may get the message twice.
    Retry,
}

/// What one rescue round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rescued {
    /// Claimed but never called: back to `pending` (a safe retry).
    pub returned: usize,
    /// A call may have been in flight: resolved by the [`UnknownOutcome`] policy.
    pub unknown: usize,
}

/// Resolves rows whose lease expired (their worker died or stalled): those whose call never
/// started go back to `pending`, the others follow `policy`; the fence is bumped so the old
/// worker's late result is refused.
pub async fn rescue_expired_leases(
    client: &mut Client,
    policy: UnknownOutcome,
    limit: i64,
) -> Result<Rescued, StoreError> {
    let tx = client.transaction().await?;
    let returned = tx
        .execute(
            concat!(
                "WITH stale AS ( \
                 SELECT page_id, login_id FROM optins \
                 WHERE state = ",
                lc_shared::state_sql!(sending),
                " AND lease_expires_at < now() \
                   AND call_started_at IS NULL \
                 ORDER BY lease_expires_at LIMIT $1 FOR UPDATE SKIP LOCKED) \
             UPDATE optins o SET state = ",
                lc_shared::state_sql!(pending),
                ", fence = o.fence + 1, \
                 next_attempt_at = now(), lease_owner = NULL, lease_expires_at = NULL, \
                 updated_at = now() \
             FROM stale WHERE o.page_id = stale.page_id AND o.login_id = stale.login_id"
            ),
            &[&limit],
        )
        .await?;
    if returned > 0 {
        tracing::warn!(
            returned,
            "leases expired before any call was made (a worker died or stalled); back to pending"
        );
    }
    let (state, reason) = match policy {
        UnknownOutcome::Fail => (OptinState::Failed, Some(FailureReason::OutcomeUnknown)),
        UnknownOutcome::Retry => (OptinState::Pending, None),
    };
    let rows = tx
        .query(
            concat!(
                "WITH stale AS ( \
                 SELECT page_id, login_id FROM optins \
                 WHERE state = ",
                lc_shared::state_sql!(sending),
                " AND lease_expires_at < now() \
                   AND call_started_at IS NOT NULL \
                 ORDER BY lease_expires_at LIMIT $1 FOR UPDATE SKIP LOCKED) \
             UPDATE optins o SET state = $2, failure_reason = $3, attempts = o.attempts + 1, \
                 fence = o.fence + 1, next_attempt_at = now(), lease_owner = NULL, \
                 lease_expires_at = NULL, \
                 last_error_message = 'lease expired during a Send API call: outcome unknown', \
                 finished_at = CASE WHEN $2 = ",
                lc_shared::state_sql!(failed),
                " THEN now() END, updated_at = now() \
             FROM stale WHERE o.page_id = stale.page_id AND o.login_id = stale.login_id \
             RETURNING o.page_id, o.login_id, o.attempts, o.traceparent"
            ),
            &[&limit, &state, &reason],
        )
        .await?;
    for r in &rows {
        let page_id: String = r.get(0);
        let login_id: String = r.get(1);
        tracing::warn!(
            page_id = %page_id,
            login_id = %lc_shared::telemetry::login_id_label(&login_id),
            policy = ?policy,
            "lease expired while a send may have been in flight"
        );
        if policy == UnknownOutcome::Fail {
            let traceparent: Option<String> = r.get(3);
            let ev = PublicEvent::FirstMessageFailed(FirstMessageFailed {
                page_id,
                login_id,
                attempts: r.get(2),
                reason: FailureReason::OutcomeUnknown.as_str().into(),
                last_error: Some(GraphErrorData {
                    code: None,
                    subcode: None,
                    message: "lease expired during a Send API call: outcome unknown".into(),
                }),
            });
            insert_outbox(&*tx, &ev, EVENT_SOURCE, traceparent.as_deref()).await?;
        }
    }
    tx.commit().await?;
    Ok(Rescued {
        returned: usize::try_from(returned).unwrap_or(usize::MAX),
        unknown: rows.len(),
    })
}

/// Deletes terminal rows finished more than `older_than` ago, a batch at a time, to keep
/// the hot table small. Returns how many were deleted.
///
/// A pruned row that was sent, replied, or failed with an unknown outcome (Graph may have
/// delivered) leaves its permanent record in `contacted` (a hash of page and login_id and
/// the window's deadline), in the same statement: without it, the person's next login event
/// would find no row and open a window for a second "first" message.
pub async fn prune_finished(
    client: &impl deadpool_postgres::GenericClient,
    older_than: Duration,
    batch: i64,
) -> Result<u64, StoreError> {
    let secs = older_than.as_secs_f64();
    let row = client
        .query_one(
            concat!(
                "WITH gone AS ( \
                 DELETE FROM optins WHERE ctid IN ( \
                 SELECT ctid FROM optins \
                 WHERE finished_at < now() - make_interval(secs => $1) \
                   AND state IN (",
                lc_shared::state_sql!(sent),
                ", ",
                lc_shared::state_sql!(replied),
                ", ",
                lc_shared::state_sql!(failed),
                ", ",
                lc_shared::state_sql!(expired),
                ") \
                 LIMIT $2) \
                 RETURNING page_id, login_id, state, failure_reason, deadline), \
                 kept AS ( \
                 INSERT INTO contacted (person, deadline) \
                 SELECT person_key(page_id, login_id), deadline FROM gone \
                 WHERE state IN (",
                lc_shared::state_sql!(sent),
                ", ",
                lc_shared::state_sql!(replied),
                ") OR failure_reason = 'outcome_unknown' \
                 ON CONFLICT (person) DO UPDATE \
                 SET deadline = GREATEST(contacted.deadline, EXCLUDED.deadline), \
                     recorded_at = now()) \
                 SELECT count(*) FROM gone"
            ),
            &[&secs, &batch],
        )
        .await?;
    let deleted: i64 = row.get(0);
    Ok(u64::try_from(deleted).unwrap_or(0))
}
