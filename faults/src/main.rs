//! `faults`: the fault suite of loginconnect.
//!
//! Runs the real `ingest`, `scheduler` and `correlator` binaries as child processes (two
//! schedulers, two correlators, two ingests) against RabbitMQ (its own vhost) and PostgreSQL
//! (its own database) — by default a broker node and a database cluster the suite starts
//! itself from the local installations (see [`private`]), so that it may also stop the
//! broker and crash the database server — with the fake Graph API in this process so faults can be
//! scripted and every call read back. It posts a stream of signed opt-ins and replies
//! through ingest, injects faults meanwhile (see [`chaos`]), waits for the system to settle
//! and checks the books (see [`books`]). The last line is `N passed, N failed`; the exit
//! code is 0 only if every check passed.
//!
//! ```text
//! scripts/faults --short             # CI: 1,000 opt-ins, 300 replies, about 3 minutes
//! scripts/faults                     # full: 10,000 opt-ins, 3,000 replies
//! scripts/faults --services shared   # on the machine's broker and server (no restarts)
//! ```

mod books;
mod chaos;
mod private;
mod procs;
mod setup;
mod workload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use lc_testkit::fake_graph::FakeGraph;
use time::OffsetDateTime;

use chaos::{Chaos, ChaosConfig, Fault, PagesFile, Timeline};
use procs::{Fleet, FleetConfig};
use setup::Services;
use workload::{APP_SECRET, PAGES, Plan};

/// The schedulers' safety margin (the default); the books check calls against it.
const MARGIN_SECS: u64 = 120;

/// Fault suite: real binaries, real broker and database, fake Graph; checks the books.
#[derive(Parser, Debug)]
#[command(name = "faults", version, about)]
struct Args {
    /// Directory holding the `ingest`, `scheduler` and `correlator` binaries.
    #[arg(long, env = "FAULTS_BIN_DIR", default_value = "target/debug")]
    bin_dir: PathBuf,
    /// The CI variant: 1,000 opt-ins and 300 replies over 60 s (unless set below).
    #[arg(long)]
    short: bool,
    /// Opt-ins to post (default 10,000; 1,000 with --short).
    #[arg(long)]
    optins: Option<usize>,
    /// Replies to post (default 3,000; 300 with --short).
    #[arg(long)]
    replies: Option<usize>,
    /// Seconds over which the load is spread, faults injected meanwhile (default 240; 60
    /// with --short).
    #[arg(long)]
    load_secs: Option<u64>,
    /// `private`: start a RabbitMQ node and a PostgreSQL cluster of the suite's own (from the
    /// local installations, on free ports; needs root or the services' users) and run every
    /// fault there, broker stop/start and database crash included. `shared`: use the
    /// machine's broker and server (TEST_AMQP_BASE, TEST_POSTGRES_BASE) with a vhost and a
    /// database of the suite's own, and leave out the two faults that would hit other users.
    #[arg(long, value_enum, default_value_t = ServicesMode::Private)]
    services: ServicesMode,
    /// Faults to leave out (comma-separated): kill, broker-close, db-terminate, rate-limit,
    /// hang, token, broker-restart, db-restart, graph-errors.
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    /// Share of Send API calls failing transiently during the load.
    #[arg(long, default_value_t = 0.3)]
    failure_rate: f64,
    /// The schedulers' UNKNOWN_OUTCOME (`fail` or `retry`).
    #[arg(long, default_value = "fail")]
    unknown_outcome: String,
    /// Ingest processes (1 or more).
    #[arg(long, default_value_t = 2)]
    ingests: usize,
    /// Longest wait for the system to settle after the load (seconds).
    #[arg(long, default_value_t = 600)]
    settle_secs: u64,
    /// Seed of every random choice (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Where the processes' logs go (a folder per run).
    #[arg(long, default_value = "target/faults-runs")]
    out_dir: PathBuf,
    /// Keep the vhost and the database after the run.
    #[arg(long)]
    keep: bool,
}

/// Where the suite's broker and database run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ServicesMode {
    /// A broker node and a database cluster of the suite's own.
    Private,
    /// The machine's broker and server (own vhost and database).
    Shared,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The fake Graph logs every call at info; the suite prints its own report.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    anyhow::ensure!(
        matches!(args.unknown_outcome.as_str(), "fail" | "retry"),
        "--unknown-outcome must be fail or retry"
    );
    anyhow::ensure!(args.ingests >= 1, "--ingests must be at least 1");
    let mut services =
        match Services::create(args.keep, args.services == ServicesMode::Private).await {
            Ok(services) => services,
            Err(e) => {
                println!("FAIL cannot set up the suite's broker and database: {e:#}");
                println!("0 passed, 1 failed");
                std::process::exit(1);
            }
        };
    println!(
        "faults: vhost {} and database {} on {}",
        services.vhost,
        services.database,
        services.describe()
    );
    let result = run(&args, &services).await;
    services.remove().await;
    let (passed, failed) = match result {
        Ok(counts) => counts,
        Err(e) => {
            println!("FAIL the suite could not run: {e:#}");
            (0, 1)
        }
    };
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

async fn run(args: &Args, services: &Services) -> anyhow::Result<(usize, usize)> {
    let seed = args.seed.unwrap_or_else(|| {
        u64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() % 1_000_000_007).unwrap_or(1)
    });
    let optins = args
        .optins
        .unwrap_or(if args.short { 1_000 } else { 10_000 });
    let replies = args.replies.unwrap_or(if args.short { 300 } else { 3_000 });
    let load = Duration::from_secs(args.load_secs.unwrap_or(if args.short { 60 } else { 240 }));
    let skip = |name: &str| args.skip.iter().any(|s| s == name);
    let enabled: Vec<Fault> = [
        "kill",
        "broker-close",
        "db-terminate",
        "rate-limit",
        "hang",
        "token",
        "broker-restart",
        "db-restart",
    ]
    .into_iter()
    .filter(|f| !skip(f))
    .filter_map(Fault::parse)
    .filter(|f| {
        let restart = matches!(f, Fault::BrokerRestart | Fault::DbRestart);
        if restart && !services.is_private() {
            println!(
                "faults: {} left out: the broker and server are shared (--services shared)",
                f.name()
            );
        }
        !restart || services.is_private()
    })
    .collect();
    for s in &args.skip {
        anyhow::ensure!(
            s == "graph-errors" || Fault::parse(s).is_some(),
            "unknown fault in --skip: {s}"
        );
    }
    let failure_rate = if skip("graph-errors") {
        0.0
    } else {
        args.failure_rate
    };
    println!(
        "faults: seed {seed}, {optins} opt-ins, {replies} replies over {}s, Graph transient failure rate {failure_rate}, UNKNOWN_OUTCOME={}, faults: {}",
        load.as_secs(),
        args.unknown_outcome,
        enabled
            .iter()
            .map(|f| f.name())
            .collect::<Vec<_>>()
            .join(", ")
    );

    let run_dir = args.out_dir.join(&services.vhost);
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    let graph = FakeGraph::start().await;
    let mut pages = PagesFile {
        path: run_dir.join("pages.toml"),
        tokens: BTreeMap::new(),
        generation: 0,
    };
    for page in PAGES {
        let token = format!("faults-token-{page}-v1");
        graph.add_page(page, &token);
        pages.tokens.insert(page.to_owned(), token);
    }
    pages.write()?;
    let capture = services.declare_capture().await?;

    let bin_dir = std::fs::canonicalize(&args.bin_dir).with_context(|| {
        format!(
            "no binaries at {} (build them first)",
            args.bin_dir.display()
        )
    })?;
    let env = |pairs: &[(&str, String)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    };
    let fleet_config = FleetConfig {
        bin_dir,
        log_dir: run_dir.clone(),
        common: env(&[
            ("AMQP_URL", services.amqp_url()),
            ("DATABASE_URL", services.database_url()),
            ("DATABASE_POOL_SIZE", "4".into()),
            ("RUST_LOG", "info".into()),
            ("LOG_FORMAT", "text".into()),
            ("OUTBOX_RETENTION_HOURS", "0".into()),
            ("RELAY_POLL_MS", "500".into()),
        ]),
        ingest: env(&[
            ("META_APP_SECRETS", APP_SECRET.into()),
            ("META_VERIFY_TOKEN", "faults-verify-token".into()),
            ("INGEST_CONFIRM_TIMEOUT_MS", "2000".into()),
        ]),
        scheduler: env(&[
            ("PAGES_FILE", pages.path.display().to_string()),
            ("GRAPH_API_URL", graph.base_url()),
            ("GRAPH_TIMEOUT_MS", "1000".into()),
            ("LEASE_SECS", "5".into()),
            ("SCHEDULER_POLL_MS", "250".into()),
            ("RETRY_BASE_MS", "200".into()),
            ("RETRY_CAP_SECS", "3".into()),
            ("SAFETY_MARGIN_SECS", MARGIN_SECS.to_string()),
            ("MAX_IN_FLIGHT_SENDS", "64".into()),
            ("UNKNOWN_OUTCOME", args.unknown_outcome.clone()),
        ]),
        correlator: Vec::new(),
    };
    let start = Instant::now();
    let run_start = OffsetDateTime::now_utc();
    let mut fleet = Fleet::start(fleet_config, args.ingests).await?;
    println!(
        "faults: {} processes ready in {:.1}s; logs in {}",
        fleet.procs.len(),
        start.elapsed().as_secs_f64(),
        run_dir.display()
    );

    let mut rng = fastrand::Rng::with_seed(seed);
    let start_ms = i64::try_from(run_start.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
    let plan = Arc::new(Plan::build(
        &mut rng,
        optins,
        replies,
        start_ms,
        load,
        i64::try_from(MARGIN_SECS * 1000).unwrap_or(0),
    ));
    println!(
        "faults: {} deliveries planned; load and faults start",
        plan.deliveries.len()
    );

    graph.set_failure_rate(failure_rate);
    let poster = tokio::spawn(workload::post_all(
        plan.clone(),
        fleet.ingest_urls(),
        load,
        16,
        Duration::from_secs(90),
    ));
    let mut timeline = Timeline::new(start);
    let chaos_config = ChaosConfig {
        enabled,
        gap: if args.short {
            (Duration::from_secs(2), Duration::from_secs(5))
        } else {
            (Duration::from_secs(3), Duration::from_secs(8))
        },
        hang: Duration::from_secs(3),
        load,
    };
    {
        let mut chaos = Chaos {
            fleet: &mut fleet,
            services,
            graph: &graph,
            pages: &mut pages,
            timeline: &mut timeline,
            rng: fastrand::Rng::with_seed(seed ^ 0x5eed),
        };
        // Faults go on for the whole load and a little after it.
        let load_end = tokio::time::Instant::now() + load + Duration::from_secs(10);
        chaos
            .run(&chaos_config, tokio::time::sleep_until(load_end))
            .await?;
    }
    let posted = poster.await.context("the load task failed")?;
    graph.set_failure_rate(0.0);
    timeline.note(format!(
        "load done ({} of {} deliveries answered 200); faults off; settling",
        posted.acked.iter().filter(|a| **a).count(),
        posted.acked.len()
    ));

    settle(
        services,
        &mut fleet,
        pages.generation,
        Duration::from_secs(args.settle_secs),
        &mut timeline,
    )
    .await?;

    let captured = services.drain(&capture).await?;
    let depths = services.queue_depths()?;
    let sql = services.sql().await?;
    let snapshot = books::Snapshot::load(&sql, captured, graph.calls(), depths).await?;
    fleet.stop(Duration::from_secs(20)).await;
    let ctx = books::Context {
        plan: &plan,
        posted: &posted,
        timeline: &timeline,
        run_start,
        margin: time::Duration::seconds(i64::try_from(MARGIN_SECS).unwrap_or(120)),
        tolerance: time::Duration::seconds(1),
        retry_policy: args.unknown_outcome == "retry",
        unexpected_exits: &fleet.unexpected_exits,
    };
    let (checks, counts) = books::check(&ctx, &snapshot);
    println!("\n== counts");
    for line in &counts {
        println!("{line}");
    }
    println!("\n== books (after {:.0}s)", start.elapsed().as_secs_f64());
    for c in &checks {
        c.print();
    }
    let failed = checks.iter().filter(|c| !c.problems.is_empty()).count();
    Ok((checks.len() - failed, failed))
}

/// Waits until no opt-in is pending or sending, every outbox row is published and both work
/// queues are empty, three polls in a row (or `timeout` passes).
async fn settle(
    services: &Services,
    fleet: &mut Fleet,
    generation: u64,
    timeout: Duration,
    timeline: &mut Timeline,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut calm = 0;
    let mut last_report = Instant::now();
    while Instant::now() < deadline {
        fleet.reap_unexpected(generation)?;
        let open = match services.sql().await {
            Ok(sql) => sql
                .query_one(
                    "SELECT (SELECT count(*) FROM optins WHERE state IN ('pending', 'sending')), \
                            (SELECT count(*) FROM outbox WHERE published_at IS NULL)",
                    &[],
                )
                .await
                .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)))
                .ok(),
            Err(_) => None,
        };
        let depths = services.queue_depths().unwrap_or_default();
        let queued = ["scheduler.optins", "correlator.replies"]
            .iter()
            .map(|q| depths.get(*q).copied().unwrap_or(0))
            .sum::<u64>();
        match open {
            Some((0, 0)) if queued == 0 => calm += 1,
            _ => calm = 0,
        }
        if calm >= 3 {
            timeline.note("settled".into());
            return Ok(());
        }
        if last_report.elapsed() >= Duration::from_secs(15) {
            last_report = Instant::now();
            let (unfinished, unpublished) = open.unwrap_or((-1, -1));
            timeline.note(format!("settling: {unfinished} opt-ins pending/sending, {unpublished} events unpublished, {queued} messages queued"));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    timeline.note(format!(
        "did not settle within {timeout:?}; checking the books anyway"
    ));
    Ok(())
}
