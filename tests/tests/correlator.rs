//! The correlator end to end on a real RabbitMQ and PostgreSQL: signed webhooks go through
//! ingest (in-process) to `correlator.replies`, the correlator (in-process) links login_ids
//! to PSIDs, and its relay publishes `identity.linked` on `loginconnect.events`, where a test
//! queue captures every event and checks it against the published schemas.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lc_shared::amqp::header_str;
use lc_shared::telemetry::TraceParent;
use lc_shared::topology;
use lc_testkit::harness::queue_depth;
use lc_testkit::pipeline::{
    PAGE, Pipeline, TestEnv, WAIT, count, eventually, insert_optin, insert_sent_optin, link_of,
    metrics_text, ms, optin_replied, text_reply_item, time_of,
};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::macros::datetime;

/// The routing key of every event the correlator publishes.
const LINKED: &str = "identity.linked";

/// Ingest running, every public event captured on the returned queue, and the tables
/// created (tests insert opt-ins whether or not the correlator runs yet). The correlator is
/// started by each test: after posting, when it wants the replies to reach it in one batch.
async fn setup() -> (TestEnv, String, Pipeline) {
    let env = TestEnv::new().await;
    let capture = env.capture_events(&["#"]).await;
    let pipeline = env.pipeline().start().await;
    env.migrated_pool(1).await;
    (env, capture, pipeline)
}

/// [`setup`] with the correlator running.
async fn running() -> (TestEnv, String, Pipeline) {
    let (env, capture, mut pipeline) = setup().await;
    pipeline.start_correlator(&env).await;
    (env, capture, pipeline)
}

/// A text reply to [`PAGE`] carrying `prior_message` with the documented `identifier` key.
fn reply(psid: &str, mid: &str, login_id: &str, at: OffsetDateTime) -> Value {
    text_reply_item(PAGE, psid, mid, login_id, at)
}

#[tokio::test]
async fn reply_after_a_pending_optin_links_once_and_marks_it_replied() {
    let (env, capture, mut p) = running().await;
    let db = env.sql().await;
    let opted_in_at = datetime!(2023-11-14 22:00:00.250 UTC);
    let replied = datetime!(2023-11-14 22:05:00.500 UTC);
    insert_optin(&db, PAGE, "L1", opted_in_at, "pending").await;

    p.deliver(vec![reply("PSID1", "m_1", "L1", replied)]).await;
    let got = env.deliveries(&capture, 1, WAIT).await;
    assert_eq!(got.len(), 1, "identity.linked published");
    let event = env.contract().check_delivery(&got[0]);
    assert_eq!(
        got[0].routing_key.as_str(),
        format!("identity.linked.{PAGE}")
    );
    assert_eq!(event["pageid"], PAGE);
    assert_eq!(event["appid"], "default", "no META_APP_ID given");
    assert_eq!(event["type"], "com.loginconnect.identity.linked");
    assert_eq!(event["source"], "/loginconnect/correlator");
    assert_eq!(event["subject"], PAGE);
    let data = &event["data"];
    assert_eq!(data["page_id"], PAGE);
    assert_eq!(data["login_id"], "L1");
    assert_eq!(data["psid"], "PSID1");
    assert_eq!(time_of(&data["linked_at"]), Some(replied));
    assert_eq!(time_of(&data["opted_in_at"]), Some(opted_in_at));
    assert_eq!(data["first_reply_mid"], "m_1");
    // The trace of the webhook request continues on the public event.
    let tp = header_str(&got[0].properties, "traceparent").expect("traceparent");
    let tp = TraceParent::parse(&tp).expect("valid traceparent");
    assert_eq!(tp.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");

    assert_eq!(
        link_of(&db, "L1").await,
        ("PSID1".into(), replied, Some("m_1".into()))
    );
    assert_eq!(
        optin_replied(&db, "L1").await,
        ("replied".into(), Some(replied))
    );
    let finished: Option<OffsetDateTime> = db
        .query_one("SELECT finished_at FROM optins WHERE login_id = 'L1'", &[])
        .await
        .expect("row")
        .get(0);
    assert!(finished.is_some(), "replied is terminal");
    p.wait_processed(1).await;
    assert_eq!(p.replies("linked"), 1);
    assert!(
        env.remaining_events(&capture, LINKED).await.is_empty(),
        "exactly one event"
    );
    p.stop().await;
}

#[tokio::test]
async fn reply_to_a_sent_optin_keeps_it_sent_and_records_the_reply() {
    let (env, capture, mut p) = running().await;
    let db = env.sql().await;
    let opted_in_at = datetime!(2023-11-14 22:00:00 UTC);
    let replied = datetime!(2023-11-14 23:00:00 UTC);
    insert_sent_optin(&db, PAGE, "L2", opted_in_at).await;

    p.deliver(vec![reply("PSID2", "m_2", "L2", replied)]).await;
    let got = env.deliveries(&capture, 1, WAIT).await;
    assert_eq!(got.len(), 1);
    let event = env.contract().check_delivery(&got[0]);
    assert_eq!(event["data"]["psid"], "PSID2");
    assert_eq!(time_of(&event["data"]["opted_in_at"]), Some(opted_in_at));

    assert_eq!(link_of(&db, "L2").await.0, "PSID2");
    assert_eq!(
        optin_replied(&db, "L2").await,
        ("sent".into(), Some(replied))
    );
    assert!(
        env.remaining_events(&capture, LINKED).await.is_empty(),
        "exactly one event"
    );
    p.stop().await;
}

#[tokio::test]
async fn reply_before_the_optin_keeps_the_link_and_says_opted_in_at_null() {
    let (env, capture, mut p) = running().await;
    let db = env.sql().await;
    let replied = datetime!(2023-11-14 22:05:00 UTC);

    p.deliver(vec![reply("PSID3", "m_3", "L3", replied)]).await;
    let got = env.deliveries(&capture, 1, WAIT).await;
    assert_eq!(got.len(), 1);
    let event = env.contract().check_delivery(&got[0]);
    assert_eq!(event["data"]["login_id"], "L3");
    assert_eq!(event["data"]["opted_in_at"], Value::Null);
    assert_eq!(
        link_of(&db, "L3").await,
        ("PSID3".into(), replied, Some("m_3".into()))
    );
    assert_eq!(count(&db, "SELECT count(*) FROM optins").await, 0);
    assert!(
        env.remaining_events(&capture, LINKED).await.is_empty(),
        "exactly one event"
    );
    p.stop().await;
}

#[tokio::test]
async fn redeliveries_repeats_and_every_reply_shape_link_once_each() {
    let (env, capture, mut p) = setup().await;
    let t = datetime!(2023-11-14 22:05:00 UTC);
    // Posted before the correlator runs, so the copies wait on the queue and arrive together
    // (one batch: the second insert of a login_id sees the first's row in the same transaction).
    let same = reply("PSID4", "m_4", "L4", t);
    for _ in 0..3 {
        p.deliver(vec![same.clone()]).await;
    }
    // A later reply repeating prior_message (a new mid) must not relink either.
    p.deliver(vec![reply(
        "PSID4",
        "m_4b",
        "L4",
        t + Duration::from_secs(60),
    )])
    .await;
    // A postback with prior_message, and a quick reply whose prior_message uses `login_id`
    // (other sources never link: see linking.rs).
    p.deliver(vec![
        json!({"sender": {"id": "PSID5"}, "recipient": {"id": PAGE}, "timestamp": ms(t),
               "postback": {"mid": "m_5", "title": "Get Started", "payload": "GET_STARTED"},
               "prior_message": {"source": "login_connect", "identifier": "L5"}}),
        json!({"sender": {"id": "PSID6"}, "recipient": {"id": PAGE}, "timestamp": ms(t),
               "message": {"mid": "m_6", "text": "Outfit suggestions",
                           "quick_reply": {"payload": "CURATION"}},
               "prior_message": {"source": "login_connect", "login_id": "L6"}}),
    ])
    .await;
    p.start_correlator(&env).await;
    p.wait_processed(6).await;
    let db = env.sql().await;

    let events = env.remaining_events(&capture, LINKED).await;
    let mut linked: Vec<(String, String, String)> = events
        .iter()
        .map(|e| {
            let d = &e["data"];
            let s = |k: &str| d[k].as_str().unwrap_or_default().to_owned();
            (s("login_id"), s("psid"), s("first_reply_mid"))
        })
        .collect();
    linked.sort();
    assert_eq!(
        linked,
        vec![
            ("L4".into(), "PSID4".into(), "m_4".into()),
            ("L5".into(), "PSID5".into(), "m_5".into()),
            ("L6".into(), "PSID6".into(), "m_6".into()),
        ],
        "one event per link, from the first reply"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM links").await, 3);
    assert_eq!(count(&db, "SELECT count(*) FROM outbox").await, 3);
    assert_eq!(count(&db, "SELECT count(*) FROM link_conflicts").await, 0);
    assert_eq!(p.replies("linked"), 3);
    assert_eq!(p.replies("duplicate"), 3);

    // Redelivered again much later (a new batch): still nothing new.
    p.deliver(vec![same]).await;
    p.wait_processed(7).await;
    assert_eq!(p.replies("duplicate"), 4);
    assert!(env.remaining_events(&capture, LINKED).await.is_empty());
    assert_eq!(count(&db, "SELECT count(*) FROM outbox").await, 3);
    p.stop().await;
}

#[tokio::test]
async fn a_second_psid_for_a_linked_login_id_is_recorded_as_a_conflict() {
    let (env, capture, mut p) = running().await;
    let db = env.sql().await;
    let t = datetime!(2023-11-14 22:05:00 UTC);

    p.deliver(vec![reply("PSID_FIRST", "m_7", "L7", t)]).await;
    assert_eq!(env.deliveries(&capture, 1, WAIT).await.len(), 1);
    p.wait_processed(1).await;
    p.deliver(vec![reply(
        "PSID_OTHER",
        "m_8",
        "L7",
        t + Duration::from_secs(5),
    )])
    .await;
    p.wait_processed(2).await;
    // Seen again (a redelivery): one conflict row, counted once.
    p.deliver(vec![reply(
        "PSID_OTHER",
        "m_8",
        "L7",
        t + Duration::from_secs(5),
    )])
    .await;
    p.wait_processed(3).await;

    assert_eq!(
        link_of(&db, "L7").await.0,
        "PSID_FIRST",
        "the first link is kept"
    );
    let conflicts = db
        .query(
            "SELECT linked_psid, conflicting_psid, mid FROM link_conflicts \
             WHERE page_id = $1 AND login_id = 'L7'",
            &[&PAGE],
        )
        .await
        .expect("conflicts");
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0].get::<_, String>(0), "PSID_FIRST");
    assert_eq!(conflicts[0].get::<_, String>(1), "PSID_OTHER");
    assert_eq!(
        conflicts[0].get::<_, Option<String>>(2).as_deref(),
        Some("m_8")
    );
    assert_eq!(p.replies("conflict"), 2);
    let text = metrics_text(p.correlator().metrics_addr).await;
    assert!(
        text.lines()
            .any(|l| l == "correlator_link_conflicts_total 1"),
        "metric exported:\n{text}"
    );
    assert!(text.contains("correlator_replies_total{result=\"conflict\"} 2"));
    assert!(
        env.remaining_events(&capture, LINKED).await.is_empty(),
        "a conflict announces nothing"
    );
    p.stop().await;
}

#[tokio::test]
async fn a_message_without_prior_message_is_acked_and_counted_only() {
    let (env, _capture, mut p) = running().await;
    let db = env.sql().await;
    p.deliver(vec![
        json!({"sender": {"id": "PSID9"}, "recipient": {"id": PAGE},
                         "timestamp": 1_700_000_000_000_i64,
                         "message": {"mid": "m_9", "text": "hello"}}),
    ])
    .await;
    p.wait_processed(1).await;
    assert_eq!(p.replies("no_prior_message"), 1);
    assert_eq!(count(&db, "SELECT count(*) FROM links").await, 0);
    assert_eq!(count(&db, "SELECT count(*) FROM outbox").await, 0);
    let conn = env.vhost.connect().await;
    let ch = conn.create_channel().await.expect("channel");
    let dlq = topology::dead_letter_queue(topology::CORRELATOR_QUEUE);
    assert_eq!(queue_depth(&ch, &dlq).await, 0);
    // Acked, not just processed: once the correlator is gone, nothing is back on the queue.
    p.stop().await;
    assert_eq!(queue_depth(&ch, topology::CORRELATOR_QUEUE).await, 0);
    assert_eq!(queue_depth(&ch, &dlq).await, 0);
}

#[tokio::test]
async fn undecodable_messages_go_to_the_dead_letter_queue_with_the_reason() {
    let (env, capture, mut p) = running().await;
    let conn = env.vhost.connect().await;
    let ch = conn.create_channel().await.expect("channel");
    let publish = |body: Vec<u8>| {
        let ch = ch.clone();
        async move {
            ch.basic_publish(
                "".into(),
                topology::CORRELATOR_QUEUE.into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        }
    };
    publish(b"this is not json".to_vec()).await;
    // A queued event whose item is not a message at all.
    let mismatched = json!({"page_id": PAGE, "kind": "message", "source": "webhook",
                            "timestamp_ms": 1_700_000_000_000_i64, "idempotency_key": "k",
                            "event": {"timestamp": 1_700_000_000_000_i64,
                                      "optin": {"login_id": "L10"}}});
    publish(serde_json::to_vec(&mismatched).expect("json")).await;

    let dlq = topology::dead_letter_queue(topology::CORRELATOR_QUEUE);
    let dead = env.deliveries(&dlq, 2, WAIT).await;
    assert_eq!(dead.len(), 2, "both dead-lettered");
    let reasons: Vec<String> = dead
        .iter()
        .map(|d| header_str(&d.properties, topology::ERROR_HEADER).expect("reason header"))
        .collect();
    assert!(
        reasons[0].contains("not a queued webhook event"),
        "{}",
        reasons[0]
    );
    assert!(reasons[1].contains("does not parse"), "{}", reasons[1]);
    assert!(reasons[1].contains("optin"), "{}", reasons[1]);
    assert_eq!(dead[0].data, b"this is not json");
    assert_eq!(
        header_str(&dead[0].properties, topology::ORIGIN_QUEUE_HEADER).as_deref(),
        Some(topology::CORRELATOR_QUEUE)
    );

    // The queue is not blocked: a good reply after them is linked.
    p.deliver(vec![reply(
        "PSID11",
        "m_11",
        "L11",
        datetime!(2023-11-14 22:05:00 UTC),
    )])
    .await;
    let got = env.deliveries(&capture, 1, WAIT).await;
    assert_eq!(got.len(), 1);
    env.contract().check_delivery(&got[0]);
    assert_eq!(p.correlator().metrics.dead_lettered.get(), 2);
    p.stop().await;
    assert_eq!(
        queue_depth(&ch, topology::CORRELATOR_QUEUE).await,
        0,
        "all settled"
    );
}

#[tokio::test]
async fn data_the_database_can_never_store_is_dead_lettered_and_the_rest_of_the_batch_commits() {
    let (env, capture, mut p) = setup().await;
    let db = env.sql().await;
    // A constraint standing in for any deterministic refusal of one message's data.
    db.batch_execute("ALTER TABLE links ADD CONSTRAINT no_poison CHECK (psid <> 'PSID_POISON')")
        .await
        .expect("constraint");
    let t = datetime!(2023-11-14 22:05:00 UTC);
    // One body, posted before the correlator runs: the three replies share one batch.
    p.deliver(vec![
        reply("PSID_GOOD", "m_13", "L13", t),
        reply("PSID_POISON", "m_14", "L14", t),
        reply("PSID_NUL", "m_15", "L15\u{0}x", t),
    ])
    .await;
    p.start_correlator(&env).await;

    let dlq = topology::dead_letter_queue(topology::CORRELATOR_QUEUE);
    let dead = env.deliveries(&dlq, 2, WAIT).await;
    assert_eq!(dead.len(), 2, "the two bad replies are dead-lettered");
    let mut reasons: Vec<String> = dead
        .iter()
        .map(|d| header_str(&d.properties, topology::ERROR_HEADER).expect("reason header"))
        .collect();
    reasons.sort();
    assert!(reasons[0].contains("NUL character"), "{}", reasons[0]);
    assert!(reasons[1].contains("SQLSTATE 23514"), "{}", reasons[1]);
    let got = env.deliveries(&capture, 1, WAIT).await;
    assert_eq!(got.len(), 1, "the good reply is linked");
    let event = env.contract().check_delivery(&got[0]);
    assert_eq!(event["data"]["login_id"], "L13");
    assert_eq!(count(&db, "SELECT count(*) FROM links").await, 1);
    assert!(env.remaining_events(&capture, LINKED).await.is_empty());
    p.stop().await;
}

#[tokio::test]
async fn database_trouble_retries_the_batch_instead_of_dead_lettering_it() {
    let (env, capture, mut p) = running().await;
    let db = env.sql().await;
    // Make every link insert fail, as an outage would, without touching other tests.
    db.batch_execute("ALTER TABLE links RENAME TO links_away")
        .await
        .expect("rename");
    p.deliver(vec![reply(
        "PSID12",
        "m_12",
        "L12",
        datetime!(2023-11-14 22:05:00 UTC),
    )])
    .await;
    let metrics = p.correlator().metrics.clone();
    eventually(WAIT, "the batch failed at least once", || {
        let metrics = metrics.clone();
        async move { metrics.batch_failures.get() >= 1 }
    })
    .await;
    db.batch_execute("ALTER TABLE links_away RENAME TO links")
        .await
        .expect("rename back");

    let got = env.deliveries(&capture, 1, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1, "linked once the database is back");
    env.contract().check_delivery(&got[0]);
    assert_eq!(link_of(&db, "L12").await.0, "PSID12");
    let conn = env.vhost.connect().await;
    let ch = conn.create_channel().await.expect("channel");
    let dlq = topology::dead_letter_queue(topology::CORRELATOR_QUEUE);
    assert_eq!(queue_depth(&ch, &dlq).await, 0, "nothing dead-lettered");
    assert_eq!(p.correlator().metrics.dead_lettered.get(), 0);
    p.stop().await;
}
