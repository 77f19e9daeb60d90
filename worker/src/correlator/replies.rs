//! One batch of `correlator.replies`: decode every delivery, then create links, mark opt-ins
//! replied and write `identity.linked` events, all in one transaction.
//!
//! Idempotence rests on the `links` primary key: `INSERT … ON CONFLICT DO NOTHING RETURNING`
//! tells a new link from an existing one, and only a new link updates the opt-in and writes an
//! event. A redelivered reply, a later reply repeating `prior_message`, or two replies of one
//! login_id in the same batch (the second sees the first's row in the same transaction) all
//! find the link already there. Concurrent replicas serialise on the primary key: the second
//! insert waits for the first transaction and then does nothing.

use deadpool_postgres::{Pool, Transaction};
use lc_meta::webhook::{EventDetails, QueuedEvent};
use lc_shared::amqp::header_str;
use lc_shared::events::{IdentityLinked, PublicEvent, insert_outbox};
use lc_shared::telemetry::{TraceParent, continue_trace, login_id_label};
use time::OffsetDateTime;
use tracing::Instrument;
use uuid::Uuid;

use super::metrics::CorrelatorMetrics;
use crate::runtime::consumer::{Incoming, Verdict};

/// CloudEvent `source` of the events the correlator writes.
pub const EVENT_SOURCE: &str = "/loginconnect/correlator";

/// Longest id we store. Meta's ids are far shorter; the bound keeps a hostile value from
/// failing the btree index (about 2.7 kB per entry) and so the whole batch.
const MAX_ID_BYTES: usize = 1024;

/// Why a batch could not be committed; the consumer retries it.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// No database connection could be taken from the pool.
    #[error("cannot get a database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// A statement failed.
    #[error("database error: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// A link was deleted (a data deletion request) while its reply was being handled.
    #[error("a link was deleted while its reply was handled; retrying the batch")]
    LinkDeleted,
}

impl BatchError {
    /// The database refused the data itself (SQLSTATE classes 22 "data exception", 23
    /// "integrity constraint violation" and 54 "program limit exceeded"): retrying the same
    /// message can never succeed, so it is dead-lettered instead of blocking the queue.
    fn rejected_data(&self) -> Option<String> {
        let Self::Db(e) = self else { return None };
        let code = e.code()?.code();
        ["22", "23", "54"]
            .iter()
            .any(|class| code.starts_with(class))
            .then(|| {
                let message = e
                    .as_db_error()
                    .map_or_else(|| e.to_string(), |d| d.message().to_owned());
                format!("the database rejected the reply's data (SQLSTATE {code}): {message}")
            })
    }
}

/// A decoded reply that names a login_id.
struct LinkRequest {
    /// Position in the batch (for the verdict).
    index: usize,
    page_id: String,
    login_id: String,
    psid: String,
    mid: Option<String>,
    /// The reply's own timestamp: the link's `linked_at`.
    at: OffsetDateTime,
    /// `prior_message.source`, logged only (the Login Connect values are undocumented).
    source: Option<String>,
    /// The delivery's `traceparent` (from ingest), the parent of this reply's span.
    traceparent: Option<TraceParent>,
}

/// A committed outcome and the trace context it was handled in (what the event carries).
type Traced = (Outcome, TraceParent);

/// What committing one link request did.
enum Outcome {
    /// A new link, announced by this event; the opt-in's state after the update, if any.
    Linked {
        event_id: Uuid,
        optin_state: Option<String>,
    },
    /// The same link existed already.
    Duplicate,
    /// The login_id is linked to another PSID; `recorded` is false if the conflict was
    /// recorded before (a redelivery).
    Conflict { linked_psid: String, recorded: bool },
}

/// Handles one batch. Undecodable messages get [`Verdict::DeadLetter`]; database trouble is
/// an `Err`, so the consumer retries the batch instead of dead-lettering healthy messages.
pub(super) async fn handle_batch(
    pool: &Pool,
    metrics: &CorrelatorMetrics,
    batch: &[Incoming],
) -> Result<Vec<Verdict>, BatchError> {
    let mut verdicts = vec![Verdict::Ack; batch.len()];
    let mut requests = Vec::new();
    let mut without_prior = 0;
    for (index, incoming) in batch.iter().enumerate() {
        match decode(index, incoming) {
            Ok(Some(request)) => requests.push(request),
            Ok(None) => without_prior += 1,
            Err(reason) => verdicts[index] = Verdict::DeadLetter(reason),
        }
    }
    // A fixed lock order across replicas avoids deadlocks; within one login_id the earliest
    // reply goes first, so it is the one whose PSID wins.
    requests.sort_by(|a, b| {
        (&a.page_id, &a.login_id, a.at, a.index).cmp(&(&b.page_id, &b.login_id, b.at, b.index))
    });

    let outcomes = match apply_together(pool, &requests).await {
        Ok(outcomes) => Ok(outcomes.into_iter().map(Ok).collect()),
        // Requests the one-by-one pass commits before an outage stops it are found as
        // duplicates when the batch is retried: idempotence makes the partial pass harmless.
        Err(e) if e.rejected_data().is_some() => apply_one_by_one(pool, &requests).await,
        Err(e) => Err(e),
    };
    let outcomes: Vec<Result<Traced, String>> = match outcomes {
        Ok(outcomes) => outcomes,
        Err(e) => {
            metrics.batch_failures.inc();
            return Err(e);
        }
    };

    // Committed: only now count and log, so a retried batch is not reported twice.
    for (request, outcome) in requests.iter().zip(outcomes) {
        match outcome {
            Ok((outcome, trace)) => report(metrics, request, outcome, &trace),
            Err(reason) => verdicts[request.index] = Verdict::DeadLetter(reason),
        }
    }
    metrics
        .replies
        .with_label_values(&["no_prior_message"])
        .inc_by(without_prior);
    for verdict in &verdicts {
        if let Verdict::DeadLetter(reason) = verdict {
            metrics.dead_lettered.inc();
            tracing::warn!(reason, "undecodable reply; dead-lettering it");
        }
    }
    Ok(verdicts)
}

/// Reads a delivery: `Ok(None)` for an event that names no login_id (nothing to do), `Err`
/// with the reason for one that can never be processed.
fn decode(index: usize, incoming: &Incoming) -> Result<Option<LinkRequest>, String> {
    let queued: QueuedEvent = serde_json::from_slice(&incoming.data)
        .map_err(|e| format!("body is not a queued webhook event (QueuedEvent JSON): {e}"))?;
    let event = queued.parse().map_err(|e| {
        format!(
            "queued `{}` event of page {} does not parse: {e}",
            queued.kind.as_str(),
            queued.page_id
        )
    })?;
    let reply = match event.details {
        EventDetails::Message(reply) | EventDetails::Postback(reply) => reply,
        // Opt-ins and `other` events are not routed here; if one arrives it has nothing to
        // join, like a reply without prior_message.
        EventDetails::Optin(_) | EventDetails::Other => return Ok(None),
    };
    let Some(prior) = reply.prior_message else {
        return Ok(None);
    };
    for (field, value) in [
        ("page id", Some(&event.page_id)),
        ("prior_message login_id", Some(&prior.login_id)),
        ("sender id", Some(&reply.psid)),
        ("mid", reply.mid.as_ref()),
    ] {
        if let Some(value) = value {
            check_id(field, value)?;
        }
    }
    let traceparent =
        header_str(&incoming.properties, "traceparent").and_then(|v| TraceParent::parse(&v));
    Ok(Some(LinkRequest {
        index,
        page_id: event.page_id,
        login_id: prior.login_id,
        psid: reply.psid,
        mid: reply.mid,
        at: event.timestamp,
        source: prior.source,
        traceparent,
    }))
}

/// PostgreSQL text cannot hold NUL, and overlong keys fail the index: both would fail the
/// batch forever, so they are rejected up front with a clear reason.
fn check_id(field: &str, value: &str) -> Result<(), String> {
    if value.contains('\0') {
        return Err(format!("{field} contains a NUL character"));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(format!(
            "{field} is {} bytes long (at most {MAX_ID_BYTES})",
            value.len()
        ));
    }
    Ok(())
}

/// The normal path: every request in one transaction.
async fn apply_together(pool: &Pool, requests: &[LinkRequest]) -> Result<Vec<Traced>, BatchError> {
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    // All requests at once: their statements are pipelined on the one connection (a round
    // trip per step for the whole batch, not per statement). The server still runs them one
    // at a time in the order they arrive and each request's own steps stay in order, so two
    // replies of one login_id still meet the primary key as described above.
    let outcomes =
        futures_util::future::try_join_all(requests.iter().map(|r| apply_traced(&tx, r))).await?;
    tx.commit().await?;
    Ok(outcomes)
}

/// The fallback when the database rejected some request's data: one transaction each, so
/// the culprit is dead-lettered (`Err(reason)`) and the others still commit.
async fn apply_one_by_one(
    pool: &Pool,
    requests: &[LinkRequest],
) -> Result<Vec<Result<Traced, String>>, BatchError> {
    let mut client = pool.get().await?;
    let mut outcomes = Vec::with_capacity(requests.len());
    for request in requests {
        let tx = client.transaction().await?;
        match apply_traced(&tx, request).await {
            Ok(outcome) => {
                tx.commit().await?;
                outcomes.push(Ok(outcome));
            }
            Err(e) => match e.rejected_data() {
                Some(reason) => outcomes.push(Err(reason)),
                None => return Err(e),
            },
        }
    }
    Ok(outcomes)
}

/// Links one reply inside `tx`, in a span that continues the reply's trace.
async fn apply_traced(tx: &Transaction<'_>, r: &LinkRequest) -> Result<Traced, BatchError> {
    let span = tracing::info_span!(
        "correlate_reply",
        page_id = %r.page_id,
        login = %login_id_label(&r.login_id),
        trace_id = tracing::field::Empty,
    );
    let trace = continue_trace(&span, r.traceparent.as_ref());
    span.record("trace_id", trace.trace_id_hex());
    let outcome = apply(tx, r, &trace).instrument(span).await?;
    Ok((outcome, trace))
}

/// Links one reply inside `tx`; `trace` goes onto the event's outbox row.
async fn apply(
    tx: &Transaction<'_>,
    r: &LinkRequest,
    trace: &TraceParent,
) -> Result<Outcome, BatchError> {
    let inserted = tx
        .query_opt(
            "INSERT INTO links (page_id, login_id, psid, linked_at, first_reply_mid) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (page_id, login_id) DO NOTHING \
             RETURNING psid",
            &[&r.page_id, &r.login_id, &r.psid, &r.at, &r.mid],
        )
        .await?;
    if inserted.is_some() {
        // Only a pending opt-in becomes `replied` (announced by the event below; the
        // scheduler claims only `pending`, so it will never send). A sent, sending, failed or
        // expired one keeps its state and its own event; it just learns when the reply came.
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
        let event_id = insert_outbox(&**tx, &event, EVENT_SOURCE, Some(&traceparent)).await?;
        return Ok(Outcome::Linked {
            event_id,
            optin_state,
        });
    }
    // The link exists, unless a data deletion removed it since the insert looked: then the
    // batch is retried and the reply links afresh.
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

/// Counts and logs one committed outcome.
fn report(metrics: &CorrelatorMetrics, r: &LinkRequest, outcome: Outcome, trace: &TraceParent) {
    let login = login_id_label(&r.login_id);
    let trace_id = trace.trace_id_hex();
    match outcome {
        Outcome::Linked {
            event_id,
            optin_state,
        } => {
            metrics.replies.with_label_values(&["linked"]).inc();
            tracing::info!(
                page_id = %r.page_id, login = %login, psid = %r.psid, mid = ?r.mid,
                source = ?r.source, optin_state = optin_state.as_deref().unwrap_or("not_seen_yet"),
                %event_id, %trace_id, "identity linked"
            );
        }
        Outcome::Duplicate => {
            metrics.replies.with_label_values(&["duplicate"]).inc();
            tracing::debug!(page_id = %r.page_id, login = %login, mid = ?r.mid, %trace_id, "link exists already");
        }
        Outcome::Conflict {
            linked_psid,
            recorded,
        } => {
            metrics.replies.with_label_values(&["conflict"]).inc();
            if recorded {
                metrics.link_conflicts.inc();
                tracing::warn!(
                    page_id = %r.page_id, login = %login, linked_psid = %linked_psid,
                    conflicting_psid = %r.psid, mid = ?r.mid, %trace_id,
                    "login_id already linked to another PSID; keeping the first link"
                );
            } else {
                tracing::debug!(page_id = %r.page_id, login = %login, conflicting_psid = %r.psid, %trace_id, "known link conflict seen again");
            }
        }
    }
}
