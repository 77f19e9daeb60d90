//! One relay round (claim, publish, confirm, mark) and the relay's other SQL.

use std::collections::BTreeMap;
use std::time::Duration;

use deadpool_postgres::Pool;
use lapin::BasicProperties;
use lapin::types::ShortString;
use lc_shared::amqp::{self, AmqpError, BrokerLink, Outcome};
use lc_shared::events::CLOUDEVENTS_CONTENT_TYPE;
use lc_shared::topology;
use time::OffsetDateTime;
use uuid::Uuid;

use super::RelayError;

/// Rows deleted per prune statement: small enough to keep locks and WAL bursts short.
const PRUNE_BATCH: i64 = 1000;
/// Most prune statements per pass; the rest waits for the next pass.
const PRUNE_MAX_BATCHES: u32 = 50;

/// What a round needs to know.
pub(super) struct Settings {
    /// Most rows claimed per round.
    pub batch: i64,
    /// Bound on awaiting all confirms of the round.
    pub confirm_timeout: Duration,
}

/// What a committed round published.
#[derive(Debug, Default)]
pub(super) struct Published {
    /// Rows claimed (and published, since the round committed).
    pub claimed: i64,
    /// Count per routing key.
    pub by_type: BTreeMap<String, u64>,
}

/// One claimed outbox row.
struct Row {
    id: i64,
    event_id: Uuid,
    event_type: String,
    cloudevent: serde_json::Value,
    traceparent: Option<String>,
    created_at: OffsetDateTime,
}

/// Claims, publishes and marks one batch in one transaction; any error rolls it back (the
/// transaction is dropped uncommitted), leaving the rows for the next round.
pub(super) async fn publish_batch(
    pool: &Pool,
    link: &BrokerLink,
    settings: &Settings,
) -> Result<Published, RelayError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let rows = tx
        .query(
            "SELECT id, event_id, event_type, cloudevent, traceparent, created_at FROM outbox \
             WHERE published_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
            &[&settings.batch],
        )
        .await?;
    if rows.is_empty() {
        return Ok(Published::default());
    }
    let rows: Vec<Row> = rows
        .iter()
        .map(|r| Row {
            id: r.get(0),
            event_id: r.get(1),
            event_type: r.get(2),
            cloudevent: r.get(3),
            traceparent: r.get(4),
            created_at: r.get(5),
        })
        .collect();

    // One channel leased for the whole round keeps the round's messages in id order and
    // makes every confirm this round's own.
    let mut lease = link.lease(settings.confirm_timeout).await?;
    for row in &rows {
        let body = serde_json::to_vec(&row.cloudevent).unwrap_or_default();
        lease
            .publish(
                topology::EVENTS_EXCHANGE,
                &row.event_type,
                // Public events are fire-and-forget for us: an exchange with no queue bound
                // yet (no downstream service deployed) is not an error.
                false,
                &body,
                properties(row),
            )
            .await?;
    }
    for outcome in lease.settle(settings.confirm_timeout).await {
        match outcome {
            Outcome::Stored => {}
            Outcome::Nacked | Outcome::Returned => return Err(AmqpError::Nacked.into()),
            Outcome::Unconfirmed => {
                return Err(AmqpError::ConfirmTimeout(settings.confirm_timeout).into());
            }
        }
    }

    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    tx.execute(
        "UPDATE outbox SET published_at = now() WHERE id = ANY($1)",
        &[&ids],
    )
    .await?;
    tx.commit().await?;

    let mut published = Published {
        claimed: i64::try_from(rows.len()).unwrap_or(i64::MAX),
        ..Published::default()
    };
    for row in &rows {
        *published.by_type.entry(row.event_type.clone()).or_default() += 1;
    }
    tracing::debug!(count = rows.len(), "published outbox rows");
    Ok(published)
}

/// AMQP properties of one public event (the contract in the AsyncAPI document).
fn properties(row: &Row) -> BasicProperties {
    let mut props =
        amqp::persistent_properties(&row.event_id.to_string(), CLOUDEVENTS_CONTENT_TYPE)
            .with_app_id(ShortString::from("loginconnect"));
    // The CloudEvent `type`; the routing key stands in if a row somehow lacks it.
    let ce_type = row
        .cloudevent
        .get("type")
        .and_then(|t| t.as_str())
        .map_or_else(|| row.event_type.clone(), str::to_owned);
    props = props.with_type(ShortString::from(ce_type));
    if let Ok(secs) = u64::try_from(row.created_at.unix_timestamp()) {
        props = props.with_timestamp(secs);
    }
    if let Some(tp) = row.traceparent.as_deref() {
        props = props.with_headers(amqp::string_headers(&[("traceparent", tp)]));
    }
    props
}

/// Age in seconds of the oldest unpublished row (by id, which the partial index serves),
/// or 0 when everything is published.
pub(super) async fn oldest_unpublished_age(pool: &Pool) -> Result<f64, RelayError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            "SELECT GREATEST(EXTRACT(EPOCH FROM (now() - created_at)), 0)::float8 FROM outbox \
             WHERE published_at IS NULL ORDER BY id LIMIT 1",
            &[],
        )
        .await?;
    Ok(row.map_or(0.0, |r| r.get::<_, f64>(0)))
}

/// Deletes published rows older than `hours`, in small batches; returns how many. Rows other
/// replicas are deleting at the same moment are skipped rather than waited for.
pub(super) async fn prune_published(pool: &Pool, hours: i32) -> Result<u64, RelayError> {
    let client = pool.get().await?;
    let mut total = 0;
    for _ in 0..PRUNE_MAX_BATCHES {
        let deleted = client
            .execute(
                "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox \
                 WHERE published_at < now() - make_interval(hours => $1::int) \
                 ORDER BY published_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
                &[&hours, &PRUNE_BATCH],
            )
            .await?;
        total += deleted;
        if deleted < u64::try_from(PRUNE_BATCH).unwrap_or(u64::MAX) {
            break;
        }
    }
    Ok(total)
}
