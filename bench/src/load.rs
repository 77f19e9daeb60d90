//! Load drivers: a closed loop at fixed concurrency with a steady-state window after warm-up,
//! and an open loop at a fixed arrival rate (latency counted from the scheduled start, so a
//! slow server cannot hide its queueing by slowing the generator down).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::hist::Latency;

/// What one operation did: how many events it carried if it succeeded.
pub type OpResult = Result<u64, String>;

/// The outcome of a load run, counted over its measurement window only.
#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    /// Successful operations completed inside the window.
    pub ok: u64,
    /// Failed operations completed inside the window.
    pub failed: u64,
    /// Events carried by the successful operations.
    pub events: u64,
    /// Latency of every operation completed inside the window (successful or not).
    pub latency: Latency,
    /// Length of the measurement window.
    pub window: Duration,
    /// The first failure seen, for the notes.
    pub first_error: Option<String>,
    /// Open loop only: arrivals not started because too many were outstanding.
    pub shed: u64,
}

impl LoadResult {
    /// Events per second over the window.
    pub fn events_per_s(&self) -> f64 {
        per_second(self.events, self.window)
    }

    /// Successful operations per second over the window.
    pub fn ops_per_s(&self) -> f64 {
        per_second(self.ok, self.window)
    }

    fn absorb(&mut self, other: LoadResult) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.events += other.events;
        self.shed += other.shed;
        self.latency.merge(&other.latency);
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn record(&mut self, latency: Duration, result: OpResult) {
        self.latency.record(latency);
        match result {
            Ok(events) => {
                self.ok += 1;
                self.events += events;
            }
            Err(e) => {
                self.failed += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(e);
                }
            }
        }
    }
}

/// `n` per second over `d` (0 for an empty window).
pub fn per_second(n: u64, d: Duration) -> f64 {
    if d.is_zero() {
        0.0
    } else {
        n as f64 / d.as_secs_f64()
    }
}

/// Runs `op` in `concurrency` loops for `warmup + measure`; only operations that complete
/// inside the `measure` window after the warm-up are counted.
pub async fn closed_loop<F, Fut>(
    concurrency: usize,
    warmup: Duration,
    measure: Duration,
    op: F,
) -> LoadResult
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = OpResult> + Send + 'static,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let window_start = start + warmup;
    let end = window_start + measure;
    let mut tasks = JoinSet::new();
    for worker in 0..concurrency.max(1) {
        let op = op.clone();
        tasks.spawn(async move {
            let mut result = LoadResult::default();
            let mut i = 0u64;
            while Instant::now() < end {
                let began = Instant::now();
                let outcome = op(worker, i).await;
                let done = Instant::now();
                if done >= window_start && done <= end {
                    result.record(done - began, outcome);
                }
                i += 1;
            }
            result
        });
    }
    let mut total = LoadResult {
        window: measure,
        ..LoadResult::default()
    };
    while let Some(joined) = tasks.join_next().await {
        if let Ok(r) = joined {
            total.absorb(r);
        }
    }
    total
}

/// Starts `op(i)` at `rate` per second for `duration`, each in its own task, and waits for
/// them all. Latency runs from each operation's scheduled start. Operations completing in the
/// first `warmup` are not counted; arrivals beyond `max_outstanding` are shed and counted.
pub async fn open_loop<F, Fut>(
    rate: f64,
    duration: Duration,
    warmup: Duration,
    max_outstanding: usize,
    op: F,
) -> LoadResult
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = OpResult> + Send + 'static,
{
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let start = Instant::now();
    let window_start = start + warmup;
    let total = (rate * duration.as_secs_f64()).round() as u64;
    let mut tasks: JoinSet<Option<(Duration, OpResult)>> = JoinSet::new();
    let mut result = LoadResult {
        window: duration.saturating_sub(warmup),
        ..LoadResult::default()
    };
    let collect = |r: &mut LoadResult, joined: Option<(Duration, OpResult)>| {
        if let Some((latency, outcome)) = joined {
            r.record(latency, outcome);
        }
    };
    for i in 0..total {
        let scheduled = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(scheduled).await;
        while let Some(Ok(joined)) = tasks.try_join_next() {
            collect(&mut result, joined);
        }
        if tasks.len() >= max_outstanding {
            result.shed += 1;
            continue;
        }
        let fut = op(i);
        tasks.spawn(async move {
            let outcome = fut.await;
            let done = Instant::now();
            (done >= window_start).then(|| (done - scheduled, outcome))
        });
    }
    while let Some(joined) = tasks.join_next().await {
        if let Ok(joined) = joined {
            collect(&mut result, joined);
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn closed_loop_counts_only_the_window() {
        let r = closed_loop(
            2,
            Duration::from_millis(20),
            Duration::from_millis(100),
            |_, _| async {
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok(3)
            },
        )
        .await;
        assert!(r.ok > 0 && r.failed == 0);
        assert_eq!(r.events, r.ok * 3);
        assert!(r.events_per_s() > 0.0);
    }

    #[tokio::test]
    async fn open_loop_runs_every_arrival() {
        let r = open_loop(
            200.0,
            Duration::from_millis(100),
            Duration::ZERO,
            100,
            |i| async move { if i % 2 == 0 { Ok(1) } else { Err("odd".into()) } },
        )
        .await;
        assert_eq!(r.ok + r.failed, 20);
        assert_eq!(r.first_error.as_deref(), Some("odd"));
    }
}
