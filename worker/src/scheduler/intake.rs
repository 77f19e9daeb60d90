//! Recording opt-ins consumed from `scheduler.optins`, a batch per transaction.
//!
//! A redelivered or duplicated opt-in changes nothing (see [`record::record_optin`]). Opt-ins
//! due now are announced to the dispatcher in-process right after the commit, so the first
//! message goes out within milliseconds; polling covers later sends and other replicas.

use lc_shared::optin::OptinState;
use std::sync::Arc;

use deadpool_postgres::Pool;
use lc_meta::pages::PagesConfig;
use lc_meta::webhook::{EventDetails, QueuedEvent};
use lc_shared::telemetry::login_id_label;
use time::OffsetDateTime;
use tokio::sync::{Notify, RwLock};

use super::metrics::SchedulerMetrics;
use super::store::record::{self, NewOptin, Recorded};
use super::store::{StoreError, Timing};
use crate::runtime::consumer::{Incoming, Verdict};

/// Longest page id or login_id accepted. Meta's are far shorter (a login_id is 64 hex
/// characters); a hostile value beyond PostgreSQL's btree entry limit (~2.7 kB) would fail the
/// whole batch on every retry and block the queue, so it is dead-lettered instead.
const MAX_ID_BYTES: usize = 1024;

/// Decodes one delivery into an opt-in, or says why it cannot be one.
pub fn decode(msg: &Incoming) -> Result<NewOptin, String> {
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
    if optin.login_id.is_empty() || optin.login_id.len() > MAX_ID_BYTES {
        return Err(format!(
            "login_id must be 1 to {MAX_ID_BYTES} bytes, got {}",
            optin.login_id.len()
        ));
    }
    if event.page_id.is_empty() || event.page_id.len() > MAX_ID_BYTES {
        return Err(format!(
            "page id must be 1 to {MAX_ID_BYTES} bytes, got {}",
            event.page_id.len()
        ));
    }
    Ok(NewOptin {
        page_id: event.page_id,
        login_id: optin.login_id,
        opted_in_at: event.timestamp,
        source: queued.source,
        traceparent: lc_shared::amqp::header_str(&msg.properties, "traceparent"),
    })
}

/// Records a batch in one transaction and returns one verdict per delivery.
pub async fn record_batch(
    pool: &Pool,
    pages: &Arc<RwLock<Arc<PagesConfig>>>,
    timing: &Timing,
    metrics: &SchedulerMetrics,
    wake: &Notify,
    batch: Vec<Incoming>,
) -> Result<Vec<Verdict>, StoreError> {
    let pages = pages.read().await.clone();
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let now = OffsetDateTime::now_utc();
    let mut verdicts = Vec::with_capacity(batch.len());
    let mut results = Vec::with_capacity(batch.len());
    for msg in &batch {
        match decode(msg) {
            Ok(optin) => {
                let known = pages.get(&optin.page_id).is_some();
                let recorded = record::record_optin(&tx, &optin, known, timing, now).await?;
                results.push((optin, recorded));
                verdicts.push(Verdict::Ack);
            }
            Err(reason) => verdicts.push(Verdict::DeadLetter(reason)),
        }
    }
    tx.commit().await?;

    let mut due = false;
    for (optin, recorded) in &results {
        let label = match recorded {
            Recorded::Pending { due_now } => {
                due |= *due_now;
                "pending"
            }
            Recorded::Duplicate => "duplicate",
            Recorded::Replied => "replied",
            Recorded::Expired => "expired",
            Recorded::UnknownPage => "unknown_page",
        };
        metrics.optins_recorded.with_label_values(&[label]).inc();
        match recorded {
            Recorded::Expired => metrics.terminal_of(OptinState::Expired).inc(),
            Recorded::UnknownPage => {
                metrics.terminal_of(OptinState::Failed).inc();
                tracing::error!(page_id = %optin.page_id, login_id = %login_id_label(&optin.login_id), "opt-in for a page that is not in PAGES_FILE: recorded as failed (unknown_page)");
            }
            Recorded::Replied => metrics.terminal_of(OptinState::Replied).inc(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use lc_meta::webhook::{EventKind, QueuedEvent};

    fn incoming(login_id: &str) -> Incoming {
        let event = serde_json::value::RawValue::from_string(format!(
            r#"{{"recipient":{{"id":"1"}},"timestamp":1700000000000,"optin":{{"login_id":"{login_id}"}}}}"#
        ))
        .expect("raw");
        let queued = QueuedEvent {
            page_id: "1".into(),
            kind: EventKind::Optin,
            source: "webhook".into(),
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
    fn decodes_an_optin_and_refuses_oversized_ids() {
        let ok = decode(&incoming("abc")).expect("decodes");
        assert_eq!(ok.login_id, "abc");
        assert_eq!(ok.page_id, "1");
        assert_eq!(ok.source, "webhook");
        let err = decode(&incoming(&"x".repeat(5000))).expect_err("too long");
        assert!(err.contains("login_id must be 1 to 1024 bytes"), "{err}");
    }
}
