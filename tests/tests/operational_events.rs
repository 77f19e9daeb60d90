//! Operational events (issue 16) through the outbox, as a provider's consumer sees them on
//! the exchange: `page.paused` once per pause however many replicas meet the cause,
//! `page.resumed` once when it ends (new token, end of a throttle), `subscription.lost` once
//! per loss and `subscription.restored` when the watchdog finds it back.

use std::time::Duration;

use clap::Parser;
use lc_testkit::fake_graph::{FAKE_APP_ID, FakeGraph};
use lc_testkit::pipeline::{PAGE, TestEnv, WAIT, eventually, insert_optin};
use lc_worker::graph::GraphClient;
use lc_worker::scheduler::store::pages;
use lc_worker::watchdog::announce::{Announced, record_round};
use lc_worker::watchdog::{PageCheck, WatchdogMetrics, check_once};
use serde_json::Value;
use time::OffsetDateTime;

/// A token-encryption key list for the schedulers and the CLI.
const KEYS: &str = "k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// Every event on `queue` once the outbox is published, checked against the contract.
async fn drained(env: &TestEnv, queue: &str) -> Vec<(String, Value)> {
    env.wait_outbox_published().await;
    env.take_all(queue)
        .await
        .iter()
        .map(|d| (d.routing_key.to_string(), env.contract().check_delivery(d)))
        .collect()
}

#[tokio::test]
async fn a_token_pause_seen_by_two_replicas_is_announced_once_and_its_resume_once() {
    let env = TestEnv::new().await;
    let ops = env.capture_events(&["page.*.#"]).await;
    let public = env
        .capture_events(&["first_message.*.#", "identity.*.#"])
        .await;
    let pool = env.migrated_pool(2).await;
    // Graph knows only the new token: every call with the configured one gets code 190.
    let new_token = "EAAG-rotated-page-token";
    env.graph.set_token(PAGE, new_token);
    let sql = env.sql().await;
    let now = OffsetDateTime::now_utc();
    for i in 0..20 {
        insert_optin(&sql, PAGE, &format!("T{i}"), now, "pending").await;
    }
    let mut config = env.scheduler_config();
    config.page_token_keys = KEYS.into();
    let a = env.start_scheduler(config.clone()).await;
    let b = env.start_scheduler(config).await;
    eventually(WAIT, "the page paused", || async {
        lc_testkit::pipeline::count(
            &sql,
            "SELECT count(*) FROM page_state WHERE paused_reason = 'token_invalid'",
        )
        .await
            == 1
    })
    .await;
    // The same Graph error met again (another replica, a call in flight): no second event.
    let mut client = pool.get().await.expect("client");
    let again = pages::pause(
        &mut client,
        PAGE,
        pages::PauseReason::TokenInvalid,
        None,
        "190 again",
    )
    .await
    .expect("pause");
    assert!(!again, "already paused");

    let paused = drained(&env, &ops).await;
    assert_eq!(paused.len(), 1, "one page.paused per pause: {paused:?}");
    let (key, ev) = &paused[0];
    assert_eq!(key, &format!("page.paused.{PAGE}"));
    assert_eq!(ev["data"]["reason"], "token_invalid");
    assert_eq!(ev["data"]["page_id"], PAGE);
    assert_eq!(ev["data"]["app_id"], "default");
    assert_eq!(ev["appid"], "default");
    assert_eq!(ev["pageseq"], 1);
    assert!(
        !ev.to_string().contains(new_token) && !ev.to_string().contains("EAAG-test"),
        "no token in events: {ev}"
    );

    // The documented recovery: store the new token. Every replica resumes; one event.
    let token_file = env.pages_file.with_extension("token");
    std::fs::write(&token_file, new_token).expect("token file");
    let db = env.db.url();
    let argv = [
        "loginconnect",
        "--database-url",
        &db,
        "pages",
        "set-token",
        PAGE,
        "--from-file",
        token_file.to_str().expect("utf-8 path"),
        "--page-token-keys",
        KEYS,
    ];
    let cli = lc_worker::cli::Cli::try_parse_from(argv).expect("arguments");
    lc_worker::cli::run(cli, &mut Vec::new())
        .await
        .expect("set-token");
    let _ = std::fs::remove_file(&token_file);
    eventually(WAIT, "every opt-in sent", || async {
        lc_testkit::pipeline::count(&sql, "SELECT count(*) FROM optins WHERE state = 'sent'").await
            == 20
    })
    .await;
    let resumed = drained(&env, &ops).await;
    assert_eq!(resumed.len(), 1, "one page.resumed: {resumed:?}");
    assert_eq!(resumed[0].0, format!("page.resumed.{PAGE}"));
    let data = &resumed[0].1["data"];
    assert_eq!(data["reason"], "token_invalid");
    assert_eq!(data["resumed_by"], "new_token");
    assert_eq!(
        resumed[0].1["pageseq"], 2,
        "after its pause in the page's order"
    );
    // A consumer of the public kinds sees none of it.
    let public = drained(&env, &public).await;
    assert_eq!(public.len(), 20);
    assert!(
        public
            .iter()
            .all(|(k, _)| k.starts_with("first_message.sent."))
    );
    for (s, stop) in [a, b] {
        stop.trigger();
        s.task.await.expect("scheduler stopped");
    }
}

#[tokio::test]
async fn a_throttle_is_announced_once_when_it_starts_and_once_when_it_ends() {
    let env = TestEnv::new().await;
    let ops = env.capture_events(&["page.*.#"]).await;
    let pool = env.migrated_pool(4).await;
    // Two replicas running: either may notice the throttle's end; one announces it.
    let a = env.start_scheduler(env.scheduler_config()).await;
    let b = env.start_scheduler(env.scheduler_config()).await;
    let (mut c1, mut c2) = (pool.get().await.expect("c1"), pool.get().await.expect("c2"));
    // Two replicas meet Graph's throttle at the same moment, then one meets it again.
    let (r1, r2) = tokio::join!(
        pages::throttle(&mut c1, PAGE, Duration::from_secs(2)),
        pages::throttle(&mut c2, PAGE, Duration::from_secs(2)),
    );
    r1.expect("throttle");
    r2.expect("throttle");
    pages::throttle(&mut c1, PAGE, Duration::from_secs(2))
        .await
        .expect("throttle again");
    let sql = env.sql().await;
    eventually(
        Duration::from_secs(10),
        "the throttle's end announced",
        || async {
            lc_testkit::pipeline::count(
                &sql,
                "SELECT count(*) FROM outbox WHERE event_type = 'page.resumed'",
            )
            .await
                == 1
        },
    )
    .await;
    // Nothing left to announce, whoever looks.
    assert!(
        pages::announce_throttle_ends(&mut c1)
            .await
            .expect("ends")
            .is_empty()
    );
    let got = drained(&env, &ops).await;
    let kinds: Vec<(&str, &str)> = got
        .iter()
        .map(|(k, e)| (k.as_str(), e["data"]["resumed_by"].as_str().unwrap_or("-")))
        .collect();
    let (paused, resumed) = (
        format!("page.paused.{PAGE}"),
        format!("page.resumed.{PAGE}"),
    );
    assert_eq!(
        kinds,
        vec![(paused.as_str(), "-"), (resumed.as_str(), "throttle_ended")],
        "one pause, one resume, in order"
    );
    assert_eq!(got[0].1["data"]["reason"], "throttled");
    assert_eq!(got[1].1["data"]["reason"], "throttled");
    assert!(got[0].1["pageseq"].as_i64() < got[1].1["pageseq"].as_i64());
    for (s, stop) in [a, b] {
        stop.trigger();
        s.task.await.expect("scheduler stopped");
    }
}

#[tokio::test]
async fn a_lost_subscription_is_announced_once_over_two_rounds_and_its_return_after() {
    let env = TestEnv::new().await;
    let capture = env.capture_events(&["subscription.*.#"]).await;
    let pool = env.migrated_pool(2).await;
    {
        let client = pool.get().await.expect("client");
        pages::ensure(&client, &[PAGE], 10).await.expect("page row");
        pages::set_meta_app_id(&client, FAKE_APP_ID)
            .await
            .expect("app id");
    }
    let fake = FakeGraph::start().await;
    fake.add_page(PAGE, "EAAG-watchdog-token");
    let graph = GraphClient::new(&fake.base_url(), Duration::from_secs(2)).expect("client");
    let config = lc_meta::pages::PagesConfig::parse(
        &format!(
            "[[pages]]\nid = \"{PAGE}\"\naccess_token = \"EAAG-watchdog-token\"\n\
             [pages.first_message]\ntext = \"Hi\"\n"
        ),
        &|_| None,
    )
    .expect("pages");
    let metrics = WatchdogMetrics::new(&prometheus::Registry::new()).expect("metrics");
    let relay = env.start_relay(&pool, env.worker_args().relay).await;

    // Round 1: our app is missing; subscribed again; the loss is announced.
    let report = check_once(&graph, &config, FAKE_APP_ID, &metrics).await;
    assert!(matches!(report.pages[0].1, PageCheck::Resubscribed { .. }));
    let announced = record_round(&pool, &report).await.expect("round 1");
    assert_eq!(
        announced,
        Announced {
            lost: vec![PAGE.into()],
            restored: vec![]
        }
    );
    // Meta drops it again before the next round: still the same loss, nothing new.
    fake.set_subscription(PAGE, FAKE_APP_ID, &[]);
    let report = check_once(&graph, &config, FAKE_APP_ID, &metrics).await;
    assert!(matches!(report.pages[0].1, PageCheck::Resubscribed { .. }));
    assert_eq!(
        record_round(&pool, &report).await.expect("round 2"),
        Announced::default()
    );
    let lost = drained(&env, &capture).await;
    assert_eq!(
        lost.len(),
        1,
        "one subscription.lost over two rounds: {lost:?}"
    );
    assert_eq!(lost[0].0, format!("subscription.lost.{PAGE}"));
    assert_eq!(lost[0].1["data"]["missing"], serde_json::json!(["app"]));
    assert_eq!(lost[0].1["data"]["app_id"], FAKE_APP_ID);
    assert_eq!(lost[0].1["appid"], FAKE_APP_ID);

    // Round 3 finds it complete: restored, once.
    let report = check_once(&graph, &config, FAKE_APP_ID, &metrics).await;
    assert_eq!(report.pages[0].1, PageCheck::Healthy);
    assert_eq!(
        record_round(&pool, &report).await.expect("round 3"),
        Announced {
            lost: vec![],
            restored: vec![PAGE.into()]
        }
    );
    let report = check_once(&graph, &config, FAKE_APP_ID, &metrics).await;
    assert_eq!(
        record_round(&pool, &report).await.expect("round 4"),
        Announced::default()
    );
    let restored = drained(&env, &capture).await;
    assert_eq!(restored.len(), 1, "{restored:?}");
    assert_eq!(restored[0].0, format!("subscription.restored.{PAGE}"));
    assert_eq!(
        restored[0].1["data"]["lost_since"],
        lost[0].1["data"]["since"]
    );
    assert_eq!(restored[0].1["pageseq"], 2);
    let sql = env.sql().await;
    assert_eq!(
        lc_testkit::pipeline::count(
            &sql,
            "SELECT count(*) FROM page_state WHERE unsubscribed_since IS NOT NULL"
        )
        .await,
        0
    );
    relay.stop().await;
}

/// `loginconnect pages resume` announces what it lifted: the restriction and the throttle,
/// each `page.resumed` by `operator`; resuming a page with nothing to lift announces nothing.
#[tokio::test]
async fn an_operators_resume_announces_each_hold_it_lifted() {
    let env = TestEnv::new().await;
    let ops = env.capture_events(&["page.*.#"]).await;
    let pool = env.migrated_pool(2).await;
    let mut client = pool.get().await.expect("client");
    pages::ensure(&client, &[PAGE], 10).await.expect("page row");
    let relay = env.start_relay(&pool, env.worker_args().relay).await;
    assert!(
        pages::pause(
            &mut client,
            PAGE,
            pages::PauseReason::Restricted,
            None,
            "(#10) restricted"
        )
        .await
        .expect("pause")
    );
    pages::throttle(&mut client, PAGE, Duration::from_secs(600))
        .await
        .expect("throttle");
    assert!(pages::resume(&mut client, PAGE).await.expect("resume"));
    assert!(
        pages::resume(&mut client, PAGE)
            .await
            .expect("resume again")
    );
    let got = drained(&env, &ops).await;
    relay.stop().await;
    let seen: Vec<(String, &str, &str)> = got
        .iter()
        .map(|(k, e)| {
            (
                k.clone(),
                e["data"]["reason"].as_str().unwrap_or("-"),
                e["data"]["resumed_by"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    let (paused, resumed) = (
        format!("page.paused.{PAGE}"),
        format!("page.resumed.{PAGE}"),
    );
    assert_eq!(
        seen,
        vec![
            (paused.clone(), "restricted", "-"),
            (paused, "throttled", "-"),
            (resumed.clone(), "restricted", "operator"),
            (resumed, "throttled", "operator"),
        ]
    );
    assert!(
        pages::announce_throttle_ends(&mut client)
            .await
            .expect("ends")
            .is_empty(),
        "the lifted throttle's end is not announced again"
    );
}
