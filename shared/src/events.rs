//! The public event contract: CloudEvents 1.0 on exchange `loginconnect.events`, and the
//! transactional outbox they are written to.
//!
//! An event row is inserted in the same transaction as the state change it announces, so an
//! event exists if and only if its change committed; the relay publishes rows later with a
//! stable id (the CloudEvent `id`, also the AMQP `message_id`) for consumer-side dedupe.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// AMQP `content_type` of public events (structured-mode CloudEvents).
pub const CLOUDEVENTS_CONTENT_TYPE: &str = "application/cloudevents+json";

/// Every routing key of a public event (see [`PublicEvent::routing_key`]).
pub const ROUTING_KEYS: [&str; 5] = [
    "identity.linked",
    "first_message.sent",
    "first_message.failed",
    "first_message.expired",
    "identity.deleted",
];

/// Graph's last error for a failed or expired first message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GraphErrorData {
    /// Graph `error.code`, when Graph answered with one.
    pub code: Option<i64>,
    /// Graph `error.error_subcode`.
    pub subcode: Option<i64>,
    /// Graph's message, or ours for network errors and timeouts.
    pub message: String,
}

/// `data` of `identity.linked`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdentityLinked {
    /// The Page the person replied to.
    pub page_id: String,
    /// The person's login_id from Facebook Login.
    pub login_id: String,
    /// The person's page-scoped id.
    pub psid: String,
    /// When the reply that created the link was sent (its webhook timestamp).
    #[serde(with = "time::serde::rfc3339")]
    pub linked_at: OffsetDateTime,
    /// When the person opted in, or null if the opt-in was not seen yet.
    #[serde(with = "time::serde::rfc3339::option")]
    pub opted_in_at: Option<OffsetDateTime>,
    /// The `mid` of the reply that created the link.
    pub first_reply_mid: Option<String>,
}

/// `data` of `first_message.sent`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FirstMessageSent {
    /// The Page that sent the message.
    pub page_id: String,
    /// The recipient's login_id.
    pub login_id: String,
    /// Graph's `message_id`.
    pub message_id: String,
    /// When Graph accepted the message.
    #[serde(with = "time::serde::rfc3339")]
    pub sent_at: OffsetDateTime,
    /// Send API calls made for this opt-in, including the successful one.
    pub attempts: i32,
}

/// `data` of `first_message.failed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FirstMessageFailed {
    /// The Page of the opt-in.
    pub page_id: String,
    /// The recipient's login_id.
    pub login_id: String,
    /// Send API calls made.
    pub attempts: i32,
    /// Short machine-readable reason: `graph_permanent`, `unknown_page`, `other_page`,
    /// `outcome_unknown`, `retries_exhausted`.
    pub reason: String,
    /// Graph's last error, when there was one.
    pub last_error: Option<GraphErrorData>,
}

/// `data` of `first_message.expired`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FirstMessageExpired {
    /// The Page of the opt-in.
    pub page_id: String,
    /// The recipient's login_id.
    pub login_id: String,
    /// Send API calls made before the window closed.
    pub attempts: i32,
    /// The deadline that passed.
    #[serde(with = "time::serde::rfc3339")]
    pub deadline: OffsetDateTime,
    /// Graph's last error, when there was one.
    pub last_error: Option<GraphErrorData>,
}

/// `data` of `identity.deleted`: the person asked Meta to delete their data (the data
/// deletion callback); loginconnect deleted its opt-in and link, downstream services should
/// delete theirs. Emitted for every (page_id, login_id) the person may have, whether or not
/// loginconnect still held rows for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdentityDeleted {
    /// The Page.
    pub page_id: String,
    /// The person's login_id for that Page.
    pub login_id: String,
    /// The PSID the login_id was linked to, if loginconnect held a link.
    pub psid: Option<String>,
    /// When the deletion was committed.
    #[serde(with = "time::serde::rfc3339")]
    pub deleted_at: OffsetDateTime,
    /// The confirmation code Meta shows the person (one per deletion request).
    pub confirmation_code: String,
}

/// One public event, before it is wrapped in a CloudEvent.
#[derive(Debug, Clone, PartialEq)]
pub enum PublicEvent {
    /// A login_id was joined to a PSID.
    IdentityLinked(IdentityLinked),
    /// The first message was accepted by Graph.
    FirstMessageSent(FirstMessageSent),
    /// The first message failed permanently.
    FirstMessageFailed(FirstMessageFailed),
    /// The window closed before the first message could be sent.
    FirstMessageExpired(FirstMessageExpired),
    /// A person's data was deleted on their request.
    IdentityDeleted(IdentityDeleted),
}

impl PublicEvent {
    /// The AMQP routing key, also the last part of the CloudEvent `type`.
    pub fn routing_key(&self) -> &'static str {
        match self {
            Self::IdentityLinked(_) => "identity.linked",
            Self::FirstMessageSent(_) => "first_message.sent",
            Self::FirstMessageFailed(_) => "first_message.failed",
            Self::FirstMessageExpired(_) => "first_message.expired",
            Self::IdentityDeleted(_) => "identity.deleted",
        }
    }

    /// The CloudEvent `type`.
    pub fn cloudevent_type(&self) -> String {
        format!("com.loginconnect.{}", self.routing_key())
    }

    /// The Page the event belongs to.
    pub fn page_id(&self) -> &str {
        match self {
            Self::IdentityLinked(d) => &d.page_id,
            Self::FirstMessageSent(d) => &d.page_id,
            Self::FirstMessageFailed(d) => &d.page_id,
            Self::FirstMessageExpired(d) => &d.page_id,
            Self::IdentityDeleted(d) => &d.page_id,
        }
    }

    /// The person (login_id) the event is about, on [`PublicEvent::page_id`].
    pub fn login_id(&self) -> &str {
        match self {
            Self::IdentityLinked(d) => &d.login_id,
            Self::FirstMessageSent(d) => &d.login_id,
            Self::FirstMessageFailed(d) => &d.login_id,
            Self::FirstMessageExpired(d) => &d.login_id,
            Self::IdentityDeleted(d) => &d.login_id,
        }
    }

    /// The `data` member as JSON.
    pub fn data(&self) -> serde_json::Value {
        let v = match self {
            Self::IdentityLinked(d) => serde_json::to_value(d),
            Self::FirstMessageSent(d) => serde_json::to_value(d),
            Self::FirstMessageFailed(d) => serde_json::to_value(d),
            Self::FirstMessageExpired(d) => serde_json::to_value(d),
            Self::IdentityDeleted(d) => serde_json::to_value(d),
        };
        // These structs hold only strings, numbers and formatted times: serialising cannot fail.
        v.unwrap_or(serde_json::Value::Null)
    }

    /// Wraps the event in a CloudEvent with a fresh, time-ordered id.
    pub fn to_cloudevent(&self, source: &str) -> CloudEvent {
        CloudEvent {
            specversion: "1.0".to_owned(),
            id: Uuid::now_v7(),
            source: source.to_owned(),
            event_type: self.cloudevent_type(),
            time: OffsetDateTime::now_utc(),
            datacontenttype: "application/json".to_owned(),
            subject: Some(self.page_id().to_owned()),
            personseq: None,
            data: self.data(),
        }
    }
}

/// A CloudEvents 1.0 event in structured JSON mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudEvent {
    /// Always `"1.0"`.
    pub specversion: String,
    /// Unique, stable across redeliveries: consumers dedupe on it.
    pub id: Uuid,
    /// URI-reference of the producing component, e.g. `/loginconnect/scheduler`.
    pub source: String,
    /// `com.loginconnect.<routing key>`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// When the state change was committed (close to it: set when the row is written).
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// Always `application/json`.
    pub datacontenttype: String,
    /// The Page id, so consumers can filter without parsing `data`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub subject: Option<String>,
    /// Extension attribute: the event's place (1, 2, ...) in the commit order of the events
    /// about its (page_id, login_id) (increasing, never reused; gaps are possible). Set when the event is written to the outbox; a consumer
    /// that sees a lower number after a higher one for the same person got a redelivery or a
    /// requeue and must not let the older event undo the newer.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub personseq: Option<i64>,
    /// The event's data; see the AsyncAPI document for each type's schema.
    pub data: serde_json::Value,
}

/// Writes one event to the outbox inside the caller's transaction and returns its id.
///
/// The event gets the next number of its person's sequence (`personseq`, see
/// [`CloudEvent::personseq`]): the per-person counter row stays locked until the caller
/// commits, so a concurrent transaction writing about the same person waits, and numbers
/// follow commit order. The relay publishes a person's events in that order.
pub async fn insert_outbox(
    client: &impl tokio_postgres::GenericClient,
    event: &PublicEvent,
    source: &str,
    traceparent: Option<&str>,
) -> Result<Uuid, tokio_postgres::Error> {
    let ce = event.to_cloudevent(source);
    let json = serde_json::to_value(&ce).unwrap_or(serde_json::Value::Null);
    let key = person_key(event.page_id(), event.login_id());
    client
        .execute(
            "WITH seq AS ( \
                 INSERT INTO outbox_person_seq AS s (person_key, seq) VALUES ($6, 1) \
                 ON CONFLICT (person_key) DO UPDATE SET seq = s.seq + 1 RETURNING seq) \
             INSERT INTO outbox (event_id, event_type, page_id, cloudevent, traceparent, \
                                 person_key, person_seq) \
             SELECT $1, $2, $3, jsonb_set($4::jsonb, '{personseq}', to_jsonb(seq.seq)), $5, \
                    $6, seq.seq FROM seq",
            &[
                &ce.id,
                &event.routing_key(),
                &event.page_id(),
                &json,
                &traceparent,
                &key,
            ],
        )
        .await?;
    Ok(ce.id)
}

/// The key of a person's event sequence: SHA-256 of the length-prefixed page_id and login_id
/// (only a hash is stored, since the counter outlives a deletion of the person's data).
pub fn person_key(page_id: &str, login_id: &str) -> Vec<u8> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(page_id.len().to_be_bytes());
    h.update(page_id.as_bytes());
    h.update(login_id.as_bytes());
    h.finalize().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloudevent_has_the_contract_fields() {
        let ev = PublicEvent::FirstMessageSent(FirstMessageSent {
            page_id: "1".into(),
            login_id: "L".into(),
            message_id: "m_1".into(),
            sent_at: OffsetDateTime::UNIX_EPOCH,
            attempts: 2,
        });
        let ce = ev.to_cloudevent("/loginconnect/scheduler");
        let v = serde_json::to_value(&ce).expect("serialise");
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["type"], "com.loginconnect.first_message.sent");
        assert_eq!(v["datacontenttype"], "application/json");
        assert_eq!(v["data"]["sent_at"], "1970-01-01T00:00:00Z");
        assert_eq!(v["data"]["attempts"], 2);
        assert_eq!(ev.routing_key(), "first_message.sent");
        assert!(ROUTING_KEYS.contains(&ev.routing_key()));
        assert_eq!(v.get("personseq"), None, "set by the outbox, not here");
        let back: CloudEvent = serde_json::from_value(v).expect("deserialise");
        assert_eq!(back, ce);
    }

    #[test]
    fn person_keys_do_not_collide_across_the_page_login_boundary() {
        assert_ne!(person_key("1", "23"), person_key("12", "3"));
        assert_eq!(person_key("1", "23"), person_key("1", "23"));
        assert_eq!(person_key("1", "23").len(), 32);
    }
}
