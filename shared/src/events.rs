//! The event contract: CloudEvents 1.0 on exchange `loginconnect.events`, and the
//! transactional outbox they are written to.
//!
//! An event row is inserted in the same transaction as the state change it announces, so an
//! event exists if and only if its change committed; the relay publishes rows later with a
//! stable id (the CloudEvent `id`, also the AMQP `message_id`) for consumer-side dedupe.
//!
//! Routing keys carry the page: `<kind>.<page_id>` (`first_message.sent.1234567890`), so a
//! consumer binds `first_message.sent.#` for every page, `*.*.<page_id>` for one page's
//! everything, or `#` for all events — public and operational ([`operational`]). Every
//! CloudEvent carries the page and its app as the extension attributes `pageid` and `appid`.

pub mod operational;
mod outbox_client;

pub use outbox_client::OutboxClient;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

pub use operational::{
    OPERATIONAL_KINDS, OperationalEvent, PagePaused, PageResumed, PausedReason, ResumedBy,
    SubscriptionLost, SubscriptionRestored,
};

/// AMQP `content_type` of public events (structured-mode CloudEvents).
pub const CLOUDEVENTS_CONTENT_TYPE: &str = "application/cloudevents+json";

/// Every public event kind (see [`PublicEvent::kind`]); the routing key is the kind followed
/// by `.<page_id>` ([`routing_key`]).
pub const PUBLIC_KINDS: [&str; 5] = [
    "identity.linked",
    "first_message.sent",
    "first_message.failed",
    "first_message.expired",
    "identity.deleted",
];

/// Every event kind on the exchange: the public ones, then the operational ones.
pub const EVENT_KINDS: [&str; 9] = [
    PUBLIC_KINDS[0],
    PUBLIC_KINDS[1],
    PUBLIC_KINDS[2],
    PUBLIC_KINDS[3],
    PUBLIC_KINDS[4],
    OPERATIONAL_KINDS[0],
    OPERATIONAL_KINDS[1],
    OPERATIONAL_KINDS[2],
    OPERATIONAL_KINDS[3],
];

/// The routing key of an event of `kind` about `page_id`: `<kind>.<page_id>`. Page ids are
/// checked where they enter ([`lc_meta::ids::check_page_id`]), so the page is exactly one
/// word of the key.
pub fn routing_key(kind: &str, page_id: &str) -> String {
    format!("{kind}.{page_id}")
}

/// SQL expression of the app the page `page` (an SQL expression of its id) belongs to, for
/// the `appid` attribute (and `app_id` of operational events). The one place that decides
/// it: the page's app in the page registry (`pages.app_id`, migration V8) when it is bound
/// to one, else the app id the scheduler was given (`META_APP_ID`, shared through
/// `app_state.meta_app_id`), else `default`, the row of `app_state`.
pub fn app_of_page_sql(page: &str) -> String {
    format!(
        "COALESCE((SELECT app_id FROM pages WHERE page_id = {page}), \
                  (SELECT COALESCE(meta_app_id, app_id) FROM app_state \
                   WHERE app_id = 'default'), 'default')"
    )
}

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
    /// The event kind: the routing key without its page, and the last part of the `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::IdentityLinked(_) => "identity.linked",
            Self::FirstMessageSent(_) => "first_message.sent",
            Self::FirstMessageFailed(_) => "first_message.failed",
            Self::FirstMessageExpired(_) => "first_message.expired",
            Self::IdentityDeleted(_) => "identity.deleted",
        }
    }

    /// The AMQP routing key: `<kind>.<page_id>`.
    pub fn routing_key(&self) -> String {
        routing_key(self.kind(), self.page_id())
    }

    /// The CloudEvent `type`.
    pub fn cloudevent_type(&self) -> String {
        cloudevent_type(self.kind())
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

    /// Wraps the event in a CloudEvent with a fresh, time-ordered id (`appid` and
    /// `personseq` are set by the outbox).
    pub fn to_cloudevent(&self, source: &str) -> CloudEvent {
        CloudEvent::new(source, self.kind(), self.page_id(), self.data())
    }
}

impl OperationalEvent {
    /// The AMQP routing key: `<kind>.<page_id>`.
    pub fn routing_key(&self) -> String {
        routing_key(self.kind(), self.page_id())
    }

    /// The CloudEvent `type`.
    pub fn cloudevent_type(&self) -> String {
        cloudevent_type(self.kind())
    }

    /// Wraps the event in a CloudEvent with a fresh, time-ordered id (`appid`, `data.app_id`
    /// and `pageseq` are set by the outbox).
    pub fn to_cloudevent(&self, source: &str) -> CloudEvent {
        CloudEvent::new(source, self.kind(), self.page_id(), self.data())
    }
}

/// The CloudEvent `type` of an event kind: `com.loginconnect.<kind>`.
pub fn cloudevent_type(kind: &str) -> String {
    format!("com.loginconnect.{kind}")
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
    /// Extension attribute: the Page the event belongs to (also the routing key's last word).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pageid: Option<String>,
    /// Extension attribute: the app the Page belongs to (see [`app_of_page_sql`]); set when
    /// the event is written to the outbox.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub appid: Option<String>,
    /// Extension attribute: the event's place (1, 2, ...) in the commit order of the events
    /// about its (page_id, login_id) (increasing, never reused; gaps are possible). Set when the event is written to the outbox; a consumer
    /// that sees a lower number after a higher one for the same person got a redelivery or a
    /// requeue and must not let the older event undo the newer.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub personseq: Option<i64>,
    /// Extension attribute of operational events: the event's place (1, 2, ...) in the
    /// commit order of its page's operational events, so a consumer can tell a redelivered
    /// `page.paused` from a newer one after `page.resumed`. Set by the outbox.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pageseq: Option<i64>,
    /// The event's data; see the AsyncAPI document for each type's schema.
    pub data: serde_json::Value,
}

impl CloudEvent {
    fn new(source: &str, kind: &str, page_id: &str, data: serde_json::Value) -> Self {
        Self {
            specversion: "1.0".to_owned(),
            id: Uuid::now_v7(),
            source: source.to_owned(),
            event_type: cloudevent_type(kind),
            time: OffsetDateTime::now_utc(),
            datacontenttype: "application/json".to_owned(),
            subject: Some(page_id.to_owned()),
            pageid: Some(page_id.to_owned()),
            appid: None,
            personseq: None,
            pageseq: None,
            data,
        }
    }
}

/// Writes one public event to the outbox inside the caller's transaction and returns its id.
///
/// The event gets the next number of its person's sequence (`personseq`, see
/// [`CloudEvent::personseq`]): the per-person counter row stays locked until the caller
/// commits, so a concurrent transaction writing about the same person waits, and numbers
/// follow commit order. The relay publishes a person's events in that order.
pub async fn insert_outbox(
    client: &impl OutboxClient,
    event: &PublicEvent,
    source: &str,
    traceparent: Option<&str>,
) -> Result<Uuid, tokio_postgres::Error> {
    let row = OutboxRow {
        cloudevent: event.to_cloudevent(source),
        kind: event.kind(),
        page_id: event.page_id(),
        sequence: person_key(event.page_id(), event.login_id()),
        sequence_attribute: "personseq",
        data_app_id: false,
    };
    insert_row(client, row, traceparent).await
}

/// Writes one operational event to the outbox inside the caller's transaction (the one that
/// changed the page's state) and returns its id. Its `data.app_id` and `appid` are set from
/// [`app_of_page_sql`]; it gets the next number of its page's operational sequence
/// (`pageseq`), published in that order like a person's events.
pub async fn insert_operational(
    client: &impl OutboxClient,
    event: &OperationalEvent,
    source: &str,
) -> Result<Uuid, tokio_postgres::Error> {
    let row = OutboxRow {
        cloudevent: event.to_cloudevent(source),
        kind: event.kind(),
        page_id: event.page_id(),
        sequence: page_key(event.page_id()),
        sequence_attribute: "pageseq",
        data_app_id: true,
    };
    insert_row(client, row, None).await
}

/// What [`insert_row`] writes.
struct OutboxRow<'a> {
    cloudevent: CloudEvent,
    kind: &'static str,
    page_id: &'a str,
    /// Key of the ordered sequence the event belongs to (a person's, or a page's).
    sequence: Vec<u8>,
    /// Extension attribute the sequence number is written to.
    sequence_attribute: &'static str,
    /// Whether `data.app_id` is set too (operational events carry it in their data).
    data_app_id: bool,
}

/// The outbox insert: the next number of the event's sequence and the row, in one statement.
static OUTBOX_INSERT_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH seq AS ( \
             INSERT INTO outbox_person_seq AS s (person_key, seq) VALUES ($6, 1) \
             ON CONFLICT (person_key) DO UPDATE SET seq = s.seq + 1 RETURNING seq), \
         app AS (SELECT {app} AS id) \
         INSERT INTO outbox (event_id, event_type, page_id, cloudevent, traceparent, \
                             person_key, person_seq) \
         SELECT $1, $2, $3, \
                CASE WHEN $8 THEN jsonb_set(e.ce, '{{data,app_id}}', to_jsonb(app.id)) \
                     ELSE e.ce END, \
                $5, $6, seq.seq \
         FROM seq, app, LATERAL (SELECT jsonb_set(jsonb_set($4::jsonb, ARRAY[$7::text], \
                  to_jsonb(seq.seq)), '{{appid}}', to_jsonb(app.id)) AS ce) e",
        app = app_of_page_sql("$3::text"),
    )
});

async fn insert_row(
    client: &impl OutboxClient,
    row: OutboxRow<'_>,
    traceparent: Option<&str>,
) -> Result<Uuid, tokio_postgres::Error> {
    let json = serde_json::to_value(&row.cloudevent).unwrap_or(serde_json::Value::Null);
    // `event_type` holds the kind (metrics label, filters); the relay builds the routing key
    // from it and `page_id`.
    let sql = &*OUTBOX_INSERT_SQL;
    client
        .execute_outbox(
            sql,
            &[
                &row.cloudevent.id,
                &row.kind,
                &row.page_id,
                &json,
                &traceparent,
                &row.sequence,
                &row.sequence_attribute,
                &row.data_app_id,
            ],
        )
        .await?;
    Ok(row.cloudevent.id)
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

/// The key of a page's operational event sequence: SHA-256 of a tag and the page id (no
/// person key can equal it: theirs starts with the page id's length).
pub fn page_key(page_id: &str) -> Vec<u8> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"page-operational\0");
    h.update(page_id.as_bytes());
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
        assert_eq!(ev.routing_key(), "first_message.sent.1");
        assert!(PUBLIC_KINDS.contains(&ev.kind()));
        assert_eq!(v["pageid"], "1");
        assert_eq!(v.get("personseq"), None, "set by the outbox, not here");
        assert_eq!(v.get("appid"), None, "set by the outbox, not here");
        let back: CloudEvent = serde_json::from_value(v).expect("deserialise");
        assert_eq!(back, ce);
    }

    #[test]
    fn person_keys_do_not_collide_across_the_page_login_boundary() {
        assert_ne!(person_key("1", "23"), person_key("12", "3"));
        assert_eq!(person_key("1", "23"), person_key("1", "23"));
        assert_eq!(person_key("1", "23").len(), 32);
        assert_ne!(page_key("1"), person_key("1", ""));
    }

    #[test]
    fn operational_events_have_their_kind_page_and_snake_case_reason() {
        let ev = OperationalEvent::PagePaused(PagePaused {
            page_id: "7".into(),
            app_id: String::new(),
            reason: PausedReason::TokenInvalid,
            since: OffsetDateTime::UNIX_EPOCH,
            detail: None,
        });
        assert_eq!(ev.routing_key(), "page.paused.7");
        assert!(OPERATIONAL_KINDS.contains(&ev.kind()));
        let v = serde_json::to_value(ev.to_cloudevent("/x")).expect("serialise");
        assert_eq!(v["type"], "com.loginconnect.page.paused");
        assert_eq!(v["data"]["reason"], "token_invalid");
        assert_eq!(v["pageid"], "7");
        assert_eq!(&EVENT_KINDS[..5], &PUBLIC_KINDS[..]);
        assert_eq!(&EVENT_KINDS[5..], &OPERATIONAL_KINDS[..]);
    }
}
