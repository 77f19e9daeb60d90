//! Prometheus metrics of the scheduler.

use super::store::gauges::AtRiskWindow;
use crate::graph::FailureClass;
use lc_meta::pages::Fallback;
use lc_shared::optin::OptinState;
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Every metric the scheduler exports.
#[derive(Clone)]
pub struct SchedulerMetrics {
    /// Opt-ins consumed, by what recording them did.
    pub optins_recorded: IntCounterVec,
    /// Send API calls by outcome: `sent` or a [`FailureClass`] label (`transient`, …).
    pub sends: IntCounterVec,
    /// Graph errors by `code/subcode`.
    pub graph_errors: IntCounterVec,
    /// Send API call latency.
    pub send_latency: Histogram,
    /// Time from the opt-in to the accepted first message.
    pub optin_to_send: Histogram,
    /// Time left before the deadline when the first message was accepted.
    pub deadline_slack: Histogram,
    /// Retries scheduled.
    pub retries: IntCounter,
    /// Terminal transitions by state.
    pub terminal: IntCounterVec,
    /// Pages paused (invalid token or restricted), 1 per page, as every replica sees them.
    pub paused_pages: IntGaugeVec,
    /// Results that could not be written because the claim was taken over.
    pub fenced_out: IntCounter,
    /// Claims given back because their send slot passed before the call could start.
    pub slots_missed: IntCounter,
    /// Duration of one claim query (`store::claim::claim_due`): the database's share of
    /// every send, and the figure the claim's p99 < 5 ms target is about.
    pub claim_duration: Histogram,
    /// Rows one claim query returned: a claim costs about the same for 5 rows as for 100,
    /// so small claims mean database time spent per claim rather than per send.
    pub claim_rows: Histogram,
    /// Expired leases resolved by the rescuer.
    pub leases_rescued: IntCounter,
    /// Opt-ins by state (refreshed periodically).
    pub optins_by_state: IntGaugeVec,
    /// Seconds until the nearest deadline among pending opt-ins (refreshed periodically).
    pub nearest_deadline: IntGauge,
    /// Messages moved to the dead-letter queue by the opt-in consumer.
    pub dead_lettered: IntCounter,
    /// Messages waiting in the work queues, their dead-letter queues and the unparsed queue
    /// (refreshed periodically).
    pub queue_ready: IntGaugeVec,
    /// Consumers attached to each work queue (refreshed periodically): 0 means nobody takes
    /// that queue's messages.
    pub queue_consumers: IntGaugeVec,
    /// Unsent opt-ins whose deadline is within each window (kept by the housekeeping leader).
    pub optins_at_risk: IntGaugeVec,
    /// 1 per page whose webhook subscription is found incomplete by the watchdog and not yet
    /// found complete again (kept by the housekeeping leader).
    pub unsubscribed_pages: IntGaugeVec,
    /// Personalised messages sent as their variant's default text, by [`Fallback`] reason.
    pub message_fallbacks: IntCounterVec,
}

impl SchedulerMetrics {
    /// The counter of opt-ins that reached the terminal `state`.
    pub fn terminal_of(&self, state: OptinState) -> prometheus::IntCounter {
        self.terminal.with_label_values(&[state.as_str()])
    }

    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let secs = vec![
            0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0, 21600.0,
            86400.0,
        ];
        let m = Self {
            optins_recorded: IntCounterVec::new(
                Opts::new(
                    "scheduler_optins_recorded_total",
                    "Opt-ins consumed, by result of recording them",
                ),
                &["result"],
            )?,
            sends: IntCounterVec::new(
                Opts::new(
                    "scheduler_send_api_calls_total",
                    "Send API calls by outcome class",
                ),
                &["outcome"],
            )?,
            graph_errors: IntCounterVec::new(
                Opts::new(
                    "scheduler_graph_errors_total",
                    "Graph errors by code and subcode",
                ),
                &["code", "subcode"],
            )?,
            send_latency: Histogram::with_opts(
                HistogramOpts::new(
                    "scheduler_send_api_latency_seconds",
                    "Latency of Send API calls",
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
            )?,
            optin_to_send: Histogram::with_opts(
                HistogramOpts::new(
                    "scheduler_optin_to_first_message_seconds",
                    "Time from opt-in to the first message accepted by Graph",
                )
                .buckets(secs.clone()),
            )?,
            deadline_slack: Histogram::with_opts(
                HistogramOpts::new(
                    "scheduler_deadline_slack_seconds",
                    "Time left before the deadline when the first message was accepted",
                )
                .buckets(secs),
            )?,
            retries: IntCounter::new(
                "scheduler_retries_total",
                "Retries scheduled after transient failures",
            )?,
            terminal: IntCounterVec::new(
                Opts::new(
                    "scheduler_terminal_total",
                    "Opt-ins that reached a terminal state, by state",
                ),
                &["state"],
            )?,
            paused_pages: IntGaugeVec::new(
                Opts::new(
                    "scheduler_paused_pages",
                    "1 for each page paused (invalid token, restricted, or by an operator)",
                ),
                &["page_id"],
            )?,
            fenced_out: IntCounter::new(
                "scheduler_fenced_out_total",
                "Send results not written because another worker took the claim over",
            )?,
            slots_missed: IntCounter::new(
                "scheduler_slots_missed_total",
                "Claims given back without a call because their page's send slot had passed",
            )?,
            claim_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "scheduler_claim_duration_seconds",
                    "Duration of one claim of due opt-ins",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ]),
            )?,
            claim_rows: Histogram::with_opts(
                HistogramOpts::new(
                    "scheduler_claim_rows",
                    "Rows returned by one claim of due opt-ins",
                )
                .buckets(vec![
                    0.0, 1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 100.0, 250.0, 500.0,
                ]),
            )?,
            leases_rescued: IntCounter::new(
                "scheduler_leases_rescued_total",
                "Claims whose lease expired and were resolved by the unknown-outcome policy",
            )?,
            optins_by_state: IntGaugeVec::new(
                Opts::new("scheduler_optins", "Opt-ins in the database by state"),
                &["state"],
            )?,
            nearest_deadline: IntGauge::new(
                "scheduler_nearest_pending_deadline_seconds",
                "Seconds until the nearest deadline among pending opt-ins (0 if none)",
            )?,
            dead_lettered: IntCounter::new(
                "scheduler_dead_lettered_total",
                "Opt-in messages moved to the dead-letter queue",
            )?,
            queue_ready: IntGaugeVec::new(
                Opts::new(
                    "scheduler_queue_messages_ready",
                    "Messages ready in the work queues, their dead-letter queues and \
                     messenger.unparsed",
                ),
                &["queue"],
            )?,
            queue_consumers: IntGaugeVec::new(
                Opts::new(
                    "scheduler_queue_consumers",
                    "Consumers attached to each work queue",
                ),
                &["queue"],
            )?,
            optins_at_risk: IntGaugeVec::new(
                Opts::new(
                    "scheduler_optins_at_risk",
                    "Pending or sending opt-ins whose deadline is within the window",
                ),
                &["within"],
            )?,
            unsubscribed_pages: IntGaugeVec::new(
                Opts::new(
                    "scheduler_unsubscribed_pages",
                    "1 for each page whose webhook subscription the watchdog found incomplete",
                ),
                &["page_id"],
            )?,
            message_fallbacks: IntCounterVec::new(
                Opts::new(
                    "scheduler_message_fallbacks_total",
                    "Personalised first messages sent as their variant's default text, by reason",
                ),
                &["reason"],
            )?,
        };
        // Known label values exist from the start, so dashboards and alerts see zeros rather
        // than missing series.
        for r in [
            "pending",
            "duplicate",
            "replied",
            "expired",
            "unknown_page",
            "deleted",
        ] {
            m.optins_recorded.with_label_values(&[r]);
        }
        // Every failure class, so that new classes get their zero series too.
        for o in std::iter::once("sent").chain(FailureClass::ALL.map(FailureClass::as_str)) {
            m.sends.with_label_values(&[o]);
        }
        for t in OptinState::TERMINAL {
            m.terminal_of(t);
        }
        for f in Fallback::ALL {
            m.message_fallbacks.with_label_values(&[f.as_str()]);
        }
        for w in AtRiskWindow::ALL {
            m.optins_at_risk.with_label_values(&[w.as_str()]);
        }
        registry.register(Box::new(m.queue_ready.clone()))?;
        registry.register(Box::new(m.queue_consumers.clone()))?;
        registry.register(Box::new(m.optins_at_risk.clone()))?;
        registry.register(Box::new(m.unsubscribed_pages.clone()))?;
        registry.register(Box::new(m.optins_recorded.clone()))?;
        registry.register(Box::new(m.sends.clone()))?;
        registry.register(Box::new(m.graph_errors.clone()))?;
        registry.register(Box::new(m.send_latency.clone()))?;
        registry.register(Box::new(m.optin_to_send.clone()))?;
        registry.register(Box::new(m.deadline_slack.clone()))?;
        registry.register(Box::new(m.retries.clone()))?;
        registry.register(Box::new(m.terminal.clone()))?;
        registry.register(Box::new(m.paused_pages.clone()))?;
        registry.register(Box::new(m.fenced_out.clone()))?;
        registry.register(Box::new(m.slots_missed.clone()))?;
        registry.register(Box::new(m.claim_duration.clone()))?;
        registry.register(Box::new(m.claim_rows.clone()))?;
        registry.register(Box::new(m.leases_rescued.clone()))?;
        registry.register(Box::new(m.optins_by_state.clone()))?;
        registry.register(Box::new(m.nearest_deadline.clone()))?;
        registry.register(Box::new(m.dead_lettered.clone()))?;
        registry.register(Box::new(m.message_fallbacks.clone()))?;
        Ok(m)
    }
}
