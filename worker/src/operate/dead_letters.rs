//! The dead-letter queues (`*.dlq`) and `messenger.unparsed`: listed without removing
//! anything, and replayed after a fix — a whole queue up to a limit, or one message by its
//! `message_id`. The CLI (`loginconnect dead-letters`), the admin API and the console call
//! these.
//!
//! Listing fetches messages unacknowledged and closes the channel, which returns them to the
//! queue in order. Replaying puts a dead letter straight back on its work queue; an unparsed
//! body is parsed again and its events published to `messenger.webhook` — each original
//! acked only after the broker confirmed its replacement, so what cannot be replayed stays.

use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use lc_meta::webhook;
use lc_shared::amqp::{self, AmqpEndpoint, AmqpError, header_str};
use lc_shared::outgoing;
use lc_shared::telemetry::TraceParent;
use lc_shared::topology;
use serde::Serialize;

/// How long a replayed message's confirm is awaited before it is kept.
const CONFIRM_BOUND: Duration = Duration::from_secs(5);
/// Characters of a body shown in a listing.
const PREVIEW_CHARS: usize = 160;

/// Why listing or replaying failed.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// The queue is not one of the inspectable queues.
    #[error("unknown queue {queue}; choose one of: {}", topology::inspectable_queues().join(", "))]
    UnknownQueue {
        /// What was asked for.
        queue: String,
    },
    /// The broker could not be reached (the text names the setting).
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    /// A broker call failed.
    #[error("RabbitMQ error: {0} (check that the broker is running and AMQP_URL is right)")]
    Lapin(#[from] lapin::Error),
}

/// One message of a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    /// The AMQP `message_id` (what a replay of one message names).
    pub message_id: Option<String>,
    /// Why it was set aside (header `x-loginconnect-error`).
    pub reason: Option<String>,
    /// The work queue it came from.
    pub origin_queue: Option<String>,
    /// Its routing key when it was first published.
    pub routing_key: String,
    /// The start of its body.
    pub preview: String,
}

/// One queue of a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueListing {
    /// The queue.
    pub queue: String,
    /// Messages ready in it.
    pub depth: u32,
    /// The first messages (up to the limit).
    pub messages: Vec<DeadLetter>,
}

/// What a replay did, in order: what was replayed and what was kept with why.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReplayReport {
    /// Messages put back (and acked).
    pub replayed: usize,
    /// Messages left on the queue because they still cannot be replayed.
    pub kept: usize,
    /// Why each kept message was kept, in order.
    pub notes: Vec<String>,
    /// For a replay of one message: whether it was found within the limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub found: Option<bool>,
}

/// Checks that `queue` may be inspected or replayed.
pub fn known_queue(queue: &str) -> Result<(), DeadLetterError> {
    if topology::inspectable_queues().iter().any(|k| k == queue) {
        Ok(())
    } else {
        Err(DeadLetterError::UnknownQueue {
            queue: queue.to_owned(),
        })
    }
}

fn preview(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    let mut s: String = text.chars().take(PREVIEW_CHARS).collect();
    if text.chars().count() > PREVIEW_CHARS {
        s.push('…');
    }
    s
}

fn described(d: &Delivery) -> DeadLetter {
    DeadLetter {
        message_id: d.properties.message_id().as_ref().map(|m| m.to_string()),
        reason: header_str(&d.properties, topology::ERROR_HEADER),
        origin_queue: header_str(&d.properties, topology::ORIGIN_QUEUE_HEADER),
        routing_key: header_str(&d.properties, "x-loginconnect-original-routing-key")
            .unwrap_or_else(|| d.routing_key.to_string()),
        preview: preview(&d.data),
    }
}

async fn depth(conn: &Connection, queue: &str) -> Result<u32, DeadLetterError> {
    let ch = conn.create_channel().await?;
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    ch.close(200, "counted".into()).await?;
    Ok(q.message_count())
}

/// Lists up to `limit` messages of `queue` (every inspectable queue when `None`) without
/// removing them. `client` names the connection in the broker's UI.
pub async fn list(
    endpoint: &AmqpEndpoint,
    client: &str,
    queue: Option<&str>,
    limit: usize,
) -> Result<Vec<QueueListing>, DeadLetterError> {
    let queues: Vec<String> = match queue {
        Some(q) => {
            known_queue(q)?;
            vec![q.to_owned()]
        }
        None => topology::inspectable_queues(),
    };
    let conn = amqp::connect(endpoint.clone(), client).await?;
    let mut listings = Vec::with_capacity(queues.len());
    for q in queues {
        let depth = depth(&conn, &q).await?;
        let ch = conn.create_channel().await?;
        let mut messages = Vec::new();
        while messages.len() < limit {
            let Some(msg) = ch
                .basic_get(q.as_str().into(), BasicGetOptions { no_ack: false })
                .await?
            else {
                break;
            };
            messages.push(described(&msg.delivery));
        }
        // Closing the channel returns every unacked message to the queue, in order.
        ch.close(200, "listed".into()).await?;
        listings.push(QueueListing {
            queue: q,
            depth,
            messages,
        });
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(listings)
}

/// A message to publish in place of a replayed one: exchange, routing key, body, properties.
type Replacement = (String, String, Vec<u8>, BasicProperties);

/// The messages that replace `d` of `queue`, or why there are none.
fn replacements(queue: &str, d: &Delivery) -> Result<Vec<Replacement>, String> {
    if queue == topology::UNPARSED_QUEUE {
        // The very messages ingest would have published for this body (same ids, type and
        // source headers), on a new trace since the original request is long gone.
        let traceparent = TraceParent::new_root().to_string();
        let events = webhook::parse_delivery(&d.data)
            .map_err(|e| format!("still does not parse, kept: {e}"))?;
        events
            .iter()
            .map(|e| {
                outgoing::event_message(e, &traceparent)
                    .map(|m| (m.exchange.to_owned(), m.routing_key, m.body, m.properties))
                    .map_err(|e| format!("still does not parse, kept: cannot encode an event: {e}"))
            })
            .collect()
    } else {
        // Straight back onto the work queue through the default exchange: right for every
        // work queue, and for messages the broker dead-lettered itself (delivery limit),
        // which carry the dead-letter routing key rather than the original one.
        let origin = topology::work_queue_of(queue).unwrap_or(queue).to_owned();
        Ok(vec![(
            String::new(),
            origin,
            d.data.clone(),
            d.properties.clone(),
        )])
    }
}

/// Replays one delivery: acked after every replacement was confirmed, else put back.
async fn replay_delivery(
    pub_ch: &Channel,
    queue: &str,
    d: Delivery,
    report: &mut ReplayReport,
) -> Result<(), DeadLetterError> {
    let mut kept = None;
    match replacements(queue, &d) {
        Ok(outgoing) => {
            for (exchange, key, body, props) in outgoing {
                let confirm = amqp::publish(pub_ch, &exchange, &key, true, &body, props).await?;
                if let Err(e) = amqp::await_confirm(confirm, CONFIRM_BOUND).await {
                    kept = Some(format!("replay of one message failed, kept: {e}"));
                    break;
                }
            }
        }
        Err(why) => kept = Some(why),
    }
    match kept {
        None => {
            d.acker.ack(BasicAckOptions::default()).await?;
            report.replayed += 1;
        }
        Some(note) => {
            keep(&d.acker).await?;
            report.kept += 1;
            report.notes.push(note);
        }
    }
    Ok(())
}

async fn open(
    endpoint: &AmqpEndpoint,
    client: &str,
    queue: &str,
) -> Result<(Connection, Channel, Channel), DeadLetterError> {
    known_queue(queue)?;
    let conn = amqp::connect(endpoint.clone(), client).await?;
    let get_ch = conn.create_channel().await?;
    let pub_ch = amqp::confirm_channel(&conn).await?;
    topology::declare(&pub_ch).await?;
    Ok((conn, get_ch, pub_ch))
}

/// Replays up to `limit` messages of `queue`, from its head.
pub async fn replay(
    endpoint: &AmqpEndpoint,
    client: &str,
    queue: &str,
    limit: usize,
) -> Result<ReplayReport, DeadLetterError> {
    let (conn, get_ch, pub_ch) = open(endpoint, client, queue).await?;
    let mut report = ReplayReport::default();
    for _ in 0..limit {
        let Some(msg) = get_ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        replay_delivery(&pub_ch, queue, msg.delivery, &mut report).await?;
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(report)
}

/// Replays the message of `queue` whose `message_id` is `message_id`, looking at most
/// `limit` messages deep. Every other message taken is held unacknowledged and returned
/// untouched when the channel closes (marked redelivered). The broker puts a returned message
/// behind those still queued, so the order is kept when the queue holds at most `limit`
/// messages; beyond that, the ones looked at move behind the rest.
pub async fn replay_one(
    endpoint: &AmqpEndpoint,
    client: &str,
    queue: &str,
    message_id: &str,
    limit: usize,
) -> Result<ReplayReport, DeadLetterError> {
    let (conn, get_ch, pub_ch) = open(endpoint, client, queue).await?;
    let mut report = ReplayReport {
        found: Some(false),
        ..ReplayReport::default()
    };
    for _ in 0..limit {
        let Some(msg) = get_ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        let id = msg
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.to_string());
        // After the one replayed, the rest are taken too (up to the limit) only to keep the
        // order: a returned message goes behind those still in the queue.
        if report.found == Some(false) && id.as_deref() == Some(message_id) {
            report.found = Some(true);
            replay_delivery(&pub_ch, queue, msg.delivery, &mut report).await?;
        }
    }
    // Every other message taken goes back as it was.
    get_ch.close(200, "looked".into()).await?;
    let _ = conn.close(200, "done".into()).await;
    Ok(report)
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
