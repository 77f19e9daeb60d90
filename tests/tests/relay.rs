//! The outbox relay against a real PostgreSQL and RabbitMQ: what it publishes and how, that
//! nothing is lost while the broker is away, that a lost mark republishes with the same id,
//! and that two relays on one database never publish a row twice.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use deadpool_postgres::Pool;
use lc_shared::amqp::{BrokerLink, header_str};
use lc_shared::events::{FirstMessageSent, IdentityLinked, PublicEvent, insert_outbox};
use lc_testkit::harness::TestVhost;
use lc_testkit::pipeline::{TRACEPARENT, TestEnv, WAIT, eventually};
use lc_worker::runtime::config::RelayArgs;
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

/// A test's environment and a migrated pool on its database: the relay reads the outbox
/// through it, and the tests write and inspect rows with it.
async fn setup() -> (TestEnv, Pool) {
    let env = TestEnv::new().await;
    let pool = env.migrated_pool(8).await;
    (env, pool)
}

fn args(poll_ms: u64, batch: i64) -> RelayArgs {
    RelayArgs {
        relay_batch: batch,
        relay_poll_ms: poll_ms,
        relay_confirm_timeout_ms: 5000,
        outbox_retention_hours: 72,
    }
}

fn linked(page: &str, n: usize) -> PublicEvent {
    PublicEvent::IdentityLinked(IdentityLinked {
        page_id: page.into(),
        login_id: format!("L{n}"),
        psid: format!("P{n}"),
        linked_at: OffsetDateTime::now_utc(),
        opted_in_at: None,
        first_reply_mid: Some(format!("m_{n}")),
    })
}

fn sent(page: &str, n: usize) -> PublicEvent {
    PublicEvent::FirstMessageSent(FirstMessageSent {
        page_id: page.into(),
        login_id: format!("L{n}"),
        message_id: format!("m_sent_{n}"),
        sent_at: OffsetDateTime::now_utc(),
        attempts: 1,
    })
}

/// Writes each event in its own transaction, like the services do; returns the ids in order.
async fn insert(pool: &Pool, events: &[PublicEvent], traceparent: Option<&str>) -> Vec<Uuid> {
    let mut client = pool.get().await.expect("client");
    let mut ids = Vec::new();
    for event in events {
        let tx = client.transaction().await.expect("begin");
        ids.push(
            insert_outbox(&*tx, event, "/loginconnect/test", traceparent)
                .await
                .expect("insert outbox"),
        );
        tx.commit().await.expect("commit");
    }
    ids
}

fn message_id(d: &lapin::message::Delivery) -> String {
    d.properties
        .message_id()
        .as_ref()
        .map(|m| m.to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn publishes_rows_with_the_contract_properties_in_id_order_and_marks_them() {
    let (env, pool) = setup().await;
    let relay = env.start_relay(&pool, args(200, 200)).await;
    let capture = env.capture_events(&["#"]).await;

    let mut events = Vec::new();
    for n in 0..6 {
        events.push(if n % 2 == 0 {
            linked("P1", n)
        } else {
            sent("P1", n)
        });
    }
    let traced = insert(&pool, &events[..3], Some(TRACEPARENT)).await;
    let untraced = insert(&pool, &events[3..], None).await;
    let ids: Vec<Uuid> = traced.iter().chain(&untraced).copied().collect();

    let got = env.deliveries(&capture, ids.len(), WAIT).await;
    assert_eq!(got.len(), ids.len(), "every row published");
    let got_ids: Vec<String> = got.iter().map(message_id).collect();
    let want_ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    assert_eq!(
        got_ids, want_ids,
        "one page's events arrive in id (commit) order"
    );

    let client = pool.get().await.expect("client");
    for (i, (delivery, event)) in got.iter().zip(&events).enumerate() {
        let body = env.contract().check_delivery(delivery);
        assert_eq!(delivery.routing_key.as_str(), event.routing_key());
        let stored: Value = client
            .query_one(
                "SELECT cloudevent FROM outbox WHERE event_id = $1",
                &[&ids[i]],
            )
            .await
            .expect("row")
            .get(0);
        assert_eq!(body, stored, "the body is the stored CloudEvent");
        assert_eq!(body["data"], event.data());
        let tp = header_str(&delivery.properties, "traceparent");
        if i < 3 {
            assert_eq!(tp.as_deref(), Some(TRACEPARENT));
        } else {
            assert_eq!(tp, None, "no traceparent header without one on the row");
        }
    }
    env.wait_outbox_published().await;
    let published: Vec<Option<OffsetDateTime>> = client
        .query("SELECT published_at FROM outbox ORDER BY id", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(published.iter().all(Option::is_some));
    assert_eq!(relay.published_total(), 6);
    assert_eq!(
        relay
            .metrics
            .published
            .with_label_values(&["identity.linked"])
            .get(),
        3
    );
    eventually(WAIT, "outbox lag back to 0", || async {
        relay.metrics.lag_seconds.get() == 0.0
    })
    .await;
    assert!(env.take_all(&capture).await.is_empty(), "nothing twice");
    relay.stop().await;
}

#[tokio::test]
async fn a_notification_wakes_the_relay_without_waiting_for_the_poll() {
    let (env, pool) = setup().await;
    // A poll far beyond the wait: only LISTEN/NOTIFY can deliver in time.
    let relay = env.start_relay(&pool, args(600_000, 200)).await;
    let capture = env.capture_events(&["#"]).await;
    // Let the relay's first round and the LISTEN subscription happen, observably: the first
    // event is published either way (the subscription wakes a round).
    let first = insert(&pool, &[linked("P1", 1)], None).await;
    let got = env.deliveries(&capture, 1, WAIT).await;
    assert_eq!(
        got.iter().map(message_id).collect::<Vec<_>>(),
        vec![first[0].to_string()]
    );
    for n in 2..5 {
        let ids = insert(&pool, &[linked("P1", n)], None).await;
        let got = env.deliveries(&capture, 1, Duration::from_secs(10)).await;
        assert_eq!(
            got.iter().map(message_id).collect::<Vec<_>>(),
            vec![ids[0].to_string()],
            "published on the notification"
        );
    }
    relay.stop().await;
}

#[tokio::test]
async fn nothing_is_lost_while_the_broker_is_unavailable() {
    let (env, pool) = setup().await;
    let relay = env.start_relay(&pool, args(100, 200)).await;
    let capture = env.capture_events(&["#"]).await;
    let before = insert(&pool, &[linked("P1", 0)], None).await;
    assert_eq!(env.deliveries(&capture, 1, WAIT).await.len(), 1);
    env.wait_outbox_published().await;

    env.vhost.delete_now();
    relay
        .link
        .wait_down(WAIT)
        .await
        .expect("the relay's link notices the broker is gone");
    let mut events: Vec<PublicEvent> = (1..=10).map(|n| linked("P1", n)).collect();
    events.extend((11..=20).map(|n| sent("P2", n)));
    let ids = insert(&pool, &events, Some(TRACEPARENT)).await;
    assert_eq!(
        env.unpublished_outbox_rows().await,
        20,
        "rows wait in the outbox"
    );
    eventually(WAIT, "the lag gauge shows the backlog", || async {
        relay.metrics.lag_seconds.get() > 0.0
    })
    .await;

    // Hold the rows while the vhost comes back, so the relay cannot publish them before the
    // capture queue is bound again (events are not mandatory: unbound ones are dropped).
    let mut holder = pool.get().await.expect("client");
    let hold = holder.transaction().await.expect("begin");
    let held = hold
        .query(
            "SELECT id FROM outbox WHERE published_at IS NULL FOR UPDATE",
            &[],
        )
        .await
        .expect("lock rows");
    assert_eq!(held.len(), 20);
    TestVhost::create_named(&env.vhost.name);
    let capture = env.capture_events(&["#"]).await;
    hold.rollback().await.expect("release rows");
    drop(holder);

    let got = env
        .deliveries(&capture, ids.len(), Duration::from_secs(40))
        .await;
    assert_eq!(got.len(), ids.len(), "every row published after recovery");
    env.wait_outbox_published().await;
    let extra = env.take_all(&capture).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for d in got.iter().chain(&extra) {
        env.contract().check_delivery(d);
        *counts.entry(message_id(d)).or_default() += 1;
    }
    let want: BTreeSet<String> = ids.iter().map(Uuid::to_string).collect();
    assert_eq!(counts.keys().cloned().collect::<BTreeSet<_>>(), want);
    assert!(
        counts.values().all(|n| *n == 1),
        "each id exactly once: {counts:?}"
    );
    assert!(!want.contains(&before[0].to_string()));
    relay.stop().await;
}

#[tokio::test]
async fn a_lost_mark_republishes_with_the_same_message_id() {
    let (env, pool) = setup().await;
    let relay = env.start_relay(&pool, args(100, 200)).await;
    let capture = env.capture_events(&["#"]).await;
    let ids = insert(&pool, &[sent("P1", 1)], Some(TRACEPARENT)).await;
    let first = env.deliveries(&capture, 1, WAIT).await;
    assert_eq!(first.len(), 1);
    env.wait_outbox_published().await;

    // As if the process died after the broker's confirm but before the mark committed.
    let client = pool.get().await.expect("client");
    client
        .execute(
            "UPDATE outbox SET published_at = NULL WHERE event_id = $1",
            &[&ids[0]],
        )
        .await
        .expect("unmark");
    let second = env.deliveries(&capture, 1, WAIT).await;
    assert_eq!(second.len(), 1, "the row is published again");
    assert_eq!(message_id(&second[0]), ids[0].to_string());
    assert_eq!(
        message_id(&first[0]),
        message_id(&second[0]),
        "same message_id"
    );
    assert_eq!(first[0].data, second[0].data, "same body");
    env.contract().check_delivery(&second[0]);
    env.wait_outbox_published().await;
    relay.stop().await;
}

#[tokio::test]
async fn two_relays_on_one_database_publish_every_row_once() {
    let (env, pool) = setup().await;
    let capture = {
        // The exchange must exist before the capture queue binds; a first link declares it.
        let warmup = BrokerLink::start(env.vhost.url(), "warmup", 1);
        warmup.wait_ready(WAIT).await.expect("ready");
        let capture = env.capture_events(&["#"]).await;
        warmup.close().await;
        capture
    };
    // Small batches so that both relays keep claiming while the other publishes.
    let a = env.start_relay(&pool, args(50, 10)).await;
    let b = env.start_relay(&pool, args(50, 10)).await;

    let writers: Vec<_> = (0..8)
        .map(|w| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let events: Vec<PublicEvent> =
                    (0..50).map(|n| linked(&format!("P{w}"), n)).collect();
                insert(&pool, &events, None).await
            })
        })
        .collect();
    let mut ids = BTreeSet::new();
    for w in writers {
        ids.extend(w.await.expect("writer").iter().map(Uuid::to_string));
    }
    assert_eq!(ids.len(), 400);

    let got = env
        .deliveries(&capture, ids.len(), Duration::from_secs(60))
        .await;
    env.wait_outbox_published().await;
    let extra = env.take_all(&capture).await;
    let all: Vec<String> = got.iter().chain(&extra).map(message_id).collect();
    let distinct: BTreeSet<String> = all.iter().cloned().collect();
    assert_eq!(distinct, ids, "every row published");
    assert_eq!(all.len(), ids.len(), "and none twice");
    assert_eq!(
        a.published_total() + b.published_total(),
        400,
        "each row marked by exactly one relay"
    );
    for d in got.iter().take(5) {
        env.contract().check_delivery(d);
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn published_rows_past_the_retention_are_pruned() {
    let (env, pool) = setup().await;
    let ids = insert(
        &pool,
        &[linked("P1", 1), linked("P1", 2), linked("P1", 3)],
        None,
    )
    .await;
    let client = pool.get().await.expect("client");
    // Old and published, recent and published, unpublished: only the first may go.
    client
        .execute(
            "UPDATE outbox SET published_at = now() - interval '100 hours' WHERE event_id = $1",
            &[&ids[0]],
        )
        .await
        .expect("age");
    client
        .execute(
            "UPDATE outbox SET published_at = now() WHERE event_id = $1",
            &[&ids[1]],
        )
        .await
        .expect("mark");
    let relay = env.start_relay(&pool, args(100, 200)).await;
    eventually(WAIT, "the old row is pruned", || async {
        relay.metrics.pruned.get() == 1
    })
    .await;
    env.wait_outbox_published().await;
    let left: Vec<Uuid> = client
        .query("SELECT event_id FROM outbox ORDER BY id", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, ids[1..].to_vec());
    relay.stop().await;
}
