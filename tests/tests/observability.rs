//! Every metric the README documents is exported after a small end-to-end flow.

use std::collections::BTreeSet;
use std::time::Duration;

use lc_testkit::fake_graph::FakeResponse;
use lc_testkit::pipeline::{
    PAGE, TestEnv, body, metrics_text, optin_item, post_signed, reply_item,
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
