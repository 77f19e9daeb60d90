//! Prometheus metrics of the correlator.

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

/// Every metric the correlator exports (the relay's are registered beside them).
#[derive(Clone)]
pub struct CorrelatorMetrics {
    /// Replies consumed and committed, by result: `linked`, `duplicate`, `conflict`,
    /// `no_prior_message`, `foreign_source` (a `prior_message` of a source that may not link:
    /// kept, never linked), `deleted` (a reply of a person deleted since: nothing stored).
    pub replies: IntCounterVec,
    /// Newly recorded link conflicts (a login_id already linked to another PSID).
    pub link_conflicts: IntCounter,
    /// Messages moved to the dead-letter queue because they can never be processed.
    pub dead_lettered: IntCounter,
    /// Batches that failed (database trouble) and were retried.
    pub batch_failures: IntCounter,
}

impl CorrelatorMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            replies: IntCounterVec::new(
                Opts::new(
                    "correlator_replies_total",
                    "Replies processed and committed, by result",
                ),
                &["result"],
            )?,
            link_conflicts: IntCounter::with_opts(Opts::new(
                "correlator_link_conflicts_total",
                "Replies naming a login_id that is already linked to another PSID (first seen)",
            ))?,
            dead_lettered: IntCounter::with_opts(Opts::new(
                "correlator_dead_lettered_total",
                "Messages of correlator.replies moved to the dead-letter queue",
            ))?,
            batch_failures: IntCounter::with_opts(Opts::new(
                "correlator_batch_failures_total",
                "Batches that failed on the database and were retried",
            ))?,
        };
        registry.register(Box::new(m.replies.clone()))?;
        registry.register(Box::new(m.link_conflicts.clone()))?;
        registry.register(Box::new(m.dead_lettered.clone()))?;
        registry.register(Box::new(m.batch_failures.clone()))?;
        // Show every result from the start, so rate() queries work before the first one.
        for result in [
            "linked",
            "duplicate",
            "conflict",
            "no_prior_message",
            "foreign_source",
            "deleted",
        ] {
            m.replies.with_label_values(&[result]);
        }
        Ok(m)
    }
}
