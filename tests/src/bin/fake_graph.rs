//! `fake-graph`: runs the fake Graph API on its own, for the local demo.
//!
//! ```text
//! fake-graph --addr 127.0.0.1:8089 --page 1234567890=dev-token --latency-ms 50
//! GRAPH_API_URL=$(printed base URL) cargo run --bin scheduler
//! ```
//!
//! Logs every call (never a token) and exits on Ctrl-C.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use lc_testkit::fake_graph::FakeGraph;
use tracing_subscriber::EnvFilter;

/// Fake Graph API for local runs of loginconnect.
#[derive(Parser)]
#[command(name = "fake-graph", version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "FAKE_GRAPH_ADDR", default_value = "127.0.0.1:8089")]
    addr: SocketAddr,
    /// A page and its valid token as ID=TOKEN; repeat the flag (or comma-separate in the
    /// environment variable) for more pages.
    // Parsed by hand after clap: clap would echo a malformed value (maybe a token) in its
    // error, and `hide_env_values` keeps tokens out of `--help`.
    #[arg(
        long = "page",
        value_name = "ID=TOKEN",
        env = "FAKE_GRAPH_PAGES",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pages: Vec<String>,
    /// Delay added to every answer, in milliseconds.
    #[arg(long, env = "FAKE_GRAPH_LATENCY_MS", default_value_t = 0)]
    latency_ms: u64,
}

/// `ID=TOKEN` → (id, token); the error never contains the token.
fn parse_page(arg: &str, position: usize) -> anyhow::Result<(String, String)> {
    let Some((id, token)) = arg.trim().split_once('=') else {
        bail!("--page #{position}: expected ID=TOKEN (value not shown, it may be a token)");
    };
    let id = id.trim();
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        bail!("--page #{position}: the page ID before '=' must be digits");
    }
    if token.trim().is_empty() {
        bail!("--page {id}: the token after '=' is empty");
    }
    Ok((id.to_owned(), token.trim().to_owned()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Logs on stderr: stdout carries only the base URL, for scripts to capture.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let pages = args
        .pages
        .iter()
        .filter(|p| !p.trim().is_empty())
        .enumerate()
        .map(|(i, p)| parse_page(p, i + 1))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let fake = FakeGraph::start_on(args.addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.addr))?;
    for (id, token) in &pages {
        fake.add_page(id, token);
    }
    fake.set_latency(Duration::from_millis(args.latency_ms));
    let ids: Vec<&str> = pages.iter().map(|(id, _)| id.as_str()).collect();
    tracing::info!(
        base_url = %fake.base_url(),
        pages = ?ids,
        latency_ms = args.latency_ms,
        "fake Graph API listening"
    );
    if pages.is_empty() {
        tracing::warn!("no --page given: every call will be rejected with code 190");
    }
    println!("{}", fake.base_url());

    tokio::signal::ctrl_c()
        .await
        .context("cannot listen for Ctrl-C")?;
    tracing::info!("Ctrl-C: stopping");
    Ok(())
}
