//! `dead-letters list|replay`: what failed, why, and putting it back after a fix. The work is
//! [`crate::operate::dead_letters`] (the admin API and the console call the same); this file
//! only prints.

use std::io::Write;

use lc_shared::config::AmqpArgs;

use super::CliError;
use crate::operate::dead_letters as dl;

/// The connection name the broker's UI shows for the CLI.
const CLIENT: &str = "loginconnect-cli";

fn endpoint(amqp: &AmqpArgs) -> Result<lc_shared::amqp::AmqpEndpoint, CliError> {
    Ok(amqp.endpoint().map_err(lc_shared::amqp::AmqpError::from)?)
}

/// Lists messages without removing them.
pub async fn list(
    out: &mut dyn Write,
    amqp: &AmqpArgs,
    queue: Option<&str>,
    limit: usize,
) -> Result<(), CliError> {
    if let Some(q) = queue {
        dl::known_queue(q)?;
    }
    for listing in dl::list(&endpoint(amqp)?, CLIENT, queue, limit).await? {
        writeln!(out, "== {}", listing.queue)?;
        for m in &listing.messages {
            writeln!(
                out,
                "- id={} reason={} origin={} key={}\n  {}",
                m.message_id.as_deref().unwrap_or("-"),
                m.reason.as_deref().unwrap_or("-"),
                m.origin_queue.as_deref().unwrap_or("-"),
                m.routing_key,
                m.preview
            )?;
        }
        if listing.messages.is_empty() {
            writeln!(out, "  (empty)")?;
        }
    }
    Ok(())
}

/// Replays up to `limit` messages of `queue`.
pub async fn replay(
    out: &mut dyn Write,
    amqp: &AmqpArgs,
    queue: &str,
    limit: usize,
) -> Result<(), CliError> {
    dl::known_queue(queue)?;
    let report = dl::replay(&endpoint(amqp)?, CLIENT, queue, limit).await?;
    for note in &report.notes {
        writeln!(out, "{note}")?;
    }
    writeln!(out, "replayed {}, kept {}", report.replayed, report.kept)?;
    Ok(())
}
