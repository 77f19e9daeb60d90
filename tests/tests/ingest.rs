//! Ingest against a real RabbitMQ: what a signed delivery puts on which queue, what an
//! unsigned one does not, and how ingest behaves when the broker goes away and comes back.

use std::time::Duration;

use lapin::types::FieldTable;
use lc_ingest::{IngestConfig, RunningIngest};
use lc_meta::secret::Secret;
use lc_meta::signature::sign_sha256;
use lc_shared::amqp::header_str;
use lc_shared::config::AmqpArgs;
use lc_shared::shutdown::Shutdown;
use lc_shared::telemetry::LogFormat;
use lc_shared::topology;
use lc_testkit::harness::{TestVhost, queue_depth, take_all};
use lc_testkit::pipeline::start_ingest_with;
use serde_json::{Value, json};

const SECRET: &str = "app-secret-one";
const SECOND_SECRET: &str = "app-secret-two";

fn config(amqp_url: &str) -> IngestConfig {
    IngestConfig {
        addr: "127.0.0.1:0".parse().expect("addr"),
        admin_addr: "127.0.0.1:0".parse().expect("addr"),
        app_secrets: vec![Secret::new(SECRET), Secret::new(SECOND_SECRET)],
        verify_token: Secret::new("verify-me"),
        accept_sha1: false,
        max_body_bytes: 64 * 1024,
        confirm_timeout_ms: 1000,
        request_timeout_ms: 5000,
        http2: false,
        max_connections: 4096,
        publish_channels: 2,
        amqp: AmqpArgs::new(amqp_url),
        log: lc_shared::config::LogArgs {
            log_format: LogFormat::Text,
        },
        login: lc_ingest::login::LoginArgs::default(),
        secret_vars: Default::default(),
    }
}

struct Harness {
    vhost: TestVhost,
    ingest: RunningIngest,
    shutdown: Shutdown,
    http: reqwest::Client,
}

impl Harness {
    async fn start() -> Self {
        let vhost = TestVhost::create();
        Self::start_on(vhost, config).await
    }

    async fn start_on(vhost: TestVhost, cfg: fn(&str) -> IngestConfig) -> Self {
        let (ingest, shutdown) = start_ingest_with(cfg(&vhost.url())).await;
        Self {
            vhost,
            ingest,
            shutdown,
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.ingest.addr)
    }

    async fn post_raw(&self, body: &[u8], signature: Option<&str>) -> reqwest::Response {
        let mut req = self
            .http
            .post(self.url("/webhook"))
            .header("content-type", "application/json")
            .body(body.to_vec());
        if let Some(sig) = signature {
            req = req.header("x-hub-signature-256", sig);
        }
        req.send().await.expect("post")
    }

    async fn post_signed(&self, body: &[u8]) -> reqwest::Response {
        self.post_raw(body, Some(&sign_sha256(SECRET, body))).await
    }

    async fn all_queue_depths(&self) -> u32 {
        let conn = self.vhost.connect().await;
        let ch = conn.create_channel().await.expect("channel");
        let mut total = 0;
        for q in [
            topology::SCHEDULER_QUEUE,
            topology::CORRELATOR_QUEUE,
            topology::OTHER_QUEUE,
            topology::UNPARSED_QUEUE,
        ] {
            total += queue_depth(&ch, q).await;
        }
        total
    }

    async fn stop(self) {
        self.shutdown.trigger();
        let result = self.ingest.task.await.expect("join");
        assert!(result.is_ok(), "ingest stopped with {result:?}");
    }
}

fn optin(page: &str, login_id: &str, ts: i64) -> Value {
    json!({"recipient": {"id": page}, "timestamp": ts, "optin": {"login_id": login_id}})
}

fn reply(page: &str, psid: &str, mid: &str, login_id: &str) -> Value {
    json!({"sender": {"id": psid}, "recipient": {"id": page}, "timestamp": 1_700_000_000_500_i64,
           "message": {"mid": mid, "text": "Track my order", "quick_reply": {"payload": "TRACK"}},
           "prior_message": {"source": "login_connect", "identifier": login_id}})
}

fn postback(page: &str, psid: &str, mid: &str) -> Value {
    json!({"sender": {"id": psid}, "recipient": {"id": page}, "timestamp": 1_700_000_000_600_i64,
           "postback": {"mid": mid, "title": "Start", "payload": "START"}})
}

fn delivery_receipt(page: &str, psid: &str) -> Value {
    json!({"sender": {"id": psid}, "recipient": {"id": page},
           "delivery": {"mids": ["m_1"], "watermark": 1_700_000_000_700_i64}})
}

fn envelope(entries: Vec<(&str, Vec<Value>)>) -> Vec<u8> {
    let entries: Vec<Value> = entries
        .into_iter()
        .map(|(page, items)| json!({"id": page, "time": 1_700_000_001_000_i64, "messaging": items}))
        .collect();
    serde_json::to_vec(&json!({"object": "page", "entry": entries})).expect("json")
}

#[tokio::test]
async fn signed_batch_lands_on_the_right_queues_with_ids_and_properties() {
    let h = Harness::start().await;
    let body = envelope(vec![
        (
            "111",
            vec![
                optin("111", "L1", 1_700_000_000_000),
                reply("111", "P1", "m_a", "L0"),
            ],
        ),
        (
            "222",
            vec![
                optin("222", "L2", 1_700_000_000_100),
                postback("222", "P2", "m_b"),
            ],
        ),
        (
            "111",
            vec![
                delivery_receipt("111", "P1"),
                reply("111", "P3", "m_c", "L9"),
            ],
        ),
    ]);
    let resp = h.post_signed(&body).await;
    assert_eq!(resp.status(), 200);

    let conn = h.vhost.connect().await;
    let optins = take_all(&conn, topology::SCHEDULER_QUEUE).await;
    let replies = take_all(&conn, topology::CORRELATOR_QUEUE).await;
    let others = take_all(&conn, topology::OTHER_QUEUE).await;
    assert_eq!(optins.len(), 2);
    assert_eq!(replies.len(), 3);
    assert_eq!(others.len(), 1);
    assert!(take_all(&conn, topology::UNPARSED_QUEUE).await.is_empty());

    let keys: Vec<String> = optins.iter().map(|d| d.routing_key.to_string()).collect();
    assert_eq!(keys, vec!["optin.111", "optin.222"]);
    let ids: Vec<String> = optins
        .iter()
        .map(|d| d.properties.message_id().as_ref().expect("id").to_string())
        .collect();
    assert_eq!(
        ids,
        vec!["optin:111:L1:1700000000000", "optin:222:L2:1700000000100"]
    );
    let reply_keys: Vec<String> = replies.iter().map(|d| d.routing_key.to_string()).collect();
    assert_eq!(
        reply_keys,
        vec!["message.111", "postback.222", "message.111"]
    );
    let reply_ids: Vec<String> = replies
        .iter()
        .map(|d| d.properties.message_id().as_ref().expect("id").to_string())
        .collect();
    assert_eq!(reply_ids, vec!["mid:m_a", "mid:m_b", "mid:m_c"]);
    assert_eq!(others[0].routing_key.as_str(), "other.111");

    for d in optins.iter().chain(&replies).chain(&others) {
        assert_eq!(*d.properties.delivery_mode(), Some(2), "persistent");
        assert_eq!(
            d.properties.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
        assert!(d.properties.timestamp().is_some());
        let tp = header_str(&d.properties, "traceparent").expect("traceparent header");
        assert!(
            lc_shared::telemetry::TraceParent::parse(&tp).is_some(),
            "{tp}"
        );
    }
    // The body of each message is the queued form, re-parseable into the same event.
    let queued: lc_meta::webhook::QueuedEvent =
        serde_json::from_slice(&optins[0].data).expect("queued event");
    assert_eq!(queued.page_id, "111");
    assert_eq!(queued.source, "webhook");
    let ev = queued.parse().expect("re-parse");
    match ev.details {
        lc_meta::webhook::EventDetails::Optin(o) => assert_eq!(o.login_id, "L1"),
        other => panic!("expected optin, got {other:?}"),
    }
    h.stop().await;
}

#[tokio::test]
async fn bad_signatures_are_refused_and_nothing_is_published() {
    let h = Harness::start().await;
    let body = envelope(vec![("111", vec![optin("111", "L1", 1_700_000_000_000)])]);
    let good = sign_sha256(SECRET, &body);
    let cases: Vec<(&str, Option<String>)> = vec![
        ("missing header", None),
        ("wrong secret", Some(sign_sha256("not-our-secret", &body))),
        ("malformed hex", Some(format!("sha256={}", "g".repeat(64)))),
        ("truncated", Some(good[..good.len() - 4].to_owned())),
        ("wrong prefix", Some(good.replace("sha256=", "sha1="))),
        (
            "other body",
            Some(sign_sha256(SECRET, b"{\"object\":\"page\",\"entry\":[]}")),
        ),
        ("empty", Some(String::new())),
    ];
    for (name, sig) in cases {
        let resp = h.post_raw(&body, sig.as_deref()).await;
        assert_eq!(resp.status(), 401, "{name}");
    }
    assert_eq!(h.all_queue_depths().await, 0, "nothing may be published");

    // The second configured secret (rotation) is accepted.
    let resp = h
        .post_raw(&body, Some(&sign_sha256(SECOND_SECRET, &body)))
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(h.all_queue_depths().await, 1);
    h.stop().await;
}

#[tokio::test]
async fn unicode_is_verified_over_the_escaped_bytes_as_sent() {
    let h = Harness::start().await;
    // Meta escapes non-ASCII characters; the signature covers exactly these bytes.
    let body = br#"{"object":"page","entry":[{"id":"111","time":1700000001000,"messaging":[{"sender":{"id":"P1"},"recipient":{"id":"111"},"timestamp":1700000000500,"message":{"mid":"m_u","text":"\u00e4\u00f6\u00e5 \ud83d\ude00"}}]}]}"#;
    let sig = sign_sha256(SECRET, body);
    // A re-serialised body (unescaped UTF-8) is different bytes: its signature would not match.
    let reserialised =
        serde_json::to_vec(&serde_json::from_slice::<Value>(body).expect("json")).expect("json");
    assert_ne!(reserialised.as_slice(), body.as_slice());
    assert_eq!(h.post_raw(&reserialised, Some(&sig)).await.status(), 401);
    assert_eq!(h.post_raw(body, Some(&sig)).await.status(), 200);

    let conn = h.vhost.connect().await;
    let replies = take_all(&conn, topology::CORRELATOR_QUEUE).await;
    assert_eq!(replies.len(), 1);
    let queued: lc_meta::webhook::QueuedEvent =
        serde_json::from_slice(&replies[0].data).expect("queued");
    assert!(
        queued.event.get().contains(r"\u00e4\u00f6\u00e5"),
        "the event keeps the bytes as received: {}",
        queued.event.get()
    );
    h.stop().await;
}

#[tokio::test]
async fn oversized_bodies_get_413_and_signed_garbage_is_kept_unparsed() {
    let h = Harness::start().await;
    let big = vec![b'x'; 65 * 1024];
    let resp = h.post_signed(&big).await;
    assert_eq!(resp.status(), 413);
    assert_eq!(h.all_queue_depths().await, 0);

    let garbage = b"{\"object\":\"page\",\"entry\":\"not an array\"}";
    let resp = h.post_signed(garbage).await;
    assert_eq!(
        resp.status(),
        200,
        "Meta must not retry a body that can never parse"
    );
    let conn = h.vhost.connect().await;
    let kept = take_all(&conn, topology::UNPARSED_QUEUE).await;
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].data.as_slice(), garbage.as_slice(), "kept raw");
    let reason = header_str(&kept[0].properties, topology::ERROR_HEADER).expect("reason header");
    assert!(!reason.is_empty());
    assert_eq!(h.all_queue_depths().await, 0, "nothing else was published");

    let metrics = h
        .http
        .get(format!("http://{}/metrics", h.ingest.admin_addr))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("ingest_unparsed_bodies_total 1"),
        "{metrics}"
    );
    h.stop().await;
}

#[tokio::test]
async fn handshake_echoes_the_challenge_only_for_the_right_token() {
    let h = Harness::start().await;
    let ok =
        h.http
            .get(h.url(
                "/webhook?hub.mode=subscribe&hub.verify_token=verify-me&hub.challenge=1158201444",
            ))
            .send()
            .await
            .expect("get");
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.text().await.expect("text"), "1158201444");
    for q in [
        "/webhook?hub.mode=subscribe&hub.verify_token=wrong&hub.challenge=1",
        "/webhook?hub.mode=unsubscribe&hub.verify_token=verify-me&hub.challenge=1",
        "/webhook?hub.mode=subscribe&hub.challenge=1",
        "/webhook",
    ] {
        let resp = h.http.get(h.url(q)).send().await.expect("get");
        assert_eq!(resp.status(), 403, "{q}");
    }
    h.stop().await;
}

#[tokio::test]
async fn broker_loss_gives_fast_503_and_recovery_needs_no_restart() {
    let h = Harness::start().await;
    let body = envelope(vec![("111", vec![optin("111", "L1", 1_700_000_000_000)])]);
    assert_eq!(h.post_signed(&body).await.status(), 200);
    let ready = h.http.get(h.url("/readyz")).send().await.expect("readyz");
    assert_eq!(ready.status(), 200);

    // Deleting the vhost closes every connection into it, like a broker outage would.
    h.vhost.delete_now();
    h.ingest
        .broker
        .wait_down(Duration::from_secs(10))
        .await
        .expect("the link notices the lost connection");
    let r = h.http.get(h.url("/readyz")).send().await.expect("readyz");
    assert_eq!(r.status(), 503, "/readyz must report the lost broker");
    let started = std::time::Instant::now();
    let resp = h.post_signed(&body).await;
    assert_eq!(resp.status(), 503);
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "503 within the confirm bound, took {:?}",
        started.elapsed()
    );

    TestVhost::create_named(&h.vhost.name);
    h.ingest
        .broker
        .wait_ready(Duration::from_secs(20))
        .await
        .expect("reconnects by itself");
    let ready = h.http.get(h.url("/readyz")).send().await.expect("readyz");
    assert_eq!(ready.status(), 200);
    assert_eq!(h.post_signed(&body).await.status(), 200);
    let conn = h.vhost.connect().await;
    assert_eq!(take_all(&conn, topology::SCHEDULER_QUEUE).await.len(), 1);
    h.stop().await;
}

#[tokio::test]
async fn concurrent_load_is_all_acknowledged_and_all_stored() {
    let h = Harness::start().await;
    let tasks = 50;
    let per_task = 40;
    let mut handles = Vec::new();
    for t in 0..tasks {
        let http = h.http.clone();
        let url = h.url("/webhook");
        handles.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for i in 0..per_task {
                let body = envelope(vec![(
                    "111",
                    vec![optin("111", &format!("L{t}_{i}"), 1_700_000_000_000)],
                )]);
                let resp = http
                    .post(&url)
                    .header("x-hub-signature-256", sign_sha256(SECRET, &body))
                    .body(body)
                    .send()
                    .await
                    .expect("post");
                statuses.push(resp.status().as_u16());
            }
            statuses
        }));
    }
    let mut ok = 0;
    for handle in handles {
        for status in handle.await.expect("task") {
            assert_eq!(status, 200);
            ok += 1;
        }
    }
    assert_eq!(ok, tasks * per_task);
    let conn = h.vhost.connect().await;
    let ch = conn.create_channel().await.expect("channel");
    assert_eq!(
        queue_depth(&ch, topology::SCHEDULER_QUEUE).await as usize,
        tasks * per_task
    );
    h.stop().await;
}

/// Issue 14, item 4: an app secret's HMAC made for another context is not a webhook. Facebook
/// Login's `signed_request` (held by every visitor who logs in) is
/// `<b64 HMAC(app secret, P)>.<P>`: posting `P` with that MAC in hex as
/// `X-Hub-Signature-256` verifies, but `P` is base64 text, not a JSON object, so it is refused
/// with `400` and nothing is stored. So is any other body that is not a JSON object.
#[tokio::test]
async fn only_json_objects_are_webhook_bodies() {
    let h = Harness::start().await;
    let login = lc_meta::login::signed_request::sign_request(
        SECRET,
        &json!({"algorithm": "HMAC-SHA256", "code": "AQD-login-code", "issued_at": 1_700_000_000,
                "user_id": "1234567890"}),
    );
    let (_, payload) = login.split_once('.').expect("dot");
    let mut bodies: Vec<Vec<u8>> = vec![
        payload.as_bytes().to_vec(),
        b"\xff\xfe not UTF-8".to_vec(),
        b"[{\"object\":\"page\"}]".to_vec(),
        b"\"a string\"".to_vec(),
        b"12345".to_vec(),
        b"{\"object\":\"page\"".to_vec(),
        b"".to_vec(),
    ];
    bodies.push(format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes());
    for body in &bodies {
        let resp = h.post_signed(body).await;
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("text");
        assert_eq!(
            status,
            400,
            "{:?}: {text}",
            String::from_utf8_lossy(&body[..body.len().min(40)])
        );
        assert!(text.contains("JSON object"), "{text}");
    }
    assert_eq!(h.all_queue_depths().await, 0, "nothing stored");
    h.stop().await;
}

/// Issue 14, item 4: `messenger.unparsed` and `messenger.other` are bounded by count and bytes
/// and drop their oldest messages beyond the bound, so they can neither fill the broker's disk
/// nor refuse (nack) a publish. Redeclaring them with exactly these arguments succeeds only
/// if the topology declared them so; filling `messenger.unparsed` past its bound keeps every
/// publish confirmed.
#[tokio::test]
async fn inspection_queues_are_bounded_and_never_refuse_a_publish() {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable, LongString};
    let h = Harness::start().await;
    let conn = h.vhost.connect().await;
    for (queue, max_length) in [
        (
            topology::UNPARSED_QUEUE,
            topology::UNPARSED_QUEUE_MAX_LENGTH,
        ),
        (topology::OTHER_QUEUE, topology::OTHER_QUEUE_MAX_LENGTH),
    ] {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(max_length));
        args.insert(
            "x-max-length-bytes".into(),
            AMQPValue::LongLongInt(topology::INSPECTION_QUEUE_MAX_BYTES),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString(LongString::from("drop-head")),
        );
        let ch = conn.create_channel().await.expect("channel");
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .unwrap_or_else(|e| panic!("{queue} is not declared with the bound: {e}"));
    }
    const {
        assert!(
            topology::UNPARSED_QUEUE_MAX_LENGTH <= 10_000,
            "cheap to fill in a test"
        )
    };

    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let total = topology::UNPARSED_QUEUE_MAX_LENGTH + 50;
    let mut confirms = Vec::new();
    for i in 0..total {
        let confirm = ch
            .basic_publish(
                "".into(),
                topology::UNPARSED_QUEUE.into(),
                BasicPublishOptions::default(),
                format!("{{\"n\":{i}}}").as_bytes(),
                lapin::BasicProperties::default(),
            )
            .await
            .expect("publish");
        confirms.push(confirm);
    }
    for confirm in confirms {
        let confirmation = confirm.await.expect("confirm");
        assert!(
            confirmation.is_ack(),
            "a bounded inspection queue never nacks"
        );
    }
    let depth = queue_depth(&ch, topology::UNPARSED_QUEUE).await;
    assert_eq!(i64::from(depth), topology::UNPARSED_QUEUE_MAX_LENGTH);
    let first = ch
        .basic_get(
            topology::UNPARSED_QUEUE.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .expect("get")
        .expect("a message");
    assert_eq!(
        first.delivery.data.as_slice(),
        b"{\"n\":50}",
        "the oldest were dropped"
    );
    h.stop().await;
}

/// Issue 14, item 14: an entry that carries only `changes` (feed and other subscriptions of
/// the same app) is kept on `messenger.other` for its page, not acknowledged and dropped.
#[tokio::test]
async fn changes_entries_are_kept_on_messenger_other() {
    let h = Harness::start().await;
    let entry = json!({"id": "111", "time": 1_700_000_001_000_i64,
                       "changes": [{"field": "feed", "value": {"item": "status", "verb": "add"}}]});
    let body = serde_json::to_vec(&json!({"object": "page", "entry": [entry]})).expect("json");
    assert_eq!(h.post_signed(&body).await.status(), 200);
    let conn = h.vhost.connect().await;
    let others = take_all(&conn, topology::OTHER_QUEUE).await;
    assert_eq!(others.len(), 1, "the changes entry is kept");
    assert_eq!(others[0].routing_key.as_str(), "other.111");
    let queued: lc_meta::webhook::QueuedEvent =
        serde_json::from_slice(&others[0].data).expect("queued");
    assert_eq!(queued.page_id, "111");
    let kept: Value = serde_json::from_str(queued.event.get()).expect("json");
    assert_eq!(kept, entry, "the whole entry, as sent");
    assert_eq!(h.all_queue_depths().await, 0, "nothing else");
    h.stop().await;
}

/// Issue 14, item 14: one event with a bad timestamp (or one bad entry) in a batch sets aside
/// that event (that entry) alone on `messenger.unparsed`, with the reason; every other event
/// of the batch goes to its queue, so the good opt-ins keep their window.
#[tokio::test]
async fn one_bad_event_is_set_aside_alone() {
    let h = Harness::start().await;
    let mut bad = optin("111", "L_BAD", 0);
    bad["timestamp"] = json!("yesterday");
    let good_entry = json!({"id": "111", "time": 1_700_000_001_000_i64, "messaging": [
        optin("111", "L1", 1_700_000_000_000), bad, reply("111", "P1", "m_a", "L0"),
        optin("111", "L2", 1_700_000_000_100)]});
    let entry_without_id = json!({"time": 1_700_000_001_000_i64,
                                  "messaging": [optin("333", "L3", 1_700_000_000_000)]});
    let other_page = json!({"id": "222", "time": 1_700_000_001_000_i64,
                            "messaging": [optin("222", "L4", 1_700_000_000_000)]});
    let body = serde_json::to_vec(&json!({"object": "page",
        "entry": [good_entry, entry_without_id, other_page]}))
    .expect("json");
    assert_eq!(h.post_signed(&body).await.status(), 200);

    let conn = h.vhost.connect().await;
    let optins = take_all(&conn, topology::SCHEDULER_QUEUE).await;
    let ids: Vec<String> = optins
        .iter()
        .map(|d| d.properties.message_id().as_ref().expect("id").to_string())
        .collect();
    assert_eq!(
        ids,
        vec![
            "optin:111:L1:1700000000000",
            "optin:111:L2:1700000000100",
            "optin:222:L4:1700000000000"
        ]
    );
    assert_eq!(take_all(&conn, topology::CORRELATOR_QUEUE).await.len(), 1);
    let kept = take_all(&conn, topology::UNPARSED_QUEUE).await;
    assert_eq!(kept.len(), 2, "the bad event and the bad entry, each alone");
    let reasons: Vec<String> = kept
        .iter()
        .map(|d| header_str(&d.properties, topology::ERROR_HEADER).expect("reason"))
        .collect();
    assert!(reasons[0].contains("timestamp"), "{reasons:?}");
    assert!(reasons[1].contains("id"), "{reasons:?}");
    // Each is kept as a delivery of its own, so a replay parses it like any body.
    let first: Value = serde_json::from_slice(&kept[0].data).expect("json");
    assert_eq!(first["entry"][0]["id"], "111");
    assert_eq!(
        first["entry"][0]["messaging"].as_array().map(Vec::len),
        Some(1)
    );
    assert_eq!(
        first["entry"][0]["messaging"][0]["optin"]["login_id"],
        "L_BAD"
    );
    let second: Value = serde_json::from_slice(&kept[1].data).expect("json");
    assert_eq!(
        second["entry"][0]["messaging"][0]["optin"]["login_id"],
        "L3"
    );
    h.stop().await;
}

fn wide_config(amqp_url: &str) -> IngestConfig {
    IngestConfig {
        publish_channels: 16,
        confirm_timeout_ms: 5000,
        request_timeout_ms: 15_000,
        ..config(amqp_url)
    }
}

/// What one body of the unroutable test holds.
#[derive(Clone, Copy, PartialEq)]
enum Mix {
    OptinsOnly,
    MessageOnly,
    Both,
}

fn mixed_body(mix: Mix, round: usize, i: usize) -> Vec<u8> {
    let login = |n: usize| format!("L{round}_{i}_{n}");
    let mid = format!("m_{round}_{i}");
    let items = match mix {
        Mix::OptinsOnly => vec![
            optin("111", &login(0), 1_700_000_000_000),
            optin("111", &login(1), 1_700_000_000_000),
        ],
        Mix::MessageOnly => vec![reply("111", &format!("psid{i}"), &mid, &login(0))],
        Mix::Both => vec![
            optin("111", &login(0), 1_700_000_000_000),
            reply("111", &format!("psid{i}"), &mid, &login(1)),
        ],
    };
    envelope(vec![("111", items)])
}

/// Item 7 of issue 14: with the `message.*` binding gone, every body holding a message
/// event is dropped by the broker in part and must get `503`, and no other body may: on
/// channels shared between requests, lapin pinned returns on whichever confirm completed next.
#[tokio::test]
async fn a_missing_binding_fails_exactly_the_bodies_whose_events_were_returned() {
    let h = Harness::start_on(TestVhost::create(), wide_config).await;
    let conn = h.vhost.connect().await;
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_unbind(
        topology::CORRELATOR_QUEUE.into(),
        topology::WEBHOOK_EXCHANGE.into(),
        "message.*".into(),
        FieldTable::default(),
    )
    .await
    .expect("unbind message.*");

    let bodies = 500;
    let rounds = 3;
    let mut stored_optins = 0;
    for round in 0..rounds {
        let mut tasks = Vec::with_capacity(bodies);
        for i in 0..bodies {
            let mix = [Mix::OptinsOnly, Mix::MessageOnly, Mix::Both][i % 3];
            stored_optins += match mix {
                Mix::OptinsOnly => 2,
                Mix::Both => 1,
                Mix::MessageOnly => 0,
            };
            let body = mixed_body(mix, round, i);
            let req = h
                .http
                .post(h.url("/webhook"))
                .header("x-hub-signature-256", sign_sha256(SECRET, &body))
                .body(body);
            tasks.push(tokio::spawn(async move {
                (mix, req.send().await.expect("post").status().as_u16())
            }));
        }
        let mut wrong = Vec::new();
        for (i, task) in tasks.into_iter().enumerate() {
            let (mix, status) = task.await.expect("task");
            let want = if mix == Mix::OptinsOnly { 200 } else { 503 };
            if status != want {
                wrong.push((i, status));
            }
        }
        assert!(
            wrong.is_empty(),
            "round {round}: {} of {bodies} bodies got the wrong answer (index, status): {wrong:?}",
            wrong.len()
        );
    }
    assert_eq!(
        queue_depth(&ch, topology::SCHEDULER_QUEUE).await,
        stored_optins,
        "every opt-in was stored"
    );
    assert_eq!(
        queue_depth(&ch, topology::CORRELATOR_QUEUE).await,
        0,
        "no message event was stored anywhere"
    );
    h.stop().await;
}

/// Issue 16: a page id becomes a word of the routing keys (`optin.<page_id>` here,
/// `first_message.sent.<page_id>` downstream). An entry whose id has a dot (or a wildcard,
/// whitespace…) would make a key no binding routes — ingest would answer 503 for ever and
/// Meta redeliver for ever. It is set aside on `messenger.unparsed` with the reason instead;
/// the rest of the batch goes to its queues and the delivery gets 200.
#[tokio::test]
async fn an_entry_whose_page_id_cannot_be_routed_is_set_aside_not_refused_for_ever() {
    let h = Harness::start().await;
    let dotted = json!({"id": "111.222", "time": 1_700_000_001_000_i64,
                        "messaging": [optin("111.222", "L1", 1_700_000_000_000)]});
    let wildcard = json!({"id": "#", "time": 1_700_000_001_000_i64,
                          "messaging": [optin("#", "L2", 1_700_000_000_000)]});
    let good = json!({"id": "111", "time": 1_700_000_001_000_i64,
                      "messaging": [optin("111", "L3", 1_700_000_000_000)]});
    let body = serde_json::to_vec(&json!({"object": "page", "entry": [dotted, wildcard, good]}))
        .expect("json");
    assert_eq!(h.post_signed(&body).await.status(), 200);

    let conn = h.vhost.connect().await;
    let optins = take_all(&conn, topology::SCHEDULER_QUEUE).await;
    assert_eq!(optins.len(), 1);
    assert_eq!(optins[0].routing_key.as_str(), "optin.111");
    let kept = take_all(&conn, topology::UNPARSED_QUEUE).await;
    assert_eq!(kept.len(), 2, "each bad entry alone");
    for (d, found) in kept.iter().zip(["'.'", "'#'"]) {
        let reason = header_str(&d.properties, topology::ERROR_HEADER).expect("reason");
        assert!(
            reason.contains("field `id`: page id") && reason.contains(found),
            "{reason}"
        );
    }
    h.stop().await;
}
