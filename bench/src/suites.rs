//! The suites the binary can run, and running them in order.

use std::time::Duration;

use crate::correlator::CorrelatorParams;
use crate::ingest::IngestParams;
use crate::procs::ProcsParams;
use crate::report::Report;
use crate::scale::ScaleParams;
use crate::scheduler::SchedulerParams;
use crate::soak::SoakParams;

/// A suite of the harness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Suite {
    /// Webhook ingest vs a bare publisher.
    Ingest,
    /// First messages vs a bare claim/commit loop; open loop through ingest.
    Scheduler,
    /// Links vs a bare insert loop.
    Correlator,
    /// A million pending opt-ins: claim latency, sizes, RSS, deadline misses vs EDF.
    Scale,
    /// The scheduler draining a million due opt-ins (100,000 quick) with pruning on: sends/s
    /// vs the batched DB ceiling, table size, RSS per 1,000 sends. Not part of `all`.
    Drain,
    /// The scheduler binary alone draining 100,000 due opt-ins (20,000 quick) against a null
    /// Graph: its RSS against sends (leak or plateau), peak, slope, sends/s. Not part of `all`.
    RssDrain,
    /// Each service as its own process (release binaries): peak RSS and CPU seconds per
    /// 1,000 events of each, webhook → Graph p99 at the design load.
    Procs,
    /// Sustained mixed load on the services as processes, sampled each minute, with a
    /// flat/growing verdict per series (30 minutes; 3 in `all --quick`).
    Soak,
    /// Ingest, scheduler, correlator, scale, procs and soak, in that order (not drain).
    All,
}

/// What the command line says beyond the suite.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Small sizes and short windows.
    pub quick: bool,
    /// Soak length in minutes (default 30; 3 with `--quick`).
    pub minutes: Option<f64>,
    /// Opt-ins per second of `procs` and `soak` (default: the design load for `procs`, half
    /// the probed capacity for `soak`).
    pub rate: Option<f64>,
    /// Latency of the Graph stand-in of `procs` and `soak` (default 100 ms).
    pub graph_latency_ms: Option<u64>,
    /// Due opt-ins of `rss-drain` (default 100,000; 20,000 quick).
    pub rows: Option<usize>,
}

impl Suite {
    /// The suites `self` stands for, in run order.
    pub fn expand(self) -> Vec<Suite> {
        match self {
            Self::All => vec![
                Self::Ingest,
                Self::Scheduler,
                Self::Correlator,
                Self::Scale,
                Self::Procs,
                Self::Soak,
            ],
            one => vec![one],
        }
    }

    /// Its name on the command line and in file names.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ingest => "ingest",
            Self::Scheduler => "scheduler",
            Self::Correlator => "correlator",
            Self::Scale => "scale",
            Self::Drain => "drain",
            Self::RssDrain => "rss-drain",
            Self::Procs => "procs",
            Self::Soak => "soak",
            Self::All => "all",
        }
    }
}

/// Runs one suite (not [`Suite::All`]; expand it first) at the quick or full size.
pub async fn run_one(suite: Suite, options: &RunOptions) -> anyhow::Result<Report> {
    let quick = options.quick;
    match suite {
        Suite::Ingest => {
            let p = if quick {
                IngestParams::quick()
            } else {
                IngestParams::full()
            };
            crate::ingest::run(&p, quick).await
        }
        Suite::Scheduler => {
            let p = if quick {
                SchedulerParams::quick()
            } else {
                SchedulerParams::full()
            };
            crate::scheduler::run(&p, quick).await
        }
        Suite::Correlator => {
            let p = if quick {
                CorrelatorParams::quick()
            } else {
                CorrelatorParams::full()
            };
            crate::correlator::run(&p, quick).await
        }
        Suite::Scale => {
            let p = if quick {
                ScaleParams::quick()
            } else {
                ScaleParams::full()
            };
            crate::scale::run(&p, quick).await
        }
        Suite::Drain => {
            let rows = if quick { 100_000 } else { 1_000_000 };
            crate::prune_drain::suite(rows, quick).await
        }
        Suite::RssDrain => {
            let rows = options.rows.unwrap_or(if quick { 20_000 } else { 100_000 });
            anyhow::ensure!(rows >= 100, "--rows must be at least 100, not {rows}");
            crate::rss_drain::run(rows, quick).await
        }
        Suite::Procs => {
            let mut p = if quick {
                ProcsParams::quick()
            } else {
                ProcsParams::full()
            };
            if let Some(rate) = options.rate {
                p.rate = rate;
            }
            if let Some(ms) = options.graph_latency_ms {
                p.graph_latency = Duration::from_millis(ms);
            }
            crate::procs::run(&p, quick).await
        }
        Suite::Soak => {
            let mut p = if quick {
                SoakParams::quick()
            } else {
                SoakParams::full()
            };
            if let Some(minutes) = options.minutes {
                anyhow::ensure!(
                    minutes > 0.0 && minutes.is_finite(),
                    "--minutes must be a positive number of minutes, not {minutes}"
                );
                p.minutes = minutes;
            }
            if let Some(ms) = options.graph_latency_ms {
                p.graph_latency = Duration::from_millis(ms);
            }
            p.rate = options.rate;
            crate::soak::run(&p, quick).await
        }
        Suite::All => anyhow::bail!("`all` is run suite by suite"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_runs_process_mode_and_the_soak_last_but_not_the_drain() {
        let all = Suite::All.expand();
        assert_eq!(all.len(), 6);
        assert_eq!(&all[4..], [Suite::Procs, Suite::Soak]);
        assert!(!all.contains(&Suite::Drain));
        assert!(!all.contains(&Suite::RssDrain));
        assert_eq!(Suite::Soak.expand(), [Suite::Soak]);
        assert!((SoakParams::quick().minutes - 3.0).abs() < 1e-9);
    }
}
