//! The `loginconnect` operator CLI: parses arguments and runs [`lc_worker::cli::run`].

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = lc_worker::cli::Cli::parse();
    lc_shared::telemetry::init_logging(lc_shared::telemetry::LogFormat::Text);
    lc_worker::cli::run(cli, &mut std::io::stdout()).await?;
    Ok(())
}
