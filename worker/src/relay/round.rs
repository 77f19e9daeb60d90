//! One relay round (claim, publish, confirm, mark) and the relay's other SQL.

use std::collections::BTreeMap;
use std::time::Duration;

use deadpool_postgres::Pool;
use lapin::BasicProperties;
use lapin::types::ShortString;
use lc_shared::amqp::{self, BrokerLink, Outcome};
use lc_shared::events::{self, CLOUDEVENTS_CONTENT_TYPE, app_of_page_sql};
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

/// What a committed round did.
#[derive(Debug, Default)]
pub(super) struct Published {
    /// Rows claimed.
    pub claimed: i64,
    /// Rows published (confirmed and marked), per event kind.
    pub by_type: BTreeMap<String, u64>,
    /// Rows the broker refused, per event kind; each waits out its own backoff.
    pub nacked: BTreeMap<String, u64>,
    /// Rows whose confirm did not come in time; they stay unpublished for the next round.
    pub unconfirmed: u64,
}

impl Published {
    /// Rows that were marked published.
    pub fn marked(&self) -> u64 {
        self.by_type.values().sum()
    }
}

/// One claimed outbox row.
struct Row {
    id: i64,
    event_id: Uuid,
    /// The event kind (`first_message.sent`, `page.paused`, …).
    event_type: String,
    /// The routing key: the kind and the row's page, `<kind>.<page_id>`.
    routing_key: String,
    cloudevent: serde_json::Value,
    traceparent: Option<String>,
    created_at: OffsetDateTime,
}

/// The claim: unpublished rows whose backoff has passed and that no earlier unpublished row
/// of the same person precedes (also not one another relay holds right now, which is still
/// unpublished in this snapshot), so a person's events go out one at a time in their order.
///
/// A row written by a version before tenant-scoped events lacks the `pageid` and `appid`
/// attributes: they are added here from its page and [`app_of_page_sql`], and its routing
/// key is built like every row's from its kind and page, so it reaches the new bindings.
fn claim_sql() -> String {
    format!(
        "SELECT id, event_id, event_type, \
             CASE WHEN cloudevent ? 'appid' THEN cloudevent \
                  ELSE cloudevent || jsonb_build_object('pageid', page_id, \
                                                        'appid', {app}) END, \
             traceparent, created_at, page_id {CLAIM_FROM}",
        app = app_of_page_sql("o.page_id")
    )
}

const CLAIM_FROM: &str = "FROM outbox o WHERE published_at IS NULL \
       AND (next_attempt_at IS NULL OR next_attempt_at <= now()) \
       AND NOT EXISTS (SELECT 1 FROM outbox e WHERE e.published_at IS NULL \
                       AND e.person_key = o.person_key AND e.person_seq < o.person_seq) \
     ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED";

/// Backoff of a refused row: 0.5 s doubling per attempt, at most 5 minutes.
const NACK_BACKOFF: &str = "UPDATE outbox SET attempts = attempts + 1, last_error = 'nacked', \
     next_attempt_at = now() + LEAST(interval '5 minutes', \
         interval '500 milliseconds' * power(2, LEAST(attempts, 20))) \
     WHERE id = ANY($1)";

/// Claims, publishes and settles one batch in one transaction: rows the broker confirmed are
/// marked published, rows it refused get a backoff, unconfirmed rows stay as they were. A
/// database error rolls it all back (the transaction is dropped uncommitted); rows the broker
/// already took are then published again with the same id (at-least-once).
pub(super) async fn publish_batch(
    pool: &Pool,
    link: &BrokerLink,
    settings: &Settings,
) -> Result<Published, RelayError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let rows = tx.query(&claim_sql(), &[&settings.batch]).await?;
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
            routing_key: events::routing_key(r.get(2), r.get(6)),
        })
        .collect();

    // One channel leased for the whole round keeps the round's messages in id order and
    // makes every confirm and nack this round's own.
    let mut lease = link.lease(settings.confirm_timeout).await?;
    for row in &rows {
        let body = serde_json::to_vec(&row.cloudevent).unwrap_or_default();
        lease
            .publish(
                topology::EVENTS_EXCHANGE,
                &row.routing_key,
                // Public events are fire-and-forget for us: an exchange with no queue bound
                // yet (no downstream service deployed) is not an error.
                false,
                &body,
                properties(row),
            )
            .await?;
    }
    let outcomes = lease.settle(settings.confirm_timeout).await;

    let mut published = Published {
        claimed: i64::try_from(rows.len()).unwrap_or(i64::MAX),
        ..Published::default()
    };
    let mut stored = Vec::new();
    let mut refused = Vec::new();
    for (row, outcome) in rows.iter().zip(&outcomes) {
        match outcome {
            Outcome::Stored => {
                stored.push(row.id);
                *published.by_type.entry(row.event_type.clone()).or_default() += 1;
            }
            // Not mandatory, so nothing comes back as returned; were it to, retrying is
            // the safe reading.
            Outcome::Nacked | Outcome::Returned => {
                refused.push(row.id);
                *published.nacked.entry(row.event_type.clone()).or_default() += 1;
            }
            Outcome::Unconfirmed => published.unconfirmed += 1,
        }
    }
    if !stored.is_empty() {
        tx.execute(
            "UPDATE outbox SET published_at = now() WHERE id = ANY($1)",
            &[&stored],
        )
        .await?;
    }
    if !refused.is_empty() {
        tx.execute(NACK_BACKOFF, &[&refused]).await?;
    }
    tx.commit().await?;
    tracing::debug!(
        published = stored.len(),
        nacked = refused.len(),
        unconfirmed = published.unconfirmed,
        "relay round settled"
    );
    Ok(published)
}

/// AMQP properties of one public event (the contract in the AsyncAPI document).
fn properties(row: &Row) -> BasicProperties {
    let mut props =
        amqp::persistent_properties(&row.event_id.to_string(), CLOUDEVENTS_CONTENT_TYPE)
            .with_app_id(ShortString::from("loginconnect"));
    // The CloudEvent `type`; the kind's type stands in if a row somehow lacks it.
    let ce_type = row
        .cloudevent
        .get("type")
        .and_then(|t| t.as_str())
        .map_or_else(|| events::cloudevent_type(&row.event_type), str::to_owned);
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
