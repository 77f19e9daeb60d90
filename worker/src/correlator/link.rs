//! What one reply that names a login_id does in the database, inside the batch's
//! transaction: a tombstone check, then a link (or a duplicate or conflict), or — for a
//! source that may not link — a row kept for inspection.
//!
//! Idempotence rests on the `links` primary key: `INSERT … ON CONFLICT DO NOTHING RETURNING`
//! tells a new link from an existing one, and only a new link updates the opt-in and writes an
//! event. A redelivered reply, a later reply repeating `prior_message`, or two replies of one
//! login_id in the same batch (the second sees the first's row in the same transaction) all
//! find the link already there. Concurrent replicas serialise on the primary key: the second
//! insert waits for the first transaction and then does nothing.

use std::sync::Arc;

use deadpool_postgres::Transaction;
use lc_shared::events::{IdentityLinked, PublicEvent, insert_outbox};
use lc_shared::telemetry::TraceParent;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::runtime::batch_failure::{self, BatchFailure};

/// CloudEvent `source` of the events the correlator writes.
pub const EVENT_SOURCE: &str = "/loginconnect/correlator";

/// The only `prior_message.source` that links by default: Login Connect's own.
pub const DEFAULT_LINK_SOURCE: &str = "login_connect";

/// Parses one entry of `CORRELATOR_LINK_SOURCES`: trimmed, not empty. (clap shows the
/// refused value in its error, which is fine here: a source name is not a secret.)
pub fn parse_link_source(value: &str) -> Result<String, String> {
    let source = value.trim();
    if source.is_empty() {
        return Err("an empty source name (check for a stray comma)".into());
    }
    Ok(source.to_owned())
}

/// The `prior_message.source` values that may link a login_id (an allow-list, compared
/// exactly). Meta appends `prior_message` for checkbox-plugin `user_ref`s too, and a
/// `user_ref` is chosen by the browser: letting it link would let anyone claim a login_id.
#[derive(Debug, Clone)]
pub struct LinkSources(Arc<[String]>);

impl LinkSources {
    /// The allow-list `sources`.
    pub fn new(sources: &[String]) -> Self {
        Self(sources.iter().cloned().collect())
    }

    /// True if a `prior_message` with this `source` may link; a missing source never may.
    pub fn allows(&self, source: Option<&str>) -> bool {
        source.is_some_and(|s| self.0.iter().any(|allowed| allowed == s))
    }
}

impl Default for LinkSources {
    fn default() -> Self {
        Self::new(&[DEFAULT_LINK_SOURCE.to_owned()])
    }
}

/// Why a batch could not be committed; the consumer retries it.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// No database connection could be taken from the pool.
    #[error("cannot get a database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// A statement failed.
    #[error("database error: {}", lc_shared::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    /// A link was deleted (a data deletion request) while its reply was being handled.
    #[error("a link was deleted while its reply was handled; retrying the batch")]
    LinkDeleted,
}

impl BatchError {
    /// The database refused the data itself (SQLSTATE classes 22 "data exception", 23
    /// "integrity constraint violation" and 54 "program limit exceeded"): retrying the same
    /// message can never succeed, so it is dead-lettered instead of blocking the queue.
    pub fn rejected_data(&self) -> Option<String> {
        let Self::Db(e) = self else { return None };
        let code = e.code()?.code();
        crate::scheduler::store::record::is_row_specific_sqlstate(code).then(|| {
            let message = e
                .as_db_error()
                .map_or_else(|| e.to_string(), |d| d.message().to_owned());
            format!("the database rejected the reply's data (SQLSTATE {code}): {message}")
        })
    }
}

impl BatchFailure for BatchError {
    fn is_row_refusal(&self) -> bool {
        self.rejected_data().is_some()
    }

    fn is_aborted_transaction(&self) -> bool {
        matches!(self, Self::Db(e) if batch_failure::is_aborted_transaction(e))
    }
}

/// A decoded reply that names a login_id.
#[derive(Debug, Clone)]
pub struct LinkRequest {
    /// Position in the batch (for the verdict).
    pub index: usize,
    /// The Page.
    pub page_id: String,
    /// `prior_message`'s login_id.
    pub login_id: String,
    /// `sender.id`.
    pub psid: String,
    /// The reply's mid.
    pub mid: Option<String>,
    /// The reply's own timestamp: the link's `linked_at`.
    pub at: OffsetDateTime,
    /// `prior_message.source` as sent.
    pub source: Option<String>,
    /// Whether `source` is on the allow-list (else the reply is only kept for inspection).
    pub may_link: bool,
    /// The delivery's `traceparent` (from ingest), the parent of this reply's span.
    pub traceparent: Option<TraceParent>,
}

/// What committing one link request did.
#[derive(Debug)]
pub enum Outcome {
    /// A new link, announced by this event; the opt-in's state after the update, if any.
    Linked {
        /// The `identity.linked` event's id.
        event_id: Uuid,
        /// The opt-in's state after the update (`None`: not seen yet).
        optin_state: Option<String>,
    },
    /// The same link existed already.
    Duplicate,
    /// The login_id is linked to another PSID; `recorded` is false if the conflict was
    /// recorded before (a redelivery).
    Conflict {
        /// The PSID the login_id stays linked to.
        linked_psid: String,
        /// False if this conflict was recorded before.
        recorded: bool,
    },
    /// The source may not link: kept in `foreign_prior_messages` (`recorded` is false for
    /// a redelivery of a reply kept before).
    Foreign {
        /// False if this reply was kept before.
        recorded: bool,
    },
    /// The person was deleted by a data deletion request after this reply happened (a
    /// redelivery or replay): nothing is stored.
    Deleted,
}

/// Handles one reply inside `tx`; `trace` goes onto the event's outbox row.
pub async fn apply(
    tx: &Transaction<'_>,
    r: &LinkRequest,
    trace: &TraceParent,
) -> Result<Outcome, BatchError> {
    let tombstone = tx
        .query_opt(
            "SELECT 1 FROM deleted_people \
             WHERE person = person_key($1, $2) AND deleted_at >= $3",
            &[&r.page_id, &r.login_id, &r.at],
        )
        .await?;
    if tombstone.is_some() {
        return Ok(Outcome::Deleted);
    }
    if !r.may_link {
        let recorded = tx
            .query_opt(
                "INSERT INTO foreign_prior_messages \
                     (page_id, login_id, psid, mid, source, replied_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING id",
                &[&r.page_id, &r.login_id, &r.psid, &r.mid, &r.source, &r.at],
            )
            .await?
            .is_some();
        return Ok(Outcome::Foreign { recorded });
    }
    let inserted = tx
        .query_opt(
            "INSERT INTO links (page_id, login_id, psid, linked_at, first_reply_mid) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (page_id, login_id) DO NOTHING \
             RETURNING psid",
            &[&r.page_id, &r.login_id, &r.psid, &r.at, &r.mid],
        )
        .await?;
    if inserted.is_some() {
        return link_new(tx, r, trace).await;
    }
    // The link exists, unless a data deletion removed it since the insert looked: then the
    // batch is retried and the reply links afresh (or meets the tombstone).
    let linked_psid: String = tx
        .query_opt(
            "SELECT psid FROM links WHERE page_id = $1 AND login_id = $2",
            &[&r.page_id, &r.login_id],
        )
        .await?
        .ok_or(BatchError::LinkDeleted)?
        .get(0);
    if linked_psid == r.psid {
        return Ok(Outcome::Duplicate);
    }
    let recorded = tx
        .query_opt(
            "INSERT INTO link_conflicts (page_id, login_id, linked_psid, conflicting_psid, mid) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (page_id, login_id, conflicting_psid) DO NOTHING RETURNING id",
            &[&r.page_id, &r.login_id, &linked_psid, &r.psid, &r.mid],
        )
        .await?
        .is_some();
    Ok(Outcome::Conflict {
        linked_psid,
        recorded,
    })
}

/// The rest of a new link: the opt-in learns of the reply, and the event is written.
async fn link_new(
    tx: &Transaction<'_>,
    r: &LinkRequest,
    trace: &TraceParent,
) -> Result<Outcome, BatchError> {
    // Only a pending opt-in becomes `replied` (announced by the event below; the scheduler
    // claims only `pending`, so it will never send). A sent, sending, failed or expired one
    // keeps its state and its own event; it just learns when the reply came.
    let optin = tx
        .query_opt(
            concat!(
                "UPDATE optins SET \
               replied_at = COALESCE(replied_at, $3), \
               state = CASE WHEN state = ",
                lc_shared::state_sql!(pending),
                " THEN ",
                lc_shared::state_sql!(replied),
                " ELSE state END, \
               finished_at = CASE WHEN state = ",
                lc_shared::state_sql!(pending),
                " THEN now() ELSE finished_at END, \
               lease_owner = CASE WHEN state = ",
                lc_shared::state_sql!(pending),
                " THEN NULL ELSE lease_owner END, \
               lease_expires_at = CASE WHEN state = ",
                lc_shared::state_sql!(pending),
                " THEN NULL \
                                       ELSE lease_expires_at END, \
               updated_at = now() \
             WHERE page_id = $1 AND login_id = $2 \
             RETURNING opted_in_at, state"
            ),
            &[&r.page_id, &r.login_id, &r.at],
        )
        .await?;
    let (opted_in_at, optin_state) = match optin {
        Some(row) => (Some(row.get::<_, OffsetDateTime>(0)), Some(row.get(1))),
        // The opt-in has not arrived yet: the scheduler finds the link when it does.
        None => (None, None),
    };
    let event = PublicEvent::IdentityLinked(IdentityLinked {
        page_id: r.page_id.clone(),
        login_id: r.login_id.clone(),
        psid: r.psid.clone(),
        linked_at: r.at,
        opted_in_at,
        first_reply_mid: r.mid.clone(),
    });
    let traceparent = trace.to_string();
    let event_id = insert_outbox(tx, &event, EVENT_SOURCE, Some(&traceparent)).await?;
    Ok(Outcome::Linked {
        event_id,
        optin_state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_sources_link_and_a_missing_source_never_does() {
        let default = LinkSources::default();
        assert!(default.allows(Some("login_connect")));
        for refused in [
            Some("checkbox_plugin"),
            Some("LOGIN_CONNECT"),
            Some(" login_connect"),
            Some(""),
            None,
        ] {
            assert!(!default.allows(refused), "{refused:?}");
        }
        let two = LinkSources::new(&["login_connect".into(), "customer_matching".into()]);
        assert!(two.allows(Some("customer_matching")));
    }

    #[test]
    fn link_source_entries_are_trimmed_and_never_empty() {
        assert_eq!(
            parse_link_source(" login_connect ").as_deref(),
            Ok("login_connect")
        );
        assert!(parse_link_source("  ").is_err());
        assert!(parse_link_source("").is_err());
    }
}
