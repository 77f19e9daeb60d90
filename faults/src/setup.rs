//! The suite's own corner of the shared services: a RabbitMQ vhost and a PostgreSQL database,
//! created at start and removed at the end, and the operator commands the faults use.
//!
//! Every broker and database fault is aimed at this vhost or database only, because other
//! developers' tests run on the same broker and server at the same time. The two faults that
//! cannot be aimed (stopping the broker app, restarting the database server) are behind
//! explicit flags.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use lc_shared::topology;

/// RabbitMQ host and credentials (the vhost is appended).
pub fn amqp_base() -> String {
    std::env::var("TEST_AMQP_BASE").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into())
}

/// PostgreSQL server (the database name is appended).
pub fn postgres_base() -> String {
    std::env::var("TEST_POSTGRES_BASE")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// Runs `rabbitmqctl` with `args` and returns its standard output.
pub fn rabbitmqctl(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .context("cannot run rabbitmqctl (is RabbitMQ installed here?)")?;
    if !out.status.success() {
        bail!(
            "rabbitmqctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The suite's vhost and database.
pub struct Services {
    /// The vhost name.
    pub vhost: String,
    /// The database name.
    pub database: String,
    /// Keep both after the run (for inspection).
    pub keep: bool,
}

impl Services {
    /// Creates a fresh vhost (with permissions for `guest`) and an empty database.
    pub async fn create(keep: bool) -> anyhow::Result<Self> {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("faults_{}_{}", std::process::id(), &suffix[..8]);
        rabbitmqctl(&["add_vhost", &name])?;
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"])?;
        let services = Self {
            vhost: name.clone(),
            database: name,
            keep,
        };
        services
            .admin_sql(&format!("CREATE DATABASE \"{}\"", services.database))
            .await?;
        Ok(services)
    }

    /// AMQP URL of the vhost.
    pub fn amqp_url(&self) -> String {
        format!("{}/{}", amqp_base(), self.vhost)
    }

    /// URL of the database.
    pub fn database_url(&self) -> String {
        format!("{}/{}", postgres_base(), self.database)
    }

    /// One statement on the `postgres` maintenance database.
    async fn admin_sql(&self, statement: &str) -> anyhow::Result<u64> {
        let url = format!("{}/postgres", postgres_base());
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .context("cannot connect to PostgreSQL")?;
        let task = tokio::spawn(conn);
        let n = client.execute(statement, &[]).await;
        drop(client);
        task.abort();
        Ok(n?)
    }

    /// A fresh connection to the suite's database. Fresh each time on purpose: the database
    /// faults terminate every backend of this database, the suite's own included.
    pub async fn sql(&self) -> anyhow::Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.database_url(), tokio_postgres::NoTls)
            .await
            .context("cannot connect to the suite's database")?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// A plain AMQP connection to the vhost.
    pub async fn amqp(&self) -> anyhow::Result<Connection> {
        Connection::connect(&self.amqp_url(), ConnectionProperties::default())
            .await
            .context("cannot connect to the suite's vhost")
    }

    /// Declares a durable queue bound to every public event (`#`) before anything runs, so the
    /// suite sees each published event however often processes and connections die.
    pub async fn declare_capture(&self) -> anyhow::Result<String> {
        let conn = self.amqp().await?;
        let ch = conn.create_channel().await?;
        ch.exchange_declare(
            topology::EVENTS_EXCHANGE.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        let name = "faults.capture".to_owned();
        ch.queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        ch.queue_bind(
            name.as_str().into(),
            topology::EVENTS_EXCHANGE.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let _ = conn.close(200, "declared".into()).await;
        Ok(name)
    }

    /// Takes every message of `queue` (bodies), stopping once the queue is empty and nothing
    /// arrived for a second.
    pub async fn drain(&self, queue: &str) -> anyhow::Result<Vec<Vec<u8>>> {
        let conn = self.amqp().await?;
        let ch = conn.create_channel().await?;
        ch.basic_qos(1000, lapin::options::BasicQosOptions::default())
            .await?;
        let mut consumer = ch
            .basic_consume(
                queue.into(),
                "faults-drain".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let mut bodies = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(1), consumer.next()).await {
                Ok(Some(Ok(d))) => bodies.push(d.data),
                Ok(Some(Err(e))) => bail!("draining {queue}: {e}"),
                Ok(None) => break,
                Err(_) => {
                    if self.queue_messages(queue)? == 0 {
                        break;
                    }
                }
            }
        }
        let _ = conn.close(200, "drained".into()).await;
        Ok(bodies)
    }

    /// Messages in a queue of the vhost, ready and unacknowledged (0 if it does not exist).
    pub fn queue_messages(&self, queue: &str) -> anyhow::Result<u64> {
        Ok(self.queue_depths()?.get(queue).copied().unwrap_or(0))
    }

    /// Ready + unacknowledged messages of every queue of the vhost.
    pub fn queue_depths(&self) -> anyhow::Result<std::collections::HashMap<String, u64>> {
        let out = rabbitmqctl(&[
            "-q",
            "list_queues",
            "-p",
            &self.vhost,
            "name",
            "messages",
            "--no-table-headers",
        ])?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let mut parts = l.split_whitespace();
                let name = parts.next()?.to_owned();
                let n = parts.next()?.parse().ok()?;
                Some((name, n))
            })
            .collect())
    }

    /// Closes every broker connection of this vhost (never other vhosts': other developers'
    /// tests share the broker). Returns how many were closed.
    pub fn close_vhost_connections(&self) -> anyhow::Result<usize> {
        let out = rabbitmqctl(&[
            "-q",
            "list_connections",
            "pid",
            "vhost",
            "--no-table-headers",
        ])?;
        let mut closed = 0;
        for line in out.lines() {
            let mut parts = line.split('\t');
            let (Some(pid), Some(vhost)) = (parts.next(), parts.next()) else {
                continue;
            };
            if vhost.trim() == self.vhost {
                // A connection may close by itself between listing and closing: not an error.
                if rabbitmqctl(&["close_connection", pid.trim(), "fault test"]).is_ok() {
                    closed += 1;
                }
            }
        }
        Ok(closed)
    }

    /// Terminates every backend connected to this database (only this one). Returns how many.
    pub async fn terminate_backends(&self) -> anyhow::Result<u64> {
        let url = format!("{}/postgres", postgres_base());
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        let task = tokio::spawn(conn);
        let rows = client
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&self.database],
            )
            .await?;
        drop(client);
        task.abort();
        Ok(rows.len() as u64)
    }

    /// Removes the vhost and the database (unless `keep`).
    pub async fn remove(&self) {
        if self.keep {
            println!(
                "kept vhost {} and database {} for inspection",
                self.vhost, self.database
            );
            return;
        }
        let _ = rabbitmqctl(&["delete_vhost", &self.vhost]);
        let drop = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.database);
        if let Err(e) = self.admin_sql(&drop).await {
            eprintln!("could not drop database {}: {e}", self.database);
        }
    }
}

/// Stops and starts the RabbitMQ application (every vhost on the machine loses its
/// connections: only with `--broker-restart`).
pub async fn restart_broker(down_for: Duration) -> anyhow::Result<()> {
    rabbitmqctl(&["stop_app"])?;
    tokio::time::sleep(down_for).await;
    rabbitmqctl(&["start_app"])?;
    Ok(())
}

/// Restarts the PostgreSQL server (every database on the machine: only with `--db-restart`).
pub fn restart_database() -> anyhow::Result<()> {
    let versions = std::fs::read_dir("/etc/postgresql")
        .context("no /etc/postgresql: cannot find the cluster to restart")?;
    let mut names: Vec<String> = versions
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort_by_key(|v| v.parse::<u32>().unwrap_or(0));
    let Some(version) = names.last() else {
        bail!("no PostgreSQL cluster under /etc/postgresql");
    };
    let out = Command::new("pg_ctlcluster")
        .args([
            "--skip-systemctl-redirect",
            version,
            "main",
            "restart",
            "-m",
            "fast",
        ])
        .output()
        .context("cannot run pg_ctlcluster")?;
    if !out.status.success() {
        bail!(
            "pg_ctlcluster restart failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
