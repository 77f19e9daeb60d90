//! Sending a failed opt-in again while its window is still open — only where a second call
//! can never be a second first message.
//!
//! Refused (each with its [`RetryRefusal`]): anything not `failed`; `outcome_unknown` (a call
//! may have reached the person: never twice); `other_page` (Meta lets only the page that
//! messaged the login_id first use it); a person linked (they may be mid-conversation), in a
//! window already contacted (`contacted`, V6), or whose data was deleted after this opt-in
//! (`deleted_people`) — the rules the scheduler applies when it records an opt-in — or one
//! another page has (or may have) messaged, as the scheduler checks before each call; and a
//! window that closes within the margin.
//!
//! The retry is one guarded `UPDATE` (`WHERE state = 'failed' AND …`, the same conditions),
//! so two operators pressing the button, or a deletion at the same moment, cannot both win.
//! The row goes back to `pending` as if new: attempts 0, due now, failure and error cleared.
//! Downstream has seen `first_message.failed`; a `first_message.sent` (or another failure)
//! follows (README, "Retrying a failed opt-in").

use std::time::Duration;

use deadpool_postgres::GenericClient;
use lc_shared::optin::{FailureReason, OptinState};
use lc_shared::telemetry::login_id_label;
use serde::Serialize;

use super::OperateError;

/// How close to its deadline a retry is still allowed by default: the scheduler's default
/// `SAFETY_MARGIN_SECS` (120) plus time for the claim and a few retries of its own.
pub const DEFAULT_RETRY_MARGIN: Duration = Duration::from_secs(600);

/// Why a retry was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub enum RetryRefusal {
    /// Only `failed` opt-ins are retried (pending and sending ones are under way; sent,
    /// replied and expired ones are done).
    NotFailed {
        /// The opt-in's state.
        state: OptinState,
    },
    /// A call may have reached the person: never twice.
    OutcomeUnknown,
    /// Another page messaged this login_id first; only that page may use it.
    OtherPage,
    /// The window closes within the margin (or has closed).
    WindowClosing,
    /// The person is linked: they replied and may be mid-conversation.
    Linked,
    /// The person was contacted in a window this opt-in falls in (a pruned row's record).
    Contacted,
    /// The person's data was deleted after this opt-in.
    Deleted,
    /// Another page has messaged (or may have messaged) this login_id since.
    MessagedByOtherPage {
        /// That page.
        page_id: String,
    },
}

impl RetryRefusal {
    /// What an operator reads: what stands in the way, and what (if anything) to do.
    pub fn explain(&self) -> String {
        match self {
            Self::NotFailed { state } => format!(
                "the opt-in is {state}, not failed: only failed opt-ins are retried"
            ),
            Self::OutcomeUnknown => "the last call's outcome is unknown: it may have reached the person, and a first message is never sent twice".into(),
            Self::OtherPage => "another page messaged this login_id first; Meta lets only that page use it".into(),
            Self::WindowClosing => "the 24-hour window closes too soon (or has closed) for another attempt".into(),
            Self::Linked => "the person is linked (they replied): a first message now could interrupt a conversation".into(),
            Self::Contacted => "the person was already contacted in this window".into(),
            Self::Deleted => "the person's data was deleted after this opt-in".into(),
            Self::MessagedByOtherPage { page_id } => format!(
                "page {page_id} has (or may have) messaged this login_id; Meta lets only that page use it"
            ),
        }
    }
}

/// What [`retry`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum RetryOutcome {
    /// Back to `pending`, due now: a scheduler claims it within its poll interval.
    Retried,
    /// No opt-in of that login_id on that page.
    NotFound,
    /// Refused; nothing changed.
    Refused(RetryRefusal),
}

/// Facts about the row and the person, and the guarded update, in one statement. `$3` is the
/// margin in seconds. The update's own `WHERE` re-reads the row as it is at the update, so a
/// concurrent change of state wins over the facts read at the statement's start.
const RETRY_SQL: &str = concat!(
    "WITH facts AS ( \
         SELECT o.state, o.failure_reason, \
                o.deadline > now() + make_interval(secs => $3) AS open, \
                EXISTS (SELECT 1 FROM links l \
                        WHERE l.page_id = o.page_id AND l.login_id = o.login_id) AS linked, \
                EXISTS (SELECT 1 FROM contacted c WHERE c.person = person_key(o.page_id, o.login_id) \
                        AND o.opted_in_at < c.deadline) AS contacted, \
                EXISTS (SELECT 1 FROM deleted_people d \
                        WHERE d.person = person_key(o.page_id, o.login_id) \
                          AND d.deleted_at >= o.opted_in_at) AS deleted, \
                (SELECT x.page_id FROM optins x \
                 WHERE x.login_id = o.login_id AND x.page_id <> o.page_id \
                   AND (x.message_id IS NOT NULL OR x.failure_reason = 'outcome_unknown' \
                        OR (x.state = ",
    lc_shared::state_sql!(sending),
    " AND x.call_started_at IS NOT NULL)) \
                 LIMIT 1) AS other \
         FROM optins o WHERE o.page_id = $1 AND o.login_id = $2), \
     retried AS ( \
         UPDATE optins o SET state = ",
    lc_shared::state_sql!(pending),
    ", attempts = 0, next_attempt_at = now(), \
             failure_reason = NULL, last_error_code = NULL, last_error_subcode = NULL, \
             last_error_message = NULL, last_error_fbtrace = NULL, finished_at = NULL, \
             claimed_at = NULL, call_started_at = NULL, updated_at = now() \
         FROM facts f \
         WHERE o.page_id = $1 AND o.login_id = $2 AND o.state = ",
    lc_shared::state_sql!(failed),
    " AND o.failure_reason IS DISTINCT FROM 'outcome_unknown' \
           AND o.failure_reason IS DISTINCT FROM 'other_page' \
           AND o.deadline > now() + make_interval(secs => $3) \
           AND NOT f.linked AND NOT f.contacted AND NOT f.deleted AND f.other IS NULL \
         RETURNING 1) \
     SELECT f.state, f.failure_reason, f.open, f.linked, f.contacted, f.deleted, f.other, \
            EXISTS (SELECT 1 FROM retried) \
     FROM facts f"
);

/// Retries the failed opt-in of `login_id` on `page_id` if that is safe (see the module
/// doc) and its deadline is more than `margin` away; logs `actor`, the page and a label of
/// the login_id.
pub async fn retry(
    c: &impl GenericClient,
    actor: &str,
    page_id: &str,
    login_id: &str,
    margin: Duration,
) -> Result<RetryOutcome, OperateError> {
    let Some(r) = c
        .query_opt(RETRY_SQL, &[&page_id, &login_id, &margin.as_secs_f64()])
        .await?
    else {
        return Ok(RetryOutcome::NotFound);
    };
    let state: OptinState = r.try_get(0)?;
    let reason: Option<FailureReason> = r.try_get(1)?;
    let open: bool = r.try_get(2)?;
    let linked: bool = r.try_get(3)?;
    let contacted: bool = r.try_get(4)?;
    let deleted: bool = r.try_get(5)?;
    let other: Option<String> = r.try_get(6)?;
    let retried: bool = r.try_get(7)?;
    let login = login_id_label(login_id);
    if retried {
        tracing::info!(actor, page_id, login_id = %login, "operate: failed opt-in retried (pending again, due now)");
        return Ok(RetryOutcome::Retried);
    }
    // The first rule that stands in the way, the strongest first.
    let refusal = if state != OptinState::Failed {
        RetryRefusal::NotFailed { state }
    } else if reason == Some(FailureReason::OutcomeUnknown) {
        RetryRefusal::OutcomeUnknown
    } else if reason == Some(FailureReason::OtherPage) {
        RetryRefusal::OtherPage
    } else if deleted {
        RetryRefusal::Deleted
    } else if linked {
        RetryRefusal::Linked
    } else if contacted {
        RetryRefusal::Contacted
    } else if let Some(page_id) = other {
        RetryRefusal::MessagedByOtherPage { page_id }
    } else if !open {
        RetryRefusal::WindowClosing
    } else {
        // The facts allowed it but the row changed before the update (another retry won).
        RetryRefusal::NotFailed {
            state: OptinState::Pending,
        }
    };
    tracing::info!(actor, page_id, login_id = %login, refused = ?refusal, "operate: retry refused");
    Ok(RetryOutcome::Refused(refusal))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn outcomes_serialise_with_their_result_and_reason() {
        let refused = RetryOutcome::Refused(RetryRefusal::NotFailed {
            state: OptinState::Sent,
        });
        assert_eq!(
            serde_json::to_value(&refused).expect("serialises"),
            json!({"result": "refused", "reason": "not_failed", "state": "sent"})
        );
        assert_eq!(
            serde_json::to_value(RetryOutcome::Retried).expect("serialises"),
            json!({"result": "retried"})
        );
        let never = RetryRefusal::OutcomeUnknown;
        assert!(never.explain().contains("never sent twice"));
    }
}
