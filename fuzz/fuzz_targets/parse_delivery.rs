//! Fuzzes the webhook envelope parser with arbitrary bodies.
//!
//! Beyond "never panics": whatever `parse_delivery` accepts must survive the trip through
//! the queue, i.e. its [`QueuedEvent`] serialises, deserialises and re-parses to the same
//! kind and page (a mismatch would dead-letter a message ingest acknowledged).
#![no_main]

use lc_meta::webhook::{QueuedEvent, parse_delivery};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let Ok(events) = parse_delivery(body) else {
        return;
    };
    for event in &events {
        let queued = QueuedEvent::from_webhook(event);
        let bytes = serde_json::to_vec(&queued).expect("a QueuedEvent always serialises");
        let back: QueuedEvent =
            serde_json::from_slice(&bytes).expect("a serialised QueuedEvent deserialises");
        let reparsed = back
            .parse()
            .expect("an accepted event re-parses from the queue");
        assert_eq!(reparsed.kind, event.kind);
        assert_eq!(reparsed.page_id, event.page_id);
        assert_eq!(back.idempotency_key, queued.idempotency_key);
    }
});
