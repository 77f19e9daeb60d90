//! The `ingest` binary: parses configuration and runs [`lc_ingest::run`].

use clap::Parser;
use lc_ingest::IngestConfig;
use lc_shared::shutdown::Shutdown;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = IngestConfig::parse();
    lc_shared::telemetry::init_logging(config.log.log_format);
    lc_ingest::run(config, Shutdown::on_signals()).await?;
    Ok(())
}
