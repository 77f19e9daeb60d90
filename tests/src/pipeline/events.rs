//! Watching what the services publish: capture queues bound to `loginconnect.events`, and
//! taking events off them as deliveries or as parsed CloudEvents.
//!
//! Each helper opens its own connection: a test may delete and recreate its vhost (broker
//! outage tests), which would leave a long-lived connection dead.

use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lc_shared::topology;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{TestEnv, WAIT, eventually};
use crate::harness::{consume_n, queue_depth, take_all};

impl TestEnv {
    /// Declares a queue bound to the public exchange for `routing_keys`, before anything is
    /// published, so the test sees every event (events are not mandatory: one published
    /// while no queue is bound is dropped). Returns the queue name.
    pub async fn capture_events(&self, routing_keys: &[&str]) -> String {
        let conn = self.vhost.connect().await;
        let ch = conn.create_channel().await.expect("channel");
        // Idempotent with the services' own declaration (same type and flags), so the
        // capture may come first.
        ch.exchange_declare(
            topology::EVENTS_EXCHANGE.into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("exchange");
        let name = format!("capture-{}", uuid::Uuid::new_v4().simple());
        ch.queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue");
        for key in routing_keys {
            ch.queue_bind(
                name.as_str().into(),
                topology::EVENTS_EXCHANGE.into(),
                (*key).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
        }
        let _ = conn.close(200, "done".into()).await;
        name
    }

    /// Awaits `n` events on the capture `queue` (at most [`WAIT`]) and parses each as
    /// CloudEvents JSON; returns fewer if they do not come (the test's count assertion
    /// then says so).
    pub async fn events(&self, queue: &str, n: usize) -> Vec<Value> {
        self.deliveries(queue, n, WAIT)
            .await
            .iter()
            .map(event_json)
            .collect()
    }

    /// Awaits `n` deliveries on `queue` for at most `timeout`, as they arrived (for tests
    /// that check AMQP properties and headers, or wait longer than [`WAIT`]).
    pub async fn deliveries(&self, queue: &str, n: usize, timeout: Duration) -> Vec<Delivery> {
        let conn = self.vhost.connect().await;
        let got = consume_n(&conn, queue, n, timeout).await;
        let _ = conn.close(200, "done".into()).await;
        got
    }

    /// Takes every message now on `queue`, without waiting.
    pub async fn take_all(&self, queue: &str) -> Vec<Delivery> {
        let conn = self.vhost.connect().await;
        let got = take_all(&conn, queue).await;
        let _ = conn.close(200, "done".into()).await;
        got
    }

    /// Every event still to come on the capture `queue`: waits until the outbox is fully
    /// published (from then on everything the relays sent is confirmed, so taking the queue
    /// empty sees it all), asserts each is of `kind` (routing key `<kind>.<page_id>`) and
    /// satisfies the contract, and returns their bodies.
    pub async fn remaining_events(&self, queue: &str, kind: &str) -> Vec<Value> {
        self.wait_outbox_published().await;
        self.take_all(queue)
            .await
            .iter()
            .map(|d| {
                let key = d.routing_key.as_str();
                let split = crate::contract::split_routing_key(key);
                assert_eq!(split.map(|(k, _)| k), Some(kind), "routing key {key}");
                self.contract().check_delivery(d)
            })
            .collect()
    }

    /// Outbox rows not yet published.
    pub async fn unpublished_outbox_rows(&self) -> i64 {
        unpublished(&self.sql().await).await
    }

    /// Waits (at most [`WAIT`]) until a relay has marked every outbox row published.
    pub async fn wait_outbox_published(&self) {
        let sql = self.sql().await;
        eventually(WAIT, "every outbox row marked published", || async {
            unpublished(&sql).await == 0
        })
        .await;
    }

    /// Messages ready on `queue`, 0 if it does not exist (a fresh connection each time: a
    /// passive declare of a missing queue closes its channel).
    pub async fn depth(&self, queue: &str) -> u32 {
        let conn = self.vhost.connect().await;
        let ch = conn.create_channel().await.expect("channel");
        let n = queue_depth(&ch, queue).await;
        let _ = conn.close(200, "done".into()).await;
        n
    }
}

async fn unpublished(sql: &tokio_postgres::Client) -> i64 {
    sql.query_one(
        "SELECT count(*) FROM outbox WHERE published_at IS NULL",
        &[],
    )
    .await
    .expect("count")
    .get(0)
}

/// The body of an event delivery, parsed as CloudEvents JSON.
pub fn event_json(delivery: &Delivery) -> Value {
    serde_json::from_slice(&delivery.data).expect("cloudevent json")
}

/// Parses an RFC 3339 string from event data (`None` for JSON null).
pub fn time_of(v: &Value) -> Option<OffsetDateTime> {
    v.as_str()
        .map(|s| OffsetDateTime::parse(s, &Rfc3339).expect("RFC 3339"))
}
