//! Carrying out user data deletion requests queued by ingest on `scheduler.deletions`.
//!
//! Each request is applied in one transaction: the person's opt-ins, links and link
//! conflicts are deleted, one `identity.deleted` event per (page, login_id) is written to the
//! outbox, and a receipt with the counts is stored under the confirmation code (what
//! `GET /data-deletion/{code}` reports). The receipt doubles as the idempotency key: a
//! redelivered request finds it and changes nothing, so every event is written once.
//!
//! An opt-in deleted while its first message is in flight cannot be written back (the fenced
//! update finds no row), so no event claims a message for a person whose data is gone.

use deadpool_postgres::{Client, Pool};
use lc_meta::login::deletion::DeletionRequest;
use lc_shared::amqp::BrokerLink;
use lc_shared::events::{IdentityDeleted, PublicEvent, insert_outbox};
use lc_shared::shutdown::Shutdown;
use lc_shared::topology::DELETION_QUEUE;
use prometheus::{IntCounterVec, Opts, Registry};
use time::OffsetDateTime;

use crate::runtime::consumer::{self, ConsumerSettings, Incoming, Verdict};
use crate::scheduler::store::{EVENT_SOURCE, StoreError};

/// Metrics of deletion requests.
#[derive(Clone)]
pub struct DeletionMetrics {
    /// Requests by result: `completed`, `duplicate`, `dead_lettered`.
    pub requests: IntCounterVec,
}

impl DeletionMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "scheduler_data_deletions_total",
                "User data deletion requests processed, by result",
            ),
            &["result"],
        )?;
        // Every known label starts at zero, so a rate() has a series before the first request.
        for result in ["completed", "duplicate", "dead_lettered"] {
            requests.with_label_values(&[result]);
        }
        registry.register(Box::new(requests.clone()))?;
        Ok(Self { requests })
    }
}

/// What applying one request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Deleted and announced now.
    Completed {
        /// Opt-in rows deleted.
        optins: u64,
        /// Link rows deleted.
        links: u64,
        /// `identity.deleted` events written.
        events: usize,
    },
    /// A receipt for this confirmation code exists: applied before (a redelivery).
    AlreadyDone,
}

/// Applies one request in its own transaction (see the module doc).
pub async fn apply(client: &mut Client, request: &DeletionRequest) -> Result<Applied, StoreError> {
    let tx = client.transaction().await?;
    // Serialises concurrent deliveries of the same request (another replica after a
    // redelivery) on the receipt's key, so only one of them deletes and announces.
    let lock_key = format!("data_deletion:{}", request.confirmation_code);
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        &[&lock_key],
    )
    .await?;
    let done = tx
        .query_opt(
            "SELECT 1 FROM data_deletions WHERE confirmation_code = $1",
            &[&request.confirmation_code],
        )
        .await?;
    if done.is_some() {
        return Ok(Applied::AlreadyDone);
    }
    let pages: Vec<&str> = request
        .identities
        .iter()
        .map(|i| i.page_id.as_str())
        .collect();
    let login_ids: Vec<&str> = request
        .identities
        .iter()
        .map(|i| i.login_id.as_str())
        .collect();
    let optins = tx
        .execute(
            "DELETE FROM optins o USING unnest($1::text[], $2::text[]) AS d(page_id, login_id) \
             WHERE o.page_id = d.page_id AND o.login_id = d.login_id",
            &[&pages, &login_ids],
        )
        .await?;
    let links = tx
        .query(
            "DELETE FROM links l USING unnest($1::text[], $2::text[]) AS d(page_id, login_id) \
             WHERE l.page_id = d.page_id AND l.login_id = d.login_id \
             RETURNING l.page_id, l.login_id, l.psid",
            &[&pages, &login_ids],
        )
        .await?;
    tx.execute(
        "DELETE FROM link_conflicts c USING unnest($1::text[], $2::text[]) AS d(page_id, login_id) \
         WHERE c.page_id = d.page_id AND c.login_id = d.login_id",
        &[&pages, &login_ids],
    )
    .await?;
    let now = OffsetDateTime::now_utc();
    for identity in &request.identities {
        let psid = links
            .iter()
            .find(|r| {
                r.get::<_, &str>(0) == identity.page_id && r.get::<_, &str>(1) == identity.login_id
            })
            .map(|r| r.get::<_, String>(2));
        let event = PublicEvent::IdentityDeleted(IdentityDeleted {
            page_id: identity.page_id.clone(),
            login_id: identity.login_id.clone(),
            psid,
            deleted_at: now,
            confirmation_code: request.confirmation_code.clone(),
        });
        insert_outbox(&*tx, &event, EVENT_SOURCE, None).await?;
    }
    let count = |n: u64| i32::try_from(n).unwrap_or(i32::MAX);
    let identities = i32::try_from(request.identities.len()).unwrap_or(i32::MAX);
    tx.execute(
        "INSERT INTO data_deletions (confirmation_code, requested_at, completed_at, identities, \
             deleted_optins, deleted_links) VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &request.confirmation_code,
            &request.requested_at,
            &now,
            &identities,
            &count(optins),
            &count(links.len() as u64),
        ],
    )
    .await?;
    tx.commit().await?;
    Ok(Applied::Completed {
        optins,
        links: links.len() as u64,
        events: request.identities.len(),
    })
}

/// Applies a batch of deliveries, one transaction each; a database error retries the whole
/// batch (already applied requests are then recognised by their receipt).
pub async fn handle_batch(
    pool: &Pool,
    metrics: &DeletionMetrics,
    batch: Vec<Incoming>,
) -> Result<Vec<Verdict>, StoreError> {
    let mut client = pool.get().await?;
    let mut verdicts = Vec::with_capacity(batch.len());
    for msg in &batch {
        let request: DeletionRequest = match serde_json::from_slice(&msg.data) {
            Ok(r) => r,
            Err(e) => {
                metrics.requests.with_label_values(&["dead_lettered"]).inc();
                verdicts.push(Verdict::DeadLetter(format!(
                    "not a data deletion request (JSON of DeletionRequest expected): {e}"
                )));
                continue;
            }
        };
        match apply(&mut client, &request).await? {
            Applied::Completed {
                optins,
                links,
                events,
            } => {
                metrics.requests.with_label_values(&["completed"]).inc();
                tracing::info!(
                    confirmation_code = %request.confirmation_code,
                    deleted_optins = optins,
                    deleted_links = links,
                    events,
                    "data deletion request completed"
                );
            }
            Applied::AlreadyDone => {
                metrics.requests.with_label_values(&["duplicate"]).inc();
            }
        }
        verdicts.push(Verdict::Ack);
    }
    Ok(verdicts)
}

/// Consumes the queue until `shutdown` (the broker link declares it with the topology), as a
/// supervised task: restarted if it panics, and `/readyz` fails while it is down.
pub fn spawn(
    tasks: &mut tokio::task::JoinSet<()>,
    registry: &prometheus::Registry,
    pool: Pool,
    link: &BrokerLink,
    metrics: DeletionMetrics,
    tag: &str,
    shutdown: &Shutdown,
) -> Result<(), prometheus::Error> {
    let settings = ConsumerSettings {
        queue: DELETION_QUEUE,
        prefetch: 10,
        max_batch: 10,
        tag: format!("{tag}-deletions"),
    };
    consumer::spawn_supervised(tasks, registry, link, settings, shutdown, move |batch| {
        let (pool, metrics) = (pool.clone(), metrics.clone());
        async move { handle_batch(&pool, &metrics, batch).await }
    })
}
