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
use std::collections::BTreeMap;
use std::sync::Arc;

use deadpool_postgres::{Client, Pool};
use lc_meta::ids::{check_event_time, check_id, check_page_id};
use lc_meta::pages::{MAX_PAYLOAD_CHARS, MessageVariables, PagesConfig};
use lc_meta::webhook::{EventDetails, QueuedEvent};
use lc_shared::telemetry::login_id_label;
use time::OffsetDateTime;
use tokio::sync::{Notify, RwLock};

use super::metrics::SchedulerMetrics;
use super::store::record::{self, NewOptin, RecordError, Recorded};
use super::store::{LOGIN_EVENT_SOURCE, StoreError, Timing};
use crate::runtime::batch_failure::most_telling;
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
    let message_ref = message_ref(optin.reference.or(optin.payload));
    let variables = if queued.source == LOGIN_EVENT_SOURCE {
        login_event_variables(&queued, &event.page_id)
    } else {
        None
    };
    Ok(NewOptin {
        page_id: event.page_id,
        login_id: optin.login_id,
        opted_in_at: event.timestamp,
        source: queued.source,
        traceparent: lc_shared::amqp::header_str(&msg.properties, "traceparent"),
        message_ref,
        variables,
    })
}

/// The opt-in's `ref` (else `payload`) as stored to choose a message variant. A value no
/// variant can hold (longer than a variant ref may be, or with control characters, which the
/// database may refuse) chooses nothing and is dropped rather than costing the opt-in.
fn message_ref(value: Option<String>) -> Option<String> {
    value.filter(|r| {
        !r.is_empty() && r.chars().count() <= MAX_PAYLOAD_CHARS && !r.chars().any(char::is_control)
    })
}

/// The variables a login event carried (`optin.variables`), validated again: ingest bounded
/// them, but a message that breaks a bound anyway (a replay edited by hand) keeps its opt-in
/// and loses only the personalisation.
fn login_event_variables(queued: &QueuedEvent, page_id: &str) -> Option<MessageVariables> {
    #[derive(serde::Deserialize)]
    struct Item {
        optin: Option<ItemOptin>,
    }
    #[derive(serde::Deserialize)]
    struct ItemOptin {
        variables: Option<serde_json::Value>,
    }
    let value = serde_json::from_str::<Item>(queued.event.get())
        .ok()?
        .optin?
        .variables?;
    match MessageVariables::from_json(&value) {
        Ok(v) if v.is_empty() => None,
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(page_id = %page_id.escape_debug(), error = %e, "login event variables refused; the opt-in is recorded without them");
            None
        }
    }
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
///
/// Opt-ins of different people touch different rows, so their statements are issued at once
/// and pipelined on the one connection: a round trip per step for the whole batch, not per
/// statement (the server still runs them one at a time, in the order they arrive). Opt-ins of
/// one person (a redelivery beside its original) are recorded one after another in batch
/// order, since each decides from the row the one before wrote. People are issued in the one
/// lock order (`runtime::lock_order`), so this transaction and any other writer of the same
/// rows (another intake loop or replica, the dispatcher, the correlator) do not deadlock.
///
/// Every person's chain is awaited, not just until the first error: after one statement
/// fails, those queued behind it fail with 25P02, and only the full set says whether some
/// opt-in's data was refused (see [`crate::runtime::batch_failure`]).
async fn record_together(
    client: &mut Client,
    pages: &PagesConfig,
    timing: &Timing,
    now: OffsetDateTime,
    decoded: &[Decoded],
) -> Result<Vec<Recorded>, RecordError> {
    let tx = client.transaction().await.map_err(StoreError::from)?;
    // Keyed (login_id, page_id): the map's order is the lock order.
    let mut people: BTreeMap<(&str, &str), Vec<usize>> = BTreeMap::new();
    for (position, d) in decoded.iter().enumerate() {
        let key = (d.optin.login_id.as_str(), d.optin.page_id.as_str());
        people.entry(key).or_default().push(position);
    }
    let tx_ref = &tx;
    let chains = futures_util::future::join_all(people.into_values().map(|positions| async move {
        let mut done = Vec::with_capacity(positions.len());
        for position in positions {
            let optin = &decoded[position].optin;
            let known = pages.get(&optin.page_id).is_some();
            match record::record_optin(tx_ref, optin, known, timing, now).await {
                Ok(recorded) => done.push((position, recorded)),
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }))
    .await;
    let mut recorded = Vec::with_capacity(decoded.len());
    let mut failure: Option<RecordError> = None;
    for chain in chains {
        match chain {
            Ok(done) => recorded.extend(done),
            Err(e) => failure = Some(most_telling(failure, e)),
        }
    }
    if let Some(e) = failure {
        // Dropping the transaction rolls the batch back.
        return Err(e);
    }
    tx.commit().await.map_err(StoreError::from)?;
    // Back in the batch's order: the caller pairs outcomes with deliveries by position.
    recorded.sort_unstable_by_key(|(position, _)| *position);
    Ok(recorded.into_iter().map(|(_, r)| r).collect())
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

    /// An opt-in of `source` whose `optin` object has `extra` members besides `login_id`.
    fn incoming_with(source: &str, extra: &str) -> Incoming {
        let event = serde_json::value::RawValue::from_string(format!(
            r#"{{"recipient":{{"id":"1"}},"timestamp":1700000000000,"optin":{{"login_id":"abc"{extra}}}}}"#
        ))
        .expect("raw");
        let queued = QueuedEvent {
            page_id: "1".into(),
            kind: EventKind::Optin,
            source: source.into(),
            timestamp_ms: 1_700_000_000_000,
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

    #[test]
    fn reads_the_ref_else_the_payload_and_drops_unusable_ones() {
        let r = |extra: &str| decode(&incoming_with("webhook", extra), now()).expect("decodes");
        assert_eq!(r(r#","ref":"sale""#).message_ref.as_deref(), Some("sale"));
        assert_eq!(r(r#","payload":42"#).message_ref.as_deref(), Some("42"));
        assert_eq!(
            r(r#","ref":"a","payload":"b""#).message_ref.as_deref(),
            Some("a")
        );
        assert_eq!(r("").message_ref, None);
        assert_eq!(r(r#","ref":null"#).message_ref, None);
        // The opt-in is kept; only the ref no variant could hold is dropped.
        assert_eq!(r(r#","ref":"a\u0000b""#).message_ref, None);
        let long = format!(r#","ref":"{}""#, "x".repeat(1001));
        assert_eq!(r(&long).message_ref, None);
    }

    #[test]
    fn variables_come_only_from_login_events() {
        let extra = r#","variables":{"first_name":"Ada"}"#;
        let login = decode(&incoming_with("login_event", extra), now()).expect("decodes");
        let vars = login.variables.expect("variables");
        assert_eq!(
            vars.as_map().get("first_name").map(String::as_str),
            Some("Ada")
        );
        let webhook = decode(&incoming_with("webhook", extra), now()).expect("decodes");
        assert!(
            webhook.variables.is_none(),
            "a webhook cannot inject variables"
        );
        // Variables that break a bound cost the personalisation, not the opt-in.
        let bad = decode(
            &incoming_with("login_event", r#","variables":{"a b":"x"}"#),
            now(),
        )
        .expect("decodes");
        assert!(bad.variables.is_none());
        let empty =
            decode(&incoming_with("login_event", r#","variables":{}"#), now()).expect("decodes");
        assert!(empty.variables.is_none());
    }
}
