//! The last step before a Send API call: the checks that must see the latest state, and the
//! row's `call_started_at` mark.
//!
//! The mark is what lets the rescuer tell a worker that died before calling (safe to retry)
//! from one that died with a call in flight (outcome unknown, see [`super::rescue`]). The
//! checks: the person has never been linked (a reply and its opt-in committed at the same
//! moment do not see each other, and a reply of long ago may be redelivered late, so this is
//! checked again here, whatever the link's time: a linked person may be mid-conversation),
//! and no other page has messaged the
//! login_id (Meta lets only that page use it). They run under a per-login_id advisory lock,
//! so two workers calling for two pages of one login_id take turns and the second sees the
//! first one's mark.

use deadpool_postgres::Client;
use time::OffsetDateTime;

use super::StoreError;
use super::claim::Claimed;

/// What [`begin_calls`] decided for a claimed opt-in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallCheck {
    /// The row is marked as called: make the Send API call now.
    Go,
    /// The person already replied (linked at this time): no first message is needed.
    Replied(OffsetDateTime),
    /// This login_id was (or may have been) messaged through this other page: Meta lets only
    /// that page use it.
    OtherPage(String),
    /// The claim is no longer ours (rescued and claimed again): make no call.
    Lost,
}

/// [`begin_calls`] for one claim.
pub async fn begin_call(client: &mut Client, c: &Claimed) -> Result<CallCheck, StoreError> {
    let mut checks = begin_calls(client, std::slice::from_ref(c)).await?;
    checks
        .pop()
        .ok_or_else(|| StoreError::Group("no check for the claim".into()))
}

/// Checks and marks several claims in one transaction (one commit), returning one decision
/// per claim, in order. Claims of one login_id in the same group see each other: they run
/// one after the other, and the first one marked makes the others [`CallCheck::OtherPage`].
pub async fn begin_calls(
    client: &mut Client,
    claims: &[Claimed],
) -> Result<Vec<CallCheck>, StoreError> {
    // Locks are taken in the one global order (`runtime::lock_order`), so two groups, or a
    // group and another writer of the same rows, cannot deadlock.
    let order = crate::runtime::lock_order::positions(claims, |c| {
        (c.login_id.as_str(), c.page_id.as_str())
    });
    let tx = client.transaction().await?;
    // Issued together, the statements are pipelined on the one connection (one round trip
    // per step for the whole group); the server runs them in the order they were issued:
    // first every lock, in key order, then every check and mark, in the same order.
    let lock = tx
        .prepare_cached("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .await?;
    let keys: Vec<String> = order
        .iter()
        .map(|&k| format!("one_page:{}", claims[k].login_id))
        .collect();
    let (tx_ref, lock) = (&tx, &lock);
    futures_util::future::try_join_all(
        keys.iter()
            .map(|key| async move { tx_ref.execute(lock, &[key]).await }),
    )
    .await?;
    let check_and_mark = tx
        .prepare_cached(concat!(
            "WITH link AS ( \
                 SELECT linked_at FROM links WHERE page_id = $1 AND login_id = $2), \
             other AS ( \
                 SELECT page_id FROM optins WHERE login_id = $2 AND page_id <> $1 \
                   AND (message_id IS NOT NULL OR failure_reason = 'outcome_unknown' \
                        OR (state = ",
            lc_shared::state_sql!(sending),
            " AND call_started_at IS NOT NULL)) \
                 LIMIT 1), \
             mark AS ( \
                 UPDATE optins SET call_started_at = now(), \
                     lease_expires_at = now() + make_interval(secs => $4), updated_at = now() \
                 WHERE page_id = $1 AND login_id = $2 AND fence = $3 AND state = ",
            lc_shared::state_sql!(sending),
            " \
                   AND NOT EXISTS (SELECT 1 FROM link) AND NOT EXISTS (SELECT 1 FROM other) \
                 RETURNING 1) \
             SELECT (SELECT linked_at FROM link LIMIT 1), (SELECT page_id FROM other), \
                    EXISTS (SELECT 1 FROM mark)"
        ))
        .await?;
    let check_and_mark = &check_and_mark;
    let rows = futures_util::future::try_join_all(order.iter().map(|&k| {
        let c = &claims[k];
        async move {
            tx_ref
                .query_one(
                    check_and_mark,
                    &[&c.page_id, &c.login_id, &c.fence, &c.lease.as_secs_f64()],
                )
                .await
        }
    }))
    .await?;
    let mut checks = vec![CallCheck::Lost; claims.len()];
    for (&k, row) in order.iter().zip(&rows) {
        let linked_at: Option<OffsetDateTime> = row.get(0);
        let other: Option<String> = row.get(1);
        let marked: bool = row.get(2);
        checks[k] = match (linked_at, other, marked) {
            (_, _, true) => CallCheck::Go,
            (Some(at), _, false) => CallCheck::Replied(at),
            (None, Some(page), false) => CallCheck::OtherPage(page),
            (None, None, false) => CallCheck::Lost,
        };
    }
    tx.commit().await?;
    Ok(checks)
}
