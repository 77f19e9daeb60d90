//! Intake against hostile and out-of-order input (issue 13 items 5 and 6): one bad opt-in is
//! dead-lettered with its reason and never stops the opt-ins behind it or beside it in a
//! batch; a task that panics anyway is restarted, and `/readyz` fails until it is back; a
//! duplicate with an earlier time moves a pending opt-in's deadline earlier, never later.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lc_meta::webhook::{EventKind, QueuedEvent};
use lc_shared::amqp::BrokerLink;
use lc_shared::shutdown::Shutdown;
use lc_shared::{amqp, topology};
use lc_testkit::harness::TestVhost;
use lc_testkit::login::{login_args, login_event_body, login_id_for, post_login_event, sign_now};
use lc_testkit::pipeline::{
    PAGE, TestEnv, WAIT, body, eventually, metrics_text, ms, optin_item, optin_state, post_signed,
};
use lc_worker::runtime::process;
use time::OffsetDateTime;
use time::macros::datetime;
use tokio::sync::Notify;
use tokio::task::JoinSet;

const DAY: Duration = Duration::from_secs(86_400);

/// The reasons and bodies (as text) on the scheduler's dead-letter queue, awaiting `n`.
async fn dead_letter_reasons(env: &TestEnv, n: usize) -> Vec<(String, String)> {
    let dlq = topology::dead_letter_queue(topology::SCHEDULER_QUEUE);
    env.deliveries(&dlq, n, WAIT)
        .await
        .iter()
        .map(|d| {
            let reason =
                amqp::header_str(&d.properties, topology::ERROR_HEADER).unwrap_or_default();
            (reason, String::from_utf8_lossy(&d.data).into_owned())
        })
        .collect()
}

/// The status of a worker's `/readyz`.
async fn readyz(addr: std::net::SocketAddr) -> u16 {
    reqwest::get(format!("http://{addr}/readyz"))
        .await
        .expect("readyz")
        .status()
        .as_u16()
}

/// The stored times of one opt-in: opted_in_at, deadline, send_at, next_attempt_at.
async fn stored_times(sql: &tokio_postgres::Client, login_id: &str) -> [OffsetDateTime; 4] {
    let row = sql
        .query_one(
            "SELECT opted_in_at, deadline, send_at, next_attempt_at FROM optins \
             WHERE page_id = $1 AND login_id = $2",
            &[&PAGE, &login_id],
        )
        .await
        .expect("opt-in row");
    [row.get(0), row.get(1), row.get(2), row.get(3)]
}

/// `t` at millisecond precision, as it travels in webhook timestamps.
fn to_ms(t: OffsetDateTime) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms(t)) * 1_000_000).expect("time")
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
    assert_eq!(readyz(scheduler.metrics_addr).await, 200);
    let text = metrics_text(scheduler.metrics_addr).await;
    assert!(
        text.contains("worker_task_up{task=\"scheduler.optins consumer\"} 1")
            && text.contains("worker_task_restarts_total{task=\"scheduler.optins consumer\"} 0"),
        "the consumer never stopped: {text}"
    );
    stop.trigger();
    scheduler.task.await.expect("stopped");
}

/// After item 5 no input makes intake panic, so the restart is shown with a task that panics
/// once on cue, supervised as the consumers are, behind the workers' real `/readyz` server
/// and a real broker link.
#[tokio::test]
async fn a_supervised_task_that_panics_is_restarted_and_readyz_fails_until_it_is_back() {
    let vhost = TestVhost::create();
    let link = BrokerLink::start(vhost.url(), "readyz-test", 2);
    link.wait_ready(WAIT).await.expect("broker link");
    let registry = prometheus::Registry::new();
    let shutdown = Shutdown::new();
    let mut tasks = JoinSet::new();
    let runs = Arc::new(AtomicUsize::new(0));
    // The test's cues: first run up, panic now, second run started, come back, back.
    let cues: [Arc<Notify>; 5] = Default::default();
    {
        let (runs, cues, stop) = (runs.clone(), cues.clone(), shutdown.clone());
        process::spawn_supervised(&mut tasks, &registry, "flaky", &shutdown, move |up| {
            let n = runs.fetch_add(1, Ordering::SeqCst);
            let (cues, stop) = (cues.clone(), stop.clone());
            async move {
                let [first_up, panic_now, restarted, come_back, back] = &cues;
                if n == 0 {
                    up.up();
                    first_up.notify_one();
                    panic_now.notified().await;
                    panic!("a bug met some input");
                }
                restarted.notify_one();
                come_back.notified().await;
                up.up();
                back.notify_one();
                stop.wait().await;
            }
        })
        .expect("supervised");
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    process::spawn_http(&mut tasks, listener, registry, &link, &shutdown);
    let [first_up, panic_now, restarted, come_back, back] = &cues;

    first_up.notified().await;
    assert_eq!(readyz(addr).await, 200);
    panic_now.notify_one();
    restarted.notified().await;
    assert_eq!(readyz(addr).await, 503, "not ready until the task is back");
    let text = metrics_text(addr).await;
    assert!(
        text.contains("worker_task_up{task=\"flaky\"} 0")
            && text.contains("worker_task_restarts_total{task=\"flaky\"} 1"),
        "{text}"
    );
    come_back.notify_one();
    back.notified().await;
    assert_eq!(readyz(addr).await, 200);
    assert_eq!(runs.load(Ordering::SeqCst), 2, "restarted once");

    shutdown.trigger();
    while let Some(joined) = tasks.join_next().await {
        joined.expect("the supervisor and the server end normally");
    }
    link.close().await;
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

/// Publishes queued opt-ins (login_id, body) to the webhook exchange, each confirmed.
async fn publish_queued(env: &TestEnv, bodies: &[(impl AsRef<str>, Vec<u8>)]) {
    let conn = env.vhost.connect().await;
    let ch = amqp::confirm_channel(&conn).await.expect("channel");
    for (login_id, data) in bodies {
        let login_id = login_id.as_ref();
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
}

#[tokio::test]
async fn a_row_the_database_refuses_is_dead_lettered_alone_and_the_rest_of_its_batch_commits() {
    let env = TestEnv::new().await;
    // Ingest declares the topology; the scheduler starts only once everything is queued, so
    // the deliveries arrive together and are recorded as one batch.
    let (_ingest, _stop_ingest) = env.start_ingest().await;
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
    publish_queued(&env, &bodies).await;
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

/// The intake pipelines the opt-ins of a batch on one connection; deliveries of one person
/// in one batch must still be recorded one after another in queue order. Here an old window
/// of G (two days ago: recorded expired) is followed by its new window (recorded pending over
/// it, `cycle` 2, after an expiry event for the old one); recorded the other way round, the
/// old one would be a mere duplicate and no expiry would be announced. E's redelivery with an
/// earlier time moves its deadline, and a later one moves nothing.
#[tokio::test]
async fn deliveries_of_one_person_in_one_batch_are_recorded_in_queue_order() {
    let env = TestEnv::new().await;
    let (_ingest, _stop_ingest) = env.start_ingest().await;
    let t = to_ms(OffsetDateTime::now_utc());
    let early = t - Duration::from_secs(200);
    let bodies = [
        ("G", queued_optin("G", t - 2 * DAY, "webhook")),
        ("E", queued_optin("E", t, "webhook")),
        ("F", queued_optin("F", t, "webhook")),
        ("G", queued_optin("G", t, "webhook")),
        ("E", queued_optin("E", early, "webhook")),
        (
            "E",
            queued_optin("E", t + Duration::from_secs(100), "webhook"),
        ),
    ];
    publish_queued(&env, &bodies).await;
    let mut config = env.scheduler_config();
    config.send_delay_secs = 3600;
    let delay = Duration::from_secs(3600);
    let (scheduler, stop) = env.start_scheduler(config).await;
    let sql = env.sql().await;
    eventually(WAIT, "all six deliveries recorded", || async {
        let text = metrics_text(scheduler.metrics_addr).await;
        text.contains("scheduler_optins_recorded_total{result=\"pending\"} 3")
            && text.contains("scheduler_optins_recorded_total{result=\"duplicate\"} 2")
            && text.contains("scheduler_optins_recorded_total{result=\"expired\"} 1")
    })
    .await;
    assert_eq!(
        stored_times(&sql, "E").await,
        [early, early + DAY, early + delay, early + delay]
    );
    assert_eq!(
        stored_times(&sql, "G").await,
        [t, t + DAY, t + delay, t + delay]
    );
    let g = sql
        .query_one(
            "SELECT state, cycle FROM optins WHERE page_id = $1 AND login_id = 'G'",
            &[&PAGE],
        )
        .await
        .expect("G");
    assert_eq!(
        (g.get::<_, String>(0), g.get::<_, i32>(1)),
        ("pending".into(), 2)
    );
    let events: Vec<String> = sql
        .query(
            "SELECT event_type FROM outbox WHERE cloudevent->'data'->>'login_id' = 'G' ORDER BY id",
            &[],
        )
        .await
        .expect("outbox")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(events, ["first_message.expired"], "the old window's expiry");
    assert!(env.graph.send_calls().is_empty(), "nothing was due");
    stop.trigger();
    scheduler.task.await.expect("stopped");
}

#[tokio::test]
async fn an_earlier_duplicate_moves_a_pending_deadline_earlier_and_never_later() {
    let env = TestEnv::new().await;
    let (ingest, _stop_ingest) = env.start_ingest().await;
    let mut config = env.scheduler_config();
    // Nothing is due for an hour, so the opt-ins stay pending while the duplicates arrive.
    config.send_delay_secs = 3600;
    let delay = Duration::from_secs(3600);
    let (scheduler, stop) = env.start_scheduler(config).await;
    let sql = env.sql().await;
    let t = to_ms(OffsetDateTime::now_utc());
    let early = t - Duration::from_secs(200);

    // A row in flight (`sending`, leased elsewhere) and a pending row with a retry planned,
    // both opted in at `t`.
    for (login_id, state, attempts, next) in [
        ("INFLIGHT", "sending", 1, t + delay),
        ("RETRYING", "pending", 1, t + 2 * delay),
    ] {
        sql.execute(
            "INSERT INTO optins (page_id, login_id, opted_in_at, deadline, send_at, state, \
                 attempts, next_attempt_at, lease_owner, lease_expires_at) \
             VALUES ($1, $2, $3, $3::timestamptz + interval '24 hours', \
                 $3::timestamptz + interval '1 hour', $4, $5, $6, \
                 CASE WHEN $4 = 'sending' THEN 'elsewhere' END, \
                 CASE WHEN $4 = 'sending' THEN now() + interval '1 hour' END)",
            &[&PAGE, &login_id, &t, &state, &attempts, &next],
        )
        .await
        .expect("insert");
    }
    assert_eq!(
        post_signed(&ingest, body(PAGE, vec![optin_item(PAGE, "E1", t)])).await,
        200
    );
    eventually(WAIT, "E1 recorded", || async {
        optin_state(&sql, "E1").await.is_some()
    })
    .await;
    assert_eq!(
        stored_times(&sql, "E1").await,
        [t, t + DAY, t + delay, t + delay]
    );

    let items = ["E1", "INFLIGHT", "RETRYING"]
        .iter()
        .map(|l| optin_item(PAGE, l, early))
        .collect();
    assert_eq!(post_signed(&ingest, body(PAGE, items)).await, 200);
    eventually(WAIT, "three duplicates recorded", || async {
        metrics_text(scheduler.metrics_addr)
            .await
            .contains("scheduler_optins_recorded_total{result=\"duplicate\"} 3")
    })
    .await;
    assert_eq!(
        stored_times(&sql, "E1").await,
        [early, early + DAY, early + delay, early + delay],
        "the earliest known opt-in time wins"
    );
    assert_eq!(
        stored_times(&sql, "RETRYING").await,
        [early, early + DAY, early + delay, t + 2 * delay],
        "times move earlier; the planned retry keeps its time"
    );
    assert_eq!(
        stored_times(&sql, "INFLIGHT").await,
        [t, t + DAY, t + delay, t + delay],
        "a row whose call may be in flight is left alone"
    );

    // A later duplicate never moves anything later.
    let later = t + Duration::from_secs(100);
    assert_eq!(
        post_signed(&ingest, body(PAGE, vec![optin_item(PAGE, "E1", later)])).await,
        200
    );
    eventually(WAIT, "the fourth duplicate recorded", || async {
        metrics_text(scheduler.metrics_addr)
            .await
            .contains("scheduler_optins_recorded_total{result=\"duplicate\"} 4")
    })
    .await;
    assert_eq!(
        stored_times(&sql, "E1").await,
        [early, early + DAY, early + delay, early + delay]
    );
    assert!(env.graph.send_calls().is_empty(), "nothing was due");
    stop.trigger();
    scheduler.task.await.expect("stopped");
}

#[tokio::test]
async fn a_login_event_recorded_first_leaves_metas_earlier_deadline() {
    let env = TestEnv::new().await;
    let (ingest, _stop_ingest) = env.start_ingest_with_login(login_args(None)).await;
    let mut config = env.scheduler_config();
    config.send_delay_secs = 3600;
    let (scheduler, stop) = env.start_scheduler(config).await;
    let sql = env.sql().await;
    let login_id = login_id_for("5559001", PAGE);
    // The business's clock runs ahead: its login time is 200 s after Meta's opt-in time.
    let t = to_ms(OffsetDateTime::now_utc());
    let meta_time = t - Duration::from_secs(200);
    let login = login_event_body("5559001", PAGE, t);
    let (status, answer) = post_login_event(&ingest, &login, Some(&sign_now(&login))).await;
    assert_eq!(status, 200, "{answer}");
    eventually(WAIT, "the login event recorded", || async {
        optin_state(&sql, &login_id).await.is_some()
    })
    .await;
    assert_eq!(stored_times(&sql, &login_id).await[1], t + DAY);

    assert_eq!(
        post_signed(
            &ingest,
            body(PAGE, vec![optin_item(PAGE, &login_id, meta_time)])
        )
        .await,
        200
    );
    eventually(WAIT, "Meta's opt-in recorded as a duplicate", || async {
        metrics_text(scheduler.metrics_addr)
            .await
            .contains("scheduler_optins_recorded_total{result=\"duplicate\"} 1")
    })
    .await;
    let [opted_in_at, deadline, _, _] = stored_times(&sql, &login_id).await;
    assert_eq!(opted_in_at, meta_time);
    assert_eq!(
        deadline,
        meta_time + DAY,
        "Meta's deadline, the earlier one"
    );
    assert_eq!(
        optin_state(&sql, &login_id).await.as_deref(),
        Some("pending")
    );
    stop.trigger();
    scheduler.task.await.expect("stopped");
}
