use super::*;

use serde_json::json;

const PAGE_A: &str = "106283175398765";
const PAGE_B: &str = "208765432101234";
const PSID: &str = "5934617289162083";

macro_rules! fixture {
    ($name:literal) => {
        include_str!(concat!("../../tests/fixtures/webhook/", $name, ".json"))
    };
}

fn parse_one(body: &str) -> WebhookEvent {
    let mut events = parse_delivery(body.as_bytes()).expect("delivery parses");
    assert_eq!(events.len(), 1, "expected exactly one event");
    events.remove(0)
}

fn at_ms(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap()
}

/// The expected content key, computed independently of the module's canonicaliser.
fn expected_hash(page_id: &str, canonical: &str) -> String {
    let mut sha = Sha256::new();
    sha.update(page_id.as_bytes());
    sha.update(b"\n");
    sha.update(canonical.as_bytes());
    format!("sha256:{}", hex::encode(sha.finalize()))
}

/// `raw` must be the item exactly as it appears in the body, not a re-serialisation.
fn assert_raw_is_verbatim(body: &str, ev: &WebhookEvent) {
    let raw = ev.raw.get();
    assert!(
        body.contains(raw),
        "raw is not a substring of the body: {raw}"
    );
    assert!(raw.starts_with('{') && raw.ends_with('}'));
}

fn assert_other(ev: &WebhookEvent, page: &str, ts_ms: i64) {
    assert_eq!(ev.kind, EventKind::Other);
    assert_eq!(ev.details, EventDetails::Other);
    assert_eq!(ev.page_id, page);
    assert_eq!(ev.timestamp, at_ms(ts_ms));
    assert!(ev.idempotency_key.starts_with("sha256:"));
    assert_eq!(ev.idempotency_key.len(), "sha256:".len() + 64);
    assert_eq!(ev.idempotency_key, content_key(page, &ev.raw));
}

fn reply(psid: &str, mid: Option<&str>, text: Option<&str>) -> Reply {
    Reply {
        psid: psid.to_owned(),
        mid: mid.map(str::to_owned),
        text: text.map(str::to_owned),
        quick_reply_payload: None,
        postback_payload: None,
        prior_message: None,
    }
}

fn prior(source: Option<&str>, login_id: &str) -> Option<PriorMessage> {
    Some(PriorMessage {
        source: source.map(str::to_owned),
        login_id: login_id.to_owned(),
    })
}

/// A one-item delivery for `PAGE_A` built around `item`.
fn body_with_item(item: &str) -> String {
    format!(
        r#"{{"object":"page","entry":[{{"id":"{PAGE_A}","time":1700000000999,"messaging":[{item}]}}]}}"#
    )
}

fn err_of(body: &[u8]) -> ParseError {
    match parse_delivery(body) {
        Ok(events) => panic!("expected an error, got {} events", events.len()),
        Err(e) => e,
    }
}

// ---- fixture corpus -------------------------------------------------------------------------

#[test]
fn login_connect_optin_without_sender() {
    let body = fixture!("optin_login_connect");
    let ev = parse_one(body);
    assert_eq!(ev.kind, EventKind::Optin);
    assert_eq!(ev.page_id, PAGE_A);
    assert_eq!(ev.timestamp, at_ms(1_700_000_000_000));
    assert_eq!(
        ev.idempotency_key,
        format!("optin:{PAGE_A}:AZx9LcLoginId_7f3e2a1b:1700000000000")
    );
    assert_eq!(
        ev.details,
        EventDetails::Optin(Optin {
            login_id: "AZx9LcLoginId_7f3e2a1b".to_owned(),
            optin_type: None,
            reference: None,
            payload: None,
            sender_id: None,
        })
    );
    assert_eq!(
        ev.raw.get(),
        r#"{
          "recipient": { "id": "106283175398765" },
          "timestamp": 1700000000000,
          "optin": { "login_id": "AZx9LcLoginId_7f3e2a1b" }
        }"#
    );
}

#[test]
fn optin_with_type_ref_payload_and_sender() {
    let body = fixture!("optin_full");
    let ev = parse_one(body);
    assert_eq!(ev.kind, EventKind::Optin);
    assert_eq!(ev.page_id, PAGE_A);
    assert_eq!(ev.timestamp, at_ms(1_700_000_100_000));
    assert_eq!(
        ev.idempotency_key,
        format!("optin:{PAGE_A}:AZx9LcLoginId_full01:1700000100000")
    );
    assert_eq!(
        ev.details,
        EventDetails::Optin(Optin {
            login_id: "AZx9LcLoginId_full01".to_owned(),
            optin_type: Some("login_connect".to_owned()),
            reference: Some("signup-2024".to_owned()),
            payload: Some("CAMPAIGN_7".to_owned()),
            sender_id: Some(PSID.to_owned()),
        })
    );
    assert_raw_is_verbatim(body, &ev);
}

#[test]
fn checkbox_and_marketing_optins_are_other() {
    let body = fixture!("optin_checkbox_user_ref");
    let ev = parse_one(body);
    assert_other(&ev, PAGE_A, 1_458_692_752_478);
    assert_raw_is_verbatim(body, &ev);

    let body = fixture!("optin_notification_messages");
    let ev = parse_one(body);
    assert_other(&ev, PAGE_A, 1_700_000_199_000);
    assert_raw_is_verbatim(body, &ev);
}

#[test]
fn text_message() {
    let body = fixture!("message_text");
    let ev = parse_one(body);
    let mid =
        "m_AG5Hz2Uq7tuwNEhXfYYKj8mJEM_QPpz5jdCK48PnKAjSdjfipqxqMvK8ma6AC8fplwlqLP_5cgXIbu7I3rBN0P";
    assert_eq!(ev.kind, EventKind::Message);
    assert_eq!(ev.page_id, PAGE_A);
    assert_eq!(ev.timestamp, at_ms(1_458_692_752_478));
    assert_eq!(ev.idempotency_key, format!("mid:{mid}"));
    assert_eq!(
        ev.details,
        EventDetails::Message(reply(PSID, Some(mid), Some("hello")))
    );
    assert_raw_is_verbatim(body, &ev);
}

#[test]
fn quick_reply_with_prior_message_identifier() {
    let body = fixture!("message_quick_reply_prior_message");
    let ev = parse_one(body);
    assert_eq!(ev.kind, EventKind::Message);
    assert_eq!(ev.page_id, PAGE_A);
    assert_eq!(ev.timestamp, at_ms(1_700_000_000_000));
    assert_eq!(ev.idempotency_key, "mid:m_qr_0001");
    assert_eq!(
        ev.details,
        EventDetails::Message(Reply {
            quick_reply_payload: Some("CURATION".to_owned()),
            prior_message: prior(Some("login_connect"), "AZx9LcLoginId_7f3e2a1b"),
            ..reply(PSID, Some("m_qr_0001"), Some("Outfit suggestions"))
        })
    );
    assert_raw_is_verbatim(body, &ev);
}

#[test]
fn prior_message_login_id_variant_and_numeric_quick_reply_payload() {
    let body = fixture!("message_prior_message_login_id");
    let ev = parse_one(body);
    assert_eq!(ev.kind, EventKind::Message);
    assert_eq!(ev.timestamp, at_ms(1_700_000_300_000));
    assert_eq!(ev.idempotency_key, "mid:m_pm_login_id");
    assert_eq!(
        ev.details,
        EventDetails::Message(Reply {
            quick_reply_payload: Some("42".to_owned()),
            prior_message: prior(Some("checkbox_plugin"), "AZx9LcLoginId_alt"),
            ..reply(PSID, Some("m_pm_login_id"), Some("hi!"))
        })
    );
    assert_raw_is_verbatim(body, &ev);
}

#[test]
fn postback_with_prior_message() {
    let body = fixture!("postback_prior_message");
    let ev = parse_one(body);
    assert_eq!(ev.kind, EventKind::Postback);
    assert_eq!(ev.page_id, PAGE_A);
    assert_eq!(ev.timestamp, at_ms(1_700_000_400_000));
    assert_eq!(ev.idempotency_key, "mid:m_pb_0001");
    assert_eq!(
        ev.details,
        EventDetails::Postback(Reply {
            postback_payload: Some("GET_STARTED".to_owned()),
            prior_message: prior(Some("login_connect"), "AZx9LcLoginId_7f3e2a1b"),
            ..reply(PSID, Some("m_pb_0001"), Some("Get Started"))
        })
    );
    assert_raw_is_verbatim(body, &ev);
}

#[test]
fn echo_is_other() {
    let body = fixture!("message_echo");
    let ev = parse_one(body);
    assert_other(&ev, PAGE_A, 1_457_764_197_627);
    assert_raw_is_verbatim(body, &ev);
}

#[test]
fn delivery_uses_watermark_and_canonical_hash() {
    let body = fixture!("delivery");
    let ev = parse_one(body);
    assert_other(&ev, PAGE_A, 1_458_668_856_253);
    assert_raw_is_verbatim(body, &ev);
    // Keys sorted at every level: delivery < recipient < sender; mids < watermark.
    let canonical = r#"{"delivery":{"mids":["mid.1458668856218:ed81099e15d3f4f233"],"watermark":1458668856253},"recipient":{"id":"106283175398765"},"sender":{"id":"5934617289162083"}}"#;
    assert_eq!(ev.idempotency_key, expected_hash(PAGE_A, canonical));
}

#[test]
fn read_reaction_referral_edit_policy_are_other() {
    let cases = [
        (fixture!("read"), 1_458_668_856_463),
        (fixture!("reaction"), 1_700_000_500_000),
        (fixture!("referral"), 1_700_000_600_000),
        (fixture!("message_edit"), 1_700_000_700_000),
        (fixture!("policy_enforcement"), 1_700_000_800_000),
    ];
    for (body, ts) in cases {
        let ev = parse_one(body);
        assert_other(&ev, PAGE_A, ts);
        assert_raw_is_verbatim(body, &ev);
    }
}

#[test]
fn reaction_keeps_escaped_emoji_in_raw() {
    let ev = parse_one(fixture!("reaction"));
    assert!(ev.raw.get().contains(r#""emoji":"\u2764\ufe0f""#));
}

#[test]
fn standby_reply_with_prior_message_is_a_message_to_link() {
    let body = fixture!("standby");
    let ev = parse_one(body);
    assert_eq!(ev.kind, EventKind::Message);
    assert_raw_is_verbatim(body, &ev);
    let EventDetails::Message(reply) = &ev.details else {
        panic!("not a message: {:?}", ev.details);
    };
    assert_eq!(
        reply.prior_message,
        Some(PriorMessage {
            source: Some("login_connect".into()),
            login_id: "AZx9LcLoginId_7f3e2a1b".into(),
        })
    );
    assert_eq!(ev.idempotency_key, "mid:m_standby_0001");
    // Queued, it reads back as the same message.
    let again = QueuedEvent::from_webhook(&ev).parse().unwrap();
    assert_eq!(again.details, ev.details);
}

#[test]
fn other_standby_items_are_other() {
    let item = |v: serde_json::Value| {
        let body = json!({"object": "page", "entry": [{"id": PAGE_A, "time": 1_700_000_900_100_i64,
            "standby": [v]}]});
        parse_delivery(body.to_string().as_bytes())
            .unwrap()
            .remove(0)
    };
    let plain = item(
        json!({"sender": {"id": "1"}, "timestamp": 1_700_000_900_000_i64,
        "message": {"mid": "m_s", "text": "to the inbox"}}),
    );
    assert_other(&plain, PAGE_A, 1_700_000_900_000);
    // Read as a `messaging` item, the same bytes would be a message: only the channel differs.
    assert_eq!(
        parse_item(PAGE_A, &plain.raw, None).unwrap().kind,
        EventKind::Message
    );
    let postback = item(
        json!({"sender": {"id": "1"}, "timestamp": 1_700_000_900_000_i64,
        "postback": {"mid": "m_p", "title": "Menu"}}),
    );
    assert_eq!(postback.kind, EventKind::Other);
    // An echo is never a reply, prior_message or not.
    let echo = item(
        json!({"sender": {"id": PAGE_A}, "timestamp": 1_700_000_900_000_i64,
        "message": {"mid": "m_e", "is_echo": true},
        "prior_message": {"source": "login_connect", "identifier": "L"}}),
    );
    assert_eq!(echo.kind, EventKind::Other);
    // Queued as `other`, an item stays `other` even if it carries prior_message.
    let mut queued = QueuedEvent::from_webhook(&plain);
    queued.event = serde_json::value::RawValue::from_string(
        json!({"sender": {"id": "1"}, "timestamp": 1_700_000_900_000_i64,
               "message": {"mid": "m_s"},
               "prior_message": {"source": "login_connect", "identifier": "L"}})
        .to_string(),
    )
    .unwrap();
    assert_eq!(queued.parse().unwrap().kind, EventKind::Other);
}

#[test]
fn string_timestamp_in_seconds_and_postback_without_mid() {
    let body = fixture!("postback_timestamp_string_seconds");
    let ev = parse_one(body);
    assert_eq!(ev.kind, EventKind::Postback);
    assert_eq!(ev.page_id, PAGE_A);
    assert_eq!(ev.timestamp, at_ms(1_527_459_824_000));
    assert_eq!(
        ev.details,
        EventDetails::Postback(Reply {
            postback_payload: Some("MENU".to_owned()),
            ..reply(PSID, None, Some("Menu"))
        })
    );
    // No mid: falls through to the content hash.
    assert_eq!(ev.idempotency_key, content_key(PAGE_A, &ev.raw));
    assert!(ev.idempotency_key.starts_with("sha256:"));
}

#[test]
fn numeric_entry_and_sender_ids() {
    let body = fixture!("entry_id_number");
    let ev = parse_one(body);
    assert_eq!(ev.kind, EventKind::Message);
    assert_eq!(ev.page_id, PAGE_A);
    assert_eq!(ev.timestamp, at_ms(1_700_001_000_000));
    assert_eq!(ev.idempotency_key, "mid:m_numeric_ids");
    assert_eq!(
        ev.details,
        EventDetails::Message(reply(PSID, Some("m_numeric_ids"), Some("numbers")))
    );
}

#[test]
fn unicode_text_is_decoded_but_raw_keeps_escapes() {
    let body = fixture!("unicode_text");
    let ev = parse_one(body);
    assert_eq!(ev.kind, EventKind::Message);
    let EventDetails::Message(r) = &ev.details else {
        panic!("not a message")
    };
    assert_eq!(
        r.text.as_deref(),
        Some("Grüße aus Märchenland 😀 / \"quoted\"")
    );
    let raw = ev.raw.get();
    assert!(raw.contains(r"M\u00e4rchenland"));
    assert!(raw.contains(r#"\ud83d\ude00 \/ \"quoted\""#));
    assert!(!raw.contains('ä'));
    assert_eq!(
        raw,
        r#"{"sender":{"id":"5934617289162083"},"recipient":{"id":"106283175398765"},"timestamp":1700001100000,"message":{"mid":"m_unicode","text":"Gr\u00fc\u00dfe aus M\u00e4rchenland \ud83d\ude00 \/ \"quoted\""}}"#
    );
    let queued = QueuedEvent::from_webhook(&ev);
    let json = serde_json::to_string(&queued).unwrap();
    assert!(json.contains(r"M\u00e4rchenland"));
}

#[test]
fn batched_delivery_keeps_order_pages_and_kinds() {
    let body = fixture!("batched");
    let events = parse_delivery(body.as_bytes()).unwrap();
    let summary: Vec<_> = events
        .iter()
        .map(|e| (e.page_id.as_str(), e.kind, e.timestamp))
        .collect();
    assert_eq!(
        summary,
        [
            (PAGE_A, EventKind::Message, at_ms(1_700_002_000_000)),
            (PAGE_A, EventKind::Other, at_ms(1_700_001_999_000)),
            (PAGE_B, EventKind::Optin, at_ms(1_700_002_001_000)),
            (PAGE_B, EventKind::Postback, at_ms(1_700_002_001_500)),
            (PAGE_A, EventKind::Other, at_ms(1_700_002_002_000)),
            (PAGE_A, EventKind::Message, at_ms(1_700_002_002_500)),
        ]
    );
    for ev in &events {
        assert_raw_is_verbatim(body, ev);
    }
    assert_eq!(
        events[0].details,
        EventDetails::Message(reply(PSID, Some("m_batch_1"), Some("first")))
    );
    assert_eq!(events[0].idempotency_key, "mid:m_batch_1");
    assert_eq!(
        events[1].idempotency_key,
        content_key(PAGE_A, &events[1].raw)
    );
    assert_eq!(
        events[2].details,
        EventDetails::Optin(Optin {
            login_id: "LOGIN_B_1".to_owned(),
            optin_type: None,
            reference: None,
            payload: None,
            sender_id: None,
        })
    );
    assert_eq!(
        events[2].idempotency_key,
        format!("optin:{PAGE_B}:LOGIN_B_1:1700002001000")
    );
    assert_eq!(
        events[3].details,
        EventDetails::Postback(Reply {
            postback_payload: Some("YES".to_owned()),
            ..reply("7712345678901234", Some("m_batch_pb"), Some("Yes"))
        })
    );
    assert_eq!(events[3].idempotency_key, "mid:m_batch_pb");
    assert_eq!(
        events[4].idempotency_key,
        content_key(PAGE_A, &events[4].raw)
    );
    assert_eq!(
        events[5].details,
        EventDetails::Message(Reply {
            quick_reply_payload: Some("YES".to_owned()),
            prior_message: prior(Some("login_connect"), "LOGIN_A_1"),
            ..reply(PSID, Some("m_batch_2"), Some("Yes"))
        })
    );
    assert_eq!(events[5].idempotency_key, "mid:m_batch_2");
}

// ---- shapes and typing ----------------------------------------------------------------------

#[test]
fn entries_without_items_contribute_nothing() {
    let body = json!({"object": "page", "entry": [
        {"id": PAGE_A, "time": 1},
        {"id": PAGE_A, "time": 1, "messaging": []},
        {"id": PAGE_A, "time": 1, "messaging": null},
    ]});
    let events = parse_delivery(body.to_string().as_bytes()).unwrap();
    assert!(events.is_empty());
    let empty = parse_delivery(br#"{"object":"page","entry":[]}"#).unwrap();
    assert!(empty.is_empty());
}

#[test]
fn a_changes_entry_is_one_other_event_keeping_the_entry() {
    let entry =
        r#"{"id":"106","time":1700000001000,"changes":[{"field":"feed","value":{"verb":"add"}}]}"#;
    let body = format!(r#"{{"object":"page","entry":[{entry},{{"id":"106","messaging":[]}}]}}"#);
    let events = parse_delivery(body.as_bytes()).unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, EventKind::Other);
    assert_eq!(events[0].page_id, "106");
    assert_eq!(events[0].raw.get(), entry, "the entry, byte for byte");
    assert_eq!(events[0].timestamp.unix_timestamp(), 1_700_000_001);
    // Without an id there is no page to keep it for: the entry is set aside.
    let parts = parse_delivery_parts(br#"{"object":"page","entry":[{"changes":[]}]}"#).unwrap();
    assert!(matches!(parts.as_slice(), [DeliveryPart::SetAside(_)]));
}

#[test]
fn a_bad_item_or_entry_is_set_aside_alone() {
    let body = br#"{"object":"page","entry":[{"id":"106","time":5,"messaging":[{"timestamp":1700000000000,"optin":{"login_id":"A"}},{"timestamp":"soon","optin":{"login_id":"B"}}]},{"time":5,"messaging":[{"timestamp":1700000000000,"optin":{"login_id":"C"}}]},{"id":"107","standby":[{"x":1}]}]}"#;
    let parts = parse_delivery_parts(body).unwrap();
    assert_eq!(parts.len(), 4);
    assert!(matches!(&parts[0], DeliveryPart::Event(e) if e.kind == EventKind::Optin));
    let DeliveryPart::SetAside(item) = &parts[1] else {
        panic!("the bad item is set aside: {parts:?}");
    };
    assert!(
        item.error
            .to_string()
            .starts_with("at entry[0].messaging[1]: bad timestamp")
    );
    assert_eq!(
        String::from_utf8_lossy(&item.body),
        r#"{"object":"page","entry":[{"id":"106","time":5,"messaging":[{"timestamp":"soon","optin":{"login_id":"B"}}]}]}"#
    );
    let DeliveryPart::SetAside(entry) = &parts[2] else {
        panic!("the entry without id is set aside: {parts:?}");
    };
    assert!(
        entry
            .error
            .to_string()
            .starts_with("at entry[1]: missing field `id`")
    );
    assert!(matches!(&parts[3], DeliveryPart::Event(e) if e.kind == EventKind::Other));
    // The whole-body parser still refuses the body, naming the first bad part.
    let err = parse_delivery(body).unwrap_err();
    assert!(
        err.to_string().starts_with("at entry[0].messaging[1]"),
        "{err}"
    );
}

#[test]
fn messaging_and_standby_in_one_entry() {
    let body = json!({"object": "page", "entry": [{"id": PAGE_A, "time": 1_700_000_000_000_i64,
        "standby": [{"sender": {"id": "1"}, "timestamp": 1_700_000_000_002_i64, "message": {"mid": "m_s"}}],
        "messaging": [{"sender": {"id": "1"}, "timestamp": 1_700_000_000_001_i64, "message": {"mid": "m_m"}}],
    }]});
    let events = parse_delivery(body.to_string().as_bytes()).unwrap();
    let kinds: Vec<_> = events.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [EventKind::Message, EventKind::Other]);
}

#[test]
fn prior_message_edge_cases() {
    let message = |extra: &str, inner: &str| {
        let item = format!(
            r#"{{"sender":{{"id":"1"}},"timestamp":1700000000000,"message":{{"mid":"m_x"{inner}}}{extra}}}"#
        );
        match parse_one(&body_with_item(&item)).details {
            EventDetails::Message(r) => r.prior_message,
            other => panic!("not a message: {other:?}"),
        }
    };
    assert_eq!(message(r#","prior_message":{"source":"x"}"#, ""), None);
    assert_eq!(message(r#","prior_message":{}"#, ""), None);
    assert_eq!(message(r#","prior_message":"LOGIN""#, ""), None);
    assert_eq!(
        message(r#","prior_message":{"identifier":"A","login_id":"B"}"#, ""),
        prior(None, "A")
    );
    assert_eq!(
        message(
            r#","prior_message":{"identifier":12345,"source":"login_connect"}"#,
            ""
        ),
        prior(Some("login_connect"), "12345")
    );
    // Nested inside `message` is accepted when absent at item level; item level wins.
    assert_eq!(
        message("", r#","prior_message":{"source":"s","login_id":"NESTED"}"#),
        prior(Some("s"), "NESTED")
    );
    assert_eq!(
        message(
            r#","prior_message":{"identifier":"TOP"}"#,
            r#","prior_message":{"identifier":"NESTED"}"#
        ),
        prior(None, "TOP")
    );
    assert_eq!(
        message(r#","priorMessage":{"login_id":"CAMEL"}"#, ""),
        prior(None, "CAMEL")
    );
}

#[test]
fn malformed_messages_and_postbacks_are_other() {
    let items = [
        r#"{"timestamp":1700000000000,"message":{"mid":"m_1","text":"no sender"}}"#,
        r#"{"sender":{},"timestamp":1700000000000,"message":{"mid":"m_1"}}"#,
        r#"{"sender":{"id":true},"timestamp":1700000000000,"message":{"mid":"m_1"}}"#,
        r#"{"sender":{"id":""},"timestamp":1700000000000,"message":{"mid":"m_1"}}"#,
        r#"{"sender":{"user_ref":"REF"},"timestamp":1700000000000,"postback":{"payload":"P"}}"#,
        r#"{"sender":{"id":"1"},"timestamp":1700000000000,"message":"text"}"#,
        r#"{"sender":{"id":"1"},"timestamp":1700000000000,"message":{"is_echo":"true"}}"#,
        r#"{"timestamp":1700000000000,"optin":{"login_id":""}}"#,
        r#"{"timestamp":1700000000000,"optin":{"login_id":{"nested":1}}}"#,
        r#"{"timestamp":1700000000000,"optin":"login"}"#,
        r#""just a string""#,
        "[1,2,3]",
        "42",
        "{}",
    ];
    for item in items {
        let ev = parse_one(&body_with_item(item));
        assert_eq!(ev.kind, EventKind::Other, "{item}");
        assert_eq!(ev.details, EventDetails::Other, "{item}");
        assert_eq!(ev.raw.get(), item);
    }
}

#[test]
fn numeric_login_id_and_ref_are_accepted() {
    let item = r#"{"timestamp":1700000000000,"optin":{"login_id":123456789,"ref":7,"type":"x","payload":{"o":1}}}"#;
    let ev = parse_one(&body_with_item(item));
    assert_eq!(
        ev.details,
        EventDetails::Optin(Optin {
            login_id: "123456789".to_owned(),
            optin_type: Some("x".to_owned()),
            reference: Some("7".to_owned()),
            payload: None,
            sender_id: None,
        })
    );
}

#[test]
fn timestamp_formats() {
    let ts = |value: &str| {
        let item = format!(r#"{{"timestamp":{value},"optin":{{"login_id":"L"}}}}"#);
        parse_delivery(body_with_item(&item).as_bytes()).map(|mut e| e.remove(0).timestamp)
    };
    let expected = at_ms(1_700_000_000_000);
    assert_eq!(ts("1700000000000").unwrap(), expected);
    assert_eq!(ts("1700000000").unwrap(), expected);
    assert_eq!(ts(r#""1700000000""#).unwrap(), expected);
    assert_eq!(ts(r#""1700000000000""#).unwrap(), expected);
    assert_eq!(ts(r#"" 1700000000 ""#).unwrap(), expected);
    assert_eq!(ts("1700000000000.0").unwrap(), expected);
    assert_eq!(ts("1.7e12").unwrap(), expected);
    assert_eq!(ts(r#""1.7e9""#).unwrap(), expected);
    assert_eq!(ts("0").unwrap(), OffsetDateTime::UNIX_EPOCH);
    assert_eq!(ts("99999999999").unwrap(), at_ms(99_999_999_999_000));
    assert_eq!(ts("100000000000").unwrap(), at_ms(100_000_000_000));
    assert_eq!(ts("253402300799999").unwrap(), at_ms(253_402_300_799_999));
    // `null` counts as absent: the entry time is used.
    assert_eq!(ts("null").unwrap(), at_ms(1_700_000_000_999));
    for bad in [
        "-1",
        "-1700000000000",
        "253402300800000",
        "1e300",
        "1700000000000.5",
        "123456789012345678901234567890123456789012345",
        r#""""#,
        r#""soon""#,
        r#""NaN""#,
        r#""inf""#,
        "true",
        "{}",
        r#"{"ms":1700000000000}"#,
        "[1700000000000]",
    ] {
        let err = ts(bad).expect_err(bad);
        assert!(
            matches!(
                err.innermost(),
                ParseError::BadTimestamp {
                    field: "timestamp",
                    ..
                }
            ),
            "{bad}: {err}"
        );
        assert!(
            err.to_string()
                .starts_with("at entry[0].messaging[0]: bad timestamp")
        );
    }
}

#[test]
fn missing_timestamps_fall_back() {
    // Item without timestamp: entry time.
    let item = r#"{"sender":{"id":"1"},"message":{"mid":"m_t"}}"#;
    assert_eq!(
        parse_one(&body_with_item(item)).timestamp,
        at_ms(1_700_000_000_999)
    );
    // No time anywhere: an error for events we act on, the epoch for the rest.
    let no_time =
        |item: &str| format!(r#"{{"object":"page","entry":[{{"id":"1","messaging":[{item}]}}]}}"#);
    let err = err_of(no_time(item).as_bytes());
    assert!(matches!(
        err.innermost(),
        ParseError::MissingField { field: "timestamp" }
    ));
    let ev = parse_one(&no_time(
        r#"{"sender":{"id":"1"},"reaction":{"action":"react"}}"#,
    ));
    assert_eq!(ev.timestamp, OffsetDateTime::UNIX_EPOCH);
    // Bad item timestamps on `other` items never fail.
    let ev = parse_one(&body_with_item(
        r#"{"timestamp":{"x":1},"read":{"watermark":5}}"#,
    ));
    assert_eq!(ev.kind, EventKind::Other);
    assert_eq!(ev.timestamp, at_ms(5_000));
    let ev = parse_one(&body_with_item(
        r#"{"timestamp":-5,"read":{"watermark":"x"}}"#,
    ));
    assert_eq!(ev.timestamp, at_ms(1_700_000_000_999));
}

#[test]
fn parse_item_uses_fallback_time() {
    let raw = RawValue::from_string(r#"{"optin":{"login_id":"L"}}"#.to_owned()).unwrap();
    let fallback = at_ms(1_700_000_000_000);
    let ev = parse_item("p1", &raw, Some(fallback)).unwrap();
    assert_eq!(ev.kind, EventKind::Optin);
    assert_eq!(ev.page_id, "p1");
    assert_eq!(ev.timestamp, fallback);
    assert_eq!(ev.idempotency_key, "optin:p1:L:1700000000000");
    assert!(matches!(
        parse_item("p1", &raw, None),
        Err(ParseError::MissingField { field: "timestamp" })
    ));
}

// ---- idempotency ----------------------------------------------------------------------------

#[test]
fn same_optin_gives_same_key() {
    let a = parse_one(fixture!("optin_login_connect"));
    let b = parse_one(fixture!("optin_login_connect"));
    assert_eq!(a.idempotency_key, b.idempotency_key);
    // A retry with a different entry.time and formatting still has the item's timestamp.
    let retry = r#"{"object":"page","entry":[{"id":"106283175398765","time":1700000009999,"messaging":[{"optin":{"login_id":"AZx9LcLoginId_7f3e2a1b"},"timestamp":1700000000000,"recipient":{"id":"106283175398765"}}]}]}"#;
    assert_eq!(parse_one(retry).idempotency_key, a.idempotency_key);
}

#[test]
fn other_key_ignores_key_order_and_whitespace_but_not_page() {
    let a = r#"{"sender":{"id":"1","x":[1,{"b":2,"a":1}]},"recipient":{"id":"2"},"timestamp":1700000000000,"reaction":{"reaction":"like","mid":"m_r","action":"react"}}"#;
    let b = r#"{ "reaction" : { "action":"react", "mid":"m_r", "reaction":"like" }, "timestamp": 1700000000000,
        "recipient":{"id":"2"}, "sender":{"x":[1,{"a":1,"b":2}],"id":"1"} }"#;
    let ka = parse_one(&body_with_item(a)).idempotency_key;
    let kb = parse_one(&body_with_item(b)).idempotency_key;
    assert_eq!(ka, kb);
    let on_b =
        format!(r#"{{"object":"page","entry":[{{"id":"{PAGE_B}","time":1,"messaging":[{a}]}}]}}"#);
    assert_ne!(parse_one(&on_b).idempotency_key, ka);
    // Array order is content, not formatting.
    let c = a.replace(r#"[1,{"b":2,"a":1}]"#, r#"[{"b":2,"a":1},1]"#);
    assert_ne!(parse_one(&body_with_item(&c)).idempotency_key, ka);
    // Independently computed.
    let canonical = r#"{"reaction":{"action":"react","mid":"m_r","reaction":"like"},"recipient":{"id":"2"},"sender":{"id":"1","x":[1,{"a":1,"b":2}]},"timestamp":1700000000000}"#;
    assert_eq!(ka, expected_hash(PAGE_A, canonical));
}

#[test]
fn overlong_keys_are_hashed() {
    let mid = "m".repeat(300);
    let item = format!(
        r#"{{"sender":{{"id":"1"}},"timestamp":1700000000000,"message":{{"mid":"{mid}"}}}}"#
    );
    let ev = parse_one(&body_with_item(&item));
    assert_eq!(ev.kind, EventKind::Message);
    let expected = format!(
        "sha256:{}",
        hex::encode(Sha256::digest(format!("mid:{mid}").as_bytes()))
    );
    assert_eq!(ev.idempotency_key, expected);
}

// ---- queue envelope -------------------------------------------------------------------------

#[test]
fn queued_event_round_trip() {
    let bodies = [
        fixture!("optin_login_connect"),
        fixture!("optin_full"),
        fixture!("message_quick_reply_prior_message"),
        fixture!("postback_prior_message"),
        fixture!("postback_timestamp_string_seconds"),
        fixture!("delivery"),
        fixture!("standby"),
        fixture!("unicode_text"),
        fixture!("batched"),
    ];
    for body in bodies {
        for ev in parse_delivery(body.as_bytes()).unwrap() {
            let queued = QueuedEvent::from_webhook(&ev);
            assert_eq!(queued.source, "webhook");
            assert_eq!(queued.kind, ev.kind);
            assert_eq!(queued.page_id, ev.page_id);
            assert_eq!(queued.idempotency_key, ev.idempotency_key);
            assert_eq!(
                i128::from(queued.timestamp_ms) * 1_000_000,
                ev.timestamp.unix_timestamp_nanos()
            );
            let json = serde_json::to_vec(&queued).unwrap();
            let back: QueuedEvent = serde_json::from_slice(&json).unwrap();
            assert_eq!(back.event.get(), ev.raw.get());
            assert_eq!(back.timestamp_ms, queued.timestamp_ms);
            let again = back.parse().unwrap();
            assert_eq!(again.kind, ev.kind);
            assert_eq!(again.page_id, ev.page_id);
            assert_eq!(again.idempotency_key, ev.idempotency_key);
            assert_eq!(again.timestamp, ev.timestamp);
            assert_eq!(again.details, ev.details);
            assert_eq!(again.raw.get(), ev.raw.get());
        }
    }
}

#[test]
fn queued_event_json_shape() {
    let ev = parse_one(fixture!("delivery"));
    let value = serde_json::to_value(QueuedEvent::from_webhook(&ev)).unwrap();
    assert_eq!(value["kind"], "other");
    assert_eq!(value["source"], "webhook");
    assert_eq!(value["page_id"], PAGE_A);
    assert_eq!(value["timestamp_ms"], 1_458_668_856_253_i64);
    assert_eq!(
        value["event"]["delivery"]["watermark"],
        1_458_668_856_253_i64
    );
    for kind in [
        EventKind::Optin,
        EventKind::Message,
        EventKind::Postback,
        EventKind::Other,
    ] {
        assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
    }
}

#[test]
fn queued_login_event_and_kind_mismatch() {
    let queued: QueuedEvent = serde_json::from_value(json!({
        "page_id": PAGE_A, "kind": "optin", "source": "login_event",
        "timestamp_ms": 1_700_000_000_000_i64, "idempotency_key": "login:abc",
        "event": {"optin": {"login_id": "L9"}},
    }))
    .unwrap();
    let ev = queued.parse().unwrap();
    assert_eq!(ev.kind, EventKind::Optin);
    assert_eq!(ev.timestamp, at_ms(1_700_000_000_000));
    assert_eq!(ev.idempotency_key, "login:abc");
    let mismatched = QueuedEvent {
        kind: EventKind::Message,
        ..queued
    };
    let err = mismatched.parse().unwrap_err();
    assert!(matches!(
        err,
        ParseError::KindMismatch {
            queued: EventKind::Message,
            parsed: EventKind::Optin
        }
    ));
    assert_eq!(
        err.to_string(),
        "queued as `message` but the event parses as `optin`"
    );
}

// ---- hostile input --------------------------------------------------------------------------

#[test]
fn rejects_broken_envelopes() {
    let cases: &[(&[u8], &str)] = &[
        (b"", "body is not valid JSON"),
        (b"   ", "body is not valid JSON"),
        (b"null", "body is not a JSON object"),
        (b"[]", "body is not a JSON object"),
        (b"\"page\"", "body is not a JSON object"),
        (b"{\"object\":\"page\",\"entry\":[]", "body is not valid JSON"),
        (b"{\"object\":\"page\",\"entry\":[]} x", "body is not valid JSON"),
        (b"\xff\xfe{}", "body is not valid UTF-8"),
        (
            b"{\"object\":\"page\",\"entry\":[{\"id\":\"1\",\"messaging\":[{\"message\":{\"text\":\"\xc3\x28\"}}]}]}",
            "body is not valid UTF-8",
        ),
        (br#"{"entry":[]}"#, "missing field `object`"),
        (br#"{"object":null,"entry":[]}"#, "missing field `object`"),
        (br#"{"object":"instagram","entry":[]}"#, "`object` is \"instagram\", expected \"page\""),
        (br#"{"object":7,"entry":[]}"#, "`object` is 7"),
        (br#"{"object":"page"}"#, "missing field `entry`"),
        (br#"{"object":"page","entry":{"id":"1"}}"#, "field `entry` must be an array"),
        (br#"{"object":"page","entry":"x"}"#, "field `entry` must be an array"),
        (br#"{"object":"page","entry":[5]}"#, "at entry[0]: entry item is not a JSON object"),
        (
            br#"{"object":"page","entry":[{"id":"1","messaging":"x"}]}"#,
            "at entry[0]: field `messaging` must be an array",
        ),
        (
            br#"{"object":"page","entry":[{"id":"1","standby":{}}]}"#,
            "at entry[0]: field `standby` must be an array",
        ),
        (
            br#"{"object":"page","entry":[{"messaging":[{}]}]}"#,
            "at entry[0]: missing field `id`",
        ),
        (
            br#"{"object":"page","entry":[{"id":true,"messaging":[{}]}]}"#,
            "at entry[0]: field `id` must be a non-empty string",
        ),
        (
            br#"{"object":"page","entry":[{"id":"","messaging":[{}]}]}"#,
            "at entry[0]: field `id` must be",
        ),
        (
            br#"{"object":"page","entry":[{"id":-1,"messaging":[{}]}]}"#,
            "at entry[0]: field `id` must be",
        ),
        (
            br#"{"object":"page","entry":[{"id":"1","time":{},"messaging":[{}]}]}"#,
            "at entry[0]: bad timestamp in `time`",
        ),
        (
            br#"{"object":"page","entry":[{"id":"1","messaging":[]},{"id":"1","time":1,"messaging":[{},{"timestamp":{},"postback":{},"sender":{"id":"1"}}]}]}"#,
            "at entry[1].messaging[1]: bad timestamp in `timestamp`: expected a number",
        ),
    ];
    for (body, expected) in cases {
        let err = err_of(body);
        let text = err.to_string();
        assert!(
            text.contains(expected),
            "{:?}: got {text:?}, expected {expected:?}",
            String::from_utf8_lossy(body)
        );
    }
    assert!(matches!(err_of(b""), ParseError::NotJson(_)));
    assert!(matches!(err_of(b"\xff"), ParseError::NotUtf8(_)));
    assert!(matches!(
        err_of(br#"{"object":"page"}"#),
        ParseError::MissingField { field: "entry" }
    ));
}

#[test]
fn error_preview_is_bounded() {
    let body = format!(r#"{{"object":"{}","entry":[]}}"#, "x".repeat(1 << 20));
    let text = err_of(body.as_bytes()).to_string();
    assert!(text.len() < 200, "{}", text.len());
}

#[test]
fn deep_nesting_is_rejected_or_contained() {
    let depth = 10_000;
    let deep = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let deep_obj = format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth));
    // As the body, inside the envelope, and as an entry: clean errors.
    assert!(matches!(
        err_of(deep.as_bytes()),
        ParseError::NotAnObject { .. }
    ));
    assert!(matches!(
        err_of(deep_obj.as_bytes()),
        ParseError::MissingField { .. }
    ));
    let body = format!(r#"{{"object":"page","entry":{deep}}}"#);
    assert!(
        err_of(body.as_bytes())
            .to_string()
            .contains("entry item is not a JSON object")
    );
    let unbalanced = format!(r#"{{"object":"page","entry":{}"#, "[".repeat(depth));
    assert!(matches!(
        err_of(unbalanced.as_bytes()),
        ParseError::NotJson(_)
    ));
    // Deep inside a field we never read: still a message.
    let item = format!(
        r#"{{"sender":{{"id":"1"}},"timestamp":1700000000000,"message":{{"mid":"m_deep","attachments":{deep}}}}}"#
    );
    let ev = parse_one(&body_with_item(&item));
    assert_eq!(ev.kind, EventKind::Message);
    assert_eq!(ev.idempotency_key, "mid:m_deep");
    // A deep `other` item cannot be canonicalised (recursion limit): hashed as raw bytes.
    let item = format!(r#"{{"timestamp":1700000000000,"x":{deep_obj}}}"#);
    let ev = parse_one(&body_with_item(&item));
    assert_eq!(ev.kind, EventKind::Other);
    let expected = format!(
        "sha256:{}",
        hex::encode(Sha256::digest(format!("{PAGE_A}\n{item}").as_bytes()))
    );
    assert_eq!(ev.idempotency_key, expected);
    // And the round trip through the queue still works.
    let queued: QueuedEvent =
        serde_json::from_slice(&serde_json::to_vec(&QueuedEvent::from_webhook(&ev)).unwrap())
            .unwrap();
    assert_eq!(queued.parse().unwrap().raw.get(), item);
}

#[test]
fn huge_strings_are_accepted() {
    let login_id = "L".repeat(1 << 20);
    let item = format!(r#"{{"timestamp":1700000000000,"optin":{{"login_id":"{login_id}"}}}}"#);
    let ev = parse_one(&body_with_item(&item));
    let EventDetails::Optin(optin) = &ev.details else {
        panic!("not an optin")
    };
    assert_eq!(optin.login_id.len(), 1 << 20);
    assert!(ev.idempotency_key.starts_with("sha256:"));
    assert!(ev.idempotency_key.len() <= MAX_KEY_LEN);
    // A huge number where an id or timestamp goes is refused or kept as text, never a panic.
    let digits = "9".repeat(100_000);
    let item = format!(r#"{{"sender":{{"id":{digits}}},"timestamp":{digits},"message":{{}}}}"#);
    assert!(parse_delivery(body_with_item(&item).as_bytes()).is_err());
    let item = format!(r#"{{"sender":{{"id":{digits}}},"timestamp":1,"message":{{}}}}"#);
    let ev = parse_one(&body_with_item(&item));
    assert!(matches!(&ev.details, EventDetails::Message(r) if r.psid == digits));
}

#[test]
fn duplicate_keys_last_wins() {
    let item = r#"{"sender":{"id":"1"},"timestamp":1700000000000,"message":{"mid":"m_a"},"message":{"mid":"m_b"}}"#;
    let ev = parse_one(&body_with_item(item));
    assert_eq!(ev.idempotency_key, "mid:m_b");
}

#[test]
fn an_entry_whose_page_id_cannot_be_routed_is_set_aside_with_the_reason() {
    // A dotted id would make `optin.12.34`, a key no binding routes: ingest would answer 503
    // for ever. Set aside (kept on messenger.unparsed) instead, the rest of the batch goes on.
    for (id, found) in [
        (r#""12.34""#, "'.'"),
        (r#""12*""#, "'*'"),
        (r##""#""##, "'#'"),
        (r#""1 2""#, "U+0020"),
    ] {
        let body = format!(
            r#"{{"object":"page","entry":[{{"id":{id},"time":5,"messaging":[{{"timestamp":1700000000000,"optin":{{"login_id":"A"}}}}]}},{{"id":"106","time":5,"messaging":[{{"timestamp":1700000000000,"optin":{{"login_id":"B"}}}}]}},{{"id":{id},"changes":[{{"field":"feed"}}]}}]}}"#
        );
        let parts = parse_delivery_parts(body.as_bytes()).unwrap();
        assert_eq!(parts.len(), 3, "{id}");
        for (i, part) in [(0, &parts[0]), (2, &parts[2])] {
            let DeliveryPart::SetAside(aside) = part else {
                panic!("entry {i} with id {id} is set aside: {parts:?}");
            };
            let text = aside.error.to_string();
            assert!(
                text.starts_with(&format!("at entry[{i}]: field `id`: page id")),
                "{text}"
            );
            assert!(text.contains(found), "{text}");
            assert!(matches!(
                aside.error.innermost(),
                ParseError::BadPageId(crate::ids::PageIdError::BadCharacter { .. })
            ));
        }
        assert!(matches!(&parts[1], DeliveryPart::Event(e) if e.page_id == "106"));
    }
    let long = "9".repeat(crate::ids::MAX_PAGE_ID_BYTES + 1);
    let body = format!(
        r#"{{"object":"page","entry":[{{"id":"{long}","messaging":[{{"timestamp":1700000000000,"optin":{{"login_id":"A"}}}}]}}]}}"#
    );
    let err = parse_delivery(body.as_bytes()).expect_err("too long");
    assert!(err.to_string().contains("bytes long"), "{err}");
}
