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
        let Ok(client) = pool.get().await else {
            continue;
        };
        if let Ok(counts) = store::gauges::count_by_state(&client).await {
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
        }
        if let Ok(secs) = store::gauges::nearest_deadline_secs(&client).await {
            metrics.nearest_deadline.set(secs);
        }
        if !retention.is_zero() {
            match store::rescue::prune_finished(&client, retention, 1000).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "pruned finished opt-ins"),
                Err(e) => tracing::warn!(error = %e, "pruning finished opt-ins failed"),
            }
        }
    }
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
