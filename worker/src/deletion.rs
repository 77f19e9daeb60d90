//! Carrying out user data deletion requests queued by ingest on `scheduler.deletions`.
//!
//! Each request is applied in one transaction: the person's opt-ins, links, link
//! conflicts, foreign `prior_message`s kept for inspection, the permanent record of pruned
//! windows (`contacted`) and the outbox events about them not yet published are deleted; a
//! tombstone (a hash of page and login_id, with the request's time) is written, so an opt-in
//! or reply of the person that happened before the request — Meta redelivering it, an
//! operator replaying a dead letter — cannot recreate them (a later one is a new consent and
//! is recorded as usual); one `identity.deleted` event per (page, login_id) is written to
//! the outbox; and a receipt with the counts — how many identities matched anything, and
//! the rows of each kind — is stored under the confirmation code (what
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
    Completed(Deleted),
    /// A receipt for this confirmation code exists: applied before (a redelivery).
    AlreadyDone,
}

/// The counts of one applied request, as its receipt stores them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deleted {
    /// (page, login_id) pairs of the request that had anything stored (0 is an honest
    /// "we held nothing about this person").
    pub matched: usize,
    /// Opt-in rows deleted.
    pub optins: u64,
    /// Link rows deleted.
    pub links: u64,
    /// Link conflict rows deleted.
    pub link_conflicts: u64,
    /// Replies with a foreign `prior_message` source deleted.
    pub foreign_replies: u64,
    /// Permanent records of pruned windows deleted (the tombstone replaces them).
    pub contact_records: u64,
    /// Unpublished outbox events about the person deleted (never published now).
    pub outbox_events: u64,
    /// `identity.deleted` events written.
    pub events: usize,
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
    // Every statement names the (page, login_id) pairs it deleted, so the receipt can say
    // how many of the request's identities matched anything.
    let ids: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&pages, &login_ids];
    let optins = tx
        .query(
            "DELETE FROM optins o USING unnest($1::text[], $2::text[]) AS d(page_id, login_id) \
             WHERE o.page_id = d.page_id AND o.login_id = d.login_id \
             RETURNING o.page_id, o.login_id",
            &ids,
        )
        .await?;
    let links = tx
        .query(
            "DELETE FROM links l USING unnest($1::text[], $2::text[]) AS d(page_id, login_id) \
             WHERE l.page_id = d.page_id AND l.login_id = d.login_id \
             RETURNING l.page_id, l.login_id, l.psid",
            &ids,
        )
        .await?;
    let conflicts = tx
        .query(
            "DELETE FROM link_conflicts c \
             USING unnest($1::text[], $2::text[]) AS d(page_id, login_id) \
             WHERE c.page_id = d.page_id AND c.login_id = d.login_id \
             RETURNING c.page_id, c.login_id",
            &ids,
        )
        .await?;
    let foreign = tx
        .query(
            "DELETE FROM foreign_prior_messages f \
             USING unnest($1::text[], $2::text[]) AS d(page_id, login_id) \
             WHERE f.page_id = d.page_id AND f.login_id = d.login_id \
             RETURNING f.page_id, f.login_id",
            &ids,
        )
        .await?;
    let contacted = tx
        .query(
            "DELETE FROM contacted c USING unnest($1::text[], $2::text[]) AS d(page_id, login_id) \
             WHERE c.person = person_key(d.page_id, d.login_id) \
             RETURNING d.page_id, d.login_id",
            &ids,
        )
        .await?;
    // Events about the person the relay has not published yet are withdrawn (a row the
    // relay holds is locked: this waits, then sees it published and leaves it). Earlier
    // `identity.deleted` events stay: they announce a deletion, not the person's data.
    let outbox = tx
        .query(
            "DELETE FROM outbox o USING unnest($1::text[], $2::text[]) AS d(page_id, login_id) \
             WHERE o.published_at IS NULL AND o.event_type <> 'identity.deleted' \
               AND o.page_id = d.page_id AND o.cloudevent->'data'->>'login_id' = d.login_id \
             RETURNING d.page_id, d.login_id",
            &ids,
        )
        .await?;
    tx.execute(
        "INSERT INTO deleted_people (person, deleted_at) \
         SELECT person_key(d.page_id, d.login_id), $3 \
         FROM unnest($1::text[], $2::text[]) AS d(page_id, login_id) \
         ON CONFLICT (person) DO UPDATE \
         SET deleted_at = GREATEST(deleted_people.deleted_at, EXCLUDED.deleted_at)",
        &[&pages, &login_ids, &request.requested_at],
    )
    .await?;
    let matched: std::collections::BTreeSet<(String, String)> =
        [&optins, &links, &conflicts, &foreign, &contacted, &outbox]
            .into_iter()
            .flatten()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
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
    let n = |rows: &Vec<tokio_postgres::Row>| rows.len() as u64;
    let deleted = Deleted {
        matched: matched.len(),
        optins: n(&optins),
        links: n(&links),
        link_conflicts: n(&conflicts),
        foreign_replies: n(&foreign),
        contact_records: n(&contacted),
        outbox_events: n(&outbox),
        events: request.identities.len(),
    };
    let count = |n: u64| i32::try_from(n).unwrap_or(i32::MAX);
    let identities = i32::try_from(request.identities.len()).unwrap_or(i32::MAX);
    tx.execute(
        "INSERT INTO data_deletions (confirmation_code, requested_at, completed_at, identities, \
             deleted_optins, deleted_links, matched_identities, deleted_link_conflicts, \
             deleted_foreign_replies, deleted_contact_records, deleted_outbox_events) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        &[
            &request.confirmation_code,
            &request.requested_at,
            &now,
            &identities,
            &count(deleted.optins),
            &count(deleted.links),
            &count(deleted.matched as u64),
            &count(deleted.link_conflicts),
            &count(deleted.foreign_replies),
            &count(deleted.contact_records),
            &count(deleted.outbox_events),
        ],
    )
    .await?;
    tx.commit().await?;
    Ok(Applied::Completed(deleted))
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
            Applied::Completed(d) => {
                metrics.requests.with_label_values(&["completed"]).inc();
                tracing::info!(
                    confirmation_code = %request.confirmation_code,
                    identities = request.identities.len(),
                    matched = d.matched,
                    deleted_optins = d.optins,
                    deleted_links = d.links,
                    deleted_link_conflicts = d.link_conflicts,
                    deleted_foreign_replies = d.foreign_replies,
                    deleted_contact_records = d.contact_records,
                    deleted_outbox_events = d.outbox_events,
                    events = d.events,
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
