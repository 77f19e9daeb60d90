//! The `scheduler` binary: parses configuration and runs [`lc_worker::scheduler::run`].

use clap::Parser;
use lc_shared::shutdown::Shutdown;
use lc_worker::scheduler::SchedulerConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = SchedulerConfig::parse();
    lc_shared::telemetry::init_logging(config.worker.log.log_format);
    lc_worker::scheduler::run(config, Shutdown::on_signals()).await?;
    Ok(())
}
