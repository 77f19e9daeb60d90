//! Turning webhook events into durable AMQP messages: ingest publishes them, and the
//! operator CLI builds the very same messages when it replays a dead letter.
//!
//! All messages of one body are published on one channel back to back and their confirms
//! awaited together under one deadline: the body is acknowledged to Meta only when every event
//! is stored, and many bodies are in flight at once across requests.

use std::time::{Duration, Instant};

use crate::amqp::{self, AmqpError, BrokerLink};
use crate::topology;
use futures_util::future::try_join_all;
use lapin::BasicProperties;
use lapin::types::ShortString;
use lc_meta::webhook::{QueuedEvent, WebhookEvent};

/// One message ready to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Target exchange (`""` = the default exchange, routing straight to a queue).
    pub exchange: &'static str,
    /// Routing key.
    pub routing_key: String,
    /// Body bytes.
    pub body: Vec<u8>,
    /// AMQP properties (persistent, ids, headers).
    pub properties: BasicProperties,
    /// Kind label for metrics.
    pub kind: &'static str,
}

/// The AMQP message for one parsed webhook event.
pub fn event_message(
    event: &WebhookEvent,
    traceparent: &str,
) -> Result<Outgoing, serde_json::Error> {
    let queued = QueuedEvent::from_webhook(event);
    event_message_from_queued(&queued, traceparent)
}

/// The AMQP message for an event already in its queued form (webhook or login-event path).
pub fn event_message_from_queued(
    queued: &QueuedEvent,
    traceparent: &str,
) -> Result<Outgoing, serde_json::Error> {
    let body = serde_json::to_vec(queued)?;
    let seconds = u64::try_from(queued.timestamp_ms / 1000).unwrap_or(0);
    let properties = amqp::persistent_properties(&queued.idempotency_key, "application/json")
        .with_timestamp(seconds)
        .with_type(ShortString::from(queued.kind.as_str()))
        .with_headers(amqp::string_headers(&[
            ("traceparent", traceparent),
            ("x-loginconnect-source", queued.source.as_str()),
        ]));
    Ok(Outgoing {
        exchange: topology::WEBHOOK_EXCHANGE,
        routing_key: topology::webhook_routing_key(queued.kind.as_str(), &queued.page_id),
        body,
        properties,
        kind: queued.kind.as_str(),
    })
}

/// The message that keeps a signed but unparseable body for inspection and replay.
pub fn unparsed_message(body: &[u8], error: &str, traceparent: &str) -> Outgoing {
    let id = uuid::Uuid::now_v7().to_string();
    let properties = amqp::persistent_properties(&id, "application/octet-stream")
        .with_timestamp(
            u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp()).unwrap_or(0),
        )
        .with_headers(amqp::string_headers(&[
            (topology::ERROR_HEADER, error),
            ("traceparent", traceparent),
        ]));
    Outgoing {
        exchange: "",
        routing_key: topology::UNPARSED_QUEUE.to_owned(),
        body: body.to_vec(),
        properties,
        kind: "unparsed",
    }
}

/// Publishes every message and waits for all confirms within `bound` (counted from the first
/// publish, because a blocked connection can stall the publish itself). Returns how long the
/// confirms took.
pub async fn publish_all(
    link: &BrokerLink,
    messages: Vec<Outgoing>,
    bound: Duration,
) -> Result<Duration, AmqpError> {
    let started = Instant::now();
    let channel = link.channel()?;
    let work = async {
        let mut confirms = Vec::with_capacity(messages.len());
        for m in messages {
            let confirm = amqp::publish(
                &channel,
                m.exchange,
                &m.routing_key,
                true,
                &m.body,
                m.properties,
            )
            .await?;
            confirms.push(amqp::await_confirm(confirm, bound));
        }
        try_join_all(confirms).await?;
        Ok::<(), AmqpError>(())
    };
    match tokio::time::timeout(bound, work).await {
        Ok(result) => result.map(|()| started.elapsed()),
        Err(_) => Err(AmqpError::ConfirmTimeout(bound)),
    }
}
