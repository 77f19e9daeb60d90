//! The suite's own corner of the services: a RabbitMQ vhost and a PostgreSQL database,
//! created at start and removed at the end, and the operator commands the faults use.
//!
//! By default the suite starts a private RabbitMQ node and PostgreSQL cluster (see
//! [`crate::private`]) and works there, so every fault, the broker stop/start and the
//! database server restart included, hits only the suite. With `--services shared` it uses
//! the machine's broker and server instead; every fault is then aimed at its own vhost or
//! database, because other developers' tests run there at the same time, and the two faults
//! that cannot be aimed are left out.

use std::path::PathBuf;
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

use lc_testkit::private::{PrivateBroker, PrivateCluster};

/// The machine's RabbitMQ host and credentials (the vhost is appended).
fn shared_amqp_base() -> String {
    std::env::var("TEST_AMQP_BASE").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into())
}

/// The machine's PostgreSQL server (the database name is appended).
fn shared_postgres_base() -> String {
    std::env::var("TEST_POSTGRES_BASE")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// Runs the machine's `rabbitmqctl` with `args` and returns its standard output.
fn rabbitmqctl(args: &[&str]) -> anyhow::Result<String> {
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

/// Splits `postgres://user@host:port[/…]` into what comes before `host:port` and
/// `host:port` itself.
fn split_authority(url: &str) -> anyhow::Result<(&str, &str)> {
    let scheme_end = url
        .find("://")
        .map(|i| i + 3)
        .with_context(|| format!("not a URL: {url}"))?;
    let authority_end = url[scheme_end..]
        .find(['/', '?'])
        .map_or(url.len(), |i| scheme_end + i);
    let host_start = url[scheme_end..authority_end]
        .rfind('@')
        .map_or(scheme_end, |i| scheme_end + i + 1);
    Ok((&url[..host_start], &url[host_start..authority_end]))
}

/// The suite's vhost and database, on private or shared services.
pub struct Services {
    /// The vhost name.
    pub vhost: String,
    /// The database name.
    pub database: String,
    /// Keep both after the run (for inspection).
    pub keep: bool,
    /// The suite's own broker node, if it runs one (the first node of a cluster).
    broker: Option<PrivateBroker>,
    /// The other nodes of the suite's broker cluster (`--cluster`; empty otherwise).
    peers: Vec<PrivateBroker>,
    /// The suite's own PostgreSQL cluster, if it runs one.
    cluster: Option<PrivateCluster>,
    /// Its streaming standby, in the `--db-failover` mode (see [`crate::failover`]): every
    /// URL then names both servers, the standby first.
    standby: Option<PrivateCluster>,
    /// The proxy the standby's WAL stream goes through (asynchronous replication only).
    replication_proxy: Option<crate::dbproxy::LatencyProxy>,
    /// Folder of the private services' files.
    private_dir: Option<PathBuf>,
}

impl Services {
    /// Creates a fresh vhost (with permissions for `guest`) and an empty database, on a
    /// broker node and a database cluster of the suite's own when `private` (a cluster of
    /// `broker_nodes` RabbitMQ nodes when more than one).
    pub async fn create(keep: bool, private: bool, broker_nodes: usize) -> anyhow::Result<Self> {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("faults_{}_{}", std::process::id(), &suffix[..8]);
        let mut services = Self {
            vhost: name.clone(),
            database: name.clone(),
            keep,
            broker: None,
            peers: Vec::new(),
            cluster: None,
            standby: None,
            replication_proxy: None,
            private_dir: None,
        };
        if private {
            let dir = std::env::temp_dir().join(format!("lc-{name}"));
            services.private_dir = Some(dir.clone());
            // Set before starting, so a failed start still stops what did start.
            services.cluster = Some(PrivateCluster::start(&dir)?);
            if broker_nodes > 1 {
                let mut nodes = PrivateBroker::start_cluster(&dir, &name, broker_nodes).await?;
                services.broker = Some(nodes.remove(0));
                services.peers = nodes;
            } else {
                services.broker = Some(PrivateBroker::start(&dir, &name).await?);
            }
        }
        services.ctl(&["add_vhost", &name])?;
        services.ctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"])?;
        services
            .admin_sql(&format!("CREATE DATABASE \"{}\"", services.database))
            .await?;
        Ok(services)
    }

    /// Where the services run, for the report.
    pub fn describe(&self) -> String {
        match (&self.broker, &self.cluster) {
            (Some(b), Some(c)) if !self.peers.is_empty() => format!(
                "private RabbitMQ cluster {} and PostgreSQL cluster (port {})",
                self.broker_nodes()
                    .iter()
                    .map(|n| format!("{} (port {})", n.node, n.port))
                    .collect::<Vec<_>>()
                    .join(", "),
                c.port
            ),
            (Some(b), Some(c)) => format!(
                "private RabbitMQ node {} (port {}) and PostgreSQL cluster (port {}{})",
                b.node,
                b.port,
                c.port,
                self.standby.as_ref().map_or(String::new(), |s| format!(
                    ", {} standby on port {}",
                    self.replication_proxy
                        .as_ref()
                        .map_or("synchronous".into(), |p| format!(
                            "ASYNCHRONOUS (WAL stream delayed {:?} per chunk)",
                            p.delay()
                        )),
                    s.port
                ))
            ),
            _ => "the machine's RabbitMQ and PostgreSQL (shared)".into(),
        }
    }

    /// Whether the broker and the database server are the suite's own (restarts allowed).
    pub fn is_private(&self) -> bool {
        self.broker.is_some() && self.cluster.is_some()
    }

    /// The suite's private broker nodes (the first, then its cluster peers).
    pub fn broker_nodes(&self) -> Vec<&PrivateBroker> {
        self.broker.iter().chain(&self.peers).collect()
    }

    /// `rabbitmqctl` against the suite's broker: on a cluster, the first node that answers
    /// (one may be down on purpose).
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let Some(first) = &self.broker else {
            return rabbitmqctl(args);
        };
        let mut result = first.ctl(args);
        for peer in &self.peers {
            if result.is_ok() {
                break;
            }
            result = peer.ctl(args);
        }
        result
    }

    fn amqp_base(&self) -> String {
        self.broker
            .as_ref()
            .map_or_else(shared_amqp_base, PrivateBroker::amqp_base)
    }

    fn postgres_base(&self) -> String {
        self.cluster
            .as_ref()
            .map_or_else(shared_postgres_base, PrivateCluster::postgres_base)
    }

    /// URL of database `db`: with a standby, both servers (standby first) and
    /// `target_session_attrs=read-write`, so whichever is the primary is found.
    fn postgres_url(&self, db: &str) -> String {
        match (&self.standby, &self.cluster) {
            (Some(standby), Some(primary)) => {
                crate::failover::multi_host_url(&[standby.port, primary.port], db)
            }
            _ => format!("{}/{db}", self.postgres_base()),
        }
    }

    /// Adds a streaming standby of the private cluster (`--db-failover`).
    pub async fn add_standby(
        &mut self,
        replication: crate::failover::Replication,
    ) -> anyhow::Result<()> {
        let (Some(primary), Some(dir)) = (&self.cluster, &self.private_dir) else {
            bail!("--db-failover needs the suite's private PostgreSQL (--services private)");
        };
        let (standby, proxy) = crate::failover::start_standby(primary, dir, replication).await?;
        self.standby = Some(standby);
        self.replication_proxy = proxy;
        Ok(())
    }

    /// The private primary and its standby, in the `--db-failover` mode.
    pub fn failover_pair(&self) -> Option<(&PrivateCluster, &PrivateCluster)> {
        Some((self.cluster.as_ref()?, self.standby.as_ref()?))
    }

    /// AMQP URL of the vhost; on a cluster, every node's, comma-separated (`AMQP_URL`'s list
    /// form).
    pub fn amqp_url(&self) -> String {
        if self.peers.is_empty() {
            return format!("{}/{}", self.amqp_base(), self.vhost);
        }
        self.broker_nodes()
            .iter()
            .map(|n| format!("{}/{}", n.amqp_base(), self.vhost))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// URL of the database.
    pub fn database_url(&self) -> String {
        self.postgres_url(&self.database)
    }

    /// The address of the database server (for the latency proxy to forward to).
    pub fn database_addr(&self) -> anyhow::Result<std::net::SocketAddr> {
        use std::net::ToSocketAddrs as _;
        let base = self.postgres_base();
        let (_, host_port) = split_authority(&base)?;
        let host_port = if host_port.contains(':') {
            host_port.to_owned()
        } else {
            format!("{host_port}:5432")
        };
        host_port
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve the database server {host_port}"))?
            .next()
            .with_context(|| format!("no address for the database server {host_port}"))
    }

    /// URL of the database, but on 127.0.0.1:`port` (the latency proxy).
    pub fn database_url_via(&self, port: u16) -> anyhow::Result<String> {
        let base = self.postgres_base();
        let (before, host_port) = split_authority(&base)?;
        let rest = &base[before.len() + host_port.len()..];
        Ok(format!("{before}127.0.0.1:{port}{rest}/{}", self.database))
    }

    /// One statement on the `postgres` maintenance database.
    async fn admin_sql(&self, statement: &str) -> anyhow::Result<u64> {
        let url = self.postgres_url("postgres");
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

    /// A plain AMQP connection to the vhost (on a cluster, on the first node that takes it).
    pub async fn amqp(&self) -> anyhow::Result<Connection> {
        let url = self.amqp_url();
        let mut last = None;
        for node in url.split(',') {
            match Connection::connect(node, ConnectionProperties::default()).await {
                Ok(conn) => return Ok(conn),
                Err(e) => last = Some(e),
            }
        }
        Err(last.map_or_else(|| anyhow::anyhow!("no broker node"), anyhow::Error::from))
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
        // On a cluster, a quorum queue: a classic queue lives on one node, and while that node
        // is down the events routed to it would be lost to the books.
        let mut arguments = FieldTable::default();
        if !self.peers.is_empty() {
            arguments.insert(
                "x-queue-type".into(),
                lapin::types::AMQPValue::LongString("quorum".into()),
            );
        }
        ch.queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
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
        let out = self.ctl(&[
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
        let out = self.ctl(&[
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
                if self
                    .ctl(&["close_connection", pid.trim(), "fault test"])
                    .is_ok()
                {
                    closed += 1;
                }
            }
        }
        Ok(closed)
    }

    /// Terminates every backend connected to this database (only this one). Returns how many.
    pub async fn terminate_backends(&self) -> anyhow::Result<u64> {
        let url = self.postgres_url("postgres");
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

    /// Removes the vhost and the database (unless `keep`), and stops the private services.
    pub async fn remove(&mut self) {
        if self.keep {
            println!(
                "kept vhost {} and database {} for inspection",
                self.vhost, self.database
            );
        } else {
            let _ = self.ctl(&["delete_vhost", &self.vhost]);
            let drop = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.database);
            if let Err(e) = self.admin_sql(&drop).await {
                eprintln!("could not drop database {}: {e}", self.database);
            }
        }
        self.stop_private();
    }

    /// Stops the private broker and cluster, if any (their files stay with `keep`).
    fn stop_private(&mut self) {
        for peer in std::mem::take(&mut self.peers) {
            peer.stop(self.keep);
        }
        if let Some(b) = self.broker.take() {
            b.stop(self.keep);
        }
        if let Some(c) = self.standby.take() {
            c.stop(self.keep);
        }
        if let Some(c) = self.cluster.take() {
            c.stop(self.keep);
        }
        if let Some(dir) = self.private_dir.take() {
            if self.keep {
                println!("kept the private services' files in {}", dir.display());
            } else {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }

    /// Stops and starts the broker application (the private node only: on a shared broker
    /// it would cut every other user's connections).
    pub async fn restart_broker(&self, down_for: Duration) -> anyhow::Result<()> {
        match &self.broker {
            Some(b) => b.restart_app(down_for).await,
            None => bail!("refusing to stop a shared broker; run with --services private"),
        }
    }

    /// Crash-stops and starts the database server (the private cluster only).
    pub async fn restart_database(&self, down_for: Duration) -> anyhow::Result<()> {
        match &self.cluster {
            Some(c) => c.restart(down_for).await,
            None => {
                bail!("refusing to restart a shared database server; run with --services private")
            }
        }
    }
}

impl Drop for Services {
    /// A suite that stops on an error or a panic must not leave a broker node and a database
    /// server running behind it.
    fn drop(&mut self) {
        self.stop_private();
    }
}

#[cfg(test)]
mod tests {
    use super::split_authority;

    #[test]
    fn split_authority_finds_host_and_port() {
        assert_eq!(
            split_authority("postgres://postgres@127.0.0.1:5432").unwrap(),
            ("postgres://postgres@", "127.0.0.1:5432")
        );
        assert_eq!(
            split_authority("postgres://u:p@db.example:6543/x?sslmode=disable").unwrap(),
            ("postgres://u:p@", "db.example:6543")
        );
        assert_eq!(
            split_authority("postgres://localhost").unwrap(),
            ("postgres://", "localhost")
        );
        assert!(split_authority("localhost:5432").is_err());
    }
}
