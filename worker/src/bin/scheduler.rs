//! The `scheduler` binary: parses configuration and runs [`lc_worker::scheduler::run`].

use clap::Parser;
use lc_shared::shutdown::Shutdown;
use lc_worker::scheduler::SchedulerConfig;

fn main() -> anyhow::Result<()> {
    let config = SchedulerConfig::parse();
    let telemetry = lc_shared::telemetry::init("scheduler", config.worker.log.log_format);
    let runtime = tokio::runtime::Runtime::new()?;
    let result =
        runtime.block_on(async { lc_worker::scheduler::run(config, Shutdown::on_signals()).await });
    drop(runtime);
    // Flushing blocks, so it runs after the runtime is gone.
    telemetry.shutdown();
    Ok(result?)
}
