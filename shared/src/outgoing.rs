//! Turning webhook events into durable AMQP messages: ingest publishes them, and the
//! operator CLI builds the very same messages when it replays a dead letter.
//!
//! All messages of one body are published back to back on a channel leased to that body
//! alone, and their confirms awaited together under one deadline: the body is acknowledged to
//! Meta only when every event is stored, and many bodies are in flight at once across
//! requests. The lease is what makes a returned (unroutable) message count against its own
//! body and no other (see [`crate::amqp::ChannelLease`]).

use std::time::{Duration, Instant};

use crate::amqp::{self, AmqpError, BrokerLink, Outcome};
use crate::topology;
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

/// Publishes every message and waits for all confirms within `bound` (counted from the
/// first moment, because waiting for a channel or a blocked connection can stall the publish
/// itself). Succeeds only if every message was stored; returns how long that took.
pub async fn publish_all(
    link: &BrokerLink,
    messages: Vec<Outgoing>,
    bound: Duration,
) -> Result<Duration, AmqpError> {
    let started = Instant::now();
    let work = async {
        let mut lease = link.lease(bound).await?;
        let keys: Vec<String> = messages.iter().map(|m| m.routing_key.clone()).collect();
        for m in messages {
            lease
                .publish(m.exchange, &m.routing_key, true, &m.body, m.properties)
                .await?;
        }
        let left = bound.saturating_sub(started.elapsed());
        let outcomes = lease.settle(left).await;
        body_result(&outcomes, &keys, left)
    };
    match tokio::time::timeout(bound, work).await {
        Ok(result) => result.map(|()| started.elapsed()),
        Err(_) => Err(AmqpError::ConfirmTimeout(bound)),
    }
}

/// The body's result from its messages' outcomes: the first failure, by severity (a return
/// names a topology hole, so it is reported before a nack or a missing confirm).
fn body_result(outcomes: &[Outcome], keys: &[String], bound: Duration) -> Result<(), AmqpError> {
    let failed = |want: &Outcome| {
        outcomes
            .iter()
            .zip(keys)
            .find(|(o, _)| *o == want)
            .map(|(_, k)| k.as_str())
    };
    if let Some(key) = failed(&Outcome::Returned) {
        tracing::error!(
            routing_key = key,
            "message returned as unroutable: no queue is bound for it"
        );
        return Err(AmqpError::Unroutable);
    }
    if let Some(key) = failed(&Outcome::Nacked) {
        tracing::warn!(routing_key = key, "broker refused the message");
        return Err(AmqpError::Nacked);
    }
    if failed(&Outcome::Unconfirmed).is_some() {
        return Err(AmqpError::ConfirmTimeout(bound));
    }
    Ok(())
}
