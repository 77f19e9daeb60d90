//! The `funnel_*_24h` gauges: the funnel of the last 24 hours (by `opted_in_at`) per page,
//! refreshed every [`REFRESH`] by the scheduler.
//!
//! One replica at a time runs the query (a transaction-level advisory lock of its own, not
//! the housekeeping one, so the funnel's scan never holds up pruning); a replica that finds
//! it taken keeps its previous values until its next turn. Every series is rebuilt on each
//! refresh (the vectors are reset), so a page that left the registry drops out.

use std::collections::BTreeMap;
use std::time::Duration;

use deadpool_postgres::{GenericClient, Pool};
use lc_shared::optin::FailureReason;
use lc_shared::shutdown::Shutdown;
use prometheus::{GaugeVec, IntGaugeVec, Opts, Registry};
use time::OffsetDateTime;

use super::FunnelError;
use super::query::{FunnelRow, Grouping, Quantiles, Stages, funnel};

/// How often the gauges are refreshed.
pub const REFRESH: Duration = Duration::from_secs(30);
/// The `page_id` label of opt-ins of pages not in the registry (unknown or deleted pages),
/// summed so that ids nobody configured cannot add series. Page ids are digits, so it never
/// names a page.
pub const UNREGISTERED: &str = "unregistered";
/// Longest a refresh query may run before the database cancels it.
const STATEMENT_TIMEOUT: &str = "20s";

/// The stage label values, in funnel order.
pub const STAGES: [&str; 6] = ["opted_in", "sent", "replied", "linked", "expired", "failed"];

/// The funnel gauges.
#[derive(Clone)]
pub struct FunnelMetrics {
    /// `funnel_optins_24h{page_id,stage}`.
    pub optins: IntGaugeVec,
    /// `funnel_failures_24h{page_id,reason}`.
    pub failures: IntGaugeVec,
    /// `funnel_time_to_first_message_seconds_24h{page_id,quantile}`.
    pub to_first_message: GaugeVec,
    /// `funnel_time_to_reply_seconds_24h{page_id,quantile}`.
    pub to_reply: GaugeVec,
}

impl FunnelMetrics {
    /// Creates the gauges and registers them in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            optins: IntGaugeVec::new(
                Opts::new(
                    "funnel_optins_24h",
                    "Opt-ins of the last 24 h (by opted_in_at) that reached each funnel stage",
                ),
                &["page_id", "stage"],
            )?,
            failures: IntGaugeVec::new(
                Opts::new(
                    "funnel_failures_24h",
                    "Failed opt-ins of the last 24 h (by opted_in_at), by failure reason",
                ),
                &["page_id", "reason"],
            )?,
            to_first_message: GaugeVec::new(
                Opts::new(
                    "funnel_time_to_first_message_seconds_24h",
                    "Time from opt-in to the accepted first message, opt-ins of the last 24 h",
                ),
                &["page_id", "quantile"],
            )?,
            to_reply: GaugeVec::new(
                Opts::new(
                    "funnel_time_to_reply_seconds_24h",
                    "Time from the first message to the reply, opt-ins of the last 24 h",
                ),
                &["page_id", "quantile"],
            )?,
        };
        registry.register(Box::new(m.optins.clone()))?;
        registry.register(Box::new(m.failures.clone()))?;
        registry.register(Box::new(m.to_first_message.clone()))?;
        registry.register(Box::new(m.to_reply.clone()))?;
        Ok(m)
    }

    /// Replaces every series: each page of `pages` (the registry) with its row of `rows`, or
    /// zeros (and NaN quantiles, as Prometheus summaries show no observations) without one;
    /// rows of other pages summed under [`UNREGISTERED`].
    pub fn show(&self, pages: &[String], rows: &[FunnelRow]) {
        let mut by_page: BTreeMap<&str, (Stages, Vec<i64>, Quantiles, Quantiles)> =
            pages.iter().map(|p| (p.as_str(), empty())).collect();
        for row in rows {
            let failures = FailureReason::ALL.map(|r| row.failures.of(r)).to_vec();
            if let Some(entry) = by_page.get_mut(row.page_id.as_str()) {
                *entry = (
                    row.stages,
                    failures,
                    row.time_to_first_message_seconds,
                    row.time_to_reply_seconds,
                );
            } else {
                // Quantiles of different pages cannot be merged: the bucket has counts only.
                let other = by_page.entry(UNREGISTERED).or_insert_with(empty);
                add(&mut other.0, &row.stages);
                for (sum, n) in other.1.iter_mut().zip(&failures) {
                    *sum += n;
                }
            }
        }
        self.optins.reset();
        self.failures.reset();
        self.to_first_message.reset();
        self.to_reply.reset();
        for (page, (stages, failures, first, reply)) in by_page {
            let counts = [
                stages.opted_in,
                stages.sent,
                stages.replied,
                stages.linked,
                stages.expired,
                stages.failed,
            ];
            for (stage, n) in STAGES.iter().zip(counts) {
                self.optins.with_label_values(&[page, stage]).set(n);
            }
            for (reason, n) in FailureReason::ALL.iter().zip(failures) {
                self.failures
                    .with_label_values(&[page, reason.as_str()])
                    .set(n);
            }
            set_quantiles(&self.to_first_message, page, first);
            set_quantiles(&self.to_reply, page, reply);
        }
    }
}

fn empty() -> (Stages, Vec<i64>, Quantiles, Quantiles) {
    (
        Stages::default(),
        vec![0; FailureReason::ALL.len()],
        Quantiles::default(),
        Quantiles::default(),
    )
}

fn add(sum: &mut Stages, s: &Stages) {
    sum.opted_in += s.opted_in;
    sum.sent += s.sent;
    sum.replied += s.replied;
    sum.linked += s.linked;
    sum.expired += s.expired;
    sum.failed += s.failed;
}

fn set_quantiles(gauge: &GaugeVec, page: &str, q: Quantiles) {
    for (label, v) in [("0.5", q.p50), ("0.9", q.p90)] {
        gauge
            .with_label_values(&[page, label])
            .set(v.unwrap_or(f64::NAN));
    }
}

/// Refreshes the gauges every [`REFRESH`] (the first at once) until `shutdown`.
pub async fn run(pool: Pool, metrics: FunnelMetrics, shutdown: Shutdown) {
    let mut tick = tokio::time::interval(REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.wait() => return,
        }
        if let Err(e) = refresh(&pool, &metrics).await {
            tracing::warn!(error = %e, "funnel gauges not refreshed; next try in 30 s");
        }
    }
}

/// One refresh; false when another replica was refreshing (the gauges are left as they were).
pub async fn refresh(pool: &Pool, metrics: &FunnelMetrics) -> Result<bool, FunnelError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    if !lead(&tx).await? {
        return Ok(false);
    }
    tx.batch_execute(&format!(
        "SET LOCAL statement_timeout = '{STATEMENT_TIMEOUT}'"
    ))
    .await?;
    let pages: Vec<String> = tx
        .query("SELECT page_id FROM pages ORDER BY page_id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let now = OffsetDateTime::now_utc();
    let day = time::Duration::hours(24);
    let rows = funnel(&tx, now - day, now, None, Grouping::Whole).await?;
    tx.commit().await?;
    metrics.show(&pages, &rows);
    Ok(true)
}

async fn lead(client: &impl GenericClient) -> Result<bool, FunnelError> {
    let row = client
        .query_one(
            "SELECT pg_try_advisory_xact_lock(hashtextextended('loginconnect.funnel', 0))",
            &[],
        )
        .await?;
    Ok(row.get(0))
}
