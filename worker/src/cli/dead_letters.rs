//! `dead-letters list|replay`: what failed, why, and putting it back after a fix.

use std::io::Write;

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
use lc_meta::webhook;
use lc_shared::amqp::{self, header_str};
use lc_shared::config::AmqpArgs;
use lc_shared::outgoing;
use lc_shared::telemetry::TraceParent;
use lc_shared::topology;

use super::CliError;

fn known_queue(q: &str) -> Result<(), CliError> {
    if topology::inspectable_queues().iter().any(|k| k == q) {
        Ok(())
    } else {
        Err(CliError::Other(format!(
            "unknown queue {q}; choose one of: {}",
            topology::inspectable_queues().join(", ")
        )))
    }
}

fn preview(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    let mut s: String = text.chars().take(160).collect();
    if text.chars().count() > 160 {
        s.push('…');
    }
    s
}

/// Lists messages without removing them: they are fetched unacknowledged and returned to the
/// queue when the channel closes.
pub async fn list(
    out: &mut dyn Write,
    amqp: &AmqpArgs,
    queue: Option<&str>,
    limit: usize,
) -> Result<(), CliError> {
    let queues: Vec<String> = match queue {
        Some(q) => {
            known_queue(q)?;
            vec![q.to_owned()]
        }
        None => topology::inspectable_queues(),
    };
    let conn = amqp::connect(
        amqp.endpoint().map_err(lc_shared::amqp::AmqpError::from)?,
        "loginconnect-cli",
    )
    .await?;
    for q in queues {
        let ch = conn.create_channel().await?;
        let mut shown = 0;
        writeln!(out, "== {q}")?;
        while shown < limit {
            let Some(msg) = ch
                .basic_get(q.as_str().into(), BasicGetOptions { no_ack: false })
                .await?
            else {
                break;
            };
            let d = &msg.delivery;
            shown += 1;
            writeln!(
                out,
                "- id={} reason={} origin={} key={}\n  {}",
                d.properties
                    .message_id()
                    .as_ref()
                    .map_or("-".to_owned(), |m| m.to_string()),
                header_str(&d.properties, topology::ERROR_HEADER).unwrap_or_else(|| "-".into()),
                header_str(&d.properties, topology::ORIGIN_QUEUE_HEADER)
                    .unwrap_or_else(|| "-".into()),
                header_str(&d.properties, "x-loginconnect-original-routing-key")
                    .unwrap_or_else(|| d.routing_key.to_string()),
                preview(&d.data)
            )?;
        }
        if shown == 0 {
            writeln!(out, "  (empty)")?;
        }
        // Closing the channel returns every unacked message to the queue, in order.
        ch.close(200, "listed".into()).await?;
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

/// Replays messages: dead letters go back onto their work queue; unparsed bodies are parsed
/// again and their events published to `messenger.webhook`. Each original is acked
/// only after the broker confirmed its replacement; what still cannot be replayed stays.
pub async fn replay(
    out: &mut dyn Write,
    amqp: &AmqpArgs,
    queue: &str,
    limit: usize,
) -> Result<(), CliError> {
    known_queue(queue)?;
    let conn = amqp::connect(
        amqp.endpoint().map_err(lc_shared::amqp::AmqpError::from)?,
        "loginconnect-cli",
    )
    .await?;
    let get_ch = conn.create_channel().await?;
    let pub_ch = amqp::confirm_channel(&conn).await?;
    topology::declare(&pub_ch).await?;
    let (mut replayed, mut kept) = (0usize, 0usize);
    for _ in 0..limit {
        let Some(msg) = get_ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        let d = msg.delivery;
        let outgoing = if queue == topology::UNPARSED_QUEUE {
            // The very messages ingest would have published for this body (same ids, type
            // and source headers), on a new trace since the original request is long gone.
            let traceparent = TraceParent::new_root().to_string();
            let built = webhook::parse_delivery(&d.data)
                .map_err(|e| e.to_string())
                .and_then(|events| {
                    events
                        .iter()
                        .map(|e| outgoing::event_message(e, &traceparent))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| format!("cannot encode an event: {e}"))
                });
            match built {
                Ok(messages) => messages
                    .into_iter()
                    .map(|m| (m.exchange.to_owned(), m.routing_key, m.body, m.properties))
                    .collect(),
                Err(e) => {
                    writeln!(out, "still does not parse, kept: {e}")?;
                    kept += 1;
                    keep(&d.acker).await?;
                    continue;
                }
            }
        } else {
            // Straight back onto the work queue through the default exchange: right for every
            // work queue, and for messages the broker dead-lettered itself (delivery limit),
            // which carry the dead-letter routing key rather than the original one.
            let origin = topology::work_queue_of(queue).unwrap_or(queue).to_owned();
            vec![(String::new(), origin, d.data.clone(), d.properties.clone())]
        };
        let mut ok = true;
        for (exchange, key, body, props) in outgoing {
            let confirm = amqp::publish(&pub_ch, &exchange, &key, true, &body, props).await?;
            if let Err(e) = amqp::await_confirm(confirm, std::time::Duration::from_secs(5)).await {
                writeln!(out, "replay of one message failed, kept: {e}")?;
                ok = false;
                break;
            }
        }
        if ok {
            d.acker.ack(BasicAckOptions::default()).await?;
            replayed += 1;
        } else {
            kept += 1;
            keep(&d.acker).await?;
        }
    }
    let _ = conn.close(200, "done".into()).await;
    writeln!(out, "replayed {replayed}, kept {kept}")?;
    Ok(())
}

/// Puts a message back on its queue untouched (it stays for a later replay).
async fn keep(acker: &lapin::Acker) -> Result<(), lapin::Error> {
    acker
        .nack(BasicNackOptions {
            requeue: true,
            multiple: false,
        })
        .await
        .map(drop)
}
