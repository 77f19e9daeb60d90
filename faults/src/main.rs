//! `faults`: the fault suite of loginconnect.
//!
//! Runs the real `ingest`, `scheduler` and `correlator` binaries as child processes (two
//! ingests, two schedulers, two correlators by default) against RabbitMQ (its own vhost) and
//! PostgreSQL (its own database) — by default a broker node and a database cluster the suite
//! starts itself from the local installations (see [`private`]), so that it may also stop the
//! broker and crash the database server — with the fake Graph API in this process so faults
//! can be scripted and every call read back. It posts a stream of signed opt-ins and replies
//! through ingest, injects faults meanwhile (see [`chaos`]), waits for the system to settle
//! and checks the books (see [`books`]). The last line is `N passed, N failed`; the exit
//! code is 0 only if every check passed.
//!
//! The scale-out mode (`--scale-out`, issue 13) runs three schedulers against 50 pages, one
//! of them carrying 80 % of the opt-ins, with a low `PAGE_RATE_LIMIT` so that page has a real
//! backlog, latency on every Graph call, every process's database connections through a
//! latency proxy (see [`dbproxy`]), and a page token replaced mid-run; the books then also
//! check each page's rate at Graph, the small pages' waits and the token's take-up.
//!
//! ```text
//! scripts/faults --short                # CI: 1,000 opt-ins, 300 replies, about 3 minutes
//! scripts/faults                        # full: 10,000 opt-ins, 3,000 replies
//! scripts/faults --services shared      # on the machine's broker and server (no restarts)
//! scripts/faults --scale-out --short    # scale-out: 2,000 opt-ins over 60 s
//! scripts/faults --scale-out            # scale-out: 5,000 opt-ins over 150 s
//! scripts/faults --cluster --short      # three RabbitMQ nodes, two of them killed (see [`cluster`])
//! scripts/faults --db-failover --short  # PostgreSQL primary killed, standby promoted
//! ```
//!
//! The database failover mode (`--db-failover`, issue 15): see [`failover`].

mod books;
mod chaos;
mod cluster;
mod dbproxy;
mod failover;
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

use chaos::{Chaos, ChaosConfig, Fault, PagesFile, SetTokenCli, Timeline, TokenFix};
use dbproxy::LatencyProxy;
use procs::{Fleet, FleetConfig};
use setup::Services;
use workload::{APP_SECRET, PageMix, Plan};

/// The schedulers' safety margin (the default); the books check calls against it.
const MARGIN_SECS: u64 = 120;
/// Settling gives up when no opt-in reached a terminal state for this long while some are
/// still open (nothing in the system legitimately waits that long: retries, throttles and
/// pauses last seconds).
const STALL: Duration = Duration::from_secs(90);
/// `PAGE_TOKEN_KEYS` of the schedulers and the CLI when tokens are set with `set-token` (a
/// key for this suite only).
const PAGE_TOKEN_KEYS: &str = "faults:xXOLj/xZQkNDWYNvfkJDPdN2gsKyVyba9Jow3QDLL4w=";
/// The faults of the classic mode, in the order the once-per-run ones are placed.
const CLASSIC_FAULTS: [&str; 8] = [
    "kill",
    "broker-close",
    "db-terminate",
    "rate-limit",
    "hang",
    "token",
    "broker-restart",
    "db-restart",
];
/// The faults of the scale-out mode. Left out by default: `rate-limit` (its code 4 answers
/// throttle every page of the app, and its page throttles hold pages back by design, which
/// would blur the small-page wait) and the two restarts (a stopped database stops every
/// page); `--faults` adds them back.
const SCALE_OUT_FAULTS: [&str; 6] = [
    "kill",
    "broker-close",
    "db-terminate",
    "hang",
    "token",
    "db-slow",
];

/// The faults of the database failover mode: the classic ones but the database restart
/// (the failover replaces it; the killed primary stays down).
const FAILOVER_FAULTS: [&str; 7] = [
    "kill",
    "broker-close",
    "db-terminate",
    "rate-limit",
    "hang",
    "token",
    "broker-restart",
];

/// Fault suite: real binaries, real broker and database, fake Graph; checks the books.
#[derive(Parser, Debug)]
#[command(name = "faults", version, about)]
struct Args {
    /// Directory holding the `ingest`, `scheduler`, `correlator` and `loginconnect` binaries.
    #[arg(long, env = "FAULTS_BIN_DIR", default_value = "target/debug")]
    bin_dir: PathBuf,
    /// The CI variant: fewer opt-ins and replies over 60 s (unless set below).
    #[arg(long)]
    short: bool,
    /// The scale-out mode (issue 13): three schedulers, 50 pages with one carrying 80 % of the
    /// opt-ins, PAGE_RATE_LIMIT 20, 200 ms Graph latency, the database behind a 3 ms latency
    /// proxy, a page token replaced mid-run; checks each page's rate at Graph, the small
    /// pages' waits and the token's take-up. Each of these can be changed below.
    #[arg(long)]
    scale_out: bool,
    /// The cluster mode (issue 15): three private RabbitMQ nodes joined into one cluster,
    /// every process given all three in AMQP_URL; under load, kill -9 of a node no ingest is
    /// connected to, later of the node ingest 1 is connected to, each started again after
    /// --node-down-secs. Replaces the fault loop (so not with --faults; the Graph errors
    /// stay); needs --services private.
    #[arg(long, conflicts_with_all = ["scale_out", "faults"])]
    cluster: bool,
    /// How long a killed broker node stays down in the cluster mode (seconds).
    #[arg(long, default_value_t = 10)]
    node_down_secs: u64,
    /// The database failover mode (issue 15): the private PostgreSQL gets a synchronous
    /// streaming standby; mid-load the primary's postmaster is killed (-9) and the standby
    /// promoted 3 s later; every process has both servers in DATABASE_URL
    /// (target_session_attrs=read-write). The token fault goes through `loginconnect pages
    /// set-token` (the CLI on the same URL) unless --token-fix says otherwise.
    #[arg(long, conflicts_with_all = ["scale_out", "cluster"])]
    db_failover: bool,
    /// With --db-failover: replicate ASYNCHRONOUSLY, the standby's WAL stream held this many
    /// ms per chunk by a proxy, to show what asynchronous replication loses (the books are
    /// expected to fail).
    #[arg(long, requires = "db_failover")]
    async_replication_lag_ms: Option<u64>,
    /// Opt-ins to post (default 10,000, 1,000 with --short; scale-out 5,000, 2,000 with
    /// --short).
    #[arg(long)]
    optins: Option<usize>,
    /// Replies to post (default 3,000, 300 with --short; scale-out 1,000, 300 with --short).
    #[arg(long)]
    replies: Option<usize>,
    /// Seconds over which the load is spread, faults injected meanwhile (default 240, 60 with
    /// --short; scale-out 150, 60 with --short).
    #[arg(long)]
    load_secs: Option<u64>,
    /// `private`: start a RabbitMQ node and a PostgreSQL cluster of the suite's own (from the
    /// local installations, on free ports; needs root or the services' users) and run every
    /// fault there, broker stop/start and database crash included. `shared`: use the
    /// machine's broker and server (TEST_AMQP_BASE, TEST_POSTGRES_BASE) with a vhost and a
    /// database of the suite's own, and leave out the two faults that would hit other users.
    #[arg(long, value_enum, default_value_t = ServicesMode::Private)]
    services: ServicesMode,
    /// Faults to inject (comma-separated), instead of the mode's set: kill, broker-close,
    /// db-terminate, rate-limit, hang, token, broker-restart, db-restart, db-slow (the last
    /// only with the database proxy). Default: all but db-slow; scale-out: kill,
    /// broker-close, db-terminate, hang, token, db-slow.
    #[arg(long, value_delimiter = ',')]
    faults: Option<Vec<String>>,
    /// Faults to leave out (comma-separated; also `graph-errors`).
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
    /// Scheduler processes (1 or more; default 2, scale-out 3).
    #[arg(long)]
    schedulers: Option<usize>,
    /// Pages of the scale-out mode (at least 2; the first one is the big page).
    #[arg(long, default_value_t = 50)]
    pages: usize,
    /// Share of the opt-ins the big page gets in the scale-out mode.
    #[arg(long, default_value_t = 0.8)]
    big_share: f64,
    /// The schedulers' PAGE_RATE_LIMIT (default: theirs, 250, and no rate check; scale-out
    /// 20). When set, the books check every page's calls per second at Graph against it.
    #[arg(long)]
    page_rate_limit: Option<u32>,
    /// Latency of every fake Graph answer, in ms (default 0; scale-out 200).
    #[arg(long)]
    graph_latency_ms: Option<u64>,
    /// Put every process's database connections through the suite's latency proxy with this
    /// delay per chunk each way, in ms (default: no proxy; scale-out 3; 0: no proxy).
    #[arg(long)]
    db_latency_ms: Option<u64>,
    /// How the token fault replaces the token: `file` (the pages file; with SIGHUP in the
    /// classic mode, noticed by content in scale-out), `set-token` (`loginconnect pages
    /// set-token --from-file`), or `seed` (one of the two by the seed). Default: file;
    /// scale-out: seed; --db-failover: set-token.
    #[arg(long, value_enum)]
    token_fix: Option<TokenFixArg>,
    /// Longest a small page's opt-in may wait for its first call (scale-out check), seconds.
    #[arg(long, default_value_t = 10)]
    small_wait_secs: u64,
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

/// `--token-fix`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum TokenFixArg {
    /// Rewrite the pages file.
    File,
    /// `loginconnect pages set-token --from-file`.
    SetToken,
    /// One of the two, by the seed.
    Seed,
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
    anyhow::ensure!(
        args.schedulers.is_none_or(|n| n >= 1),
        "--schedulers must be at least 1"
    );
    anyhow::ensure!(args.pages >= 2, "--pages must be at least 2");
    anyhow::ensure!(
        !args.cluster || args.services == ServicesMode::Private,
        "--cluster starts its own broker nodes: it needs --services private"
    );
    let broker_nodes = if args.cluster { cluster::NODES } else { 1 };
    let mut services = match Services::create(
        args.keep,
        args.services == ServicesMode::Private,
        broker_nodes,
    )
    .await
    {
        Ok(services) => services,
        Err(e) => {
            println!("FAIL cannot set up the suite's broker and database: {e:#}");
            println!("0 passed, 1 failed");
            std::process::exit(1);
        }
    };
    if args.db_failover
        && let Err(e) = services.add_standby(replication(&args)).await
    {
        println!("FAIL cannot set up the standby for --db-failover: {e:#}");
        println!("0 passed, 1 failed");
        services.remove().await;
        std::process::exit(1);
    }
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

/// What the flags and the mode make of a run.
struct Settings {
    seed: u64,
    optins: usize,
    replies: usize,
    load: Duration,
    schedulers: usize,
    mix: PageMix,
    enabled: Vec<Fault>,
    failure_rate: f64,
    page_rate_limit: Option<u32>,
    graph_latency: Duration,
    db_latency: Option<Duration>,
    token_page: String,
    token_fix: TokenFixArg,
}

impl Settings {
    fn resolve(args: &Args, services: &Services) -> anyhow::Result<Self> {
        let seed = args.seed.unwrap_or_else(|| {
            u64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() % 1_000_000_007)
                .unwrap_or(1)
        });
        let scale = args.scale_out;
        let pick = |classic: (u64, u64), scale_out: (u64, u64)| {
            let (full, short) = if scale { scale_out } else { classic };
            if args.short { short } else { full }
        };
        let optins = args
            .optins
            .unwrap_or(pick((10_000, 1_000), (5_000, 2_000)) as usize);
        let replies = args
            .replies
            .unwrap_or(pick((3_000, 300), (1_000, 300)) as usize);
        let load = Duration::from_secs(args.load_secs.unwrap_or(pick((240, 60), (150, 60))));
        let mix = if scale {
            PageMix::skewed(args.pages, args.big_share)
        } else {
            PageMix::classic()
        };
        let db_latency = args
            .db_latency_ms
            .or(scale.then_some(3))
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis);
        let skip = |name: &str| args.skip.iter().any(|s| s == name);
        for s in &args.skip {
            anyhow::ensure!(
                s == "graph-errors" || Fault::parse(s).is_some(),
                "unknown fault in --skip: {s}"
            );
        }
        let chosen: Vec<String> = match &args.faults {
            Some(list) => list.clone(),
            // The cluster mode's faults are its node kills (see `cluster`), not the loop's.
            None if args.cluster => Vec::new(),
            None if scale => SCALE_OUT_FAULTS.iter().map(|f| (*f).to_owned()).collect(),
            None if args.db_failover => FAILOVER_FAULTS.iter().map(|f| (*f).to_owned()).collect(),
            None => {
                let mut list: Vec<String> =
                    CLASSIC_FAULTS.iter().map(|f| (*f).to_owned()).collect();
                if db_latency.is_some() {
                    list.push("db-slow".into());
                }
                list
            }
        };
        let mut enabled = Vec::new();
        for name in chosen.iter().filter(|f| !skip(f)) {
            let fault =
                Fault::parse(name).with_context(|| format!("unknown fault in --faults: {name}"))?;
            let restart = matches!(fault, Fault::BrokerRestart | Fault::DbRestart);
            if restart && !services.is_private() {
                println!(
                    "faults: {} left out: the broker and server are shared (--services shared)",
                    fault.name()
                );
                continue;
            }
            if fault == Fault::DbSlow && db_latency.is_none() {
                println!("faults: db-slow left out: no database proxy (--db-latency-ms)");
                continue;
            }
            if !enabled.contains(&fault) {
                enabled.push(fault);
            }
        }
        let failure_rate = if skip("graph-errors") {
            0.0
        } else {
            args.failure_rate
        };
        let mut rng = fastrand::Rng::with_seed(seed ^ 0x70ce);
        // Scale-out: the big page's token dies, so its backlog meets the pause and the resume.
        let token_page = mix.big().unwrap_or(&mix.pages[1]).to_owned();
        let by_seed = if rng.bool() {
            TokenFixArg::SetToken
        } else {
            TokenFixArg::File
        };
        let token_fix = match args.token_fix {
            Some(TokenFixArg::Seed) => by_seed,
            Some(how) => how,
            None if scale => by_seed,
            None if args.db_failover => TokenFixArg::SetToken,
            None => TokenFixArg::File,
        };
        Ok(Self {
            seed,
            optins,
            replies,
            load,
            schedulers: args.schedulers.unwrap_or(if scale { 3 } else { 2 }),
            mix,
            enabled,
            failure_rate,
            page_rate_limit: args.page_rate_limit.or(scale.then_some(20)),
            graph_latency: Duration::from_millis(args.graph_latency_ms.unwrap_or(if scale {
                200
            } else {
                0
            })),
            db_latency,
            token_page,
            token_fix,
        })
    }
}

async fn run(args: &Args, services: &Services) -> anyhow::Result<(usize, usize)> {
    let st = Settings::resolve(args, services)?;
    let (seed, optins, replies, load) = (st.seed, st.optins, st.replies, st.load);
    println!(
        "faults: {}seed {seed}, {optins} opt-ins, {replies} replies over {}s, Graph transient failure rate {}, UNKNOWN_OUTCOME={}, faults: {}",
        if args.scale_out {
            "SCALE-OUT, "
        } else if args.cluster {
            "CLUSTER (node kills), "
        } else if args.db_failover {
            "DB-FAILOVER, "
        } else {
            ""
        },
        load.as_secs(),
        st.failure_rate,
        args.unknown_outcome,
        st.enabled
            .iter()
            .map(|f| f.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "faults: {} schedulers; {} pages{}; PAGE_RATE_LIMIT {}; Graph latency {:?}; database {}; token fault on page {} ({})",
        st.schedulers,
        st.mix.pages.len(),
        st.mix.big().map_or(String::new(), |big| format!(
            ", {big} with {:.0} % of the opt-ins",
            args.big_share * 100.0
        )),
        st.page_rate_limit
            .map_or("unset (250)".into(), |r| format!("{r}/s")),
        st.graph_latency,
        st.db_latency.map_or("direct".into(), |d| format!(
            "through the latency proxy, {d:?} per chunk each way"
        )),
        st.token_page,
        match st.token_fix {
            TokenFixArg::SetToken => "set-token",
            _ => "pages file",
        }
    );

    let run_dir = args.out_dir.join(&services.vhost);
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    let graph = FakeGraph::start().await;
    graph.set_latency(st.graph_latency);
    let mut pages = PagesFile {
        path: run_dir.join("pages.toml"),
        tokens: BTreeMap::new(),
        generation: 0,
    };
    for page in &st.mix.pages {
        let token = format!("faults-token-{page}-v1");
        graph.add_page(page, &token);
        pages.tokens.insert(page.clone(), token);
    }
    pages.write()?;
    let capture = services.declare_capture().await?;

    let proxy = match st.db_latency {
        Some(delay) => Some(LatencyProxy::start(services.database_addr()?, delay).await?),
        None => None,
    };
    let database_url = match &proxy {
        Some(p) => services.database_url_via(p.port())?,
        None => services.database_url(),
    };
    if proxy.is_some() {
        let direct = round_trip(&services.database_url()).await?;
        let via = round_trip(&database_url).await?;
        println!(
            "faults: database round trip (SELECT 1, median of 20): {:.1} ms direct, {:.1} ms through the proxy",
            direct.as_secs_f64() * 1000.0,
            via.as_secs_f64() * 1000.0
        );
    }
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
    let mut scheduler_env = env(&[
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
    ]);
    if let Some(rate) = st.page_rate_limit {
        scheduler_env.push(("PAGE_RATE_LIMIT".into(), rate.to_string()));
    }
    let token_fix = match st.token_fix {
        TokenFixArg::SetToken => {
            scheduler_env.push(("PAGE_TOKEN_KEYS".into(), PAGE_TOKEN_KEYS.into()));
            TokenFix::SetToken(SetTokenCli {
                program: bin_dir.join("loginconnect"),
                env: env(&[
                    ("AMQP_URL", services.amqp_url()),
                    ("DATABASE_URL", database_url.clone()),
                    ("PAGE_TOKEN_KEYS", PAGE_TOKEN_KEYS.into()),
                    ("RUST_LOG", "warn".into()),
                ]),
                token_file: run_dir.join("new-page-token.txt"),
            })
        }
        _ => TokenFix::File {
            sighup: !args.scale_out,
        },
    };
    let fleet_config = FleetConfig {
        bin_dir,
        log_dir: run_dir.clone(),
        common: env(&[
            ("AMQP_URL", services.amqp_url()),
            ("DATABASE_URL", database_url),
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
        scheduler: scheduler_env,
        correlator: Vec::new(),
    };
    let start = Instant::now();
    let run_start = OffsetDateTime::now_utc();
    let mut fleet = Fleet::start(fleet_config, args.ingests, st.schedulers).await?;
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
        &st.mix,
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

    graph.set_failure_rate(st.failure_rate);
    let poster = tokio::spawn(workload::post_all(
        plan.clone(),
        fleet.ingest_urls(),
        load,
        16,
        Duration::from_secs(90),
    ));
    let mut timeline = Timeline::new(start);
    let chaos_config = ChaosConfig {
        enabled: st.enabled.clone(),
        gap: if args.short {
            (Duration::from_secs(2), Duration::from_secs(5))
        } else {
            (Duration::from_secs(3), Duration::from_secs(8))
        },
        hang: Duration::from_secs(3),
        load,
        token_page: st.token_page.clone(),
        token_fix,
        db_latency: st.db_latency.unwrap_or_default(),
        db_fast_for: Duration::from_secs(10),
    };
    let mut cluster_record = None;
    let mut failover_record = None;
    if args.cluster {
        let load_end = Instant::now() + load + Duration::from_secs(10);
        let faults = cluster::NodeFaults {
            services,
            log_dir: run_dir.clone(),
            timeline: &mut timeline,
            load,
            down_for: Duration::from_secs(args.node_down_secs),
        };
        cluster_record = Some(faults.run().await);
        tokio::time::sleep_until(load_end.into()).await;
        fleet.reap_unexpected(pages.generation)?;
    } else {
        let mut chaos = Chaos {
            fleet: &mut fleet,
            services,
            graph: &graph,
            pages: &mut pages,
            proxy: proxy.as_ref(),
            timeline: &mut timeline,
            rng: fastrand::Rng::with_seed(seed ^ 0x5eed),
        };
        // Faults go on for the whole load and a little after it.
        let load_end = tokio::time::Instant::now() + load + Duration::from_secs(10);
        // Beside the loop, not in it: the loop stays as it is for the other modes.
        let failing_over = services.failover_pair().map(|(primary, standby)| {
            tokio::spawn(failover::fail_over(
                primary.clone(),
                standby.clone(),
                replication(args),
                start,
                load.mul_f64(failover::AT_SHARE),
            ))
        });
        chaos
            .run(&chaos_config, tokio::time::sleep_until(load_end))
            .await?;
        failover_record = match failing_over {
            Some(task) => Some(task.await.context("the failover task failed")?),
            None => None,
        };
    }
    if let Some(record) = &failover_record {
        *timeline.counts.entry("db-failover").or_default() += 1;
        timeline.entries.extend(record.notes.iter().cloned());
        timeline.entries.sort_by(|a, b| a.0.total_cmp(&b.0));
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
    let slots_missed = fleet
        .metric_sum(procs::Role::Scheduler, "scheduler_slots_missed_total")
        .await;
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
        page_rate_limit: st.page_rate_limit,
        big_page: st.mix.big(),
        known_pages: &st.mix.pages,
        small_wait_bound: time::Duration::seconds(
            i64::try_from(args.small_wait_secs).unwrap_or(10),
        ),
        slots_missed,
    };
    let (mut checks, mut counts) = books::check(&ctx, &snapshot);
    if let Some(record) = &cluster_record {
        let failures: Vec<Instant> = posted.failures.iter().map(|t| t.into_std()).collect();
        let (more, figures) = books::cluster::cluster_checks(record, &failures);
        checks.extend(more);
        counts.extend(figures);
    }
    if let Some(record) = &failover_record {
        let writes = failover::Writes::load(&sql, record).await?;
        checks.push(failover::check(record, &writes, replication(args)));
    }
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

/// The standby's replication in the `--db-failover` mode.
fn replication(args: &Args) -> failover::Replication {
    match args.async_replication_lag_ms {
        Some(ms) => failover::Replication::AsyncLagging(Duration::from_millis(ms)),
        None => failover::Replication::Sync,
    }
}

/// The median time of 20 `SELECT 1` on a connection to `url`.
async fn round_trip(url: &str) -> anyhow::Result<Duration> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    let task = tokio::spawn(conn);
    let mut times = Vec::with_capacity(20);
    for _ in 0..20 {
        let started = Instant::now();
        client.simple_query("SELECT 1").await?;
        times.push(started.elapsed());
    }
    drop(client);
    task.abort();
    times.sort();
    Ok(times[times.len() / 2])
}

/// Waits until no opt-in is pending or sending, every outbox row is published and both work
/// queues are empty, three polls in a row (or `timeout` passes, or no opt-in reached a
/// terminal state for [`STALL`] while some are still open: the system is stuck, and the books
/// will say where).
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
    let mut finished = (-1i64, Instant::now());
    while Instant::now() < deadline {
        fleet.reap_unexpected(generation)?;
        let open = match services.sql().await {
            Ok(sql) => sql
                .query_one(
                    "SELECT (SELECT count(*) FROM optins WHERE state IN ('pending', 'sending')), \
                            (SELECT count(*) FROM outbox WHERE published_at IS NULL), \
                            (SELECT count(*) FROM optins WHERE state NOT IN ('pending', 'sending'))",
                    &[],
                )
                .await
                .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1), r.get::<_, i64>(2)))
                .ok(),
            Err(_) => None,
        };
        let depths = services.queue_depths().unwrap_or_default();
        let queued = ["scheduler.optins", "correlator.replies"]
            .iter()
            .map(|q| depths.get(*q).copied().unwrap_or(0))
            .sum::<u64>();
        match open {
            Some((0, 0, _)) if queued == 0 => calm += 1,
            _ => calm = 0,
        }
        if calm >= 3 {
            timeline.note("settled".into());
            return Ok(());
        }
        if let Some((unfinished, _, done)) = open {
            if done != finished.0 {
                finished = (done, Instant::now());
            } else if unfinished > 0 && finished.1.elapsed() >= STALL {
                timeline.note(format!(
                    "stuck: {unfinished} opt-ins pending/sending and none finished for {STALL:?}; checking the books"
                ));
                return Ok(());
            }
        }
        if last_report.elapsed() >= Duration::from_secs(15) {
            last_report = Instant::now();
            let (unfinished, unpublished, _) = open.unwrap_or((-1, -1, -1));
            timeline.note(format!("settling: {unfinished} opt-ins pending/sending, {unpublished} events unpublished, {queued} messages queued"));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    timeline.note(format!(
        "did not settle within {timeout:?}; checking the books anyway"
    ));
    Ok(())
}
