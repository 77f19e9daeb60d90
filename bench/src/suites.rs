//! The suites the binary can run, and running them in order.

use crate::correlator::CorrelatorParams;
use crate::ingest::IngestParams;
use crate::report::Report;
use crate::scale::ScaleParams;
use crate::scheduler::SchedulerParams;

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
    /// All of the above, in that order.
    All,
}

impl Suite {
    /// The suites `self` stands for, in run order.
    pub fn expand(self) -> Vec<Suite> {
        match self {
            Self::All => vec![Self::Ingest, Self::Scheduler, Self::Correlator, Self::Scale],
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
            Self::All => "all",
        }
    }
}

/// Runs one suite (not [`Suite::All`]; expand it first) at the quick or full size.
pub async fn run_one(suite: Suite, quick: bool) -> anyhow::Result<Report> {
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
        Suite::All => anyhow::bail!("`all` is run suite by suite"),
    }
}
