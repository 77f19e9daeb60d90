//! The relay's per-message outcomes and per-person order against a real PostgreSQL and
//! RabbitMQ: a full downstream queue (`x-overflow=reject-publish`) delays only the events
//! routed to it, a person's later event never overtakes an earlier one that is still waiting,
//! and `personseq` follows the commit order of a person's events even when the transaction
//! with the lower row id commits last.

use deadpool_postgres::Pool;
use lapin::options::{
    BasicPublishOptions, QueueBindOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lc_shared::events::{
    FirstMessageSent, IdentityDeleted, IdentityLinked, PublicEvent, insert_outbox,
};
use lc_shared::topology;
use lc_testkit::pipeline::{TestEnv, WAIT, event_json, eventually};
use lc_worker::runtime::config::RelayArgs;
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

const PAGE: &str = "P1";

async fn setup() -> (TestEnv, Pool) {
    let env = TestEnv::new().await;
    let pool = env.migrated_pool(8).await;
    (env, pool)
}

fn args() -> RelayArgs {
    RelayArgs {
        relay_batch: 200,
        relay_poll_ms: 100,
        relay_confirm_timeout_ms: 5000,
        outbox_retention_hours: 72,
    }
}

fn linked(login: &str) -> PublicEvent {
    PublicEvent::IdentityLinked(IdentityLinked {
        page_id: PAGE.into(),
        login_id: login.into(),
        psid: format!("psid-{login}"),
        linked_at: OffsetDateTime::now_utc(),
        opted_in_at: None,
        first_reply_mid: None,
    })
}

fn deleted(login: &str) -> PublicEvent {
    PublicEvent::IdentityDeleted(IdentityDeleted {
        page_id: PAGE.into(),
        login_id: login.into(),
        psid: Some(format!("psid-{login}")),
        deleted_at: OffsetDateTime::now_utc(),
        confirmation_code: format!("code-{login}"),
    })
}

fn sent(login: &str) -> PublicEvent {
    PublicEvent::FirstMessageSent(FirstMessageSent {
        page_id: PAGE.into(),
        login_id: login.into(),
        message_id: format!("m-{login}"),
        sent_at: OffsetDateTime::now_utc(),
        attempts: 1,
    })
}

/// Writes each event in its own committed transaction; returns the ids.
async fn insert(pool: &Pool, events: &[PublicEvent]) -> Vec<Uuid> {
    let mut client = pool.get().await.expect("client");
    let mut ids = Vec::new();
    for event in events {
        let tx = client.transaction().await.expect("begin");
        ids.push(
            insert_outbox(&*tx, event, "/loginconnect/test", None)
                .await
                .expect("insert"),
        );
        tx.commit().await.expect("commit");
    }
    ids
}

/// A downstream consumer's queue bound to `routing_key` that holds one message and refuses
/// more (`x-overflow=reject-publish`), already full. Returns its name.
async fn full_queue(env: &TestEnv, routing_key: &str) -> String {
    let conn = env.vhost.connect().await;
    let ch = conn.create_channel().await.expect("channel");
    let name = format!("full-{}", Uuid::new_v4().simple());
    let mut args = FieldTable::default();
    args.insert(ShortString::from("x-max-length"), AMQPValue::LongLongInt(1));
    args.insert(
        ShortString::from("x-overflow"),
        AMQPValue::LongString("reject-publish".into()),
    );
    ch.queue_declare(
        name.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("declare");
    ch.basic_publish(
        "".into(),
        name.as_str().into(),
        BasicPublishOptions::default(),
        b"filler",
        lapin::BasicProperties::default(),
    )
    .await
    .expect("fill");
    ch.queue_bind(
        name.as_str().into(),
        topology::EVENTS_EXCHANGE.into(),
        routing_key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    eventually(WAIT, "the filler is in the queue", || async {
        env.depth(&name).await == 1
    })
    .await;
    let _ = conn.close(200, "done".into()).await;
    name
}

async fn purge(env: &TestEnv, queue: &str) {
    let conn = env.vhost.connect().await;
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_purge(queue.into(), QueuePurgeOptions::default())
        .await
        .expect("purge");
    let _ = conn.close(200, "done".into()).await;
}

async fn published(pool: &Pool, id: &Uuid) -> Option<OffsetDateTime> {
    let client = pool.get().await.expect("client");
    client
        .query_one("SELECT published_at FROM outbox WHERE event_id = $1", &[id])
        .await
        .expect("row")
        .get(0)
}

fn ids_of(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn a_full_downstream_queue_delays_only_its_own_events() {
    let (env, pool) = setup().await;
    let capture = env.capture_events(&["first_message.*.#"]).await;
    let full = full_queue(&env, "identity.linked.#").await;
    let relay = env.start_relay(&pool, args()).await;

    let refused = insert(&pool, &[linked("A")]).await;
    let others = insert(&pool, &[sent("B"), sent("C"), sent("D")]).await;
    let got = env.events(&capture, others.len()).await;
    assert_eq!(
        ids_of(&got),
        others.iter().map(Uuid::to_string).collect::<Vec<_>>(),
        "the other events are published while identity.linked is refused"
    );
    for id in &others {
        eventually(WAIT, "the other events are marked published", || async {
            published(&pool, id).await.is_some()
        })
        .await;
    }
    eventually(
        WAIT,
        "the refusal is counted under its routing key",
        || async {
            relay
                .metrics
                .nacked
                .with_label_values(&["identity.linked"])
                .get()
                >= 1
        },
    )
    .await;
    assert_eq!(published(&pool, &refused[0]).await, None);
    let client = pool.get().await.expect("client");
    let row = client
        .query_one(
            "SELECT attempts, last_error, next_attempt_at > now() - interval '1 minute' \
             FROM outbox WHERE event_id = $1",
            &[&refused[0]],
        )
        .await
        .expect("row");
    assert!(
        row.get::<_, i32>(0) >= 1,
        "the refusal is recorded on the row"
    );
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("nacked"));
    assert!(row.get::<_, bool>(2), "with a backoff");

    // The consumer catches up: the waiting event goes out on its next attempt.
    purge(&env, &full).await;
    env.wait_outbox_published().await;
    let delivered = env.take_all(&full).await;
    assert_eq!(delivered.len(), 1);
    assert_eq!(event_json(&delivered[0])["id"], refused[0].to_string());
    relay.stop().await;
}

#[tokio::test]
async fn a_persons_deletion_waits_for_their_refused_link() {
    let (env, pool) = setup().await;
    let capture = env.capture_events(&["identity.deleted.#"]).await;
    let full = full_queue(&env, "identity.linked.#").await;
    let relay = env.start_relay(&pool, args()).await;

    let a = insert(&pool, &[linked("A"), deleted("A")]).await;
    let b = insert(&pool, &[deleted("B")]).await;
    // B's deletion is published: the relay is running and not stuck behind A.
    let got = env.events(&capture, 1).await;
    assert_eq!(ids_of(&got), vec![b[0].to_string()]);
    eventually(WAIT, "A's link was refused at least twice", || async {
        relay
            .metrics
            .nacked
            .with_label_values(&["identity.linked"])
            .get()
            >= 2
    })
    .await;
    assert!(
        env.take_all(&capture).await.is_empty(),
        "A's deletion must not overtake A's link"
    );
    assert_eq!(published(&pool, &a[1]).await, None);

    purge(&env, &full).await;
    let got = env.events(&capture, 1).await;
    assert_eq!(ids_of(&got), vec![a[1].to_string()]);
    assert_eq!(got[0]["personseq"], 2, "the deletion is A's second event");
    // The message is on the queue once confirmed, a moment before the relay's mark commits.
    env.wait_outbox_published().await;
    let link_at = published(&pool, &a[0]).await.expect("link published");
    let delete_at = published(&pool, &a[1]).await.expect("deletion published");
    assert!(
        link_at < delete_at,
        "published after the link was confirmed"
    );
    let linked_events = env.take_all(&full).await;
    assert_eq!(linked_events.len(), 1);
    assert_eq!(event_json(&linked_events[0])["personseq"], 1);
    relay.stop().await;
}

#[tokio::test]
async fn personseq_follows_commit_order_when_the_lower_id_commits_last() {
    let (env, pool) = setup().await;
    let capture = env.capture_events(&["identity.*.#"]).await;
    let relay = env.start_relay(&pool, args()).await;

    // The link's transaction writes first (lower row id) but commits last.
    let mut first = pool.get().await.expect("client");
    let link_tx = first.transaction().await.expect("begin");
    let link_id = insert_outbox(&*link_tx, &linked("A"), "/loginconnect/test", None)
        .await
        .expect("insert link");
    let writer = {
        let pool = pool.clone();
        tokio::spawn(async move { insert(&pool, &[deleted("A")]).await })
    };
    // The deletion's transaction must wait for the link's: that is what puts the two in
    // commit order. Without it the deletion commits now and is published alone.
    let sql = env.sql().await;
    eventually(WAIT, "the second writer waits for the first", || async {
        let waiting: i64 = sql
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                 AND query LIKE '%outbox%'",
                &[],
            )
            .await
            .expect("activity")
            .get(0);
        waiting == 1
    })
    .await;
    link_tx.commit().await.expect("commit link");
    let delete_id = writer.await.expect("writer")[0];

    let got = env.events(&capture, 2).await;
    assert_eq!(
        ids_of(&got),
        vec![link_id.to_string(), delete_id.to_string()],
        "published in commit order"
    );
    assert_eq!(got[0]["personseq"], 1);
    assert_eq!(got[1]["personseq"], 2);
    for e in &got {
        assert_eq!(e["data"]["login_id"], "A");
    }
    relay.stop().await;
    drop(first);
}
