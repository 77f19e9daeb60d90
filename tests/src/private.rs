//! A private RabbitMQ node and PostgreSQL cluster, started by the fault suite or a test from
//! the machine's own installations on free ports: for the faults that cannot be aimed at one
//! vhost or one database (stopping the broker application, restarting the database server),
//! and for server settings the shared services do not have (TLS listeners).
//!
//! Both run as the services' own system users when the suite runs as root (the broker's
//! Erlang cookie and PostgreSQL's refusal to run as root leave no other choice), with their
//! files in one temporary folder that is removed when they are stopped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

/// Where the PostgreSQL server programs are (Debian's layout), newest version first.
fn postgres_bin_dir() -> anyhow::Result<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .with_context(|| format!("no {}: is the PostgreSQL server installed?", root.display()))?
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().into_string().ok()?.parse().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, bin)| bin.join("initdb").exists())
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => Ok(bin),
        None => bail!("no PostgreSQL server under {}", root.display()),
    }
}

/// A port nobody listens on right now (the OS picks it; it is released at once, so a race
/// with another program is possible but unlikely; the start-up fails clearly if it happens).
pub(crate) fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(listener.local_addr()?.port())
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `program` run as the system `user` when we are root, as ourselves otherwise.
pub(crate) fn as_user(user: &str, program: &Path) -> Command {
    if running_as_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", user, "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

/// Runs `cmd`; an error names `what` and carries the command's own error output.
pub(crate) fn run(mut cmd: Command, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run the command to {what}"))?;
    if !out.status.success() {
        bail!(
            "could not {what}: {}{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Creates `dir` (and parents) owned by `user` when we are root.
pub(crate) fn make_dir_for(dir: &Path, user: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if running_as_root() {
        let mut chown = Command::new("chown");
        chown.args(["-R", &format!("{user}:{user}")]).arg(dir);
        run(chown, &format!("give {} to {user}", dir.display()))?;
    }
    Ok(())
}

/// A RabbitMQ node of the suite's own.
pub struct PrivateBroker {
    /// Erlang node name (`rabbitmqctl -n`).
    pub node: String,
    /// Its AMQP port on 127.0.0.1.
    pub port: u16,
    /// Its AMQP-over-TLS port on 127.0.0.1, when started with [`BrokerTls`].
    pub tls_port: Option<u16>,
    /// Its Erlang distribution port (inter-node traffic and the CLI tools).
    dist_port: u16,
    dir: PathBuf,
}

/// A TLS listener for a [`PrivateBroker`] (`listeners.ssl.default`, `ssl_options.*`).
pub struct BrokerTls {
    /// The CA the broker checks client certificates against (PEM).
    pub ca_pem: String,
    /// The server certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PEM).
    pub key_pem: String,
    /// Refuse clients without a certificate (`ssl_options.fail_if_no_peer_cert = true`).
    pub require_client_cert: bool,
}

impl PrivateBroker {
    /// Starts a node named `name` with its files under `dir` and waits until it answers.
    pub async fn start(dir: &Path, name: &str) -> anyhow::Result<Self> {
        Self::start_with(dir, name, None).await
    }

    /// [`PrivateBroker::start`], with a TLS listener as well when `tls` is given (peers are
    /// verified: `ssl_options.verify = verify_peer`).
    pub async fn start_with(
        dir: &Path,
        name: &str,
        tls: Option<&BrokerTls>,
    ) -> anyhow::Result<Self> {
        let (port, dist_port) = (free_port()?, free_port()?);
        let node = format!("{name}@localhost");
        let dir = dir.join("rabbitmq");
        std::fs::create_dir_all(dir.join("mnesia"))?;
        std::fs::create_dir_all(dir.join("log"))?;
        // Its own config and env files: the machine's files name the system node and its port.
        let mut conf = format!("listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n");
        let tls_port = match tls {
            None => None,
            Some(tls) => {
                let tls_port = free_port()?;
                let tls_dir = dir.join("tls");
                std::fs::create_dir_all(&tls_dir)?;
                let (ca, cert, key) = (
                    tls_dir.join("ca.pem"),
                    tls_dir.join("server.pem"),
                    tls_dir.join("server.key"),
                );
                std::fs::write(&ca, &tls.ca_pem)?;
                std::fs::write(&cert, &tls.cert_pem)?;
                std::fs::write(&key, &tls.key_pem)?;
                conf.push_str(&format!(
                    "listeners.ssl.default = 127.0.0.1:{tls_port}\n\
                     ssl_options.cacertfile = {}\n\
                     ssl_options.certfile = {}\n\
                     ssl_options.keyfile = {}\n\
                     ssl_options.verify = verify_peer\n\
                     ssl_options.fail_if_no_peer_cert = {}\n",
                    ca.display(),
                    cert.display(),
                    key.display(),
                    tls.require_client_cert
                ));
                Some(tls_port)
            }
        };
        std::fs::write(dir.join("rabbitmq.conf"), conf)?;
        std::fs::write(dir.join("rabbitmq-env.conf"), "")?;
        // No plugins: the management plugin would want the system node's HTTP port.
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        make_dir_for(&dir, "rabbitmq")?;
        let broker = Self {
            node,
            port,
            tls_port,
            dist_port,
            dir,
        };
        broker.launch()?;
        broker.await_running(Duration::from_secs(90)).await?;
        Ok(broker)
    }

    /// Starts `nodes` nodes (named `<name>-1`, `<name>-2`, …, each with its own AMQP and
    /// distribution ports and files under `dir/node-<k>`) and joins the others to the first
    /// (`rabbitmqctl join_cluster`). They run as the `rabbitmq` system user, so they share its
    /// Erlang cookie. If a later node fails, the ones already started are shut down.
    pub async fn start_cluster(dir: &Path, name: &str, nodes: usize) -> anyhow::Result<Vec<Self>> {
        let mut started: Vec<Self> = Vec::with_capacity(nodes);
        for k in 1..=nodes {
            let node_dir = dir.join(format!("node-{k}"));
            let joined = match Self::start(&node_dir, &format!("{name}-{k}")).await {
                Ok(node) => match started.first() {
                    Some(seed) => node.join(seed).map(|()| node),
                    None => Ok(node),
                },
                Err(e) => Err(e),
            };
            match joined {
                Ok(node) => started.push(node),
                Err(e) => {
                    for node in &started {
                        node.stop(false);
                    }
                    return Err(e);
                }
            }
        }
        Ok(started)
    }

    /// Joins this (fresh) node to `seed`'s cluster: `stop_app`, `join_cluster`, `start_app`.
    fn join(&self, seed: &Self) -> anyhow::Result<()> {
        self.ctl(&["stop_app"])?;
        self.ctl(&["join_cluster", &seed.node])?;
        self.ctl(&["start_app"])?;
        Ok(())
    }

    /// `rabbitmq-server -detached` with this node's files and ports.
    fn launch(&self) -> anyhow::Result<()> {
        let dir = &self.dir;
        let mut cmd = as_user(
            "rabbitmq",
            Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server"),
        );
        cmd.arg("-detached")
            .current_dir(dir)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1");
        run(cmd, &format!("start the RabbitMQ node {}", self.node)).map(drop)
    }

    /// The OS process id of the node's Erlang VM (`beam.smp`), asked of the node itself.
    pub fn os_pid(&self) -> anyhow::Result<u32> {
        let out = self.ctl(&["eval", "os:getpid()."])?;
        out.trim()
            .trim_matches('"')
            .parse()
            .with_context(|| format!("{} answered no process id: {out}", self.node))
    }

    /// `kill -9` of the node's `beam.smp`, the way a crashed machine would leave it (no
    /// clean shutdown, no goodbye to the peers); returns once the process is gone, with its
    /// pid and when the signal was sent (the moment clients start to notice).
    pub async fn kill9(&self) -> anyhow::Result<(u32, std::time::Instant)> {
        let pid = self.os_pid()?;
        let sent = std::time::Instant::now();
        let mut kill = Command::new("kill");
        kill.args(["-9", &pid.to_string()]);
        run(kill, &format!("kill -9 the RabbitMQ node {}", self.node))?;
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while proc_dir.exists() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if proc_dir.exists() {
            bail!("{} (pid {pid}) survived kill -9 for 30 s", self.node);
        }
        Ok((pid, sent))
    }

    /// Starts the node again after [`Self::kill9`] (same files, ports and name: it rejoins
    /// its cluster) and waits until it answers.
    pub async fn start_again(&self) -> anyhow::Result<()> {
        self.launch()?;
        self.await_running(Duration::from_secs(120)).await
    }

    /// `rabbitmqctl -n <node> args…`.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new("rabbitmqctl");
        cmd.args(["-n", &self.node]).args(args);
        run(cmd, &format!("run rabbitmqctl {args:?} on {}", self.node))
    }

    /// Waits until the node's `rabbit` application is up (a `-detached` start returns before
    /// the node has even registered, so `await_startup` alone fails at first).
    async fn await_running(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.ctl(&["-q", "await_startup", "--timeout", "10"]) {
                Ok(_) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(e.context(format!(
                        "the RabbitMQ node {} did not start; its logs are in {}",
                        self.node,
                        self.dir.join("log").display()
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    /// AMQP URL of the node without a vhost.
    pub fn amqp_base(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}", self.port)
    }

    /// `amqps://` URL of the node's TLS listener, with the default vhost (`None` without one).
    pub fn amqps_url(&self) -> Option<String> {
        self.tls_port
            .map(|port| format!("amqps://guest:guest@127.0.0.1:{port}/%2f"))
    }

    /// `stop_app`, `down_for`, then `start_app`, retried while the listener's port is still
    /// held by the closing sockets (seen here: `eaddrinuse` right after `stop_app`).
    pub async fn restart_app(&self, down_for: Duration) -> anyhow::Result<()> {
        self.ctl(&["stop_app"])?;
        tokio::time::sleep(down_for).await;
        let mut last = None;
        for _ in 0..20 {
            match self.ctl(&["start_app"]) {
                Ok(_) => return Ok(()),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("start_app never ran")))
    }

    /// Shuts the node down and removes its files (errors are reported, not returned: this
    /// runs on the way out).
    pub fn stop(&self, keep_files: bool) {
        if let Err(e) = self.ctl(&["-q", "shutdown"]) {
            eprintln!("could not shut down the RabbitMQ node {}: {e:#}", self.node);
        }
        if !keep_files {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A PostgreSQL cluster of the suite's own (trust authentication for `postgres`). A clone is
/// another handle on the same server (for a task that kills or promotes it while the owner
/// keeps the one that stops it).
#[derive(Clone)]
pub struct PrivateCluster {
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

/// TLS for a [`PrivateCluster`]: the server's certificate chain and key (PEM).
pub struct ClusterTls {
    /// The server certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PEM).
    pub key_pem: String,
    /// Refuse connections without TLS over TCP (`hostssl` lines only in `pg_hba.conf`).
    pub tls_only: bool,
}

impl PrivateCluster {
    /// Creates a cluster under `dir`, starts it and waits until it answers.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(dir, None)
    }

    /// [`PrivateCluster::start`], with TLS on when `tls` is given.
    pub fn start_with(dir: &Path, tls: Option<&ClusterTls>) -> anyhow::Result<Self> {
        let bin = postgres_bin_dir()?;
        let port = free_port()?;
        let dir = dir.join("postgres");
        make_dir_for(&dir, "postgres")?;
        let mut initdb = as_user("postgres", &bin.join("initdb"));
        // -N: no fsync during initdb; the cluster only lives for one run.
        initdb
            .args(["-A", "trust", "-U", "postgres", "-N", "-D"])
            .arg(dir.join("data"));
        run(initdb, "create a PostgreSQL cluster (initdb)")?;
        if let Some(tls) = tls {
            let data = dir.join("data");
            std::fs::write(data.join("server.crt"), &tls.cert_pem)?;
            std::fs::write(data.join("server.key"), &tls.key_pem)?;
            let mut conf = std::fs::OpenOptions::new()
                .append(true)
                .open(data.join("postgresql.conf"))?;
            std::io::Write::write_all(
                &mut conf,
                b"\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
            )?;
            if tls.tls_only {
                std::fs::write(
                    data.join("pg_hba.conf"),
                    "local all all trust\nhostssl all all 127.0.0.1/32 trust\n\
                     hostssl all all ::1/128 trust\n",
                )?;
            }
            make_dir_for(&data, "postgres")?;
            // PostgreSQL refuses a key others can read.
            let mut chmod = Command::new("chmod");
            chmod.arg("600").arg(data.join("server.key"));
            run(chmod, "make the server key private")?;
        }
        let cluster = Self { port, dir, bin };
        cluster.pg_ctl("start")?;
        Ok(cluster)
    }

    /// A streaming standby of this cluster under `dir` (`pg_basebackup -R`: it follows the
    /// primary until promoted), started and answering. Replication is asynchronous unless
    /// the primary names it in `synchronous_standby_names` (see [`Self::set`]).
    pub fn start_standby(&self, dir: &Path, name: &str) -> anyhow::Result<Self> {
        self.start_standby_via(dir, name, self.port)
    }

    /// [`Self::start_standby`], with the copy and the WAL stream going to 127.0.0.1:`via`
    /// (e.g. a proxy in front of this primary that delays the stream).
    pub fn start_standby_via(&self, dir: &Path, name: &str, via: u16) -> anyhow::Result<Self> {
        let port = free_port()?;
        let dir = dir.join("postgres");
        make_dir_for(&dir, "postgres")?;
        let mut backup = as_user("postgres", &self.bin.join("pg_basebackup"));
        backup
            .args(["-h", "127.0.0.1", "-p", &via.to_string(), "-U", "postgres"])
            .args(["-X", "stream", "-R", "-d"])
            .arg(format!(
                "host=127.0.0.1 port={via} user=postgres application_name={name}"
            ))
            .arg("-D")
            .arg(dir.join("data"));
        run(backup, "copy the primary for a standby (pg_basebackup)")?;
        let standby = Self {
            port,
            dir,
            bin: self.bin.clone(),
        };
        standby.pg_ctl("start")?;
        Ok(standby)
    }

    /// `ALTER SYSTEM SET <name> = '<value>'` and a reload.
    pub async fn set(&self, name: &str, value: &str) -> anyhow::Result<()> {
        let url = format!("{}/postgres", self.postgres_base());
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        let value = value.replace('\'', "''");
        // Two statements: a multi-statement string is one implicit transaction, which
        // ALTER SYSTEM refuses.
        client
            .batch_execute(&format!("ALTER SYSTEM SET {name} = '{value}'"))
            .await?;
        client.batch_execute("SELECT pg_reload_conf()").await?;
        Ok(())
    }

    /// Stops the server the way a crash would and leaves it down.
    pub fn kill(&self) -> anyhow::Result<()> {
        self.pg_ctl("stop")
    }

    /// The postmaster's process id, from the first line of `postmaster.pid` (present while
    /// the server runs, and left behind by a crash).
    pub fn postmaster_pid(&self) -> anyhow::Result<u32> {
        let path = self.dir.join("data").join("postmaster.pid");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        text.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .with_context(|| format!("no process id on the first line of {}", path.display()))
    }

    /// Whether the postmaster named in `postmaster.pid` is alive: its process exists and is
    /// not a zombie (a killed postmaster stays one until whoever adopted it reaps it, and
    /// `kill -0` would still find it).
    pub fn is_running(&self) -> bool {
        self.postmaster_pid().is_ok_and(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                // `pid (comm) state …`: the state follows the last `)`.
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next())
                    .is_some_and(|state| state != "Z" && state != "X")
            })
        })
    }

    /// `kill -9` of the postmaster: a crash of the server machine as far as clients can
    /// tell (no shutdown, no checkpoint, nothing sent to the standby), unlike [`Self::kill`],
    /// which asks `pg_ctl` for an immediate stop. Returns once the postmaster is gone (its
    /// backends notice its death and exit by themselves). Returns the pid it killed.
    pub async fn kill9(&self) -> anyhow::Result<u32> {
        let pid = self.postmaster_pid()?;
        let mut kill = Command::new("kill");
        kill.args(["-KILL", &pid.to_string()]);
        run(kill, &format!("kill -9 the postmaster (pid {pid})"))?;
        // A signalled process is gone at once; polled so the caller may rely on it (bounded).
        for _ in 0..100 {
            if !self.is_running() {
                return Ok(pid);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("the postmaster (pid {pid}) still runs 5 s after kill -9")
    }

    /// Promotes a standby to primary and waits until it accepts writes.
    pub fn promote(&self) -> anyhow::Result<()> {
        self.pg_ctl("promote")
    }

    /// `pg_ctl <action>` with the cluster's options; waits for the action to finish.
    fn pg_ctl(&self, action: &str) -> anyhow::Result<()> {
        let mut cmd = as_user("postgres", &self.bin.join("pg_ctl"));
        cmd.arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-w", "-t", "60", "-m", "immediate"])
            .arg("-o")
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off",
                self.port,
                self.dir.display()
            ))
            .arg(action);
        run(cmd, &format!("{action} the PostgreSQL cluster"))
            .map(drop)
            .with_context(|| format!("its log: {}", self.dir.join("server.log").display()))
    }

    /// URL of the server without a database.
    pub fn postgres_base(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// Stops the server the way a crash would (`immediate`: no checkpoint, so the start runs
    /// WAL recovery), keeps it down for `down_for`, then starts it.
    pub async fn restart(&self, down_for: Duration) -> anyhow::Result<()> {
        self.pg_ctl("stop")?;
        tokio::time::sleep(down_for).await;
        self.pg_ctl("start")
    }

    /// Stops the server and removes its files (errors are reported, not returned).
    pub fn stop(&self, keep_files: bool) {
        // A server killed with kill -9 has nothing left to stop (pg_ctl would complain).
        if !self.is_running() {
            if !keep_files {
                let _ = std::fs::remove_dir_all(&self.dir);
            }
            return;
        }
        if let Err(e) = self.pg_ctl("stop") {
            eprintln!("could not stop the PostgreSQL cluster: {e:#}");
        }
        if !keep_files {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
