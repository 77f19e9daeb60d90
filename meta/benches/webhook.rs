//! Micro-benchmarks of the per-request CPU work of ingest and the workers, per core:
//! HMAC-SHA256 verification of webhook bodies (`SignatureVerifier::verify`), parsing a
//! delivery (`parse_delivery` of 1 and 50 events), and a worker's decode of one queued event.
//!
//! `cargo bench -p loginconnect-shared` (criterion; one core per measurement).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lc_meta::secret::Secret;
use lc_meta::signature::{SignatureVerifier, sign_sha256};
use lc_meta::webhook::{QueuedEvent, parse_delivery};
use serde_json::{Value, json};

mod common {
    //! Realistic webhook bodies, built like the `bench` crate's.
    use super::{Value, json};
    /// A reply carrying `prior_message`, padded to about 1 KB like the harness's events.
    pub fn reply_item(n: usize) -> Value {
        let mut item = json!({
            "sender": {"id": format!("{}", 7_000_000_000_000_000u64 + n as u64)},
            "recipient": {"id": "900000000000000"},
            "timestamp": 1_700_000_000_000i64 + n as i64,
            "message": {"mid": format!("m_bench{n:012}AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"), "text": "",
                        "quick_reply": {"payload": "TRACK"}},
            "prior_message": {"source": "login_connect", "identifier": format!("login-bench-{n:08}")}
        });
        let bare = item.to_string().len();
        let words =
            "Hi, I signed up on your site yesterday and I would like to know where my order is. ";
        let text: String = words
            .chars()
            .cycle()
            .take(1000usize.saturating_sub(bare))
            .collect();
        item["message"]["text"] = Value::String(text);
        item
    }

    /// A webhook body of `events` ~1 KB replies in one entry.
    pub fn body(events: usize) -> Vec<u8> {
        let items: Vec<Value> = (0..events).map(reply_item).collect();
        json!({"object": "page", "entry": [{"id": "900000000000000", "time": 1_700_000_000_000i64, "messaging": items}]})
            .to_string()
            .into_bytes()
    }

    /// A Login Connect opt-in body (about 200 bytes).
    pub fn optin_body() -> Vec<u8> {
        json!({"object": "page", "entry": [{"id": "900000000000000", "time": 1_700_000_000_000i64, "messaging": [
            {"recipient": {"id": "900000000000000"}, "timestamp": 1_700_000_000_000i64, "optin": {"login_id": "login-bench-00000001"}}
        ]}]})
        .to_string()
        .into_bytes()
    }
}

fn verify(c: &mut Criterion) {
    let one = SignatureVerifier::new(&[Secret::new("bench-app-secret")], false);
    let two = SignatureVerifier::new(
        &[
            Secret::new("old-app-secret"),
            Secret::new("bench-app-secret"),
        ],
        false,
    );
    let mut group = c.benchmark_group("signature_verify");
    for (label, body) in [
        ("optin_200B", common::optin_body()),
        ("1_event_1KB", common::body(1)),
        ("50_events_50KB", common::body(50)),
    ] {
        let sig = sign_sha256("bench-app-secret", &body);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(format!("{label}/1_secret"), |b| {
            b.iter(|| one.verify(black_box(Some(sig.as_str())), None, black_box(&body)));
        });
        // Every configured secret is tried (constant time), so a rotation doubles the work.
        group.bench_function(format!("{label}/2_secrets"), |b| {
            b.iter(|| two.verify(black_box(Some(sig.as_str())), None, black_box(&body)));
        });
    }
    group.finish();
}

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse_delivery");
    for (label, body, events) in [
        ("optin", common::optin_body(), 1u64),
        ("1_event_1KB", common::body(1), 1),
        ("50_events_50KB", common::body(50), 50),
    ] {
        group.throughput(Throughput::Elements(events));
        group.bench_function(label, |b| b.iter(|| parse_delivery(black_box(&body))));
    }
    group.finish();

    let mut group = c.benchmark_group("queued_event");
    let events = parse_delivery(&common::body(1)).unwrap_or_default();
    if let Some(ev) = events.first() {
        let queued = QueuedEvent::from_webhook(ev);
        let json = serde_json::to_vec(&queued).unwrap_or_default();
        group.throughput(Throughput::Elements(1));
        group.bench_function("encode_1KB", |b| {
            b.iter(|| serde_json::to_vec(black_box(&queued)))
        });
        group.bench_function("decode_and_parse_1KB", |b| {
            b.iter(|| {
                serde_json::from_slice::<QueuedEvent>(black_box(&json))
                    .ok()
                    .map(|q| q.parse())
            });
        });
    }
    group.finish();
}

criterion_group!(benches, verify, parse);
criterion_main!(benches);
