//! Meta's webhook deliveries as tests build and post them: items, bodies, signatures.

use lc_ingest::RunningIngest;
use lc_meta::signature::sign_sha256;
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::APP_SECRET;

/// A W3C traceparent for deliveries posted inside a known trace, so a test can find the same
/// trace id on what the services publish.
pub const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Unix milliseconds of a time, as webhook timestamps are written.
pub fn ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).expect("ms")
}

/// A Login Connect opt-in item.
pub fn optin_item(page: &str, login_id: &str, at: OffsetDateTime) -> Value {
    json!({"recipient": {"id": page}, "timestamp": ms(at), "optin": {"login_id": login_id}})
}

/// A quick reply (the first message's "Track my order") carrying `prior_message.identifier`.
pub fn reply_item(page: &str, psid: &str, mid: &str, login_id: &str, at: OffsetDateTime) -> Value {
    json!({"sender": {"id": psid}, "recipient": {"id": page}, "timestamp": ms(at),
           "message": {"mid": mid, "text": "Track my order", "quick_reply": {"payload": "TRACK"}},
           "prior_message": {"source": "login_connect", "identifier": login_id}})
}

/// A typed text reply (no quick reply) carrying `prior_message` with the documented
/// `identifier` key.
pub fn text_reply_item(
    page: &str,
    psid: &str,
    mid: &str,
    login_id: &str,
    at: OffsetDateTime,
) -> Value {
    json!({"sender": {"id": psid}, "recipient": {"id": page}, "timestamp": ms(at),
           "message": {"mid": mid, "text": "Track my order"},
           "prior_message": {"source": "login_connect", "identifier": login_id}})
}

/// A webhook body with these items for one page, sent now.
pub fn body(page: &str, items: Vec<Value>) -> Vec<u8> {
    body_at(page, items, ms(OffsetDateTime::now_utc()))
}

/// A webhook body with these items for one page and the entry time `time_ms`.
pub fn body_at(page: &str, items: Vec<Value>, time_ms: i64) -> Vec<u8> {
    serde_json::to_vec(&json!({"object": "page", "entry": [
        {"id": page, "time": time_ms, "messaging": items}
    ]}))
    .expect("json")
}

/// Posts a body signed with [`APP_SECRET`] and returns the status code.
pub async fn post_signed(ingest: &RunningIngest, body: Vec<u8>) -> u16 {
    signed_request(ingest, body)
        .send()
        .await
        .expect("post")
        .status()
        .as_u16()
}

/// Posts a body signed with [`APP_SECRET`] inside the trace `traceparent`; returns the
/// status code.
pub async fn post_signed_traced(ingest: &RunningIngest, body: Vec<u8>, traceparent: &str) -> u16 {
    signed_request(ingest, body)
        .header("traceparent", traceparent)
        .send()
        .await
        .expect("post")
        .status()
        .as_u16()
}

fn signed_request(ingest: &RunningIngest, body: Vec<u8>) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .post(format!("http://{}/webhook", ingest.addr))
        .header("x-hub-signature-256", sign_sha256(APP_SECRET, &body))
        .header("content-type", "application/json")
        .body(body)
}
