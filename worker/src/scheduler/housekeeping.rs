//! Housekeeping of the scheduler process: the state gauges, queue depths and pruning of old
//! finished rows, on a timer.

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
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.wait() => return,
        }
        queue_depths(&link, &metrics).await;
        let Ok(mut client) = pool.get().await else {
            continue;
        };
        if let Err(e) = lead_round(&mut client, &metrics, retention).await {
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

/// Reads queue depths with passive declares (cheap; no consumer needed).
async fn queue_depths(link: &BrokerLink, metrics: &SchedulerMetrics) {
    let Ok(channel) = link.open_channel().await else {
        return;
    };
    let dlq = topology::dead_letter_queue(topology::SCHEDULER_QUEUE);
    for queue in [topology::SCHEDULER_QUEUE, dlq.as_str()] {
        let declared = channel
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await;
        match declared {
            Ok(q) => metrics
                .queue_ready
                .with_label_values(&[queue])
                .set(i64::from(q.message_count())),
            // A failed passive declare closes the channel; the next round opens another.
            Err(_) => return,
        }
    }
    let _ = channel.close(200, "done".into()).await;
}
