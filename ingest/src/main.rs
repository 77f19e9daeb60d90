//! The `ingest` binary: parses configuration and runs [`lc_ingest::run`].

use clap::Parser;
use lc_ingest::IngestConfig;
use lc_shared::shutdown::Shutdown;

fn main() -> anyhow::Result<()> {
    let config = IngestConfig::parse();
    let telemetry = lc_shared::telemetry::init("ingest", config.log.log_format);
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(async { lc_ingest::run(config, Shutdown::on_signals()).await });
    drop(runtime);
    // Flushing blocks, so it runs after the runtime is gone.
    telemetry.shutdown();
    Ok(result?)
}
