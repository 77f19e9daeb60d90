//! The deadline run of the `scale` suite: opt-ins all due at once with their last send times
//! spread over a few seconds, under a throttled fake Graph (few calls in flight, 100 ms each),
//! so not all of them can make it. How many expire is compared with the offline optimum
//! ([`crate::edf`]) over the same deadlines and the capacity the run achieved.
//!
//! The window is shortened with the scheduler's hidden `window_secs` (one hour) and a safety
//! margin of one second, so deadlines fall inside the run.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use lc_testkit::fake_graph::RecordedCall;
use time::OffsetDateTime;

use crate::env::{BenchEnv, stop};
use crate::hist::round3;
use crate::report::Report;

/// Sizes of the deadline run.
#[derive(Debug, Clone)]
pub struct ExpiryParams {
    /// Opt-ins, all due at once.
    pub n: usize,
    /// `MAX_IN_FLIGHT_SENDS` of the throttled scheduler.
    pub max_in_flight: usize,
    /// Fake Graph latency (milliseconds).
    pub latency_ms: u64,
    /// Share of the opt-ins the nominal capacity could send before the last deadline.
    pub servable: f64,
}

impl ExpiryParams {
    /// `--quick`: 2,000 opt-ins, 16 calls in flight.
    pub fn quick() -> Self {
        Self {
            n: 2_000,
            max_in_flight: 16,
            latency_ms: 100,
            servable: 0.6,
        }
    }

    /// The full run: 10,000 opt-ins, 32 calls in flight.
    pub fn full() -> Self {
        Self {
            n: 10_000,
            max_in_flight: 32,
            ..Self::quick()
        }
    }
}

const WINDOW_SECS: u64 = 3600;
const MARGIN_SECS: u64 = 1;

/// Runs the deadline scenario and adds its figures to `report`.
pub async fn run(params: &ExpiryParams, report: &mut Report) -> anyhow::Result<()> {
    let env = BenchEnv::new(16).await?;
    let _pool = env.migrated_pool(1).await?;
    let sql = env.sql().await?;
    let nominal = params.max_in_flight as f64 / (params.latency_ms.max(1) as f64 / 1000.0);
    let horizon = (params.servable * params.n as f64 / nominal).max(2.0);
    // Last send times 1 s … horizon after the start, in a reproducible order.
    let mut rng = fastrand::Rng::with_seed(0x0e_d0f);
    let start = OffsetDateTime::now_utc() + Duration::from_millis(500);
    let window = Duration::from_secs(WINDOW_SECS);
    let margin = Duration::from_secs(MARGIN_SECS);
    let mut logins = Vec::with_capacity(params.n);
    let mut pages = Vec::with_capacity(params.n);
    let mut opted = Vec::with_capacity(params.n);
    let mut last_send = HashMap::with_capacity(params.n);
    for i in 0..params.n {
        let offset = Duration::from_secs_f64(1.0 + rng.f64() * (horizon - 1.0));
        let last = start + offset;
        let login = format!("e{i}");
        last_send.insert(login.clone(), last);
        logins.push(login);
        pages.push(env.pages[i % env.pages.len()].clone());
        opted.push(last + margin - window);
    }
    sql.execute(
        "INSERT INTO optins (page_id, login_id, opted_in_at, deadline, send_at, state, next_attempt_at) \
         SELECT p, l, o, o + make_interval(secs => $4), o, 'pending', now() \
         FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS t(p, l, o)",
        &[&pages, &logins, &opted, &(WINDOW_SECS as f64)],
    )
    .await
    .context("inserting the deadline run's opt-ins")?;

    env.graph
        .set_latency(Duration::from_millis(params.latency_ms));
    let mut config = env.scheduler_config()?;
    config.window_secs = WINDOW_SECS;
    config.safety_margin_secs = MARGIN_SECS;
    config.max_in_flight = params.max_in_flight;
    let scheduler = env.start_scheduler(config).await?;
    let limit = tokio::time::Instant::now() + Duration::from_secs_f64(horizon + 60.0);
    loop {
        let open: i64 = sql
            .query_one(
                "SELECT count(*) FROM optins WHERE state IN ('pending', 'sending')",
                &[],
            )
            .await?
            .get(0);
        if open == 0 || tokio::time::Instant::now() > limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop(&scheduler.shutdown, scheduler.service.task).await;

    let mut by_state: HashMap<String, i64> = HashMap::new();
    for row in sql
        .query("SELECT state, count(*) FROM optins GROUP BY state", &[])
        .await?
    {
        by_state.insert(row.get(0), row.get(1));
    }
    let calls: Vec<RecordedCall> = env.graph.send_calls();
    // Lateness by arrival at the fake: the dispatcher checks the last send time just before
    // the call, so an arrival a few milliseconds after it is the HTTP hop, not a late start.
    let lateness: Vec<f64> = calls
        .iter()
        .filter_map(|c| {
            c.login_id
                .as_ref()
                .and_then(|l| last_send.get(l))
                .map(|last| (c.at - *last).as_seconds_f64())
        })
        .filter(|late| *late >= 0.0)
        .collect();
    let late = lateness.len();
    let max_late_ms = lateness.iter().copied().fold(0.0, f64::max) * 1000.0;
    let (Some(first), Some(last)) = (
        calls.iter().map(|c| c.at).min(),
        calls.iter().map(|c| c.at).max(),
    ) else {
        report.note("scale deadline run: no Graph call was made");
        return Ok(());
    };
    let span = (last - first).as_seconds_f64().max(0.001);
    let capacity = calls.len() as f64 / span;
    let deadlines: Vec<f64> = last_send
        .values()
        .map(|t| (*t - first).as_seconds_f64())
        .collect();
    let service = params.max_in_flight as f64 / capacity;
    let edf_min = crate::edf::min_expired(&deadlines, params.max_in_flight, service);
    let nominal_service = params.latency_ms as f64 / 1000.0;
    let edf_nominal = crate::edf::min_expired(&deadlines, params.max_in_flight, nominal_service);
    let expired = by_state.get("expired").copied().unwrap_or(0);

    report.add(
        "scale_expiry_n",
        params.n as f64,
        "optins",
        format!("all due at once, last send 1–{horizon:.1} s after start"),
    );
    report.add(
        "scale_expiry_capacity_per_s",
        capacity.round(),
        "sends/s",
        format!(
            "achieved: calls / span of calls ({} in flight, Graph {} ms)",
            params.max_in_flight, params.latency_ms
        ),
    );
    report.add(
        "scale_expiry_nominal_capacity_per_s",
        nominal.round(),
        "sends/s",
        "in flight / Graph latency",
    );
    report.add(
        "scale_expiry_sent",
        by_state.get("sent").copied().unwrap_or(0) as f64,
        "optins",
        "sent before their deadline",
    );
    report.add(
        "scale_expiry_expired",
        expired as f64,
        "optins",
        "expired (measured)",
    );
    report.add(
        "scale_expiry_expired_edf_min",
        edf_min as f64,
        "optins",
        "offline EDF optimum at the achieved capacity",
    );
    report.add(
        "scale_expiry_expired_edf_nominal",
        edf_nominal as f64,
        "optins",
        "offline EDF optimum at the nominal capacity",
    );
    report.add(
        "scale_expiry_excess",
        round3((expired as f64 - edf_min as f64) / params.n as f64),
        "ratio",
        "(expired − EDF minimum) / opt-ins",
    );
    report.add(
        "scale_expiry_arrivals_after_last_send",
        late as f64,
        "count",
        "Graph calls arriving at the fake at/after their last send time (checked before the call; the margin covers the hop)",
    );
    report.add(
        "scale_expiry_max_arrival_after_last_send_ms",
        round3(max_late_ms),
        "ms",
        "the latest such arrival",
    );
    let other: i64 = by_state
        .iter()
        .filter(|(s, _)| !matches!(s.as_str(), "sent" | "expired"))
        .map(|(_, n)| *n)
        .sum();
    if other > 0 {
        report.note(format!(
            "scale deadline run: {other} opt-ins ended neither sent nor expired: {by_state:?}"
        ));
    }
    Ok(())
}
