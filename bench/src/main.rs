//! `bench`: runs a benchmark suite in-process and reports its figures (see the crate docs of
//! `lc_bench` and BENCHMARKS.md).

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use lc_bench::report::Report;
use lc_bench::suites::{RunOptions, Suite, run_one};

/// Command line of the harness.
#[derive(Debug, Parser)]
#[command(
    name = "bench",
    about = "Measures loginconnect's stages against the ceiling of this machine (in-process; procs and soak run each service as its own process)."
)]
struct Args {
    /// Which suite to run.
    #[arg(value_enum)]
    suite: Suite,
    /// Small sizes and short windows: every suite finishes in under two minutes.
    #[arg(long)]
    quick: bool,
    /// Soak length in minutes (`soak`, and the soak of `all`): default 30, 3 with --quick.
    #[arg(long)]
    minutes: Option<f64>,
    /// Opt-ins per second of `procs` (default 500, the design load) and `soak` (default: half
    /// the capacity a short probe measures).
    #[arg(long)]
    rate: Option<f64>,
    /// Latency of the Graph stand-in of `procs` and `soak`, in milliseconds (default 100).
    #[arg(long = "graph-latency-ms")]
    graph_latency_ms: Option<u64>,
    /// Due opt-ins of `rss-drain` (default 100,000; 20,000 with --quick).
    #[arg(long)]
    rows: Option<usize>,
    /// Where `<suite>.json` is written.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if std::env::var_os("RUST_LOG").is_some() {
        // Off unless asked for: production logs one line per send, which is not what the
        // figures measure (see BENCHMARKS.md).
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let options = RunOptions {
        quick: args.quick,
        minutes: args.minutes,
        rate: args.rate,
        graph_latency_ms: args.graph_latency_ms,
        rows: args.rows,
    };
    let mut combined: Option<Report> = None;
    for suite in args.suite.expand() {
        let t = Instant::now();
        eprintln!(
            "running {} ({})…",
            suite.name(),
            if args.quick { "quick" } else { "full" }
        );
        let report = run_one(suite, &options).await?;
        print!("{}", report.render());
        println!(
            "{}_elapsed_s={:.1}",
            suite.name(),
            t.elapsed().as_secs_f64()
        );
        let path = report.write(&args.out)?;
        println!("written: {}", path.display());
        match combined.as_mut() {
            None => combined = Some(report),
            Some(all) => all.absorb(report),
        }
    }
    if args.suite == Suite::All
        && let Some(mut all) = combined
    {
        all.suite = "all".into();
        println!("== summary of all suites ==");
        for t in &all.targets {
            println!(
                "  [{}] {} — {} = {}",
                if t.met { "met" } else { "MISSED" },
                t.text,
                t.figure,
                lc_bench::report::format_value(t.measured)
            );
        }
        let path = all.write(&args.out)?;
        println!("written: {}", path.display());
    }
    println!("total_elapsed_s={:.1}", started.elapsed().as_secs_f64());
    Ok(())
}
