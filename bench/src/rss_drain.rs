//! The `rss-drain` suite: the release `scheduler` binary alone, as its own process, draining
//! a backlog of due opt-ins against the null Graph, with its resident set sampled every
//! second against the sends so far.
//!
//! What it tells apart: a leak grows the resident set with every send (a line through the
//! samples of the second half has a slope per 1,000 sends that does not go to zero), the
//! allocator's growth levels off after warm-up (a plateau). Only the scheduler runs in the
//! process measured — no load generator, no Graph stand-in — so its figures are its own, and
//! the same run can be repeated with another allocator build (`LC_BENCH_BIN_DIR`) or another
//! environment for the scheduler (`LC_BENCH_SCHEDULER_ENV`, e.g. `MALLOC_ARENA_MAX=2`, or
//! heaptrack's preload) to compare them (BENCHMARKS.md).

use std::time::Duration;

use tokio::time::Instant;

use crate::child::{Binaries, SCHEDULER_ENV_VAR, Service, ServiceProc, free_addr};
use crate::env::BenchEnv;
use crate::hist::round3;
use crate::null_graph::NullGraph;
use crate::proc_stats::ProcStats;
use crate::report::Report;
use crate::trend;

/// After the last send, how long the idle scheduler is still sampled (one housekeeping round
/// of 15 s prunes the last rows; does the allocator give memory back when idle?).
const IDLE_TAIL: Duration = Duration::from_secs(20);

/// One sample of the drain.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Since the scheduler process was started.
    t: Duration,
    /// Graph calls so far.
    calls: u64,
    /// The scheduler's `VmRSS`, `VmHWM` and CPU time.
    stats: ProcStats,
}

/// Runs the suite: `rows` due opt-ins over 16 unlimited pages, drained by the scheduler binary.
pub async fn run(rows: usize, quick: bool) -> anyhow::Result<Report> {
    let mut report = Report::new("rss-drain", quick).await;
    report.out_of_process(format!(
        "process mode: the scheduler binary alone, its own process configured through its \
         environment (production defaults, OPTIN_RETENTION_SECS=1); this bench process only \
         plays a null Graph (0 ms) and samples /proc/<pid>/status every second, on a {}-core \
         machine shared with other work",
        crate::machine::cores()
    ));
    let bins = Binaries::locate().await?;
    report.note(format!("rss-drain: scheduler from {}", bins.origin()));
    if let Ok(extra) = std::env::var(SCHEDULER_ENV_VAR) {
        report.note(format!(
            "rss-drain: scheduler environment adds {SCHEDULER_ENV_VAR}={extra}"
        ));
    }
    let env = BenchEnv::new(16).await?;
    let _pool = env.migrated_pool(1).await?;
    let sql = env.sql().await?;
    crate::scheduler::insert_due(
        &sql,
        &env.pages,
        "r-",
        rows,
        time::OffsetDateTime::now_utc(),
    )
    .await?;
    sql.batch_execute("VACUUM ANALYZE optins").await?;
    let graph = NullGraph::start().await?;

    let admin = free_addr()?;
    let vars: Vec<(&str, String)> = vec![
        ("AMQP_URL", env.vhost.url()),
        ("METRICS_ADDR", admin.to_string()),
        ("DATABASE_URL", env.db.url()),
        ("PAGES_FILE", env.pages_file.display().to_string()),
        ("GRAPH_API_URL", graph.base_url()),
        ("OPTIN_RETENTION_SECS", "1".to_owned()),
    ];
    let log = std::env::temp_dir().join(format!("{}-scheduler.log", env.db.name));
    let started = Instant::now();
    let mut scheduler = ServiceProc::spawn(
        Service::Scheduler,
        bins.path(Service::Scheduler),
        &vars,
        admin,
        log,
    )?;
    scheduler.wait_ready(Duration::from_secs(60)).await?;

    let mut samples = vec![Sample {
        t: started.elapsed(),
        calls: graph.calls(),
        stats: scheduler.stats()?,
    }];
    let limit = Duration::from_secs(120) + Duration::from_millis(10 * rows as u64);
    let mut all_sent_at: Option<Duration> = None;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let s = Sample {
            t: started.elapsed(),
            calls: graph.calls(),
            stats: scheduler.stats()?,
        };
        samples.push(s);
        if all_sent_at.is_none() && s.calls >= rows as u64 {
            all_sent_at = Some(s.t);
        }
        let idle_done = all_sent_at.is_some_and(|at| s.t >= at + IDLE_TAIL);
        if idle_done || s.t > limit {
            break;
        }
    }
    drop(scheduler);
    figures(&mut report, rows, &samples);
    report.finish();
    Ok(report)
}

/// The figures of one drain from its samples.
fn figures(report: &mut Report, rows: usize, samples: &[Sample]) {
    let n = rows as u64;
    let mb = |kb: u64| round3(kb as f64 / 1024.0);
    let first = samples.first().copied();
    let last = samples.last().copied();
    let sending: Vec<Sample> = samples.iter().copied().filter(|s| s.calls < n).collect();
    let crossing = |share: f64| samples.iter().find(|s| s.calls as f64 >= share * n as f64);
    report.add(
        "rss_drain_rows",
        rows as f64,
        "rows",
        "due opt-ins at the start",
    );
    if let (Some(a), Some(b)) = (crossing(0.1), crossing(0.9)) {
        let dt = b.t.saturating_sub(a.t).as_secs_f64().max(0.001);
        report.add(
            "rss_drain_sends_per_s",
            ((b.calls - a.calls) as f64 / dt).round(),
            "sends/s",
            "Graph calls between the samples where 10 % and 90 % of the rows were sent",
        );
    }
    if let Some(f) = first {
        report.add(
            "rss_drain_rss_ready_mb",
            mb(f.stats.rss_kb),
            "MB",
            "scheduler VmRSS when /readyz first answered 200",
        );
    }
    if let Some(l) = sending.last() {
        report.add(
            "rss_drain_rss_end_mb",
            mb(l.stats.rss_kb),
            "MB",
            "scheduler VmRSS at the last sample before every row was sent",
        );
    }
    if let Some(l) = last {
        report.add(
            "rss_drain_peak_rss_mb",
            mb(l.stats.hwm_kb),
            "MB",
            "scheduler VmHWM over its life",
        );
        report.add(
            "rss_drain_rss_idle_mb",
            mb(l.stats.rss_kb),
            "MB",
            format!(
                "scheduler VmRSS {} s after the last send (idle)",
                IDLE_TAIL.as_secs()
            ),
        );
        if let Some(f) = first {
            report.add(
                "rss_drain_cpu_s_per_1k_sends",
                round3((l.stats.cpu_s - f.stats.cpu_s) / (rows as f64 / 1000.0).max(0.001)),
                "s",
                "scheduler utime + stime from ready to the end, per 1,000 sends",
            );
        }
    }
    // The second half of the sends: after warm-up, where a leak keeps climbing and allocator
    // growth has levelled off.
    let half: Vec<(f64, f64)> = sending
        .iter()
        .filter(|s| s.calls >= n / 2)
        .map(|s| (s.calls as f64 / 1000.0, s.stats.rss_kb as f64 / 1024.0))
        .collect();
    let fit = trend::fit(&half, 0.05, 1.0);
    report.add(
        "rss_drain_slope_kb_per_1k_sends",
        round3(fit.slope * 1024.0),
        "kB",
        "least-squares slope of VmRSS per 1,000 sends over the second half of the sends",
    );
    report.add(
        "rss_drain_slope_ci95_kb_per_1k_sends",
        round3(fit.ci95 * 1024.0),
        "kB",
        "half-width of that slope's 95 % confidence interval",
    );
    report.note(format!(
        "rss-drain: VmRSS against sends over the second half ({} samples): {} — slope {:.1} ± {:.1} kB per 1,000 sends, fitted change {:.2} MB on a mean of {:.1} MB",
        fit.n,
        fit.verdict.word(),
        fit.slope * 1024.0,
        fit.ci95 * 1024.0,
        fit.change,
        fit.mean
    ));
    // RSS at each tenth of the sends: the curve's shape in one line.
    let profile: Vec<String> = (1..=10)
        .filter_map(|k| {
            crossing(f64::from(k) / 10.0)
                .map(|s| format!("{}%: {:.1}", k * 10, s.stats.rss_kb as f64 / 1024.0))
        })
        .collect();
    report.note(format!(
        "rss-drain: VmRSS (MB) by share of rows sent — {}",
        profile.join(", ")
    ));
    report.attach(
        "rss_drain_samples",
        samples
            .iter()
            .map(|s| {
                format!(
                    "{:.0}s calls={} rss_mb={:.1} hwm_mb={:.1} cpu_s={:.1}",
                    s.t.as_secs_f64(),
                    s.calls,
                    s.stats.rss_kb as f64 / 1024.0,
                    s.stats.hwm_kb as f64 / 1024.0,
                    s.stats.cpu_s
                )
            })
            .collect::<Vec<_>>()
            .join("\n"),
    );
}
