//! The webhook subscription watchdog against the fake Graph: it re-subscribes a page whose
//! subscription lost our app or a needed field (keeping the other fields), leaves complete
//! subscriptions alone, counts Graph errors, and runs on one scheduler replica at a time.

use std::time::Duration;

use lc_meta::pages::PagesConfig;
use lc_testkit::fake_graph::{FAKE_APP_ID, FakeGraph, FakeSubscription, RecordedCall};
use lc_testkit::harness::TestDb;
use lc_testkit::pipeline::{PAGE, TestEnv, eventually, metrics_text};
use lc_worker::graph::GraphClient;
use lc_worker::watchdog::{
    Leadership, PageCheck, REQUIRED_FIELDS, WatchdogArgs, WatchdogMetrics, check_once,
};

const TOKEN: &str = "EAAG-watchdog-token";
const SECOND_PAGE: &str = "2222222222";

fn pages(entries: &[(&str, &str)]) -> PagesConfig {
    let text: String = entries
        .iter()
        .map(|(id, token)| {
            format!(
                "[[pages]]\nid = \"{id}\"\naccess_token = \"{token}\"\n\
                 [pages.first_message]\ntext = \"Hi\"\n"
            )
        })
        .collect();
    PagesConfig::parse(&text, &|_| None).expect("pages")
}

fn setup() -> (WatchdogMetrics, prometheus::Registry) {
    let registry = prometheus::Registry::new();
    let metrics = WatchdogMetrics::new(&registry).expect("metrics");
    (metrics, registry)
}

async fn fake() -> (FakeGraph, GraphClient) {
    let fake = FakeGraph::start().await;
    fake.add_page(PAGE, TOKEN);
    let graph = GraphClient::new(&fake.base_url(), Duration::from_secs(2)).expect("client");
    (fake, graph)
}

fn posts(calls: &[RecordedCall]) -> usize {
    calls
        .iter()
        .filter(|c| c.method == "POST" && c.path.ends_with("/subscribed_apps"))
        .count()
}

fn gets(calls: &[RecordedCall]) -> Vec<RecordedCall> {
    calls
        .iter()
        .filter(|c| c.method == "GET" && c.path.ends_with("/subscribed_apps"))
        .cloned()
        .collect()
}

fn resubscriptions(metrics: &WatchdogMetrics, page: &str) -> u64 {
    metrics.resubscriptions.with_label_values(&[page]).get()
}

#[tokio::test]
async fn a_missing_app_is_subscribed_again_once() {
    let (fake, graph) = fake().await;
    let (metrics, _registry) = setup();
    let config = pages(&[(PAGE, TOKEN)]);

    let report = check_once(&graph, &config, FAKE_APP_ID, &metrics).await;
    assert_eq!(
        report.pages,
        vec![(
            PAGE.to_owned(),
            PageCheck::Resubscribed {
                missing: vec!["app".into()],
                fields: REQUIRED_FIELDS.iter().map(|f| (*f).to_owned()).collect(),
            }
        )]
    );
    assert_eq!(
        fake.subscriptions(PAGE),
        vec![FakeSubscription {
            app_id: FAKE_APP_ID.into(),
            subscribed_fields: REQUIRED_FIELDS.iter().map(|f| (*f).to_owned()).collect(),
        }]
    );
    assert_eq!(resubscriptions(&metrics, PAGE), 1);
    // The page token travels in the header, never in the URL.
    for call in fake.calls() {
        assert!(
            !call.query.contains(TOKEN),
            "token in a URL: {}",
            call.query
        );
    }

    // Complete now: the next round only reads.
    let report = check_once(&graph, &config, FAKE_APP_ID, &metrics).await;
    assert_eq!(report.pages, vec![(PAGE.to_owned(), PageCheck::Healthy)]);
    assert_eq!(posts(&fake.calls()), 1);
    assert_eq!(resubscriptions(&metrics, PAGE), 1);
    assert_eq!(metrics.errors.get(), 0);
    assert_eq!(metrics.rounds.get(), 2);
}

#[tokio::test]
async fn a_missing_field_is_added_and_other_fields_and_apps_are_kept() {
    let (fake, graph) = fake().await;
    let (metrics, _registry) = setup();
    fake.set_subscription(PAGE, FAKE_APP_ID, &["messages", "message_deliveries"]);
    fake.set_subscription(PAGE, "999", &["messages"]);

    let report = check_once(&graph, &pages(&[(PAGE, TOKEN)]), FAKE_APP_ID, &metrics).await;
    let want_fields = vec![
        "messages".to_owned(),
        "message_deliveries".to_owned(),
        "messaging_optins".to_owned(),
        "messaging_postbacks".to_owned(),
    ];
    assert_eq!(
        report.pages,
        vec![(
            PAGE.to_owned(),
            PageCheck::Resubscribed {
                missing: vec!["messaging_optins".into(), "messaging_postbacks".into()],
                fields: want_fields.clone(),
            }
        )]
    );
    let subs = fake.subscriptions(PAGE);
    let ours = subs.iter().find(|s| s.app_id == FAKE_APP_ID).expect("ours");
    assert_eq!(ours.subscribed_fields, want_fields);
    let other = subs
        .iter()
        .find(|s| s.app_id == "999")
        .expect("other app kept");
    assert_eq!(other.subscribed_fields, vec!["messages".to_owned()]);
    assert_eq!(resubscriptions(&metrics, PAGE), 1);

    // Our app complete but another app missing fields: none of our business.
    let report = check_once(&graph, &pages(&[(PAGE, TOKEN)]), FAKE_APP_ID, &metrics).await;
    assert_eq!(report.pages[0].1, PageCheck::Healthy);
    assert_eq!(posts(&fake.calls()), 1);
}

#[tokio::test]
async fn graph_errors_are_counted_and_other_pages_still_checked() {
    let (fake, graph) = fake().await;
    let (metrics, registry) = setup();
    fake.add_page(SECOND_PAGE, "the-real-token");
    // PAGE has a wrong token in the pages file: Graph answers code 190.
    let config = pages(&[(PAGE, "EAAG-wrong-token"), (SECOND_PAGE, "the-real-token")]);

    let report = check_once(&graph, &config, FAKE_APP_ID, &metrics).await;
    assert_eq!(report.pages.len(), 2);
    let PageCheck::Failed(message) = &report.pages[0].1 else {
        panic!("expected a failure for {PAGE}: {:?}", report.pages[0]);
    };
    assert!(message.contains("190"), "{message}");
    assert!(
        !message.contains("EAAG-wrong-token"),
        "no token in errors: {message}"
    );
    assert!(matches!(report.pages[1].1, PageCheck::Resubscribed { .. }));
    assert_eq!(metrics.errors.get(), 1);
    assert_eq!(resubscriptions(&metrics, PAGE), 0);
    assert_eq!(resubscriptions(&metrics, SECOND_PAGE), 1);
    assert!(
        fake.subscriptions(PAGE).is_empty(),
        "nothing subscribed with a bad token"
    );
    let text = lc_shared::telemetry::render_metrics(&registry);
    assert!(text.contains("scheduler_watchdog_errors_total 1"), "{text}");
    assert!(text.contains(&format!(
        "scheduler_webhook_resubscriptions_total{{page_id=\"{SECOND_PAGE}\"}} 1"
    )));
}

#[tokio::test]
async fn the_lock_admits_one_session_at_a_time() {
    let db = TestDb::create().await;
    let a = lc_shared::db::pool(&db.url(), 2).expect("pool a");
    let b = lc_shared::db::pool(&db.url(), 2).expect("pool b");
    let held = Leadership::try_acquire(&a)
        .await
        .expect("query")
        .expect("free lock");
    assert!(held.still_held().await);
    assert!(Leadership::try_acquire(&b).await.expect("query").is_none());
    assert!(
        Leadership::try_acquire(&a).await.expect("query").is_none(),
        "another session of the same pool does not get it either"
    );
    held.release().await;
    let next = Leadership::try_acquire(&b).await.expect("query");
    assert!(next.is_some(), "released locks can be taken");
    if let Some(l) = next {
        l.release().await;
    }
}

#[tokio::test]
async fn two_replicas_check_once_per_round_and_fail_over() {
    let env = TestEnv::new().await;
    let mut config = env.scheduler_config();
    config.watchdog = WatchdogArgs {
        watchdog_interval_secs: 1,
        meta_app_id: Some(FAKE_APP_ID.to_owned()),
    };
    let (a, stop_a) = env.start_scheduler(config.clone()).await;
    let (b, stop_b) = env.start_scheduler(config).await;

    tokio::time::sleep(Duration::from_millis(4500)).await;
    let checks = gets(&env.graph.calls());
    // One replica, one check a second: 5 rounds in 4.5 s (first at start). Two replicas
    // checking would make about 10, in pairs.
    assert!(
        (3..=6).contains(&checks.len()),
        "{} checks in 4.5 s",
        checks.len()
    );
    for pair in checks.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap >= Duration::from_millis(500),
            "two checks {gap} apart: both replicas checked in one round"
        );
    }
    assert_eq!(
        posts(&env.graph.calls()),
        1,
        "one replica repaired the subscription once"
    );
    assert_eq!(env.graph.subscriptions(PAGE).len(), 1);

    let active = |text: &str| text.lines().any(|l| l == "scheduler_watchdog_active 1");
    let (ma, mb) = (
        metrics_text(a.metrics_addr).await,
        metrics_text(b.metrics_addr).await,
    );
    assert!(
        active(&ma) ^ active(&mb),
        "exactly one active replica:\nA: {}\nB: {}",
        active(&ma),
        active(&mb)
    );

    // The active replica stops: its session ends and the other takes over.
    let (leader, leader_stop, follower) = if active(&ma) {
        (a, stop_a, b)
    } else {
        (b, stop_b, a)
    };
    leader_stop.trigger();
    leader.task.await.expect("leader stopped");
    eventually(
        Duration::from_secs(10),
        "the other replica takes over",
        || async { active(&metrics_text(follower.metrics_addr).await) },
    )
    .await;
    let before = gets(&env.graph.calls()).len();
    eventually(Duration::from_secs(10), "checks continue", || async {
        gets(&env.graph.calls()).len() >= before + 2
    })
    .await;
}
