//! The `procs` suite (process mode): ingest, the scheduler and the correlator each run as
//! their own OS process from the release binaries ([`crate::child`]), configured through
//! their environment with production defaults, against a scratch vhost and database; the
//! bench process only generates the load and plays Graph ([`crate::timed_graph`]).
//!
//! An open loop posts opt-ins at the given rate (the design load is 500/s) plus one reply
//! for every two opt-ins ([`crate::mixed`]); after the last post the run waits until every
//! accepted opt-in was sent and every reply linked. Reported per process: peak RSS (`VmHWM`)
//! and CPU seconds (`utime + stime`) per 1,000 events it handled; and the webhook → Graph
//! latency of the opt-ins. These are the figures the RSS targets of the design are decided
//! on (ingest < 64 MB, each worker < 128 MB at design load): in-process suites cannot tell
//! whose memory is whose.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::child::{Binaries, Service, Services};
use crate::env::BenchEnv;
use crate::hist::round3;
use crate::mixed::{Kind, Mix, MixedLoad};
use crate::proc_stats::ProcStats;
use crate::report::Report;
use crate::timed_graph::TimedGraph;

/// The design load of the issue: opt-ins per second.
pub const DESIGN_RATE: f64 = 500.0;

/// Sizes of the process-mode suite.
#[derive(Debug, Clone)]
pub struct ProcsParams {
    /// Opt-ins per second (replies come on top, see [`ProcsParams::mix`]).
    pub rate: f64,
    /// How long the load runs.
    pub duration: Duration,
    /// Latency of the Graph stand-in.
    pub graph_latency: Duration,
    /// Pages the opt-ins are spread over (one page is capped at `PAGE_RATE_LIMIT`/s).
    pub pages: usize,
    /// Opt-ins, replies and redeliveries per cycle.
    pub mix: Mix,
    /// How long to wait after the load for the last sends and links.
    pub drain_limit: Duration,
}

impl ProcsParams {
    /// `--quick`: 10 s at the design load.
    pub fn quick() -> Self {
        Self {
            rate: DESIGN_RATE,
            duration: Duration::from_secs(10),
            graph_latency: Duration::from_millis(100),
            pages: 16,
            mix: Mix {
                optins: 2,
                replies: 1,
                redeliveries: 0,
            },
            drain_limit: Duration::from_secs(120),
        }
    }

    /// The full run: 60 s at the design load.
    pub fn full() -> Self {
        Self {
            duration: Duration::from_secs(60),
            drain_limit: Duration::from_secs(300),
            ..Self::quick()
        }
    }
}

/// Runs the suite.
pub async fn run(params: &ProcsParams, quick: bool) -> anyhow::Result<Report> {
    let mut report = Report::new("procs", quick).await;
    report.out_of_process(format!(
        "process mode: ingest, scheduler and correlator are the service binaries, each its own \
         process configured through its environment (production defaults); this bench process \
         runs only the load generator and the Graph stand-in, on a {}-core machine shared with \
         other work",
        crate::machine::cores()
    ));
    let bins = Binaries::locate().await?;
    report.note(format!(
        "{}: service binaries from {}",
        report.suite,
        bins.origin()
    ));
    let env = BenchEnv::new(params.pages).await?;
    // Migrated here, so the two workers do not both migrate an empty database at start.
    let _pool = env.migrated_pool(1).await?;
    let sql = env.sql().await?;
    let graph = Arc::new(TimedGraph::start(params.graph_latency).await?);
    let services = Services::start(&env, &bins, &graph.base_url(), &[]).await?;
    report.note(format!(
        "load: open loop of {} opt-ins/s and {} replies/s (each naming an opt-in already sent) \
         for {:?} over {} pages; Graph stand-in at {} ms; logs at the production default \
         (RUST_LOG=info unless set), written to a file",
        params.rate,
        params.rate * f64::from(params.mix.replies) / f64::from(params.mix.optins.max(1)),
        params.duration,
        params.pages,
        params.graph_latency.as_millis()
    ));

    let before = services.stats()?;
    let load = MixedLoad::new(
        services.webhook_url.clone(),
        graph.clone(),
        env.pages.clone(),
        "p",
    )?;
    let started = Instant::now();
    load.run(params.rate, params.duration, params.mix).await;
    let totals = load.totals();
    let replies = totals.ok(Kind::Reply);
    let drained = wait_drained(&graph, &sql, replies, params.drain_limit).await?;
    let elapsed = started.elapsed();
    let after = services.stats()?;
    drop(services);

    let links = count(&sql, "SELECT count(*) FROM links").await?;
    let optins = totals.ok(Kind::OptIn);
    let accepted: u64 = Kind::ALL.iter().map(|k| totals.ok(*k)).sum();
    report.add(
        "procs_rate_optins_per_s",
        params.rate,
        "optins/s",
        format!(
            "open-loop opt-in rate for {:?} (design load {DESIGN_RATE}/s)",
            params.duration
        ),
    );
    report.add(
        "procs_optins",
        optins as f64,
        "count",
        "opt-ins ingest accepted",
    );
    report.add(
        "procs_replies",
        replies as f64,
        "count",
        "replies ingest accepted",
    );
    report.add(
        "procs_sends",
        graph.calls() as f64,
        "count",
        "Send API calls received",
    );
    report.add(
        "procs_links",
        links as f64,
        "count",
        "links the correlator wrote",
    );
    report.add(
        "procs_unexpected_sends",
        graph.unexpected() as f64,
        "count",
        "Send API calls for a login_id neither expected nor of a failed POST: a second send or a stray one (0 is right)",
    );
    report.add(
        "procs_sends_after_failed_posts",
        graph.sends_after_failed_posts() as f64,
        "count",
        "first sends for opt-ins whose POST failed after the message was queued (at least once; not a second send)",
    );
    report.add(
        "procs_drain_s",
        round3(elapsed.saturating_sub(params.duration).as_secs_f64()),
        "s",
        "from the last post until every opt-in was sent and every reply linked",
    );
    if !drained {
        report.note(format!(
            "procs: not drained within {:?} of the load: {} opt-ins unsent, {links} of {replies} links",
            params.drain_limit,
            graph.outstanding()
        ));
    }
    let failed: u64 = Kind::ALL.iter().map(|k| totals.failed(*k)).sum();
    if failed > 0 || totals.shed > 0 {
        report.add(
            "procs_post_failed",
            failed as f64,
            "count",
            "POSTs that failed",
        );
        report.add(
            "procs_post_shed",
            totals.shed as f64,
            "count",
            "arrivals shed (4,096 open)",
        );
        if let Some(e) = &totals.first_error {
            report.note(format!("procs: first failed POST: {e}"));
        }
    }
    totals.all_latency().report(
        &mut report,
        "procs_post",
        "POST /webhook (opt-ins and replies), from the scheduled start",
    );
    graph.total().report(
        &mut report,
        "procs_e2e",
        "opt-in webhook POST (scheduled start) → Send API call",
    );

    for (service, events) in [
        (Service::Ingest, accepted),
        (Service::Scheduler, graph.calls()),
        (Service::Correlator, links.max(0) as u64),
    ] {
        add_process(&mut report, service, &before, &after, events);
    }
    report.finish();
    let at = if (params.rate - DESIGN_RATE).abs() < 1e-9 {
        "at design load"
    } else {
        "below or above design load: see procs_rate_optins_per_s"
    };
    report.target(
        &format!("webhook → Graph p99 < 250 ms at 500 opt-ins/s (processes; {at})"),
        "procs_e2e_p99_ms",
        250.0,
        true,
    );
    for (service, mb) in [
        (Service::Ingest, 64.0),
        (Service::Scheduler, 128.0),
        (Service::Correlator, 128.0),
    ] {
        report.target(
            &format!("{} peak RSS < {mb} MB ({at})", service.name()),
            &format!("procs_{}_peak_rss_mb", service.name()),
            mb,
            true,
        );
    }
    Ok(report)
}

/// Peak RSS and CPU seconds per 1,000 events of one service.
fn add_process(
    report: &mut Report,
    service: Service,
    before: &[(Service, ProcStats)],
    after: &[(Service, ProcStats)],
    events: u64,
) {
    let find = |all: &[(Service, ProcStats)]| {
        all.iter()
            .find(|(s, _)| *s == service)
            .map(|(_, st)| *st)
            .unwrap_or_default()
    };
    let (b, a) = (find(before), find(after));
    let name = service.name();
    report.add(
        format!("procs_{name}_peak_rss_mb"),
        round3(a.hwm_kb as f64 / 1024.0),
        "MB",
        format!("{name}: peak resident set over its life (VmHWM)"),
    );
    report.add(
        format!("procs_{name}_rss_end_mb"),
        round3(a.rss_kb as f64 / 1024.0),
        "MB",
        format!("{name}: resident set after the run (VmRSS)"),
    );
    report.add(
        format!("procs_{name}_events"),
        events as f64,
        "count",
        format!(
            "{name}: events handled (ingest: bodies accepted; scheduler: sends; correlator: links)"
        ),
    );
    report.add(
        format!("procs_{name}_cpu_s_per_1k_events"),
        round3((a.cpu_s - b.cpu_s).max(0.0) / (events.max(1) as f64) * 1000.0),
        "s",
        format!("{name}: CPU seconds (utime + stime) during the load and drain per 1,000 events"),
    );
}

/// Waits until no opt-in is outstanding at the Graph and `links` rows exist, or `limit`.
async fn wait_drained(
    graph: &TimedGraph,
    sql: &tokio_postgres::Client,
    links: u64,
    limit: Duration,
) -> anyhow::Result<bool> {
    let deadline = Instant::now() + limit;
    loop {
        let linked = count(sql, "SELECT count(*) FROM links").await?;
        if graph.outstanding() == 0 && linked >= i64::try_from(links).unwrap_or(i64::MAX) {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A `SELECT count(*) …` query's value.
pub async fn count(sql: &tokio_postgres::Client, query: &str) -> anyhow::Result<i64> {
    Ok(sql.query_one(query, &[]).await?.get(0))
}
