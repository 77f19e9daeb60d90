//! What every worker process runs beside its own work, started the same way by the scheduler
//! and the correlator: the health and metrics server, the outbox relay, the restart of a task
//! that panicked ([`spawn_supervised`]), and the supervisor task that ends when everything
//! has stopped.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use futures_util::FutureExt;
use lc_shared::amqp::{self, BrokerLink};
use lc_shared::readiness::{self, Check, CheckName, Readiness};
use lc_shared::shutdown::Shutdown;
use prometheus::{IntCounter, IntGauge, Opts, Registry};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use crate::graph::reach::GraphReach;
use crate::relay::{self, OutboxDb, RelayMetrics};
use crate::runtime::config::{StartError, WorkerArgs};
use crate::runtime::db_probe::DbProbe;

/// Gauge of each task started with [`spawn_supervised`] (label `task`): 1 while it reports
/// that it does its job, 0 before that and from a panic until its restart reports back.
/// `/readyz` fails while any is 0.
pub const TASK_UP_METRIC: &str = "worker_task_up";

/// Counter of the restarts of each task started with [`spawn_supervised`] (label `task`).
pub const TASK_RESTARTS_METRIC: &str = "worker_task_restarts_total";

/// A run of a supervised task this long counts as healthy: a panic after it restarts the
/// task after the shortest delay again, not after the grown one.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// What a worker's `/readyz` checks beyond the broker link, its supervised tasks and
/// shutdown (see [`spawn_http_with`]).
#[derive(Debug, Clone, Default)]
pub struct ExtraChecks {
    /// The `database` check (required).
    pub database: Option<DbProbe>,
    /// The `graph` check (advisory: see the scheduler's wiring).
    pub graph: Option<GraphReach>,
}

/// [`spawn_http_with`] with no database or Graph check.
pub fn spawn_http(
    tasks: &mut JoinSet<()>,
    listener: TcpListener,
    registry: prometheus::Registry,
    link: &BrokerLink,
    shutdown: &Shutdown,
) {
    spawn_http_with(
        tasks,
        listener,
        registry,
        link,
        shutdown,
        ExtraChecks::default(),
    );
}

/// Spawns the `/metrics`, `/healthz`, `/readyz` server into `tasks`. `/readyz` reports, as
/// JSON, the broker link, every supervised task in `registry` ([`tasks_check`]), the `extra`
/// checks and whether a shutdown has begun (so a load balancer stops sending first).
pub fn spawn_http_with(
    tasks: &mut JoinSet<()>,
    listener: TcpListener,
    registry: prometheus::Registry,
    link: &BrokerLink,
    shutdown: &Shutdown,
    extra: ExtraChecks,
) {
    let (link, stop, tasks_registry) = (link.clone(), shutdown.clone(), registry.clone());
    let ready: crate::runtime::http::ReadinessCheck = Arc::new(move || {
        let mut report = Readiness::default();
        report
            .add(CheckName::Broker, readiness::broker(&link))
            .add(CheckName::Tasks, tasks_check(&tasks_registry))
            .add(CheckName::Shutdown, readiness::shutdown(&stop));
        if let Some(database) = &extra.database {
            report.add(CheckName::Database, database.check());
        }
        if let Some(graph) = &extra.graph {
            report.add(CheckName::Graph, graph.check());
        }
        report
    });
    let shutdown = shutdown.clone();
    tasks.spawn(async move {
        if let Err(e) = crate::runtime::http::serve(listener, registry, ready, shutdown).await {
            tracing::error!(error = %e, "metrics server failed");
        }
    });
}

/// The `tasks` check: fails naming every supervised task that is down (with its restarts).
pub fn tasks_check(registry: &Registry) -> Check {
    let families = registry.gather();
    let restarts = |task: &str| {
        families
            .iter()
            .filter(|f| f.name() == TASK_RESTARTS_METRIC)
            .flat_map(|f| f.get_metric())
            .find(|m| m.get_label().iter().any(|l| l.value() == task))
            .map_or(0.0, |m| m.get_counter().get_value())
    };
    let down: Vec<String> = families
        .iter()
        .filter(|f| f.name() == TASK_UP_METRIC)
        .flat_map(|f| f.get_metric())
        .filter(|m| m.get_gauge().get_value() < 1.0)
        .filter_map(|m| m.get_label().iter().find(|l| l.name() == "task"))
        .map(|l| format!("{} (restarted {} times)", l.value(), restarts(l.value())))
        .collect();
    if down.is_empty() {
        Check::pass()
    } else {
        Check::fail(format!(
            "not running: {}; a consumer resubscribes and a panicked task restarts by itself \
             with backoff (see the log)",
            down.join(", ")
        ))
    }
}

/// Spawns the outbox relay into `tasks`, with a LISTEN connection of its own (pooled
/// connections would drop the notifications).
pub fn spawn_relay(
    tasks: &mut JoinSet<()>,
    pool: &Pool,
    worker: &WorkerArgs,
    link: &BrokerLink,
    metrics: RelayMetrics,
    shutdown: &Shutdown,
) -> Result<(), StartError> {
    let outbox = OutboxDb::new(pool.clone(), &worker.database.database_url)
        .map_err(|e| StartError::Config(format!("DATABASE_URL: {e}")))?;
    tasks.spawn(relay::run(
        outbox,
        link.clone(),
        worker.relay.clone(),
        metrics,
        shutdown.clone(),
    ));
    Ok(())
}

/// How a supervised task reports whether it does its job (see [`spawn_supervised`]).
#[derive(Debug, Clone)]
pub struct TaskUp(IntGauge);

impl TaskUp {
    /// The task does its job (a consumer: it is subscribed).
    pub fn up(&self) {
        self.0.set(1);
    }

    /// The task cannot do its job for now (a consumer: it lost its channel).
    pub fn down(&self) {
        self.0.set(0);
    }
}

/// True unless a task started with [`spawn_supervised`] on `registry` is down (its
/// [`TASK_UP_METRIC`] gauge is 0). Reads the registry, so the readiness check needs nothing
/// but the registry the metrics server already has.
pub fn supervised_tasks_up(registry: &Registry) -> bool {
    registry
        .gather()
        .iter()
        .filter(|family| family.name() == TASK_UP_METRIC)
        .flat_map(|family| family.get_metric())
        .all(|m| m.get_gauge().get_value() >= 1.0)
}

/// Spawns a task into `tasks` that runs `make(up)` and, if that future panics, logs the
/// panic and runs `make` again after a backoff (100 ms growing to 10 s, back to the start
/// after a run of a minute) — until it ends normally, or `shutdown` fires while it waits.
///
/// Why: a panic (a bug meeting some input) used to end a consumer for good while the
/// process stayed ready, so nothing restarted it and its queue was no longer consumed. The
/// future's locals are dropped by the unwinding, so a consumer's channel closes and its
/// unacknowledged deliveries return to the queue (the quorum queue's delivery limit
/// dead-letters one that keeps causing panics).
///
/// The task reports through `up` ([`TaskUp`], the gauge [`TASK_UP_METRIC`] labelled
/// `task = name`): it starts down, the task calls [`TaskUp::up`] once it does its job, and
/// a panic sets it down until the restarted task calls `up` again. `/readyz`
/// ([`spawn_http`]) fails meanwhile. Restarts are counted in [`TASK_RESTARTS_METRIC`].
/// Aborting `tasks` drops the running future (no detached task outlives it).
pub fn spawn_supervised<M, F>(
    tasks: &mut JoinSet<()>,
    registry: &Registry,
    name: &str,
    shutdown: &Shutdown,
    mut make: M,
) -> Result<(), prometheus::Error>
where
    M: FnMut(TaskUp) -> F + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let up = IntGauge::with_opts(
        Opts::new(
            TASK_UP_METRIC,
            "1 while a supervised task does its job, 0 before it starts and after a panic until its restart is back",
        )
        .const_label("task", name),
    )?;
    registry.register(Box::new(up.clone()))?;
    let restarts = IntCounter::with_opts(
        Opts::new(
            TASK_RESTARTS_METRIC,
            "Restarts of a supervised task after it panicked",
        )
        .const_label("task", name),
    )?;
    registry.register(Box::new(restarts.clone()))?;
    let (name, shutdown) = (name.to_owned(), shutdown.clone());
    tasks.spawn(async move {
        let mut delays = amqp::reconnect_backoff();
        loop {
            let started = tokio::time::Instant::now();
            let run = AssertUnwindSafe(make(TaskUp(up.clone())))
                .catch_unwind()
                .await;
            let Err(panic) = run else { return };
            up.set(0);
            restarts.inc();
            if started.elapsed() >= HEALTHY_RUN {
                delays = amqp::reconnect_backoff();
            }
            let delay = delays.next().unwrap_or(Duration::from_secs(10));
            tracing::error!(task = %name, panic = panic_message(panic.as_ref()), restart_in_ms = delay.as_millis(), "task panicked; restarting it");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.wait() => return,
            }
        }
    });
    Ok(())
}

/// The text of a panic payload (`panic!` with a message gives a `&str` or a `String`).
fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a panic without a message)")
}

/// The process's own task: waits for every task in `tasks` (logging any that panicked),
/// then closes the broker connection.
pub fn supervise(mut tasks: JoinSet<()>, link: BrokerLink, name: &'static str) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(joined) = tasks.join_next().await {
            if let Err(e) = joined {
                tracing::error!(error = %e, "a {name} task panicked");
            }
        }
        link.close().await;
        tracing::info!("{name} stopped");
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::Notify;

    fn restarts(registry: &Registry) -> f64 {
        registry
            .gather()
            .iter()
            .filter(|f| f.name() == TASK_RESTARTS_METRIC)
            .flat_map(|f| f.get_metric())
            .map(|m| m.get_counter().get_value())
            .sum()
    }

    #[tokio::test]
    async fn a_task_that_panics_is_restarted_and_reported_down_until_it_is_back() {
        let registry = Registry::new();
        let shutdown = Shutdown::new();
        let mut tasks = JoinSet::new();
        let runs = Arc::new(AtomicUsize::new(0));
        // Test-side steps: first run up, make it panic, second run started, let it come back.
        let (first_up, panic_now, restarted, come_back, back) = (
            Arc::new(Notify::new()),
            Arc::new(Notify::new()),
            Arc::new(Notify::new()),
            Arc::new(Notify::new()),
            Arc::new(Notify::new()),
        );
        {
            let (runs, first_up, panic_now, restarted, come_back, back, stop) = (
                runs.clone(),
                first_up.clone(),
                panic_now.clone(),
                restarted.clone(),
                come_back.clone(),
                back.clone(),
                shutdown.clone(),
            );
            spawn_supervised(&mut tasks, &registry, "flaky", &shutdown, move |up| {
                let n = runs.fetch_add(1, Ordering::SeqCst);
                let (first_up, panic_now, restarted, come_back, back, stop) = (
                    first_up.clone(),
                    panic_now.clone(),
                    restarted.clone(),
                    come_back.clone(),
                    back.clone(),
                    stop.clone(),
                );
                async move {
                    if n == 0 {
                        up.up();
                        first_up.notify_one();
                        panic_now.notified().await;
                        panic!("boom");
                    }
                    restarted.notify_one();
                    come_back.notified().await;
                    up.up();
                    back.notify_one();
                    stop.wait().await;
                }
            })
            .expect("spawn");
        }
        first_up.notified().await;
        assert!(supervised_tasks_up(&registry));
        panic_now.notify_one();
        restarted.notified().await;
        assert!(
            !supervised_tasks_up(&registry),
            "down from the panic until the restarted task is back"
        );
        assert_eq!(restarts(&registry), 1.0);
        come_back.notify_one();
        back.notified().await;
        assert!(supervised_tasks_up(&registry));
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        shutdown.trigger();
        while let Some(joined) = tasks.join_next().await {
            joined.expect("the supervisor itself never panics");
        }
    }

    #[test]
    fn a_registry_without_supervised_tasks_is_up_and_a_new_task_starts_down() {
        let registry = Registry::new();
        assert!(supervised_tasks_up(&registry));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut tasks = JoinSet::new();
            spawn_supervised(&mut tasks, &registry, "idle", &Shutdown::new(), |_up| {
                std::future::pending::<()>()
            })
            .expect("spawn");
            assert!(!supervised_tasks_up(&registry), "down until it says up");
            tasks.abort_all();
        });
    }

    #[test]
    fn panic_messages_are_read_from_str_and_string_payloads() {
        assert_eq!(panic_message(&"static"), "static");
        assert_eq!(panic_message(&String::from("owned")), "owned");
        assert_eq!(panic_message(&42), "(a panic without a message)");
    }
}
