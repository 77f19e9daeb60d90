//! The scheduler against real PostgreSQL and RabbitMQ and the fake Graph: one message per
//! opt-in, deadlines, earliest deadline first, classified retries, pauses and unknown pages.
//! Failure cases are in `scheduler_recovery.rs`.

use std::time::Duration;

use lc_testkit::fake_graph::{FakeResponse, TokenSource};
use lc_testkit::pipeline::{
    FIRST_TEXT, PAGE, PAGE_TOKEN, TestEnv, WAIT, body, eventually, insert_optin, metrics_text,
    optin_item, optin_state, post_signed, write_pages_file,
};
use serde_json::Value;
use time::OffsetDateTime;

#[tokio::test]
async fn an_optin_gets_exactly_one_message_and_one_sent_event() {
    let env = TestEnv::new().await;
    let events = env.capture_events(&["first_message.*.#"]).await;
    let mut p = env.start_pipeline(env.scheduler_config()).await;

    let now = OffsetDateTime::now_utc();
    assert_eq!(
        post_signed(&p.ingest, body(PAGE, vec![optin_item(PAGE, "L1", now)])).await,
        200
    );
    let calls = env
        .graph
        .wait_for_send_calls(1, WAIT)
        .await
        .expect("one call");
    let call = &calls[0];
    assert_eq!(call.path, format!("/v25.0/{PAGE}/messages"));
    assert_eq!(call.token_source, Some(TokenSource::Header));
    assert_eq!(
        call.authorization.as_deref(),
        Some(format!("Bearer {PAGE_TOKEN}").as_str())
    );
    assert!(
        !call.query.contains("access_token"),
        "token never in the URL: {}",
        call.query
    );
    assert_eq!(call.body["recipient"]["login_id"], "L1");
    assert_eq!(call.body["messaging_type"], "UPDATE");
    assert_eq!(call.body["message"]["text"], FIRST_TEXT);
    assert_eq!(
        call.body["message"]["quick_replies"][0]["title"],
        "Track my order"
    );
    assert_eq!(call.body["message"]["quick_replies"][1]["payload"], "AGENT");

    let got = env.events(&events, 1).await;
    assert_eq!(got.len(), 1);
    let ev = &got[0];
    assert_eq!(ev["type"], "com.loginconnect.first_message.sent");
    assert_eq!(ev["data"]["login_id"], "L1");
    assert_eq!(ev["data"]["page_id"], PAGE);
    assert_eq!(ev["data"]["attempts"], 1);
    assert!(
        ev["data"]["message_id"]
            .as_str()
            .is_some_and(|m| m.starts_with("m_"))
    );

    // The same opt-in again, the same login_id with another timestamp inside the window,
    // and a redelivery: all duplicates.
    let later = now + Duration::from_secs(30);
    assert_eq!(
        post_signed(&p.ingest, body(PAGE, vec![optin_item(PAGE, "L1", now)])).await,
        200
    );
    assert_eq!(
        post_signed(&p.ingest, body(PAGE, vec![optin_item(PAGE, "L1", later)])).await,
        200
    );
    eventually(WAIT, "two duplicates recorded", || async {
        metrics_text(p.scheduler().metrics_addr)
            .await
            .contains("scheduler_optins_recorded_total{result=\"duplicate\"} 2")
    })
    .await;
    assert_eq!(env.graph.send_calls().len(), 1, "still exactly one call");
    let sql = env.sql().await;
    assert_eq!(optin_state(&sql, "L1").await.as_deref(), Some("sent"));
    let outbox: i64 = sql
        .query_one(
            "SELECT count(*) FROM outbox WHERE event_type = 'first_message.sent'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(outbox, 1);
    p.stop_scheduler().await;
}

#[tokio::test]
async fn two_schedulers_send_a_thousand_optins_once_each() {
    let env = TestEnv::new().await;
    let (ingest, _stop_ingest) = env.start_ingest().await;
    let (a, stop_a) = env.start_scheduler(env.scheduler_config()).await;
    let (b, stop_b) = env.start_scheduler(env.scheduler_config()).await;
    let now = OffsetDateTime::now_utc();
    for chunk in 0..20 {
        let items = (0..50)
            .map(|i| optin_item(PAGE, &format!("L{}", chunk * 50 + i), now))
            .collect();
        assert_eq!(post_signed(&ingest, body(PAGE, items)).await, 200);
    }
    let calls = env
        .graph
        .wait_for_send_calls(1000, Duration::from_secs(60))
        .await
        .expect("1000 calls");
    let sql = env.sql().await;
    eventually(WAIT, "all 1000 recorded as sent", || async {
        let n: i64 = sql
            .query_one("SELECT count(*) FROM optins WHERE state = 'sent'", &[])
            .await
            .expect("count")
            .get(0);
        n == 1000
    })
    .await;
    let calls_now = env.graph.send_calls();
    assert_eq!(
        calls_now.len(),
        1000,
        "exactly 1000 calls ({} seen at first)",
        calls.len()
    );
    let mut ids: Vec<String> = calls_now
        .iter()
        .filter_map(|c| c.login_id.clone())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 1000, "no login_id twice");
    stop_a.trigger();
    stop_b.trigger();
    a.task.await.expect("a stopped");
    b.task.await.expect("b stopped");
}

#[tokio::test]
async fn optins_past_their_deadline_are_expired_without_a_call_and_retries_stop_in_time() {
    let env = TestEnv::new().await;
    let events = env.capture_events(&["first_message.*.#"]).await;
    let mut config = env.scheduler_config();
    config.retry_base_ms = 200;
    config.retry_jitter = false;
    let margin = Duration::from_secs(config.safety_margin_secs);
    let mut p = env.start_pipeline(config).await;
    let now = OffsetDateTime::now_utc();
    let day = Duration::from_secs(86_400);

    // 25 hours old, and one inside the safety margin: both expire on arrival.
    let stale = now - Duration::from_secs(25 * 3600);
    let in_margin = now - day + margin - Duration::from_secs(5);
    // Four seconds of sending time left, and Graph failing transiently throughout.
    let short = now - day + margin + Duration::from_secs(4);
    env.graph
        .script("SHORT", vec![FakeResponse::unexpected(); 50]);
    let items = vec![
        optin_item(PAGE, "STALE", stale),
        optin_item(PAGE, "MARGIN", in_margin),
        optin_item(PAGE, "SHORT", short),
    ];
    assert_eq!(post_signed(&p.ingest, body(PAGE, items)).await, 200);

    let got = env.events(&events, 3).await;
    assert_eq!(got.len(), 3);
    let mut expired: Vec<String> = got
        .iter()
        .inspect(|e| assert_eq!(e["type"], "com.loginconnect.first_message.expired"))
        .map(|e| {
            e["data"]["login_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    expired.sort();
    assert_eq!(expired, vec!["MARGIN", "SHORT", "STALE"]);

    let calls = env.graph.send_calls();
    assert!(
        calls.iter().all(|c| c.login_id.as_deref() == Some("SHORT")),
        "no call for expired opt-ins"
    );
    assert!(calls.len() >= 2, "SHORT was retried: {} calls", calls.len());
    let last_send = short + day - margin;
    for c in &calls {
        assert!(
            c.at < last_send,
            "call at {} is past the last send time {last_send}",
            c.at
        );
    }
    let short_event = got
        .iter()
        .find(|e| e["data"]["login_id"] == "SHORT")
        .expect("short");
    assert_eq!(short_event["data"]["attempts"], calls.len());
    assert!(
        short_event["data"]["last_error"]["message"]
            .as_str()
            .is_some()
    );
    let sql = env.sql().await;
    assert_eq!(optin_state(&sql, "SHORT").await.as_deref(), Some("expired"));
    p.stop_scheduler().await;
}

#[tokio::test]
async fn earliest_deadline_goes_first_under_a_throttled_graph() {
    let env = TestEnv::new().await;
    let sql = {
        // Record a backlog before any scheduler runs: migrate, then insert rows in a shuffled
        // order of deadlines.
        env.migrated_pool(2).await;
        env.sql().await
    };
    let now = OffsetDateTime::now_utc();
    let ages_minutes = [30, 300, 5, 600, 120, 45, 900, 1, 480, 60];
    for (i, age) in ages_minutes.iter().enumerate() {
        let opted = now - Duration::from_secs(age * 60);
        insert_optin(&sql, PAGE, &format!("L{i}"), opted, "pending").await;
    }
    env.graph.set_latency(Duration::from_millis(20));
    let mut config = env.scheduler_config();
    config.max_in_flight = 1;
    config.page_rate_limit = 20;
    let (scheduler, stop) = env.start_scheduler(config).await;
    let calls = env
        .graph
        .wait_for_send_calls(10, WAIT)
        .await
        .expect("10 calls");
    let order: Vec<usize> = calls
        .iter()
        .map(|c| {
            c.login_id.as_deref().unwrap_or("L?")[1..]
                .parse()
                .expect("index")
        })
        .collect();
    let mut expected: Vec<usize> = (0..10).collect();
    // Oldest opt-in = earliest deadline.
    expected.sort_by_key(|i| std::cmp::Reverse(ages_minutes[*i]));
    assert_eq!(order, expected);
    stop.trigger();
    scheduler.task.await.expect("stopped");
}

#[tokio::test]
async fn transient_errors_are_retried_with_growing_delays_and_permanent_ones_are_not() {
    let env = TestEnv::new().await;
    let events = env.capture_events(&["first_message.*.#"]).await;
    let mut config = env.scheduler_config();
    config.retry_base_ms = 150;
    config.retry_jitter = false;
    let mut p = env.start_pipeline(config).await;

    env.graph.script(
        "FLAKY",
        vec![
            FakeResponse::Error {
                http_status: 503,
                code: 2,
                subcode: None,
                message: "Service temporarily unavailable".into(),
            },
            FakeResponse::unexpected(),
            FakeResponse::Error {
                http_status: 400,
                code: 1200,
                subcode: None,
                message: "Temporary send message failure. Please try again later.".into(),
            },
            FakeResponse::RateLimited {
                code: 613,
                regain_minutes: 0,
            },
        ],
    );
    let permanent = [
        (
            "P551",
            FakeResponse::Error {
                http_status: 400,
                code: 551,
                subcode: Some(1545041),
                message: "This person isn't available right now.".into(),
            },
        ),
        (
            "P100",
            FakeResponse::Error {
                http_status: 400,
                code: 100,
                subcode: Some(2018001),
                message: "(#100) No matching user found".into(),
            },
        ),
        ("PWIN", FakeResponse::outside_window()),
    ];
    for (login_id, response) in &permanent {
        env.graph.script(login_id, vec![response.clone()]);
    }
    let now = OffsetDateTime::now_utc();
    let mut items = vec![optin_item(PAGE, "FLAKY", now)];
    items.extend(permanent.iter().map(|(l, _)| optin_item(PAGE, l, now)));
    assert_eq!(post_signed(&p.ingest, body(PAGE, items)).await, 200);

    let got: Vec<Value> = env.events(&events, 4).await;
    assert_eq!(got.len(), 4);
    let by_login = |l: &str| {
        got.iter()
            .find(|e| e["data"]["login_id"] == l)
            .cloned()
            .expect(l)
    };
    let flaky = by_login("FLAKY");
    assert_eq!(flaky["type"], "com.loginconnect.first_message.sent");
    assert_eq!(flaky["data"]["attempts"], 5);
    for (login_id, _) in &permanent {
        let ev = by_login(login_id);
        assert_eq!(
            ev["type"], "com.loginconnect.first_message.failed",
            "{login_id}"
        );
        assert_eq!(ev["data"]["reason"], "graph_permanent");
        assert_eq!(ev["data"]["attempts"], 1);
        assert!(ev["data"]["last_error"]["code"].as_i64().is_some());
    }
    let calls = env.graph.send_calls();
    for (login_id, _) in &permanent {
        let n = calls
            .iter()
            .filter(|c| c.login_id.as_deref() == Some(*login_id))
            .count();
        assert_eq!(n, 1, "{login_id} called once");
    }
    let flaky_times: Vec<OffsetDateTime> = calls
        .iter()
        .filter(|c| c.login_id.as_deref() == Some("FLAKY"))
        .map(|c| c.at)
        .collect();
    assert_eq!(flaky_times.len(), 5);
    let gaps: Vec<f64> = flaky_times
        .windows(2)
        .map(|w| (w[1] - w[0]).as_seconds_f64())
        .collect();
    // Ceilings without jitter: 0.15, 0.3, 0.6, 1.2 s (the poll interval may add up to 0.2 s).
    for (i, gap) in gaps.iter().enumerate() {
        let ceiling = 0.15 * f64::from(1u32 << i);
        assert!(
            *gap >= ceiling * 0.95,
            "gap {i} = {gap:.3}s, expected ≥ {ceiling}s: {gaps:?}"
        );
    }
    assert!(
        gaps.windows(2).all(|w| w[1] > w[0]),
        "delays grow: {gaps:?}"
    );
    p.stop_scheduler().await;
}

#[tokio::test]
async fn an_invalid_token_pauses_the_page_until_the_token_is_fixed() {
    let env = TestEnv::new().await;
    // Graph now expects another token than ours.
    env.graph.set_token(PAGE, "EAAG-rotated-token");
    let mut p = env.start_pipeline(env.scheduler_config()).await;
    let now = OffsetDateTime::now_utc();
    assert_eq!(
        post_signed(&p.ingest, body(PAGE, vec![optin_item(PAGE, "T1", now)])).await,
        200
    );
    let calls = env
        .graph
        .wait_for_send_calls(1, WAIT)
        .await
        .expect("first call");
    assert_eq!(calls[0].outcome, "error:190");
    let text = metrics_text(p.scheduler().metrics_addr).await;
    assert!(
        text.contains(&format!("scheduler_paused_pages{{page_id=\"{PAGE}\"}} 1")),
        "{text}"
    );

    // More opt-ins for the paused page wait; nothing is lost and no attempts are burnt.
    let items = vec![optin_item(PAGE, "T2", now), optin_item(PAGE, "T3", now)];
    assert_eq!(post_signed(&p.ingest, body(PAGE, items)).await, 200);
    let sql = env.sql().await;
    eventually(WAIT, "T2 and T3 recorded", || async {
        optin_state(&sql, "T2").await.is_some() && optin_state(&sql, "T3").await.is_some()
    })
    .await;
    // Several poll rounds pass without any call.
    let rounds = Duration::from_millis(600);
    tokio::time::sleep(rounds).await;
    assert_eq!(
        env.graph.send_calls().len(),
        1,
        "a paused page makes no calls"
    );
    for l in ["T1", "T2", "T3"] {
        assert_eq!(
            optin_state(&sql, l).await.as_deref(),
            Some("pending"),
            "{l}"
        );
    }

    // The operator fixes the token and reloads the configuration.
    write_pages_file(&env.pages_file, "EAAG-rotated-token");
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let calls = env
        .graph
        .wait_for_send_calls(4, WAIT)
        .await
        .expect("resumed");
    assert!(calls[1..].iter().all(|c| c.outcome == "ok"), "{calls:?}");
    eventually(WAIT, "all three sent", || async {
        let mut all = true;
        for l in ["T1", "T2", "T3"] {
            all &= optin_state(&sql, l).await.as_deref() == Some("sent");
        }
        all
    })
    .await;
    p.stop_scheduler().await;
}

#[tokio::test]
async fn unknown_pages_fail_once_and_replies_first_mean_no_message() {
    let env = TestEnv::new().await;
    let events = env.capture_events(&["first_message.*.#"]).await;
    let mut p = env.start_pipeline(env.scheduler_config()).await;
    let sql = env.sql().await;
    let now = OffsetDateTime::now_utc();
    // The correlator saw the reply first.
    sql.execute(
        "INSERT INTO links (page_id, login_id, psid, linked_at) VALUES ($1, 'R1', 'PSID1', $2)",
        &[&PAGE, &(now + Duration::from_secs(5))],
    )
    .await
    .expect("link");
    assert_eq!(
        post_signed(&p.ingest, body(PAGE, vec![optin_item(PAGE, "R1", now)])).await,
        200
    );
    assert_eq!(
        post_signed(&p.ingest, body("999", vec![optin_item("999", "U1", now)])).await,
        200
    );

    let got = env.events(&events, 1).await;
    assert_eq!(got.len(), 1);
    let ev = &got[0];
    assert_eq!(ev["type"], "com.loginconnect.first_message.failed");
    assert_eq!(ev["data"]["reason"], "unknown_page");
    assert_eq!(ev["data"]["page_id"], "999");
    eventually(WAIT, "R1 recorded", || async {
        optin_state(&sql, "R1").await.is_some()
    })
    .await;
    assert_eq!(optin_state(&sql, "R1").await.as_deref(), Some("replied"));
    assert!(env.graph.send_calls().is_empty(), "nothing sent");
    p.stop_scheduler().await;
}
