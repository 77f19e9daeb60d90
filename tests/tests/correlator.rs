//! The correlator end to end on a real RabbitMQ and PostgreSQL: signed webhooks go through
//! ingest (in-process) to `correlator.replies`, the correlator (in-process) links login_ids
//! to PSIDs, and its relay publishes `identity.linked` on `loginconnect.events`, where a test
//! queue captures every event and checks it against the published schemas.

#[path = "correlator/env.rs"]
mod env;

use std::time::Duration;

use env::{
    CAPTURE, Env, PAGE, WAIT, count, eventually, insert_optin, link_of, ms, optin_state, reply,
    time_of,
};
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lc_shared::amqp::header_str;
use lc_shared::telemetry::TraceParent;
use lc_shared::topology;
use lc_testkit::harness::{consume_n, queue_depth};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::macros::datetime;

#[tokio::test]
async fn reply_after_a_pending_optin_links_once_and_marks_it_replied() {
    let mut env = Env::new().await;
    env.start_correlator().await;
    let db = env.db().await;
    let opted_in_at = datetime!(2023-11-14 22:00:00.250 UTC);
    let replied = datetime!(2023-11-14 22:05:00.500 UTC);
    insert_optin(&db, "L1", "pending", opted_in_at).await;

    env.post(vec![reply("PSID1", "m_1", "L1", replied)]).await;
    let got = consume_n(&env.events, CAPTURE, 1, WAIT).await;
    assert_eq!(got.len(), 1, "identity.linked published");
    let event = env.contract.check_delivery(&got[0]);
    assert_eq!(got[0].routing_key.as_str(), "identity.linked");
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
        optin_state(&db, "L1").await,
        ("replied".into(), Some(replied))
    );
    let finished: Option<OffsetDateTime> = db
        .query_one("SELECT finished_at FROM optins WHERE login_id = 'L1'", &[])
        .await
        .expect("row")
        .get(0);
    assert!(finished.is_some(), "replied is terminal");
    env.wait_processed(1).await;
    assert_eq!(env.replies("linked"), 1);
    assert!(env.all_events().await.is_empty(), "exactly one event");
    env.stop().await;
}

#[tokio::test]
async fn reply_to_a_sent_optin_keeps_it_sent_and_records_the_reply() {
    let mut env = Env::new().await;
    env.start_correlator().await;
    let db = env.db().await;
    let opted_in_at = datetime!(2023-11-14 22:00:00 UTC);
    let replied = datetime!(2023-11-14 23:00:00 UTC);
    insert_optin(&db, "L2", "sent", opted_in_at).await;

    env.post(vec![reply("PSID2", "m_2", "L2", replied)]).await;
    let got = consume_n(&env.events, CAPTURE, 1, WAIT).await;
    assert_eq!(got.len(), 1);
    let event = env.contract.check_delivery(&got[0]);
    assert_eq!(event["data"]["psid"], "PSID2");
    assert_eq!(time_of(&event["data"]["opted_in_at"]), Some(opted_in_at));

    assert_eq!(link_of(&db, "L2").await.0, "PSID2");
    assert_eq!(optin_state(&db, "L2").await, ("sent".into(), Some(replied)));
    assert!(env.all_events().await.is_empty(), "exactly one event");
    env.stop().await;
}

#[tokio::test]
async fn reply_before_the_optin_keeps_the_link_and_says_opted_in_at_null() {
    let mut env = Env::new().await;
    env.start_correlator().await;
    let db = env.db().await;
    let replied = datetime!(2023-11-14 22:05:00 UTC);

    env.post(vec![reply("PSID3", "m_3", "L3", replied)]).await;
    let got = consume_n(&env.events, CAPTURE, 1, WAIT).await;
    assert_eq!(got.len(), 1);
    let event = env.contract.check_delivery(&got[0]);
    assert_eq!(event["data"]["login_id"], "L3");
    assert_eq!(event["data"]["opted_in_at"], Value::Null);
    assert_eq!(
        link_of(&db, "L3").await,
        ("PSID3".into(), replied, Some("m_3".into()))
    );
    assert_eq!(count(&db, "SELECT count(*) FROM optins").await, 0);
    assert!(env.all_events().await.is_empty(), "exactly one event");
    env.stop().await;
}

#[tokio::test]
async fn redeliveries_repeats_and_every_reply_shape_link_once_each() {
    let mut env = Env::new().await;
    let t = datetime!(2023-11-14 22:05:00 UTC);
    // Posted before the correlator runs, so the copies wait on the queue and arrive together
    // (one batch: the second insert of a login_id sees the first's row in the same transaction).
    let same = reply("PSID4", "m_4", "L4", t);
    for _ in 0..3 {
        env.post(vec![same.clone()]).await;
    }
    // A later reply repeating prior_message (a new mid) must not relink either.
    env.post(vec![reply(
        "PSID4",
        "m_4b",
        "L4",
        t + Duration::from_secs(60),
    )])
    .await;
    // A postback with prior_message, and a quick reply whose prior_message uses `login_id`.
    env.post(vec![
        json!({"sender": {"id": "PSID5"}, "recipient": {"id": PAGE}, "timestamp": ms(t),
               "postback": {"mid": "m_5", "title": "Get Started", "payload": "GET_STARTED"},
               "prior_message": {"source": "login_connect", "identifier": "L5"}}),
        json!({"sender": {"id": "PSID6"}, "recipient": {"id": PAGE}, "timestamp": ms(t),
               "message": {"mid": "m_6", "text": "Outfit suggestions",
                           "quick_reply": {"payload": "CURATION"}},
               "prior_message": {"source": "checkbox_plugin", "login_id": "L6"}}),
    ])
    .await;
    env.start_correlator().await;
    env.wait_processed(6).await;
    let db = env.db().await;

    let events = env.all_events().await;
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
    assert_eq!(env.replies("linked"), 3);
    assert_eq!(env.replies("duplicate"), 3);

    // Redelivered again much later (a new batch): still nothing new.
    env.post(vec![same]).await;
    env.wait_processed(7).await;
    assert_eq!(env.replies("duplicate"), 4);
    assert!(env.all_events().await.is_empty());
    assert_eq!(count(&db, "SELECT count(*) FROM outbox").await, 3);
    env.stop().await;
}

#[tokio::test]
async fn a_second_psid_for_a_linked_login_id_is_recorded_as_a_conflict() {
    let mut env = Env::new().await;
    env.start_correlator().await;
    let db = env.db().await;
    let t = datetime!(2023-11-14 22:05:00 UTC);

    env.post(vec![reply("PSID_FIRST", "m_7", "L7", t)]).await;
    assert_eq!(consume_n(&env.events, CAPTURE, 1, WAIT).await.len(), 1);
    env.wait_processed(1).await;
    env.post(vec![reply(
        "PSID_OTHER",
        "m_8",
        "L7",
        t + Duration::from_secs(5),
    )])
    .await;
    env.wait_processed(2).await;
    // Seen again (a redelivery): one conflict row, counted once.
    env.post(vec![reply(
        "PSID_OTHER",
        "m_8",
        "L7",
        t + Duration::from_secs(5),
    )])
    .await;
    env.wait_processed(3).await;

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
    assert_eq!(env.replies("conflict"), 2);
    let text = env.metrics_text().await;
    assert!(
        text.lines()
            .any(|l| l == "correlator_link_conflicts_total 1"),
        "metric exported:\n{text}"
    );
    assert!(text.contains("correlator_replies_total{result=\"conflict\"} 2"));
    assert!(
        env.all_events().await.is_empty(),
        "a conflict announces nothing"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_message_without_prior_message_is_acked_and_counted_only() {
    let mut env = Env::new().await;
    env.start_correlator().await;
    let db = env.db().await;
    env.post(vec![
        json!({"sender": {"id": "PSID9"}, "recipient": {"id": PAGE},
                         "timestamp": 1_700_000_000_000_i64,
                         "message": {"mid": "m_9", "text": "hello"}}),
    ])
    .await;
    env.wait_processed(1).await;
    assert_eq!(env.replies("no_prior_message"), 1);
    assert_eq!(count(&db, "SELECT count(*) FROM links").await, 0);
    assert_eq!(count(&db, "SELECT count(*) FROM outbox").await, 0);
    let ch = env.events.create_channel().await.expect("channel");
    let dlq = topology::dead_letter_queue(topology::CORRELATOR_QUEUE);
    assert_eq!(queue_depth(&ch, &dlq).await, 0);
    // Acked, not just processed: once the correlator is gone, nothing is back on the queue.
    env.stop().await;
    assert_eq!(queue_depth(&ch, topology::CORRELATOR_QUEUE).await, 0);
    assert_eq!(queue_depth(&ch, &dlq).await, 0);
}

#[tokio::test]
async fn undecodable_messages_go_to_the_dead_letter_queue_with_the_reason() {
    let mut env = Env::new().await;
    env.start_correlator().await;
    let ch = env.events.create_channel().await.expect("channel");
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
    let dead = consume_n(&env.events, &dlq, 2, WAIT).await;
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
    env.post(vec![reply(
        "PSID11",
        "m_11",
        "L11",
        datetime!(2023-11-14 22:05:00 UTC),
    )])
    .await;
    let got = consume_n(&env.events, CAPTURE, 1, WAIT).await;
    assert_eq!(got.len(), 1);
    env.contract.check_delivery(&got[0]);
    assert_eq!(env.correlator().metrics.dead_lettered.get(), 2);
    env.stop().await;
    assert_eq!(
        queue_depth(&ch, topology::CORRELATOR_QUEUE).await,
        0,
        "all settled"
    );
}

#[tokio::test]
async fn data_the_database_can_never_store_is_dead_lettered_and_the_rest_of_the_batch_commits() {
    let mut env = Env::new().await;
    let db = env.db().await;
    // A constraint standing in for any deterministic refusal of one message's data.
    db.batch_execute("ALTER TABLE links ADD CONSTRAINT no_poison CHECK (psid <> 'PSID_POISON')")
        .await
        .expect("constraint");
    let t = datetime!(2023-11-14 22:05:00 UTC);
    // One body, posted before the correlator runs: the three replies share one batch.
    env.post(vec![
        reply("PSID_GOOD", "m_13", "L13", t),
        reply("PSID_POISON", "m_14", "L14", t),
        reply("PSID_NUL", "m_15", "L15\u{0}x", t),
    ])
    .await;
    env.start_correlator().await;

    let dlq = topology::dead_letter_queue(topology::CORRELATOR_QUEUE);
    let dead = consume_n(&env.events, &dlq, 2, WAIT).await;
    assert_eq!(dead.len(), 2, "the two bad replies are dead-lettered");
    let mut reasons: Vec<String> = dead
        .iter()
        .map(|d| header_str(&d.properties, topology::ERROR_HEADER).expect("reason header"))
        .collect();
    reasons.sort();
    assert!(reasons[0].contains("NUL character"), "{}", reasons[0]);
    assert!(reasons[1].contains("SQLSTATE 23514"), "{}", reasons[1]);
    let got = consume_n(&env.events, CAPTURE, 1, WAIT).await;
    assert_eq!(got.len(), 1, "the good reply is linked");
    let event = env.contract.check_delivery(&got[0]);
    assert_eq!(event["data"]["login_id"], "L13");
    assert_eq!(count(&db, "SELECT count(*) FROM links").await, 1);
    assert!(env.all_events().await.is_empty());
    env.stop().await;
}

#[tokio::test]
async fn database_trouble_retries_the_batch_instead_of_dead_lettering_it() {
    let mut env = Env::new().await;
    env.start_correlator().await;
    let db = env.db().await;
    // Make every link insert fail, as an outage would, without touching other tests.
    db.batch_execute("ALTER TABLE links RENAME TO links_away")
        .await
        .expect("rename");
    env.post(vec![reply(
        "PSID12",
        "m_12",
        "L12",
        datetime!(2023-11-14 22:05:00 UTC),
    )])
    .await;
    let metrics = env.correlator().metrics.clone();
    eventually("the batch failed at least once", || {
        let metrics = metrics.clone();
        async move { metrics.batch_failures.get() >= 1 }
    })
    .await;
    db.batch_execute("ALTER TABLE links_away RENAME TO links")
        .await
        .expect("rename back");

    let got = consume_n(&env.events, CAPTURE, 1, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1, "linked once the database is back");
    env.contract.check_delivery(&got[0]);
    assert_eq!(link_of(&db, "L12").await.0, "PSID12");
    let ch = env.events.create_channel().await.expect("channel");
    let dlq = topology::dead_letter_queue(topology::CORRELATOR_QUEUE);
    assert_eq!(queue_depth(&ch, &dlq).await, 0, "nothing dead-lettered");
    assert_eq!(env.correlator().metrics.dead_lettered.get(), 0);
    env.stop().await;
}
