//! The soak's capacity probe: an open-loop **ramp of the soak's own mix** (opt-ins, replies,
//! redeliveries) on the same processes, in steps of rising rate, keeping the highest rate the
//! pipeline kept up with. The soak then runs at half of it.
//!
//! Why a ramp of the mix and not a burst of opt-ins: a burst of opt-ins alone is drained by
//! the scheduler with no correlator, no replies' outbox rows and no redeliveries competing
//! for the database, and measured about twice what the mix sustains on the same machine —
//! half of it was already past capacity (BENCHMARKS.md, "The soak's rate").
//!
//! A step **kept up** when, at its end, the opt-ins posted but not yet sent, and the
//! deliveries waiting on the work queues, are each under [`BACKLOG_SECS`] of the step's
//! arrivals, its webhook → Graph p99 is under [`P99_LIMIT_MS`], and no POST failed or was
//! shed. A pipeline past its capacity grows a backlog every second, so a step of a few
//! seconds tells; the first step that does not keep up ends the ramp, and the run waits for
//! the backlog to drain before the soak starts.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::child::Services;
use crate::mixed::{Kind, Mix, MixedLoad};
use crate::soak_sample::Sampler;
use crate::timed_graph::TimedGraph;

/// A step kept up when its backlogs at the end are under this many seconds of its arrivals.
pub const BACKLOG_SECS: f64 = 0.5;

/// A step kept up when its webhook → Graph p99 is under this.
pub const P99_LIMIT_MS: f64 = 1_000.0;

/// Longest wait for a probe's backlog to drain before the soak starts.
const DRAIN_LIMIT: Duration = Duration::from_secs(180);

/// Settings of the ramp.
#[derive(Debug, Clone, Copy)]
pub struct RampParams {
    /// Opt-ins per second of the first step.
    pub start_rate: f64,
    /// Each step's rate is the previous one's times this.
    pub growth: f64,
    /// Length of each step.
    pub step: Duration,
    /// Steps at most (the last one's rate is the probe's ceiling).
    pub max_steps: u32,
}

/// What one step of the ramp saw.
#[derive(Debug, Clone)]
pub struct Step {
    /// Opt-ins per second offered.
    pub rate: f64,
    /// Send API calls per second during the step.
    pub sends_per_s: f64,
    /// Opt-ins posted but not sent at the step's end.
    pub unsent: usize,
    /// Deliveries on the scheduler's and the correlator's queues at the step's end.
    pub queued: u32,
    /// Webhook → Graph p99 of the opt-ins sent during the step (NaN when none).
    pub e2e_p99_ms: f64,
    /// POSTs that failed or were shed.
    pub refused: u64,
    /// Whether the step kept up (see the module doc).
    pub kept_up: bool,
}

impl Step {
    /// One line of the ramp's table.
    pub fn line(&self) -> String {
        format!(
            "{:>7.1} opt-ins/s: sends {:.1}/s, unsent {}, queued {}, e2e p99 {:.0} ms, refused {} — {}",
            self.rate,
            self.sends_per_s,
            self.unsent,
            self.queued,
            self.e2e_p99_ms,
            self.refused,
            if self.kept_up {
                "kept up"
            } else {
                "fell behind"
            }
        )
    }
}

/// The ramp's outcome.
#[derive(Debug, Clone)]
pub struct Ramp {
    /// The highest rate that kept up (0 when the first step did not).
    pub capacity: f64,
    /// Every step, in order.
    pub steps: Vec<Step>,
    /// Whether the last step offered still kept up (the capacity is then a lower bound).
    pub ceiling_reached: bool,
}

/// Runs the ramp of `mix` on `services`, then waits until its backlog has drained.
pub async fn ramp(
    services: &Services,
    graph: &Arc<TimedGraph>,
    sampler: &Sampler,
    pages: &[String],
    mix: Mix,
    params: RampParams,
) -> anyhow::Result<Ramp> {
    let _ = graph.take_window();
    let mut steps = Vec::new();
    let mut capacity = 0.0;
    let mut rate = params.start_rate;
    let mut ceiling_reached = true;
    let mut load = None;
    for k in 0..params.max_steps {
        // A generator per step: its arrivals are numbered from 0, so each step needs its own
        // `login_id` prefix (the same ids again would be redeliveries, never sent twice).
        let load = load.insert(MixedLoad::new(
            services.webhook_url.clone(),
            graph.clone(),
            pages.to_vec(),
            &format!("c{k}x"),
        )?);
        let sends_before = graph.calls();
        let started = Instant::now();
        load.run(rate, params.step, mix).await;
        let elapsed = started.elapsed().as_secs_f64();
        let s = sampler.take(0.0, services, graph, load).await?;
        let refused = s.posts.shed + Kind::ALL.iter().map(|k| s.posts.failed(*k)).sum::<u64>();
        let e2e_p99_ms = if s.e2e.count() == 0 {
            f64::NAN
        } else {
            s.e2e.quantile_ms(0.99)
        };
        let unsent = graph.outstanding();
        let queued = s.scheduler_queue + s.correlator_queue;
        let kept_up = unsent as f64 <= rate * BACKLOG_SECS
            && f64::from(queued) <= rate * mix.arrivals_per_optin() * BACKLOG_SECS
            && e2e_p99_ms <= P99_LIMIT_MS
            && refused == 0;
        let step = Step {
            rate,
            sends_per_s: (s.sends - sends_before) as f64 / elapsed,
            unsent,
            queued,
            e2e_p99_ms,
            refused,
            kept_up,
        };
        eprintln!("probe {}", step.line());
        steps.push(step);
        if !kept_up {
            ceiling_reached = false;
            break;
        }
        capacity = rate;
        rate *= params.growth;
    }
    if let Some(load) = &load {
        drain(services, graph, sampler, load).await?;
    }
    Ok(Ramp {
        capacity,
        steps,
        ceiling_reached,
    })
}

/// Waits until every opt-in of the probe was sent and both work queues are empty.
async fn drain(
    services: &Services,
    graph: &Arc<TimedGraph>,
    sampler: &Sampler,
    load: &MixedLoad,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + DRAIN_LIMIT;
    loop {
        let s = sampler.take(0.0, services, graph, load).await?;
        if graph.outstanding() == 0 && s.scheduler_queue == 0 && s.correlator_queue == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the capacity probe's backlog did not drain in {} s ({} opt-ins unsent, {} + {} \
             queued); give the soak's rate with --rate",
            DRAIN_LIMIT.as_secs(),
            graph.outstanding(),
            s.scheduler_queue,
            s.correlator_queue
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
