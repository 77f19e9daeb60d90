//! Tenant-scoped events (issue 16): routing keys carry the page (`<kind>.<page_id>`), so a
//! consumer bound to one page's keys sees only that page's events, while `<kind>.#` sees
//! every page's (and, for the migration, the old page-less key too); every event carries
//! `pageid` and `appid`; rows an older version wrote are published under the new key.

use std::collections::BTreeSet;

use lc_shared::events::{FirstMessageSent, PublicEvent, insert_outbox};
use lc_testkit::pipeline::{
    FIRST_TEXT, PAGE, PAGE_TOKEN, TestEnv, WAIT, body, eventually, optin_item, post_signed,
    text_reply_item,
};
use serde_json::{Value, json};
use time::OffsetDateTime;

const PAGE_B: &str = "2234567890";
const TOKEN_B: &str = "EAAG-test-page-b";

/// Writes a pages file with [`PAGE`] and [`PAGE_B`], both known to the fake Graph.
fn write_two_pages(env: &TestEnv) {
    let text = format!(
        "[[pages]]\nid = \"{PAGE}\"\naccess_token = \"{PAGE_TOKEN}\"\n[pages.first_message]\ntext = \"{FIRST_TEXT}\"\n\n\
         [[pages]]\nid = \"{PAGE_B}\"\naccess_token = \"{TOKEN_B}\"\n[pages.first_message]\ntext = \"{FIRST_TEXT}\"\n"
    );
    std::fs::write(&env.pages_file, text).expect("pages file");
    env.graph.add_page(PAGE_B, TOKEN_B);
}

/// Every event on `queue` once the outbox is published, checked against the contract, as
/// (routing key, body).
async fn drained(env: &TestEnv, queue: &str) -> Vec<(String, Value)> {
    env.wait_outbox_published().await;
    env.take_all(queue)
        .await
        .iter()
        .map(|d| (d.routing_key.to_string(), env.contract().check_delivery(d)))
        .collect()
}

fn keys(events: &[(String, Value)]) -> BTreeSet<String> {
    events.iter().map(|(k, _)| k.clone()).collect()
}

#[tokio::test]
async fn a_consumer_bound_to_one_page_sees_only_that_pages_events() {
    let env = TestEnv::new().await;
    write_two_pages(&env);
    // Bound before anything is published (events are not mandatory).
    let one_page = env.capture_events(&[&format!("*.*.{PAGE}")]).await;
    let one_page_hash = env.capture_events(&[&format!("#.{PAGE}")]).await;
    let sent_of_b = env
        .capture_events(&[&format!("first_message.sent.{PAGE_B}")])
        .await;
    let sent_of_all = env.capture_events(&["first_message.sent.#"]).await;
    let old_exact_key = env
        .capture_events(&["first_message.sent", "identity.linked"])
        .await;
    let mut p = env
        .pipeline()
        .scheduler(env.scheduler_config())
        .correlator()
        .start()
        .await;

    let now = OffsetDateTime::now_utc();
    for (page, login_id) in [(PAGE, "LA"), (PAGE_B, "LB")] {
        let status =
            post_signed(&p.ingest, body(page, vec![optin_item(page, login_id, now)])).await;
        assert_eq!(status, 200);
    }
    env.graph
        .wait_for_send_calls(2, WAIT)
        .await
        .expect("both pages sent");
    let sql = env.sql().await;
    eventually(WAIT, "both opt-ins sent", || async {
        lc_testkit::pipeline::count(&sql, "SELECT count(*) FROM optins WHERE state = 'sent'").await
            == 2
    })
    .await;
    // The person of PAGE replies: identity.linked for PAGE only.
    p.deliver(vec![text_reply_item(PAGE, "PSID_A", "m_a", "LA", now)])
        .await;
    p.wait_processed(1).await;

    let mine = drained(&env, &one_page).await;
    assert_eq!(
        keys(&mine),
        BTreeSet::from([
            format!("first_message.sent.{PAGE}"),
            format!("identity.linked.{PAGE}"),
        ]),
        "one page's binding sees that page's events, of every kind, and nothing else"
    );
    for (_, ev) in &mine {
        assert_eq!(ev["pageid"], PAGE);
        assert_eq!(ev["data"]["page_id"], PAGE);
        assert_eq!(ev["appid"], "default", "no META_APP_ID given");
    }
    let mine_by_hash = drained(&env, &one_page_hash).await;
    assert_eq!(keys(&mine_by_hash), keys(&mine), "#.<page> binds the same");

    let b = drained(&env, &sent_of_b).await;
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].0, format!("first_message.sent.{PAGE_B}"));
    assert_eq!(b[0].1["pageid"], PAGE_B);
    assert_eq!(b[0].1["data"]["login_id"], "LB");

    let all = drained(&env, &sent_of_all).await;
    assert_eq!(
        keys(&all),
        BTreeSet::from([
            format!("first_message.sent.{PAGE}"),
            format!("first_message.sent.{PAGE_B}"),
        ])
    );
    assert!(
        drained(&env, &old_exact_key).await.is_empty(),
        "a binding of a 1.x exact key sees none of the new keys"
    );
    p.stop().await;
}

/// The migration path the README describes: `first_message.sent.#` matches the old key
/// (`#` matches zero words) and the new one, so a consumer adds it before the upgrade.
#[tokio::test]
async fn a_hash_binding_matches_the_old_and_the_new_routing_key() {
    let env = TestEnv::new().await;
    let queue = env.capture_events(&["first_message.sent.#"]).await;
    let conn = env.vhost.connect().await;
    let ch = conn.create_channel().await.expect("channel");
    for key in [
        "first_message.sent",
        "first_message.sent.123",
        "first_message.failed.123",
    ] {
        ch.basic_publish(
            lc_shared::topology::EVENTS_EXCHANGE.into(),
            key.into(),
            lapin::options::BasicPublishOptions::default(),
            key.as_bytes(),
            lapin::BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    }
    let got = env.deliveries(&queue, 2, WAIT).await;
    let got: Vec<String> = got.iter().map(|d| d.routing_key.to_string()).collect();
    assert_eq!(got, ["first_message.sent", "first_message.sent.123"]);
    assert!(env.take_all(&queue).await.is_empty(), "nothing else");
    let _ = conn.close(200, "done".into()).await;
}

/// A row written by a version before tenant-scoped events (routing key column without the
/// page, no `pageid`/`appid`, no person order) is published under `<kind>.<page_id>` with
/// both attributes added; the app id the scheduler recorded from META_APP_ID is `appid`, for
/// new rows as for old ones.
#[tokio::test]
async fn rows_an_older_version_wrote_are_published_under_the_new_key() {
    let env = TestEnv::new().await;
    let pool = env.migrated_pool(2).await;
    let capture = env.capture_events(&["#"]).await;
    let client = pool.get().await.expect("client");
    lc_worker::scheduler::store::pages::set_meta_app_id(&client, "1029384756")
        .await
        .expect("app id");
    let old_id = uuid::Uuid::now_v7();
    let old = json!({
        "specversion": "1.0", "id": old_id.to_string(), "source": "/loginconnect/scheduler",
        "type": "com.loginconnect.first_message.sent", "time": "2023-11-14T22:10:01.500Z",
        "datacontenttype": "application/json", "subject": PAGE,
        "data": {"page_id": PAGE, "login_id": "OLD", "message_id": "m_old",
                 "sent_at": "2023-11-14T22:10:01.480Z", "attempts": 1}
    });
    client
        .execute(
            "INSERT INTO outbox (event_id, event_type, page_id, cloudevent) \
             VALUES ($1, 'first_message.sent', $2, $3)",
            &[&old_id, &PAGE, &old],
        )
        .await
        .expect("old row");
    let new = PublicEvent::FirstMessageSent(FirstMessageSent {
        page_id: PAGE_B.into(),
        login_id: "NEW".into(),
        message_id: "m_new".into(),
        sent_at: OffsetDateTime::now_utc(),
        attempts: 1,
    });
    insert_outbox(&**client, &new, "/loginconnect/test", None)
        .await
        .expect("new row");

    let relay = env.start_relay(&pool, env.worker_args().relay).await;
    let got = drained(&env, &capture).await;
    relay.stop().await;
    assert_eq!(got.len(), 2);
    let (old_key, old_ev) = got
        .iter()
        .find(|(_, e)| e["data"]["login_id"] == "OLD")
        .expect("old row published");
    assert_eq!(old_key, &format!("first_message.sent.{PAGE}"));
    assert_eq!(old_ev["pageid"], PAGE);
    assert_eq!(old_ev["appid"], "1029384756");
    assert_eq!(old_ev["id"], old_id.to_string(), "same event id");
    let (new_key, new_ev) = got
        .iter()
        .find(|(_, e)| e["data"]["login_id"] == "NEW")
        .expect("new row published");
    assert_eq!(new_key, &format!("first_message.sent.{PAGE_B}"));
    assert_eq!(new_ev["pageid"], PAGE_B);
    assert_eq!(new_ev["appid"], "1029384756");
    assert_eq!(new_ev["personseq"], 1);
}
