//! One batch of `correlator.replies`: decode every delivery, then handle every reply that
//! names a login_id ([`link::apply`]), all in one transaction.
//!
//! Ids are checked before the database (`lc_meta::ids`, as the scheduler's intake does), so a
//! NUL, a control character or an overlong id dead-letters its one reply with a reason. If
//! the database still refuses one row (SQLSTATE classes 22, 23, 54), every statement of the
//! pipelined batch is awaited before judging: the refusal may reach the batch after another
//! reply's 25P02 ("transaction aborted"), which says nothing about that reply. Then the batch
//! is handled again one reply per transaction, so exactly the refused reply is
//! dead-lettered and the others commit.

use deadpool_postgres::{Pool, Transaction};
use lc_meta::ids::{check_id, check_page_id};
use lc_meta::webhook::{EventDetails, QueuedEvent};
use lc_shared::amqp::header_str;
use lc_shared::telemetry::{TraceParent, continue_trace, login_id_label};
use tracing::Instrument;

use super::link::{self, BatchError, LinkRequest, LinkSources, Outcome};
use super::metrics::CorrelatorMetrics;
use crate::runtime::batch_failure::most_telling;
use crate::runtime::consumer::{Incoming, Verdict};
use crate::runtime::lock_order;

/// A committed outcome and the trace context it was handled in (what the event carries).
type Traced = (Outcome, TraceParent);

/// Handles one batch. Undecodable messages get [`Verdict::DeadLetter`]; database trouble is
/// an `Err`, so the consumer retries the batch instead of dead-lettering healthy messages.
pub(super) async fn handle_batch(
    pool: &Pool,
    metrics: &CorrelatorMetrics,
    sources: &LinkSources,
    batch: &[Incoming],
) -> Result<Vec<Verdict>, BatchError> {
    let mut verdicts = vec![Verdict::Ack; batch.len()];
    let mut requests = Vec::new();
    let mut without_prior = 0;
    for (index, incoming) in batch.iter().enumerate() {
        match decode(index, incoming, sources) {
            Ok(Some(request)) => requests.push(request),
            Ok(None) => without_prior += 1,
            Err(reason) => verdicts[index] = Verdict::DeadLetter(reason),
        }
    }
    // The one lock order of every writer of people's rows (`runtime::lock_order`) avoids
    // deadlocks with other loops, replicas and the scheduler; within one person the earliest
    // reply goes first, so it is the one whose PSID wins.
    requests.sort_by(|a, b| {
        lock_order::cmp_people((&a.login_id, &a.page_id), (&b.login_id, &b.page_id))
            .then((a.at, a.index).cmp(&(b.at, b.index)))
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
fn decode(
    index: usize,
    incoming: &Incoming,
    sources: &LinkSources,
) -> Result<Option<LinkRequest>, String> {
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
    // The page id becomes a word of the event's routing key (checked at ingest too).
    check_page_id(&event.page_id).map_err(|e| format!("reply refused: {e}"))?;
    for (field, value) in [
        ("prior_message login_id", Some(&prior.login_id)),
        ("sender id", Some(&reply.psid)),
        ("mid", reply.mid.as_ref()),
        // Kept (and logged) for a source that may not link; an empty one is just not listed.
        (
            "prior_message source",
            prior.source.as_ref().filter(|s| !s.is_empty()),
        ),
    ] {
        if let Some(value) = value {
            check_id(field, value).map_err(|e| {
                format!(
                    "reply to page {} refused: {e}",
                    event.page_id.escape_debug()
                )
            })?;
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
        may_link: sources.allows(prior.source.as_deref()),
        source: prior.source,
        traceparent,
    }))
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
    // replies of one login_id still meet the primary key as described in [`link`].
    //
    // Every request is awaited, not just until the first error: after one statement fails,
    // the others queued behind it fail with 25P02, and which failure a short-circuiting join
    // sees first depends on when it is polled. Only the full set says whether some reply's
    // data was refused.
    let results =
        futures_util::future::join_all(requests.iter().map(|r| apply_traced(&tx, r))).await;
    let mut outcomes = Vec::with_capacity(results.len());
    let mut failure: Option<BatchError> = None;
    for result in results {
        match result {
            Ok(outcome) => outcomes.push(outcome),
            Err(e) => failure = Some(most_telling(failure, e)),
        }
    }
    if let Some(e) = failure {
        // Dropping `tx` rolls the batch back.
        return Err(e);
    }
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
    let outcome = link::apply(tx, r, &trace).instrument(span).await?;
    Ok((outcome, trace))
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
        Outcome::Foreign { recorded } => {
            metrics.replies.with_label_values(&["foreign_source"]).inc();
            if recorded {
                tracing::warn!(
                    page_id = %r.page_id, login = %login, psid = %r.psid, mid = ?r.mid,
                    source = ?r.source, %trace_id,
                    "prior_message from a source that may not link (CORRELATOR_LINK_SOURCES): \
                     not linked, kept in foreign_prior_messages"
                );
            } else {
                tracing::debug!(page_id = %r.page_id, login = %login, mid = ?r.mid, %trace_id, "known foreign prior_message seen again");
            }
        }
        Outcome::Deleted => {
            metrics.replies.with_label_values(&["deleted"]).inc();
            tracing::info!(
                page_id = %r.page_id, login = %login, mid = ?r.mid, %trace_id,
                "reply of a person deleted since (a redelivery): nothing stored"
            );
        }
    }
}
