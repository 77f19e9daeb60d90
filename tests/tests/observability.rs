//! Every metric the README documents is exported after a small end-to-end flow, and the
//! gauges the alert rules of `deploy/prometheus/rules.yml` stand on show what they claim.

use std::collections::BTreeSet;
use std::time::Duration;

use lc_testkit::fake_graph::FakeResponse;
use lc_testkit::pipeline::{
    PAGE, TestEnv, body, eventually, insert_sent_optin, metrics_text, optin_item, post_signed,
    reply_item,
};
use time::OffsetDateTime;

const WAIT: Duration = Duration::from_secs(30);

fn documented_metrics() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README");
    let section = readme
        .split("### Metrics")
        .nth(1)
        .and_then(|s| s.split("\n### ").next())
        .expect("a Metrics section");
    section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .filter_map(|l| l.split('`').nth(1))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn every_documented_metric_is_exported_after_a_demo_flow() {
    let documented = documented_metrics();
    assert!(
        documented.len() >= 25,
        "the README lists the metrics: {documented:?}"
    );

    let env = TestEnv::new().await;
    let events = env.capture_events(&["identity.linked.#"]).await;
    let mut p = env
        .pipeline()
        .scheduler(env.scheduler_config())
        .correlator()
        .start()
        .await;

    // One transient error on the way, as in real life.
    env.graph.script("M1", vec![FakeResponse::unexpected()]);
    let now = OffsetDateTime::now_utc();
    assert_eq!(
        post_signed(&p.ingest, body(PAGE, vec![optin_item(PAGE, "M1", now)])).await,
        200
    );
    env.graph
        .wait_for_send_calls(2, WAIT)
        .await
        .expect("retried and sent");
    let reply = reply_item(PAGE, "PSID-M1", "m_m1", "M1", now + Duration::from_secs(30));
    assert_eq!(post_signed(&p.ingest, body(PAGE, vec![reply])).await, 200);
    assert_eq!(env.deliveries(&events, 1, WAIT).await.len(), 1);

    let mut exported = String::new();
    for addr in [
        p.ingest.admin_addr,
        p.scheduler().metrics_addr,
        p.correlator().metrics_addr,
    ] {
        exported.push_str(&metrics_text(addr).await);
    }
    let missing: Vec<&String> = documented
        .iter()
        .filter(|m| !exported.contains(&format!("# TYPE {m} ")))
        .collect();
    assert!(
        missing.is_empty(),
        "documented but not exported: {missing:?}"
    );
    assert!(
        exported.contains("scheduler_retries_total 1"),
        "the retry is counted"
    );
    assert!(exported.contains("scheduler_graph_errors_total{code=\"2\",subcode=\"none\"} 1"));
    assert!(exported.contains("correlator_replies_total{result=\"linked\"} 1"));
    p.stop_scheduler().await;
}

/// A housekeeping round is every 15 s: two rounds and some.
const ROUNDS: Duration = Duration::from_secs(40);

/// The inputs of the alerts "opt-ins at risk", "subscription lost" and "a consumer missing",
/// as a scheduler reads them from the database and the broker: unsent opt-ins by time left
/// (a sent one close to its deadline does not count), a page whose subscription the
/// watchdog recorded as lost (and back to 0 when restored), and consumers per work queue
/// (0 once the only correlator stops).
#[tokio::test]
async fn alert_gauges_follow_the_database_and_the_broker() {
    let env = TestEnv::new().await;
    let (correlator, stop_correlator) = env.start_correlator().await;
    let (scheduler, stop_scheduler) = env.start_scheduler(env.scheduler_config()).await;
    let sql = env.sql().await;
    let day = Duration::from_secs(86_400);
    let now = OffsetDateTime::now_utc();
    // Deadlines 5 min, 30 min, 2 h and 20 h away; none due for a send during the test (next
    // attempt in an hour), so they stay pending.
    for (login_id, left) in [
        ("R5M", 300),
        ("R30M", 1_800),
        ("R2H", 7_200),
        ("R20H", 72_000),
    ] {
        let at = now - day + Duration::from_secs(left);
        sql.execute(
            "INSERT INTO optins (page_id, login_id, opted_in_at, deadline, send_at, state, \
             next_attempt_at) VALUES ($1, $2, $3, $3::timestamptz + interval '24 hours', $3, \
             'pending', now() + interval '1 hour')",
            &[&PAGE, &login_id, &at],
        )
        .await
        .expect("insert opt-in");
    }
    insert_sent_optin(&sql, PAGE, "SENT5M", now - day + Duration::from_secs(300)).await;
    sql.execute(
        "INSERT INTO page_state (page_id, rate_limit, unsubscribed_since) VALUES ($1, 0, now()) \
         ON CONFLICT (page_id) DO UPDATE SET unsubscribed_since = now()",
        &[&PAGE],
    )
    .await
    .expect("subscription lost");

    let addr = scheduler.metrics_addr;
    let shows = |text: &str, lines: &[String]| lines.iter().all(|l| text.contains(l.as_str()));
    let first: Vec<String> = [
        "scheduler_optins_at_risk{within=\"10m\"} 1".to_owned(),
        "scheduler_optins_at_risk{within=\"1h\"} 2".to_owned(),
        "scheduler_optins_at_risk{within=\"3h\"} 3".to_owned(),
        format!("scheduler_unsubscribed_pages{{page_id=\"{PAGE}\"}} 1"),
        "scheduler_queue_consumers{queue=\"scheduler.optins\"} 1".to_owned(),
        "scheduler_queue_consumers{queue=\"correlator.replies\"} 1".to_owned(),
        "scheduler_queue_messages_ready{queue=\"correlator.replies.dlq\"} 0".to_owned(),
    ]
    .into();
    eventually(
        ROUNDS,
        "the at-risk, subscription and consumer gauges",
        || async { shows(&metrics_text(addr).await, &first) },
    )
    .await;
    let text = metrics_text(addr).await;
    assert!(
        !text.contains("scheduler_queue_consumers{queue=\"scheduler.optins.dlq\"}"),
        "dead-letter queues have no consumer gauge (nobody consumes them)"
    );

    // The correlator goes; the watchdog finds the page subscribed again.
    stop_correlator.trigger();
    correlator.task.await.expect("correlator stopped");
    sql.execute(
        "UPDATE page_state SET unsubscribed_since = NULL WHERE page_id = $1",
        &[&PAGE],
    )
    .await
    .expect("subscription restored");
    let then: Vec<String> = [
        "scheduler_queue_consumers{queue=\"correlator.replies\"} 0".to_owned(),
        "scheduler_queue_consumers{queue=\"scheduler.optins\"} 1".to_owned(),
        format!("scheduler_unsubscribed_pages{{page_id=\"{PAGE}\"}} 0"),
    ]
    .into();
    eventually(
        ROUNDS,
        "no correlator consumer, page subscribed",
        || async { shows(&metrics_text(addr).await, &then) },
    )
    .await;
    stop_scheduler.trigger();
    scheduler.task.await.expect("scheduler stopped");
}
