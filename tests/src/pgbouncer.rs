//! A PgBouncer of a test's own, in front of the shared PostgreSQL (`TEST_POSTGRES_BASE`, trust
//! authentication), on a free port and in the pool mode the test asks for. It runs as the
//! `postgres` system user when the test runs as root (PgBouncer refuses to run as root), with
//! its files in a temporary folder; it is stopped and the folder removed on drop.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::private::{as_user, free_port, make_dir_for, run};

/// PgBouncer's `pool_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// A client keeps its server session until it disconnects.
    Session,
    /// A client holds a server session only for one transaction.
    Transaction,
}

impl PoolMode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::Transaction => "transaction",
        }
    }
}

/// A running PgBouncer.
pub struct PgBouncer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
}

impl PgBouncer {
    /// Starts one in `mode` in front of the server of [`crate::harness::postgres_base`], for
    /// every database on it, and waits until it accepts connections. Fails (naming the fix)
    /// when the `pgbouncer` program is not installed: `scripts/services.sh` installs it.
    pub async fn start(mode: PoolMode) -> anyhow::Result<Self> {
        let program = find_program().context(
            "pgbouncer is not installed: run scripts/services.sh as root (it installs it) or apt-get install pgbouncer",
        )?;
        let server = tokio_postgres::Config::from_str(&crate::harness::postgres_base())
            .context("TEST_POSTGRES_BASE")?;
        let (host, port) = match (server.get_hosts().first(), server.get_ports().first()) {
            (Some(tokio_postgres::config::Host::Tcp(host)), port) => {
                (host.clone(), port.copied().unwrap_or(5432))
            }
            _ => bail!("TEST_POSTGRES_BASE must name a TCP host for the PgBouncer test"),
        };
        let user = server.get_user().unwrap_or("postgres").to_owned();
        let listen = free_port()?;
        let dir = std::env::temp_dir().join(format!(
            "lc-pgbouncer-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir)?;
        // Trust towards the server, as the shared one is set up; the user must still be listed.
        std::fs::write(dir.join("userlist.txt"), format!("\"{user}\" \"\"\n"))?;
        std::fs::write(
            dir.join("pgbouncer.ini"),
            format!(
                "[databases]\n* = host={host} port={port}\n\n[pgbouncer]\n\
                 listen_addr = 127.0.0.1\nlisten_port = {listen}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {users}\npool_mode = {mode}\n\
                 default_pool_size = 20\nmax_client_conn = 200\n\
                 logfile = {log}\npidfile = {pid}\n",
                users = dir.join("userlist.txt").display(),
                mode = mode.as_str(),
                log = dir.join("pgbouncer.log").display(),
                pid = dir.join("pgbouncer.pid").display(),
            ),
        )?;
        make_dir_for(&dir, "postgres")?;
        let bouncer = Self { port: listen, dir };
        let mut cmd = as_user("postgres", &program);
        cmd.arg("-d").arg(bouncer.dir.join("pgbouncer.ini"));
        run(cmd, "start pgbouncer")?;
        bouncer.await_listening(Duration::from_secs(20)).await?;
        Ok(bouncer)
    }

    /// `DATABASE_URL` of `database` through this PgBouncer.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    async fn await_listening(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "pgbouncer did not listen on {} within {timeout:?}; its log: {}",
                    self.port,
                    self.dir.join("pgbouncer.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let pid = std::fs::read_to_string(self.dir.join("pgbouncer.pid")).unwrap_or_default();
        if let Ok(pid) = pid.trim().parse::<u32>() {
            let mut kill = std::process::Command::new("kill");
            kill.arg(pid.to_string());
            if let Err(e) = run(kill, "stop pgbouncer") {
                eprintln!("{e:#}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `pgbouncer` on the `PATH` or in Debian's `/usr/sbin` (not on a non-root `PATH`).
fn find_program() -> anyhow::Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .iter()
        .map(|dir| dir.join("pgbouncer"))
        .chain([Path::new("/usr/sbin/pgbouncer").to_path_buf()])
        .find(|p| p.is_file())
        .context("no pgbouncer on PATH or in /usr/sbin")
}
