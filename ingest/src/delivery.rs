//! The publish side of a webhook delivery: what a verified body becomes on the broker.
//!
//! Every event of the body becomes one message on `messenger.webhook` (built by
//! [`lc_shared::outgoing`], which the operator CLI's replay shares). A signed body that does
//! not parse is not refused: Meta would only redeliver the same bytes, so it is kept whole
//! as one message on `messenger.unparsed`, for inspection and replay once the parser knows
//! the shape. The HTTP handler publishes the result and answers; nothing here does I/O.

use lc_meta::webhook::{self, WebhookEvent};
use lc_shared::outgoing::{self, Outgoing};

/// The messages of one verified body.
#[derive(Debug)]
pub struct DeliveryMessages {
    /// What to publish, in the body's order; empty when the body holds no event.
    pub messages: Vec<Outgoing>,
    /// True when the body did not parse: `messages` is then its one `messenger.unparsed`
    /// message (counted as an unparsed body rather than as published events).
    pub unparsed: bool,
}

/// Turns a verified webhook body into the messages to publish, each carrying `traceparent`;
/// a body that does not parse becomes one message keeping it raw on `messenger.unparsed`.
pub fn messages(body: &[u8], traceparent: &str) -> DeliveryMessages {
    match webhook::parse_delivery(body) {
        Ok(events) => DeliveryMessages {
            messages: event_messages(&events, body, traceparent),
            unparsed: false,
        },
        Err(e) => {
            tracing::warn!(error = %e, "signed webhook body does not parse; keeping it on messenger.unparsed");
            DeliveryMessages {
                messages: vec![outgoing::unparsed_message(
                    body,
                    &e.to_string(),
                    traceparent,
                )],
                unparsed: true,
            }
        }
    }
}

/// One message per event, or the whole body as one unparsed message if any event cannot
/// be encoded.
fn event_messages(events: &[WebhookEvent], body: &[u8], traceparent: &str) -> Vec<Outgoing> {
    events
        .iter()
        .map(|ev| outgoing::event_message(ev, traceparent))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| {
            // Serialising our own struct of strings cannot fail; if it ever does, keep the
            // whole body rather than lose the event.
            tracing::error!(error = %e, "cannot encode event; keeping body as unparsed");
            vec![outgoing::unparsed_message(
                body,
                &e.to_string(),
                traceparent,
            )]
        })
}
