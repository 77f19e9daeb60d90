//! Recording opt-ins consumed from `scheduler.optins`, a batch per transaction.
//!
//! A redelivered or duplicated opt-in changes nothing (see [`store::record_optin`]). Opt-ins
//! due now are announced to the dispatcher in-process right after the commit, so the first
//! message goes out within milliseconds; polling covers later sends and other replicas.

use std::sync::Arc;

use deadpool_postgres::Pool;
use lc_shared::pages::PagesConfig;
use lc_shared::telemetry::login_id_label;
use lc_shared::webhook::{EventDetails, QueuedEvent};
use time::OffsetDateTime;
use tokio::sync::{Notify, RwLock};

use super::metrics::SchedulerMetrics;
use super::store::{self, NewOptin, Recorded, StoreError, Timing};
use crate::consumer::{Incoming, Verdict};

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
                let recorded = store::record_optin(&tx, &optin, known, timing, now).await?;
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
            Recorded::Expired => metrics.terminal.with_label_values(&["expired"]).inc(),
            Recorded::UnknownPage => {
                metrics.terminal.with_label_values(&["failed"]).inc();
                tracing::error!(page_id = %optin.page_id, login_id = %login_id_label(&optin.login_id), "opt-in for a page that is not in PAGES_FILE: recorded as failed (unknown_page)");
            }
            Recorded::Replied => metrics.terminal.with_label_values(&["replied"]).inc(),
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
