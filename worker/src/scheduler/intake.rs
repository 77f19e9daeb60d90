//! Recording opt-ins consumed from `scheduler.optins`, a batch per transaction.
//!
//! A redelivered or duplicated opt-in changes nothing, or moves a pending opt-in's deadline
//! earlier (see [`record::record_optin`]). Opt-ins due now are announced to the dispatcher
//! in-process right after the commit, so the first message goes out within milliseconds;
//! polling covers later sends and other replicas.
//!
//! One hostile opt-in must never stop the others. Its ids and time are checked before the
//! database ([`decode`]); if the database still refuses one row (SQLSTATE classes 22, 23, 54)
//! the batch is rolled back and recorded again one delivery per transaction, so that row is
//! dead-lettered with the database's reason and the rest commit. Failures a retry may cure
//! (connection lost, serialization, a send in flight) keep the whole batch for a retry.

use lc_shared::optin::OptinState;
use std::sync::Arc;

use deadpool_postgres::{Client, Pool};
use lc_meta::ids::{check_event_time, check_id, check_page_id};
use lc_meta::pages::PagesConfig;
use lc_meta::webhook::{EventDetails, QueuedEvent};
use lc_shared::telemetry::login_id_label;
use time::OffsetDateTime;
use tokio::sync::{Notify, RwLock};

use super::metrics::SchedulerMetrics;
use super::store::record::{self, NewOptin, RecordError, Recorded};
use super::store::{StoreError, Timing};
use crate::runtime::consumer::{Incoming, Verdict};

/// Decodes one delivery into an opt-in, or says why it cannot be one. `now` is the clock the
/// event's time is checked against (see [`check_event_time`]): a time more than a few minutes
/// ahead, or before 2004, is refused, which also keeps the deadline arithmetic in range.
pub fn decode(msg: &Incoming, now: OffsetDateTime) -> Result<NewOptin, String> {
    let queued: QueuedEvent = serde_json::from_slice(&msg.data)
        .map_err(|e| format!("not a queued webhook event (JSON of QueuedEvent expected): {e}"))?;
    let event = queued
        .parse()
        .map_err(|e| format!("queued event does not parse: {e}"))?;
    let EventDetails::Optin(optin) = event.details else {
        return Err(format!(
            "expected an opt-in on scheduler.optins, got a {} event",
            event.kind.as_str()
        ));
    };
    // Checked at ingest too; a message queued by an older ingest (or published by hand)
    // must not write an event whose routing key cannot carry its page.
    check_page_id(&event.page_id).map_err(|e| format!("opt-in refused: {e}"))?;
    check_id("login_id", &optin.login_id).map_err(|e| {
        format!(
            "opt-in for page {} refused: {e}",
            event.page_id.escape_debug()
        )
    })?;
    check_event_time(event.timestamp, now).map_err(|e| {
        format!(
            "opt-in for page {} refused: {e}",
            event.page_id.escape_debug()
        )
    })?;
    Ok(NewOptin {
        page_id: event.page_id,
        login_id: optin.login_id,
        opted_in_at: event.timestamp,
        source: queued.source,
        traceparent: lc_shared::amqp::header_str(&msg.properties, "traceparent"),
    })
}

/// A decoded opt-in and where it sits in the batch (for its verdict).
struct Decoded {
    index: usize,
    optin: NewOptin,
}

/// What recording one decoded opt-in came to: recorded, or refused with the reason.
type Outcome = Result<Recorded, String>;

/// Records a batch in one transaction and returns one verdict per delivery. An opt-in that
/// cannot be decoded, or whose row the database refuses, gets [`Verdict::DeadLetter`] with
/// the reason; the rest are committed. `Err` (retry the whole batch) only for failures a
/// retry may cure.
pub async fn record_batch(
    pool: &Pool,
    pages: &Arc<RwLock<Arc<PagesConfig>>>,
    timing: &Timing,
    metrics: &SchedulerMetrics,
    wake: &Notify,
    batch: Vec<Incoming>,
) -> Result<Vec<Verdict>, StoreError> {
    let pages = pages.read().await.clone();
    let now = OffsetDateTime::now_utc();
    let mut verdicts = vec![Verdict::Ack; batch.len()];
    let mut decoded = Vec::with_capacity(batch.len());
    for (index, msg) in batch.iter().enumerate() {
        match decode(msg, now) {
            Ok(optin) => decoded.push(Decoded { index, optin }),
            Err(reason) => verdicts[index] = Verdict::DeadLetter(reason),
        }
    }
    let mut client = pool.get().await?;
    let outcomes = match record_together(&mut client, &pages, timing, now, &decoded).await {
        Ok(recorded) => recorded.into_iter().map(Ok).collect(),
        Err(e) => match e.refusal() {
            Some(reason) => {
                // The transaction is rolled back; find the culprit one delivery at a time.
                // Deliveries this pass commits before an outage stops it are found as
                // duplicates when the batch is retried, so a partial pass is harmless.
                tracing::warn!(
                    reason,
                    batch = decoded.len(),
                    "the database refused a row of the batch; recording it one delivery per transaction"
                );
                record_one_by_one(&mut client, &pages, timing, now, &decoded).await?
            }
            None => return Err(into_store_error(e)),
        },
    };
    drop(client);

    // Committed: only now count and log, so a retried batch is not reported twice.
    let mut due = false;
    for (d, outcome) in decoded.iter().zip(outcomes) {
        let optin = &d.optin;
        let recorded = match outcome {
            Ok(recorded) => recorded,
            Err(reason) => {
                verdicts[d.index] = Verdict::DeadLetter(reason);
                continue;
            }
        };
        let label = match recorded {
            Recorded::Pending { due_now } => {
                due |= due_now;
                "pending"
            }
            Recorded::Advanced { due_now } => {
                due |= due_now;
                tracing::info!(page_id = %optin.page_id, login_id = %login_id_label(&optin.login_id), opted_in_at = %optin.opted_in_at, "duplicate opt-in with an earlier time: deadline moved earlier");
                // Still the same opt-in: counted as a duplicate.
                "duplicate"
            }
            Recorded::Duplicate => "duplicate",
            Recorded::Replied => "replied",
            Recorded::Expired => "expired",
            Recorded::UnknownPage => "unknown_page",
            Recorded::Deleted => "deleted",
        };
        metrics.optins_recorded.with_label_values(&[label]).inc();
        match recorded {
            Recorded::Expired => metrics.terminal_of(OptinState::Expired).inc(),
            Recorded::UnknownPage => {
                metrics.terminal_of(OptinState::Failed).inc();
                tracing::error!(page_id = %optin.page_id, login_id = %login_id_label(&optin.login_id), "opt-in for a page that is not in PAGES_FILE: recorded as failed (unknown_page)");
            }
            Recorded::Replied => metrics.terminal_of(OptinState::Replied).inc(),
            Recorded::Deleted => {
                tracing::info!(page_id = %optin.page_id, login_id = %login_id_label(&optin.login_id), opted_in_at = %optin.opted_in_at, "opt-in of a person whose data was deleted since (a redelivery): nothing recorded");
            }
            _ => {}
        }
        tracing::debug!(page_id = %optin.page_id, login_id = %login_id_label(&optin.login_id), result = label, "opt-in recorded");
    }
    let dead = verdicts.iter().filter(|v| **v != Verdict::Ack).count();
    metrics.dead_lettered.inc_by(dead as u64);
    if due {
        wake.notify_one();
    }
    Ok(verdicts)
}

/// The normal path: every opt-in of the batch in one transaction.
async fn record_together(
    client: &mut Client,
    pages: &PagesConfig,
    timing: &Timing,
    now: OffsetDateTime,
    decoded: &[Decoded],
) -> Result<Vec<Recorded>, RecordError> {
    let tx = client.transaction().await.map_err(StoreError::from)?;
    let mut recorded = Vec::with_capacity(decoded.len());
    for d in decoded {
        let known = pages.get(&d.optin.page_id).is_some();
        recorded.push(record::record_optin(&tx, &d.optin, known, timing, now).await?);
    }
    tx.commit().await.map_err(StoreError::from)?;
    Ok(recorded)
}

/// The fallback when a row was refused: one transaction per opt-in, so the refused one is
/// reported (`Err(reason)`, to be dead-lettered) and the others commit. A failure that is not
/// a refusal stops the pass, and the batch is retried whole.
async fn record_one_by_one(
    client: &mut Client,
    pages: &PagesConfig,
    timing: &Timing,
    now: OffsetDateTime,
    decoded: &[Decoded],
) -> Result<Vec<Outcome>, StoreError> {
    let mut outcomes = Vec::with_capacity(decoded.len());
    for d in decoded {
        let outcome = record_together(client, pages, timing, now, std::slice::from_ref(d)).await;
        match outcome {
            Ok(recorded) => outcomes.extend(recorded.into_iter().map(Ok)),
            Err(e) => match e.refusal() {
                Some(reason) => {
                    tracing::warn!(page_id = %d.optin.page_id.escape_debug(), login_id = %login_id_label(&d.optin.login_id), reason, "opt-in refused by the database; dead-lettering it");
                    outcomes.push(Err(reason));
                }
                None => return Err(into_store_error(e)),
            },
        }
    }
    Ok(outcomes)
}

/// A failure that is not a refusal, as the consumer reports it before retrying the batch.
fn into_store_error(e: RecordError) -> StoreError {
    match e {
        RecordError::Store(e) => e,
        // Unrecordable is always a refusal; kept total rather than unreachable.
        RecordError::Unrecordable(reason) => StoreError::Group(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lc_meta::webhook::{EventKind, QueuedEvent};

    fn incoming(login_id: &str) -> Incoming {
        incoming_at(login_id, 1_700_000_000_000)
    }

    fn incoming_at(login_id: &str, timestamp_ms: i64) -> Incoming {
        let event = serde_json::value::RawValue::from_string(format!(
            r#"{{"recipient":{{"id":"1"}},"timestamp":{timestamp_ms},"optin":{{"login_id":"{login_id}"}}}}"#
        ))
        .expect("raw");
        let queued = QueuedEvent {
            page_id: "1".into(),
            kind: EventKind::Optin,
            source: "webhook".into(),
            timestamp_ms,
            idempotency_key: "k".into(),
            event,
        };
        Incoming {
            data: serde_json::to_vec(&queued).expect("json"),
            routing_key: "optin.1".into(),
            properties: lapin::BasicProperties::default(),
            redelivered: false,
        }
    }

    /// A clock shortly after the opt-ins of [`incoming`].
    fn now() -> OffsetDateTime {
        time::macros::datetime!(2023-11-14 22:20 UTC)
    }

    #[test]
    fn decodes_an_optin_and_refuses_oversized_ids() {
        let ok = decode(&incoming("abc"), now()).expect("decodes");
        assert_eq!(ok.login_id, "abc");
        assert_eq!(ok.page_id, "1");
        assert_eq!(ok.source, "webhook");
        let err = decode(&incoming(&"x".repeat(5000)), now()).expect_err("too long");
        assert!(err.contains("login_id is 5000 bytes long"), "{err}");
    }

    #[test]
    fn refuses_nul_and_control_characters_in_ids_naming_the_id() {
        let err = decode(&incoming(r"L\u0000X"), now()).expect_err("nul");
        assert!(err.contains("login_id contains a NUL character"), "{err}");
        let err = decode(&incoming(r"L\u001bX"), now()).expect_err("escape");
        assert!(
            err.contains("login_id contains the control character U+001B"),
            "{err}"
        );
    }

    #[test]
    fn refuses_event_times_in_the_future_or_before_2004() {
        // The opt-in of `incoming` happened at 2023-11-14 22:13:20.
        let clock_behind = time::macros::datetime!(2023-11-14 22:00 UTC);
        let err = decode(&incoming("abc"), clock_behind).expect_err("future");
        assert!(err.contains("in the future"), "{err}");
        let far_future = time::macros::datetime!(2030-01-01 00:00 UTC);
        assert!(decode(&incoming("abc"), far_future).is_ok(), "old is fine");
        // 10^9 (read as seconds): September 2001, before any opt-in could exist.
        let err = decode(&incoming_at("abc", 1_000_000_000), now()).expect_err("1970");
        assert!(err.contains("before 2004-01-01"), "{err}");
    }
}
