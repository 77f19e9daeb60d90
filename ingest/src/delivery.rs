//! The publish side of a webhook delivery: what a verified body becomes on the broker.
//!
//! Only a JSON object can be a webhook body ([`Refused::NotAJsonObject`]): an app secret's
//! MAC made for something else — Facebook Login's `signed_request` signs base64 text with the
//! same secret — must not buy a place on the broker. Every event of an object body becomes
//! one message on `messenger.webhook` (built by [`lc_shared::outgoing`], which the operator
//! CLI's replay shares). What does not parse is not refused, since Meta would only redeliver
//! the same bytes: a body whose envelope cannot be read is kept whole as one message on
//! `messenger.unparsed`, and an entry or event that cannot be parsed inside a readable body
//! is kept there alone (as a delivery of its own) while the body's other events are published.
//! The HTTP handler publishes the result and answers; nothing here does I/O.

use lc_meta::webhook::{self, DeliveryPart, ParseError, WebhookEvent};
use lc_shared::outgoing::{self, Outgoing};

/// The messages of one verified body.
#[derive(Debug, Default)]
pub struct DeliveryMessages {
    /// What to publish, in the body's order; empty when the body holds no event.
    pub messages: Vec<Outgoing>,
    /// What the messages are, for counting once the broker confirmed them.
    pub tally: Tally,
}

/// What a body's messages are, by destination.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    /// The whole body went to `messenger.unparsed`.
    pub unparsed_body: bool,
    /// Entries or events set aside alone on `messenger.unparsed`.
    pub unparsed_parts: usize,
}

/// Why a verified body is refused (`400`, nothing stored).
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// Not a JSON object: not UTF-8, not JSON, or JSON of another type.
    #[error("a webhook body is a JSON object: {0}")]
    NotAJsonObject(ParseError),
}

/// Turns a verified webhook body into the messages to publish, each carrying `traceparent`
/// (see the module doc), or refuses it.
pub fn messages(body: &[u8], traceparent: &str) -> Result<DeliveryMessages, Refused> {
    match webhook::parse_delivery_parts(body) {
        Ok(parts) => Ok(part_messages(parts, body, traceparent)),
        Err(
            e @ (ParseError::NotUtf8(_) | ParseError::NotJson(_) | ParseError::NotAnObject { .. }),
        ) => Err(Refused::NotAJsonObject(e)),
        Err(e) => {
            tracing::warn!(error = %e, "signed webhook body does not parse; keeping it on messenger.unparsed");
            Ok(DeliveryMessages {
                messages: vec![outgoing::unparsed_message(
                    body,
                    &e.to_string(),
                    traceparent,
                )],
                tally: Tally {
                    unparsed_body: true,
                    unparsed_parts: 0,
                },
            })
        }
    }
}

/// One message per event and per part set aside, in the body's order.
fn part_messages(parts: Vec<DeliveryPart>, body: &[u8], traceparent: &str) -> DeliveryMessages {
    let mut out = DeliveryMessages::default();
    for part in parts {
        match part {
            DeliveryPart::Event(event) => match event_message(&event, traceparent) {
                Ok(message) => out.messages.push(message),
                Err(e) => {
                    // Serialising our own struct of strings cannot fail; if it ever does, keep
                    // the whole body rather than lose the event.
                    tracing::error!(error = %e, "cannot encode event; keeping body as unparsed");
                    return DeliveryMessages {
                        messages: vec![outgoing::unparsed_message(
                            body,
                            &e.to_string(),
                            traceparent,
                        )],
                        tally: Tally {
                            unparsed_body: true,
                            unparsed_parts: 0,
                        },
                    };
                }
            },
            DeliveryPart::SetAside(part) => {
                tracing::warn!(error = %part.error, "a part of a signed webhook body does not parse; keeping it alone on messenger.unparsed");
                out.messages.push(outgoing::unparsed_message(
                    &part.body,
                    &part.error.to_string(),
                    traceparent,
                ));
                out.tally.unparsed_parts += 1;
            }
        }
    }
    out
}

fn event_message(event: &WebhookEvent, traceparent: &str) -> Result<Outgoing, serde_json::Error> {
    outgoing::event_message(event, traceparent)
}
