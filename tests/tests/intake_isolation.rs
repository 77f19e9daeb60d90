//! Intake against hostile and out-of-order input (issue 13 item 5): one bad opt-in is
//! dead-lettered with its reason and never stops the opt-ins behind it or beside it in a
//! batch.

use std::time::Duration;

use lc_meta::webhook::{EventKind, QueuedEvent};
use lc_shared::{amqp, topology};
use lc_testkit::harness::consume_n;
use lc_testkit::pipeline::{
    PAGE, TestEnv, body, eventually, ms, optin_item, optin_state, post_signed,
};
use time::OffsetDateTime;
use time::macros::datetime;

const WAIT: Duration = Duration::from_secs(20);

/// The reasons and bodies (as text) on the scheduler's dead-letter queue, awaiting `n`.
async fn dead_letter_reasons(env: &TestEnv, n: usize) -> Vec<(String, String)> {
    let conn = env.vhost.connect().await;
    let dlq = topology::dead_letter_queue(topology::SCHEDULER_QUEUE);
    consume_n(&conn, &dlq, n, WAIT)
        .await
        .iter()
        .map(|d| {
            let reason =
                amqp::header_str(&d.properties, topology::ERROR_HEADER).unwrap_or_default();
            (reason, String::from_utf8_lossy(&d.data).into_owned())
        })
        .collect()
}

#[tokio::test]
async fn a_nul_login_id_and_a_year_9999_timestamp_are_dead_lettered_and_the_next_optin_is_sent() {
    let env = TestEnv::new().await;
    let (ingest, _stop_ingest) = env.start_ingest().await;
    let (scheduler, stop) = env.start_scheduler(env.scheduler_config()).await;
    let now = OffsetDateTime::now_utc();

    // JSON `\u0000` in login_id, and a time in the last day of year 9999: both pass the
    // signature and the webhook parser, and both used to stop intake for good.
    let nul = body(PAGE, vec![optin_item(PAGE, "BAD\u{0}NUL", now)]);
    assert!(
        String::from_utf8_lossy(&nul).contains(r"BAD\u0000NUL"),
        "the NUL travels as a JSON escape"
    );
    assert_eq!(post_signed(&ingest, nul).await, 200);
    let last_day = datetime!(9999-12-31 12:00 UTC);
    assert_eq!(
        post_signed(
            &ingest,
            body(PAGE, vec![optin_item(PAGE, "Y9999", last_day)])
        )
        .await,
        200
    );
    assert_eq!(
        post_signed(&ingest, body(PAGE, vec![optin_item(PAGE, "GOOD", now)])).await,
        200
    );

    let calls = env
        .graph
        .wait_for_send_calls(1, WAIT)
        .await
        .expect("the normal opt-in is sent");
    assert_eq!(calls[0].login_id.as_deref(), Some("GOOD"));

    let dead = dead_letter_reasons(&env, 2).await;
    assert_eq!(
        dead.len(),
        2,
        "both hostile opt-ins dead-lettered: {dead:?}"
    );
    let reason_of = |needle: &str| {
        dead.iter()
            .find(|(_, data)| data.contains(needle))
            .map(|(reason, _)| reason.clone())
            .unwrap_or_else(|| panic!("no dead letter holds {needle}: {dead:?}"))
    };
    let nul_reason = reason_of(r"BAD\u0000NUL");
    assert!(
        nul_reason.contains("login_id") && nul_reason.contains("NUL"),
        "{nul_reason}"
    );
    let time_reason = reason_of("Y9999");
    assert!(
        time_reason.contains("9999") && time_reason.contains("future"),
        "{time_reason}"
    );

    let sql = env.sql().await;
    eventually(WAIT, "GOOD recorded as sent", || async {
        optin_state(&sql, "GOOD").await.as_deref() == Some("sent")
    })
    .await;
    let rows: i64 = sql
        .query_one("SELECT count(*) FROM optins", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 1, "nothing recorded for the hostile opt-ins");
    let ready = reqwest::get(format!("http://{}/readyz", scheduler.metrics_addr))
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);
    stop.trigger();
    scheduler.task.await.expect("stopped");
}

/// A queued opt-in as ingest would publish it, with `source` as given.
fn queued_optin(login_id: &str, at: OffsetDateTime, source: &str) -> Vec<u8> {
    let item = serde_json::to_string(&optin_item(PAGE, login_id, at)).expect("json");
    let queued = QueuedEvent {
        page_id: PAGE.into(),
        kind: EventKind::Optin,
        source: source.into(),
        timestamp_ms: ms(at),
        idempotency_key: format!("optin:{PAGE}:{login_id}:{}", ms(at)),
        event: serde_json::value::RawValue::from_string(item).expect("raw"),
    };
    serde_json::to_vec(&queued).expect("json")
}

#[tokio::test]
async fn a_row_the_database_refuses_is_dead_lettered_alone_and_the_rest_of_its_batch_commits() {
    let env = TestEnv::new().await;
    // Ingest declares the topology; the scheduler starts only once everything is queued, so
    // the deliveries arrive together and are recorded as one batch.
    let (_ingest, _stop_ingest) = env.start_ingest().await;
    let conn = env.vhost.connect().await;
    let ch = amqp::confirm_channel(&conn).await.expect("channel");
    let now = OffsetDateTime::now_utc();
    let mut bodies: Vec<(String, Vec<u8>)> = (0..10)
        .map(|i| {
            let l = format!("OK{i}");
            let b = queued_optin(&l, now, "webhook");
            (l, b)
        })
        .collect();
    // Valid ids and time, but a NUL in `source`: PostgreSQL refuses the text (SQLSTATE 22021)
    // only when the row is written.
    bodies.insert(
        5,
        ("REFUSED".into(), queued_optin("REFUSED", now, "web\0hook")),
    );
    for (login_id, data) in &bodies {
        let c = amqp::publish(
            &ch,
            topology::WEBHOOK_EXCHANGE,
            &format!("optin.{PAGE}"),
            true,
            data,
            amqp::persistent_properties(login_id, "application/json"),
        )
        .await
        .expect("publish");
        amqp::await_confirm(c, WAIT).await.expect("confirm");
    }
    let (scheduler, stop) = env.start_scheduler(env.scheduler_config()).await;

    let calls = env
        .graph
        .wait_for_send_calls(10, WAIT)
        .await
        .expect("the ten valid opt-ins are sent");
    let mut sent: Vec<String> = calls.iter().filter_map(|c| c.login_id.clone()).collect();
    sent.sort();
    let mut want: Vec<String> = (0..10).map(|i| format!("OK{i}")).collect();
    want.sort();
    assert_eq!(sent, want);

    let dead = dead_letter_reasons(&env, 1).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let (reason, data) = &dead[0];
    assert!(reason.contains("22021"), "names the SQLSTATE: {reason}");
    assert!(
        data.contains("REFUSED"),
        "the refused opt-in itself: {data}"
    );
    let sql = env.sql().await;
    assert_eq!(optin_state(&sql, "REFUSED").await, None);
    stop.trigger();
    scheduler.task.await.expect("stopped");
}
