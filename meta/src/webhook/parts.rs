//! A delivery parsed part by part, so one bad entry or event never costs its batch.
//!
//! [`parse_delivery_parts`] walks the envelope like [`super::parse_delivery`] but, where an
//! entry or an item cannot be parsed, keeps going: that part is set aside alone
//! ([`SetAside`]) as a delivery of its own — the envelope around exactly that entry or that
//! one item, the item's bytes as received — with the reason, so ingest can keep it on
//! `messenger.unparsed` (where a replay parses it like any body) while the batch's other
//! events go to their queues. Only an envelope that cannot be read at all fails as a whole.

use serde_json::value::RawValue;
use time::OffsetDateTime;

use super::{
    EventDetails, EventKind, Fields, ParseError, WebhookEvent, array, content_key, entry_page_id,
    object, parse_entry, parse_timestamp, preview, string,
};

/// One part of a delivery, in the body's order.
#[derive(Debug)]
pub enum DeliveryPart {
    /// An event, parsed.
    Event(Box<WebhookEvent>),
    /// An entry or an item that could not be parsed, set aside alone.
    SetAside(SetAside),
}

/// An entry or an item that could not be parsed, as a delivery of its own.
#[derive(Debug)]
pub struct SetAside {
    /// Why, located in the original body (e.g. `at entry[0].messaging[3]: bad timestamp…`).
    pub error: ParseError,
    /// `{"object":"page","entry":[…]}` around exactly the part, its bytes as received.
    pub body: Vec<u8>,
}

/// Parses a delivery into its parts (see the module doc). Fails only when the body is not a
/// JSON object, not a `page` delivery, or has no `entry` array.
pub fn parse_delivery_parts(body: &[u8]) -> Result<Vec<DeliveryPart>, ParseError> {
    let text = std::str::from_utf8(body).map_err(ParseError::NotUtf8)?;
    let root: &RawValue = serde_json::from_str(text).map_err(ParseError::NotJson)?;
    let envelope = object(root).ok_or(ParseError::NotAnObject { what: "body" })?;
    let kind = envelope
        .get("object")
        .ok_or(ParseError::missing("object"))?;
    if string(kind).as_deref() != Some("page") {
        return Err(ParseError::NotAPageObject(preview(kind.get())));
    }
    let entries = envelope.get("entry").ok_or(ParseError::missing("entry"))?;
    let entries = array(entries).ok_or(ParseError::wrong("entry", "an array"))?;
    let mut parts = Vec::new();
    for (i, entry) in entries.into_iter().enumerate() {
        let mut entry_parts = Vec::new();
        let prefix = format!("entry[{i}]");
        match parse_entry(entry, &mut entry_parts) {
            Ok(()) => parts.extend(entry_parts.into_iter().map(|part| match part {
                DeliveryPart::SetAside(mut s) => {
                    s.error = s.error.at(&prefix);
                    DeliveryPart::SetAside(s)
                }
                event => event,
            })),
            // The entry itself is unusable (no id, a bad time…): set aside whole, and none of
            // its items are published, since none of them can be attributed.
            Err(e) => parts.push(DeliveryPart::SetAside(SetAside {
                error: e.at(&prefix),
                body: envelope_of(entry.get()),
            })),
        }
    }
    Ok(parts)
}

/// `{"object":"page","entry":[<entry>]}` with the entry's bytes as received.
fn envelope_of(entry_json: &str) -> Vec<u8> {
    format!(r#"{{"object":"page","entry":[{entry_json}]}}"#).into_bytes()
}

/// The item at `channel` (`messaging` or `standby`) of the page's entry, alone in an
/// envelope with the entry's id and time, its bytes as received.
pub(super) fn item_alone(
    page_id: &str,
    time: Option<&RawValue>,
    channel: &str,
    item: &RawValue,
    error: ParseError,
) -> SetAside {
    // The id is re-encoded as a JSON string (it was read as one, or as digits).
    let id = serde_json::to_string(page_id).unwrap_or_else(|_| "\"\"".to_owned());
    let time = time.map_or_else(String::new, |t| format!(r#","time":{}"#, t.get()));
    SetAside {
        error,
        body: envelope_of(&format!(
            r#"{{"id":{id}{time},"{channel}":[{}]}}"#,
            item.get()
        )),
    }
}

/// Members of an entry that carry no content of their own.
const ENTRY_FRAME: [&str; 4] = ["id", "time", "messaging", "standby"];

/// An entry without items that carries something else (`changes` of a feed or another
/// subscription of the same app): one `Other` event keeping the whole entry, for its page.
/// `None` when there is nothing but the frame (an empty entry).
pub(super) fn other_entry(
    entry: &Fields<'_>,
    raw: &RawValue,
) -> Result<Option<WebhookEvent>, ParseError> {
    if entry
        .0
        .iter()
        .all(|(k, _)| ENTRY_FRAME.contains(&k.as_str()))
    {
        return Ok(None);
    }
    let page_id = entry_page_id(entry)?;
    // Nothing orders or acts on these: any plausible time will do.
    let timestamp = entry
        .get("time")
        .and_then(|t| parse_timestamp(t).ok())
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    Ok(Some(WebhookEvent {
        kind: EventKind::Other,
        idempotency_key: content_key(&page_id, raw),
        page_id,
        timestamp,
        raw: raw.to_owned(),
        details: EventDetails::Other,
    }))
}
