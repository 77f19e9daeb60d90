//! The drain-with-pruning run of the `scheduler` suite: a large backlog of opt-ins due now
//! (a million in the full run), drained by the real scheduler against a non-recording Graph
//! while its housekeeping prunes finished rows (`OPTIN_RETENTION_SECS=1`), with the table's
//! row count and size sampled every second.
//!
//! What it shows: whether pruning keeps up with the finish rate (rows finished but not yet
//! pruned stay bounded by one housekeeping round's worth) and whether the table's size stays
//! steady instead of growing with every row ever sent. The ceiling is the same run's batched
//! claim/commit loop (`scheduler_db_ceiling_batched_rows_per_s`).

use std::time::Duration;

use tokio::time::Instant;

use crate::env::{BenchEnv, stop};
use crate::hist::round3;
use crate::null_graph::NullGraph;
use crate::report::Report;

/// One sample of the drain.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Since the scheduler started.
    t: Duration,
    /// Graph calls so far.
    calls: u64,
    /// Rows in `optins`.
    rows: i64,
    /// `pg_total_relation_size('optins')`.
    bytes: i64,
    /// Resident set of this process (scheduler, null Graph and sampler), kB.
    rss_kb: u64,
}

/// The `drain` suite: the batched DB ceiling of this run, then the drain of `rows` due
/// opt-ins, and their ratio.
pub async fn suite(rows: usize, quick: bool) -> anyhow::Result<Report> {
    let mut report = Report::new("drain", quick).await;
    let ceiling = {
        let env = BenchEnv::new(16).await?;
        let _pool = env.migrated_pool(1).await?;
        let sql = env.sql().await?;
        crate::scheduler::db_ceiling(
            &env,
            &sql,
            20_000,
            8,
            crate::scheduler::CeilingLoop::Batched,
        )
        .await?
        .0
    };
    report.add(
        "scheduler_db_ceiling_batched_rows_per_s",
        ceiling.round(),
        "rows/s",
        "bare loop, 8 connections: claim_due (100) then finish_sent, one transaction per batch",
    );
    run(rows, &mut report).await?;
    add_ratio(&mut report);
    report.finish();
    report.target(
        "table size steady while draining with pruning (≤ 1.5× its start)",
        "drain_table_growth",
        1.5,
        true,
    );
    Ok(report)
}

/// `drain_vs_db_batched`, when both figures are in `report`.
pub fn add_ratio(report: &mut Report) {
    if let (Some(drain), Some(ceiling)) = (
        report.get("drain_sends_per_s"),
        report.get("scheduler_db_ceiling_batched_rows_per_s"),
    ) {
        report.add(
            "drain_vs_db_batched",
            round3(drain / ceiling.max(1.0)),
            "ratio",
            "drain sends/s with pruning / the batched DB ceiling of this run",
        );
    }
}

/// Runs the drain of `n` due opt-ins into `report` (figures `drain_*`).
pub async fn run(n: usize, report: &mut Report) -> anyhow::Result<()> {
    let env = BenchEnv::new(16).await?;
    let _pool = env.migrated_pool(1).await?;
    let sql = env.sql().await?;
    let t = Instant::now();
    crate::scheduler::insert_due(&sql, &env.pages, "d-", n, time::OffsetDateTime::now_utc())
        .await?;
    sql.batch_execute("VACUUM ANALYZE optins").await?;
    let insert_s = t.elapsed().as_secs_f64();
    let graph = NullGraph::start().await?;
    let mut config = env.scheduler_config()?;
    config.graph_api_url = graph.base_url();
    config.retention_secs = Some(1);
    report.note(format!(
        "drain: {n} opt-ins due now over 16 unlimited pages, the scheduler with production \
         defaults but OPTIN_RETENTION_SECS=1 (housekeeping every 15 s prunes rows finished a \
         second before), null Graph at 0 ms; rows and pg_total_relation_size sampled every second"
    ));
    let start = sample(&sql, Duration::ZERO, 0).await?;
    let scheduler = env.start_scheduler(config).await?;
    let started = Instant::now();
    let mut samples = vec![start];
    let mut all_sent_at = None;
    // Until every row was sent and then pruned (two housekeeping rounds after the last send
    // at most), bounded.
    let limit = Duration::from_secs(120) + Duration::from_millis(5 * n as u64);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let s = sample(&sql, started.elapsed(), graph.calls()).await?;
        samples.push(s);
        if all_sent_at.is_none() && s.calls >= n as u64 {
            all_sent_at = Some(s.t);
        }
        if (all_sent_at.is_some() && s.rows == 0) || started.elapsed() > limit {
            break;
        }
    }
    stop(&scheduler.shutdown, scheduler.service.task).await;

    let last = samples.last().copied().unwrap_or(start);
    let sent_s = all_sent_at.unwrap_or(last.t).as_secs_f64().max(0.001);
    // Finished but not yet pruned: rows in the table minus the ones still to send.
    let unpruned_max = samples
        .iter()
        .map(|s| s.rows - (n as i64 - s.calls as i64).max(0))
        .max()
        .unwrap_or(0);
    let bytes_max = samples.iter().map(|s| s.bytes).max().unwrap_or(0);
    report.add("drain_rows", n as f64, "rows", "due opt-ins at the start");
    report.add(
        "drain_insert_s",
        round3(insert_s),
        "s",
        "INSERT … generate_series + VACUUM ANALYZE",
    );
    report.add(
        "drain_sends_per_s",
        (n as f64 / sent_s).round(),
        "sends/s",
        "rows / time from start() to the last Graph call, pruning on",
    );
    report.add(
        "drain_pruned_per_s",
        ((n as i64 - last.rows) as f64 / last.t.as_secs_f64().max(0.001)).round(),
        "rows/s",
        "rows deleted / time from start() until the table was empty (or the run's limit)",
    );
    report.add(
        "drain_unpruned_max",
        unpruned_max as f64,
        "rows",
        "most rows finished but not yet pruned at one sample (one round is 15 s of sends)",
    );
    report.add(
        "drain_rows_left",
        last.rows as f64,
        "rows",
        "rows in the table at the end (0: everything sent and pruned)",
    );
    report.add(
        "drain_table_start_mb",
        mb(start.bytes),
        "MB",
        "pg_total_relation_size(optins) before the drain",
    );
    report.add(
        "drain_table_max_mb",
        mb(bytes_max),
        "MB",
        "largest size sampled during the drain",
    );
    report.add(
        "drain_table_growth",
        round3(bytes_max as f64 / (start.bytes as f64).max(1.0)),
        "ratio",
        "largest size / size at the start (≈ 1: the table did not grow while draining)",
    );
    // RSS against sends over the second half of the drain (after warm-up): a leak grows
    // with every send, allocator growth levels off.
    let sending: Vec<&Sample> = samples.iter().filter(|s| s.calls < n as u64).collect();
    if let (Some(mid), Some(end)) = (sending.get(sending.len() / 2), sending.last()) {
        let sends = end.calls.saturating_sub(mid.calls).max(1) as f64;
        report.add(
            "drain_rss_mid_mb",
            round3(mid.rss_kb as f64 / 1024.0),
            "MB",
            "resident set of the bench process halfway through the sends",
        );
        report.add(
            "drain_rss_end_mb",
            round3(end.rss_kb as f64 / 1024.0),
            "MB",
            "resident set at the last sample before every row was sent",
        );
        report.add(
            "drain_rss_growth_kb_per_1k_sends",
            round3((end.rss_kb as f64 - mid.rss_kb as f64) / sends * 1000.0),
            "kB",
            "RSS growth per 1,000 sends over the second half (≈ 0: flat)",
        );
    }
    report.attach(
        "drain_samples",
        samples
            .iter()
            .map(|s| {
                format!(
                    "{:.0}s calls={} rows={} mb={} rss_mb={:.1}",
                    s.t.as_secs_f64(),
                    s.calls,
                    s.rows,
                    mb(s.bytes),
                    s.rss_kb as f64 / 1024.0
                )
            })
            .collect::<Vec<_>>()
            .join("\n"),
    );
    Ok(())
}

async fn sample(sql: &tokio_postgres::Client, t: Duration, calls: u64) -> anyhow::Result<Sample> {
    let row = sql
        .query_one(
            "SELECT count(*), pg_total_relation_size('optins') FROM optins",
            &[],
        )
        .await?;
    Ok(Sample {
        t,
        calls,
        rows: row.get(0),
        bytes: row.get(1),
        rss_kb: crate::machine::rss_kb(),
    })
}

fn mb(bytes: i64) -> f64 {
    round3(bytes as f64 / 1_048_576.0)
}
