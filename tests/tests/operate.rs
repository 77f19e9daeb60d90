//! The operator's reads and actions (`lc_worker::operate`) on rows the real pipeline made:
//! opt-ins at risk, recent failures, one opt-in's timeline, retrying a failed opt-in (and
//! every refusal), dead letters listed and replayed one by one.

use std::time::Duration;

use lc_shared::config::AmqpArgs;
use lc_shared::optin::{FailureReason, OptinState};
use lc_shared::{amqp, topology};
use lc_testkit::admin::READ_TOKEN;
use lc_testkit::fake_graph::FakeResponse;
use lc_testkit::harness::queue_depth;
use lc_testkit::pipeline::{
    PAGE, TRACEPARENT, TestEnv, WAIT, body, eventually, insert_optin, optin_item, post_signed,
};
use lc_worker::operate::dead_letters;
use lc_worker::operate::{
    self, EventKind, RetryOutcome, RetryRefusal, StepKind, at_risk, failures, retry, timeline,
};
use time::OffsetDateTime;

const MARGIN: Duration = operate::retry::DEFAULT_RETRY_MARGIN;

#[tokio::test]
async fn a_permanent_failure_is_listed_retried_once_and_its_timeline_shows_every_step() {
    let env = TestEnv::new().await;
    let events = env.capture_events(&["first_message.*.#"]).await;
    let mut p = env.start_pipeline(env.scheduler_config()).await;
    // One permanent refusal; the retry's call then succeeds (the fake is lenient).
    env.graph.script("F1", vec![FakeResponse::outside_window()]);
    p.deliver(vec![optin_item(PAGE, "F1", OffsetDateTime::now_utc())])
        .await;
    let failed = env.events(&events, 1).await;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["type"], "com.loginconnect.first_message.failed");
    env.wait_outbox_published().await;

    let pool = env.migrated_pool(2).await;
    let c = pool.get().await.expect("client");
    let listed = failures(&c, Some(PAGE), 10).await.expect("failures");
    assert_eq!(listed.len(), 1, "{listed:?}");
    let f = &listed[0];
    assert_eq!(f.login_id, "F1");
    assert_eq!(f.state, OptinState::Failed);
    assert_eq!(f.failure_reason, Some(FailureReason::GraphPermanent));
    assert_eq!(f.attempts, 1);
    let e = f.last_error.as_ref().expect("Graph's error");
    assert_eq!((e.code, e.subcode), (Some(10), Some(2018278)));
    assert!(e.fbtrace_id.is_some(), "{e:?}");
    assert!(
        failures(&c, Some("999"), 10)
            .await
            .expect("other page")
            .is_empty(),
        "the page filter applies"
    );

    let t = timeline(&c, PAGE, "F1").await.expect("read").expect("row");
    let kinds: Vec<StepKind> = t.steps.iter().map(|s| s.kind).collect();
    for k in [
        StepKind::OptedIn,
        StepKind::Received,
        StepKind::Claimed,
        StepKind::Called,
        StepKind::Answered,
    ] {
        assert!(kinds.contains(&k), "{k:?} in {kinds:?}");
    }
    assert!(t.steps.windows(2).all(|w| w[0].at <= w[1].at), "time order");
    let answered = t.steps.iter().find(|s| s.kind == StepKind::Answered);
    let detail = answered.and_then(|s| s.detail.as_deref()).unwrap_or("");
    assert!(detail.contains("graph_permanent"), "{detail}");
    assert_eq!(t.cycle, 1);
    assert_eq!(
        t.trace_id.as_deref(),
        TRACEPARENT.split('-').nth(1),
        "the delivery's trace"
    );
    assert_eq!(t.events.len(), 1, "{:?}", t.events);
    assert_eq!(t.events[0].kind, EventKind::FirstMessageFailed);
    assert!(t.events[0].published_at.is_some());
    assert_eq!(t.events[0].event_id, failed[0]["id"].as_str().unwrap_or(""));

    // The retry: pending again, and the scheduler's next call reaches Graph.
    let outcome = retry(&c, "test-operator", PAGE, "F1", MARGIN)
        .await
        .expect("retry");
    assert_eq!(outcome, RetryOutcome::Retried);
    let calls = env
        .graph
        .wait_for_send_calls(2, WAIT)
        .await
        .expect("the retried call");
    assert!(calls.iter().all(|c| c.login_id.as_deref() == Some("F1")));
    let sent = env.events(&events, 1).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["type"], "com.loginconnect.first_message.sent");
    assert_eq!(sent[0]["data"]["attempts"], 1, "attempts start again");
    env.wait_outbox_published().await;

    let t = timeline(&c, PAGE, "F1").await.expect("read").expect("row");
    assert_eq!(t.state, OptinState::Sent);
    assert_eq!(t.failure_reason, None);
    assert!(t.last_error.is_none(), "the failure's error was cleared");
    let kinds: Vec<EventKind> = t.events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [EventKind::FirstMessageFailed, EventKind::FirstMessageSent]
    );
    // Sent now: a second retry is refused and makes no call.
    assert_eq!(
        retry(&c, "test-operator", PAGE, "F1", MARGIN)
            .await
            .expect("retry"),
        RetryOutcome::Refused(RetryRefusal::NotFailed {
            state: OptinState::Sent
        })
    );
    assert!(
        failures(&c, Some(PAGE), 10)
            .await
            .expect("failures")
            .is_empty(),
        "no longer a failure"
    );
    assert_eq!(env.graph.send_calls().len(), 2);
    p.stop().await;
}

/// Seeds a failed opt-in of [`PAGE`] opted in `age` ago (deadline 24 h after), failed for
/// `reason`.
async fn failed_row(sql: &tokio_postgres::Client, login_id: &str, age: Duration, reason: &str) {
    let at = OffsetDateTime::now_utc() - age;
    insert_optin(sql, PAGE, login_id, at, "failed").await;
    sql.execute(
        "UPDATE optins SET failure_reason = $3, attempts = 1, finished_at = now(), \
             last_error_message = 'seeded' \
         WHERE page_id = $1 AND login_id = $2",
        &[&PAGE, &login_id, &reason],
    )
    .await
    .expect("fail it");
}

#[tokio::test]
async fn a_retry_is_refused_where_a_second_message_could_be_wrong() {
    let env = TestEnv::new().await;
    let pool = env.migrated_pool(2).await;
    let sql = env.sql().await;
    let hour = Duration::from_secs(3600);
    failed_row(&sql, "UNKNOWN", hour, "outcome_unknown").await;
    failed_row(&sql, "OTHER", hour, "other_page").await;
    // Deadline in 5 minutes: inside the 10-minute margin; and an hour past.
    failed_row(&sql, "LATE", Duration::from_secs(86_100), "graph_permanent").await;
    failed_row(&sql, "PAST", Duration::from_secs(90_000), "graph_permanent").await;
    failed_row(&sql, "LINKED", hour, "graph_permanent").await;
    sql.execute(
        "INSERT INTO links (page_id, login_id, psid, linked_at) VALUES ($1, 'LINKED', 'S1', now())",
        &[&PAGE],
    )
    .await
    .expect("link");
    failed_row(&sql, "DELETED", hour, "graph_permanent").await;
    sql.execute(
        "INSERT INTO deleted_people (person, deleted_at) VALUES (person_key($1, 'DELETED'), now())",
        &[&PAGE],
    )
    .await
    .expect("tombstone");
    failed_row(&sql, "CONTACTED", hour, "graph_permanent").await;
    sql.execute(
        "INSERT INTO contacted (person, deadline) \
         VALUES (person_key($1, 'CONTACTED'), now() + interval '20 hours')",
        &[&PAGE],
    )
    .await
    .expect("contacted");
    // Another page messaged this login_id.
    failed_row(&sql, "SHARED", hour, "graph_permanent").await;
    insert_optin(&sql, "777", "SHARED", OffsetDateTime::now_utc(), "sent").await;
    sql.execute(
        "UPDATE optins SET message_id = 'm_other' WHERE page_id = '777'",
        &[],
    )
    .await
    .expect("sent elsewhere");
    insert_optin(&sql, PAGE, "PENDING", OffsetDateTime::now_utc(), "pending").await;

    let c = pool.get().await.expect("client");
    let cases = [
        ("UNKNOWN", RetryRefusal::OutcomeUnknown),
        ("OTHER", RetryRefusal::OtherPage),
        ("LATE", RetryRefusal::WindowClosing),
        ("PAST", RetryRefusal::WindowClosing),
        ("LINKED", RetryRefusal::Linked),
        ("DELETED", RetryRefusal::Deleted),
        ("CONTACTED", RetryRefusal::Contacted),
        (
            "SHARED",
            RetryRefusal::MessagedByOtherPage {
                page_id: "777".into(),
            },
        ),
        (
            "PENDING",
            RetryRefusal::NotFailed {
                state: OptinState::Pending,
            },
        ),
    ];
    for (login_id, refusal) in cases {
        let got = retry(&c, "test-operator", PAGE, login_id, MARGIN)
            .await
            .expect("retry");
        assert_eq!(got, RetryOutcome::Refused(refusal.clone()), "{login_id}");
        assert!(!refusal.explain().is_empty());
    }
    assert_eq!(
        retry(&c, "test-operator", PAGE, "NOBODY", MARGIN)
            .await
            .expect("retry"),
        RetryOutcome::NotFound
    );
    // Nothing changed: every failed row is still failed with its error.
    let unchanged: i64 = sql
        .query_one(
            "SELECT count(*) FROM optins WHERE page_id = $1 AND state = 'failed' \
             AND last_error_message = 'seeded' AND finished_at IS NOT NULL",
            &[&PAGE],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(unchanged, 8);
    // The linked person's timeline ends with the link.
    let t = timeline(&c, PAGE, "LINKED")
        .await
        .expect("read")
        .expect("row");
    assert_eq!(t.steps.last().map(|s| s.kind), Some(StepKind::Linked));
    // The same row with a wide-open window and no obstacle is retried (the refusals above
    // were for their reasons, not for the seeding).
    failed_row(&sql, "FINE", hour, "retries_exhausted").await;
    assert_eq!(
        retry(&c, "test-operator", PAGE, "FINE", MARGIN)
            .await
            .expect("retry"),
        RetryOutcome::Retried
    );
    let row = sql
        .query_one(
            "SELECT state, attempts, failure_reason, finished_at, last_error_message, \
                    next_attempt_at <= now() \
             FROM optins WHERE page_id = $1 AND login_id = 'FINE'",
            &[&PAGE],
        )
        .await
        .expect("row");
    assert_eq!(row.get::<_, String>(0), "pending");
    assert_eq!(row.get::<_, i32>(1), 0);
    assert_eq!(row.get::<_, Option<String>>(2), None);
    assert_eq!(row.get::<_, Option<OffsetDateTime>>(3), None);
    assert_eq!(row.get::<_, Option<String>>(4), None);
    assert!(row.get::<_, bool>(5), "due now");
}

#[tokio::test]
async fn opt_ins_at_risk_come_nearest_deadline_first_with_their_page_paused() {
    let env = TestEnv::new().await;
    // A long send delay keeps the recorded opt-ins pending.
    let mut config = env.scheduler_config();
    config.send_delay_secs = 20_000;
    let mut p = env.start_pipeline(config).await;
    let now = OffsetDateTime::now_utc();
    let items = vec![
        optin_item(PAGE, "R-LATER", now - Duration::from_secs(60)),
        optin_item(PAGE, "R-SOONER", now - Duration::from_secs(7200)),
        optin_item(PAGE, "R-MIDDLE", now - Duration::from_secs(3600)),
    ];
    assert_eq!(post_signed(&p.ingest, body(PAGE, items)).await, 200);
    let pool = env.migrated_pool(2).await;
    let mut c = pool.get().await.expect("client");
    eventually(WAIT, "three opt-ins recorded", || async {
        at_risk(&c, 10).await.expect("at risk").len() == 3
    })
    .await;
    let listed = at_risk(&c, 10).await.expect("at risk");
    let order: Vec<&str> = listed.iter().map(|a| a.login_id.as_str()).collect();
    assert_eq!(order, ["R-SOONER", "R-MIDDLE", "R-LATER"]);
    let first = &listed[0];
    assert_eq!(first.state, OptinState::Pending);
    assert!(
        (first.slack_secs - (86_400 - 7200)).abs() < 60,
        "slack {}",
        first.slack_secs
    );
    assert!(!first.page_paused);
    assert_eq!(at_risk(&c, 2).await.expect("limit").len(), 2);

    lc_worker::registry::ops::pause(&mut c, "test-operator", PAGE)
        .await
        .expect("pause");
    let listed = at_risk(&c, 10).await.expect("at risk");
    assert!(listed.iter().all(|a| a.page_paused), "{listed:?}");
    assert_eq!(listed[0].paused_reason.as_deref(), Some("operator"));
    p.stop().await;
}

#[tokio::test]
async fn one_dead_letter_is_replayed_by_its_id_and_the_others_stay_in_order() {
    let env = TestEnv::new().await;
    let conn = env.vhost.connect().await;
    let ch = amqp::confirm_channel(&conn).await.expect("channel");
    topology::declare(&ch).await.expect("topology");
    let dlq = topology::dead_letter_queue(topology::SCHEDULER_QUEUE);
    for id in ["d-1", "d-2", "d-3"] {
        let props = amqp::persistent_properties(id, "application/json").with_headers(
            amqp::string_headers(&[
                (topology::ERROR_HEADER, "poison for the test"),
                (topology::ORIGIN_QUEUE_HEADER, topology::SCHEDULER_QUEUE),
            ]),
        );
        let confirm = amqp::publish(&ch, "", &dlq, true, id.as_bytes(), props)
            .await
            .expect("publish");
        amqp::await_confirm(confirm, Duration::from_secs(5))
            .await
            .expect("confirm");
    }
    let endpoint = AmqpArgs::new(env.vhost.url()).endpoint().expect("endpoint");

    let listed = dead_letters::list(&endpoint, "test", Some(&dlq), 10)
        .await
        .expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].depth, 3);
    let ids: Vec<&str> = listed[0]
        .messages
        .iter()
        .filter_map(|m| m.message_id.as_deref())
        .collect();
    assert_eq!(ids, ["d-1", "d-2", "d-3"]);
    assert_eq!(
        listed[0].messages[0].reason.as_deref(),
        Some("poison for the test")
    );
    let depth_ch = conn.create_channel().await.expect("channel");
    eventually(WAIT, "listed messages back", || async {
        queue_depth(&depth_ch, &dlq).await == 3
    })
    .await;

    let missing = dead_letters::replay_one(&endpoint, "test", &dlq, "d-9", 100)
        .await
        .expect("replay of a missing id");
    assert_eq!((missing.found, missing.replayed), (Some(false), 0));
    eventually(WAIT, "looked-at messages back", || async {
        queue_depth(&depth_ch, &dlq).await == 3
    })
    .await;

    let one = dead_letters::replay_one(&endpoint, "test", &dlq, "d-2", 100)
        .await
        .expect("replay d-2");
    assert_eq!((one.found, one.replayed, one.kept), (Some(true), 1, 0));
    let back = env.take_all(topology::SCHEDULER_QUEUE).await;
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].data.as_slice(), b"d-2");
    eventually(WAIT, "the other two back", || async {
        queue_depth(&depth_ch, &dlq).await == 2
    })
    .await;
    let listed = dead_letters::list(&endpoint, "test", Some(&dlq), 10)
        .await
        .expect("list");
    let ids: Vec<&str> = listed[0]
        .messages
        .iter()
        .filter_map(|m| m.message_id.as_deref())
        .collect();
    assert_eq!(ids, ["d-1", "d-3"], "the rest untouched, in order");
    eventually(WAIT, "listed messages back", || async {
        queue_depth(&depth_ch, &dlq).await == 2
    })
    .await;
    let all = dead_letters::replay(&endpoint, "test", &dlq, 100)
        .await
        .expect("replay all");
    assert_eq!((all.replayed, all.kept), (2, 0));
    assert!(matches!(
        dead_letters::list(&endpoint, "test", Some("nope"), 1).await,
        Err(dead_letters::DeadLetterError::UnknownQueue { .. })
    ));
}

#[tokio::test]
async fn the_operator_routes_answer_over_the_admin_api_with_scopes_and_refusals() {
    let env = TestEnv::new().await;
    let sql = env.sql().await;
    let admin = env.start_admin().await;
    let hour = Duration::from_secs(3600);
    failed_row(&sql, "API-FAILED", hour, "graph_permanent").await;
    failed_row(&sql, "API-UNKNOWN", hour, "outcome_unknown").await;

    let listed = admin.read(&format!("/failures?page_id={PAGE}")).await;
    assert_eq!(listed.status, 200, "{}", listed.text);
    assert_eq!(listed.body["failures"].as_array().map(Vec::len), Some(2));
    let retry_path = |login: &str| format!("/pages/{PAGE}/optins/{login}/retry");
    let forbidden = admin
        .call("POST", &retry_path("API-FAILED"), Some(READ_TOKEN), None)
        .await;
    assert_eq!(forbidden.status, 403, "a read token cannot retry");
    let done = admin.write("POST", &retry_path("API-FAILED"), None).await;
    assert_eq!(done.status, 200, "{}", done.text);
    assert_eq!(done.body["result"], "retried");
    let again = admin.write("POST", &retry_path("API-FAILED"), None).await;
    assert_eq!(again.status, 409, "{}", again.text);
    assert_eq!(again.body["error"]["refusal"]["reason"], "not_failed");
    assert_eq!(again.body["error"]["refusal"]["state"], "pending");
    let never = admin.write("POST", &retry_path("API-UNKNOWN"), None).await;
    assert_eq!(never.status, 409);
    assert_eq!(never.body["error"]["code"], "retry_refused");
    assert_eq!(never.body["error"]["refusal"]["reason"], "outcome_unknown");
    assert!(
        never.body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("never sent twice")),
        "{}",
        never.text
    );
    let timeline = admin
        .read(&format!("/pages/{PAGE}/optins/API-FAILED/timeline"))
        .await;
    assert_eq!(timeline.status, 200);
    assert_eq!(timeline.body["state"], "pending");
    let at_risk = admin.read("/optins/at-risk").await;
    assert_eq!(at_risk.body["optins"][0]["login_id"], "API-FAILED");

    // Dead letters through the API: one replayed by its id.
    let conn = env.vhost.connect().await;
    let ch = amqp::confirm_channel(&conn).await.expect("channel");
    topology::declare(&ch).await.expect("topology");
    let dlq = topology::dead_letter_queue(topology::CORRELATOR_QUEUE);
    for id in ["a-1", "a-2"] {
        let props = amqp::persistent_properties(id, "application/json");
        let confirm = amqp::publish(&ch, "", &dlq, true, id.as_bytes(), props)
            .await
            .expect("publish");
        amqp::await_confirm(confirm, Duration::from_secs(5))
            .await
            .expect("confirm");
    }
    let listed = admin.read(&format!("/dead-letters?queue={dlq}")).await;
    assert_eq!(listed.status, 200, "{}", listed.text);
    assert_eq!(listed.body["queues"][0]["depth"], 2);
    assert_eq!(listed.body["queues"][0]["messages"][1]["message_id"], "a-2");
    let depth_ch = conn.create_channel().await.expect("channel");
    eventually(WAIT, "listed messages back", || async {
        queue_depth(&depth_ch, &dlq).await == 2
    })
    .await;
    let replayed = admin
        .write(
            "POST",
            &format!("/dead-letters/{dlq}/replay"),
            Some(serde_json::json!({"message_id": "a-2"})),
        )
        .await;
    assert_eq!(replayed.status, 200, "{}", replayed.text);
    assert_eq!(replayed.body["replayed"], 1);
    let back = env.take_all(topology::CORRELATOR_QUEUE).await;
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].data.as_slice(), b"a-2");
    admin.stop().await;

    // Without a broker the dead-letter routes say what to configure.
    let bare = env.start_admin_with(None).await;
    let missing = bare.read("/dead-letters").await;
    assert_eq!(missing.status, 503);
    assert_eq!(missing.body["error"]["code"], "broker_not_configured");
    assert!(missing.text.contains("AMQP_URL"), "{}", missing.text);
    bare.stop().await;
}
