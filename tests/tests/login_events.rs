//! `POST /login-events` against real RabbitMQ and PostgreSQL and the fake Graph: the opt-in
//! reported by the business's backend and the webhook opt-in for the same login are one
//! opt-in (one Send API call, one `first_message.sent`) in either order and concurrently;
//! unauthenticated, replayed and invalid requests are refused and publish nothing.

use std::time::Duration;

use lc_ingest::RunningIngest;
use lc_meta::login::event_signature::sign_login_event;
use lc_shared::topology;
use lc_testkit::login::{
    APP_ID, LOGIN_SECRET, OTHER_PAGE, login_args, login_event_body, login_id_for, post_form,
    post_login_event, sign_now,
};
use lc_testkit::pipeline::{
    PAGE, Pipeline, TestEnv, WAIT, body, eventually, metrics_text, ms, optin_item, post_signed,
};
use lc_worker::scheduler::RunningScheduler;
use serde_json::Value;
use time::OffsetDateTime;

/// Both paths delivered for one login: exactly one Send API call to `login_id` and one
/// `first_message.sent`, and the second opt-in recorded as a duplicate.
async fn assert_one_message(
    env: &TestEnv,
    scheduler: &RunningScheduler,
    events_queue: &str,
    login_id: &str,
) {
    let calls = env
        .graph
        .wait_for_send_calls(1, WAIT)
        .await
        .expect("one send");
    assert_eq!(calls[0].login_id.as_deref(), Some(login_id));
    eventually(
        WAIT,
        "the second opt-in recorded as a duplicate",
        || async {
            metrics_text(scheduler.metrics_addr)
                .await
                .contains("scheduler_optins_recorded_total{result=\"duplicate\"} 1")
        },
    )
    .await;
    let first = env.events(events_queue, 1).await;
    assert_eq!(first.len(), 1, "one first_message event");
    let ev = &first[0];
    assert_eq!(ev["type"], "com.loginconnect.first_message.sent");
    assert_eq!(ev["data"]["login_id"], login_id);
    // Nothing else follows: give the relay several polls to publish a second event.
    let more = env
        .deliveries(events_queue, 1, Duration::from_secs(2))
        .await;
    assert!(
        more.is_empty(),
        "a second first_message event was published"
    );
    let sends = env.graph.send_calls();
    assert_eq!(sends.len(), 1, "exactly one Send API call: {sends:?}");
    let sql = env.sql().await;
    let row = sql
        .query_one(
            "SELECT state, (SELECT count(*) FROM outbox WHERE event_type LIKE 'first_message.%') \
             FROM optins WHERE page_id = $1 AND login_id = $2",
            &[&PAGE, &login_id],
        )
        .await
        .expect("opt-in row");
    assert_eq!(row.get::<_, String>(0), "sent");
    assert_eq!(row.get::<_, i64>(1), 1);
}

/// Ingest with login events on and a scheduler, the first-message events captured on the
/// returned queue. The services stop with the test's runtime.
async fn setup() -> (TestEnv, String, Pipeline) {
    let env = TestEnv::new().await;
    let events = env.capture_events(&["first_message.*.#"]).await;
    let pipeline = env
        .pipeline()
        .login(login_args(None))
        .scheduler(env.scheduler_config())
        .start()
        .await;
    (env, events, pipeline)
}

async fn post_login(ingest: &RunningIngest, asid: &str, at: OffsetDateTime) -> Value {
    let body = login_event_body(asid, PAGE, at);
    let (status, json) = post_login_event(ingest, &body, Some(&sign_now(&body))).await;
    assert_eq!(status, 200, "{json}");
    json
}

#[tokio::test]
async fn webhook_first_then_login_event_sends_once() {
    let (env, events, p) = setup().await;
    let login_id = login_id_for("5550001", PAGE);
    let now = OffsetDateTime::now_utc();
    let delivery = body(PAGE, vec![optin_item(PAGE, &login_id, now)]);
    assert_eq!(post_signed(&p.ingest, delivery).await, 200);
    env.graph
        .wait_for_send_calls(1, WAIT)
        .await
        .expect("sent after the webhook");
    let answer = post_login(&p.ingest, "5550001", now + Duration::from_secs(3)).await;
    assert_eq!(answer["login_id"], login_id.as_str());
    assert_eq!(answer["page_id"], PAGE);
    assert_one_message(&env, p.scheduler(), &events, &login_id).await;
}

#[tokio::test]
async fn login_event_first_then_webhook_sends_once() {
    let (env, events, p) = setup().await;
    let login_id = login_id_for("5550002", PAGE);
    let now = OffsetDateTime::now_utc();
    let answer = post_login(&p.ingest, "5550002", now).await;
    assert_eq!(answer["login_id"], login_id.as_str());
    env.graph
        .wait_for_send_calls(1, WAIT)
        .await
        .expect("sent after the login event");
    let sql = env.sql().await;
    let source: String = sql
        .query_one(
            "SELECT source FROM optins WHERE page_id = $1 AND login_id = $2",
            &[&PAGE, &login_id],
        )
        .await
        .expect("row")
        .get(0);
    assert_eq!(source, "login_event");
    // Meta's webhook arrives later, with its own (slightly later) timestamp.
    let delivery = body(
        PAGE,
        vec![optin_item(PAGE, &login_id, now + Duration::from_secs(5))],
    );
    assert_eq!(post_signed(&p.ingest, delivery).await, 200);
    assert_one_message(&env, p.scheduler(), &events, &login_id).await;
}

#[tokio::test]
async fn webhook_and_login_event_at_once_send_once() {
    let (env, events, p) = setup().await;
    let login_id = login_id_for("5550003", PAGE);
    let now = OffsetDateTime::now_utc();
    let delivery = body(PAGE, vec![optin_item(PAGE, &login_id, now)]);
    let login_body = login_event_body("5550003", PAGE, now);
    let signature = sign_now(&login_body);
    let (webhook, (login, _)) = tokio::join!(
        post_signed(&p.ingest, delivery),
        post_login_event(&p.ingest, &login_body, Some(&signature)),
    );
    assert_eq!((webhook, login), (200, 200));
    assert_one_message(&env, p.scheduler(), &events, &login_id).await;
}

#[tokio::test]
async fn unauthenticated_replayed_and_invalid_events_publish_nothing() {
    let env = TestEnv::new().await;
    let mut args = login_args(None);
    // A short skew so the replay below is observable without waiting five minutes.
    args.login_events_max_skew_secs = 2;
    let (ingest, _stop) = env.start_ingest_with_login(args).await;
    let now = OffsetDateTime::now_utc();
    let body = login_event_body("5550004", PAGE, now);

    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("missing header", None, "missing X-LoginConnect-Signature"),
        (
            "wrong secret",
            Some(sign_login_event(
                "not-the-secret",
                now.unix_timestamp(),
                &body,
            )),
            "does not match",
        ),
        (
            "stale timestamp",
            Some(sign_login_event(
                LOGIN_SECRET,
                now.unix_timestamp() - 600,
                &body,
            )),
            "at most 2 s",
        ),
        ("garbage header", Some("sha256=abc".to_owned()), "malformed"),
    ];
    for (what, signature, message) in cases {
        let (status, json) = post_login_event(&ingest, &body, signature.as_deref()).await;
        assert_eq!(status, 401, "{what}: {json}");
        let error = json["error"].as_str().unwrap_or_default();
        assert!(error.contains(message), "{what}: {error}");
    }
    assert_eq!(env.depth(topology::SCHEDULER_QUEUE).await, 0);

    // Authentic but unusable bodies: 400 for malformed, 422 for values we cannot accept.
    let invalid: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("not JSON", b"{not json".to_vec(), 400, "not valid JSON"),
        (
            "missing field",
            br#"{"asid":"1","app_id":"1","page_id":"1"}"#.to_vec(),
            400,
            "logged_in_at",
        ),
        (
            "unknown app",
            serde_json::to_vec(&serde_json::json!({"asid": "1", "app_id": "999",
                "page_id": PAGE, "logged_in_at": ms(now)}))
            .expect("json"),
            422,
            "unknown app_id 999",
        ),
        (
            "page not configured",
            login_event_body("1", "555", now),
            422,
            "LOGIN_PAGE_IDS",
        ),
        (
            "seconds instead of ms",
            serde_json::to_vec(&serde_json::json!({"asid": "1", "app_id": APP_ID,
                "page_id": PAGE, "logged_in_at": now.unix_timestamp()}))
            .expect("json"),
            422,
            "milliseconds",
        ),
    ];
    for (what, body, status, message) in invalid {
        let (got, json) = post_login_event(&ingest, &body, Some(&sign_now(&body))).await;
        assert_eq!(got, status, "{what}: {json}");
        let error = json["error"].as_str().unwrap_or_default();
        assert!(error.contains(message), "{what}: {error}");
    }
    assert_eq!(env.depth(topology::SCHEDULER_QUEUE).await, 0);

    // A valid event is accepted once; the same request replayed after the skew is refused.
    let other = login_event_body("5550004", OTHER_PAGE, now);
    let signature = sign_now(&other);
    let (status, json) = post_login_event(&ingest, &other, Some(&signature)).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(env.depth(topology::SCHEDULER_QUEUE).await, 1);
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let (status, json) = post_login_event(&ingest, &other, Some(&signature)).await;
    assert_eq!(status, 401, "replay: {json}");
    assert!(
        json["error"]
            .as_str()
            .is_some_and(|e| e.contains("away from now"))
    );
    assert_eq!(env.depth(topology::SCHEDULER_QUEUE).await, 1);

    let metrics = metrics_text(ingest.admin_addr).await;
    assert!(
        metrics.contains("ingest_login_events_total{result=\"accepted\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("ingest_login_events_total{result=\"unauthorized\"} 5"));
}

#[tokio::test]
async fn the_login_routes_answer_404_unless_configured() {
    let env = TestEnv::new().await;
    let (ingest, _stop) = env.start_ingest().await;
    let body = login_event_body("1", PAGE, OffsetDateTime::now_utc());
    let (status, json) = post_login_event(&ingest, &body, Some(&sign_now(&body))).await;
    assert_eq!(status, 404);
    assert!(
        json["error"]
            .as_str()
            .is_some_and(|e| e.contains("LOGIN_EVENTS_SECRETS"))
    );
    let http = reqwest::Client::new();
    let (status, _) = post_form(&ingest, "/data-deletion", &[("signed_request", "a.b")]).await;
    assert_eq!(status, 404);
    let status = http
        .get(format!(
            "http://{}/data-deletion/{}",
            ingest.addr,
            "0".repeat(48)
        ))
        .send()
        .await
        .expect("get");
    assert_eq!(status.status().as_u16(), 404);
    assert_eq!(env.depth(topology::SCHEDULER_QUEUE).await, 0);
}

#[tokio::test]
async fn a_login_days_after_the_first_window_does_not_message_again() {
    // The business backend reports every login; Meta's opt-in fires once. A later login must
    // not open a new window and send a second "first" message.
    let (env, _events, p) = setup().await;
    let login_id = login_id_for("5550009", PAGE);
    let sql = env.sql().await;
    let three_days_ago = OffsetDateTime::now_utc() - Duration::from_secs(3 * 86_400);
    lc_testkit::pipeline::insert_optin(&sql, PAGE, &login_id, three_days_ago, "sent").await;
    post_login(&p.ingest, "5550009", OffsetDateTime::now_utc()).await;
    eventually(WAIT, "the login recorded as a duplicate", || async {
        metrics_text(p.scheduler().metrics_addr)
            .await
            .contains("scheduler_optins_recorded_total{result=\"duplicate\"} 1")
    })
    .await;
    assert!(env.graph.send_calls().is_empty(), "no second first message");
    let cycle: i32 = sql
        .query_one(
            "SELECT cycle FROM optins WHERE page_id = $1 AND login_id = $2",
            &[&PAGE, &login_id],
        )
        .await
        .expect("row")
        .get(0);
    assert_eq!(cycle, 1, "no new cycle");
}

/// Issue 14, item 6: the signature header is bounded (at most 1 KiB, at most 4 `v1`), so a
/// request cannot make ingest compute thousands of MACs. A valid signature padded with a fifth
/// `v1`, or hidden in a header over 1 KiB, is refused; four `v1` entries still verify.
#[tokio::test]
async fn oversized_signature_headers_are_refused_before_any_mac() {
    let env = TestEnv::new().await;
    let (ingest, _stop) = env.start_ingest_with_login(login_args(None)).await;
    let body = login_event_body("5550099", PAGE, OffsetDateTime::now_utc());
    let valid = sign_now(&body);
    let bogus = |i: usize| {
        format!(
            ",v1={}",
            format!("{i:x}").repeat(64).get(..64).unwrap_or("")
        )
    };

    let five: String = std::iter::once(valid.clone())
        .chain((1..5).map(bogus))
        .collect();
    let (status, json) = post_login_event(&ingest, &body, Some(&five)).await;
    assert_eq!(status, 401, "five v1 entries: {json}");
    assert!(
        json["error"]
            .as_str()
            .is_some_and(|e| e.contains("at most 4")),
        "{json}"
    );

    let padded = format!("{valid},pad={}", "a".repeat(1100));
    let (status, json) = post_login_event(&ingest, &body, Some(&padded)).await;
    assert_eq!(status, 401, "a header over 1 KiB: {json}");
    assert!(
        json["error"].as_str().is_some_and(|e| e.contains("1024")),
        "{json}"
    );
    assert_eq!(env.depth(topology::SCHEDULER_QUEUE).await, 0);

    let four: String = (1..4).map(bogus).fold(valid, |h, b| h + &b);
    let (status, json) = post_login_event(&ingest, &body, Some(&four)).await;
    assert_eq!(status, 200, "four v1 entries, one valid: {json}");
    assert_eq!(env.depth(topology::SCHEDULER_QUEUE).await, 1);
}
