//! Realistic webhook bodies, signed like Meta signs them.
//!
//! A reply item carries a ~600-character text, a quick-reply payload and `prior_message`, so
//! one event is about 1 KB as a webhook item; a batch body carries 50 of them in one entry.

use lc_meta::signature::sign_sha256;
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::env::APP_SECRET;

/// Target size of one event item in bytes.
pub const EVENT_BYTES: usize = 1000;

/// A body ready to post, with its `X-Hub-Signature-256` value.
#[derive(Debug, Clone)]
pub struct SignedBody {
    /// The raw JSON bytes (cheap to clone per request).
    pub body: bytes::Bytes,
    /// `sha256=<hex>`.
    pub signature: String,
    /// Number of events in it.
    pub events: u64,
}

/// Unix milliseconds.
pub fn unix_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// A reply with `prior_message` naming `login_id`, padded to about [`EVENT_BYTES`].
pub fn reply_item(page: &str, psid: &str, mid: &str, login_id: &str, at_ms: i64) -> Value {
    let mut item = json!({
        "sender": {"id": psid},
        "recipient": {"id": page},
        "timestamp": at_ms,
        "message": {"mid": mid, "text": "", "quick_reply": {"payload": "TRACK"}},
        "prior_message": {"source": "login_connect", "identifier": login_id}
    });
    let bare = item.to_string().len();
    let words =
        "Hi, I signed up on your site yesterday and I would like to know where my order is. ";
    let text: String = words
        .chars()
        .cycle()
        .take(EVENT_BYTES.saturating_sub(bare))
        .collect();
    item["message"]["text"] = Value::String(text);
    item
}

/// A Login Connect opt-in item.
pub fn optin_item(page: &str, login_id: &str, at_ms: i64) -> Value {
    json!({"recipient": {"id": page}, "timestamp": at_ms, "optin": {"login_id": login_id}})
}

/// A webhook body with `items` in one entry of `page`.
pub fn delivery(page: &str, items: Vec<Value>, at_ms: i64) -> Vec<u8> {
    json!({"object": "page", "entry": [{"id": page, "time": at_ms, "messaging": items}]})
        .to_string()
        .into_bytes()
}

/// Signs a body with [`APP_SECRET`].
pub fn sign(body: Vec<u8>, events: u64) -> SignedBody {
    let signature = sign_sha256(APP_SECRET, &body);
    SignedBody {
        body: body.into(),
        signature,
        events,
    }
}

/// `count` distinct signed bodies of `events_per_body` reply events each, spread over `pages`.
/// Event `n` (counting from 0 over all bodies) names login_id [`login_id`]`(n)` and goes to
/// page `pages[(n / events_per_body) % pages.len()]`.
pub fn reply_bodies(pages: &[String], count: usize, events_per_body: usize) -> Vec<SignedBody> {
    reply_bodies_from(pages, 0, count, events_per_body)
}

/// The login_id of reply event `n` of [`reply_bodies`].
pub fn login_id(n: usize) -> String {
    format!("login-bench-{n:08}")
}

/// Like [`reply_bodies`], starting at body number `first`.
pub fn reply_bodies_from(
    pages: &[String],
    first: usize,
    count: usize,
    events_per_body: usize,
) -> Vec<SignedBody> {
    let now = unix_ms(OffsetDateTime::now_utc());
    (first..first + count)
        .map(|b| {
            let page = &pages[b % pages.len().max(1)];
            let items = (0..events_per_body)
                .map(|e| {
                    let n = b * events_per_body + e;
                    reply_item(
                        page,
                        &format!("{}", 7_000_000_000_000_000u64 + n as u64),
                        &format!("m_bench{n:012}AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"),
                        &login_id(n),
                        now,
                    )
                })
                .collect();
            sign(delivery(page, items, now), events_per_body as u64)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_realistic_and_parse() {
        let pages = vec!["1".to_owned(), "2".to_owned()];
        let one = reply_bodies(&pages, 2, 1);
        assert!(
            (1000..1200).contains(&one[0].body.len()),
            "{}",
            one[0].body.len()
        );
        let batch = reply_bodies(&pages, 1, 50);
        let events = lc_meta::webhook::parse_delivery(&batch[0].body).expect("parses");
        assert_eq!(events.len(), 50);
        assert!(
            events
                .iter()
                .all(|e| e.kind == lc_meta::webhook::EventKind::Message)
        );
    }
}
