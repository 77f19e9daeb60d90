//! Parsing of Meta's Messenger webhook deliveries into a flat list of events, and the
//! [`QueuedEvent`] envelope each event travels in on `RabbitMQ`.
//!
//! A delivery is `{"object":"page","entry":[{"id","time","messaging":[…]|"standby":[…]}]}`
//! with any number of entries and items, possibly for several Pages. Each item becomes one
//! [`WebhookEvent`] that keeps the item's exact bytes: Meta signs its escaped-unicode JSON, so the
//! event is forwarded and stored as received and never re-serialised.
//!
//! The Login Connect payloads are only partly documented, so parsing is deliberately liberal:
//! ids may be strings or numbers, timestamps numbers or numeric strings in seconds or
//! milliseconds, `null` counts as absent, and an item we do not understand is an
//! [`EventKind::Other`] rather than an error. A bad envelope is an error, because nothing in it can
//! be trusted to be routed. Fields are read from borrowed [`RawValue`]s rather than a
//! [`Value`] tree, so hostile nesting deep inside an item we never look at cannot fail
//! or overflow the stack.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// Kind of a webhook event; also the first word of its AMQP routing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A Login Connect opt-in carrying `optin.login_id`.
    Optin,
    /// A message from the user (not an echo of our own send).
    Message,
    /// A postback (button, Get Started or persistent menu tap).
    Postback,
    /// Anything else: echoes, deliveries, reads, reactions, standby items without
    /// `prior_message`, unknown events.
    Other,
}

impl EventKind {
    /// The lowercase name used in routing keys and JSON: `optin`, `message`, `postback`, `other`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Optin => "optin",
            Self::Message => "message",
            Self::Postback => "postback",
            Self::Other => "other",
        }
    }
}

/// One event of a delivery, as parsed.
#[derive(Debug, Clone)]
pub struct WebhookEvent {
    /// What the event is; always consistent with [`WebhookEvent::details`].
    pub kind: EventKind,
    /// The Page the event belongs to (`entry.id`, string or JSON number).
    pub page_id: String,
    /// When the event happened: the item's `timestamp`, else the watermark of a delivery or
    /// read, else the entry's `time`. Only `Other` events fall back to the Unix epoch.
    pub timestamp: OffsetDateTime,
    /// Stable key for de-duplicating Meta's retries; see [`QueuedEvent::idempotency_key`].
    pub idempotency_key: String,
    /// The exact bytes of the one `messaging`/`standby` item as received.
    pub raw: Box<RawValue>,
    /// The fields the workers need, by kind.
    pub details: EventDetails,
}

/// The typed content of an event, by kind.
#[derive(Debug, Clone, PartialEq)]
pub enum EventDetails {
    /// A Login Connect opt-in.
    Optin(Optin),
    /// A user message.
    Message(Reply),
    /// A postback.
    Postback(Reply),
    /// Nothing the workers act on.
    Other,
}

impl EventDetails {
    /// The [`EventKind`] matching this variant.
    pub fn kind(&self) -> EventKind {
        match self {
            Self::Optin(_) => EventKind::Optin,
            Self::Message(_) => EventKind::Message,
            Self::Postback(_) => EventKind::Postback,
            Self::Other => EventKind::Other,
        }
    }
}

/// A Login Connect opt-in (`messaging[].optin` with a `login_id`).
#[derive(Debug, Clone, PartialEq)]
pub struct Optin {
    /// `optin.login_id`: the recipient id for the first message.
    pub login_id: String,
    /// `optin.type`, if sent (undocumented for Login Connect).
    pub optin_type: Option<String>,
    /// `optin.ref`, if sent (string or number).
    pub reference: Option<String>,
    /// `optin.payload`, if sent (string or number).
    pub payload: Option<String>,
    /// `sender.id`, if sent; Login Connect users usually have no PSID yet.
    pub sender_id: Option<String>,
}

/// A user's message or postback.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// `sender.id`: the user's Page-scoped id.
    pub psid: String,
    /// `message.mid` or `postback.mid`.
    pub mid: Option<String>,
    /// `message.text`, or `postback.title` for postbacks (the label the user tapped).
    pub text: Option<String>,
    /// `message.quick_reply.payload` (string or number, as a string).
    pub quick_reply_payload: Option<String>,
    /// `postback.payload` (string or number, as a string).
    pub postback_payload: Option<String>,
    /// The `prior_message` that joins this PSID to an earlier `login_id`, if any.
    pub prior_message: Option<PriorMessage>,
}

/// The `prior_message` Meta appends to the first reply to a message sent by `login_id`/`user_ref`.
#[derive(Debug, Clone, PartialEq)]
pub struct PriorMessage {
    /// `source`, kept as sent (e.g. `checkbox_plugin`); unknown values are not rejected.
    pub source: Option<String>,
    /// `identifier`, or `login_id` when `identifier` is absent.
    pub login_id: String,
}

/// Why a delivery or an item could not be parsed.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The body is not UTF-8, so it cannot be JSON.
    #[error("body is not valid UTF-8: {0}")]
    NotUtf8(std::str::Utf8Error),
    /// The body is not one well-formed JSON value (includes empty and truncated bodies).
    #[error("body is not valid JSON: {0}")]
    NotJson(serde_json::Error),
    /// A value that must be an object is something else.
    #[error("{what} is not a JSON object")]
    NotAnObject {
        /// Which value, e.g. `body` or `entry item`.
        what: &'static str,
    },
    /// `object` is not `"page"`; holds (the start of) the JSON that was sent.
    #[error("`object` is {0}, expected \"page\"")]
    NotAPageObject(String),
    /// A required field is absent or `null`.
    #[error("missing field `{field}`")]
    MissingField {
        /// The field's name.
        field: &'static str,
    },
    /// A field has a type we cannot use.
    #[error("field `{field}` must be {expected}")]
    WrongType {
        /// The field's name.
        field: &'static str,
        /// What was expected, in words.
        expected: &'static str,
    },
    /// A timestamp is not a usable point in time.
    #[error("bad timestamp in `{field}`: {reason}")]
    BadTimestamp {
        /// The field's name, e.g. `timestamp` or `time`.
        field: &'static str,
        /// What was wrong with it.
        reason: String,
    },
    /// The entry's `id` cannot be a page id (a dot, a wildcard, whitespace…: it could not
    /// be routed).
    #[error("field `id`: {0}")]
    BadPageId(crate::ids::PageIdError),
    /// [`QueuedEvent::parse`] found a different kind than the message was routed as.
    #[error("queued as `{}` but the event parses as `{}`", queued.as_str(), parsed.as_str())]
    KindMismatch {
        /// The kind in the queued message.
        queued: EventKind,
        /// The kind found by re-parsing its event.
        parsed: EventKind,
    },
    /// An error located inside the delivery, e.g. at `entry[1].messaging[0]`.
    #[error("at {path}: {error}")]
    At {
        /// Where, as `entry[i]` or `entry[i].messaging[j]`.
        path: String,
        /// What was wrong there.
        error: Box<ParseError>,
    },
}

impl ParseError {
    /// The error without its location, for classifying (e.g. in metrics).
    pub fn innermost(&self) -> &ParseError {
        match self {
            Self::At { error, .. } => error.innermost(),
            other => other,
        }
    }

    fn missing(field: &'static str) -> Self {
        Self::MissingField { field }
    }

    fn wrong(field: &'static str, expected: &'static str) -> Self {
        Self::WrongType { field, expected }
    }

    fn bad_time(field: &'static str, reason: String) -> Self {
        Self::BadTimestamp { field, reason }
    }

    fn at(self, prefix: &str) -> Self {
        match self {
            Self::At { path, error } => Self::At {
                path: format!("{prefix}.{path}"),
                error,
            },
            other => Self::At {
                path: prefix.to_owned(),
                error: Box::new(other),
            },
        }
    }
}

/// Parses a whole delivery body (the raw POST bytes) into its events, in order.
///
/// Items in `standby` are [`EventKind::Other`] because another app owns the thread, with one
/// exception: a message or postback carrying `prior_message`. That is the person's reply to
/// our first message arriving while a handover app (an inbox, a human-agent tool) owns the
/// thread, and linking it is ours to do, so it keeps its kind and goes to the correlator. An
/// entry without `messaging` or `standby` items that carries anything else (e.g. a `changes`
/// entry of another subscription) is one [`EventKind::Other`] event keeping the whole entry.
/// Fails on a malformed envelope, entry or item (an opt-in, message or postback whose time is
/// bad or missing, since those are ordered and acted on): [`parse_delivery_parts`] sets such
/// a part aside instead and keeps the rest.
pub fn parse_delivery(body: &[u8]) -> Result<Vec<WebhookEvent>, ParseError> {
    let mut events = Vec::new();
    for part in parse_delivery_parts(body)? {
        match part {
            DeliveryPart::Event(event) => events.push(*event),
            DeliveryPart::SetAside(part) => return Err(part.error),
        }
    }
    Ok(events)
}

fn parse_entry(entry_raw: &RawValue, out: &mut Vec<DeliveryPart>) -> Result<(), ParseError> {
    let entry = object(entry_raw).ok_or(ParseError::NotAnObject { what: "entry item" })?;
    let mut channels = Vec::new();
    for (name, standby) in [
        ("messaging", Channel::Messaging),
        ("standby", Channel::Standby),
    ] {
        if let Some(list) = entry.get(name) {
            let items = array(list).ok_or(ParseError::wrong(name, "an array"))?;
            channels.push((name, standby, items));
        }
    }
    // Entries for other subscriptions (feed `changes`, …) may lack what we need; only
    // demand id and time when there is something to attribute to them.
    if channels.iter().all(|(_, _, items)| items.is_empty()) {
        if let Some(event) = parts::other_entry(&entry, entry_raw)? {
            out.push(DeliveryPart::Event(Box::new(event)));
        }
        return Ok(());
    }
    let page_id = entry_page_id(&entry)?;
    let time_raw = entry.get("time");
    let time = (time_raw.map(parse_timestamp).transpose())
        .map_err(|reason| ParseError::bad_time("time", reason))?;
    for (name, standby, items) in channels {
        for (j, item) in items.into_iter().enumerate() {
            // One bad item is set aside alone; the rest of its entry and batch go on.
            out.push(match parse_item_in(&page_id, item, time, standby) {
                Ok(event) => DeliveryPart::Event(Box::new(event)),
                Err(e) => DeliveryPart::SetAside(parts::item_alone(
                    &page_id,
                    time_raw,
                    name,
                    item,
                    e.at(&format!("{name}[{j}]")),
                )),
            });
        }
    }
    Ok(())
}

/// The page id of an entry (`id`): a non-empty string or a non-negative integer that can be
/// one word of a routing key ([`crate::ids::check_page_id`]); any other id sets the entry
/// aside, since its events could be routed nowhere.
fn entry_page_id(entry: &Fields<'_>) -> Result<String, ParseError> {
    let page_id = entry.get("id").ok_or(ParseError::missing("id"))?;
    let page_id = id_text(page_id).ok_or(ParseError::wrong(
        "id",
        "a non-empty string or a non-negative integer",
    ))?;
    crate::ids::check_page_id(&page_id).map_err(ParseError::BadPageId)?;
    Ok(page_id)
}

/// Parses one `messaging` item for a page (the workers re-parse `QueuedEvent.event` with this).
///
/// `fallback_time` is used when neither the item's `timestamp` nor a watermark gives a time
/// (normally the entry's `time`). The item is treated as coming from `messaging`; use
/// [`QueuedEvent::parse`] for queued events, which also keeps `other` events `Other`.
pub fn parse_item(
    page_id: &str,
    raw: &RawValue,
    fallback_time: Option<OffsetDateTime>,
) -> Result<WebhookEvent, ParseError> {
    parse_item_in(page_id, raw, fallback_time, Channel::Messaging)
}

/// Where an item was read from, which decides what it may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Channel {
    /// `entry[].messaging`: the thread is ours; every kind.
    Messaging,
    /// `entry[].standby`: another app owns the thread; only a reply with `prior_message`
    /// (ours to link) is not `Other`.
    Standby,
    /// A queued event routed as `other`: stays `Other` whatever it looks like.
    Opaque,
}

fn parse_item_in(
    page_id: &str,
    raw: &RawValue,
    fallback_time: Option<OffsetDateTime>,
    channel: Channel,
) -> Result<WebhookEvent, ParseError> {
    // A non-object item is unknown rather than an error: the envelope around it was valid.
    let item = object(raw);
    let details = match (&item, channel) {
        (Some(item), Channel::Messaging) => classify(item),
        (Some(item), Channel::Standby) => match classify(item) {
            reply @ (EventDetails::Message(Reply {
                prior_message: Some(_),
                ..
            })
            | EventDetails::Postback(Reply {
                prior_message: Some(_),
                ..
            })) => reply,
            _ => EventDetails::Other,
        },
        _ => EventDetails::Other,
    };
    let kind = details.kind();
    let timestamp = event_time(item.as_ref(), kind, fallback_time)?;
    let idempotency_key = idempotency_key(page_id, raw, &details, timestamp);
    Ok(WebhookEvent {
        kind,
        page_id: page_id.to_owned(),
        timestamp,
        idempotency_key,
        raw: raw.to_owned(),
        details,
    })
}

fn classify(item: &Fields<'_>) -> EventDetails {
    // Login Connect opt-ins are recognised by login_id alone: `type` is undocumented and
    // checkbox/marketing opt-ins share the `optin` key without one.
    if let Some(optin) = item.get("optin").and_then(object)
        && let Some(login_id) = optin.get("login_id").and_then(id_text)
    {
        return EventDetails::Optin(Optin {
            login_id,
            optin_type: optin.get("type").and_then(string),
            reference: optin.get("ref").and_then(text),
            payload: optin.get("payload").and_then(text),
            sender_id: sender_id(item),
        });
    }
    let (inner, postback) = match item.get("message").and_then(object) {
        Some(message) => (message, false),
        None => match item.get("postback").and_then(object) {
            Some(postback) => (postback, true),
            None => return EventDetails::Other,
        },
    };
    let echo = (inner.get("is_echo")).is_some_and(|v| matches!(v.get(), "true" | "\"true\""));
    // Plugin users without a PSID come with `sender.user_ref`: nothing to reply to yet.
    let Some(psid) = sender_id(item).filter(|_| !echo) else {
        return EventDetails::Other;
    };
    let quick_reply = (inner.get("quick_reply").and_then(object)).and_then(|q| q.get("payload"));
    let reply = Reply {
        psid,
        mid: inner.get("mid").and_then(id_text),
        // A postback's title is the label the user tapped, i.e. what they "said".
        text: (inner.get(if postback { "title" } else { "text" })).and_then(string),
        quick_reply_payload: quick_reply.and_then(text).filter(|_| !postback),
        postback_payload: inner.get("payload").and_then(text).filter(|_| postback),
        prior_message: prior_message(item, &inner),
    };
    if postback {
        EventDetails::Postback(reply)
    } else {
        EventDetails::Message(reply)
    }
}

fn sender_id(item: &Fields<'_>) -> Option<String> {
    item.get("sender")
        .and_then(object)
        .and_then(|s| s.get("id"))
        .and_then(id_text)
}

/// Documented as a sibling of `message`/`postback`; the nested and camelCase spellings are
/// accepted because the Login Connect shape is unconfirmed and the official sample uses the
/// latter.
fn prior_message(item: &Fields<'_>, inner: &Fields<'_>) -> Option<PriorMessage> {
    let read = |raw: &RawValue| {
        let prior = object(raw)?;
        let login_id = prior
            .get("identifier")
            .and_then(id_text)
            .or_else(|| prior.get("login_id").and_then(id_text))?;
        Some(PriorMessage {
            source: prior.get("source").and_then(string),
            login_id,
        })
    };
    item.get("prior_message")
        .and_then(read)
        .or_else(|| inner.get("prior_message").and_then(read))
        .or_else(|| item.get("priorMessage").and_then(read))
}

fn event_time(
    item: Option<&Fields<'_>>,
    kind: EventKind,
    fallback: Option<OffsetDateTime>,
) -> Result<OffsetDateTime, ParseError> {
    // Events the workers act on are ordered by time, so a bad time must not be guessed;
    // for the rest any plausible time will do.
    let strict = kind != EventKind::Other;
    if let Some(ts) = item.and_then(|i| i.get("timestamp")) {
        match parse_timestamp(ts) {
            Ok(t) => return Ok(t),
            Err(reason) if strict => return Err(ParseError::bad_time("timestamp", reason)),
            Err(_) => {}
        }
    }
    // Deliveries are documented without `timestamp`; the watermark is the closest time.
    for receipt in ["delivery", "read"] {
        let watermark = item
            .and_then(|i| i.get(receipt))
            .and_then(object)
            .and_then(|r| r.get("watermark"))
            .and_then(|w| parse_timestamp(w).ok());
        if let Some(t) = watermark {
            return Ok(t);
        }
    }
    match fallback {
        Some(t) => Ok(t),
        None if strict => Err(ParseError::missing("timestamp")),
        None => Ok(OffsetDateTime::UNIX_EPOCH),
    }
}

/// Values below this are seconds, above milliseconds: 10^11 s is the year 5138, 10^11 ms 1973.
const SECONDS_BELOW: i128 = 100_000_000_000;
/// 9999-12-31T23:59:59.999Z, the last instant `time` represents without `large-dates`.
const MAX_MS: i128 = 253_402_300_799_999;

/// Accepts a number or numeric string, in seconds or milliseconds; floats only if integral.
fn parse_timestamp(raw: &RawValue) -> Result<OffsetDateTime, String> {
    let json = raw.get();
    let owned;
    let number = match json.as_bytes().first() {
        Some(b'"') => {
            owned = serde_json::from_str::<String>(json).map_err(|e| e.to_string())?;
            owned.trim()
        }
        Some(b'-' | b'0'..=b'9') => json,
        _ => {
            return Err(format!(
                "expected a number or numeric string: {}",
                preview(json)
            ));
        }
    };
    let value = match (number.parse::<i128>(), number.parse::<f64>()) {
        (Ok(v), _) => v,
        // Exact: f is integral and far inside i128's range.
        (_, Ok(f)) if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e30 => f as i128,
        _ => return Err(format!("{} is not a plausible integer", preview(number))),
    };
    if value < 0 {
        return Err(format!("{value} is negative"));
    }
    let ms = value * if value < SECONDS_BELOW { 1000 } else { 1 };
    if ms > MAX_MS {
        return Err(format!("{} is beyond the year 9999", preview(number)));
    }
    OffsetDateTime::from_unix_timestamp_nanos(ms * 1_000_000).map_err(|e| e.to_string())
}

fn unix_ms(t: OffsetDateTime) -> i64 {
    t.unix_timestamp() * 1000 + i64::from(t.millisecond())
}

/// AMQP's `message-id` is a short string (at most 255 bytes); longer keys are hashed.
const MAX_KEY_LEN: usize = 255;

fn idempotency_key(
    page_id: &str,
    raw: &RawValue,
    details: &EventDetails,
    timestamp: OffsetDateTime,
) -> String {
    let key = match details {
        EventDetails::Message(Reply { mid: Some(mid), .. })
        | EventDetails::Postback(Reply { mid: Some(mid), .. }) => format!("mid:{mid}"),
        EventDetails::Optin(o) => {
            format!("optin:{page_id}:{}:{}", o.login_id, unix_ms(timestamp))
        }
        _ => return content_key(page_id, raw),
    };
    if key.len() > MAX_KEY_LEN {
        format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
    } else {
        key
    }
}

/// Hashes the page id and the item's canonical JSON (keys sorted), so a retry that Meta
/// re-serialised with another key order still dedupes, while the same item on two Pages does
/// not. Items nested beyond `serde_json`'s recursion limit are hashed as raw bytes instead.
fn content_key(page_id: &str, raw: &RawValue) -> String {
    let canonical = serde_json::from_str(raw.get())
        .and_then(|value| serde_json::to_vec(&sorted(value)))
        .unwrap_or_else(|_| raw.get().as_bytes().to_vec());
    let mut sha = Sha256::new();
    sha.update(page_id.as_bytes());
    sha.update(b"\n");
    sha.update(&canonical);
    format!("sha256:{}", hex::encode(sha.finalize()))
}

/// Rebuilds objects in key order rather than relying on `serde_json::Map` being a `BTreeMap`,
/// which a dependency enabling `preserve_order` would silently change. Depth is bounded by
/// the parse before it.
fn sorted(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let map: BTreeMap<String, Value> =
                map.into_iter().map(|(k, v)| (k, sorted(v))).collect();
            Value::Object(map.into_iter().collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        scalar => scalar,
    }
}

/// The body of every AMQP message on exchange `messenger.webhook`: one event plus where it
/// came from.
///
/// `event` must be a `messaging` item, e.g. `{"timestamp":…,"optin":{"login_id":…}}` for an
/// opt-in reported by the business backend, so that [`QueuedEvent::parse`] can read it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct QueuedEvent {
    /// The Page the event belongs to.
    pub page_id: String,
    /// The event's kind, as routed.
    pub kind: EventKind,
    /// `"webhook"` for Meta deliveries; `"login_event"` for opt-ins reported by the business
    /// backend.
    pub source: String,
    /// Unix milliseconds of `WebhookEvent.timestamp`.
    pub timestamp_ms: i64,
    /// `mid:{mid}` for messages and postbacks with a mid,
    /// `optin:{page_id}:{login_id}:{timestamp_ms}` for opt-ins, otherwise `sha256:{hex}` of
    /// the page id and the item's canonical JSON (keys longer than 255 bytes are also hashed).
    pub idempotency_key: String,
    /// The original JSON of the event, byte for byte.
    pub event: Box<RawValue>,
}

impl QueuedEvent {
    /// Wraps a parsed webhook event for publishing; `source` is `"webhook"`.
    pub fn from_webhook(ev: &WebhookEvent) -> Self {
        Self {
            page_id: ev.page_id.clone(),
            kind: ev.kind,
            source: "webhook".to_owned(),
            timestamp_ms: unix_ms(ev.timestamp),
            idempotency_key: ev.idempotency_key.clone(),
            event: ev.raw.clone(),
        }
    }

    /// Re-parses `event` as [`parse_item`] does, with `timestamp_ms` as the fallback time.
    ///
    /// An event queued as `Other` stays `Other` (standby items look like messages but are not
    /// ours to answer). A standby reply with `prior_message` is queued as a message and reads
    /// as one here. The result keeps this message's `idempotency_key`, since that is the key
    /// the producer published under; any other disagreement in kind is an error.
    pub fn parse(&self) -> Result<WebhookEvent, ParseError> {
        let nanos = i128::from(self.timestamp_ms) * 1_000_000;
        let fallback = OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .map_err(|e| ParseError::bad_time("timestamp_ms", e.to_string()))?;
        let channel = if self.kind == EventKind::Other {
            Channel::Opaque
        } else {
            Channel::Messaging
        };
        let mut event = parse_item_in(&self.page_id, &self.event, Some(fallback), channel)?;
        if event.kind != self.kind {
            return Err(ParseError::KindMismatch {
                queued: self.kind,
                parsed: event.kind,
            });
        }
        event.idempotency_key.clone_from(&self.idempotency_key);
        Ok(event)
    }
}

/// An object's members as unparsed values, so only the members we read are ever parsed.
struct Fields<'a>(Vec<(String, &'a RawValue)>);

impl<'a> Fields<'a> {
    /// Last duplicate wins, as in `serde_json::Value`; `null` counts as absent.
    fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v)
            .filter(|v| v.get() != "null")
    }
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    fields.push((key, map.next_value::<&'de RawValue>()?));
                }
                Ok(Fields(fields))
            }
        }
        deserializer.deserialize_map(FieldsVisitor)
    }
}

/// Parses `raw` as `T` only if it starts with `open`, so e.g. a struct is never read from an array.
fn parse_if<'a, T: Deserialize<'a>>(raw: &'a RawValue, open: char) -> Option<T> {
    let json = raw.get().trim_start();
    json.starts_with(open)
        .then(|| serde_json::from_str(json).ok())
        .flatten()
}

fn object(raw: &RawValue) -> Option<Fields<'_>> {
    parse_if(raw, '{')
}

fn array(raw: &RawValue) -> Option<Vec<&RawValue>> {
    parse_if(raw, '[')
}

fn string(raw: &RawValue) -> Option<String> {
    parse_if(raw, '"')
}

/// A string, or a number as written (payloads and refs are sometimes numeric).
fn text(raw: &RawValue) -> Option<String> {
    match raw.get().as_bytes().first() {
        Some(b'"') => string(raw),
        Some(b'-' | b'0'..=b'9') => Some(raw.get().to_owned()),
        _ => None,
    }
}

/// A non-empty string, or a non-negative integer kept digit for digit (ids exceed f64).
fn id_text(raw: &RawValue) -> Option<String> {
    let json = raw.get();
    if json.bytes().all(|b| b.is_ascii_digit()) {
        return (!json.is_empty()).then(|| json.to_owned());
    }
    string(raw).filter(|s| !s.is_empty())
}

/// Keeps error messages short when the offending value is huge.
fn preview(json: &str) -> String {
    const MAX: usize = 64;
    match json.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &json[..cut]),
        None => json.to_owned(),
    }
}

mod parts;

pub use parts::{DeliveryPart, SetAside, parse_delivery_parts};

#[cfg(test)]
mod tests;
