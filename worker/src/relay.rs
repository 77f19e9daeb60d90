//! The outbox relay: publishes the events that state changes wrote to the `outbox` table
//! onto exchange `loginconnect.events`, with publisher confirms.
//!
//! A row holds the event kind (`event_type`) and its page (`page_id`); the routing key is
//! built from both at publish time, `<kind>.<page_id>`. Rows written by a version before
//! tenant-scoped events (whose key had no page) are therefore published under the new key
//! too, and get the `pageid` and `appid` attributes they lack added to their body (see
//! `round.rs`); their event id stays, so a consumer's dedupe still holds.
//!
//! Every worker process runs one (the scheduler and the correlator both write events), and any
//! number of replicas may run against the same database. One round, in one transaction:
//!
//! 1. claim up to `relay_batch` unpublished rows in id order with `FOR UPDATE SKIP LOCKED`,
//!    so concurrent relays take disjoint rows instead of waiting for each other — skipping
//!    rows in their nack backoff and rows of a person whose earlier event is still
//!    unpublished (see *Order* below);
//! 2. publish them all on a confirm-mode channel leased for the round (all in flight at
//!    once), then await every confirm within `relay_confirm_timeout_ms`;
//! 3. settle each row by its own outcome: confirmed rows are marked `published_at = now()`;
//!    rows the broker nacked (a downstream queue with `x-overflow=reject-publish` that is
//!    full) get a backoff of their own (0.5 s doubling, at most 5 min) and are counted in
//!    `outbox_events_nacked_total{type}` with a log line naming the event kind; rows without
//!    a confirm in time stay as they were; then commit.
//!
//! One full downstream queue therefore delays only the events routed to it, not everyone's.
//! A database failure rolls the transaction back, so the rows stay unpublished and the round
//! is retried after a backoff: nothing is lost while the broker (or the database) is down.
//!
//! Rounds are started by `LISTEN loginconnect_outbox` (the table's insert trigger notifies)
//! on a dedicated connection, with polling every `relay_poll_ms` as the fallback when that
//! connection is down or a notification is missed; after a full batch the next round starts
//! at once. Published rows older than `outbox_retention_hours` are pruned in small batches.
//!
//! **Delivery is at-least-once, by design.** A crash (or a lost commit) after the broker
//! confirmed a message but before the mark committed leaves the row unpublished, and the next
//! round publishes it again with the same `message_id` (the CloudEvent `id`). The same
//! happens when a confirm times out although the broker did store the message. Consumers
//! dedupe on the id.
//!
//! **Order per person.** Every event carries `personseq`, its place in the commit order of the
//! events about its (page_id, login_id) (see [`lc_shared::events::insert_outbox`]). A relay
//! claims a person's row only when every earlier row of that person is published, so each is
//! published after the previous one was confirmed, whichever replica holds which row and
//! however long a nacked row waits: `identity.deleted` never overtakes `identity.linked`.
//! What the broker and consumers do afterwards (a requeue, a redelivery after a lost mark,
//! parallel consumers) can still reorder, which `personseq` lets a consumer detect. Events of
//! different people carry no order.

mod listen;
mod round;

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use lc_shared::amqp::{self, AmqpError, BrokerLink};
use lc_shared::shutdown::Shutdown;
use prometheus::{Gauge, IntCounter, IntCounterVec, Opts, Registry};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::runtime::config::RelayArgs;

/// How often published rows past their retention are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(600);
/// Bound on the lag gauge's query.
const LAG_QUERY_BOUND: Duration = Duration::from_secs(5);

/// Errors of one relay round; the round is rolled back and retried after a backoff.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// No database connection could be taken from the pool.
    #[error("cannot get a database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// A statement failed.
    #[error("database error: {}", lc_shared::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    /// Publishing failed or was not confirmed in time.
    #[error("publishing failed: {0}")]
    Broker(#[from] AmqpError),
}

impl RelayError {
    /// Label of the `stage` the failure happened in, for the failure metric.
    fn stage(&self) -> &'static str {
        match self {
            Self::Pool(_) | Self::Db(_) => "database",
            Self::Broker(_) => "broker",
        }
    }
}

/// The database side of the relay: the pool it claims rows with and, when known, the
/// settings of its dedicated `LISTEN` connection.
///
/// A pool alone (`From<Pool>`) gives a relay that only polls, because a pooled connection
/// cannot receive notifications (the pool drives it and drops them); build it with
/// [`OutboxDb::new`] to be woken at once on every insert.
#[derive(Clone)]
pub struct OutboxDb {
    pool: Pool,
    listen: Option<lc_shared::db::Target>,
}

impl OutboxDb {
    /// The pool, plus a `LISTEN` connection to `database_url` (the URL the pool was built
    /// from).
    /// It connects with the URL's TLS settings, as the pool does.
    pub fn new(pool: Pool, database_url: &str) -> Result<Self, lc_shared::db::DbError> {
        let listen = lc_shared::db::Target::parse(database_url)?;
        Ok(Self {
            pool,
            listen: Some(listen),
        })
    }

    /// The pool only: the relay polls every `relay_poll_ms`.
    pub fn polling_only(pool: Pool) -> Self {
        Self { pool, listen: None }
    }
}

impl From<Pool> for OutboxDb {
    fn from(pool: Pool) -> Self {
        Self::polling_only(pool)
    }
}

/// Prometheus metrics of the relay.
#[derive(Clone)]
pub struct RelayMetrics {
    /// Events published (confirmed and marked), by event kind (the routing key without its
    /// page, so the label set stays small).
    pub published: IntCounterVec,
    /// Rounds that failed and were rolled back, by stage (`database`, `broker`).
    pub failures: IntCounterVec,
    /// Events the broker refused (nack) and that wait out a backoff, by event kind.
    pub nacked: IntCounterVec,
    /// Age in seconds of the oldest unpublished row (0 when none), refreshed every round.
    pub lag_seconds: Gauge,
    /// Published rows deleted after their retention.
    pub pruned: IntCounter,
}

impl RelayMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            published: IntCounterVec::new(
                Opts::new(
                    "outbox_events_published_total",
                    "Events published with a broker confirm and marked, by event kind",
                ),
                &["type"],
            )?,
            failures: IntCounterVec::new(
                Opts::new(
                    "outbox_publish_failures_total",
                    "Relay rounds rolled back and retried, by the stage that failed",
                ),
                &["stage"],
            )?,
            nacked: IntCounterVec::new(
                Opts::new(
                    "outbox_events_nacked_total",
                    "Public events the broker refused (e.g. a full downstream queue), retried \
                     with backoff, by event kind",
                ),
                &["type"],
            )?,
            lag_seconds: Gauge::with_opts(Opts::new(
                "outbox_lag_seconds",
                "Age of the oldest unpublished outbox row in seconds (0 when none)",
            ))?,
            pruned: IntCounter::with_opts(Opts::new(
                "outbox_pruned_total",
                "Published outbox rows deleted after the retention period",
            ))?,
        };
        registry.register(Box::new(m.published.clone()))?;
        // Zero series from the start, so alerts see the metric before the first failure.
        for stage in ["database", "broker"] {
            m.failures.with_label_values(&[stage]);
        }
        registry.register(Box::new(m.failures.clone()))?;
        for kind in lc_shared::events::EVENT_KINDS {
            m.nacked.with_label_values(&[kind]);
        }
        registry.register(Box::new(m.nacked.clone()))?;
        registry.register(Box::new(m.lag_seconds.clone()))?;
        registry.register(Box::new(m.pruned.clone()))?;
        Ok(m)
    }

    /// Metrics registered in a registry of their own, which nothing exports (for tests and
    /// tools that run a relay without a metrics endpoint).
    pub fn unexported() -> Result<Self, prometheus::Error> {
        Self::new(&Registry::new())
    }
}

/// Runs the relay until `shutdown`; a round in progress is finished first (it is bounded by
/// the confirm timeout), so a graceful stop never leaves published-but-unmarked rows.
///
/// `db` is an [`OutboxDb`] or a bare [`Pool`] (polling only).
pub async fn run(
    db: impl Into<OutboxDb>,
    link: BrokerLink,
    args: RelayArgs,
    metrics: RelayMetrics,
    shutdown: Shutdown,
) {
    let db = db.into();
    let wake = Arc::new(Notify::new());
    let listener = match db.listen.clone() {
        Some(config) => Some(tokio::spawn(listen::run(
            config,
            wake.clone(),
            shutdown.clone(),
        ))),
        None => {
            tracing::info!(
                poll_ms = args.relay_poll_ms,
                "outbox relay has no LISTEN connection; polling only"
            );
            None
        }
    };
    let settings = round::Settings {
        batch: args.relay_batch.max(1),
        confirm_timeout: args.confirm_timeout(),
    };
    let mut backoff = amqp::reconnect_backoff();
    let mut next_prune = Instant::now();
    while !shutdown.is_triggered() {
        if args.outbox_retention_hours > 0 && Instant::now() >= next_prune {
            next_prune = Instant::now() + PRUNE_EVERY;
            prune(&db.pool, &args, &metrics).await;
        }
        if !link.is_ready() {
            // Nothing can be published; keep the lag gauge honest while waiting.
            refresh_lag(&db.pool, &metrics).await;
            tokio::select! {
                _ = link.wait_ready(args.poll_interval()) => {}
                () = shutdown.wait() => break,
            }
            continue;
        }
        let outcome = round::publish_batch(&db.pool, &link, &settings).await;
        refresh_lag(&db.pool, &metrics).await;
        let outcome = outcome.and_then(|published| {
            count(&published, &metrics);
            if published.unconfirmed > 0 {
                // Marked what was confirmed; the rest waits for the round after the backoff.
                Err(RelayError::Broker(AmqpError::ConfirmTimeout(
                    settings.confirm_timeout,
                )))
            } else {
                Ok(published)
            }
        });
        let pause = match outcome {
            Ok(published) => {
                backoff = amqp::reconnect_backoff();
                // A backlog, or a person's next event that waited for the one just marked.
                if published.claimed >= settings.batch || published.marked() > 0 {
                    continue;
                }
                args.poll_interval()
            }
            Err(e) => {
                metrics.failures.with_label_values(&[e.stage()]).inc();
                let delay = backoff.next().unwrap_or(Duration::from_secs(10));
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis(), "outbox relay round failed; rows stay unpublished");
                // Back off without listening to notifications, or an insert storm would turn
                // the backoff into a tight retry loop.
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.wait() => break,
                }
                continue;
            }
        };
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(pause) => {}
            () = shutdown.wait() => break,
        }
    }
    if let Some(listener) = listener {
        // It watches the same shutdown; waiting lets its connection close cleanly.
        let _ = listener.await;
    }
    tracing::info!("outbox relay stopped");
}

/// Counts a settled round and names each refused event kind in the log.
fn count(published: &round::Published, metrics: &RelayMetrics) {
    for (kind, n) in &published.by_type {
        metrics
            .published
            .with_label_values(&[kind.as_str()])
            .inc_by(*n);
    }
    for (kind, n) in &published.nacked {
        metrics
            .nacked
            .with_label_values(&[kind.as_str()])
            .inc_by(*n);
        tracing::warn!(
            kind = kind.as_str(),
            events = n,
            "broker refused events (is a downstream queue full?); retrying them with backoff"
        );
    }
}

async fn refresh_lag(pool: &Pool, metrics: &RelayMetrics) {
    // Bounded: a database that hangs must not also stall the loop on a mere gauge.
    match tokio::time::timeout(LAG_QUERY_BOUND, round::oldest_unpublished_age(pool)).await {
        Ok(Ok(age)) => metrics.lag_seconds.set(age),
        // The failure is reported by the round itself; the gauge keeps its last value.
        Ok(Err(e)) => tracing::debug!(error = %e, "cannot read the outbox lag"),
        Err(_) => tracing::debug!("reading the outbox lag timed out"),
    }
}

async fn prune(pool: &Pool, args: &RelayArgs, metrics: &RelayMetrics) {
    let hours = i32::try_from(args.outbox_retention_hours).unwrap_or(i32::MAX);
    match round::prune_published(pool, hours).await {
        Ok(0) => {}
        Ok(n) => {
            metrics.pruned.inc_by(n);
            tracing::info!(deleted = n, "pruned published outbox rows");
        }
        Err(e) => tracing::warn!(error = %e, "pruning the outbox failed; retrying later"),
    }
}
