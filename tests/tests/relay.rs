//! The outbox relay against a real PostgreSQL and RabbitMQ: what it publishes and how, that
//! nothing is lost while the broker is away, that a lost mark republishes with the same id,
//! and that two relays on one database never publish a row twice.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::time::Duration;

use deadpool_postgres::Pool;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ExchangeKind};
use lc_shared::amqp::{BrokerLink, header_str};
use lc_shared::events::{FirstMessageSent, IdentityLinked, PublicEvent, insert_outbox};
use lc_shared::shutdown::Shutdown;
use lc_shared::topology::EVENTS_EXCHANGE;
use lc_testkit::contract::Contract;
use lc_testkit::harness::{TestDb, TestVhost, consume_n, take_all};
use lc_worker::relay::{self, OutboxDb, RelayMetrics};
use lc_worker::runtime::config::RelayArgs;
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

const CAPTURE: &str = "test.capture";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const WAIT: Duration = Duration::from_secs(20);

struct Env {
    vhost: TestVhost,
    db: TestDb,
    pool: Pool,
    contract: Contract,
}

impl Env {
    async fn new() -> Self {
        let vhost = TestVhost::create();
        let db = TestDb::create().await;
        let pool = lc_shared::db::pool(&db.url(), 8).expect("pool");
        lc_shared::db::migrate(&pool).await.expect("migrate");
        Self {
            vhost,
            db,
            pool,
            contract: Contract::load(),
        }
    }

    /// A connection of the test's own, with the capture queue bound to every event.
    async fn capture(&self) -> Connection {
        let conn = self.vhost.connect().await;
        bind_capture(&conn).await;
        conn
    }

    async fn start_relay(&self, args: RelayArgs) -> Relay {
        let link = BrokerLink::start(&self.vhost.url(), "relay-test", 2);
        link.wait_ready(WAIT).await.expect("broker ready");
        let metrics = RelayMetrics::unexported().expect("metrics");
        let shutdown = Shutdown::new();
        let db = OutboxDb::new(self.pool.clone(), &self.db.url()).expect("outbox db");
        let task = tokio::spawn(relay::run(
            db,
            link.clone(),
            args,
            metrics.clone(),
            shutdown.clone(),
        ));
        Relay {
            link,
            metrics,
            shutdown,
            task,
        }
    }

    async fn unpublished(&self) -> i64 {
        let client = self.pool.get().await.expect("client");
        client
            .query_one(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL",
                &[],
            )
            .await
            .expect("count")
            .get(0)
    }

    /// Waits (bounded) until the relay has marked every row: from then on, everything it
    /// published is confirmed, so `take_all` sees all of it.
    async fn wait_all_marked(&self) {
        eventually("every outbox row marked published", || async {
            self.unpublished().await == 0
        })
        .await;
    }
}

struct Relay {
    link: BrokerLink,
    metrics: RelayMetrics,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn stop(self) {
        self.shutdown.trigger();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("relay stops in time")
            .expect("relay task");
        self.link.close().await;
    }

    fn published_total(&self) -> u64 {
        ["identity.linked", "first_message.sent"]
            .iter()
            .map(|t| self.metrics.published.with_label_values(&[*t]).get())
            .sum()
    }
}

fn args(poll_ms: u64, batch: i64) -> RelayArgs {
    RelayArgs {
        relay_batch: batch,
        relay_poll_ms: poll_ms,
        relay_confirm_timeout_ms: 5000,
        outbox_retention_hours: 72,
    }
}

async fn bind_capture(conn: &Connection) {
    let ch = conn.create_channel().await.expect("channel");
    // Idempotent with the services' own declaration (same type and flags).
    ch.exchange_declare(
        EVENTS_EXCHANGE.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare exchange");
    ch.queue_declare(
        CAPTURE.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare capture queue");
    ch.queue_bind(
        CAPTURE.into(),
        EVENTS_EXCHANGE.into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind capture queue");
}

/// Polls `check` every 25 ms until it holds; panics after [`WAIT`]. Used only for state that
/// has no event to await (rows marked in the database, counters).
async fn eventually<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
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
    let env = Env::new().await;
    let relay = env.start_relay(args(200, 200)).await;
    let conn = env.capture().await;

    let mut events = Vec::new();
    for n in 0..6 {
        events.push(if n % 2 == 0 {
            linked("P1", n)
        } else {
            sent("P1", n)
        });
    }
    let traced = insert(&env.pool, &events[..3], Some(TRACEPARENT)).await;
    let untraced = insert(&env.pool, &events[3..], None).await;
    let ids: Vec<Uuid> = traced.iter().chain(&untraced).copied().collect();

    let got = consume_n(&conn, CAPTURE, ids.len(), WAIT).await;
    assert_eq!(got.len(), ids.len(), "every row published");
    let got_ids: Vec<String> = got.iter().map(message_id).collect();
    let want_ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    assert_eq!(
        got_ids, want_ids,
        "one page's events arrive in id (commit) order"
    );

    let client = env.pool.get().await.expect("client");
    for (i, (delivery, event)) in got.iter().zip(&events).enumerate() {
        let body = env.contract.check_delivery(delivery);
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
    env.wait_all_marked().await;
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
    eventually("outbox lag back to 0", || async {
        relay.metrics.lag_seconds.get() == 0.0
    })
    .await;
    assert!(take_all(&conn, CAPTURE).await.is_empty(), "nothing twice");
    relay.stop().await;
}

#[tokio::test]
async fn a_notification_wakes_the_relay_without_waiting_for_the_poll() {
    let env = Env::new().await;
    // A poll far beyond the wait: only LISTEN/NOTIFY can deliver in time.
    let relay = env.start_relay(args(600_000, 200)).await;
    let conn = env.capture().await;
    // Let the relay's first round and the LISTEN subscription happen, observably: the first
    // event is published either way (the subscription wakes a round).
    let first = insert(&env.pool, &[linked("P1", 1)], None).await;
    let got = consume_n(&conn, CAPTURE, 1, WAIT).await;
    assert_eq!(
        got.iter().map(message_id).collect::<Vec<_>>(),
        vec![first[0].to_string()]
    );
    for n in 2..5 {
        let ids = insert(&env.pool, &[linked("P1", n)], None).await;
        let got = consume_n(&conn, CAPTURE, 1, Duration::from_secs(10)).await;
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
    let env = Env::new().await;
    let relay = env.start_relay(args(100, 200)).await;
    let conn = env.capture().await;
    let before = insert(&env.pool, &[linked("P1", 0)], None).await;
    assert_eq!(consume_n(&conn, CAPTURE, 1, WAIT).await.len(), 1);
    env.wait_all_marked().await;
    drop(conn);

    env.vhost.delete_now();
    relay
        .link
        .wait_down(WAIT)
        .await
        .expect("the relay's link notices the broker is gone");
    let mut events: Vec<PublicEvent> = (1..=10).map(|n| linked("P1", n)).collect();
    events.extend((11..=20).map(|n| sent("P2", n)));
    let ids = insert(&env.pool, &events, Some(TRACEPARENT)).await;
    assert_eq!(env.unpublished().await, 20, "rows wait in the outbox");
    eventually("the lag gauge shows the backlog", || async {
        relay.metrics.lag_seconds.get() > 0.0
    })
    .await;

    // Hold the rows while the vhost comes back, so the relay cannot publish them before the
    // capture queue is bound again (events are not mandatory: unbound ones are dropped).
    let mut holder = env.pool.get().await.expect("client");
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
    let conn = env.capture().await;
    hold.rollback().await.expect("release rows");
    drop(holder);

    let got = consume_n(&conn, CAPTURE, ids.len(), Duration::from_secs(40)).await;
    assert_eq!(got.len(), ids.len(), "every row published after recovery");
    env.wait_all_marked().await;
    let extra = take_all(&conn, CAPTURE).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for d in got.iter().chain(&extra) {
        env.contract.check_delivery(d);
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
    let env = Env::new().await;
    let relay = env.start_relay(args(100, 200)).await;
    let conn = env.capture().await;
    let ids = insert(&env.pool, &[sent("P1", 1)], Some(TRACEPARENT)).await;
    let first = consume_n(&conn, CAPTURE, 1, WAIT).await;
    assert_eq!(first.len(), 1);
    env.wait_all_marked().await;

    // As if the process died after the broker's confirm but before the mark committed.
    let client = env.pool.get().await.expect("client");
    client
        .execute(
            "UPDATE outbox SET published_at = NULL WHERE event_id = $1",
            &[&ids[0]],
        )
        .await
        .expect("unmark");
    let second = consume_n(&conn, CAPTURE, 1, WAIT).await;
    assert_eq!(second.len(), 1, "the row is published again");
    assert_eq!(message_id(&second[0]), ids[0].to_string());
    assert_eq!(
        message_id(&first[0]),
        message_id(&second[0]),
        "same message_id"
    );
    assert_eq!(first[0].data, second[0].data, "same body");
    env.contract.check_delivery(&second[0]);
    env.wait_all_marked().await;
    relay.stop().await;
}

#[tokio::test]
async fn two_relays_on_one_database_publish_every_row_once() {
    let env = Env::new().await;
    let conn = {
        // The exchange must exist before the capture queue binds; a first link declares it.
        let warmup = BrokerLink::start(&env.vhost.url(), "warmup", 1);
        warmup.wait_ready(WAIT).await.expect("ready");
        let conn = env.capture().await;
        warmup.close().await;
        conn
    };
    // Small batches so that both relays keep claiming while the other publishes.
    let a = env.start_relay(args(50, 10)).await;
    let b = env.start_relay(args(50, 10)).await;

    let writers: Vec<_> = (0..8)
        .map(|w| {
            let pool = env.pool.clone();
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

    let got = consume_n(&conn, CAPTURE, ids.len(), Duration::from_secs(60)).await;
    env.wait_all_marked().await;
    let extra = take_all(&conn, CAPTURE).await;
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
        env.contract.check_delivery(d);
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn published_rows_past_the_retention_are_pruned() {
    let env = Env::new().await;
    let ids = insert(
        &env.pool,
        &[linked("P1", 1), linked("P1", 2), linked("P1", 3)],
        None,
    )
    .await;
    let client = env.pool.get().await.expect("client");
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
    let relay = env.start_relay(args(100, 200)).await;
    eventually("the old row is pruned", || async {
        relay.metrics.pruned.get() == 1
    })
    .await;
    env.wait_all_marked().await;
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
