//! Housekeeping of the scheduler process: the state gauges (opt-ins by state, at risk,
//! pages unsubscribed), queue depths and consumers, and pruning of old finished rows, on a
//! timer.

use std::time::Duration;

use deadpool_postgres::Pool;
use lc_shared::amqp::BrokerLink;
use lc_shared::shutdown::Shutdown;
use lc_shared::topology;

use super::metrics::SchedulerMetrics;
use lc_shared::optin::OptinState;

use super::store;

/// Refreshes the state gauges and prunes old finished rows.
pub async fn run(
    pool: Pool,
    link: BrokerLink,
    metrics: SchedulerMetrics,
    retention: Duration,
    shutdown: Shutdown,
) {
    // Queue depths need the broker; the first round waits for it (bounded) so the gauges
    // exist soon after start.
    tokio::select! {
        _ = link.wait_ready(Duration::from_secs(30)) => {}
        () = shutdown.wait() => return,
    }
    let mut tick = tokio::time::interval(Duration::from_secs(15));
    // Pages this replica last showed as unsubscribed, so a restored page goes back to 0.
    let mut unsubscribed = Vec::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.wait() => return,
        }
        queue_depths(&link, &metrics).await;
        let Ok(mut client) = pool.get().await else {
            continue;
        };
        if let Err(e) = lead_round(&mut client, &metrics, retention, &mut unsubscribed).await {
            tracing::warn!(error = %e, "housekeeping round failed; next round in 15 s");
        }
    }
}

/// Most rows one prune statement deletes (short statements, little lock time each).
const PRUNE_BATCH: i64 = 5_000;
/// Most prune statements per round: 50,000 rows per 15 s, far above the design load's
/// finish rate (500 opt-ins/s), so the table stays the size of its retention window.
const PRUNE_BATCHES_PER_ROUND: usize = 10;

/// One replica's round of the cluster-wide work: counts and pruning are done by whichever
/// replica holds the housekeeping lock this round (the others skip them), so N replicas do
/// not run N `GROUP BY state` scans and N competing deletes.
async fn lead_round(
    client: &mut deadpool_postgres::Client,
    metrics: &SchedulerMetrics,
    retention: Duration,
    unsubscribed: &mut Vec<String>,
) -> Result<(), store::StoreError> {
    let tx = client.transaction().await?;
    if !store::gauges::lead_housekeeping(&tx).await? {
        return Ok(());
    }
    let counts = store::gauges::count_by_state(&tx).await?;
    for state in OptinState::ALL {
        metrics
            .optins_by_state
            .with_label_values(&[state.as_str()])
            .set(0);
    }
    for (state, n) in counts {
        metrics
            .optins_by_state
            .with_label_values(&[state.as_str()])
            .set(n);
    }
    metrics
        .nearest_deadline
        .set(store::gauges::nearest_deadline_secs(&tx).await?);
    for (window, n) in store::gauges::at_risk(&tx).await? {
        metrics
            .optins_at_risk
            .with_label_values(&[window.as_str()])
            .set(n);
    }
    let now_unsubscribed = store::gauges::unsubscribed_pages(&tx).await?;
    for page in unsubscribed
        .iter()
        .filter(|p| !now_unsubscribed.contains(p))
    {
        metrics.unsubscribed_pages.with_label_values(&[page]).set(0);
    }
    for page in &now_unsubscribed {
        metrics.unsubscribed_pages.with_label_values(&[page]).set(1);
    }
    *unsubscribed = now_unsubscribed;
    if !retention.is_zero() {
        let mut deleted = 0;
        for _ in 0..PRUNE_BATCHES_PER_ROUND {
            let n = store::rescue::prune_finished(&tx, retention, PRUNE_BATCH).await?;
            deleted += n;
            if n < PRUNE_BATCH as u64 {
                break;
            }
        }
        if deleted > 0 {
            tracing::info!(deleted, "pruned finished opt-ins");
        }
    }
    tx.commit().await?;
    Ok(())
}

/// Reads queue depths and consumer counts with passive declares (cheap; no consumer
/// needed): every work queue (depth and consumers), its dead-letter queue and
/// `messenger.unparsed` (depth only: nobody consumes those, so a consumer gauge of 0 there
/// would be noise for the "consumer missing" alert).
async fn queue_depths(link: &BrokerLink, metrics: &SchedulerMetrics) {
    let mut queues: Vec<(String, bool)> = Vec::new();
    for (work, _) in topology::WORK_QUEUES {
        queues.push((work.to_owned(), true));
        queues.push((topology::dead_letter_queue(work), false));
    }
    queues.push((topology::UNPARSED_QUEUE.to_owned(), false));
    let mut channel = None;
    for (queue, consumed) in &queues {
        if channel.is_none() {
            channel = link.open_channel().await.ok();
        }
        let Some(ch) = channel.as_ref() else {
            return;
        };
        let declared = ch
            .queue_declare(
                queue.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await;
        match declared {
            Ok(q) => {
                metrics
                    .queue_ready
                    .with_label_values(&[queue])
                    .set(i64::from(q.message_count()));
                if *consumed {
                    metrics
                        .queue_consumers
                        .with_label_values(&[queue])
                        .set(i64::from(q.consumer_count()));
                }
            }
            // The queue is not declared yet (its process never started): a failed passive
            // declare closes the channel, so the next queue gets a new one.
            Err(_) => channel = None,
        }
    }
    if let Some(ch) = channel {
        let _ = ch.close(200, "done".into()).await;
    }
}
