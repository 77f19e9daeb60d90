//! The `correlator` binary: parses configuration and runs [`lc_worker::correlator::run`].

use clap::Parser;
use lc_shared::shutdown::Shutdown;
use lc_worker::correlator::CorrelatorConfig;

fn main() -> anyhow::Result<()> {
    let config = CorrelatorConfig::parse();
    let telemetry = lc_shared::telemetry::init("correlator", config.worker.log.log_format);
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime
        .block_on(async { lc_worker::correlator::run(config, Shutdown::on_signals()).await });
    drop(runtime);
    // Flushing spans blocks, so it runs after the runtime is gone.
    telemetry.shutdown();
    Ok(result?)
}
