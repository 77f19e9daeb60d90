//! Isolated test environments on the real local services.
//!
//! Every test gets its own RabbitMQ vhost and its own PostgreSQL database, created here and
//! removed when the guard drops (also when the test panics), so tests run in parallel and
//! leave nothing behind.

use std::process::Command;
use std::time::Duration;

use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};

/// RabbitMQ host and credentials the tests use (the vhost is appended per test).
pub fn amqp_base() -> String {
    std::env::var("TEST_AMQP_BASE").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into())
}

/// PostgreSQL server the tests use (the database name is appended per test).
pub fn postgres_base() -> String {
    std::env::var("TEST_POSTGRES_BASE")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// A short random name usable for vhosts and databases.
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        uuid::Uuid::new_v4()
            .simple()
            .to_string()
            .get(..12)
            .unwrap_or("x")
    )
}

fn rabbitmqctl(args: &[&str]) -> Result<(), String> {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run rabbitmqctl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "rabbitmqctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A RabbitMQ vhost of one test; deleted on drop.
pub struct TestVhost {
    /// The vhost name.
    pub name: String,
}

impl TestVhost {
    /// Creates a fresh vhost with full permissions for `guest`.
    pub fn create() -> Self {
        let name = unique_name("lc");
        Self::create_named(&name);
        Self { name }
    }

    /// (Re)creates a vhost with this name (used to bring a deleted one back).
    pub fn create_named(name: &str) {
        rabbitmqctl(&["add_vhost", name]).unwrap_or_else(|e| panic!("{e}"));
        rabbitmqctl(&["set_permissions", "-p", name, "guest", ".*", ".*", ".*"])
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Deletes the vhost now (its connections are closed by the broker).
    pub fn delete_now(&self) {
        let _ = rabbitmqctl(&["delete_vhost", &self.name]);
    }

    /// AMQP URL of this vhost.
    pub fn url(&self) -> String {
        format!("{}/{}", amqp_base(), self.name)
    }

    /// A plain connection to the vhost for assertions.
    pub async fn connect(&self) -> Connection {
        Connection::connect(&self.url(), ConnectionProperties::default())
            .await
            .expect("connect to test vhost")
    }
}

impl Drop for TestVhost {
    fn drop(&mut self) {
        self.delete_now();
    }
}

/// A PostgreSQL database of one test; dropped on drop.
pub struct TestDb {
    /// The database name.
    pub name: String,
}

impl TestDb {
    /// Creates an empty database.
    pub async fn create() -> Self {
        let name = unique_name("lc");
        let (client, conn) = tokio_postgres::connect(
            &format!("{}/postgres", postgres_base()),
            tokio_postgres::NoTls,
        )
        .await
        .expect("connect to PostgreSQL");
        let task = tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("create test database");
        drop(client);
        task.abort();
        Self { name }
    }

    /// URL of this database.
    pub fn url(&self) -> String {
        format!("{}/{}", postgres_base(), self.name)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let url = format!("{}/postgres", postgres_base());
        let _ = Command::new("psql")
            .args([
                url.as_str(),
                "-q",
                "-c",
                &format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name),
            ])
            .output();
    }
}

/// Number of messages ready in a queue (0 if the queue does not exist).
pub async fn queue_depth(channel: &Channel, queue: &str) -> u32 {
    match channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
    {
        Ok(q) => q.message_count(),
        Err(_) => 0,
    }
}

/// Takes every message currently on `queue` (without waiting), in queue order. Messages the
/// broker confirmed are already enqueued, so this sees everything a confirmed publisher sent.
pub async fn take_all(conn: &Connection, queue: &str) -> Vec<lapin::message::Delivery> {
    let channel = conn.create_channel().await.expect("channel");
    let mut got = Vec::new();
    loop {
        match channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
        {
            Ok(Some(msg)) => got.push(msg.delivery),
            Ok(None) => return got,
            Err(e) => panic!("basic_get on {queue}: {e}"),
        }
    }
}

/// Awaits `n` deliveries on `queue` from a consumer (for asynchronous producers such as the
/// outbox relay); returns what arrived if `timeout` passes first.
pub async fn consume_n(
    conn: &Connection,
    queue: &str,
    n: usize,
    timeout: Duration,
) -> Vec<lapin::message::Delivery> {
    use futures_util::StreamExt;
    let channel = conn.create_channel().await.expect("channel");
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while got.len() < n {
        match tokio::time::timeout_at(deadline, consumer.next()).await {
            Ok(Some(Ok(d))) => got.push(d),
            Ok(Some(Err(e))) => panic!("consumer on {queue}: {e}"),
            Ok(None) | Err(_) => break,
        }
    }
    let _ = channel.close(200, "done".into()).await;
    got
}
