//! The scheduler when things go wrong: a worker killed inside the crash window, a stale
//! worker's late result, a reply racing its opt-in, a second page for one login_id, and
//! messages that cannot be decoded.

use std::sync::Arc;
use std::time::Duration;

use lc_testkit::pipeline::{
    PAGE, TestEnv, WAIT, body, claim, eventually, expire_leases, insert_optin, optin_item,
    optin_state, post_signed,
};
use lc_worker::scheduler::store::rescue::UnknownOutcome;
use serde_json::Value;
use time::OffsetDateTime;

async fn crash_inside_the_window(policy: UnknownOutcome) -> (TestEnv, Vec<Value>) {
    let env = TestEnv::new().await;
    let events = env.capture_events(&["first_message.*.#"]).await;
    let (ingest, _stop_ingest) = env.start_ingest().await;
    let mut config = env.scheduler_config();
    config.graph_timeout_ms = 500;
    config.lease_secs = 1;
    config.unknown_outcome = policy;
    // The first worker freezes right after Graph accepted the message.
    let hook: lc_worker::scheduler::dispatch::AfterSendHook =
        Arc::new(|| Box::pin(std::future::pending::<()>()));
    let (first, _stop_first) = env
        .start_scheduler_with_hook(config.clone(), Some(hook))
        .await;
    let now = OffsetDateTime::now_utc();
    assert_eq!(
        post_signed(&ingest, body(PAGE, vec![optin_item(PAGE, "C1", now)])).await,
        200
    );
    env.graph
        .wait_for_send_calls(1, WAIT)
        .await
        .expect("the call went out");
    // Killed inside the window: no task of it runs on.
    first.task.abort();
    let _ = first.task.await;

    let (second, stop) = env.start_scheduler(config).await;
    let want = if policy == UnknownOutcome::Retry {
        2
    } else {
        1
    };
    let got = env.events(&events, 1).await;
    if policy == UnknownOutcome::Retry {
        env.graph
            .wait_for_send_calls(want, WAIT)
            .await
            .expect("retried");
    }
    stop.trigger();
    second.task.await.expect("stopped");
    assert_eq!(env.graph.send_calls().len(), want);
    (env, got)
}

#[tokio::test]
async fn crash_between_graph_success_and_commit_fails_the_optin_by_default() {
    let (env, events) = crash_inside_the_window(UnknownOutcome::Fail).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["type"], "com.loginconnect.first_message.failed");
    assert_eq!(events[0]["data"]["reason"], "outcome_unknown");
    let sql = env.sql().await;
    assert_eq!(optin_state(&sql, "C1").await.as_deref(), Some("failed"));
}

#[tokio::test]
async fn crash_between_graph_success_and_commit_retries_when_configured() {
    let (env, events) = crash_inside_the_window(UnknownOutcome::Retry).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["type"], "com.loginconnect.first_message.sent");
    let sql = env.sql().await;
    assert_eq!(optin_state(&sql, "C1").await.as_deref(), Some("sent"));
}

#[tokio::test]
async fn a_stale_worker_cannot_overwrite_a_newer_claim() {
    use lc_worker::scheduler::store;
    let env = TestEnv::new().await;
    let pool = env.migrated_pool(4).await;
    let sql = env.sql().await;
    let now = OffsetDateTime::now_utc();
    insert_optin(&sql, PAGE, "F1", now, "pending").await;
    let mut client = pool.get().await.expect("client");
    let lease = Duration::from_secs(30);
    let old = claim(&mut client, "worker-a", lease).await;
    assert_eq!(old.len(), 1);
    // Worker A stalls; its lease runs out and the rescuer hands the row to worker B.
    expire_leases(&sql).await;
    let rescued = store::rescue::rescue_expired_leases(&mut client, UnknownOutcome::Retry, 10)
        .await
        .expect("rescue");
    // No call had started: the row goes back to pending, whatever the policy.
    assert_eq!(
        rescued,
        store::rescue::Rescued {
            returned: 1,
            unknown: 0
        }
    );
    let new = claim(&mut client, "worker-b", lease).await;
    assert_eq!(new.len(), 1);
    assert!(new[0].fence > old[0].fence);

    // A's late result is refused and changes nothing; B's is recorded.
    assert!(
        !store::finish::finish_sent(&mut client, &old[0], "m_stale", now)
            .await
            .expect("stale write")
    );
    let err = store::StoredError {
        message: "late".into(),
        ..Default::default()
    };
    assert!(
        !store::reschedule(&client, &old[0], now, &err)
            .await
            .expect("stale reschedule")
    );
    assert!(
        !store::finish::finish_unsent(
            &mut client,
            &old[0],
            store::finish::Ending::Expired,
            true,
            None
        )
        .await
        .expect("stale end")
    );
    assert_eq!(optin_state(&sql, "F1").await.as_deref(), Some("sending"));
    assert!(
        store::finish::finish_sent(&mut client, &new[0], "m_new", now)
            .await
            .expect("write")
    );
    let row = sql
        .query_one(
            "SELECT state, message_id FROM optins WHERE login_id = 'F1'",
            &[],
        )
        .await
        .expect("row");
    assert_eq!(row.get::<_, String>(0), "sent");
    assert_eq!(row.get::<_, String>(1), "m_new");
    let events: i64 = sql
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(events, 1, "only the newer claim's event");
}

#[tokio::test]
async fn a_login_id_messaged_through_one_page_is_refused_for_another() {
    let env = TestEnv::new().await;
    env.migrated_pool(2).await;
    let sql = env.sql().await;
    let now = OffsetDateTime::now_utc();
    sql.execute(
        "INSERT INTO optins (page_id, login_id, opted_in_at, deadline, send_at, state, next_attempt_at, message_id) \
         VALUES ('555', 'X1', $1, $1::timestamptz + interval '24 hours', $1, 'sent', $1, 'm_prev')",
        &[&now],
    )
    .await
    .expect("insert");
    let events = env.capture_events(&["first_message.*.#"]).await;
    let mut p = env.start_pipeline(env.scheduler_config()).await;
    assert_eq!(
        post_signed(&p.ingest, body(PAGE, vec![optin_item(PAGE, "X1", now)])).await,
        200
    );
    let got = env.events(&events, 1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["data"]["reason"], "other_page");
    assert!(env.graph.send_calls().is_empty());
    p.stop_scheduler().await;
}

#[tokio::test]
async fn undecodable_messages_are_dead_lettered_with_the_reason_and_do_not_block_the_queue() {
    use lc_shared::{amqp, topology};
    let env = TestEnv::new().await;
    let mut p = env.start_pipeline(env.scheduler_config()).await;
    let conn = env.vhost.connect().await;
    let ch = amqp::confirm_channel(&conn).await.expect("channel");
    for garbage in [&b"not json at all"[..], br#"{"page_id":"1","kind":"message","source":"webhook","timestamp_ms":1,"idempotency_key":"k","event":{"sender":{"id":"P"},"recipient":{"id":"1"},"timestamp":1,"message":{"mid":"m","text":"hi"}}}"#] {
        let c = amqp::publish(
            &ch,
            topology::WEBHOOK_EXCHANGE,
            "optin.1",
            true,
            garbage,
            amqp::persistent_properties("garbage", "application/json"),
        )
        .await
        .expect("publish");
        amqp::await_confirm(c, WAIT).await.expect("confirm");
    }
    // A valid opt-in behind them still goes out.
    let now = OffsetDateTime::now_utc();
    assert_eq!(
        post_signed(&p.ingest, body(PAGE, vec![optin_item(PAGE, "AFTER", now)])).await,
        200
    );
    env.graph
        .wait_for_send_calls(1, WAIT)
        .await
        .expect("not blocked");

    let dlq = topology::dead_letter_queue(topology::SCHEDULER_QUEUE);
    let dead = env.deliveries(&dlq, 2, WAIT).await;
    assert_eq!(dead.len(), 2);
    let reasons: Vec<String> = dead
        .iter()
        .map(|d| amqp::header_str(&d.properties, topology::ERROR_HEADER).expect("reason"))
        .collect();
    assert!(
        reasons[0].contains("not a queued webhook event"),
        "{reasons:?}"
    );
    assert!(reasons[1].contains("expected an opt-in"), "{reasons:?}");
    assert_eq!(
        dead[0].data.as_slice(),
        b"not json at all",
        "kept as received"
    );
    assert_eq!(
        amqp::header_str(&dead[0].properties, topology::ORIGIN_QUEUE_HEADER).as_deref(),
        Some(topology::SCHEDULER_QUEUE)
    );
    p.stop_scheduler().await;
}

#[tokio::test]
async fn a_reply_committed_alongside_its_optin_still_prevents_the_send() {
    // The correlator and the scheduler committed at the same moment: the link exists, but the
    // opt-in was recorded `pending` because neither transaction saw the other.
    let env = TestEnv::new().await;
    env.migrated_pool(2).await;
    let sql = env.sql().await;
    let now = OffsetDateTime::now_utc();
    insert_optin(&sql, PAGE, "RACE", now, "pending").await;
    sql.execute(
        "INSERT INTO links (page_id, login_id, psid, linked_at) VALUES ($1, 'RACE', 'P', $2)",
        &[&PAGE, &(now + Duration::from_secs(1))],
    )
    .await
    .expect("link");
    // A control opt-in without a reply proves the scheduler did run.
    insert_optin(&sql, PAGE, "CONTROL", now, "pending").await;
    let (scheduler, stop) = env.start_scheduler(env.scheduler_config()).await;
    env.graph
        .wait_for_send_calls(1, WAIT)
        .await
        .expect("control sent");
    eventually(WAIT, "RACE resolved", || async {
        optin_state(&sql, "RACE").await.as_deref() == Some("replied")
    })
    .await;
    let calls = env.graph.send_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].login_id.as_deref(), Some("CONTROL"));
    stop.trigger();
    scheduler.task.await.expect("stopped");
}

#[tokio::test]
async fn a_send_that_times_out_is_not_retried_because_it_may_have_been_delivered() {
    use lc_testkit::fake_graph::FakeResponse;
    let env = TestEnv::new().await;
    let events = env.capture_events(&["first_message.*.#"]).await;
    let mut config = env.scheduler_config();
    config.graph_timeout_ms = 500;
    config.lease_secs = 2;
    // Graph takes the message but answers after our timeout.
    env.graph
        .script("SLOW", vec![FakeResponse::Hang(Duration::from_secs(2))]);
    let mut p = env.start_pipeline(config).await;
    let now = OffsetDateTime::now_utc();
    assert_eq!(
        post_signed(&p.ingest, body(PAGE, vec![optin_item(PAGE, "SLOW", now)])).await,
        200
    );
    let got = env.events(&events, 1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["type"], "com.loginconnect.first_message.failed");
    assert_eq!(got[0]["data"]["reason"], "outcome_unknown");
    assert_eq!(got[0]["data"]["attempts"], 1);
    assert!(
        got[0]["data"]["last_error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("timeout")),
        "{got:?}"
    );
    assert_eq!(env.graph.send_calls().len(), 1, "never a second call");
    p.stop_scheduler().await;
}

#[tokio::test]
async fn claiming_due_work_is_an_index_scan_in_deadline_order_with_a_large_backlog() {
    let env = TestEnv::new().await;
    env.migrated_pool(2).await;
    let sql = env.sql().await;
    // 100,000 pending opt-ins spread over 24 hours, most already finished elsewhere, and a
    // paused page with a backlog of its own that the claim must not read at all.
    sql.batch_execute(
        "INSERT INTO optins (page_id, login_id, opted_in_at, deadline, send_at, state, next_attempt_at) \
         SELECT CASE WHEN g % 3 = 0 THEN '2' ELSE '1' END, 'L' || g, \
                now() - (g % 86400) * interval '1 second', \
                now() - (g % 86400) * interval '1 second' + interval '24 hours', \
                now(), CASE WHEN g % 10 = 0 OR g % 3 = 0 THEN 'pending' ELSE 'sent' END, now() \
         FROM generate_series(1, 100000) g; \
         INSERT INTO page_state (page_id, rate_limit) VALUES ('1', 250); \
         INSERT INTO page_state (page_id, rate_limit, paused_reason) VALUES ('2', 250, 'restricted'); \
         ANALYZE optins; ANALYZE page_state;",
    )
    .await
    .expect("backlog");
    // The claim's candidate query, as `store::claim::claim_due` runs it.
    let plan: Vec<String> = sql
        .query(
            &format!(
                "EXPLAIN {}",
                lc_worker::scheduler::store::claim::CLAIM_DUE_SQL
                    .replace("$1", "1.05")
                    .replace("$2", "1.0")
                    .replace("$3", "100")
                    .replace("$4", "120.0")
            ),
            &[],
        )
        .await
        .expect("explain")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let text = plan.join("\n");
    assert!(
        text.contains("optins_pending_by_page"),
        "the claim must walk each page's pending rows by deadline:\n{text}"
    );
    assert!(
        !text.contains("Seq Scan on optins"),
        "no sequential scan of the opt-ins:\n{text}"
    );
}
