//! Who may link a login_id, and from which channel (issue 14 items 1–3): only an allowed
//! `prior_message.source` links (others are counted and kept in `foreign_prior_messages`),
//! a reply in `standby` with `prior_message` links like one in `messaging`, and a batch with
//! one row the database refuses dead-letters exactly that row, whatever statement of the
//! pipelined batch reports the failure first.

use std::time::Duration;

use lc_shared::amqp::header_str;
use lc_shared::topology;
use lc_testkit::harness::queue_depth;
use lc_testkit::pipeline::{
    PAGE, Pipeline, TestEnv, WAIT, count, eventually, insert_optin, link_of, metrics_text, ms,
    post_signed, text_reply_item,
};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::macros::datetime;

/// Ingest and a migrated database, every public event captured on the returned queue.
async fn setup() -> (TestEnv, String, Pipeline) {
    let env = TestEnv::new().await;
    let capture = env.capture_events(&["#"]).await;
    let pipeline = env.pipeline().start().await;
    env.migrated_pool(1).await;
    (env, capture, pipeline)
}

/// A text reply from `psid` whose `prior_message` has this `source` (or none).
fn reply_from(
    psid: &str,
    mid: &str,
    login_id: &str,
    source: Option<&str>,
    at: OffsetDateTime,
) -> Value {
    let mut prior = json!({"identifier": login_id});
    if let Some(source) = source {
        prior["source"] = json!(source);
    }
    json!({"sender": {"id": psid}, "recipient": {"id": PAGE}, "timestamp": ms(at),
           "message": {"mid": mid, "text": "hi"}, "prior_message": prior})
}

#[tokio::test]
async fn a_prior_message_of_another_source_never_links_and_is_kept_for_inspection() {
    let (env, capture, mut p) = setup().await;
    p.start_correlator(&env).await;
    let db = env.sql().await;
    let t = datetime!(2023-11-14 22:05:00 UTC);

    // A checkbox-plugin user_ref is chosen client-side: anyone can make it equal a login_id.
    p.deliver(vec![reply_from(
        "PSID_X",
        "m_x",
        "L20",
        Some("checkbox_plugin"),
        t,
    )])
    .await;
    // And a prior_message without any source.
    p.deliver(vec![reply_from("PSID_Y", "m_y", "L20", None, t)])
        .await;
    p.wait_processed(2).await;
    // The person's real reply, later.
    p.deliver(vec![text_reply_item(
        PAGE,
        "PSID_V",
        "m_v",
        "L20",
        t + Duration::from_secs(60),
    )])
    .await;

    let got = env.deliveries(&capture, 1, WAIT).await;
    assert_eq!(got.len(), 1, "one identity.linked");
    let event = env.contract().check_delivery(&got[0]);
    assert_eq!(event["data"]["psid"], "PSID_V", "linked to the real reply");
    assert_eq!(link_of(&db, "L20").await.0, "PSID_V");
    assert_eq!(count(&db, "SELECT count(*) FROM link_conflicts").await, 0);
    let kept = db
        .query(
            "SELECT psid, source, mid FROM foreign_prior_messages \
             WHERE page_id = $1 AND login_id = 'L20' ORDER BY psid",
            &[&PAGE],
        )
        .await
        .expect("kept for inspection");
    let kept: Vec<(String, Option<String>, Option<String>)> = kept
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        kept,
        vec![
            (
                "PSID_X".into(),
                Some("checkbox_plugin".into()),
                Some("m_x".into())
            ),
            ("PSID_Y".into(), None, Some("m_y".into())),
        ]
    );
    p.wait_processed(3).await;
    assert_eq!(p.replies("foreign_source"), 2);
    assert_eq!(p.replies("linked"), 1);
    let text = metrics_text(p.correlator().metrics_addr).await;
    assert!(
        text.contains("correlator_replies_total{result=\"foreign_source\"} 2"),
        "{text}"
    );
    assert!(
        env.remaining_events(&capture, "identity.linked")
            .await
            .is_empty()
    );
    p.stop().await;
}

#[tokio::test]
async fn a_standby_reply_with_prior_message_links_and_other_standby_items_stay_other() {
    let (env, capture, mut p) = setup().await;
    p.start_correlator(&env).await;
    let db = env.sql().await;
    let t = datetime!(2023-11-14 22:05:00 UTC);
    insert_optin(&db, PAGE, "L21", t - Duration::from_secs(60), "pending").await;
    // Another app owns the thread: the reply comes in `standby`, with its prior_message;
    // beside it a standby message without one and a standby echo.
    let body = json!({"object": "page", "entry": [{"id": PAGE, "time": ms(t), "standby": [
        text_reply_item(PAGE, "PSID_S", "m_s", "L21", t),
        {"sender": {"id": "PSID_S2"}, "recipient": {"id": PAGE}, "timestamp": ms(t),
         "message": {"mid": "m_s2", "text": "to the inbox"}},
        {"sender": {"id": PAGE}, "recipient": {"id": "PSID_S"}, "timestamp": ms(t),
         "message": {"mid": "m_echo", "is_echo": true, "text": "agent says hi"}},
    ]}]});
    let status = post_signed(&p.ingest, serde_json::to_vec(&body).expect("json")).await;
    assert_eq!(status, 200);

    let got = env.deliveries(&capture, 1, WAIT).await;
    assert_eq!(got.len(), 1, "identity.linked for the standby reply");
    let event = env.contract().check_delivery(&got[0]);
    assert_eq!(event["data"]["login_id"], "L21");
    assert_eq!(event["data"]["psid"], "PSID_S");
    assert_eq!(event["data"]["first_reply_mid"], "m_s");
    assert_eq!(link_of(&db, "L21").await.0, "PSID_S");
    let state: String = db
        .query_one("SELECT state FROM optins WHERE login_id = 'L21'", &[])
        .await
        .expect("row")
        .get(0);
    assert_eq!(
        state, "replied",
        "nothing will be sent to a person who replied"
    );
    // The two other standby items went where they always went.
    assert_eq!(env.depth(topology::OTHER_QUEUE).await, 2);
    p.wait_processed(1).await;
    assert_eq!(p.replies("linked"), 1);
    p.stop().await;
    let conn = env.vhost.connect().await;
    let ch = conn.create_channel().await.expect("channel");
    assert_eq!(queue_depth(&ch, topology::CORRELATOR_QUEUE).await, 0);
}

#[tokio::test]
async fn a_refused_row_behind_a_slow_statement_is_dead_lettered_alone_without_a_batch_retry() {
    let (env, capture, mut p) = setup().await;
    let db = env.sql().await;
    // The refusal comes late (after a sleep), so the innocent replies' next statements are
    // already queued behind it and fail with 25P02 right after the refusal's own 23514.
    db.batch_execute(
        "CREATE FUNCTION slow_refusal(psid text) RETURNS boolean LANGUAGE plpgsql AS $$ \
         BEGIN IF psid = 'PSID_POISON' THEN PERFORM pg_sleep(1); RETURN false; END IF; \
         RETURN true; END $$; \
         ALTER TABLE links ADD CONSTRAINT slow_poison CHECK (slow_refusal(psid));",
    )
    .await
    .expect("constraint");
    let t = datetime!(2023-11-14 22:05:00 UTC);
    let mut items = Vec::new();
    for i in 0..20 {
        let login_id = format!("A{i:02}");
        // A pending opt-in gives each innocent reply three statements (link, opt-in, event).
        insert_optin(&db, PAGE, &login_id, t - Duration::from_secs(60), "pending").await;
        items.push(text_reply_item(
            PAGE,
            &format!("PSID_{i:02}"),
            &format!("m_{i:02}"),
            &login_id,
            t,
        ));
    }
    // Sorted after every innocent one (the batch is ordered by login_id).
    items.push(text_reply_item(PAGE, "PSID_POISON", "m_poison", "Z99", t));
    // One body posted before the correlator runs: one batch.
    p.deliver(items).await;
    p.start_correlator(&env).await;
    // Whether the batch's join sees the refusal or an innocent 25P02 first depends on how
    // many answers have arrived when it is polled. A busy machine lets them pile up; this
    // test makes it so: once the refusing statement sleeps (the innocent replies' second
    // statements are sent meanwhile), it stalls the runtime thread that the correlator and
    // its connection run on (a `#[tokio::test]` is single-threaded) until well after the
    // refusal, so every answer is read at once.
    eventually(WAIT, "the refusing statement runs", || async {
        count(
            &db,
            "SELECT count(*) FROM pg_stat_activity \
             WHERE wait_event = 'PgSleep' AND query LIKE 'INSERT INTO links%'",
        )
        .await
            == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::thread::sleep(Duration::from_millis(1500));

    let dlq = topology::dead_letter_queue(topology::CORRELATOR_QUEUE);
    let dead = env.deliveries(&dlq, 1, WAIT).await;
    assert_eq!(dead.len(), 1, "the refused reply is dead-lettered");
    let reason = header_str(&dead[0].properties, topology::ERROR_HEADER).expect("reason");
    assert!(reason.contains("SQLSTATE 23514"), "{reason}");
    let got = env.deliveries(&capture, 20, WAIT).await;
    assert_eq!(got.len(), 20, "every innocent reply is linked");
    assert_eq!(count(&db, "SELECT count(*) FROM links").await, 20);
    assert_eq!(
        p.correlator().metrics.batch_failures.get(),
        0,
        "the batch was never retried as a whole"
    );
    p.stop().await;
}

#[tokio::test]
async fn ids_with_control_characters_are_refused_before_the_database() {
    let (env, capture, mut p) = setup().await;
    p.start_correlator(&env).await;
    let t = datetime!(2023-11-14 22:05:00 UTC);
    p.deliver(vec![
        text_reply_item(PAGE, "PSID_C", "m_c", "L\u{1b}[31m", t),
        text_reply_item(PAGE, "PSID_D\n", "m_d", "L22", t),
    ])
    .await;
    let dlq = topology::dead_letter_queue(topology::CORRELATOR_QUEUE);
    let dead = env.deliveries(&dlq, 2, WAIT).await;
    assert_eq!(dead.len(), 2, "both dead-lettered");
    let mut reasons: Vec<String> = dead
        .iter()
        .map(|d| header_str(&d.properties, topology::ERROR_HEADER).expect("reason"))
        .collect();
    reasons.sort();
    assert!(
        reasons[0].contains("login_id contains the control character U+001B"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("sender id contains the control character U+000A"),
        "{reasons:?}"
    );
    let db = env.sql().await;
    assert_eq!(count(&db, "SELECT count(*) FROM links").await, 0);
    assert!(
        env.remaining_events(&capture, "identity.linked")
            .await
            .is_empty()
    );
    p.stop().await;
}
